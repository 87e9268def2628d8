"""Webhook delivery on a node (``registry_node.webhook_delivery``): real nodes
(in this process, or a ``georeg node`` child process where it is killed), a
real aiohttp receiver started by each test, real pushes over HTTP.

Nothing here sleeps for a fixed time: each test waits for what it expects,
and "nothing more arrived" is shown by a ``ping`` sent afterwards — delivery
is in order per webhook, so once the ping has arrived everything queued
before it has been delivered.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import re
import time
import uuid

import aiohttp
import msgspec
import pytest
from aiohttp import web
from msgspec.structs import replace as dataclasses_replace

from cluster.control import spec as specs
from cluster.control.plan import plan
from registry_node.app import REPLICATION_COMPLETION, WEBHOOKS, init_app
from registry_node.config import NodeConfig, WebhookSettings
from registry_node.webhook_events import timestamp
from registry_node.webhooks import Completion
from replicator.retention import LogRetention

from .helpers import (
    OCI_MANIFEST,
    digest_of,
    eventually,
    make_image,
    push_blob,
    push_image,
    start_node,
)
from .replication_invariants import start_cluster, stop_cluster

REGION = "eastus"
FAST = WebhookSettings(timeout_s=2.0, backoff_base_s=0.05, backoff_cap_s=0.2)
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z")
HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
HELM_LAYER = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"


def ns_of(stamp: str) -> int:
    """A payload's timestamp (RFC 3339 UTC, nanoseconds) in ns since the epoch."""
    assert TIMESTAMP.fullmatch(stamp), stamp
    return calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) * 10**9 \
        + int(stamp[20:29])


class Receiver:
    """A webhook receiver: an aiohttp server that records what it is sent and
    answers ``status`` (or hangs, while ``hang`` is set)."""

    def __init__(self) -> None:
        self.got: list[dict] = []            # answered requests: path, headers, json, method
        self.hits = 0                        # every request that reached it
        self.status = 200
        self.body = ""
        self.headers: dict[str, str] = {}
        self.hang = False
        self._released = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._released.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def url(self, path: str = "hook") -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def release(self) -> None:
        self.hang = False
        self._released.set()

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        body = await request.read()
        if self.hang:
            self._released.clear()
            await self._released.wait()
        self.got.append({"path": request.path, "method": request.method,
                         "headers": dict(request.headers), "json": json.loads(body)})
        return web.Response(status=self.status, text=self.body, headers=self.headers)

    def actions(self, path: str = "/hook") -> list[str]:
        return [g["json"]["action"] for g in self.got if g["path"] == path]

    def payloads(self, action: str, path: str = "/hook") -> list[dict]:
        return [g["json"] for g in self.got if g["path"] == path and g["json"]["action"] == action]


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


class Hooks:
    """The node-internal webhook routes of one node, as the control plane calls them."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base

    async def create(self, name: str, uri: str, **fields) -> None:
        value = {"uri": uri, "actions": ["push", "delete"], "location": REGION,
                 "created": 1.0, **fields}
        async with self.http.put(f"{self.base}/georeg/v1/configuration/webhook/{name}",
                                 json=value) as r:
            assert r.status == 200, await r.text()

    async def ping(self, name: str) -> str:
        async with self.http.post(f"{self.base}/georeg/v1/webhooks/{name}/ping") as r:
            assert r.status == 202, await r.text()
            return (await r.json())["id"]

    async def events(self, name: str, limit: int = 100) -> list[dict]:
        async with self.http.get(f"{self.base}/georeg/v1/webhooks/{name}/events",
                                 params={"limit": str(limit)}) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["events"]

    async def redeliver(self, name: str, ident: str) -> int:
        async with self.http.post(
                f"{self.base}/georeg/v1/webhooks/{name}/events/{ident}/redeliver") as r:
            return r.status


async def pinged(hooks: Hooks, receiver: Receiver, name: str, path: str = "/hook") -> None:
    """Send a ping and wait for it: whatever was queued before it has arrived."""
    ident = await hooks.ping(name)
    await eventually(lambda: any(p["id"] == ident for p in receiver.payloads("ping", path)),
                     timeout=20, what=f"the ping of {name}")


async def test_a_push_by_tag_fires_one_push_with_acrs_payload(node, receiver, http):
    hooks = Hooks(http, node.url)
    await hooks.create("deploy1", receiver.url(), headers={"X-Deploy-Key": "s3cret"})
    image = make_image(seed=1)
    before = time.time_ns()
    for blob in image.blobs:
        await push_blob(http, node.url, "team/app", blob)
    async with http.put(f"{node.url}/v2/team/app/manifests/v1", data=image.manifest,
                        headers={"Content-Type": OCI_MANIFEST, "User-Agent": "pipeline/2.1",
                                 "X-Request-Id": "push-req-1"}) as r:
        assert r.status == 201
    after = time.time_ns()
    await pinged(hooks, receiver, "deploy1")

    assert receiver.actions() == ["push", "ping"]      # one push for the put, not two
    sent = receiver.got[0]
    assert sent["method"] == "POST"
    assert sent["headers"]["Content-Type"] == "application/json"
    assert sent["headers"]["X-Deploy-Key"] == "s3cret"
    push = sent["json"]
    assert set(push) == {"id", "timestamp", "action", "target", "request"}
    assert uuid.UUID(push["id"])
    assert before <= ns_of(push["timestamp"]) <= after     # when the push was acknowledged
    assert push["action"] == "push"
    assert push["target"] == {"mediaType": OCI_MANIFEST, "size": len(image.manifest),
                              "digest": image.digest, "length": len(image.manifest),
                              "repository": "team/app", "tag": "v1"}
    host = node.url.removeprefix("http://")
    assert push["request"] == {"id": "push-req-1", "host": host, "method": "PUT",
                               "useragent": "pipeline/2.1"}

    # list-events: the delivery, with request, response and timing; the custom
    # header's value never shown.
    events = await hooks.events("deploy1")
    assert [e["action"] for e in events] == ["ping", "push"]      # newest first
    shown = events[1]
    assert shown["id"] == push["id"] and shown["state"] == "delivered"
    assert shown["request"]["headers"] == {"Content-Type": "application/json",
                                           "X-Deploy-Key": "***"}
    assert shown["request"]["body"] == push and shown["request"]["uri"] == receiver.url()
    assert shown["response"]["status"] == 200
    [attempt] = shown["attempts"]
    assert attempt["status"] == 200 and attempt["duration_ms"] >= 0 and attempt["error"] is None
    assert "s3cret" not in json.dumps(events)

    # The same manifest pushed again under the same tag changes nothing: no push.
    async with http.put(f"{node.url}/v2/team/app/manifests/v1", data=image.manifest,
                        headers={"Content-Type": OCI_MANIFEST}) as r:
        assert r.status == 201
    # Pushed by digest: a push without a tag; the same manifest tagged anew: a push.
    other = make_image(seed=2)
    await push_image(http, node.url, "team/app", other)
    async with http.put(f"{node.url}/v2/team/app/manifests/v2", data=image.manifest,
                        headers={"Content-Type": OCI_MANIFEST}) as r:
        assert r.status == 201
    await pinged(hooks, receiver, "deploy1")
    assert receiver.actions() == ["push", "ping", "push", "push", "ping"]
    by_digest, retagged = receiver.payloads("push")[1:]
    assert by_digest["target"]["digest"] == other.digest and "tag" not in by_digest["target"]
    assert retagged["target"]["digest"] == image.digest and retagged["target"]["tag"] == "v2"
    assert len({p["id"] for p in receiver.payloads("push")}) == 3

    text = await (await http.get(f"{node.url}/metrics")).text()
    assert 'georeg_webhook_deliveries_total{attempt="1",outcome="delivered",webhook="deploy1"} 5.0' \
        in text
    assert 'georeg_webhook_delivery_latency_seconds_count{webhook="deploy1"} 5.0' in text


async def test_delete_fires_on_a_manifest_or_repository_delete_and_never_on_untag(
        node, receiver, http):
    hooks = Hooks(http, node.url)
    await hooks.create("deploy1", receiver.url())
    first, second = make_image(seed=3), make_image(seed=4)
    await push_image(http, node.url, "app", first, tag="v1")
    async with http.delete(f"{node.url}/v2/app/manifests/v1") as r:       # untag
        assert r.status == 202
    async with http.delete(f"{node.url}/v2/app/manifests/{first.digest}",
                           headers={"User-Agent": "cleanup/1"}) as r:
        assert r.status == 202
    await push_image(http, node.url, "app", second, tag="v2")
    async with http.delete(f"{node.url}/acr/v1/app") as r:                # the repository
        assert r.status == 202
    await pinged(hooks, receiver, "deploy1")
    assert receiver.actions() == ["push", "delete", "push", "delete", "ping"]
    deleted, repository_deleted = receiver.payloads("delete")
    assert deleted["target"] == {"mediaType": OCI_MANIFEST, "digest": first.digest,
                                 "repository": "app"}
    assert deleted["request"]["method"] == "DELETE"
    assert deleted["request"]["useragent"] == "cleanup/1"
    assert repository_deleted["target"] == {"mediaType": OCI_MANIFEST, "digest": second.digest,
                                            "repository": "app"}


async def test_a_helm_chart_fires_chart_push_and_chart_delete(node, receiver, http):
    hooks = Hooks(http, node.url)
    await hooks.create("charts1", receiver.url(),
                       actions=["push", "delete", "chart_push", "chart_delete"])
    config, chart = b'{"name":"web","version":"1.2.0"}', b"chart-bytes"
    for blob in (config, chart):
        await push_blob(http, node.url, "charts/web", blob)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": HELM_CONFIG, "digest": digest_of(config),
                                      "size": len(config)},
                           "layers": [{"mediaType": HELM_LAYER, "digest": digest_of(chart),
                                       "size": len(chart)}]}).encode()
    async with http.put(f"{node.url}/v2/charts/web/manifests/1.2.0", data=manifest,
                        headers={"Content-Type": OCI_MANIFEST}) as r:
        assert r.status == 201
    async with http.delete(f"{node.url}/v2/charts/web/manifests/{digest_of(manifest)}") as r:
        assert r.status == 202
    await pinged(hooks, receiver, "charts1")
    assert receiver.actions() == ["chart_push", "chart_delete", "ping"]
    pushed, deleted = receiver.got[0]["json"], receiver.got[1]["json"]
    assert pushed["target"]["tag"] == "1.2.0" and pushed["target"]["digest"] == digest_of(manifest)
    assert pushed["target"]["name"] == "web" and pushed["target"]["version"] == "1.2.0"
    assert deleted["target"]["digest"] == digest_of(manifest)


async def test_scope_status_and_region_select_what_each_webhook_gets(node, receiver, http):
    hooks = Hooks(http, node.url)
    await hooks.create("onetag", receiver.url("one"), scope="app:v1")
    await hooks.create("anytag", receiver.url("any"), scope="app:*")
    await hooks.create("latest1", receiver.url("latest"), scope="app")   # = app:latest
    await hooks.create("everything", receiver.url("all"), scope="")
    await hooks.create("paused", receiver.url("paused"), status="disabled")
    await hooks.create("elsewhere", receiver.url("elsewhere"), location="westeurope")
    for repo, tag, seed in (("app", "v1", 5), ("app", "v2", 6), ("app", "latest", 7),
                            ("other", "v1", 8)):
        await push_image(http, node.url, repo, make_image(seed=seed), tag=tag)
    for name, path in (("onetag", "/one"), ("anytag", "/any"), ("latest1", "/latest"),
                       ("everything", "/all"), ("elsewhere", "/elsewhere")):
        await pinged(hooks, receiver, name, path)

    def pushed(path):
        return [(p["target"]["repository"], p["target"]["tag"])
                for p in receiver.payloads("push", path)]

    assert pushed("/one") == [("app", "v1")]
    assert pushed("/any") == [("app", "v1"), ("app", "v2"), ("app", "latest")]
    assert pushed("/latest") == [("app", "latest")]
    assert pushed("/all") == [("app", "v1"), ("app", "v2"), ("app", "latest"), ("other", "v1")]
    assert pushed("/elsewhere") == []       # it belongs to another region's replica
    # A disabled webhook made no events and delivers nothing, its ping included,
    # until it is enabled again.
    held = await hooks.ping("paused")
    assert [e["action"] for e in await hooks.events("paused")] == ["ping"]
    await hooks.create("paused", receiver.url("paused"), status="enabled")
    await eventually(lambda: receiver.actions("/paused") == ["ping"], what="the held ping")
    assert receiver.payloads("ping", "/paused")[0]["id"] == held


async def test_ping_and_the_routes_answer_for_what_exists(node, receiver, http):
    hooks = Hooks(http, node.url)
    await hooks.create("deploy1", receiver.url())
    ident = await hooks.ping("deploy1")
    await eventually(lambda: receiver.actions() == ["ping"], what="the ping")
    ping = receiver.got[0]["json"]
    assert set(ping) == {"id", "timestamp", "action"}
    assert ping["id"] == ident and ping["action"] == "ping" and TIMESTAMP.fullmatch(ping["timestamp"])
    # Redelivered: the same id and the same bytes, once more.
    assert await hooks.redeliver("deploy1", ident) == 202
    await eventually(lambda: len(receiver.got) == 2, what="the redelivery")
    assert receiver.got[1]["json"] == ping
    for method, path in (("POST", "/georeg/v1/webhooks/nosuchhook/ping"),
                         ("GET", "/georeg/v1/webhooks/nosuchhook/events"),
                         ("POST", f"/georeg/v1/webhooks/deploy1/events/{uuid.uuid4()}/redeliver")):
        async with http.request(method, node.url + path) as r:
            assert r.status == 404, (path, await r.text())
    async with http.get(f"{node.url}/georeg/v1/webhooks/deploy1/events",
                        params={"limit": "zero"}) as r:
        assert r.status == 400


async def test_a_receiver_down_then_back_gets_every_event_once_in_order(
        node, receiver, http):
    hooks = Hooks(http, node.url)
    await hooks.create("deploy1", receiver.url())
    await receiver.stop()                                  # connection refused from now on
    images = [make_image(seed=10 + i) for i in range(5)]
    for i, image in enumerate(images):
        await push_image(http, node.url, "app", image, tag=f"v{i}")

    async def retried() -> bool:
        events = await hooks.events("deploy1")
        return len(events) == 5 and events[-1]["attempt_count"] >= 3

    await eventually(retried, timeout=20, what="the first event retried")
    head = (await hooks.events("deploy1"))[-1]
    assert head["state"] == "pending" and head["response"] is None
    assert all(a["status"] is None and "connection" in a["error"] for a in head["attempts"])
    await receiver.start()                                 # back, on the same port
    await pinged(hooks, receiver, "deploy1")
    pushes = receiver.payloads("push")
    assert [p["target"]["tag"] for p in pushes] == [f"v{i}" for i in range(5)]   # in order
    assert len({p["id"] for p in pushes}) == 5                                  # once each
    assert all(e["state"] == "delivered" for e in await hooks.events("deploy1"))
    text = await (await http.get(f"{node.url}/metrics")).text()
    assert re.search(r'georeg_webhook_deliveries_total\{attempt="[0-9+]+",outcome="retried",'
                     r'webhook="deploy1"\} [1-9]', text)


async def test_a_400_is_not_retried_and_shows_in_the_events(node, receiver, http):
    hooks = Hooks(http, node.url)
    await hooks.create("deploy1", receiver.url())
    receiver.status, receiver.body = 400, "no such pipeline"
    await push_image(http, node.url, "app", make_image(seed=20), tag="v1")

    async def failed() -> bool:
        events = await hooks.events("deploy1")
        return bool(events) and events[0]["state"] == "failed"

    await eventually(failed, what="the push to fail")
    receiver.status = 200
    await pinged(hooks, receiver, "deploy1")
    assert receiver.actions() == ["push", "ping"] and receiver.hits == 2    # tried once
    shown = (await hooks.events("deploy1"))[1]
    assert shown["action"] == "push" and shown["state"] == "failed"
    assert len(shown["attempts"]) == 1 and shown["attempts"][0]["status"] == 400
    assert shown["response"]["status"] == 400 and shown["response"]["body"] == "no such pipeline"
    assert "400" in shown["reason"]


async def test_a_429_is_retried_after_its_retry_after(node, receiver, http):
    hooks = Hooks(http, node.url)
    await hooks.create("deploy1", receiver.url())
    receiver.status, receiver.headers = 429, {"Retry-After": "1"}
    await push_image(http, node.url, "app", make_image(seed=21), tag="v1")
    await eventually(lambda: receiver.hits >= 2, what="a second attempt")
    receiver.status, receiver.headers = 200, {}
    await pinged(hooks, receiver, "deploy1")
    push = (await hooks.events("deploy1"))[1]
    assert push["state"] == "delivered" and push["attempts"][0]["status"] == 429
    first, second = (ns_of(a["at"]) for a in push["attempts"][:2])
    assert second - first >= 10**9          # not before the receiver said (backoff alone: 0.2 s)


async def test_a_hanging_receiver_times_out_and_is_retried_while_pushes_go_on(
        tmp_path, receiver, http):
    settings = WebhookSettings(timeout_s=0.3, backoff_base_s=0.05, backoff_cap_s=0.1)
    running = await start_node(NodeConfig(data_dir=tmp_path / "node", port=0, region=REGION,
                                          webhooks=settings))
    try:
        hooks = Hooks(http, running.url)
        await hooks.create("deploy1", receiver.url())
        receiver.hang = True
        healthy = await Receiver().start()
        try:
            await hooks.create("healthy1", healthy.url("healthy"))
            for i in range(5):                      # pushes are acknowledged meanwhile
                await push_image(http, running.url, "app", make_image(seed=30 + i), tag=f"v{i}")

            async def timed_out_twice() -> bool:
                events = await hooks.events("deploy1")
                return bool(events) and len(events[-1]["attempts"]) >= 2

            await eventually(timed_out_twice, timeout=20, what="two timed-out attempts")
            head = (await hooks.events("deploy1"))[-1]
            assert head["state"] == "pending"
            assert all("timeout" in a["error"] for a in head["attempts"][:2])
            # Another webhook is not held up by it.
            await pinged(hooks, healthy, "healthy1", "/healthy")
            assert [p["target"]["tag"] for p in healthy.payloads("push", "/healthy")] == \
                [f"v{i}" for i in range(5)]
            receiver.release()
            await pinged(hooks, receiver, "deploy1")
            tags = [p["target"]["tag"] for p in receiver.payloads("push")]
            # At least once: the attempts that timed out may have reached it too.
            assert sorted(set(tags)) == [f"v{i}" for i in range(5)]
            assert [t for i, t in enumerate(tags) if t not in tags[:i]] == [f"v{i}" for i in range(5)]
        finally:
            await healthy.stop()
    finally:
        await running.stop()


async def test_events_pending_when_the_node_is_killed_are_delivered_after_restart(
        node_process, receiver, http):
    proc = node_process("node", "--region", REGION, "--webhook-backoff-cap", "0.2",
                        "--webhook-timeout", "2")
    hooks = Hooks(http, proc.url)
    await hooks.create("deploy1", receiver.url())
    await receiver.stop()
    for i in range(3):
        await push_image(http, proc.url, "app", make_image(seed=40 + i), tag=f"v{i}")

    async def pending() -> bool:
        events = await hooks.events("deploy1")
        return len(events) == 3 and events[-1]["attempt_count"] >= 1

    await eventually(pending, timeout=20, what="three pending events")
    proc.kill()                                             # kill -9
    await receiver.start()
    proc.start()
    hooks.base = proc.url
    await pinged(hooks, receiver, "deploy1")
    pushes = receiver.payloads("push")
    assert [p["target"]["tag"] for p in pushes] == ["v0", "v1", "v2"]
    assert len({p["id"] for p in pushes}) == 3


async def test_the_feed_holds_log_truncation_back_until_it_has_read(node, receiver, http):
    """The log is truncated behind its readers (``replicator.retention``); the
    webhook feed is one of them, inside the node. With the feed stopped behind,
    a compaction that no peer holds back keeps every event the feed has not
    read, and the feed, started again, makes every push's event."""
    hooks = Hooks(http, node.url)
    await hooks.create("deploy1", receiver.url())
    delivery = node.runner.app[WEBHOOKS]
    await delivery.stop()                                 # the feed reads nothing from here
    for i in range(3):
        await push_image(http, node.url, "app", make_image(seed=50 + i), tag=f"v{i}")
    meta = node.node.meta
    read = delivery.outbox.cursor
    assert read < meta.last_seq
    retention = LogRetention(meta, readers=lambda: [], horizon_s=60, grace_s=60,
                             retain_events=0, interval_s=3600, wall_ns=time.time_ns)
    await retention.compact()                             # no peer: only the feed holds it
    assert meta.log_floor == read and retention.truncated > 0
    delivery.start()
    await pinged(hooks, receiver, "deploy1")
    assert [p["target"]["tag"] for p in receiver.payloads("push")] == ["v0", "v1", "v2"]
    assert delivery.skipped == 0
    await retention.compact()                             # read now: it may all go
    assert meta.log_floor == delivery.outbox.cursor == meta.last_seq


# -- replicated / replication_failed -------------------------------------------------------


class EveryNodeHolds:
    """A ``ReplicationCompletion`` for a registry of standalone nodes, one per
    region: complete once every node serves the manifest; another region's
    node that cannot be reached counts as a replica that gave up (the asking
    node's own, ``here``, may be still starting: it is waited for). The
    replicator's own, asked of replicas and their per-image status, is built
    on the same Protocol."""

    def __init__(self, here: str) -> None:
        self.here = here
        self.nodes: dict[str, str] = {}       # region -> base URL
        self.seen: dict[tuple[str, str], str] = {}

    async def wait(self, repository: str, digest: str, *, deadline_s: float) -> Completion:
        deadline = time.monotonic() + deadline_s
        async with aiohttp.ClientSession() as http:
            while True:
                arrivals, failures = {}, {}
                for region, base in sorted(self.nodes.items()):
                    try:
                        async with http.head(f"{base}/v2/{repository}/manifests/{digest}") as r:
                            if r.status == 200:
                                arrivals[region] = self.seen.setdefault(
                                    (region, digest), timestamp(time.time_ns()))
                    except aiohttp.ClientConnectionError as exc:
                        if region != self.here:
                            failures[region] = f"gave up: {exc}"
                pending = tuple(r for r in self.nodes if r not in arrivals and r not in failures)
                if failures or not pending or time.monotonic() > deadline:
                    return Completion(not pending and not failures, arrivals, failures, pending)
                await asyncio.sleep(0.05)


class Completes:
    """A node extension that registers ``completion`` as replication would."""

    def __init__(self, completion) -> None:
        self.completion = completion

    def add_routes(self, router) -> None:
        pass

    async def lifetime(self, app):
        app[REPLICATION_COMPLETION] = self.completion
        yield


async def _serve(config: NodeConfig, extensions=(), port: int = 0) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(init_app(config, list(extensions)), access_log=None,
                           handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


async def test_replicated_and_replication_failed_wait_for_replication_across_a_restart(
        tmp_path, receiver, http):
    completion = EveryNodeHolds(REGION)
    east_config = NodeConfig(data_dir=tmp_path / "east", port=0, region=REGION,
                             webhooks=dataclasses_replace(FAST, completion_wait_s=0.5))
    east, east_url = await _serve(east_config, [Completes(completion)])
    west = await start_node(NodeConfig(data_dir=tmp_path / "west", port=0, region="westus"))
    completion.nodes = {REGION: east_url, "westus": west.url}
    try:
        hooks = Hooks(http, east_url)
        await hooks.create("deploy1", receiver.url(),
                           actions=["push", "replicated", "replication_failed"])
        image = make_image(seed=60)
        await push_image(http, east_url, "app", image, tag="v1")
        await eventually(lambda: receiver.actions() == ["push"], what="the push")
        # The question outlives the node: westus gets the image while eastus is down.
        await east.cleanup()
        await push_image(http, west.url, "app", image, tag="v1")
        east, _ = await _serve(east_config, [Completes(completion)],
                               port=int(east_url.rpartition(":")[2]))
        await eventually(lambda: len(receiver.got) == 2, timeout=20, what="replicated")
        assert receiver.actions() == ["push", "replicated"]
        push, replicated = receiver.got[0]["json"], receiver.got[1]["json"]
        assert set(replicated) == {"id", "timestamp", "action", "target", "request",
                                   "replication"}
        assert replicated["target"] == push["target"] and replicated["request"] == push["request"]
        assert replicated["id"] != push["id"] and uuid.UUID(replicated["id"])
        assert set(replicated["replication"]["arrivals"]) == {REGION, "westus"}
        assert all(TIMESTAMP.fullmatch(t) for t in replicated["replication"]["arrivals"].values())
        assert replicated["replication"]["failures"] == {}
        # A replica that gives up: replication_failed, with its reason.
        await west.stop()
        await push_image(http, east_url, "app", make_image(seed=61), tag="v2")
        await eventually(lambda: "replication_failed" in receiver.actions(), timeout=20,
                         what="replication_failed")
        await pinged(hooks, receiver, "deploy1")     # and nothing more
        assert receiver.actions() == ["push", "replicated", "push", "replication_failed", "ping"]
        failed = receiver.payloads("replication_failed")[0]
        assert failed["target"]["tag"] == "v2"
        assert set(failed["replication"]["failures"]) == {"westus"}
        assert set(failed["replication"]["arrivals"]) == {REGION}
    finally:
        await east.cleanup()
        await west.stop()


async def test_a_node_without_replication_fires_neither(node, receiver, http):
    hooks = Hooks(http, node.url)
    await hooks.create("deploy1", receiver.url(), actions=["push", "replicated",
                                                          "replication_failed"])
    await push_image(http, node.url, "app", make_image(seed=62), tag="v1")
    await pinged(hooks, receiver, "deploy1")
    assert receiver.actions() == ["push", "ping"]
    assert list(node.node.outbox.questions()) == []


# -- a replicating registry ----------------------------------------------------------------


async def test_each_region_fires_once_for_what_it_receives(tmp_path, receiver, http):
    """A push through a zone of East US: East US's webhook fires once (from its
    first zone, which delivers for the region, though the push went to the
    second), with the client's request, West Europe's when the copy lands
    there, with the registry's, each with its region's timestamp; the other
    zone makes nothing."""
    cluster = await start_cluster(tmp_path, [("eastus", "1"), ("eastus", "2"),
                                             ("westeurope", "")])
    try:
        nodes = cluster.nodes
        assert [n for n in nodes if nodes[n].view.webhook_settings.deliver] == \
            ["eastus-1", "westeurope"]
        home = Hooks(http, nodes["eastus-2"].url)
        await home.create("easthook", receiver.url("east"), location="eastus")
        await home.create("westhook", receiver.url("west"), location="westeurope")

        async def everywhere() -> bool:
            for node in nodes.values():
                async with http.get(f"{node.url}/georeg/v1/configuration/webhook") as r:
                    if len((await r.json())["objects"]) != 2:
                        return False
            return True

        await eventually(everywhere, timeout=20, what="the webhooks on every node")
        image = make_image(seed=70)
        pushed_at = time.time_ns()
        for blob in image.blobs:
            await push_blob(http, nodes["eastus-2"].url, "app", blob)
        async with http.put(f"{nodes['eastus-2'].url}/v2/app/manifests/v1", data=image.manifest,
                            headers={"Content-Type": OCI_MANIFEST, "User-Agent": "pipeline/3.0",
                                     "X-Request-Id": "zone-push-1"}) as r:
            assert r.status == 201
        await eventually(lambda: len(receiver.payloads("push", "/east")) == 1
                         and len(receiver.payloads("push", "/west")) == 1, timeout=30,
                         what="a push from each region")
        for name, path in (("easthook", "/east"), ("westhook", "/west")):
            hooks = Hooks(http, nodes["eastus-1" if name == "easthook" else "westeurope"].url)
            await pinged(hooks, receiver, name, path)
        east, west = receiver.payloads("push", "/east")[0], receiver.payloads("push", "/west")[0]
        assert east["target"] == west["target"] == {
            "mediaType": OCI_MANIFEST, "size": len(image.manifest), "digest": image.digest,
            "length": len(image.manifest), "repository": "app", "tag": "v1"}
        assert east["id"] != west["id"]
        # The region took the client's push (in its second zone): its webhook
        # reports the client's request; West Europe received a copy.
        assert east["request"] == {"id": "zone-push-1",
                                   "host": nodes["eastus-2"].url.removeprefix("http://"),
                                   "method": "PUT", "useragent": "pipeline/3.0"}
        assert west["request"]["useragent"] == "georeg-replication"
        assert pushed_at <= ns_of(east["timestamp"]) <= ns_of(west["timestamp"])
        assert receiver.actions("/east") == ["push", "ping"]          # one, not one per zone
        assert await Hooks(http, nodes["eastus-2"].url).events("easthook") == []
    finally:
        await stop_cluster(cluster)


def test_the_plan_names_one_delivering_node_per_region_and_the_wan_to_receivers(tmp_path):
    spec = specs.parse({"home_zone_redundant": True, "replicas": [{"region": "westeurope"}],
                        "wan": {"pairs": [{"a": "eastus", "b": "brazilsouth", "rtt_ms": 150}]}})
    cluster_plan = plan(spec.seeded(1).with_port_base(20000), tmp_path)
    views = {node.name: cluster_plan.view(node) for node in cluster_plan.all_nodes}
    delivering = sorted(name for name, view in views.items() if view.webhooks.deliver)
    assert delivering == ["eastus-1", "westeurope"]          # never a paired copy
    east = views["eastus-2"].webhooks.wan_latency_ms
    assert east["brazilsouth"] == 75.0                       # one way: half the round trip
    assert east["westeurope"] == views["westeurope"].webhooks.wan_latency_ms["eastus"] > 0
    assert east["eastus"] < 1 and "japaneast" in east        # any region a receiver may be in
    # A view from before the plan said so: the same rule, read from its zones.
    old = msgspec.structs.replace(views["eastus-2"], webhooks=None)
    assert not old.webhook_settings.deliver
    assert msgspec.structs.replace(views["eastus-1"], webhooks=None).webhook_settings.deliver
