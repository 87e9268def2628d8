"""The merge rules of registry_node.replica, driven directly on a real node."""

from __future__ import annotations

from registry_node.records import Event, EventKind
from registry_node.replica import Replica

from .helpers import make_image, push_blob


def remote(kind: EventKind, repo: str, **fields) -> Event:
    return Event(kind=kind, repository=repo, origin_region="westeurope", origin_zone="",
                 hlc=fields.pop("hlc", 1 << 40), acked_ns=1, **fields)


async def test_a_manifest_whose_blobs_arrived_without_links_is_stored(node, http):
    """Anti-entropy and pull-time fetches bring blobs without the BLOB_PUT events
    that would link them; the manifest's references must be enough (a chaos run
    found pulls answered 404 for want of this)."""
    image = make_image([700, 800], seed=13)
    for blob in image.blobs:  # here, but linked only in another repository
        await push_blob(http, node.url, "elsewhere/repo", blob)
    replica = Replica(node.registry, node.node.configuration)
    event = remote(EventKind.MANIFEST_PUT, "target/app", digest=image.digest,
                   media_type=image.media_type, size=len(image.manifest))
    assert replica.apply_manifest(event, image.manifest) is not None
    async with http.get(f"{node.url}/v2/target/app/manifests/{image.digest}") as r:
        assert r.status == 200 and await r.read() == image.manifest
    for blob in image.blobs:
        from .helpers import digest_of

        async with http.get(f"{node.url}/v2/target/app/blobs/{digest_of(blob)}") as r:
            assert r.status == 200 and await r.read() == blob


async def test_a_soft_delete_applied_without_the_body_still_says_soft_to_anti_entropy(node):
    """A node that never held a manifest keeps no bin entry of its soft delete
    (no body), but its register must still say the delete was soft: read from
    the bin instead, anti-entropy from this node turned the delete into a hard
    one on nodes that did hold the body, ending their entries (the stateful
    test's delete_racing_restore found it)."""
    replica = Replica(node.registry, node.node.configuration)
    digest = "sha256:" + "1" * 64
    delete = remote(EventKind.MANIFEST_DELETE, "app", digest=digest, recycled=True,
                    recycled_tags=("v1",))
    assert replica.apply_manifest_delete(delete) is not None
    assert node.registry.bin.manifest("app", digest) is None
    [register] = replica.repository_state("app", lambda _region: True)["manifests"]
    assert register.deleted and register.recycled and register.recycled_tags == ("v1",)
    assert register.origin_acked_ns == 1
