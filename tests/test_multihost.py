"""Multi-host mode (docs/multihost.md): one host per region, each a network
namespace with its own address on a bridge, its own root file system and its
own data (``cluster.network.namespaces``); the control process (links,
endpoints, management API) on the bridge's address. Pushes, replication,
residency, zone quorum, failover when a host is cut off or loses power, and
``georeg verify`` all go across hosts; no file of a node is shared.

Needs root (as CI runs the suite); skipped, saying why, where namespaces
cannot be made.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from cluster.control import spec as specs
from cluster.control.hosts import STALE_TMP_S, write_replacing
from cluster.control.plan import MANAGEMENT, plan
from cluster.control.supervisor import NodeStartError, Supervisor
from cluster.image import layout
from cluster.network import namespaces
from cluster.network.namespaces import BoundRoot, HostNetwork, ImageRoot, NamespaceHost
from cluster.testing import RunningCluster
from tests.helpers import (
    Skopeo,
    digest_of,
    eventually,
    make_image,
    push_blob,
    push_image,
    write_oci_layout,
)

HOME, ZONED, CONFINED = "eastus", "westeurope", "brazilsouth"
QUORUM_TIMEOUT_S = 2.0
REGIONS = (HOME, ZONED, CONFINED)
PROJECT = Path(__file__).resolve().parents[1]
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")


CONTROL = "10.9.0.1"
# Run on a host: its user, where a connection off the bridge gets, whether it
# sees the paths given, and what dialling each address given gets (0: connected).
PROBE = """
import json, os, socket, sys
def dial(host, port):
    try:
        socket.create_connection((host, port), timeout=2).close()
        return 0
    except OSError as exc:
        return exc.errno or -1
paths, targets = json.loads(sys.argv[1])
print(json.dumps({"uid": os.geteuid(), "route": dial("192.0.2.1", 80),
                  "seen": [os.path.exists(p) for p in paths],
                  "dialled": [dial(host, port) for host, port in targets]}))
"""
# Run here: starts a command with the supervisor's guard (killed when this
# process dies), prints its pid and waits.
ORPHANED = """
import ctypes, json, signal, subprocess, sys
guard = lambda: ctypes.CDLL(None).prctl(1, signal.SIGKILL)
child = subprocess.Popen(json.loads(sys.argv[1]), preexec_fn=guard)
print(child.pid, flush=True)
child.wait()
"""


def _placed(hosts: dict[str, str], **fields) -> specs.ClusterSpec:
    return specs.ClusterSpec(
        home_region=HOME, replicas=(specs.ReplicaSpec(ZONED, zone_redundant=True),
                                    specs.ReplicaSpec(CONFINED)),
        network=specs.NetworkSpec(**{"host": CONTROL, "hosts": hosts, **fields})).seeded(7)


def test_a_spec_places_regions_and_zone_nodes_on_hosts_and_the_rest_stays_on_loopback():
    spec = specs.validate(_placed({ZONED: "10.9.0.2", f"{ZONED}-2": "10.9.0.3",
                                   CONFINED: "10.9.0.4"}), "test")
    p = plan(spec, Path("/srv/cluster"))
    where = {n.name: (n.host, n.data_dir) for n in p.all_nodes}
    assert where[f"{ZONED}-1"] == ("10.9.0.2", Path(f"/data/nodes/{ZONED}-1"))
    assert where[f"{ZONED}-2"] == ("10.9.0.3", Path(f"/data/nodes/{ZONED}-2"))
    assert where[CONFINED] == ("10.9.0.4", Path(f"/data/nodes/{CONFINED}"))
    # Not placed: the home region, and the paired copies (their regions are not placed).
    assert where[HOME] == ("127.0.0.1", Path(f"/srv/cluster/nodes/{HOME}"))
    assert {where[c.name][0] for c in p.pair_copies} == {"127.0.0.1"}

    # A placed node listens on its host and dials its peers through links on the
    # control process's address; an unplaced one, through links on loopback.
    confined = p.node(CONFINED)
    view = p.view(confined)
    assert view.grpc_listen == f"10.9.0.4:{confined.grpc_port}"
    assert {peer.grpc.rpartition(":")[0] for peer in view.peers} == {CONTROL}
    assert {peer.grpc.rpartition(":")[0] for peer in p.view(p.node(HOME)).peers} == {"127.0.0.1"}
    link = p.link(HOME, CONFINED)
    assert (link.listen_host, link.target_host, link.target_port) == \
        ("127.0.0.1", "10.9.0.4", confined.grpc_port)
    assert p.management_link(CONFINED).target_host == "10.9.0.4"
    assert f"10.9.0.4:{confined.http_port}" in p.client_addresses()

    # Its files are paths on its host; the control process keeps their originals.
    assert confined.view_file == Path(f"/data/views/{CONFINED}.json")
    assert confined.given_files and all(f.is_relative_to("/data") for f in confined.given_files)
    assert p.control_copy(confined, confined.access.key_file) == \
        Path(f"/srv/cluster/auth/ca/nodes/{CONFINED}/node.key")
    assert p.control_copy(p.node(HOME), p.node(HOME).access.key_file) == \
        p.node(HOME).access.key_file


def test_placement_is_decided_by_the_spec_even_when_both_data_dirs_are_the_same_path():
    # The control process run from georeg's image: its data dir is /data, as
    # network.host_data_dir's default is.
    p = plan(specs.validate(_placed({CONFINED: "10.9.0.4"}), "test"), Path("/data"))
    confined, home = p.node(CONFINED), p.node(HOME)
    assert (confined.host, confined.host_root, confined.own_host) == \
        ("10.9.0.4", Path("/data"), "10.9.0.4")
    assert (home.host, home.host_root, home.own_host) == ("127.0.0.1", None, None)
    assert p.link(HOME, CONFINED).listen_host == "127.0.0.1"
    assert p.link(CONFINED, HOME).listen_host == CONTROL


def test_without_hosts_every_node_is_on_loopback_in_the_cluster_data_dir():
    p = plan(specs.ClusterSpec(replicas=(specs.ReplicaSpec(ZONED, zone_redundant=True),))
             .seeded(7), Path("/srv/cluster"))
    assert {(n.host, n.host_root) for n in p.all_nodes} == {("127.0.0.1", None)}
    assert {(link.listen_host, link.target_host) for link in p.links} == {("127.0.0.1",) * 2}
    assert all(n.data_dir.is_relative_to("/srv/cluster") for n in p.all_nodes)


def test_a_spec_refuses_hosts_nobody_can_reach_and_names_it_cannot_place():
    with pytest.raises(specs.SpecError) as caught:
        specs.validate(_placed({"westeurope-7": "10.9.0.2", "mars": "10.9.0.3",
                                "brazilsouth-1": "10.9.0.5", "japaneast": "10.9.0.6",
                                CONFINED: "127.0.0.2", ZONED: "fd00::2"}, host="0.0.0.0",
                               host_data_dir="data").with_auth("none"), "test")
    text = str(caught.value)
    # A key that places nothing (a zone of a region without zones, a region
    # that is no replica) is refused, not ignored.
    for key in ("westeurope-7", "mars", "brazilsouth-1", "japaneast"):
        assert f"network.hosts: '{key}' places no node of this cluster" in text
    assert "auth 'none' with [network.hosts]" in text
    assert "network.hosts.brazilsouth: '127.0.0.2' is not an address other hosts reach" in text
    assert "network.hosts.westeurope: 'fd00::2': IPv6 addresses are not supported" in text
    assert "network.host '0.0.0.0': with [network.hosts], the control process" in text
    assert "network.host_data_dir 'data' is not an absolute path" in text


def test_a_host_that_would_see_the_control_data_dir_is_refused():
    # Only georeg's packages of the checkout are bound, not the checkout,
    # where `make up` keeps its data dir (.georeg: the CA key, every key).
    root = BoundRoot()
    assert root.exposes(PROJECT / "cluster" / "x") and not root.exposes(PROJECT / ".georeg")
    host = NamespaceHost("h", "10.9.0.4", Path("/nonexistent"), veth="v", bridge="b",
                         control=CONTROL, user=(1, 1))
    p = plan(specs.validate(_placed({CONFINED: "10.9.0.4"}), "test"),
             PROJECT / "cluster" / "inside")
    with pytest.raises(NodeStartError, match="sees this cluster's data dir"):
        Supervisor(p, hosts={"10.9.0.4": host}).host(p.node(CONFINED))


def test_a_bound_root_shows_a_venv_under_tmp_over_the_hosts_own_tmp(tmp_path):
    # A CI clone (its venv) may be under /tmp, where each host mounts a tmpfs.
    class UnderTmp(BoundRoot):
        @staticmethod
        def _python_paths() -> list[str]:
            return [str(tmp_path / "venv")]

    host = NamespaceHost("h", "10.9.0.4", tmp_path / "h", veth="v", bridge="b",
                         control=CONTROL, user=(1, 1), root_fs=UnderTmp())
    targets = [line.split()[-1] for line in host._script().splitlines()
               if line.startswith("mount ")]
    venv, tmp = f"{host.root}{tmp_path / 'venv'}", f"{host.root}/tmp"
    assert targets.index(venv) > targets.index(tmp), targets


def test_a_put_removes_what_a_killed_put_left_and_nothing_in_flight(tmp_path):
    target = tmp_path / "node.key"
    left, in_flight = tmp_path / ".node.key.ab12.tmp", tmp_path / ".node.key.cd34.tmp"
    left.write_bytes(b"half a key")
    in_flight.write_bytes(b"being written")
    old = time.time() - 2 * STALE_TMP_S
    os.utime(left, (old, old))
    write_replacing(target, b"key")
    assert target.read_bytes() == b"key"
    assert sorted(p.name for p in tmp_path.iterdir()) == [in_flight.name, target.name]


def _image_root(directory: Path) -> ImageRoot:
    """georeg's image as ``make image`` left it in build/image, unpacked once."""
    out = PROJECT / "build" / "image"
    if not (out / "index.json").exists():
        pytest.fail(f"{out} holds no image: `make image-test` builds it first")
    layout.unpack(out, "latest", directory)
    directory.chmod(0o755)          # its "/" (pytest made it 0700): the image's user walks it
    return ImageRoot(directory)


# Hosts' root file systems: this machine's Python and georeg bound read-only
# (make test), or georeg's image (make image-test: it needs `make image`).
@pytest.fixture(scope="module", params=["bound", pytest.param("image", marks=pytest.mark.image)])
def hosts(request, tmp_path_factory):
    why = namespaces.available()
    if why:
        pytest.skip(f"multi-host mode needs network namespaces, which cannot be made here: {why}")
    root_fs = (_image_root(tmp_path_factory.mktemp("image-root")) if request.param == "image"
               else BoundRoot())
    network = HostNetwork(tmp_path_factory.mktemp("hosts"))
    try:
        yield network, {region: network.add_host(region, root_fs) for region in REGIONS}
    finally:
        network.close()


@pytest.fixture(scope="module")
def running(hosts, tmp_path_factory):
    network, by_region = hosts
    spec = specs.ClusterSpec(
        registry="georegmulti", home_region=HOME, paired_copies=False,
        replicas=(specs.ReplicaSpec(ZONED, zone_redundant=True), specs.ReplicaSpec(CONFINED)),
        replication=specs.ReplicationSpec(quorum_timeout_s=QUORUM_TIMEOUT_S),
        network=specs.NetworkSpec(host=network.address,
                                  hosts={region: h.address for region, h in by_region.items()}))
    spec = specs.validate(spec, "the multi-host test's spec")
    data_dir = tmp_path_factory.mktemp("control")
    with RunningCluster(spec, data_dir, hosts={h.address: h for h in by_region.values()}) as c:
        # From now on hosts dial nothing on the control address but their links.
        network.confine(c.cluster.plan.host_ports())
        yield c
    # Nothing of a node was written on the control process's side but its log.
    assert not (data_dir / "nodes").exists() or not any((data_dir / "nodes").iterdir())


def _on_disk(host, digest: str) -> bool:
    return any(host.data.rglob(digest.removeprefix("sha256:")))


async def _blob_digests(session, base: str, repo: str, ref: str) -> list[str]:
    async with session.get(f"{base}/v2/{repo}/manifests/{ref}",
                           headers={"Accept": ", ".join(MANIFEST_TYPES)}) as r:
        assert r.status == 200, await r.text()
        manifest = await r.json(content_type=None)
    return [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]


async def _holds(session, base: str, repo: str, ref: str) -> bool:
    async with session.head(f"{base}/v2/{repo}/manifests/{ref}") as r:
        return r.status == 200


@pytest.mark.interop
async def test_pushes_replicate_across_hosts_and_confined_and_quorum_writes_stay_where_they_must(
        running, hosts, tmp_path):
    network, by_region = hosts
    # Every node listens on its own host's address, not on loopback.
    nodes = running.cluster.plan.nodes
    assert {n.host for n in nodes} == {h.address for h in by_region.values()}
    # A host runs as a user of its own, has no route off the bridge, sees
    # neither the control process's data dir nor another host's data (by
    # their paths, or through /proc/<pid>/root of the control process and of
    # another host's node), and dials neither another host's node directly nor
    # a service of this machine listening on every address: only links.
    zoned = by_region[ZONED]
    zoned_node = running.cluster.supervisor.nodes[f"{ZONED}-1"]
    paths = [str(running.data_dir), str(zoned.data),
             f"/proc/{os.getpid()}/root{running.data_dir}", f"/proc/{zoned_node.pid}/root/data"]
    with socket.create_server(("0.0.0.0", 0)) as service:
        targets = [(zoned.address, zoned_node.plan.http_port),
                   (network.address, service.getsockname()[1])]
        probe = await asyncio.to_thread(
            subprocess.run, by_region[HOME].command([sys.executable, "-c", PROBE,
                                                     json.dumps([paths, targets])]),
            capture_output=True, text=True, timeout=30)
    assert json.loads(probe.stdout) == {
        "uid": by_region[HOME].user[0], "route": errno.ENETUNREACH, "seen": [False] * 4,
        "dialled": [errno.ECONNREFUSED] * 2}, probe.stderr

    # skopeo through the home region's global endpoint: on every host.
    skopeo = Skopeo(tmp_path / "skopeo", running.endpoint(HOME).removeprefix("http://"),
                    cluster=running)
    image = make_image(seed=21)
    write_oci_layout(tmp_path / "layout", image, "v1")
    await skopeo.copy(f"oci:{tmp_path / 'layout'}:v1", skopeo.ref("app:v1"))
    async with running.http() as http:
        for node in nodes:
            await eventually(lambda n=node: _holds(http, running.node_url(n.name), "app", "v1"),
                             timeout=20, what=f"app:v1 on {node.name}")
        # Blob files, under each host's own /data (as skopeo pushed them: compressed).
        blobs = await _blob_digests(http, running.node_url(HOME), "app", "v1")
        for region in REGIONS:
            assert all(_on_disk(by_region[region], blob) for blob in blobs), region
        # A blob through the global endpoint from a node on another host: the
        # hand-over of the client's socket cannot reach it, the endpoint relays.
        async with http.get(f"{running.endpoint(HOME)}/v2/app/blobs/{blobs[-1]}") as r:
            body = await r.read()
            assert r.status == 200, body[:200]
        assert f"sha256:{hashlib.sha256(body).hexdigest()}" == blobs[-1]

        # Zone quorum: with two of the zoned region's three zones paused, a
        # write to the third is not acknowledged (503 once the quorum timeout
        # has passed); with one back, it is.
        quorum = make_image(seed=22)
        writer = running.node_url(f"{ZONED}-1")
        for blob in quorum.blobs:
            await push_blob(http, writer, "zoned", blob)
        paused = [running.inject("pause", region=f"{ZONED}-{zone}") for zone in (2, 3)]
        try:
            async with http.put(f"{writer}/v2/zoned/manifests/v1", data=quorum.manifest,
                                headers={"Content-Type": quorum.media_type},
                                timeout=aiohttp.ClientTimeout(total=5 * QUORUM_TIMEOUT_S)) as r:
                assert r.status == 503, await r.text()
        finally:
            running.heal(paused[0].id)
        await push_image(http, writer, "zoned", quorum, "v1")
        running.heal(paused[1].id)

        # Residency: Brazil South's push stays on its host, while content
        # pushed after it reaches every host.
        confined = make_image(seed=23)
        await push_image(http, running.regional_endpoint(CONFINED), "local", confined, "v1")
        after = make_image(seed=24)
        await push_image(http, running.regional_endpoint(HOME), "after", after, "v1")
        for node in nodes:
            await eventually(lambda n=node: _holds(http, running.node_url(n.name), "after", "v1"),
                             timeout=20, what=f"after:v1 on {node.name}")
    for blob in map(digest_of, confined.blobs):
        assert _on_disk(by_region[CONFINED], blob)
        assert not _on_disk(by_region[HOME], blob) and not _on_disk(by_region[ZONED], blob)
    # What went between two hosts crossed the links between them (no host
    # dials another: above), in both directions of every pair of hosts.
    carried: dict[tuple[str, str], int] = {}
    for (source, target), link in running.cluster.supervisor.links.items():
        if source == MANAGEMENT:
            continue
        pair = (running.cluster.plan.node(source).region, running.cluster.plan.node(target).region)
        carried[pair] = carried.get(pair, 0) + link.stats()["bytes"]
    assert all(carried.get((a, b), 0) > 0 for a in REGIONS for b in REGIONS if a != b), carried


async def test_a_node_on_a_host_dies_with_the_process_that_started_it(hosts):
    # The supervisor's guard (SIGKILL when its parent dies) outlives the change
    # to the host's user, which clears it in the kernel.
    _, by_region = hosts
    host = by_region[CONFINED]
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ORPHANED,
        json.dumps(host.command([sys.executable, "-c", "import time; time.sleep(60)"])),
        stdout=subprocess.PIPE)
    try:
        child = int(await parent.stdout.readline())
        await eventually(lambda: _runs_as(child, host.user[0]), timeout=10,
                         what="the command running as the host's user")
    finally:
        parent.kill()
        await parent.wait()
    try:
        await eventually(lambda: _gone(child), timeout=10, what="the orphaned command killed")
    finally:
        if not _gone(child):
            os.kill(child, 9)


def _runs_as(pid: int, uid: int) -> bool:
    """Whether ``pid`` runs as ``uid`` (past the change of user)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["Uid"].split()[1]) == uid


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.interop
async def test_a_host_cut_off_or_losing_power_fails_over_and_verify_is_clean(running, hosts):
    _, by_region = hosts
    image = make_image(seed=31)
    async with running.http() as http:
        await push_image(http, running.regional_endpoint(ZONED), "failover", image, "v1")
        nodes = running.cluster.plan.nodes
        for node in nodes:
            await eventually(lambda n=node: _holds(http, running.node_url(n.name), "failover",
                                                   "v1"), timeout=20)

        async def served_by(location: str) -> str:
            async with http.get(f"{running.endpoint(location)}/v2/failover/manifests/v1",
                                headers={"Accept": image.media_type}) as r:
                return r.headers.get("X-Georeg-Replica", "") if r.status == 200 else ""

        # The home host's network cut (its veth down): its clients go elsewhere.
        by_region[HOME].isolate()
        try:
            await eventually(lambda: _served_elsewhere(served_by, HOME), timeout=20,
                             what="eastus's clients served by another host")
        finally:
            by_region[HOME].heal()
        # Brazil South's host loses power (every process on it killed): its
        # clients go elsewhere, and its node comes back when restarted.
        assert by_region[CONFINED].kill()
        await eventually(lambda: _served_elsewhere(served_by, CONFINED), timeout=20,
                         what="brazilsouth's clients served by another host")
    await asyncio.to_thread(running.restart, CONFINED)
    await asyncio.to_thread(running.run, lambda: running.cluster.wait_ready(timeout=30))
    report = await asyncio.to_thread(running.verify, 30)
    assert report.ok, report.as_dict()


async def _served_elsewhere(served_by, location: str) -> bool:
    replica = await served_by(location)
    return bool(replica) and not replica.startswith(location)
