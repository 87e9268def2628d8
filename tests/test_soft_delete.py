"""Soft delete (``registry_node.recycle_bin``) on real in-process nodes: the
policy's bad input, a delete into the recycle bin and a restore a real client
pulls again, tags that moved since, purge on the injected clock and GC after
it (and not before), who may list and restore, and a restore in one region
restoring in the other. The delete-vs-restore race across regions is a rule
of ``test_replication_stateful``.
"""

from __future__ import annotations

from dataclasses import replace

import aiohttp
import pytest

from cluster.control import soft_delete
from cluster.control.errors import ClusterError
from cluster.faults.verify import NodeTarget, Snapshot, compare_registers, verify
from registry_node import inventory, keys
from registry_node.config import NodeConfig
from registry_node.gc import GarbageCollector
from registry_node.metastore import Batch
from replicator.residency import ResidencyPolicy

from .auth_helpers import (
    ADMIN_PASSWORD,
    PUSH_PASSWORD,
    REGISTRY,
    Password,
    ScopeMapRecord,
    TokenRecord,
    auth_files,
    basic,
    hash_secret,
    identities,
    start_auth_node,
)
from .helpers import (
    Skopeo,
    assert_error,
    digest_of,
    eventually,
    make_image,
    push_image,
    started_node,
    write_oci_layout,
)
from .replication_invariants import start_cluster, stop_cluster

DAY_S = 86_400
POLICY = "/georeg/v1/configuration/registry/default"


async def set_policy(http, url: str, status: int = 200, headers=None, **policy) -> None:
    async with http.put(url + POLICY, json={"soft_delete": policy}, headers=headers) as r:
        if status != 200:
            await assert_error(r, status)
        else:
            assert r.status == 200, await r.text()


async def deleted(http, url: str, repo: str = "app", headers=None) -> dict:
    async with http.get(f"{url}/acr/v1/{repo}/_deleted", headers=headers) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def restore(http, url: str, reference: str, status: int = 200, repo: str = "app",
                  force: bool = False, headers=None, code: str | None = None) -> dict:
    query = "?force=true" if force else ""
    async with http.post(f"{url}/acr/v1/{repo}/_deleted/{reference}{query}",
                         headers=headers) as r:
        if status != 200:
            return await assert_error(r, status, code)
        assert r.status == 200, await r.text()
        return await r.json()


async def delete(http, url: str, reference: str, repo: str = "app") -> None:
    async with http.delete(f"{url}/v2/{repo}/manifests/{reference}") as r:
        assert r.status == 202, await r.text()


async def tag_digest(http, url: str, tag: str, repo: str = "app") -> str | None:
    async with http.head(f"{url}/v2/{repo}/manifests/{tag}",
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}) as r:
        return r.headers["Docker-Content-Digest"] if r.status == 200 else None


async def test_bad_policy_input_is_a_clear_400_and_changes_nothing(node, http):
    for days in (0, 91, "x", True):
        await set_policy(http, node.url, 400, enabled=True, days=days)
    await set_policy(http, node.url, 400, enabled="yes")
    assert node.node.configuration.soft_delete().enabled is False
    await set_policy(http, node.url, enabled=True, days=90)
    assert node.node.configuration.soft_delete().days == 90


async def test_delete_goes_to_the_bin_and_restore_brings_it_back_for_skopeo(node, http, tmp_path):
    """By digest: the manifest and both its tags are in the bin, unpullable;
    the restore by one of the tags brings back the manifest and both tags,
    and skopeo pulls it again. Restoring what is not in the bin is a 404; a
    tag re-pointed since the delete refuses the restore (409, nothing
    changed) unless forced."""
    skopeo = Skopeo(tmp_path / "skopeo", node.url.removeprefix("http://"))
    write_oci_layout(tmp_path / "first", make_image(seed=40))
    await skopeo.copy(f"oci:{tmp_path / 'first'}:latest", skopeo.ref("app:v1"))
    await skopeo.copy(f"oci:{tmp_path / 'first'}:latest", skopeo.ref("app:v2"))
    digest = await tag_digest(http, node.url, "v1")
    await restore(http, node.url, digest, 404)           # nothing deleted yet
    await set_policy(http, node.url, enabled=True, days=7)

    await delete(http, node.url, digest)
    binned = await deleted(http, node.url)
    assert [(m["digest"], m["tags"]) for m in binned["manifests"]] == [(digest, ["v1", "v2"])]
    assert binned["manifests"][0]["purgeTime"] > binned["manifests"][0]["deletedTime"]
    code, _, _ = await skopeo.run("inspect", "--raw", "--tls-verify=false",
                                  skopeo.ref("app:v1"), check=False)
    assert code != 0
    await restore(http, node.url, "sha256:" + "0" * 64, 404, code="MANIFEST_UNKNOWN")
    await restore(http, node.url, "nope", 404, code="MANIFEST_UNKNOWN")
    await restore(http, node.url, "v1", 404, repo="nosuch", code="NAME_UNKNOWN")

    # v2 now names another image: the restore refuses, naming it, and changes nothing.
    other = make_image(seed=41)
    await push_image(http, node.url, "app", other, tag="v2")
    refused = await restore(http, node.url, "v1", 409)
    assert "v2" in refused["message"], refused
    assert (await deleted(http, node.url))["manifests"]
    assert await tag_digest(http, node.url, "v1") is None

    restored = await restore(http, node.url, "v1", force=True)
    assert restored["tagsRestored"] == ["v1", "v2"] and "v2" in restored["tagsMoved"]
    assert (await deleted(http, node.url))["manifests"] == []
    code, out, err = await skopeo.run("inspect", "--raw", "--tls-verify=false",
                                      skopeo.ref("app:v2"), check=False)
    assert code == 0 and out, err
    assert await tag_digest(http, node.url, "v2") == digest

    # Untag is soft too: the tag alone comes back.
    async with http.delete(f"{node.url}/acr/v1/app/_tags/v1") as r:
        assert r.status == 202
    assert [t["name"] for t in (await deleted(http, node.url))["tags"]] == ["v1"]
    assert (await restore(http, node.url, "v1"))["manifestRestored"] is False
    assert await tag_digest(http, node.url, "v1") == digest
    assert (await deleted(http, node.url))["tags"] == []


async def test_a_restore_is_refused_where_a_write_lock_holds(node, http):
    await set_policy(http, node.url, enabled=True)
    digest = await push_image(http, node.url, "app", make_image(seed=42), tag="v1")
    await delete(http, node.url, digest)
    async with http.patch(f"{node.url}/acr/v1/app", json={"writeEnabled": False}) as r:
        assert r.status == 200, await r.text()
    await restore(http, node.url, digest, 405)
    assert (await deleted(http, node.url))["manifests"]


async def test_the_bin_listing_pages_oldest_delete_first(node, http):
    """``n`` caps a page of manifests and tags together, in the order of the
    deletes' stamps; the ``Link`` goes on after the last (by name and stamp)."""
    await set_policy(http, node.url, enabled=True)
    first = await push_image(http, node.url, "app", make_image(seed=50), tag="v1")
    second = await push_image(http, node.url, "app", make_image(seed=51), tag="v2")
    await delete(http, node.url, first)
    await delete(http, node.url, "v2")
    await delete(http, node.url, second)
    async with http.get(f"{node.url}/acr/v1/app/_deleted?n=2") as r:
        assert r.status == 200, await r.text()
        page, link = await r.json(), r.headers["Link"]
    assert [m["digest"] for m in page["manifests"]] == [first]
    assert [t["name"] for t in page["tags"]] == ["v2"]
    assert "last=v2" in link and "stamp=" in link, link
    async with http.get(node.url + link[1:link.index(">")]) as r:
        assert r.status == 200 and "Link" not in r.headers
        rest = await r.json()
    assert ([m["digest"] for m in rest["manifests"]], rest["tags"]) == ([second], [])


class PeerPushingMeanwhile:
    """A peer (``staleness.PeerContent``) whose blob fetch gives the restore's
    await to another client: a push of another image by the restore's tag (or,
    with ``lock``, a write lock on the repository), then the blobs arrive."""

    def __init__(self, node, http, missing: dict[bytes, bytes], lock: bool) -> None:
        self.node, self.http, self.missing, self.lock = node, http, missing, lock

    async def fetch_blobs(self, repository: str, digests: list[str]) -> set[str]:
        if self.lock:
            async with self.http.patch(f"{self.node.url}/acr/v1/{repository}",
                                       json={"writeEnabled": False}) as r:
                assert r.status == 200, await r.text()
        else:
            await push_image(self.http, self.node.url, repository, make_image(seed=48), tag="v1")
        batch = Batch()
        for key, value in self.missing.items():
            batch.put(key, value)
        self.node.registry.meta.commit(batch)
        return set(digests)

    async def fetch_manifest(self, repository: str, reference: str) -> bool:
        return False


@pytest.mark.parametrize("lock", [False, True], ids=["tag pushed", "write lock"])
async def test_what_happens_while_a_restore_fetches_blobs_is_checked(node, http, lock):
    """A restore whose blobs must come from a peer awaits them: a push of its
    tag elsewhere, or a write lock (on a manifest without tags: no tag set
    to check it), taken meanwhile refuses it (409, 405) as it would have
    before the await; nothing is restored."""
    await set_policy(http, node.url, enabled=True)
    image = make_image(seed=47)
    digest = await push_image(http, node.url, "app", image, tag=None if lock else "v1")
    await delete(http, node.url, digest)
    layer = keys.blob(digest_of(image.layers[0]))
    missing = {layer: node.registry.meta.get(layer)}
    batch = Batch()
    batch.delete(layer)
    node.registry.meta.commit(batch)
    node.registry.peers = PeerPushingMeanwhile(node, http, missing, lock)
    await restore(http, node.url, digest, 405 if lock else 409)
    assert node.registry.bin.manifest("app", digest) is not None
    assert await tag_digest(http, node.url, "v1") != digest


async def test_purge_after_the_days_then_gc_reclaims_and_not_before(tmp_path, http, clock):
    config = NodeConfig(data_dir=tmp_path / "node", port=0)
    async with started_node(config, clock) as node:
        gc = GarbageCollector(node.registry, grace_s=1, upload_ttl_s=3600, interval_s=3600)
        await set_policy(http, node.url, enabled=True, days=1)
        image = make_image(seed=43)
        digest = await push_image(http, node.url, "app", image, tag="v1")
        layers = [keys.parse(k, keys.BlobKey).digest
                  for k, _ in node.registry.meta.scan(keys.BLOB)]
        assert len(layers) == len(image.blobs)
        await delete(http, node.url, digest)
        # ACR counts soft-deleted artifacts toward storage: the manifest's
        # bytes move from the live records to the bin's, kept on write.
        meta = node.registry.meta
        assert meta.usage.bytes == sum(map(len, image.blobs)) + len(image.manifest)
        assert (meta.usage.manifests, meta.usage.recycled) == (0, 1)
        assert meta.usage.recycled_bytes == len(image.manifest)
        assert meta.usage_discrepancies() == []
        clock.advance(DAY_S - 60)
        report = await gc.collect()
        assert report.purged == 0 and report.blobs_reclaimed == 0
        assert all(node.registry.meta.get(keys.blob(d)) is not None for d in layers)
        assert (await deleted(http, node.url))["manifests"]
        clock.advance(120)
        report = await gc.collect()
        assert report.purged == 1
        assert not node.registry.bin.holds("app")
        assert all(node.registry.meta.get(keys.blob(d)) is None for d in layers), report
        assert meta.usage.bytes == 0 and meta.usage_discrepancies() == []
        await restore(http, node.url, digest, 404)


async def test_listing_needs_delete_and_restoring_push_and_delete(tmp_path, http):
    """A token with every action but delete (``_repositories_push_metadata_write``:
    content read and write, metadata read and write) may neither list nor
    restore; a delete-only token may list but not restore; the admin (every
    action) may both. A refused restore changes nothing."""
    source = identities()
    source.put_scope_map(ScopeMapRecord("app-delete", ("repositories/app/content/delete",)))
    for name, scope_map in (("writer", "_repositories_push_metadata_write"),
                            ("deleter", "app-delete")):
        source.put_token(TokenRecord(name, scope_map, passwords=(
            Password("password1", hash_secret(PUSH_PASSWORD)),)))
    files = auth_files(tmp_path, "node-a")
    config = replace(files.config("node-a", tmp_path / "data"),
                     internal_credential_file=files.internal_file)
    node = await start_auth_node(config, source)
    try:
        admin = basic(REGISTRY, ADMIN_PASSWORD)
        writer, deleter = basic("writer", PUSH_PASSWORD), basic("deleter", PUSH_PASSWORD)
        async with aiohttp.ClientSession(headers=admin) as session:
            digest = await push_image(session, node.url, "app", make_image(seed=44), tag="v1")
        await set_policy(http, node.url, headers=files.internal_headers(), enabled=True)
        async with http.delete(f"{node.url}/v2/app/manifests/{digest}", headers=admin) as r:
            assert r.status == 202
        async with http.get(f"{node.url}/acr/v1/app/_deleted", headers=writer) as r:
            await assert_error(r, 403, "DENIED")
        await restore(http, node.url, digest, 403, headers=writer, code="DENIED")
        assert (await deleted(http, node.url, headers=deleter))["manifests"]
        await restore(http, node.url, digest, 403, headers=deleter, code="DENIED")
        assert (await deleted(http, node.url, headers=admin))["manifests"]
        await restore(http, node.url, digest, headers=admin)
    finally:
        await node.stop()


async def test_a_restore_in_one_region_restores_in_every_region(tmp_path, http):
    """Both regions hold the same bin entry (made as each applied the delete);
    a restore in the other region brings the image back in both, with its
    tag, and empties both bins; verify is clean."""
    cluster = await start_cluster(tmp_path, [("eastus", ""), ("westeurope", "")])
    try:
        east, west = cluster.nodes["eastus"], cluster.nodes["westeurope"]
        await set_policy(http, east.url, enabled=True, days=3)
        await eventually(lambda: west.node.configuration.soft_delete().enabled,
                         what="the policy in westeurope")
        digest = await push_image(http, east.url, "app", make_image(seed=45), tag="v1")
        await eventually(lambda: _has(west, digest), what="the image in westeurope")
        await delete(http, east.url, digest)

        async def binned(node) -> list:
            return (await deleted(http, node.url))["manifests"] if node.registry.bin.holds(
                "app") else []

        await eventually(lambda: _binned(west, digest), what="the bin entry in westeurope")
        assert await binned(east) == await binned(west)
        stored = inventory.build(west.registry.meta.scan, [])["repositories"]["app"]
        assert stored["recycled_manifests"][digest]["tags"] == ["v1"]
        await verify_clean(cluster)             # bins compared, entries held
        await restore(http, west.url, "v1")
        await eventually(lambda: _has(east, digest) and not east.registry.bin.holds("app"),
                         what="the restore in eastus")
        assert await tag_digest(http, east.url, "v1") == digest
        await verify_clean(cluster)
    finally:
        await stop_cluster(cluster)


async def verify_clean(cluster) -> None:
    report = await verify([NodeTarget(n.name, n.region, n.url, n.zone, n.data_dir)
                           for n in cluster.running()], policy=cluster.residency, timeout=30)
    assert report.error is None and report.divergences == [], report.as_dict()


def _has(node, digest: str) -> bool:
    return node.registry.meta.get(keys.manifest("app", digest)) is not None


def _binned(node, digest: str) -> bool:
    return node.registry.bin.manifest("app", digest) is not None


@pytest.mark.parametrize("body", [{}, {"retentionDays": 0}, {"retentionDays": 91},
                                  {"retentionDays": "x"}, {"retentionDays": True},
                                  {"status": "on"}, {"days": 7}])
def test_the_management_api_refuses_a_bad_policy(body):
    with pytest.raises(ClusterError):
        soft_delete.parse(body)
    assert soft_delete.parse({"status": "Enabled", "retentionDays": 1}) == {"enabled": True,
                                                                           "days": 1}


def test_verify_compares_recycle_bins():
    """``georeg verify`` holds bins to their registers: an entry another
    node's same delete does not match, a manifest delete soft on one node and
    hard on another, an entry outliving its delete (review finding 1's state:
    equal registers, so nothing else sees it) — and a node without the body's
    entry is not one."""
    digest = "sha256:" + "a" * 64

    def snapshot(name: str, region: str, **repo) -> Snapshot:
        return Snapshot(NodeTarget(name, region, ""), {"repositories": {"app": repo}})

    untag, delete = [5, "eastus", ""], [9, "eastus", ""]
    tomb = {"stamp": delete, "recycled": True, "recycled_tags": ["v1"]}
    entry = {"tags": ["v1"], "deleted_ns": 3, "stamp": delete}
    tag = {"digest": digest, "deleted_ns": 2, "stamp": untag}

    def diverging(*snapshots: Snapshot) -> list[tuple[str, str]]:
        return sorted((d.node, d.tag or d.digest) for d in
                      compare_registers(list(snapshots), ResidencyPolicy()))

    east = snapshot("e", "eastus", deleted_manifests={digest: tomb},
                    recycled_manifests={digest: entry},
                    deleted_tags={"v1": {"digest": digest, "stamp": untag}},
                    recycled_tags={"v1": tag})
    assert diverging(east, snapshot("w", "westeurope", **east.repo("app"))) == []
    # No body, no entry: the documented gap, not a divergence.
    assert diverging(east, snapshot("w", "westeurope", deleted_manifests={digest: tomb},
                                    deleted_tags=east.repo("app")["deleted_tags"],
                                    recycled_tags={"v1": tag})) == []
    assert diverging(east, snapshot("w", "westeurope", **{
        **east.repo("app"), "recycled_manifests": {digest: {**entry, "tags": []}},
        "recycled_tags": {}})) == [("e", digest), ("w", digest), ("w", "v1")]
    assert diverging(east, snapshot("w", "westeurope", **{
        **east.repo("app"), "deleted_manifests": {digest: {"stamp": delete}},
        "recycled_manifests": {}})) == [("e", digest), ("w", digest)]
    later = {"digest": digest, "stamp": [7, "westeurope", ""]}
    assert diverging(snapshot("e", "eastus", deleted_tags={"v1": later},
                              recycled_tags={"v1": tag}),
                     snapshot("w", "westeurope", deleted_tags={"v1": later})) == [("e", "v1")]
