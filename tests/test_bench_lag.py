"""`georeg bench lag` end to end in its smallest form, plus the floor formula.

Only the shape of the results is checked — every pair is there with positive
lags and a floor, the chart is a PNG, the recorded arrivals agree with what real
GETs saw, no process outlives the run. Performance is reported by the
benchmark, never asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.bench.floor import BlobPush, ImagePush, image_floor_ms
from cluster.bench.lag_report import link_delivery
from cluster.cli.main import main
from cluster.network.links import LinkModel

# Access control on, as a user's cluster has it: the benchmark is the owner
# (management API), its client logs in, its arrival reader speaks mutual TLS.
SPEC = """\
registry = "georegtest"
home_region = "eastus"
paired_copies = false
auth = "token"

[[replicas]]
region = "westeurope"

[[replicas]]
region = "southeastasia"
"""
NODES = {"eastus", "westeurope", "southeastasia"}
ORIGINS = ("eastus", "westeurope")   # content written in southeastasia never leaves it


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in argv:
            found.append(argv)
    return found


@pytest.mark.parametrize("wan", [False, True], ids=["loopback", "wan"])
def test_bench_lag_reports_every_pair_with_floors_and_a_chart(tmp_path, wan):
    config = tmp_path / "spec.toml"
    config.write_text(SPEC)
    out, chart, workdir = tmp_path / "lag.json", tmp_path / "lag.png", tmp_path / "work"
    argv = ["bench", "lag", "--config", str(config), "--images", "3", "--rate", "4",
            "--layer-size", "64KiB", "--verify", "2", "--quiet-wait", "0",
            "--json", str(out), "--chart", str(chart), "--workdir", str(workdir)]
    for origin in ORIGINS:
        argv += ["--origin", origin]
    if not wan:
        argv.append("--no-wan")

    assert main(argv) == 0

    results = json.loads(out.read_text())
    assert results["cluster"]["wan_enabled"] is wan
    pairs = {(p["origin"], p["destination"]): p for p in results["pairs"]}
    assert set(pairs) == {(o, d) for o in ORIGINS for d in NODES if d != o}
    for key, pair in pairs.items():
        assert pair["samples"] == 3 and pair["missing"] == 0, key
        assert pair["throughput_mb_s"] > 0, (key, pair)
        assert pair["min_ms"] <= pair["p50_ms"] <= pair["p95_ms"] <= pair["p99_ms"] <= pair["max_ms"]
        # Lag counts from the client's receipt of the 201. On loopback a replica
        # may hold the image before that (the blobs travel with their events,
        # and the origin still fsyncs and answers): below zero by at most that
        # commit-to-answer time, which 250 ms bounds loosely.
        assert pair["min_ms"] > (0 if wan else -250), (key, pair)
        assert pair["floor_ms"] >= 0 and len(pair["lags_ms"]) == 3
        if wan:  # every one of these pairs crosses an ocean: the floor is tens of ms
            assert pair["floor_ms"] > 10, (key, pair)
            assert pair["p50_ratio"] > 0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    links = results["link_delivery"]
    if wan:  # every layer of every image crossed to both other regions, at least once
        assert links["bytes"] >= len(ORIGINS) * 3 * 3 * 64 * 1024 * 2, links
        assert links["chunks"] > 0 and links["lateness_ms_at_most"]["p50"] is not None, links

    verification = results["verification"]
    assert verification["checks"] == 2
    assert verification["all_consistent"], results["verification_checks"]
    assert verification["get_minus_recorded_ms"]["min"] >= 0
    assert _processes_mentioning(str(workdir)) == []


def _push(blob_sent_ms: list[float], manifest_sent_ms: float, size: int = 1 << 20) -> ImagePush:
    ms = 1_000_000
    t0 = 10**18
    return ImagePush("a", "r", "t", "sha256:x",
                     tuple(BlobPush(size, t0 + int(s * ms), t0 + int(s * ms) + 1) for s in blob_sent_ms),
                     t0 - 100 * ms, t0 + int(manifest_sent_ms * ms), t0)


def test_floor_is_the_slowest_blob_or_the_manifest_event_whichever_is_later():
    link = LinkModel(latency_ms=40.0, jitter_ms=0.0, bandwidth_mbps=500.0)
    one_mib_ms = (1 << 20) * 8 / 500e6 * 1000          # 16.8 ms on the wire
    # Blobs long before the acknowledgement: the manifest event (one way) decides.
    assert image_floor_ms(_push([-500, -400], -5), link) == pytest.approx(40.0)
    # A blob committed just before: event + request + data, one way each, and its bytes.
    assert image_floor_ms(_push([-500, -10], -5), link) == pytest.approx(-10 + 120 + one_mib_ms)


def test_floor_uses_the_least_delay_and_is_zero_on_loopback():
    jittery = LinkModel(latency_ms=40.0, jitter_ms=4.0, bandwidth_mbps=0.0)
    assert image_floor_ms(_push([-500], 0), jittery) == pytest.approx(36.0)
    assert image_floor_ms(_push([-500], -20), LinkModel()) == 0.0


def test_link_delivery_counts_only_what_crossed_between_the_snapshots():
    bounds = [1, 10, 100]

    def snapshot(name: str, moved: int, counts: list[int], held: int) -> dict:
        return {"name": name, "bytes": moved, "lateness_bounds_ms": bounds,
                "lateness_counts": counts, "held_by_receiver": held}

    before = [snapshot("a->b", 1000, [5, 0, 0, 0], 1), snapshot("b->a", 0, [0, 0, 0, 0], 0)]
    after = [snapshot("a->b", 5000, [195, 4, 0, 1], 3), snapshot("b->a", 700, [0, 0, 2, 0], 0),
             snapshot("c->a", 10, [1, 0, 0, 0], 0)]   # a link added meanwhile
    summary = link_delivery(before, after)
    assert summary["bytes"] == 4000 + 700 + 10
    assert summary["chunks"] == 190 + 4 + 1 + 2 + 1
    assert summary["held_by_receiver"] == 2
    assert summary["lateness_ms_at_most"] == {"p50": 1, "p99": 100, "p999": None}
    assert list(summary["worst_links_p99_ms_at_most"]) == ["a->b", "b->a", "c->a"]
    assert summary["worst_links_p99_ms_at_most"]["b->a"] == 100


def test_a_run_where_nothing_arrived_gets_no_chart_and_no_traceback(tmp_path):
    """Every copy missing (a cluster the reader could not ask, say) is a result
    to report, not a crash in the chart."""
    from cluster.bench.lag_chart import write_chart
    from cluster.bench.lag_report import LagResults, host

    results = LagResults(host(), {}, {"nodes": [{"name": "eastus"}, {"name": "westeurope"}],
                                      "wan_enabled": False},
                         missing=[("eastus", "westeurope")] * 3)
    assert write_chart(results, tmp_path / "lag.png") is False
    assert not (tmp_path / "lag.png").exists()
