"""The shipped chaos scenarios, in a bounded form (times scaled down) against one
shared default-topology cluster; `make chaos` runs them at full length.

Each must lose no acknowledged push, converge, end with `georeg verify` clean,
and report what clients saw.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import aiohttp
import msgspec
import pytest
from aiohttp import web

from cluster.cli.chaos import random_run, random_summary, scenario_cluster
from cluster.control import spec as specs
from cluster.faults import chaos as chaos_module
from cluster.faults import nemesis
from cluster.faults.chaos import (
    INVARIANTS,
    RESIDENCY_MISS,
    SCENARIOS,
    Assertions,
    ChaosRun,
    ChaosWorkload,
    Observations,
    Push,
    Scenario,
    Step,
    Workload,
    _windows,
    load,
    summary,
)
from cluster.testing import RunningCluster
from registry_node.errors import Outcome

from . import readme_examples
from .command_line import georeg_command
from .helpers import make_image, push_image, verified_clean

SCALE = float(os.environ.get("GEOREG_CHAOS_SCALE", "0.3"))
# The random nemesis's in `make test`: 6 s at intensity 5 draws a pause (of
# Southeast Asia), a lossy link, a throttle and a full disk, and no outage that
# restarts nodes (restarts dominated the run's time); `make chaos` draws fresh ones.
RANDOM_SEED, RANDOM_DURATION_S, RANDOM_INTENSITY = 218, 6.0, 5.0
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
             "grey-failures", "clock-skew"}
# grey-failures too: test_faults checks a pause's failover, catch-up and peers,
# and a flap's real phases against real processes; test_grey_faults its seeded schedule.
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


class _SlowPoll(ChaosRun):
    """A run whose recovery poll takes ``poll_s`` and then finds every fault recovered."""

    poll_s = 0.0
    polls = 0
    answered_at: float | None = None

    async def _recovered(self, session) -> bool:
        self.polls += 1
        await asyncio.sleep(self.poll_s)
        self.answered_at = self.obs.now()
        return True


def _held_workload(steps: list[Step], duration_s: float, poll_s: float) -> tuple[_SlowPoll, float]:
    """The run's poll and when the workload's loop ended (s into the run): a
    workload of no operations only watches its deadline and the hold."""
    scenario = Scenario(name="held", duration_s=duration_s,
                        workload=Workload(push_rate=0.0, pull_rate=0.0))
    chaos = _SlowPoll(scenario, "http://unused", seed=1, steps=steps)
    chaos.poll_s = poll_s
    workload = ChaosWorkload(scenario, {"eastus": "http://unused"}, chaos.rng, chaos.obs)

    async def work() -> float:
        await workload.run(None, duration_s)
        return chaos.obs.now()

    async def both() -> float:
        faults = asyncio.create_task(asyncio.sleep(0))      # the schedule, already applied
        ended, _ = await asyncio.gather(work(), chaos._outlast_recovery(None, workload, faults))
        return ended

    return chaos, asyncio.run(both())


def test_the_workload_is_held_until_a_slow_recovery_poll_answers(monkeypatch):
    """A recovery poll slower than the time left (a loaded machine) does not
    end the workload before recovery is seen: it goes on until the poll
    answers, then the tail. A recovery seen before the planned end costs
    nothing past it (polling starts at the last heal), and a schedule with no
    fault that heals by itself is neither polled nor held. No cluster, ~2 s."""
    tail = 0.5
    monkeypatch.setattr(chaos_module, "RECOVERY_TAIL_S", tail)
    monkeypatch.setattr(chaos_module, "RECOVERY_POLL_S", 0.05)
    pause = Step(at_s=0.0, action="fault", kind="pause", arguments={"duration_s": 0.1})
    slow, ended = _held_workload([pause], duration_s=0.3, poll_s=0.6)
    assert slow.polls == 1 and ended >= slow.answered_at + tail, (ended, slow.answered_at)
    early, ended = _held_workload([pause], duration_s=0.8, poll_s=0.0)
    assert early.polls == 1 and early.answered_at < 0.3 and 0.8 <= ended < 0.8 + 0.2, ended
    heal_only = [Step(at_s=0.0, action="heal", heal="all")]
    unheld, ended = _held_workload(heal_only, duration_s=0.3, poll_s=0.6)
    assert unheld.polls == 0 and ended < 0.3 + 0.2, ended


async def test_a_verify_that_never_answers_is_a_failed_verify_not_a_crash():
    """verify past the session's timeout (a loaded cluster) is reported as a
    failed verify: the run still reports, rather than raising TimeoutError."""
    answer = asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        await answer.wait()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/georeg/v1/verify", stuck)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    chaos = ChaosRun(Scenario(name="stuck-verify"), f"http://127.0.0.1:{port}", seed=1)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as session:
            verify = await chaos._verify(session)
    finally:
        answer.set()
        await runner.cleanup()
    assert verify["error"].startswith("GET /georeg/v1/verify: "), verify
    report = chaos._report(last_heal=1.0, converged_after=0.5, lost=[], verify=verify,
                           max_lag=None, landed=[])
    assert not report["checks"]["verify_clean"] and not report["passed"]
    assert "georeg verify: FAILED (GET /georeg/v1/verify: " in summary(report)


def test_the_readme_grey_failures_run_as_written(cluster, tmp_path):
    """The README's "Grey failures" examples, run as printed (no option added)
    against the cluster `make up` starts, this module's (the default topology,
    auth on), which the CLI finds as ./.georeg: each command succeeds and
    prints every line the README shows of its output. Then the cluster heals
    and converges, verify clean. It comes before the scenarios: on the
    module's fresh cluster its scrub reads a few blobs, not theirs."""
    (tmp_path / ".georeg").symlink_to(cluster.data_dir)

    async def push() -> None:        # a blob on every node for the bit rot to strike
        async with cluster.http() as session:
            await push_image(session, cluster.endpoint("eastus"), "readme/grey",
                             make_image([4096], seed=7), tag="v1")

    asyncio.run(push())
    verified_clean(cluster, 30, "the pushed image everywhere")
    examples = readme_examples.examples(readme_examples.section("Grey failures"))
    assert len(examples) >= 10, examples
    try:
        for example in examples:
            assert example.argv[0] == "georeg", example.command
            result = georeg_command(example.argv[1:], cwd=tmp_path,
                                    env={**os.environ, "COLUMNS": "200"})
            output = result.stdout + result.stderr
            print(f"$ {example.command}\n{output}")
            assert result.returncode == 0, (example.command, output)
            lacking = readme_examples.missing(example.shown, output)
            assert not lacking, (example.command, lacking, output)
        # The README's `heal --all` healed everything, before the cleanup below does.
        assert not [f for f in cluster.management_api("GET", "/georeg/v1/faults")[1]
                    if f["active"]]
    finally:
        # Whatever failed, the module's scenarios get a healthy cluster: no fault
        # left (a pause would heal itself mid-scenario), and no rotten blob,
        # which healing cannot undo but a scrub repairs.
        cluster.management_api("DELETE", "/georeg/v1/faults")
        cluster.run(cluster.cluster.wait_ready)
        print(georeg_command(["verify", "--scrub"], cwd=tmp_path).stdout)
    verified_clean(cluster, 30, "the cluster to converge after healing")


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


def test_random_nemesis_over_every_fault_kind_keeps_every_invariant(cluster):
    """`georeg chaos random` bounded: the standard workload (pushes, pulls,
    retags, deletes from every client location) under a seeded nemesis drawing
    from every kind, then every invariant checked (`make chaos` runs it longer,
    with fresh seeds)."""
    # The schedule `--schedule-only` prints from the spec is the one run here.
    assert nemesis.Topology.from_spec(cluster.cluster.spec) == \
        nemesis.Topology.from_status(cluster.status())
    scenario = nemesis.scenario(RANDOM_SEED, RANDOM_DURATION_S)
    # Retags and deletes denser than the standard workload's: in 6 s at 0.3/s
    # a run could draw no delete at all.
    scenario = msgspec.structs.replace(scenario, workload=msgspec.structs.replace(
        scenario.workload, retag_rate=1.0, delete_rate=1.0))
    report = asyncio.run(random_run(scenario, tuple(nemesis.NEMESIS), RANDOM_INTENSITY,
                                    cluster.management_url, cluster.cluster.secrets.owner))
    print(random_summary(report))
    # Every fault of the schedule was applied: none refused by the controller.
    assert [a["step"] for a in report["applied"]] == report["schedule"], report["applied"]
    assert all("error" not in a for a in report["applied"]), report["applied"]
    assert len({a["step"].split("(")[0] for a in report["applied"]}) >= 4
    assert set(INVARIANTS) | {"lost_acknowledged", "converged", "verify_clean"} \
        <= set(report["checks"])
    assert report["pushes"]["acknowledged"] > 0 and report["retags"] > 0
    assert report["deletes"]["acknowledged"] > 0, report["deletes"]
    assert report["passed"], (report["broken"], report["checks"], report["verify"])


async def _doctored_invariants(cluster) -> tuple[dict[str, list], Push]:
    """The invariants over one real push and observations doctored to be
    false: each check must be able to fail."""
    run = ChaosRun(nemesis.scenario(RANDOM_SEED, 1.0), cluster.management_url,
                   owner=cluster.cluster.secrets.owner, steps=[])
    async with run._session() as session:
        status = await run._api(session, "GET", "/georeg/v1/cluster")
        run.credentials = await run._admin_credentials(session)
        workload = ChaosWorkload(run.scenario, {"eastus": status["global_endpoints"]["eastus"]},
                                 run.rng, run.obs, credentials=run.credentials)
        await workload.push(session, "eastus", workload.image())
        [push] = run.obs.acknowledged
        # Never deleted, yet marked so; a live push whose digest is wrong.
        push.deleted, push.deleted_in = "doctored", push.region
        run.obs.deleted.append(push)
        wrong = dataclasses.replace(push, digest="sha256:" + "0" * 64, deleted="")
        run.obs.acknowledged.append(wrong)
        # The push's layer bytes, in the clear, under a node's data dir.
        needle = Path(status["nodes"][0]["data_dir"]) / "doctored-needle"
        needle.write_bytes(push.layer_sample)
        try:
            verify = {"divergences": [{"kind": "tag", "detail": "doctored tag"},
                                      {"kind": "residency", "detail": "doctored residency"}]}
            invariants = await run._invariants(session, verify)
            # The convergence wait waits for such a delete too (verify is a snapshot).
            invariants["settling"] = await run._settling(session)
            return invariants, push
        finally:
            needle.unlink()


def test_every_invariant_of_the_random_nemesis_can_fail(cluster):
    broken = asyncio.run(_doctored_invariants(cluster))
    broken, push = broken
    # Served with its real digest, which is not the doctored one.
    assert any(f"HTTP 200, {push.digest}" in c for c in broken["acknowledged_pullable"]), broken
    assert any("doctored" in c and "still on" in c for c in broken["deletes_applied"]), broken
    assert any("doctored-needle" in c for c in broken["no_plaintext_on_disk"]), broken
    assert broken["tags_agree"] == ["doctored tag"]
    assert broken["confined_stays_in_region"] == ["doctored residency"]
    assert any("doctored" in c for c in broken["settling"]), broken["settling"]


@pytest.mark.soak       # ~27 s: a restart, then convergence over the modelled WAN
def test_a_run_outlasts_the_restart_of_what_its_faults_took_down(cluster):
    """The workload ends 1.5 s after Brazil South's crash heals, sooner than a
    node restarts: the run keeps it on until the node is healthy again, so its
    clients are seen coming back (before: the run stopped watching first, and
    a loaded machine made test_scenario[home-region-crash] flaky)."""
    scenario = Scenario(
        name="outlast", duration_s=2.0,
        workload=Workload(push_rate=4.0, pull_rate=0.0, clients=("brazilsouth",),
                          layers=1, layer_size=1024, repositories=1),
        steps=({"at_s": 0.3, "fault": "region-outage", "region": "brazilsouth",
                "mode": "crash", "duration_s": 0.2},),
        assertions=Assertions(max_convergence_s=30, verify=False))
    chaos = ChaosRun(scenario, cluster.management_url, owner=cluster.cluster.secrets.owner)
    report = asyncio.run(chaos.run())
    moves = [m["to"] for m in report["failovers"]["brazilsouth"]]
    assert moves and moves[0] != "brazilsouth" and moves[-1] == "brazilsouth", moves
    assert report["pushes"]["lost"] == 0 and report["passed"], report["checks"]

