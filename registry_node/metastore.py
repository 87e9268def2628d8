"""The node's metadata database (RocksDB through rocksdict) and its event log.

Owns: the only handle on the database, the log's sequence counter, and the
rule that makes replication trustworthy: a mutation's metadata and the events
describing it are one ``WriteBatch``. A crash therefore either keeps both or
neither, and the log never has a gap.

Two steps, so the event loop never waits on a disk:

* ``commit`` writes the batch to RocksDB and its write-ahead log (the OS has
  it: a ``kill -9`` cannot lose it) and makes it visible at once. It is
  synchronous on purpose: doing check-then-write in one event-loop step makes
  every domain operation atomic with respect to the others without locks.
* ``synced`` waits until everything committed so far is fsynced (power loss
  cannot lose it either). One fsync in a worker thread covers every commit
  made while the previous one ran (group commit). Whatever acknowledges a
  write — to a client, or to a peer waiting for zone quorum — awaits it first.
  Directories registered with ``sync_directory`` (where a replicated blob was
  just renamed into place) are fsynced in the same trip, before the WAL: a
  record can never be durable while the rename it describes is not.

Anti-entropy fingerprints (``fingerprints``) are derived data kept here, not
by callers: ``commit`` adds to every batch the updated sums of the registers
it writes, into the same ``WriteBatch``, so no code path that writes a tag or
manifest can forget them and no crash can part them from what they sum. A
database that predates them is summed once when opened. The storage held
(``usage``: bytes and records of blobs and manifests) is kept the same way.

Readers of the log inside the node (webhooks: ``webhook_outbox``) hold its
truncation back with ``hold_log``: ``truncate_log`` never deletes an event
such a reader has not read, whatever the peers' cursors allow, so bounded
metadata cannot take an event from under them.

Memory: RocksDB's defaults are sized for a database that owns its machine —
a 64 MiB memtable, filled by every write until it is flushed, and a 32 MiB
block cache, filled by reads. A node's metadata is small and its files stay
in the OS page cache anyway, so both are capped at ``MEMTABLE_BYTES`` and
``BLOCK_CACHE_BYTES``: with the defaults, 24 MB of writes then reading them
back left a process 45 MiB larger; capped, 2 MiB. Without the caps a node's
resident memory crept up with every image it ever stored.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from msgspec import structs
from rocksdict import BlockBasedOptions, Cache, Options, Rdict, WriteBatch, WriteOptions

from . import content_counts, fingerprints, keys, unreferenced
from . import usage as storage_usage
from .blobstore import fsync_directory
from .records import Event, ReferringCounts, TombstoneCandidate, decode, encode
from .storage_faults import StorageFaults

# Version of the tgc\0 index and tombstone count (meta\0tombindex): a database
# without it is indexed once at open.
TOMB_INDEX_SCHEME = b"1"
MEMTABLE_BYTES = 2 * 1024 * 1024        # flushed to a table file beyond this
BLOCK_CACHE_BYTES = 2 * 1024 * 1024


@dataclass
class Batch:
    """Puts, deletes and events that commit together or not at all."""

    puts: dict[bytes, bytes] = field(default_factory=dict)
    deletes: set[bytes] = field(default_factory=set)
    events: list[Event] = field(default_factory=list)

    def put(self, key: bytes, value: bytes) -> None:
        self.deletes.discard(key)
        self.puts[key] = value

    def delete(self, key: bytes) -> None:
        self.puts.pop(key, None)
        self.deletes.add(key)

    def event(self, event: Event) -> None:
        self.events.append(event)

    def __bool__(self) -> bool:
        return bool(self.puts or self.deletes or self.events)


class MetadataStore:
    def __init__(self, path: Path, *, sync: bool = True,
                 faults: StorageFaults | None = None,
                 wall_ns: Callable[[], int] = time.time_ns) -> None:
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_keep_log_file_num(3)
        options.set_write_buffer_size(MEMTABLE_BYTES)
        table = BlockBasedOptions()
        table.set_block_cache(Cache(BLOCK_CACHE_BYTES))
        options.set_block_based_table_factory(table)
        self._db = Rdict(str(path), options)
        self._write_options = WriteOptions()
        self._write_options.sync = False
        self._fsync = sync
        self._written = 0          # commits made
        self._synced = 0           # commits known durable on disk
        self._sync_task: asyncio.Task | None = None
        self._sync_waiters: list[tuple[int, asyncio.Future]] = []
        self._directories: set[Path] = set()   # to fsync before the next WAL sync
        self._wall_ns = wall_ns                 # when a tombstone was written (its candidate)
        floor = self._db.get(keys.LOG_FLOOR)
        self._log_floor = int(floor) if floor else 0
        self._last_seq = max(self._read_last_seq(), self._log_floor)
        self._listeners: list[Callable[[int], None]] = []
        self._holds: dict[str, Callable[[], int]] = {}   # local readers: how far each has read
        self.faults = faults or StorageFaults()
        # Whether opening had to sum the registers (a database from before the
        # sums were kept, or marked with another scheme): never, for one this
        # georeg wrote, even after a crash. Only the marker is read: a database
        # written by an older georeg after this one must have had it removed
        # (see ``fingerprints.SCHEME``).
        self.fingerprints_rebuilt = self._db.get(keys.FINGERPRINTS) != fingerprints.SCHEME
        if self.fingerprints_rebuilt:
            self._rebuild_fingerprints()
        # The same for the unreferenced blobs (``unreferenced.SCHEME``).
        self.unreferenced_rebuilt = self._db.get(keys.UNREFERENCED_SCHEME) != unreferenced.SCHEME
        if self.unreferenced_rebuilt:
            self._rebuild_unreferenced()
        # The same for what the node reports it holds (``content_counts.SCHEME``).
        self.content_counts_rebuilt = (self._db.get(keys.CONTENT_COUNTS_SCHEME)
                                       != content_counts.SCHEME)
        if self.content_counts_rebuilt:
            self._rebuild_content_counts()
        # Tombstones written before they were indexed for collection (or by an
        # older georeg) get their tgc\0 entry once, and the count is summed once.
        self.tombstone_index_rebuilt = self._db.get(keys.TOMB_INDEX) != TOMB_INDEX_SCHEME
        if self.tombstone_index_rebuilt:
            self._rebuild_tombstone_index()
        self._tombstones = int(self._db.get(keys.TOMB_COUNT) or b"0")
        # The storage held (``usage``), summed once for a database that never
        # kept it, then kept by every commit.
        self.usage_rebuilt = self._db.get(keys.USAGE) is None
        if self.usage_rebuilt:
            self._db.put(keys.USAGE, storage_usage.encode(storage_usage.recompute(self.scan)),
                         self._write_options)
        self._usage = storage_usage.decode(self._db.get(keys.USAGE))

    def close(self) -> None:
        self._db.close()

    # -- reads ---------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        return self._db.get(key)

    def scan(self, prefix: bytes, after: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Keys starting with ``prefix`` in byte order, strictly after ``after`` if given."""
        it = self._db.iter()
        it.seek(after if after is not None else prefix)
        if after is not None and it.valid() and it.key() == after:
            it.next()
        while it.valid():
            key = it.key()
            if not key.startswith(prefix):
                return
            yield key, it.value()
            it.next()

    def scan_back(self, prefix: bytes, before: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Keys starting with ``prefix`` in reverse byte order, from ``before``
        (included) down."""
        it = self._db.iter()
        it.seek_for_prev(before)
        while it.valid():
            key = it.key()
            if not key.startswith(prefix):
                return
            yield key, it.value()
            it.prev()

    def has_prefix(self, prefix: bytes) -> bool:
        it = self._db.iter()
        it.seek(prefix)
        return it.valid() and it.key().startswith(prefix)

    # -- the log -------------------------------------------------------------

    def on_commit(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(last_seq)`` after every commit that appended events
        (the replication feed wakes its subscribers with it)."""
        self._listeners.append(listener)

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def memory_bytes(self) -> int:
        """What RocksDB holds in memory: memtables and cached table blocks."""
        return self.memtable_bytes() + int(self._db.property_value("rocksdb.block-cache-usage") or 0)

    def memtable_bytes(self) -> int:
        return int(self._db.property_value("rocksdb.cur-size-all-mem-tables") or 0)

    def flush(self) -> None:
        """Write the memtable out to a table file (blocking), freeing its memory.
        Commits are durable without it (the WAL); this only moves them."""
        self._db.flush(True)

    @property
    def commits(self) -> int:
        """Commits made since the store opened (a cheap activity counter)."""
        return self._written

    def _read_last_seq(self) -> int:
        it = self._db.iter()
        it.seek_for_prev(keys.log(keys.LAST_SEQ))
        # Whatever lies between the first and the last possible log key is a log key.
        if it.valid() and it.key() >= keys.log(0):
            return keys.parse(it.key(), keys.LogKey).seq
        return 0

    @property
    def log_floor(self) -> int:
        """The log holds the events after this sequence only (0: all of them)."""
        return self._log_floor

    def hold_log(self, reader: str, read: Callable[[], int]) -> None:
        """Keep every event after ``read()`` (how far ``reader``, inside this
        node, has read the log) from truncation, for as long as this store is open."""
        self._holds[reader] = read

    def release_log(self, reader: str) -> None:
        self._holds.pop(reader, None)

    @property
    def log_held_at(self) -> int | None:
        """The lowest sequence a local reader has read (None: no local reader)."""
        return min((read() for read in self._holds.values()), default=None)

    def truncate_log(self, through: int) -> int:
        """Delete the events up to ``through`` (at most the last one, and none a
        local reader has not read: ``hold_log``) and raise the floor to it, in
        one batch; returns how many events went."""
        through = min(through, self._last_seq)
        held = self.log_held_at
        if held is not None:
            through = min(through, held)
        if through <= self._log_floor:
            return 0
        wb = WriteBatch(raw_mode=True)
        wb.delete_range(keys.log(self._log_floor + 1), keys.log(through + 1))
        wb.put(keys.LOG_FLOOR, str(through).encode())
        self.faults.before_write()
        self._db.write(wb, self._write_options)
        removed, self._log_floor = through - self._log_floor, through
        return removed

    def tombstone_candidates(self) -> Iterator[tuple[keys.TombstoneCandidateKey, TombstoneCandidate]]:
        """Every indexed tombstone, by the sequence of the event that wrote it."""
        for key, value in self.scan(keys.TOMB_CANDIDATE):
            yield keys.parse(key, keys.TombstoneCandidateKey), decode(value, TombstoneCandidate)

    @property
    def tombstones_held(self) -> int:
        """How many tombstones the node holds (kept by every commit: no scan)."""
        return self._tombstones

    def _rebuild_tombstone_index(self) -> None:
        """Give every tombstone without one a candidate entry, and count them;
        one batch. The event that wrote such a tombstone is unknown, so it is
        filed under the head: collected only once every reader read past
        everything logged so far, which is later than its own event, never
        earlier."""
        indexed = {keys.parse(k, keys.TombstoneCandidateKey).tomb.encode()
                   for k, _ in self.scan(keys.TOMB_CANDIDATE)}
        wb = WriteBatch(raw_mode=True)
        count = 0
        written = self._wall_ns()
        for key, value in self.scan(keys.TOMB):
            count += 1
            if key not in indexed:
                wb.put(keys.tombstone_candidate(self._last_seq, key),
                       encode(TombstoneCandidate(written, value)))
        wb.put(keys.TOMB_COUNT, str(count).encode())
        wb.put(keys.TOMB_INDEX, TOMB_INDEX_SCHEME)
        self._db.write(wb, self._write_options)

    def read_log(self, after: int, limit: int = 1000) -> list[Event]:
        """Events with ``seq > after``, oldest first, at most ``limit`` (those
        above the floor only: a caller behind it must check ``log_floor``)."""
        out: list[Event] = []
        for _, value in self.scan(keys.LOG, after=keys.log(after) if after else None):
            out.append(decode(value, Event))
            if len(out) >= limit:
                break
        return out

    # -- fingerprints ----------------------------------------------------------

    def fingerprint_sums(self, repository: str) -> dict[str, int]:
        """The maintained hash-sums of ``repository``'s registers, by region."""
        return fingerprints.sums_of(self._db.get(keys.fingerprint(repository)))

    def bucket_sums(self, bucket: int) -> dict[str, int]:
        """The maintained hash-sums of every repository of ``bucket``, by region."""
        return fingerprints.sums_of(self._db.get(keys.bucket_fingerprint(bucket)))

    def fingerprinted_repositories(self, buckets: Iterable[int] | None = None) -> list[str]:
        """Every repository holding a register that fingerprints sum (of
        ``buckets`` only, if given), in name order."""
        prefixes = [keys.FINGERPRINT] if buckets is None else \
            [keys.fingerprint_prefix(b) for b in sorted(set(buckets))]
        return sorted(keys.parse(key, keys.FingerprintKey).repository
                      for prefix in prefixes for key, _ in self.scan(prefix))

    def fingerprint_discrepancies(self) -> list[str]:
        """Where the maintained sums differ from a recomputation (O(everything):
        for checks and tests). Empty while the invariant holds."""
        repos, buckets = fingerprints.recompute_all(self.scan)
        stored = set(self.fingerprinted_repositories())
        out = [f"repository {name}: stored {self.fingerprint_sums(name)} != recomputed "
               f"{repos.get(name, {})}" for name in sorted(stored | set(repos))
               if self.fingerprint_sums(name) != repos.get(name, {})]
        out += [f"bucket {b}: stored {self.bucket_sums(b)} != recomputed {buckets.get(b, {})}"
                for b in range(keys.FINGERPRINT_BUCKETS) if self.bucket_sums(b) != buckets.get(b, {})]
        return out

    def _rebuild_fingerprints(self) -> None:
        """Sum every repository's registers (a database written before the sums
        were kept, or under another scheme); one batch, like any commit."""
        wb = WriteBatch(raw_mode=True)
        for family in (keys.FINGERPRINT, keys.FINGERPRINT_BUCKET):
            for key, _ in self.scan(family):
                wb.delete(key)
        repos, buckets = fingerprints.recompute_all(self.scan)
        for name, sums in repos.items():
            wb.put(keys.fingerprint(name), fingerprints.encode_sums(sums))
        for bucket, sums in buckets.items():
            wb.put(keys.bucket_fingerprint(bucket), fingerprints.encode_sums(sums))
        wb.put(keys.FINGERPRINTS, fingerprints.SCHEME)
        self._db.write(wb, self._write_options)

    # -- blobs no manifest references ------------------------------------------

    def unreferenced_blobs(self) -> Iterator[str]:
        """Blobs held that no manifest references (garbage collection's
        candidates, maintained on write: O(them), whatever else is stored)."""
        for key, _ in self.scan(keys.UNREFERENCED):
            yield keys.parse(key, keys.UnreferencedKey).digest

    def unreferenced_discrepancies(self) -> list[str]:
        """Where the maintained set differs from a recomputation (O(every blob):
        for checks and tests). Empty while the invariant holds."""
        kept, recomputed = unreferenced.stored(self.scan), unreferenced.recompute(
            self.scan, self.has_prefix)
        return ([f"blob {d} is marked unreferenced but is referenced or not held"
                 for d in sorted(kept - recomputed)]
                + [f"blob {d} is held and unreferenced but not marked"
                   for d in sorted(recomputed - kept)])

    def _rebuild_unreferenced(self) -> None:
        """Find every unreferenced blob (a database written before the set was
        kept, or under another scheme); one batch, like any commit."""
        wb = WriteBatch(raw_mode=True)
        for key, _ in self.scan(keys.UNREFERENCED):
            wb.delete(key)
        for digest in unreferenced.recompute(self.scan, self.has_prefix):
            wb.put(keys.unreferenced(digest), b"")
        wb.put(keys.UNREFERENCED_SCHEME, unreferenced.SCHEME)
        self._db.write(wb, self._write_options)

    # -- storage held ------------------------------------------------------------

    @property
    def usage(self) -> storage_usage.StorageUsage:
        """The blobs and manifests held, in bytes and records (maintained on
        write, ``usage``: no scan)."""
        return self._usage

    def usage_discrepancies(self) -> list[str]:
        """Where the maintained usage differs from a recomputation (O(records):
        for checks and tests). Empty while the invariant holds."""
        recomputed = storage_usage.recompute(self.scan)
        return [] if recomputed == self._usage else \
            [f"usage: stored {self._usage} != recomputed {recomputed}"]

    # -- what the node holds ---------------------------------------------------

    def content_summary(self) -> content_counts.Summary:
        """Images and distinct blob bytes held, by residency region (maintained
        on write: one read, whatever is stored)."""
        return content_counts.summary(self._db.get(keys.CONTENT_COUNTS))

    def content_discrepancies(self) -> list[str]:
        """Where the maintained counts differ from a recomputation (O(every
        manifest): for checks and tests). Empty while the invariant holds."""
        (totals, referring), (kept, kept_referring) = (
            content_counts.recompute(self.scan, self._db.get),
            content_counts.stored(self.scan, self._db.get))
        out = [] if kept == totals else [f"totals: stored {kept} != recomputed {totals}"]
        return out + [f"digest {d}: stored {kept_referring.get(d)} referring manifests by "
                      f"region != recomputed {referring.get(d)}"
                      for d in sorted(referring.keys() | kept_referring.keys())
                      if kept_referring.get(d) != referring.get(d)]

    def _rebuild_content_counts(self) -> None:
        """Count what the node holds (a database written before the counts were
        kept, or under another scheme); one batch, like any commit."""
        wb = WriteBatch(raw_mode=True)
        for key, _ in self.scan(keys.REFERRING_COUNTS):
            wb.delete(key)
        totals, referring = content_counts.recompute(self.scan, self._db.get)
        for digest, regions in referring.items():
            wb.put(keys.referring_counts(digest), encode(ReferringCounts(regions)))
        wb.put(keys.CONTENT_COUNTS, encode(totals))
        wb.put(keys.CONTENT_COUNTS_SCHEME, content_counts.SCHEME)
        self._db.write(wb, self._write_options)

    # -- writes --------------------------------------------------------------

    def commit(self, batch: Batch) -> list[Event]:
        """Write ``batch`` atomically (durable against a process crash; await
        ``synced`` for power loss); returns its events with their sequence
        numbers (and origin sequence, for events that originate here)."""
        self.faults.before_write()
        wb = WriteBatch(raw_mode=True)
        for key, value in batch.puts.items():
            wb.put(key, value)
        for key in batch.deletes:
            wb.delete(key)
        # Read before the write, in the same event-loop step: nothing else
        # commits in between, so the previous values are the ones replaced.
        for key, value in fingerprints.stage(batch.puts, batch.deletes, self._db.get).items():
            if value is None:
                wb.delete(key)
            else:
                wb.put(key, value)
        for key, value in unreferenced.stage(batch.puts, batch.deletes, self._db.get,
                                             self.scan).items():
            if value is None:
                wb.delete(key)
            else:
                wb.put(key, value)
        changed = storage_usage.stage(batch.puts, batch.deletes, self._db.get)
        held_usage = self._usage if changed is None else self._usage + changed
        if changed is not None:
            wb.put(keys.USAGE, storage_usage.encode(held_usage))
        for key, value in content_counts.stage(batch.puts, batch.deletes, self._db.get).items():
            if value is None:
                wb.delete(key)
            else:
                wb.put(key, value)
        seq = self._last_seq
        committed: list[Event] = []
        for event in batch.events:
            seq += 1
            origin_seq = event.origin_seq or seq
            stamped = structs.replace(event, seq=seq, origin_seq=origin_seq)
            wb.put(keys.log(seq), encode(stamped))
            committed.append(stamped)
        tombstones = [(key, value) for key, value in batch.puts.items()
                      if keys.is_tombstone(key) and key not in batch.deletes]
        held = self._tombstones
        if tombstones:
            written = self._wall_ns()
            for key, value in tombstones:
                held += self._db.get(key) is None
                wb.put(keys.tombstone_candidate(seq, key),
                       encode(TombstoneCandidate(written, value)))
        held -= sum(1 for key in batch.deletes
                    if keys.is_tombstone(key) and self._db.get(key) is not None)
        if held != self._tombstones:
            wb.put(keys.TOMB_COUNT, str(held).encode())
        try:
            self._db.write(wb, self._write_options)
        except Exception as exc:  # rocksdict raises plain Exceptions for IO errors
            if "No space" in str(exc):
                raise OSError(errno.ENOSPC, f"metadata write failed: {exc}") from None
            raise
        self._written += 1
        self._tombstones = held
        self._usage = held_usage
        if committed:
            self._last_seq = seq
            for listener in self._listeners:
                listener(seq)
        return committed

    def sync_directory(self, path: Path) -> None:
        """Fsync ``path`` before the WAL at the next ``synced`` trip; call it
        before committing the record of what changed in it."""
        if self._fsync:
            self._directories.add(path)

    def _sync(self, directories: set[Path]) -> None:
        for path in directories:
            fsync_directory(path)
        self._db.flush_wal(True)

    async def synced(self) -> None:
        """Return once every commit made so far is fsynced."""
        target = self._written
        if not self._fsync or self._synced >= target:
            return
        future = asyncio.get_running_loop().create_future()
        self._sync_waiters.append((target, future))
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.create_task(self._sync_loop())
        await future

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._sync_waiters:
            covers = self._written
            directories, self._directories = self._directories, set()
            try:
                await loop.run_in_executor(None, self._sync, directories)
            except Exception as exc:  # noqa: BLE001 - every waiter must hear of it
                self._directories |= directories
                waiters, self._sync_waiters = self._sync_waiters, []
                for _, future in waiters:
                    if not future.done():
                        future.set_exception(OSError(errno.EIO, f"WAL sync failed: {exc}"))
                return
            self._synced = max(self._synced, covers)
            still = []
            for target, future in self._sync_waiters:
                if target <= self._synced:
                    if not future.done():
                        future.set_result(None)
                else:
                    still.append((target, future))
            self._sync_waiters = still
