"""Blob bytes on disk: content-addressed, encrypted files, and the upload files
that become them.

Layout under the data dir::

    blobs/<algorithm>/<hex[:2]>/<hex>   sealed blob files (see ``crypto``)
    uploads/<uuid>                      uploads in progress, same format, unsealed

Invariants
    * A file appears under ``blobs/`` only by ``rename`` of a complete, sealed
      and fsynced upload file, so after any crash a blob path holds either
      nothing or the whole blob. Its directory is fsynced right after, or, for
      a replicated blob, with the metadata's next group sync, before the WAL
      that holds the blob's record.
    * Paths are built only from validated digests (lowercase hex) and upload
      ids (UUIDs), never from anything else a client sent.
    * Everything here blocks (file IO, AES, SHA): the registry calls it from a
      worker thread; the event loop never waits on a disk.
"""

from __future__ import annotations

import hashlib
import os
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

from .crypto import NodeKey, SealedBlob, SegmentWriter, read_unsealed
from .storage_faults import StorageFaults

_UUID_LEN = 36


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
    def __init__(self, root: Path, node_key: NodeKey, faults: StorageFaults | None = None) -> None:
        self.root = root
        self._node_key = node_key
        self.faults = faults or StorageFaults()
        self._blobs = root / "blobs"
        self._uploads = root / "uploads"
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
        """Open a blob for reading; ``FileNotFoundError`` or ``BlobCorrupt``."""
        return SealedBlob.open(self.path(digest), self._node_key, digest)

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
