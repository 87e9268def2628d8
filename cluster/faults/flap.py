"""Flapping: a fault that comes and goes on a schedule (``--flap ON_S/OFF_S``).

A ``Flap`` is data: how long the fault is in effect (*on*), how long it is
lifted (*off*), how much each period may stray (``jitter``, a fraction: 0.2
draws each period from ±20 % of its length) and the seed of those draws. Its
schedule is a pure function of those four values — no clock, no I/O — so the
same seed and fault give the same schedule on every run, and a test reads it
without waiting for it (``Flap.timeline``). The fault controller
(``cluster.faults.controller``) walks the schedule in real time, applying and
lifting the fault; healing the fault stops the walk and leaves it lifted.

Invariants: periods alternate on, off, on, …, starting *on* (the fault is
applied when injected); every period is positive (jitter is below 1); the
draws come from ``random.Random(seed)`` alone.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

ON, OFF = "on", "off"
MIN_PERIOD_S = 0.1


class FlapError(ValueError):
    """A flap that cannot be: the message says what to change."""


@dataclass(frozen=True, slots=True)
class Flap:
    on_s: float
    off_s: float
    jitter: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.on_s) and math.isfinite(self.off_s)):
            raise FlapError(f"flap periods are numbers of seconds, not "
                            f"{self.on_s:g}/{self.off_s:g}")
        if min(self.on_s, self.off_s) < MIN_PERIOD_S:
            raise FlapError(f"flap periods must be at least {MIN_PERIOD_S:g} s each, not "
                            f"{self.on_s:g}/{self.off_s:g}")
        if not 0 <= self.jitter < 1:
            raise FlapError(f"jitter is a fraction of each period, from 0 up to (not "
                            f"including) 1, not {self.jitter:g}")

    @classmethod
    def parse(cls, text: str, jitter: float = 0.0, seed: int = 0) -> Flap:
        """``"ON_S/OFF_S"``, e.g. ``"2/3"`` or ``"0.5/1.5"``."""
        on, sep, off = str(text).partition("/")
        try:
            if not sep:
                raise ValueError
            periods = float(on), float(off)
        except ValueError:
            raise FlapError(f"flap is ON_S/OFF_S in seconds, e.g. 2/3, not {text!r}") from None
        try:
            jitter = float(jitter)
        except (TypeError, ValueError):
            raise FlapError(f"flap jitter is a fraction, e.g. 0.2, not {jitter!r}") from None
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise FlapError(f"a flap seed is a whole number, not {seed!r}")
        return cls(*periods, jitter, seed)

    def scaled(self, factor: float) -> Flap:
        return Flap(self.on_s * factor, self.off_s * factor, self.jitter, self.seed)

    def periods(self) -> Iterator[tuple[str, float]]:
        """``(phase, seconds)`` forever: on, off, on, …, each drawn with the seed."""
        rng = random.Random(self.seed)
        for phase in itertools.cycle((ON, OFF)):
            base = self.on_s if phase == ON else self.off_s
            yield phase, base * (1 + rng.uniform(-self.jitter, self.jitter)) if self.jitter \
                else base

    def timeline(self, changes: int) -> list[tuple[float, str]]:
        """The first ``changes`` phases as ``(seconds since injection, phase)``."""
        at = 0.0
        out = []
        for phase, seconds in itertools.islice(self.periods(), changes):
            out.append((round(at, 6), phase))
            at += seconds
        return out

    def describe(self) -> str:
        jitter = f" ±{self.jitter:.0%}" if self.jitter else ""
        return f"flapping {self.on_s:g} s on / {self.off_s:g} s off{jitter} (seed {self.seed})"

    def as_dict(self) -> dict:
        return {"on_s": self.on_s, "off_s": self.off_s, "jitter": self.jitter, "seed": self.seed}
