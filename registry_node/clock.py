"""The node's wall clock, and the rule that keeps a clock that is off from stamping.

``WallClock`` is what every wall-time reading of a node goes through: the
HLC's physical part, record times (created, updated, tombstones), ages,
lag. It is the injected base clock (``time.time_ns``, or a test's
``ManualClock``) plus a *skew* that fault injection sets at run time
(``PUT /georeg/v1/faults/clock``, ``georeg fault clock``): an offset, and a
drift rate counted from a moment ``since``, so that sending the same skew
again (after a restart) gives the same reading — the clock does not jump.

``ClockGuard`` holds what this node measured of its clock against its peers'
(``replicator.clock_probe`` probes them) and decides, as CockroachDB does
with its ``--max-offset``, when this node must not stamp writes:

* its clock is more than ``max_offset_s`` off the clocks of a strict majority
  of the cluster's nodes it measured recently (itself counted among those it
  agrees with: in a two-node cluster, or cut off from most peers, it cannot
  tell who is wrong, and only flags the peer);
* or its HLC is more than ``max_offset_s`` ahead of its wall clock (it stamped
  writes while its clock ran ahead and the clock was then corrected): it
  waits until its wall clock has caught up, so that its next stamps are not
  in the future of its peers'.

Either way writes are refused with a definite ``503 UNAVAILABLE`` (nothing
happened; retry later, or through another region); reads and replication go
on. A measurement counts only as far as its uncertainty allows (half the
probe's round trip): a slow link never makes a clock look off.

A peer's event stamped more than ``max_offset_s`` ahead of this node's clock
is still applied (it was acknowledged; every replica compares the same
stamps, so they converge) but the HLC takes it in only up to ``max_offset_s``
ahead of the wall clock (``hlc.HybridLogicalClock.observe``), so one bad clock
cannot drag every node's timestamps into the future; the replicator counts
it (``georeg_clock_offset_exceeded_total``). See docs/faults.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import hlc
from .errors import ErrorCode, Outcome, RegistryError

# The most this node's clock may be off its peers' before it stops stamping
# writes (and the most ahead of its wall clock a peer's stamp moves its HLC).
# Why 500 ms: docs/faults.md, "Clock skew".
MAX_OFFSET_S = 0.5
# A measurement older than this many probe intervals — or probe timeouts,
# when the interval is shorter: a round waits for its slowest peer — no longer
# counts.
FRESH_PROBES = 3
# How long a probe waits for a peer's answer (``replicator.clock_probe``).
PROBE_TIMEOUT_S = 2.0
_NS = 1_000_000_000
# The widest skew a fault may set: a year off either way, a clock between a
# hundredth and a hundred times real speed. Far past anything the fault is
# for, and far inside what the stamps hold (nanoseconds in an int64 end in
# 2262: an offset of centuries made every write of the node fail, and its
# peers' subscriptions to it with them).
MAX_SKEW_OFFSET_S = 365 * 86400
MIN_DRIFT, MAX_DRIFT = 0.01, 100.0


def skew_problem(offset_s: float, drift: float) -> str | None:
    """What is wrong with a skew a fault asks for, or None. The node's fault
    seam and ``georeg fault clock`` both check it."""
    if not math.isfinite(offset_s) or abs(offset_s) > MAX_SKEW_OFFSET_S:
        return f"the offset must be within a year ({MAX_SKEW_OFFSET_S:g} s) either way"
    if not math.isfinite(drift) or not MIN_DRIFT <= drift <= MAX_DRIFT:
        return (f"the drift rate must be between {MIN_DRIFT:g} and {MAX_DRIFT:g} "
                "(1 keeps time, 1.5 gains half a second every second)")
    return None


def offset_bracket(sent_ns: int, peer_wall_ns: int, received_ns: int) -> tuple[int, int]:
    """Where a peer's clock lies against this one (peer − this, ns), from its
    reading ``peer_wall_ns`` taken between this clock's ``sent_ns`` and
    ``received_ns``: between the two ends returned (NTP's bracketing)."""
    return peer_wall_ns - received_ns, peer_wall_ns - sent_ns


class WallClock:
    """The node's wall clock: ``base`` plus the injected skew."""

    def __init__(self, base: Callable[[], int] = time.time_ns) -> None:
        self._base = base
        self.offset_ns = 0
        self.drift = 1.0
        self.since_ns = 0

    def now_ns(self) -> int:
        real = self._base()
        if self.drift == 1.0:
            return real + self.offset_ns
        return real + self.offset_ns + int((self.drift - 1.0) * (real - self.since_ns))

    def now_ms(self) -> int:
        return self.now_ns() // 1_000_000

    def skew(self, offset_s: float = 0.0, drift: float = 1.0, since_ns: int | None = None) -> None:
        """Run ``offset_s`` off the base clock, gaining ``drift - 1`` seconds
        per second since ``since_ns`` (the base clock's reading; default now,
        at most a year ago). ``ValueError`` for a skew past ``skew_problem``'s bounds."""
        base = self._base()
        problem = skew_problem(offset_s, drift)
        if problem is None and since_ns is not None \
                and not 0 <= base - since_ns <= MAX_SKEW_OFFSET_S * _NS:
            problem = "since_ns must be the base clock's reading within the last year"
        if problem is not None:
            raise ValueError(problem)
        self.offset_ns = int(offset_s * _NS)
        self.drift = float(drift)
        self.since_ns = base if since_ns is None else int(since_ns)

    def reset(self) -> None:
        self.skew()

    @property
    def skewed(self) -> bool:
        return self.offset_ns != 0 or self.drift != 1.0

    def as_dict(self) -> dict:
        """The injected skew, and how far off the base clock it puts the node now."""
        return {"offset_s": self.offset_ns / _NS, "drift": self.drift,
                "since_ns": self.since_ns, "off_by_s": (self.now_ns() - self._base()) / _NS}


@dataclass(frozen=True)
class PeerOffset:
    offset_s: float          # the peer's clock minus this node's (positive: it is ahead)
    uncertainty_s: float     # half the probe's round trip
    measured_at: float       # this node's monotonic clock

    def exceeds(self, max_offset_s: float) -> bool:
        """Off by more than ``max_offset_s`` even at the measurement's most favourable."""
        return abs(self.offset_s) - self.uncertainty_s > max_offset_s


class ClockGuard:
    """What this node knows of its clock against its peers', and whether it
    may stamp writes (see the module docstring)."""

    def __init__(self, clock: WallClock, monotonic: Callable[[], float] = time.monotonic,
                 max_offset_s: float = MAX_OFFSET_S) -> None:
        self.clock = clock
        self.monotonic = monotonic
        self.max_offset_s = max_offset_s
        self.probe_interval_s = 2.0          # set by the prober; freshness is counted in it
        self.peers: dict[str, PeerOffset] = {}

    def record(self, peer: str, offset_s: float, uncertainty_s: float) -> PeerOffset:
        measured = PeerOffset(offset_s, uncertainty_s, self.monotonic())
        self.peers[peer] = measured
        return measured

    def forget(self, peer: str) -> None:
        self.peers.pop(peer, None)

    def fresh(self) -> dict[str, PeerOffset]:
        horizon = self.monotonic() - FRESH_PROBES * max(self.probe_interval_s, PROBE_TIMEOUT_S)
        return {name: p for name, p in self.peers.items() if p.measured_at >= horizon}

    def off_peers(self) -> list[str]:
        """Recently measured peers whose clocks are more than the bound off this node's."""
        return sorted(name for name, p in self.fresh().items() if p.exceeds(self.max_offset_s))

    def clock_off(self) -> bool:
        """Off from a strict majority of the nodes measured (this one included)."""
        measured = len(self.fresh()) + 1
        return len(self.off_peers()) * 2 > measured

    def hlc_ahead_s(self, last_stamp: int) -> float:
        """How far this node's HLC runs ahead of its wall clock."""
        return (hlc.unpack(last_stamp)[0] - self.clock.now_ms()) / 1000

    def refusal(self, last_stamp: int) -> RegistryError | None:
        """Why this node must not stamp a write now, or None."""
        if self.clock_off():
            fresh = self.fresh()
            off = self.off_peers()
            middle = sorted((fresh[n] for n in off), key=lambda p: p.offset_s)[len(off) // 2]
            median = middle.offset_s
            reason = (f"this node's clock is {abs(median):.1f}s "
                      f"{'behind' if median > 0 else 'ahead of'} its peers' ({', '.join(off)}), "
                      f"more than the {self.max_offset_s:g}s the cluster tolerates; writes are "
                      "refused until it is corrected, reads keep working. Retry, or write "
                      "through another region")
            return _refused(reason, {"clock_offset_s": -median,
                                     "uncertainty_s": middle.uncertainty_s, "peers_off": off})
        ahead = self.hlc_ahead_s(last_stamp)
        if ahead > self.max_offset_s:
            reason = (f"this node stamped writes while its clock ran {ahead:.1f}s ahead; its "
                      f"clock is back, and writes resume once it has caught up with those "
                      f"stamps (in {ahead - self.max_offset_s:.1f}s)")
            resume_s = ahead - self.max_offset_s
            return _refused(reason, {"hlc_ahead_s": ahead, "writes_resume_in_s": round(resume_s, 1)},
                            retry_after=resume_s)
        return None

    def check_writable(self, last_stamp: int) -> None:
        refusal = self.refusal(last_stamp)
        if refusal is not None:
            raise refusal

    def describe(self, last_stamp: int) -> dict:
        """The node's clock as health and status show it."""
        refusal = self.refusal(last_stamp)
        return {
            "max_offset_s": self.max_offset_s,
            "skewed": refusal is not None,
            "reason": refusal.detail["reason"] if refusal is not None else None,
            # Known only when it waits for its clock to pass its own stamps.
            "writes_resume_in_s": refusal.detail.get("writes_resume_in_s")
            if refusal is not None else None,
            "fault": self.clock.as_dict() if self.clock.skewed else None,
            "peers": {name: {"offset_s": round(p.offset_s, 4),
                             "uncertainty_s": round(p.uncertainty_s, 4),
                             "exceeds": p.exceeds(self.max_offset_s)}
                      for name, p in sorted(self.fresh().items())},
        }


def _refused(reason: str, fields: dict, retry_after: float = 5.0) -> RegistryError:
    return RegistryError(ErrorCode.UNAVAILABLE, {"reason": reason, **fields},
                         message="clock skewed: writes refused",
                         headers={"Retry-After": str(max(1, int(retry_after + 0.999)))},
                         outcome=Outcome.DEFINITE)
