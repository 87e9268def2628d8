"""Clock skew: a node's wall clock off, and what the cluster does about it.

The rule (``registry_node.clock``, docs/faults.md "Clock skew"): a node whose
clock is more than the tolerated offset (500 ms) off a majority of the
cluster's refuses writes (definite 503) until it is right again; a peer's
change stamped more than that ahead is applied but moves the HLC only up to
the bound, and is counted. Both sides of the bound are tested here on
in-process nodes (their clocks skewed through the node's own fault seam), the
logic itself with injected clocks; test_faults injects the fault into node
processes through the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import pytest
import pytest_asyncio

from registry_node import hlc, keys, locks
from registry_node.clock import ClockGuard, WallClock
from registry_node.errors import Outcome
from registry_node.records import ManifestRecord, TagRecord, Tombstone, decode
from replicator.clock_probe import ClockProbe
from replicator.metrics import ReplicationMetrics
from replicator.topology import ReplicationSettings

from .helpers import eventually, make_image, push_image
from .replication_harness import InProcessCluster, module_cluster
from .replication_invariants import metric_sum, metrics_text

in_module_loop = pytest.mark.asyncio(loop_scope="module")

TOPOLOGY = [("eastus", ""), ("westeurope", ""), ("westus", "")]
SETTINGS = ReplicationSettings(anti_entropy_interval_s=3600, quorum_timeout_s=5.0,
                               clock_probe_interval_s=0.1)
S = 1_000_000_000


class Ticks:
    """A base clock and a monotonic clock moved only by the test."""

    def __init__(self) -> None:
        self.ns = 1_700_000_000 * S
        self.mono = 100.0

    def wall(self) -> int:
        return self.ns

    def monotonic(self) -> float:
        return self.mono


# -- the logic, on injected clocks -----------------------------------------------------


def test_a_skewed_clock_reads_the_same_when_its_skew_is_sent_again():
    ticks = Ticks()
    clock = WallClock(ticks.wall)
    start = ticks.ns
    clock.skew(offset_s=300, drift=1.5, since_ns=start)
    ticks.ns += 10 * S
    assert clock.now_ns() == start + 10 * S + 300 * S + 5 * S
    clock.skew(offset_s=300, drift=1.5, since_ns=start)     # a restarted node, told again
    assert clock.now_ns() == start + 315 * S
    clock.reset()
    assert clock.now_ns() == ticks.ns and not clock.skewed


def test_the_hlc_takes_a_stamp_from_far_ahead_only_up_to_the_bound():
    wall = 1_000_000
    clock = hlc.HybridLogicalClock(lambda: wall, max_ahead_ms=500)
    assert clock.observe(hlc.pack(wall + 400, 3)) is False
    assert clock.last == hlc.pack(wall + 400, 3)            # within the bound: taken whole
    assert clock.observe(hlc.pack(wall + 60_000, 0)) is True
    taken = clock.last
    assert hlc.unpack(taken)[0] == wall + 499               # beyond it: up to the bound
    # The next local stamp is then at the bound, not past it: a healthy node
    # that took in a far-ahead stamp is not refused for its own HLC.
    stamp = clock.now()
    assert stamp > taken and hlc.unpack(stamp)[0] == wall + 500
    guard = ClockGuard(WallClock(lambda: wall * 1_000_000))
    assert guard.refusal(stamp) is None


def test_a_node_refuses_writes_only_when_off_a_majority_of_the_cluster():
    ticks = Ticks()
    guard = ClockGuard(WallClock(ticks.wall), ticks.monotonic)
    last = hlc.pack(ticks.ns // 1_000_000, 0)
    # Two peers, one off: one of three nodes disagrees; no verdict against this one.
    guard.record("a", -0.8, 0.01)
    guard.record("b", 0.1, 0.01)
    assert guard.off_peers() == ["a"] and guard.refusal(last) is None
    # A slow probe cannot make a clock look off: 0.8 s known to within 0.4 s.
    guard.record("b", -0.8, 0.4)
    assert guard.refusal(last) is None
    guard.record("b", -0.8, 0.01)
    refusal = guard.refusal(last)
    assert refusal is not None and refusal.status == 503
    assert refusal.outcome is Outcome.DEFINITE
    assert "0.8s ahead of its peers' (a, b)" in refusal.detail["reason"]
    # Old measurements stop counting (a peer gone quiet is no evidence).
    ticks.mono += 10
    assert guard.refusal(last) is None
    # One peer only (two nodes): who is wrong cannot be told; the peer is flagged only.
    guard = ClockGuard(WallClock(ticks.wall), ticks.monotonic)
    guard.record("a", 5.0, 0.01)
    assert guard.off_peers() == ["a"] and guard.refusal(last) is None
    # Three clocks at 0, +1 s and -1 s: each is off both others, so each
    # refuses, this right one too (a majority decides: docs/faults.md).
    guard = ClockGuard(WallClock(ticks.wall), ticks.monotonic)
    guard.record("ahead", 1.0, 0.01)
    guard.record("behind", -1.0, 0.01)
    assert guard.refusal(last) is not None


def test_a_measurement_counts_while_a_probe_round_may_still_be_waiting():
    """Probing every 0.1 s, a round still waits up to the probe timeout for a
    slow peer: the others' measurements count meanwhile."""
    ticks = Ticks()
    guard = ClockGuard(WallClock(ticks.wall), ticks.monotonic)
    guard.probe_interval_s = 0.1
    guard.record("a", 0.9, 0.01)
    ticks.mono += 1.0
    assert guard.off_peers() == ["a"]
    ticks.mono += 6.0
    assert guard.off_peers() == []


def test_a_node_that_stamped_ahead_waits_for_its_clock_to_catch_up():
    ticks = Ticks()
    guard = ClockGuard(WallClock(ticks.wall), ticks.monotonic)
    now_ms = ticks.ns // 1_000_000
    assert guard.refusal(hlc.pack(now_ms + 400, 0)) is None
    refusal = guard.refusal(hlc.pack(now_ms + 3000, 0))
    assert refusal is not None and refusal.headers["Retry-After"] == "3"
    assert "resume once it has caught up" in refusal.detail["reason"]
    ticks.ns += 2600 * 1_000_000
    assert guard.refusal(hlc.pack(now_ms + 3000, 0)) is None


async def test_a_failed_probe_round_does_not_stop_the_next():
    """Any error in a round (not only a peer's ReplicationError) is logged and
    the probes go on: they are what fences a node whose clock goes off."""
    rounds = []

    def clients():
        rounds.append(1)
        if len(rounds) == 1:
            raise RuntimeError("a bug in one round")
        return []

    guard = ClockGuard(WallClock())
    probe = ClockProbe(guard, hlc.HybridLogicalClock(guard.clock.now_ms), clients,
                       ReplicationMetrics("eastus"), interval_s=0.01)
    task = asyncio.create_task(probe.run())
    try:
        await eventually(lambda: len(rounds) >= 2 or task.done(), timeout=5,
                         what="a second probe round")
        assert not task.done(), task.exception()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- three in-process nodes --------------------------------------------------------------


cluster, http = module_cluster("clock", TOPOLOGY, SETTINGS)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def unprobed(tmp_path_factory):
    """Three nodes that do not probe clocks (one round at start): a skewed one
    is never fenced, so its far-ahead stamps reach its peers, as they do in a
    two-region cluster or before the probes catch a clock gone off."""
    settings = msgspec.structs.replace(SETTINGS, clock_probe_interval_s=3600)
    async with InProcessCluster(tmp_path_factory.mktemp("unprobed"), TOPOLOGY,
                                settings=settings) as c:
        yield c


def skewer(cluster, http):
    """Set a node's clock skew through its fault seam."""
    async def put(name: str, **body) -> dict:
        url = f"{cluster.nodes[name].url}/georeg/v1/faults/clock"
        async with http.put(url, json=body) as r:
            assert r.status == 200, await r.text()
            return await r.json()
    return put


@pytest_asyncio.fixture(loop_scope="module")
async def skew(cluster, http):
    """Set a node's clock skew; every clock right afterwards."""
    put = skewer(cluster, http)
    yield put
    for name in cluster.nodes:
        await put(name)


def guard(cluster, name: str) -> ClockGuard:
    return cluster.nodes[name].registry.clock


async def measured(cluster, name: str, peer: str, near: float) -> bool:
    offset = guard(cluster, name).fresh().get(peer)
    return offset is not None and abs(offset.offset_s - near) < 0.1


def held(node, key: bytes, kind: type = TagRecord) -> int:
    """The HLC of the record (value or tombstone) ``node`` holds at ``key``."""
    return decode(node.registry.meta.get(key), kind).hlc


def tag_stamp(node, repo: str, tag: str) -> int:
    """The HLC of the tag value ``node`` holds."""
    return held(node, keys.tag(repo, tag))


async def tags_everywhere(cluster, http, repo: str) -> dict[str, dict[str, str]]:
    return {n.name: await cluster.tags(http, n, repo) for n in cluster.running()}


async def cluster_tags_are(cluster, http, repo: str, expected: dict[str, str],
                           last: dict | None = None) -> bool:
    """Every running node serves ``expected`` as ``repo``'s tags (what they
    serve goes to ``last``)."""
    seen = await tags_everywhere(cluster, http, repo)
    if last is not None:
        last.update(seen)
    return all(tags == expected for tags in seen.values())


async def push_status(http, url: str, repo: str, image, tag: str) -> tuple[int, dict]:
    """Push the layers (which a skewed node refuses too, at the first one)."""
    try:
        await push_image(http, url, repo, image, tag=tag)
        return 201, {}
    except AssertionError:
        async with http.post(f"{url}/v2/{repo}/blobs/uploads/") as r:
            return r.status, await r.json()


@in_module_loop
async def test_a_skew_within_the_bound_can_make_an_earlier_write_win(cluster, http, skew):
    """westeurope 300 ms ahead: measured so, writes accepted on both sides.
    westeurope, then eastus, set one tag, neither having seen the other's write
    (eastus cut off meanwhile): westeurope's clock stamps the earlier write
    later, so it is the one every replica ends on (last-writer-wins is only as
    good as the clocks, within the tolerated offset)."""
    await skew("westeurope", offset_s=0.3)
    await eventually(lambda: measured(cluster, "eastus", "westeurope", 0.3), timeout=10,
                     what="eastus to measure westeurope 0.3 s ahead")
    west, east = cluster.nodes["westeurope"], cluster.nodes["eastus"]
    repo, first, second = "skew/app", make_image([200], seed=1), make_image([201], seed=2)
    await push_image(http, west.url, repo, first)         # the content, so each tag
    await push_image(http, east.url, repo, second)        # write is one quick request
    cluster.isolate("eastus")
    try:
        await push_image(http, west.url, repo, first, tag="latest")
        await push_image(http, east.url, repo, second, tag="latest")
        stamps = (tag_stamp(west, repo, "latest"), tag_stamp(east, repo, "latest"))
    finally:
        cluster.heal()
    assert stamps[0] > stamps[1], "the earlier write, 300 ms ahead, is stamped later"
    last: dict = {}
    await eventually(lambda: cluster_tags_are(cluster, http, repo, {"latest": first.digest}, last),
                     timeout=15, what=lambda: f"latest = the earlier write everywhere: {last}")
    assert not any(guard(cluster, n).describe(cluster.nodes[n].registry.hlc.last)["skewed"]
                   for n in cluster.nodes)


@in_module_loop
async def test_a_clock_beyond_the_bound_stops_its_writes_and_is_flagged_until_healed(
        cluster, http, skew):
    """eastus 2 s behind: it refuses writes (definite 503), its peers flag it,
    westeurope's writes reach it flagged (its HLC not dragged past the bound);
    healed, it writes again and the tag converges on its later write."""
    east, west = cluster.nodes["eastus"], cluster.nodes["westeurope"]
    await skew("eastus", offset_s=-2)
    # At once its HLC is ahead of its clock (it refuses for that); its probes
    # then find it off both peers.
    await eventually(lambda: guard(cluster, "eastus").clock_off(), timeout=10,
                     what="eastus to find its clock off its peers'")
    status, body = await push_status(http, east.url, "fence/app", make_image([300], seed=3), "v")
    error = body["errors"][0]
    assert (status, error["message"], error["detail"]["outcome"]) == \
        (503, "clock skewed: writes refused", Outcome.DEFINITE.value)
    assert "s behind its peers' (westeurope, westus)" in error["detail"]["reason"]
    for peer in ("westeurope", "westus"):         # flagged by both (by their own probes,
        await eventually(                         # on their own schedule), skewed neither
            lambda p=peer: guard(cluster, p).off_peers() == ["eastus"], timeout=10,
            what=lambda p=peer: f"{p} to flag eastus (flags {guard(cluster, p).off_peers()})")
        assert guard(cluster, peer).refusal(cluster.nodes[peer].registry.hlc.last) is None
    before = metric_sum(await metrics_text(http, east), "georeg_clock_offset_exceeded_total",
                        peer="westeurope", seen_in="event")
    image = make_image([301], seed=4)
    await push_image(http, west.url, "fence/app", image, tag="v")
    west_stamp = west.registry.hlc.last
    await eventually(lambda: cluster.tags(http, east, "fence/app"), timeout=10,
                     what="westeurope's tag on eastus")
    after = metric_sum(await metrics_text(http, east), "georeg_clock_offset_exceeded_total",
                       peer="westeurope", seen_in="event")
    assert after > before
    # Applied, but its stamp (2 s ahead of eastus's clock) not taken into eastus's HLC.
    assert await cluster.tags(http, east, "fence/app") == {"v": image.digest}
    assert east.registry.hlc.last < west_stamp
    probe_flags = metric_sum(await metrics_text(http, west),
                             "georeg_clock_offset_exceeded_total", peer="eastus", seen_in="probe")
    assert probe_flags >= 1

    await skew("eastus")                          # healed
    await eventually(lambda: guard(cluster, "eastus").refusal(east.registry.hlc.last) is None,
                     timeout=10, what="eastus to find its clock right again")
    later = make_image([302], seed=5)
    await push_image(http, east.url, "fence/app", later, tag="v")

    async def converged() -> bool:
        return all(tags == {"v": later.digest}
                   for tags in (await tags_everywhere(cluster, http, "fence/app")).values())

    await eventually(converged, timeout=15, what="v = eastus's later write everywhere")


@in_module_loop
async def test_a_skew_past_the_bounds_is_refused_and_changes_nothing(cluster, http):
    """A century off overflowed the node's nanosecond times: every write it
    made failed, and every peer's subscription to it, for good."""
    url = f"{cluster.nodes['westus'].url}/georeg/v1/faults/clock"
    for body in ({"offset_s": 1e10}, {"offset_s": -400 * 86400}, {"drift": 1000},
                 {"drift": 0.001}, {"offset_s": 1, "since_ns": 1}):
        async with http.put(url, json=body) as r:
            assert r.status == 400, (body, await r.text())
            reason = (await r.json())["errors"][0]["detail"]
            assert "year" in reason or "between 0.01 and 100" in reason, reason
    assert not guard(cluster, "westus").clock.skewed


@in_module_loop
async def test_a_clock_far_ahead_refuses_writes_until_healed(cluster, http, skew):
    west = cluster.nodes["westeurope"]
    state = await skew("westeurope", offset_s=300)
    assert state["fault"]["offset_s"] == 300
    await eventually(lambda: guard(cluster, "westeurope").clock_off(), timeout=10,
                     what="westeurope to find its clock off")
    status, body = await push_status(http, west.url, "ahead/app", make_image([400], seed=6), "v")
    detail = body["errors"][0]["detail"]
    assert status == 503 and "ahead of its peers'" in detail["reason"]
    assert abs(detail["clock_offset_s"] - 300) <= detail["uncertainty_s"] + 0.001, detail
    await skew("westeurope")
    await eventually(lambda: guard(cluster, "westeurope").refusal(west.registry.hlc.last)
                     is None, timeout=10, what="westeurope's writes back")
    await push_image(http, west.url, "ahead/app", make_image([401], seed=7), tag="v")


@in_module_loop
async def test_a_write_made_after_seeing_a_far_ahead_one_wins_everywhere(unprobed, http):
    """westeurope 10 s ahead sets v=a; eastus applies it (its HLC takes a's
    stamp in only up to the bound), then sets v=b. b was written after a was
    seen, so b wins on every node: eastus stamps it above a, however far ahead
    a's stamp. (Stamped by eastus's clock alone, b lost on westeurope and
    westus, and anti-entropy later overwrote it on eastus too.)"""
    skew, east, west = skewer(unprobed, http), unprobed.nodes["eastus"], unprobed.nodes["westeurope"]
    await skew("westeurope", offset_s=10)
    try:
        a, b = make_image([500], seed=8), make_image([501], seed=9)
        await push_image(http, west.url, "causal/app", a, tag="v")
        await eventually(lambda: cluster_tags_are(unprobed, http, "causal/app", {"v": a.digest}),
                         timeout=10, what="v = a everywhere")
        seen = tag_stamp(east, "causal/app", "v")
        assert hlc.unpack(seen)[0] - east.registry.clock.clock.now_ms() > 9000
        await push_image(http, east.url, "causal/app", b, tag="v")
        assert tag_stamp(east, "causal/app", "v") > seen
        last: dict = {}
        await eventually(lambda: cluster_tags_are(unprobed, http, "causal/app", {"v": b.digest},
                                                  last),
                         timeout=10, what=lambda: f"v = b ({b.digest}) everywhere: {last}")
    finally:
        await skew("westeurope")


@in_module_loop
async def test_every_register_write_is_stamped_above_the_value_it_replaces(unprobed, http):
    """The same for every kind of register a local write replaces: a tag's
    value (untag), a manifest's (delete), attributes, a configuration object.
    westeurope, 10 s ahead, writes each; eastus then replaces each."""
    skew, east, west = skewer(unprobed, http), unprobed.nodes["eastus"], unprobed.nodes["westeurope"]
    repo, image = "every/app", make_image([510], seed=10)
    await skew("westeurope", offset_s=10)
    try:
        await push_image(http, west.url, repo, image, tag="w")
        await west.registry.update_attributes(locks.repository(repo), {"listEnabled": False})
        await west.node.configuration.put("registry", "default", {"name": "far"})
        east_config = east.node.configuration

        def arrived() -> bool:
            return (east_config.get("registry", "default") is not None
                    and not east.registry.locks.of(locks.repository(repo)).list_enabled
                    and east.registry.meta.get(keys.tag(repo, "w")) is not None)

        await eventually(arrived, timeout=10, what="westeurope's writes on eastus")
        replaced = {"tag": tag_stamp(east, repo, "w"),
                    "manifest": held(east, keys.manifest(repo, image.digest), ManifestRecord),
                    "attributes": east.registry.locks.record(locks.repository(repo)).hlc,
                    "config": east_config.register("registry", "default").stamp[0]}
        await east.registry.update_attributes(locks.repository(repo), {"listEnabled": True})
        stored = await east_config.put("registry", "default", {"name": "near"})
        await east.registry.delete_manifest(repo, "w")
        untagged = held(east, keys.tag_tomb(repo, "w"), Tombstone)
        await east.registry.delete_manifest(repo, image.digest)
        written = {"tag": untagged,
                   "manifest": held(east, keys.manifest_tomb(repo, image.digest), Tombstone),
                   "attributes": east.registry.locks.record(locks.repository(repo)).hlc,
                   "config": stored.stamp[0]}
        assert {k: written[k] > replaced[k] for k in replaced} == dict.fromkeys(replaced, True)
        await eventually(lambda: west.node.configuration.get("registry", "default").name == "near",
                         timeout=10, what="eastus's later configuration on westeurope")
        # Healed, westeurope waits for its clock to pass the stamps it made
        # while 10 s ahead, and says for how long.
        healed = await skew("westeurope")
        assert healed["skewed"] and 8 < healed["writes_resume_in_s"] <= 9.5, healed
        assert "writes resume once it has caught up" in healed["reason"]
    finally:
        await skew("westeurope")
