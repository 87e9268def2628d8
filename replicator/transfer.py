"""Transfer by digest: the one algorithm that brings a change and its content to
this node, whichever path asked for it — live subscriptions, anti-entropy,
bounded-staleness reads, recovery.

Order is what every serious registry does: blobs, then child manifests, then
the manifest, then the tag; ``Replica.apply_manifest`` refuses anything else,
so an incomplete image is never visible here, not even for an instant.

* A blob already here is never transferred again; two requests for the same
  digest share one transfer.
* A blob transfer that breaks keeps what arrived (flushed to disk) and
  resumes from that offset, from the same peer or another one.
* A small blob may come with its event (``replicator.service``): it is stored
  if it hashes to its digest, else fetched like any other. While such a store
  runs, another event for the same digest waits for it instead of fetching.
* Content is asked of the peer that announced the change first, then of the
  others (propagation is transitive, so any of them may have it) — except for
  a blob from another region, whose sources follow the WAN (``blob_attempts``):

  - each zone of the origin region has its own link here, so a blob is asked
    first of the origin zone this node is fetching least from (ties rotate by
    digest): an image's layers cross the WAN side by side, not one after the
    other on one link, and no origin node serves every copy alone. That zone
    may still be receiving the blob from the zone it was pushed to (events go
    out before zone quorum confirms), so it may wait for it, boundedly
    (``FetchBlobRequest.wait_ms``);
  - with ``one_wan_copy_per_region`` (the default), in a zone-redundant
    region one zone receives each blob across the WAN: the one the origin
    names with the event (``receiver``: ``topology.wan_receiver``, by digest
    among the zones whose streams are at the head of its log, so a zone that
    is down or catching up passes its turn; ``replicator.service``). With no
    zone at the head the origin names none, and every zone fetches its own
    copy at once rather than wait on a sibling that has not reached the blob
    (a region catching up would pay ``SIBLING_WAIT_MS`` per blob). An event
    the origin named nothing on (a relay, anti-entropy) falls back to the
    same choice made here, among the siblings whose streams to this node are
    up (but a relay from a sibling zone goes to that sibling first: it logged
    the event once it held the blob). The origin sends the blob with its event to the named zone alone, and
    that zone fetches it if it did not come along. Its sibling zones ask
    it for the blob, over the region's own network, with a bounded wait for
    it to land; bytes that came with an event, and those the receiving zone
    fetches across the WAN as they arrive, are served from memory
    (``HeldBlobs``, within ``TEE_BUDGET``), so a sibling waits neither for the
    whole blob nor for the store. Each blob then crosses the WAN once per
    region, not once per zone.

  A waited-for source that does not have the blob in time (down, partitioned,
  slow, or never got the event) costs one bounded wait; then the usual sources
  follow, announcer first. Waits only ever point from a sibling to its
  region's fetching zone and from there to the origin region, whose own zones
  never wait: no cycle. Whatever the source, the bytes are verified against
  the digest before the blob is stored.
* Failures follow the taxonomy in ``errors``: retried with backoff while
  retryable, recorded (per repository and digest) when permanent.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import msgspec
import structlog

from registry_node.blobstore import UploadFile
from registry_node.records import CONFIG_KINDS, Event, EventKind
from registry_node.replica import ContentRejected, DigestMismatch, MissingContent, Replica

from .errors import ReplicationError, definite, permanent
from .metrics import ReplicationMetrics
from .peers import PeerClient
from .residency import ResidencyPolicy
from .retry import Backoff, retry
from .topology import Peer, digest_spin, wan_receiver
from .wire.v1 import replication_pb2 as pb

log = structlog.get_logger("georeg.replication")
# Replicated writes a lock here would have refused had they been made here.
LOCKABLE = frozenset({EventKind.TAG_SET, EventKind.TAG_DELETE, EventKind.MANIFEST_DELETE,
                      EventKind.BLOB_DELETE})

TRANSFER_BACKOFF = Backoff(base_s=0.05, cap_s=2.0)
# How long a source may wait for a blob it is about to have (ms): a sibling
# zone fetching it across the WAN (a round trip to the origin region and the
# bytes), a zone of the origin region receiving it from the zone it was pushed
# to (a round trip inside the region).
SIBLING_WAIT_MS = 2000
ORIGIN_ZONE_WAIT_MS = 1000
# Bytes of blobs a receiving zone is fetching across the WAN that it holds in
# memory for its siblings, at most, over all such transfers; a blob that does
# not fit is passed on once stored, as any other.
TEE_BUDGET = 256 * 1024 * 1024


CONTENT_KINDS = frozenset({EventKind.BLOB_PUT, EventKind.BLOB_MOUNT, EventKind.MANIFEST_PUT,
                           EventKind.TAG_SET})


class HeldBroken(Exception):
    """The transfer that was filling a ``HeldBlob`` failed before its end."""


class HeldBlob:
    """A blob's bytes as they reach this node, and the provenance of the event
    they came for. Whole from the start when they came with the event; growing
    while the region's receiving zone fetches them across the WAN (``append``,
    then ``finish`` or ``fail``), so a sibling reads them as they arrive.

    A growing blob never holds more than ``expected`` (the size its event
    gave): a source that sends more fails it rather than grow it past what the
    tee budget was charged. A blob that fails leaves its ``HeldBlobs`` at once:
    nobody may be sent its bytes from then on, and a sibling waiting for the
    blob waits for a new hold or the stored blob, not on this one."""

    def __init__(self, body: bytes | None, repository: str, origin_region: str) -> None:
        self.repository = repository
        self.origin_region = origin_region
        self._parts: list[bytes] = [body] if body else []
        self.size = len(body) if body is not None else 0
        self.expected = self.size    # the blob's size, where it is known before it is here
        self.complete = body is not None
        self.failed = False
        self._grew: asyncio.Future[None] | None = None
        self._holder: tuple[HeldBlobs, str] | None = None   # where it is held, under which digest
        self._readers = 0
        self._released = False
        self._on_free: Callable[[], None] | None = None

    @property
    def body(self) -> bytes:
        return b"".join(self._parts)

    def append(self, data: bytes) -> None:
        if self.failed or self.complete:
            return
        if self.expected and self.size + len(data) > self.expected:
            self.fail()     # more than the blob: not the blob, and past its budget
            return
        self._parts.append(data)
        self.size += len(data)
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self) -> None:
        self.failed = True
        self._wake()
        if self._holder is not None:
            holder, digest = self._holder
            holder.release(digest, self)

    def _wake(self) -> None:
        if self._grew is not None and not self._grew.done():
            self._grew.set_result(None)
        self._grew = None

    def _release(self) -> None:
        self._released = True
        self._free_if_unread()

    def _free_if_unread(self) -> None:
        """Once released and its last reader is done, its bytes are no one's:
        drop them, and give back what they were charged (``HeldBlobs.tee``)."""
        if self._released and not self._readers:
            self._parts = []
            on_free, self._on_free = self._on_free, None
            if on_free is not None:
                on_free()

    async def read(self, offset: int) -> AsyncIterator[bytes]:
        """The bytes from ``offset`` on, as they arrive; ``HeldBroken`` if the
        transfer filling them fails first. The blob's bytes count against the
        tee budget until the last reader is done with them, released or not."""
        self._readers += 1
        try:
            start = 0          # where self._parts[index] begins in the blob
            index = 0
            while True:
                while index < len(self._parts):
                    part = self._parts[index]
                    end = start + len(part)
                    if end > offset:
                        yield part[max(0, offset - start):]
                        offset = end
                    start = end
                    index += 1
                if self.complete:
                    return
                if self.failed:
                    raise HeldBroken()
                if self._grew is None:
                    self._grew = asyncio.get_running_loop().create_future()
                await asyncio.shield(self._grew)
        finally:
            self._readers -= 1
            self._free_if_unread()


class HeldBlobs:
    """Blob bytes held in memory while they become a stored blob here: those
    that came with their events, until they are stored (or turn out not to be
    the blob), and those the region's receiving zone fetches across the WAN,
    as they arrive, until the transfer ends (``tee``, within ``budget``). A
    sibling zone that asks for one meanwhile is served from here
    (``replicator.service``) instead of waiting for the store: the receiving
    zone passes the bytes on as soon as it has them. Nothing here is
    verified, and need not be: whoever receives bytes checks them against the
    digest, from any source.

    A tee's bytes count against the budget from the tee until the blob is
    released *and* the last sibling reading it is done: a reader keeps the
    bytes alive past the release, and new tees must not be charged as if
    they were gone."""

    def __init__(self, budget: int = TEE_BUDGET) -> None:
        self.budget = budget
        self.teeing = 0      # bytes charged to tees whose bytes may still be in memory
        self._held: dict[str, HeldBlob] = {}
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}

    def hold(self, digest: str, blob: HeldBlob) -> None:
        blob._holder = (self, digest)
        self._held[digest] = blob
        for waiter in self._waiting.pop(digest, ()):
            if not waiter.done():
                waiter.set_result(None)

    def tee(self, digest: str, repository: str, origin_region: str,
            size: int) -> HeldBlob | None:
        """Hold a growing blob of ``size`` bytes, if it fits what is left of the
        budget and no bytes of ``digest`` are held yet; None otherwise."""
        if digest in self._held or not 0 < size <= self.budget - self.teeing:
            return None
        blob = HeldBlob(None, repository, origin_region)
        blob.expected = size
        self.teeing += size

        def untee() -> None:
            self.teeing -= size
        blob._on_free = untee
        self.hold(digest, blob)
        return blob

    def release(self, digest: str, blob: HeldBlob) -> None:
        if self._held.get(digest) is blob:
            del self._held[digest]
        blob._release()

    def get(self, digest: str) -> HeldBlob | None:
        return self._held.get(digest)

    async def arrival(self, digest: str) -> None:
        """Return once bytes for ``digest`` are next held (``hold``); never at
        once: a caller that found the held bytes unusable (failed, another
        repository's) would otherwise spin on them."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(digest, []).append(waiter)
        try:
            await waiter
        finally:
            waiters = self._waiting.get(digest)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiting[digest]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One source to ask for a blob, and how long it may wait for it to land."""

    peer: PeerClient
    wait_ms: int = 0
    wan: bool = False          # a zone of the origin region, in another region


class Transfer:
    def __init__(self, replica: Replica, residency: ResidencyPolicy,
                 metrics: ReplicationMetrics, *, concurrency: int = 16,
                 backoff: Backoff = TRANSFER_BACKOFF, attempts: int = 4,
                 one_wan_copy_per_region: bool = False,
                 region_zones: tuple[str, ...] = (),
                 zone_peer: Callable[[Peer], bool] = lambda peer: False,
                 sibling_reachable: Callable[[str], bool] = lambda zone: True,
                 held: HeldBlobs | None = None,
                 rng: random.Random | None = None) -> None:
        self.replica = replica
        self.region = replica.registry.identity.region
        self.zone = replica.registry.identity.zone
        self.one_wan_copy_per_region = one_wan_copy_per_region
        # This region's zones and whether a peer is one of them, as the plan
        # decided (empty / never unless the region is zone redundant).
        self.region_zones = tuple(sorted(region_zones))
        self.zone_peer = zone_peer
        # Whether this node's stream from a sibling zone is up, by zone: a
        # sibling that is not is not waited on (``wan_receiver``).
        self.sibling_reachable = sibling_reachable
        self.held = held if held is not None else HeldBlobs()
        self.residency = residency
        self.metrics = metrics
        self.backoff = backoff
        self.attempts = attempts
        self.rng = rng or random.Random()
        self._slots = asyncio.Semaphore(concurrency)
        self._blobs: dict[str, asyncio.Future[None]] = {}
        self._manifests: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._sent: dict[str, asyncio.Future[bool]] = {}   # stores of bytes that came with events
        self._inbound: dict[str, UploadFile] = {}
        self._crossing: Counter[str] = Counter()   # blob transfers planned across the WAN, per peer

    # -- events ------------------------------------------------------------------

    async def apply(self, event: Event, sources: Sequence[PeerClient],
                    body: bytes | None = None, *,
                    receiver: str | None = None) -> Event | None:
        """Apply one replicated change here, fetching whatever content it needs
        (a manifest_put or a blob_put may bring its content's bytes along, as
        ``body``; a blob event from another region may name the zone of this
        region that receives it, as ``receiver``). Returns the event as
        logged here, or None when it changed nothing. Registry configuration
        is registry-wide: no residency applies."""
        if event.kind in CONFIG_KINDS:
            return self._apply_configuration(event)
        if not self.residency.allows(event.origin_region, event.repository, self.region):
            # The sender should never have sent it: refuse, and say so in metrics.
            self.metrics.residency_refusals.labels(event.origin_region).inc()
            log.warning("residency_refused", origin=event.origin_region,
                        repository=event.repository, digest=event.digest)
            return None
        replica = self.replica
        kind = event.kind
        # What a lock held here would have refused, had the write been made here.
        overrides = replica.registry.locks.overridden_by(
            kind, event.repository, event.tag, event.digest) if kind in LOCKABLE else None
        if kind in (EventKind.BLOB_PUT, EventKind.BLOB_MOUNT):
            await self.ensure_blob(event.repository, event.digest, sources, event.origin_region,
                                   sent=body if kind is EventKind.BLOB_PUT else None,
                                   size=event.size, receiver=receiver)
            applied = replica.apply_blob_link(event)
        elif kind is EventKind.MANIFEST_PUT:
            applied = None
            if replica.wants_manifest(event):
                applied = await self.ensure_manifest(event.repository, event.digest, sources, event,
                                                     body=body)
        elif kind is EventKind.TAG_SET:
            applied = None
            if replica.wants_tag(event):
                try:
                    applied = replica.apply_tag(event)
                except MissingContent:
                    await self.ensure_manifest(event.repository, event.digest, sources)
                    try:
                        applied = replica.apply_tag(event)
                    except MissingContent:
                        # No source had a copy newer than this node's tombstone of
                        # the manifest (the announcer deleted it since): record it,
                        # anti-entropy settles the tag; never end the subscription.
                        raise permanent(f"{event.repository}:{event.tag} needs "
                                        f"{event.digest}, which no peer can provide") from None
        elif kind is EventKind.TAG_DELETE:
            applied = replica.apply_tag_delete(event)
        elif kind is EventKind.MANIFEST_DELETE:
            applied = replica.apply_manifest_delete(event)
        elif kind is EventKind.BLOB_DELETE:
            applied = replica.apply_blob_unlink(event)
        elif kind is EventKind.ATTRIBUTES_SET:
            applied = replica.apply_attributes(event)
        else:
            return None
        if applied is not None:
            self.metrics.applied.labels(event.origin_region, kind.value).inc()
            if overrides is not None:
                self.metrics.locks_overridden.labels(event.origin_region, kind.value).inc()
                log.warning("lock_overridden", kind=kind.value, origin=event.origin_region,
                            repository=event.repository, tag=event.tag or None,
                            digest=event.digest, lock=overrides)
            self._check_stamp(event)
            if kind in CONTENT_KINDS and event.acked_ns:
                # Between two clocks: off by their offset (docs/faults.md, "Clock skew").
                self.metrics.observe_lag(event.origin_region, kind.value,
                                         (replica.registry.wall_ns() - event.acked_ns) / 1e9)
        return applied

    def _check_stamp(self, event: Event) -> None:
        """Flag a change its origin stamped further ahead of this node's clock
        than the cluster tolerates (applied all the same: it was acknowledged,
        and every replica compares the same stamps; the HLC took it in only up
        to the bound: ``registry_node.clock``)."""
        registry = self.replica.registry
        ahead_s = registry.clock.hlc_ahead_s(event.hlc)
        if ahead_s > registry.clock.max_offset_s:
            self.metrics.clock_offset_exceeded.labels(event.origin_region, "event").inc()
            log.warning("clock_offset_exceeded", origin=event.origin_region,
                        origin_zone=event.origin_zone, kind=event.kind.value,
                        repository=event.repository or None, ahead_s=round(ahead_s, 3))

    def _apply_configuration(self, event: Event) -> Event | None:
        try:
            applied = self.replica.configuration.apply(event)
        except ValueError as exc:
            # Nothing a retry or another source could mend, and no repository to
            # record it against: said in the log, the stream goes on.
            log.warning("configuration_event_refused", origin=event.origin_region, error=str(exc))
            return None
        if applied is not None:
            self.metrics.applied.labels(event.origin_region, event.kind.value).inc()
            self._check_stamp(event)
        return applied

    # -- blobs -------------------------------------------------------------------

    async def ensure_blob(self, repository: str, digest: str, sources: Sequence[PeerClient],
                          origin_region: str = "", sent: bytes | None = None,
                          size: int = 0, receiver: str | None = None) -> None:
        """Make sure the blob's bytes are here (not its link: events do that).
        ``origin_region``, where the blob was pushed, when known, lets the
        sources follow the WAN (``blob_attempts``); ``sent``, the bytes that
        came with the event, if any, are stored if they hash to ``digest``
        (otherwise the sources are asked). A blob whose file was quarantined
        for bit rot is fetched again (``registry_node.blob_repair``)."""
        if self.replica.blob_in_place(digest):
            return
        storing = self._sent.get(digest)
        if storing is None and sent is not None:
            # Stored on its own, not after a transfer a relayed event or
            # anti-entropy may have started first (three WAN trips away).
            sender = sources[0].name if sources else ""
            held = HeldBlob(sent, repository, origin_region)
            self.held.hold(digest, held)   # siblings may have it before it is stored
            storing = asyncio.ensure_future(self._store_sent(digest, sender, sent))
            self._sent[digest] = storing

            def stored(_: asyncio.Future, held: HeldBlob = held) -> None:
                self._sent.pop(digest, None)
                self.held.release(digest, held)
            storing.add_done_callback(stored)
        if storing is not None:
            # Bytes in hand (these or another event's) are being stored: wait
            # for them rather than fetch; if they were not the blob, fetch.
            try:
                if await asyncio.shield(storing):
                    return
            except ReplicationError:
                if sent is not None:
                    raise
        future = self._blobs.get(digest)
        if future is None:
            attempts = self.blob_attempts(digest, origin_region, sources, receiver)
            future = asyncio.ensure_future(self._transfer_blob(repository, digest, attempts,
                                                               origin_region, size))
            self._blobs[digest] = future
            future.add_done_callback(lambda _: self._blobs.pop(digest, None))
            crossing = attempts[0].peer.name if attempts and attempts[0].wan else None
            if crossing is not None:  # spreads the next blobs over the other origin zones
                self._crossing[crossing] += 1
                future.add_done_callback(lambda _: self._crossing.subtract((crossing,)))
        await asyncio.shield(future)

    def blob_attempts(self, digest: str, origin_region: str, sources: Sequence[PeerClient],
                      receiver: str | None = None) -> list[Attempt]:
        """Where to ask for ``digest``, in order (see the module docstring).
        ``receiver``: this region's zone the origin gives the blob to
        across the WAN, "" for none (no sibling is waited on), None when the
        origin named none (the zones choose alike)."""
        plain = [Attempt(p) for p in sources]
        if not origin_region or origin_region == self.region:
            return plain  # a zone of the origin region: its sibling announced it
        spin = digest_spin(digest)
        first: list[Attempt] = []
        siblings = [p for p in sources if self.zone_peer(p.peer)]
        if receiver is None and sources and self.zone_peer(sources[0].peer):
            # A sibling zone relayed the event: it logged the blob's link only
            # once it held the blob, so it has it (a lean zone takes a remote
            # peer's events from a sibling: replicator.intake). No wait.
            first.append(Attempt(sources[0]))
        elif siblings and self.one_wan_copy_per_region:
            # The origin's choice where it made one; else over the plan's
            # zones, not the siblings at hand, so every zone names the same.
            fetcher = receiver
            if fetcher is None:
                fetcher = wan_receiver(self.region_zones, digest,
                                       lambda zone: zone == self.zone or self.sibling_reachable(zone))
            if fetcher and fetcher != self.zone:
                first += [Attempt(p, SIBLING_WAIT_MS) for p in siblings if p.peer.zone == fetcher]
        origin_zones = sorted((p for p in sources if p.peer.region == origin_region),
                              key=lambda p: p.name)
        if origin_zones:
            n = len(origin_zones)
            pick = min(range(n), key=lambda i: (self._crossing[origin_zones[i].name],
                                                (i - spin) % n))
            first.append(Attempt(origin_zones[pick], ORIGIN_ZONE_WAIT_MS if n > 1 else 0,
                                 wan=True))
        chosen = {a.peer.name for a in first}
        return first + [a for a in plain if a.peer.name not in chosen]

    async def _transfer_blob(self, repository: str, digest: str, attempts: Sequence[Attempt],
                             origin_region: str = "", size: int = 0) -> None:
        # The region's receiving zone crossing the WAN: its siblings may read
        # the bytes as they arrive, whichever source they come from in the end.
        held = None
        if attempts and attempts[0].wan and self._receives_for_region():
            held = self.held.tee(digest, repository, origin_region, size)
        try:
            await self._try_sources(repository, digest, attempts, held)
        finally:
            if held is not None:
                if not held.complete:
                    held.fail()
                self.held.release(digest, held)

    async def _try_sources(self, repository: str, digest: str, attempts: Sequence[Attempt],
                           held: HeldBlob | None) -> None:
        last: ReplicationError | None = None
        for attempt in attempts:
            peer = attempt.peer
            # Waiting on a sibling takes no slot: the sibling's own transfer
            # takes one there, and slots all held by waits on each other would
            # stall a region until the waits ran out.
            sibling = attempt.wait_ms and not attempt.wan
            try:
                async with contextlib.nullcontext() if sibling else self._slots:
                    # A waited-for source had its chance in the wait: one try.
                    await retry(lambda p=peer, w=attempt.wait_ms:
                                self._fetch_blob(p, repository, digest, w, held),
                                backoff=self.backoff,
                                attempts=1 if attempt.wait_ms else self.attempts, rng=self.rng,
                                on_retry=lambda exc, n, d, p=peer: self._on_retry(p, exc))
                return
            except ReplicationError as exc:
                self.metrics.failures.labels(peer.name, exc.outcome.value).inc()
                log.info("transfer_source_failed", peer=peer.name, digest=digest, error=exc.reason)
                last = exc
        raise last or permanent(f"no peer to fetch {digest} from")

    async def _store_sent(self, digest: str, sender: str, body: bytes) -> bool:
        """Store bytes that came with the blob's event; False (nothing kept)
        if they are not the blob."""
        try:
            await self.replica.store_sent_blob(digest, body)
        except ContentRejected as exc:
            if isinstance(exc, DigestMismatch):
                self.metrics.digest_mismatches.labels(sender, "blob").inc()
            log.warning("sent_blob_rejected", digest=digest, sender=sender, error=str(exc))
            return False
        except OSError as exc:
            raise definite(f"storing {digest}: {exc}") from None
        self.metrics.bytes_received(sender, len(body))
        return True

    def _receives_for_region(self) -> bool:
        return self.one_wan_copy_per_region and len(self.region_zones) > 1

    async def _fetch_blob(self, peer: PeerClient, repository: str, digest: str,
                          wait_ms: int = 0, held: HeldBlob | None = None) -> None:
        replica = self.replica
        if replica.blob_in_place(digest):
            return
        run = replica.registry.run_blocking
        file = self._inbound.get(digest)
        if file is None:
            file = await run(lambda: replica.inbound_blob(digest))
            self._inbound[digest] = file
        offset = file.size
        try:
            await replica.receive_blob(file, self._counted(
                peer, peer.fetch_blob(repository, digest, offset, wait_ms), held, offset))
            if held is not None and not held.failed:
                if held.size == held.expected:
                    held.finish()   # all of it is here: siblings need not wait for the store
                else:
                    held.fail()     # not what the event said: let them get it stored, or elsewhere
            await replica.commit_blob(file, digest)
        except ContentRejected as exc:
            self._inbound.pop(digest, None)
            if isinstance(exc, DigestMismatch):
                self.metrics.digest_mismatches.labels(peer.name, "blob").inc()
                log.warning("blob_digest_mismatch", peer=peer.name, digest=digest)
            raise definite(f"{digest} from {peer.name}: {exc}") from None
        except ReplicationError:
            raise
        except OSError as exc:
            self._inbound.pop(digest, None)
            raise definite(f"storing {digest}: {exc}") from None
        self._inbound.pop(digest, None)

    async def _counted(self, peer: PeerClient, chunks: AsyncIterator[bytes],
                       held: HeldBlob | None = None, offset: int = 0) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self.metrics.bytes_received(peer.name, len(chunk))
            if held is not None and not held.failed:
                # A resumed attempt may repeat bytes already held (the same
                # bytes: the blob is its digest's); one that starts past them
                # leaves a gap the siblings cannot read across. Bytes past
                # the blob's size fail it (``HeldBlob.append``): never held.
                if offset > held.size:
                    held.fail()
                elif offset + len(chunk) > held.size:
                    held.append(chunk[held.size - offset:])
            offset += len(chunk)
            yield chunk

    def _on_retry(self, peer: PeerClient, exc: ReplicationError) -> None:
        self.metrics.failures.labels(peer.name, exc.outcome.value).inc()
        log.info("transfer_retry", peer=peer.name, error=exc.reason)

    # -- manifests ---------------------------------------------------------------

    async def ensure_manifest(self, repository: str, digest: str, sources: Sequence[PeerClient],
                              event: Event | None = None, *, needed_by_index: bool = False,
                              body: bytes | None = None) -> Event | None:
        """Fetch a manifest, everything it needs, then store it. ``event`` gives
        the register stamp; without one (a tag or an index needs the manifest)
        the stamp the source holds is used."""
        key = (repository, digest)
        future = self._manifests.get(key)
        if future is not None and event is None:
            await asyncio.shield(future)
            return None
        task = asyncio.ensure_future(self._transfer_manifest(repository, digest, sources, event,
                                                             needed_by_index, body))
        if event is None:
            self._manifests[key] = task
            task.add_done_callback(lambda _: self._manifests.pop(key, None))
        return await asyncio.shield(task)

    async def _transfer_manifest(self, repository: str, digest: str, sources: Sequence[PeerClient],
                                 event: Event | None, needed_by_index: bool,
                                 body: bytes | None = None) -> Event | None:
        replica = self.replica
        last: ReplicationError | None = None
        mismatched: list[str] = []
        # The bytes that came with the event first (from the sender, sources[0]),
        # then each peer asked in turn, the sender too: one bad copy is not all.
        inline = [(sources[0], body)] if body is not None and event is not None and sources else []
        for peer, sent in [*inline, *((p, None) for p in sources)]:
            if sent is not None:
                reply = pb.ManifestReply(digest=digest, media_type=event.media_type, body=sent,
                                         hlc=event.hlc, origin_region=event.origin_region,
                                         origin_zone=event.origin_zone,
                                         origin_acked_ns=event.acked_ns)
            else:
                try:
                    reply = await retry(lambda p=peer: p.fetch_manifest(repository, digest),
                                        backoff=self.backoff, attempts=self.attempts, rng=self.rng)
                except ReplicationError as exc:
                    last = exc
                    continue
            stamped = event or Event(
                kind=EventKind.MANIFEST_PUT, repository=repository, digest=digest,
                media_type=reply.media_type, size=len(reply.body), hlc=reply.hlc,
                origin_region=reply.origin_region, origin_zone=reply.origin_zone,
                acked_ns=reply.origin_acked_ns)
            try:
                parsed = replica.parse_manifest(digest, reply.body, reply.media_type)
            except DigestMismatch:
                # A sealed or TLS reply's bytes arrived as sent: the copy is bad
                # at its source. Another peer may hold good bytes.
                self.metrics.digest_mismatches.labels(peer.name, "manifest").inc()
                log.warning("manifest_digest_mismatch", peer=peer.name, digest=digest)
                mismatched.append(peer.name)
                continue
            except ContentRejected as exc:
                raise permanent(str(exc)) from None
            await asyncio.gather(*(self.ensure_blob(repository, d, sources) for d in parsed.blobs))
            await asyncio.gather(*(self.ensure_manifest(repository, c, sources, needed_by_index=True)
                                   for c in parsed.children
                                   if replica.manifest_record(repository, c) is None))
            try:
                return replica.apply_manifest(
                    stamped if stamped.media_type else _with_type(stamped, reply.media_type),
                    reply.body, needed_by_index=needed_by_index,
                    origin_acked_ns=reply.origin_acked_ns)
            except MissingContent as exc:  # something vanished meanwhile: try again later
                raise definite(f"{digest} still lacks {exc.blobs + exc.manifests}") from None
        if mismatched:
            # Every copy that came is bad at its source: asking the same peers
            # again from the same cursor would block every event behind this
            # one. Permanent (recorded and skipped): anti-entropy asks again,
            # every peer, at its own pace.
            raise permanent(f"manifest {digest}: the bytes of {', '.join(dict.fromkeys(mismatched))} "
                            f"do not hash to it" + (f"; {last.reason}" if last else ""))
        raise last or permanent(f"no peer to fetch manifest {digest} from")



def _with_type(event: Event, media_type: str) -> Event:
    return msgspec.structs.replace(event, media_type=media_type)
