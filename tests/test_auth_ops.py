"""georeg's own tools against a detached auth cluster (``georeg up --detach
--auth token``: real node processes, endpoints, management API), as its owner
runs them from the data dir — and the reads a registry client must not get
through the endpoints without credentials.

The cluster is a small one (two regions, no paired copies) shared by the
module; each test leaves it as it found it apart from what it pushed.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import aiohttp
import pytest

from cluster.control.state import running_state

from .helpers import digest_of, eventually, make_image, push_image
from .test_cluster import DetachedCluster, georeg

SPEC = """\
home_region = "westeurope"
paired_copies = false
[[replicas]]
region = "northeurope"
[network]
port_base = 0
"""


def _basic(username: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


class Running(DetachedCluster):
    def __init__(self, data: Path) -> None:
        super().__init__(data)
        shown = georeg("credential", "show", data_dir=data)
        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        password = next(p["value"] for p in doc["passwords"] if p.get("value"))
        self.admin = _basic(doc["username"], password)
        self.management = running_state(data)["management"]


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth-ops")
    (root / "spec.toml").write_text(SPEC)
    data = root / "data"
    up = georeg("up", "--detach", "--auth", "token", "--config", str(root / "spec.toml"),
                data_dir=data)
    try:
        assert up.returncode == 0, up.stderr
        yield Running(data)
    finally:
        down = georeg("down", data_dir=data)
        assert down.returncode == 0, down.stderr


async def _pushed(running: Running, repo: str, seed: int):
    image = make_image(seed=seed)
    async with aiohttp.ClientSession(headers=running.admin) as admin:
        await push_image(admin, running.status["global_endpoints"]["westeurope"], repo, image,
                         tag="v1")

        async def everywhere() -> bool:
            for region in ("westeurope", "northeurope"):
                async with admin.head(f"{running.node(region)}/v2/{repo}/manifests/v1") as r:
                    if r.status != 200:
                        return False
            return True

        await eventually(everywhere, timeout=30, what=f"{repo}:v1 on both replicas")
    return image


# -- reads through the endpoints ------------------------------------------------------


async def test_a_blob_download_through_an_endpoint_needs_credentials(running):
    """Endpoints hand a blob GET's connection to the node, which writes the blob
    itself (registry_node.handoff): that path must ask for credentials as the
    HTTP API does, or anyone reaching an endpoint reads every layer by digest."""
    image = await _pushed(running, "ops/blob", seed=11)
    layer = image.blobs[-1]
    digest = digest_of(layer)
    endpoints = [*running.status["global_endpoints"].values(),
                 *running.status["regional_endpoints"].values()]
    async with aiohttp.ClientSession() as anyone:
        for url in endpoints:
            async with anyone.get(f"{url}/v2/ops/blob/blobs/{digest}") as r:
                body = await r.read()
                assert r.status == 401, (url, r.status)
                assert layer not in body
                assert 'scope="repository:ops/blob:pull"' in r.headers["WWW-Authenticate"]
            async with anyone.get(f"{url}/v2/ops/blob/blobs/{digest}",
                                  headers=_basic("nobody", "wrong")) as r:
                assert r.status == 401 and layer not in await r.read()
    async with aiohttp.ClientSession(headers=running.admin) as admin:     # the control
        for url in endpoints:
            async with admin.get(f"{url}/v2/ops/blob/blobs/{digest}") as r:
                assert r.status == 200 and await r.read() == layer
    # ... still written by the node itself, not relayed: the check keeps the fast path.
    handed = [line for log in (running.data / "logs").glob("*.log")
              for line in log.read_text(errors="replace").splitlines()
              if '"handed_over": true' in line and digest in line and '"status": 200' in line]
    assert handed


async def test_replication_status_through_an_endpoint_needs_pull(running):
    image = await _pushed(running, "ops/status", seed=12)
    url = f"{running.status['global_endpoints']['northeurope']}/georeg/v1/replication/status"
    query = {"repository": "ops/status", "reference": "v1"}
    async with aiohttp.ClientSession() as anyone, anyone.get(url, params=query) as r:
        assert r.status == 401
        assert 'scope="repository:ops/status:pull"' in r.headers["WWW-Authenticate"]
        assert image.digest not in await r.text()
    async with aiohttp.ClientSession(headers=running.admin) as admin, \
            admin.get(url, params=query) as r:
        assert r.status == 200
        assert (await r.json())["digest"] == image.digest


# -- the CLI, run by the cluster's owner from the data dir ---------------------------


async def test_replication_status_cli_works_on_an_auth_cluster(running):
    image = await _pushed(running, "ops/cli", seed=13)
    for extra in ((), ("--node", running.node("northeurope")),
                  ("--node", running.status["global_endpoints"]["westeurope"])):
        shown = georeg("replication", "status", "ops/cli:v1", "--json", *extra,
                       data_dir=running.data)
        assert shown.returncode == 0, (extra, shown.stdout, shown.stderr)
        assert json.loads(shown.stdout)["digest"] == image.digest


async def test_verify_status_repository_and_replication_commands_work_on_an_auth_cluster(running):
    await _pushed(running, "ops/repo", seed=14)
    for args in (("status",), ("verify",), ("replication", "list"),
                 ("replication", "show", "--name", "northeurope"),
                 ("repository", "list"), ("repository", "show-tags", "--name", "ops/repo")):
        done = georeg(*args, data_dir=running.data)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    listed = georeg("repository", "list", data_dir=running.data)
    assert "ops/repo" in listed.stdout
    deleted = georeg("repository", "delete", "--name", "ops/repo", "--yes", data_dir=running.data)
    assert deleted.returncode == 0, deleted.stderr
    async with aiohttp.ClientSession(headers=running.admin) as admin:
        async def gone() -> bool:
            for region in ("westeurope", "northeurope"):
                async with admin.head(f"{running.node(region)}/v2/ops/repo/manifests/v1") as r:
                    if r.status != 404:
                        return False
            return True
        await eventually(gone, timeout=30, what="ops/repo deleted everywhere")


SCENARIO = """\
name = "auth-ops"
description = "A short run on an auth cluster: the runner as its owner, clients logged in."
seed = 5
duration_s = 4

[workload]
push_rate = 2.0
pull_rate = 2.0
layers = 1
layer_size = 4096
repositories = 2

[[steps]]
at_s = 1
fault = "link"
a = "westeurope"
b = "northeurope"
latency_ms = 50
duration_s = 1.5

[assertions]
max_convergence_s = 30
"""


async def test_chaos_run_against_a_running_auth_cluster(running, tmp_path):
    """`georeg chaos run --data-dir`: faults through the management API with the
    owner credential from the data dir, pushes and pulls with the admin user's."""
    (tmp_path / "auth-ops.toml").write_text(SCENARIO)
    out = tmp_path / "report.json"
    done = georeg("chaos", "run", str(tmp_path / "auth-ops.toml"), "--json", str(out),
                  data_dir=running.data, timeout=180)
    assert done.returncode == 0, (done.stdout, done.stderr)
    report = json.loads(out.read_text())
    assert report["passed"], report["checks"]
    assert report["pushes"]["acknowledged"] > 0 and report["pulls"]["attempted"] > 0
    assert not report["errors_by_client"], report["error_examples"]
    assert [a.get("error") for a in report["applied"]] == [None], report["applied"]
    assert report["verify"]["ok"]


async def test_fault_commands_reach_the_nodes_of_an_auth_cluster(running):
    """A disk fault goes through the management API (owner credential) to the
    node's storage seam (internal credential), and heals the same way."""
    internal = {"Authorization": "Bearer "
                + (running.data / "auth" / "internal.secret").read_text().strip()}
    seam = f"{running.node('northeurope')}/georeg/v1/faults/storage"

    async def full() -> bool:
        async with aiohttp.ClientSession(headers=internal) as itself, itself.get(seam) as r:
            assert r.status == 200
            return (await r.json())["full"]

    injected = georeg("fault", "disk", "northeurope", "--full", data_dir=running.data)
    assert injected.returncode == 0, injected.stderr
    try:
        assert await full()
        listed = georeg("fault", "list", "--json", data_dir=running.data)
        assert listed.returncode == 0, listed.stderr
        assert [f["kind"] for f in json.loads(listed.stdout) if f["active"]] == ["disk"]
    finally:
        healed = georeg("fault", "heal", "--all", data_dir=running.data)
        assert healed.returncode == 0, healed.stderr
    assert not await full()


def test_bench_lag_against_a_running_auth_cluster(running, tmp_path):
    """`georeg bench lag --data-dir`: the owner's management calls, a client that
    logs in, and arrivals read over mutual TLS with each node's own certificate."""
    out = tmp_path / "lag.json"
    done = georeg("bench", "lag", "--origin", "westeurope", "--images", "2", "--rate", "4",
                  "--layer-size", "16KiB", "--verify", "1", "--quiet-wait", "0",
                  "--json", str(out), data_dir=running.data, timeout=240)
    assert done.returncode == 0, (done.stdout, done.stderr[-3000:])
    results = json.loads(out.read_text())
    pairs = {(p["origin"], p["destination"]): p for p in results["pairs"]}
    assert set(pairs) == {("westeurope", "northeurope")}
    assert pairs["westeurope", "northeurope"]["samples"] == 2
    assert pairs["westeurope", "northeurope"]["missing"] == 0
    assert results["verification"]["all_consistent"], results["verification_checks"]
