"""A running chaos scenario's timeline: what ``cluster.faults.chaos.ChaosRun``
reports to the management server about once a second while it runs (and once
when it is done), and what the dashboard (``cluster.control.dashboard``)
draws — the steps, when each was applied and the fault it injected, the
pushes acknowledged and the errors by code per time bucket, and the moments a
client location failed over. When each fault was injected and healed is not
in it: the fault controller of the cluster knows (a fault healing itself
after its duration included), and the dashboard reads it there.

Invariants: every time is seconds since the run started (``started_at``, wall
clock, sets them against the faults' times); the per-bucket series have one
entry per ``bucket_s`` from the start, at most ``MAX_BUCKETS`` (a longer run
gets wider buckets), so a report stays small whatever the run's length.
"""

from __future__ import annotations

import math

import msgspec

MAX_BUCKETS = 300
MAX_STEPS = 200
MAX_CODES = 16
MAX_FAILOVERS = 200
PHASES = ("running", "converging", "checking", "done")


class TimelineStep(msgspec.Struct, forbid_unknown_fields=True):
    at_s: float                           # when the schedule puts it
    step: str                             # ``Step.describe()``
    applied_at_s: float | None = None     # when it was applied (None: not yet)
    fault: str | None = None              # the fault it injected (its id)
    error: str | None = None              # why it could not be applied


class Failover(msgspec.Struct, forbid_unknown_fields=True):
    at_s: float
    client: str                           # a client location
    to: str                               # the region now serving it


class Timeline(msgspec.Struct, forbid_unknown_fields=True):
    scenario: str
    seed: int
    started_at: float                     # wall clock (``time.time()``) at the run's start
    duration_s: float                     # the workload's planned length
    at_s: float                           # how far the run is
    phase: str                            # one of PHASES
    steps: list[TimelineStep]
    bucket_s: float
    pushes: dict[str, int]                # attempted, acknowledged, refused, indefinite
    acknowledged: list[int]               # pushes acknowledged per bucket
    errors: dict[str, list[int]]          # client-visible errors per bucket, by code
    failovers: list[Failover]
    passed: bool | None = None            # once done: whether every check passed

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase is one of {', '.join(PHASES)}, not {self.phase!r}"[:120])
        if not (0 < self.bucket_s and math.isfinite(self.bucket_s) and math.isfinite(self.at_s)
                and math.isfinite(self.started_at)):
            raise ValueError("bucket_s is positive; at_s and started_at are finite")
        series = [self.acknowledged, *self.errors.values()]
        if (len(self.steps) > MAX_STEPS or len(self.errors) > MAX_CODES
                or len(self.failovers) > MAX_FAILOVERS
                or any(len(s) > MAX_BUCKETS for s in series)):
            raise ValueError(f"a timeline has at most {MAX_STEPS} steps, {MAX_CODES} error "
                             f"codes, {MAX_FAILOVERS} failovers and {MAX_BUCKETS} buckets")


def bucket_width(at_s: float) -> float:
    """The bucket a run ``at_s`` long is counted in: 1 s, or wider past
    ``MAX_BUCKETS`` seconds (a whole number of seconds)."""
    return float(max(1, math.ceil(at_s / MAX_BUCKETS)))


def per_bucket(times: list[float], width: float, at_s: float) -> list[int]:
    """How many of ``times`` fall in each bucket of ``width`` up to ``at_s``."""
    counts = [0] * min(MAX_BUCKETS, int(at_s // width) + 1)
    for t in times:
        index = int(t // width)
        if 0 <= index < len(counts):
            counts[index] += 1
    return counts
