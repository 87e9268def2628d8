"""Every fault kind: inject (CLI or Python API), observe what clients see, heal,
and the cluster converges with `georeg verify` clean.

One cluster (eastus zone redundant and home, westeurope, brazilsouth confined)
serves the module; each test heals what it broke and waits until verify is
clean before the next one runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from cluster.control import spec as specs
from cluster.control.plan import MANAGEMENT
from cluster.control.supervisor import PAIR_COPY_NICE
from cluster.faults.controller import FaultError
from cluster.routing.http_faults import HttpFaults
from cluster.testing import RunningCluster
from registry_node.crypto import HEADER_SIZE, SEGMENT_OVERHEAD, SEGMENT_SIZE

from .command_line import georeg_command
from .helpers import (
    Skopeo,
    digest_of,
    eventually,
    flip,
    make_image,
    push_blob,
    push_image,
    verified_clean,
    write_oci_layout,
)

SPEC = {"home_region": "eastus", "home_zone_redundant": True,
        "replicas": [{"region": "westeurope"}, {"region": "brazilsouth"}]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with RunningCluster(specs.parse(SPEC), tmp_path_factory.mktemp("faults")) as running:
        yield running


@pytest.fixture
async def http(cluster):
    """A registry client of the cluster: it sends the admin login."""
    async with cluster.http() as session:
        yield session


@pytest.fixture(autouse=True)
def converges_clean(cluster):
    """After each test: everything healed, every node back, healthy and ready
    (a restarted zone is healthy once it can write again), and the cluster
    converges, verify clean."""
    yield
    cluster.run(cluster.cluster.faults.heal_all)
    for name, node in cluster.cluster.supervisor.nodes.items():
        if node.pid is None:
            cluster.restart(name)
    cluster.run(cluster.cluster.wait_ready)
    verified_clean(cluster, 60, "the cluster to converge after healing")


def georeg(cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # The cluster runs on its own thread, so a blocking call here stalls nothing.
    return georeg_command([*args, "--data-dir", str(cluster.data_dir)], timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def fault_cli(cluster, *args: str) -> subprocess.CompletedProcess:
    return georeg(cluster, "fault", *args)


def fault_id(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.split(":", 1)[0]


async def served_by(http, url: str) -> str:
    async with http.get(f"{url}/v2/") as r:
        return r.headers.get("X-Georeg-Replica", f"HTTP {r.status}") if r.status == 200 \
            else f"HTTP {r.status}"


async def pullable(http, url, repo, tag, image) -> bool:
    try:
        async with http.get(f"{url}/v2/{repo}/manifests/{tag}") as r:
            return r.status == 200 and await r.read() == image.manifest
    except aiohttp.ClientError:
        return False


# -- outages ---------------------------------------------------------------------------


async def test_region_outage_crash_from_the_cli_fails_over_and_heals(cluster, http):
    fid = fault_id(fault_cli(cluster, "region-outage", "westeurope", "--mode", "crash"))
    listed = json.loads(fault_cli(cluster, "list", "--json").stdout)
    assert any(f["id"] == fid and f["active"] for f in listed)
    west = cluster.endpoint("westeurope")
    # The crash is known before the CLI returns: the very next request fails
    # over, with no error for the client.
    served = await served_by(http, west)
    assert not served.startswith(("westeurope", "HTTP")), served
    image = make_image([1000], seed=1)
    await push_image(http, west, "outage/app", image, tag="v1")   # through the next replica
    fault_cli(cluster, "heal", fid)
    await eventually(lambda: pullable(http, cluster.node_url("westeurope"), "outage/app", "v1",
                                      image), timeout=30, what="westeurope catching up")


async def test_region_outage_stop_is_graceful(cluster, http):
    fault = cluster.run(lambda: cluster.cluster.faults.inject("region-outage", region="brazilsouth",
                                                              mode="stop"))
    node = cluster.cluster.supervisor.nodes["brazilsouth"]
    assert node.process.returncode == 0    # SIGTERM: a clean exit, not a kill
    async with http.get(f"{cluster.regional_endpoint('brazilsouth')}/v2/") as r:
        assert r.status == 503
    cluster.run(lambda: cluster.cluster.faults.heal(fault.id))


async def test_region_isolation_keeps_processes_but_cuts_everything(cluster, http):
    fid = fault_id(fault_cli(cluster, "region-outage", "westeurope", "--mode", "isolate"))
    node = cluster.cluster.supervisor.nodes["westeurope"]
    assert node.pid is not None                     # alive
    async with http.get(f"{cluster.regional_endpoint('westeurope')}/v2/") as r:
        assert r.status == 503                      # but clients cannot reach it
    image = make_image([1100], seed=2)
    await push_image(http, cluster.endpoint("eastus"), "isolated/app", image, tag="v1")
    await eventually(lambda: pullable(http, cluster.node_url("brazilsouth"), "isolated/app", "v1",
                                      image), timeout=20)
    # Nothing reaches the isolated node directly either.
    async with http.head(f"{cluster.node_url('westeurope')}/v2/isolated/app/manifests/v1") as r:
        assert r.status == 404
    fault_cli(cluster, "heal", fid)
    await eventually(lambda: pullable(http, cluster.node_url("westeurope"), "isolated/app", "v1",
                                      image), timeout=30, what="isolated region catching up")


async def test_zone_outage_keeps_writes_going_on_two_zones(cluster, http):
    fid = fault_id(fault_cli(cluster, "zone-outage", "eastus", "2", "--mode", "crash"))
    image = make_image([1200], seed=3)
    await push_image(http, cluster.regional_endpoint("eastus"), "zone/app", image, tag="v1")
    fault_cli(cluster, "heal", fid)
    await eventually(lambda: pullable(http, cluster.node_url("eastus-2"), "zone/app", "v1", image),
                     timeout=30, what="returning zone catching up unaided")


def replicas(cluster) -> dict[str, dict]:
    """`georeg replication list --json`, by region."""
    listed = georeg(cluster, "replication", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return {r["name"]: r for r in json.loads(listed.stdout)}


def status_of(cluster, region: str) -> tuple[str, str]:
    replica = replicas(cluster)[region]
    return replica["status"]["displayStatus"], replica["status"]["message"]


async def test_replica_status_while_a_zone_or_a_region_is_down_and_catching_up(cluster, http):
    """As Azure shows a replica through an outage: provisioning stays
    Succeeded (nothing failed to provision); the status says what is
    unavailable, then Syncing with progress while the replica catches up,
    then Ready."""
    # A zone the test before took down may still show as catching up: the
    # status follows the nodes' health checks (once a second). Start in sync.
    await eventually(lambda: asyncio.to_thread(lambda: status_of(cluster, "eastus")[0] == "Ready"),
                     timeout=30, what="eastus Ready before its zone 2 goes down")
    cluster.crash("eastus-2")
    east = replicas(cluster)["eastus"]
    assert east["provisioningState"] == "Succeeded"
    assert east["status"]["displayStatus"] == "Ready"     # zones 1 and 3 serve, in sync
    assert east["status"]["message"].startswith("zone 2 of 3 unavailable")
    cluster.restart("eastus-2")
    # Ready all along (two zones serve); back, zone 2 leaves the message once it
    # is writable again, which may be a moment after its process is up.
    await eventually(lambda: asyncio.to_thread(
                         lambda: status_of(cluster, "eastus") == ("Ready", "replica is in sync")),
                     timeout=30, what="eastus Ready with every zone back")

    # West Europe down as a whole; it is cut off from the other regions before
    # it returns, so it comes back behind and cannot catch up until healed.
    cuts = [cluster.run(lambda r=r: cluster.cluster.faults.inject("partition", a="westeurope", b=r))
            for r in ("eastus", "brazilsouth")]
    cluster.crash("westeurope")
    west = replicas(cluster)["westeurope"]
    assert west["provisioningState"] == "Succeeded"
    assert west["status"]["displayStatus"] == "Unavailable"
    assert "replica is unavailable" in west["status"]["message"]
    status = json.loads(georeg(cluster, "status", "--json").stdout)
    assert {r["name"]: r["status"]["displayStatus"] for r in status["replicas"]}["westeurope"] == \
        "Unavailable"
    human = georeg(cluster, "status")
    assert human.returncode == 1
    row = next(line for line in human.stdout.splitlines() if line.startswith("│ westeurope"))
    assert "Unavailable" in row
    image = make_image([2500], seed=12)
    await push_image(http, cluster.regional_endpoint("eastus"), "behind/app", image, tag="v1")
    cluster.restart("westeurope")
    shown, message = status_of(cluster, "westeurope")
    assert shown == "Syncing", message

    async def counted_behind() -> bool:
        """The progress counts what the other replicas hold as their health
        checks report it (once a second at rest): soon the image pushed above,
        which West Europe, cut off, lacks."""
        west = (await asyncio.to_thread(replicas, cluster))["westeurope"]
        assert west["status"]["displayStatus"] == "Syncing", west["status"]
        done, total = west["sync"]["images"]
        return done < total and west["status"]["message"].startswith(
            f"syncing: {done}/{total} images")

    await eventually(counted_behind, timeout=10, what="westeurope's progress to count the image "
                                                      "it lacks")
    for fault in cuts:
        cluster.run(lambda f=fault: cluster.cluster.faults.heal(f.id))
    await eventually(lambda: asyncio.to_thread(lambda: status_of(cluster, "westeurope")[0] == "Ready"),
                     timeout=30, what="westeurope Ready once caught up")
    assert await pullable(http, cluster.node_url("westeurope"), "behind/app", "v1", image)


# -- the control plane -------------------------------------------------------------------


async def test_an_isolated_home_region_blocks_configuration_until_it_heals(cluster, http):
    """The home region holds the control plane: cut off from the network (its
    processes still running), it can no more take configuration changes than
    when it is down. One isolated zone of it is not the region."""
    fid = fault_id(fault_cli(cluster, "region-outage", "eastus", "--mode", "isolate"))
    assert all(cluster.cluster.supervisor.nodes[f"eastus-{z}"].healthy for z in "123")
    update = georeg(cluster, "replication", "update", "--name", "westeurope",
                    "--global-endpoint-routing", "false")
    assert update.returncode == 2
    assert "home region eastus holds the control plane" in update.stderr
    create = georeg(cluster, "replication", "create", "--location", "japaneast")
    assert create.returncode == 2
    assert "home region eastus holds the control plane" in create.stderr
    assert "japaneast" not in replicas(cluster)
    # Data goes on through the other replicas meanwhile.
    image = make_image([2600], seed=13)
    await push_image(http, cluster.endpoint("westeurope"), "cut/home", image, tag="v1")
    fault_cli(cluster, "heal", fid)
    for routing in ("false", "true"):
        update = georeg(cluster, "replication", "update", "--name", "westeurope",
                        "--global-endpoint-routing", routing)
        assert update.returncode == 0, update.stderr
    fid = fault_id(fault_cli(cluster, "zone-outage", "eastus", "2", "--mode", "isolate"))
    update = georeg(cluster, "replication", "update", "--name", "westeurope",
                    "--global-endpoint-routing", "true")
    assert update.returncode == 0, update.stderr
    fault_cli(cluster, "heal", fid)


# -- repositories ------------------------------------------------------------------------


async def test_repository_commands_report_a_region_they_cannot_ask(cluster, http):
    """A region whose nodes are all down, or that is cut off, is reported, not
    silently left out; once it is back the same commands are complete."""
    image = make_image([2700], seed=14)
    await push_image(http, cluster.node_url("brazilsouth"), "br/away", image, tag="v1")
    fid = fault_id(fault_cli(cluster, "region-outage", "brazilsouth", "--mode", "crash"))
    listed = georeg(cluster, "repository", "list")
    assert listed.returncode == 1
    assert "brazilsouth" in listed.stderr and "down" in listed.stderr
    assert "br/away" not in listed.stdout
    missing = georeg(cluster, "repository", "show-tags", "--name", "br/away")
    assert missing.returncode == 2 and "brazilsouth" in missing.stderr
    deleted = georeg(cluster, "repository", "delete", "--name", "br/away", "--yes")
    assert deleted.returncode == 2 and "brazilsouth" in deleted.stderr
    fault_cli(cluster, "heal", fid)
    fid = fault_id(fault_cli(cluster, "region-outage", "brazilsouth", "--mode", "isolate"))
    listed = json.loads(georeg(cluster, "repository", "list", "--json").stdout)
    assert [u["region"] for u in listed["unavailable"]] == ["brazilsouth"]
    assert "cannot be reached" in listed["unavailable"][0]["reason"]
    fault_cli(cluster, "heal", fid)
    listed = georeg(cluster, "repository", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    regions = {r["name"]: r["regions"] for r in json.loads(listed.stdout)["repositories"]}
    assert regions["br/away"] == ["brazilsouth"]
    deleted = georeg(cluster, "repository", "delete", "--name", "br/away", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert "deleted 1 manifest and 1 tag from br/away in brazilsouth" in deleted.stdout


# -- network ---------------------------------------------------------------------------


async def links(http, cluster) -> list[dict]:
    """Every link's own counters, from the management API (``GET /georeg/v1/links``),
    with the regions at either end."""
    plan = cluster.cluster.plan
    async with http.get(f"{cluster.management_url}/georeg/v1/links",
                        headers=cluster.owner_headers()) as r:
        assert r.status == 200, await r.text()
        listed = await r.json()
    out = []
    for link in listed:
        if link["from"] == MANAGEMENT:
            continue
        out.append({**link, "from_region": plan.node(link["from"]).region,
                    "to_region": plan.node(link["to"]).region})
    return out


async def delivered(http, cluster, source: str, target: str) -> int:
    """Bytes the links from ``source``'s nodes to ``target``'s have delivered,
    both ways (a link carries the connections ``source`` opens to ``target``)."""
    return sum(link["bytes"] for link in await links(http, cluster)
               if (link["from_region"], link["to_region"]) == (source, target))


async def grew(http, cluster, source: str, target: str, since: int) -> bool:
    return await delivered(http, cluster, source, target) > since


async def test_one_way_partition(cluster, http):
    """westeurope cannot reach eastus: the connections westeurope opens to
    eastus's nodes (its subscriptions to them, its fetches) carry nothing,
    while those eastus opens to westeurope carry westeurope's pushes to it.
    After healing, both carry traffic again."""
    fid = fault_id(fault_cli(cluster, "partition", "westeurope", "eastus", "--one-way"))
    blocked = await delivered(http, cluster, "westeurope", "eastus")
    flowing = await delivered(http, cluster, "eastus", "westeurope")
    from_west = make_image([1300], seed=4)
    await push_image(http, cluster.node_url("westeurope"), "oneway/west", from_west, tag="v1")
    await eventually(lambda: pullable(http, cluster.node_url("eastus-1"), "oneway/west", "v1",
                                      from_west), timeout=30)
    await eventually(lambda: grew(http, cluster, "eastus", "westeurope", flowing), timeout=30,
                     what="eastus's connections to westeurope carrying its push")
    # A push in eastus reaches westeurope only the long way round (relayed by
    # brazilsouth): nothing crosses the cut links.
    from_east = make_image([1350], seed=41)
    await push_image(http, cluster.node_url("eastus-1"), "oneway/east", from_east, tag="v1")
    await eventually(lambda: pullable(http, cluster.node_url("westeurope"), "oneway/east", "v1",
                                      from_east), timeout=30, what="the relayed push in westeurope")
    assert await delivered(http, cluster, "westeurope", "eastus") == blocked
    fault_cli(cluster, "heal", fid)
    healed = await delivered(http, cluster, "westeurope", "eastus")
    again = make_image([1360], seed=42)
    await push_image(http, cluster.node_url("eastus-1"), "oneway/healed", again, tag="v1")
    await eventually(lambda: grew(http, cluster, "westeurope", "eastus", healed), timeout=30,
                     what="westeurope's connections to eastus carrying traffic after healing")
    flowing = await delivered(http, cluster, "eastus", "westeurope")
    back = make_image([1370], seed=43)
    await push_image(http, cluster.node_url("westeurope"), "oneway/back", back, tag="v1")
    await eventually(lambda: grew(http, cluster, "eastus", "westeurope", flowing), timeout=30,
                     what="eastus's connections to westeurope still carrying traffic")
    for node, repo, image in (("westeurope", "oneway/healed", again),
                              ("eastus-1", "oneway/back", back)):
        await eventually(lambda n=node, r=repo, i=image: pullable(http, cluster.node_url(n), r,
                                                                    "v1", i), timeout=30)


async def test_link_degradation_is_visible_in_lag(cluster, http):
    extra = 300.0
    fid = fault_id(fault_cli(cluster, "link", "eastus", "westeurope", "--latency", str(extra)))
    image = make_image([1400], seed=5)
    await push_image(http, cluster.regional_endpoint("eastus"), "slow/app", image, tag="v1")
    status = await _status_when_complete(http, cluster, "slow/app", "v1")
    lag = {r["name"]: r["lag_ms"] for r in status["replicas"]}
    assert lag["westeurope"] >= extra, lag
    fault_cli(cluster, "heal", fid)


async def _status_when_complete(http, cluster, repo, ref) -> dict:
    out = {}

    async def complete() -> bool:
        nonlocal out
        async with http.get(f"{cluster.node_url('eastus-1')}/georeg/v1/replication/status",
                            params={"repository": repo, "reference": ref}) as r:
            out = await r.json()
        return out.get("complete", False)

    await eventually(complete, timeout=30, what=f"{repo}:{ref} everywhere")
    return out


async def test_stalled_link_and_resets_then_recovery(cluster, http):
    """A stalled link takes connections and delivers nothing; a link with
    resets breaks them. Each shows in the links' own counters while replication
    goes on elsewhere; once both heal, brazilsouth catches up over them."""
    stall = cluster.run(lambda: cluster.cluster.faults.inject("link", a="eastus", b="brazilsouth",
                                                              stall=True))
    resets = cluster.run(lambda: cluster.cluster.faults.inject(
        "link", a="westeurope", b="brazilsouth", reset_probability=0.5))

    def stalled(link) -> bool:
        return {link["from_region"], link["to_region"]} == {"eastus", "brazilsouth"}

    def resetting(link) -> bool:
        return {link["from_region"], link["to_region"]} == {"westeurope", "brazilsouth"}

    held_back = {link["name"]: link["bytes"] for link in await links(http, cluster)
                 if stalled(link)}
    image = make_image([60_000, 70_000], seed=6)
    await push_image(http, cluster.regional_endpoint("eastus"), "stall/app", image, tag="v1")
    # Replication goes on where nothing is broken.
    await eventually(lambda: pullable(http, cluster.node_url("westeurope"), "stall/app", "v1",
                                      image), timeout=30, what="westeurope unaffected")

    async def stall_holding_bytes() -> bool:
        return any(link["queued_bytes"] > 0 for link in await links(http, cluster)
                   if stalled(link))

    async def connections_reset() -> bool:
        return sum(link["resets"] for link in await links(http, cluster) if resetting(link)) > 0

    await eventually(stall_holding_bytes, timeout=30,
                     what="a stalled link holding what a peer sent over it")
    await eventually(connections_reset, timeout=30, what="connections reset on a resetting link")
    # Everything sent into the stall was held: not a byte delivered either way.
    assert {link["name"]: link["bytes"] for link in await links(http, cluster)
            if stalled(link)} == held_back
    async with http.head(f"{cluster.node_url('brazilsouth')}/v2/stall/app/manifests/v1") as r:
        assert r.status in (200, 404)           # the node stays responsive meanwhile
    cluster.run(lambda: cluster.cluster.faults.heal(stall.id))
    cluster.run(lambda: cluster.cluster.faults.heal(resets.id))
    await eventually(lambda: pullable(http, cluster.node_url("brazilsouth"), "stall/app", "v1",
                                      image), timeout=40, what="brazilsouth after the link recovers")

    async def stalled_links_delivering() -> bool:
        now = {link["name"]: link["bytes"] for link in await links(http, cluster)
               if stalled(link)}
        return any(now[name] > before for name, before in held_back.items())

    await eventually(stalled_links_delivering, timeout=30,
                     what="the healed links delivering again")


async def test_routing_off_keeps_syncing(cluster, http):
    fid = fault_id(fault_cli(cluster, "routing", "eastus", "off"))
    east = cluster.endpoint("eastus")
    served = await served_by(http, east)        # routing moved before the CLI returned
    assert not served.startswith(("eastus", "HTTP")), served
    image = make_image([1500], seed=7)
    await push_image(http, east, "routing/app", image, tag="v1")
    await eventually(lambda: pullable(http, cluster.node_url("eastus-3"), "routing/app", "v1",
                                      image), timeout=20, what="eastus still syncing")
    fault_cli(cluster, "heal", fid)
    assert (await served_by(http, east)).startswith("eastus")   # and back at once


# -- storage ---------------------------------------------------------------------------


async def test_full_disk_refuses_writes_with_507_and_harms_nothing(cluster, http):
    before = make_image([1600], seed=8)
    await push_image(http, cluster.node_url("brazilsouth"), "disk/app", before, tag="v1")
    fid = fault_id(fault_cli(cluster, "disk", "brazilsouth", "--full"))
    blob = b"x" * 5000
    async with http.post(f"{cluster.node_url('brazilsouth')}/v2/disk/app/blobs/uploads/",
                         params={"digest": digest_of(blob)}, data=blob) as r:
        assert r.status == 507
        assert (await r.json())["errors"][0]["message"] == "disk full"
    assert await pullable(http, cluster.node_url("brazilsouth"), "disk/app", "v1", before)
    fault_cli(cluster, "heal", fid)
    async with http.post(f"{cluster.node_url('brazilsouth')}/v2/disk/app/blobs/uploads/",
                         params={"digest": digest_of(blob)}, data=blob) as r:
        assert r.status == 201


async def test_slow_disk_slows_writes(cluster, http):
    blob = b"y" * 4000
    url = f"{cluster.node_url('brazilsouth')}/v2/slowdisk/app/blobs/uploads/"
    fid = fault_id(fault_cli(cluster, "disk", "brazilsouth", "--slow", "300"))
    started = time.monotonic()
    async with http.post(url, params={"digest": digest_of(blob)}, data=blob) as r:
        assert r.status == 201
    assert time.monotonic() - started >= 0.3
    fault_cli(cluster, "heal", fid)


async def _oci_error(r: aiohttp.ClientResponse) -> dict:
    assert r.headers["Content-Type"].startswith("application/json")
    return (await r.json())["errors"][0]


async def _metric(http, cluster, node: str, name: str) -> float:
    """The sum of a metric's samples on a node."""
    async with http.get(f"{cluster.node_url(node)}/metrics",
                        headers=cluster.internal_headers()) as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


async def test_disk_read_errors_answer_a_retryable_503_and_heal(cluster, http):
    node = cluster.node_url("westeurope")
    blob = os.urandom(3000)
    digest = await push_blob(http, node, "eio/read", blob)
    injected = fault_cli(cluster, "disk", "westeurope", "--eio", "read")
    fid = fault_id(injected)
    assert "(seed " in injected.stdout, injected.stdout     # picked, shown: replayable
    async with http.get(f"{node}/v2/eio/read/blobs/{digest}") as r:
        assert r.status == 503 and r.headers["Retry-After"]
        error = await _oci_error(r)
    assert (error["code"], error["message"], error["detail"]["outcome"]) == (
        "UNAVAILABLE", "disk I/O error", "definite")
    fault_cli(cluster, "heal", fid)
    async with http.get(f"{node}/v2/eio/read/blobs/{digest}") as r:
        assert r.status == 200 and await r.read() == blob


async def test_disk_write_errors_end_uploads_cleanly_and_a_retry_after_healing_works(
        cluster, http):
    node = cluster.node_url("westeurope")
    first, rest = os.urandom(70_000), os.urandom(70_000)
    data, digest = first + rest, digest_of(first + rest)
    async with http.post(f"{node}/v2/eio/write/blobs/uploads/") as r:
        assert r.status == 202
        session = node + r.headers["Location"] if r.headers["Location"].startswith("/") \
            else r.headers["Location"]
    chunk = {"Content-Type": "application/octet-stream"}
    async with http.patch(session, data=first,
                          headers={**chunk, "Content-Range": f"0-{len(first) - 1}"}) as r:
        assert r.status == 202
    fid = fault_id(fault_cli(cluster, "disk", "westeurope", "--eio", "write"))
    async with http.patch(session, data=rest, headers={
            **chunk, "Content-Range": f"{len(first)}-{len(data) - 1}"}) as r:
        assert r.status == 503
        error = await _oci_error(r)
    assert (error["message"], error["detail"]["outcome"]) == ("disk I/O error", "definite")
    # The session ended with nothing of it kept: no file, no session, no blob.
    upload_id = session.split("?")[0].rsplit("/", 1)[1]
    uploads = cluster.cluster.plan.node("westeurope").data_dir / "uploads"
    assert not (uploads / upload_id).exists()
    async with http.get(session) as r:
        assert r.status == 404 and (await _oci_error(r))["code"] == "BLOB_UPLOAD_UNKNOWN"
    async with http.post(f"{node}/v2/eio/write/blobs/uploads/", params={"digest": digest},
                         data=data, headers=chunk) as r:
        assert r.status == 503
    async with http.head(f"{node}/v2/eio/write/blobs/{digest}") as r:
        assert r.status == 404
    image = make_image([100], seed=43)        # a manifest's commit fails the same way
    async with http.put(f"{node}/v2/eio/write/manifests/v1", data=image.manifest,
                        headers={"Content-Type": image.media_type}) as r:
        assert r.status in (503, 400), await r.text()
        if r.status == 503:
            assert (await _oci_error(r))["message"] == "disk I/O error"
    fault_cli(cluster, "heal", fid)
    await push_blob(http, node, "eio/write", data)
    async with http.get(f"{node}/v2/eio/write/blobs/{digest}") as r:
        assert r.status == 200 and await r.read() == data


async def test_bit_rot_is_repaired_from_a_replica_and_pulls_get_the_right_bytes(
        cluster, http, tmp_path):
    image = make_image([40_000, 90_000], seed=31)
    await push_image(http, cluster.node_url("eastus-1"), "rot/app", image, tag="v1")
    spare = await push_blob(http, cluster.node_url("eastus-1"), "rot/app", os.urandom(5000))
    zone2 = cluster.node_url("eastus-2")

    async def in_zone2(digest: str) -> bool:
        async with http.head(f"{zone2}/v2/rot/app/blobs/{digest}") as r:
            return r.status == 200
    await eventually(lambda: pullable(http, zone2, "rot/app", "v1", image), timeout=30,
                     what="the image in eastus zone 2")
    await eventually(lambda: in_zone2(spare), timeout=30, what="the spare blob in zone 2")
    blobs = {digest_of(b): b for b in [image.config, *image.layers]}
    rot = fault_cli(cluster, "bitrot", "eastus/2", "--blobs", "3", "--seed", "5",
                    *(a for d in blobs for a in ("--digest", d)))
    assert fault_id(rot) and "3 blob file(s) flipped" in rot.stdout
    absent = fault_cli(cluster, "bitrot", "eastus/2", "--digest", "sha256:" + "0" * 64)
    assert absent.returncode != 0 and "stores no blob" in absent.stderr, absent

    # A real client pulls from the rotten zone itself, and gets the right bytes.
    skopeo = Skopeo(tmp_path / "skopeo", zone2.removeprefix("http://"), cluster)
    await skopeo.copy(skopeo.ref("rot/app:v1"), f"oci:{tmp_path / 'pulled'}:v1",
                      "--preserve-digests")
    for digest, data in blobs.items():
        assert (tmp_path / "pulled" / "blobs" / "sha256" / digest.split(":")[1]).read_bytes() \
            == data
    report = cluster.verify()
    assert report.ok, report.as_dict()
    repaired = {r["digest"]: r["source"] for r in report.repairs["eastus-2"]["repaired"]}
    assert set(blobs) <= set(repaired) and all(repaired[d] for d in blobs)
    assert await _metric(http, cluster, "eastus-2", "georeg_blob_repairs_total") >= 3

    # A scrub finds rot no client has met yet, and repairs it.
    fault_id(fault_cli(cluster, "bitrot", "eastus/2", "--digest", spare))
    report = cluster.verify(scrub=True)
    assert report.ok, report.as_dict()
    assert spare in {r["digest"] for r in report.repairs["eastus-2"]["repaired"]}
    assert report.repairs["eastus-2"]["scrub"]["checked"] >= 1


async def test_bit_rot_in_a_confined_region_with_no_other_copy_is_refused_and_reported(
        cluster, http):
    node = cluster.node_url("brazilsouth")
    blob = os.urandom(20_000)
    digest = await push_blob(http, node, "rot/confined", blob)
    fault_id(fault_cli(cluster, "bitrot", "brazilsouth", "--digest", digest))
    async with http.get(f"{node}/v2/rot/confined/blobs/{digest}") as r:
        assert r.status == 404              # as HEAD answers; no retry would change it
        error = await _oci_error(r)
    assert (error["code"], error["detail"]["repair"]) == ("BLOB_UNKNOWN", "unrepairable")
    assert "confined to brazilsouth" in error["detail"]["reason"]
    assert await _metric(http, cluster, "brazilsouth", "georeg_blob_unrepairable_total") >= 1
    report = cluster.verify()
    [rot] = [d for d in report.divergences if d.kind == "rot"]
    assert (rot.node, rot.digest) == ("brazilsouth", digest)
    assert digest in {r["digest"] for r in report.repairs["brazilsouth"]["unrepairable"]}
    # The operator's remedy: push it again.
    await push_blob(http, node, "rot/confined", blob)
    async with http.get(f"{node}/v2/rot/confined/blobs/{digest}") as r:
        assert r.status == 200 and await r.read() == blob


async def test_bit_rot_met_mid_stream_through_an_endpoint_is_repaired_for_the_retry(
        cluster, http):
    """Through an endpoint the node writes a download itself (the hand-over):
    rot past the first MiB cuts it, and the client's retry gets a repaired copy."""
    data = os.urandom(2_500_000)
    digest = await push_blob(http, cluster.node_url("eastus-1"), "rot/large", data)
    zones = ["eastus-1", "eastus-2", "eastus-3"]

    async def everywhere() -> bool:
        for name in [*zones, "westeurope"]:
            async with http.head(f"{cluster.node_url(name)}/v2/rot/large/blobs/{digest}") as r:
                if r.status != 200:
                    return False
        return True
    await eventually(everywhere, timeout=30, what="the blob in every eastus zone and westeurope")
    for name in zones:          # whichever zone the endpoint picks, its copy is rotten
        blob_file = cluster.cluster.plan.node(name).data_dir / "blobs" / "sha256" / \
            digest[7:9] / digest[7:]
        flip(blob_file, HEADER_SIZE + 20 * (SEGMENT_SIZE + SEGMENT_OVERHEAD) + 500)
    url = f"{cluster.endpoint('eastus')}/v2/rot/large/blobs/{digest}"

    async def pulled() -> bool:
        try:
            async with http.get(url) as r:
                return r.status == 200 and await r.read() == data
        except aiohttp.ClientError:          # cut mid-stream
            return False
    assert not await pulled()
    await eventually(pulled, timeout=30, what="a retry getting the repaired copy")


async def test_a_source_failing_reads_holds_back_its_blobs_not_its_stream(cluster, http):
    """A small blob is sent inline with its event; a source whose disk fails
    the read sends the event without it (the subscriber fetches it later,
    FetchBlob answering UNAVAILABLE until then) and goes on streaming."""
    # brazilsouth, one node: its own stream from westeurope brings it the events.
    west, east = cluster.node_url("westeurope"), cluster.node_url("brazilsouth")
    image = make_image([1500], seed=41)
    await push_image(http, west, "eio/source", image, tag="v1")
    await eventually(lambda: pullable(http, east, "eio/source", "v1", image), timeout=30,
                     what="the image in brazilsouth")
    fid = fault_id(fault_cli(cluster, "disk", "westeurope", "--eio", "read"))
    small = await push_blob(http, west, "eio/source", os.urandom(2000))
    async with http.put(f"{west}/v2/eio/source/manifests/v2", data=image.manifest,
                        headers={"Content-Type": image.media_type}) as r:
        assert r.status == 201, await r.text()
    await eventually(lambda: pullable(http, east, "eio/source", "v2", image), timeout=30,
                     what="the tag after the unreadable blob in brazilsouth")

    async def small_arrived() -> bool:
        async with http.head(f"{east}/v2/eio/source/blobs/{small}") as r:
            return r.status == 200
    assert not await small_arrived()
    fault_cli(cluster, "heal", fid)
    await eventually(small_arrived, timeout=30, what="the blob in brazilsouth once the disk reads")


async def test_a_replica_failing_writes_catches_up_once_healed(cluster, http):
    fid = fault_id(fault_cli(cluster, "disk", "brazilsouth", "--eio", "write"))
    image = make_image([1700], seed=42)
    await push_image(http, cluster.node_url("eastus-1"), "eio/apply", image, tag="v1")
    brazil = cluster.node_url("brazilsouth")
    assert not await pullable(http, brazil, "eio/apply", "v1", image)
    fault_cli(cluster, "heal", fid)
    await eventually(lambda: pullable(http, brazil, "eio/apply", "v1", image), timeout=30,
                     what="brazilsouth applying the events once its disk writes")


async def test_faults_heal_themselves_after_their_duration(cluster, http):
    result = fault_cli(cluster, "partition", "westeurope", "brazilsouth", "--duration", "1")
    fid = fault_id(result)
    assert "heals in 1 s" in result.stdout

    def healed() -> bool:
        faults = json.loads(fault_cli(cluster, "list", "--json").stdout)
        return not next(f for f in faults if f["id"] == fid)["active"]

    await eventually(lambda: asyncio.to_thread(healed), timeout=15, what="self-healing")


def test_bad_fault_requests_say_what_is_wrong(cluster):
    result = fault_cli(cluster, "region-outage", "narnia")
    assert result.returncode == 2 and "narnia has no replica" in result.stderr
    result = fault_cli(cluster, "zone-outage", "westeurope", "1")
    assert result.returncode == 2 and "not zone redundant" in result.stderr
    result = fault_cli(cluster, "heal", "f999")
    assert result.returncode == 2 and "no fault f999" in result.stderr
    result = fault_cli(cluster, "clock", "westeurope", "--offset", "+1e10s")
    assert result.returncode == 2 and "within a year" in result.stderr
    result = fault_cli(cluster, "clock", "westeurope", "--drift", "0")
    assert result.returncode == 2 and "between 0.01 and 100" in result.stderr


# -- clocks --------------------------------------------------------------------------------


async def test_a_clock_fault_fences_its_node_survives_a_restart_and_heals(cluster, http):
    """westeurope 5 s ahead (past the 500 ms tolerated): once its probes find
    it off every peer it refuses writes with a definite 503, its peers flag it
    and the replica's status says so; a restart by the controller keeps the
    skew; healed, it writes again and the tag converges (verify clean after)."""
    west = cluster.node_url("westeurope")
    fid = fault_id(fault_cli(cluster, "clock", "westeurope", "--offset", "+5s"))

    def fenced() -> bool:
        return cluster.node_clock("westeurope")["skewed"]

    await eventually(fenced, timeout=15, what="westeurope to find its clock off")
    blob = b"c" * 3000
    async with http.post(f"{west}/v2/clock/app/blobs/uploads/",
                         params={"digest": digest_of(blob)}, data=blob) as r:
        error = (await r.json())["errors"][0]
        assert (r.status, error["detail"]["outcome"]) == (503, "definite")
        detail = error["detail"]
        assert "ahead of its peers'" in detail["reason"]
        assert abs(detail["clock_offset_s"] - 5) <= detail["uncertainty_s"] + 0.001, detail
    flagged: dict = {}

    async def flagged_by_brazilsouth() -> bool:
        flagged.update(cluster.node_clock("brazilsouth")["peers"]["westeurope"])
        return flagged["exceeds"]

    await eventually(flagged_by_brazilsouth, timeout=10, what="brazilsouth to flag westeurope")
    assert 4.5 < flagged["offset_s"] < 5.5

    def status_says_so() -> bool:
        return "clock skewed on westeurope" in \
            cluster.cluster.replica_status("westeurope")["status"]["message"]

    await eventually(status_says_so, timeout=10, what="the replica status to say so")
    faults = cluster.cluster.faults
    assert faults.faults[fid].description == "clock of westeurope off: +5s"
    # A node the controller restarts gets its skew back, from the fault's start.
    outage = cluster.run(lambda: faults.inject("region-outage", region="westeurope"))
    cluster.run(lambda: faults.heal(outage.id))
    assert cluster.node_clock("westeurope")["fault"]["offset_s"] == 5
    cluster.run(lambda: faults.heal(fid))
    await eventually(lambda: not fenced(), timeout=15, what="westeurope's writes back")
    # A GET first: it takes the session's connection to the process before the
    # restart (dead; a GET is retried on a fresh one, the push's POST is not).
    await served_by(http, west)
    image = make_image([3001], seed=31)
    await push_image(http, west, "clock/app", image, tag="v1")
    for node in ("eastus-1", "brazilsouth"):
        await eventually(lambda n=node: pullable(http, cluster.node_url(n), "clock/app", "v1",
                                                 image), timeout=15, what=f"v1 on {node}")


# -- throttling ----------------------------------------------------------------------------


async def _throttle_state(http, cluster, node: str) -> dict:
    async with http.get(f"{cluster.node_url(node)}/georeg/v1/throttle",
                        headers=cluster.internal_headers()) as r:
        assert r.status == 200
        return await r.json()


async def test_a_throttle_fault_answers_429_through_the_endpoint_shared_by_the_zones(
        cluster, http):
    """`georeg fault throttle`: East US's writes past 0.6 a minute get 429 with a
    Retry-After, through its global endpoint too, which does not fail over (a 429
    is an answer, not an outage); the three zones share the one limit, so what
    one admits empties the others' buckets; reads go on; status counts the
    refusals; healing lifts it."""
    # One write, then one per 100 s: no refill reaches the test, however loaded.
    result = fault_cli(cluster, "throttle", "eastus", "--rate", "0.6/min", "--kind", "write")
    fid = fault_id(result)
    assert "eastus throttled: writes past 0.6/min get 429" in result.stdout
    listed = json.loads(fault_cli(cluster, "list", "--json").stdout)
    assert next(f for f in listed if f["id"] == fid)["kind"] == "throttle"
    endpoint = cluster.endpoint("eastus")
    failovers = cluster.status()["endpoint_traffic"]["global:eastus"]["failovers"]
    start = f"{endpoint}/v2/throttled/app/blobs/uploads/"
    answers = []
    for _ in range(4):
        async with http.post(start) as r:
            answers.append((r.status, r.headers.get("X-Georeg-Replica", ""),
                            r.headers.get("Retry-After")))
            if r.status == 429:
                assert (await r.json())["errors"][0]["detail"]["limit"] == "fault"
    admitted = [a for a in answers if a[0] == 202]
    refused = [a for a in answers if a[0] == 429]
    assert len(admitted) == 1 and len(refused) == 3, answers
    assert all(replica.startswith("eastus") and retry.isdigit() and 1 <= int(retry) <= 100
               for _, replica, retry in refused), answers
    assert cluster.status()["endpoint_traffic"]["global:eastus"]["failovers"] == failovers
    # The zone that admitted the write told the others: their fault buckets are
    # spent though nobody asked them anything, and they refuse the next write.
    zones = ("eastus-1", "eastus-2", "eastus-3")

    async def all_spent() -> bool:
        states = [await _throttle_state(http, cluster, zone) for zone in zones]
        return all(state["tokens"]["fault"]["write"] < 1 for state in states)

    await eventually(all_spent, timeout=5, what="every zone to count the admitted write")
    for zone in zones:
        async with http.post(f"{cluster.node_url(zone)}/v2/throttled/other/blobs/uploads/") as r:
            assert r.status == 429, zone
    async with http.get(f"{endpoint}/v2/") as r:       # reads are not throttled
        assert r.status == 200

    def counted() -> bool:
        """The status table's East US row: limits -, fault, reads, writes refused…"""
        text = georeg(cluster, "status").stdout
        table = text[text.index("Throttled requests"):] if "Throttled requests" in text else ""
        rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in table.splitlines()]
        row = next((cells for cells in rows if cells and cells[0] == "eastus"), None)
        return row is not None and row[1:5] == ["-", "- / 0.6 / - / -", "0", "6"]

    await eventually(lambda: asyncio.to_thread(counted), timeout=15,
                     what="georeg status to show East US's refusals")
    throttling = cluster.status()["throttling"]["eastus"]
    assert throttling["fault"] == {"write": 0.6} and throttling["refused"]["write"] == 6
    assert throttling["limits"] is None            # no [limits]: the fault alone

    fault_cli(cluster, "heal", fid)
    for zone in zones:
        assert (await _throttle_state(http, cluster, zone))["fault"] == {}
    async with http.post(start) as r:
        assert r.status == 202


async def test_a_throttled_blob_download_handed_over_by_the_endpoint_is_refused_once(
        cluster, http):
    """A blob GET through an endpoint is handed to the node (``registry_node.handoff``),
    which serves it only if throttling admits it; one it refuses goes back to the
    HTTP chain, which answers the 429 — counted once, not twice."""
    image = make_image([3000], seed=21)
    node = cluster.node_url("brazilsouth")
    await push_image(http, node, "throttled/blob", image, tag="v1")
    blob = f"{cluster.regional_endpoint('brazilsouth')}/v2/throttled/blob/blobs/" \
           f"{digest_of(image.layers[0])}"
    handed_over = cluster.status()["endpoint_traffic"]["regional:brazilsouth"]["handed_over"]
    fid = fault_id(fault_cli(cluster, "throttle", "brazilsouth", "--rate", "0.6/min",
                             "--kind", "read"))
    statuses = []
    for _ in range(3):
        async with http.get(blob) as r:
            statuses.append(r.status)
            if r.status == 200:
                assert await r.read() == image.layers[0]
            else:
                assert r.headers["Retry-After"].isdigit()
    assert statuses == [200, 429, 429]
    traffic = cluster.status()["endpoint_traffic"]["regional:brazilsouth"]
    assert traffic["handed_over"] == handed_over + 1       # the admitted one, on the hand-over
    assert (await _throttle_state(http, cluster, "brazilsouth"))["refused"]["read"] == 2
    fault_cli(cluster, "heal", fid)


async def test_a_throttle_fault_is_on_every_node_of_its_region_or_none_and_survives_restarts(
        cluster, http):
    """A throttling fault one zone cannot take is taken back from the zones that
    took it (they used to stay throttled, unlisted, beyond heal --all); and a
    node the controller restarts while one is active gets it again (it used to
    come back unthrottled while the fault was listed)."""
    faults = cluster.cluster.faults
    zones = ("eastus-1", "eastus-2", "eastus-3")
    deletes = cluster.run(lambda: faults.inject("throttle", region="eastus", rate_per_min=0.6,
                                                request_kind="delete"))
    outage = cluster.run(lambda: faults.inject("zone-outage", region="eastus", zone="3"))
    with pytest.raises(FaultError, match="eastus-3 is unreachable"):
        cluster.run(lambda: faults.inject("throttle", region="eastus", rate_per_min=0.6,
                                          request_kind="write"))
    applied = [(await _throttle_state(http, cluster, zone))["fault"] for zone in zones[:2]]
    listed = [f.id for f in faults.active() if f.kind == "throttle"]
    cluster.run(lambda: faults.heal(outage.id))
    restarted = (await _throttle_state(http, cluster, "eastus-3"))["fault"]
    assert (applied, listed, restarted) == ([{"delete": 0.6}] * 2, [deletes.id], {"delete": 0.6})


def test_bad_throttle_faults_say_what_is_wrong(cluster):
    result = fault_cli(cluster, "throttle", "eastus", "--rate", "fast")
    assert result.returncode == 2 and "expected a rate such as 60/min" in result.stderr
    result = fault_cli(cluster, "throttle", "narnia")
    assert result.returncode == 2 and "narnia has no replica" in result.stderr
    result = fault_cli(cluster, "throttle", "eastus", "--kind", "pull")
    assert result.returncode == 2 and "invalid choice: 'pull'" in result.stderr
    for rate in ("1e-320/min", "inf", "nan/s"):
        result = fault_cli(cluster, "throttle", "eastus", "--rate", rate)
        assert result.returncode == 2 and "from 0.01 to 1e+09" in result.stderr, rate


# -- destroy and restore -------------------------------------------------------------------


def _nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


async def test_destroy_and_restore_from_the_paired_copy(cluster, http):
    # Content that reaches no other replica: eastus cut off from every region,
    # but not from its own storage copy in its paired region (westus).
    cut = [cluster.run(lambda r=r: cluster.cluster.faults.inject("partition", a="eastus", b=r))
           for r in ("westeurope", "brazilsouth")]
    image = make_image([1700, 1800], seed=9)
    await push_image(http, cluster.node_url("eastus-1"), "onlyeast/app", image, tag="v1")
    copy = cluster.node_url("pair-eastus")
    await eventually(lambda: pullable(http, copy, "onlyeast/app", "v1", image), timeout=20,
                     what="the paired copy holding the push")
    # The copy is storage: its process yields the CPU to the serving nodes.
    nodes = cluster.cluster.supervisor.nodes
    assert _nice(nodes["pair-eastus"].pid) == PAIR_COPY_NICE + _nice(nodes["eastus-1"].pid)
    cluster.run(lambda: cluster.cluster.faults.inject("destroy", region="eastus"))
    for fault in cut:
        cluster.run(lambda f=fault: cluster.cluster.faults.heal(f.id))
    cluster.run(cluster.cluster.wait_ready)
    assert not await pullable(http, cluster.node_url("eastus-2"), "onlyeast/app", "v1", image)
    restore = georeg(cluster, "region", "restore", "eastus", timeout=300)
    assert restore.returncode == 0, restore.stderr
    assert "restored from its copy in westus" in restore.stdout
    for zone in ("1", "2", "3"):
        assert await pullable(http, cluster.node_url(f"eastus-{zone}"), "onlyeast/app", "v1", image)


async def test_confined_region_restore_says_what_is_lost(cluster, http):
    image = make_image([1900], seed=10)
    cut = [cluster.run(lambda r=r: cluster.cluster.faults.inject("partition", a="brazilsouth", b=r))
           for r in ("eastus", "westeurope")]
    await push_image(http, cluster.node_url("brazilsouth"), "br/lost", image, tag="v1")
    cluster.run(lambda: cluster.cluster.faults.inject("destroy", region="brazilsouth"))
    for fault in cut:
        cluster.run(lambda f=fault: cluster.cluster.faults.heal(f.id))
    restore = georeg(cluster, "region", "restore", "brazilsouth", timeout=300)
    assert restore.returncode == 1
    assert "no paired-region copy" in restore.stdout and "is lost" in restore.stdout
    assert not await pullable(http, cluster.node_url("brazilsouth"), "br/lost", "v1", image)


# -- lossy links and HTTP faults (docs/faults.md) --------------------------------------


async def _broken_streams(http, cluster, region: str) -> float:
    """Replication attempts ``region``'s node(s) saw fail indefinitely (a broken
    stream or call, retried): what a flipped byte does over mutual TLS, whose
    record check fails (this cluster replicates over it; without TLS the seal
    refuses it: tests/test_lossy_links.py)."""
    total = 0.0
    for name in cluster.cluster.supervisor.nodes:
        if not name.startswith(region):
            continue
        async with http.get(f"{cluster.node_url(name)}/metrics",
                            headers=cluster.internal_headers()) as r:
            text = await r.text()
        total += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("georeg_replication_transfer_failures_total{")
                     and 'outcome="indefinite"' in line)
    return total


async def test_a_corrupting_link_is_caught_and_retried_and_nothing_damaged_is_kept(cluster, http):
    """Flipped bytes on the WAN between eastus and westeurope: TLS refuses
    them, the transfers are retried, westeurope ends with the blob byte for
    byte, and verify is clean (the autouse fixture)."""
    before = await _broken_streams(http, cluster, "westeurope")
    fid = fault_id(fault_cli(cluster, "link", "eastus", "westeurope", "--corrupt", "0.02",
                             "--seed", "11"))
    image = make_image([300_000], seed=21)
    await push_image(http, cluster.regional_endpoint("eastus"), "corrupt/app", image, tag="v1")
    west = cluster.node_url("westeurope")
    await eventually(lambda: pullable(http, west, "corrupt/app", "v1", image), timeout=60,
                     what="westeurope over a corrupting link")
    for blob in image.blobs:
        async with http.get(f"{west}/v2/corrupt/app/blobs/{digest_of(blob)}") as r:
            assert r.status == 200 and await r.read() == blob
    crossing = [link for link in await links(http, cluster)
                if {link["from_region"], link["to_region"]} == {"eastus", "westeurope"}]
    assert sum(link["corrupted_segments"] for link in crossing) > 0, crossing
    assert await _broken_streams(http, cluster, "westeurope") > before
    fault_cli(cluster, "heal", fid)
    # Healed: nothing more is corrupted.
    corrupted = sum(link["corrupted_segments"] for link in await links(http, cluster))
    image = make_image([30_000], seed=22)
    await push_image(http, cluster.regional_endpoint("eastus"), "corrupt/app", image, tag="v2")
    await eventually(lambda: pullable(http, west, "corrupt/app", "v2", image), timeout=30,
                     what="westeurope once healed")
    assert sum(link["corrupted_segments"] for link in await links(http, cluster)) == corrupted


async def test_an_http_fault_hits_its_method_and_path_only_and_a_retrying_client_gets_through(
        cluster, http, tmp_path):
    image = make_image([4096, 8192], seed=31)
    write_oci_layout(tmp_path / "layout", image)
    endpoint = cluster.endpoint("eastus")
    skopeo = Skopeo(tmp_path / "skopeo", endpoint.partition("://")[2], cluster)
    source = f"oci:{tmp_path / 'layout'}:latest"
    fid = fault_id(fault_cli(cluster, "http", "global:eastus", "--status", "503", "--method",
                             "PUT", "--path-regex", "/manifests/"))
    listed = json.loads(fault_cli(cluster, "list", "--json").stdout)
    assert any(f["id"] == fid and f["active"] and f["kind"] == "http" for f in listed)
    async with http.put(f"{endpoint}/v2/httpfault/app/manifests/v1", data=image.manifest,
                        headers={"Content-Type": image.media_type}) as r:
        assert r.status == 503 and r.headers["X-Georeg-Fault"] == fid
        assert r.headers["Retry-After"] == "1"
        error = (await r.json())["errors"][0]
        assert error["code"] == "UNAVAILABLE" and error["detail"]["fault"] == fid
    async with http.get(f"{endpoint}/v2/") as r:          # not a PUT: untouched
        assert r.status == 200 and "X-Georeg-Fault" not in r.headers
    auth = ("--authfile", str(skopeo.auth))
    rc, _, log = await skopeo.run("copy", *auth, "--dest-tls-verify=false", source,
                                  skopeo.ref("httpfault/app:v1"), check=False)
    assert rc != 0 and "503" in log, log[-2000:]
    fault_cli(cluster, "heal", fid)
    # Half the manifest PUTs fail, from a seed whose first draw fails one: a
    # client that retries the push gets through. (skopeo 1.9's --retry-times
    # does not retry a 503 on a manifest PUT: the retrying is the test's.)
    seed = next(s for s in range(100) if random.Random(
        HttpFaults("global:eastus").seed_of(s)).random() < 0.5)
    fid = cluster.inject_fault("http", endpoint="global:eastus", status=503, probability=0.5,
                               method="PUT", path_regex="/manifests/", seed=seed)["id"]
    outcomes = []
    for _ in range(10):                     # P(ten 503s in a row) = 1/1024, and seeded
        rc, _, log = await skopeo.run("copy", *auth, "--dest-tls-verify=false", source,
                                      skopeo.ref("httpfault/app:v1"), check=False)
        outcomes.append(rc)
        if rc == 0:
            break
    assert outcomes[0] != 0 and outcomes[-1] == 0, (outcomes, log[-1000:])
    assert cluster.cluster.faults.http_injected()[fid] == len(outcomes) - 1
    cluster.heal_fault(fid)


async def test_reset_and_truncated_bodies_fail_a_pull_clearly_and_it_works_once_healed(
        cluster, http, tmp_path):
    image = make_image([120_000], seed=41)
    await push_image(http, cluster.regional_endpoint("eastus"), "cut/app", image, tag="v1")
    endpoint = cluster.endpoint("eastus")
    skopeo = Skopeo(tmp_path / "skopeo", endpoint.partition("://")[2], cluster)

    async def pull(name: str) -> tuple[int, str]:
        rc, _, log = await skopeo.run("copy", "--authfile", str(skopeo.auth),
                                      "--src-tls-verify=false", skopeo.ref("cut/app:v1"),
                                      f"oci:{tmp_path / name}:v1", check=False)
        blobs = tmp_path / name / "blobs" / "sha256"
        for path in blobs.iterdir() if blobs.exists() else ():   # nothing kept is damaged
            assert digest_of(path.read_bytes()) == f"sha256:{path.name}"
        return rc, log

    fid = fault_id(fault_cli(cluster, "http", "global:eastus", "--truncate-body", "--method",
                             "GET", "--path-regex", "/blobs/"))
    async with http.get(f"{endpoint}/v2/cut/app/blobs/{digest_of(image.blobs[1])}") as r:
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()                                  # half the body, then the end
    rc, log = await pull("truncated")
    assert rc != 0 and ("EOF" in log or "reset" in log or "digest" in log), log[-2000:]
    fault_cli(cluster, "heal", fid)
    fid = fault_id(fault_cli(cluster, "http", "global:eastus", "--reset", "--path-regex",
                             "/manifests/"))
    host, _, port = endpoint.partition("://")[2].partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /v2/cut/app/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(ConnectionResetError):      # a reset, not an orderly end
        await asyncio.wait_for(reader.read(), 10)
    writer.close()
    rc, log = await pull("reset")
    assert rc != 0 and ("reset" in log or "EOF" in log), log[-2000:]
    fault_cli(cluster, "heal", "--all")
    rc, log = await pull("healed")
    assert rc == 0, log[-2000:]
