"""The WAN link: its shaping (latency each way, bandwidth, every byte in
order, half-closes carried through, a stall holding bytes until it heals,
resets) and its listening socket through cuts and heals: a cut link refuses
connections, a healed one serves again on the same port, a link stopped while
it was about to listen again leaves no socket behind, and faults set from a
thread other than the link's loop are refused instead of corrupting it. Its
randomness replays: links seeded alike draw the same jitter and resets, and
the supervisor seeds each link as the plan says."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import random
import threading
import time

import pytest

from cluster.control.plan import plan
from cluster.control.supervisor import Supervisor
from cluster.network.links import Link, LinkFaults, LinkModel, link_seed
from cluster.testing import SMALL_SPEC

from .helpers import eventually


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def _round_trip(port: int) -> bool | str:
    """True when a byte goes through the link and back; otherwise why not."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except OSError as exc:
        return f"connect: {exc.__class__.__name__}"
    try:
        writer.write(b"x")
        await writer.drain()
        return await asyncio.wait_for(reader.read(1), 2) == b"x"
    except (OSError, TimeoutError) as exc:
        return f"exchange: {exc.__class__.__name__}"
    finally:
        writer.close()


@pytest.fixture
async def echo_port():
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


@pytest.fixture
async def link(echo_port):
    link = await Link("a->b", ("127.0.0.1", echo_port)).start()
    yield link
    await link.stop()


@pytest.fixture
async def shaped(echo_port):
    links: list[Link] = []

    async def make(model: LinkModel) -> Link:
        links.append(await Link("a->b", ("127.0.0.1", echo_port), model).start())
        return links[-1]

    yield make
    for link in links:
        await link.stop()


async def _echoed(port: int, payload: bytes) -> tuple[bytes, float]:
    """Send ``payload``, half-close, read the echo to its end: (bytes, seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        writer.write(payload)
        writer.write_eof()
        received = await asyncio.wait_for(reader.read(), 30)
        return received, time.monotonic() - started
    finally:
        writer.close()


async def test_a_byte_takes_the_latency_each_way(shaped) -> None:
    link = await shaped(LinkModel(latency_ms=60))
    received, seconds = await _echoed(link.listen_port, b"x")
    assert received == b"x"
    assert seconds >= 0.120 - 0.002, f"echoed after {seconds * 1000:.1f} ms, two ways of 60 ms"


async def test_bytes_cross_in_order_at_the_link_rate(shaped) -> None:
    link = await shaped(LinkModel(bandwidth_mbps=80))   # 10 MB/s each way
    payload = os.urandom(3 << 20)
    received, seconds = await _echoed(link.listen_port, payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    # Both directions are serialised at 10 MB/s; they overlap, so at least one
    # crossing's worth of time passes.
    assert seconds >= len(payload) / 10e6 * 0.98, f"{len(payload)} bytes in {seconds:.3f} s"
    assert link.bytes_forwarded == 2 * len(payload)
    assert link.bytes_back == len(payload)          # the echo's half


async def test_bytes_back_counts_what_the_target_sends_only() -> None:
    """A target that answers 5,000 bytes to a 10-byte request: the back count is
    the answer's, whichever way round the flows were made."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(10)
        writer.write(b"a" * 5000)
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    link = await Link("a->b", ("127.0.0.1", server.sockets[0].getsockname()[1])).start()
    try:
        received, _ = await _echoed(link.listen_port, b"q" * 10)
        assert len(received) == 5000
        await eventually(lambda: link.bytes_forwarded == 5010, timeout=5, what="both counted")
        assert link.bytes_back == 5000
    finally:
        await link.stop()
        server.close()
        await server.wait_closed()


async def test_a_stall_holds_bytes_until_it_heals(shaped) -> None:
    link = await shaped(LinkModel(latency_ms=1))
    link.set_faults(LinkFaults(stall=True))
    reader, writer = await asyncio.open_connection("127.0.0.1", link.listen_port)
    try:
        writer.write(b"held")
        await writer.drain()
        with pytest.raises(TimeoutError):   # accepted, and nothing comes back meanwhile
            await asyncio.wait_for(reader.read(4), 0.3)
        assert link.bytes_forwarded == 0
        assert link.stats()["queued_bytes"] == 4            # held by the link, counted
        link.heal()
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"
    finally:
        writer.close()


async def test_a_stall_holds_an_open_connection_quiet_not_closed(shaped) -> None:
    """A connection open when the stall begins stays open and goes quiet, as
    behind a real stalled path: its peer can tell only by waiting. (Closing
    it made a stall look like a cut to every client already connected.)"""
    link = await shaped(LinkModel(latency_ms=1))
    reader, writer = await asyncio.open_connection("127.0.0.1", link.listen_port)
    try:
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        link.set_faults(LinkFaults(stall=True))
        forwarded = link.bytes_forwarded
        writer.write(b"held")
        await writer.drain()
        with pytest.raises(TimeoutError):   # neither an end nor a reset: nothing at all
            await asyncio.wait_for(reader.read(4), 0.3)
        assert link.bytes_forwarded == forwarded
        link.heal()
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"
    finally:
        writer.close()


async def test_a_certain_reset_breaks_the_connection(shaped) -> None:
    link = await shaped(LinkModel())
    link.set_faults(LinkFaults(reset_probability=1.0))
    reader, writer = await asyncio.open_connection("127.0.0.1", link.listen_port)
    try:
        writer.write(b"x")
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 5)
    finally:
        writer.close()
    assert link.stats()["resets"] == 1
    link.heal()
    assert await _round_trip(link.listen_port) is True


async def test_cut_refuses_and_heal_serves_on_the_same_port(link: Link) -> None:
    port = link.listen_port
    assert await _round_trip(port) is True
    link.cut()
    assert await _round_trip(port) == "connect: ConnectionRefusedError"
    link.heal()
    assert link.listen_port == port
    await eventually(lambda: _round_trip(port), what="the healed link to serve")


async def test_many_quick_cuts_and_heals_end_serving(link: Link) -> None:
    for i in range(50):
        link.cut(forward=i % 3 != 0, backward=True)
        if i % 2:
            await asyncio.sleep(0)
        link.heal()
    assert await _round_trip(link.listen_port) is True


async def test_stop_while_about_to_listen_again_leaves_no_socket(link: Link) -> None:
    port = link.listen_port
    link.cut()
    link.heal()          # bound again; the listener task has not run yet
    await link.stop()
    assert await _round_trip(port) == "connect: ConnectionRefusedError"


async def test_faults_from_another_thread_are_refused(link: Link) -> None:
    errors: list[BaseException] = []

    def from_thread() -> None:
        try:
            link.cut()
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    thread = threading.Thread(target=from_thread)
    thread.start()
    thread.join(5)
    assert errors and isinstance(errors[0], RuntimeError)
    assert await _round_trip(link.listen_port) is True


async def _reset_pattern(port: int, connections: int = 6, cap: int = 40) -> list[int]:
    """How many one-byte round trips each of ``connections`` connections made
    before the link reset it. One byte at a time, each awaited: every chunk the
    link reads is one byte, so its draws (a reset draw and a jitter draw per
    chunk, each way) come in one order only."""
    pattern = []
    for _ in range(connections):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        trips = 0
        try:
            while trips < cap:
                writer.write(b"x")
                await writer.drain()
                await asyncio.wait_for(reader.readexactly(1), 5)
                trips += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
        pattern.append(trips)
    return pattern


async def test_links_seeded_alike_draw_the_same_jitter_and_resets(echo_port) -> None:
    model = LinkModel(latency_ms=2, jitter_ms=2)

    async def run(seed: int) -> tuple[list[int], object]:
        link = await Link("a->b", ("127.0.0.1", echo_port), model, rng=random.Random(seed)).start()
        try:
            link.set_faults(LinkFaults(reset_probability=0.3))
            return await _reset_pattern(link.listen_port), link.rng.getstate()
        finally:
            await link.stop()

    seed = link_seed(7, "eastus-1", "westeurope-1")
    first = await run(seed)
    assert max(first[0]) < 40 and sum(first[0]) > 0   # resets came, between round trips
    # The same draws again, even while another link carries traffic beside it.
    again, _ = await asyncio.gather(run(seed), run(link_seed(7, "eastus-1", "brazilsouth")))
    assert again == first
    # Another cluster seed, or the other direction of the same pair: other draws.
    assert (await run(link_seed(8, "eastus-1", "westeurope-1")))[0] != first[0]
    assert (await run(link_seed(7, "westeurope-1", "eastus-1")))[0] != first[0]


async def test_the_supervisor_seeds_each_link_as_the_plan_says(tmp_path) -> None:
    spec = SMALL_SPEC.seeded(11)
    p = plan(spec.with_port_base(20000), tmp_path)
    supervisor = Supervisor(p)
    try:
        for planned in (p.links[0], p.links[1], p.links[-1]):
            link = await supervisor.add_link(dataclasses.replace(planned, port=0))  # any free port
            assert planned.seed == link_seed(11, planned.source, planned.target)
            assert link.rng.getstate() == random.Random(planned.seed).getstate()
    finally:
        await supervisor.stop()
