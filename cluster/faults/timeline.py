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
What arrives is decoded by ``decode_timeline`` only: strict JSON (no ``NaN`` or
``Infinity``, which would make the dashboard's snapshot not JSON), every time
and count in bounds, every string short.
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec
from msgspec import Meta

MAX_BUCKETS = 300
MAX_STEPS = 200
MAX_CODES = 16
MAX_FAILOVERS = 200
PHASES = ("running", "converging", "checking", "done")
MAX_NAME = 200                  # a scenario's, a step's, a client's, a region's
MAX_ERROR = 500                 # why a step could not be applied

Seconds = Annotated[float, Meta(ge=0, le=10**8)]         # into the run (years: no run lasts)
Count = Annotated[int, Meta(ge=0)]
Name = Annotated[str, Meta(max_length=MAX_NAME)]


class TimelineStep(msgspec.Struct, forbid_unknown_fields=True):
    at_s: Seconds                         # when the schedule puts it
    step: Name                            # ``Step.describe()``
    applied_at_s: Seconds | None = None   # when it was applied (None: not yet)
    fault: Name | None = None             # the fault it injected (its id)
    error: Annotated[str, Meta(max_length=MAX_ERROR)] | None = None   # why it was not applied


class Failover(msgspec.Struct, forbid_unknown_fields=True):
    at_s: Seconds
    client: Name                          # a client location
    to: Name                              # the region now serving it


class Pushes(msgspec.Struct, forbid_unknown_fields=True):
    attempted: Count = 0
    acknowledged: Count = 0
    refused: Count = 0
    indefinite: Count = 0


class Timeline(msgspec.Struct, forbid_unknown_fields=True):
    scenario: Name
    seed: int
    started_at: Annotated[float, Meta(ge=0, le=10**11)]   # wall clock at the run's start
    duration_s: Seconds                   # the workload's planned length
    at_s: Seconds                         # how far the run is
    phase: str                            # one of PHASES
    steps: list[TimelineStep]
    bucket_s: Annotated[float, Meta(gt=0, le=10**8)]
    pushes: Pushes
    acknowledged: list[Count]             # pushes acknowledged per bucket
    errors: dict[Name, list[Count]]       # client-visible errors per bucket, by code
    failovers: list[Failover]
    passed: bool | None = None            # once done: whether every check passed

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase is one of {', '.join(PHASES)}, not {self.phase!r}"[:120])
        series = [self.acknowledged, *self.errors.values()]
        if (len(self.steps) > MAX_STEPS or len(self.errors) > MAX_CODES
                or len(self.failovers) > MAX_FAILOVERS
                or any(len(s) > MAX_BUCKETS for s in series)):
            raise ValueError(f"a timeline has at most {MAX_STEPS} steps, {MAX_CODES} error "
                             f"codes, {MAX_FAILOVERS} failovers and {MAX_BUCKETS} buckets")


def decode_timeline(body: bytes) -> Timeline:
    """A run's report as it arrives (JSON): a ``msgspec.DecodeError`` (its
    ``ValidationError`` included) says what is wrong."""
    return msgspec.json.decode(body, type=Timeline)


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

