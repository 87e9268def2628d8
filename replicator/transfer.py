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
* Content is asked of the peer that announced the change first, then of the
  others (propagation is transitive, so any of them may have it).
* Failures follow the taxonomy in ``errors``: retried with backoff while
  retryable, recorded (per repository and digest) when permanent.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Sequence

import msgspec
import structlog

from registry_node.blobstore import UploadFile
from registry_node.records import Event, EventKind
from registry_node.replica import ContentRejected, MissingContent, Replica

from .errors import ReplicationError, definite, permanent
from .metrics import ReplicationMetrics
from .peers import PeerClient
from .residency import ResidencyPolicy
from .retry import Backoff, retry
from .wire.v1 import replication_pb2 as pb

log = structlog.get_logger("georeg.replication")

TRANSFER_BACKOFF = Backoff(base_s=0.05, cap_s=2.0)
CONTENT_KINDS = frozenset({EventKind.BLOB_PUT, EventKind.BLOB_MOUNT, EventKind.MANIFEST_PUT,
                           EventKind.TAG_SET})


class Transfer:
    def __init__(self, replica: Replica, residency: ResidencyPolicy,
                 metrics: ReplicationMetrics, *, concurrency: int = 4,
                 backoff: Backoff = TRANSFER_BACKOFF, attempts: int = 4,
                 rng: random.Random | None = None) -> None:
        self.replica = replica
        self.region = replica.registry.identity.region
        self.residency = residency
        self.metrics = metrics
        self.backoff = backoff
        self.attempts = attempts
        self.rng = rng or random.Random()
        self._slots = asyncio.Semaphore(concurrency)
        self._blobs: dict[str, asyncio.Future[None]] = {}
        self._manifests: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._inbound: dict[str, UploadFile] = {}

    # -- events ------------------------------------------------------------------

    async def apply(self, event: Event, sources: Sequence[PeerClient],
                    manifest_body: bytes | None = None) -> Event | None:
        """Apply one replicated change here, fetching whatever content it needs
        (a manifest_put may bring its manifest's bytes along). Returns the event
        as logged here, or None when it changed nothing."""
        if not self.residency.allows(event.origin_region, event.repository, self.region):
            # The sender should never have sent it: refuse, and say so in metrics.
            self.metrics.residency_refusals.labels(event.origin_region).inc()
            log.warning("residency_refused", origin=event.origin_region,
                        repository=event.repository, digest=event.digest)
            return None
        replica = self.replica
        kind = event.kind
        if kind in (EventKind.BLOB_PUT, EventKind.BLOB_MOUNT):
            await self.ensure_blob(event.repository, event.digest, sources)
            applied = replica.apply_blob_link(event)
        elif kind is EventKind.MANIFEST_PUT:
            applied = None
            if replica.wants_manifest(event):
                applied = await self.ensure_manifest(event.repository, event.digest, sources, event,
                                                     body=manifest_body)
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
        else:
            return None
        if applied is not None:
            self.metrics.applied.labels(event.origin_region, kind.value).inc()
            if kind in CONTENT_KINDS and event.acked_ns:
                self.metrics.observe_lag(event.origin_region, kind.value,
                                         (time.time_ns() - event.acked_ns) / 1e9)
        return applied

    # -- blobs -------------------------------------------------------------------

    async def ensure_blob(self, repository: str, digest: str, sources: Sequence[PeerClient]) -> None:
        """Make sure the blob's bytes are here (not its link: events do that)."""
        if self.replica.has_blob(digest):
            return
        future = self._blobs.get(digest)
        if future is None:
            future = asyncio.ensure_future(self._transfer_blob(repository, digest, sources))
            self._blobs[digest] = future
            future.add_done_callback(lambda _: self._blobs.pop(digest, None))
        await asyncio.shield(future)

    async def _transfer_blob(self, repository: str, digest: str,
                             sources: Sequence[PeerClient]) -> None:
        async with self._slots:
            last: ReplicationError | None = None
            for peer in sources:
                try:
                    await retry(lambda p=peer: self._fetch_blob(p, repository, digest),
                                backoff=self.backoff, attempts=self.attempts, rng=self.rng,
                                on_retry=lambda exc, n, d, p=peer: self._on_retry(p, exc))
                    return
                except ReplicationError as exc:
                    self.metrics.failures.labels(peer.name, exc.outcome.value).inc()
                    log.info("transfer_source_failed", peer=peer.name, digest=digest, error=exc.reason)
                    last = exc
            raise last or permanent(f"no peer to fetch {digest} from")

    async def _fetch_blob(self, peer: PeerClient, repository: str, digest: str) -> None:
        replica = self.replica
        if replica.has_blob(digest):
            return
        run = replica.registry.run_blocking
        file = self._inbound.get(digest)
        if file is None:
            file = await run(lambda: replica.inbound_blob(digest))
            self._inbound[digest] = file
        offset = file.size
        try:
            await replica.receive_blob(file, self._counted(peer, peer.fetch_blob(repository, digest, offset)))
            await replica.commit_blob(file, digest)
        except ContentRejected as exc:
            self._inbound.pop(digest, None)
            raise definite(f"{digest} from {peer.name}: {exc}") from None
        except ReplicationError:
            raise
        except OSError as exc:
            self._inbound.pop(digest, None)
            raise definite(f"storing {digest}: {exc}") from None
        self._inbound.pop(digest, None)

    async def _counted(self, peer: PeerClient, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self.metrics.bytes_received(peer.name, len(chunk))
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
        for peer in sources:
            if body is not None and event is not None:  # it came with the event
                reply = pb.ManifestReply(digest=digest, media_type=event.media_type, body=body,
                                         hlc=event.hlc, origin_region=event.origin_region,
                                         origin_zone=event.origin_zone,
                                         origin_acked_ns=event.acked_ns)
                body = None  # if it is unusable, fetch from the peers
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
        raise last or permanent(f"no peer to fetch manifest {digest} from")


def _with_type(event: Event, media_type: str) -> Event:
    return msgspec.structs.replace(event, media_type=media_type)
