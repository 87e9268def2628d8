"""Registry configuration (``registry_node.configuration``): every node holds
it, replication and anti-entropy carry it everywhere (confined regions
included), last writer wins by stamp with tombstones, an acknowledged write
survives SIGKILL, bad input is a 4xx, and writes go only through a reachable
home region (``Cluster``, the management API, ``georeg registry``)."""

from __future__ import annotations

import asyncio
import itertools
import json
import urllib.request

import aiohttp
import msgspec
import pytest

from cluster.control import management_client
from cluster.testing import SMALL_SPEC, RunningCluster
from registry_node.config import NodeConfig
from registry_node.configuration import Kind, RegistryProperties, check_name
from registry_node.errors import RegistryError
from registry_node.node import Node
from registry_node.records import Event, EventKind, encode

from .helpers import eventually
from .replication_harness import InProcessCluster
from .test_cluster import georeg

TOPOLOGY = [("eastus", "1"), ("eastus", "2"), ("eastus", "3"), ("westeurope", ""),
            ("brazilsouth", "")]
CONF = "/georeg/v1/configuration"


@pytest.fixture
async def cluster(tmp_path):
    async with InProcessCluster(tmp_path, TOPOLOGY) as c:
        yield c


async def put(http: aiohttp.ClientSession, url: str, path: str, value: object) -> dict:
    async with http.put(f"{url}{CONF}/{path}", json=value) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def held(http: aiohttp.ClientSession, url: str, kind: str, name: str) -> dict | None:
    """The register ``kind/name`` as the node holds it, tombstone included; None if absent."""
    async with http.get(f"{url}{CONF}/{kind}") as r:
        assert r.status == 200, await r.text()
        for obj in (await r.json())["objects"]:
            if obj["name"] == name:
                return obj
    return None


def same_register(a: dict | None, b: dict) -> bool:
    return a is not None and all(a[k] == b[k] for k in ("value", "deleted", "stamp"))


def stamp(obj: dict) -> tuple:
    s = obj["stamp"]
    return (s["hlc"], s["region"], s["zone"])


# -- replication --------------------------------------------------------------------------


async def test_a_write_at_home_reaches_every_node_confined_regions_included(cluster, http):
    before = {n.name: n.node.configuration.generation for n in cluster.nodes.values()}
    stored = await put(http, cluster.nodes["eastus-1"].url, "registry/default",
                       {"admin_enabled": True})
    # Every other field with its default (policies added later included).
    assert stored["value"] == {**msgspec.json.decode(msgspec.json.encode(RegistryProperties())),
                               "admin_enabled": True}
    assert stamp(stored)[1:] == ("eastus", "1")
    for node in cluster.nodes.values():
        await eventually(lambda n=node: held(http, n.url, "registry", "default"),
                         timeout=15, what=f"the registry object on {node.name}")
        assert same_register(await held(http, node.url, "registry", "default"), stored)
        config = node.node.configuration
        assert config.get("registry", "default") == RegistryProperties(admin_enabled=True)
        assert config.items("registry") == [("default", RegistryProperties(admin_enabled=True))]
        assert config.generation > before[node.name]


async def test_configuration_written_in_a_confined_home_region_reaches_every_region(cluster, http):
    """A registry homed in Brazil South writes its configuration there; residency
    keeps Brazil South's *content* home, never the registry's configuration."""
    stored = await put(http, cluster.nodes["brazilsouth"].url, "registry/default",
                       {"anonymous_pull_enabled": True})
    for node in cluster.nodes.values():
        await eventually(lambda n=node: held(http, n.url, "registry", "default"),
                         timeout=15, what=f"Brazil South's configuration on {node.name}")
        assert same_register(await held(http, node.url, "registry", "default"), stored)


async def test_the_later_of_two_concurrent_writes_wins_everywhere(cluster, http):
    """Two writes made on either side of a partition: once it heals, every
    node holds the one with the larger stamp, whichever it applied first."""
    cluster.isolate("westeurope")
    one = await put(http, cluster.nodes["eastus-1"].url, "registry/default", {"admin_enabled": True})
    two = await put(http, cluster.nodes["westeurope"].url, "registry/default",
                    {"anonymous_pull_enabled": True})
    await eventually(lambda: held(http, cluster.nodes["brazilsouth"].url, "registry", "default"),
                     timeout=15, what="the home write in brazilsouth")
    assert same_register(await held(http, cluster.nodes["westeurope"].url, "registry", "default"),
                         two)
    winner = max(one, two, key=stamp)
    cluster.heal()
    for node in cluster.nodes.values():
        await eventually(
            lambda n=node: _holds(http, n.url, winner), timeout=20,
            what=f"the later write on {node.name}")


async def _holds(http, url: str, expected: dict) -> bool:
    return same_register(await held(http, url, expected["kind"], expected["name"]), expected)


async def test_a_delete_replicates_as_a_tombstone(cluster, http):
    home = cluster.nodes["eastus-2"].url
    await put(http, home, "registry/default", {"admin_enabled": True})
    async with http.delete(f"{home}{CONF}/registry/default") as r:
        assert r.status == 200
        tombstone = await r.json()
    assert tombstone["deleted"] and tombstone["value"] is None
    for node in cluster.nodes.values():
        await eventually(lambda n=node: _holds(http, n.url, tombstone), timeout=15,
                         what=f"the tombstone on {node.name}")
        assert node.node.configuration.get("registry", "default") is None
        assert node.node.configuration.items("registry") == []
        async with http.get(f"{node.url}{CONF}/registry/default") as r:
            assert r.status == 404


async def test_a_partitioned_region_converges_when_the_partition_heals(cluster, http):
    cluster.isolate("brazilsouth")
    stored = await put(http, cluster.nodes["eastus-1"].url, "registry/default",
                       {"admin_enabled": True})
    await eventually(lambda: _holds(http, cluster.nodes["westeurope"].url, stored), timeout=15,
                     what="the write in westeurope")
    assert await held(http, cluster.nodes["brazilsouth"].url, "registry", "default") is None
    cluster.heal()
    await eventually(lambda: _holds(http, cluster.nodes["brazilsouth"].url, stored), timeout=20,
                     what="the write in brazilsouth after the heal")


async def test_anti_entropy_carries_configuration_the_log_did_not(cluster, http):
    """With brazilsouth's log subscriptions gone, only anti-entropy (every
    second here) can bring it a write: it must."""
    brazil = cluster.nodes["brazilsouth"]
    for task in brazil.replication._tasks.values():
        task.cancel()
    await eventually(lambda: all(t.done() for t in brazil.replication._tasks.values()),
                     what="brazilsouth's subscriptions ended")
    repaired = brazil.replication.anti_entropy.repaired
    stored = await put(http, cluster.nodes["eastus-1"].url, "registry/default",
                       {"anonymous_pull_enabled": True})
    await eventually(lambda: _holds(http, brazil.url, stored), timeout=20,
                     what="anti-entropy bringing the write to brazilsouth")
    assert brazil.replication.anti_entropy.repaired > repaired


# -- last writer wins, delete vs set (the store alone) -----------------------------------


def _event(kind: EventKind, hlc: int, **value) -> Event:
    return Event(kind=kind, repository="", origin_region="eastus", origin_zone="1", hlc=hlc,
                 config_kind="registry", config_name="default",
                 config_value=encode(RegistryProperties(**value)) if kind is EventKind.CONFIG_SET
                 else b"")


SET_OLD = _event(EventKind.CONFIG_SET, 100, admin_enabled=True)
DELETE = _event(EventKind.CONFIG_DELETE, 200)
SET_BEFORE_DELETE = _event(EventKind.CONFIG_SET, 150, anonymous_pull_enabled=True)
SET_NEW = _event(EventKind.CONFIG_SET, 300, admin_enabled=True, anonymous_pull_enabled=True)


def _final(tmp_path, order) -> tuple:
    node = Node.open(NodeConfig(data_dir=tmp_path, port=0, region="westeurope"))
    try:
        config = node.configuration
        for event in order:
            config.apply(event)
            generation = config.generation
            assert config.apply(event) is None            # twice is a no-op...
            assert config.generation == generation       # ...that changes nothing
        [register] = config.registers("registry")
        return register.deleted, register.stamp, config.get("registry", "default")
    finally:
        node.close()


@pytest.mark.parametrize("with_newer_set", [False, True])
def test_a_delete_wins_over_older_sets_and_loses_to_a_newer_one_in_any_order(tmp_path,
                                                                             with_newer_set):
    events = [SET_OLD, DELETE, SET_BEFORE_DELETE] + ([SET_NEW] if with_newer_set else [])
    outcomes = {_final(tmp_path / str(i), order)
                for i, order in enumerate(itertools.permutations(events))}
    if with_newer_set:
        assert outcomes == {(False, (300, "eastus", "1"),
                             RegistryProperties(admin_enabled=True, anonymous_pull_enabled=True))}
    else:
        assert outcomes == {(True, (200, "eastus", "1"), None)}


def test_object_names_are_checked_before_they_become_keys():
    token = Kind("token", RegistryProperties)
    for good in ("a", "ci-token", "_repositories_pull", "v1.2", "x" * 64):
        assert check_name(token, good) == good
    for bad in ("", ".", "..", "../etc", "a/b", "x" * 65, "-a", ".hidden", "a\x00b", "é"):
        with pytest.raises(RegistryError) as refused:
            check_name(token, bad)
        assert refused.value.status == 400


# -- one node: durability and bad input ----------------------------------------------------


async def test_an_acknowledged_write_survives_sigkill(node_process, http):
    proc = node_process("conf")
    stored = await put(http, proc.url, "registry/default", {"admin_enabled": True})
    proc.kill()                                     # SIGKILL right after the acknowledgement
    proc.start()
    assert same_register(await held(http, proc.url, "registry", "default"), stored)


BAD_REQUESTS = [
    ("PUT", "/nosuchkind/x", {"a": 1}, 404),
    ("GET", "/nosuchkind", None, 404),
    ("GET", "/nosuchkind/x", None, 404),
    ("PUT", "/registry/other", {}, 400),                            # a singleton has one name
    ("PUT", "/registry/" + "x" * 300, {}, 400),                     # oversize name
    ("PUT", "/registry/..%2F..%2Fmeta", {}, 400),                   # traversal
    ("PUT", "/registry/%2e%2e", {}, 404),                           # resolves to no route
    ("PUT", "/registry/a%00b", {}, 400),
    ("PUT", "/..%2Fmeta/hlc", {}, 404),
    ("PUT", "/registry/default", {"admin_enabled": "yes"}, 400),    # wrong type
    ("PUT", "/registry/default", {"admin_enabled": 1}, 400),
    ("PUT", "/registry/default", {"bogus": True}, 400),             # unknown field
    ("PUT", "/registry/default", {"sku": "Gold"}, 400),             # no such tier
    ("PUT", "/registry/default", [True], 400),                      # not an object
    ("PUT", "/registry/default", b"{not json", 400),
    ("PUT", "/registry/default", b"\xff\xfe", 400),
    ("PUT", "/registry/default", {"admin_enabled": True, "x": "y" * 70000}, 413),
    ("DELETE", "/registry/default", None, 404),                     # nothing to delete
    ("DELETE", "/nosuchkind/x", None, 404),
]


async def test_bad_input_is_refused_with_a_4xx_and_stores_nothing(node, http):
    config = node.node.configuration
    for method, path, body, status in BAD_REQUESTS:
        data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None
                                                     else None)
        async with http.request(method, f"{node.url}{CONF}{path}", data=data) as r:
            text = await r.text()
            assert r.status == status, (method, path, r.status, text)
            assert json.loads(text)["errors"][0]["code"], text   # the registry's error shape
    assert config.registers() == [] and config.generation == 0
    assert node.node.meta.last_seq == 0                           # nothing logged either


# -- through the management API, home up and down ----------------------------------------

SPEC = msgspec.structs.replace(SMALL_SPEC, registry="georegconf")


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    with RunningCluster(SPEC, tmp_path_factory.mktemp("conf")) as c:
        yield c


def _node_holds(c: RunningCluster, name: str, kind: str, obj: str, value: dict) -> bool:
    """Whether the node holds ``kind/obj`` with (at least) the fields of ``value``
    (asked on the node's internal route, as the cluster itself asks)."""
    request = urllib.request.Request(f"{c.node_url(name)}{CONF}/{kind}/{obj}",
                                     headers=c.internal_headers())
    try:
        with management_client.open_direct(request, 10) as r:
            held = json.load(r)["value"]
            return {k: held.get(k) for k in value} == value
    except OSError:
        return False


async def test_registry_update_reaches_every_node_and_needs_the_home_region(running, http):
    c = running
    shown = georeg("registry", "show", "--json", data_dir=c.data_dir)
    assert shown.returncode == 0, shown.stderr
    # An auth cluster's first start enables the admin user (``georeg up``'s login).
    assert json.loads(shown.stdout)["adminUserEnabled"] is True
    updated = georeg("registry", "update", "--admin-enabled", "false", data_dir=c.data_dir)
    assert updated.returncode == 0, updated.stderr
    value = {"admin_enabled": False, "anonymous_pull_enabled": False, "name": "georegconf"}
    nodes = [n["name"] for n in c.status()["nodes"]]
    assert any(n.startswith("brazilsouth") for n in nodes)
    for name in nodes:
        await eventually(lambda n=name: asyncio.to_thread(_node_holds, c, n, "registry",
                                                          "default", value),
                         timeout=30, what=f"the registry update on {name}")
    for zone in "123":
        c.crash(f"eastus-{zone}")
    try:
        refused = georeg("registry", "update", "--anonymous-pull-enabled", "true",
                         data_dir=c.data_dir)
        assert refused.returncode == 2
        assert "home region eastus holds the control plane" in refused.stderr
        with pytest.raises(management_client.ManagementError, match="holds the control plane"):
            await asyncio.to_thread(management_client.set_object, c.management_url, "registry",
                                    "default", {"admin_enabled": True}, c.owner_headers())
        async with http.put(f"{c.management_url}{CONF}/registry/default", json={},
                            headers=c.owner_headers()) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "ControlPlaneUnavailable"
        # Every other node still holds (and serves) what it had; reads go on.
        for name in nodes:
            if not name.startswith("eastus"):
                assert await asyncio.to_thread(_node_holds, c, name, "registry", "default", value)
        shown = georeg("registry", "show", "--json", data_dir=c.data_dir)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["adminUserEnabled"] is False
    finally:
        for zone in "123":
            c.restart(f"eastus-{zone}")
    c.run(c.cluster.wait_ready)
    updated = georeg("registry", "update", "--admin-enabled", "true", data_dir=c.data_dir)
    assert updated.returncode == 0, updated.stderr
    assert "enabled" in updated.stdout


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("PUT", "/georeg/v1/configuration/nosuchkind/x", {}, 404),
    ("PUT", "/georeg/v1/configuration/registry/default", {"admin_enabled": "yes"}, 400),
    ("PUT", "/georeg/v1/configuration/registry/..%2Fx", {}, 400),
    ("DELETE", "/georeg/v1/configuration/registry/nope", None, 400),
    ("PATCH", "/georeg/v1/registry", {"adminUserEnabled": "yes"}, 400),
    ("PATCH", "/georeg/v1/registry", {"bogus": True}, 400),
    ("PATCH", "/georeg/v1/registry", {}, 400),
])
async def test_the_management_api_refuses_bad_configuration_with_a_4xx(running, http, method,
                                                                       path, body, status):
    async with http.request(method, f"{running.management_url}{path}", json=body,
                            headers=running.owner_headers()) as r:
        assert r.status == status, await r.text()
        assert (await r.json())["error"]["message"]

