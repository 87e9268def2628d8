"""A node's internal routes stay on the node: endpoints answer them 404.

Nodes serve, beside the registry API, routes meant for the cluster around
them (the storage fault seam, the inventory, the node's own status, its
metrics). A client that reached them through a global or regional endpoint
could make a node refuse every write with 507. The rule is data in
``cluster.routing.policy`` (what endpoints forward), decided on the path as a
node will route it; the tests try the ways a target can hide a path (escapes,
dot segments, doubled slashes, the absolute form, a pipelined request) against
a real endpoint in front of a real node process, and check the node's state.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from cluster.control import spec as specs
from cluster.routing.policy import RequestRoute, node_path, request_route
from cluster.testing import RunningCluster

from .helpers import make_image, push_image

# Every internal route a node serves (registry_node/api/routes.py and
# replicator/runtime.py), with the method that reaches it.
INTERNAL = [
    ("GET", "/georeg/v1/faults/storage"),
    ("PUT", "/georeg/v1/faults/storage"),
    ("POST", "/georeg/v1/faults/bitrot"),
    ("GET", "/georeg/v1/blobs/repairs"),
    ("POST", "/georeg/v1/blobs/scrub"),
    ("GET", "/georeg/v1/faults/clock"),
    ("PUT", "/georeg/v1/faults/clock"),
    ("GET", "/georeg/v1/inventory"),
    ("GET", "/georeg/v1/node"),
    ("GET", "/georeg/v1/configuration"),
    ("GET", "/georeg/v1/configuration/registry"),
    ("PUT", "/georeg/v1/configuration/registry/default"),
    ("DELETE", "/georeg/v1/configuration/registry/default"),
    ("GET", "/metrics"),
    ("PUT", "/georeg/v1/replication/status"),     # only reads of it are public
]


def disguises(path: str) -> list[str]:
    """Request targets a node routes to ``path`` (or that resolve to it)."""
    first, _, rest = path[1:].partition("/")
    return [
        path,
        path + "?x=1",
        path + "#fragment",
        "/%" + format(ord(first[0]), "02x") + first[1:] + ("/" + rest if rest else ""),
        "/" + first + ("%2F" + rest if rest else ""),
        "/v2/../" + path[1:],
        "/v2/%2e%2e/" + path[1:],
        "/v2/./../" + path[1:],
        "/v2/a/b/../../.." + path,
        "/" + path,
        path.replace("/", "//"),
        "http://registry.example" + path,
        "HTTP://registry.example:443" + path + "?x",
    ]


# -- the rule, without sockets -----------------------------------------------------


def test_node_path_is_the_path_a_node_routes_made_canonical():
    assert node_path("/v2/app/manifests/v1?n=1") == "/v2/app/manifests/v1"
    assert node_path("/v2/") == "/v2/" and node_path("/v2") == "/v2"
    assert node_path("/%67eoreg/v1/inventory") == "/georeg/v1/inventory"
    assert node_path("/georeg%2Fv1/inventory") == "/georeg/v1/inventory"
    assert node_path("/v2/../georeg/v1/inventory") == "/georeg/v1/inventory"
    assert node_path("/v2/%2E%2e/georeg/v1/inventory") == "/georeg/v1/inventory"
    assert node_path("//georeg//v1/inventory") == "/georeg/v1/inventory"
    assert node_path("/georeg/v1/inventory#/v2/") == "/georeg/v1/inventory"
    assert node_path("/v2/%3F/../../metrics") == "/metrics"          # an escaped "?" cuts nothing
    assert node_path("http://h:5000/georeg/v1/node?x") == "/georeg/v1/node"
    assert node_path("http://h?/v2/") == "/"
    assert node_path("/v2/..") == "/" and node_path("/v2/.") == "/v2/"
    assert node_path("*") is None and node_path("registry.example:443") is None


@pytest.mark.parametrize(("method", "path"), INTERNAL)
def test_endpoints_forward_no_internal_route_however_it_is_written(method, path):
    for target in disguises(path):
        assert not request_route(method, target).forwarded, target


def test_endpoints_forward_the_registry_api_and_public_reads():
    for method, target in [("GET", "/v2/"), ("GET", "/v2"), ("HEAD", "/v2/a/b/manifests/v1"),
                           ("PATCH", "/v2/a/blobs/uploads/u1?x=1"), ("DELETE", "/acr/v1/a/b"),
                           ("POST", "/oauth2/token"), ("GET", "http://h/v2/a/tags/list"),
                           ("GET", "/georeg/v1/replication/status?repository=a&reference=v1"),
                           ("HEAD", "/georeg/v1/replication/status")]:
        assert request_route(method, target).forwarded, (method, target)
    assert request_route("GET", "/v2/a/b/blobs/uploads/u1") == RequestRoute("a/b", "u1")
    assert request_route("GET", "/v2/te%61m/app/blobs/sha256:00") == \
        RequestRoute("team/app", blob=True)
    for method, target in [("GET", "/"), ("GET", "/v2x"), ("GET", "/V2/"), ("OPTIONS", "*"),
                           ("GET", "/georeg/v1/cluster"), ("GET", "/georeg/v1/replication")]:
        assert not request_route(method, target).forwarded, (method, target)


# -- a real endpoint in front of a real node ------------------------------------------

ONE_NODE = specs.ClusterSpec(registry="georegpaths", home_region="eastus", paired_copies=False)


def header_lines(headers: dict[str, str]) -> bytes:
    return b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items())


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    with RunningCluster(ONE_NODE, tmp_path_factory.mktemp("paths")) as running:
        yield running


def endpoints(running: RunningCluster) -> dict[str, str]:
    return {"global": running.endpoint("eastus"), "regional": running.regional_endpoint("eastus")}


def routed(running: RunningCluster) -> int:
    """Requests the cluster's endpoints have sent to a node so far."""
    async def count() -> int:
        stats = running.cluster.routing.stats()
        return sum(sum(s["requests"].values()) for s in stats.values())

    return running.run(count)


async def raw_exchange(url: str, wire: bytes, responses: int) -> list[tuple[bytes, bytes]]:
    """Send ``wire`` as it is on one connection; read ``responses`` answers."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    answers = []
    try:
        writer.write(wire)
        for _ in range(responses):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            answers.append((head, await reader.readexactly(length)))
    finally:
        writer.close()
    return answers


def assert_not_served(head: bytes, body: bytes) -> None:
    assert head.startswith(b"HTTP/1.1 404"), head
    assert b"X-Georeg-Replica" not in head             # the endpoint's own answer
    error = json.loads(body)["errors"][0]
    assert error["code"] == "UNSUPPORTED" and "not served by" in error["message"]


async def test_every_internal_route_is_404_at_endpoints_and_no_node_is_asked(one_node):
    """Even a request that carries the cluster's internal credential: an
    endpoint never forwards an internal route, whoever asks."""
    internal = header_lines(one_node.internal_headers())
    before = routed(one_node)
    for url in endpoints(one_node).values():
        for method, path in INTERNAL:
            for target in disguises(path):
                body = b'{"full": true, "slow_ms": 5000}' if method == "PUT" else b""
                wire = (b"%s %s HTTP/1.1\r\nHost: r\r\n%sContent-Length: %d\r\n\r\n%s"
                        % (method.encode(), target.encode(), internal, len(body), body))
                [(head, answer)] = await raw_exchange(url, wire, 1)
                assert_not_served(head, answer)
    assert routed(one_node) == before


async def test_a_storage_fault_sent_through_endpoints_changes_nothing(one_node):
    node = one_node.node_url("eastus")
    internal = one_node.internal_headers()
    async with one_node.http() as http:
        for url in endpoints(one_node).values():
            for target in disguises("/georeg/v1/faults/storage"):
                wire = (b"PUT %s HTTP/1.1\r\nHost: r\r\n%sContent-Type: application/json\r\n"
                        b"Content-Length: 14\r\n\r\n{\"full\": true}"
                        % (target.encode(), header_lines(internal)))
                [(head, answer)] = await raw_exchange(url, wire, 1)
                assert_not_served(head, answer)
            async with http.get(node + "/georeg/v1/faults/storage", headers=internal) as r:
                state = await r.json()
                assert (state["full"], state["slow_ms"]) == (False, 0.0)
            await push_image(http, url, "paths/app", make_image([2048], seed=7), tag="v1")


async def test_a_pipelined_internal_request_is_refused_in_its_turn(one_node):
    url = endpoints(one_node)["global"]
    before = routed(one_node)
    login = header_lines(one_node.auth_headers())
    internal = header_lines(one_node.internal_headers())
    answers = await raw_exchange(url, b"GET /v2/ HTTP/1.1\r\nHost: r\r\n%s\r\n"
                                      b"PUT /georeg/v1/faults/storage HTTP/1.1\r\nHost: r\r\n%s"
                                      b"Content-Length: 14\r\n\r\n{\"full\": true}"
                                      b"GET /v2/ HTTP/1.1\r\nHost: r\r\n%s\r\n"
                                      % (login, internal, login), 3)
    assert answers[0][0].startswith(b"HTTP/1.1 200") and b"X-Georeg-Replica" in answers[0][0]
    assert_not_served(*answers[1])
    assert answers[2][0].startswith(b"HTTP/1.1 200") and b"X-Georeg-Replica" in answers[2][0]
    assert routed(one_node) == before + 2


async def test_public_reads_pass_and_the_node_port_still_serves_everything(one_node):
    internal = one_node.internal_headers()
    async with one_node.http() as http:
        for url in endpoints(one_node).values():
            async with http.get(url + "/georeg/v1/replication/status",
                                params={"repository": "paths/none", "reference": "v1"}) as r:
                assert r.headers["X-Georeg-Replica"] == "eastus"      # the node answered
            async with http.head(url + "/georeg/v1/inventory") as r:
                assert r.status == 404 and "X-Georeg-Replica" not in r.headers
        node = one_node.node_url("eastus")
        # The disguises are real: the node itself routes several of them to the route.
        served = set()
        for target in disguises("/georeg/v1/inventory"):
            [(head, _)] = await raw_exchange(node, b"GET %s HTTP/1.1\r\nHost: r\r\n%s\r\n"
                                             % (target.encode(), header_lines(internal)), 1)
            if head.startswith(b"HTTP/1.1 200"):
                served.add(target)
        assert {"/georeg/v1/inventory?x=1", "/georeg/v1/inventory#fragment", "/%67eoreg/v1/inventory",
                "http://registry.example/georeg/v1/inventory"} <= served
        for path in ("/georeg/v1/inventory", "/georeg/v1/node", "/metrics",
                     "/georeg/v1/faults/storage"):
            async with http.get(node + path, headers=internal) as r:
                assert r.status == 200, path
        try:
            async with http.put(node + "/georeg/v1/faults/storage", json={"slow_ms": 1},
                                headers=internal) as r:
                assert r.status == 200 and (await r.json())["slow_ms"] == 1
        finally:
            async with http.put(node + "/georeg/v1/faults/storage", json={"slow_ms": 0},
                                headers=internal) as r:
                assert r.status == 200
