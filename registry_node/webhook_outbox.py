"""The persisted side of webhook delivery: the outbox, the delivery log, the
feed cursor and the questions awaiting replication, in the node's metadata
database (``keys``: ``whp``, ``whl``, ``whq``, ``meta\\0webhookfeed``,
``meta\\0webhookseq``).

* **Outbox** (``whp\\0<webhook>\\0<number>``): a webhook's events still to
  deliver, in the order they were made (numbers grow across every webhook and
  every restart, ``meta\\0webhookseq``). Delivery takes the lowest first.
* **Delivery log** (``whl\\0<webhook>\\0<number>``): events delivered, failed or
  given up, the last ``log_size`` per webhook; an event moves there from the
  outbox in one batch.
* **Feed cursor** (``meta\\0webhookfeed``): how far this node's event log has
  been turned into outbox entries. Entries and the cursor move in one batch
  (``enqueue``): a crash keeps both or neither, so an event is made into
  webhook events exactly once. On the node that delivers, the cursor holds
  the log's truncation back (``MetadataStore.hold_log``): bounded metadata
  never takes an event the feed has not read. A node that never fed starts at
  the head of its log (webhooks fire for what arrives from then on).
* **Questions** (``whq\\0<id>``): images whose ``replicated`` /
  ``replication_failed`` are awaited; an answered question goes in the same
  batch as the events it makes.

Every change is a commit without log events (nothing here is replicated: a
node's deliveries are its own). No HTTP here; nothing of it is held in memory
but counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from . import keys
from .metastore import Batch, MetadataStore
from .records import CompletionQuestion, WebhookEntry, decode, encode

FEED_READER = "webhooks"          # the log hold's name
KEEP_ATTEMPTS = 10                # attempts an entry keeps (with the count of all of them)


@dataclass
class OutboxBatch:
    """Changes to commit together (``WebhookOutbox.commit``)."""

    batch: Batch = field(default_factory=Batch)
    number: int = 0                               # the last number handed out
    cursor: int | None = None
    added: dict[str, int] = field(default_factory=dict)     # webhook -> entries added


class WebhookOutbox:
    def __init__(self, meta: MetadataStore, *, holds_log: bool) -> None:
        self.meta = meta
        raw = meta.get(keys.WEBHOOK_FEED)
        self._cursor = int(raw) if raw is not None else meta.last_seq
        self._number = int(meta.get(keys.WEBHOOK_SEQ) or b"0")
        self._pending: dict[str, int] | None = None     # counted on first use
        self._logged: dict[str, int] = {}               # per webhook, counted on first use
        self.holds_log = holds_log
        if raw is None and holds_log:
            batch = Batch()
            batch.put(keys.WEBHOOK_FEED, str(self._cursor).encode())
            meta.commit(batch)
        if holds_log:
            meta.hold_log(FEED_READER, lambda: self._cursor)

    # -- the feed ------------------------------------------------------------------

    @property
    def cursor(self) -> int:
        return self._cursor

    def begin(self) -> OutboxBatch:
        return OutboxBatch(number=self._number)

    def stage(self, ob: OutboxBatch, webhook: str, entry: WebhookEntry) -> int:
        """Add ``entry`` at the end of ``webhook``'s outbox; returns its number."""
        ob.number += 1
        ob.batch.put(keys.webhook_pending(webhook, ob.number), encode(entry))
        ob.added[webhook] = ob.added.get(webhook, 0) + 1
        return ob.number

    def stage_question(self, ob: OutboxBatch, ident: str, question: CompletionQuestion) -> None:
        ob.batch.put(keys.completion_question(ident), encode(question))

    def stage_answered(self, ob: OutboxBatch, ident: str) -> None:
        ob.batch.delete(keys.completion_question(ident))

    def stage_cursor(self, ob: OutboxBatch, seq: int) -> None:
        ob.cursor = seq
        ob.batch.put(keys.WEBHOOK_FEED, str(seq).encode())

    def commit(self, ob: OutboxBatch) -> None:
        """Commit ``ob`` in one batch; the counters follow only once it is written."""
        if ob.number != self._number:
            ob.batch.put(keys.WEBHOOK_SEQ, str(ob.number).encode())
        if ob.batch:
            self.meta.commit(ob.batch)
        self._number = ob.number
        if ob.cursor is not None:
            self._cursor = ob.cursor
        if self._pending is not None:
            for webhook, n in ob.added.items():
                self._pending[webhook] = self._pending.get(webhook, 0) + n

    # -- delivery ------------------------------------------------------------------

    def head(self, webhook: str) -> tuple[int, WebhookEntry] | None:
        """The oldest event in ``webhook``'s outbox."""
        for key, raw in self.meta.scan(keys.webhook_pending_prefix(webhook)):
            return keys.parse(key, keys.WebhookPendingKey).number, decode(raw, WebhookEntry)
        return None

    def update(self, webhook: str, number: int, entry: WebhookEntry) -> None:
        """Record an attempt on a pending event."""
        batch = Batch()
        batch.put(keys.webhook_pending(webhook, number), encode(entry))
        self.meta.commit(batch)

    def finish(self, webhook: str, number: int, entry: WebhookEntry, log_size: int) -> None:
        """Move an event from the outbox to the delivery log, keeping the last
        ``log_size`` there, in one batch."""
        logged = self._log_count(webhook)
        batch = Batch()
        batch.delete(keys.webhook_pending(webhook, number))
        batch.put(keys.webhook_log(webhook, number), encode(entry))
        excess = logged + 1 - log_size
        dropped = 0
        if excess > 0:
            for key, _ in self.meta.scan(keys.webhook_log_prefix(webhook)):
                if dropped == excess:
                    break
                batch.delete(key)
                dropped += 1
        self.meta.commit(batch)
        self._logged[webhook] = logged + 1 - dropped
        pending = self._pending_counts()
        pending[webhook] = max(pending.get(webhook, 0) - 1, 0)

    # -- reads ---------------------------------------------------------------------

    def pending(self, webhook: str) -> int:
        return self._pending_counts().get(webhook, 0)

    def pending_by_webhook(self) -> dict[str, int]:
        return {name: n for name, n in self._pending_counts().items() if n}

    def entries(self, webhook: str, limit: int) -> list[tuple[int, WebhookEntry]]:
        """``webhook``'s events, newest first: the outbox, then the delivery log
        (everything in the outbox is newer: delivery goes in order)."""
        out: list[tuple[int, WebhookEntry]] = []
        for family, prefix, last in (
                (keys.WebhookPendingKey, keys.webhook_pending_prefix(webhook),
                 keys.webhook_pending(webhook, keys.LAST_SEQ)),
                (keys.WebhookLogKey, keys.webhook_log_prefix(webhook),
                 keys.webhook_log(webhook, keys.LAST_SEQ))):
            for key, raw in self.meta.scan_back(prefix, last):
                if len(out) >= limit:
                    return out
                out.append((keys.parse(key, family).number, decode(raw, WebhookEntry)))
        return out

    def find(self, webhook: str, ident: str) -> WebhookEntry | None:
        """The newest event of ``webhook`` with id ``ident`` (outbox or log)."""
        for _, entry in self.entries(webhook, 1 << 62):
            if entry.id == ident:
                return entry
        return None

    def webhooks(self) -> set[str]:
        """Every webhook this node holds events of (a key read per webhook, not per event)."""
        names: set[str] = set()
        for family, prefix, last in ((keys.WebhookPendingKey, keys.WEBHOOK_PENDING,
                                      keys.webhook_pending),
                                     (keys.WebhookLogKey, keys.WEBHOOK_LOG, keys.webhook_log)):
            after = None
            while True:
                found = next(iter(self.meta.scan(prefix, after)), None)
                if found is None:
                    break
                name = keys.parse(found[0], family).webhook
                names.add(name)
                after = last(name, keys.LAST_SEQ)
        return names

    def questions(self) -> Iterator[tuple[str, CompletionQuestion]]:
        for key, raw in self.meta.scan(keys.COMPLETION_QUESTION):
            yield keys.parse(key, keys.CompletionQuestionKey).question, decode(raw, CompletionQuestion)

    # -- a webhook that is gone ----------------------------------------------------------

    def purge(self, webhook: str, chunk: int = 1000) -> int:
        """Delete every event of ``webhook`` (outbox and log); returns how many."""
        removed = 0
        for prefix in (keys.webhook_pending_prefix(webhook), keys.webhook_log_prefix(webhook)):
            while True:
                batch = Batch()
                for key, _ in self.meta.scan(prefix):
                    batch.delete(key)
                    if len(batch.deletes) >= chunk:
                        break
                if not batch:
                    break
                self.meta.commit(batch)
                removed += len(batch.deletes)
        self._logged.pop(webhook, None)
        if self._pending is not None:
            self._pending.pop(webhook, None)
        return removed

    # -- internals -----------------------------------------------------------------------

    def _pending_counts(self) -> dict[str, int]:
        if self._pending is None:
            counts: dict[str, int] = {}
            for key, _ in self.meta.scan(keys.WEBHOOK_PENDING):
                name = keys.parse(key, keys.WebhookPendingKey).webhook
                counts[name] = counts.get(name, 0) + 1
            self._pending = counts
        return self._pending

    def _log_count(self, webhook: str) -> int:
        count = self._logged.get(webhook)
        if count is None:
            count = sum(1 for _ in self.meta.scan(keys.webhook_log_prefix(webhook)))
            self._logged[webhook] = count
        return count
