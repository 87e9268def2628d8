"""The storage seam where fault injection breaks a node's disk on purpose.

``StorageFaults`` is consulted by every write path (blob and upload files,
metadata commits) before it touches the disk: a *full* disk fails the write
with ENOSPC before anything changes — so what is already stored is never
harmed — and a *slow* disk adds latency to every write and sync. Set at run
time through ``PUT /georeg/v1/faults/storage`` (``georeg fault disk``).
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass


@dataclass
class StorageFaults:
    full: bool = False
    slow_ms: float = 0.0

    def before_write(self) -> None:
        """Called (in the writing thread) before any write or sync."""
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device (injected fault: disk full)")
        if self.slow_ms > 0:
            time.sleep(self.slow_ms / 1000)

    def as_dict(self) -> dict:
        return {"full": self.full, "slow_ms": self.slow_ms}


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC
