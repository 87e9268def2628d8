"""WAN links: real TCP proxies between nodes that behave like the network
between two Azure regions, and the seam where faults cut, slow and break
traffic (the model is Toxiproxy's).

Each ``Link`` listens on a loopback port and forwards every connection to one
target. Each direction of each connection is shaped separately:

* **latency**: a byte read at time t is written no earlier than t + one-way
  latency (+ jitter), and never before a byte read earlier;
* **bandwidth**: bytes leave at most at the link's rate (a serialising
  token clock per direction);
* **faults**: ``cut`` (open connections closed and, when the forward
  direction is cut, new ones refused — the listening socket closes), ``stall`` (accepted, nothing delivered), resets with a
  probability per chunk, and added latency or a lower bandwidth on top of the
  model. Faults change at run time; healing restores the model.

Randomness (jitter, resets) comes from an injected ``random.Random``, so a
seeded scenario replays the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from dataclasses import dataclass, field, replace

import structlog

log = structlog.get_logger("georeg.links")

READ_SIZE = 64 * 1024
# Bytes a direction may hold in flight before it stops reading (backpressure).
MAX_BUFFERED = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LinkModel:
    """How one direction of a link behaves when healthy."""

    latency_ms: float = 0.0          # one-way
    jitter_ms: float = 0.0           # uniform, ± around the latency
    bandwidth_mbps: float = 0.0      # megabits per second; 0 = unlimited


@dataclass(slots=True)
class LinkFaults:
    """What is currently broken on a link (per direction where it matters)."""

    cut_forward: bool = False        # client → target
    cut_backward: bool = False       # target → client
    stall: bool = False
    reset_probability: float = 0.0
    extra_latency_ms: float = 0.0
    extra_jitter_ms: float = 0.0
    bandwidth_mbps: float = 0.0      # a cap on top of the model; 0 = none

    @property
    def any(self) -> bool:
        return self != LinkFaults()


@dataclass
class _Direction:
    name: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    buffered: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    last_delivery: float = 0.0
    wire_free_at: float = 0.0


class Link:
    def __init__(self, name: str, target: tuple[str, int], model: LinkModel = LinkModel(),
                 *, listen_host: str = "127.0.0.1", listen_port: int = 0,
                 rng: random.Random | None = None) -> None:
        self.name = name
        self.target = target
        self.model = model
        self.faults = LinkFaults()
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.rng = rng or random.Random()
        self.bytes_forwarded = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._stopped = False
        self._relisten: asyncio.Task | None = None
        self._pending_sock: socket.socket | None = None

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    async def start(self) -> Link:
        await self._listen(self._bind())
        return self

    async def _listen(self, sock: socket.socket) -> None:
        """Serve ``sock`` (bound and listening) unless the link was cut or
        stopped meanwhile. Nothing here yields before the server owns the
        socket, so a cancellation cannot strand it."""
        self._pending_sock = None
        server = await asyncio.start_server(self._accept, sock=sock, start_serving=False)
        if self.faults.cut_forward or self._stopped:  # cut again while this was queued
            server.close()
            return
        self._server = server
        await server.start_serving()

    def _bind(self) -> socket.socket:
        """Listen now (connections queue in the backlog until accepted)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.listen_host, self.listen_port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.listen_port = sock.getsockname()[1]
        return sock

    def _set_listening(self, listening: bool) -> None:
        """A cut link refuses connections (the caller fails at once, as with a
        dead host behind a firewall that rejects), instead of accepting and
        resetting them, which gRPC would wait out until its deadline."""
        loop = asyncio.get_running_loop()
        if not listening and self._server is not None:
            self._server.close()
            self._server = None
        elif listening and self._server is None and not self._stopped:
            if self._relisten is None or self._relisten.done():
                # Bound and listening before this returns; accepted shortly after.
                self._pending_sock = self._bind()
                self._relisten = loop.create_task(self._listen(self._pending_sock),
                                                  name=f"link-listen:{self.name}")

    async def stop(self) -> None:
        self._stopped = True
        if self._relisten is not None:
            self._relisten.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._relisten
        if self._pending_sock is not None:  # its listener was cancelled before it ran
            self._pending_sock.close()
            self._pending_sock = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._close_all()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- faults --------------------------------------------------------------------

    def set_faults(self, faults: LinkFaults) -> None:
        """Apply ``faults`` now. Call it on the loop that runs the link (from
        another thread, use ``loop.call_soon_threadsafe``): a link's sockets
        and tasks are that loop's."""
        asyncio.get_running_loop()  # raises in any other thread, before anything changes
        cut_now = (faults.cut_forward and not self.faults.cut_forward) or \
                  (faults.cut_backward and not self.faults.cut_backward) or \
                  (faults.stall and not self.faults.stall)
        self.faults = faults
        if faults.stall:
            self._flowing.clear()
        else:
            self._flowing.set()
        if cut_now:
            self._close_all()
        self._set_listening(not faults.cut_forward)
        log.info("link_faults", link=self.name, faults=str(faults) if faults.any else "healed")

    def cut(self, forward: bool = True, backward: bool = True) -> None:
        self.set_faults(replace(self.faults, cut_forward=forward, cut_backward=backward))

    def heal(self) -> None:
        self.set_faults(LinkFaults())

    def _close_all(self) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    # -- forwarding ----------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # The link is stopping. asyncio's stream server inspects this task's
            # exception when it ends; ending quietly keeps that from logging noise.
            pass
        finally:
            self._connections.discard(task)

    async def _serve(self, client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter) -> None:
        faults = self.faults
        if faults.cut_forward or faults.cut_backward:
            client_writer.transport.abort()
            return
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        for writer in (client_writer, target_writer):
            _no_delay(writer)
        self._writers.update((client_writer, target_writer))
        forward = _Direction("forward", client_reader, target_writer)
        backward = _Direction("backward", target_reader, client_writer)
        tasks = [asyncio.create_task(self._pump(d)) for d in (forward, backward)]
        tasks += [asyncio.create_task(self._deliver(d)) for d in (forward, backward)]
        try:
            # Until both directions have delivered everything (a half-close keeps
            # the other direction open, as TCP does), or one of them fails.
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for w in (client_writer, target_writer):
                self._writers.discard(w)
                with contextlib.suppress(Exception):
                    w.transport.abort()

    def _delay_s(self) -> float:
        latency = self.model.latency_ms + self.faults.extra_latency_ms
        jitter = self.model.jitter_ms + self.faults.extra_jitter_ms
        if jitter:
            latency += self.rng.uniform(-jitter, jitter)
        return max(latency, 0.0) / 1000.0

    def _rate_bytes_per_s(self) -> float:
        rates = [r for r in (self.model.bandwidth_mbps, self.faults.bandwidth_mbps) if r > 0]
        return min(rates) * 1e6 / 8 if rates else 0.0

    async def _pump(self, d: _Direction) -> None:
        """Read from one side and schedule each chunk's delivery."""
        loop = asyncio.get_running_loop()
        while True:
            while d.buffered > MAX_BUFFERED:
                d.drained.clear()
                await d.drained.wait()
            data = await d.reader.read(READ_SIZE)
            if not data:
                await d.queue.put((loop.time(), b""))
                return
            faults = self.faults
            if faults.reset_probability and self.rng.random() < faults.reset_probability:
                raise ConnectionResetError(f"{self.name}: injected reset")
            now = loop.time()
            rate = self._rate_bytes_per_s()
            if rate:  # serialise onto the wire at the link's rate
                start = max(now, d.wire_free_at)
                d.wire_free_at = start + len(data) / rate
                sent = d.wire_free_at
            else:
                sent = now
            deliver_at = max(sent + self._delay_s(), d.last_delivery)
            d.last_delivery = deliver_at
            d.buffered += len(data)
            await d.queue.put((deliver_at, data))

    async def _deliver(self, d: _Direction) -> None:
        loop = asyncio.get_running_loop()
        while True:
            deliver_at, data = await d.queue.get()
            delay = deliver_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._flowing.wait()  # a stalled link accepts but never answers
            if not data:
                with contextlib.suppress(Exception):
                    d.writer.write_eof()
                return
            d.writer.write(data)
            await d.writer.drain()
            self.bytes_forwarded += len(data)
            d.buffered -= len(data)
            if d.buffered <= MAX_BUFFERED:
                d.drained.set()


def _no_delay(writer: asyncio.StreamWriter) -> None:
    """Every byte the link delivers goes out at once: the link models latency
    itself, and Nagle's algorithm would add up to a delayed-ACK timeout (40 ms)
    to small writes such as HTTP/2 window updates. asyncio sets this only on
    sockets whose protocol number says TCP, uvloop on every TCP socket."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
