"""Lossy and corrupting links (``cluster.network.links``: ``SegmentFates``), the
seal on replication messages (``replicator.wire.integrity``) and HTTP fault
rules (``cluster.routing.http_faults``): their logic in process, seeded. The
real-process side (a corrupting WAN link under replication, clients meeting
HTTP faults at endpoints) is in tests/test_faults.py."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from cluster.network.links import MIN_RTO_S, MSS, Link, LinkFaults, LinkModel, SegmentFates
from cluster.routing.http_faults import HttpFaultRule, HttpFaults
from replicator.wire import integrity
from replicator.wire.v1 import replication_pb2 as pb

SIZES = [65536, 1448, 300, 262144, 9000] * 20


def _fates(seed: int, faults: LinkFaults) -> list:
    fates = SegmentFates(random.Random(seed))
    return [fates.chunk(size, faults, 0.08) for size in SIZES]


def test_the_same_seed_gives_the_same_fate_to_every_segment():
    faults = LinkFaults(loss=0.02, corrupt=0.01, duplicate=0.01)
    first, again, other = _fates(7, faults), _fates(7, faults), _fates(8, faults)
    assert first == again
    assert first != other
    segments = sum(-(-s // MSS) for s in SIZES)
    lost = sum(f.lost for f in first)
    flipped = sum(len(f.flips) for f in first)
    # About the asked rates (2% and 1% of ~2,200 segments), not exactly.
    assert 0.01 * segments < lost < 0.03 * segments
    assert 0.004 * segments < flipped < 0.02 * segments
    for fate, size in zip(first, SIZES, strict=True):
        assert all(0 <= at < size and 0 < mask < 256 for at, mask in fate.flips)
        assert fate.wire_bytes == size + fate.duplicated * MSS
        assert fate.delay_s in (0.0, 0.08, MIN_RTO_S)   # one RTT, or the minimum RTO


def test_a_lost_segment_costs_one_rtt_with_three_behind_it_else_a_timeout():
    everything = LinkFaults(loss=1.0)
    fates = SegmentFates(random.Random(1))
    assert fates.chunk(MSS * 10, everything, 0.08).delay_s == MIN_RTO_S   # the tail too
    assert fates.chunk(100, everything, 0.5).delay_s == 0.5              # RTO ≥ RTT
    lone = LinkFaults(loss=0.0)
    assert fates.chunk(MSS * 10, lone, 0.08).delay_s == 0.0


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
    server, port, got = await _sink()
    link = await Link("a->b", ("127.0.0.1", port), LinkModel(latency_ms=5)).start()
    try:
        link.set_faults(LinkFaults(corrupt=0.05, seed=3))
        payload = random.Random(0).randbytes(1 << 20)
        await _through(link, payload)
        received = await asyncio.wait_for(got, 10)
        assert len(received) == len(payload)
        differing = sum(a != b for a, b in zip(received, payload, strict=True))
        assert differing == link.segments["corrupted"] > 0
        assert link.stats()["corrupted_segments"] == differing
    finally:
        await link.stop()
        server.close()
    # A lone segment lost waits the minimum retransmission timeout.
    server, port, got = await _sink()
    link = await Link("a->b", ("127.0.0.1", port), LinkModel(latency_ms=5)).start()
    try:
        link.set_faults(LinkFaults(loss=1.0))
        reader, writer = await asyncio.open_connection("127.0.0.1", link.listen_port)
        started = time.monotonic()
        writer.write(b"x")
        writer.write_eof()
        assert await asyncio.wait_for(got, 10) == b"x"
        assert time.monotonic() - started >= 0.005 + MIN_RTO_S - 0.002
        assert link.segments["lost"] == 1
        writer.close()
    finally:
        await link.stop()
        server.close()


def test_a_sealed_message_is_refused_if_damaged_and_a_plain_one_is_read_as_it_is():
    event = pb.EventBatch(events=[pb.Event(seq=1, kind="tag_set", repository="app", tag="v1")])
    sealed = integrity.seal(event)
    assert pb.EventBatch.FromString(sealed).events == event.events   # kept as an unknown field
    assert integrity.opener(pb.EventBatch)(sealed) == event
    refused = integrity.REFUSED[0]
    for at in range(len(sealed) - 9):                           # any byte of the message
        damaged = bytearray(sealed)
        damaged[at] ^= 0x01
        with pytest.raises(integrity.IntegrityError):
            integrity.opener(pb.EventBatch)(bytes(damaged))
    assert integrity.REFUSED[0] == refused + len(sealed) - 9
    assert integrity.opener(pb.EventBatch)(event.SerializeToString()) == event


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
    with pytest.raises(ValueError, match="regex"):
        HttpFaultRule("f2", "reset", 1.0, path_regex="(")
