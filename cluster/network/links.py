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
  added latency or a lower bandwidth on top of the model, and a lossy or
  corrupting path (``SegmentFates``: per TCP segment, see below). Faults
  change at run time; healing restores the model.

A link carries TCP streams, so packet-level faults are modelled as what
they do to a stream's consumer (``SegmentFates``; docs/faults.md, "Lossy
links"): segment *n* of a direction of a connection is its bytes from
``n × MSS``, whatever chunks they are read in, and

* a **lost** segment is retransmitted: the chunk holding its start (and, in
  order, everything after it) arrives later by one RTT of the link when
  three or more segments follow it (fast retransmit: in its chunk, or in
  chunks sent before the timeout), else by a retransmission timeout,
  ``RTT + MIN_RTO`` (Linux's ``SRTT + max(4 RTTVAR, 200 ms)`` on a path
  without variance); several losses in one chunk are recovered together
  (SACK), so the chunk pays the longest. Loss also caps the rate at Reno's
  steady state (Mathis et al.): ``MSS × 1.22 / (RTT × √loss)``: what halving
  windows costs a bulk transfer;
* a **duplicated** segment costs its wire time again (the receiver's TCP
  drops the copy: its consumer never sees it);
* **reordering** is repaired by the receiver's TCP: no effect at this layer,
  and none is modelled (accepted so a fault written for netem reads the same);
* a **corrupted** segment is one whose damage TCP's 16-bit checksum missed
  (what netem's ``corrupt`` produces is caught by it and is a loss): one
  byte of it is XORed with a non-zero mask, and the consumer reads it.
  Content is checked end to end (blobs and manifests by digest, replication
  messages by ``replicator.wire.integrity``), so a flipped byte fails a
  transfer, which is retried, and is never stored.

Randomness (jitter, resets) comes from an injected ``random.Random``. In a
cluster, each link's is seeded with ``link_seed(cluster seed, source, target)``:
the same seed gives every link the same sequence of draws, whatever order the
links were created in and whatever traffic the other links carry. A lossy
fault with a seed of its own draws each direction of each connection's
segment fates from ``link_seed(fault seed, link name, "segments N
DIRECTION")`` (N numbers the link's connections): the same seed and fault
give the same decision for the n-th segment of a connection's traffic,
however its bytes were read.

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
import itertools
import math
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
# A TCP segment's payload on a 1500-byte MTU path (what a lossy link counts in).
MSS = 1448
# Linux's minimum retransmission timeout, over the smoothed RTT: a lost segment
# with too few behind it to draw three duplicate ACKs waits RTT + this.
MIN_RTO_S = 0.2
# Reno's steady-state constant: rate ≤ MSS × C / (RTT × √loss) (Mathis et al. 1997).
_MATHIS_C = 1.22
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
    # A lossy or corrupting path, per TCP segment (``SegmentFates``).
    loss: float = 0.0
    corrupt: float = 0.0
    duplicate: float = 0.0
    reorder: bool = False            # accepted; nothing to model above TCP
    seed: int | None = None          # the segments' fates (None: the link's own draws)

    @property
    def any(self) -> bool:
        return self != LinkFaults()

    @property
    def lossy(self) -> bool:
        return bool(self.loss or self.corrupt or self.duplicate)


@dataclass(frozen=True, slots=True)
class ChunkFate:
    """What a lossy path does to one chunk: ``delay_s`` of retransmissions
    (the worst of its losses), ``tail``: if a loss has too few segments
    behind it for a fast retransmit, how many more must follow (the flow
    shortens ``delay_s`` to a fast retransmit if they do before it is due),
    ``wire_bytes`` it occupies (duplicates included), ``flips``: (offset,
    XOR mask) of each byte corrupted, and how many segments were lost,
    corrupted (``len(flips)``) and duplicated."""

    delay_s: float = 0.0
    tail: int = 0
    segments: int = 0
    wire_bytes: int = 0
    flips: tuple[tuple[int, int], ...] = ()
    lost: int = 0
    duplicated: int = 0

    def apply(self, data: bytes) -> bytes:
        if not self.flips:
            return data
        out = bytearray(data)
        for offset, mask in self.flips:
            out[offset] ^= mask
        return bytes(out)


# Duplicate ACKs that trigger a fast retransmit (RFC 5681).
_DUPACKS = 3


class SegmentFates:
    """Draws the fate of each TCP segment of one direction of one connection:
    IO-free, and a function of its ``rng`` and the stream's bytes alone, not
    of how they were read: segment *n* is the stream's bytes from ``n × MSS``
    (counted from where this started), and it belongs to the chunk holding
    its first byte. Hits are drawn as geometric gaps (one draw per hit, not
    per segment) and carried across chunks, as is a flipped byte that lands
    past the end of the chunk holding its segment's start. Each kind draws
    from its own generator (seeded from ``rng``), and the flips from one
    more, so no sequence depends on where chunks end."""

    __slots__ = ("_rngs", "offset", "_next", "_flips")

    def __init__(self, rng: random.Random) -> None:
        self._rngs = {kind: random.Random(rng.getrandbits(64))
                      for kind in ("loss", "duplicate", "corrupt", "flip")}
        self.offset = 0                        # stream bytes seen
        self._next: dict[str, int] = {}        # per kind, the next segment it hits
        self._flips: list[tuple[int, int]] = []   # (stream offset, mask) still ahead

    def chunk(self, size: int, faults: LinkFaults, rtt_s: float) -> ChunkFate:
        start, end = self.offset, self.offset + size
        self.offset = end
        first, last = -(-start // MSS), -(-end // MSS)      # segments starting in the chunk
        lost = self._hits("loss", faults.loss, first, last)
        duplicated = self._hits("duplicate", faults.duplicate, first, last)
        flip = self._rngs["flip"]
        for n in self._hits("corrupt", faults.corrupt, first, last):
            self._flips.append((n * MSS + flip.randrange(MSS), flip.randrange(1, 256)))
        flips = tuple((at - start, mask) for at, mask in self._flips if at < end)
        self._flips = [(at, mask) for at, mask in self._flips if at >= end]
        delay, tail = 0.0, 0
        if lost:
            behind = last - 1 - lost[-1]        # segments behind the last loss, in this chunk
            # A fast retransmit costs a round trip; a timeout, Linux's RTO:
            # SRTT + max(4 RTTVAR, 200 ms), the path's variance taken as nil.
            delay = rtt_s if behind >= _DUPACKS else rtt_s + MIN_RTO_S
            tail = max(0, _DUPACKS - behind)
        return ChunkFate(delay, tail, last - first, size + len(duplicated) * MSS, flips,
                         len(lost), len(duplicated))

    def _hits(self, kind: str, p: float, first: int, last: int) -> list[int]:
        """The segments in ``[first, last)`` an event of probability ``p`` hits."""
        if p <= 0 or first >= last:
            return []
        if p >= 1:
            return list(range(first, last))
        log_miss, rng = math.log1p(-p), self._rngs[kind]
        hit = self._next.get(kind)
        if hit is None:
            hit = first + int(math.log(1.0 - rng.random()) / log_miss)
        hits = []
        while hit < last:                       # bounded: hit grows by ≥ 1 each turn
            if hit >= first:
                hits.append(hit)
            hit += 1 + int(math.log(1.0 - rng.random()) / log_miss)
        self._next[kind] = hit
        return hits


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
                 "wire_free_at", "timer", "reading_paused", "ended", "delivered",
                 "popped", "fates", "fates_epoch", "tails", "back")

    def __init__(self, conn: _Connection, source: _Side, sink: _Side) -> None:
        self.conn = conn
        self.back = source is conn.target     # the target's answers, to the caller
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
        self.popped = 0             # entries that left the queue (numbers its entries)
        # A lossy link's draws for this direction (``Link.segment_fate``), and
        # the losses waiting out a timeout unless enough segments follow them:
        # [number of the chunk's entry, segments still needed], oldest first.
        self.fates: SegmentFates | None = None
        self.fates_epoch = -1
        self.tails: list[list[int]] = []

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

    def recover(self, fast_at: float, segments: int) -> None:
        """``segments`` more were sent behind the losses waiting out a
        timeout: each that now has enough behind it is retransmitted on their
        duplicate ACKs, and its chunk (and, in order, what is queued behind it
        for its sake) is due at ``fast_at`` instead."""
        waiting = []
        moved = False
        for tail in self.tails:                 # bounded: one per queued chunk
            i = tail[0] - self.popped
            if i < 0:
                continue                        # delivered meanwhile
            tail[1] -= segments
            if tail[1] > 0:
                waiting.append(tail)
                continue
            queue = self.queue
            held_until = queue[i][0]
            if fast_at >= held_until:
                continue
            for j in range(i, len(queue)):      # bounded by the queue
                at, data = queue[j]
                if at > held_until:
                    break                       # late for its own reasons
                queue[j] = (max(fast_at, queue[j - 1][0]) if j > i else fast_at, data)
            moved = True
        self.tails = waiting
        if moved:
            self.last_delivery = self.queue[-1][0]
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
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
            self.popped += 1
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
            if self.back:
                link.bytes_back += size
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
        self.popped += len(self.queue)
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
        self.ordinal = next(link.connections)   # names its lossy draws (``segment_fate``)
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
        fate = link.segment_fate(flow, len(data)) if faults.lossy else None
        wire_bytes, retransmit_s = len(data), 0.0
        if fate is not None:
            data = fate.apply(data)
            wire_bytes, retransmit_s = fate.wire_bytes, fate.delay_s
        rate = link._rate_bytes_per_s()
        if rate:  # serialise onto the wire at the link's rate
            sent = flow.wire_free_at = max(now, flow.wire_free_at) + wire_bytes / rate
        else:
            sent = now
        delay = link._delay_s()
        if flow.tails and fate is not None:
            flow.recover(sent + delay + link.rtt_s(), fate.segments)
        flow.add(max(sent + delay + retransmit_s, flow.last_delivery), data)
        if fate is not None and fate.tail:
            flow.tails.append([flow.popped + len(flow.queue) - 1, fate.tail])

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
        self.bytes_forwarded = 0        # both directions
        self.bytes_back = 0             # ... of which from the target to the caller
        self.resets = 0                 # connections the reset fault broke
        # Segments a lossy fault lost (retransmitted), corrupted, duplicated.
        self.segments = {"lost": 0, "corrupted": 0, "duplicated": 0}
        self.connections = itertools.count()    # numbers the connections it carries
        self._fates_epoch = 0                   # a lossy fault's draws start over when it changes
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
        """Bytes delivered (``bytes_back``: of them, the target's to the caller);
        bytes read and not delivered yet (``queued_bytes``:
        in transit, or held by a stall); connections broken by the reset fault;
        lateness against the model."""
        queued = sum(c.forward.buffered + c.backward.buffered for c in self._live)
        return {"name": self.name, "bytes": self.bytes_forwarded,
                "bytes_back": self.bytes_back, "queued_bytes": queued,
                "resets": self.resets, **{f"{k}_segments": n for k, n in self.segments.items()},
                **self.delivery.as_dict()}

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
        if _lossy_of(faults) != _lossy_of(self.faults):
            self._fates_epoch += 1              # each flow draws anew from its next segment
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

    def rtt_s(self) -> float:
        """The round trip of a connection through this link: both directions
        are shaped by it."""
        return 2 * (self.model.latency_ms + self.faults.extra_latency_ms) / 1000.0

    def segment_fate(self, flow: _Flow, size: int) -> ChunkFate:
        """The fate of ``flow``'s next ``size`` bytes. Each direction of each
        connection draws from its own ``random.Random``: with a seeded fault,
        seeded from (seed, link, connection number, direction), so what the
        n-th segment of a connection meets does not depend on the traffic of
        any other, nor on how its bytes were read."""
        if flow.fates is None or flow.fates_epoch != self._fates_epoch:
            direction = "forward" if flow is flow.conn.forward else "backward"
            seed = self.rng.getrandbits(64) if self.faults.seed is None else link_seed(
                self.faults.seed, self.name, f"segments {flow.conn.ordinal} {direction}")
            flow.fates, flow.fates_epoch = SegmentFates(random.Random(seed)), self._fates_epoch
        fate = flow.fates.chunk(size, self.faults, self.rtt_s())
        if fate.lost or fate.flips or fate.duplicated:
            self.segments["lost"] += fate.lost
            self.segments["corrupted"] += len(fate.flips)
            self.segments["duplicated"] += fate.duplicated
        return fate

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
        rates = [r * 1e6 / 8 for r in (self.model.bandwidth_mbps, self.faults.bandwidth_mbps)
                 if r > 0]
        rtt = self.rtt_s()
        if self.faults.loss and rtt:    # what a loss rate leaves of a TCP flow (Reno)
            rates.append(MSS * _MATHIS_C / (rtt * math.sqrt(self.faults.loss)))
        return min(rates) if rates else 0.0


def _lossy_of(faults: LinkFaults) -> tuple:
    return faults.loss, faults.corrupt, faults.duplicate, faults.seed


def _no_delay(transport: asyncio.BaseTransport) -> None:
    """Every byte the link delivers goes out at once: the link models latency
    itself, and Nagle's algorithm would add up to a delayed-ACK timeout (40 ms)
    to small writes such as HTTP/2 window updates. asyncio sets this only on
    sockets whose protocol number says TCP, uvloop on every TCP socket."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
