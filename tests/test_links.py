"""The WAN link's listening socket through cuts and heals: a cut link refuses
connections, a healed one serves again on the same port, a link stopped while
it was about to listen again leaves no socket behind, and faults set from a
thread other than the link's loop are refused instead of corrupting it."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cluster.links import Link

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
async def link():
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    link = await Link("a->b", ("127.0.0.1", server.sockets[0].getsockname()[1])).start()
    yield link
    await link.stop()
    server.close()
    await server.wait_closed()


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
