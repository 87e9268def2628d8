"""The shipped chaos scenarios, in a bounded form (times scaled down) against one
shared default-topology cluster; `make chaos` runs them at full length.

Each must lose no acknowledged push, converge, end with `georeg verify` clean,
and report what clients saw.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from cluster.cli.chaos import scenario_cluster
from cluster.control import spec as specs
from cluster.faults.chaos import (
    RESIDENCY_MISS,
    SCENARIOS,
    ChaosRun,
    Observations,
    Push,
    Scenario,
    _windows,
    load,
    summary,
)
from cluster.testing import RunningCluster
from registry_node.errors import Outcome

SCALE = float(os.environ.get("GEOREG_CHAOS_SCALE", "0.3"))
NAMES = sorted(p.stem for p in SCENARIOS.glob("*.toml"))
# Scaled down, these two run in `make soak` rather than `make test` (~30 s
# each): faster tests check the same behaviour — writes on both sides of a
# partition (test_replication: propagation around it, both sides pushing and
# converging; test_faults' one-way partition; the state machine's partitions,
# no acknowledged write lost) and a slow link (test_faults' degradation and
# stalled-link tests, test_replication_resume's transfers resumed over a cut
# or slow link, the state machine's degraded links). `make chaos` runs every
# scenario at full length.
SOAK_ONLY = {"europe-americas-partition", "slow-transoceanic-link", "throttled-home-region",
             "clock-skew"}
# throttled-home-region, too: test_faults' throttle tests check the fault through the
# CLI and the endpoints (429 with Retry-After, no failover, zones sharing the limit),
# test_throttle the node's buckets with real clients. clock-skew, too: test_clock_skew and
# test_faults check both sides of the tolerated offset, the fence, its heal and convergence.


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The default topology with access control on, as a user's cluster has it:
    the runner is the owner (management API, faults), its clients log in."""
    spec = specs.load(None).with_auth("token")
    with RunningCluster(spec, tmp_path_factory.mktemp("chaos")) as running:
        yield running


def run(cluster, name: str, seed: int | None = None) -> dict:
    scenario = load(SCENARIOS / f"{name}.toml")
    chaos = ChaosRun(scenario, cluster.management_url, seed=seed, scale=SCALE,
                     owner=cluster.cluster.secrets.owner)
    return asyncio.run(chaos.run())


def test_every_scenario_is_valid_and_its_schedule_is_seeded():
    assert set(NAMES) >= {"home-region-crash", "europe-americas-partition", "zone-outage",
                          "slow-transoceanic-link", "routing-maintenance"}
    for name in NAMES:
        scenario = load(SCENARIOS / f"{name}.toml")
        first = ChaosRun(scenario, "http://unused", seed=11, scale=1).steps
        again = ChaosRun(scenario, "http://unused", seed=11, scale=1).steps
        assert [s.describe() for s in first] == [s.describe() for s in again]
        assert scenario.steps and scenario.description


def test_report_keeps_the_first_message_of_every_error_window():
    obs = Observations()
    clock = iter([1.0, 1.5, 9.0, 9.2, 30.0])
    obs.now = lambda: next(clock)
    obs.error("eastus", "push", "UNAVAILABLE", "node eastus-2 closed the connection")
    obs.error("eastus", "push", "UNAVAILABLE", "node eastus-2 closed the connection")
    obs.error("eastus", "push", "UNAVAILABLE", "stored here but unconfirmed")
    obs.error("eastus", "pull", "UNAVAILABLE")           # said nothing: no example
    obs.error("eastus", "pull", "UNAVAILABLE", "no healthy replica")
    windows = _windows([t for t, *_ in obs.errors])
    assert windows == [(1.0, 1.5), (9.0, 9.2), (30.0, 30.0)]
    assert obs.first_examples("eastus", "UNAVAILABLE", windows) == [
        "t+1.0s push: node eastus-2 closed the connection",
        "t+9.0s push: stored here but unconfirmed",
        "t+30.0s pull: no healthy replica"]
    assert obs.first_examples("westeurope", "UNAVAILABLE", windows) == []


def test_a_cluster_a_scenario_starts_is_seeded_with_the_runs_seed():
    scenario = load(SCENARIOS / "zone-outage.toml")
    assert scenario_cluster(scenario).seed == scenario.seed == 3
    assert scenario_cluster(scenario, seed=99).seed == 99          # --seed 99
    # A cluster started apart has its own seed; the summary then names both.
    report = {"scenario": "x", "seed": 3, "cluster_seed": 1234, "scale": 1.0, "passed": True,
              "description": "", "schedule": [], "pushes": {"attempted": 0, "acknowledged": 0,
                                                             "lost": 0},
              "pulls": {"attempted": 0}, "errors_by_client": {}, "failovers": {},
              "convergence_s": 0.5, "last_heal_at_s": 1.0, "max_lag_ms": None,
              "verify": None, "checks": {}}
    assert summary(report).startswith("scenario x (seed 3, scale 1; cluster seed 1234): PASSED")
    report["cluster_seed"] = 3
    assert summary(report).startswith("scenario x (seed 3, scale 1): PASSED")


def test_report_splits_5xx_by_outcome_and_never_counts_an_indefinite_push_as_lost():
    """503s are counted apart by outcome; a push whose manifest got an
    indefinite answer is neither acknowledged nor lost, whether it landed or
    not, and the summary says what such an answer means."""
    chaos = ChaosRun(Scenario(name="outcomes"), "http://unused", seed=1)
    obs = chaos.obs
    clock = iter([1.0, 1.2, 1.4, 5.0, 30.0])
    obs.now = lambda: next(clock)
    obs.error("eastus", "push", "UNAVAILABLE", "write quorum unavailable", Outcome.DEFINITE)
    obs.error("eastus", "push", "UNAVAILABLE", "write quorum unavailable", Outcome.DEFINITE)
    obs.error("eastus", "push", "UNAVAILABLE", "write not confirmed by a second zone",
              Outcome.INDEFINITE)
    obs.error("eastus", "push", "UNAVAILABLE", "write not confirmed by a second zone",
              Outcome.INDEFINITE)
    obs.error("westeurope", "pull", "MANIFEST_UNKNOWN")          # a 4xx: its code says it all
    obs.pushes_attempted, obs.pushes_refused = 5, 2
    obs.acknowledged = [Push("r", "p1", "sha256:a", "westeurope", 0.5, "westeurope")]
    obs.indefinite = [Push("r", "p2", "sha256:b", "eastus", 1.4),
                      Push("r", "p3", "sha256:c", "eastus", 5.0)]
    report = chaos._report(last_heal=10.0, converged_after=1.0, lost=[], verify={"ok": True},
                           max_lag=None, landed=[True, False])
    assert report["errors_by_client"] == {
        "eastus": {"UNAVAILABLE (definite)": 2, "UNAVAILABLE (indefinite)": 2},
        "westeurope": {"MANIFEST_UNKNOWN": 1}}
    assert report["error_windows_s"]["eastus"] == {"UNAVAILABLE (definite)": [(1.0, 1.2)],
                                                   "UNAVAILABLE (indefinite)": [(1.4, 1.4),
                                                                                (5.0, 5.0)]}
    assert report["pushes"] == {"attempted": 5, "acknowledged": 1, "lost": 0, "refused": 2,
                                "indefinite": 2, "indefinite_landed": 1, "indefinite_absent": 1}
    assert [(p["tag"], p["landed"]) for p in report["indefinite"]] == [("p2", True), ("p3", False)]
    assert report["checks"]["lost_acknowledged"] and report["passed"]
    text = summary(report)
    assert "0 acknowledged then lost, 2 refused (did not happen), 2 indefinite (1 landed, " \
           "1 never appeared); pulls" in text
    assert "2 × UNAVAILABLE (indefinite) (1.4–1.4s, 5–5s)" in text
    assert "2 × UNAVAILABLE (definite) (1–1.2s)" in text
    assert "the write may have landed" in text and "idempotent by digest" in text


def test_summary_speaks_of_indefinite_outcomes_only_when_there_were_some():
    chaos = ChaosRun(Scenario(name="calm"), "http://unused", seed=1)
    chaos.obs.error("eastus", "push", "UNAVAILABLE", "write quorum unavailable", Outcome.DEFINITE)
    chaos.obs.pushes_attempted = chaos.obs.pushes_refused = 1
    report = chaos._report(last_heal=1.0, converged_after=0.5, lost=[], verify={"ok": True},
                           max_lag=None, landed=[])
    text = summary(report)
    assert "may have landed" not in text and "indefinite (" not in text
    assert "0 acknowledged then lost, 1 refused (did not happen); pulls" in text


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.soak) if name in SOAK_ONLY and SCALE < 1 else name
    for name in NAMES])
def test_scenario(cluster, name):
    report = run(cluster, name)
    print(summary(report))
    assert report["cluster_seed"] == cluster.cluster.spec.seed is not None
    assert report["pushes"]["acknowledged"] > 0
    seen = {code for codes in report["errors_by_client"].values() for code in codes}
    assert not seen & {"UNAUTHORIZED", "DENIED"}, report["error_examples"]
    assert report["pushes"]["lost"] == 0, report["lost"]
    assert report["convergence_s"] is not None
    assert report["verify"]["ok"], report["verify"]["divergences"]
    assert report["passed"], report["checks"]
    if name == "throttled-home-region":
        # Refused with 429, never moved: a throttled replica is not a failed one.
        assert "TOOMANYREQUESTS" in report["errors_by_client"]["eastus"], report
        assert all(m["to"] == "eastus" for m in report["failovers"]["eastus"]), \
            report["failovers"]
    if name in ("home-region-crash", "routing-maintenance"):
        # East US clients were sent elsewhere, and came back.
        moves = [m["to"] for m in report["failovers"]["eastus"]]
        assert moves and moves[0] != "eastus" and moves[-1] == "eastus", moves
    for example in report["error_examples"].get(f"eastus {RESIDENCY_MISS}", []):
        # Counted apart only when the image was pushed where residency keeps it.
        assert "pushed in brazilsouth" in example or "pushed in southeastasia" in example
    if name == "home-region-crash":
        # Once East US serves its clients again and a write of theirs is
        # acknowledged there, none fails: a returning zone confirms writes
        # (zone quorum) while it catches up, not after (when streams catching
        # up waited on each other, writes kept failing on the quorum's timeout
        # between acknowledged ones).
        back = report["failovers"]["eastus"][-1]["at_s"]
        served = [t for t in report["acknowledged_at_s"]["eastus"] if t >= back]
        assert served, "no East US push was acknowledged after East US returned"
        late = [(code, w) for code, windows in report["error_windows_s"].get("eastus", {}).items()
                for w in windows if w[1] > served[0]]
        assert not late, (late, served[0], report["error_examples"])
