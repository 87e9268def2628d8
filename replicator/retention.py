"""Bounded metadata: how much of this node's event log is kept, and when a
tombstone may go.

Owns: what each reader of this node's log has read (``reader\\0<node name>``,
a ``LogReader``: the cursor the reader last reported as persisted, which
incarnation of it reported it, when it was last heard from), the log floor
that allows, and the collection of tombstones. The service feeds it (a
subscriber's stream opens, reports each cursor it persists, and closes:
``replicator.service``). Nothing here talks to the network.

**Who reads.** Every node that may subscribe to this node's log: the view's
peers (live or away) and the reader-only nodes the view names
(``ClusterView.readers``: this region's paired copy, which subscribes to the
region's nodes without being their peer). Readers are keyed by node name (the
certificate's common name on a mutual-TLS cluster), never by region/zone: a
paired copy is placed in its pair region with no zone, so it shares that
label with a replica node of that region.

**What counts as read.** Only a cursor the reader reported persisted and
fsynced (``SubscribeCursor``), clamped by the service to what this node sent
on that stream, and only increases within one incarnation of the reader (its
node id). The cursor a subscriber starts from is not counted: it is the
subscriber's applied cursor, possibly ahead of what it made durable. A new
incarnation (another node id) starts from nothing.

The rules, Cassandra's ``gc_grace`` with the readers' own cursors in place of
"a repair has run":

* **Log.** Truncated up to the lowest cursor of every *live* reader, and never
  within the last ``log_retain_events``. Live: connected, or heard from within
  ``peer_horizon_s`` (counted from no earlier than this process's start, so a
  node that was itself down does not find everyone away). A reader away past
  the horizon no longer holds the log back; when it returns below the floor
  it is told so (``cursor_truncated``), repairs itself by anti-entropy from
  this node, and reads on from the head (``replicator.subscription``).
* **Tombstones: the strict rule.** A tombstone is collected only once EVERY
  reader — live or away — has read past the event that wrote it here, and
  ``tombstone_grace_s`` has passed both since it was written here and since
  its stamp. So every node that could hold what a tombstone deleted still
  holds the tombstone until it has read it, and the anti-entropy repair of a
  reader back from past the horizon brings it every deletion it missed: no
  deleted content comes back, and nothing has to be dropped on suspicion.
  The price, honestly: an away reader holds tombstones back for as long as it
  is away, so they pile up at the delete rate (a tombstone is ~150-170 bytes
  of key and value and its candidate entry ~200 more, before RocksDB's own
  overhead). It is bounded by removing that replica
  (``replication delete``), which takes it out of the view; its record goes
  at the next pass. Candidates (``tgc\\0<seq>…``, written with each
  tombstone: ``MetadataStore.commit``) are read oldest first, so a pass stops
  at the first one not yet due. Deleting goes through an ordinary commit, so
  the anti-entropy sums stay equal to a recomputation.
* **Collected here, still held there.** Nodes collect a tombstone at
  different moments (each once its own readers read past its own event), and
  tombstones are part of the anti-entropy sums, so for a while a node that
  collected one differs from one still holding it. Anti-entropy therefore
  does not adopt a deletion past the grace for a key it holds nothing of
  (``stale_deletion``): storing it again would only log it again, have it
  collected again, and could echo back to a node that collected it already.
  Skipping it loses nothing: a tombstone protects a value, and there is none
  here; and any node that might still send that value holds the tombstone
  until it has read it. The difference then costs a repository-state fetch
  per round until the other node collects too — no write, so no loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import msgspec
import structlog

from registry_node import hlc, keys
from registry_node.metastore import Batch, MetadataStore
from registry_node.records import LogReader, Tombstone, decode, encode

log = structlog.get_logger("georeg.retention")

COLLECT_BATCH = 1000      # tombstones deleted per commit (and between two turns of the loop)
_NS_PER_MS = 1_000_000


class LogRetention:
    def __init__(self, meta: MetadataStore, *, readers: Callable[[], Iterable[str]],
                 horizon_s: float, grace_s: float, retain_events: int, interval_s: float,
                 wall_ns: Callable[[], int]) -> None:
        self.meta = meta
        self._readers_wanted = readers       # names of every node that may read this log
        self.horizon_ns = int(horizon_s * 1e9)
        self.grace_ns = int(grace_s * 1e9)
        self.retain_events = retain_events
        self.interval_s = interval_s
        self._wall_ns = wall_ns
        started = wall_ns()
        # Heard from no earlier than this start: while this node was down nobody
        # could reach it, which says nothing about whether they are away.
        self._readers: dict[str, LogReader] = {}
        for k, v in meta.scan(keys.READER):
            reader = decode(v, LogReader)
            self._readers[keys.parse(k, keys.ReaderKey).name] = msgspec.structs.replace(
                reader, seen_ns=max(reader.seen_ns, started))
        self._streams: dict[str, int] = {}   # name → subscriptions open now
        self.truncated = 0                   # events dropped from the log since start
        self.collected = 0                   # tombstones collected since start
        self.passes = 0

    def counters(self) -> dict[str, int]:
        """Log length and floor, tombstones held and collected (``/georeg/v1/node``, ``/metrics``)."""
        return {"log_events": self.meta.last_seq - self.meta.log_floor,
                "log_floor": self.meta.log_floor, "log_truncated": self.truncated,
                "tombstones_held": self.meta.tombstones_held, "tombstones_collected": self.collected,
                "passes": self.passes}

    def reader(self, name: str) -> LogReader | None:
        return self._readers.get(name)

    # -- what the service hears ------------------------------------------------------

    def connected(self, name: str, node_id: str) -> None:
        """A subscriber opened a stream. Its start cursor is not counted (see the
        module docstring); a new incarnation starts from nothing."""
        self._streams[name] = self._streams.get(name, 0) + 1
        old = self._readers.get(name)
        if old is not None and old.node_id and node_id and old.node_id != node_id:
            old = None   # a new incarnation of the peer: it holds nothing of the old one's
        base = old or LogReader(node_id=node_id)
        self._store(name, msgspec.structs.replace(base, node_id=base.node_id or node_id,
                                                  seen_ns=self._wall_ns()))

    def reported(self, name: str, node_id: str, cursor: int) -> None:
        """A connected subscriber persisted (and fsynced) ``cursor`` of this log
        (already clamped by the service to what it was sent). Only an increase
        by the incarnation on record counts."""
        old = self._readers.get(name) or LogReader(node_id=node_id)
        if old.node_id and node_id and old.node_id != node_id:
            return       # another incarnation's report: connected() settles who is on record
        self._store(name, LogReader(max(old.seq, cursor), old.node_id or node_id,
                                    self._wall_ns()))

    def disconnected(self, name: str) -> None:
        left = self._streams.get(name, 0) - 1
        if left > 0:
            self._streams[name] = left
        else:
            self._streams.pop(name, None)
        old = self._readers.get(name)
        if old is not None:
            reader = msgspec.structs.replace(old, seen_ns=self._wall_ns())
            try:
                self._store(name, reader)
            except Exception as exc:  # noqa: BLE001 - the node is closing its store
                # Kept in memory; on disk it is at most one pass older (each
                # pass records every connected peer as heard from).
                self._readers[name] = reader
                log.info("reader_not_recorded", reader=name, error=str(exc))

    def stale_deletion(self, stamp_hlc: int) -> bool:
        """Whether a deletion stamped ``stamp_hlc`` is past the grace: one this node
        holds nothing for need not be stored (see the module docstring)."""
        return hlc.unpack(stamp_hlc)[0] * _NS_PER_MS + self.grace_ns <= self._wall_ns()

    def _store(self, name: str, reader: LogReader, batch: Batch | None = None) -> None:
        self._readers[name] = reader
        if batch is None:
            own = Batch()
            own.put(keys.reader(name), encode(reader))
            self.meta.commit(own)
        else:
            batch.put(keys.reader(name), encode(reader))

    # -- passes ------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.compact()
            except Exception:  # a failed pass must not stop the next one
                log.exception("compaction_failed")

    def _current(self, now: int) -> tuple[dict[str, LogReader], list[str]]:
        """Every reader with its record, and the names of those away past the
        horizon; readers first known now get a record, and records of nodes no
        longer readers go."""
        batch = Batch()
        wanted = set(self._readers_wanted())
        for name in list(self._readers):
            if name not in wanted:
                del self._readers[name]
                batch.delete(keys.reader(name))
        current, away = {}, []
        for name in sorted(wanted):
            reader = self._readers.get(name)
            if reader is None or name in self._streams:
                # Counted from now: first known now, or connected (heard from now).
                reader = msgspec.structs.replace(reader or LogReader(), seen_ns=now)
                self._store(name, reader, batch)
            current[name] = reader
            if reader.seen_ns + self.horizon_ns <= now:
                away.append(name)
        if batch:
            self.meta.commit(batch)
        return current, away

    async def compact(self) -> None:
        """One pass: truncate the log, then collect the tombstones that are due."""
        now = self._wall_ns()
        readers, away = self._current(now)
        last = self.meta.last_seq
        read_by_live = min((r.seq for n, r in readers.items() if n not in away), default=last)
        removed = self.meta.truncate_log(min(read_by_live, last - self.retain_events))
        self.truncated += removed
        read_by_all = min((r.seq for r in readers.values()), default=last)
        collected = await self._collect(read_by_all, now)
        self.collected += collected
        self.passes += 1
        if removed or collected:
            log.info("compacted", log_events_removed=removed, log_floor=self.meta.log_floor,
                     tombstones_collected=collected, away=away)

    async def _collect(self, read_by_all: int, now: int) -> int:
        collected = 0
        batch = Batch()
        for key, candidate in self.meta.tombstone_candidates():
            if key.seq > read_by_all or candidate.written_ns + self.grace_ns > now:
                break                  # later ones were written later: none is due
            tombstone = decode(candidate.tombstone, Tombstone)
            if not self.stale_deletion(tombstone.hlc):
                continue               # stamped ahead of this clock: not yet
            batch.delete(key.encode())
            tomb_key = key.tomb.encode()
            if tomb_key not in batch.deletes and self.meta.get(tomb_key) == candidate.tombstone:
                batch.delete(tomb_key)
                collected += 1
            if len(batch.deletes) >= COLLECT_BATCH:
                self.meta.commit(batch)
                batch = Batch()
                await asyncio.sleep(0)
        if batch:
            self.meta.commit(batch)
        return collected
