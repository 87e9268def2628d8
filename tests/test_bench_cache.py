"""`georeg bench cache`'s arithmetic (``cluster.bench.cache``): MB/s per
pull, each side's median, first ÷ direct of the times and second ÷ local of
the throughputs against their goals. The benchmark itself is run by hand
(docs/cache.md)."""

from __future__ import annotations

import pytest

from cluster.bench.cache import CacheBenchOptions, CacheBenchResult, PullTime, describe


def result(**seconds: list[float]) -> CacheBenchResult:
    r = CacheBenchResult(CacheBenchOptions(repeat=3))
    for side, times in seconds.items():
        r.pulls += [PullTime(side, i, s, 8_000_000) for i, s in enumerate(times)]
    return r


def test_the_first_ratio_is_of_times_and_the_second_of_throughputs():
    r = result(direct=[1.0, 2.0, 4.0], first=[1.1, 2.2, 4.4], second=[2.0, 2.0, 2.0],
               local=[1.0, 2.0, 8.0])
    # direct 8, 4, 2 MB/s (median 4); first 7.27, 3.64, 1.82 (median 3.64)
    assert r.median("direct") == 4.0
    assert r.first_ratio == pytest.approx(1.1)
    assert r.second_ratio == pytest.approx(4.0 / 4.0)
    assert r.goals_met == {"first": True, "second": True}
    slow = result(direct=[1.0], first=[1.3], second=[1.0], local=[0.9])
    assert slow.first_ratio == pytest.approx(1.3)
    assert slow.second_ratio == pytest.approx(0.9)
    assert slow.goals_met == {"first": False, "second": False}
    text = describe(slow)
    assert text.count("NOT met") == 2
    assert slow.to_json()["goals_met"] == {"first": False, "second": False}


def test_no_figure_means_no_ratio():
    r = result(first=[1.0])
    assert r.first_ratio is None and r.second_ratio is None
    assert r.goals_met == {"first": None, "second": None}
