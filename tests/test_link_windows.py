"""Big blobs use the link: what a peer may send ahead of this node's reading
is sized to the link between them, and a WAN link holds as many bytes in flight
as its bandwidth and delay need. Either one too small caps a large layer's
transfer below the modelled bandwidth (``georeg bench lag --layer-mib``
measures by how much; nothing here is timed).

* the plan tells each node the modelled round trip and bandwidth of its link
  to every peer (``Peer.rtt_ms``, ``Peer.bandwidth_mbps``);
* the receive window is twice the bandwidth-delay product, within bounds;
* over a real gRPC channel built for such a peer, a server may run that far
  ahead of a client that reads nothing;
* a channel with a sized window runs only as many blob fetches at once as
  fit ``CHANNEL_WINDOW_BUDGET`` beside its subscription (gRPC's connection
  window is the sum of its streams'), so a peer cannot have 17 windows in
  flight towards a node that fell behind;
* a link with a long delay keeps reading past ``MAX_BUFFERED`` while its
  bandwidth × delay is not yet in flight, but never holds more than
  ``MAX_BUFFER_LIMIT`` per direction, whatever latency a fault adds.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cluster.control import spec as specs
from cluster.control.plan import plan
from cluster.network.links import MAX_BUFFER_LIMIT, MAX_BUFFERED, Link, LinkFaults, LinkModel
from registry_node.records import NodeIdentity
from replicator.peers import (
    CHANNEL_WINDOW_BUDGET,
    MAX_RECEIVE_WINDOW,
    RECEIVE_WINDOW,
    PeerClient,
    fetch_streams,
    receive_window,
)
from replicator.topology import Peer
from replicator.wire.v1 import replication_pb2 as pb
from replicator.wire.v1 import replication_pb2_grpc as pbg

from .helpers import eventually

MIB = 1 << 20


def test_the_plan_tells_each_node_the_link_to_every_peer(tmp_path):
    p = plan(specs.load(None).seeded(1), tmp_path)
    peers = {peer.name: peer for peer in p.view(p.node("eastus-1")).peers}
    far = p.link("eastus-1", "southeastasia").model
    assert peers["southeastasia"].rtt_ms == pytest.approx(2 * far.latency_ms)
    assert peers["southeastasia"].rtt_ms > 150
    assert peers["southeastasia"].bandwidth_mbps == far.bandwidth_mbps == 500
    # A sibling zone: about a millisecond away, bandwidth unlimited (0).
    assert 0 < peers["eastus-2"].rtt_ms < 5 and peers["eastus-2"].bandwidth_mbps == 0


def test_a_channels_streams_fit_its_window_budget(tmp_path):
    p = plan(specs.load(None).seeded(1), tmp_path)
    sized = 0
    for node in p.nodes:
        for peer in p.view(node).peers:
            window = receive_window(peer.rtt_ms, peer.bandwidth_mbps)
            streams = fetch_streams(window)
            if streams is None:          # the least window: zones, loopback
                assert window == RECEIVE_WINDOW
                continue
            sized += 1
            assert streams >= 1
            # The subscription and every fetch at once, within the budget.
            assert (1 + streams) * window <= CHANNEL_WINDOW_BUDGET, (node.name, peer.name)
    assert sized    # the default spec has WAN links with sized windows
    # East US → Southeast Asia (186 ms, 500 Mbit/s, 22 MiB): one fetch at a time.
    assert fetch_streams(receive_window(186, 500)) == 1
    assert fetch_streams(MAX_RECEIVE_WINDOW) == 1


class _HeldFetches(pbg.ReplicationServicer):
    """FetchBlob that sends one chunk, then holds the stream open until told."""

    def __init__(self) -> None:
        self.open = 0
        self.most_open = 0
        self.release = asyncio.Event()

    async def FetchBlob(self, request, context):
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            yield pb.BlobChunk(offset=0, data=b"x" * 1024, total_size=2048)
            await self.release.wait()
            yield pb.BlobChunk(offset=1024, data=b"y" * 1024)
        finally:
            self.open -= 1

    async def Health(self, request, context):
        return pb.HealthReply()


async def test_a_wan_channel_runs_no_more_fetches_at_once_than_its_budget_allows():
    servicer = _HeldFetches()
    server = grpc.aio.server()
    pbg.add_ReplicationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    peer = Peer(name="far", region="southeastasia", grpc=f"127.0.0.1:{port}",
                rtt_ms=186, bandwidth_mbps=500)      # one fetch at a time
    client = PeerClient(peer, NodeIdentity(region="eastus", zone="", node_id="test"))
    fetches = [client.fetch_blob("r", "sha256:" + "ab" * 32, 0) for _ in range(2)]
    firsts = [asyncio.ensure_future(anext(f)) for f in fetches]
    try:
        done, _ = await asyncio.wait(firsts, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1
        await client.health()     # a round trip on the channel behind the second fetch
        assert servicer.open == 1 and not all(f.done() for f in firsts)
        servicer.release.set()
        for fetch, first in zip(fetches, firsts, strict=True):
            assert await asyncio.wait_for(first, 20) == b"x" * 1024
            assert [c async for c in fetch] == [b"y" * 1024]
        assert servicer.most_open == 1
    finally:
        for first in firsts:
            first.cancel()
        await client.close()
        await server.stop(None)


def test_the_window_is_twice_the_links_bandwidth_delay_product_within_bounds():
    # East US → Southeast Asia: 500 Mbit/s × 186 ms = 11.6 MB in flight.
    assert receive_window(186, 500) == int(2 * 500e6 / 8 * 0.186)
    # A short link still gets the least window (an image's inline bytes in one trip)…
    assert receive_window(2, 500) == RECEIVE_WINDOW
    # …as does a link with no bandwidth to size to (zones, loopback, unknown).
    assert receive_window(1, 0) == receive_window(0, 500) == RECEIVE_WINDOW
    # Past the cap, the cap: it bounds what a peer can make this node buffer.
    assert receive_window(1000, 10_000) == MAX_RECEIVE_WINDOW


async def test_a_peer_may_run_its_links_window_ahead_of_a_reader_that_waits():
    """A server streaming to a client that reads nothing gets as far as the
    client's window (and the sockets' buffers) lets it: with a window sized to
    a long fat link, well past the least window."""
    sent = 0
    chunk = bytes(MIB)

    async def stream(request, context):
        nonlocal sent
        for _ in range(256):
            yield chunk
            sent += len(chunk)

    server = grpc.aio.server(options=[("grpc.max_send_message_length", 8 * MIB)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Stream", {
        "Bytes": grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=bytes, response_serializer=bytes)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # 1 Gbit/s × 400 ms round trip: twice that is past the cap, 24 MiB.
    peer = Peer(name="far", region="southeastasia", grpc=f"127.0.0.1:{port}",
                rtt_ms=400, bandwidth_mbps=1000)
    client = PeerClient(peer, NodeIdentity(region="eastus", zone="", node_id="test"))
    call = client.channel.unary_stream("/test.Stream/Bytes", request_serializer=bytes,
                                       response_deserializer=bytes)(b"")
    try:
        assert await call.read() == chunk       # the stream is open; now read nothing
        await eventually(lambda: sent >= 16 * MIB, timeout=20,
                         what=f"the server to send 16 MiB ahead (sent {sent >> 20} MiB)")
    finally:
        call.cancel()
        await client.close()
        await server.stop(None)


async def test_a_long_fat_link_keeps_reading_while_its_product_is_not_in_flight():
    """2 s one way at 500 Mbit/s is 125 MB in flight: a link that stopped
    reading at ``MAX_BUFFERED`` (4 MiB) would carry 2 MB/s. Nothing is
    delivered for 2 s, so everything written meanwhile is queued in the link."""
    received = 0

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        while data := await reader.read(1 << 16):
            received += len(data)
        writer.close()

    target = await asyncio.start_server(sink, "127.0.0.1", 0)
    link = await Link("far", ("127.0.0.1", target.sockets[0].getsockname()[1]),
                      LinkModel(latency_ms=2000, bandwidth_mbps=500)).start()
    _, writer = await asyncio.open_connection("127.0.0.1", link.listen_port)
    try:
        writer.write(bytes(24 * MIB))
        assert 16 * MIB > MAX_BUFFERED
        await eventually(lambda: link.stats()["queued_bytes"] >= 16 * MIB, timeout=10,
                         what="16 MiB queued in the link")
        await eventually(lambda: received == 24 * MIB, timeout=20, what="every byte delivered")
    finally:
        writer.close()
        await link.stop()
        target.close()
        await target.wait_closed()


async def test_a_link_slowed_by_seconds_holds_no_more_than_the_limit():
    """+2 s on a 500 Mbit/s link is 250 MB of bandwidth × delay per direction:
    the supervisor would hold that much per connection. The limit caps it,
    and a healthy WAN link's product is still below the limit."""
    link = await Link("slowed", ("127.0.0.1", 9), LinkModel(latency_ms=93, bandwidth_mbps=500)).start()
    try:
        healthy = link.buffer_limit
        assert MAX_BUFFERED < healthy < MAX_BUFFER_LIMIT
        link.set_faults(LinkFaults(extra_latency_ms=2000))
        assert link.buffer_limit == MAX_BUFFER_LIMIT
        link.heal()
        assert link.buffer_limit == healthy
    finally:
        await link.stop()
