"""The merge rules of registry_node.replica, driven directly on a real node."""

from __future__ import annotations

from registry_node.records import Event, EventKind
from registry_node.replica import Replica

from .helpers import make_image, push_blob, push_image


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


async def test_a_tag_set_a_newer_delete_ended_also_ends_the_tags_bin_entry(node, http):
    """Soft-untag T (t1), delete its manifest M (t3), then a tag-only restore
    of T from another region arrives, stamped between (t2): the delete already
    ended that value, so it lands as a tombstone — and it must end T's bin
    entry of t1 as the restore did where it was taken, or the two bins differ
    for good (registers equal, anti-entropy has nothing to repair)."""
    async with http.put(f"{node.url}/georeg/v1/configuration/registry/default",
                        json={"soft_delete": {"enabled": True}}) as r:
        assert r.status == 200, await r.text()
    digest = await push_image(http, node.url, "app", make_image(seed=71), tag="t")
    for reference in ("t", digest):
        async with http.delete(f"{node.url}/v2/app/manifests/{reference}") as r:
            assert r.status == 202, await r.text()
    untagged = node.registry.bin.tag("app", "t")
    deleted = node.registry.bin.manifest("app", digest)
    assert untagged is not None and deleted is not None and untagged.hlc + 1 < deleted.hlc
    restore = remote(EventKind.TAG_SET, "app", tag="t", digest=digest, hlc=untagged.hlc + 1)
    assert Replica(node.registry, node.node.configuration).apply_tag(restore) is not None
    assert node.registry.bin.tag("app", "t") is None


async def test_the_bin_picks_the_latest_delete_of_a_tag_by_stamp_not_wall_clock(node, http):
    """Two regions' soft deletes of two manifests that both had tag v1: the
    later by stamp (last-writer-wins' order) is what a restore of v1 brings
    back, even where the other's origin wall clock read later."""
    replica = Replica(node.registry, node.node.configuration)
    later = await push_image(http, node.url, "app", make_image(seed=72))
    earlier = await push_image(http, node.url, "app", make_image(seed=73))
    for digest, hlc, acked_ns in ((later, 1 << 61, 5), (earlier, 1 << 60, 9)):
        delete = Event(kind=EventKind.MANIFEST_DELETE, repository="app", digest=digest,
                       origin_region="westeurope", hlc=hlc, acked_ns=acked_ns, recycled=True,
                       recycled_tags=("v1",))
        assert replica.apply_manifest_delete(delete) is not None
    assert node.registry.bin.find_by_tag("app", "v1")[0] == later
