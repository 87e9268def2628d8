"""The random nemesis (``georeg chaos random``): its schedule is a pure
function of its inputs, its shrinker finds the shortest breaking history (both
without a cluster), and a deliberately broken build is caught by a short run.
The bounded run of the standard workload with every invariant checked is in
test_chaos.py (it reuses that module's cluster)."""

from __future__ import annotations

import asyncio
import inspect
import random

import msgspec
import pytest

from cluster.cli.chaos import random_run, random_summary, scenario_cluster
from cluster.control import spec as specs
from cluster.control.supervisor import node_environment
from cluster.faults import nemesis
from cluster.faults.chaos import INVARIANTS, ChaosRun, ChaosWorkload, Observations, Workload
from cluster.faults.controller import FaultController
from cluster.testing import RunningCluster
from registry_node import broken_build
from registry_node.broken_build import VARIABLE
from registry_node.replica import DigestMismatch, Replica

from .command_line import georeg_command

TOPOLOGY = nemesis.Topology.from_spec(specs.load(None))


def described(steps) -> list[str]:
    return [s.describe() for s in steps]


def test_the_schedule_is_a_pure_function_of_seed_duration_kinds_intensity_and_topology():
    every = tuple(nemesis.NEMESIS)
    first = nemesis.plan(7, 120, every, 1.0, TOPOLOGY)
    assert described(first) == described(nemesis.plan(7, 120, every, 1.0, TOPOLOGY))
    assert 4 <= len(first) <= 25, described(first)
    for other in (nemesis.plan(8, 120, every, 1.0, TOPOLOGY),
                  nemesis.plan(7, 60, every, 1.0, TOPOLOGY),
                  nemesis.plan(7, 120, every, 2.0, TOPOLOGY),
                  nemesis.plan(7, 120, every[1:], 1.0, TOPOLOGY),
                  nemesis.plan(7, 120, every, 1.0, nemesis.Topology(
                      (("eastus", ("",)), ("westeurope", ("",))), ("eastus", "westeurope")))):
        assert described(other) != described(first)
    # Only the kinds asked for; a kind the topology has no place for is dropped.
    only = nemesis.plan(3, 120, ("link-corrupt", "clock"), 3.0, TOPOLOGY)
    assert only and {s.kind for s in only} == {"link", "clock"}
    flat = nemesis.Topology((("eastus", ("",)), ("westeurope", ("",))), ("eastus",))
    assert {s.kind for s in nemesis.plan(3, 120, ("zone-outage", "partition"), 3.0, flat)} \
        == {"partition"}
    with pytest.raises(nemesis.NemesisError, match="unknown nemesis kind"):
        nemesis.kinds_from("partition,pause-the-world")


def test_every_kind_draws_faults_the_controller_takes_and_that_heal_before_the_end():
    seen = set()
    for seed in range(40):
        for step in nemesis.plan(seed, 60, tuple(nemesis.NEMESIS), 3.0, TOPOLOGY):
            arguments = dict(step.arguments)
            duration = arguments.pop("duration_s", None)
            assert 0 <= step.at_s < 0.8 * 60
            if step.kind != "bitrot":
                assert duration and step.at_s + duration <= 0.9 * 60 + 0.5, step.describe()
            inject = getattr(FaultController, "_inject_" + step.kind.replace("-", "_"))
            inspect.signature(inject).bind(None, None, **arguments)   # TypeError if not taken
            if step.kind == "clock":
                assert abs(arguments["offset_s"]) <= nemesis.CLOCK_OFFSET_S
            if step.kind == "bitrot":        # never where no replica could repair it
                assert arguments["region"] not in TOPOLOGY.confined or "zone" in arguments
            seen.add(step.kind)
    assert seen == {"region-outage", "zone-outage", "partition", "link", "disk", "bitrot",
                    "clock", "http", "pause", "routing", "throttle"}


def test_the_command_prints_the_schedule_it_would_run_and_refuses_unknown_kinds():
    """One CLI call (``plan``'s purity is tested in-process above): the
    schedule printed is the planned one, as many steps as ``--only`` names,
    and the replay line carries every input the schedule depends on."""
    kinds = ",".join(reversed(nemesis.NEMESIS))      # any order: one schedule
    args = ["chaos", "random", "--schedule-only", "--seed", "4", "--duration", "60",
            "--kinds", kinds, "--intensity", "2", "--only", "3,1"]
    first = georeg_command(args)
    assert first.returncode == 0, first.stderr
    spec = scenario_cluster(nemesis.scenario(4, 60), 4)
    expected = nemesis.plan(4, 60, tuple(nemesis.NEMESIS), 2.0, nemesis.Topology.from_spec(spec))
    assert first.stdout.splitlines() == described([expected[0], expected[2]])
    assert (f"replay: georeg chaos random --seed 4 --duration 60 "
            f"--kinds {','.join(nemesis.NEMESIS)} --intensity 2 --only 3,1") in first.stderr
    assert nemesis.kinds_from(kinds) == tuple(nemesis.NEMESIS)
    with pytest.raises(nemesis.NemesisError, match=r"unknown nemesis kind\(s\) pause-the-world"):
        nemesis.kinds_from("partition,pause-the-world")


def test_shrinking_finds_the_shortest_history_that_still_breaks():
    asked: list[list[int]] = []

    async def needs_3_and_7(history):
        asked.append(history)
        return 3 in history and 7 in history

    shortest, runs = asyncio.run(nemesis.shrink(list(range(10)), needs_3_and_7, max_runs=50))
    assert shortest == [3, 7] and runs == len(asked) <= 30

    async def always(history):
        return True

    assert asyncio.run(nemesis.shrink(list(range(10)), always)) == ([], 1)
    # Bounded: never asks more than it may, and returns only what broke.
    shortest, runs = asyncio.run(nemesis.shrink(list(range(40)), needs_3_and_7, max_runs=4))
    assert runs <= 4 and 3 in shortest and 7 in shortest


def test_a_replay_pushes_content_of_its_own_and_judges_its_own_repositories():
    """Shrinking replays (named apart) never push the first run's bytes, which
    a damaged copy left by that run would shadow, and judge verify's
    divergences in their own repositories only."""
    first = nemesis.scenario(5, 6.0)
    replay = msgspec.structs.replace(first, name=f"{first.name}-shrink1")

    def blobs(scenario):
        workload = ChaosWorkload(scenario, {"eastus": "http://unused"},
                                 random.Random(scenario.seed), Observations())
        return set(workload.image().blobs)

    assert not blobs(first) & blobs(replay) and blobs(first) == blobs(first)
    verify = {"ok": False, "error": None, "divergences": [
        {"kind": "residency", "repository": "", "detail": "left by the first run"},
        {"kind": "tag", "repository": "chaos/random-5/r0", "detail": "the first run's"},
        {"kind": "tag", "repository": "chaos/random-5-shrink1/r1", "detail": "the replay's"}]}
    scoped = ChaosRun(replay, "http://unused", steps=[], scope="chaos/random-5-shrink1/")
    assert [d["detail"] for d in scoped._divergences(verify)] == ["the replay's"]
    assert len(ChaosRun(first, "http://unused", steps=[])._divergences(verify)) == 3


# The smallest cluster a link can join: two regions, no paired-region copies
# (two processes fewer to start), open (no TLS between nodes: the CRC-32 seal
# and the digest check are all that stands between a flipped byte and the disk).
BROKEN_SPEC = specs.ClusterSpec(
    registry="brokenbuild", tier="Premium", home_region="eastus", auth="none",
    replicas=(specs.ReplicaSpec("westeurope"),), paired_copies=False)
# 2 s of corrupting-link faults at intensity 30: the schedule of seed 5 starts
# them from t+0.2 s, back to back, so every push of the run crosses a
# corrupting link (1-3 % of 1448-byte segments flipped, blobs of 32-64 KiB).
BROKEN_SEED, BROKEN_DURATION_S, BROKEN_INTENSITY = 5, 2.0, 30.0


async def test_the_broken_build_switch_is_read_once_at_start_and_never_inherited(node):
    """The test-only switch (registry_node.broken_build) is data from the
    node's start on: only a replica built with it stores bytes that do not
    hash to their digest, the node says so, and a supervisor never passes the
    variable from its own environment to nodes, only when a harness asks."""
    body, digest = b"damaged on the way", "sha256:" + "7" * 64
    with pytest.raises(DigestMismatch):
        await Replica(node.registry, node.node.configuration).store_sent_blob(digest, body)
    assert not node.registry.blobs.path(digest).exists()
    await Replica(node.registry, node.node.configuration, unchecked=True).store_sent_blob(
        digest, body)
    assert node.registry.blobs.path(digest).exists()
    assert broken_build.from_environment({VARIABLE: "1"}) and not broken_build.from_environment({})
    inherited = {VARIABLE: "1", "GEOREG_TEST_CLI": "fresh", "HOME": "/h"}
    assert node_environment(inherited, {}) == {"HOME": "/h", "PYTHONUNBUFFERED": "1"}
    assert node_environment(inherited, {VARIABLE: "1"})[VARIABLE] == "1"


def test_a_broken_build_is_caught_by_a_short_run_over_a_corrupting_link(tmp_path, monkeypatch):
    """With the test-only switch (registry_node.broken_build) nodes store
    replicated blobs unchecked: a corrupting link gets damaged blobs stored,
    and the run says which invariant broke and the seed to replay it. Real
    processes, links and clients, no shrinking (``shrink_runs`` 0): ~11 s.
    The switch is given to the nodes by the harness; the test's own
    environment is never forwarded. Without the switch the same run passes
    (every invariant holds), so this test fails if the switch does nothing."""
    monkeypatch.setenv(VARIABLE, "1")       # not forwarded: node_env is what turns it on
    scenario = nemesis.scenario(BROKEN_SEED, BROKEN_DURATION_S)
    scenario = msgspec.structs.replace(scenario, workload=Workload(
        push_rate=4.0, pull_rate=1.0, layers=2, layer_size=(32768, 65536), repositories=2))
    with RunningCluster(BROKEN_SPEC, tmp_path, node_env={VARIABLE: "1"}) as running:
        assert all(n.info.get("unchecked_replication") for n in running.cluster.nodes().values())
        report = running.run(lambda: random_run(scenario, ("link-corrupt",), BROKEN_INTENSITY,
                                                running.management_url, None), timeout=120)
    text = random_summary(report)
    print(text)
    assert report["applied"] and all("error" not in a for a in report["applied"]), report["applied"]
    assert not report["passed"]
    # Stored rotten bytes, not a node down or an image never served (which
    # break the same invariant): the digest check the switch skips is what failed.
    assert any("its bytes hash to" in c for c in report["broken"].get("acknowledged_pullable", ())), \
        (text, report["broken"])
    assert report["checks"]["converged"] and report["checks"]["lost_acknowledged"], \
        (text, report["checks"])
    assert "BROKEN: " in text and "acknowledged_pullable" in text \
        and f"--seed {BROKEN_SEED} " in text
    assert set(INVARIANTS) <= set(report["checks"])
