"""Bit rot on one node, in process (``registry_node.blob_repair``): what a
client sees of a rotten blob on a standalone node, failed repairs tried again
on the injected clock, a scrub under EIO and after a restart, the quarantine's
bounds, repairs cancelled when the node stops, and whom a repair asks
(``replicator.repair``). The cluster's side (repair from a replica, through an
endpoint, residency) is in ``test_faults``.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass

import pytest

from registry_node.api.blobs import Download
from registry_node.blob_repair import RETRY_BASE_S, Unrepairable
from registry_node.crypto import HEADER_SIZE, SEGMENT_OVERHEAD, SEGMENT_SIZE, BlobCorrupt
from replicator.errors import Outcome, ReplicationError
from replicator.repair import PeerRefetch

from .helpers import digest_of, eventually, flip, push_blob, started_node

STRIDE = SEGMENT_SIZE + SEGMENT_OVERHEAD


class Peer:
    """A replica holding good copies (``BlobSources``): unreachable while
    ``down``; ``hold`` makes its answer wait until set."""

    def __init__(self, registry, blobs: dict[str, bytes]) -> None:
        self.registry, self.blobs = registry, blobs
        self.down = False
        self.hold: asyncio.Event | None = None
        self.asked = 0

    async def refetch(self, digest: str) -> str:
        self.asked += 1
        if self.hold is not None:
            await self.hold.wait()
        if self.down:
            raise ConnectionError("peer unreachable")
        store = self.registry.blobs

        def place() -> None:
            file = store.create_upload(str(uuid.uuid4()))
            file.write(self.blobs[digest])
            store.commit_upload(file, digest)
        await self.registry.run_blocking(place)
        return "peer"


async def get(http, url: str, method: str = "GET") -> tuple[int, dict | bytes]:
    async with http.request(method, url) as r:
        body = await r.read()
        if method != "HEAD" and r.headers.get("Content-Type", "").startswith("application/json"):
            return r.status, (await r.json())["errors"][0]
        return r.status, body


async def test_a_rotten_blob_on_a_standalone_node_is_quarantined_unknown_and_pushed_back(
        node, http):
    data = os.urandom(30_000)
    digest = await push_blob(http, node.url, "rot/solo", data)
    repair = node.node.registry.repair
    flip(node.node.blobs.path(digest), HEADER_SIZE + 100)
    url = f"{node.url}/v2/rot/solo/blobs/{digest}"
    for _ in range(2):      # every GET tries again; the blob is counted once
        status, error = await get(http, url)
        assert status == 404, (status, error)
        assert (error["code"], error["detail"]["repair"]) == ("BLOB_UNKNOWN", "unrepairable")
        assert "no peers" in error["detail"]["reason"]
        assert "quarantined" in error["detail"]["reason"]
    assert repair.unrepairable_total == 1 and repair.quarantined_total == 1
    assert (await get(http, url, "HEAD"))[0] == 404     # HEAD and GET agree
    await push_blob(http, node.url, "rot/solo", data)   # the remedy the answer names
    assert await get(http, url) == (200, data)


async def test_rot_met_mid_stream_is_handed_to_the_repair(node, http):
    """Past the first MiB the headers are gone: ``Download`` itself reports
    the rot, so the HTTP handler and the hand-over alike get it repaired."""
    data = os.urandom(2_500_000)
    digest = await push_blob(http, node.url, "rot/big", data)
    flip(node.node.blobs.path(digest), HEADER_SIZE + 20 * STRIDE + 500)   # in the 2nd MiB
    heard: list[tuple[str, str]] = []
    download = Download(node.node.blobs.open(digest), digest, None,
                        rotten=lambda d, why: heard.append((d, why)))
    got = b""
    with pytest.raises(BlobCorrupt):
        async for piece in download.pieces(node.node.registry.run_blocking):
            got += piece
    download.blob.close()
    assert got == data[:len(got)] and len(got) >= 1 << 20
    assert [d for d, _ in heard] == [digest]


async def test_a_failed_repair_is_tried_again_on_the_clock(tmp_path, http, clock, node_config):
    async with started_node(node_config, clock) as running:
        data = os.urandom(20_000)
        digest = await push_blob(http, running.url, "rot/retry", data)
        registry = running.node.registry
        peer = Peer(registry, {digest: data})
        peer.down = True
        registry.repair.sources = peer
        flip(registry.blobs.path(digest), HEADER_SIZE + 100)
        url = f"{running.url}/v2/rot/retry/blobs/{digest}"
        status, error = await get(http, url)
        assert (status, error["message"]) == (503, "blob being repaired"), error
        assert registry.repair.history[digest].state == "failed"
        peer.down = False                       # the partition heals; no client asks
        assert registry.repair.retry_due() == []           # not before its backoff
        clock.advance(RETRY_BASE_S)
        assert registry.repair.retry_due() == [digest]
        await registry.repair.found(digest, "again")      # the retry, under way
        assert registry.repair.history[digest].state == "repaired"
        assert await get(http, url) == (200, data)


async def test_a_scrub_passes_over_unreadable_blobs_and_retries_quarantined_ones(
        tmp_path, http, node_config):
    data = os.urandom(20_000)
    async with started_node(node_config) as running:
        digest = await push_blob(http, running.url, "rot/scrub", data)
        other = await push_blob(http, running.url, "rot/scrub", os.urandom(9_000))
        faults = running.node.registry.meta.faults
        faults.eio_read = 1.0                   # the disk fails every read
        async with http.post(f"{running.url}/georeg/v1/blobs/scrub", json={}) as r:
            assert r.status == 200, await r.text()
            scrubbed = await r.json()
        assert (scrubbed["checked"], scrubbed["unreadable"]) == (0, 2)
        faults.eio_read = 0.0
        flip(running.node.blobs.path(digest), HEADER_SIZE + 100)
        assert (await get(http, f"{running.url}/v2/rot/scrub/blobs/{digest}"))[0] == 404
    # Restarted, with a peer that holds it: the scrub finds the quarantined blob.
    async with started_node(node_config) as running:
        registry = running.node.registry
        registry.repair.sources = Peer(registry, {digest: data})
        async with http.post(f"{running.url}/georeg/v1/blobs/scrub", json={}) as r:
            assert r.status == 200, await r.text()
            scrubbed = await r.json()
        assert {(x["digest"], x["state"]) for x in scrubbed["rotten"]} == {(digest, "repaired")}
        assert await get(http, f"{running.url}/v2/rot/scrub/blobs/{digest}") == (200, data)
        assert (await get(http, f"{running.url}/v2/rot/scrub/blobs/{other}"))[0] == 200


async def test_the_quarantine_keeps_the_newest_and_unrepaired_blobs_past_its_bounds(node, http):
    blobs = node.node.blobs
    blobs.quarantine_max_files = 2
    digests = [await push_blob(http, node.url, "rot/bounds", os.urandom(5_000 + i))
               for i in range(4)]
    for d in digests:
        flip(blobs.path(d), HEADER_SIZE + 100)
    only_trace = digests[0]
    for i, d in enumerate(digests):
        assert blobs.quarantine(d, 1000 + i, keep=lambda q: q == only_trace) is not None
    assert [q[0] for q in blobs.quarantined()] == [only_trace, digests[3]]
    blobs.quarantine_max_bytes = 1             # the newest stays, however large
    data = os.urandom(7_000)
    newest = await push_blob(http, node.url, "rot/bounds", data)
    flip(blobs.path(newest), HEADER_SIZE + 100)
    blobs.quarantine(newest, 2000)
    assert [q[0] for q in blobs.quarantined()] == [newest]


async def test_a_full_disk_keeps_the_upload_session_for_a_resume(node, http):
    first, rest = os.urandom(50_000), os.urandom(50_000)
    async with http.post(f"{node.url}/v2/full/app/blobs/uploads/") as r:
        session = node.url + r.headers["Location"]
    chunk = {"Content-Type": "application/octet-stream"}
    async with http.patch(session, data=first,
                          headers={**chunk, "Content-Range": f"0-{len(first) - 1}"}) as r:
        assert r.status == 202
        session = node.url + r.headers["Location"]
    faults = node.node.registry.meta.faults
    faults.full = True
    resume = {**chunk, "Content-Range": f"{len(first)}-{len(first) + len(rest) - 1}"}
    async with http.patch(session, data=rest, headers=resume) as r:
        assert r.status == 507
    faults.full = False                         # space freed: the client resumes
    async with http.patch(session, data=rest, headers=resume) as r:
        assert r.status == 202, await r.text()
        session = node.url + r.headers["Location"]
    digest = digest_of(first + rest)
    async with http.put(session, params={"digest": digest}) as r:
        assert r.status == 201, await r.text()


async def test_repairs_in_flight_are_cancelled_when_the_node_stops(node_config, http):
    async with started_node(node_config) as running:
        data = os.urandom(10_000)
        digest = await push_blob(http, running.url, "rot/stop", data)
        registry = running.node.registry
        peer = Peer(registry, {digest: data})
        peer.hold = asyncio.Event()             # never answers
        registry.repair.sources = peer
        flip(registry.blobs.path(digest), HEADER_SIZE + 100)
        task = registry.repair.found(digest, "rotten")
        await eventually(lambda: peer.asked == 1, timeout=10, what="the repair asking the peer")
    assert task.cancelled()


async def test_bitrot_digests_are_validated(node, http):
    url = f"{node.url}/georeg/v1/faults/bitrot"
    async with http.post(url, json={"digests": ["sha256:not-hex"]}) as r:
        assert r.status == 400 and (await r.json())["errors"][0]["code"] == "DIGEST_INVALID"
    absent = "sha256:" + "0" * 64
    async with http.post(url, json={"digests": [absent]}) as r:
        assert r.status == 200 and await r.json() == {"rotted": [], "missing": [absent],
                                                      "header_bytes": HEADER_SIZE}


# -- whom a repair asks (replicator.repair), its logic alone ------------------------------


@dataclass
class _Peer:
    region: str


@dataclass
class _Client:
    name: str
    peer: _Peer

    def hurried(self) -> _Client:
        return self


class _Runtime:
    """What ``PeerRefetch`` reads of replication: a blob in three repositories
    here, two peers that both lack it."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []
        self.clients = [_Client("eastus-2", _Peer("eastus")), _Client("westeurope",
                                                                      _Peer("westeurope"))]
        self.subscriptions: list = []
        runtime = self

        class Replica:
            registry = type("R", (), {"identity": type("I", (), {"region": "eastus"})})

            def blob_repositories(self, digest):
                return ["app/a", "app/b", "app/c"]

            def content_regions(self, repository, digest):
                return {"eastus"}

            def blob_in_place(self, digest):
                return False

        class Residency:
            def allows(self, origin, repository, region):
                return repository != "app/a" or region == "eastus"   # app/a: confined

            def confined(self, origin, repository):
                return repository == "app/a"

        class Transfer:
            async def ensure_blob(self, repository, digest, peers):
                runtime.asked.append((peers[0].name, repository))
                raise ReplicationError(Outcome.PERMANENT, "NOT_FOUND: no file here")

        self.replica, self.residency, self.transfer = Replica(), Residency(), Transfer()


async def test_a_repair_asks_each_peer_once_under_a_repository_residency_allows():
    runtime = _Runtime()
    with pytest.raises(Unrepairable, match="no replica residency allows has a good copy"):
        await PeerRefetch(runtime).refetch("sha256:" + "1" * 64)
    assert runtime.asked == [("eastus-2", "app/a"), ("westeurope", "app/b")]


async def test_an_inline_blob_read_failing_or_rotten_is_sent_without_its_bytes(node, http):
    """``ReplicationService._read_blob`` (a small blob sent with its event):
    an EIO or rot means None — never an exception, which would end the
    Subscribe stream — and rot found here goes to the repair."""
    from types import SimpleNamespace

    from replicator.service import ReplicationService

    data = os.urandom(3000)
    digest = await push_blob(http, node.url, "rot/inline", data)
    registry = node.node.registry
    service = SimpleNamespace(replica=SimpleNamespace(blobs=registry.blobs), registry=registry)
    assert await ReplicationService._read_blob(service, digest, len(data)) == data
    registry.meta.faults.eio_read = 1.0
    assert await ReplicationService._read_blob(service, digest, len(data)) is None
    registry.meta.faults.eio_read = 0.0
    flip(registry.blobs.path(digest), HEADER_SIZE + 100)
    assert await ReplicationService._read_blob(service, digest, len(data)) is None
    assert (await registry.repair.found(digest, "asked again")).state == "unrepairable"
    assert registry.repair.quarantined_total == 1      # the rot went to the repair
