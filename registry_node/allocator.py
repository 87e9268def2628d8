"""The C allocator of a node process (glibc malloc), set for a server that
moves large blobs through 1 MiB buffers, some of them on worker threads.

glibc's defaults adapt the mmap and trim thresholds to what the process has
done so far, and each thread may get an arena of its own. For a node that
meant, after an ordinary mix of pushes and pulls, that freeing a transfer
buffer gave its pages back to the kernel (``madvise``) and the next buffer
faulted them in again, zeroed: a 512 MiB blob then streamed down at 250 MB/s
with three times the CPU, against 700 MB/s from a fresh node (``georeg bench
node``). Fixed thresholds above the buffer size, and one arena, end that; the
node's periodic ``trim`` (``registry_node.app``) returns what a busy moment
took once it is over.

A ``MALLOC_*`` environment variable, if set, wins over the setting here.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

SETTINGS = (
    (_M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", 4 << 20),
    (_M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", 32 << 20),
    (_M_ARENA_MAX, "MALLOC_ARENA_MAX", 1),
)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc, not another libc
    except (OSError, AttributeError):
        return None
    return libc


def tune() -> bool:
    """Apply the settings (call before the node starts threads). False where
    the allocator is not glibc's."""
    libc = _libc()
    if libc is None:
        return False
    for param, variable, value in SETTINGS:
        if variable not in os.environ:
            libc.mallopt(param, value)
    return True


def trimmer() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is none."""
    libc = _libc()
    return libc.malloc_trim if libc is not None else None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def heap() -> dict[str, int]:
    """The C heap as glibc sees it (``mallinfo2``, glibc 2.33+): bytes in use,
    bytes free inside the heap (kept by fragmentation or below the trim
    threshold), bytes in separately mapped large blocks. Empty elsewhere."""
    libc = _libc()
    mallinfo2 = getattr(libc, "mallinfo2", None) if libc is not None else None
    if mallinfo2 is None:
        return {}
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {"heap_in_use_bytes": info.uordblks, "heap_free_bytes": info.fordblks,
            "mmapped_bytes": info.hblkhd}
