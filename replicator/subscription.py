"""One node's subscription to one peer's log.

The loop connects, announces the cursor it persisted (and which incarnation
of the peer it belongs to), applies each batch through ``Transfer``, advances
the cursor, and — to a zone peer of its own region — acknowledges it, which
is what zone quorum waits for. Nothing else reads acknowledgements, so a
subscription to any other peer sends none: a message, and a wait for the
metadata fsync, less per batch on every such stream.
Blob transfers run concurrently, within a batch and across batches (a push's
layers usually arrive one per batch): the loop reads on while they run, and
anything else waits for every blob before it, so order is kept where it
matters. The cursor advances strictly in log order, past a batch once
everything up to it is applied, and each advance is acknowledged at once.

Persisting the cursor is deferred (at most ``CURSOR_PERSIST_S`` behind, and
when the session ends). What an acknowledgement promises — the content is
durable here — the synced apply commits already guarantee; a cursor lost in a
crash only means events are sent again, and re-applying is a no-op. A synced
write per batch on every subscription (most batches are relayed copies of
events already applied) kept each node's event loop blocked in fsync for a
fifth of its time under the lag benchmark.

Every batch that arrives is counted (``batches_received``): a stream that
delivers is the cheapest sign that its peer answers, which bounded staleness
uses to tell a silent peer from one that is back (``replicator.staleness``).

Each persisted cursor, once fsynced, is reported to the peer
(``SubscribeCursor``): the peer truncates its log and collects tombstones
behind the lowest cursor its peers reported (``replicator.retention``), so a
report must never run ahead of what a restart here would resume from. When
the peer answers that the cursor is below its log floor (``cursor_truncated``:
this node was away past its horizon, or its cursor was reset), the events
missed are gone: the subscription repairs this node by anti-entropy from that
peer (``resync``; every deletion it missed is still among the peer's
tombstones) and only then moves its cursor to the head the peer named,
acknowledging nothing for zone quorum (the resync brings no blobs); a resync
that fails ends the session, which starts over from the same cursor.

When the connection breaks, it reconnects with capped, jittered backoff and
resumes from the persisted cursor; whatever is re-sent is a no-op. An event
that fails permanently is recorded against its repository and digest and
skipped (anti-entropy retries it later); one that keeps failing for
retryable reasons ends the session, which then resumes from the same cursor.

A relayed event (one whose origin is not the peer that sent it) can overtake
the origin's own: the origin's stream carries the blob bytes with its events
(``replicator.service``) and so moves slower than a relay's few hundred bytes.
Fetching the content on the relay's word would then cross the WAN a second
time, on the same connection the bytes are already queued on. So while this
node's stream from the event's origin is connected and only a little behind
(``ORIGIN_AHEAD_MAX`` events), a relayed content event first waits, at most
``ORIGIN_WAIT_S``, until that stream has delivered the event's origin
sequence number (``OriginStreams``); usually it already has, and nothing waits.
A stream that is itself waiting for another is not waited for: two streams
catching up together (a region back from an outage reads every peer's
backlog, full of relays of each other's events) would otherwise each stop at
a relay of the other's, both readers blocked, and go on only when the wait ran
out — a second per relayed manifest, which held a returning zone's
acknowledgements back past the zone-quorum timeout.

A subscription to a remote peer whose events a sibling zone reads whole for
the region (``relay``: ``replicator.intake``) reads the peer *lean* while that
sibling keeps up: the peer sends only the blob events it gives this zone for
the region, and every batch's head. Its cursor then moves only when the
sibling vouches for it (``vouch``: the sibling's stream says how far it had
applied the peer when its own log reached what this node has applied of it),
never with the lean batches, so what it persists, reports and resumes from is
what this node holds. A watcher ends a lean session when the sibling's stream
is down or its cursor stands still while the peer's head is ahead
(``intake.RELAY_STALL_S``): the next session reads the peer whole; and ends a
whole session once the sibling is back and vouches for as much.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Sequence

import grpc
import structlog

from registry_node import keys
from registry_node.metastore import Batch
from registry_node.records import Cursor, Event, EventKind, decode, encode

from .convert import event_from_wire
from .errors import Outcome, ReplicationError, from_grpc, indefinite, permanent
from .intake import RELAY_CHECK_S, RELAY_RETURN_S, RELAY_STALL_S, Relay
from .metrics import ReplicationMetrics
from .peers import PeerClient
from .retry import Backoff
from .transfer import CONTENT_KINDS, Transfer
from .wire.v1 import replication_pb2 as pb

log = structlog.get_logger("georeg.replication")

BLOB_KINDS = frozenset({EventKind.BLOB_PUT, EventKind.BLOB_MOUNT})
# Batches of blobs being applied while the loop reads on, at most.
PIPELINE_DEPTH = 64
# How far the persisted cursor may lag behind the applied one (seconds). Each
# persist is a synced write on the event loop, one per subscription; at 0.5 s
# they still took a tenth of a busy node's main thread.
CURSOR_PERSIST_S = 2.0
RECONNECT_BACKOFF = Backoff(base_s=0.1, cap_s=1.0)
# How long a relayed event may wait for its origin's own stream to deliver it,
# and how far behind that stream may be for the wait to be worth it.
ORIGIN_WAIT_S = 1.0
ORIGIN_AHEAD_MAX = 512


class OriginStreams:
    """This node's subscriptions by the peer they read from, so a relayed event
    can wait for its origin's own stream (see the module docstring)."""

    def __init__(self) -> None:
        self._by_origin: dict[tuple[str, str], Subscription] = {}

    def add(self, subscription: Subscription) -> None:
        peer = subscription.peer.peer
        self._by_origin[(peer.region, peer.zone)] = subscription

    def remove(self, subscription: Subscription) -> None:
        peer = subscription.peer.peer
        if self._by_origin.get((peer.region, peer.zone)) is subscription:
            del self._by_origin[(peer.region, peer.zone)]

    async def delivered(self, event: Event) -> None:
        """Return once the origin's stream has delivered ``event``, or at once
        if it is not connected, far behind, waiting itself or the event
        predates it; at most after ``ORIGIN_WAIT_S``."""
        stream = self._by_origin.get((event.origin_region, event.origin_zone))
        if stream is not None and event.origin_seq:
            await stream.received(event.origin_seq)


class Subscription:
    def __init__(self, peer: PeerClient, transfer: Transfer, others: Callable[[], Sequence[PeerClient]],
                 metrics: ReplicationMetrics, *, on_connect: Callable[[PeerClient], Awaitable[None]] | None = None,
                 backoff: Backoff = RECONNECT_BACKOFF, acknowledge: bool = True,
                 origins: OriginStreams | None = None,
                 rng: random.Random | None = None,
                 resync: Callable[[PeerClient], Awaitable[object]] | None = None,
                 manifest_held: Callable[[str, str, str], None] | None = None,
                 node_name: str = "",
                 relay: Relay | None = None,
                 on_advance: Callable[[str, Cursor], None] | None = None,
                 on_relayed: Callable[[Sequence[pb.RelayedCursor]], None] | None = None) -> None:
        self.peer = peer
        # Told (node name, repository, digest) of every manifest a node is seen
        # to hold: the peer, for each manifest_put on its stream (its log
        # carries only what it stored), and this node (``node_name``) for each
        # it applies — replication completion's cue to ask (``replicator.completion``).
        self.manifest_held = manifest_held
        self.node_name = node_name
        # The sibling zone that reads this peer's log whole for the region, if
        # not this node (replicator.intake); what it vouches for; whether this
        # session reads lean; whether the sibling stalled and must catch up first.
        self.relay = relay
        self.vouched: Cursor | None = None
        self.lean = False
        self.fallbacks = 0              # lean sessions ended for a relay down or stalled
        self._distrust = False
        self.on_advance = on_advance     # every advance of the cursor (intake.RelayedCursors)
        self.on_relayed = on_relayed     # a sibling's relayed cursors, once applied here
        self.acknowledge = acknowledge   # the peer counts this node toward its zone quorum
        self.transfer = transfer
        self.replica = transfer.replica
        self.meta = transfer.replica.meta
        self.others = others
        self.metrics = metrics
        self.on_connect = on_connect
        self.backoff = backoff
        self.rng = rng or random.Random()
        self.connected = False
        self.peer_last_seq = 0
        self.batches_received = 0       # grows with every batch: the stream delivers
        self.origins = origins
        self.resync = resync             # anti-entropy from the peer, for a truncated cursor
        self.resyncs = 0
        self._report_due = asyncio.Event()
        self._sender_id = ""             # the peer incarnation this session reads
        self._head_of = ""               # the peer incarnation peer_last_seq is of
        self._writing = asyncio.Lock()   # one write at a time on the stream
        self._received = 0              # the peer's log up to here is applied or under way here
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []
        self.origin_waits = 0           # applies of this stream waiting for another stream
        self.last_error = ""
        self._applied: Cursor | None = None       # in memory, ahead of the persisted one
        self._persisted: Cursor | None = None
        self._persisted_at = float("-inf")
        self._persist_timer: asyncio.TimerHandle | None = None

    # -- cursor ------------------------------------------------------------------

    def cursor(self) -> Cursor:
        """How far this peer's log is applied here."""
        if self._applied is not None:
            return self._applied
        raw = self.meta.get(keys.cursor(self.peer.name))
        return decode(raw, Cursor) if raw is not None else Cursor("", 0)

    def _advance(self, cursor: Cursor) -> None:
        """``cursor`` is applied: persist it now, or soon (see the module docstring)."""
        self._applied = cursor
        if self.on_advance is not None:
            self.on_advance(self.peer.name, cursor)
        loop = asyncio.get_running_loop()
        wait = self._persisted_at + CURSOR_PERSIST_S - loop.time()
        if wait <= 0:
            self._persist()
        elif self._persist_timer is None:
            self._persist_timer = loop.call_later(wait, self._persist)

    def _persist(self) -> None:
        if self._persist_timer is not None:
            self._persist_timer.cancel()
            self._persist_timer = None
        cursor = self._applied
        if cursor is None or cursor == self._persisted:
            return
        batch = Batch()
        batch.put(keys.cursor(self.peer.name), encode(cursor))
        self.meta.commit(batch)
        self._persisted = cursor
        self._persisted_at = asyncio.get_running_loop().time()
        self._report_due.set()

    async def received(self, seq: int) -> None:
        """Return once this stream has delivered the peer's event ``seq`` (its
        apply is done or under way), or at once if the stream is down, more
        than ``ORIGIN_AHEAD_MAX`` events behind it or itself waiting for
        another stream; at most after ``ORIGIN_WAIT_S``."""
        if (not self.connected or seq <= self._received or self.origin_waits
                or seq - self._received > ORIGIN_AHEAD_MAX):
            return
        future = asyncio.get_running_loop().create_future()
        entry = (seq, future)
        self._waiting.append(entry)
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(future, ORIGIN_WAIT_S)
        finally:
            if entry in self._waiting:
                self._waiting.remove(entry)

    def _delivered(self, seq: int | None) -> None:
        """The peer's log is delivered up to ``seq`` (None: the stream ended)."""
        if seq is not None:
            self._received = max(self._received, seq)
        still = []
        for entry in self._waiting:
            if seq is None or entry[0] <= self._received:
                if not entry[1].done():
                    entry[1].set_result(None)
            else:
                still.append(entry)
        self._waiting = still

    def vouch(self, cursor: Cursor) -> None:
        """A sibling zone that reads this peer's log whole had applied it up to
        ``cursor`` before its log reached what this node has applied of it:
        this node holds it too (``replicator.intake``). While lean it is this
        subscription's cursor; otherwise it only tells when to go lean again."""
        best = self.vouched
        if best is None or best.node_id != cursor.node_id or cursor.seq > best.seq:
            self.vouched = cursor
        if self.lean:
            self._take_vouched()

    def _take_vouched(self) -> None:
        """Make what the sibling vouched for this subscription's cursor if it
        is ahead; called while lean, and on going lean (a session starting
        lean, a return to lean): vouches that came while this read whole or
        was down moved nothing, and an idle sibling sends no new one, so the
        cursor would otherwise stay behind until the stall detector fires."""
        vouched, current = self.vouched, self.cursor()
        if vouched is None:
            return
        incarnation = self._sender_id or current.node_id
        if vouched.node_id != incarnation:
            return       # of another incarnation of the peer than the one this reads
        if vouched.node_id != current.node_id or vouched.seq > current.seq:
            self._advance(vouched)

    @property
    def lag_events(self) -> int:
        return max(0, self.peer_last_seq - self.cursor().seq)

    # -- loop --------------------------------------------------------------------

    async def run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._session()
                attempt = 0
            except ReplicationError as exc:
                self._broken(exc)
            except OSError as exc:
                # This node's own disk refused a write (an applied batch, the
                # cursor persisted as the session ends): the loop must outlive
                # it, and resumes from the cursor last persisted once it writes.
                self._broken(indefinite(f"subscription to {self.peer.name}: storing here: "
                                        f"{exc.strerror or exc}"))
            await asyncio.sleep(self.backoff.delay(attempt, self.rng))
            attempt += 1

    def _broken(self, exc: ReplicationError) -> None:
        self.last_error = exc.reason
        self.metrics.failures.labels(self.peer.name, exc.outcome.value).inc()
        log.info("subscription_broken", peer=self.peer.name, error=exc.reason)

    def _sources(self) -> list[PeerClient]:
        return [self.peer, *(p for p in self.others() if p is not self.peer)]

    async def _session(self) -> None:
        self._received = self.cursor().seq
        call = self.peer.subscribe()
        # (cursor after a batch, its blob tasks) in log order: the reader adds,
        # the acknowledger advances and acknowledges each once its tasks are done.
        applying: asyncio.Queue[_Applying] = asyncio.Queue(PIPELINE_DEPTH)
        acknowledger = asyncio.ensure_future(self._acknowledge(call, applying))
        # The reporter writes only once the start is written (a cursor persisted
        # by the previous session's timer may be due already), and only cursors
        # of the peer incarnation this session reads.
        started = asyncio.Event()
        self._sender_id = ""
        self._report_due.clear()
        self.lean = self._lean_wanted()
        reader = asyncio.ensure_future(self._read(call, applying, started))
        reporter = asyncio.ensure_future(self._report(call, started))
        tasks = {reader, acknowledger, reporter}
        watcher = None
        if self.relay is not None:
            watcher = asyncio.ensure_future(self._watch_relay(self.relay, call, started))
            tasks.add(watcher)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in (acknowledger, reader, reporter, watcher):  # whichever stopped first says why
                if task is None:
                    continue
                if task.done():
                    task.result()
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc, f"subscription to {self.peer.name}") from None
        except asyncio.InvalidStateError:
            # The stream ended (peer gone, link cut) while a batch was applied
            # with content from elsewhere: grpc refuses the acknowledgement with
            # this, not an AioRpcError. The cursor is saved; resume from it.
            raise indefinite(f"subscription to {self.peer.name}: the stream ended "
                             "during a batch") from None
        finally:
            pending = [reader, acknowledger, reporter, *([watcher] if watcher else []),
                       *(t for _, tasks, _ in _drain(applying) for t in tasks)]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            call.cancel()
            self.connected = False     # first: a relay asking from now on does not wait
            self.lean = False          # a sibling's vouching moves no cursor between sessions
            self._delivered(None)
            self._persist()

    def _lean_wanted(self) -> bool:
        return self.relay is not None and self.relay.up() and not self._distrust

    async def _watch_relay(self, relay: Relay, call: grpc.aio.StreamStreamCall,
                           started: asyncio.Event) -> None:
        """Switch this stream to whole when it reads lean and the relay is down
        or stalls, and back to lean when the relay is up and has caught up
        (see the module docstring). On the same stream: a new one would take
        this zone off the peer's list of zones at the head of its log for a
        moment, and the peer gives a blob's bytes to one of those."""
        await started.wait()
        loop = asyncio.get_running_loop()
        switched = loop.time()
        mark, since = -1, switched
        while True:
            await asyncio.sleep(RELAY_CHECK_S)
            now = loop.time()
            mine = self.cursor()
            if not self.lean:
                vouched = self.vouched
                if (relay.up() and now - switched >= RELAY_RETURN_S and vouched is not None
                        and vouched.node_id == mine.node_id and vouched.seq >= mine.seq):
                    self._distrust = False
                    log.info("relay_resumed", peer=self.peer.name, zone=relay.zone,
                             cursor=mine.seq)
                    await self._switch(call, lean=True, cursor=mine)
                    self._take_vouched()
                    switched, mark, since = now, -1, now
                continue
            stalled = False
            if mine.seq >= self.peer_last_seq or mine.seq > mark:
                mark, since = mine.seq, now     # caught up, or moving: not stalled
            elif now - since >= RELAY_STALL_S:
                stalled = self._distrust = True
            if relay.up() and not stalled:
                continue
            self.fallbacks += 1
            log.info("relay_stalled" if stalled else "relay_down", peer=self.peer.name,
                     zone=relay.zone, cursor=mine.seq, head=self.peer_last_seq)
            await self._switch(call, lean=False, cursor=mine)
            switched = now

    async def _switch(self, call: grpc.aio.StreamStreamCall, *, lean: bool,
                      cursor: Cursor) -> None:
        """Ask the peer to send lean or whole from now on (whole: from after
        ``cursor``). Batches already under way still say how they were read
        (``EventBatch.lean``), so the cursor moves only with whole ones."""
        self.lean = lean
        async with self._writing:
            await call.write(pb.SubscribeMessage(mode=pb.SubscribeMode(lean=lean,
                                                                       cursor=cursor.seq)))

    async def _read(self, call: grpc.aio.StreamStreamCall,
                    applying: asyncio.Queue[_Applying],
                    started: asyncio.Event) -> None:
        cursor = self.cursor()
        start = self.peer.start_message(cursor.node_id, cursor.seq)
        start.start.resyncs = self.resync is not None
        start.start.lean = self.lean
        async with self._writing:
            await call.write(start)
        started.set()
        first = True
        async for batch in call:
            # A batch refused by its seal ends the session (the call is cancelled):
            # it restarts from the cursor, as after a broken stream.
            batch = self.peer.intact(batch, "an event batch")
            self.batches_received += 1
            self._sender_id = batch.sender.node_id
            if first:
                first = False
                self.connected = True
                self.last_error = ""
                log.info("subscribed", peer=self.peer.name, cursor=cursor.seq,
                         reset=batch.cursor_reset, lean=self.lean)
                if self.on_connect is not None:
                    asyncio.ensure_future(self.on_connect(self.peer))
                if self.lean:
                    self._take_vouched()   # the incarnation read is known now
            if batch.sender.node_id != self._head_of:
                # Another incarnation (the peer rebuilt): its log is not the old
                # one's, and the old head would make this stream look behind.
                self._head_of = batch.sender.node_id
                self.peer_last_seq = batch.last_seq
            else:
                self.peer_last_seq = max(batch.last_seq, self.peer_last_seq)
            if self.manifest_held is not None:
                for message in batch.events:
                    if message.kind == _MANIFEST_PUT:
                        self.manifest_held(self.peer.name, message.repository, message.digest)
            if batch.cursor_truncated:
                await applying.join()     # nothing before it is still being applied
                await self._resync(batch)
                self._delivered(batch.last_seq)
                # Not through the acknowledger: the resync brought registers, not
                # the blobs of the events it skipped, so it acknowledges nothing
                # for zone quorum (and the peer counts no later ack for them).
                self._advance(Cursor(batch.sender.node_id, batch.last_seq))
                self._persist()
                continue
            tasks: list[asyncio.Task] = []
            if any(m.kind not in _BLOB_WIRE_KINDS for m in batch.events):
                await applying.join()  # every blob before these events is here
                await self._apply(batch.events)
            elif batch.events:
                sources = self._sources()
                tasks = [asyncio.ensure_future(self._apply_one(event_from_wire(m), sources,
                                                               m.blob_body or None,
                                                               _wan_receiver(m)))
                         for m in batch.events]
            # The tasks above run their first step (which registers a transfer
            # or a store of sent bytes) before any relayed event woken here.
            self._delivered(batch.last_seq)
            # Lean: the batch left events out, so it moves no cursor (``vouch`` does).
            cursor = None if batch.lean else Cursor(batch.sender.node_id, batch.last_seq)
            relayed = list(batch.relayed)
            # Not kept while waiting for the next batch: an idle stream would
            # otherwise hold its last batch, inline blob bytes and all.
            del batch
            await applying.put((cursor, tasks, relayed))

    async def _resync(self, batch: pb.EventBatch) -> None:
        """The peer's log no longer holds what this node has not read: repair
        from its state instead (a ``ReplicationError`` ends the session, and the
        cursor stays where it was)."""
        if self.resync is None:
            raise permanent(f"{self.peer.name} truncated its log below this node's cursor "
                            f"{self.cursor().seq} (floor {batch.log_floor}) and nothing here "
                            "can resynchronise")
        log.info("resync_started", peer=self.peer.name, cursor=self.cursor().seq,
                 log_floor=batch.log_floor, head=batch.last_seq)
        await self.resync(self.peer)
        self.resyncs += 1
        log.info("resync_done", peer=self.peer.name, head=batch.last_seq)

    async def _report(self, call: grpc.aio.StreamStreamCall, started: asyncio.Event) -> None:
        """Tell the peer each cursor persisted here, once it is fsynced (and the
        start is written: the first message of a stream must be the start)."""
        await started.wait()
        while True:
            await self._report_due.wait()
            self._report_due.clear()
            cursor = self._persisted
            if cursor is None or cursor.node_id != self._sender_id:
                continue       # of another incarnation of the peer: not of this log
            await self.meta.synced()
            async with self._writing:
                await call.write(pb.SubscribeMessage(
                    cursor=pb.SubscribeCursor(persisted=cursor.seq)))

    async def _acknowledge(self, call: grpc.aio.StreamStreamCall,
                           applying: asyncio.Queue[_Applying]) -> None:
        while True:
            cursor, tasks, relayed = await applying.get()
            try:
                if tasks:
                    await self._settle(tasks)
                if cursor is None:
                    continue          # a lean batch: nothing to advance or acknowledge
                current = self.cursor()
                if (self.relay is None or cursor.node_id != current.node_id
                        or cursor.seq >= current.seq):
                    # (A whole batch under way when this went lean may end
                    # below what a sibling vouched for since: not backwards.)
                    self._advance(cursor)
                if relayed and self.on_relayed is not None:
                    self.on_relayed(relayed)   # applied through last_seq: vouched for here
                self.metrics.queue_depth.labels(self.peer.name).set(self.lag_events)
                if self.acknowledge:
                    await self.meta.synced()  # an acknowledgement promises durable here
                    async with self._writing:
                        await call.write(pb.SubscribeMessage(
                            ack=pb.SubscribeAck(applied=cursor.seq)))
            finally:
                applying.task_done()

    async def _apply(self, wire_events: Sequence[pb.Event]) -> None:
        """Apply in order; runs of blob events go concurrently."""
        sources = self._sources()
        pending: list[asyncio.Task] = []
        for message in wire_events:
            event = event_from_wire(message)
            if event.kind in BLOB_KINDS:
                pending.append(asyncio.ensure_future(
                    self._apply_one(event, sources, message.blob_body or None,
                                    _wan_receiver(message))))
                continue
            if pending:
                await self._settle(pending)
                pending = []
            await self._apply_one(event, sources, message.manifest_body or None)
        if pending:
            await self._settle(pending)

    async def _settle(self, tasks: list[asyncio.Task]) -> None:
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _apply_one(self, event: Event, sources: Sequence[PeerClient],
                         body: bytes | None = None, wan_receiver: str | None = None) -> None:
        peer = self.peer.peer
        if (self.origins is not None and event.kind in CONTENT_KINDS
                and (event.origin_region, event.origin_zone) != (peer.region, peer.zone)):
            self.origin_waits += 1               # a relay: let the origin's own copy land first
            try:
                await self.origins.delivered(event)
            finally:
                self.origin_waits -= 1
        try:
            applied = await self.transfer.apply(event, sources, body, receiver=wan_receiver)
            if (applied is not None and applied.kind is EventKind.MANIFEST_PUT
                    and self.manifest_held is not None):
                self.manifest_held(self.node_name, applied.repository, applied.digest)
        except ReplicationError as exc:
            if exc.outcome is not Outcome.PERMANENT:
                raise
            # Retrying cannot help; keep the reason where status pages find it.
            self.replica.record_failure(event.repository, event.digest or event.tag,
                                        exc.reason, self.peer.name)
            log.warning("replication_failed", peer=self.peer.name, kind=event.kind.value,
                        repository=event.repository, digest=event.digest, error=exc.reason)


_BLOB_WIRE_KINDS = frozenset(k.value for k in BLOB_KINDS)
_MANIFEST_PUT = EventKind.MANIFEST_PUT.value
# A batch on its way through the pipeline: the cursor after it (None: a lean
# batch, which moves none), its blob tasks, the cursors it relays.
_Applying = tuple[Cursor | None, list[asyncio.Task], list[pb.RelayedCursor]]


def _wan_receiver(message: pb.Event) -> str | None:
    """The zone the sender named to receive the blob for this region, "" for
    none, None if it named nothing (``replicator.service``)."""
    return message.wan_receiver if message.HasField("wan_receiver") else None


def _drain(queue: asyncio.Queue) -> list:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
