"""Blob downloads handed over to the node: the routing proxy passes the client's
socket to the node (``cluster.routing.handoff``, ``registry_node.handoff``), which writes
the response on it. Real node processes, real sockets; every answer is held
against the same request relayed by a proxy that never hands over.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import time

import aiohttp
import httptools
import pytest
import yarl
from aiohttp import web

from cluster.routing.handoff import Channel
from cluster.routing.policy import NodeEndpoint, NodeHealth, ReplicaGroup, Replicas
from cluster.routing.proxy import RoutingProxy
from registry_node import handoff as node_side
from registry_node.config import SHUTDOWN_GRACE_S

from .helpers import NodeProcess, digest_of, eventually, make_image, push_blob, push_image

MIB = 1 << 20
# What a client may rely on in a download's answer (not Date or Server).
COMPARED = ("Content-Length", "Content-Type", "Docker-Content-Digest", "Accept-Ranges",
            "Content-Range", "Docker-Distribution-API-Version", "X-Georeg-Replica", "Connection")


@pytest.fixture
def nodes(node_process):
    """Node processes by name (conftest's factory), each a region of its own;
    at the end, checks that no exchange of the test's proxies tried a move its
    lifecycle does not hold."""
    yield lambda name: node_process(name, "--region", "eastus")
    assert [p.illegal_transitions for p in _PROXIES] == [0] * len(_PROXIES)
    _PROXIES.clear()


_PROXIES: list[RoutingProxy] = []


def endpoint(proc: NodeProcess, name: str) -> NodeEndpoint:
    host, port = proc.url.removeprefix("http://").rsplit(":", 1)
    return NodeEndpoint(name, name, "", host, int(port))


async def proxy_over(*members: tuple[NodeProcess, str], **options) -> RoutingProxy:
    """A global endpoint for clients in the first member's region, nearest first."""
    order = {name: i for i, (_, name) in enumerate(members)}
    replicas = Replicas([ReplicaGroup(name, (endpoint(proc, name),)) for proc, name in members])
    proxy = RoutingProxy.global_endpoint(members[0][1], replicas,
                                         lambda _client, replica: order[replica], NodeHealth(),
                                         **options)
    await proxy.start()
    _PROXIES.append(proxy)
    return proxy


async def stalled_download(proxy: RoutingProxy, node: NodeProcess, name: str,
                           digest: str) -> tuple[socket.socket, Channel]:
    """A client that asks for ``digest`` and reads nothing, once the node is
    writing it on the handed-over connection (a small receive buffer keeps it
    writing): the socket and the node's channel."""
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(f"GET /v2/app/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    channel = proxy.handoffs.channel(endpoint(node, name))
    await eventually(lambda: bool(channel.writing), timeout=10,
                     what="the node writing the download")
    return sock, channel


async def fetch(session: aiohttp.ClientSession, url: str, **headers: str):
    async with session.get(yarl.URL(url, encoded=True), headers=headers) as r:  # sent as written
        return r.status, {h: r.headers.get(h) for h in COMPARED}, await r.read()


async def test_downloads_are_written_by_the_node_as_the_relay_would_answer(nodes):
    node = nodes("eastus")
    image = make_image([3 * MIB + 17, 1000], seed=5)
    big, small = image.layers
    handing = await proxy_over((node, "eastus"))
    relaying = await proxy_over((node, "eastus"), handoff_blobs=False)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                         auto_decompress=False) as session:
            await push_image(session, node.url, "team/app", image, tag="v1")
            blob = "/v2/team/app/blobs/"
            asks = [(blob + digest_of(big), {}),
                    (blob + digest_of(small), {}),
                    (blob + digest_of(big), {"Range": "bytes=100-199"}),
                    (blob + digest_of(big), {"Range": f"bytes={2 * MIB}-"}),
                    (blob + digest_of(small), {"Range": "bytes=-10"})]
            for path, headers in asks:
                handed = await fetch(session, handing.url + path, **headers)
                relayed = await fetch(session, relaying.url + path, **headers)
                assert handed == relayed, path
                assert handed[0] in (200, 206) and handed[1]["X-Georeg-Replica"] == "eastus"
            assert handing.handed_over == len(asks) and relaying.handed_over == 0
            assert (await fetch(session, handing.url + asks[0][0]))[2] == big

            # Anything but a plain download the node can serve is relayed: the
            # errors, and what aiohttp reads differently (an escaped path).
            relayed_asks = [(blob + "sha256:" + "0" * 64, {}, 404),        # unknown
                            (blob + "sha256:zz", {}, 400),                  # malformed digest
                            (asks[1][0], {"Range": "bytes=5000-"}, 416),    # unsatisfiable
                            ("/v2/Team/app/blobs/" + digest_of(small), {}, 400),  # bad name
                            ("/v2/te%61m/app/blobs/" + digest_of(small), {}, 200)]
            for path, headers, status in relayed_asks:
                handed = await fetch(session, handing.url + path, **headers)
                relayed = await fetch(session, relaying.url + path, **headers)
                assert handed == relayed and handed[0] == status, (path, handed[:2])
            assert handing.handed_over == len(asks) + 1
            async with session.head(handing.url + asks[0][0]) as r:     # HEAD: relayed
                assert r.status == 200 and r.headers["Content-Length"] == str(len(big))
            assert handing.handed_over == len(asks) + 1
            # One client connection carried all of it.
            assert len(handing._clients) == 1
            assert handing.requests_by_backend["eastus"] == len(asks) + 1 + len(relayed_asks) + 1
    finally:
        await handing.stop()
        await relaying.stop()


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Read ``count`` responses (then EOF, if the last says close) off a raw socket."""
    responses: list = []

    class Parser:
        def on_message_begin(self):
            responses.append([0, {}, bytearray()])

        def on_header(self, name, value):
            responses[-1][1][name.lower()] = value

        def on_body(self, body):
            responses[-1][2] += body

        def on_message_complete(self):
            responses[-1][0] = parser.get_status_code()

    parser = httptools.HttpResponseParser(Parser())
    sock.settimeout(10)
    while not (len(responses) == count and responses[-1][0]):
        data = sock.recv(1 << 16)
        assert data, f"connection closed after {len(responses)} responses"
        parser.feed_data(data)
    return [(s, h, bytes(b)) for s, h, b in responses]


async def test_pipelined_requests_around_downloads_are_answered_in_order(nodes):
    node = nodes("eastus")
    image = make_image([200_000, 3000], seed=6)
    proxy = await proxy_over((node, "eastus"))
    try:
        async with aiohttp.ClientSession() as session:
            await push_image(session, node.url, "app", image, tag="v1")
        first, second = (f"/v2/app/blobs/{digest_of(x)}" for x in image.layers)
        heads = [f"GET {first} HTTP/1.1\r\nHost: x\r\n\r\n",
                 "GET /v2/app/manifests/v1 HTTP/1.1\r\nHost: x\r\n"
                 "Accept: application/vnd.oci.image.manifest.v1+json\r\n\r\n",
                 f"GET {second} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"]
        loop = asyncio.get_running_loop()

        def exchange() -> tuple[list, bytes]:
            with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
                sock.sendall("".join(heads).encode())
                got = read_responses(sock, 3)
                return got, sock.recv(1)

        got, after = await loop.run_in_executor(None, exchange)
        assert [r[0] for r in got] == [200, 200, 200]
        assert got[0][2] == image.layers[0] and got[2][2] == image.layers[1]
        assert got[1][2] == image.manifest
        assert all(r[1][b"x-georeg-replica"] == b"eastus" for r in got)
        assert got[2][1][b"connection"] == b"close" and after == b""   # then the proxy closed
        assert proxy.handed_over == 2
    finally:
        await proxy.stop()


async def test_a_node_killed_under_a_hand_over_fails_over_unseen(nodes):
    """The node is stopped, so it has taken the client's socket but written
    nothing; then killed. The proxy must relay the download to the next replica,
    and the client sees only a 200 from there."""
    east, west = nodes("eastus"), nodes("westus")
    data = os.urandom(300_000)
    proxy = await proxy_over((east, "eastus"), (west, "westus"))
    try:
        async with aiohttp.ClientSession() as session:
            digest = await push_blob(session, east.url, "app", data)
            assert await push_blob(session, west.url, "app", data) == digest
            url = f"{proxy.url}/v2/app/blobs/{digest}"
            async with session.get(url) as r:            # opens the hand-over channel
                assert r.headers["X-Georeg-Replica"] == "eastus" and await r.read() == data
            channel = proxy.handoffs.channel(endpoint(east, "eastus"))
            os.killpg(east.proc.pid, signal.SIGSTOP)
            pending = asyncio.ensure_future(session.get(url))
            try:
                await eventually(lambda: bool(channel.waiting), timeout=5,
                                 what="the download handed over to the stopped node")
                east.kill()
                async with await asyncio.wait_for(pending, 60) as r:
                    assert r.status == 200 and r.headers["X-Georeg-Replica"] == "westus"
                    assert await r.read() == data
            finally:
                pending.cancel()
            assert proxy.failovers == 1 and proxy.handed_over == 1
            assert channel.closed
            # Later downloads go to westus, handed over there.
            async with session.get(url) as r:
                assert r.headers["X-Georeg-Replica"] == "westus" and await r.read() == data
            assert proxy.handed_over == 2
    finally:
        await proxy.stop()


async def test_a_client_hanging_up_mid_download_leaves_node_and_proxy_ready(nodes):
    node = nodes("eastus")
    data = os.urandom(24 * MIB)
    proxy = await proxy_over((node, "eastus"))
    try:
        async with aiohttp.ClientSession() as session:
            digest = await push_blob(session, node.url, "app", data)
            path = f"/v2/app/blobs/{digest}"

            def hang_up() -> int:
                with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
                    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    sock.settimeout(10)
                    return len(sock.recv(64 * 1024))

            assert await asyncio.get_running_loop().run_in_executor(None, hang_up) > 0
            channel = proxy.handoffs.channel(endpoint(node, "eastus"))
            await eventually(lambda: not channel.waiting and not proxy._clients, timeout=10,
                             what="the node giving the cut download up")
            assert not channel.closed
            async with session.get(proxy.url + path) as r:
                assert r.status == 200 and await r.read() == data
            assert proxy.handed_over == 2
    finally:
        await proxy.stop()


async def test_a_download_in_flight_when_the_node_is_told_to_stop_completes(nodes):
    node = nodes("eastus")
    data = os.urandom(32 * MIB)
    proxy = await proxy_over((node, "eastus"))
    try:
        async with aiohttp.ClientSession() as session:
            digest = await push_blob(session, node.url, "app", data)
        sock, channel = await stalled_download(proxy, node, "eastus", digest)
        with sock:
            node.proc.send_signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            [(status, headers, body)] = await loop.run_in_executor(None, read_responses, sock, 1)
            assert status == 200 and body == data
            await loop.run_in_executor(None, node.proc.wait, 20)
            assert node.proc.returncode == 0
        assert proxy.handed_over == 1
    finally:
        await proxy.stop()


async def test_a_node_stopping_under_a_stalled_download_cuts_it_and_exits(nodes):
    """SIGTERM while a client is not reading a handed-over download: after the
    grace requests in flight get, the node ends it (the proxy resets the
    client's connection) and exits cleanly."""
    node = nodes("eastus")
    data = os.urandom(32 * MIB)
    proxy = await proxy_over((node, "eastus"))
    try:
        async with aiohttp.ClientSession() as session:
            digest = await push_blob(session, node.url, "app", data)
        sock, channel = await stalled_download(proxy, node, "eastus", digest)
        try:
            node.proc.send_signal(signal.SIGTERM)
            told = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(None, node.proc.wait, 20)
            assert node.proc.returncode == 0
            assert time.monotonic() - told >= SHUTDOWN_GRACE_S - 0.5   # it had its grace
            assert proxy.handed_over == 1

            def drain() -> int:
                sock.settimeout(10)
                got = 0
                try:
                    while chunk := sock.recv(1 << 20):
                        got += len(chunk)
                except ConnectionResetError:
                    pass
                return got

            got = await asyncio.get_running_loop().run_in_executor(None, drain)
            assert got < len(data)          # cut short: never a whole-looking response
            await eventually(lambda: not channel.waiting and not proxy._clients, timeout=5,
                             what="the proxy closing the cut connection")
        finally:
            sock.close()
    finally:
        await proxy.stop()


def _open_on(pid: int, name: str) -> int:
    """How many of process ``pid``'s descriptors are open on a file named ``name``."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):      # closed meanwhile
            count += os.readlink(f"/proc/{pid}/fd/{fd}").endswith("/" + name)
    return count


def _ask_blob(port: int, digest: str) -> socket.socket:
    """A raw client's GET of ``digest``: its socket once the head has come, with
    no body byte after it."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(10)
    sock.sendall(f"GET /v2/app/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:          # bounded by the timeout
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n"), head
    return sock


async def test_stalled_downloads_let_go_when_clients_hang_up_and_finish_when_the_node_stops(
        nodes):
    """Bodies stalled (``georeg fault pause --stall-bodies``): a download asked of
    the node and one an endpoint hands over each send their head, then hold the
    blob's file; their clients hanging up frees it, stall or not (a client that
    gives up and retries piles nothing up). One still held when the node is
    told to stop gets its whole body, and the node exits at once instead of
    waiting out its grace."""
    node = nodes("eastus")
    data = os.urandom(2 * MIB)
    proxy = await proxy_over((node, "eastus"))
    loop = asyncio.get_running_loop()
    try:
        async with aiohttp.ClientSession() as session:
            digest = await push_blob(session, node.url, "app", data)
            async with session.put(f"{node.url}/georeg/v1/faults/stall",
                                   json={"bodies": True}) as r:
                assert r.status == 200
        name, pid = digest.partition(":")[2], node.proc.pid
        ports = (int(node.url.rsplit(":", 1)[1]), proxy.port)
        clients = [await loop.run_in_executor(None, _ask_blob, port, digest) for port in ports]
        assert proxy.handed_over == 1 and _open_on(pid, name) == 2
        for sock in clients:
            sock.close()
        await eventually(lambda: _open_on(pid, name) == 0, timeout=5,
                         what="the node letting go of downloads whose clients hung up")

        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(f"GET /v2/app/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await eventually(lambda: _open_on(pid, name) == 1, timeout=5,
                             what="the download held")
            node.proc.send_signal(signal.SIGTERM)
            told = time.monotonic()
            [(status, _, body)] = await loop.run_in_executor(None, read_responses, sock, 1)
            assert status == 200 and body == data
            await loop.run_in_executor(None, node.proc.wait, 20)
            assert node.proc.returncode == 0
            assert time.monotonic() - told < SHUTDOWN_GRACE_S - 1, "it waited out its grace"
    finally:
        await proxy.stop()


@pytest.mark.parametrize("head", [
    b"GET /v2/app/blobs/sha256:%s HTTP/1.0\r\n\r\n",
    b"HEAD /v2/app/blobs/sha256:%s HTTP/1.1\r\n\r\n",
    b"GET /v2/ap%%70/blobs/sha256:%s HTTP/1.1\r\n\r\n",
    b"GET /v2/app/blobs/sha256:%s HTTP/1.1\r\nno colon\r\n\r\n",
    # A redirect asked for, and a blob grant: the HTTP chain's to answer and to judge.
    b"GET /v2/app/blobs/sha256:%s HTTP/1.1\r\nX-Georeg-Redirect: 127.0.0.1\r\n\r\n",
    b"GET /v2/app/blobs/sha256:%s?expires=1&signature=x HTTP/1.1\r\n\r\n",
    b"GET /v2/app/blobs/sha256:%s?signature=x HTTP/1.1\r\n\r\n",
    b"GET /v2/app/blobs/sha256:%s?expires= HTTP/1.1\r\n\r\n",       # blank, still a grant
])
def test_heads_the_http_api_would_read_differently_are_declined(head):
    with pytest.raises(node_side._Declined):
        node_side._parse(head % (b"0" * 64))


def test_a_forwarded_head_is_read_as_aiohttp_reads_it():
    path, headers = node_side._parse(
        b"GET /v2/a/b/blobs/sha256:00?x=1 HTTP/1.1\r\nRange: bytes=1-2\r\nrange: bytes=3-4\r\n"
        b"X-Request-Id: abc\r\n\r\n")
    assert path == "/v2/a/b/blobs/sha256:00"
    assert headers == {"range": "bytes=1-2", "x-request-id": "abc"}


async def test_downloads_handed_over_while_a_node_stops_go_elsewhere_at_once(nodes, node_process):
    """During a node's shutdown grace its hand-over socket still answers, with
    "not served": a download routed there meanwhile fails over to the next
    replica instead of waiting out the grace (ten minutes here: the download
    is served while the node is still in it)."""
    east = node_process("eastus", "--region", "eastus", "--shutdown-grace", "600")
    west = nodes("westus")
    stalled, quick = os.urandom(32 * MIB), os.urandom(100_000)
    proxy = await proxy_over((east, "eastus"), (west, "westus"))
    try:
        async with aiohttp.ClientSession() as session:
            big = await push_blob(session, east.url, "app", stalled)
            small = await push_blob(session, east.url, "app", quick)
            assert await push_blob(session, west.url, "app", quick) == small
            sock, _ = await stalled_download(proxy, east, "eastus", big)
            with sock:
                east.proc.send_signal(signal.SIGTERM)
                await eventually(lambda: _listening_gone(endpoint(east, "eastus")), timeout=30,
                                 what="eastus refusing new connections")

                async def download() -> tuple[int, str, bytes]:
                    async with session.get(f"{proxy.url}/v2/app/blobs/{small}") as r:
                        return r.status, r.headers["X-Georeg-Replica"], await r.read()

                # Bounds the wait only: the grace it must not wait out is 600 s.
                assert await asyncio.wait_for(download(), 60) == (200, "westus", quick)
                assert east.proc.poll() is None                        # still in its grace
    finally:
        await proxy.stop()


def _listening_gone(node: NodeEndpoint) -> bool:
    try:
        socket.create_connection((node.host, node.port), timeout=1).close()
    except OSError:
        return True
    return False


async def test_a_channel_the_proxy_closes_itself_never_lets_a_response_be_doubled(
        nodes, monkeypatch):
    """The node has said it is writing, the proxy has not read that yet, and the
    proxy drops the channel: it must not relay the request a second time."""
    node = nodes("eastus")
    data = os.urandom(2 * MIB)
    proxy = await proxy_over((node, "eastus"))
    hand = Channel.hand

    def hand_then_drop(channel: Channel, *args):
        serial = hand(channel, *args)

        def drop() -> None:
            # Runs before the proxy's loop reads the channel again: block it
            # until the node's W is in the socket, then drop the channel unread.
            assert select.select([channel.sock], [], [], 10)[0]
            channel.close("the test drops it")

        asyncio.get_running_loop().call_soon(drop)
        return serial

    monkeypatch.setattr(Channel, "hand", hand_then_drop)
    try:
        async with aiohttp.ClientSession() as session:
            digest = await push_blob(session, node.url, "app", data)

        def download() -> bytes:
            with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
                sock.sendall(f"GET /v2/app/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                sock.settimeout(10)
                got = bytearray()
                with contextlib.suppress(ConnectionResetError):
                    while chunk := sock.recv(1 << 20):
                        got += chunk
                return bytes(got)

        got = await asyncio.get_running_loop().run_in_executor(None, download)
        # The node's one response, whole (it still held the socket), then the end.
        assert got.count(b"HTTP/1.1 ") == 1 and got.startswith(b"HTTP/1.1 200 OK\r\n")
        assert got.endswith(data)
        assert sum(proxy.requests_by_backend.values()) == 0 and proxy.failovers == 0
    finally:
        await proxy.stop()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to take a socket as another user")
async def test_a_hand_over_socket_of_another_user_never_gets_a_client():
    """Abstract socket names have no permissions: another user may take a
    node's. The proxy checks who it reached and relays instead."""
    async def relayed(request: web.Request) -> web.Response:
        return web.Response(text="relayed")

    app = web.Application()
    app.router.add_get("/v2/{tail:.*}", relayed)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    squatter.bind(node_side.address("127.0.0.1", port))
    os.seteuid(65534)               # the kernel records who listens at listen()
    try:
        squatter.listen(4)
    finally:
        os.seteuid(0)
    node = NodeEndpoint("eastus", "eastus", "", "127.0.0.1", port)
    proxy = RoutingProxy.global_endpoint("eastus", Replicas([ReplicaGroup("eastus", (node,))]),
                                         lambda _c, _r: 0.0, NodeHealth())
    await proxy.start()
    try:
        # (Handed over, the download would wait on the squatter forever.)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(f"{proxy.url}/v2/app/blobs/sha256:{'0' * 64}") as r:
                assert r.status == 200 and await r.text() == "relayed"
        assert proxy.handed_over == 0
        squatter.settimeout(5)
        conn, _ = squatter.accept()          # the proxy did connect, and looked
        with conn:
            conn.settimeout(5)
            message, ancillary, _, _ = conn.recvmsg(1 << 17, socket.CMSG_SPACE(4))
        assert (message, ancillary) == (b"", [])     # and left, handing nothing over
    finally:
        squatter.close()
        await proxy.stop()
        await runner.cleanup()


@pytest.mark.parametrize("scenario", [
    test_downloads_are_written_by_the_node_as_the_relay_would_answer,
    test_pipelined_requests_around_downloads_are_answered_in_order,
    test_a_node_killed_under_a_hand_over_fails_over_unseen,
], ids=lambda f: f.__name__.removeprefix("test_"))
def test_on_uvloop(scenario, nodes):
    """georeg's endpoints run under uvloop: the proxy's side of hand-overs again there."""
    import uvloop

    uvloop.run(scenario(nodes))


def test_a_client_that_hangs_up_after_unread_bytes_is_seen_gone():
    """A held hand-over looks for its client's end by poll, not by peeking: a
    peek sees no end behind a pipelined request nobody has read yet."""
    held, client = socket.socketpair()
    with held, client:
        assert not node_side._hung_up(held)
        client.sendall(b"GET /v2/ HTTP/1.1\r\n\r\n")        # pipelined, unread
        assert not node_side._hung_up(held)
        client.close()
        assert node_side._hung_up(held)
