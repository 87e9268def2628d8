"""`georeg bench import`'s arithmetic (``cluster.bench.import_``): MB/s per
round, each side's median, the ratio import ÷ skopeo of the medians against
the goal. The benchmark itself is run by hand (docs/benchmarks.md)."""

from __future__ import annotations

import pytest

from cluster.bench.import_ import ImportBenchOptions, ImportBenchResult, RoundTime, describe


def result(import_s: list[float], skopeo_s: list[float], blob_bytes: int = 8_000_000):
    r = ImportBenchResult(ImportBenchOptions(images=2, layers=2, layer_bytes=2_000_000,
                                             repeat=len(import_s)))
    for i, (a, b) in enumerate(zip(import_s, skopeo_s, strict=True)):
        r.rounds += [RoundTime("import", i, a, blob_bytes), RoundTime("skopeo", i, b, blob_bytes)]
    return r


def test_throughput_is_megabytes_of_blobs_per_second_and_the_ratio_is_of_medians():
    r = result([1.0, 2.0, 4.0], [2.0, 2.0, 8.0])
    # import: 8, 4, 2 MB/s -> median 4; skopeo: 4, 4, 1 -> median 4
    assert [x.mb_per_s for x in r.rounds if x.side == "import"] == [8.0, 4.0, 2.0]
    assert r.median("import") == 4.0 and r.median("skopeo") == 4.0
    assert r.ratio == 1.0 and r.goal_met is True
    slower = result([3.0], [2.0])
    assert slower.ratio == pytest.approx(2 / 3) and slower.goal_met is False
    shown = slower.to_json()
    assert shown["median_mb_per_s"] == {"import": pytest.approx(8 / 3), "skopeo": 4.0}
    assert shown["goal_met"] is False and "NOT met" in describe(slower)


def test_no_skopeo_figure_means_no_ratio():
    r = ImportBenchResult(ImportBenchOptions())
    r.rounds.append(RoundTime("import", 0, 1.0, 1_000_000))
    assert r.ratio is None and r.goal_met is None
    assert RoundTime("skopeo", 0, 0.0, 10).mb_per_s == 0.0


@pytest.mark.parametrize("bench", ["import", "cache"])
def test_a_spec_that_is_not_one_is_said_so_with_exit_2(bench, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", bench, "--config",
                           str(tmp_path / "missing.toml")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"georeg bench {bench}: " in done.stderr and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr
