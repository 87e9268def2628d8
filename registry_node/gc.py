"""Online garbage collection: blobs that no manifest needs, and abandoned uploads.

A blob is reclaimed when no manifest in any repository references it, it was
not named by any client (HEAD, mount, upload, manifest push) within the grace
period, and it was not created within it either. The decision and the removal
of its metadata and file happen in one event-loop step, and every path that is
about to rely on a blob touches it first in an earlier step — so a push that
found a layer already present (HEAD) and then sends its manifest never loses
that layer underneath it. After a restart, the grace period counts from the
start of the process.

What a pass costs follows what may be garbage, not what is stored:

* blobs: it looks only at the blobs no manifest references, a set the
  metadata store keeps in the same batch as every blob record and reference
  (``unreferenced``); each is checked again, references included, in the step
  that removes it, so the set only ever decides what is looked at;
* blob files with no record (a crash, or a failed metadata write, between
  moving a blob into place and recording it): every path that moves one into
  place touches its digest first, so within a process the suspects are the
  digests whose touch expires, each checked once; files left by an earlier
  process are found by one walk of the blob files, once per process, after
  the grace;
* uploads: the open sessions and upload files (``Registry.expire_uploads``);
* the recycle bin: one bounded purge sweep (``recycle_bin``) opens each pass,
  so soft-deleted content past its days is reclaimed in the same pass.

Touches older than the grace are dropped as they expire (``Registry.touched``
is kept in touch order), so that map too holds only recent activity. One
collector per registry: the expiry follows its grace.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from . import keys, unreferenced
from .metastore import Batch
from .records import BlobRecord, Event, EventKind, decode
from .registry import Registry

log = structlog.get_logger("georeg.gc")


@dataclass(frozen=True, slots=True)
class CollectionReport:
    blobs_reclaimed: int
    bytes_reclaimed: int
    uploads_expired: int
    candidates: int = 0          # unreferenced blobs looked at
    purged: int = 0              # recycle bin entries purged (``recycle_bin``)


class GarbageCollector:
    def __init__(self, registry: Registry, *, grace_s: float, upload_ttl_s: float,
                 interval_s: float) -> None:
        self.registry = registry
        self.grace_s = grace_s
        self.upload_ttl_s = upload_ttl_s
        self.interval_s = interval_s
        # Digests whose file may have been left without its record in this
        # process (their touch expired, or a removal failed): checked each pass.
        self._suspects: set[str] = set()
        self._walked = False     # the walk of every blob file, once per process

    async def run(self) -> None:
        """Collect every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                report = await self.collect()
            except Exception:  # a failed pass must not stop the next one
                log.exception("gc_failed")
                continue
            if report.blobs_reclaimed or report.uploads_expired or report.purged:
                log.info("gc", blobs=report.blobs_reclaimed, bytes=report.bytes_reclaimed,
                         uploads=report.uploads_expired, purged=report.purged)

    async def collect(self) -> CollectionReport:
        registry = self.registry
        now = registry.monotonic()
        now_ns = registry.wall_ns()
        reclaimed = reclaimed_bytes = 0
        # Soft-deleted entries past their days go first: what only they kept
        # becomes a candidate of this very pass.
        purge = registry.bin.purge()
        candidates: list[str] = []
        if now - registry.started >= self.grace_s:
            candidates = list(registry.meta.unreferenced_blobs())
            for digest in candidates:
                size = self._reclaim(digest, now, now_ns)
                if size is not None:
                    reclaimed += 1
                    reclaimed_bytes += size
                await asyncio.sleep(0)  # stay responsive with many candidates
            reclaimed += await self._sweep_orphan_files()
        expired = await registry.expire_uploads(self.upload_ttl_s)
        return CollectionReport(reclaimed, reclaimed_bytes, expired, len(candidates),
                                purge.purged_manifests + purge.purged_tags)

    async def _sweep_orphan_files(self) -> int:
        """Blob files with no metadata: a crash (or a failed metadata write)
        between moving a finished blob into place and committing it leaves one
        (the client was never told the blob was stored). Removed once older than
        the grace period and not named by a client meanwhile; a commit in flight
        touches its digest first."""
        registry = self.registry
        files: list[tuple[str, float | None]] = []
        if not self._walked:
            files = await registry.run_blocking(lambda: list(registry.blobs.files()))
            self._walked = True
        now, wall = registry.monotonic(), registry.wall_ns() / 1e9
        # Touches that expired: the digests of this process that may have a
        # file without a record. Dropped from ``touched`` (no rule reads an
        # expired touch), in order, until the first one still within the grace.
        expired = []
        for digest, at in registry.touched.items():
            if now - at < self.grace_s:
                break
            expired.append(digest)
        for digest in expired:
            del registry.touched[digest]
        self._suspects.update(expired)
        files += [(digest, None) for digest in self._suspects]
        swept = 0
        for digest, mtime in files:
            if self._sweep_one(digest, mtime, now, wall):
                swept += 1
        if swept:
            log.info("gc_orphan_files", files=swept)
        return swept

    def _sweep_one(self, digest: str, mtime: float | None, now: float, wall: float) -> bool:
        """Remove ``digest``'s file if no record names it, it is older than the
        grace and no client named it within it. ``mtime``: the file's, from the
        walk; ``None`` for a suspect (its file may not exist). Synchronous: the
        check and the removal happen in one loop step."""
        registry = self.registry
        suspect = mtime is None
        self._suspects.discard(digest)
        touched = registry.touched.get(digest)
        if registry.meta.get(keys.blob(digest)) is not None \
                or (touched is not None and now - touched < self.grace_s):
            return False     # recorded, or named again: a suspect again when that touch expires
        if mtime is None:
            try:
                mtime = registry.blobs.path(digest).stat().st_mtime
            except FileNotFoundError:
                return False
        if wall - mtime < self.grace_s:
            if suspect:
                self._suspects.add(digest)   # too young yet: looked at again next pass
            return False
        registry.blobs.delete(digest)  # same loop step as the check
        return True

    def _reclaim(self, digest: str, now: float, now_ns: int) -> int | None:
        """Reclaim one candidate blob if it is garbage; its size if it was.
        Synchronous: decision, metadata and file removal happen without
        yielding to other requests. Every rule is checked here, references
        too: the candidate set decides what is looked at, not what goes."""
        registry = self.registry
        meta = registry.meta
        touched = registry.touched.get(digest)
        if touched is not None and now - touched < self.grace_s:
            return None
        raw = meta.get(keys.blob(digest))
        if raw is None:
            return None
        record = decode(raw, BlobRecord)
        if (now_ns - record.created_ns) / 1e9 < self.grace_s:
            return None
        if unreferenced.referenced(digest, meta.has_prefix):     # live or in a recycle bin
            return None
        batch = Batch()
        for key, _ in meta.scan(keys.blob_users_prefix(digest)):
            repo = keys.parse(key, keys.BlobUserKey).repository
            batch.delete(key)
            batch.delete(keys.blob_link(repo, digest))
            registry.drop_repo_if_emptied(batch, repo)
        batch.delete(keys.blob(digest))
        batch.event(Event(kind=EventKind.BLOB_RECLAIMED, repository="", digest=digest,
                          origin_region=registry.identity.region,
                          origin_zone=registry.identity.zone, acked_ns=now_ns))
        meta.commit(batch)
        try:
            registry.blobs.delete(digest)
        except OSError:
            self._suspects.add(digest)   # a file without its record now: swept later
        registry.touched.pop(digest, None)
        return record.size
