"""The registry's domain logic: repositories, blobs, uploads, manifests, tags
and referrers, over the metadata store and the blob store.

Invariants kept here
    * Referential integrity: a manifest is stored only when every blob it names
      is in its repository (pushed or mounted there, or needed by one of its
      manifests) and every child manifest is; a blob or manifest that a
      manifest of the repository needs cannot be deleted from under it. So a
      node never serves an incomplete image.
    * Every mutation commits its metadata and its replication events in one
      batch (``MetadataStore.commit``); a blob's file is in place and fsynced
      before the batch that makes it visible.
    * A client is answered only once its write is durable: fsynced here and,
      in a zone-redundant region, confirmed by a second zone (``durable``).
      Where the write quorum cannot be met, writes are refused before any
      side effect.
    * A refusal says whether it took effect (``RegistryError.outcome``, the
      wire contract in ``errors``): the quorum check and a full disk refuse
      before anything changes (definite); a failure after a commit — no
      second zone confirmed it, an operation of several commits cut short —
      is indefinite.
    * Check-then-commit sequences run in one event-loop step (the store's
      commit is synchronous), so they are atomic with respect to each other and
      to garbage collection.
    * Nothing of a body whose digest does not match is kept.
    * A client's upload or manifest that would take what this node stores
      (``MetadataStore.usage``) past the storage limit is refused with
      ``403 DENIED`` (``storage_limit_reached``) and nothing of it is kept; the
      limit is the spec's ``storage_limit`` or the live tier's maximum
      (``tiers``). Uploads between their last check and their commit are
      reserved, so concurrent uploads cannot pass it together. Replicated
      content is never refused (a replica that refused would diverge):
      replication can take a node past the limit, and its clients' uploads are
      refused there until deletes and garbage collection make room. Reads,
      deletes, tag moves and mounts add nothing and go on at the limit.
    * A manifest or layers a peer already has are fetched rather than refused
      or answered 404 (``peers``, bounded staleness), when the node has peers.

No HTTP here: streams come in as async iterators of bytes, refusals leave as
``RegistryError``. Time, the HLC and the thread pool are injected.
"""

from __future__ import annotations

import asyncio
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, TypeVar

import msgspec

from . import keys, locks, recycle_bin, tiers
from . import manifest as manifests
from .blob_repair import BlobRepair, being_repaired
from .blobstore import BlobStore, UploadFile
from .clock import ClockGuard, WallClock
from .crypto import BlobCorrupt, SealedBlob, Sealer
from .durability import LocalDurability, WriteQuorum
from .errors import ErrorCode, RegistryError, storage_failure, storage_limit_reached
from .hlc import HybridLogicalClock
from .metastore import Batch, MetadataStore
from .records import (
    RETENTION_REQUEST,
    BlobLink,
    BlobRecord,
    ChangeableAttributes,
    ClientRequest,
    Descriptor,
    Event,
    EventKind,
    ManifestRecord,
    NodeIdentity,
    RecycledManifest,
    RepoRecord,
    Stamp,
    TagRecord,
    Tombstone,
    UntaggedNote,
    UploadRecord,
    decode,
    encode,
    stamp_of,
)
from .reference import Digest, is_digest, validate_name, validate_tag
from .staleness import PeerContent
from .storage_faults import is_io_error

T = TypeVar("T")
RunBlocking = Callable[[Callable[..., T]], Awaitable[T]]

# Work handed to a thread in pieces of this size, so hashing and encryption of
# one piece overlap with receiving the next.
PIPELINE_CHUNK = 1 << 20


async def _settled(write: Awaitable[None]) -> None:
    """Wait until a queued write has run, even through cancellations (each
    shielded from it; the last is raised again once it has run). Its own
    error is taken here (a body that fails is failing already for a reason
    its caller gives), so none is left unretrieved."""
    cancelled = False
    future = asyncio.ensure_future(write)
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled = cancelled or not future.cancelled()
        except Exception:       # retrieved below; the caller raises its own error
            pass
    if not future.cancelled():
        future.exception()
    if cancelled:
        raise asyncio.CancelledError


@dataclass(frozen=True, slots=True)
class Limits:
    max_blob_size: int = 200 * 1024**3          # ACR's layer limit
    max_manifest_size: int = manifests.MAX_MANIFEST_SIZE
    # Bytes of blobs and manifests a node may hold before clients' uploads are
    # refused; None: the registry maximum of the live tier (``tiers``).
    max_storage: int | None = None


@dataclass(frozen=True, slots=True)
class BlobInfo:
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class StoredManifest:
    digest: str
    media_type: str
    size: int
    record: ManifestRecord


@dataclass(frozen=True, slots=True)
class PutManifestResult:
    digest: str
    subject: str | None


@dataclass(frozen=True, slots=True)
class _RestorePlan:
    """What a restore writes (``Registry._restore_plan``)."""

    digest: str
    entry: RecycledManifest | None          # None: the manifest is live, tags only
    body: bytes | None
    parsed: manifests.ParsedManifest | None
    to_set: tuple[str, ...]
    moved: dict[str, str]                   # tag -> what it named before (force)
    missing: tuple[str, ...]                # blobs not held here


@dataclass
class _OpenUpload:
    repository: str
    file: UploadFile
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = 0.0


class Registry:
    def __init__(
        self,
        meta: MetadataStore,
        blobs: BlobStore,
        manifest_sealer: Sealer,
        identity: NodeIdentity,
        *,
        run_blocking: RunBlocking,
        hlc: HybridLogicalClock | None = None,
        wall_ns: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
        limits: Limits = Limits(),
        quorum: WriteQuorum | None = None,
        peers: PeerContent | None = None,
        clock: ClockGuard | None = None,
    ) -> None:
        self.meta = meta
        self.blobs = blobs
        self.identity = identity
        self.limits = limits
        self.quorum: WriteQuorum = quorum or LocalDurability()
        self.peers: PeerContent | None = peers
        self.sealer = manifest_sealer
        self.run_blocking = run_blocking
        self._monotonic = monotonic
        # The node's wall clock and whether it may stamp writes (``clock``); the
        # HLC's physical part is that clock's, skew and all.
        self.clock = clock or ClockGuard(WallClock(wall_ns), monotonic)
        self._wall_ns = self.clock.clock.now_ns
        stored = meta.get(keys.HLC)
        self.hlc = hlc or HybridLogicalClock(
            self.clock.clock.now_ms, last=int(stored) if stored else 0,
            max_ahead_ms=int(self.clock.max_offset_s * 1000))
        self._uploads: dict[str, _OpenUpload] = {}
        # Last time each blob was named by a client (HEAD, mount, commit,
        # manifest push): garbage collection spares blobs touched within its
        # grace. In touch order (``touch``); GC drops the touches that expire.
        self.touched: dict[str, float] = {}
        self.started = monotonic()
        # The registry's live tier (its storage maximum); the node wires it to
        # its configuration (``Configuration.tier``).
        self.tier: Callable[[], str] = lambda: tiers.DEFAULT_TIER
        # Bytes of uploads that passed the storage check and are not committed yet.
        self._reserved = 0
        # Changeable attributes (ACR's locks), checked before any change they forbid.
        self.locks = locks.Locks(meta)
        # Bit rot: quarantined and fetched again (replication sets its sources).
        self.repair = BlobRepair(blobs, run_blocking, wall_ns=wall_ns, monotonic=monotonic,
                                 recorded=lambda digest: meta.get(keys.blob(digest)) is not None)
        # Soft delete: what deletes keep, and for how long (``recycle_bin``).
        self.bin = recycle_bin.RecycleBin(meta, wall_ns)

    # -- helpers -------------------------------------------------------------

    def touch(self, digest: str) -> None:
        # Moved to the end, not updated in place: the map stays in touch order,
        # so garbage collection finds the expired touches at its front.
        self.touched.pop(digest, None)
        self.touched[digest] = self._monotonic()

    def wall_ns(self) -> int:
        return self._wall_ns()

    def check_writable(self) -> None:
        """Refuse a client's write before any side effect (definite 503): no
        write quorum, or a clock this node must not stamp with (``clock``)."""
        self.quorum.check_writable()
        self.clock.check_writable(self.hlc.last)

    def monotonic(self) -> float:
        return self._monotonic()

    def _event(self, kind: EventKind, repository: str, stamp: int, **fields: Any) -> Event:
        return Event(kind=kind, repository=repository, origin_region=self.identity.region,
                     origin_zone=self.identity.zone, hlc=stamp, acked_ns=self._wall_ns(),
                     **fields)

    def stamp_over(self, batch: Batch, *replaced: int) -> int:
        """The stamp of a local write, which every register write takes: the
        HLC's next, and above ``replaced``, the stamps of the registers it
        replaces (``held``), however far ahead a peer's clock put them. A
        write made after seeing a value wins over it on every replica."""
        stamp = self.hlc.after(*replaced)
        batch.put(keys.HLC, str(self.hlc.last).encode())
        return stamp

    def held(self, *registers: tuple[bytes, type]) -> int:
        """The HLC of what the register holds: its value or its tombstone
        (``(key, record type)`` each; 0 when it holds nothing)."""
        stamps = [0]
        for key, kind in registers:
            raw = self.meta.get(key)
            if raw is not None:
                stamps.append(decode(raw, kind).hlc)
        return max(stamps)

    def tag_held(self, repo: str, tag: str) -> int:
        return self.held((keys.tag(repo, tag), TagRecord), (keys.tag_tomb(repo, tag), Tombstone))

    def manifest_held(self, repo: str, digest: str) -> int:
        return self.held((keys.manifest(repo, digest), ManifestRecord),
                         (keys.manifest_tomb(repo, digest), Tombstone))

    def link_held(self, repo: str, digest: str) -> int:
        return self.held((keys.blob_link(repo, digest), BlobLink),
                         (keys.blob_tomb(repo, digest), Tombstone))

    def _tombstone(self, stamp: int, digest: str = "") -> bytes:
        return encode(Tombstone(stamp, self.identity.region, self.identity.zone, digest))

    async def _commit(self, batch: Batch) -> list[Event]:
        """Commit a client's mutation and wait until it is durable: fsynced here,
        and on the write quorum."""
        events = self.meta.commit(batch)
        await self.durable(events[-1].seq if events else 0)
        return events

    async def durable(self, seq: int | None = None) -> None:
        """Wait until what this node committed up to log sequence ``seq`` (default:
        everything so far) is fsynced here and confirmed by the write quorum. A
        write that changes nothing calls it too: it may be the retry of one that
        got an indefinite 503, stored here but not yet confirmed."""
        await self.meta.synced()
        seq = self.meta.last_seq if seq is None else seq
        if seq:
            await self.quorum.wait_durable(seq)

    def ensure_repo(self, batch: Batch, name: str) -> None:
        if self.meta.get(keys.repo(name)) is None and keys.repo(name) not in batch.puts:
            batch.put(keys.repo(name), encode(RepoRecord(created_ns=self._wall_ns())))

    def drop_repo_if_emptied(self, batch: Batch, name: str) -> None:
        for key, _ in self.meta.scan(keys.repo_prefix(name)):
            if key not in batch.deletes:
                return
        if not any(keys.in_repository(k, name) for k in batch.puts):
            batch.delete(keys.repo(name))

    # -- the storage limit ------------------------------------------------------

    def storage_limit(self) -> tuple[int, str]:
        """The bytes this node may hold before clients' uploads are refused,
        and what sets it (for the refusal's message)."""
        if self.limits.max_storage is not None:
            return self.limits.max_storage, "the registry's storage_limit"
        tier = self.tier()
        return tiers.limits(tier).maximum_storage, f"the {tier} tier's registry maximum"

    def storage_room(self) -> int:
        """Bytes a client may still add (negative: replication took the node past it)."""
        limit, _ = self.storage_limit()
        return limit - self.meta.usage.bytes - self._reserved

    def check_storage(self, adding: int) -> None:
        """Refuse a client's write of ``adding`` new bytes that would pass the
        storage limit (``storage_limit_reached``: 403 DENIED, nothing changed)."""
        if adding > self.storage_room():
            limit, source = self.storage_limit()
            raise storage_limit_reached(limit, source, self.meta.usage.bytes + self._reserved,
                                        adding)

    def repository_exists(self, name: str) -> bool:
        return self.meta.get(keys.repo(name)) is not None

    # -- blobs ---------------------------------------------------------------

    def blob_visible(self, repo: str, digest: str) -> bool:
        """A blob is in a repository when linked there (pushed or mounted) or
        needed by one of its manifests (replicated content arrives that way)."""
        return (self.meta.get(keys.blob_link(repo, digest)) is not None
                or self.meta.has_prefix(keys.ref_repo_prefix(digest, repo)))

    def referenced(self, repo: str, digest: str) -> bool:
        """A manifest held in ``repo`` references ``digest`` (whether or not the
        blob itself is here)."""
        return self.meta.has_prefix(keys.ref_repo_prefix(digest, repo))

    def stat_blob(self, repo: str, digest: Digest) -> BlobInfo:
        if self.blob_visible(repo, digest):
            raw = self.meta.get(keys.blob(digest))
            if raw is not None:
                self.touch(digest)
                return BlobInfo(digest, decode(raw, BlobRecord).size)
        raise RegistryError(ErrorCode.BLOB_UNKNOWN, {"digest": str(digest)})

    def open_blob(self, repo: str, digest: Digest) -> SealedBlob:
        """Open a blob for reading (file IO of a few microseconds; no data read)."""
        self.stat_blob(repo, digest)
        try:
            return self.blobs.open(digest)
        except FileNotFoundError:
            raise RegistryError(ErrorCode.BLOB_UNKNOWN, {"digest": str(digest)}) from None

    async def read_blob(self, repo: str, digest: Digest) -> SealedBlob:
        """Open a blob for a client's GET. A copy that fails authentication is
        never served: it is repaired first (``blob_repair``), or the
        ``RegistryError`` says why not."""
        self.stat_blob(repo, digest)
        try:
            return self.blobs.open(digest)
        except FileNotFoundError:
            if not self.repair.missing_after_rot(digest):
                raise RegistryError(ErrorCode.BLOB_UNKNOWN, {"digest": str(digest)}) from None
            await self.repair.mend(digest, "its file was quarantined")
        except BlobCorrupt as exc:
            await self.repair.mend(digest, str(exc))
        try:
            return self.blobs.open(digest)
        except (FileNotFoundError, BlobCorrupt) as exc:
            raise being_repaired(digest, str(exc)) from None

    async def delete_blob(self, repo: str, digest: Digest) -> None:
        if not self.blob_visible(repo, digest):
            raise RegistryError(ErrorCode.BLOB_UNKNOWN, {"digest": str(digest)})
        for key, _ in self.meta.scan(keys.ref_repo_prefix(digest, repo)):
            user = keys.parse(key, keys.RefKey).manifest
            raise RegistryError(
                ErrorCode.DENIED,
                f"blob {digest} is used by manifest {user} in {repo}; delete that manifest first",
                message="blob is in use",
            )
        self.locks.check_delete_blob(repo)
        self.check_writable()
        batch = Batch()
        stamp = self.stamp_over(batch, self.link_held(repo, digest))
        batch.delete(keys.blob_link(repo, digest))
        batch.delete(keys.blob_user(digest, repo))
        batch.put(keys.blob_tomb(repo, digest), self._tombstone(stamp))
        batch.event(self._event(EventKind.BLOB_DELETE, repo, stamp, digest=digest))
        self.drop_repo_if_emptied(batch, repo)
        await self._commit(batch)

    async def mount_blob(self, repo: str, digest: Digest, source: str) -> bool:
        """Link a blob of ``source`` into ``repo``; False when ``source`` lacks it."""
        validate_name(source)
        self.locks.check_upload(repo)
        if not self.blob_visible(source, digest):
            return False
        raw = self.meta.get(keys.blob(digest))
        if raw is None:
            return False
        self.touch(digest)
        if self.meta.get(keys.blob_link(repo, digest)) is not None:
            self.check_writable()
            await self.durable()  # as a no-op manifest push
            return True
        self.check_writable()
        batch = Batch()
        stamp = self.stamp_over(batch, self.link_held(repo, digest))
        self.link(batch, repo, digest, stamp, self.identity.region, self.identity.zone)
        batch.event(self._event(EventKind.BLOB_MOUNT, repo, stamp, digest=digest,
                                size=decode(raw, BlobRecord).size, source_repository=source))
        await self._commit(batch)
        return True

    def link(self, batch: Batch, repo: str, digest: str, stamp: int, origin_region: str,
             origin_zone: str) -> None:
        """Link a blob into a repository (the register's present state)."""
        self.ensure_repo(batch, repo)
        batch.put(keys.blob_link(repo, digest), encode(BlobLink(
            self._wall_ns(), stamp, origin_region, origin_zone)))
        batch.put(keys.blob_user(digest, repo), b"")
        batch.delete(keys.blob_tomb(repo, digest))

    # -- uploads -------------------------------------------------------------

    async def start_upload(self, repo: str) -> str:
        self.check_writable()  # refuse before the client sends a single layer byte
        self.check_storage(1)         # likewise once the node holds all it may
        self.locks.check_upload(repo)
        upload_id = str(uuidlib.uuid4())
        file = self.blobs.create_upload(upload_id)
        batch = Batch()
        batch.put(keys.upload(upload_id), encode(UploadRecord(repo, self._wall_ns())))
        try:
            self.meta.commit(batch)
        except OSError:             # no session without its record: nothing is left
            self.blobs.discard_upload(file)
            raise
        self._uploads[upload_id] = _OpenUpload(repo, file, last_used=self._monotonic())
        return upload_id

    async def _open_upload(self, repo: str, upload_id: str) -> _OpenUpload:
        upload = self._uploads.get(upload_id)
        if upload is None:
            raw = self.meta.get(keys.upload(upload_id))
            if raw is None:
                raise RegistryError(ErrorCode.BLOB_UPLOAD_UNKNOWN, {"upload": upload_id})
            record = decode(raw, UploadRecord)
            try:
                file = await self.run_blocking(lambda: self.blobs.resume_upload(upload_id))
            except (FileNotFoundError, ValueError):
                raise RegistryError(ErrorCode.BLOB_UPLOAD_UNKNOWN, {"upload": upload_id}) from None
            except BlobCorrupt:
                # Sealed but not yet moved into place when the process died (or torn):
                # it cannot take more bytes, so the session ends and the client starts
                # over, a definite error (no blob was stored from this session).
                await self.run_blocking(lambda: self.blobs.discard_upload_file(upload_id))
                self._forget_upload(upload_id)
                raise RegistryError(ErrorCode.BLOB_UPLOAD_UNKNOWN, {"upload": upload_id}) from None
            upload = self._uploads.setdefault(upload_id, _OpenUpload(record.repository, file))
            if upload.file is not file:  # another request resumed it meanwhile: use that one
                file.close()
        if upload.repository != repo:
            raise RegistryError(ErrorCode.BLOB_UPLOAD_UNKNOWN, {"upload": upload_id})
        upload.last_used = self._monotonic()
        return upload

    async def upload_offset(self, repo: str, upload_id: str) -> int:
        upload = await self._open_upload(repo, upload_id)
        return upload.file.size

    async def append_upload(
        self,
        repo: str,
        upload_id: str,
        chunks: AsyncIterator[bytes],
        start: int | None = None,
        length: int | None = None,
    ) -> int:
        """Append a chunk; ``start`` (from Content-Range) must equal the current
        offset. Returns the new offset."""
        self.check_writable()
        upload = await self._open_upload(repo, upload_id)
        async with upload.lock:
            offset = upload.file.size
            if start is not None and start != offset:
                raise _range_error(offset, f"chunk starts at {start}, the upload has {offset} bytes")
            try:
                await self.receive(upload.file, chunks, length, counted=True)
            except (RegistryError, OSError) as exc:
                await self._end_if_refused(upload_id, upload, exc)
                raise
            await self.run_blocking(upload.file.flush)
            upload.last_used = self._monotonic()
            return upload.file.size

    async def _end_if_refused(self, upload_id: str, upload: _OpenUpload,
                              exc: RegistryError | OSError) -> None:
        """An upload refused for a limit (the blob size limit, the storage
        limit) or failed by the disk with EIO ends: nothing of it is kept, and
        the client starts over — so an EIO answer is definite (the session
        holds nothing it did not acknowledge, because it holds nothing). A
        full disk does not end it: the client resumes once space is freed."""
        if is_io_error(exc) or (isinstance(exc, RegistryError)
                                and (exc.status == 413 or exc.code is ErrorCode.DENIED)):
            await self._drop_upload(upload_id, upload.file)

    async def _drop_upload(self, upload_id: str, file: UploadFile) -> None:
        """End a session: its file goes, then its record. A disk that fails the
        record's removal leaves a record without a file, which answers
        ``BLOB_UPLOAD_UNKNOWN`` and is swept when it expires."""
        await self.run_blocking(lambda: self.blobs.discard_upload(file))
        try:
            self._forget_upload(upload_id)
        except OSError:
            pass

    async def receive(self, file: UploadFile, chunks: AsyncIterator[bytes],
                       expected: int | None, *, counted: bool = False) -> None:
        """Feed a body into an upload, hashing and encrypting in a worker thread
        while the next piece is received. ``counted``: a client's upload of a
        blob this node may not hold yet, refused as soon as its bytes would
        pass the storage limit (replication's transfers never are).

        The limits are checked against the upload's size before this body
        plus the body's bytes so far: ``file.size`` grows behind the loop as
        the worker writes, so reading it inside would count a byte twice.
        Whatever ends the body (a limit, a short body, the client gone, a
        cancellation) ends it only once no write is queued: the caller
        discards the upload next, and a write still queued would land on a
        closed descriptor, or on whatever file reused its number."""
        limit = self.limits.max_blob_size
        room = self.storage_room() if counted else None
        base = file.size
        buffered: list[bytes] = []
        buffered_len = 0
        in_flight: Awaitable[None] | None = None
        received = 0
        try:
            async for chunk in chunks:
                received += len(chunk)
                if base + received > limit:
                    raise RegistryError(ErrorCode.SIZE_INVALID,
                                        f"blob exceeds the {limit}-byte limit", status=413)
                if room is not None and base + received > room:
                    self.check_storage(base + received)   # unless deletes made room since
                    room = self.storage_room()
                buffered.append(chunk)
                buffered_len += len(chunk)
                if buffered_len >= PIPELINE_CHUNK:
                    data = b"".join(buffered)
                    buffered, buffered_len = [], 0
                    if in_flight is not None:
                        await asyncio.shield(in_flight)
                    in_flight = self.run_blocking(lambda d=data: file.write(d))
            if buffered:
                data = b"".join(buffered)
                if in_flight is not None:
                    await asyncio.shield(in_flight)
                in_flight = None
                if len(data) < 64 * 1024:
                    file.write(data)
                else:
                    in_flight = self.run_blocking(lambda: file.write(data))
            if in_flight is not None:
                await asyncio.shield(in_flight)
        except BaseException:
            if in_flight is not None:
                await _settled(in_flight)
            raise
        if expected is not None and received != expected:
            raise RegistryError(ErrorCode.SIZE_INVALID,
                                f"body has {received} bytes, Content-Length said {expected}")

    async def complete_upload(
        self,
        repo: str,
        upload_id: str,
        digest: Digest,
        chunks: AsyncIterator[bytes] | None = None,
        start: int | None = None,
        length: int | None = None,
    ) -> BlobInfo:
        upload = await self._open_upload(repo, upload_id)
        async with upload.lock:
            if chunks is not None:
                offset = upload.file.size
                if start is not None and start != offset:
                    raise _range_error(offset, f"chunk starts at {start}, the upload has {offset} bytes")
                try:
                    await self.receive(upload.file, chunks, length,
                                       counted=self.meta.get(keys.blob(digest)) is None)
                except (RegistryError, OSError) as exc:
                    await self._end_if_refused(upload_id, upload, exc)
                    raise
            try:
                info = await self._commit_upload(repo, upload.file, digest)
            except RegistryError:  # wrong digest: the upload is gone, say so next time
                self._forget_upload(upload_id)
                raise
            except OSError as exc:
                # The disk failed the seal, the rename or the record with EIO: the
                # session ends (its file may be in place already, without a record:
                # garbage collection sweeps it, a push of the blob again adopts it).
                # A full disk leaves it, to be completed once space is freed.
                if is_io_error(exc):
                    await self._drop_upload(upload_id, upload.file)
                raise
            try:
                self._forget_upload(upload_id)
            except OSError:
                # The blob is stored and acknowledged by the quorum: a disk that
                # filled since must not turn that into a failure (a 507 says
                # nothing happened). The session's record is swept when it expires.
                pass
            return info

    async def put_blob(self, repo: str, digest: Digest, chunks: AsyncIterator[bytes],
                       length: int | None) -> BlobInfo:
        """A whole blob in one request (``POST …/uploads/?digest=``)."""
        self.check_writable()
        self.locks.check_upload(repo)
        upload_id = str(uuidlib.uuid4())
        file = self.blobs.create_upload(upload_id, digest.algorithm)
        try:
            await self.receive(file, chunks, length,
                               counted=self.meta.get(keys.blob(digest)) is None)
            return await self._commit_upload(repo, file, digest)
        except BaseException:
            # Nothing of a failed request is kept (its file may be in place
            # already if the disk failed the record: see ``complete_upload``).
            await self.run_blocking(lambda: self.blobs.discard_upload(file))
            raise

    async def _commit_upload(self, repo: str, file: UploadFile, digest: Digest) -> BlobInfo:
        actual = await self.run_blocking(lambda: file.digest(digest.algorithm))
        if actual != digest:
            await self.run_blocking(lambda: self.blobs.discard_upload(file))
            raise RegistryError(ErrorCode.DIGEST_INVALID,
                                {"expected": str(digest), "computed": actual})
        size = file.size
        self.check_writable()
        reserved, seq = 0, 0
        events: list[Event] = []
        if self.meta.get(keys.blob(digest)) is None:
            try:
                self.check_storage(size)
            except RegistryError:
                await self.run_blocking(lambda: self.blobs.discard_upload(file))
                raise
            # Counted from here until its record is (same step as the check).
            reserved = size
            self._reserved += reserved
        try:
            self.touch(digest)  # before the file lands, so GC cannot take it meanwhile
            await self.run_blocking(lambda: self.blobs.commit_upload(file, digest))
            if self.meta.get(keys.blob(digest)) is not None \
                    and self.meta.get(keys.blob_link(repo, digest)) is not None:
                # Uploaded again into a repository that has it: nothing changes, so
                # nothing is logged (every replica would apply and log it again).
                seq = self.meta.last_seq
            else:
                batch = Batch()
                stamp = self.stamp_over(batch, self.link_held(repo, digest))
                if self.meta.get(keys.blob(digest)) is None:
                    batch.put(keys.blob(digest), encode(BlobRecord(size, self._wall_ns())))
                self.link(batch, repo, digest, stamp, self.identity.region, self.identity.zone)
                batch.event(self._event(EventKind.BLOB_PUT, repo, stamp, digest=digest,
                                        size=size))
                events = self.meta.commit(batch)
        finally:
            self._reserved -= reserved
        if not events:
            await self.quorum.wait_durable(seq)  # as a no-op manifest push
            return BlobInfo(digest, size)
        await self.durable(events[-1].seq)
        return BlobInfo(digest, size)

    def _forget_upload(self, upload_id: str) -> None:
        self._uploads.pop(upload_id, None)
        batch = Batch()
        batch.delete(keys.upload(upload_id))
        self.meta.commit(batch)

    async def cancel_upload(self, repo: str, upload_id: str) -> None:
        upload = await self._open_upload(repo, upload_id)
        async with upload.lock:
            await self.run_blocking(lambda: self.blobs.discard_upload(upload.file))
            self._forget_upload(upload_id)

    async def expire_uploads(self, older_than_s: float) -> int:
        """Drop upload sessions idle for longer than ``older_than_s``."""
        now_mono, now_ns = self._monotonic(), self._wall_ns()
        expired = 0
        for key, raw in list(self.meta.scan(keys.UPLOAD)):
            upload_id = keys.parse(key, keys.UploadKey).upload_id
            open_upload = self._uploads.get(upload_id)
            if open_upload is not None:
                if open_upload.lock.locked() or now_mono - open_upload.last_used < older_than_s:
                    continue
            elif (now_ns - decode(raw, UploadRecord).started_ns) / 1e9 < older_than_s \
                    or now_mono - self.started < older_than_s:
                continue
            if open_upload is not None:
                await self.run_blocking(lambda u=open_upload: self.blobs.discard_upload(u.file))
            else:
                await self.run_blocking(lambda i=upload_id: self.blobs.discard_upload_file(i))
            self._forget_upload(upload_id)
            expired += 1
        # Files with no session: single-request uploads cut short by a crash.
        if now_mono - self.started >= older_than_s:
            for upload_id in await self.run_blocking(self.blobs.upload_ids):
                if upload_id not in self._uploads and self.meta.get(keys.upload(upload_id)) is None:
                    await self.run_blocking(lambda i=upload_id: self.blobs.discard_upload_file(i))
        return expired

    # -- manifests -----------------------------------------------------------

    def _resolve(self, repo: str, reference: str) -> str | None:
        if is_digest(reference):
            return str(Digest.parse(reference))
        raw = self.meta.get(keys.tag(repo, reference))
        return decode(raw, TagRecord).digest if raw is not None else None

    async def find_manifest(self, repo: str, reference: str) -> StoredManifest:
        """A client's pull: ``stat_manifest``, but a manifest a peer already has
        is fetched rather than answered with 404 (bounded staleness), and one
        whose attributes forbid reading it is refused (``locks``)."""
        try:
            stored = self.stat_manifest(repo, reference)
        except RegistryError as exc:
            if exc.code is not ErrorCode.MANIFEST_UNKNOWN or self.peers is None:
                raise
            if not await self.peers.fetch_manifest(repo, reference):
                raise
            stored = self.stat_manifest(repo, reference)
        self.locks.check_read(repo, None if is_digest(reference) else reference, stored.digest)
        return stored

    def stat_manifest(self, repo: str, reference: str) -> StoredManifest:
        if not is_digest(reference):
            try:
                validate_tag(reference)
            except RegistryError:  # an impossible tag names nothing: 404, as the spec's tests expect
                raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, {"reference": reference}) from None
        digest = self._resolve(repo, reference)
        raw = self.meta.get(keys.manifest(repo, digest)) if digest else None
        if raw is None:
            raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, {"reference": reference})
        record = decode(raw, ManifestRecord)
        return StoredManifest(digest, record.media_type, record.size, record)

    def manifest_body(self, stored: StoredManifest) -> bytes:
        return self.sealer.open(stored.record.sealed_body, manifest_ad(stored.digest))

    async def put_manifest(self, repo: str, reference: str, body: bytes,
                           content_type: str | None, *,
                           request: ClientRequest | None = None) -> PutManifestResult:
        """Store a manifest (by digest, or by tag: the tag then points at it).
        ``request``: the client's, kept with the events (webhooks report it)."""
        if len(body) > self.limits.max_manifest_size:
            raise manifest_too_large(self.limits.max_manifest_size)
        tag = None
        if is_digest(reference):
            expected = Digest.parse(reference)
            digest = Digest.of(body, expected.algorithm)
            if digest != expected:
                raise RegistryError(ErrorCode.DIGEST_INVALID,
                                    {"expected": str(expected), "computed": str(digest)})
        else:
            tag = validate_tag(reference)
            digest = Digest.of(body)
        parsed = manifests.parse(body, content_type)
        for needed in parsed.blobs:
            self.touch(needed)
        missing = self.missing_references(repo, parsed)
        fetched: set[str] = set()
        if missing and self.peers is not None:
            # The layers may have gone to another replica (routing moved between the
            # blob uploads and this manifest): bring them here rather than refuse.
            fetched = await self.peers.fetch_blobs(repo, [d for d in missing
                                                          if d not in parsed.children])
            for child in parsed.children:
                if child in missing and await self.peers.fetch_manifest(repo, child):
                    fetched.add(child)
            missing = [d for d in self.missing_references(repo, parsed)
                       if d not in fetched or self.meta.get(keys.blob(d)) is None
                       and self.meta.get(keys.manifest(repo, d)) is None]
        if missing:
            raise RegistryError(ErrorCode.MANIFEST_BLOB_UNKNOWN,
                                {"missing": missing[:20], "count": len(missing)})
        self.check_writable()
        new_manifest = self.meta.get(keys.manifest(repo, digest)) is None
        if new_manifest:
            self.check_storage(len(body))   # no await from here to the commit
        batch = Batch()
        # Above the manifest's register (a new value, or renewed by the tag
        # set) and the tag's.
        hlc = self.stamp_over(batch, self.manifest_held(repo, digest),
                              self.tag_held(repo, tag) if tag is not None else 0)
        origin = (self.identity.region, self.identity.zone)
        acked = self._wall_ns()
        tag_moves = False
        if tag is not None:
            current = self.meta.get(keys.tag(repo, tag))
            tag_moves = current is None or decode(current, TagRecord).digest != digest
        self.locks.check_push(repo, tag, tag_moves)
        artifact_type = parsed.artifact_type or ""
        if new_manifest:
            self.stage_manifest(batch, repo, digest, body, parsed, (hlc, *origin), acked)
            # Names the tag it came with when its TAG_SET is in the same batch:
            # webhooks fire one push for the put, at the tag set, on every replica.
            batch.event(self._event(EventKind.MANIFEST_PUT, repo, hlc, digest=digest,
                                    tag=tag if tag_moves and tag is not None else "",
                                    media_type=parsed.media_type, size=len(body),
                                    references=parsed.references, subject=parsed.subject or "",
                                    artifact_type=artifact_type, request=request))
        if tag is not None and tag_moves:
            self.stage_tag(batch, repo, tag, digest, (hlc, *origin), acked)
            batch.event(self._event(EventKind.TAG_SET, repo, hlc, digest=digest, tag=tag,
                                    media_type=parsed.media_type, size=len(body),
                                    artifact_type=artifact_type, request=request))
        if batch.events:
            await self._commit(batch)
        else:
            await self.durable()  # nothing new, but perhaps the retry of an unconfirmed write
        return PutManifestResult(digest, parsed.subject)

    def missing_references(self, repo: str, parsed: manifests.ParsedManifest) -> list[str]:
        """What a manifest needs that the repository does not hold."""
        missing = [d for d in parsed.blobs
                   if not self.blob_visible(repo, d) or self.meta.get(keys.blob(d)) is None]
        missing += [d for d in parsed.children if self.meta.get(keys.manifest(repo, d)) is None]
        return missing

    def stage_manifest(self, batch: Batch, repo: str, digest: str, body: bytes,
                       parsed: manifests.ParsedManifest, stamp: Stamp, origin_acked_ns: int) -> None:
        """Add a manifest, its reference index and its referrer entry to ``batch``."""
        self.ensure_repo(batch, repo)
        hlc, origin_region, origin_zone = stamp
        record = ManifestRecord(
            media_type=parsed.media_type, size=len(body),
            sealed_body=self.sealer.seal(body, manifest_ad(digest)),
            references=parsed.references, subject=parsed.subject or "",
            # Annotations stay out of the record: they are client data, kept only
            # sealed (in the body, and in the referrer descriptor below).
            artifact_type=parsed.artifact_type or "", created_ns=self._wall_ns(),
            hlc=hlc, origin_region=origin_region, origin_zone=origin_zone,
            origin_acked_ns=origin_acked_ns, pushed_region=origin_region,
        )
        batch.put(keys.manifest(repo, digest), encode(record))
        batch.delete(keys.manifest_tomb(repo, digest))
        self.bin.stage_manifest_end(batch, repo, digest)     # back: no longer deleted
        for target in parsed.references:
            batch.put(keys.ref(target, repo, digest), b"")
        # Retention's clock starts at an untag, never at a push (a multi-arch
        # build pushes its platforms by digest, then the index).
        for child in parsed.children:
            self.stage_untagged(batch, repo, child, None)
        if parsed.subject:
            key = keys.referrer(repo, parsed.subject, digest)
            descriptor = _descriptor(digest, record, parsed.annotations)
            batch.put(key, self.sealer.seal(encode(descriptor), _referrer_ad(key)))

    def stage_manifest_removal(self, batch: Batch, repo: str, digest: str,
                               record: ManifestRecord, hlc: int) -> None:
        """Remove a manifest (``hlc``: its delete's stamp)."""
        batch.delete(keys.manifest(repo, digest))
        batch.delete(keys.untagged(record.residency_region, repo, digest))
        for target in record.references:
            batch.delete(keys.ref(target, repo, digest))
            # A child manifest this index held may be untagged from now on.
            if self._held(batch, keys.manifest(repo, target)):
                self.stage_untagged(batch, repo, target, hlc)
        if record.subject:
            batch.delete(keys.referrer(repo, record.subject, digest))
        # So may the referrers of what goes: their subject no longer holds them.
        for key, _ in self.meta.scan(keys.referrer_prefix(repo, digest)):
            self.stage_untagged(batch, repo, keys.parse(key, keys.ReferrerKey).referrer, hlc)

    def stage_tag(self, batch: Batch, repo: str, tag: str, digest: str, stamp: Stamp,
                  origin_acked_ns: int) -> None:
        """Point a tag at a manifest. A tag set also renews the manifest's own
        register, so a concurrent, older delete of that manifest loses to it
        everywhere, in whatever order the two arrive."""
        hlc, origin_region, origin_zone = stamp
        current = batch.puts.get(keys.tag(repo, tag)) or self.meta.get(keys.tag(repo, tag))
        if current is not None and (left := decode(current, TagRecord).digest) != digest:
            self.stage_untagged(batch, repo, left, hlc)
        batch.put(keys.tag(repo, tag), encode(TagRecord(digest, hlc, origin_region, origin_zone,
                                                        origin_acked_ns, self._wall_ns())))
        batch.delete(keys.tag_tomb(repo, tag))
        self.stage_untagged(batch, repo, digest, None)
        self.bin.stage_tag_end(batch, repo, tag)
        raw = batch.puts.get(keys.manifest(repo, digest)) or self.meta.get(keys.manifest(repo, digest))
        if raw is not None:
            record = decode(raw, ManifestRecord)
            if stamp_of(record) < stamp:
                batch.put(keys.manifest(repo, digest), encode(msgspec.structs.replace(
                    record, hlc=hlc, origin_region=origin_region, origin_zone=origin_zone)))

    def stage_untagged(self, batch: Batch, repo: str, digest: str, hlc: int | None) -> None:
        """Note that ``digest`` may have just become untagged: a tag or what
        held it (an index, a referrer's subject) left it by the change stamped
        ``hlc`` (``untagged``: the retention sweep checks before it acts, so a
        note on a manifest still tagged only costs that check). Every change
        overwrites it, so it holds the stamp of the last change that left the
        manifest: retention's delete carries that stamp, so any tag or push
        stamped after it wins everywhere. ``hlc`` None: it is tagged or held
        again, the note goes. Keyed by the region the manifest was first
        pushed in, whose sweep alone reads it."""
        if not self._held(batch, keys.manifest(repo, digest)):
            return
        raw = batch.puts.get(keys.manifest(repo, digest)) or self.meta.get(keys.manifest(repo, digest))
        key = keys.untagged(decode(raw, ManifestRecord).residency_region, repo, digest)
        if hlc is None:
            batch.delete(key)
        else:
            batch.put(key, encode(UntaggedNote(self._wall_ns(), hlc)))

    def _held(self, batch: Batch, key: bytes) -> bool:
        """Whether ``key`` is stored once ``batch`` commits."""
        return key not in batch.deletes and (key in batch.puts or self.meta.get(key) is not None)

    def stage_tags_removal(self, batch: Batch, repo: str, digest: str, stamp: Stamp) -> list[str]:
        """Remove every tag pointing at ``digest`` that is older than ``stamp``
        (a delete of that manifest). Each tombstone keeps the stamp of the tag
        value it ends, not the delete's: the delete ends *that* value, so a
        re-tag stamped after it — even before the delete, in another region —
        still wins everywhere (a tombstone wins a tie with the value it ends)."""
        removed = []
        for key, value in self.meta.scan(keys.tag_prefix(repo)):
            record = decode(value, TagRecord)
            if record.digest == digest and stamp_of(record) < stamp:
                tag = keys.parse(key, keys.TagKey).tag
                self.stage_tag_tombstone(batch, repo, tag, stamp_of(record), digest)
                removed.append(tag)
        return removed

    def stage_tag_tombstone(self, batch: Batch, repo: str, tag: str, stamp: Stamp,
                            digest: str) -> None:
        """End a tag's value: its tombstone (stamped ``stamp``, naming what the
        tag pointed at) and any recycle bin entry of it. Whatever ends the tag
        register ends an older untag's entry, as a restore or a re-tag does in
        the region it is taken, so every region holds the same bin; only the
        soft delete an entry records makes it again (``stage_tag_delete``). The
        manifest the tag named may be untagged from now on (``stage_untagged``)."""
        hlc, region, zone = stamp
        current = batch.puts.get(keys.tag(repo, tag)) or self.meta.get(keys.tag(repo, tag))
        if current is not None:
            self.stage_untagged(batch, repo, decode(current, TagRecord).digest, hlc)
        batch.delete(keys.tag(repo, tag))
        batch.put(keys.tag_tomb(repo, tag), encode(Tombstone(hlc, region, zone, digest)))
        self.bin.stage_tag_end(batch, repo, tag)

    def stage_tag_delete(self, batch: Batch, delete: Event) -> None:
        """What a winning TAG_DELETE leaves: the tag's tombstone and, when the
        delete was a soft one, its recycle bin entry."""
        self.stage_tag_tombstone(batch, delete.repository, delete.tag, stamp_of(delete),
                                 delete.digest)
        if delete.recycled:
            self.bin.stage_tag(batch, delete.repository, delete.tag, delete.digest,
                               stamp_of(delete), delete.acked_ns)

    async def delete_manifest(self, repo: str, reference: str, *,
                              request: ClientRequest | None = None,
                              stamp: int | None = None) -> list[str]:
        """Delete a manifest (by digest: it and the tags pointing at it) or a tag
        (by tag); returns the tags it removed. ``request``: the client's, kept
        with the events. ``stamp``: a delete by digest decided on a change made
        earlier (retention: the untag) carries that change's stamp, so what was
        written after it wins; refused (409) when the manifest's register here
        is already at or above it."""
        batch = Batch()
        origin = (self.identity.region, self.identity.zone)
        if not is_digest(reference):
            tag = validate_tag(reference)
            raw = self.meta.get(keys.tag(repo, tag))
            if raw is None:
                raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, {"tag": tag})
            self.locks.check_untag(repo, tag)
            self.check_writable()
            value = decode(raw, TagRecord)
            hlc = self.stamp_over(batch, value.hlc)
            pointed = value.digest
            event = self._event(EventKind.TAG_DELETE, repo, hlc, tag=tag, digest=pointed,
                                request=request, recycled=self.bin.policy().enabled)
            self.stage_tag_delete(batch, event)
            batch.event(event)
            self.drop_repo_if_emptied(batch, repo)
            await self._commit(batch)
            return [tag]
        digest = Digest.parse(reference)
        raw = self.meta.get(keys.manifest(repo, digest))
        if raw is None:
            raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, {"digest": str(digest)})
        for key, _ in self.meta.scan(keys.ref_repo_prefix(digest, repo)):
            user = keys.parse(key, keys.RefKey).manifest
            raise RegistryError(
                ErrorCode.DENIED,
                f"manifest {digest} is part of index {user} in {repo}; delete the index first",
                message="manifest is in use",
            )
        self.locks.check_delete_manifest(repo, digest)
        self.check_writable()
        record = decode(raw, ManifestRecord)
        if stamp is None:
            # Above the tags pointing at it too: each tag set renewed the
            # manifest's register (``stage_tag``).
            hlc = self.stamp_over(batch, record.hlc)
        elif stamp_of(record) >= (stamp, *origin):
            # Renewed after the change the delete was decided on: it would
            # lose to that renewal everywhere, so it is not made.
            raise RegistryError(ErrorCode.DENIED, message="manifest changed since the "
                                "change this delete was decided on", status=409)
        else:
            # Not lifted above anything (``stamp_over``): what was written
            # after the change it was decided on must win, here and everywhere.
            hlc = stamp
        # The tags go with it, here and (by the same rule) wherever the delete
        # arrives; no tag_delete events, which would end newer values elsewhere.
        tags = self.stage_tags_removal(batch, repo, digest, (hlc, *origin))
        self.stage_manifest_removal(batch, repo, digest, record, hlc)
        recycled = self.bin.policy().enabled
        event = self._event(EventKind.MANIFEST_DELETE, repo, hlc, digest=digest,
                            media_type=record.media_type, artifact_type=record.artifact_type,
                            request=request, recycled=recycled,
                            recycled_tags=tuple(sorted(tags)) if recycled else ())
        self.stage_manifest_tombstone(batch, event, record)
        batch.event(event)
        self.drop_repo_if_emptied(batch, repo)
        await self._commit(batch)
        return tags

    def stage_manifest_tombstone(self, batch: Batch, delete: Event,
                                 record: ManifestRecord | None) -> None:
        """What a winning MANIFEST_DELETE leaves: its tombstone, saying whether
        the delete was a soft one (so anti-entropy says so from every node, the
        ones without a bin entry of it included), and in the recycle bin the
        manifest (``record``, as it was here, or as an older delete's entry
        kept it) when it was, nothing otherwise (an older entry of it ends
        either way). A region that never held the manifest keeps no entry."""
        repo, digest = delete.repository, delete.digest
        hlc, region, zone = stamp_of(delete)
        batch.put(keys.manifest_tomb(repo, digest), encode(Tombstone(
            hlc, region, zone, recycled=delete.recycled, recycled_tags=delete.recycled_tags,
            deleted_ns=delete.acked_ns if delete.recycled else 0,
            retention=delete.request == RETENTION_REQUEST)))
        if record is None:
            older = self.bin.manifest(repo, digest, batch)
            record = older.record if older is not None else None
        self.bin.stage_manifest_end(batch, repo, digest)
        if delete.recycled and record is not None:
            self.bin.stage_manifest(batch, repo, digest, record, delete.recycled_tags,
                                    stamp_of(delete), delete.acked_ns)

    async def restore(self, repo: str, reference: str, *, force: bool = False,
                      request: ClientRequest | None = None) -> dict[str, Any]:
        """Bring back what the recycle bin holds (``recycle_bin``): by digest, a
        manifest with the tags it had; by tag, the manifest most recently
        deleted with that tag (with all its tags), or that tag alone when it
        was untagged later. A restore is a write, replicated as the push and
        tag sets it amounts to (stamped now, so it wins over the delete it
        undoes everywhere, and loses to a later one). Refused, nothing changed:
        a repository this node holds nothing of (404 NAME_UNKNOWN); where a
        lock forbids the push it amounts to; a tag that since names another
        manifest (409, naming it) unless ``force`` moves it back; a child
        manifest of an index that is not in the repository (409: restore it
        first); blobs no peer has either."""
        validate_name(repo)
        plan = self._restore_plan(repo, reference, force)
        if plan.missing and self.peers is not None:
            await self.peers.fetch_blobs(repo, list(plan.missing))
            # The await let other writes in (a push of a tag, a lock, another
            # restore or purge): every check is made again on what is here now.
            plan = self._restore_plan(repo, reference, force)
        # From here to the commit, no await: the checks hold when it is written.
        if plan.missing:
            raise RegistryError(ErrorCode.MANIFEST_BLOB_UNKNOWN,
                                {"missing": list(plan.missing[:20]), "count": len(plan.missing)},
                                message="blobs of the manifest are held nowhere", status=409)
        self.check_writable()
        if plan.body is not None:
            self.check_storage(len(plan.body))
        digest, entry, to_set = plan.digest, plan.entry, plan.to_set
        batch = Batch()
        # Above the manifest's register (its tombstone, when it comes back) and
        # every tag's it sets, as any write is (``stamp_over``).
        hlc = self.stamp_over(batch, self.manifest_held(repo, digest),
                              *(self.tag_held(repo, tag) for tag in to_set))
        stamp = (hlc, self.identity.region, self.identity.zone)
        acked = self._wall_ns()
        if entry is not None:
            body, parsed = plan.body, plan.parsed
            assert body is not None and parsed is not None
            self.stage_manifest(batch, repo, digest, body, parsed, stamp, acked)
            batch.event(self._event(EventKind.MANIFEST_PUT, repo, hlc, digest=digest,
                                    tag=to_set[0] if to_set else "",
                                    media_type=parsed.media_type, size=len(body),
                                    references=parsed.references, subject=parsed.subject or "",
                                    artifact_type=parsed.artifact_type or "", request=request))
        record = entry.record if entry is not None else decode(
            self.meta.get(keys.manifest(repo, digest)), ManifestRecord)
        for tag in to_set:
            self.stage_tag(batch, repo, tag, digest, stamp, acked)
            batch.event(self._event(EventKind.TAG_SET, repo, hlc, digest=digest, tag=tag,
                                    media_type=record.media_type, size=record.size,
                                    artifact_type=record.artifact_type, request=request))
        await self._commit(batch)
        self.bin.restored_total += 1
        return {"repository": repo, "digest": digest, "manifestRestored": entry is not None,
                "tagsRestored": list(to_set),
                "tagsMoved": {t: plan.moved[t] for t in to_set if t in plan.moved}}

    def _restore_plan(self, repo: str, reference: str, force: bool) -> _RestorePlan:
        """What restoring ``reference`` writes, checked against what is here
        now: every refusal but blobs missing here (a peer may have them) is
        raised. Synchronous, so its checks hold until the caller's next await."""
        if not self.repository_exists(repo) and not self.bin.holds(repo):
            raise RegistryError(ErrorCode.NAME_UNKNOWN, {"name": repo})
        digest, entry, tags = self._restorable(repo, reference)
        moved: dict[str, str] = {}
        to_set: list[str] = []
        for tag in tags:
            raw = self.meta.get(keys.tag(repo, tag))
            current = decode(raw, TagRecord).digest if raw is not None else None
            if current == digest:
                continue
            if current is not None:
                moved[tag] = current
                if not force:
                    continue
            to_set.append(tag)
        if moved and not force:
            raise RegistryError(
                ErrorCode.DENIED, {"digest": digest, "tagsNowElsewhere": moved},
                message=f"tag{'s' if len(moved) > 1 else ''} {', '.join(sorted(moved))} "
                        f"name{'' if len(moved) > 1 else 's'} another manifest since the delete; "
                        f"nothing was restored (restore with force to move "
                        f"{'them' if len(moved) > 1 else 'it'} back)", status=409)
        body, parsed, missing = None, None, ()
        if entry is not None:
            self.locks.check_upload(repo)
            body = self.sealer.open(entry.record.sealed_body, manifest_ad(digest))
            parsed = manifests.parse(body, entry.record.media_type)
            children = [d for d in parsed.children
                        if self.meta.get(keys.manifest(repo, d)) is None]
            if children:
                raise RegistryError(
                    ErrorCode.MANIFEST_BLOB_UNKNOWN, {"missing": children[:20]},
                    message="manifests of the index are not in the repository; restore them "
                            "first", status=409)
            missing = tuple(d for d in parsed.blobs if self.meta.get(keys.blob(d)) is None)
        for tag in to_set:
            self.locks.check_push(repo, tag, True)
        return _RestorePlan(digest, entry, body, parsed, tuple(to_set), moved, missing)

    def _restorable(self, repo: str, reference: str
                    ) -> tuple[str, RecycledManifest | None, tuple[str, ...]]:
        """What restoring ``reference`` brings back: the digest, the manifest's
        bin entry (None: it is live, only a tag comes back) and the tags."""
        def absent(what: dict[str, str]) -> RegistryError:
            return RegistryError(ErrorCode.MANIFEST_UNKNOWN, what,
                                 message="not in the recycle bin")

        if is_digest(reference):
            digest = str(Digest.parse(reference))
            entry = self.bin.manifest(repo, digest)
            if entry is None:
                raise absent({"digest": digest})
            return digest, entry, entry.tags
        tag = validate_tag(reference)
        found = self.bin.find_by_tag(repo, tag)
        untagged = self.bin.tag(repo, tag)
        # Which delete came last: by stamp, as last-writer-wins orders them
        # (not by origin wall clocks, which may disagree across regions).
        if untagged is not None and (found is None or stamp_of(untagged) > stamp_of(found[1])):
            if self.meta.get(keys.manifest(repo, untagged.digest)) is not None:
                return untagged.digest, None, (tag,)
            if (kept := self.bin.manifest(repo, untagged.digest)) is not None:
                return untagged.digest, kept, tuple(dict.fromkeys((tag, *kept.tags)))
            if found is None:
                raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, {"tag": tag,
                                                                 "digest": untagged.digest},
                                    message="the manifest the tag named is gone")
        if found is None:
            raise absent({"tag": tag})
        return found[0], found[1], found[1].tags

    async def delete_repository(self, repo: str, *,
                                request: ClientRequest | None = None) -> dict[str, list[str]]:
        """Delete every manifest (indexes before what they reference), tag and blob
        link of a repository, each as the replicated delete it is; returns what
        these deletes removed. One commit per delete, so other regions' changes
        to the same repository land in between (``georeg repository delete``
        asks every region at once, and a region holds what replication brought
        it beside what it keeps to itself). What another delete took first is
        gone already: skipped, not an error, and not this delete's to report.
        Anything else that refuses a step midway — a lock or an index that
        landed in between, a full disk, no write quorum — stops the delete
        there, and since part of the repository may be gone its answer is
        indefinite and says what was done (``RegistryError.indefinite``)."""
        if not self.repository_exists(repo):
            raise RegistryError(ErrorCode.NAME_UNKNOWN, {"name": repo})
        self.locks.check_delete_repository(repo)
        self.check_writable()
        manifests_left = [keys.parse(k, keys.ManifestKey).digest
                          for k, _ in self.meta.scan(keys.manifest_prefix(repo))]
        done: dict[str, list[str]] = {"manifestsDeleted": [], "tagsDeleted": [],
                                      "blobsDeleted": []}
        try:
            while manifests_left:
                free = [d for d in manifests_left
                        if not self.meta.has_prefix(keys.ref_repo_prefix(d, repo))]
                if not free:  # a reference cycle cannot exist (digests); stop rather than spin
                    break
                for digest in free:
                    removed = await _unless_gone(self.delete_manifest(repo, digest,
                                                                      request=request),
                                                 ErrorCode.MANIFEST_UNKNOWN)
                    if removed is not GONE:
                        done["manifestsDeleted"].append(digest)
                        done["tagsDeleted"] = sorted({*done["tagsDeleted"], *removed})
                manifests_left = [d for d in manifests_left if d not in free]
            for key, _ in list(self.meta.scan(keys.blob_link_prefix(repo))):
                digest = keys.parse(key, keys.BlobLinkKey).digest
                if await _unless_gone(self.delete_blob(repo, Digest(digest)),
                                      ErrorCode.BLOB_UNKNOWN) is not GONE:
                    done["blobsDeleted"].append(digest)
        except (RegistryError, OSError) as exc:
            # One commit per delete: a refusal after the first leaves the
            # repository partly deleted, whatever the refusal would say alone
            # (a 405 or 403 alone says nothing changed).
            if any(done.values()):
                refusal = exc if isinstance(exc, RegistryError) else \
                    storage_failure(exc, read=False)
                if refusal is not None:
                    raise refusal.indefinite(done) from exc
            raise
        return done

    # -- listings ------------------------------------------------------------

    def list_tags(self, repo: str, n: int | None, last: str | None) -> tuple[list[str], bool]:
        """Tags in byte order after ``last``; the bool says whether more follow."""
        if not self.repository_exists(repo):
            raise RegistryError(ErrorCode.NAME_UNKNOWN, {"name": repo})
        after = keys.tag(repo, last) if last else None
        hidden = self.locks.unlisted_tags(repo)
        return _page((tag for tag in (keys.parse(k, keys.TagKey).tag
                                      for k, _ in self.meta.scan(keys.tag_prefix(repo), after))
                      if tag not in hidden), n)

    def catalog(self, n: int | None, last: str | None) -> tuple[list[str], bool]:
        """Repositories in byte order after ``last``, but those list-disabled (``locks``)."""
        after = keys.repo(last) if last else None
        return _page((name for name in (keys.parse(k, keys.RepoKey).repository
                                        for k, _ in self.meta.scan(keys.REPO, after))
                      if self.locks.listed(name)), n)

    # -- changeable attributes (ACR's locks) ----------------------------------

    def attributes_target_exists(self, target: locks.Target) -> None:
        """Refuse with the 404 ACR gives when what ``target`` names is not here."""
        if not self.repository_exists(target.repository):
            raise RegistryError(ErrorCode.NAME_UNKNOWN, {"name": target.repository})
        if target.kind == locks.TAG and self.meta.get(
                keys.tag(target.repository, target.name)) is None:
            raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, {"tag": target.name},
                                message="tag unknown to registry")
        if target.kind == locks.MANIFEST and self.meta.get(
                keys.manifest(target.repository, target.name)) is None:
            raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, {"digest": target.name})

    async def update_attributes(self, target: locks.Target, update: dict[str, bool], *,
                                request: ClientRequest | None = None) -> ChangeableAttributes:
        """Change some of ``target``'s attributes (``update``: ACR's JSON names);
        returns the whole new value. The register and its ``ATTRIBUTES_SET``
        event are one commit; a change to what it already is logs nothing."""
        self.attributes_target_exists(target)
        self.locks.check_change(target)
        current = self.locks.of(target)
        wanted = locks.changed(current, update)
        self.check_writable()
        if wanted == current:
            await self.durable()     # perhaps the retry of an unconfirmed change
            return current
        batch = Batch()
        record = self.locks.record(target)
        hlc = self.stamp_over(batch, record.hlc if record is not None else 0)
        acked = self._wall_ns()
        self.locks.stage(batch, target, wanted, (hlc, self.identity.region, self.identity.zone),
                         acked)
        batch.event(self._event(
            EventKind.ATTRIBUTES_SET, target.repository, hlc,
            tag=target.name if target.kind == locks.TAG else "",
            digest=target.name if target.kind == locks.MANIFEST else "",
            attributes=wanted, request=request))
        await self._commit(batch)
        return wanted

    def referrers(self, repo: str, subject: Digest,
                  artifact_type: str | None) -> list[Descriptor]:
        out = []
        for key, value in self.meta.scan(keys.referrer_prefix(repo, subject)):
            descriptor = decode(self.sealer.open(value, _referrer_ad(key)), Descriptor)
            if artifact_type is None or descriptor.artifactType == artifact_type:
                out.append(descriptor)
        return out


class _Gone(Enum):
    GONE = "gone"     # what ``_unless_gone`` returns for a step whose target was gone already


GONE = _Gone.GONE


async def _unless_gone(delete: Awaitable[T], gone: ErrorCode) -> T | Literal[_Gone.GONE]:
    """One step of a repository's delete: what it returned, or ``GONE`` if it
    found what it was to delete gone already (its 404 ``gone``): deleted
    meanwhile, by a replicated delete or another client's."""
    try:
        return await delete
    except RegistryError as exc:
        if exc.code is not gone:
            raise
        return GONE


def _page(items, n: int | None) -> tuple[list[str], bool]:
    if n is None:
        return list(items), False
    out = []
    for item in items:
        if len(out) == n:
            return out, True
        out.append(item)
    return out, False


def manifest_ad(digest: str) -> bytes:
    """Associated data sealing a manifest body: its digest."""
    return b"georeg/manifest/v1\x00" + digest.encode()


def _referrer_ad(key: bytes) -> bytes:
    return b"georeg/referrer/v1\x00" + key


def _descriptor(digest: str, record: ManifestRecord,
                annotations: dict[str, str] | None) -> Descriptor:
    return Descriptor(mediaType=record.media_type, digest=digest, size=record.size,
                      artifactType=record.artifact_type or None, annotations=annotations)


def _range_error(offset: int, detail: str) -> RegistryError:
    return RegistryError(ErrorCode.RANGE_INVALID, detail, message="chunk out of order",
                         headers={"Range": f"0-{max(offset - 1, 0)}"})


def manifest_too_large(limit: int) -> RegistryError:
    return RegistryError(ErrorCode.SIZE_INVALID, f"manifests are limited to {limit} bytes",
                         message="manifest too large", status=413)
