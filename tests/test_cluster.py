"""The whole cluster: node processes, WAN links, endpoints, management, the CLI.

One default-topology cluster (Premium, eastus and westeurope zone redundant,
brazilsouth, southeastasia) serves the tests that do not break it; tests that
break a region share another, made whole again before each of them; a test
that adds a replica gets its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest

from cluster.cli.cluster import _running
from cluster.control import spec as specs
from cluster.control.access import admin_passwords_path
from cluster.control.cluster import Cluster, any_port_bases
from cluster.control.errors import PortInUse
from cluster.control.plan import plan
from cluster.control.state import saved_spec
from cluster.testing import RunningCluster

from .command_line import georeg_command
from .helpers import (
    Skopeo,
    cluster_http,
    digest_of,
    eventually,
    make_image,
    push_image,
    write_oci_layout,
)

REPLICA_HEADER = "X-Georeg-Replica"


def georeg(*args: str, data_dir, timeout: float = 120,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return georeg_command([*args, "--data-dir", str(data_dir)], timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


class DetachedCluster:
    """A cluster that `georeg up --detach` started in ``data``, as its user sees
    it: the addresses `georeg status --json` gives."""

    def __init__(self, data: Path) -> None:
        self.data = data
        status = georeg("status", "--json", data_dir=data)
        assert status.returncode == 0, status.stderr
        self.status = json.loads(status.stdout)

    def global_endpoint(self, region: str) -> str:
        return self.status["global_endpoints"][region]

    def regional_endpoint(self, region: str) -> str:
        return self.status["regional_endpoints"][region]

    def node(self, region: str) -> str:
        return next(n["http"] for n in self.status["nodes"] if n["region"] == region)


@pytest.fixture(scope="module")
def default_cluster(tmp_path_factory):
    with RunningCluster(specs.load(None), tmp_path_factory.mktemp("default")) as running:
        yield running


async def replicated(http: aiohttp.ClientSession, running: RunningCluster, repo: str, ref: str,
                     timeout: float = 30) -> dict:
    """Wait until per-image status says every replica residency allows has it."""
    node = running.node_url("eastus-1")
    answer: dict = {}

    async def complete() -> bool:
        nonlocal answer
        async with http.get(f"{node}/georeg/v1/replication/status",
                            params={"repository": repo, "reference": ref}) as r:
            answer = await r.json()
        return answer["complete"]

    await eventually(complete, timeout=timeout, what=f"{repo}:{ref} on every replica")
    return answer


# -- who may use it -------------------------------------------------------------------


async def test_the_default_cluster_wants_credentials_and_the_admin_login_opens_it(
        default_cluster, tmp_path):
    """Auth is on unless the spec says otherwise, as in ACR: no request without
    credentials reaches content, the management API or a node's internal
    routes; the admin login RunningCluster hands out opens the registry."""
    c = default_cluster
    assert c.spec.auth == "token" and c.credentials.username == "georeg"
    east, node = c.endpoint("eastus"), c.node_url("eastus-1")
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(f"{east}/v2/") as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer realm=")
        async with anonymous.post(f"{east}/v2/open/app/blobs/uploads/") as r:
            assert r.status == 401
        async with anonymous.get(f"{c.management_url}/georeg/v1/cluster") as r:
            assert r.status == 401
        async with anonymous.get(f"{node}/georeg/v1/inventory") as r:
            assert r.status == 401
    async with c.http() as http:
        async with http.get(f"{east}/v2/") as r:
            assert r.status == 200
        async with http.get(f"{c.management_url}/georeg/v1/cluster") as r:
            assert r.status == 401                   # the admin user does not own the cluster
    auth = json.loads(c.login(tmp_path / "auth.json").read_text())["auths"]
    assert set(auth) == set(c.addresses()) and east.removeprefix("http://") in auth


@pytest.mark.georeg_spec({"home_region": "westeurope", "paired_copies": False, "auth": "none"})
async def test_auth_none_is_the_open_cluster(georeg_cluster, tmp_path):
    """The spec's way back to today's open cluster: nothing asks for
    credentials, and the credential API of RunningCluster gives none."""
    c = georeg_cluster
    assert c.credentials is None and c.auth_headers() == {}
    assert c.owner_headers() == {} and c.internal_headers() == {}
    assert json.loads(c.login(tmp_path / "auth.json").read_text()) == {"auths": {}}
    url, node = c.endpoint("westeurope"), c.node_url("westeurope")
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(f"{url}/v2/") as r:
            assert r.status == 200
        await push_image(anonymous, url, "open/app", make_image([500], seed=90), tag="v1")
        async with anonymous.get(f"{c.management_url}/georeg/v1/cluster") as r:
            assert r.status == 200 and (await r.json())["auth"] == "none"
        async with anonymous.get(f"{node}/georeg/v1/inventory") as r:
            assert r.status == 200 and "open/app" in (await r.json())["repositories"]
    login = georeg("login", "--authfile", str(tmp_path / "other.json"), data_dir=c.data_dir)
    assert login.returncode != 0 and "runs without auth" in login.stderr


# -- status and the CLI --------------------------------------------------------------


def test_status_json_reports_every_node_healthy_with_its_endpoints(default_cluster):
    result = georeg("status", "--json", data_dir=default_cluster.data_dir)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    nodes = {n["name"]: n for n in status["nodes"]}
    assert set(nodes) == {"eastus-1", "eastus-2", "eastus-3", "westeurope-1", "westeurope-2",
                          "westeurope-3", "brazilsouth", "southeastasia"}
    for node in nodes.values():
        assert node["healthy"] and node["health"] == "healthy"
        assert node["http"].startswith("http://127.0.0.1:") and node["region"]
    assert nodes["eastus-2"]["zone"] == "2" and nodes["brazilsouth"]["zone"] == ""
    assert set(status["global_endpoints"]) == {"eastus", "westeurope", "brazilsouth", "southeastasia"}
    assert set(status["regional_endpoints"]) == set(status["global_endpoints"])
    assert status["residency"]["confined_regions"] == ["brazilsouth", "southeastasia"]
    assert status["blob_downloads"] == "relay"
    assert [r["status"]["displayStatus"] for r in status["replicas"]] == ["Ready"] * 4
    human = georeg("status", data_dir=default_cluster.data_dir)
    assert human.returncode == 0 and "eastus-1" in human.stdout and "Ready" in human.stdout


def test_the_cli_reaches_its_cluster_directly_whatever_http_proxy_says(default_cluster):
    """A proxy in the environment is for the world outside: `georeg` talks to
    its cluster directly (here the proxy refuses every connection)."""
    dead = "http://127.0.0.1:9"
    result = georeg("status", "--json", data_dir=default_cluster.data_dir,
                    env={"http_proxy": dead, "HTTP_PROXY": dead, "no_proxy": "", "NO_PROXY": ""})
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["nodes"]) == 8


@pytest.mark.interop
async def test_skopeo_push_from_east_us_pull_from_west_europe(default_cluster, tmp_path):
    async with default_cluster.http() as http:
        image = make_image([1 << 20, 300_000, 70_000], seed=41)
        layout = tmp_path / "layout"
        write_oci_layout(layout, image, "v1")
        east = Skopeo(tmp_path / "east", default_cluster.endpoint("eastus").removeprefix("http://"),
                      default_cluster)
        await east.copy(f"oci:{layout}:v1", east.ref("demo/app:v1"), "--preserve-digests")
        status = await replicated(http, default_cluster, "demo/app", "v1")
        assert status["digest"] == image.digest
        by_region = {r["name"]: r for r in status["replicas"]}
        assert by_region["westeurope-1"]["state"] == "present"
        west = Skopeo(tmp_path / "west", default_cluster.endpoint("westeurope").removeprefix("http://"),
                      default_cluster)
        out = tmp_path / "out"
        await west.copy(west.ref("demo/app:v1"), f"oci:{out}:v1", "--preserve-digests")
        index = json.loads((out / "index.json").read_text())
        assert index["manifests"][0]["digest"] == image.digest
        for blob in image.blobs:
            assert (out / "blobs" / "sha256" / digest_of(blob).split(":")[1]).read_bytes() == blob
        # The west european client was served by a west european replica, and
        # status counts what each endpoint routed where.
        async with http.head(f"{default_cluster.endpoint('westeurope')}/v2/demo/app/manifests/v1") as r:
            assert r.headers[REPLICA_HEADER].startswith("westeurope")
        traffic = default_cluster.status()["endpoint_traffic"]
        west_routed = traffic["global:westeurope"]["requests"]
        assert west_routed and all(name.startswith("westeurope") for name in west_routed)
        assert sum(west_routed.values()) >= len(image.blobs) + 2     # blobs, manifest, HEAD
        # Each download was written by the node on the client's connection; the
        # 1 MiB layer's upload went through the kernel (splice).
        assert traffic["global:westeurope"]["handed_over"] == len(image.blobs)
        assert traffic["global:eastus"]["spliced_bytes"] > 0
        assert traffic["global:eastus"]["redirects"] == 0
        human = georeg("status", data_dir=default_cluster.data_dir).stdout
        assert "Endpoint traffic" in human
        west_row = next(line for line in human.splitlines() if "global, clients in westeurope" in line)
        assert "westeurope-" in west_row and "eastus-" not in west_row
        assert west_row.split("│")[5].strip() == str(len(image.blobs))     # downloads handed over


async def test_confined_content_pushed_in_brazil_stays_there(default_cluster):
    async with default_cluster.http() as http:
        image = make_image([5000], seed=42)
        brazil = default_cluster.endpoint("brazilsouth")
        await push_image(http, brazil, "br/only", image, tag="v1")
        status = await replicated(http, default_cluster, "br/only", "v1")
        states = {r["name"]: r["state"] for r in status["replicas"]}
        assert states.pop("brazilsouth") == "present"
        assert set(states.values()) == {"excluded"}
        async with http.get(f"{default_cluster.regional_endpoint('westeurope')}/v2/br/only/manifests/v1") as r:
            assert r.status == 404


async def test_lag_to_southeast_asia_is_never_below_the_modelled_delay(default_cluster):
    async with default_cluster.http() as http:
        wan = default_cluster.spec.wan_model()
        floor_ms = wan.one_way_ms("eastus", "southeastasia")
        image = make_image([200_000], seed=43)
        await push_image(http, default_cluster.regional_endpoint("eastus"), "lag/app", image, tag="v1")
        status = await replicated(http, default_cluster, "lag/app", "v1")
        lags = {r["name"]: r["lag_ms"] for r in status["replicas"] if r["state"] == "present"}
        assert lags["southeastasia"] >= floor_ms, (lags, floor_ms)
        assert lags["westeurope-1"] >= wan.one_way_ms("eastus", "westeurope")
        assert lags["southeastasia"] > lags["westeurope-1"]


def test_repository_commands(default_cluster):
    async def push():
        async with default_cluster.http() as http:
            await push_image(http, default_cluster.endpoint("eastus"), "cli/repo",
                             make_image([100], seed=44), tag="one")
            await push_image(http, default_cluster.endpoint("eastus"), "cli/repo",
                             make_image([101], seed=45), tag="two")
    asyncio.run(push())
    data_dir = default_cluster.data_dir
    listed = georeg("repository", "list", data_dir=data_dir)
    assert listed.returncode == 0 and "cli/repo" in listed.stdout.split()
    tags = georeg("repository", "show-tags", "--name", "cli/repo", data_dir=data_dir)
    assert tags.returncode == 0 and "one" in tags.stdout and "two" in tags.stdout
    deleted = georeg("repository", "delete", "--name", "cli/repo", "--yes", data_dir=data_dir)
    assert deleted.returncode == 0, deleted.stderr
    assert "deleted 2 manifests and 2 tags" in deleted.stdout
    missing = georeg("repository", "show-tags", "--name", "cli/repo", data_dir=data_dir)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


async def test_repository_commands_cover_every_region_confined_ones_too(default_cluster):
    """What is pushed in Brazil South or Southeast Asia never leaves the region
    (residency), so no single node holds the whole registry: `repository list`
    and `show-tags` ask every region and say which holds what, and `delete`
    deletes wherever the repository exists."""
    async with default_cluster.http() as http:
        c = default_cluster
        data_dir = c.data_dir
        in_brazil, in_asia = make_image([2100], seed=80), make_image([2200], seed=81)
        shared_east, shared_brazil = make_image([2300], seed=82), make_image([2400], seed=83)
        await push_image(http, c.regional_endpoint("brazilsouth"), "residency/br", in_brazil, tag="v1")
        await push_image(http, c.regional_endpoint("southeastasia"), "residency/sea", in_asia, tag="v1")
        # The same tag in two regions: eastus's copy reaches every region, then
        # Brazil South re-tags it with content that stays in Brazil South.
        await push_image(http, c.regional_endpoint("eastus"), "residency/shared", shared_east, tag="v1")
        await replicated(http, c, "residency/shared", "v1")
        await push_image(http, c.regional_endpoint("brazilsouth"), "residency/shared", shared_brazil,
                         tag="v1")

        human = georeg("repository", "list", data_dir=data_dir)
        assert human.returncode == 0, human.stderr
        listed_names = [line.split()[0] for line in human.stdout.splitlines()]
        assert {"residency/br", "residency/sea", "residency/shared"} <= set(listed_names)
        assert listed_names[0] == "REPOSITORY" and human.stdout.split()[1] == "REGIONS"
        row = next(line for line in human.stdout.splitlines() if line.startswith("residency/br "))
        assert row.split()[1:] == ["brazilsouth"]
        listed = georeg("repository", "list", "--json", data_dir=data_dir)
        assert listed.returncode == 0, listed.stderr
        answer = json.loads(listed.stdout)
        regions = {r["name"]: r["regions"] for r in answer["repositories"]}
        assert regions["residency/br"] == ["brazilsouth"]
        assert regions["residency/sea"] == ["southeastasia"]
        assert regions["residency/shared"] == ["eastus", "westeurope", "brazilsouth", "southeastasia"]
        assert answer["unavailable"] == []

        tags = georeg("repository", "show-tags", "--name", "residency/br", data_dir=data_dir)
        assert tags.returncode == 0, tags.stderr
        assert in_brazil.digest in tags.stdout and "brazilsouth" in tags.stdout
        shown = georeg("repository", "show-tags", "--name", "residency/shared", "--json",
                       data_dir=data_dir)
        assert shown.returncode == 0, shown.stderr
        [v1] = json.loads(shown.stdout)["tags"]
        assert v1["name"] == "v1" and not v1["agreed"]
        assert v1["digests"] == {shared_east.digest: ["eastus", "westeurope", "southeastasia"],
                                 shared_brazil.digest: ["brazilsouth"]}
        assert v1["digest"] == shared_east.digest      # what most regions resolve
        human = georeg("repository", "show-tags", "--name", "residency/shared", data_dir=data_dir)
        assert "v1 resolves to different digests" in " ".join(human.stdout.split())

        deleted = georeg("repository", "delete", "--name", "residency/sea", "--yes", data_dir=data_dir)
        assert deleted.returncode == 0, deleted.stderr
        assert "deleted 1 manifest and 1 tag from residency/sea in southeastasia" in deleted.stdout
        gone = georeg("repository", "show-tags", "--name", "residency/sea", data_dir=data_dir)
        assert gone.returncode == 2 and "does not exist" in gone.stderr
        # Both images of the shared repository go: eastus's wherever it replicated,
        # Brazil South's where it lives. Every region is asked at once, so East
        # US's replicated deletes land in Brazil South between its own deletes'
        # commits, in any order (test_repository_delete_race orders them all):
        # Brazil South answers (202), whatever it found gone meanwhile.
        deleted = georeg("repository", "delete", "--name", "residency/shared", "--yes",
                         data_dir=data_dir)
        assert deleted.returncode == 0, deleted.stderr
        assert "deleted 2 manifests and 1 tag from residency/shared" in deleted.stdout
        assert "brazilsouth" in deleted.stdout.split(" in ", 1)[1]
        for region in ("eastus", "westeurope", "brazilsouth", "southeastasia"):
            await eventually(lambda r=region: _repository_gone(http, c.regional_endpoint(r),
                                                               "residency/shared"),
                             timeout=10, what=f"residency/shared gone from {region}")


async def _repository_gone(http, url: str, repo: str) -> bool:
    async with http.get(f"{url}/v2/{repo}/tags/list") as r:
        return r.status == 404


# -- routing: failover ---------------------------------------------------------------


async def _served_by(http: aiohttp.ClientSession, endpoint: str) -> str:
    async with http.get(f"{endpoint}/v2/") as r:
        return r.headers.get(REPLICA_HEADER, "") if r.status == 200 else f"HTTP {r.status}"


BREAKABLE = specs.parse({"home_region": "eastus", "home_zone_redundant": True,
                         "replicas": [{"region": "westeurope"}, {"region": "brazilsouth"}]})


@pytest.fixture(scope="module")
def _breakable(tmp_path_factory):
    with RunningCluster(BREAKABLE, tmp_path_factory.mktemp("breakable")) as running:
        yield running


@pytest.fixture
def breakable_cluster(_breakable):
    """A cluster the test may break (crash a region, take it out of routing):
    one per module, made whole again before each test — every node it crashed
    restarted, every region back in routing, every node healthy, subscribed
    to its peers and writable — which costs a fraction of a new cluster."""
    c = _breakable
    for name, node in c.cluster.supervisor.nodes.items():
        if node.pid is None:
            c.restart(name)
    for replica in c.cluster.spec.all_replicas:
        if not replica.global_routing:
            c.set_routing(replica.region, True)
    c.run(c.cluster.wait_ready)
    return c


@pytest.fixture
def growing_cluster(tmp_path):
    """The breakable cluster's topology, for a test of its own: one that adds a
    replica, which would stay."""
    with RunningCluster(BREAKABLE, tmp_path / "c") as running:
        yield running


async def test_failover_when_routing_is_disabled_and_when_the_region_dies(breakable_cluster):
    async with breakable_cluster.http() as http:
        c = breakable_cluster
        east = c.endpoint("eastus")
        assert (await _served_by(http, east)).startswith("eastus")
        c.set_routing("eastus", False)
        # Routing moved before set_routing returned: the very next request goes to
        # the next nearest replica, with no error.
        assert (await _served_by(http, east)).startswith("westeurope")
        # Out of routing, the replica keeps serving its regional endpoint and syncing.
        assert (await _served_by(http, c.regional_endpoint("eastus"))).startswith("eastus")
        c.set_routing("eastus", True)
        assert (await _served_by(http, east)).startswith("eastus")
        for zone in ("1", "2", "3"):
            c.crash(f"eastus-{zone}")
        # The supervisor saw every crash before crash() returned: the very next
        # request fails over, with no error.
        assert (await _served_by(http, east)).startswith("westeurope")
        async with http.get(f"{c.regional_endpoint('eastus')}/v2/") as r:
            assert r.status == 503
            assert (await r.json())["errors"][0]["code"] == "UNAVAILABLE"


async def test_an_upload_in_flight_survives_routing_moving(breakable_cluster):
    """POST and first chunk through East US, routing moves to West Europe, the rest of
    the upload and the manifest still succeed: never MANIFEST_BLOB_UNKNOWN."""
    async with breakable_cluster.http() as http:
        c = breakable_cluster
        east = c.endpoint("eastus")
        image = make_image([3 * 65536 + 17], seed=46)
        layer, config = image.layers[0], image.config
        async with http.post(f"{east}/v2/moving/app/blobs/uploads/") as r:
            assert r.status == 202
            location = r.headers["Location"]
            began_on = r.headers[REPLICA_HEADER]
        assert began_on.startswith("eastus")
        async with http.patch(f"{east}{location}", data=layer[:65536],
                              headers={"Content-Range": f"0-{65535}"}) as r:
            assert r.status == 202
        c.set_routing("eastus", False)
        assert (await _served_by(http, east)).startswith("westeurope")   # routing moved
        async with http.patch(f"{east}{location}", data=layer[65536:],
                              headers={"Content-Range": f"65536-{len(layer) - 1}"}) as r:
            assert r.status == 202 and r.headers[REPLICA_HEADER] == began_on
        async with http.put(f"{east}{location}", params={"digest": digest_of(layer)}) as r:
            assert r.status == 201
        async with http.post(f"{east}/v2/moving/app/blobs/uploads/", params={"digest": digest_of(config)},
                             data=config) as r:
            assert r.status == 201 and r.headers[REPLICA_HEADER].startswith("westeurope")
        async with http.put(f"{east}/v2/moving/app/manifests/v1", data=image.manifest,
                            headers={"Content-Type": image.media_type}) as r:
            assert r.status == 201, await r.text()   # the layer came from East US on demand


async def test_home_region_down_blocks_management_not_data(breakable_cluster):
    async with breakable_cluster.http() as http:
        c = breakable_cluster
        for zone in ("1", "2", "3"):
            c.crash(f"eastus-{zone}")
        await eventually(lambda: not any(n["healthy"] for n in c.status()["nodes"]
                                         if n["region"] == "eastus"), timeout=10, what="eastus down")
        result = georeg("replication", "update", "--name", "westeurope",
                        "--global-endpoint-routing", "false", data_dir=c.data_dir)
        assert result.returncode == 2
        assert "home region eastus holds the control plane" in result.stderr
        image = make_image([800], seed=47)
        west = c.endpoint("westeurope")
        await push_image(http, west, "during/outage", image, tag="v1")
        async with http.get(f"{c.endpoint('brazilsouth')}/v2/during/outage/manifests/v1") as r:
            assert r.status == 200 and await r.read() == image.manifest


# -- replicas created while running ----------------------------------------------------


async def test_replication_create_syncs_existing_content_with_visible_progress(growing_cluster):
    async with growing_cluster.http() as http:
        c = growing_cluster
        images = [make_image([150_000, 2000], seed=50 + i) for i in range(4)]
        for i, image in enumerate(images):
            await push_image(http, c.endpoint("eastus"), "sync/app", image, tag=f"v{i}")
        result = georeg("replication", "create", "--location", "japaneast", "--wait",
                        data_dir=c.data_dir, timeout=180)
        assert result.returncode == 0, result.stderr
        show = georeg("replication", "show", "--name", "japaneast", data_dir=c.data_dir)
        assert show.returncode == 0, show.stderr
        shown = json.loads(show.stdout)
        assert shown["status"]["displayStatus"] == "Ready"
        done, total = shown["sync"]["images"]
        assert total >= len(images) and done == total
        japan = c.node_url("japaneast")
        for i, image in enumerate(images):
            async with http.get(f"{japan}/v2/sync/app/manifests/v{i}") as r:
                assert r.status == 200 and await r.read() == image.manifest
        listed = georeg("replication", "list", data_dir=c.data_dir)
        assert "japaneast" in listed.stdout
        # The new replica has its endpoints and takes part in replication both ways.
        later = make_image([999], seed=60)
        await push_image(http, c.endpoint("japaneast"), "sync/app", later, tag="late")
        await eventually(lambda: _has(http, c.node_url("westeurope"), "sync/app", "late"), timeout=20)


async def _has(http, url, repo, tag) -> bool:
    async with http.head(f"{url}/v2/{repo}/manifests/{tag}") as r:
        return r.status == 200


@pytest.mark.interop
@pytest.mark.georeg_spec({"home_region": "westeurope", "replicas": [{"region": "northeurope"}],
                          "blob_downloads": "redirect"})
async def test_skopeo_pulls_through_endpoints_that_redirect_blob_downloads(georeg_cluster,
                                                                          tmp_path):
    """With blob_downloads = "redirect" on a cluster with auth (the default), blob
    downloads through an endpoint are 307s to the node routing chose (as ACR's
    are), answered by that node once it has checked the credentials, with a
    grant in the URL: a real client, which sends its credentials to the host
    it logged in to only, follows them."""
    async with georeg_cluster.http() as http:
        image = make_image([1 << 20, 300_000], seed=43)
        layout = tmp_path / "layout"
        write_oci_layout(layout, image, "v1")
        west = Skopeo(tmp_path / "west", georeg_cluster.endpoint("westeurope").removeprefix("http://"),
                      georeg_cluster)
        await west.copy(f"oci:{layout}:v1", west.ref("data/app:v1"), "--preserve-digests")
        north_node = georeg_cluster.node_url("northeurope")
        await eventually(lambda: _has(http, north_node, "data/app", "v1"), timeout=30,
                         what="data/app:v1 in northeurope")
        north = georeg_cluster.endpoint("northeurope")
        layer = digest_of(image.blobs[0])
        async with http.get(f"{north}/v2/data/app/blobs/{layer}", allow_redirects=False) as r:
            assert r.status == 307 and r.headers[REPLICA_HEADER] == "northeurope"
            location = r.headers["Location"]
        assert location.startswith(f"{north_node}/v2/data/app/blobs/{layer}?expires=")
        # The Location works without credentials: its grant is the credential.
        async with aiohttp.ClientSession() as anonymous:
            async with anonymous.get(location) as r:
                assert r.status == 200 and await r.read() == image.blobs[0]
        status = georeg_cluster.status()
        assert status["blob_downloads"] == "redirect"
        traffic = status["endpoint_traffic"]["global:northeurope"]
        assert traffic["redirects"] == 1 and traffic["requests"] == {"northeurope": 1}
        puller = Skopeo(tmp_path / "north", north.removeprefix("http://"), georeg_cluster)
        out = tmp_path / "out"
        await puller.copy(puller.ref("data/app:v1"), f"oci:{out}:v1", "--preserve-digests")
        for blob in image.blobs:
            assert (out / "blobs" / "sha256" / digest_of(blob).split(":")[1]).read_bytes() == blob
        # skopeo's downloads (config and layers) were redirected, not relayed.
        traffic = georeg_cluster.status()["endpoint_traffic"]["global:northeurope"]
        assert traffic["redirects"] == 1 + len(image.blobs)
        assert traffic["spliced_bytes"] == 0


@pytest.mark.georeg_spec({"home_region": "westeurope", "replicas": [{"region": "northeurope"}],
                          "blob_downloads": "redirect"})
async def test_an_anonymous_blob_get_through_a_redirecting_endpoint_is_challenged_not_redirected(
        georeg_cluster):
    """On a cluster with auth the endpoint decides no access, so it answers no
    redirect itself: the node does, after its access chain. Without
    credentials that is ACR's 401 challenge (realm on the endpoint), for a
    blob that exists as for one that does not; and the grant a redirect
    carries reaches no log."""
    north = georeg_cluster.endpoint("northeurope")
    image = make_image([5000], seed=44)
    layer = digest_of(image.layers[0])
    async with georeg_cluster.http() as http:
        await push_image(http, north, "data/app", image, tag="v1")
    async with aiohttp.ClientSession() as anonymous:
        for digest in (layer, digest_of(b"not stored")):
            async with anonymous.get(f"{north}/v2/data/app/blobs/{digest}",
                                     allow_redirects=False) as r:
                assert r.status == 401 and "Location" not in r.headers
                challenge = r.headers["WWW-Authenticate"]
                assert challenge.startswith(f'Bearer realm="{north}/oauth2/token"')
                assert 'scope="repository:data/app:pull"' in challenge
                assert (await r.json())["errors"][0]["code"] == "UNAUTHORIZED"
    traffic = georeg_cluster.status()["endpoint_traffic"]["global:northeurope"]
    assert traffic["redirects"] == 0
    async with georeg_cluster.http() as http:
        async with http.get(f"{north}/v2/data/app/blobs/{layer}", allow_redirects=False) as r:
            assert r.status == 307 and r.headers[REPLICA_HEADER] == "northeurope"
            location = r.headers["Location"]
    assert georeg_cluster.status()["endpoint_traffic"]["global:northeurope"]["redirects"] == 1
    signature = dict(parse_qsl(urlsplit(location).query))["signature"]
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(location) as r:
            assert r.status == 200 and await r.read() == image.layers[0]
        async with anonymous.get(location.replace(signature, signature[::-1])) as r:
            assert r.status == 401
    logs = list((georeg_cluster.data_dir / "logs").iterdir())
    assert any(p.name.startswith("northeurope") for p in logs)
    assert not [p.name for p in logs if signature in p.read_text(errors="replace")]


@pytest.mark.georeg_spec({"home_region": "westeurope", "replicas": [{"region": "northeurope"}]})
async def test_a_relaying_endpoint_hands_over_no_download_marked_for_a_redirect(georeg_cluster):
    """blob_downloads = "relay" (the default) hands blob downloads over to the
    node; one that asks for a redirect itself is declined there and answered by
    the node's HTTP chain, which authenticates it first: a client gets nothing
    its credentials would not read."""
    north = georeg_cluster.endpoint("northeurope")
    image = make_image([5000], seed=45)
    url = f"{north}/v2/data/app/blobs/{digest_of(image.layers[0])}"
    mark = {"X-Georeg-Redirect": "127.0.0.1"}
    async with georeg_cluster.http() as http:
        await push_image(http, north, "data/app", image, tag="v1")
        async with http.get(url) as r:              # handed over, as always
            assert r.status == 200 and await r.read() == image.layers[0]
        handed = georeg_cluster.status()["endpoint_traffic"]["global:northeurope"]["handed_over"]
        assert handed >= 1
        async with http.get(url, headers=mark, allow_redirects=False) as r:
            assert r.status == 307 and r.headers[REPLICA_HEADER] == "northeurope"
            location = r.headers["Location"]
        assert location.startswith(georeg_cluster.node_url("northeurope") + "/v2/data/app/")
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(url, headers=mark, allow_redirects=False) as r:
            assert r.status == 401
        async with anonymous.get(location) as r:
            assert r.status == 200 and await r.read() == image.layers[0]
    traffic = georeg_cluster.status()["endpoint_traffic"]["global:northeurope"]
    assert traffic["handed_over"] == handed and traffic["redirects"] == 0


def test_down_counts_an_unreaped_supervisor_as_stopped():
    """`georeg down` waits for the supervisor to exit; where init does not reap
    (a container whose first process is a shell) it stays a zombie."""
    child = subprocess.Popen(["true"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)   # exited, left unreaped
        assert Path(f"/proc/{child.pid}/stat").exists()          # a zombie, signal 0 finds it
        assert not _running(child.pid)
        assert _running(os.getpid())
    finally:
        child.wait()


def test_up_detached_prints_its_endpoints_and_down_leaves_nothing_running(tmp_path):
    config = tmp_path / "spec.toml"
    config.write_text('home_region = "westeurope"\npaired_copies = false\n'
                      '[[replicas]]\nregion = "northeurope"\n'
                      "[network]\nport_base = 0\n")        # any free range
    data = tmp_path / "data"
    up = georeg("up", "--detach", "--config", str(config), "--seed", "4242", data_dir=data)
    try:
        assert up.returncode == 0, up.stderr
        assert "2/2 nodes healthy in" in up.stdout and "replicating and ready in" in up.stdout
        # Auth on by default: what a first-time user needs to get in, and the next command.
        password = json.loads(admin_passwords_path(data).read_text())["password"][-1]
        assert f"username georeg, password {password}" in up.stdout
        assert f"georeg login --data-dir {data.resolve()}" in up.stdout
        # The password goes to skopeo on stdin (echo is the shell's: never in ps).
        assert (f"echo {password} | skopeo login --tls-verify=false -u georeg --password-stdin "
                f"127.0.0.1:") in up.stdout
        # The seed its links draw from, printed so that the run can be replayed.
        assert "WAN links seeded with 4242 (`georeg up --seed 4242`" in up.stdout
        status = json.loads(georeg("status", "--json", data_dir=data).stdout)
        assert status["seed"] == 4242
        # The range it got, shown and kept: the first global endpoint at its base.
        base = saved_spec(data).network.port_base
        assert base > 0 and status["global_endpoints"]["westeurope"] == f"http://127.0.0.1:{base}"
        assert status["global_endpoints"]["westeurope"] in up.stdout
        assert all(n["healthy"] for n in status["nodes"])
        startup = status["startup_s"]
        assert 0 < startup["healthy"] <= startup["ready"]
        pids = [n["pid"] for n in status["nodes"]]
    finally:
        down = georeg("down", data_dir=data)
    assert down.returncode == 0, down.stderr
    assert "stopped the cluster" in down.stdout
    assert not any(_running(pid) for pid in pids)
    # Resumed from its data dir, it serves where it did: the base it got is
    # the spec's now.
    again = georeg("up", "--detach", data_dir=data)
    try:
        assert again.returncode == 0, again.stderr
        assert saved_spec(data).network.port_base == base
        status = json.loads(georeg("status", "--json", data_dir=data).stdout)
        assert status["global_endpoints"]["westeurope"] == f"http://127.0.0.1:{base}"
    finally:
        assert georeg("down", data_dir=data).returncode == 0


# -- ports ---------------------------------------------------------------------------

TWO_NODES = {"home_region": "westeurope", "replicas": [{"region": "northeurope"}],
             "paired_copies": False}


def _held(port: int, *, reuse_port: bool = False) -> socket.socket:
    """``port`` listened on by something else, as another cluster's gRPC server
    (which sets SO_REUSEPORT) or any other program would."""
    sock = socket.socket()
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def _bases_after(first: int, spec, count: int = 8) -> list[int]:
    """Other ranges to try after ``first``, none overlapping it: any one of
    them may hold a port another process happens to be using."""
    others = (b for b in any_port_bases(spec) if abs(b - first) > 3000)
    return [next(others) for _ in range(count)]


async def test_a_cluster_on_any_ports_moves_past_a_port_a_node_finds_taken(tmp_path):
    """The range first tried has a node's replication port held by another
    process (which set SO_REUSEPORT, as every gRPC server does): that node must
    fail to listen, not share the port, and the cluster starts on a later
    range, says so in its spec, and works."""
    spec = specs.parse({**TWO_NODES, "network": {"port_base": 0}})
    # The first free-looking range whose replication port this test can hold:
    # on a machine shared with other suites, another process may take the
    # port between the range's choice and the bind (a bounded few tries).
    for first, _ in zip(any_port_bases(spec), range(10), strict=False):
        taken = plan(spec.seeded(1).with_port_base(first), tmp_path).node("westeurope").grpc_port
        try:
            holder = _held(taken, reuse_port=True)
        except OSError:
            continue
        break
    else:
        pytest.fail("no free-looking range had its replication port free to hold")
    later = _bases_after(first, spec)
    with holder:
        cluster = await Cluster.start(spec, tmp_path / "c", port_bases=[first, *later])
        try:
            chosen = cluster.spec.network.port_base
            assert chosen in later
            assert saved_spec(tmp_path / "c").network.port_base == chosen
            log = (tmp_path / "c" / "logs" / "westeurope.log").read_text()
            assert f"cannot listen for replication on 127.0.0.1:{taken}" in log
            image = make_image([1000], seed=80)
            async with await cluster_http(cluster) as http:
                await push_image(http, cluster.node_url("westeurope"), "ports/app", image,
                                 tag="v1")
                await eventually(lambda: _has(http, cluster.node_url("northeurope"), "ports/app",
                                              "v1"),
                                 timeout=30, what="ports/app:v1 in northeurope")
        finally:
            await cluster.stop()


async def test_a_cluster_on_given_ports_refuses_to_start_when_one_is_taken(tmp_path):
    """A base the spec names is kept or the start fails, saying which port and
    what to do; the port is found binding it, before anything is written."""
    spec = specs.parse(TWO_NODES).with_port_base(next(any_port_bases(specs.parse(TWO_NODES))))
    taken = specs.port_layout(spec).management
    with _held(taken):
        with pytest.raises(PortInUse) as refused:
            await Cluster.start(spec, tmp_path / "c")
        assert f"port {taken} (management API) is in use" in str(refused.value)
        assert "set another port_base (0: any free range)" in str(refused.value)
        assert list((tmp_path / "c").iterdir()) == []
        # Left to choose, but offered only that range: no free range.
        with pytest.raises(PortInUse, match="no free range"):
            await Cluster.start(spec.with_port_base(0), tmp_path / "d",
                                port_bases=[spec.network.port_base])


# -- the pytest plugin ---------------------------------------------------------------


@pytest.mark.georeg_spec({"home_region": "westeurope", "home_zone_redundant": True,
                          "paired_copies": False, "blob_downloads": "redirect", "seed": 2024,
                          "replicas": [{"region": "northeurope", "global_routing": False}],
                          "network": {"client_locations": ["northeurope", "japaneast"]}})
def test_the_pytest_plugin_gives_a_cluster_built_from_the_marker(georeg_cluster):
    """Every key of the marker shapes the cluster the fixture started, and
    content pushed through its endpoint really replicates (a sync test: the
    plugin serves those as well as async ones)."""
    status = georeg_cluster.status()
    assert status["home_region"] == "westeurope" and status["seed"] == 2024
    assert status["blob_downloads"] == "redirect"
    assert {n["name"]: n["zone"] for n in status["nodes"]} == {
        "westeurope-1": "1", "westeurope-2": "2", "westeurope-3": "3", "northeurope": ""}
    assert status["paired_copies"] == []
    assert set(status["global_endpoints"]) == {"northeurope", "japaneast"}
    replicas = {r["name"]: r for r in status["replicas"]}
    assert replicas["westeurope"]["zoneRedundancy"] == "Enabled"
    assert replicas["northeurope"]["regionEndpointEnabled"] is False
    north = georeg_cluster.endpoint("northeurope")
    image = make_image([123, 45_678], seed=70)

    async def push_through_the_endpoint() -> None:
        async with georeg_cluster.http() as http:
            # A client in northeurope is routed to westeurope: its own region's
            # replica is out of global routing.
            assert (await _served_by(http, north)).startswith("westeurope-")
            await push_image(http, north, "plugin/app", image, tag="v1")
            for node in ("westeurope-1", "westeurope-2", "westeurope-3", "northeurope"):
                url = georeg_cluster.node_url(node)
                await eventually(lambda u=url: _has(http, u, "plugin/app", "v1"), timeout=30,
                                 what=f"plugin/app:v1 on {node}")
                async with http.get(f"{url}/v2/plugin/app/manifests/v1") as r:
                    assert r.status == 200 and await r.read() == image.manifest
                for blob in image.blobs:
                    async with http.get(f"{url}/v2/plugin/app/blobs/{digest_of(blob)}") as r:
                        assert r.status == 200 and await r.read() == blob
            # Blob downloads through the endpoint are redirected to a node.
            layer = digest_of(image.layers[1])
            async with http.get(f"{north}/v2/plugin/app/blobs/{layer}",
                                allow_redirects=False) as r:
                assert r.status == 307 and r.headers[REPLICA_HEADER].startswith("westeurope-")

    asyncio.run(push_through_the_endpoint())
    assert georeg_cluster.status()["endpoint_traffic"]["global:northeurope"]["redirects"] == 1


def test_bench_footprint_reads_memory_at_rest_and_after_a_workload():
    """`georeg bench footprint --after-images`: the workload really runs through
    the global endpoints (every pulled blob is checked against its digest) and
    every node's memory is read at rest and after it. Figures are reported by
    the benchmark, never asserted here."""
    from cluster.bench import footprint
    from cluster.testing import SMALL_SPEC

    result = asyncio.run(footprint.measure(SMALL_SPEC, repeat=1, idle_s=0.5, after_images=4,
                                           settle_s=0.0))
    nodes = set(result["rss"]) - {"supervisor"}
    assert nodes and set(result["after"]["rss"]) == nodes
    assert result["after"]["images"] == 4 and result["after"]["workload_s"] > 0
    assert all(rss > 0 for rss in result["after"]["rss"].values())
