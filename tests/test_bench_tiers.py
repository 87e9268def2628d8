"""`georeg bench tiers`: its arithmetic on answers made up here, and a tiny run
of its reads against a real Basic cluster (rates × 0.5, a 0.1 s burst, 2 s
windows) through the command line.

Correctness, not speed: requests are counted in their window by when they
were sent, 429s are refused and never admitted, the per-minute figures and
ratios follow from the counts, the client really offered more than each
limit, the 429s name the limit the step aims at (the identity's half, then
the replica's whole with four identities), and no process outlives the run.
The admitted rate is only asked to be within ±20 % of the limit: a window of
2 s on a shared machine, where the benchmark's own ±5 % is for its real
windows.
"""

from __future__ import annotations

import json

import pytest

from cluster.bench.tiers import (
    OFF,
    OFF2,
    ON,
    REFERENCE,
    Answer,
    bandwidth_row,
    overhead_summary,
    rate_row,
    tally,
)
from cluster.cli.main import main

from .test_bench_smoke import _processes_mentioning


def test_a_window_counts_what_was_sent_in_it_and_429s_are_refused_not_admitted():
    answers = [Answer(0.9, 200), Answer(1.0, 200), Answer(1.5, 202), Answer(1.6, 429, "replica"),
               Answer(1.7, 429, "identity"), Answer(1.8, 429, "identity"), Answer(1.9, 500),
               Answer(2.0, 200)]
    counts = tally(answers, 1.0, 2.0)           # [1.0, 2.0): 0.9 and 2.0 are outside
    assert counts == {"sent": 6, "admitted": 2, "refused": 3, "errors": 1,
                      "refused_by": {"replica": 1, "identity": 2}}
    row = rate_row("reads", "identity", 1, 100.0, counts, window_s=1.0, drain_s=0.5)
    assert row["offered_per_min"] == 360 and row["admitted_per_min"] == 120
    assert row["refused_per_min"] == 180 and row["errors"] == 1
    assert row["ratio"] == pytest.approx(1.2) and not row["within"] and row["drove_past"]
    # ±5 % either side, and an offer that is not past the limit is said to be short
    low = rate_row("writes", "replica", 4, 1000.0,
                   {"sent": 17, "admitted": 16, "refused": 1, "errors": 0, "refused_by": {}},
                   window_s=1.0, drain_s=None)
    assert low["ratio"] == pytest.approx(0.96) and low["within"]
    assert not low["drove_past"]                 # 1,020/min offered is not 5 % past 1,000
    assert bandwidth_row("upload", 10.0, 52_400_000, 5.0)["within"]          # 10.48 MB/s
    assert not bandwidth_row("upload", 10.0, 53_000_000, 5.0)["within"]      # 10.6 MB/s


def test_overhead_is_each_rounds_ratio_to_off_and_its_median():
    rounds = [{OFF: {"op": 100.0}, ON: {"op": 97.0}, OFF2: {"op": 102.0}, REFERENCE: {"op": 30.0}},
              {OFF: {"op": 200.0}, ON: {"op": 180.0}, OFF2: {"op": 190.0}, REFERENCE: {"op": 40.0}},
              {OFF: {"op": 100.0}, ON: {"op": 99.0}, OFF2: {"op": 100.0}, REFERENCE: {"op": 25.0}}]
    row = overhead_summary(rounds)["op"]
    # paired per round (0.97, 0.90, 0.99), not medians divided (97/100)
    assert row["on/off"]["median"] == pytest.approx(0.97)
    assert row["on/off"]["min"] == pytest.approx(0.90) and row["on/off"]["max"] == 0.99
    assert row["off2/off"]["median"] == pytest.approx(1.0)
    assert row["reference/off"]["median"] == pytest.approx(0.25)
    assert row["ops_per_s"] == {OFF: 100.0, ON: 99.0, OFF2: 102.0, REFERENCE: 30.0}
    assert row["overhead"] == pytest.approx(0.03) and row["within_target"] and row["resolved"]
    rounds[0][ON]["op"] = 90.0                   # medians 0.90, 0.90, 0.99: 10 % over
    assert not overhead_summary(rounds)["op"]["within_target"]
    rounds[0][OFF2]["op"] = 115.0               # one round's A/A 1.15: noise, not a verdict
    assert not overhead_summary(rounds)["op"]["resolved"]


def test_bench_tiers_drives_past_each_read_limit_and_reports_what_was_admitted(
        tmp_path, capsys):
    out, workdir = tmp_path / "tiers.json", tmp_path / "work"
    status = main(["bench", "tiers", "--tiers", "basic", "--only", "reads", "--scale", "0.5",
                   "--burst", "0.1", "--window", "2", "--settle", "0.2",
                   "--workdir", str(workdir), "--json", str(out)])

    assert status == 0
    results = json.loads(out.read_text())
    basic = results["tiers"]["Basic"]
    assert basic["limits"]["per_minute"]["read"] == 5000      # Basic's 10,000 × 0.5
    assert basic["bandwidth"] == []
    identity, replica = basic["rates"]
    assert (identity["scope"], identity["identities"], identity["limit_per_min"]) == (
        "identity", 1, 2500)
    assert (replica["scope"], replica["identities"], replica["limit_per_min"]) == (
        "replica", 4, 5000)
    for row, limit in ((identity, "identity"), (replica, "replica")):
        counts = row["counts"]
        assert counts["errors"] == 0 and counts["refused"] > 0, row
        assert counts["sent"] == counts["admitted"] + counts["refused"]
        assert row["admitted_per_min"] == pytest.approx(counts["admitted"] * 60 / 2)
        assert row["ratio"] == pytest.approx(row["admitted_per_min"] / row["limit_per_min"])
        assert row["drove_past"] and row["offered_per_min"] > row["admitted_per_min"]
        assert set(row["refused_by"]) == {limit}, row       # the limit the step aims at
        assert 0.8 <= row["ratio"] <= 1.2, row
    printed = capsys.readouterr().out
    assert "reads (identity)" in printed and "reads (replica)" in printed
    assert _processes_mentioning(str(workdir)) == []
