"""Grey failures against real node processes: a paused node (SIGSTOP), a node
whose blob bodies stall, and faults that flap on a seeded schedule.

One cluster (eastus home, westeurope, westus; each with its paired copy)
serves the module; each test heals what it broke. The flap schedule is
checked as the pure function of its seed it is, without running it.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

from cluster.control import spec as specs
from cluster.faults.controller import FaultController, FaultError
from cluster.faults.flap import OFF, ON, Flap, FlapError
from cluster.testing import RunningCluster

from .command_line import georeg_command
from .helpers import digest_of, eventually, make_image, push_image, verified_clean

SPEC = {"home_region": "eastus", "replicas": [{"region": "westeurope"}, {"region": "westus"}]}
# What docs/faults.md promises for a paused node: its clients move within
# this long (health checks: two misses of a 1 s timeout, 1 s apart, plus the
# check in progress). Measured figures are in the docs.
FAILOVER_BOUND_S = 5.0


# -- the schedule, without a cluster ---------------------------------------------------


def test_a_flap_schedule_is_a_pure_function_of_its_seed():
    flap = Flap.parse("2/3", jitter=0.25, seed=7)
    assert flap.timeline(12) == Flap(2, 3, 0.25, 7).timeline(12)        # same seed, same run
    assert flap.timeline(12) != Flap(2, 3, 0.25, 8).timeline(12)
    phases = [phase for _, phase in flap.timeline(12)]
    assert phases == [ON, OFF] * 6
    periods = [b - a for (a, _), (b, _) in zip(flap.timeline(13), flap.timeline(13)[1:], strict=False)]
    for phase, seconds in zip(phases, periods, strict=True):
        base = 2 if phase == ON else 3
        assert 0.75 * base <= seconds <= 1.25 * base
    assert Flap.parse("0.5/1.5").timeline(4) == [(0, ON), (0.5, OFF), (2.0, ON), (2.5, OFF)]
    for bad in ("2", "a/b", "0/1", "1/-1"):
        with pytest.raises(FlapError):
            Flap.parse(bad)
    with pytest.raises(FlapError, match="jitter"):
        Flap.parse("1/1", jitter=1.0)
    # With no seed given, a fault's flap is seeded from the cluster's seed and
    # its number: a cluster started from one seed flaps alike.
    seeds = [FaultController(SimpleNamespace(spec=SimpleNamespace(seed=s)))._flap_seed(n)
             for s, n in ((5, 1), (5, 1), (5, 2), (6, 1))]
    assert seeds[0] == seeds[1] and len(set(seeds)) == 3


# -- against the cluster ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with RunningCluster(specs.parse(SPEC), tmp_path_factory.mktemp("grey")) as running:
        yield running


@pytest.fixture
async def http(cluster):
    async with cluster.http() as session:
        yield session


@pytest.fixture(autouse=True)
def healed(request):
    """After each test that used the cluster: every fault healed, nothing left stopped."""
    yield
    if "cluster" in request.fixturenames:
        cluster = request.getfixturevalue("cluster")
        cluster.heal()
        assert not _stopped_processes(cluster)


def _stopped_processes(cluster) -> list[str]:
    """Node processes the kernel holds stopped (state T in /proc/PID/stat)."""
    stopped = []
    for name, node in cluster.cluster.supervisor.nodes.items():
        if node.pid is not None:
            stat = Path(f"/proc/{node.pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] in ("T", "t"):
                stopped.append(name)
    return stopped


def fault_cli(cluster, *args: str) -> str:
    result = georeg_command(["fault", *args, "--data-dir", str(cluster.data_dir)], timeout=60,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    return result.stdout


async def answered_by(http, url: str, timeout: float = 0.5) -> str | None:
    """Which node answers ``GET /v2/`` through ``url`` now; None if nothing
    answers within ``timeout`` (a client giving up on a silent node)."""
    try:
        async with http.get(f"{url}/v2/", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return r.headers.get("X-Georeg-Replica") if r.status == 200 else None
    except (TimeoutError, aiohttp.ClientError):
        return None


async def pullable(http, url: str, repo: str, ref: str) -> bool:
    try:
        async with http.get(f"{url}/v2/{repo}/manifests/{ref}") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def test_a_paused_home_region_loses_its_clients_within_the_bound_and_catches_up(
        cluster, http):
    """SIGSTOP the home region: its global endpoint's clients move to the next
    replica within the bound, found by timeouts (the sockets stay open);
    westeurope and westus go on replicating to each other; resumed, eastus
    catches up with what was pushed meanwhile and verify is clean."""
    east = cluster.endpoint("eastus")
    assert await answered_by(http, east) == "eastus"
    fault = cluster.inject("pause", region="eastus")
    paused_at = time.monotonic()
    assert cluster.cluster.supervisor.nodes["eastus"].paused
    await eventually(lambda: _stopped_processes(cluster) == ["eastus"], timeout=2,
                     what="the kernel to stop eastus")

    # Sent to eastus (routing does not know yet), waiting, and answered by
    # the next replica once health checks find eastus silent: the client
    # need not give up first.
    served = await answered_by(http, east, timeout=FAILOVER_BOUND_S + 5)
    moved_after = time.monotonic() - paused_at
    assert served not in (None, "eastus")
    assert 1.0 < moved_after <= FAILOVER_BOUND_S     # by timeouts, not a refused connect
    assert await answered_by(http, east) == served
    # Peers do not block on it: a push in westeurope reaches westus.
    image = make_image([4000], seed=20)
    await push_image(http, cluster.regional_endpoint("westeurope"), "grey/paused", image,
                     tag="v1")
    await eventually(lambda: pullable(http, cluster.node_url("westus"), "grey/paused", "v1"),
                     timeout=20, what="westeurope → westus while eastus is paused")
    cluster.heal(fault.id)
    assert not cluster.cluster.supervisor.nodes["eastus"].paused
    await eventually(lambda: pullable(http, cluster.node_url("eastus"), "grey/paused", "v1"),
                     timeout=30, what="eastus to catch up once resumed")
    await eventually(lambda: answered_by(http, east), timeout=10, what="eastus back")
    await asyncio.to_thread(verified_clean, cluster, 60)


# gRPC keepalive (replicator.peers): a ping every 30 s, 5 s to answer.
KEEPALIVE_S = 35


@pytest.mark.soak
async def test_a_pause_past_grpc_keepalive_blocks_no_peer_and_the_node_catches_up(cluster, http):
    """(~90 s, so soak.) Paused for longer than gRPC keepalive would give a
    silent peer, the others go on replicating to each other the whole time,
    image after image; resumed, it catches up with all of them."""
    fault = cluster.inject("pause", region="westeurope")
    paused_at = time.monotonic()
    east, west = cluster.regional_endpoint("eastus"), cluster.node_url("westus")
    tags = []
    while time.monotonic() - paused_at < KEEPALIVE_S + 5:       # bounded: the pause's length
        tag = f"v{len(tags)}"
        await push_image(http, east, "grey/long", make_image([50_000], seed=30 + len(tags)),
                         tag=tag)
        await eventually(lambda t=tag: pullable(http, west, "grey/long", t), timeout=10,
                         what=f"{tag} at westus while westeurope is paused")
        tags.append(tag)
    cluster.heal(fault.id)

    async def caught_up() -> bool:
        return all([await pullable(http, cluster.node_url("westeurope"), "grey/long", t)
                    for t in tags])

    await eventually(caught_up, timeout=30, what="westeurope to catch up once resumed")
    await asyncio.to_thread(verified_clean, cluster, 60)


async def _read_body(http, url: str) -> bytes:
    async with http.get(url) as r:
        assert r.status == 200
        return await r.read()


async def test_stalled_bodies_pass_health_checks_and_hold_downloads_until_healed(cluster, http):
    image = make_image([3000], seed=21)
    west = cluster.regional_endpoint("westus")
    await push_image(http, west, "grey/stall", image, tag="v1")
    layer = image.layers[0]
    blob = f"/v2/grey/stall/blobs/{digest_of(layer)}"
    fid = fault_cli(cluster, "pause", "westus", "--stall-bodies").split(":", 1)[0]
    supervisor = cluster.cluster.supervisor
    checks = supervisor.nodes["westus"].last_ok
    # Everything but a blob body answers: /v2/, manifests, HEAD, health checks.
    assert await answered_by(http, west, timeout=2) == "westus"
    assert await pullable(http, west, "grey/stall", "v1")
    async with http.head(west + blob) as r:
        assert r.status == 200 and int(r.headers["Content-Length"]) == len(layer)
    await eventually(lambda: supervisor.nodes["westus"].last_ok > checks, timeout=5,
                     what="a health check to pass while bodies stall")
    assert supervisor.nodes["westus"].healthy
    # A download through the endpoint (handed over to the node) and one from
    # the node itself both get their headers, then nothing.
    downloads = [asyncio.ensure_future(_read_body(http, base + blob))
                 for base in (west, cluster.node_url("westus"))]
    done, _ = await asyncio.wait(downloads, timeout=1.5)
    assert not done, "a blob body was sent while stalled"
    cluster.heal(fid)
    assert [await d for d in downloads] == [layer, layer]      # held, then whole


async def test_a_flapping_pause_comes_and_goes_and_heal_leaves_it_healed(cluster, http):
    fault = cluster.inject("pause", region="westeurope", flap="0.6/0.6", flap_seed=3)
    node = cluster.cluster.supervisor.nodes["westeurope"]
    seen = []
    deadline = time.monotonic() + 6
    while len(seen) < 4 and time.monotonic() < deadline:    # on, off, on, off at least
        state = (fault.phase, node.paused)
        if not seen or seen[-1] != state:
            seen.append(state)
        await asyncio.sleep(0.02)
    assert seen[:4] == [(ON, True), (OFF, False), (ON, True), (OFF, False)], seen
    listed = fault_cli(cluster, "list")
    assert "flapping" in listed and "0.6 s on / 0.6 s off" in listed
    cluster.heal(fault.id)
    assert not node.paused and not fault.active
    await asyncio.sleep(1.5)            # two periods: a flap that went on would show
    assert not node.paused and not _stopped_processes(cluster)
    with pytest.raises(FaultError, match="flap"):
        cluster.inject("routing", region="westus", flap_jitter=0.2)
    with pytest.raises(FaultError, match="destroy cannot flap"):
        cluster.inject("destroy", region="westus", flap="1/1")
    with pytest.raises(FaultError, match="westus is not zone redundant: name the region alone"):
        cluster.inject("pause", region="westus", zone="2")


async def test_heal_all_and_a_graceful_stop_leave_no_stopped_process(cluster, http):
    cluster.inject("pause", region="westus")
    cluster.inject("pause", region="westeurope")
    await eventually(lambda: sorted(_stopped_processes(cluster)) == ["westeurope", "westus"],
                     timeout=2, what="the kernel to stop both")
    assert "healed 2 fault(s)" in fault_cli(cluster, "heal", "--all")
    assert not _stopped_processes(cluster)
    # A paused node still stops (and quickly: SIGTERM, then SIGCONT), as on
    # `georeg down`.
    cluster.inject("pause", region="westus")
    started = time.monotonic()
    cluster.run(lambda: cluster.cluster.supervisor.stop_node("westus", graceful=True))
    assert time.monotonic() - started < 5
    assert cluster.cluster.supervisor.nodes["westus"].process.returncode == 0
    cluster.heal()
    cluster.restart("westus")           # back for whatever runs next
