"""Hybrid logical clock: the timestamps that order tags and deletes across regions.

A timestamp packs wall milliseconds in the high 48 bits and a logical counter in
the low 16, so it is one ``int`` that compares correctly and fits a protobuf
``uint64``. The clock never goes backwards, even when the wall clock does, and
``observe`` folds in timestamps seen from peers so causally later writes always
get larger stamps — except a stamp further ahead of this node's wall clock than
``max_ahead_ms`` (a peer whose clock ran ahead: ``registry_node.clock``), which is
taken in only up to that far ahead, so one bad clock cannot drag every node's
stamps into the future. So that a write which replaces such a value still wins
over it (a write that had seen another always wins), a local write is stamped
with ``after``: above the stamps of the registers it replaces, whatever the
clock says. The wall clock is injected, so tests drive it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

LOGICAL_BITS = 16
_LOGICAL_MASK = (1 << LOGICAL_BITS) - 1


def pack(wall_ms: int, logical: int) -> int:
    return (wall_ms << LOGICAL_BITS) | logical


def unpack(stamp: int) -> tuple[int, int]:
    return stamp >> LOGICAL_BITS, stamp & _LOGICAL_MASK


def wall_ms_now() -> int:
    return time.time_ns() // 1_000_000


class HybridLogicalClock:
    def __init__(self, wall_ms: Callable[[], int] = wall_ms_now, last: int = 0,
                 max_ahead_ms: int | None = None) -> None:
        self._wall_ms = wall_ms
        self._last = last
        self.max_ahead_ms = max_ahead_ms

    @property
    def last(self) -> int:
        return self._last

    def now(self) -> int:
        """A stamp larger than every stamp issued or observed so far."""
        wall = self._wall_ms()
        last_wall, last_logical = unpack(self._last)
        if wall > last_wall:
            stamp = pack(wall, 0)
        elif last_logical < _LOGICAL_MASK:
            stamp = pack(last_wall, last_logical + 1)
        else:  # 65536 stamps in one millisecond: borrow the next millisecond.
            stamp = pack(last_wall + 1, 0)
        self._last = stamp
        return stamp

    def after(self, *replaced: int) -> int:
        """``now()``, or more: a stamp above each of ``replaced`` too (the
        stamps of the registers a local write replaces). A stamp so far ahead
        is taken into the clock as ``observe`` takes a peer's."""
        stamp = self.now()
        floor = max(replaced, default=0)
        if floor >= stamp:
            stamp = floor + 1
            self.observe(stamp)
        return stamp

    def observe(self, remote: int) -> bool:
        """Fold in a stamp from a peer so that later local stamps exceed it; one
        more than ``max_ahead_ms`` ahead of the wall clock only up to that
        bound. True when the stamp was that far ahead."""
        beyond = False
        if self.max_ahead_ms is not None:
            # The bound's last millisecond is left to this node's own next
            # stamp, which then is not past the bound (``clock.ClockGuard``).
            ceiling = pack(self._wall_ms() + self.max_ahead_ms - 1, _LOGICAL_MASK)
            beyond = remote > ceiling
            remote = min(remote, ceiling)
        if remote > self._last:
            self._last = remote
        return beyond
