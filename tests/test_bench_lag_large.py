"""`georeg bench lag --layer-mib`, the large-layer mode, end to end in its
smallest form: two single-node regions over the modelled WAN, one round of
one 3 MiB layer (past the size that travels inline with its event, so it is
fetched as a large layer is).

Only the shape of the results is checked — every destination node and region
reported, with its arrival after the ack, its time since the
origin held the layer, and the bandwidth floor; no arrival beats the floor
(one way + size ÷ B after the layer was held, georeg sending a blob on only
once its origin holds it) by more than the measured clock error. Performance
is reported by the benchmark, never asserted here.
"""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from cluster.bench.floor import layer_floor_ms
from cluster.bench.lag_report import Arrival, LagResults, host, print_table
from cluster.cli.main import main
from cluster.network.links import LinkModel

SPEC = """\
registry = "georegtest"
home_region = "eastus"
home_zone_redundant = false
paired_copies = false
auth = "none"

[[replicas]]
region = "westeurope"
"""


MS = 1_000_000


def test_large_layer_stats_per_node_and_per_region_take_each_rounds_last_zone():
    """The report alone, from made-up arrivals: a region's row takes, per
    round, its last node to hold the image; ratios are since-held ÷ floor."""
    floor = layer_floor_ms(100 << 20, LinkModel(latency_ms=40, bandwidth_mbps=500))
    assert floor == pytest.approx(40 + (100 << 20) * 8 / 500e6 * 1000)
    nodes = [{"name": n, "region": r, "zone": z} for n, r, z in (
        ("eastus-1", "eastus", "1"), ("westeurope-1", "westeurope", "1"),
        ("westeurope-2", "westeurope", "2"))]
    results = LagResults(host(), {"large_layer": True, "layers": 1, "layer_bytes": 100 << 20,
                                  "rate_per_origin": 0.5},
                         {"nodes": nodes, "wan_enabled": True, "bandwidth_mbps": 500})
    t0 = 10**18
    # (round, destination, arrival after the ack in ms); the layer was held 1 s before the ack.
    for round_, dest, after_ack in ((0, "westeurope-1", 1500), (0, "westeurope-2", 2500),
                                    (1, "westeurope-1", 3000), (1, "westeurope-2", 2000)):
        acked = t0 + round_ * 10_000 * MS
        results.arrivals.append(Arrival("eastus-1", dest, f"lag/img{round_}", 100 << 20, acked - 2000 * MS,
                                        acked, acked + after_ack * MS, 0, -50.0,
                                        layer_held_ns=acked - 1000 * MS, layer_floor_ms=floor))
    (region,) = results.large_layer_stats(by_region=True)
    assert (region.destination, region.rounds) == ("westeurope", 2)
    assert region.arrival_ms == 2750 and region.arrival_min_ms == 2500  # rounds' last: 2500, 3000
    assert region.since_held_ms == 3750
    assert region.bandwidth_ratio == pytest.approx(3750 / floor) and region.met is False
    by_node = {s.destination: s for s in results.large_layer_stats(by_region=False)}
    assert by_node["westeurope-1"].arrival_ms == 2250 and by_node["westeurope-2"].arrival_ms == 2250
    assert by_node["westeurope-1"].floor_ratio is None          # a floor ≤ 0 has no ratio
    document = results.to_json()["large_layer"]
    assert [r["destination"] for r in document["regions"]] == ["westeurope"]
    assert len(document["nodes"]) == 2
    out = io.StringIO()
    print_table(results, Console(file=out, width=200))
    assert "westeurope-2" in out.getvalue() and "since held" in out.getvalue()


@pytest.mark.soak
def test_bench_lag_large_layer_reports_every_destination_against_the_bandwidth_floor(tmp_path):
    config = tmp_path / "spec.toml"
    config.write_text(SPEC)
    out = tmp_path / "lag.json"

    assert main(["bench", "lag", "--config", str(config), "--layer-mib", "3", "--images", "1",
                 "--quiet-wait", "0", "--json", str(out)]) == 0

    results = json.loads(out.read_text())
    assert results["workload"]["large_layer"] is True
    assert results["workload"]["layers"] == 1 and results["workload"]["layer_bytes"] == 3 << 20
    assert results["images"] == 1
    (pair,) = results["pairs"]
    assert pair["samples"] == 1 and pair["missing"] == 0, pair
    large = results["large_layer"]
    for rows in (large["nodes"], large["regions"]):
        assert [(r["origin"], r["destination"]) for r in rows] == [("eastus", "westeurope")]
        row = rows[0]
        assert row["rounds"] == 1
        # 3 MiB at 500 Mbit/s is 50 ms, plus ~40 ms one way.
        assert row["bandwidth_floor_ms"] > 80, row
        assert row["arrival_min_ms"] <= row["arrival_ms"] <= row["arrival_max_ms"]
        assert row["since_held_ms"] > row["arrival_ms"], row     # held before the ack
        assert row["bandwidth_floor_ratio"] > 0 and row["met"] in (True, False)
    error = results["clocks"]["error_ms"]
    assert error is not None
    for since_held, floor in zip(pair["since_layer_held_ms"], pair["layer_floors_ms"], strict=True):
        assert since_held >= floor - error, (since_held, floor, error)
    for lag, floor in zip(pair["lags_ms"], pair["floors_ms"], strict=True):
        assert lag >= floor - error, (lag, floor, error)
