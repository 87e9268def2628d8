"""Crashes that are crashes.

In process (``InProcessCluster``): ``crash`` is what SIGKILL leaves — a write
in flight gets no answer, every committed write survives (fsynced or not), an
open upload keeps what reached its file — and ``power_cut`` loses what was
never fsynced, no more.

With real processes (``georeg node`` under the supervisor, SIGKILL): a
zone-redundant region with two of its three zones killed refuses writes with
the error that says so, leaves nothing of them visible, and converges once the
zones are back.
"""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from cluster.control import spec as specs
from cluster.network.links import LinkFaults
from cluster.testing import RunningCluster
from registry_node.records import EventKind
from replicator.topology import ReplicationSettings

from .helpers import digest_of, eventually, make_image, push_blob, push_image
from .replication_invariants import start_cluster, stop_cluster


class DiskLosesEveryUnsyncedByte(random.Random):
    """A power cut at its worst: of each WAL file, only what was fsynced stays."""

    def choice(self, seq):
        return seq[0]


async def _upload_offset(http, url: str, location: str) -> int | None:
    """The offset of an upload session, or None when the node does not know it."""
    async with http.get(url + location) as r:
        if r.status == 404:
            assert (await r.json())["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
            return None
        assert r.status == 204, r.status
        return int(r.headers["Range"].split("-")[1]) + 1


async def _start_upload(http, url: str, repo: str, data: bytes) -> str:
    async with http.post(f"{url}/v2/{repo}/blobs/uploads/") as r:
        assert r.status == 202
        location = r.headers["Location"]
    async with http.patch(url + location, data=data,
                          headers={"Content-Range": f"0-{len(data) - 1}"}) as r:
        assert r.status == 202
    return location


async def test_a_crash_keeps_every_commit_and_a_power_cut_only_what_was_synced(tmp_path, http):
    """An upload session's record is committed without an fsync (it acknowledges
    nothing durable); a pushed blob is fsynced before its 201. SIGKILL keeps
    both. A power cut keeps the blob and may drop the session — at worst it
    does — and whatever it keeps of a torn WAL, the node opens it."""
    cluster = await start_cluster(tmp_path, [("westeurope", "")])
    try:
        node = cluster.nodes["westeurope"]
        blob = random.Random(1).randbytes(70_000)
        await push_blob(http, node.url, "app/a", blob)
        survivor = await _start_upload(http, node.url, "app/a", b"x" * 5000)

        await cluster.crash("westeurope")
        await cluster.restart("westeurope")
        assert await _upload_offset(http, node.url, survivor) == 5000   # open upload kept
        lost = await _start_upload(http, node.url, "app/a", b"y" * 3000)

        await cluster.power_cut("westeurope", DiskLosesEveryUnsyncedByte(0))
        await cluster.restart("westeurope")
        assert await _upload_offset(http, node.url, lost) is None       # never fsynced: gone
        # Replayed at the restart, the session is durable now. (Not its 5000 bytes:
        # the status request above resumed it, which takes a partial last segment
        # back into memory — ``SegmentWriter.resume`` — as test_crash allows.)
        assert await _upload_offset(http, node.url, survivor) is not None
        for seed in range(6):   # a WAL torn anywhere in its unsynced tail
            await _start_upload(http, node.url, "app/a", b"z" * (seed + 1))
            await cluster.power_cut("westeurope", random.Random(seed))
            await cluster.restart("westeurope")
            async with http.get(f"{node.url}/v2/app/a/blobs/{digest_of(blob)}") as r:
                assert r.status == 200 and await r.read() == blob, f"seed {seed}"
    finally:
        await stop_cluster(cluster)


async def test_a_crashed_node_answers_no_request_in_flight(tmp_path, http):
    """A blob push to zone 1 is committed and waits for zone 2 or 3 to confirm
    (their links are slow). The node is killed the moment the blob is
    committed: the client gets a broken connection, never an answer — though a
    graceful stop would have let the confirmation arrive and the 201 out. The
    write was stored, so (an indefinite outcome) it reaches the other zones
    once zone 1 is back."""
    settings = ReplicationSettings(anti_entropy_interval_s=1.0, quorum_timeout_s=5.0)
    cluster = await start_cluster(tmp_path, [("eastus", "1"), ("eastus", "2"), ("eastus", "3")],
                                  settings=settings)
    try:
        zone1 = cluster.nodes["eastus-1"]
        for other in ("eastus-2", "eastus-3"):   # their subscriptions to zone 1: events and acks
            cluster.links[(other, "eastus-1")].set_faults(LinkFaults(extra_latency_ms=100))
        blob = b"committed, never answered"
        committed = asyncio.Event()
        meta = zone1.registry.meta

        def on_commit(seq: int) -> None:
            if any(e.kind is EventKind.BLOB_PUT and e.digest == digest_of(blob)
                   for e in meta.read_log(seq - 1, 1)):
                committed.set()

        meta.on_commit(on_commit)

        async def push() -> int:
            async with http.post(f"{zone1.url}/v2/app/flight/blobs/uploads/",
                                 params={"digest": digest_of(blob)}, data=blob) as r:
                return r.status

        pushing = asyncio.create_task(push())
        await asyncio.wait_for(committed.wait(), 10)
        await cluster.crash("eastus-1")
        with pytest.raises(aiohttp.ClientError):
            status = await pushing
            pytest.fail(f"the crashed node answered {status}")
        await cluster.restart("eastus-1")
        for name in ("eastus-2", "eastus-3"):
            node = cluster.nodes[name]

            async def arrived(node=node) -> bool:
                async with http.head(f"{node.url}/v2/app/flight/blobs/{digest_of(blob)}") as r:
                    return r.status == 200

            await eventually(arrived, timeout=20, what=f"the stored write reaching {name}")
    finally:
        await stop_cluster(cluster)


# -- real processes -----------------------------------------------------------------

ZONE_REDUNDANT_ONLY = specs.parse({"home_region": "eastus", "home_zone_redundant": True,
                                   "paired_copies": False})
ZONES = ["eastus-1", "eastus-2", "eastus-3"]


async def _node_info(http, url: str, internal: dict[str, str]) -> dict:
    """The node's own description (an internal route: ``internal`` carries the
    cluster's internal credential)."""
    async with http.get(f"{url}/georeg/v1/node", headers=internal) as r:
        assert r.status == 200
        return await r.json()


async def _tags(http, url: str, repo: str) -> list[str] | None:
    async with http.get(f"{url}/v2/{repo}/tags/list") as r:
        if r.status == 404:
            return None
        return sorted((await r.json())["tags"])


async def _status(http, method: str, url: str) -> int:
    async with http.request(method, url) as r:
        return r.status


def _refused_for_quorum(status: int, body: dict, headers) -> None:
    assert status == 503, (status, body)
    error = body["errors"][0]
    assert error["code"] == "UNAVAILABLE", error
    assert error["message"] == "write quorum unavailable", error
    detail = error["detail"]
    assert detail["outcome"] == "definite", error
    assert (detail["zones"], detail["zones_reachable"]) == (3, 1), error
    assert "only 1 of 3 zones" in detail["reason"] and "need 2" in detail["reason"], error
    assert headers["Retry-After"] == "5"


@pytest.fixture
def zone_cluster(tmp_path):
    with RunningCluster(ZONE_REDUNDANT_ONLY, tmp_path / "zones") as running:
        yield running


async def test_two_zones_killed_the_third_refuses_writes_and_nothing_half_written_remains(
        zone_cluster):
    c = zone_cluster
    internal = c.internal_headers()
    async with c.http() as http:
        assert sorted(c.cluster.supervisor.nodes) == ZONES   # three `georeg node` processes
        urls = {name: c.node_url(name) for name in ZONES}
        zone1 = urls["eastus-1"]
        await eventually(lambda: _writable(http, zone1, True, internal), timeout=30,
                         what="zone quorum")
        before = make_image([3000, 5000], seed=60)
        await push_image(http, zone1, "zr/app", before, tag="v0")
        for name in ZONES:
            await eventually(lambda u=urls[name]: _has_tag(http, u, "zr/app", "v0"), timeout=30,
                             what=f"v0 on {name}")

        c.crash("eastus-2")                                   # SIGKILL
        c.crash("eastus-3")
        await eventually(lambda: _writable(http, zone1, False, internal), timeout=30,
                         what="zone 1 noticing it is alone")
        seq = (await _node_info(http, zone1, internal))["last_seq"]

        refused = make_image([4000], seed=61)
        layer = refused.layers[0]
        attempts = [
            ("POST", f"/v2/zr/app/blobs/uploads/?digest={digest_of(layer)}", layer),  # monolithic
            ("POST", "/v2/zr/app/blobs/uploads/", None),                              # a session
            ("POST", f"/v2/zr/app/blobs/uploads/?mount={digest_of(before.layers[0])}&from=zr/app",
             None),                                                                   # a mount
            ("PUT", "/v2/zr/app/manifests/v1", before.manifest),                      # a re-tag
            ("DELETE", "/v2/zr/app/manifests/v0", None),                              # an untag
            ("DELETE", f"/v2/zr/app/manifests/{before.digest}", None),                # a delete
        ]
        for method, path, body in attempts:
            headers = {"Content-Type": before.media_type} if path.endswith("/v1") else {}
            async with http.request(method, zone1 + path, data=body, headers=headers) as r:
                _refused_for_quorum(r.status, await r.json(), r.headers)

        # Nothing of the refused writes, anywhere it could show; reads go on.
        assert (await _node_info(http, zone1, internal))["last_seq"] == seq, \
            "a refused write was logged"
        assert await _status(http, "HEAD", f"{zone1}/v2/zr/app/blobs/{digest_of(layer)}") == 404
        assert await _tags(http, zone1, "zr/app") == ["v0"]
        for ref in ("v0", before.digest):
            async with http.get(f"{zone1}/v2/zr/app/manifests/{ref}") as r:
                assert r.status == 200 and await r.read() == before.manifest

        c.restart("eastus-2")
        c.restart("eastus-3")
        await eventually(lambda: _writable(http, zone1, True, internal), timeout=30,
                         what="quorum back")
        after = make_image([2500], seed=62)
        await push_image(http, zone1, "zr/app", after, tag="v2")
        for name in ZONES:
            url = urls[name]
            await eventually(lambda u=url: _has_tag(http, u, "zr/app", "v2"), timeout=30,
                             what=f"v2 on {name}")
            assert await _tags(http, url, "zr/app") == ["v0", "v2"], name
            assert await _status(http, "HEAD", f"{url}/v2/zr/app/blobs/{digest_of(layer)}") == 404
            async with http.get(f"{url}/v2/zr/app/manifests/v2") as r:
                assert r.status == 200 and await r.read() == after.manifest


async def _writable(http, url: str, expected: bool, internal: dict[str, str]) -> bool:
    try:
        return (await _node_info(http, url, internal))["writable"] is expected
    except aiohttp.ClientError:
        return False


async def _has_tag(http, url: str, repo: str, tag: str) -> bool:
    try:
        return tag in (await _tags(http, url, repo) or [])
    except aiohttp.ClientError:
        return False
