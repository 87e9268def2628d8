"""Webhooks on a running cluster, as issue 17 accepts them: real node
processes, skopeo through the global endpoint, ``georeg webhook`` and
``georeg fault`` as a user types them, and real aiohttp receivers started here.

One cluster for the module, the smallest with a confined region and a replica
that is not: East US (home), West Europe and Brazil South, one node each (so
each region's node is the one that delivers its webhooks), Brazil South
confined as by default, and a ``[webhooks]`` table with a short attempt
timeout and backoff cap, so that retries show within a test. Each test makes
its own webhooks (scoped to its own repositories, deleted at its end) and its
own receivers, and leaves no fault behind.

* a push through the East US endpoint: a ``push`` from East US, one from each
  other region as the copy lands (Brazil South included: East US content may
  go there), then one ``replicated`` per webhook with every region's arrival;
  ACR's payload field by field, the custom headers, scopes, ``ping``, the
  delivering nodes' metrics;
* a push in Brazil South stays there, and so do its events;
* a receiver down then back: each event once, by id, in order; the
  delivering node killed (``kill -9``) with deliveries pending: delivered
  after its restart, and what landed while it was down fires then; a 400:
  failed at once, not retried, in ``list-events``; a receiver that hangs:
  timeouts and retries, while pushes, replication and the region's other
  webhooks go on;
* the home region down: webhook changes refused with the control plane's
  message, deliveries of the other regions go on; ``replicated`` waits for
  the home region's copy and fires once it is back.

A zone-redundant region (its first zone delivers, whichever zone took the
push) is in ``test_webhook_delivery``, on an in-process cluster.

Nothing waits a fixed time: tests wait for what they expect, and "nothing
more arrived" is shown by a ``ping`` delivered afterwards (delivery is in
order per webhook). The receiver down for 20 s (the issue's figure) is the
``soak`` variant of the fast one here.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import re
import time
import uuid
from datetime import datetime, timedelta

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from cluster.control import management_client
from cluster.control import spec as specs
from cluster.testing import RunningCluster
from registry_node.webhook_events import REPLICATION_AGENT

from .helpers import (
    OCI_MANIFEST,
    Skopeo,
    eventually,
    make_image,
    push_image,
    write_oci_layout,
)
from .test_identities import cli, held, on_node

pytestmark = pytest.mark.asyncio(loop_scope="module")

REGIONS = ("eastus", "westeurope", "brazilsouth")
SPEC = specs.ClusterSpec(
    registry="georegwhacc", tier="Premium", home_region="eastus", paired_copies=False,
    replicas=(specs.ReplicaSpec("westeurope"), specs.ReplicaSpec("brazilsouth")),
    # Attempts time out after 2 s, far above what a receiver here takes to
    # answer (a timed-out answer would be delivered twice: at least once),
    # and retries come at most 0.3 s apart, so a hanging or dead receiver
    # shows its retries within a test.
    webhooks=specs.WebhookSpec(timeout_s=2.0, backoff_cap_s=0.3))
HOME_DOWN = "home region eastus holds the control plane"
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z")
PAYLOAD = {"id", "timestamp", "action", "target", "request"}
WAIT = 30.0          # for anything that crosses the cluster; no passing test comes near


def ns_of(stamp: str) -> int:
    """A payload's timestamp (RFC 3339 UTC, nanoseconds) in ns since the epoch."""
    assert TIMESTAMP.fullmatch(stamp), stamp
    return calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) * 10**9 \
        + int(stamp[20:29])


def ns_of_arrival(stamp: str) -> int:
    """An arrival time of ``replicated`` (ISO 8601 UTC, milliseconds, as per-image
    status shows it) in ns since the epoch."""
    when = datetime.fromisoformat(stamp)
    assert when.utcoffset() == timedelta(0), stamp
    return round(when.timestamp() * 1000) * 10**6


# -- the cluster, the receivers, the webhooks ------------------------------------------------


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    with RunningCluster(SPEC, tmp_path_factory.mktemp("whacc")) as c:
        yield c


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(running):
    async with running.http() as session:
        yield session


@pytest.fixture
def healed(running):
    """No fault outlives its test: every one healed, every node answering."""
    yield
    running.run(running.cluster.faults.heal_all)
    running.run(running.cluster.wait_ready)


class Receiver:
    """A webhook receiver on a port of its own: records every request it
    answers (path, headers, JSON), answers ``status``, or hangs while
    ``hang`` is set; ``stop`` and ``start`` again take it down and bring it
    back on the same port."""

    def __init__(self) -> None:
        self.got: list[dict] = []
        self.status = 200
        self.hang = False
        self.port = 0
        self._released = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
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

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def release(self) -> None:
        self.hang = False
        self._released.set()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.hang:
            self._released.clear()
            await self._released.wait()
        self.got.append({"path": request.path.lstrip("/"), "headers": dict(request.headers),
                         "json": json.loads(body)})
        return web.Response(status=self.status, text="refused" if self.status >= 300 else "ok")

    def payloads(self, path: str, action: str | None = None) -> list[dict]:
        return [g["json"] for g in self.got
                if g["path"] == path and (action is None or g["json"]["action"] == action)]

    def requests(self, path: str) -> list[dict]:
        return [g for g in self.got if g["path"] == path]


@pytest_asyncio.fixture(loop_scope="module")
async def receivers():
    """Receivers for the test, each stopped at its end: ``await receivers()``."""
    made: list[Receiver] = []

    async def make() -> Receiver:
        made.append(await Receiver().start())
        return made[-1]

    yield make
    for receiver in made:
        await receiver.stop()


def run(c: RunningCluster, *args: str):
    """``georeg ARGS`` without blocking the loop the receivers answer on."""
    return asyncio.to_thread(cli, c, *args)


async def ok(c: RunningCluster, *args: str):
    code, out, err = await run(c, *args)
    assert code == 0, (args, out, err)
    return json.loads(out) if out.lstrip()[:1] in ("{", "[") else out


@pytest_asyncio.fixture(loop_scope="module")
async def webhooks(running):
    """``await webhooks(name, uri, location, *options)``: ``georeg webhook
    create`` and a wait until its region's node holds it (it fires for what
    lands there from then on); every one deleted at the end of the test."""
    made: list[str] = []

    async def create(name: str, uri: str, location: str, *options: str) -> None:
        await ok(running, "webhook", "create", "-n", name, "--uri", uri,
                 "--location", location, *options)
        made.append(name)
        await eventually(lambda: asyncio.to_thread(held, running, location, "webhook", name),
                         timeout=WAIT, what=f"{name} on {location}")

    yield create
    for name in made:
        await ok(running, "webhook", "delete", "-n", name)


async def events(c: RunningCluster, name: str) -> list[dict]:
    """``georeg webhook list-events --json``: the deliveries, newest first."""
    return await ok(c, "webhook", "list-events", "-n", name, "--json")


async def pinged(c: RunningCluster, receiver: Receiver, name: str, path: str) -> None:
    """A ping sent through the CLI and received: everything its webhook had
    queued before it has been delivered."""
    ident = (await ok(c, "webhook", "ping", "-n", name))["id"]
    await eventually(lambda: any(p["id"] == ident for p in receiver.payloads(path, "ping")),
                     timeout=WAIT, what=f"the ping of {name}")


def metrics_of(c: RunningCluster, node: str) -> str:
    with on_node(c, f"{c.node_url(node)}/metrics") as r:
        return r.read().decode()


def pushes(receiver: Receiver, path: str) -> list[str]:
    """The tags of the pushes ``path`` received, in the order received."""
    return [p["target"].get("tag", "") for p in receiver.payloads(path, "push")]


async def push(http: aiohttp.ClientSession, base: str, repo: str, tag: str, seed: int):
    image = make_image([2000], seed=seed)
    await push_image(http, base, repo, image, tag=tag)
    return image


# -- what fires where -----------------------------------------------------------------------


async def test_a_push_through_east_us_fires_in_each_region_as_it_lands_then_replicated(
        running, http, receivers, webhooks, tmp_path):
    c = running
    hook = await receivers()
    for region in REGIONS:
        await webhooks(f"land{region}", hook.url(region), region, "--actions", "push",
                       "replicated", "--scope", "accept/app:*", "--headers",
                       f"X-Region={region}", f"Authorization=Bearer tok-{region}")
    # Scopes: one tag of the repository, and another repository's latest.
    await webhooks("onlyv2", hook.url("onlyv2"), "eastus", "--actions", "push",
                   "--scope", "accept/app:v2")
    await webhooks("otherlatest", hook.url("otherlatest"), "eastus", "--actions", "push",
                   "--scope", "accept/other")

    image = make_image([300_000, 4000], seed=171)
    layout = tmp_path / "layout"
    write_oci_layout(layout, image, "v1")
    skopeo = Skopeo(tmp_path / "skopeo", c.endpoint("eastus").removeprefix("http://"), c)
    before = time.time_ns()
    await skopeo.copy(f"oci:{layout}:v1", skopeo.ref("accept/app:v1"), "--preserve-digests")
    after = time.time_ns()

    def complete() -> bool:
        return all(len(hook.payloads(r, "replicated")) == 1 for r in REGIONS)

    await eventually(complete, timeout=WAIT, what="a replicated event in every region")
    target = {"mediaType": OCI_MANIFEST, "size": len(image.manifest), "digest": image.digest,
              "length": len(image.manifest), "repository": "accept/app", "tag": "v1"}
    landed: dict[str, dict] = {}
    for region in REGIONS:
        # One push, then one replicated, from each region; nothing else.
        assert [p["action"] for p in hook.payloads(region)] == ["push", "replicated"], region
        sent = hook.requests(region)[0]
        assert sent["headers"]["Content-Type"] == "application/json"
        assert sent["headers"]["X-Region"] == region
        assert sent["headers"]["Authorization"] == f"Bearer tok-{region}"
        pushed = landed[region] = sent["json"]
        assert set(pushed) == PAYLOAD, region
        assert uuid.UUID(pushed["id"]) and pushed["action"] == "push"
        assert pushed["target"] == target, region
        assert set(pushed["request"]) == {"id", "host", "method", "useragent"}
        assert pushed["request"]["method"] == "PUT" and pushed["request"]["id"]
    # East US took the client's push: its request is skopeo's, its time the push's.
    east = landed["eastus"]
    assert before <= ns_of(east["timestamp"]) <= after
    assert east["request"]["useragent"].startswith("skopeo/"), east["request"]
    assert east["request"]["host"] == c.endpoint("eastus").removeprefix("http://")
    # The others received a copy: the registry's request, when it landed there.
    for region in ("westeurope", "brazilsouth"):
        copy = landed[region]["request"]
        assert (copy["host"], copy["useragent"]) == (SPEC.login_server, REPLICATION_AGENT)
        assert ns_of(landed[region]["timestamp"]) >= ns_of(east["timestamp"]), region
    assert len({p["id"] for p in landed.values()}) == 3          # an id per webhook

    # replicated: the push's payload, with each region's arrival; the same
    # arrivals whichever region's webhook reports them.
    arrivals = None
    for region in REGIONS:
        done = hook.payloads(region, "replicated")[0]
        assert set(done) == PAYLOAD | {"replication"}, region
        assert uuid.UUID(done["id"]) and done["id"] != landed[region]["id"]
        assert done["target"] == target and done["request"] == landed[region]["request"]
        assert done["replication"]["failures"] == {}
        arrivals = arrivals or done["replication"]["arrivals"]
        assert done["replication"]["arrivals"] == arrivals, region
        assert ns_of(done["timestamp"]) >= max(ns_of_arrival(t) for t in arrivals.values())
    assert set(arrivals) == set(REGIONS)
    for region in REGIONS:
        # A region's arrival is when its node stored the image, before its
        # push event was fed (East US: before the push was acknowledged).
        arrived = ns_of_arrival(arrivals[region])       # (to the millisecond below)
        assert before - 10**6 <= arrived <= ns_of(landed[region]["timestamp"]), region

    # Scopes: accept/app:v2 and accept/other:latest, each to the webhooks
    # whose scope holds it; what arrives first at a scoped webhook is its own
    # push (delivery is in order: the v1 push would have come before it).
    await push(http, c.endpoint("eastus"), "accept/app", "v2", seed=172)
    await push(http, c.endpoint("eastus"), "accept/other", "latest", seed=173)
    await eventually(lambda: pushes(hook, "onlyv2") and pushes(hook, "otherlatest"),
                     timeout=WAIT, what="the scoped pushes")
    for region in REGIONS:
        await eventually(lambda r=region: pushes(hook, r) == ["v1", "v2"]
                         and len(hook.payloads(r, "replicated")) == 2, timeout=WAIT,
                         what=f"v2 pushed and replicated in {region}")
    await pinged(c, hook, "onlyv2", "onlyv2")
    await pinged(c, hook, "otherlatest", "otherlatest")
    assert pushes(hook, "onlyv2") == ["v2"]
    assert [(p["target"]["repository"], p["target"]["tag"])
            for p in hook.payloads("otherlatest", "push")] == [("accept/other", "latest")]
    assert not hook.payloads("onlyv2", "replicated")    # not among its actions

    # Each region's delivering node counts its deliveries and their latency.
    for region in REGIONS:
        text = await asyncio.to_thread(metrics_of, c, region)
        delivered = 'georeg_webhook_deliveries_total{attempt="1",outcome="delivered",' \
                    f'webhook="land{region}"}} 4.0'           # v1, v2: push and replicated
        assert delivered in text, region
        assert f'georeg_webhook_delivery_latency_seconds_count{{webhook="land{region}"}} 4.0' \
            in text, region


async def test_what_is_pushed_in_brazil_south_stays_there_and_so_do_its_events(
        running, http, receivers, webhooks):
    c = running
    hook = await receivers()
    for region in REGIONS:
        await webhooks(f"stay{region}", hook.url(region), region, "--actions", "push",
                       "replicated", "--scope", "confined/app:*")
    image = await push(http, c.endpoint("brazilsouth"), "confined/app", "v1", seed=174)
    await eventually(lambda: hook.payloads("brazilsouth", "replicated"), timeout=WAIT,
                     what="replicated in brazilsouth")
    assert [p["action"] for p in hook.payloads("brazilsouth")] == ["push", "replicated"]
    pushed, done = hook.payloads("brazilsouth")
    assert pushed["target"]["digest"] == done["target"]["digest"] == image.digest
    # Complete once Brazil South has it: residency allows it nowhere else.
    assert set(done["replication"]["arrivals"]) == {"brazilsouth"}
    assert done["replication"]["failures"] == {}
    for region in ("eastus", "westeurope"):
        async with http.get(f"{c.regional_endpoint(region)}/v2/confined/app/manifests/v1") as r:
            assert r.status == 404, region
        await pinged(c, hook, f"stay{region}", region)
        assert hook.payloads(region) == [p for p in hook.payloads(region)
                                         if p["action"] == "ping"], region


# -- faults -------------------------------------------------------------------------------------


async def receiver_down_then_back(c: RunningCluster, http: aiohttp.ClientSession,
                                  receivers, webhooks, down_s: float) -> None:
    hook = await receivers()
    await webhooks("downwe1", hook.url("down"), "westeurope", "--actions", "push",
                   "--scope", "down/app:*")
    await hook.stop()
    went_down = time.monotonic()
    tags = [f"t{i}" for i in range(1, 5)]
    for i, tag in enumerate(tags):
        await push(http, c.endpoint("eastus"), "down/app", tag, seed=180 + i)

    async def retrying() -> bool:
        pending = await events(c, "downwe1")
        heads = [e for e in pending if e["state"] == "pending" and len(e["attempts"]) >= 2]
        return len(pending) == len(tags) and bool(heads) \
            and time.monotonic() - went_down >= down_s
    await eventually(retrying, timeout=WAIT + down_s, interval=0.2,
                     what="the copies' events pending, the first retried")
    head = (await events(c, "downwe1"))[-1]
    assert all(a["status"] is None and a["error"] for a in head["attempts"]), head["attempts"]

    await hook.start()                                   # back, on the same port
    await eventually(lambda: len(pushes(hook, "down")) == len(tags), timeout=WAIT,
                     what="every event delivered")
    await pinged(c, hook, "downwe1", "down")
    got = hook.payloads("down", "push")
    assert pushes(hook, "down") == tags                  # in order, each once
    assert len({p["id"] for p in got}) == len(tags)
    shown = {e["id"]: e for e in await events(c, "downwe1")}
    assert all(shown[p["id"]]["state"] == "delivered" for p in got)
    retried = shown[got[0]["id"]]
    assert retried["attempts"][-1]["status"] == 200 and len(retried["attempts"]) >= 3


async def test_a_receiver_down_then_back_gets_every_event_once_in_order(
        running, http, receivers, webhooks):
    await receiver_down_then_back(running, http, receivers, webhooks, down_s=0)


@pytest.mark.soak
async def test_a_receiver_down_for_20_s_then_back_gets_every_event_once_in_order(
        running, http, receivers, webhooks):
    await receiver_down_then_back(running, http, receivers, webhooks, down_s=20)


async def test_deliveries_pending_when_the_delivering_node_is_killed_go_out_after_restart(
        running, http, receivers, webhooks, healed):
    c = running
    hook = await receivers()
    await webhooks("killwe1", hook.url("kill"), "westeurope", "--actions", "push",
                   "--scope", "kill/app:*")
    # Another webhook for what lands while the node is down: nothing new for
    # the first one, whose pending events go out after the restart on their own.
    await webhooks("killwe2", hook.url("late"), "westeurope", "--actions", "push",
                   "--scope", "kill/late:*")
    await hook.stop()
    for i, tag in enumerate(("k1", "k2", "k3")):
        await push(http, c.endpoint("eastus"), "kill/app", tag, seed=190 + i)

    async def pending() -> bool:
        shown = await events(c, "killwe1")
        return len(shown) == 3 and all(e["state"] == "pending" for e in shown) \
            and shown[-1]["attempts"]
    await eventually(pending, timeout=WAIT, interval=0.2, what="three events pending")
    fault = await ok(c, "fault", "region-outage", "westeurope", "--mode", "crash")
    fault_id = fault.split(":")[0]
    # A push made while it is down reaches it after its restart, and fires there.
    await push(http, c.endpoint("eastus"), "kill/late", "k4", seed=194)
    await hook.start()
    await ok(c, "fault", "heal", fault_id)
    await eventually(lambda: len(pushes(hook, "kill")) == 3 and pushes(hook, "late"),
                     timeout=WAIT, what="the deliveries after the restart")
    await pinged(c, hook, "killwe1", "kill")
    await pinged(c, hook, "killwe2", "late")
    assert pushes(hook, "kill") == ["k1", "k2", "k3"] and pushes(hook, "late") == ["k4"]
    assert len({p["id"] for p in hook.payloads("kill", "push")}) == 3
    assert all(e["state"] == "delivered" for e in await events(c, "killwe1"))


async def test_a_receiver_answering_400_is_not_retried_and_list_events_shows_it(
        running, http, receivers, webhooks):
    c = running
    hook = await receivers()
    hook.status = 400
    await webhooks("refused1", hook.url("refuse"), "eastus", "--actions", "push",
                   "--scope", "refuse/app:*")
    await push(http, c.endpoint("eastus"), "refuse/app", "v1", seed=200)

    async def failed() -> dict | None:
        return next((e for e in await events(c, "refused1") if e["state"] == "failed"), None)
    await eventually(failed, timeout=WAIT, what="the event failed")
    event = await failed()
    assert event["action"] == "push" and len(event["attempts"]) == 1
    assert event["attempts"][0]["status"] == 400
    assert event["eventResponseMessage"]["statusCode"] == 400
    assert event["eventResponseMessage"]["content"] == "refused"
    assert event["eventRequestMessage"]["content"]["target"]["tag"] == "v1"
    code, table, _ = await run(c, "webhook", "list-events", "-n", "refused1")
    assert code == 0 and "failed" in table and event["id"] in table

    # The receiver accepts again: the next event goes, the failed one never again.
    hook.status = 200
    await push(http, c.endpoint("eastus"), "refuse/app", "v2", seed=201)
    await eventually(lambda: "v2" in pushes(hook, "refuse"), timeout=WAIT,
                     what="the next event delivered")
    await pinged(c, hook, "refused1", "refuse")
    assert pushes(hook, "refuse") == ["v1", "v2"]        # v1 once: answered 400
    assert [e["state"] for e in await events(c, "refused1")] == \
        ["delivered", "delivered", "failed"]


async def test_a_hanging_receiver_times_out_and_is_retried_while_everything_else_goes_on(
        running, http, receivers, webhooks):
    c = running
    hanging, beside = await receivers(), await receivers()
    hanging.hang = True
    await webhooks("hangs1", hanging.url("hang"), "eastus", "--actions", "push",
                   "--scope", "hang/app:*")
    await webhooks("beside1", beside.url("beside"), "eastus", "--actions", "push",
                   "--scope", "hang/app:*")
    tags = ["h1", "h2", "h3"]
    for i, tag in enumerate(tags):                 # each push answered 201 (push_image asserts)
        await push(http, c.endpoint("eastus"), "hang/app", tag, seed=210 + i)
    # The region's other webhook delivers everything, replication carries on.
    await eventually(lambda: pushes(beside, "beside") == tags, timeout=WAIT,
                     what="the other webhook's deliveries")
    for tag in tags:
        async with http.head(f"{c.regional_endpoint('westeurope')}/v2/hang/app/manifests/"
                             f"{tag}") as r:
            assert r.status == 200, tag

    async def timed_out() -> bool:
        head = (await events(c, "hangs1"))[-1]
        return len(head["attempts"]) >= 2
    await eventually(timed_out, timeout=WAIT, interval=0.2, what="two attempts timed out")
    head = (await events(c, "hangs1"))[-1]
    assert head["state"] == "pending"
    assert all(a["status"] is None and "timeout" in a["error"] for a in head["attempts"])
    assert not hanging.got                          # nothing answered yet

    hanging.release()
    await eventually(lambda: set(pushes(hanging, "hang")) == set(tags), timeout=WAIT,
                     what="the hanging webhook's deliveries")
    # At least once: an attempt that timed out may have reached the receiver
    # too; by id, each event once more or less, in order of first arrival.
    ids = list(dict.fromkeys(p["id"] for p in hanging.payloads("hang", "push")))
    first = {p["id"]: p["target"]["tag"] for p in hanging.payloads("hang", "push")}
    assert [first[i] for i in ids] == tags


async def test_home_region_down_refuses_webhook_changes_and_other_regions_deliver(
        running, http, receivers, webhooks, healed):
    c = running
    hook = await receivers()
    for region in ("westeurope", "brazilsouth"):
        await webhooks(f"away{region}", hook.url(region), region, "--actions", "push",
                       "replicated", "--scope", "away/app:*")
    fault = await ok(c, "fault", "region-outage", "eastus", "--mode", "crash")
    for args in (("create", "-n", "later1", "--uri", hook.url("x"), "--actions", "push",
                  "--location", "westeurope"),
                 ("update", "-n", "awaywesteurope", "--status", "disabled"),
                 ("delete", "-n", "awaybrazilsouth")):
        code, _, err = await run(c, "webhook", *args)
        assert code == 2 and HOME_DOWN in err, (args, err)
    # A push in West Europe fires there and, as its copy lands, in Brazil South.
    await push(http, c.endpoint("westeurope"), "away/app", "v1", seed=220)
    for region in ("westeurope", "brazilsouth"):
        await eventually(lambda r=region: pushes(hook, r) == ["v1"], timeout=WAIT,
                         what=f"the push in {region}")
    assert [e["state"] for e in await events(c, "awaywesteurope")] == ["delivered"]
    # Not replicated while a region residency allows the image in is down:
    # replicated waits for it, and fires once it has the image too.
    assert not hook.payloads("westeurope", "replicated")
    healing = time.time_ns()
    await ok(c, "fault", "heal", fault.split(":")[0])
    await asyncio.to_thread(c.run, c.cluster.wait_ready)
    for region in ("westeurope", "brazilsouth"):
        await eventually(lambda r=region: hook.payloads(r, "replicated"), timeout=WAIT,
                         what=f"replicated in {region} after the heal")
        assert [p["action"] for p in hook.payloads(region)] == ["push", "replicated"]
        arrivals = hook.payloads(region, "replicated")[0]["replication"]["arrivals"]
        assert set(arrivals) == set(REGIONS)
        assert ns_of_arrival(arrivals["eastus"]) >= healing - 10**6, arrivals
    names = {w["name"] for w in await asyncio.to_thread(
        management_client.list_webhooks, c.management_url, c.owner_headers())}
    assert {"awaywesteurope", "awaybrazilsouth"} <= names and "later1" not in names
