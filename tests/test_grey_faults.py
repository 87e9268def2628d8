"""Faults that flap on a seeded schedule, checked as the pure function of its
seed it is, without running it. The grey failures themselves (a paused node,
stalled bodies, a flapping pause) run against tests/test_faults.py's module
cluster, which has what they need: a zone-redundant home region.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cluster.faults.controller import FaultController
from cluster.faults.flap import OFF, ON, Flap, FlapError

# -- the schedule, without a cluster ---------------------------------------------------


def test_a_flap_schedule_is_a_pure_function_of_its_seed():
    flap = Flap.parse("2/3", jitter=0.25, seed=7)
    assert flap.timeline(12) == Flap(2, 3, 0.25, 7).timeline(12)        # same seed, same run
    assert flap.timeline(12) != Flap(2, 3, 0.25, 8).timeline(12)
    phases = [phase for _, phase in flap.timeline(12)]
    assert phases == [ON, OFF] * 6
    periods = [b - a for (a, _), (b, _) in zip(flap.timeline(13), flap.timeline(13)[1:], strict=False)]
    for phase, seconds in zip(phases, periods, strict=True):
        base = 2 if phase == ON else 3
        assert 0.75 * base <= seconds <= 1.25 * base
    assert Flap.parse("0.5/1.5").timeline(4) == [(0, ON), (0.5, OFF), (2.0, ON), (2.5, OFF)]
    for bad in ("2", "a/b", "0/1", "1/-1", "nan/1", "1/inf"):
        with pytest.raises(FlapError):
            Flap.parse(bad)
    with pytest.raises(FlapError, match="jitter"):
        Flap.parse("1/1", jitter=1.0)
    # With no seed given, a fault's flap is seeded from the cluster's seed and
    # its number: a cluster started from one seed flaps alike.
    seeds = [FaultController(SimpleNamespace(spec=SimpleNamespace(seed=s)))._flap_seed(n)
             for s, n in ((5, 1), (5, 1), (5, 2), (6, 1))]
    assert seeds[0] == seeds[1] and len(set(seeds)) == 3
