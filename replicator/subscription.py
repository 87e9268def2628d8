"""One node's subscription to one peer's log.

The loop connects, announces the cursor it persisted (and which incarnation
of the peer it belongs to), applies each batch through ``Transfer``, persists
the new cursor, and acknowledges it — which is what zone quorum waits for.
Within a batch, blob transfers run concurrently; anything else waits for the
blobs before it, so order is kept where it matters.

When the connection breaks, it reconnects with capped, jittered backoff and
resumes from the persisted cursor; whatever is re-sent is a no-op. An event
that fails permanently is recorded against its repository and digest and
skipped (anti-entropy retries it later); one that keeps failing for
retryable reasons ends the session, which then resumes from the same cursor.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence

import grpc
import structlog

from registry_node import keys
from registry_node.metastore import Batch
from registry_node.records import Cursor, Event, EventKind, decode, encode

from .convert import event_from_wire
from .errors import Outcome, ReplicationError, from_grpc, indefinite
from .metrics import ReplicationMetrics
from .peers import PeerClient
from .retry import Backoff
from .transfer import Transfer
from .wire.v1 import replication_pb2 as pb

log = structlog.get_logger("georeg.replication")

BLOB_KINDS = frozenset({EventKind.BLOB_PUT, EventKind.BLOB_MOUNT})
RECONNECT_BACKOFF = Backoff(base_s=0.1, cap_s=1.0)


class Subscription:
    def __init__(self, peer: PeerClient, transfer: Transfer, others: Callable[[], Sequence[PeerClient]],
                 metrics: ReplicationMetrics, *, on_connect: Callable[[PeerClient], Awaitable[None]] | None = None,
                 backoff: Backoff = RECONNECT_BACKOFF,
                 rng: random.Random | None = None) -> None:
        self.peer = peer
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
        self.last_error = ""

    # -- cursor ------------------------------------------------------------------

    def cursor(self) -> Cursor:
        raw = self.meta.get(keys.cursor(self.peer.name))
        return decode(raw, Cursor) if raw is not None else Cursor("", 0)

    def _save_cursor(self, cursor: Cursor) -> None:
        batch = Batch()
        batch.put(keys.cursor(self.peer.name), encode(cursor))
        self.meta.commit(batch)

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
                self.last_error = exc.reason
                self.metrics.failures.labels(self.peer.name, exc.outcome.value).inc()
                log.info("subscription_broken", peer=self.peer.name, error=exc.reason)
            finally:
                self.connected = False
            await asyncio.sleep(self.backoff.delay(attempt, self.rng))
            attempt += 1

    def _sources(self) -> list[PeerClient]:
        return [self.peer, *(p for p in self.others() if p is not self.peer)]

    async def _session(self) -> None:
        cursor = self.cursor()
        call = self.peer.subscribe()
        try:
            await call.write(self.peer.start_message(cursor.node_id, cursor.seq))
            first = True
            async for batch in call:
                if first:
                    first = False
                    self.connected = True
                    self.last_error = ""
                    log.info("subscribed", peer=self.peer.name, cursor=cursor.seq,
                             reset=batch.cursor_reset)
                    if self.on_connect is not None:
                        asyncio.ensure_future(self.on_connect(self.peer))
                if batch.cursor_reset or batch.sender.node_id != cursor.node_id:
                    cursor = Cursor(batch.sender.node_id, 0)
                self.peer_last_seq = max(batch.last_seq, self.peer_last_seq)
                await self._apply(batch.events)
                cursor = Cursor(batch.sender.node_id, batch.last_seq)
                self._save_cursor(cursor)
                self.metrics.queue_depth.labels(self.peer.name).set(self.lag_events)
                await call.write(pb.SubscribeMessage(ack=pb.SubscribeAck(applied=batch.last_seq)))
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc, f"subscription to {self.peer.name}") from None
        except asyncio.InvalidStateError:
            # The stream ended (peer gone, link cut) while a batch was applied
            # with content from elsewhere: grpc refuses the acknowledgement with
            # this, not an AioRpcError. The cursor is saved; resume from it.
            raise indefinite(f"subscription to {self.peer.name}: the stream ended "
                             "during a batch") from None
        finally:
            call.cancel()

    async def _apply(self, wire_events: Sequence[pb.Event]) -> None:
        """Apply in order; runs of blob events go concurrently."""
        sources = self._sources()
        pending: list[asyncio.Task] = []
        for message in wire_events:
            event = event_from_wire(message)
            if event.kind in BLOB_KINDS:
                pending.append(asyncio.ensure_future(self._apply_one(event, sources)))
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
                         manifest_body: bytes | None = None) -> None:
        try:
            await self.transfer.apply(event, sources, manifest_body)
        except ReplicationError as exc:
            if exc.outcome is not Outcome.PERMANENT:
                raise
            # Retrying cannot help; keep the reason where status pages find it.
            self.replica.record_failure(event.repository, event.digest or event.tag,
                                        exc.reason, self.peer.name)
            log.warning("replication_failed", peer=self.peer.name, kind=event.kind.value,
                        repository=event.repository, digest=event.digest, error=exc.reason)
