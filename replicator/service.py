"""The replication gRPC service a node offers its peers: its log, its content
by digest, its state for anti-entropy, per-image status and health.

Residency is enforced here, at the sender: an event or a piece of content
whose origin region may not reach the requester's region is never sent.
Registry configuration events are the exception: configuration is
registry-wide, and every node, a confined region's included, needs it.
Handlers are thin; what they read comes from ``registry_node``.

Who asks is what residency turns on. On a mutual-TLS server
(``certified_peers``: an auth cluster) the requester's region and zone are
those of the client certificate the handshake verified
(``replicator.peer_identity``), for residency, zone quorum acknowledgements
and metrics alike; a request that claims another region or zone is refused
(PERMISSION_DENIED) and logged, so a process holding one node's certificate
cannot pass for a node of another region. Without mutual TLS the request's
claim is all there is, as before.

Events are relayed: a node's log holds what it applied from others too, so
content reaches every replica as long as the replica graph is connected. A
subscriber normally has a relayed event already, from its origin; so a batch
of relayed events alone waits up to ``RELAY_GATHER_S`` for more to gather (an
event that originated here ends the wait: those go out at once, relays
before them in log order). An image's events then reach each subscriber
from each relaying node in about one message instead of one per event — per
message, gRPC and the subscriber's apply cost more than the events do.

A small blob that originated here goes out with its event (``blob_body``)
while the subscriber is at the head of the log: a destination then stores it
on arrival instead of asking for it, which saves two one-way trips of the WAN
per image — the difference between ~3 and ~1 modelled latencies of lag. Only
own events carry bytes (a relay would send every blob once per relaying node),
at most ``INLINE_BLOB_BATCH_MAX`` per batch, and never to a subscriber
catching up (behind the head), which fetches as before and so keeps memory
bounded by the fetch concurrency.

One WAN copy per region (``one_wan_copy_per_region``, the default): of a
zone-redundant remote region (the plan's ``remote_zones``) only the zone
``topology.wan_receiver`` names for the blob gets its bytes — the first zone,
in the digest's rotation of the region's zones, whose stream from this node
is at the head of the log, so a zone that is down, cut off from here or
catching up (it gets no bytes, and its siblings would wait on a zone that
has not reached the blob yet) passes its turn to the next. The choice
travels with the event to every zone of that region (``Event.wan_receiver``,
"" when no zone is at the head): its siblings ask that zone for the blob
over their region's links and wait for it there (``replicator.transfer``);
with no zone named, each zone fetches its own copy at once. The decision is
this node's, made once, so the zones never guess differently from it. Each
blob then crosses the WAN once per region; the layers of an image go to
different zones, so each WAN stream carries a third of the bytes. Zones of
this node's own region and single-node regions get bytes as before.

One WAN copy of each event per region (``one_wan_event_copy_per_region``,
the default; ``replicator.intake``): a subscriber may ask for the log lean
(``SubscribeStart.lean``: a zone that takes this node's events from a sibling
zone); it then gets, of the events, only the blob events that originated
here, each naming the zone this node gives the blob to for the region (and
with its bytes if that is the subscriber), and every batch's ``last_seq``:
a few hundred bytes per blob, so that every zone waits on the zone this node
chose, not on one it guesses; manifests, tags and the rest come once. To a sibling
zone of this node's own zone-redundant region, every batch says how far this
node had applied each peer's log when its own log reached the batch's
``last_seq`` (``EventBatch.relayed``), and a batch with no events goes out
when only that moved; events from a remote node this zone reads whole for the
region (``topology.event_receiver``) go to the siblings at once, not after
``RELAY_GATHER_S``: they have them from nowhere else.

``FetchBlob`` may be asked to wait (``wait_ms``, capped at
``MAX_FETCH_WAIT_MS``) for a blob this node is about to have — a sibling zone
receiving it across the WAN, a zone of the origin region still receiving it.
It streams once the blob is stored here (verified, committed) and linked, or,
sooner, from memory (``transfer.HeldBlobs``) once its bytes came with its
event or, on the region's receiving zone, as they arrive across the WAN, if
they came for the same repository: residency is then checked against that
event's origin, as it would be against the stored link's. A held transfer
that breaks off ends the stream UNAVAILABLE (the requester resumes from what
it has, elsewhere). Past the wait it answers NOT_FOUND and the requester asks
its next source.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import grpc
import structlog

from registry_node import fingerprints, keys
from registry_node.crypto import BlobCorrupt
from registry_node.errors import RegistryError
from registry_node.records import CONFIG_KINDS, EventKind
from registry_node.reference import Digest, validate_name
from registry_node.replica import Replica

from .convert import event_to_wire, node_ref, register_to_wire
from .feed import LogFeed
from .intake import RelayedCursors
from .metrics import ReplicationMetrics
from .peer_identity import certified_location, certified_name
from .quorum import ZoneQuorum
from .residency import ResidencyPolicy
from .retention import LogRetention
from .topology import event_receiver, wan_receiver
from .transfer import HeldBlob, HeldBlobs, HeldBroken
from .wire.v1 import replication_pb2 as pb
from .wire.v1 import replication_pb2_grpc as pbg

log = structlog.get_logger("georeg.replication")

BATCH_LIMIT = 256
INLINE_MANIFEST_MAX = 64 * 1024
INLINE_BLOB_MAX = 2 * 1024 * 1024        # a blob this size or smaller may go with its event
INLINE_BLOB_BATCH_MAX = 4 * 1024 * 1024  # blob bytes per batch, at most
# Inline blobs read lately, kept for the other subscribers (see _blob_bytes):
# at 0.5 images/s per origin, each 1 MiB layer was read and decrypted once per
# subscriber, nine times, a third of an origin node's busy time.
INLINE_CACHE_BYTES = 8 * 1024 * 1024
INLINE_CACHE_S = 5.0     # and for this long at most: an idle node holds none of it
IDLE_WAIT_S = 5.0
# The longest a FetchBlob waits for a blob that has not landed yet (wait_ms).
MAX_FETCH_WAIT_MS = 10_000
YIELD_EVERY = 1000        # repositories summarised between two turns of the event loop
# GetImageStatuses: images per call at most, and looked up between two turns of the loop.
MAX_STATUS_BATCH = 1000
STATUS_YIELD_EVERY = 250
# How long relayed events wait for more to go out with them (see the docstring).
RELAY_GATHER_S = 0.2
LOCAL_ONLY = frozenset({EventKind.BLOB_RECLAIMED})
# How long a change of the relayed cursors alone waits for more before going
# out to the siblings (a batch with events carries them at once).
RELAYED_GATHER_S = 0.02
# Events whose blob one zone of a zone-redundant remote region receives across
# the WAN for its siblings (``wan_receiver`` on the wire).
WAN_RECEIVED = frozenset({EventKind.BLOB_PUT, EventKind.BLOB_MOUNT})


def _label(ref: pb.NodeRef) -> str:
    return f"{ref.region}/{ref.zone}" if ref.zone else ref.region


@dataclass(slots=True)
class _Stream:
    """One subscriber's stream of the log: whose reading it reports (``reader``:
    a node name; ``node_id``: its incarnation) and the highest sequence this
    node has accounted for on it (``sent``), which caps what it may report."""

    reader: str
    node_id: str
    sent: int = 0
    # How it reads (SubscribeMode): lean or whole, and where a switch to whole
    # re-reads from; ``switched`` wakes the stream's loop when idle.
    lean: bool = False
    rewind: int | None = None
    switched: asyncio.Event | None = None
    # Events up to here went out once already (lean, before a switch to whole):
    # sent again, they go without bytes (any this subscriber gets, it got).
    resent: int = 0
    # The subscriber understands ATTRIBUTES_SET (``SubscribeStart.attributes``);
    # an older one is not sent them (it would fail on the kind, for good).
    attributes: bool = True


class ReplicationService(pbg.ReplicationServicer):
    def __init__(self, replica: Replica, feed: LogFeed, residency: ResidencyPolicy,
                 quorum: ZoneQuorum | None, metrics: ReplicationMetrics,
                 chunk_size: int = 1 << 20, *, one_wan_copy_per_region: bool = True,
                 remote_zones: Callable[[], Mapping[str, tuple[str, ...]]] = dict,
                 held: HeldBlobs | None = None,
                 certified_peers: bool = False, retention: LogRetention | None = None,
                 one_wan_event_copy_per_region: bool = False,
                 region_zones: tuple[str, ...] = (),
                 relayed: RelayedCursors | None = None) -> None:
        self.replica = replica
        # This node's zone-redundant region's zones (empty otherwise) and the
        # cursors it tells them of (replicator.intake).
        self.one_wan_event_copy_per_region = one_wan_event_copy_per_region
        self.region_zones = tuple(sorted(region_zones))
        self.relayed = relayed
        self.retention = retention
        self.certified_peers = certified_peers
        self.one_wan_copy_per_region = one_wan_copy_per_region
        self.remote_zones = remote_zones       # the plan's, as the node's view holds it now
        self.held = held
        self._streams: Counter[tuple[str, str]] = Counter()   # live Subscribe calls, by (region, zone)
        self._at_head: Counter[tuple[str, str]] = Counter()   # those at the head of the log
        self.registry = replica.registry
        self.identity = replica.registry.identity
        self.feed = feed
        self.residency = residency
        self.quorum = quorum
        self.metrics = metrics
        self.chunk_size = chunk_size
        self._reading: dict[str, asyncio.Future[bytes | None]] = {}
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._recent_bytes = 0

    async def _requester(self, claimed: pb.NodeRef,
                         context: grpc.aio.ServicerContext | None) -> pb.NodeRef:
        """Who asks: on a mutual-TLS server the certificate's region and zone
        (a claim that disagrees ends the call: PERMISSION_DENIED); otherwise
        the claim, as it is for a call from this node itself (no context: no transport)."""
        if not self.certified_peers or context is None:
            return claimed
        try:
            region, zone = certified_location(context.auth_context())
        except ValueError as exc:
            # The handshake requires a certificate from the CA; one that names
            # no region is no node's.
            log.warning("peer_refused", peer=context.peer(), claimed=_label(claimed),
                        reason=str(exc))
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"the peer certificate does not name a node: {exc}")
        if (claimed.region or claimed.zone) and (claimed.region, claimed.zone) != (region, zone):
            certified = _label(pb.NodeRef(region=region, zone=zone))
            log.warning("peer_claim_refused", peer=context.peer(), claimed=_label(claimed),
                        certified=certified)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"the request claims {_label(claimed)} but the peer's "
                                f"certificate is for {certified}")
        return pb.NodeRef(region=region, zone=zone, node_id=claimed.node_id)

    def _allowed(self, origin_region: str, repository: str, requester: pb.NodeRef) -> bool:
        return self.residency.allows(origin_region, repository, requester.region)

    # -- the log ---------------------------------------------------------------

    async def Subscribe(self, request_iterator: AsyncIterator[pb.SubscribeMessage],
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.EventBatch]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("message") != "start":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be start")
        start = first.start
        subscriber = await self._requester(start.subscriber, context)
        label = _label(subscriber)
        me = node_ref(self.identity)
        cursor = start.cursor
        reset = (start.expected_node_id != self.identity.node_id and bool(start.expected_node_id)) \
            or cursor > self.feed.last_seq
        if reset:
            cursor = 0
        meta = self.replica.meta
        if cursor < meta.log_floor and not start.resyncs:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE,
                                f"events after {cursor} are truncated from this log (floor "
                                f"{meta.log_floor}); upgrade the subscriber to resynchronise")
        stream = _Stream(self._reader_name(start, label, context), subscriber.node_id)
        stream.lean = start.lean
        stream.attributes = start.attributes
        stream.switched = asyncio.Event()
        sibling = self._relays_to(subscriber)
        told: dict[str, tuple[str, int]] = {}     # relayed cursors sent on this stream
        acks = asyncio.create_task(self._read_acks(request_iterator, label, stream))
        where = (subscriber.region, subscriber.zone)
        self._streams[where] += 1
        at_head = False       # this call's last batch reached the head of the log
        if self.quorum is not None:
            self.quorum.connected(label)
        if self.retention is not None:
            self.retention.connected(stream.reader, stream.node_id)
        log.info("subscriber_connected", subscriber=label, cursor=cursor, reset=reset,
                 log_floor=meta.log_floor)
        try:
            if reset or cursor == self.feed.last_seq:
                # Tell the subscriber who we are (and to reset) before any event exists.
                yield pb.EventBatch(sender=me, last_seq=cursor, cursor_reset=reset)
            while True:
                if stream.rewind is not None:
                    stream.resent = max(stream.resent, cursor)
                    cursor, stream.rewind = min(cursor, stream.rewind), None
                if cursor < meta.log_floor:
                    # What it has not read is gone: it repairs by anti-entropy,
                    # then reads on from here (the head as this is sent).
                    cursor = meta.last_seq
                    log.info("subscriber_behind_floor", subscriber=label,
                             log_floor=meta.log_floor, head=cursor)
                    if self.quorum is not None:
                        # The resync brings registers, not the blobs of these
                        # events: no acknowledgement of it counts for them.
                        self.quorum.truncated(label, cursor)
                    yield pb.EventBatch(sender=me, last_seq=cursor, cursor_truncated=True,
                                        log_floor=meta.log_floor)
                    stream.sent = cursor
                    continue
                events = meta.read_log(cursor, BATCH_LIMIT)
                if not events:
                    if acks.done():
                        return
                    at_head = self._stream_at_head(where, at_head, True)
                    if sibling:
                        relayed = self._relayed(cursor, told)
                        if relayed:
                            yield pb.EventBatch(sender=me, last_seq=cursor, relayed=relayed)
                            continue
                        await self._idle(cursor, stream.switched)
                    else:
                        await self._idle(cursor, stream.switched, relayed=False)
                    continue
                if not any(self._own(e) or (sibling and self._takes_for_region(e))
                           for e in events):
                    events += await self._gather_relays(events[-1].seq, BATCH_LIMIT - len(events))
                cursor = events[-1].seq
                at_head = self._stream_at_head(where, at_head, len(events) < BATCH_LIMIT)
                # A batch short of the limit reached the head of the log when read.
                # Built in the yield, not bound to a name: the batch (inline blob
                # bytes included) must not outlive its sending, or an idle
                # stream would hold its last one until the next event.
                lean = stream.lean
                yield pb.EventBatch(sender=me, last_seq=cursor, events=await self._wire_batch(
                    events, subscriber, at_head=at_head, lean=lean, resent=stream.resent,
                    attributes=stream.attributes),
                    relayed=self._relayed(cursor, told) if sibling else (), lean=lean)
                stream.sent = cursor
        finally:
            acks.cancel()
            self._stream_at_head(where, at_head, False)
            self._streams[where] -= 1
            if self._streams[where] <= 0:
                del self._streams[where]
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await acks
            if self.quorum is not None:
                self.quorum.disconnected(label)
            if self.retention is not None:
                self.retention.disconnected(stream.reader)
            log.info("subscriber_gone", subscriber=label)

    def _stream_at_head(self, stream: tuple[str, str], was: bool, now: bool) -> bool:
        """Count a Subscribe call of ``stream`` at the head of the log, or no
        longer; returns ``now``."""
        if now and not was:
            self._at_head[stream] += 1
        elif was and not now:
            self._at_head[stream] -= 1
            if self._at_head[stream] <= 0:
                del self._at_head[stream]
        return now

    def _relays_to(self, subscriber: pb.NodeRef) -> bool:
        """Whether ``subscriber`` is another zone of this node's zone-redundant
        region, which may take remote peers' events from this log."""
        return (self.one_wan_event_copy_per_region and self.relayed is not None
                and subscriber.region == self.identity.region
                and subscriber.zone != self.identity.zone and subscriber.zone in self.region_zones)

    def _takes_for_region(self, event) -> bool:
        """Whether ``event`` came from a remote node whose log this zone reads
        whole for its region: its siblings wait for it from here."""
        if event.origin_region == self.identity.region:
            return False
        remote = self.remote_zones().get(event.origin_region, ())
        return event_receiver(self.region_zones, event.origin_region, event.origin_zone,
                              remote) == self.identity.zone

    def _relayed(self, seq: int, told: dict[str, tuple[str, int]]) -> list[pb.RelayedCursor]:
        """The relayed cursors as of this log's ``seq`` not yet sent on the
        stream whose record ``told`` is (and now recorded as sent)."""
        out = []
        for peer, cursor in self.relayed.at(seq).items():
            if told.get(peer) != (cursor.node_id, cursor.seq):
                told[peer] = (cursor.node_id, cursor.seq)
                out.append(pb.RelayedCursor(peer=peer, node_id=cursor.node_id, seq=cursor.seq))
        return out

    async def _idle(self, cursor: int, switched: asyncio.Event, relayed: bool = True) -> None:
        """Wait for an event after ``cursor``, the subscriber switching how it
        reads, or (``relayed``) a relayed cursor that moved (then a little
        longer, for more to move with it)."""
        switched.clear()
        waits = [asyncio.ensure_future(self.feed.wait_beyond(cursor, IDLE_WAIT_S)),
                 asyncio.ensure_future(switched.wait())]
        if relayed:
            waits.append(self.relayed.next_change())
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        if relayed and waits[2] in done and self.feed.last_seq <= cursor:
            await asyncio.sleep(RELAYED_GATHER_S)

    def _own(self, event) -> bool:
        return (event.origin_region, event.origin_zone) == (self.identity.region,
                                                            self.identity.zone)

    async def _gather_relays(self, after: int, room: int) -> list:
        """Events logged after ``after`` within ``RELAY_GATHER_S``, to go out with
        relayed events already read: until an event that originated here
        arrives (it goes out at once), the window ends, or ``room`` is full."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RELAY_GATHER_S
        more: list = []
        while room > len(more) and (remaining := deadline - loop.time()) > 0:
            if not await self.feed.wait_beyond(after, remaining):
                break
            fresh = self.replica.meta.read_log(after, room - len(more))
            if not fresh:
                break
            more += fresh
            after = fresh[-1].seq
            if any(self._own(e) for e in fresh):
                break
        return more

    async def _wire_batch(self, events: list, subscriber: pb.NodeRef, at_head: bool,
                          lean: bool = False, resent: int = 0,
                          attributes: bool = True) -> list[pb.Event]:
        """The events ``subscriber`` may see, as sent: small own blobs with their
        bytes while it is at the head of the log; to a lean subscriber only
        the blob events this node gives it for its region (see the module
        docstring); ATTRIBUTES_SET only to a subscriber that says it
        understands it (``attributes``)."""
        out = []
        budget = INLINE_BLOB_BATCH_MAX if at_head else 0
        for event in events:
            if event.kind in LOCAL_ONLY:
                continue
            if event.kind is EventKind.ATTRIBUTES_SET and not attributes:
                continue
            # Configuration is registry-wide: every node gets it, confined regions included.
            if event.kind not in CONFIG_KINDS and not self._allowed(
                    event.origin_region, event.repository, subscriber):
                continue
            message = self._wire(event)
            receives = True
            if event.kind in WAN_RECEIVED and self._own(event):
                receiver = self._wan_receiver(subscriber, event.digest)
                if receiver is not None:
                    message.wan_receiver = receiver
                    receives = receiver == subscriber.zone
            elif lean:
                continue
            if (event.kind is EventKind.BLOB_PUT and 0 < event.size <= min(budget, INLINE_BLOB_MAX)
                    and self._own(event) and receives and event.seq > resent):
                body = await self._blob_bytes(event.digest, event.size)
                if body is not None:
                    message.blob_body = body
                    budget -= len(body)
                    self.metrics.bytes_sent(_label(subscriber), len(body))
            out.append(message)
        return out

    def streaming_to(self, region: str, zone: str = "") -> bool:
        """Whether a node of ``region``/``zone`` is subscribed to this log now."""
        return self._streams[(region, zone)] > 0

    def streaming_at_head(self, region: str, zone: str = "") -> bool:
        """Whether a node of ``region``/``zone`` is subscribed to this log now
        and its stream has reached the head (it is not catching up)."""
        return self._at_head[(region, zone)] > 0

    def _wan_receiver(self, subscriber: pb.NodeRef, digest: str) -> str | None:
        """The zone of ``subscriber``'s region that gets the blob across the
        WAN, if that region is a zone-redundant remote one (else None: every
        node of it gets its own copy, as within this region): the digest's
        pick among its zones whose streams are at the head of this log, ""
        if none is (see the module docstring)."""
        if subscriber.region == self.identity.region or not self.one_wan_copy_per_region:
            return None
        zones = self.remote_zones().get(subscriber.region)
        if not zones or subscriber.zone not in zones:
            return None

        def at_head(zone: str) -> bool:
            return self.streaming_at_head(subscriber.region, zone)
        if not any(at_head(zone) for zone in zones):
            return ""
        return wan_receiver(zones, digest, at_head)

    async def _blob_bytes(self, digest: str, size: int) -> bytes | None:
        """The blob's bytes, or None if it is gone or unreadable here (the
        subscriber then fetches it as usual, from wherever it is). Every
        subscriber at the head wants the same blob within milliseconds: one
        read serves them all, and the last ``INLINE_CACHE_BYTES`` read stay in
        memory, for ``INLINE_CACHE_S``, for the subscribers a little later."""
        body = self._recent.get(digest)
        if body is not None:
            self._recent.move_to_end(digest)
            return body if len(body) == size else None
        reading = self._reading.get(digest)
        if reading is None:
            reading = asyncio.ensure_future(self._read_blob(digest, size))
            self._reading[digest] = reading
            reading.add_done_callback(lambda _: self._reading.pop(digest, None))
        body = await asyncio.shield(reading)
        if body is None or len(body) != size:
            return None
        if digest not in self._recent:
            self._recent[digest] = body
            self._recent_bytes += len(body)
            while self._recent_bytes > INLINE_CACHE_BYTES:
                self._forget(next(iter(self._recent)))
            asyncio.get_running_loop().call_later(INLINE_CACHE_S, self._forget, digest, body)
        return body

    def _forget(self, digest: str, body: bytes | None = None) -> None:
        """Drop a remembered blob (only ``body``, if given: not a newer copy)."""
        held = self._recent.get(digest)
        if held is not None and (body is None or held is body):
            del self._recent[digest]
            self._recent_bytes -= len(held)

    async def _read_blob(self, digest: str, size: int) -> bytes | None:
        """None if the blob is gone, rotten (handed to ``blob_repair``, which
        mends it here) or the disk failed the read (EIO): never an exception,
        which would end the stream it is read for."""
        try:
            blob = self.replica.blobs.open(digest)
        except BlobCorrupt as exc:
            self.registry.repair.found(digest, str(exc))
            return None
        except OSError:             # FileNotFoundError, or the disk's EIO
            return None
        try:
            if blob.size != size:
                return None
            return await self.registry.run_blocking(lambda: blob.read(0, size))
        except BlobCorrupt as exc:
            self.registry.repair.found(digest, str(exc))
            return None
        except OSError:
            return None
        finally:
            blob.close()

    def _wire(self, event) -> pb.Event:
        message = event_to_wire(event)
        if event.kind is EventKind.MANIFEST_PUT and event.size <= INLINE_MANIFEST_MAX:
            found = self.replica.manifest_body(event.repository, event.digest)
            if found is not None:  # still here: send it along, saving a round trip
                message.manifest_body = found[1]
        return message

    def _reader_name(self, start: pb.SubscribeStart, label: str,
                     context: grpc.aio.ServicerContext | None) -> str:
        """Whose record of reading this log the stream feeds (``replicator.retention``):
        the certified node name on a mutual-TLS server, else the name the start
        claims; a subscriber too old to send one is known by its label."""
        if self.certified_peers and context is not None:
            return certified_name(context.auth_context()) or label
        return start.name or label

    async def _read_acks(self, request_iterator: AsyncIterator[pb.SubscribeMessage], label: str,
                         stream: _Stream) -> None:
        async for message in request_iterator:
            kind = message.WhichOneof("message")
            if kind == "ack" and self.quorum is not None:
                self.quorum.acked(label, message.ack.applied)
            elif kind == "mode":
                stream.lean = message.mode.lean
                if not stream.lean:
                    stream.rewind = message.mode.cursor
                if stream.switched is not None:
                    stream.switched.set()
            elif kind == "cursor" and self.retention is not None:
                # Never more than this stream sent: a report beyond it (a bug, a
                # stale session's cursor, a forgery) must not let the log or a
                # tombstone go that the subscriber has not read.
                self.retention.reported(stream.reader, stream.node_id,
                                        min(message.cursor.persisted, stream.sent))

    # -- content ---------------------------------------------------------------

    def _content_regions(self, repository: str, digest: str) -> set[str]:
        """Regions whose pushes put ``digest`` in ``repository`` (for residency)."""
        return self.replica.content_regions(repository, digest)

    def _held_for(self, repo: str, digest: str) -> HeldBlob | None:
        held = self.held.get(digest) if self.held is not None else None
        if held is None or held.failed or held.repository != repo:
            return None   # a broken transfer's bytes: wait for the blob, stored
        return held

    async def _landed(self, repo: str, digest: str,
                      wait_ms: int) -> tuple[set[str], HeldBlob | None]:
        """The regions ``digest`` came from, once it is stored here and linked
        in ``repo``; or its bytes, once they came here with an event for
        ``repo`` (held while they are stored); or what there is after
        ``wait_ms`` (capped), whichever comes first. A blob lands with a log
        event (its link), so the feed is the signal, and ``HeldBlobs`` says
        when bytes arrive. Held bytes that are no use here (another
        repository's) are not waited on again: only a new hold wakes this
        (``HeldBlobs.arrival``), and a failed hold is gone at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(wait_ms, MAX_FETCH_WAIT_MS) / 1000
        while True:
            regions = self._content_regions(repo, digest)
            if regions and self.replica.has_blob(digest):
                return regions, None
            held = self._held_for(repo, digest)
            remaining = deadline - loop.time()
            if held is not None or remaining <= 0:
                return regions, held
            waits = [asyncio.ensure_future(self.feed.wait_beyond(self.feed.last_seq, remaining))]
            if self.held is not None:
                waits.append(asyncio.ensure_future(self.held.arrival(digest)))
            try:
                await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
                await asyncio.gather(*waits, return_exceptions=True)

    async def _send_held(self, held: HeldBlob, offset: int,
                         requester: pb.NodeRef) -> AsyncIterator[pb.BlobChunk]:
        """Stream bytes held in memory (see ``_landed``) from ``offset``, as
        they arrive while the receiving zone's own transfer runs."""
        first = True
        # Closed as soon as this stream ends, however it ends: an open reader
        # keeps the bytes charged to the tee budget (``HeldBlobs``).
        async with contextlib.aclosing(held.read(offset)) as reading:
            async for data in reading:
                for start in range(0, len(data), self.chunk_size):
                    piece = data[start:start + self.chunk_size]
                    # total_size only when known (the stream's first chunk of a whole blob).
                    yield pb.BlobChunk(offset=offset, data=piece,
                                       total_size=held.size if first and held.complete else 0)
                    self.metrics.bytes_sent(_label(requester), len(piece))
                    offset += len(piece)
                    first = False
        if first:   # nothing past offset: say so, as the stored path does
            yield pb.BlobChunk(offset=offset, data=b"", total_size=held.size)

    async def FetchBlob(self, request: pb.FetchBlobRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.BlobChunk]:
        repo, digest = request.repository, request.digest
        requester = await self._requester(request.requester, context)
        regions = self._content_regions(repo, digest)
        if request.wait_ms and not (regions and self.replica.has_blob(digest)):
            regions, held = await self._landed(repo, digest, request.wait_ms)
            if held is not None and not (regions and self.replica.has_blob(digest)):
                if not self._allowed(held.origin_region, repo, requester):
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                        f"{digest} is confined to {held.origin_region}")
                try:
                    async for chunk in self._send_held(held, request.offset, requester):
                        yield chunk
                except HeldBroken:
                    # What was sent is kept there; the requester resumes elsewhere.
                    await context.abort(grpc.StatusCode.UNAVAILABLE,
                                        f"the transfer of {digest} here broke off")
                return
        if not regions:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{digest} is not in {repo} here")
        if not any(self._allowed(r, repo, requester) for r in regions):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{digest} is confined to {sorted(regions)}")
        try:
            blob = self.replica.blobs.open(digest)
        except FileNotFoundError:
            if self.registry.repair.missing_after_rot(digest):
                # Quarantined after failing authentication, not mended yet: the
                # same answer the rotten file gave the first asker.
                await context.abort(grpc.StatusCode.DATA_LOSS,
                                    f"{digest} failed authentication here and is quarantined")
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{digest} has no file here")
        except BlobCorrupt as exc:
            self.registry.repair.found(digest, str(exc))     # mended here for the next ask
            await context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        except OSError as exc:      # the disk (EIO): another source, or later
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"reading {digest}: {exc}")
        try:
            offset = min(request.offset, blob.size)
            first = True
            run = self.registry.run_blocking
            while offset < blob.size or first:
                stop = min(blob.size, offset + self.chunk_size)
                data = await run(lambda a=offset, b=stop: blob.read(a, b))
                yield pb.BlobChunk(offset=offset, data=data,
                                   total_size=blob.size if first else 0)
                self.metrics.bytes_sent(_label(requester), len(data))
                first = False
                offset = stop
        except BlobCorrupt as exc:
            self.registry.repair.found(digest, str(exc))
            await context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        finally:
            blob.close()

    async def FetchManifest(self, request: pb.FetchManifestRequest,
                            context: grpc.aio.ServicerContext) -> pb.ManifestReply:
        requester = await self._requester(request.requester, context)
        found = self.replica.manifest_body(request.repository, request.digest)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"{request.digest} is not in {request.repository} here")
        record, body = found
        region = record.residency_region
        if not self._allowed(region, request.repository, requester):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{request.digest} is confined to {region}")
        return pb.ManifestReply(digest=request.digest, media_type=record.media_type, body=body,
                                hlc=record.hlc, origin_region=record.origin_region,
                                origin_zone=record.origin_zone,
                                origin_acked_ns=record.origin_acked_ns)

    # -- anti-entropy ------------------------------------------------------------

    def _visible_to_both(self, repository: str, requester: pb.NodeRef):
        me = self.identity.region

        def visible(origin_region: str) -> bool:
            return (self.residency.allows(origin_region, repository, requester.region)
                    and self.residency.allows(origin_region, repository, me))
        return visible

    async def Summarize(self, request: pb.SummaryRequest,
                        context: grpc.aio.ServicerContext) -> pb.Summary:
        requester = await self._requester(request.requester, context)
        # In the scheme the requester compares in; one it does not know of
        # (a newer node) gets ours, and the reply says which it got.
        scheme = request.fingerprint_scheme
        if scheme == fingerprints.SUMMED_WITHOUT_ATTRIBUTES:
            # An older georeg: its sums have no attributes in them, and these
            # have; it compares in RECOMPUTED as well, over tags and manifests.
            scheme = fingerprints.RECOMPUTED
        elif scheme not in (fingerprints.RECOMPUTED, fingerprints.SUMMED):
            scheme = fingerprints.SUMMED
        configuration = self.replica.configuration.fingerprint()
        by_bucket = scheme == fingerprints.SUMMED and not self.residency.repositories
        if request.buckets_only and by_bucket:
            # No per-repository rules: what may travel depends on the region alone.
            visible = self._visible_to_both("", requester)
            buckets = [pb.BucketSummary(bucket=b, fingerprint=fp)
                       for b in range(keys.FINGERPRINT_BUCKETS)
                       if (fp := self.replica.bucket_fingerprint(b, visible)) != fingerprints.EMPTY]
            return pb.Summary(buckets=buckets, bucket_count=keys.FINGERPRINT_BUCKETS,
                              last_seq=self.feed.last_seq, fingerprint_scheme=scheme,
                              configuration_fingerprint=configuration)
        wanted = list(request.buckets) if scheme == fingerprints.SUMMED and request.buckets else None
        summaries = []
        for n, repo in enumerate(self.replica.repositories(wanted), 1):
            fingerprint = self.replica.fingerprint(repo, self._visible_to_both(repo, requester),
                                                   scheme)
            summaries.append(pb.RepositorySummary(repository=repo, fingerprint=fingerprint))
            # Let the node serve in between: a RECOMPUTED fingerprint is a scan
            # of the repository; a SUMMED one a read, but there may be 100k.
            if scheme == fingerprints.RECOMPUTED or n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        return pb.Summary(repositories=summaries, last_seq=self.feed.last_seq,
                          configuration_fingerprint=configuration, fingerprint_scheme=scheme)

    async def GetConfiguration(self, request: pb.ConfigurationRequest,
                               context: grpc.aio.ServicerContext) -> pb.ConfigurationState:
        """Every configuration register: registry-wide, so whoever asks gets all."""
        await self._requester(request.requester, context)   # but a false claim gets nothing
        return pb.ConfigurationState(
            registers=[event_to_wire(e) for e in self.replica.configuration.register_events()])

    async def GetRepositoryState(self, request: pb.RepositoryStateRequest,
                                 context: grpc.aio.ServicerContext) -> pb.RepositoryState:
        requester = await self._requester(request.requester, context)
        visible = self._visible_to_both(request.repository, requester)
        state = self.replica.repository_state(request.repository, visible)
        return pb.RepositoryState(
            repository=request.repository,
            tags=[register_to_wire(r) for r in state["tags"]],
            manifests=[register_to_wire(r) for r in state["manifests"]],
            attributes=[event_to_wire(e) for e in
                        self.replica.attributes_state(request.repository, visible)])

    # -- status ----------------------------------------------------------------

    async def GetImageStatus(self, request: pb.ImageStatusRequest,
                             context: grpc.aio.ServicerContext) -> pb.ImageStatusReply:
        requester = await self._requester(request.requester, context)
        tag = self.replica.tag_record(request.repository, request.tag) if request.tag else None
        digest = request.digest or (tag.digest if tag else "")
        state = self.replica.image_state(request.repository, digest)
        if tag is not None and not self._allowed(tag.origin_region, request.repository,
                                                 requester):
            tag = None  # its register may not leave the region it was set in
        return pb.ImageStatusReply(
            node=node_ref(self.identity), digest=digest, present=state.present,
            tag_hlc=tag.hlc if tag else 0, tag_origin_region=tag.origin_region if tag else "",
            tag_origin_zone=tag.origin_zone if tag else "",
            tag_acked_ns=tag.origin_acked_ns if tag else 0, media_type=state.media_type,
            tag_arrived_ns=tag.arrived_ns if tag else 0,
            arrived_ns=state.arrived_ns,
            origin_acked_ns=state.origin_acked_ns, origin_region=state.origin_region,
            failure=state.failure, blobs_present=state.blobs_present,
            blobs_total=state.blobs_total)

    async def GetImageStatuses(self, request: pb.ImageStatusesRequest,
                               context: grpc.aio.ServicerContext | None) -> pb.ImageStatusesReply:
        """Many images by digest in one call (``replicator.completion``): for
        each, what ``GetImageStatus`` says of presence, arrival, origin and
        failure, without the blob counts (a manifest is only ever stored
        after its blobs, so it is all a waiter needs: one or two reads an image)."""
        await self._requester(request.requester, context)   # a false claim gets nothing
        if len(request.images) > MAX_STATUS_BATCH:
            await _refuse(context, f"at most {MAX_STATUS_BATCH} images per call, "
                                   f"not {len(request.images)}")
        replies = []
        for n, image in enumerate(request.images, 1):
            try:
                validate_name(image.repository)
                Digest.parse(image.digest)
            except RegistryError:
                await _refuse(context, f"image {n}: {image.repository[:300]!r} "
                                       f"{image.digest[:140]!r} is not a repository and a digest")
            replies.append(self._presence(image.repository, image.digest))
            if n % STATUS_YIELD_EVERY == 0:
                await asyncio.sleep(0)      # let the node serve in between
        return pb.ImageStatusesReply(node=node_ref(self.identity), images=replies)

    def _presence(self, repository: str, digest: str) -> pb.ImageStatusReply:
        record = self.replica.manifest_record(repository, digest)
        if record is None:
            failure = self.replica.failure(repository, digest)
            return pb.ImageStatusReply(digest=digest, failure=failure.reason if failure else "")
        return pb.ImageStatusReply(digest=digest, present=True, arrived_ns=record.created_ns,
                                   origin_acked_ns=record.origin_acked_ns,
                                   origin_region=record.residency_region,
                                   media_type=record.media_type)

    async def Health(self, request: pb.HealthRequest,
                     context: grpc.aio.ServicerContext) -> pb.HealthReply:
        writable = True
        if self.quorum is not None:
            writable = self.quorum.writable
        # wall_ns: the clock the node stamps arrivals with, so that a client can
        # bracket it between its own readings (``georeg bench lag``'s clock error).
        return pb.HealthReply(node=node_ref(self.identity), last_seq=self.feed.last_seq,
                              writable=writable, wall_ns=self.registry.wall_ns())


async def _refuse(context: grpc.aio.ServicerContext | None, why: str) -> None:
    """INVALID_ARGUMENT for a peer's call; ValueError for a call from this node."""
    if context is None:
        raise ValueError(why)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)
