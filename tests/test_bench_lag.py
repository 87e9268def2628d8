"""`georeg bench lag` end to end in its smallest form, plus the floor formula
and the clock probe.

Only the shape of the results is checked — every pair is there with positive
lags and a floor, the chart is a PNG, the recorded arrivals agree with what real
GETs saw, no lag beats its floor by more than the measured clock error, no
process outlives the run. Performance is reported by the
benchmark, never asserted here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cluster.bench.clocks import ClockCheck, bracket
from cluster.bench.floor import BlobPush, ImagePush, image_floor_ms, least_one_way_ms
from cluster.bench.lag_report import link_delivery
from cluster.cli.main import main
from cluster.control import spec as specs
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
def test_bench_lag_reports_every_pair_and_no_lag_beats_its_floor(tmp_path, wan):
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
        # Lag counts from the client's receipt of the 201. A replica may hold
        # the image before that (the blobs travel with their events, and the
        # origin still fsyncs and answers): below zero by at most that
        # commit-to-answer time, which 250 ms bounds loosely. Over a WAN too: on
        # a busy machine the 201 can reach the client later than an ocean's
        # one-way latency after the origin committed (seen: 48 ms).
        assert pair["min_ms"] > -250, (key, pair)
        assert len(pair["lags_ms"]) == len(pair["floors_ms"]) == 3
        if wan:  # every one of these pairs crosses an ocean: counted from the
            # origin's own acknowledgement, the lag is tens of ms
            assert pair["p50_ms"] - pair["node_ack_offset_ms"] > 10, (key, pair)
            if pair["floor_ms"] > 0:  # a ratio to a floor at or below zero means nothing
                assert pair["p50_ratio"] > 0, (key, pair)
        else:    # the manifest was held before it was acknowledged, and nothing more
            assert -250 < pair["floor_ms"] <= 0, (key, pair)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The floor is a lower bound: no image arrived sooner than its floor
    # allows, beyond what the clocks (measured in the same run) could explain.
    error = results["clocks"]["error_ms"]
    assert error is not None, results["clocks"]
    for key, pair in pairs.items():
        for lag, floor in zip(pair["lags_ms"], pair["floors_ms"], strict=True):
            assert lag >= floor - error, (key, lag, floor, error)
        assert pair["below_floor_ms"] <= error, (key, pair)

    links = results["link_delivery"]
    if wan:  # every layer of every image crossed to both other regions, at least once
        assert links["bytes"] >= len(ORIGINS) * 3 * 3 * 64 * 1024 * 2, links
        assert links["chunks"] > 0 and links["lateness_ms_at_most"]["p50"] is not None, links
        # Per region pair: each origin region's images crossed to both others,
        # at least their layers' bytes per image.
        by_pair = links["by_region_pair"]
        for origin in ORIGINS:
            for destination in NODES - {origin}:
                pair = by_pair[f"{origin} -> {destination}"]
                assert pair["wan"] and pair["bytes_per_image"] >= 3 * 64 * 1024, (origin, pair)

    verification = results["verification"]
    assert verification["checks"] == 2
    assert verification["all_consistent"], results["verification_checks"]
    assert verification["get_minus_recorded_ms"]["min"] >= 0
    assert _processes_mentioning(str(workdir)) == []


def _push(blobs_ms: list[tuple[float, float]], manifest_sent_ms: float,
          size: int = 1 << 20) -> ImagePush:
    """A push whose blobs' PATCH and PUT left the client at the given (first,
    put) ms and whose manifest PUT at ``manifest_sent_ms``, all relative to the
    client's receipt of the manifest's 201."""
    ms = 1_000_000
    t0 = 10**18
    return ImagePush("a", "r", "t", "sha256:x",
                     tuple(BlobPush(size, t0 + int(f * ms), t0 + int(s * ms), t0 + int(s * ms) + 1)
                           for f, s in blobs_ms),
                     t0 - 100 * ms, t0 + int(manifest_sent_ms * ms), t0, manifest_size=0)


def test_floor_is_the_latest_piece_held_then_carried_one_way():
    link = LinkModel(latency_ms=40.0, jitter_ms=0.0, bandwidth_mbps=500.0)
    one_mib_ms = (1 << 20) * 8 / 500e6 * 1000          # 16.8 ms on the wire
    # Blobs long before the acknowledgement: the manifest decides, from when
    # the client sent it (the origin holds it no earlier), one way and no more.
    assert image_floor_ms(_push([(-600, -500), (-500, -400)], -5), link) == pytest.approx(35.0)
    # A blob committed just before: one way and the bytes not yet across, of
    # which a protocol streaming them onward may have sent 4 ms' worth since
    # its PATCH began. No fetch round trip: any protocol could do without.
    assert image_floor_ms(_push([(-600, -500), (-14, -10)], -5), link) == \
        pytest.approx(-10 + 40 + one_mib_ms - 4)
    # A PATCH that began long before its commit: all its bytes may be across.
    assert image_floor_ms(_push([(-60, -30)], -40), link) == pytest.approx(-30 + 40)


def test_floor_uses_the_least_delay_and_is_held_minus_ack_on_loopback():
    jittery = LinkModel(latency_ms=40.0, jitter_ms=4.0, bandwidth_mbps=0.0)
    assert image_floor_ms(_push([(-510, -500)], 0), jittery) == pytest.approx(36.0)
    # No modelled WAN: the latest piece held, before the acknowledgement.
    assert image_floor_ms(_push([(-510, -500)], -20), LinkModel()) == pytest.approx(-20.0)


def test_no_relay_beats_a_direct_link_in_the_default_wan_model():
    """The floor charges the direct link only; that is a lower bound because the
    modelled least one-way delays obey the triangle inequality."""
    spec = specs.load(None)
    wan = spec.wan_model()
    regions = {spec.home_region, *(r.region for r in spec.replicas), *spec.paired_regions().values()}
    for a in regions:
        for b in regions - {a}:
            direct = least_one_way_ms(wan.link(a, b))
            for via in regions - {a, b}:
                relayed = least_one_way_ms(wan.link(a, via)) + least_one_way_ms(wan.link(via, b))
                assert direct <= relayed, (a, via, b)


async def test_a_clock_behind_ours_is_bracketed_by_at_least_its_offset():
    async def behind() -> int:
        return time.time_ns() - 3_000_000

    found = await bracket("x", behind)
    assert found is not None and found.consistent
    assert 3.0 <= found.behind_at_most_ms < 3.0 + 50   # its probe's round trip, loosely
    assert found.lo_ns <= -3_000_000 <= found.hi_ns

    async def silent() -> int:
        return 0

    assert await bracket("y", silent) is None
    check = ClockCheck([found], [], ["y"], 0)
    assert check.error_ms is None


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


def test_link_delivery_groups_bytes_by_the_region_pair_content_went():
    """A link ``x -> y`` carries x's connections to y, whose replies are most of
    it: its bytes count for region(y) -> region(x), per image pushed in region(y)."""
    bounds = [1, 10]

    def link(source: str, target: str, moved: int) -> dict:
        return {"name": f"{source}->{target}", "from": source, "to": target, "bytes": moved,
                "lateness_bounds_ms": bounds, "lateness_counts": [1, 0, 0],
                "held_by_receiver": 0}

    regions = {"we-1": "westeurope", "we-2": "westeurope", "east": "eastus"}
    before = [link("we-1", "east", 100), link("we-2", "east", 100), link("we-1", "we-2", 0),
              link("east", "we-1", 0)]
    after = [link("we-1", "east", 3100), link("we-2", "east", 1100), link("we-1", "we-2", 500),
             link("east", "we-1", 40)]
    pairs = link_delivery(before, after, regions, images={"eastus": 2, "westeurope": 4})[
        "by_region_pair"]
    assert pairs == {
        "eastus -> westeurope": {"wan": True, "bytes": 4000, "bytes_per_image": 2000},
        "westeurope -> eastus": {"wan": True, "bytes": 40, "bytes_per_image": 10},
        "westeurope -> westeurope": {"wan": False, "bytes": 500, "bytes_per_image": 125},
    }
    # A region that pushed nothing has no per-image figure; a link to a node
    # not in the map (an endpoint) is left out of the pairs.
    after.append(link("we-1", "proxy", 9))
    pairs = link_delivery(before, after, regions, images={"westeurope": 1})["by_region_pair"]
    assert pairs["eastus -> westeurope"]["bytes_per_image"] is None
    assert sum(p["bytes"] for p in pairs.values()) == 4540


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
