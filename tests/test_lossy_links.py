"""Lossy and corrupting links (``cluster.network.links``: ``SegmentFates``), the
seal on replication messages (``replicator.wire.integrity``) and HTTP fault
rules (``cluster.routing.http_faults``): their logic in process, seeded. The
real-process side (a corrupting WAN link under replication, clients meeting
HTTP faults at endpoints) is in tests/test_faults.py."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest

from cluster.network.links import MIN_RTO_S, MSS, Link, LinkFaults, LinkModel, SegmentFates
from cluster.routing.http_faults import HttpFaultRule, HttpFaults
from registry_node.errors import Outcome
from registry_node.records import Event, EventKind, NodeIdentity
from registry_node.replica import Replica
from replicator.errors import ReplicationError
from replicator.metrics import ReplicationMetrics
from replicator.peers import PeerClient
from replicator.residency import ResidencyPolicy
from replicator.topology import Peer
from replicator.transfer import Transfer
from replicator.wire import integrity
from replicator.wire.v1 import replication_pb2 as pb
from replicator.wire.v1 import replication_pb2_grpc as pbg

from .helpers import Image, digest_of, eventually, make_image, push_image
from .replication_harness import InProcessCluster

SIZES = [65536, 1448, 300, 262144, 9000] * 20


def _fates(seed: int, faults: LinkFaults, sizes: list[int] = SIZES) -> list:
    fates = SegmentFates(random.Random(seed))
    return [fates.chunk(size, faults, 0.08) for size in sizes]


def _stream_fate(fates: list, sizes: list[int]) -> tuple:
    """What a stream met, whatever its chunks: flipped bytes by stream
    offset, and segments lost and duplicated."""
    offsets = itertools.accumulate([0, *sizes])
    flips = [(start + at, mask) for fate, start in zip(fates, offsets, strict=False)
             for at, mask in fate.flips]
    return flips, sum(f.lost for f in fates), sum(f.duplicated for f in fates)


def test_the_same_seed_gives_the_same_fate_to_every_segment_however_the_stream_is_read():
    faults = LinkFaults(loss=0.02, corrupt=0.01, duplicate=0.01)
    first, again, other = _fates(7, faults), _fates(7, faults), _fates(8, faults)
    assert first == again
    assert first != other
    # The same bytes read in other chunks (halves, and 1000-byte pieces).
    halves = [part for size in SIZES for part in (size // 2, size - size // 2)]
    pieces = [1000] * (sum(SIZES) // 1000) + [sum(SIZES) % 1000]
    for sizes in (halves, pieces):
        assert _stream_fate(_fates(7, faults, sizes), sizes) == _stream_fate(first, SIZES)
    segments = sum(SIZES) // MSS
    lost = sum(f.lost for f in first)
    flipped = sum(len(f.flips) for f in first)
    # About the asked rates (2% and 1% of ~2,300 segments), not exactly.
    assert 0.01 * segments < lost < 0.03 * segments
    assert 0.004 * segments < flipped < 0.02 * segments
    for fate, size in zip(first, SIZES, strict=True):
        assert all(0 <= at < size and 0 < mask < 256 for at, mask in fate.flips)
        assert fate.wire_bytes == size + fate.duplicated * MSS
        assert fate.delay_s in (0.0, 0.08, 0.08 + MIN_RTO_S)    # one RTT, or an RTO


def test_a_lost_segment_costs_one_rtt_with_three_behind_it_else_a_timeout():
    fates = SegmentFates(random.Random(1))
    rare = LinkFaults(loss=1e-12)           # no hit but the one placed below
    fates._next["loss"] = 2                 # the 3rd of 10 segments: 7 behind it
    fate = fates.chunk(MSS * 10, rare, 0.08)
    assert (fate.lost, fate.delay_s, fate.tail) == (1, 0.08, 0)
    fates._next["loss"] = 18                # the 9th of the next 10: one behind it
    fate = fates.chunk(MSS * 10, rare, 0.08)
    assert (fate.lost, fate.delay_s, fate.tail) == (1, 0.08 + MIN_RTO_S, 2)
    fate = fates.chunk(MSS * 10, LinkFaults(loss=1.0), 0.5)   # the last one too
    assert (fate.lost, fate.delay_s, fate.tail) == (10, 0.5 + MIN_RTO_S, 3)


def test_loss_caps_a_links_rate_as_it_caps_a_tcp_flow():
    link = Link("a->b", ("127.0.0.1", 1), LinkModel(latency_ms=20, bandwidth_mbps=500))
    assert link._rate_bytes_per_s() == 500e6 / 8
    link.faults = LinkFaults(loss=0.01)
    # Mathis: 1448 B × 1.22 / (40 ms × √0.01) ≈ 442 kB/s, far under 62.5 MB/s.
    assert link._rate_bytes_per_s() == pytest.approx(MSS * 1.22 / (0.04 * 0.1))


async def _sink() -> tuple[asyncio.Server, int, asyncio.Future]:
    got = asyncio.get_running_loop().create_future()

    async def read_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.set_result(await reader.read())
        writer.close()

    server = await asyncio.start_server(read_all, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], got


@contextlib.asynccontextmanager
async def _link_to_sink(faults: LinkFaults) -> AsyncIterator[tuple[Link, asyncio.Future]]:
    """A 5 ms link with ``faults`` into a server that gathers what arrives."""
    server, port, got = await _sink()
    link = await Link("a->b", ("127.0.0.1", port), LinkModel(latency_ms=5)).start()
    try:
        link.set_faults(faults)
        yield link, got
    finally:
        await link.stop()
        server.close()


async def _through(link: Link, payload: bytes) -> tuple[bytes, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", link.listen_port)
    started = time.monotonic()
    writer.write(payload)
    writer.write_eof()
    await writer.drain()
    await reader.read()
    writer.close()
    return payload, time.monotonic() - started


async def test_a_corrupting_link_flips_one_byte_per_corrupted_segment_and_loss_delays():
    async with _link_to_sink(LinkFaults(corrupt=0.05, seed=3)) as (link, got):
        payload = random.Random(0).randbytes(1 << 20)
        await _through(link, payload)
        received = await asyncio.wait_for(got, 10)
        assert len(received) == len(payload)
        differing = sum(a != b for a, b in zip(received, payload, strict=True))
        assert differing == link.segments["corrupted"] > 0
        assert link.stats()["corrupted_segments"] == differing
    # A lone segment lost waits a retransmission timeout: RTT + the minimum RTO.
    async with _link_to_sink(LinkFaults(loss=1.0)) as (link, got):
        reader, writer = await asyncio.open_connection("127.0.0.1", link.listen_port)
        started = time.monotonic()
        writer.write(b"x")
        writer.write_eof()
        assert await asyncio.wait_for(got, 10) == b"x"
        assert time.monotonic() - started >= 0.005 + 0.01 + MIN_RTO_S - 0.002
        assert link.segments["lost"] == 1
        writer.close()


async def test_a_lost_tail_is_retransmitted_after_one_rtt_if_enough_segments_follow_it():
    async with _link_to_sink(LinkFaults(loss=1.0)) as (link, got):
        reader, writer = await asyncio.open_connection("127.0.0.1", link.listen_port)
        started = time.monotonic()
        writer.write(b"x")                      # lost, nothing behind it yet
        for _ in range(1000):                   # bounded: until the link has read it
            if link.segments["lost"]:
                break
            await asyncio.sleep(0.001)
        link.set_faults(LinkFaults(loss=1e-12))  # what follows arrives
        rest = bytes(4 * MSS)
        writer.write(rest)
        writer.write_eof()
        assert await asyncio.wait_for(got, 10) == b"x" + rest
        # Their duplicate ACKs: one RTT (~15 ms), not a timeout (≥ 200 ms).
        assert time.monotonic() - started < 0.005 + 0.01 + MIN_RTO_S / 2
        assert link.segments["lost"] == 1
        writer.close()


def test_a_sealed_message_opens_only_whole_and_undamaged_and_a_plain_one_as_it_is():
    event = pb.EventBatch(last_seq=5, events=[
        pb.Event(seq=1, kind="tag_set", repository="app", tag="v1")])
    sealed = integrity.seal(event)
    assert sealed.startswith(integrity.SEAL_TAG)            # the seal comes first
    older = pb.EventBatch.FromString(sealed)                # an older parser skips it:
    older.DiscardUnknownFields()                            # an unknown field, and
    assert older == event                                   # the message as sent
    refused: list[str] = []
    open_ = integrity.opener(pb.EventBatch, refused.append)
    assert open_(sealed) == event

    def flipped(at: int) -> bytes:
        damaged = bytearray(sealed)
        damaged[at] ^= 0x01
        return bytes(damaged)

    damaged = [flipped(at) for at in range(len(sealed))]    # the seal's tag, its CRC, the body
    # A flip in gRPC's length prefix: the message cut short, or run on into the next.
    damaged += [sealed[:-1], sealed[:-11], sealed[:integrity.SEAL_LEN - 1],
                sealed + pb.EventBatch(last_seq=99).SerializeToString()]
    for data in damaged:
        assert open_(data) is integrity.DAMAGED, data
    assert refused == ["EventBatch"] * len(damaged)
    # From a node that does not seal: parsed as it is, even ending in a seal's bytes.
    chunk = pb.BlobChunk(offset=3, data=b"user bytes" + integrity.SEAL_TAG + b"\0\0\0\0")
    assert integrity.opener(pb.BlobChunk, refused.append)(chunk.SerializeToString()) == chunk
    assert open_(event.SerializeToString()) == event
    assert len(refused) == len(damaged)
    # A server refuses a damaged request by raising: gRPC fails the call.
    with pytest.raises(integrity.IntegrityError):
        integrity._strict(open_)(damaged[0])


def test_http_fault_rules_match_method_and_path_and_replay_their_seed():
    def decisions(seed: int) -> list:
        faults = HttpFaults("global:eastus")
        faults.set_rules([HttpFaultRule("f1", "status", 0.5, 503, "PUT", r"/manifests/", seed)])
        return [faults.decide(m, p) for m, p in
                [("PUT", "/v2/app/manifests/v1"), ("GET", "/v2/app/manifests/v1"),
                 ("PUT", "/v2/app/blobs/uploads/x")] * 30]

    first = decisions(4)
    assert first == decisions(4) and first != decisions(5)
    hit = [i for i, d in enumerate(first) if d is not None]
    assert hit and all(i % 3 == 0 for i in hit)                 # matching requests only
    assert 5 < len(hit) < 25                                   # about half of 30
    code, _, headers = first[hit[0]].error()
    assert (code, headers) == ("UNAVAILABLE", {"Retry-After": "1"})
    with pytest.raises(ValueError, match="status must be one of"):
        HttpFaultRule("f2", "status", 1.0, 404)
    for method in ("GTE", 3):
        with pytest.raises(ValueError, match="method must be one of GET, HEAD"):
            HttpFaultRule("f2", "reset", 1.0, method=method)
    with pytest.raises(ValueError, match="regex"):
        HttpFaultRule("f2", "reset", 1.0, path_regex="(")


class _Content(pbg.ReplicationServicer):
    """A peer serving one manifest and one blob: what a corrupting link damages."""

    MANIFEST = random.Random(5).randbytes(6000)
    BLOB = random.Random(6).randbytes(96 * 1024)

    async def FetchManifest(self, request, context):
        return pb.ManifestReply(digest=request.digest, media_type="x", body=self.MANIFEST)

    async def FetchBlob(self, request, context):
        for at in range(request.offset, len(self.BLOB), 16384):
            yield pb.BlobChunk(offset=at, data=self.BLOB[at:at + 16384])


async def test_a_damaged_reply_over_plain_grpc_is_refused_as_indefinite_and_never_handed_over():
    """Real gRPC, sealed, through a corrupting link: every reply that reaches
    the caller is intact, and every damaged one fails its call as indefinite
    (grpc.aio hands a failed deserializer's caller ``None``: not a reply)."""
    server = grpc.aio.server()
    integrity.add_servicer(_Content(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    link = await Link("a->b", ("127.0.0.1", port), LinkModel()).start()
    refused: list[str] = []
    client = PeerClient(Peer(name="b", region="westeurope", grpc=f"127.0.0.1:{link.listen_port}"),
                        NodeIdentity(region="eastus", zone="", node_id="test"),
                        rpc_timeout_s=5, integrity_refused=refused.append)
    outcomes: Counter[str] = Counter()
    try:
        link.set_faults(LinkFaults(corrupt=0.02, seed=12))
        for _ in range(20):             # bounded; the link's draws decide which fail
            try:
                reply = await client.fetch_manifest("r", "sha256:" + "ab" * 32)
                assert reply.body == _Content.MANIFEST
                blob = b"".join([c async for c in client.fetch_blob("r", "sha256:" + "cd" * 32, 0)])
                assert blob == _Content.BLOB
                outcomes["intact"] += 1
            except ReplicationError as exc:
                outcomes[exc.outcome.value] += 1
        assert refused and set(refused) <= {"ManifestReply", "BlobChunk"}, refused
        assert outcomes["intact"] > 0 and outcomes["indefinite"] >= len(refused), outcomes
        assert link.segments["corrupted"] > 0
    finally:
        await client.close()
        await link.stop()
        await server.stop(None)


class _Holder(pbg.ReplicationServicer):
    """A peer holding an image, its manifest's bytes as given (bad ones to test
    a copy that does not hash to its digest); counts the manifests asked of it."""

    def __init__(self, image: Image, manifest: bytes) -> None:
        self.image, self.manifest, self.asked = image, manifest, 0

    async def FetchManifest(self, request, context):
        self.asked += 1
        return pb.ManifestReply(digest=request.digest, media_type=self.image.media_type,
                                body=self.manifest, hlc=7, origin_region="eastus")

    async def FetchBlob(self, request, context):
        blob = next(b for b in self.image.blobs if digest_of(b) == request.digest)
        yield pb.BlobChunk(offset=request.offset, data=blob[request.offset:])


@contextlib.asynccontextmanager
async def _peers(*holders: _Holder):
    servers, clients = [], []
    try:
        for i, holder in enumerate(holders):
            server = grpc.aio.server()
            integrity.add_servicer(holder, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(server)
            clients.append(PeerClient(Peer(name=f"p{i}", region="eastus", grpc=f"127.0.0.1:{port}"),
                                      NodeIdentity(region="westeurope", zone="", node_id="t")))
        yield clients
    finally:
        for client in clients:
            await client.close()
        for server in servers:
            await server.stop(None)


async def test_a_manifest_that_does_not_hash_is_asked_of_every_peer_then_is_permanent(node):
    """Bytes that came with an event and do not hash: the sender is asked
    again (its stored copy may be good); when every copy there is is bad,
    the failure is permanent (recorded; anti-entropy retries), not retried
    from the same cursor forever ahead of every later event."""
    image = make_image([300, 400], seed=3)
    bad = image.manifest[:-1] + b" "
    transfer = Transfer(Replica(node.registry, node.node.configuration), ResidencyPolicy(),
                        ReplicationMetrics("westeurope"), attempts=1)
    event = Event(kind=EventKind.MANIFEST_PUT, repository="app", digest=image.digest,
                  media_type=image.media_type, size=len(image.manifest), hlc=7,
                  origin_region="eastus")
    sender = _Holder(image, image.manifest)
    async with _peers(sender) as sources:
        applied = await transfer.apply(event, sources, bad)
    assert applied is not None and applied.digest == image.digest and sender.asked == 1
    holders = [_Holder(image, bad), _Holder(image, bad)]
    async with _peers(*holders) as sources:
        with pytest.raises(ReplicationError) as failed:
            await transfer.ensure_manifest("other", image.digest, sources)
    assert failed.value.outcome is Outcome.PERMANENT and "p0, p1" in failed.value.reason
    assert [h.asked for h in holders] == [1, 1]
    # p0: the first test's sender's inline bytes, and this one's copy.
    assert transfer.metrics.digest_mismatches.labels("p0", "manifest")._value.get() == 2


async def test_replication_over_a_corrupting_plain_grpc_link_refuses_damage_and_keeps_nothing_damaged(
        tmp_path, http):
    """Two in-process nodes replicating without TLS (sealed messages) over a
    corrupting link: damaged event batches, chunks and replies are refused
    and retried, and westeurope ends with every image byte for byte."""
    images = [make_image([20_000, 9_000], seed=50 + i) for i in range(3)]
    async with InProcessCluster(tmp_path, [("eastus", ""), ("westeurope", "")]) as cluster:
        await cluster.wait_ready()
        cluster.degrade("eastus", "westeurope", corrupt=0.03, seed=4)
        east, west = cluster.nodes["eastus"], cluster.nodes["westeurope"]
        for i, image in enumerate(images):
            await push_image(http, east.url, f"sealed/app{i}", image, tag="v1")

        async def arrived() -> bool:
            for i, image in enumerate(images):
                async with http.get(f"{west.url}/v2/sealed/app{i}/manifests/v1") as r:
                    if r.status != 200 or await r.read() != image.manifest:
                        return False
            return True

        await eventually(arrived, timeout=30, what="every image over a corrupting link")
        for i, image in enumerate(images):
            for blob in image.blobs:
                async with http.get(f"{west.url}/v2/sealed/app{i}/blobs/{digest_of(blob)}") as r:
                    assert await r.read() == blob
        refused = sum(sample.value for node in (east, west)
                      for metric in node.replication.metrics.integrity_refused.collect()
                      for sample in metric.samples if sample.name.endswith("_total"))
        corrupted = sum(link.segments["corrupted"] for link in cluster.links.values())
        assert corrupted > 0 and refused > 0, (corrupted, refused)
