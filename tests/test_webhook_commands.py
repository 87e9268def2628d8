"""Webhooks on a running cluster (home East US, one replica in West Europe),
through the real ``georeg webhook`` CLI and the management API: what they
write reaches every node; the URI and header values show only through
get-config (never in list, show, a configuration read or a log); bad input
is a 4xx that changes nothing; changes are refused while the home region is
down and reads go on; a Basic registry has at most two. The commands without
a cluster, forwarding included: ``test_webhook_control``."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp
import pytest
from aiohttp import web

from cluster.control import management_client
from cluster.control import spec as specs
from cluster.testing import RunningCluster

from .helpers import eventually
from .test_identities import NODES, cli, held, ok, on_every_node, on_node

CONF = "/georeg/v1/configuration"
HOOKS = "/georeg/v1/webhooks"
SPEC = specs.ClusterSpec(registry="georegwh", tier="Premium", home_region="eastus",
                         paired_copies=False, replicas=(specs.ReplicaSpec("westeurope"),))
SECRET = "Bearer s3cret-hdr-7f"
URI = "https://hooks.example/deploy?sig=s3cret-uri-9c"
HOME_DOWN = "home region eastus holds the control plane"


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    with RunningCluster(SPEC, tmp_path_factory.mktemp("webhooks")) as c:
        yield c


def everything(c: RunningCluster) -> list:
    with on_node(c, f"{c.node_url('eastus')}{CONF}") as r:
        return json.load(r)["objects"]


async def test_create_show_update_get_config_and_delete_through_the_cli(running):
    c = running
    code, out, err = cli(c, "webhook", "create", "-n", "deploy1", "--uri", URI,
                         "--actions", "push", "replicated", "--scope", "app:*",
                         "--headers", f"Authorization={SECRET}", "X-Env=prod",
                         "--location", "westeurope", "--receiver-location", "uksouth")
    assert code == 0, err
    assert "s3cret" not in out
    created = json.loads(out)
    assert created.pop("creationDate")
    assert created == {"name": "deploy1", "location": "westeurope",
                       "receiverLocation": "uksouth", "actions": ["push", "replicated"],
                       "scope": "app:*", "status": "enabled", "provisioningState": "Succeeded"}
    shown = ok(c, "webhook", "show", "--name", "deploy1")
    assert {k: v for k, v in shown.items() if k != "creationDate"} == created
    assert [w["name"] for w in ok(c, "webhook", "list", "--json")] == ["deploy1"]
    table = ok(c, "webhook", "list")
    assert "deploy1" in table and "westeurope" in table and "s3cret" not in table
    config = {"serviceUri": URI, "customHeaders": {"Authorization": SECRET, "X-Env": "prod"}}
    assert ok(c, "webhook", "get-config", "-n", "deploy1") == config

    # Replicated to every node with its header values sealed (the same ciphertext
    # everywhere; delivery opens it: test_header_values_are_sealed_on_every_node...).
    await on_every_node(c, lambda n: held(c, n, "webhook", "deploy1") is not None, "the webhook")
    stored = [held(c, n, "webhook", "deploy1")["headers"] for n in NODES]
    assert stored[0] == stored[1] and set(stored[0]) == {"Authorization", "X-Env"}
    assert all(v.startswith("sealed:v1:") for v in stored[0].values())
    # The management API's raw configuration read masks the header values.
    raw = management_client.get_object(c.management_url, "webhook", "deploy1",
                                       c.owner_headers())
    assert raw["value"]["headers"] == {"Authorization": "***", "X-Env": "***"}
    listed = management_client.list_objects(c.management_url, "webhook", c.owner_headers())
    assert SECRET not in json.dumps(listed) and "X-Env" in json.dumps(listed)

    # An update changes what it is given and keeps the rest.
    updated = ok(c, "webhook", "update", "-n", "deploy1", "--status", "disabled")
    assert updated == {**shown, "status": "disabled"}
    assert ok(c, "webhook", "get-config", "-n", "deploy1") == config
    updated = ok(c, "webhook", "update", "-n", "deploy1", "--actions", "delete",
                 "--headers", "")
    assert updated == {**shown, "status": "disabled", "actions": ["delete"]}
    assert ok(c, "webhook", "get-config", "-n", "deploy1") == {"serviceUri": URI,
                                                               "customHeaders": {}}
    await on_every_node(c, lambda n: (held(c, n, "webhook", "deploy1") or {}).get("actions")
                        == ["delete"], "the update")
    code, _, err = cli(c, "webhook", "update", "-n", "deploy1")
    assert code == 2 and "give at least one of --uri" in err

    # The home region is the default location, and where the receiver sits.
    second = ok(c, "webhook", "create", "-n", "deploy2", "--uri", "http://10.0.0.1:8080/x",
                "--actions", "push")
    assert (second["location"], second["receiverLocation"], second["scope"]) == \
        ("eastus", "eastus", "")

    for name in ("deploy1", "deploy2"):
        ok(c, "webhook", "delete", "--name", name)
    code, _, err = cli(c, "webhook", "show", "-n", "deploy1")
    assert code == 2 and "no webhook 'deploy1'" in err
    await on_every_node(c, lambda n: held(c, n, "webhook", "deploy1") is None, "the delete")

    # The secrets in no log of the cluster.
    for log in (c.data_dir / "logs").glob("*.log"):
        text = log.read_text(errors="replace")
        assert "s3cret" not in text, log


async def test_the_cli_says_what_is_wrong(running):
    c = running
    base = ("webhook", "create", "-n", "wrong1", "--uri", "https://hooks.example/x")
    for extra, says in (
            (("--actions", "pussh"), "unknown action 'pussh' (did you mean push?); the actions "
                                     "are push, delete"),
            (("--actions", "push", "--location", "westeurop"),
             "unknown region 'westeurop'; did you mean westeurope"),
            (("--actions", "push", "--location", "westus"),
             "location 'westus' has no replica in this registry"),
            (("--actions", "push", "--scope", "App"), "is not a repository name")):
        code, _, err = cli(c, *base, *extra)
        assert code == 2 and says in err, (extra, err)
    code, _, err = cli(c, "webhook", "create", "-n", "wrong1", "--uri", "hooks.example/x",
                       "--actions", "push")
    assert code == 2 and "absolute http:// or https:// URL" in err, err
    assert "wrong1" not in {w["name"] for w in ok(c, "webhook", "list", "--json")}


@pytest.fixture
def kept(running):
    """One webhook (of the home region), present for the test."""
    try:
        management_client.create_webhook(running.management_url, "kept1",
                                         uri="https://hooks.example/k", actions=["push"],
                                         headers=running.owner_headers())
    except management_client.ManagementError as exc:
        assert exc.status == 409, exc
    return "kept1"


def create(**change) -> dict:
    return {"name": "deploy9", "serviceUri": "https://hooks.example/x", "actions": ["push"],
            **change}


@pytest.mark.parametrize("method, path, body, status, says", [
    ("POST", HOOKS, create(serviceUri="ftp://hooks.example/x"), 400, "http:// or https://"),
    ("POST", HOOKS, create(actions=["pussh"]), 400, "did you mean push"),
    ("POST", HOOKS, create(actions=[]), 400, "at least one action"),
    ("POST", HOOKS, create(actions="push"), 400, "'actions' is a list"),
    ("POST", HOOKS, create(scope="app:v1:x"), 400, "not a tag"),
    ("POST", HOOKS, create(location="westeurop"), 400, "did you mean westeurope"),
    ("POST", HOOKS, create(location="westus"), 400, "has no replica"),
    ("POST", HOOKS, create(receiverLocation="mars"), 400, "unknown region 'mars'"),
    ("POST", HOOKS, create(name="ab"), 400, "5 to 50 letters and digits"),
    ("POST", HOOKS, create(name="../x"), 400, "5 to 50 letters and digits"),
    ("POST", HOOKS, create(customHeaders={"Content-Type": "x"}), 400, "set by the delivery"),
    ("POST", HOOKS, create(customHeaders={"X-Key": 1}), 400, "Expected `str`"),
    ("POST", HOOKS, create(status="paused"), 400, "enabled or disabled"),
    ("POST", HOOKS, create(colour="red"), 400, "unknown fields colour"),
    ("POST", HOOKS, {"name": "deploy9", "actions": ["push"]}, 400, "serviceUri"),
    ("POST", HOOKS, create(name="kept1"), 409, "exists already"),
    ("PATCH", f"{HOOKS}/kept1", {"actions": ["pull"]}, 400, "unknown action 'pull'"),
    ("PATCH", f"{HOOKS}/kept1", {"name": "other1"}, 400, "unknown fields name"),
    ("PATCH", f"{HOOKS}/kept1", {}, 400, "nothing to update"),
    ("PATCH", f"{HOOKS}/nothere1", {"status": "disabled"}, 404, "no webhook 'nothere1'"),
    ("GET", f"{HOOKS}/nothere1", None, 404, "no webhook"),
    ("GET", f"{HOOKS}/nothere1/config", None, 404, "no webhook"),
    ("DELETE", f"{HOOKS}/nothere1", None, 404, "no webhook"),
    ("POST", f"{HOOKS}/nothere1/ping", None, 404, "no webhook"),
    ("GET", f"{HOOKS}/kept1/events?limit=x", None, 400, "whole number"),
    ("GET", f"{HOOKS}/kept1/events?limit=0", None, 400, "from 1 to 1000"),
    # Webhooks are written by their commands only, never as raw configuration.
    ("PUT", f"{CONF}/webhook/deploy9", {"uri": "https://hooks.example/x", "actions": ["push"],
                                        "location": "eastus"}, 400, "georeg webhook create"),
    ("DELETE", f"{CONF}/webhook/kept1", None, 400, "georeg webhook create"),
])
async def test_bad_input_is_a_4xx_and_changes_nothing(running, kept, http, method, path, body,
                                                      status, says):
    before = await asyncio.to_thread(everything, running)
    async with http.request(method, f"{running.management_url}{path}", json=body,
                            headers=running.owner_headers()) as r:
        assert r.status == status, await r.text()
        assert says in (await r.json())["error"]["message"]
    assert await asyncio.to_thread(everything, running) == before


async def test_changes_are_refused_while_the_home_region_is_down_and_reads_go_on(running, kept):
    c = running
    ok(c, "webhook", "create", "-n", "abroad1", "--uri", URI, "--actions", "push",
       "--headers", f"Authorization={SECRET}", "--location", "westeurope")
    await on_every_node(c, lambda n: held(c, n, "webhook", "abroad1") is not None, "the webhook")
    c.crash("eastus")
    try:
        for args in (("create", "-n", "other1", "--uri", URI, "--actions", "push",
                      "--location", "westeurope"),
                     ("update", "-n", "abroad1", "--status", "disabled"),
                     ("delete", "-n", "abroad1")):
            code, _, err = cli(c, "webhook", *args)
            assert code == 2 and HOME_DOWN in err, (args, err)
        # Reads answer from the replica, which keeps what it holds.
        assert {w["name"] for w in ok(c, "webhook", "list", "--json")} == {"abroad1", "kept1"}
        assert ok(c, "webhook", "show", "-n", "abroad1")["status"] == "enabled"
        assert ok(c, "webhook", "get-config", "-n", "abroad1")["customHeaders"] == \
            {"Authorization": SECRET}
        # A webhook of the home region has no node to deliver it now, and says so.
        code, _, err = cli(c, "webhook", "ping", "-n", "kept1")
        assert code == 2 and "no node of eastus can be reached" in err, err
    finally:
        c.restart("eastus")
    c.run(c.cluster.wait_ready)
    ok(c, "webhook", "delete", "-n", "abroad1")
    ok(c, "webhook", "delete", "-n", "kept1")


BASIC = specs.ClusterSpec(registry="georegwhbasic", tier="Basic", home_region="eastus",
                          paired_copies=False)


def test_a_basic_registry_has_at_most_two_webhooks(tmp_path):
    with RunningCluster(BASIC, tmp_path) as c:
        for name in ("first1", "second2"):
            ok(c, "webhook", "create", "-n", name, "--uri", "https://hooks.example/x",
               "--actions", "push")
        code, _, err = cli(c, "webhook", "create", "-n", "third3", "--uri",
                           "https://hooks.example/x", "--actions", "push")
        assert code == 2, err
        assert "the Basic tier allows 2 webhooks and this registry has 2: delete one, or move " \
               "to Standard (10) or Premium (500)" in err
        with pytest.raises(management_client.ManagementError) as refused:
            management_client.create_webhook(c.management_url, "third3",
                                             uri="https://hooks.example/x", actions=["push"],
                                             headers=c.owner_headers())
        assert refused.value.status == 409
        ok(c, "webhook", "delete", "-n", "first1")                  # room again
        assert management_client.create_webhook(
            c.management_url, "third3", uri="https://hooks.example/x", actions=["push"],
            headers=c.owner_headers())["location"] == "eastus"
        assert [w["name"] for w in management_client.list_webhooks(
            c.management_url, c.owner_headers())] == ["second2", "third3"]


# -- forwarded to the webhook's region (the node side's routes) ---------------------------------


@pytest.fixture
async def receiver():
    """A webhook receiver: every request it gets, as (headers, JSON body)."""
    got: list[tuple[dict, object]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append((dict(request.headers), await request.json()))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook", got
    finally:
        await runner.cleanup()


async def test_ping_list_events_and_redeliver_in_the_webhooks_region(running, receiver):
    c = running
    uri, got = receiver

    def run(*args: str):
        return asyncio.to_thread(cli, c, "webhook", *args)

    async def json_of(*args: str):
        code, out, err = await run(*args)
        assert code == 0, (args, err)
        return json.loads(out)

    await json_of("create", "-n", "pinged1", "--uri", uri, "--actions", "push",
                  "--headers", "X-Key=k3y-value", "--location", "westeurope")
    try:
        await on_every_node(c, lambda n: held(c, n, "webhook", "pinged1") is not None,
                            "the webhook")
        pinged = (await json_of("ping", "-n", "pinged1"))["id"]

        async def delivered() -> dict | None:
            events = await json_of("list-events", "-n", "pinged1", "--json")
            return next((e for e in events if e["id"] == pinged and e["state"] == "delivered"),
                        None)

        await eventually(delivered, timeout=30, what="the ping delivered")
        event = await delivered()
        assert event["action"] == "ping" and event["attempts"]
        request = event["eventRequestMessage"]
        assert (request["method"], request["requestUri"]) == ("POST", uri)
        assert request["headers"]["X-Key"] == "***"
        assert event["eventResponseMessage"]["statusCode"] == 200
        assert any(h.get("X-Key") == "k3y-value" for h, _ in got)

        code, out, _ = await run("list-events", "-n", "pinged1")
        assert code == 0 and pinged in out
        before = len(got)
        assert (await json_of("redeliver", "-n", "pinged1", pinged))["id"]
        await eventually(lambda: len(got) > before, timeout=30, what="the redelivery")
        code, _, err = await run("redeliver", "-n", "pinged1", "no-such-event")
        assert code == 2 and err
    finally:
        await run("delete", "-n", "pinged1")


async def test_the_management_client_speaks_every_webhook_route(running):
    """The client calls (used by benchmarks and users' scripts) against the real API."""
    c, headers = running, running.owner_headers()
    url = c.management_url
    made = await asyncio.to_thread(management_client.create_webhook, url, "client1",
                                   uri=URI, actions=["push"], scope="app",
                                   custom_headers={"X-Key": "v"}, location="westeurope",
                                   receiver_location="", headers=headers)
    assert (made["scope"], made["location"], made["receiverLocation"]) == \
        ("app", "westeurope", "westeurope")
    assert await asyncio.to_thread(management_client.show_webhook, url, "client1",
                                   headers) == made
    changed = await asyncio.to_thread(management_client.update_webhook, url, "client1",
                                      {"scope": "app:*"}, headers)
    assert changed == {**made, "scope": "app:*"}
    assert await asyncio.to_thread(management_client.webhook_config, url, "client1",
                                   headers) == {"serviceUri": URI, "customHeaders": {"X-Key": "v"}}
    await asyncio.to_thread(management_client.delete_webhook, url, "client1", headers)
    assert "client1" not in {w["name"] for w in await asyncio.to_thread(
        management_client.list_webhooks, url, headers)}
    async with aiohttp.ClientSession() as anonymous:   # the owner's API answers only the owner
        async with anonymous.get(f"{url}{HOOKS}") as r:
            assert r.status == 401


# -- header values at rest ------------------------------------------------------------------


def holding(root, needle: bytes) -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle``."""
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*"))
            if p.is_file() and needle in p.read_bytes()]


async def test_header_values_are_sealed_on_every_node_and_sent_as_given(running, receiver, http,
                                                                         capfd):
    """The control plane seals each header value with the cluster's
    configuration key before the home node stores it: neither the home
    region's RocksDB files nor the replica's copy hold the plaintext; the
    replica's delivering node opens it to send it; get-config shows it; a
    sealed value moved to another webhook or header through a node's route is
    refused there; no log holds it."""
    c = running
    uri, got = receiver
    value = f"Bearer pl41n-{uuid.uuid4().hex}"
    ok(c, "webhook", "create", "-n", "sealed1", "--uri", uri, "--actions", "push",
       "--headers", f"Authorization={value}", "X-Env=prod", "--location", "westeurope")
    try:
        await on_every_node(c, lambda n: held(c, n, "webhook", "sealed1") is not None,
                            "the webhook")
        for node in NODES:
            assert holding(c.data_dir / "nodes" / node, value.encode()) == [], node
        stored = {n: held(c, n, "webhook", "sealed1")["headers"] for n in NODES}
        assert stored["eastus"] == stored["westeurope"]          # replicated as it was written
        assert all(v.startswith("sealed:v1:") for v in stored["eastus"].values())
        key = c.data_dir / "auth" / "configuration.key"
        assert key.stat().st_mode & 0o777 == 0o600

        assert ok(c, "webhook", "get-config", "-n", "sealed1")["customHeaders"] == \
            {"Authorization": value, "X-Env": "prod"}
        ok(c, "webhook", "ping", "-n", "sealed1")
        await eventually(lambda: len(got) == 1, timeout=30, what="the ping")
        assert got[0][0]["Authorization"] == value and got[0][0]["X-Env"] == "prod"

        # The home node refuses a sealed value under another webhook or header.
        sealed = stored["eastus"]["Authorization"]
        home = f"{c.node_url('eastus')}{CONF}/webhook"
        base = {"uri": uri, "actions": ["push"], "location": "westeurope", "created": 1.0}
        for name, headers in (("copied1", {"Authorization": sealed}),
                              ("sealed1", {"Authorization": sealed, "X-Env": sealed})):
            async with http.put(f"{home}/{name}", json={**base, "headers": headers},
                                headers=c.internal_headers()) as r:
                text = await r.text()
                assert r.status == 400 and "does not open" in text, text
                assert sealed not in text and value not in text
        assert held(c, "eastus", "webhook", "copied1") is None
        assert held(c, "eastus", "webhook", "sealed1")["headers"] == stored["eastus"]

        # An update that leaves the headers alone keeps what they say.
        ok(c, "webhook", "update", "-n", "sealed1", "--scope", "app:*")
        assert ok(c, "webhook", "get-config", "-n", "sealed1")["customHeaders"] == \
            {"Authorization": value, "X-Env": "prod"}
    finally:
        ok(c, "webhook", "delete", "-n", "sealed1")
    out, err = capfd.readouterr()
    for log in [*(c.data_dir / "logs").glob("*.log")]:
        assert value not in log.read_text(errors="replace"), log
    assert value not in out and value not in err
