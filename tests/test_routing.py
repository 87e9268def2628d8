"""The routing layer: policies without sockets (injected health, latency and
clock), then the proxy with real servers on loopback — small aiohttp apps that
say which backend they are, and real georeg nodes (in-process and child
processes) — and skopeo pushing and pulling through it.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import inspect
import json
import os
import random
import shutil
import signal
import time
import uuid
from pathlib import Path

import aiohttp
import httptools
import pytest
from aiohttp import web

from cluster.routing.policy import (
    GlobalPolicy,
    NodeEndpoint,
    NodeHealth,
    RegionalPolicy,
    ReplicaGroup,
    Replicas,
    RequestRoute,
    UploadAffinity,
    ZoneSpread,
    route_of,
    upload_id_of,
)
from cluster.routing.probe import HealthProbe
from cluster.routing.proxy import RoutingProxy
from cluster.routing.splice import PIPE_SIZE, PipePool
from cluster.routing.stream import HeadTooLarge, MessageStream
from registry_node.config import NodeConfig

from .helpers import (
    OCI_CONFIG,
    OCI_MANIFEST,
    Image,
    NodeProcess,
    descriptor,
    digest_of,
    eventually,
    make_image,
    push_image,
    start_node,
    tar_layer,
    write_oci_layout,
)
from .proxy_process import ProxyProcess

MIB = 1 << 20

# One-way latencies (ms) from client regions to replica regions, for the policies.
LATENCY = {
    ("eastus", "eastus"): 1, ("eastus", "westus"): 30, ("eastus", "westeurope"): 40,
    ("westus", "westus"): 1, ("westus", "eastus"): 30, ("westus", "westeurope"): 70,
    ("westeurope", "westeurope"): 1, ("westeurope", "eastus"): 40, ("westeurope", "westus"): 70,
}


def latency(client: str, replica: str) -> float:
    return LATENCY[client, replica]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def node(name: str, region: str, zone: str = "", port: int = 1) -> NodeEndpoint:
    return NodeEndpoint(name, region, zone, "127.0.0.1", port)


def topology() -> Replicas:
    return Replicas([
        ReplicaGroup("eastus", tuple(node(f"eastus-{z}", "eastus", z) for z in "123")),
        ReplicaGroup("westus", (node("westus", "westus"),)),
        ReplicaGroup("westeurope", (node("westeurope", "westeurope"),)),
    ])


def names(nodes) -> list[str]:
    return [n.name for n in nodes]


# -- policies (no sockets) ------------------------------------------------------------


def test_global_policy_orders_replicas_nearest_first():
    replicas, health = topology(), NodeHealth()
    policy = GlobalPolicy("westeurope", replicas, latency, health)
    order = names(policy.candidates(RequestRoute("app")))
    assert order[0] == "westeurope"
    assert sorted(order[1:4]) == ["eastus-1", "eastus-2", "eastus-3"]
    assert order[4] == "westus"
    assert names(GlobalPolicy("westus", replicas, latency, health).candidates(RequestRoute()))[0] \
        == "westus"


def test_global_policy_skips_unhealthy_and_disabled_at_once_and_restores_them():
    clock = FakeClock()
    replicas, health = topology(), NodeHealth(clock=clock)
    policy = GlobalPolicy("westus", replicas, latency, health, clock=clock)
    assert names(policy.candidates(RequestRoute("a")))[0] == "westus"
    health.mark_down("westus", "connect refused")
    assert "westus" not in names(policy.candidates(RequestRoute("a")))
    health.report("westus", True)
    replicas.set_routing("westus", False)      # the ranking is cached; a flag change drops it
    order = names(policy.candidates(RequestRoute("a")))
    assert "westus" not in order and order[0].startswith("eastus-")
    replicas.set_routing("westus", True)
    assert names(policy.candidates(RequestRoute("a")))[0] == "westus"


def test_global_policy_reranks_when_latencies_change_after_its_ttl():
    clock, table = FakeClock(), dict(LATENCY)
    replicas = topology()
    policy = GlobalPolicy("westus", replicas, lambda c, r: table[c, r], NodeHealth(),
                          rank_ttl_s=1.0, clock=clock)
    assert policy.ranked()[0].region == "westus"
    table["westus", "westus"] = 500            # a degraded link
    assert policy.ranked()[0].region == "westus"
    clock.now += 1.0
    assert policy.ranked()[0].region == "eastus"


def test_zones_follow_the_repository_and_spread_across_repositories():
    policy = GlobalPolicy("eastus", topology(), latency, NodeHealth())
    first = {names(policy.candidates(RequestRoute(f"repo{i}")))[0] for i in range(40)}
    assert first == {"eastus-1", "eastus-2", "eastus-3"}
    for _ in range(5):   # stable for one repository
        assert names(policy.candidates(RequestRoute("app/web")))[:3] == \
            names(policy.candidates(RequestRoute("app/web")))[:3]


def test_zone_failure_moves_only_that_zones_repositories():
    health = NodeHealth()
    policy = GlobalPolicy("eastus", topology(), latency, health)
    before = {f"r{i}": names(policy.candidates(RequestRoute(f"r{i}")))[0] for i in range(60)}
    health.report("eastus-2", False, "stopped")
    after = {r: names(policy.candidates(RequestRoute(r)))[0] for r in before}
    for repo, zone in before.items():
        if zone != "eastus-2":
            assert after[repo] == zone                      # rendezvous hashing: no reshuffle
        else:
            assert after[repo] in ("eastus-1", "eastus-3")


def test_rotation_spreads_requests_over_zones():
    replicas = topology()
    policy = RegionalPolicy(replicas.get("eastus"), NodeHealth(), zone_spread=ZoneSpread.ROTATE)
    firsts = [names(policy.candidates(RequestRoute("app")))[0] for _ in range(6)]
    assert sorted(firsts) == ["eastus-1", "eastus-1", "eastus-2", "eastus-2", "eastus-3",
                              "eastus-3"]
    # Requests without a repository always rotate.
    policy = RegionalPolicy(replicas.get("eastus"), NodeHealth())
    assert len({names(policy.candidates(RequestRoute()))[0] for _ in range(3)}) == 3


def test_pinned_upload_node_comes_first_even_with_routing_disabled():
    replicas, health = topology(), NodeHealth()
    policy = GlobalPolicy("westus", replicas, latency, health)
    replicas.set_routing("eastus", False)
    order = names(policy.candidates(RequestRoute("app", "u1"), pinned="eastus-2"))
    assert order[0] == "eastus-2" and order.count("eastus-2") == 1
    assert "eastus-1" not in order                       # still not routable otherwise
    health.mark_down("eastus-2", "refused")              # a dead session node: route normally
    assert names(policy.candidates(RequestRoute("app", "u1"), pinned="eastus-2")) == \
        ["westus", "westeurope"]
    assert names(policy.candidates(RequestRoute("app", "u1"), pinned="gone")) == \
        ["westus", "westeurope"]


def test_regional_policy_stays_in_its_region():
    replicas, health = topology(), NodeHealth()
    replicas.set_routing("eastus", False)                # regional endpoints ignore the flag
    policy = RegionalPolicy(replicas.get("eastus"), health)
    assert sorted(names(policy.candidates(RequestRoute("a")))) == \
        ["eastus-1", "eastus-2", "eastus-3"]
    assert "westus" not in names(policy.candidates(RequestRoute("a"), pinned="westus"))
    for z in "123":
        health.report(f"eastus-{z}", False, f"zone {z} down")
    assert policy.candidates(RequestRoute("a")) == []
    why = policy.unavailable()
    assert "eastus" in why.message and why.detail["nodes"]["eastus-2"] == "zone 2 down"


def test_global_unavailable_says_why_per_replica():
    replicas, health = topology(), NodeHealth()
    policy = GlobalPolicy("eastus", replicas, latency, health)
    replicas.set_routing("westus", False)
    for n in ("eastus-1", "eastus-2", "eastus-3", "westeurope"):
        health.report(n, False, "crashed")
    assert policy.candidates(RequestRoute()) == []
    detail = policy.unavailable().detail
    assert detail["replicas"]["westus"] == "routing disabled"
    assert detail["replicas"]["eastus"]["eastus-1"] == "crashed"


def test_a_node_moved_to_a_new_address_is_swapped_in_place():
    replicas = topology()
    regional = RegionalPolicy(replicas.get("eastus"), NodeHealth(),
                              zone_spread=ZoneSpread.ROTATE)
    glob = GlobalPolicy("eastus", replicas, latency, NodeHealth())
    replicas.update_node(node("eastus-2", "eastus", "2", port=9999))
    for policy in (regional, glob):
        ports = {n.name: n.port for n in policy.candidates(RequestRoute())}
        assert ports["eastus-2"] == 9999 and ports["eastus-1"] == 1
    with pytest.raises(ValueError, match="remove and add"):
        replicas.update_node(node("eastus-2", "westus", "", port=1))
    with pytest.raises(KeyError):
        replicas.update_node(node("nowhere", "eastus", "4"))


def test_node_health_passive_marks_expire_reports_do_not():
    clock = FakeClock()
    health = NodeHealth(passive_hold_s=5, clock=clock)
    assert health.healthy("a") and health.down() == {}
    health.mark_down("a", "refused")
    assert not health.healthy("a") and health.reason("a") == "refused"
    clock.now += 5
    assert health.healthy("a")
    health.report("b", False, "probe timed out")
    clock.now += 3600
    assert health.down() == {"b": "probe timed out"}
    health.mark_down("b", "refused")
    health.report("b", True)                 # an authoritative "up" clears passive marks too
    assert health.healthy("b")


def test_upload_affinity_is_bounded_and_expires():
    clock = FakeClock()
    affinity = UploadAffinity(max_entries=3, ttl_s=10, clock=clock)
    for i in range(3):
        affinity.remember(f"u{i}", f"n{i}")
    assert affinity.node_for("u0") == "n0"        # u0 is now the most recently used
    affinity.remember("u3", "n3")
    assert len(affinity) == 3 and affinity.node_for("u1") is None
    clock.now += 9
    assert affinity.node_for("u3") == "n3"        # use refreshes
    clock.now += 2
    assert affinity.node_for("u0") is None and affinity.node_for("u3") == "n3"
    affinity.forget("u3")
    assert affinity.node_for("u3") is None


def test_routes_of_request_paths():
    assert route_of("/v2/") == RequestRoute()
    assert route_of("/v2/_catalog") == RequestRoute()
    assert route_of("/v2/a/b/manifests/latest") == RequestRoute("a/b")
    assert route_of("/v2/a/blobs/b/blobs/sha256:00") == RequestRoute("a/blobs/b", blob=True)
    assert route_of("/v2/a/b/blobs/sha256:00/x") == RequestRoute("a/b")
    assert route_of("/v2/a/b/manifests/sha256:00") == RequestRoute("a/b")
    assert route_of("/v2/a/b/blobs/uploads/") == RequestRoute("a/b")
    assert route_of("/v2/a/b/blobs/uploads/0f3e") == RequestRoute("a/b", "0f3e")
    assert upload_id_of("/v2/a/blobs/uploads/xyz?_state=1") == "xyz"
    assert upload_id_of("https://r.example/v2/a/blobs/uploads/xyz") == "xyz"
    assert upload_id_of("/v2/a/blobs/sha256:00") is None


# -- cutting a byte stream into messages (no sockets) ----------------------------------


class Recorder:
    """A parser owner as the proxy's are: reports to its ``MessageStream``."""

    def __init__(self) -> None:
        self.events: list = []
        self.stream = MessageStream(lambda: httptools.HttpRequestParser(self), self.on_body,
                                     self.on_message_complete, 1 << 16)

    def on_message_begin(self):
        self.stream.begun()

    def on_url(self, url):
        self.events.append(("url", url))

    def on_headers_complete(self):
        length = None
        if self.stream.parser.get_method() == b"PUT":
            length = 10
        self.events.append("head")
        self.stream.headers_done(length)

    def on_body(self, data):
        if self.events and isinstance(self.events[-1], bytes):
            self.events[-1] += bytes(data)
        else:
            self.events.append(bytes(data))

    def on_message_complete(self):
        self.stream.ended()
        self.events.append("end")


WIRE = (b"PUT /a HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789"
        b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n"
        b"PUT /d HTTP/1.1\r\nContent-Length: 10\r\n\r\nABCDEFGHIJ")
EXPECTED = [("url", b"/a"), "head", b"0123456789", "end", ("url", b"/b"), "head", b"abc", "end",
            ("url", b"/c"), "head", "end", ("url", b"/d"), "head", b"ABCDEFGHIJ", "end"]


def merged(events: list) -> list:
    out: list = []
    for e in events:
        if out and isinstance(e, tuple) and isinstance(out[-1], tuple) and e[0] == out[-1][0]:
            out[-1] = (e[0], out[-1][1] + e[1])
        else:
            out.append(e)
    return out


@pytest.mark.parametrize("cut", range(1, len(WIRE)))
def test_message_stream_cuts_anywhere(cut):
    r = Recorder()
    r.stream.feed(WIRE[:cut])
    r.stream.feed(WIRE[cut:])
    assert merged(r.events) == EXPECTED


def test_message_stream_byte_by_byte_and_all_at_once():
    for pieces in ([WIRE[i:i + 1] for i in range(len(WIRE))], [WIRE]):
        r = Recorder()
        for piece in pieces:
            r.stream.feed(piece)
        assert merged(r.events) == EXPECTED


def test_message_stream_refuses_an_endless_head():
    r = Recorder()
    r.stream.feed(b"GET /" + b"a" * 60000)
    with pytest.raises(HeadTooLarge):
        r.stream.feed(b"a" * 10000)


# -- backends: small real servers ------------------------------------------------------


class Backend:
    """An aiohttp server standing in for a node: it says who it is (body and
    ``X-Backend``), streams bodies of any size both ways, runs upload sessions
    the way the registry does, throttles on request, and records the client
    connections and request headers it saw."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.uploads: dict[str, int] = {}
        self.peers: set[tuple] = set()
        self.headers: list[dict[str, str]] = []
        self.streamed = 0                      # bytes /v2/stream has written so far
        self.sink_open = asyncio.Event()       # /v2/sink?hold=1 reads nothing until set
        self.runner: web.AppRunner | None = None

    async def start(self, port: int = 0) -> Backend:
        app = web.Application()
        app.middlewares.append(self._record)
        app.router.add_get("/v2/", self.hello)
        app.router.add_get("/v2/{name:.+}/manifests/{ref}", self.hello)
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self.blob)
        app.router.add_post("/v2/{name:.+}/blobs/uploads/", self.start_upload)
        app.router.add_patch("/v2/{name:.+}/blobs/uploads/{uuid}", self.patch_upload)
        app.router.add_put("/v2/{name:.+}/blobs/uploads/{uuid}", self.finish_upload)
        # Test routes live under /v2/ too: endpoints forward only the registry's API.
        app.router.add_route("*", "/v2/sink", self.sink)
        app.router.add_get("/v2/stream", self.stream)
        app.router.add_get("/v2/throttled", self.throttled)
        app.router.add_get("/v2/die", self.die)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def endpoint(self, region: str, zone: str = "") -> NodeEndpoint:
        return NodeEndpoint(self.name, region, zone, "127.0.0.1", self.port)

    @web.middleware
    async def _record(self, request, handler):
        self.peers.add(request.transport.get_extra_info("peername"))
        self.headers.append(dict(request.headers))
        response = await handler(request)
        response.headers["X-Backend"] = self.name
        return response

    async def hello(self, request):
        return web.json_response({"backend": self.name, "path": request.path})

    async def blob(self, request):
        if "X-Georeg-Redirect" in request.headers:       # as a node with auth answers it
            return web.Response(status=307, headers={
                "Location": f"http://127.0.0.1:{self.port}{request.path}?grant={self.name}"})
        size = int(request.query.get("size", "0"))
        return web.Response(body=b"".join(pattern(size)), headers={
            "Docker-Content-Digest": request.match_info["digest"]})

    async def start_upload(self, request):
        upload = uuid.uuid4().hex
        self.uploads[upload] = 0
        return web.Response(status=202, headers={
            "Location": f"/v2/{request.match_info['name']}/blobs/uploads/{upload}",
            "Docker-Upload-UUID": upload, "Range": "0-0"})

    async def patch_upload(self, request):
        upload = request.match_info["uuid"]
        if upload not in self.uploads:
            return web.json_response({"errors": [{"code": "BLOB_UPLOAD_UNKNOWN",
                                                  "message": "unknown"}]}, status=404)
        async for piece in request.content.iter_any():
            self.uploads[upload] += len(piece)
        return web.Response(status=202, headers={
            "Location": f"/v2/{request.match_info['name']}/blobs/uploads/{upload}",
            "Docker-Upload-UUID": upload, "Range": f"0-{self.uploads[upload] - 1}"})

    async def finish_upload(self, request):
        upload = request.match_info["uuid"]
        if self.uploads.pop(upload, None) is None:
            return web.json_response({"errors": [{"code": "BLOB_UPLOAD_UNKNOWN",
                                                  "message": "unknown"}]}, status=404)
        return web.Response(status=201, headers={"Docker-Content-Digest": request.query["digest"]})

    async def sink(self, request):
        if request.query.get("hold"):
            await self.sink_open.wait()
        digest, size = hashlib.sha256(), 0
        async for piece in request.content.iter_any():
            digest.update(piece)
            size += len(piece)
        return web.json_response({"size": size, "sha256": digest.hexdigest(),
                                  "transfer_encoding": request.headers.get("Transfer-Encoding")})

    async def stream(self, request):
        size = int(request.query["size"])
        response = web.StreamResponse()
        if request.query.get("chunked"):
            response.enable_chunked_encoding()
        else:
            response.content_length = size
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        for piece in pattern(size, piece=64 * 1024):
            await response.write(piece)
            self.streamed += len(piece)
        await response.write_eof()
        return response

    async def throttled(self, request):
        return web.json_response({"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]},
                                 status=429, headers={"Retry-After": "7"})

    async def die(self, request):
        response = web.StreamResponse()
        response.content_length = 8 * MIB
        await response.prepare(request)
        await response.write(b"x" * MIB)
        request.transport.abort()
        return response


def pattern(size: int, piece: int = MIB):
    """``size`` deterministic bytes, in pieces (never all in memory)."""
    block = hashlib.sha256(b"georeg").digest() * (piece // 32)
    sent = 0
    while sent < size:
        n = min(piece, size - sent)
        yield block[:n]
        sent += n


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern(size):
        digest.update(piece)
    return digest.hexdigest()


class Cluster:
    """Backends as replicas, and proxies over them (made with ``proxy_options``
    unless a call says otherwise); ``close()`` stops everything."""

    def __init__(self, **proxy_options) -> None:
        # Client, proxies and backends share this test's one event loop, so a
        # connect that the kernel completes at once is seen only when the loop
        # next runs: on a busy machine that can be more than the proxy's 1 s
        # connect timeout, which in a cluster measures another process. No
        # test here is about connect timeouts; none may fail on one.
        proxy_options.setdefault("connect_timeout_s", 30.0)
        self.proxy_options = proxy_options
        self.backends: dict[str, Backend] = {}
        self.replicas = Replicas()
        self.health = NodeHealth()
        self.affinity = UploadAffinity()
        self.proxies: list[RoutingProxy] = []

    async def add(self, region: str, zones: str = "") -> list[Backend]:
        started = []
        for zone in zones or [""]:
            backend = await Backend(f"{region}-{zone}" if zone else region).start()
            self.backends[backend.name] = backend
            started.append(backend)
        self.replicas.add(ReplicaGroup(region, tuple(b.endpoint(region, z)
                                                     for b, z in zip(started, zones or [""],
                                                                     strict=True))))
        return started

    async def global_endpoint(self, client_region: str, **options) -> RoutingProxy:
        proxy = RoutingProxy.global_endpoint(client_region, self.replicas, latency, self.health,
                                             self.affinity, **{**self.proxy_options, **options})
        await proxy.start()
        self.proxies.append(proxy)
        return proxy

    async def regional_endpoint(self, region: str, **options) -> RoutingProxy:
        proxy = RoutingProxy.regional_endpoint(self.replicas.get(region), self.health,
                                               self.affinity, **{**self.proxy_options, **options})
        await proxy.start()
        self.proxies.append(proxy)
        return proxy

    async def close(self) -> None:
        for proxy in self.proxies:
            await proxy.stop()
        for backend in self.backends.values():
            await backend.stop()
        # Whatever a test did, no exchange tried a move its lifecycle does not hold.
        assert [p.illegal_transitions for p in self.proxies] == [0] * len(self.proxies)


# How a counted body crosses the proxy: socket to socket in the kernel (the default)
# or copied through the event loop (small bodies, and when splicing is unavailable).
BODY_PATHS = {"kernel": {}, "copy": {"splice_min": None}}


@pytest.fixture(params=list(BODY_PATHS))
async def cluster(request):
    c = Cluster(**BODY_PATHS[request.param])
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def client():
    """One keep-alive connection, as a registry client uses it."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                     auto_decompress=False) as session:
        yield session


async def who(session: aiohttp.ClientSession, url: str, path: str = "/v2/app/manifests/x") -> str:
    async with session.get(url + path) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
        assert r.headers["X-Georeg-Replica"] == body["backend"] == r.headers["X-Backend"]
        return body["backend"]


# -- the proxy -----------------------------------------------------------------------


async def test_global_endpoint_routes_to_nearest_and_counts(cluster, client):
    await cluster.add("eastus")
    await cluster.add("westus")
    east = await cluster.global_endpoint("eastus")
    west = await cluster.global_endpoint("westus")
    for _ in range(3):
        assert await who(client, east.url) == "eastus"
        assert await who(client, west.url) == "westus"
    assert east.requests_by_backend == {"eastus": 3}
    assert west.requests_by_backend == {"westus": 3}


async def test_keep_alive_reuses_one_connection_each_side(cluster, client):
    (backend,) = await cluster.add("eastus")
    proxy = await cluster.global_endpoint("eastus")
    for _ in range(20):
        assert await who(client, proxy.url) == "eastus"
    assert len(backend.peers) == 1                     # one pooled backend connection
    assert len(proxy._clients) == 1                    # one client connection
    # Hop-by-hop headers stay on their hop; the client's address is forwarded.
    async with client.get(proxy.url + "/v2/", headers={"Connection": "keep-alive, X-Hop",
                                                       "X-Hop": "1"}) as r:
        assert r.status == 200 and "Connection" not in r.headers
    seen = backend.headers[-1]
    assert "X-Hop" not in seen and "Connection" not in seen
    assert seen["X-Forwarded-For"] == "127.0.0.1"


async def test_failover_when_the_nearest_backend_dies(cluster, client):
    (east,) = await cluster.add("eastus")
    await cluster.add("westus")
    proxy = await cluster.global_endpoint("eastus")
    assert await who(client, proxy.url) == "eastus"
    await east.stop()                                  # its port now refuses connections
    assert await who(client, proxy.url) == "westus"    # the very next request, no error
    assert not cluster.health.healthy("eastus")
    assert "refused" in cluster.health.reason("eastus").lower() or \
        "connect" in cluster.health.reason("eastus")
    assert proxy.failovers == 1
    # Back on another port, and reported healthy: routing returns to it.
    await east.start()
    cluster.replicas.update_node(east.endpoint("eastus"))
    cluster.health.report("eastus", True)
    assert await who(client, proxy.url) == "eastus"


async def test_routing_disabled_moves_new_requests_and_back(cluster, client):
    await cluster.add("eastus")
    await cluster.add("westus")
    proxy = await cluster.global_endpoint("eastus")
    regional = await cluster.regional_endpoint("eastus")
    assert await who(client, proxy.url) == "eastus"
    cluster.replicas.set_routing("eastus", False)
    assert await who(client, proxy.url) == "westus"
    assert await who(client, regional.url) == "eastus"   # a regional endpoint still pins it
    cluster.replicas.set_routing("eastus", True)
    assert await who(client, proxy.url) == "eastus"
    assert proxy.failovers == 0


async def test_429_passes_through_without_failover(cluster, client):
    await cluster.add("eastus")
    await cluster.add("westus")
    proxy = await cluster.global_endpoint("eastus")
    for _ in range(3):
        async with client.get(proxy.url + "/v2/throttled") as r:
            assert r.status == 429 and r.headers["Retry-After"] == "7"
            assert r.headers["X-Georeg-Replica"] == "eastus"
            assert (await r.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert cluster.health.healthy("eastus") and proxy.failovers == 0
    assert proxy.requests_by_backend == {"eastus": 3}


BLOB = "/v2/app/blobs/sha256:" + "ab" * 32


async def test_redirected_blob_downloads_go_to_the_routed_node(client):
    """With redirect_blobs (blob_downloads = "redirect"), a blob GET gets a 307 to the
    node routing picks, decided by the proxy alone; everything else, HEAD of
    that blob included, is relayed as before."""
    cluster = Cluster(redirect_blobs=True)
    try:
        (east,) = await cluster.add("eastus")
        await cluster.add("westus")
        zones = await cluster.add("westeurope", "12")
        proxy = await cluster.global_endpoint("eastus")
        regional = await cluster.regional_endpoint("westeurope")
        for _ in range(2):                 # the client connection stays open across them
            async with client.get(proxy.url + BLOB + "?size=5", allow_redirects=False) as r:
                assert r.status == 307 and await r.read() == b""
                assert r.headers["Location"] == f"http://127.0.0.1:{east.port}{BLOB}?size=5"
                assert r.headers["X-Georeg-Replica"] == "eastus"
                assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        assert len(proxy._clients) == 1
        assert east.headers == []          # the node was not asked
        assert proxy.redirects == 2 and proxy.requests_by_backend == {"eastus": 2}
        # A client that follows the redirect gets the blob from that node.
        async with client.get(proxy.url + BLOB + "?size=70000") as r:
            assert r.status == 200 and await r.read() == b"".join(pattern(70000))
            assert r.headers["X-Backend"] == "eastus" and "X-Georeg-Replica" not in r.headers
        # HEAD of a blob, manifests and uploads still go through the proxy.
        async with client.head(proxy.url + BLOB, allow_redirects=False) as r:
            assert r.status == 200 and r.headers["X-Georeg-Replica"] == "eastus"
        assert await who(client, proxy.url) == "eastus"
        async with client.post(proxy.url + "/v2/app/blobs/uploads/", allow_redirects=False) as r:
            assert r.status == 202 and r.headers["X-Georeg-Replica"] == "eastus"
        assert proxy.redirects == 3
        # Routing moves the redirects with it, and a regional endpoint keeps its region.
        cluster.health.report("eastus", False, "down for the test")
        async with client.get(proxy.url + BLOB, allow_redirects=False) as r:
            assert r.status == 307 and r.headers["X-Georeg-Replica"] == "westus"
        async with client.get(regional.url + BLOB, allow_redirects=False) as r:
            assert r.status == 307
            assert r.headers["X-Georeg-Replica"] in {b.name for b in zones}
            port = {b.name: b.port for b in zones}[r.headers["X-Georeg-Replica"]]
            assert r.headers["Location"] == f"http://127.0.0.1:{port}{BLOB}"
        # Nothing routable: the proxy's own 503, not a redirect.
        cluster.replicas.set_routing("westus", False)
        cluster.replicas.set_routing("westeurope", False)
        async with client.get(proxy.url + BLOB, allow_redirects=False) as r:
            assert r.status == 503
            assert (await r.json())["errors"][0]["code"] == "UNAVAILABLE"
    finally:
        await cluster.close()


async def test_with_node_redirects_the_routed_node_answers_the_redirect_and_fails_over(client):
    """On a cluster with auth (node_redirects) the proxy answers no redirect
    itself: it forwards the blob GET, marked, to the node routing picks (never
    handed over), relays the node's 307 and counts it; a node that refuses the
    connection fails over as for any request. Nothing else is marked."""
    cluster = Cluster(redirect_blobs=True, node_redirects=True)
    try:
        (east,) = await cluster.add("eastus")
        (west,) = await cluster.add("westus")
        proxy = await cluster.global_endpoint("eastus")
        async with client.get(proxy.url + BLOB, allow_redirects=False) as r:
            assert r.status == 307 and r.headers["X-Georeg-Replica"] == "eastus"
            assert r.headers["Location"] == f"http://127.0.0.1:{east.port}{BLOB}?grant=eastus"
        assert east.headers[-1]["X-Georeg-Redirect"] == "127.0.0.1"
        assert proxy.redirects == 1 and proxy.handed_over == 0
        assert proxy.requests_by_backend == {"eastus": 1}
        for request in (client.head(proxy.url + BLOB), client.get(proxy.url + "/v2/app/manifests/v1")):
            async with request as r:
                assert r.status == 200
        assert [h for h in east.headers if "X-Georeg-Redirect" in h] == [east.headers[0]]
        assert proxy.redirects == 1
        await east.stop()                   # not yet known to be down: a refused connect
        async with client.get(proxy.url + BLOB, allow_redirects=False) as r:
            assert r.status == 307 and r.headers["X-Georeg-Replica"] == "westus"
            assert r.headers["Location"].endswith("?grant=westus")
        assert proxy.failovers == 1 and proxy.redirects == 2
        assert not cluster.health.healthy("eastus")
    finally:
        await cluster.close()


async def test_a_blob_get_with_a_body_is_redirected_and_the_connection_carries_on():
    cluster = Cluster(redirect_blobs=True)
    try:
        (east,) = await cluster.add("eastus")
        proxy = await cluster.global_endpoint("eastus")
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(b"GET %s HTTP/1.1\r\nHost: r\r\nContent-Length: 4\r\n\r\nbody"
                         b"GET /v2/ HTTP/1.1\r\nHost: r\r\n\r\n" % BLOB.encode())
            head = await read_head(reader)
            assert head.startswith(b"HTTP/1.1 307") and b"Content-Length: 0" in head
            assert b"Location: http://127.0.0.1:%d%s" % (east.port, BLOB.encode()) in head
            head = await read_head(reader)
            assert head.startswith(b"HTTP/1.1 200") and b"X-Georeg-Replica: eastus" in head
        finally:
            writer.close()
    finally:
        await cluster.close()


async def test_a_long_pipeline_of_redirects_is_answered_in_order():
    """Each redirect is answered at once, so the queue behind a slow request
    empties in one go: a loop, not a recursion per request (which ran out of
    stack at ~330 and left the connection hanging)."""
    cluster = Cluster(redirect_blobs=True)
    try:
        await cluster.add("eastus")
        proxy = await cluster.global_endpoint("eastus")
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        count = 1000
        try:
            # Short requests (no Host: the proxy adds one when it relays), so
            # that one 16 KiB read queues hundreds of them.
            writer.write(b"GET /v2/ HTTP/1.1\r\n\r\n"
                         + b"".join(b"GET /v2/a/blobs/a:b?n=%d HTTP/1.1\r\n\r\n" % i
                                    for i in range(count))
                         + b"GET /v2/ HTTP/1.1\r\n\r\n")
            status, body = await read_response(reader)
            assert status.startswith(b"HTTP/1.1 200") and b"eastus" in body
            for i in range(count):
                head = await read_head(reader)
                assert head.startswith(b"HTTP/1.1 307")
                assert b"/v2/a/blobs/a:b?n=%d\r\n" % i in head
            status, _ = await read_response(reader)
            assert status.startswith(b"HTTP/1.1 200")
        finally:
            writer.close()
        assert proxy.redirects == count
    finally:
        await cluster.close()


async def test_an_absolute_form_blob_get_is_relayed_not_redirected():
    """A 307 repeats the client's path on the node; a target in absolute form
    has none to repeat, so that download is relayed."""
    cluster = Cluster(redirect_blobs=True)
    try:
        await cluster.add("eastus")
        proxy = await cluster.global_endpoint("eastus")
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(b"GET http://r%s?size=5 HTTP/1.1\r\nHost: r\r\n\r\n" % BLOB.encode())
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200") and body == next(pattern(5))
            assert b"X-Georeg-Replica: eastus" in head and b"X-Backend: eastus" in head
        finally:
            writer.close()
        assert proxy.redirects == 0
    finally:
        await cluster.close()


async def test_a_node_listening_everywhere_is_reached_where_the_client_reached_us(client):
    cluster = Cluster(redirect_blobs=True)
    try:
        (backend,) = await cluster.add("eastus")
        cluster.replicas.update_node(NodeEndpoint("eastus", "eastus", "", "0.0.0.0", backend.port))
        proxy = await cluster.global_endpoint("eastus")
        async with client.get(proxy.url + BLOB, allow_redirects=False) as r:
            assert r.headers["Location"] == f"http://127.0.0.1:{backend.port}{BLOB}"
    finally:
        await cluster.close()


async def test_head_has_headers_and_no_body_and_keeps_the_connection(cluster):
    (backend,) = await cluster.add("eastus")
    proxy = await cluster.global_endpoint("eastus")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"HEAD /v2/stream?size=12345 HTTP/1.1\r\nHost: r\r\n\r\n"
                     b"GET /v2/stream?size=5 HTTP/1.1\r\nHost: r\r\n\r\n")   # pipelined, too
        head = await read_head(reader)
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 12345" in head
        assert b"X-Georeg-Replica: eastus" in head
        head = await read_head(reader)            # no body bytes came between the two
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 5" in head
        assert await reader.readexactly(5) == next(pattern(5))
    finally:
        writer.close()
    assert len(backend.peers) == 1


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)


async def test_chunked_bodies_both_ways(cluster, client):
    await cluster.add("eastus")
    proxy = await cluster.global_endpoint("eastus")

    async def body():
        for piece in pattern(3 * MIB + 17, piece=100_000):
            yield piece

    async with client.post(proxy.url + "/v2/sink", data=body()) as r:
        doc = await r.json()
    assert doc == {"size": 3 * MIB + 17, "sha256": pattern_sha256(3 * MIB + 17),
                   "transfer_encoding": "chunked"}
    async with client.get(proxy.url + "/v2/stream", params={"size": 2 * MIB + 1, "chunked": "1"}) as r:
        assert r.headers["Transfer-Encoding"] == "chunked"
        assert hashlib.sha256(await r.read()).hexdigest() == pattern_sha256(2 * MIB + 1)
    async with client.get(proxy.url + "/v2/") as r:       # the connection is still in step
        assert r.status == 200


async def test_expect_100_continue_is_answered_once_a_node_is_ready(cluster):
    (backend,) = await cluster.add("eastus")
    proxy = await cluster.global_endpoint("eastus")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"PUT /v2/sink HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        assert (await read_head(reader)).startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"hello")
        head = await read_head(reader)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        assert json.loads(await reader.readexactly(length))["size"] == 5
    finally:
        writer.close()
    assert "Expect" not in backend.headers[-1]
    # aiohttp's own Expect handling works through it too.
    async with aiohttp.ClientSession() as session:
        async with session.put(proxy.url + "/v2/sink", data=b"x" * 1000, expect100=True) as r:
            assert (await r.json())["size"] == 1000


async def test_503_with_an_oci_error_when_nothing_is_routable(cluster, client):
    await cluster.add("eastus", zones="12")
    await cluster.add("westus")
    glob = await cluster.global_endpoint("eastus")
    regional = await cluster.regional_endpoint("eastus")
    for name in ("eastus-1", "eastus-2"):
        cluster.health.report(name, False, "zone outage")
    cluster.replicas.set_routing("westus", False)
    async with client.get(glob.url + "/v2/app/manifests/x") as r:
        assert r.status == 503 and "X-Georeg-Replica" not in r.headers
        error = (await r.json())["errors"][0]
        assert error["code"] == "UNAVAILABLE" and "eastus" in error["message"]
        assert error["detail"]["replicas"]["westus"] == "routing disabled"
        assert error["detail"]["outcome"] == "definite"     # sent to no node
    async with client.get(regional.url + "/v2/app/manifests/x") as r:
        assert r.status == 503
        error = (await r.json())["errors"][0]
        assert error["code"] == "UNAVAILABLE" and "region eastus is unavailable" in error["message"]
        assert error["detail"]["nodes"] == {"eastus-1": "zone outage", "eastus-2": "zone outage"}
    async with client.head(regional.url + "/v2/") as r:
        assert r.status == 503 and await r.read() == b""
    async with client.get(regional.url + "/v2/") as r:   # a 503 keeps the connection usable
        assert r.status == 503
    assert glob.unavailable_responses == 1 and regional.unavailable_responses == 3
    cluster.health.report("eastus-2", True)
    assert await who(client, regional.url) == "eastus-2"


async def test_regional_endpoint_spreads_over_zones_and_never_leaves_its_region(cluster, client):
    zones = await cluster.add("eastus", zones="123")
    await cluster.add("westus")
    proxy = await cluster.regional_endpoint("eastus")
    seen = {await who(client, proxy.url, "/v2/") for _ in range(6)}
    assert seen == {"eastus-1", "eastus-2", "eastus-3"}
    repo_zone = await who(client, proxy.url, "/v2/team/app/manifests/v1")
    for _ in range(5):   # one repository stays on one zone while it is healthy
        assert await who(client, proxy.url, "/v2/team/app/manifests/v1") == repo_zone
    by_name = {b.name: b for b in zones}
    await by_name[repo_zone].stop()
    moved = await who(client, proxy.url, "/v2/team/app/manifests/v1")
    assert moved != repo_zone and moved.startswith("eastus-")
    for b in zones:
        await b.stop()
    async with client.get(proxy.url + "/v2/") as r:
        assert r.status == 503
    assert "westus" not in proxy.requests_by_backend


async def test_upload_sessions_stay_on_their_zone(cluster, client):
    await cluster.add("eastus", zones="123")
    proxy = await cluster.regional_endpoint("eastus", zone_spread=ZoneSpread.ROTATE)
    for i in range(6):
        async with client.post(proxy.url + f"/v2/r{i}/blobs/uploads/") as r:
            assert r.status == 202
            owner, location = r.headers["X-Georeg-Replica"], r.headers["Location"]
        for _ in range(3):
            async with client.patch(proxy.url + location, data=b"x" * 1000) as r:
                assert r.status == 202 and r.headers["X-Georeg-Replica"] == owner
        async with client.put(proxy.url + location, params={"digest": "sha256:00"}) as r:
            assert r.status == 201 and r.headers["X-Georeg-Replica"] == owner
    assert len(cluster.affinity) == 0     # finished sessions are forgotten


async def test_upload_affinity_with_real_nodes_when_routing_moves(tmp_path, client):
    """POST on the nearest node, then its routing is disabled: PATCH and PUT of
    that session still reach it and the blob lands there."""
    east = await start_node(NodeConfig(data_dir=tmp_path / "east", port=0, region="eastus"))
    west = await start_node(NodeConfig(data_dir=tmp_path / "west", port=0, region="westus"))
    ports = {n: int(r.url.rsplit(":", 1)[1]) for n, r in (("eastus", east), ("westus", west))}
    replicas = Replicas([ReplicaGroup(r, (NodeEndpoint(r, r, "", "127.0.0.1", p),))
                         for r, p in ports.items()])
    proxy = RoutingProxy.global_endpoint("eastus", replicas, latency, NodeHealth())
    await proxy.start()
    try:
        blob = os.urandom(3 * MIB)
        async with client.post(proxy.url + "/v2/app/blobs/uploads/") as r:
            assert r.status == 202 and r.headers["X-Georeg-Replica"] == "eastus"
            location = r.headers["Location"]
        replicas.set_routing("eastus", False)
        async with client.get(proxy.url + "/v2/") as r:
            assert r.headers["X-Georeg-Replica"] == "westus"      # routing did move
        async with client.patch(proxy.url + location, data=blob[:MIB]) as r:
            assert r.status == 202 and r.headers["X-Georeg-Replica"] == "eastus"
            location = r.headers["Location"]
        async with client.patch(proxy.url + location, data=blob[MIB:],
                                headers={"Content-Range": f"{MIB}-{3 * MIB - 1}"}) as r:
            assert r.status == 202, await r.text()
            location = r.headers["Location"]
        async with client.put(proxy.url + location, params={"digest": digest_of(blob)}) as r:
            assert r.status == 201 and r.headers["X-Georeg-Replica"] == "eastus"
        async with client.get(f"{east.url}/v2/app/blobs/{digest_of(blob)}") as r:
            assert r.status == 200 and await r.read() == blob
        async with client.head(proxy.url + f"/v2/app/blobs/{digest_of(blob)}") as r:
            assert r.status == 404 and r.headers["X-Georeg-Replica"] == "westus"
    finally:
        await proxy.stop()
        await east.stop()
        await west.stop()


async def test_backend_dying_mid_response_closes_the_client_connection(cluster, client):
    await cluster.add("eastus")
    proxy = await cluster.global_endpoint("eastus")
    with pytest.raises(aiohttp.ClientError):
        async with client.get(proxy.url + "/v2/die") as r:
            assert r.status == 200
            await r.read()
    assert await who(client, proxy.url) == "eastus"    # a new connection works


async def test_connection_closed_before_answering_fails_over(cluster, client):
    """A node behind a cut link: TCP accepts, then the connection closes unanswered."""
    accepted = []

    async def slam(reader, writer):
        accepted.append(1)
        writer.transport.abort()

    cut = await asyncio.start_server(slam, "127.0.0.1", 0)
    try:
        cut_port = cut.sockets[0].getsockname()[1]
        cluster.replicas.add(ReplicaGroup("eastus", (node("eastus", "eastus", port=cut_port),)))
        await cluster.add("westus")
        proxy = await cluster.global_endpoint("eastus")
        assert await who(client, proxy.url) == "westus"
        assert accepted and not cluster.health.healthy("eastus")
        # A request whose body had started cannot be replayed: 502, and the node is tried anew.
        cluster.health.report("eastus", True)
        async with client.put(proxy.url + "/v2/sink", data=b"y" * MIB) as r:
            assert r.status == 502
            error = (await r.json())["errors"][0]
            assert error["code"] == "UNAVAILABLE"
            assert error["detail"]["outcome"] == "indefinite"   # the node had the request
    finally:
        cut.close()
        await cut.wait_closed()


async def test_a_pooled_connection_closed_by_the_node_is_retried_fresh(cluster, client):
    """The keep-alive race: the node closes an idle connection just as the proxy
    reuses it. The request goes again, on a fresh connection to the same node,
    and the node is not marked down."""
    connections = []

    async def one_answer_per_connection(reader, writer):
        connections.append(1)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.readuntil(b"\r\n\r\n")      # the next request: hang up unanswered
        writer.transport.abort()

    server = await asyncio.start_server(one_answer_per_connection, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        cluster.replicas.add(ReplicaGroup("eastus", (node("eastus", "eastus", port=port),)))
        proxy = await cluster.global_endpoint("eastus")
        for _ in range(4):
            async with client.get(proxy.url + "/v2/") as r:
                assert r.status == 200 and await r.read() == b"ok"
        assert len(connections) == 4
        assert cluster.health.healthy("eastus") and proxy.failovers == 0
    finally:
        server.close()
        await server.wait_closed()


async def test_a_pooled_connection_closed_before_the_body_came_is_retried_fresh(cluster):
    """The keep-alive race with a body: a request's head reaches a pooled
    connection the node has just closed, and none of its body has come yet
    (clients often send the head on its own). Nothing of the request is lost,
    so it goes again on a fresh connection, not back as a 502."""
    connections = []

    async def one_answer_per_connection(reader, writer):
        connections.append(1)
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.readuntil(b"\r\n\r\n")      # the next request: hang up unanswered
        writer.transport.abort()

    server = await asyncio.start_server(one_answer_per_connection, "127.0.0.1", 0)
    writer = None
    try:
        port = server.sockets[0].getsockname()[1]
        cluster.replicas.add(ReplicaGroup("eastus", (node("eastus", "eastus", port=port),)))
        proxy = await cluster.global_endpoint("eastus")
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        body = os.urandom(MIB)
        for i in range(3):
            writer.write(b"PUT /v2/app/blobs/uploads/x HTTP/1.1\r\nHost: r\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body))
            # Request i reaches the node on connection i + 1: the first on a new one,
            # the others after the pooled one they were sent on hung up.
            await eventually(lambda n=i + 1: len(connections) == n, timeout=10,
                             what=f"request {i} on connection {i + 1}")
            writer.write(body)
            head, answer = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200") and answer == b"ok", head
        assert cluster.health.healthy("eastus") and proxy.failovers == 0
    finally:
        if writer is not None:
            writer.close()
        server.close()
        await server.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await read_head(reader)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head, await reader.readexactly(length)


async def test_an_early_answer_drains_the_body_and_keeps_the_connection(cluster):
    await cluster.add("eastus")
    proxy = await cluster.global_endpoint("eastus")
    body = os.urandom(8 * MIB)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        # The node answers 404 without reading the body; the client keeps sending it.
        writer.write(b"PATCH /v2/app/blobs/uploads/nosuch HTTP/1.1\r\nHost: r\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        head, answer = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 404") and b"BLOB_UPLOAD_UNKNOWN" in answer
        await writer.drain()
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: r\r\n\r\n")   # the same connection
        head, answer = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200") and json.loads(answer)["backend"] == "eastus"
        # The proxy's own early answer (a 503) too.
        cluster.health.report("eastus", False, "down")
        writer.write(b"PUT /v2/sink HTTP/1.1\r\nHost: r\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body)
        head, answer = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 503") and b"UNAVAILABLE" in answer
        await writer.drain()
        cluster.health.report("eastus", True)
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: r\r\n\r\n")
        head, answer = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    assert len(proxy._clients) <= 1


async def test_an_early_answer_to_a_request_that_closes_is_read_by_a_client_still_sending(
        cluster):
    """A request that says ``Connection: close`` (skopeo's streamed upload),
    answered before its body ended (a node refusing a chunk past its storage
    limit): the proxy reads the rest of the body before it closes, as the node
    itself does. Closing at once resets the connection under a client still
    sending, and its answer is lost (skopeo: "broken pipe")."""
    await cluster.add("eastus")
    proxy = await cluster.global_endpoint("eastus")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    body = os.urandom(8 * MIB)
    try:
        writer.write(b"PATCH /v2/app/blobs/uploads/nosuch HTTP/1.1\r\nHost: r\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        for at in range(0, len(body), MIB):       # as a client streams it
            writer.write(body[at:at + MIB])
            await writer.drain()
        head, answer = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 404") and b"BLOB_UPLOAD_UNKNOWN" in answer
        assert b"connection: close" in head.lower()
        assert await reader.read() == b""          # closed once the body has ended
    finally:
        writer.close()


async def test_clients_hanging_up_mid_transfer_leave_the_proxy_clean(cluster, client):
    (backend,) = await cluster.add("eastus")
    proxy = await cluster.global_endpoint("eastus")
    # Mid-response.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /v2/stream?size=67108864 HTTP/1.1\r\nHost: r\r\n\r\n")
    await read_head(reader)
    await reader.readexactly(MIB)
    writer.transport.abort()
    # Mid-request.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"PUT /v2/sink HTTP/1.1\r\nHost: r\r\nContent-Length: 9999999\r\n\r\n" + b"z" * MIB)
    await writer.drain()
    writer.transport.abort()
    await eventually(lambda: len(proxy._clients) == 0, what="both client connections gone")
    await eventually(lambda: all(c.closed or c.exchange is None
                                 for idle in proxy._pool._idle.values() for c in idle),
                     what="no half-used backend connection pooled")
    assert await who(client, proxy.url) == "eastus"


async def test_large_bodies_cross_intact_both_ways_on_kept_connections(cluster, client):
    """Counted bodies with more than ``SPLICE_MIN`` to come go socket to socket in
    the kernel (on the "kernel" path): byte for byte, and both sides' keep-alive
    connections carry on after them."""
    (backend,) = await cluster.add("eastus")
    proxy = await cluster.global_endpoint("eastus")
    size = 8 * MIB + 12345
    for _ in range(2):
        async with client.put(proxy.url + "/v2/sink", data=b"".join(pattern(size))) as r:
            assert await r.json() == {"size": size, "sha256": pattern_sha256(size),
                                      "transfer_encoding": None}
        async with client.get(proxy.url + "/v2/stream", params={"size": str(size)}) as r:
            assert r.headers["X-Georeg-Replica"] == "eastus"
            assert hashlib.sha256(await r.read()).hexdigest() == pattern_sha256(size)
    assert len(backend.peers) == 1 and len(proxy._clients) == 1
    if proxy.splice_min:
        # All of each body but what came in the read that ended its head and, for
        # the first request, the one read while its node connection was being
        # made: reads are of 16 KiB while a head or a body to splice is expected.
        assert proxy.spliced_bytes >= 4 * (size - 2 * 16 * 1024)
    else:
        assert proxy.spliced_bytes == 0


async def test_bodies_are_copied_when_the_pipe_budget_is_spent(cluster, client):
    """No pipe to be had (the budget is spent): the proxy copies instead, and
    every byte still arrives."""
    await cluster.add("eastus")
    proxy = await cluster.global_endpoint("eastus")
    proxy.pipes = PipePool(budget=0)
    size = 2 * MIB
    async with client.put(proxy.url + "/v2/sink", data=b"".join(pattern(size))) as r:
        assert (await r.json())["sha256"] == pattern_sha256(size)
    async with client.get(proxy.url + "/v2/stream", params={"size": str(size)}) as r:
        assert hashlib.sha256(await r.read()).hexdigest() == pattern_sha256(size)
    assert proxy.spliced_bytes == 0


@pytest.mark.parametrize("fault", ["hangs up", "answers garbage"])
async def test_node_failing_under_a_request_body_gets_502_and_the_connection_carries_on(
        cluster, fault):
    """The node fails with part of a large body read: the client hears 502 (the
    request may or may not have taken effect), the rest of its body is read and
    dropped, and its connection serves the next request."""

    async def hang_up_mid_body(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"PUT"):
            await reader.readexactly(2 * MIB)
            if fault == "hangs up":
                writer.transport.abort()
            else:                   # and reads no more
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: nonsense\r\n\r\n")
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(hang_up_mid_body, "127.0.0.1", 0)
    reader = writer = None
    try:
        port = server.sockets[0].getsockname()[1]
        cluster.replicas.add(ReplicaGroup("eastus", (node("eastus", "eastus", port=port),)))
        proxy = await cluster.global_endpoint("eastus")
        body = os.urandom(16 * MIB)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"PUT /v2/sink HTTP/1.1\r\nHost: r\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body)
        head, answer = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 502") and b"UNAVAILABLE" in answer
        assert json.loads(answer)["errors"][0]["detail"]["outcome"] == "indefinite"
        assert b"Connection: close" not in head
        await writer.drain()
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: r\r\n\r\n")
        head, answer = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200") and answer == b"ok"
        assert cluster.health.healthy("eastus")     # a cut mid-body does not mark it down
        if proxy.splice_min:
            assert proxy.spliced_bytes > 0
    finally:
        if writer is not None:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_idle_client_connections_are_closed(cluster):
    await cluster.add("eastus")
    proxy = await cluster.global_endpoint("eastus", client_idle_timeout_s=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        await eventually(lambda: len(proxy._clients) == 0, timeout=5,
                         what="the idle connection closed")
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


async def test_a_502_under_a_read_is_definite(cluster, client):
    """A node that answers a GET with garbage changed nothing: the proxy's 502
    says so (under a write it would be indefinite, as above)."""

    async def garbage(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: nonsense\r\n\r\n")
        await writer.drain()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        cluster.replicas.add(ReplicaGroup("eastus", (node("eastus", "eastus", port=port),)))
        proxy = await cluster.global_endpoint("eastus")
        async with client.get(proxy.url + "/v2/app/manifests/v1") as r:
            assert r.status == 502
            assert (await r.json())["errors"][0]["detail"]["outcome"] == "definite"
    finally:
        server.close()
        await server.wait_closed()


async def test_malformed_requests_get_400(cluster):
    await cluster.add("eastus")
    proxy = await cluster.global_endpoint("eastus")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert (await read_head(reader)).startswith(b"HTTP/1.1 400")
        assert b"malformed HTTP request" in await asyncio.wait_for(reader.read(), 10)  # then EOF
    finally:
        writer.close()
    assert proxy.requests_by_backend == {}


async def test_a_tls_hello_is_refused_at_once(cluster):
    """Clients try https first (skopeo does); they must hear no promptly, not time out."""
    await cluster.add("eastus")
    proxy = await cluster.global_endpoint("eastus")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(bytes.fromhex("160301020001000200") + os.urandom(200))
        assert (await read_head(reader)).startswith(b"HTTP/1.1 400")
    finally:
        writer.close()


async def test_http_10_client_gets_an_unframed_body_and_a_close(cluster):
    await cluster.add("eastus")
    proxy = await cluster.global_endpoint("eastus")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /v2/stream?size=70000&chunked=1 HTTP/1.0\r\n\r\n")
        head = await read_head(reader)
        assert b"Transfer-Encoding" not in head and b"Connection: close" in head
        assert await asyncio.wait_for(reader.read(), 10) == next(pattern(70000))
    finally:
        writer.close()


# -- the same on uvloop ----------------------------------------------------------------

ON_UVLOOP = [
    test_global_endpoint_routes_to_nearest_and_counts,
    test_keep_alive_reuses_one_connection_each_side,
    test_failover_when_the_nearest_backend_dies,
    test_head_has_headers_and_no_body_and_keeps_the_connection,
    test_chunked_bodies_both_ways,
    test_expect_100_continue_is_answered_once_a_node_is_ready,
    test_503_with_an_oci_error_when_nothing_is_routable,
    test_upload_sessions_stay_on_their_zone,
    test_backend_dying_mid_response_closes_the_client_connection,
    test_connection_closed_before_answering_fails_over,
    test_a_pooled_connection_closed_by_the_node_is_retried_fresh,
    test_a_pooled_connection_closed_before_the_body_came_is_retried_fresh,
    test_an_early_answer_drains_the_body_and_keeps_the_connection,
    test_clients_hanging_up_mid_transfer_leave_the_proxy_clean,
    test_large_bodies_cross_intact_both_ways_on_kept_connections,
    *(functools.partial(test_node_failing_under_a_request_body_gets_502_and_the_connection_carries_on,
                        fault=fault) for fault in ("hangs up", "answers garbage")),
    test_a_tls_hello_is_refused_at_once,
    test_http_10_client_gets_an_unframed_body_and_a_close,
]


def _scenario_id(scenario) -> str:
    if isinstance(scenario, functools.partial):
        return f"{_scenario_id(scenario.func)}[{','.join(scenario.keywords.values())}]"
    return scenario.__name__.removeprefix("test_")


@pytest.mark.parametrize("scenario", ON_UVLOOP, ids=_scenario_id)
def test_on_uvloop(scenario):
    """georeg runs on uvloop, whose transports buffer, pause and report a closed
    peer differently from asyncio's: the proxy scenarios again, on uvloop."""
    import uvloop

    async def run() -> None:
        c = Cluster()
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                             auto_decompress=False) as session:
                wanted = inspect.signature(scenario).parameters
                fixtures = {"cluster": c, "client": session}
                await scenario(**{k: v for k, v in fixtures.items() if k in wanted})
        finally:
            await c.close()

    uvloop.run(run())


# -- large bodies, memory, real processes -------------------------------------------------


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def stalled(progress) -> callable:
    """A predicate: true once ``progress()`` is non-zero and has not moved for 0.3 s."""
    last = [None, 0.0]

    def check() -> bool:
        value, now = progress(), time.monotonic()
        if value != last[0]:
            last[:] = [value, now]
            return False
        return value > 0 and now - last[1] >= 0.3

    return check


def in_kernel_bound() -> int:
    """The most a sender can be ahead of a receiver that stopped reading, two
    TCP hops away through the proxy: each hop's send and receive buffers at
    their autotuning ceilings, the proxy's splice pipe, and 1 MiB for the
    HTTP libraries' own buffers. On these machines tcp_rmem's ceiling is
    32 MiB, so this is about 73 MiB: more than a 64 MiB body."""
    def ceiling(name: str) -> int:
        return int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
    return 2 * (ceiling("tcp_wmem") + ceiling("tcp_rmem")) + PIPE_SIZE + MIB


async def test_a_large_body_streams_both_ways_in_bounded_proxy_memory():
    """Each direction with a receiver that stops reading: the sender must stall
    (backpressure through the proxy) no further ahead than the kernel's socket
    buffers allow, with the proxy's memory bounded, and the body then arrives
    intact. The body is at least 64 MiB and larger than those buffers hold."""
    backend = await Backend("solo").start()
    proxy = ProxyProcess([f"solo=127.0.0.1:{backend.port}"]).start()
    ahead = in_kernel_bound()
    size = max(64 * MIB, ahead + 32 * MIB)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.url + "/v2/") as r:   # warm: imports, first buffers
                assert r.status == 200
            before = rss(proxy.pid)
            reset_peak_rss(proxy.pid)

            # Up: the node holds off reading; the client's body generator must stall.
            sent = [0]

            async def body():
                for piece in pattern(size):
                    sent[0] += len(piece)
                    yield piece

            upload = asyncio.ensure_future(session.put(
                proxy.url + "/v2/sink?hold=1", data=body(), headers={"Content-Length": str(size)}))
            try:
                await eventually(stalled(lambda: sent[0]), timeout=20, what="the upload stalling")
                assert sent[0] <= ahead, f"{sent[0]} bytes left the client unread"
                backend.sink_open.set()
                async with await upload as r:
                    assert await r.json() == {"size": size, "sha256": pattern_sha256(size),
                                              "transfer_encoding": None}
            finally:
                # On a failure too: a node still holding off would leave the client's
                # connection unable to flush, and closing the session would wait forever.
                backend.sink_open.set()
                upload.cancel()

            # Down: the client holds off reading; the node's writes must stall.
            digest, got = hashlib.sha256(), 0
            async with session.get(proxy.url + "/v2/stream", params={"size": size}) as r:
                assert r.headers["X-Georeg-Replica"] == "solo"
                await eventually(stalled(lambda: backend.streamed), timeout=20,
                                 what="the download stalling")
                assert backend.streamed <= ahead, f"{backend.streamed} bytes sent, unread"
                async for piece in r.content.iter_any():
                    digest.update(piece)
                    got += len(piece)
            assert got == size and digest.hexdigest() == pattern_sha256(size)
        grown = peak_rss(proxy.pid) - before
        assert grown < 16 * MIB, f"proxy peak memory grew by {grown / MIB:.1f} MiB"
    finally:
        backend.sink_open.set()
        proxy.close()
        await backend.stop()


@pytest.fixture
def georeg_nodes(tmp_path):
    started: list[NodeProcess] = []

    def make(name: str, region: str) -> NodeProcess:
        proc = NodeProcess(tmp_path / name, ["--region", region]).start()
        started.append(proc)
        return proc

    yield make
    for proc in started:
        if proc.proc and proc.proc.poll() is None:
            os.killpg(proc.proc.pid, signal.SIGCONT)
        proc.close()


def endpoint_of(proc: NodeProcess, name: str, region: str) -> NodeEndpoint:
    host, port = proc.url.removeprefix("http://").rsplit(":", 1)
    return NodeEndpoint(name, region, "", host, int(port))


async def test_killed_node_process_fails_over(georeg_nodes, client):
    east = georeg_nodes("east", "eastus")
    west = georeg_nodes("west", "westus")
    replicas = Replicas([ReplicaGroup("eastus", (endpoint_of(east, "eastus", "eastus"),)),
                         ReplicaGroup("westus", (endpoint_of(west, "westus", "westus"),))])
    proxy = RoutingProxy.global_endpoint("eastus", replicas, latency, NodeHealth())
    await proxy.start()
    try:
        image = make_image([4096], seed=3)
        await push_image(client, proxy.url, "app", image, tag="v1")
        assert proxy.requests_by_backend.keys() == {"eastus"}
        east.kill()
        # The very next request fails over: no error reaches the client.
        async with client.get(proxy.url + "/v2/") as r:
            assert r.status == 200 and r.headers["X-Georeg-Replica"] == "westus"
        assert proxy.failovers == 1 and not proxy.health.healthy("eastus")
        await push_image(client, proxy.url, "app", image, tag="v1")   # pushes keep working
        assert proxy.requests_by_backend.keys() == {"eastus", "westus"}
    finally:
        await proxy.stop()


async def test_stopped_node_is_noticed_by_the_probe(georeg_nodes):
    """SIGSTOP: the kernel still accepts connections, so only an active probe
    notices; new requests then reach the next replica, with no error."""
    east = georeg_nodes("east", "eastus")
    west = georeg_nodes("west", "westus")
    replicas = Replicas([ReplicaGroup("eastus", (endpoint_of(east, "eastus", "eastus"),)),
                         ReplicaGroup("westus", (endpoint_of(west, "westus", "westus"),))])
    health = NodeHealth()
    probe = HealthProbe(replicas, health, interval_s=0.25, timeout_s=0.5)
    proxy = RoutingProxy.global_endpoint("eastus", replicas, latency, health)
    await proxy.start()
    await probe.start()
    try:
        async with aiohttp.ClientSession() as session:   # a fresh connection per request
            async def replica() -> str:
                async with session.get(proxy.url + "/v2/",
                                       headers={"Connection": "close"}) as r:
                    return r.headers["X-Georeg-Replica"]

            assert await replica() == "eastus"
            os.killpg(east.proc.pid, signal.SIGSTOP)
            await eventually(lambda: not health.healthy("eastus"), timeout=30,
                             what="the probe marking eastus down")
            assert "no answer" in health.reason("eastus")
            assert await replica() == "westus"
            assert proxy.failovers == 0        # routed away: no request went to eastus
            os.killpg(east.proc.pid, signal.SIGCONT)
            await eventually(lambda: health.healthy("eastus"), timeout=30, what="eastus back")
            assert await replica() == "eastus"
    finally:
        await probe.stop()
        await proxy.stop()


SKOPEO = shutil.which("skopeo") or "/usr/bin/skopeo"


async def skopeo(root: Path, *args: str) -> None:
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    policy = root / "policy.json"
    policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    auth = root / "auth.json"
    auth.write_text('{"auths": {}}')
    registries = root / "registries.conf"
    registries.write_text("unqualified-search-registries = []\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root),
           "XDG_RUNTIME_DIR": str(root), "XDG_CONFIG_HOME": str(root / "config"),
           "CONTAINERS_REGISTRIES_CONF": str(registries), "TMPDIR": str(root / "tmp"),
           "NO_PROXY": "*", "no_proxy": "*"}
    proc = await asyncio.create_subprocess_exec(
        SKOPEO, "--policy", str(policy), "--tmpdir", str(root / "tmp"),
        "--command-timeout", "60s", "copy", "--quiet", "--authfile", str(auth), *args,
        env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 70)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"skopeo {args} timed out") from None
    assert proc.returncode == 0, err.decode()[-3000:]


def gzip_image(sizes: list[int], seed: int) -> Image:
    """An image with gzipped tar layers, which skopeo copies without recompressing
    (so digests can be compared end to end)."""
    rng = random.Random(seed)
    tars = [tar_layer({f"l{i}.bin": rng.randbytes(n)}) for i, n in enumerate(sizes)]
    layers = [gzip.compress(t, mtime=0) for t in tars]
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers",
                                    "diff_ids": [digest_of(t) for t in tars]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(config, OCI_CONFIG),
        "layers": [descriptor(x, "application/vnd.oci.image.layer.v1.tar+gzip") for x in layers],
    }).encode()
    return Image(config, layers, manifest)


async def test_skopeo_copies_through_the_proxy_into_a_node_and_back(tmp_path, client):
    node_ = await start_node(NodeConfig(data_dir=tmp_path / "node", port=0, region="eastus"))
    port = int(node_.url.rsplit(":", 1)[1])
    replicas = Replicas([ReplicaGroup("eastus", (NodeEndpoint("eastus", "eastus", "", "127.0.0.1",
                                                              port),))])
    proxy = RoutingProxy.global_endpoint("eastus", replicas, latency, NodeHealth())
    await proxy.start()
    try:
        image = gzip_image([2 * MIB, 300_000], seed=11)
        write_oci_layout(tmp_path / "src", image, tag="v1")
        registry = f"127.0.0.1:{proxy.port}"
        await skopeo(tmp_path / "sk", "--dest-tls-verify=false",
                     f"oci:{tmp_path / 'src'}:v1", f"docker://{registry}/team/app:v1")
        async with client.get(f"{node_.url}/v2/team/app/manifests/v1",
                              headers={"Accept": image.media_type}) as r:
            assert r.status == 200 and await r.read() == image.manifest
        await skopeo(tmp_path / "sk", "--src-tls-verify=false",
                     f"docker://{registry}/team/app:v1", f"oci:{tmp_path / 'dst'}:v1")
        index = json.loads((tmp_path / "dst" / "index.json").read_text())
        assert index["manifests"][0]["digest"] == image.digest
        for blob in image.blobs:
            stored = tmp_path / "dst" / "blobs" / "sha256" / digest_of(blob).split(":")[1]
            assert stored.read_bytes() == blob
        assert set(proxy.requests_by_backend) == {"eastus"}
        assert proxy.requests_by_backend["eastus"] >= 8
    finally:
        await proxy.stop()
        await node_.stop()
