"""Blob bytes on disk: content-addressed, encrypted files, and the upload files
that become them.

Layout under the data dir::

    blobs/<algorithm>/<hex[:2]>/<hex>   sealed blob files (see ``crypto``)
    uploads/<uuid>                      uploads in progress, same format, unsealed
    quarantine/<algorithm>/<hex>.<ns>   blob files that failed authentication, moved
                                        aside at <ns> (``blob_repair``), kept for an
                                        operator to inspect: the newest
                                        QUARANTINE_MAX_FILES / _BYTES of them, the
                                        newest one always (however large), and every
                                        one that is the only trace of a blob not
                                        repaired (its record here, its file not back)

Invariants
    * A file appears under ``blobs/`` only by ``rename`` of a complete, sealed
      and fsynced upload file, so after any crash a blob path holds either
      nothing or the whole blob. Its directory is fsynced right after, or, for
      a replicated blob, with the metadata's next group sync, before the WAL
      that holds the blob's record.
    * Paths are built only from validated digests (lowercase hex) and upload
      ids (UUIDs), never from anything else a client sent.
    * A file leaves ``blobs/`` for ``quarantine/`` only by ``rename``, and only
      while it fails authentication (``verify``): a good copy is never moved.
    * Everything here blocks (file IO, AES, SHA): the registry calls it from a
      worker thread; the event loop never waits on a disk.
"""

from __future__ import annotations

import hashlib
import os
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path

from .crypto import HEADER_SIZE, BlobCorrupt, NodeKey, SealedBlob, SegmentWriter, read_unsealed
from .storage_faults import StorageFaults, rot_blobs

_UUID_LEN = 36
QUARANTINE_MAX_FILES = 64
QUARANTINE_MAX_BYTES = 1 << 30
VERIFY_PIECE = 1 << 20


def valid_upload_id(upload_id: str) -> bool:
    if len(upload_id) != _UUID_LEN:
        return False
    try:
        return str(uuidlib.UUID(upload_id)) == upload_id
    except ValueError:
        return False


class UploadFile:
    """An upload in progress: the digest is computed as bytes arrive, and the
    bytes are encrypted on their way to disk. Never read twice, except to
    compute a non-sha256 digest or to recover the hash state after a restart."""

    def __init__(self, path: Path, fd: int, writer: SegmentWriter, hasher: hashlib._Hash,
                 node_key: NodeKey, faults: StorageFaults) -> None:
        self.path = path
        self._fd = fd
        self._writer = writer
        self._hasher = hasher
        self._node_key = node_key
        self._faults = faults

    @property
    def size(self) -> int:
        return self._writer.size

    def write(self, data: bytes | memoryview) -> None:
        self._faults.before_write()
        self._hasher.update(data)
        self._writer.write(data)

    def flush(self) -> None:
        """Make everything received so far durable on disk (end of a PATCH)."""
        self._writer.flush()

    def digest(self, algorithm: str) -> str:
        if algorithm == self._hasher.name:
            return f"{algorithm}:{self._hasher.hexdigest()}"
        hasher = hashlib.new(algorithm)
        for chunk in self._read_back():
            hasher.update(chunk)
        return f"{algorithm}:{hasher.hexdigest()}"

    def _read_back(self) -> Iterator[bytes]:
        self._writer.flush()
        yield from read_unsealed(self._fd, self._node_key)

    def seal(self, digest: str) -> None:
        self._faults.before_write()
        self._writer.seal(digest)
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class BlobStore:
    quarantine_max_files = QUARANTINE_MAX_FILES
    quarantine_max_bytes = QUARANTINE_MAX_BYTES

    def __init__(self, root: Path, node_key: NodeKey, faults: StorageFaults | None = None) -> None:
        self.root = root
        self._node_key = node_key
        self.faults = faults or StorageFaults()
        self._blobs = root / "blobs"
        self._uploads = root / "uploads"
        self._quarantine = root / "quarantine"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._uploads.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        algorithm, _, hexpart = digest.partition(":")
        return self._blobs / algorithm / hexpart[:2] / hexpart

    def upload_path(self, upload_id: str) -> Path:
        if not valid_upload_id(upload_id):
            raise ValueError(f"not an upload id: {upload_id!r}")
        return self._uploads / upload_id

    # -- blobs ---------------------------------------------------------------

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def open(self, digest: str) -> SealedBlob:
        """Open a blob for reading; ``FileNotFoundError``, ``BlobCorrupt``, or
        an ``OSError`` of the disk (EIO, perhaps injected: ``StorageFaults``)."""
        self.faults.before_read()
        return SealedBlob.open(self.path(digest), self._node_key, digest)

    def verify(self, digest: str) -> str | None:
        """Read and authenticate the whole file: None if intact, else why not
        (``FileNotFoundError`` if there is none)."""
        try:
            with self.open(digest) as blob:
                for start in range(0, blob.size, VERIFY_PIECE):
                    blob.read(start, min(blob.size, start + VERIFY_PIECE))
        except BlobCorrupt as exc:
            return str(exc)
        return None

    # -- bit rot and quarantine ---------------------------------------------------

    def rot(self, count: int, seed: int | None, among: list[str] | None = None) -> list[dict]:
        """Flip a byte in ``count`` blob files (``storage_faults.rot_blobs``),
        chosen among the digests ``among`` (default: every blob stored)."""
        present = [d for d in self.digests() if among is None or d in among]
        return rot_blobs([(d, self.path(d)) for d in present], count, seed, HEADER_SIZE)

    def quarantine(self, digest: str, now_ns: int,
                   keep: Callable[[str], bool] = lambda digest: False) -> Path | None:
        """Move the blob's file aside if it still fails authentication; the
        path it went to, or None (no file, or an intact one: someone repaired
        it meanwhile). Past the bounds, older quarantined files go, oldest
        first, except those of digests ``keep`` holds on to (the only trace of
        a blob not repaired)."""
        try:
            if self.verify(digest) is None:
                return None
        except FileNotFoundError:
            return None
        algorithm, _, hexpart = digest.partition(":")
        target = self._quarantine / algorithm / f"{hexpart}.{now_ns}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.path(digest), target)
        fsync_directory(target.parent)
        fsync_directory(self.path(digest).parent)
        self._prune_quarantine(keep)
        return target

    def is_quarantined(self, digest: str) -> bool:
        algorithm, _, hexpart = digest.partition(":")
        return any((self._quarantine / algorithm).glob(f"{hexpart}.*"))

    def quarantined(self) -> list[tuple[str, Path, int, int]]:
        """Every quarantined file, oldest first: (digest, path, bytes, moved at ns)."""
        found = []
        if not self._quarantine.is_dir():
            return found
        for alg_dir in self._quarantine.iterdir():
            for entry in alg_dir.iterdir():
                hexpart, _, moved = entry.name.partition(".")
                try:
                    found.append((f"{alg_dir.name}:{hexpart}", entry, entry.stat().st_size,
                                  int(moved)))
                except (FileNotFoundError, ValueError):
                    continue
        return sorted(found, key=lambda q: q[3])

    def _prune_quarantine(self, keep: Callable[[str], bool]) -> None:
        held = self.quarantined()
        count, total = len(held), sum(q[2] for q in held)
        for digest, path, size, _ in held[:-1]:     # oldest first; the newest always stays
            if count <= self.quarantine_max_files and total <= self.quarantine_max_bytes:
                break
            if keep(digest):
                continue
            path.unlink(missing_ok=True)
            count, total = count - 1, total - size

    def delete(self, digest: str) -> None:
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            pass

    def digests(self) -> Iterator[str]:
        """Every blob file present (for verification and repair)."""
        for digest, _ in self.files():
            yield digest

    def files(self) -> Iterator[tuple[str, float]]:
        """Every blob file present, with its modification time."""
        for alg_dir in sorted(self._blobs.iterdir()):
            for shard in sorted(alg_dir.iterdir()):
                for entry in sorted(shard.iterdir()):
                    try:
                        mtime = entry.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    yield f"{alg_dir.name}:{entry.name}", mtime

    # -- uploads -------------------------------------------------------------

    def create_upload(self, upload_id: str, algorithm: str = "sha256") -> UploadFile:
        self.faults.before_write()
        path = self.upload_path(upload_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        writer = SegmentWriter.create(fd, self._node_key)
        return UploadFile(path, fd, writer, hashlib.new(algorithm), self._node_key, self.faults)

    def resume_upload(self, upload_id: str) -> UploadFile:
        """Reopen an upload after a restart, recomputing its hash from disk."""
        path = self.upload_path(upload_id)
        fd = os.open(path, os.O_RDWR)
        try:
            writer = SegmentWriter.resume(fd, self._node_key)
            hasher = hashlib.sha256()
            for chunk in read_unsealed(fd, self._node_key):  # the full segments
                hasher.update(chunk)
            hasher.update(writer.pending)
        except BaseException:
            os.close(fd)
            raise
        return UploadFile(path, fd, writer, hasher, self._node_key, self.faults)

    def commit_upload(self, upload: UploadFile, digest: str, *, sync_dir: bool = True) -> None:
        """Seal the upload under ``digest`` and move it into place, durably.
        If the blob is already stored, the upload is simply dropped. With
        ``sync_dir=False`` the rename is not fsynced here: the caller must
        have ``path(digest).parent`` fsynced before anything relies on the
        blob surviving a power loss (``MetadataStore.sync_directory``), also
        when the blob was already there (placed, perhaps, by a process killed
        before its directory was synced)."""
        target = self.path(digest)
        if target.exists():
            self.discard_upload(upload)
            return
        upload.seal(digest)
        upload.close()
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(upload.path, target)
        if sync_dir:
            fsync_directory(target.parent)

    def discard_upload(self, upload: UploadFile) -> None:
        upload.close()
        try:
            upload.path.unlink()
        except FileNotFoundError:
            pass

    def discard_upload_file(self, upload_id: str) -> None:
        try:
            self.upload_path(upload_id).unlink()
        except (FileNotFoundError, ValueError):
            pass

    def upload_ids(self) -> list[str]:
        return [p.name for p in self._uploads.iterdir() if valid_upload_id(p.name)]


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
