"""How far the lag benchmark's clock may be from each node's: the error bar of
every lag it reports against the floor.

A lag is ``arrival − ack``: the arrival stamped by the destination node's
process, the acknowledgement (and every time the floor uses) by the
benchmark's. Both read ``time.time_ns()``, the kernel's ``CLOCK_REALTIME``,
through the vDSO: on one machine that is one clock, not two, so the processes
cannot drift apart. What can still go wrong is measured, not assumed:

* **offset between processes** (a node in another time namespace, on another
  host behind ``--data-dir``, or a bug): each node is asked for its wall clock
  (``Health.wall_ns``) between two readings of ours, several times; the node's
  offset from us lies in ``[wall − received, wall − sent]`` for every probe,
  so in the intersection. A destination whose clock is *behind* ours makes its
  lags look shorter: by at most ``−lo``, the bracket's lower end.
* **the wall clock being adjusted meanwhile** (an NTP step or slew between an
  ack and an arrival moves one stamp and not the other): ``CLOCK_REALTIME −
  CLOCK_MONOTONIC_RAW`` is read at the start and the end of the run; whatever
  it moved by, all of it is counted, as if it were one step inside one lag.

The clock error is the larger bracket end plus that adjustment: a measured lag
can beat a floor by at most this much before it is the floor that is wrong.
(The monotonic clock would not help: it is per machine too, and the links that
model the WAN time their delays with it, but the nodes stamp arrivals with the
wall clock, which ``replication/status`` and the event's ``acked_ns`` share.)
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from registry_node.clock import offset_bracket

from .floor import NS_PER_MS

PROBES = 7


def wall_minus_raw_ns() -> int:
    """The wall clock's distance from the never-adjusted monotonic clock: it
    changes only when the wall clock is stepped or slewed."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)


@dataclass(frozen=True)
class ClockBracket:
    """Where one node's clock lies against ours: node − benchmark, in ns,
    between ``lo_ns`` and ``hi_ns`` (``lo_ns > hi_ns``: the probes disagree,
    the offset moved while probing)."""

    node: str
    lo_ns: int
    hi_ns: int
    probes: int

    @property
    def behind_at_most_ms(self) -> float:
        return max(0, -self.lo_ns) / NS_PER_MS

    @property
    def ahead_at_most_ms(self) -> float:
        return max(0, self.hi_ns) / NS_PER_MS

    @property
    def consistent(self) -> bool:
        return self.lo_ns <= self.hi_ns


async def bracket(node: str, node_wall_ns: Callable[[], Awaitable[int]],
                  probes: int = PROBES) -> ClockBracket | None:
    """Probe ``node_wall_ns`` (the node's clock, asked over the network) ``probes``
    times; None if the node does not tell its clock (an older georeg)."""
    lo, hi = -(1 << 62), 1 << 62
    for _ in range(probes):
        sent = time.time_ns()
        wall = await node_wall_ns()
        received = time.time_ns()
        if not wall:
            return None
        low, high = offset_bracket(sent, wall, received)
        lo, hi = max(lo, low), min(hi, high)
    return ClockBracket(node, lo, hi, probes)


@dataclass
class ClockCheck:
    """The run's clock error: brackets of every node at the start and the end
    of the run, and how far the wall clock was adjusted in between."""

    before: list[ClockBracket]
    after: list[ClockBracket]
    unknown: list[str]                  # nodes that did not tell their clock
    adjusted_ns: int

    @property
    def error_ms(self) -> float | None:
        """How much a lag may beat its floor by, the clocks alone; None if a
        node's clock could not be bracketed."""
        brackets = self.before + self.after
        if self.unknown or not brackets:
            return None
        worst = max(max(b.behind_at_most_ms, b.ahead_at_most_ms,
                        max(0, b.lo_ns - b.hi_ns) / NS_PER_MS) for b in brackets)
        return worst + abs(self.adjusted_ns) / NS_PER_MS

    def to_json(self) -> dict:
        def one(b: ClockBracket) -> dict:
            return {"node": b.node, "offset_ms_between": [b.lo_ns / NS_PER_MS, b.hi_ns / NS_PER_MS],
                    "probes": b.probes, "consistent": b.consistent}
        return {
            "error_ms": self.error_ms,
            "wall_clock_adjusted_ms": self.adjusted_ns / NS_PER_MS,
            "before": [one(b) for b in self.before], "after": [one(b) for b in self.after],
            "unknown": self.unknown,
            "meaning": "each node's clock − the benchmark's, bracketed by Health probes "
                       "(time.time_ns on both sides), plus how far the wall clock moved against "
                       "CLOCK_MONOTONIC_RAW during the run; error_ms = the widest bracket end + "
                       "that movement: how much a lag may beat its floor by, the clocks alone",
        }
