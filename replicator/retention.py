"""Bounded metadata: how much of this node's event log is kept, and when a
tombstone may go.

Owns: what each peer has read of this node's log (``reader\\0<region/zone>``,
a ``LogReader``: the cursor the peer last reported as persisted, which
incarnation of it reported it, when it was last heard from), the log floor
that allows, and the collection of tombstones. The service feeds it (a
subscriber announces its cursor when it connects, then reports each cursor it
persists: ``replicator.service``); anti-entropy reads what it decided
(``unproven``). Nothing here talks to the network.

The rules, Cassandra's ``gc_grace`` with the replicas' own cursors in place of
"a repair has run":

* **Live peers.** Every peer of the view is counted: while connected, and for
  ``peer_horizon_s`` after it was last heard from (a peer never heard from
  counts from when this node first knew of it). A peer past the horizon holds
  nothing back any more.
* **Log.** Truncated up to the lowest cursor of every live peer, and never
  within the last ``log_retain_events``. A cursor only counts once the peer
  reported it persisted and fsynced, so no event a live peer has not read for
  good is dropped. A peer that returns below the floor is told so
  (``cursor_truncated``), repairs itself by anti-entropy from this node, and
  reads on from the head (``replicator.subscription``).
* **Tombstones.** A tombstone is collected once every live peer's cursor is past
  the event that wrote it here *and* ``tombstone_grace_s`` has passed both
  since it was written here and since its stamp. Its candidate entry
  (``tgc\\0<seq>…``, written with it: ``MetadataStore.commit``) is read oldest
  first, so a pass stops at the first one not yet due. Deleting it goes
  through an ordinary commit, so the anti-entropy sums stay equal to a
  recomputation.
* **Zombies.** A peer away past the horizon may not have read a tombstone
  collected here, and may still hold what it deleted. Each such collection is
  recorded against it (``LogReader.unproven_hlc``: the tombstone's stamp,
  capped at the peer's last contact; ``unproven_seq``: the event's sequence).
  Until it reports a cursor past ``unproven_seq``, anti-entropy here adopts
  from it no register this node lacks that is stamped at or below
  ``unproven_hlc`` (it may be one deleted here whose tombstone is gone); and
  when it resynchronises from this node it is told ``unproven_hlc`` and drops
  every register it holds, this node lacks, stamped at or below it — the
  others' state wins for whatever it cannot prove newer. The price, stated
  plainly: a write such a peer alone took before it lost contact, that no
  other replica received, is dropped with the zombies. What it took after it
  lost contact is stamped above the cap and survives. (Cassandra's own rule is
  harsher: a node down longer than ``gc_grace`` must be wiped.)
* **No ping-pong.** Tombstones are part of the anti-entropy sums, so a node
  that collected one differs from a node still holding it until that one
  collects it too. Anti-entropy therefore does not adopt a deletion older than
  the grace for a key it holds nothing at (``stale_deletion``): nothing older
  can still arrive from a live peer, and storing it again would only be
  collected again.
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
    def __init__(self, meta: MetadataStore, *, peers: Callable[[], Iterable[str]],
                 horizon_s: float, grace_s: float, retain_events: int, interval_s: float,
                 wall_ns: Callable[[], int]) -> None:
        self.meta = meta
        self._peers = peers                  # labels (region/zone) of the view's peers
        self.horizon_ns = int(horizon_s * 1e9)
        self.grace_ns = int(grace_s * 1e9)
        self.retain_events = retain_events
        self.interval_s = interval_s
        self._wall_ns = wall_ns
        self._readers: dict[str, LogReader] = {
            keys.parse(k, keys.ReaderKey).label: decode(v, LogReader)
            for k, v in meta.scan(keys.READER)}
        self._streams: dict[str, int] = {}   # label → subscriptions open now
        self.truncated = 0                   # events dropped from the log since start
        self.collected = 0                   # tombstones collected since start
        self.passes = 0
        self.tombstones = meta.tombstones_held()

    def counters(self) -> dict[str, int]:
        """Log length and floor, tombstones held and collected (``/georeg/v1/node``, ``/metrics``)."""
        return {"log_events": self.meta.last_seq - self.meta.log_floor,
                "log_floor": self.meta.log_floor, "log_truncated": self.truncated,
                "tombstones_held": self.tombstones, "tombstones_collected": self.collected,
                "passes": self.passes}

    # -- what the service hears ------------------------------------------------------

    def connected(self, label: str, node_id: str, cursor: int) -> None:
        """A subscriber connected, announcing ``cursor`` of this log."""
        self._streams[label] = self._streams.get(label, 0) + 1
        old = self._readers.get(label)
        if old is not None and old.node_id and node_id and old.node_id != node_id:
            old = None   # a new incarnation of the peer: it holds nothing of the old one's
        self._store(label, _read(old or LogReader(), cursor, node_id, self._wall_ns()))

    def reported(self, label: str, cursor: int) -> None:
        """A connected subscriber persisted (and fsynced) ``cursor`` of this log."""
        old = self._readers.get(label) or LogReader()
        self._store(label, _read(old, cursor, old.node_id, self._wall_ns()))

    def disconnected(self, label: str) -> None:
        left = self._streams.get(label, 0) - 1
        if left > 0:
            self._streams[label] = left
        else:
            self._streams.pop(label, None)
        old = self._readers.get(label)
        if old is not None:
            reader = msgspec.structs.replace(old, seen_ns=self._wall_ns())
            try:
                self._store(label, reader)
            except Exception as exc:  # noqa: BLE001 - the node is closing its store
                # Kept in memory; on disk it is at most one pass older (each
                # pass records every connected peer as heard from).
                self._readers[label] = reader
                log.info("reader_not_recorded", peer=label, error=str(exc))

    def unproven(self, label: str) -> int:
        """The HLC at or below which a register that ``label`` holds and this node
        lacks may be one deleted here whose tombstone was collected while it was
        away (0: nothing of the kind)."""
        reader = self._readers.get(label)
        return reader.unproven_hlc if reader is not None else 0

    def stale_deletion(self, stamp_hlc: int) -> bool:
        """Whether a deletion stamped ``stamp_hlc`` is past the grace: one this node
        holds nothing for need not be stored (see the module docstring)."""
        return hlc.unpack(stamp_hlc)[0] * _NS_PER_MS + self.grace_ns <= self._wall_ns()

    def _store(self, label: str, reader: LogReader, batch: Batch | None = None) -> None:
        self._readers[label] = reader
        if batch is None:
            own = Batch()
            own.put(keys.reader(label), encode(reader))
            self.meta.commit(own)
        else:
            batch.put(keys.reader(label), encode(reader))

    # -- passes ------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.compact()
            except Exception:  # a failed pass must not stop the next one
                log.exception("compaction_failed")

    def _live(self, now: int) -> tuple[dict[str, LogReader], dict[str, LogReader]]:
        """The view's peers as (live, away past the horizon), each with its reader
        record; peers first seen now get one, and records of peers no longer in
        the view go."""
        batch = Batch()
        wanted = set(self._peers())
        for label in list(self._readers):
            if label not in wanted:
                del self._readers[label]
                batch.delete(keys.reader(label))
        live, away = {}, {}
        for label in sorted(wanted):
            reader = self._readers.get(label)
            if reader is None or label in self._streams:
                # Counted from now: first known now, or connected (heard from now).
                reader = msgspec.structs.replace(reader or LogReader(), seen_ns=now)
                self._store(label, reader, batch)
            (live if reader.seen_ns + self.horizon_ns > now else away)[label] = reader
        if batch:
            self.meta.commit(batch)
        return live, away

    async def compact(self) -> None:
        """One pass: truncate the log, then collect the tombstones that are due."""
        now = self._wall_ns()
        live, away = self._live(now)
        last = self.meta.last_seq
        read_by_all = min((r.seq for r in live.values()), default=last)
        removed = self.meta.truncate_log(min(read_by_all, last - self.retain_events))
        self.truncated += removed
        collected = await self._collect(read_by_all, away, now)
        self.collected += collected
        self.tombstones = self.meta.tombstones_held()
        self.passes += 1
        if removed or collected:
            log.info("compacted", log_events_removed=removed, log_floor=self.meta.log_floor,
                     tombstones_collected=collected, away=sorted(away))

    async def _collect(self, read_by_all: int, away: dict[str, LogReader], now: int) -> int:
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
                for label, reader in away.items():
                    if reader.seq < key.seq:
                        away[label] = reader = _unproven(reader, tombstone.hlc, key.seq)
                        self._store(label, reader, batch)
            if len(batch.deletes) >= COLLECT_BATCH:
                self.meta.commit(batch)
                batch = Batch()
                await asyncio.sleep(0)
        if batch:
            self.meta.commit(batch)
        return collected


def _read(old: LogReader, cursor: int, node_id: str, now: int) -> LogReader:
    """``old`` with ``cursor`` read, heard from ``now``; what was unproven for it
    is proven once its cursor is past the last such collection."""
    unproven = (0, 0) if cursor >= old.unproven_seq else (old.unproven_hlc, old.unproven_seq)
    return LogReader(cursor, node_id, now, *unproven)


def _unproven(reader: LogReader, stamp: int, seq: int) -> LogReader:
    """``reader`` once a tombstone stamped ``stamp``, written at ``seq``, was
    collected unread by it: capped at its last contact, since what it wrote after
    that is stamped later and cannot be what the tombstone deleted."""
    cap = hlc.pack(reader.seen_ns // _NS_PER_MS, (1 << hlc.LOGICAL_BITS) - 1)
    return msgspec.structs.replace(reader, unproven_hlc=max(reader.unproven_hlc, min(stamp, cap)),
                                   unproven_seq=max(reader.unproven_seq, seq))

