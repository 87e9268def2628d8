"""The storage seam where fault injection breaks a node's disk on purpose.

``StorageFaults`` is consulted by every blob read and every write path (blob
and upload files, metadata commits) before it touches the disk:

* a *full* disk fails a write with ENOSPC before anything changes — so what
  is already stored is never harmed;
* a *slow* disk adds latency to every write and sync;
* an *I/O-error* disk fails a blob file read (``eio_read``) or any write
  (``eio_write``) with EIO, each with its probability, from a seeded random
  source (the same seed and the same sequence of calls give the same
  failures). A write fails before it starts, as a failed device usually does
  at its first write; so an injected EIO never leaves half a record or half a
  blob (a metadata batch is all-or-nothing; an upload file is never renamed
  into place unless whole and sealed), and nothing acknowledged is lost.

What an EIO does *not* reach: RocksDB's own reads, and its WAL sync (whose
real failures ``MetadataStore.synced`` already reports as EIO, indefinite).
The client sees ``503 UNAVAILABLE`` ``disk I/O error`` (``errors.disk_io_error``).

Set at run time through ``PUT /georeg/v1/faults/storage`` (``georeg fault disk``).
Bit rot — bytes flipped in stored blob files — is not a standing fault but an
act (``rot_blobs``); what the node does about it is ``blob_repair``'s.
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


class InjectedIOError(OSError):
    """An EIO this seam raised before the operation touched the disk: nothing
    changed (a real EIO may strike after a write began)."""


@dataclass
class StorageFaults:
    full: bool = False
    slow_ms: float = 0.0
    eio_read: float = 0.0          # probability that a blob file read fails
    eio_write: float = 0.0         # probability that a write fails
    seed: int | None = None
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def reseed(self, seed: int | None) -> None:
        self.seed = seed
        self._rng = random.Random(seed)

    def before_write(self) -> None:
        """Called (in the writing thread) before any write or sync."""
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device (injected fault: disk full)")
        if self.eio_write and self._rng.random() < self.eio_write:
            raise InjectedIOError(errno.EIO, "Input/output error (injected fault: disk write)")
        if self.slow_ms > 0:
            time.sleep(self.slow_ms / 1000)

    def before_read(self) -> None:
        """Called before a blob file is opened for reading."""
        if self.eio_read and self._rng.random() < self.eio_read:
            raise InjectedIOError(errno.EIO, "Input/output error (injected fault: disk read)")

    def as_dict(self) -> dict:
        return {"full": self.full, "slow_ms": self.slow_ms, "eio_read": self.eio_read,
                "eio_write": self.eio_write, "seed": self.seed}


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def is_io_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.EIO


def rot_blobs(paths: Sequence[tuple[str, Path]], count: int, seed: int | None,
              header_size: int) -> list[dict]:
    """Bit rot, on purpose: flip one byte in each of ``count`` of these blob
    files (``(digest, path)``, chosen with ``seed``), past their header, so
    what rots is content the file's authentication covers. Returns what was
    flipped where. Blocking."""
    rng = random.Random(seed)
    chosen = rng.sample(list(paths), min(count, len(paths)))
    rotted = []
    for digest, path in chosen:
        size = path.stat().st_size
        if size <= header_size:
            continue
        offset = rng.randrange(header_size, size)
        flip = rng.randrange(1, 256)
        _xor_byte(path, offset, flip)
        rotted.append({"digest": digest, "offset": offset})
    return rotted


def _xor_byte(path: Path, offset: int, mask: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([byte[0] ^ mask]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
