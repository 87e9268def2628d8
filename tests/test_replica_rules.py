"""The merge rules of registry_node.replica, driven directly on a real node."""

from __future__ import annotations

import pytest

from registry_node import inventory
from registry_node.config import NodeConfig
from registry_node.records import Event, EventKind
from registry_node.replica import Replica

from .helpers import make_image, push_blob, push_image, started_node


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


@pytest.mark.parametrize("delete_later", [True, False], ids=["delete later", "restore later"])
async def test_a_delete_racing_a_restore_ends_the_same_in_either_order(tmp_path, http,
                                                                        delete_later):
    """A restore in one region (its push and tag set, t2, undoing a soft
    delete at t1) and a soft delete of the same manifest in another (t3),
    applied in both orders on two nodes: the same registers and the same bins,
    the later write's — deleted with that delete's entry, or live with no
    entry (the stateful test's delete_racing_restore, without the cluster)."""
    image = make_image(seed=74)
    t0, t1, t2, t3 = ((1 << 40) + 10 * k for k in ((0, 1, 2, 3) if delete_later else (0, 1, 3, 2)))

    def put(hlc: int) -> Event:
        return remote(EventKind.MANIFEST_PUT, "app", digest=image.digest, hlc=hlc,
                      media_type=image.media_type, size=len(image.manifest))

    def tag_set(hlc: int) -> Event:
        return remote(EventKind.TAG_SET, "app", tag="v1", digest=image.digest, hlc=hlc)

    def soft_delete(hlc: int, region: str) -> Event:
        return Event(kind=EventKind.MANIFEST_DELETE, repository="app", digest=image.digest,
                     origin_region=region, hlc=hlc, acked_ns=hlc, recycled=True,
                     recycled_tags=("v1",))

    held = []
    for order in ("restore first", "delete first"):
        async with started_node(NodeConfig(data_dir=tmp_path / order, port=0)) as node:
            for blob in image.blobs:
                await push_blob(http, node.url, "app", blob)
            replica = Replica(node.registry, node.node.configuration)
            replica.apply_manifest(put(t0), image.manifest)
            replica.apply_tag(tag_set(t0))
            replica.apply_manifest_delete(soft_delete(t1, "westeurope"))
            restore = [lambda r=replica: r.apply_manifest(put(t2), image.manifest),
                       lambda r=replica: r.apply_tag(tag_set(t2))]
            rival = [lambda r=replica: r.apply_manifest_delete(soft_delete(t3, "brazilsouth"))]
            for apply in (restore + rival if order == "restore first" else rival + restore):
                apply()
            stored = inventory.build(node.registry.meta.scan, [])["repositories"]["app"]
            held.append({part: stored[part] for part in (
                "tags", "deleted_tags", "manifests", "deleted_manifests", "recycled_manifests",
                "recycled_tags")})
    assert held[0] == held[1]
    if delete_later:
        assert held[0]["recycled_manifests"][image.digest]["stamp"] == [t3, "brazilsouth", ""]
        assert held[0]["tags"] == {} and held[0]["recycled_tags"] == {}
    else:
        assert held[0]["tags"]["v1"]["digest"] == image.digest
        assert held[0]["recycled_manifests"] == {} == held[0]["recycled_tags"]
