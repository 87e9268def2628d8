"""The control plane's webhook commands (``cluster.control.webhooks``) without
a cluster: configuration written to a real node in this process, over HTTP;
ping, list-events and redeliver forwarded, over HTTP, to small aiohttp servers
that serve the node-side contract (the module docstring of
``cluster.control.webhooks``) as a region's nodes would, one of them down.
The same commands on a running cluster, through the CLI:
``test_webhook_commands``."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cluster.control import spec as specs
from cluster.control.cluster import ask_node
from cluster.control.errors import (
    ClusterError,
    Conflict,
    NotFound,
    QuotaExceeded,
    RegionUnavailable,
)
from cluster.control.plan import plan
from cluster.control.private_files import write_private
from cluster.control.webhooks import (
    MASK,
    RegistryWebhooks,
    delivering_node,
    delivery_order,
    node_route,
)
from registry_node.config import NodeConfig
from registry_node.configuration_key import ConfigurationKey
from registry_node.records import Event, EventKind, encode
from registry_node.webhooks import Webhook

SPEC = specs.ClusterSpec(registry="georegwh", tier="Premium", home_region="eastus",
                         paired_copies=False,
                         replicas=(specs.ReplicaSpec("westeurope", zone_redundant=True),))
SECRET = "Bearer s3cret-value"


def test_the_delivering_node_is_the_first_zone_of_the_region_in_plan_order(tmp_path):
    p = plan(SPEC.seeded(), tmp_path)
    assert delivery_order(p, "westeurope") == ["westeurope-1", "westeurope-2", "westeurope-3"]
    assert delivery_order(p, "eastus") == ["eastus"]
    assert delivery_order(p, "westus") == []


def test_a_node_route_quotes_every_part():
    assert node_route("hook1", "ping") == "/georeg/v1/webhooks/hook1/ping"
    assert node_route("hook1", "events", "../../configuration", "redeliver") == \
        "/georeg/v1/webhooks/hook1/events/..%2F..%2Fconfiguration/redeliver"


class RegionNodes:
    """Stand-ins for the nodes of a region serving the node-side webhook
    routes: each records what it was asked, and holds one delivered event."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, str]] = []     # (node, method, path with query)
        self.urls: dict[str, str] = {}
        self._runners: list[web.AppRunner] = []

    def app(self, node: str) -> web.Application:
        async def alive(request):
            return web.json_response({"name": node})

        async def ping(request):
            self.asked.append((node, request.method, request.path_qs))
            return web.json_response({"id": f"ping-on-{node}"}, status=202)

        async def events(request):
            self.asked.append((node, request.method, request.path_qs))
            return web.json_response({"events": [{
                "id": "ev1", "webhook": request.match_info["name"], "action": "push",
                "created": "2026-01-01T00:00:00.000Z", "state": "delivered",
                "attempts": [{"at": "2026-01-01T00:00:00.010Z", "duration_ms": 12.5,
                              "status": 200, "error": ""}],
                "request": {"method": "POST", "uri": "https://hooks.example/x",
                            "headers": {"Authorization": MASK}, "body": {"action": "push"}},
                "response": {"status": 200, "headers": {}, "body": "ok"}}]})

        async def redeliver(request):
            self.asked.append((node, request.method, request.path_qs))
            if request.match_info["id"] != "ev1":
                return web.json_response({"errors": [{"code": "NOT_FOUND",
                                                      "message": "no such event"}]}, status=404)
            return web.json_response({"id": "ev1"}, status=202)

        app = web.Application()
        app.router.add_get("/georeg/v1/node", alive)
        app.router.add_post("/georeg/v1/webhooks/{name}/ping", ping)
        app.router.add_get("/georeg/v1/webhooks/{name}/events", events)
        app.router.add_post("/georeg/v1/webhooks/{name}/events/{id}/redeliver", redeliver)
        return app

    async def start(self, node: str) -> None:
        runner = web.AppRunner(self.app(node), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.urls[node] = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        self._runners.append(runner)

    def down(self, node: str) -> None:
        """A node nothing listens for: a port bound and closed again."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.urls[node] = f"http://127.0.0.1:{s.getsockname()[1]}"

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()


@pytest.fixture
def node_config(tmp_path) -> NodeConfig:
    """The home node, given the cluster's configuration key as ``georeg up`` gives it."""
    key_file = tmp_path / "configuration.key"
    write_private(key_file, os.urandom(32))
    return NodeConfig(data_dir=tmp_path / "node", port=0, region="eastus",
                      configuration_key_file=key_file)


@pytest.fixture
async def region():
    nodes = RegionNodes()
    nodes.down("westeurope-1")
    await nodes.start("westeurope-2")
    await nodes.start("westeurope-3")
    try:
        yield nodes
    finally:
        await nodes.stop()


def commands(node, http: aiohttp.ClientSession, region: RegionNodes, data: Path,
             tier: str = "Premium", key: ConfigurationKey | None = None) -> RegistryWebhooks:
    """The webhook commands over a real node (the home node, and the one
    configuration is read from) and ``region``'s stand-ins for westeurope."""
    cluster_plan = plan(SPEC.seeded(), data)
    key = key or ConfigurationKey.load(node.config.configuration_key_file)

    async def home() -> str:
        return "eastus"

    async def configuration(name, method, path, body=None):
        assert name == "eastus"
        return await ask_node(http, name, f"{node.url}/georeg/v1/configuration{path}", method,
                              body)

    async def forward(name, method, path, body=None):
        return await ask_node(http, name, f"{region.urls[name]}{path}", method, body)

    async def answers(name: str) -> bool:
        try:
            await forward(name, "GET", "/georeg/v1/node")
            return True
        except ClusterError:
            return False

    return RegistryWebhooks(
        tier=lambda: tier, home_region=lambda: "eastus",
        replica_regions=lambda: ["eastus", "westeurope"], home=home, reader=home,
        call=configuration, deliverer=lambda r: delivering_node(cluster_plan, r, answers),
        forward=forward, key=lambda: key, now=lambda: 1_767_225_600.0)


async def test_ping_events_and_redeliver_go_to_the_first_node_of_the_region_that_answers(
        node, http, region, tmp_path):
    hooks = commands(node, http, region, tmp_path)
    await hooks.create("deploy1", uri="https://hooks.example/x", actions=["push"],
                       headers={"Authorization": SECRET}, location="westeurope")

    # westeurope-1 (the first zone) is down: the next node of the region that answers.
    assert await hooks.ping("deploy1") == {"id": "ping-on-westeurope-2"}
    events = await hooks.events("deploy1", limit=5)
    assert await hooks.redeliver("deploy1", "ev1") == {"id": "ev1"}
    with pytest.raises(NotFound, match="no such event"):
        await hooks.redeliver("deploy1", "ev/../2")
    assert region.asked == [
        ("westeurope-2", "POST", "/georeg/v1/webhooks/deploy1/ping"),
        ("westeurope-2", "GET", "/georeg/v1/webhooks/deploy1/events?limit=5"),
        ("westeurope-2", "POST", "/georeg/v1/webhooks/deploy1/events/ev1/redeliver"),
        ("westeurope-2", "POST", "/georeg/v1/webhooks/deploy1/events/ev%2F..%2F2/redeliver")]

    # The event as the management API shows it: ACR's request and response messages.
    assert events == [{
        "id": "ev1", "webhook": "deploy1", "action": "push",
        "created": "2026-01-01T00:00:00.000Z", "state": "delivered",
        "attempts": [{"at": "2026-01-01T00:00:00.010Z", "durationMs": 12.5, "status": 200,
                      "error": ""}],
        "eventRequestMessage": {"method": "POST", "requestUri": "https://hooks.example/x",
                                "headers": {"Authorization": MASK},
                                "content": {"action": "push"}},
        "eventResponseMessage": {"statusCode": 200, "headers": {}, "content": "ok"}}]

    for limit in (0, 1001, True):
        with pytest.raises(ClusterError, match="from 1 to 1000"):
            await hooks.events("deploy1", limit=limit)
    with pytest.raises(NotFound, match="no webhook 'nothere1'"):
        await hooks.ping("nothere1")

    # Every node of the region down: the region is unavailable, and says so.
    region.down("westeurope-2")
    region.down("westeurope-3")
    with pytest.raises(RegionUnavailable, match="no node of westeurope can be reached"):
        await hooks.ping("deploy1")


async def test_create_update_get_config_and_delete_on_a_real_node(node, http, region, tmp_path):
    hooks = commands(node, http, region, tmp_path)
    created = await hooks.create("deploy1", uri="https://hooks.example/x?sig=q1",
                                 actions=("push", "replicated"), scope="app:*",
                                 headers={"Authorization": SECRET})
    assert created == {"name": "deploy1", "location": "eastus", "receiverLocation": "eastus",
                       "actions": ["push", "replicated"], "scope": "app:*", "status": "enabled",
                       "creationDate": "2026-01-01T00:00:00Z", "provisioningState": "Succeeded"}
    assert await hooks.show("deploy1") == created
    assert await hooks.list() == [created]
    assert await hooks.get_config("deploy1") == {"serviceUri": "https://hooks.example/x?sig=q1",
                                                 "customHeaders": {"Authorization": SECRET}}
    with pytest.raises(Conflict, match="exists already"):
        await hooks.create("deploy1", uri="https://hooks.example/y", actions=["push"])

    # What is not given stays; headers are replaced as a whole.
    updated = await hooks.update("deploy1", status="disabled", receiver_location="uksouth")
    assert updated == {**created, "status": "disabled", "receiverLocation": "uksouth"}
    updated = await hooks.update("deploy1", actions=["delete"], location="westeurope",
                                 headers={})
    assert updated == {**created, "status": "disabled", "receiverLocation": "uksouth",
                       "actions": ["delete"], "location": "westeurope"}
    assert await hooks.get_config("deploy1") == {"serviceUri": "https://hooks.example/x?sig=q1",
                                                 "customHeaders": {}}
    with pytest.raises(ClusterError, match="nothing to update"):
        await hooks.update("deploy1")
    with pytest.raises(ClusterError, match="location: unknown region 'westeurop'.*westeurope"):
        await hooks.update("deploy1", location="westeurop")
    assert (await hooks.show("deploy1"))["location"] == "westeurope"     # unchanged

    await hooks.delete("deploy1")
    assert await hooks.list() == []
    for command in (hooks.show, hooks.get_config, hooks.delete):
        with pytest.raises(NotFound, match="no webhook 'deploy1'"):
            await command("deploy1")


@pytest.mark.parametrize("tier, limit, larger", [("Basic", 2, "Standard (10) or Premium (500)"),
                                                 ("Standard", 10, "Premium (500)"),
                                                 ("Premium", 500, "")])
async def test_the_tier_limits_the_number_of_webhooks(node, http, region, tmp_path, tier, limit,
                                                      larger):
    hooks = commands(node, http, region, tmp_path, tier=tier)
    for n in range(limit):
        await hooks.create(f"hook{n:03}", uri="https://hooks.example/x", actions=["push"])
    with pytest.raises(QuotaExceeded) as refused:
        await hooks.create("onemore", uri="https://hooks.example/x", actions=["push"])
    assert str(refused.value) == (f"Quota exceeded for resource type webhooks for the registry "
                                  f"SKU {tier}: the {tier} tier allows {limit} webhooks and this "
                                  f"registry has {limit}: delete one"
                                  + (f", or move to {larger}" if larger else ""))
    await hooks.delete("hook000")                                 # room again
    await hooks.create("onemore", uri="https://hooks.example/x", actions=["push"])


async def test_a_plaintext_value_is_shown_and_sealed_at_the_next_update(node, http, region,
                                                                     tmp_path):
    """A webhook whose header values an older georeg stored in plaintext (here
    replicated into the home node as such): get-config shows them, delivery
    would send them, and the next update seals every one."""
    hooks = commands(node, http, region, tmp_path)
    old = Webhook(uri="https://hooks.example/x", actions=("push",),
                  headers={"Authorization": SECRET}, location="eastus", created=1.0)
    node.node.configuration.apply(Event(
        kind=EventKind.CONFIG_SET, repository="", origin_region="eastus", origin_zone="",
        hlc=node.registry.hlc.now(), acked_ns=1, config_kind="webhook", config_name="deploy1",
        config_value=encode(old)))
    stored = node.node.configuration.get("webhook", "deploy1")
    assert stored.headers == {"Authorization": SECRET}
    assert (await hooks.get_config("deploy1"))["customHeaders"] == {"Authorization": SECRET}
    await hooks.update("deploy1", scope="app:*")
    sealed = node.node.configuration.get("webhook", "deploy1").headers["Authorization"]
    assert sealed.startswith("sealed:v1:") and SECRET not in sealed
    assert (await hooks.get_config("deploy1"))["customHeaders"] == {"Authorization": SECRET}


async def test_values_that_do_not_open_are_a_conflict_that_names_the_header(node, http, region,
                                                                          tmp_path):
    """The control plane holding another key than the one the values were
    sealed with (its key file replaced): get-config and an update that keeps
    the headers say which header and what to do, never the value."""
    hooks = commands(node, http, region, tmp_path)
    await hooks.create("deploy1", uri="https://hooks.example/x", actions=["push"],
                       headers={"Authorization": SECRET})
    hooks = commands(node, http, region, tmp_path, key=ConfigurationKey(os.urandom(32)))
    for attempt in (hooks.get_config("deploy1"), hooks.update("deploy1", status="disabled")):
        with pytest.raises(Conflict) as refused:
            await attempt
        message = str(refused.value)
        assert "header Authorization: its sealed value does not open" in message
        assert "georeg webhook update --headers" in message and "s3cret" not in message
