"""Online garbage collection: blobs that no manifest needs, and abandoned uploads.

A blob is reclaimed when no manifest in any repository references it, it was
not named by any client (HEAD, mount, upload, manifest push) within the grace
period, and it was not created within it either. The decision and the removal
of its metadata and file happen in one event-loop step, and every path that is
about to rely on a blob touches it first in an earlier step — so a push that
found a layer already present (HEAD) and then sends its manifest never loses
that layer underneath it. After a restart, the grace period counts from the
start of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import structlog

from . import keys
from .metastore import Batch
from .records import BlobRecord, Event, EventKind, decode
from .registry import Registry

log = structlog.get_logger("georeg.gc")


@dataclass(frozen=True, slots=True)
class CollectionReport:
    blobs_reclaimed: int
    bytes_reclaimed: int
    uploads_expired: int


class GarbageCollector:
    def __init__(self, registry: Registry, *, grace_s: float, upload_ttl_s: float,
                 interval_s: float) -> None:
        self.registry = registry
        self.grace_s = grace_s
        self.upload_ttl_s = upload_ttl_s
        self.interval_s = interval_s

    async def run(self) -> None:
        """Collect every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                report = await self.collect()
            except Exception:  # a failed pass must not stop the next one
                log.exception("gc_failed")
                continue
            if report.blobs_reclaimed or report.uploads_expired:
                log.info("gc", blobs=report.blobs_reclaimed, bytes=report.bytes_reclaimed,
                         uploads=report.uploads_expired)

    async def collect(self) -> CollectionReport:
        registry = self.registry
        meta = registry.meta
        now = registry.monotonic()
        now_ns = registry.wall_ns()
        since_start = now - registry.started
        reclaimed = reclaimed_bytes = 0
        for key, raw in list(meta.scan(keys.BLOB)):
            digest = keys.parse(key, keys.BlobKey).digest
            if self._reclaim(digest, now, now_ns, since_start):
                reclaimed += 1
                reclaimed_bytes += decode(raw, BlobRecord).size
            await asyncio.sleep(0)  # stay responsive on large stores
        reclaimed += await self._sweep_orphan_files()
        expired = await registry.expire_uploads(self.upload_ttl_s)
        return CollectionReport(reclaimed, reclaimed_bytes, expired)

    async def _sweep_orphan_files(self) -> int:
        """Blob files with no metadata: a crash between moving a finished upload
        into place and committing it leaves one (the client was never told the
        blob was stored). Removed once older than the grace period and not
        named by a client meanwhile; a commit in flight touches its digest first."""
        registry = self.registry
        files = await registry.run_blocking(lambda: list(registry.blobs.files()))
        now, wall = registry.monotonic(), registry.wall_ns() / 1e9
        if now - registry.started < self.grace_s:
            return 0
        swept = 0
        for digest, mtime in files:
            touched = registry.touched.get(digest)
            if registry.meta.get(keys.blob(digest)) is not None or wall - mtime < self.grace_s \
                    or (touched is not None and now - touched < self.grace_s):
                continue
            registry.blobs.delete(digest)  # same loop step as the check
            swept += 1
        if swept:
            log.info("gc_orphan_files", files=swept)
        return swept

    def _reclaim(self, digest: str, now: float, now_ns: int, since_start: float) -> bool:
        """Reclaim one blob if it is garbage. Synchronous: decision, metadata and
        file removal happen without yielding to other requests."""
        registry = self.registry
        meta = registry.meta
        if since_start < self.grace_s:
            return False
        touched = registry.touched.get(digest)
        if touched is not None and now - touched < self.grace_s:
            return False
        raw = meta.get(keys.blob(digest))
        if raw is None or (now_ns - decode(raw, BlobRecord).created_ns) / 1e9 < self.grace_s:
            return False
        if meta.has_prefix(keys.ref_prefix(digest)):
            return False
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
        with contextlib.suppress(OSError):
            registry.blobs.delete(digest)
        registry.touched.pop(digest, None)
        return True
