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
  direction is cut, new ones refused — the listening socket closes),
  ``stall`` (open connections stay open and new ones are accepted, but
  nothing is delivered until it heals), resets with a probability per chunk,
  and added latency or a lower bandwidth on top of the model. Faults change
  at run time; healing restores the model.

Randomness (jitter, resets) comes from an injected ``random.Random``. In a
cluster, each link's is seeded with ``link_seed(cluster seed, source, target)``:
the same seed gives every link the same sequence of draws, whatever order the
links were created in and whatever traffic the other links carry.

The bytes move at the ``asyncio.Protocol`` level: each chunk read is stamped
with its delivery time and queued, and one loop timer per direction writes
everything due when it fires (a sink whose socket buffer is full holds the
queue; a queue beyond ``Link.buffer_limit`` stops reading its source). Every link
of a cluster shares the supervisor's event loop with the routing proxy, and
a default cluster moves ~30 MiB across links per image pushed, so the cost
per byte matters: 1.8 ms of CPU per MiB at 20 ms latency, against 3.0 with
a reader task, a queue and a sleeping writer task per direction.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import random
import socket
from collections import deque
from dataclasses import dataclass, replace

import structlog

log = structlog.get_logger("georeg.links")

# Bytes a direction may hold in flight before it stops reading (backpressure),
# at least; more on a link whose bandwidth × delay needs more (Link.buffer_limit).
MAX_BUFFERED = 4 * 1024 * 1024
# How many one-way delays' worth of the link's bandwidth a direction may hold.
BUFFER_DELAYS = 2
# …and never more than this, however long the delay: the queue is the
# supervisor's memory, per direction of every connection. A fault adding 2 s
# at 500 Mbit/s would otherwise let one direction hold 250 MB. A node lets one
# peer's channel run at most 48 MiB ahead of its reading over a WAN link
# (replicator.peers: CHANNEL_WINDOW_BUDGET), so a healthy link is never held
# back by this; a link slowed past it carries less than its bandwidth, which a
# fault that adds seconds of latency may.
MAX_BUFFER_LIMIT = 64 * 1024 * 1024
# A socket's own write buffer beyond which the link holds delivered bytes back.
_WRITE_HIGH_WATER = 256 * 1024
# Buckets (upper bounds, ms) of how late a chunk reached its receiver against
# its modelled delivery time; the last bucket holds everything beyond.
LATENESS_BOUNDS_MS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500,
                      1000, 2000)
_LATENESS_BOUNDS_S = tuple(b / 1000 for b in LATENESS_BOUNDS_MS)
# Loop timers may round to the millisecond: aim this much after a chunk is due,
# so that none is ever delivered before its time.
_TIMER_MARGIN_S = 0.0005


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


class DeliveryStats:
    """What a link's shaping cost beyond the model: how late each chunk was
    written to its receiver against its modelled time (the supervisor's loop
    was busy, or the receiver's socket was full) in ``LATENESS_BOUNDS_MS``
    buckets, and how often a receiver not reading held back a chunk that was
    due. A lag measured through links that deliver late measures the machine,
    not only the protocol: ``georeg bench lag`` reports these."""

    __slots__ = ("counts", "held")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENESS_BOUNDS_MS) + 1)
        self.held = 0

    def record(self, late_s: float) -> None:
        self.counts[bisect.bisect_left(_LATENESS_BOUNDS_S, late_s)] += 1

    def as_dict(self) -> dict:
        return {"lateness_bounds_ms": list(LATENESS_BOUNDS_MS),
                "lateness_counts": list(self.counts), "held_by_receiver": self.held}


class _Side(asyncio.Protocol):
    """One socket of a linked connection: the caller's, or the target's."""

    __slots__ = ("conn", "transport", "write_paused", "closed")

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        _no_delay(transport)
        self.conn.made(self)

    def data_received(self, data: bytes) -> None:
        self.conn.received(self, data)

    def eof_received(self) -> bool:
        self.conn.received(self, b"")
        return True                 # half-closed: the other direction carries on

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.conn.lost(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.conn.toward(self).schedule()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()


class _Flow:
    """One direction of a connection: chunks read from ``source`` wait in
    ``queue`` until due, then go to ``sink``; ``b""`` is the end of stream."""

    __slots__ = ("conn", "source", "sink", "queue", "buffered", "last_delivery",
                 "wire_free_at", "timer", "reading_paused", "ended", "delivered")

    def __init__(self, conn: _Connection, source: _Side, sink: _Side) -> None:
        self.conn = conn
        self.source = source
        self.sink = sink
        self.queue: deque[tuple[float, bytes]] = deque()
        self.buffered = 0
        self.last_delivery = 0.0
        self.wire_free_at = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.reading_paused = False
        self.ended = False          # the source's end is queued
        self.delivered = False      # ... and has reached the sink

    def add(self, deliver_at: float, data: bytes) -> None:
        self.last_delivery = deliver_at
        self.queue.append((deliver_at, data))
        if data:
            self.buffered += len(data)
            if self.buffered > self.conn.link.buffer_limit and not self.reading_paused:
                self.reading_paused = True
                self.source.transport.pause_reading()
        else:
            self.ended = True
        self.schedule()

    def schedule(self) -> None:
        if self.timer is not None or not self.queue:
            return
        loop = self.conn.loop
        self.timer = loop.call_at(self.queue[0][0] + _TIMER_MARGIN_S, self.flush)

    def flush(self) -> None:
        """Write everything due, unless the link is stalled, the target has
        not answered yet or the sink's buffer is full (healing, connecting and
        ``resume_writing`` call ``schedule`` again)."""
        self.timer = None
        link = self.conn.link
        sink = self.sink
        if link.faults.stall or sink.transport is None or sink.closed or self.delivered:
            return
        now = self.conn.loop.time()
        queue = self.queue
        if sink.write_paused:
            if queue and queue[0][0] <= now:
                link.delivery.held += 1
            return
        out: list[bytes] = []
        ended = False
        record = link.delivery.record
        while queue and queue[0][0] <= now:
            at, data = queue.popleft()
            if not data:
                ended = True
                break
            record(now - at)
            out.append(data)
        if out:
            size = sum(map(len, out))
            self.sink.transport.writelines(out)
            self.buffered -= size
            link.bytes_forwarded += size
            if (self.reading_paused and self.buffered <= link.buffer_limit
                    and not self.source.closed):
                self.reading_paused = False
                self.source.transport.resume_reading()
        if ended:
            self.delivered = True
            if self.sink.transport.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    self.sink.transport.write_eof()
            self.conn.flow_done()
        else:
            self.schedule()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()


class _Connection:
    """A caller's connection through the link to its target, both directions shaped."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.loop = asyncio.get_running_loop()
        self.client = _Side(self)
        self.target = _Side(self)
        self.forward = _Flow(self, self.client, self.target)
        self.backward = _Flow(self, self.target, self.client)
        self.connecting: asyncio.Task | None = None
        self.finished = False

    def toward(self, side: _Side) -> _Flow:
        return self.forward if side is self.target else self.backward

    def made(self, side: _Side) -> None:
        if side is not self.client:
            return
        link = self.link
        if link.faults.cut_forward or link.faults.cut_backward or link._stopped:
            side.transport.abort()
            return
        link._live.add(self)
        # What the caller sends meanwhile is queued as usual, and flows once
        # the target has answered.
        self.connecting = self.loop.create_task(self._connect(), name=f"link:{link.name}")

    async def _connect(self) -> None:
        try:
            await self.loop.create_connection(lambda: self.target, *self.link.target)
        except OSError:
            self.connecting = None
            self.abort()
            return
        self.connecting = None
        if self.client.closed:
            self.abort()
        else:
            self.forward.schedule()

    def received(self, side: _Side, data: bytes) -> None:
        link = self.link
        flow = self.forward if side is self.client else self.backward
        if flow.ended or self.finished:
            return
        if flow.sink.closed and data:
            self.abort()                        # as TCP answers bytes for a closed socket
            return
        now = self.loop.time()
        if not data:
            flow.add(max(now, flow.last_delivery), b"")
            return
        faults = link.faults
        if faults.reset_probability and link.rng.random() < faults.reset_probability:
            log.debug("link_reset_injected", link=link.name)
            link.resets += 1
            self.abort()
            return
        rate = link._rate_bytes_per_s()
        if rate:  # serialise onto the wire at the link's rate
            sent = flow.wire_free_at = max(now, flow.wire_free_at) + len(data) / rate
        else:
            sent = now
        flow.add(max(sent + link._delay_s(), flow.last_delivery), data)

    def lost(self, side: _Side, exc: Exception | None) -> None:
        if self.finished:
            return
        if exc is not None:
            self.abort()                        # a reset travels on at once
            return
        inbound = self.forward if side is self.client else self.backward
        if not inbound.ended:                   # closed without a half-close first
            self.received(side, b"")
        outbound = self.toward(side)
        if outbound.queue:
            self.abort()                        # bytes for a socket that is gone
            return
        outbound.delivered = True
        self.flow_done()

    def flow_done(self) -> None:
        if self.forward.delivered and self.backward.delivered:
            self.close()

    def kick(self) -> None:
        self.forward.schedule()
        self.backward.schedule()

    def close(self) -> None:
        self._end()
        for side in (self.client, self.target):
            if side.transport is not None and not side.closed:
                side.transport.close()

    def abort(self) -> None:
        self._end()
        for side in (self.client, self.target):
            side.abort()

    def _end(self) -> None:
        self.finished = True
        self.link._live.discard(self)
        if self.connecting is not None:
            self.connecting.cancel()
        self.forward.cancel()
        self.backward.cancel()


def link_seed(seed: int, source: str, target: str) -> int:
    """The seed of the link from ``source`` to ``target`` in a cluster seeded
    with ``seed``: a hash of the three, so that no link's draws depend on
    another link's (nor on the order links are made in)."""
    digest = hashlib.sha256(f"{seed}\0{source}\0{target}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


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
        self.resets = 0                 # connections the reset fault broke
        self.delivery = DeliveryStats()
        self._server: asyncio.Server | None = None
        self._live: set[_Connection] = set()
        self._stopped = False
        self._relisten: asyncio.Task | None = None
        self._pending_sock: socket.socket | None = None
        self.buffer_limit = self._buffer_limit()

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    def stats(self) -> dict:
        """Bytes delivered; bytes read and not delivered yet (``queued_bytes``:
        in transit, or held by a stall); connections broken by the reset fault;
        lateness against the model."""
        queued = sum(c.forward.buffered + c.backward.buffered for c in self._live)
        return {"name": self.name, "bytes": self.bytes_forwarded, "queued_bytes": queued,
                "resets": self.resets, **self.delivery.as_dict()}

    async def start(self) -> Link:
        await self._listen(self._bind())
        return self

    async def _listen(self, sock: socket.socket) -> None:
        """Serve ``sock`` (bound and listening) unless the link was cut or
        stopped meanwhile. Nothing here yields before the server owns the
        socket, so a cancellation cannot strand it."""
        self._pending_sock = None
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(self).client, sock=sock,
                                          start_serving=False)
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

    # -- faults --------------------------------------------------------------------

    def set_faults(self, faults: LinkFaults) -> None:
        """Apply ``faults`` now. Call it on the loop that runs the link (from
        another thread, use ``loop.call_soon_threadsafe``): a link's sockets
        and tasks are that loop's."""
        asyncio.get_running_loop()  # raises in any other thread, before anything changes
        # A stall closes nothing: connections already open stay open and go
        # quiet, as they do behind a real stalled path or in front of a frozen
        # process, which only a keepalive or a deadline notices.
        cut_now = (faults.cut_forward and not self.faults.cut_forward) or \
                  (faults.cut_backward and not self.faults.cut_backward)
        self.faults = faults
        self.buffer_limit = self._buffer_limit()
        if cut_now:
            self._close_all()
        elif not faults.stall:
            for conn in list(self._live):       # what a stall held back is due now
                conn.kick()
        self._set_listening(not faults.cut_forward)
        log.info("link_faults", link=self.name, faults=str(faults) if faults.any else "healed")

    def cut(self, forward: bool = True, backward: bool = True) -> None:
        self.set_faults(replace(self.faults, cut_forward=forward, cut_backward=backward))

    def heal(self) -> None:
        self.set_faults(LinkFaults())

    def _close_all(self) -> None:
        for conn in list(self._live):
            conn.abort()
        self._live.clear()

    # -- shaping -------------------------------------------------------------------

    def _delay_s(self) -> float:
        latency = self.model.latency_ms + self.faults.extra_latency_ms
        jitter = self.model.jitter_ms + self.faults.extra_jitter_ms
        if jitter:
            latency += self.rng.uniform(-jitter, jitter)
        return max(latency, 0.0) / 1000.0

    def _buffer_limit(self) -> int:
        """Bytes a direction may hold before it stops reading its source: what
        the link carries in ``BUFFER_DELAYS`` of its longest one-way delays,
        and never less than ``MAX_BUFFERED``. A direction holds every byte for
        its delay, so a smaller limit would itself cap the link below its
        bandwidth: 4 MiB behind 93 ms (East US → Southeast Asia) is 45 MB/s,
        360 Mbit/s of a modelled 500. Without a bandwidth (unlimited) there is
        no product to size to: ``MAX_BUFFERED``. Never more than
        ``MAX_BUFFER_LIMIT``, whatever latency a fault adds."""
        rate = self._rate_bytes_per_s()
        delay_ms = (self.model.latency_ms + self.faults.extra_latency_ms
                    + self.model.jitter_ms + self.faults.extra_jitter_ms)
        return min(MAX_BUFFER_LIMIT,
                   max(MAX_BUFFERED, int(BUFFER_DELAYS * rate * delay_ms / 1000)))

    def _rate_bytes_per_s(self) -> float:
        rates = [r for r in (self.model.bandwidth_mbps, self.faults.bandwidth_mbps) if r > 0]
        return min(rates) * 1e6 / 8 if rates else 0.0


def _no_delay(transport: asyncio.BaseTransport) -> None:
    """Every byte the link delivers goes out at once: the link models latency
    itself, and Nagle's algorithm would add up to a delayed-ACK timeout (40 ms)
    to small writes such as HTTP/2 window updates. asyncio sets this only on
    sockets whose protocol number says TCP, uvloop on every TCP socket."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
