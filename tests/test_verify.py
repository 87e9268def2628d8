"""``georeg verify`` on a real cluster: clean once pushes converge, and every
kind of divergence it promises to catch, made for real — a blob file of
confined content copied out of its region, a blob file gone from a replica, a
region cut off while a tag is pushed, nodes down while a tag is deleted.

One three-region cluster (eastus, westeurope, brazilsouth — the last
confined) serves every test; each test repairs what it broke and ends with
the cluster verifying clean again, so the next one starts from a known state.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from cluster.control import spec as specs
from cluster.faults.verify import VerifyReport
from cluster.testing import RunningCluster

from .command_line import georeg_command
from .helpers import OCI_INDEX, descriptor, eventually, make_image, push_image, urlopen

SPEC = specs.ClusterSpec(
    registry="verifytest", tier="Premium", home_region="eastus",
    replicas=(specs.ReplicaSpec("westeurope"), specs.ReplicaSpec("brazilsouth")),
)


def georeg(*args: str, data_dir: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return georeg_command([*args, "--data-dir", str(data_dir)], timeout=timeout,
                          env={**os.environ, "COLUMNS": "250"})


class Content:
    """What the module pushes, by name."""

    def __init__(self) -> None:
        self.app_v1 = make_image([3000, 5000], seed=101)       # eastus: verify/app:v1
        self.app_v2 = make_image([4000], seed=102)             # westeurope: verify/app:v2
        self.child_a = make_image([1500], seed=103)            # eastus: verify/multi:latest
        self.child_b = make_image([2500], seed=104)
        self.index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            descriptor(self.child_a.manifest, self.child_a.media_type),
            descriptor(self.child_b.manifest, self.child_b.media_type)]}).encode()
        self.signature = make_image([100], seed=105, artifact_type="application/vnd.example.sig",
                                    subject=descriptor(self.app_v1.manifest,
                                                       self.app_v1.media_type))
        self.confined = make_image([6000, 7000], seed=106)     # brazilsouth: br/only:v1


def node_of(running: RunningCluster, region: str):
    return running.cluster.plan.nodes_in(region)[0]


def blob_path(running: RunningCluster, region: str, digest: str) -> Path:
    alg, _, hexpart = digest.partition(":")
    return node_of(running, region).data_dir / "blobs" / alg / hexpart[:2] / hexpart


async def inventory(http: aiohttp.ClientSession, url: str, internal: dict[str, str]) -> dict:
    """A node's inventory (an internal route: ``internal`` carries the
    cluster's internal credential)."""
    async with http.get(f"{url}/georeg/v1/inventory", headers=internal) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def tag_on(http: aiohttp.ClientSession, running: RunningCluster, region: str, repo: str,
                 tag: str) -> str | None:
    """What ``tag`` points at on the region's node, read without side effects
    (a HEAD for a missing tag would make the node fetch it from a peer)."""
    found = await inventory(http, running.node_url(node_of(running, region).name),
                            running.internal_headers())
    entry = found["repositories"].get(repo, {}).get("tags", {}).get(tag)
    return entry["digest"] if entry else None


async def replicated(http: aiohttp.ClientSession, running: RunningCluster, repo: str,
                     ref: str, timeout: float = 30) -> None:
    """Until per-image status says every replica residency allows has ``repo:ref``."""
    url = running.node_url(node_of(running, "eastus").name)

    async def complete() -> bool:
        async with http.get(f"{url}/georeg/v1/replication/status",
                            params={"repository": repo, "reference": ref}) as r:
            return r.status == 200 and (await r.json())["complete"]

    await eventually(complete, timeout=timeout, what=f"{repo}:{ref} on every replica")


def replicas(running: RunningCluster) -> set[str]:
    """The serving nodes (paired-region copies, if the cluster keeps any, are extra)."""
    return {n.name for n in running.cluster.plan.nodes}


def wait_clean(running: RunningCluster, timeout: float = 30) -> VerifyReport:
    report: VerifyReport | None = None

    def clean() -> bool:
        nonlocal report
        report = running.verify(timeout=20)
        return report.ok

    try:
        running.wait_for(clean, timeout=timeout, what="the cluster to verify clean")
    except AssertionError:
        raise AssertionError(f"not clean: {json.dumps(report.as_dict(), indent=1)}") from None
    return report


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with RunningCluster(SPEC, tmp_path_factory.mktemp("verify")) as running:
        content = Content()
        asyncio.run(_push_everything(running, content))
        running.content = content
        yield running


async def _push_everything(running: RunningCluster, c: Content) -> None:
    east = running.node_url(node_of(running, "eastus").name)
    west = running.node_url(node_of(running, "westeurope").name)
    brazil = running.node_url(node_of(running, "brazilsouth").name)
    async with running.http() as http:
        await push_image(http, east, "verify/app", c.app_v1, tag="v1")
        await push_image(http, west, "verify/app", c.app_v2, tag="v2")
        await push_image(http, east, "verify/multi", c.child_a)
        await push_image(http, east, "verify/multi", c.child_b)
        async with http.put(f"{east}/v2/verify/multi/manifests/latest", data=c.index,
                            headers={"Content-Type": OCI_INDEX}) as r:
            assert r.status == 201, await r.text()
        await push_image(http, east, "verify/app", c.signature)
        await push_image(http, brazil, "br/only", c.confined, tag="v1")
        for repo, ref in (("verify/app", "v1"), ("verify/app", "v2"), ("verify/multi", "latest"),
                          ("verify/app", c.signature.digest), ("br/only", "v1")):
            await replicated(http, running, repo, ref)


# -- clean ---------------------------------------------------------------------------


def test_a_converged_cluster_verifies_clean_from_the_cli_api_and_python(cluster):
    report = wait_clean(cluster)
    assert replicas(cluster) == {"brazilsouth", "eastus", "westeurope"}
    assert set(report.checked) == set(cluster.cluster.supervisor.nodes) >= replicas(cluster)
    assert report.not_checked == [] and report.divergences == []
    assert report.notes == []       # every data dir was read, beside its running node
    # Every manifest was checked on every replica allowed to hold it.
    assert report.counts["eastus"]["manifests"] == 6            # v1, v2, a, b, index, signature
    assert report.counts["brazilsouth"]["manifests"] == 7       # … and the confined image
    assert report.counts["westeurope"]["repositories"] == 2

    human = georeg("verify", data_dir=cluster.data_dir)
    assert human.returncode == 0, human.stdout + human.stderr
    assert "clean" in human.stdout and "westeurope" in human.stdout

    machine = georeg("verify", "--json", "--timeout", "30", data_dir=cluster.data_dir)
    assert machine.returncode == 0, machine.stdout + machine.stderr
    doc = json.loads(machine.stdout)
    assert doc["status"] == "clean" and doc["ok"] is True and doc["error"] is None
    assert set(doc["checked"]) >= replicas(cluster)
    assert doc["divergences"] == [] and doc["not_checked"] == []
    assert set(doc["counts"]["eastus"]) >= {"repositories", "tags", "manifests", "blobs"}
    assert isinstance(doc["elapsed_s"], float)

    with urlopen(urllib.request.Request(f"{cluster.management_url}/georeg/v1/verify",
                                        headers=cluster.owner_headers()), timeout=60) as r:
        assert json.loads(r.read())["status"] == "clean"


def test_the_inventory_endpoint_reports_origins_and_stamps(cluster):
    async def check() -> None:
        async with cluster.http() as http:
            brazil = await inventory(http, cluster.node_url("brazilsouth"),
                                     cluster.internal_headers())
            west = await inventory(http, cluster.node_url("westeurope"), cluster.internal_headers())
        confined = brazil["repositories"]["br/only"]
        assert confined["tags"]["v1"]["digest"] == cluster.content.confined.digest
        assert confined["tags"]["v1"]["stamp"][1] == "brazilsouth"
        manifest = confined["manifests"][cluster.content.confined.digest]
        assert manifest["pushed_region"] == "brazilsouth" and len(manifest["references"]) == 3
        assert "br/only" not in west["repositories"] and "br/only" not in west["catalog"]
        assert west["repositories"]["verify/app"]["manifests"][cluster.content.app_v2.digest][
            "pushed_region"] == "westeurope"
        assert set(west["blobs"]) == set(west["blob_files"])

    asyncio.run(check())


# -- divergences made for real -------------------------------------------------------


def test_a_confined_blob_file_copied_out_of_brazil_is_a_residency_divergence(cluster):
    layer = cluster.content.confined.blobs[1]
    from .helpers import digest_of

    digest = digest_of(layer)
    source = blob_path(cluster, "brazilsouth", digest)
    leaked = blob_path(cluster, "westeurope", digest)
    assert source.exists() and not leaked.exists()
    leaked.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, leaked)
    try:
        report = cluster.verify(timeout=30)
        assert report.status == "divergent" and report.exit_code == 1
        found = [d for d in report.divergences if d.kind == "residency"]
        assert [(d.node, d.digest, d.location) for d in found] == \
            [("westeurope", digest, str(leaked))], report.as_dict()
        assert [d for d in report.divergences if d.kind != "residency"] == []

        cli = georeg("verify", "--json", data_dir=cluster.data_dir)
        assert cli.returncode == 1, cli.stderr
        doc = json.loads(cli.stdout)
        assert doc["status"] == "divergent"
        [entry] = doc["divergences"]
        assert entry["kind"] == "residency" and entry["node"] == "westeurope"
        assert entry["region"] == "westeurope" and entry["digest"] == digest
        assert entry["location"] == str(leaked) and entry["repository"] == "br/only"
        assert entry["expected"] == "only in brazilsouth" and entry["actual"] == "in westeurope"
        human = georeg("verify", data_dir=cluster.data_dir)
        assert human.returncode == 1 and "residency" in human.stdout and "divergent" in human.stdout
    finally:
        leaked.unlink(missing_ok=True)
    wait_clean(cluster)


def test_confined_metadata_keys_in_another_region_are_found_on_disk(cluster):
    from rocksdict import Options, Rdict

    from registry_node import keys

    from .helpers import digest_of

    image = cluster.content.confined
    layer = digest_of(image.layers[0])
    leaked = [keys.blob_user(layer, "br/only"), keys.ref(layer, "br/only", image.digest)]
    meta = node_of(cluster, "westeurope").data_dir / "meta"
    supervisor = cluster.cluster.supervisor

    def rewrite(put: bool) -> None:
        cluster.run(lambda: supervisor.stop_node("westeurope", graceful=True))
        db = Rdict(str(meta), Options(raw_mode=True))
        for key in leaked:
            if put:
                db[key] = b""
            else:
                del db[key]
        db.close()
        cluster.restart("westeurope")
        cluster.run(cluster.cluster.wait_ready)

    rewrite(put=True)
    try:
        report = cluster.verify(timeout=30)
        assert report.exit_code == 1
        found = sorted((d.node, d.repository, d.location) for d in report.divergences)
        assert found == sorted([
            ("westeurope", "br/only", f"ref/{layer}/br/only/{image.digest}"),
            ("westeurope", "br/only", f"user/{layer}/br/only")]), report.as_dict()
        assert {d.kind for d in report.divergences} == {"residency"}
        assert all(d.expected == "only in brazilsouth" for d in report.divergences)
    finally:
        rewrite(put=False)
    wait_clean(cluster)


def test_a_blob_file_gone_from_a_replica_makes_its_manifest_incomplete(cluster):
    image = cluster.content.app_v1
    from .helpers import digest_of

    layer = digest_of(image.layers[0])
    path = blob_path(cluster, "westeurope", layer)
    saved = path.read_bytes()
    path.unlink()
    west = cluster.node_url("westeurope")
    try:
        async def head() -> int:
            async with cluster.http() as http, \
                    http.head(f"{west}/v2/verify/app/blobs/{layer}") as r:
                return r.status

        assert asyncio.run(head()) == 404
        report = cluster.verify(timeout=30)
        assert report.exit_code == 1
        incomplete = [d for d in report.divergences if d.kind == "incomplete"]
        assert [(d.node, d.repository, d.digest, d.expected, d.actual) for d in incomplete] == \
            [("westeurope", "verify/app", image.digest, 200, 404)], report.as_dict()
        assert layer in incomplete[0].detail
        storage = [d for d in report.divergences if d.kind == "storage"]
        assert [(d.node, d.digest, d.actual) for d in storage] == [("westeurope", layer, "missing")]
        # The signature refers to the image but needs none of its blobs: complete.
        assert {d.kind for d in report.divergences} == {"incomplete", "storage"}
    finally:
        path.write_bytes(saved)
    wait_clean(cluster)


def test_a_region_cut_off_during_a_push_is_named_with_what_it_lacks(cluster):
    image = make_image([2200], seed=107)
    east = cluster.node_url("eastus")
    fault = cluster.run(lambda: cluster.cluster.faults.inject(
        "region-outage", region="westeurope", mode="isolate"))
    try:
        async def push() -> None:
            async with cluster.http() as http:
                await push_image(http, east, "verify/app", image, tag="v3")
                await eventually(lambda: _is(tag_on(http, cluster, "brazilsouth", "verify/app",
                                                    "v3"), image.digest),
                                 timeout=30, what="v3 in brazilsouth")

        asyncio.run(push())
        report = cluster.verify(timeout=30)
        assert report.status == "divergent" and "westeurope" in report.checked
        tags = [d for d in report.divergences if d.kind == "tag"]
        assert [(d.node, d.repository, d.tag, d.expected, d.actual) for d in tags] == \
            [("westeurope", "verify/app", "v3", image.digest, None)], report.as_dict()
        assert tags[0].source in ("eastus", "brazilsouth")
        manifests = [d for d in report.divergences if d.kind == "manifest"]
        assert [(d.node, d.digest, d.expected, d.actual) for d in manifests] == \
            [("westeurope", image.digest, "present", "absent")]
        assert {d.kind for d in report.divergences} == {"tag", "manifest"}
    finally:
        cluster.run(lambda: cluster.cluster.faults.heal(fault.id))
    wait_clean(cluster, timeout=60)


async def _is(value, expected) -> bool:
    return (await value) == expected


def test_down_nodes_are_not_checked_and_too_few_make_it_inconclusive(cluster):
    supervisor = cluster.cluster.supervisor
    east = cluster.node_url("eastus")
    cluster.run(lambda: supervisor.stop_node("westeurope", graceful=True))
    try:
        async def untag() -> None:
            async with cluster.http() as http:
                async with http.delete(f"{east}/v2/verify/app/manifests/v2") as r:
                    assert r.status == 202, await r.text()
                await eventually(lambda: _is(tag_on(http, cluster, "brazilsouth", "verify/app",
                                                    "v2"), None),
                                 timeout=30, what="the untag in brazilsouth")

        asyncio.run(untag())
        # westeurope still has v2, but it is down: not checked, not divergent.
        report = cluster.verify(timeout=30)
        assert report.status == "clean", report.as_dict()
        assert set(report.checked) & replicas(cluster) == {"brazilsouth", "eastus"}
        [down] = report.not_checked
        assert down["node"] == "westeurope" and down["reason"].startswith("down")

        cluster.run(lambda: supervisor.stop_node("brazilsouth", graceful=True))
        cli = georeg("verify", "--json", data_dir=cluster.data_dir)
        assert cli.returncode == 2, cli.stdout + cli.stderr
        doc = json.loads(cli.stdout)
        assert doc["status"] == "unverifiable"
        assert set(doc["checked"]) & replicas(cluster) == {"eastus"}
        assert "only 1 replica node(s) could be checked" in doc["error"]
        assert {n["node"] for n in doc["not_checked"]} == {"westeurope", "brazilsouth"}
        human = georeg("verify", data_dir=cluster.data_dir)
        assert human.returncode == 2 and "cannot verify" in human.stdout
    finally:
        for name in ("westeurope", "brazilsouth"):
            if not supervisor.nodes[name].healthy:
                cluster.restart(name)
        cluster.run(cluster.cluster.wait_ready)
    report = wait_clean(cluster, timeout=60)   # westeurope caught up: the untag reached it
    assert "v2" not in [d.tag for d in report.divergences]


def test_no_running_cluster_exits_2(tmp_path):
    result = georeg("verify", data_dir=tmp_path / "nothing")
    assert result.returncode == 2
    assert "no georeg cluster is running" in result.stderr
