"""Hypothesis profiles of this suite, and how each test's example count follows them.

``ci`` (the default; ``make test``): one fixed seed, so two runs draw the same
examples and a red run is rerun exactly; no example database, so nothing
from earlier runs changes what is drawn. ``soak`` (``make soak``): a fresh
seed every run, ten times the examples and twice the state machine's steps.
Either way the seed is printed in the report header; ``--hypothesis-seed=N``
(or ``GEOREG_HYPOTHESIS_SEED=N``) replays it, ``--hypothesis-profile=NAME``
(or ``GEOREG_HYPOTHESIS_PROFILE``) picks the profile.

A test writes the example count it needs in ``ci`` as ``scaled(n)``; the
active profile multiplies it, rather than the test overriding the profile.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from hypothesis import settings

CI_SEED = 24


@dataclass(frozen=True)
class Profile:
    name: str
    examples: float          # times each test's ``ci`` example count
    steps: float             # times the state machine's ``ci`` steps per example
    seed: int | None         # None: a fresh one every run


PROFILES = {
    "ci": Profile("ci", examples=1, steps=1, seed=CI_SEED),
    "soak": Profile("soak", examples=10, steps=2, seed=None),
}
active = PROFILES["ci"]
seed = CI_SEED


def register() -> None:
    settings.register_profile("ci", max_examples=100, deadline=None, print_blob=True,
                              database=None)
    settings.register_profile("soak", max_examples=1000, deadline=None, print_blob=True)


def choose(profile_option: str | None, seed_option: str | None) -> tuple[str, str]:
    """Settle the profile and seed from the command line, the environment, or
    the profile's default; returns both as pytest option values."""
    global active, seed
    name = profile_option or os.environ.get("GEOREG_HYPOTHESIS_PROFILE", "ci")
    if name not in PROFILES:
        raise ValueError(f"unknown Hypothesis profile {name!r}; use one of {sorted(PROFILES)}")
    active = PROFILES[name]
    chosen = seed_option or os.environ.get("GEOREG_HYPOTHESIS_SEED")
    if chosen is None:
        chosen = active.seed if active.seed is not None else random.SystemRandom().getrandbits(32)
    seed = int(chosen)
    return name, str(seed)


def scaled(examples: int) -> int:
    """A test's example count in the active profile."""
    return max(1, round(examples * active.examples))


def scaled_steps(steps: int) -> int:
    """A state machine's steps per example in the active profile."""
    return max(1, round(steps * active.steps))


def header() -> str:
    fresh = "a fresh seed" if active.seed is None else "a fixed seed"
    return (f"hypothesis: profile {active.name} ({fresh}: {seed}; examples x{active.examples:g}); "
            f"rerun with --hypothesis-profile={active.name} --hypothesis-seed={seed}")
