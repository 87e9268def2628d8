"""A webhook's custom header values at rest, on one node: sealed in its
metastore whoever wrote them, opened only to be sent, bound to their webhook
and header, never shown or logged. Real nodes in this process (their routes
over HTTP, their RocksDB files read as bytes), a real aiohttp receiver. The
same on a running cluster, through the CLI: ``test_webhook_commands``."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path

import pytest

from cluster.control import spec as specs
from cluster.control.access import configuration_key
from cluster.control.plan import plan
from cluster.control.supervisor import Supervisor
from registry_node.config import NodeConfig
from registry_node.configuration_key import SEALED_PREFIX, ConfigurationKey
from registry_node.crypto import KeyFileError
from registry_node.identities import InvalidValue
from registry_node.node import Node
from registry_node.records import Event, EventKind, encode
from registry_node.webhooks import Webhook, open_headers, seal_headers

from .helpers import eventually, make_image, push_image, start_node
from .test_webhook_delivery import FAST, REGION, Hooks, Receiver, pinged


def holding(root: Path, needle: bytes) -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle``."""
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*"))
            if p.is_file() and needle in p.read_bytes()]


def secret() -> str:
    return f"Bearer pl41n-{uuid.uuid4().hex}"


@pytest.fixture
async def receiver():
    r = await Receiver().start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
async def node(tmp_path):
    running = await start_node(NodeConfig(data_dir=tmp_path / "node", port=0, region=REGION,
                                          webhooks=FAST))
    try:
        yield running
    finally:
        await running.stop()


async def stored_headers(http, url: str, name: str) -> dict[str, str]:
    async with http.get(f"{url}/georeg/v1/configuration/webhook/{name}") as r:
        assert r.status == 200, await r.text()
        return (await r.json())["value"]["headers"]


async def put_webhook(http, url: str, name: str, headers: dict[str, str], uri: str):
    value = {"uri": uri, "actions": ["push"], "location": REGION, "created": 1.0,
             "headers": headers}
    async with http.put(f"{url}/georeg/v1/configuration/webhook/{name}", json=value) as r:
        return r.status, await r.text()


# -- the key and the form of a sealed value (no node) ------------------------------------------


def test_a_sealed_value_opens_only_for_its_webhook_and_header_and_key():
    key, other_key = ConfigurationKey(os.urandom(32)), ConfigurationKey(os.urandom(32))
    value = secret()
    sealed = seal_headers(key, "deploy1", {"Authorization": value})["Authorization"]
    assert sealed.startswith(SEALED_PREFIX) and value not in sealed
    assert seal_headers(key, "deploy1", {"Authorization": value})["Authorization"] != sealed
    assert open_headers(key, "deploy1", {"Authorization": sealed}) == {"Authorization": value}
    for where, (k, name, header) in {
            "another webhook": (key, "deploy2", "Authorization"),
            "another header": (key, "deploy1", "X-Deploy-Key"),
            "a header name in another case": (key, "deploy1", "authorization"),
            "another key": (other_key, "deploy1", "Authorization")}.items():
        with pytest.raises(InvalidValue) as refused:
            open_headers(k, name, {header: sealed})
        message = str(refused.value)
        assert f"header {header}" in message and "does not open" in message, where
        assert value not in message and sealed not in message, where
    # A value sealed elsewhere and cut, or not base64 at all: refused the same way.
    for broken in (sealed[:-8], SEALED_PREFIX + "%%%", SEALED_PREFIX):
        with pytest.raises(InvalidValue, match="header Authorization: "):
            open_headers(key, "deploy1", {"Authorization": broken})
    # A value stored before values were sealed reads as the plaintext it is.
    assert open_headers(key, "deploy1", {"X-Env": "prod"}) == {"X-Env": "prod"}


def test_the_key_is_never_shown():
    key = ConfigurationKey(b"k" * 32)
    assert "k" * 8 not in repr(key) and "k" * 8 not in str(key)
    with pytest.raises(ValueError, match="32 bytes"):
        ConfigurationKey(b"short")


# -- how nodes get the cluster's key -----------------------------------------------------------


def test_every_serving_node_is_given_the_cluster_key_file_by_its_path(tmp_path):
    """Made once, mode 0600, reused at every start; named in each serving
    node's plan and passed on its command line as a path (never the key); a
    paired-region copy, which never delivers, gets none."""
    cluster_plan = plan(specs.parse({"auth": "none", "replicas": [{"region": "westeurope"}]})
                        .seeded(1).with_port_base(20000), tmp_path)
    key = configuration_key(cluster_plan)
    path = tmp_path / "auth" / "configuration.key"
    assert path.stat().st_mode & 0o777 == 0o600 and len(path.read_bytes()) == 32
    sealed = seal_headers(key, "deploy1", {"X-Key": "v"})
    assert open_headers(configuration_key(cluster_plan), "deploy1", sealed) == {"X-Key": "v"}
    supervisor = Supervisor(cluster_plan)
    assert cluster_plan.pair_copies
    for node in cluster_plan.all_nodes:
        command = supervisor.node_command(node)
        if node.copy_of:
            assert node.configuration_key is None and "--configuration-key-file" not in command
        else:
            assert node.configuration_key == path
            assert command[command.index("--configuration-key-file") + 1] == str(path)
        assert path.read_bytes().hex() not in " ".join(command)


def test_a_node_refuses_to_start_with_a_key_file_others_may_read(tmp_path):
    path = tmp_path / "configuration.key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by other users"):
        Node.open(NodeConfig(data_dir=tmp_path / "node", configuration_key_file=path))


# -- one node -------------------------------------------------------------------------------


async def test_a_value_written_through_the_node_route_is_sealed_in_its_metastore(
        node, receiver, http):
    """A standalone node (no configuration key given) seals a plaintext value
    with its own key, derived from its node key; its RocksDB files never hold
    the plaintext, and delivery sends it."""
    value = secret()
    hooks = Hooks(http, node.url)
    await hooks.create("deploy1", receiver.url(), headers={"Authorization": value})
    stored = (await stored_headers(http, node.url, "deploy1"))["Authorization"]
    assert stored.startswith(SEALED_PREFIX)
    await pinged(hooks, receiver, "deploy1")
    assert receiver.got[-1]["headers"]["Authorization"] == value
    assert holding(node.config.data_dir, value.encode()) == []
    assert value not in json.dumps(await hooks.events("deploy1"))


async def test_a_sealed_value_copied_to_another_webhook_or_header_is_refused(
        node, receiver, http):
    """The node route refuses (400) a sealed value that does not open for the
    webhook and header it is written under, without echoing it."""
    value = secret()
    hooks = Hooks(http, node.url)
    await hooks.create("deploy1", receiver.url(), headers={"Authorization": value})
    sealed = (await stored_headers(http, node.url, "deploy1"))["Authorization"]
    for name, headers in (("deploy2", {"Authorization": sealed}),
                          ("deploy1", {"X-Other": sealed})):
        status, text = await put_webhook(http, node.url, name, headers, receiver.url())
        assert status == 400, (name, text)
        assert "does not open" in text and sealed not in text and value not in text
    # Nothing changed: deploy2 does not exist, deploy1 still sends its own value.
    async with http.get(f"{node.url}/georeg/v1/configuration/webhook/deploy2") as r:
        assert r.status == 404
    await pinged(hooks, receiver, "deploy1")
    assert receiver.got[-1]["headers"]["Authorization"] == value
    assert "X-Other" not in receiver.got[-1]["headers"]
    # Its own sealed value, written again as it is, is kept.
    status, text = await put_webhook(http, node.url, "deploy1", {"Authorization": sealed},
                                     receiver.url())
    assert status == 200, text


async def test_a_node_with_another_key_sends_nothing_and_says_which_header(
        tmp_path, receiver, http, capfd):
    """Values sealed under one configuration key, held by a node started with
    another (a key file replaced): the events are not sent — a request without
    the credential, or with ciphertext in its place, is no delivery —, they
    fail at once, and the reason names the header, never the value."""
    value = secret()
    first, second = tmp_path / "first.key", tmp_path / "second.key"
    for path in (first, second):
        path.write_bytes(os.urandom(32))
        path.chmod(0o600)
    config = NodeConfig(data_dir=tmp_path / "node", port=0, region=REGION, webhooks=FAST,
                        configuration_key_file=first)
    running = await start_node(config)
    try:
        hooks = Hooks(http, running.url)
        await hooks.create("deploy1", receiver.url(), headers={"Authorization": value})
        await pinged(hooks, receiver, "deploy1")
        assert receiver.got[-1]["headers"]["Authorization"] == value
    finally:
        await running.stop()
    running = await start_node(dataclasses.replace(config, configuration_key_file=second))
    try:
        hooks = Hooks(http, running.url)
        before = receiver.hits
        await push_image(http, running.url, "app", make_image(seed=91), tag="v1")

        async def failed() -> dict | None:
            return next((e for e in await hooks.events("deploy1")
                         if e["action"] == "push" and e["state"] == "failed"), None)

        await eventually(failed, timeout=20, what="the push failed, unsent")
        event = await failed()
        assert receiver.hits == before and event["attempts"] == []
        assert "header Authorization" in event["reason"] and "does not open" in event["reason"]
        assert value not in json.dumps(event)
    finally:
        await running.stop()
    out, err = capfd.readouterr()
    assert value not in out + err


async def test_a_plaintext_value_from_an_older_georeg_is_still_sent(node, receiver, http):
    """Configuration replicated from a node that did not seal: read as the
    plaintext it is (the control plane reseals it at the next update)."""
    value = secret()
    hook = Webhook(uri=receiver.url(), actions=("push",), headers={"Authorization": value},
                   location=REGION, created=1.0)
    node.node.configuration.apply(Event(
        kind=EventKind.CONFIG_SET, repository="", origin_region="westus", origin_zone="",
        hlc=node.registry.hlc.now(), acked_ns=1, config_kind="webhook", config_name="deploy1",
        config_value=encode(hook)))
    await pinged(Hooks(http, node.url), receiver, "deploy1")
    assert receiver.got[-1]["headers"]["Authorization"] == value


async def test_a_copied_value_that_arrives_by_replication_is_not_sent(node, receiver, http):
    """Replication stores what it carries without opening it (a node relays
    what it is given), so a value copied to another webhook can reach a node
    that way — from a node that did not check, or an older georeg. Delivery
    then sends nothing: the event fails at once, naming the header."""
    value = secret()
    hooks = Hooks(http, node.url)
    await hooks.create("deploy1", receiver.url("one"), headers={"Authorization": value})
    sealed = (await stored_headers(http, node.url, "deploy1"))["Authorization"]
    copied = Webhook(uri=receiver.url("two"), actions=("push",),
                     headers={"Authorization": sealed}, location=REGION, created=1.0)
    node.node.configuration.apply(Event(
        kind=EventKind.CONFIG_SET, repository="", origin_region="westus", origin_zone="",
        hlc=node.registry.hlc.now(), acked_ns=1, config_kind="webhook", config_name="deploy2",
        config_value=encode(copied)))
    await push_image(http, node.url, "app", make_image(seed=92), tag="v1")
    await pinged(hooks, receiver, "deploy1", "/one")        # deploy1 sends its own

    async def failed() -> dict | None:
        return next((e for e in await hooks.events("deploy2") if e["state"] == "failed"), None)

    await eventually(failed, timeout=20, what="deploy2's push failed, unsent")
    assert receiver.actions("/two") == [] and (await failed())["attempts"] == []
    assert "header Authorization" in (await failed())["reason"]
    assert receiver.payloads("push", "/one")[0]["target"]["tag"] == "v1"
