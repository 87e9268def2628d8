"""The proxy's exchange as a state machine (``cluster.routing.lifecycle``): the
table itself, a real exchange refusing a move the table does not hold, and
real exchanges seen in each phase through a proxy in front of a scripted node
(a raw socket server, so each step of its answer comes when the test says).
"""

from __future__ import annotations

import asyncio
from collections import deque

import pytest

from cluster.routing.lifecycle import TRANSITIONS, IllegalTransition, Phase
from cluster.routing.policy import NodeEndpoint, NodeHealth, ReplicaGroup
from cluster.routing.proxy import RoutingProxy, _ClientConnection, _Exchange

from .helpers import eventually

P = Phase
ENDS = {P.ANSWERED, P.CUT, P.ABORTED}
TO_A_NODE = {P.CONNECTING, P.SENT}


# -- the table -----------------------------------------------------------------------


def test_every_phase_has_its_moves_and_the_ends_have_none():
    assert set(TRANSITIONS) == set(Phase)
    assert {p for p in Phase if p.over} == ENDS
    for phase, successors in TRANSITIONS.items():
        assert successors <= set(Phase)
        if phase.over:
            assert successors == frozenset(), phase
        else:
            assert P.ABORTED in successors, phase      # the client may go at any moment


def test_every_phase_reaches_an_end():
    for start in Phase:
        seen, todo = {start}, deque([start])
        while todo:
            for nxt in TRANSITIONS[todo.popleft()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        assert seen & ENDS, start


def test_a_request_goes_to_a_node_again_only_before_any_response_byte():
    """Retry (and failover) only while the client has nothing of a response:
    the one exception is a hand-over the node declined, having written nothing."""
    for phase, successors in TRANSITIONS.items():
        if phase.response_begun and phase is not P.HANDED_OVER:
            assert not successors & TO_A_NODE, phase
    assert TO_A_NODE <= TRANSITIONS[P.HANDED_OVER]
    assert not TRANSITIONS[P.NODE_WRITING] & TO_A_NODE     # after W: never relayed as well
    assert not TRANSITIONS[P.RELAYING] & TO_A_NODE


def test_a_cut_is_only_for_a_response_under_way():
    """Before any response byte, a failure is a retry or the proxy's own answer
    (a 502 for a partly sent body), never a dropped connection."""
    for phase, successors in TRANSITIONS.items():
        if P.CUT in successors:
            assert phase.response_begun, phase
    for phase in (P.QUEUED, P.CONNECTING, P.SENT, P.INTERIM):
        assert P.CUT not in TRANSITIONS[phase] and P.ANSWERED in TRANSITIONS[phase]


# -- a real exchange, without sockets ----------------------------------------------------


def exchange(method: bytes = b"GET", url: bytes = b"/v2/") -> tuple[RoutingProxy, _Exchange]:
    node = NodeEndpoint("eastus", "eastus", "", "127.0.0.1", 1)
    health = NodeHealth()
    proxy = RoutingProxy.regional_endpoint(ReplicaGroup("eastus", (node,)), health)
    return proxy, _Exchange(_ClientConnection(proxy), method, url, [(b"Host", b"r")], "1.1", True)


def test_an_exchange_moves_only_as_the_table_says():
    proxy, ex = exchange()
    assert ex.phase is P.QUEUED
    with pytest.raises(IllegalTransition, match="from queued to relaying"):
        ex._to(P.RELAYING)                   # no response before the request went anywhere
    assert ex.phase is P.QUEUED and proxy.illegal_transitions == 1
    for phase in (P.SENT, P.INTERIM, P.SENT, P.RELAYING, P.ANSWERED):
        ex._to(phase)
        assert ex.phase is phase
    with pytest.raises(IllegalTransition):
        ex._to(P.CONNECTING)                 # an answered request is never sent again
    ex.abort()                               # the client going after the end changes nothing
    assert ex.phase is P.ANSWERED and proxy.illegal_transitions == 2


def test_a_response_under_way_is_never_retried():
    proxy, ex = exchange()
    ex._to(P.SENT)
    ex._to(P.RELAYING)
    for phase in (P.CONNECTING, P.SENT, P.INTERIM):
        with pytest.raises(IllegalTransition):
            ex._to(phase)
    ex.abort()
    assert ex.phase is P.ABORTED and proxy.illegal_transitions == 3


# -- real exchanges through a proxy -------------------------------------------------------


class ScriptedNode:
    """A node whose every answer the test writes: each request it reads is
    handed to the test, which writes what it wants on the connection."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue[tuple[bytes, asyncio.StreamWriter]] = asyncio.Queue()
        self.server: asyncio.Server | None = None

    async def start(self) -> NodeEndpoint:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return NodeEndpoint("eastus", "eastus", "", "127.0.0.1",
                            self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await self.requests.put((head, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def scripted():
    node = ScriptedNode()
    endpoint = await node.start()
    proxy = RoutingProxy.regional_endpoint(ReplicaGroup("eastus", (endpoint,)), NodeHealth())
    await proxy.start()
    try:
        yield node, proxy
    finally:
        await proxy.stop()
        await node.stop()
        assert proxy.illegal_transitions == 0


def in_flight(proxy: RoutingProxy) -> _Exchange:
    (client,) = proxy._clients
    return client.queue[0]


async def test_phases_of_a_relayed_exchange_as_it_happens(scripted):
    node, proxy = scripted
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /v2/a/manifests/v1 HTTP/1.1\r\nHost: r\r\n\r\n")
        head, to_node = await asyncio.wait_for(node.requests.get(), 10)
        ex = in_flight(proxy)
        assert ex.phase is P.SENT and ex.backend is not None
        to_node.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
        await to_node.drain()
        to_node.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
        answer = await asyncio.wait_for(reader.readuntil(b"01234"), 10)
        assert answer.startswith(b"HTTP/1.1 200") and b"103" not in answer   # 1xx dropped
        assert ex.phase is P.RELAYING
        to_node.write(b"56789")
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"56789"
        await eventually(lambda: ex.phase is P.ANSWERED, what="the exchange answered")
        assert ex.backend is None
    finally:
        writer.close()


async def test_phases_of_a_response_cut_short_and_of_a_client_gone(scripted):
    node, proxy = scripted
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /v2/a/manifests/v1 HTTP/1.1\r\nHost: r\r\n\r\n")
        _, to_node = await asyncio.wait_for(node.requests.get(), 10)
        ex = in_flight(proxy)
        to_node.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
        await asyncio.wait_for(reader.readuntil(b"01234"), 10)
        to_node.transport.abort()                    # the node dies mid-response
        await eventually(lambda: ex.phase is P.CUT, what="the exchange cut")
        assert await asyncio.wait_for(reader.read(), 10) == b""      # the client sees it close
    finally:
        writer.close()
    # A client that goes with half its body sent (while its request is still
    # coming, the proxy reads its connection, so it sees it go).
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"PUT /v2/a/manifests/v1 HTTP/1.1\r\nHost: r\r\nContent-Length: 10\r\n\r\n01234")
    await asyncio.wait_for(node.requests.get(), 10)
    ex = in_flight(proxy)
    assert ex.phase is P.SENT and ex.body_sent
    writer.transport.abort()
    await eventually(lambda: ex.phase is P.ABORTED, what="the exchange aborted")
    assert ex.backend is None


async def test_a_protocol_upgrade_gets_the_proxys_502_and_the_connection_carries_on(scripted):
    node, proxy = scripted
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: r\r\n\r\n")
        _, to_node = await asyncio.wait_for(node.requests.get(), 10)
        to_node.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 502")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert b"upgrades are not supported" in await reader.readexactly(length)
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: r\r\n\r\n")       # the same connection
        _, to_node = await asyncio.wait_for(node.requests.get(), 10)
        to_node.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(2) == b"ok"
    finally:
        writer.close()
