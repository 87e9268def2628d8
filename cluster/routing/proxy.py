"""The routing layer's sockets: a streaming HTTP/1.1 reverse proxy per endpoint
(the global endpoint of one client location, or one region's regional
endpoint).

``cluster.routing.policy`` decides where a request goes; this module moves the bytes.
It works at the asyncio ``Protocol`` level and parses only what it must, with
httptools (llhttp): the request head (to route it), the response head (to add
``X-Georeg-Replica`` and learn upload sessions) and message boundaries (for
keep-alive on both sides). A ``Content-Length`` body is counted, not parsed:
the bytes read are the bytes written (``cluster.routing.stream``), and once a
read leaves ``SPLICE_MIN`` or more of it to come, the rest goes from socket to
socket inside the kernel (``cluster.routing.splice``), never through Python. A chunked
body goes through the parser and is re-framed on the way out.

Three kinds of object: ``_ClientConnection`` (one client socket: parses its
requests, queues their exchanges, holds its reads while it must),
``_BackendConnection`` (one socket to a node, pooled between exchanges) and
``_Exchange`` (one request and its response). An exchange's state is its
phase, from ``cluster.routing.lifecycle`` (queued, connecting, handed over,
sent, relaying, answered, cut, aborted, ...), changed in one method that
refuses any move the lifecycle's table does not hold; its other fields are
data. The active health probe is ``cluster.routing.probe``.

Invariants
    * Nothing buffers a whole body. Each direction holds at most the socket
      write buffer's high-water mark plus one read; a full buffer pauses
      reading on the other side (backpressure both ways).
    * With TLS (``server_tls``), the proxy terminates the client's TLS and
      reaches nodes over TLS again (``backend_tls``, trusting the cluster CA
      only): bytes then pass through the proxy's memory to be decrypted and
      encrypted again, so nothing goes through the kernel and no socket is
      handed over (a TLS transport has no descriptor to give: ``_socket_fd``
      answers -1, and every splice and hand-over checks it).
    * A request is retried on the next candidate only while none of its body
      has left the proxy and no response byte has come back: after a refused
      or timed-out connect (the node is marked down at once), or when a
      connection closes before answering (a pooled connection gets one retry
      on a fresh connection to the same node first; a fresh one marks the
      node down), or when health checks take its node out of routing while a
      ``GET`` or ``HEAD`` waits on it (a node that stopped answering:
      ``node_lost``). A request whose body was partly sent gets a ``502`` and its
      connection is closed; one whose response was partly sent has its client
      connection closed (the client retries). ``429`` and every other status
      pass through untouched: only transport failures fail over.
    * Only what ``policy.request_route`` forwards reaches a node: the
      registry's API. Any other path (a node's internal routes however the
      target spells them) gets the proxy's own ``404``, in its turn on a
      pipelined connection, and no node is contacted for it.
    * HTTP faults (``cluster.routing.http_faults``) act before routing: an
      injected status is the proxy's own answer (definite: no node saw the
      request), a reset aborts the client's connection; a truncated response
      is relayed (never handed over, spliced or redirected, so the proxy sees
      its body) and the client's connection is aborted halfway through it.
    * Every proxied response carries ``X-Georeg-Replica: <node name>``; a
      response that is the proxy's own (``503`` no replica, ``502``, ``404``)
      does not, except a redirect, which names the node it sends the client to.
    * The proxy's own errors follow the node's wire contract
      (``registry_node.errors``): a 5xx says in ``detail.outcome`` whether the
      request may have taken effect. ``503`` (no replica) and ``501`` sent
      nothing to a node: definite. A ``502`` came after the request reached a
      node: indefinite for a write, definite for a ``GET`` or ``HEAD``.
    * Upload sessions are learnt from ``Location`` / ``Docker-Upload-UUID`` of
      the responses that carry them and forgotten when the session completes
      (``PUT``) or is cancelled (``DELETE``).
    * ``Expect: 100-continue`` is answered by the proxy once a backend
      connection is ready, and not forwarded.
    * A ``GET`` of a blob by digest is handed over where the node takes it
      (``cluster.routing.handoff``): the client's socket goes to the node routing
      chose, which writes the response on it; the proxy writes nothing on
      that connection until the node says it is done, then carries on. The
      node declines what it would answer with an error (the request is then
      relayed to it). A node lost before it began writing is failed over as
      a refused connect is; lost after, the client's connection is closed
      (as for a relayed response cut short).
    * With ``redirect_blobs`` (spec ``blob_downloads = "redirect"``), a ``GET`` of
      a blob by digest (in origin form) is answered with a ``307`` to the node
      routing chose, which serves the bytes. On an open cluster the proxy
      answers it itself, to the same path on that node, without contacting it,
      so only health checks (not a refused connect) take a dead node out of
      these answers. With ``node_redirects`` (a cluster with auth) the proxy
      decides no access, so it cannot answer: it forwards the request as any
      (failing over as any; never handed over) with ``X-Georeg-Redirect``
      added, and the node, once its access chain admitted the request,
      answers the ``307`` itself, to its own address with a grant in the URL
      (``registry_node.api.redirects``); that response is relayed and counted
      as a redirect.
    * A request answered before its body ended (an early 404, the proxy's
      own 503) has the rest of its body read and dropped, for at most
      ``_LINGER_S``, then the client connection carries on (or closes, if the
      body takes longer, or the request said ``Connection: close``); that
      backend connection is never reused. The framing of the next request is
      never in doubt, and a client still sending reads its answer, never a
      reset.
    * A client sends one request at a time (no client of a registry
      pipelines); a pipelined request is parsed, held and sent after the
      previous response, to the node its own route picks.

The proxy runs on the caller's event loop (uvloop when the process runs
under it, as ``georeg`` does); state changes (health, routing flags) are
plain calls on the shared ``NodeHealth`` and ``Replicas`` objects from that
loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import struct
import time
from collections import Counter, deque
from collections.abc import Callable

import httptools
import structlog

from registry_node.auth.grants import REDIRECT_HEADER
from registry_node.config import listens_everywhere
from registry_node.errors import Outcome

from . import splice as kernel
from .handoff import Channel, Handoffs
from .http_faults import HttpFaultDecision, HttpFaults
from .lifecycle import TRANSITIONS, IllegalTransition, Phase
from .policy import (
    EndpointPolicy,
    GlobalPolicy,
    HealthView,
    LatencyMs,
    NodeEndpoint,
    RegionalPolicy,
    ReplicaGroup,
    Replicas,
    RequestRoute,
    UploadAffinity,
    ZoneSpread,
    request_route,
    upload_id_of,
)
from .stream import HeadTooLarge, MessageStream

log = structlog.get_logger("georeg.routing")

REPLICA_HEADER = b"X-Georeg-Replica"
# Names the fault (georeg fault http) that answered a request instead of the registry.
FAULT_HEADER = "X-Georeg-Fault"
REDIRECT_REQUEST_HEADER = REDIRECT_HEADER.encode()
# Methods that ask for no change: a node that failed under one changed nothing.
_READS = frozenset({b"GET", b"HEAD"})
# Hop-by-hop headers (RFC 9110 7.6.1) and what the proxy re-frames itself.
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                         b"upgrade"})
_MAX_HEAD = 64 * 1024                 # request line + headers; larger gets 431
_WRITE_HIGH_WATER = 256 * 1024
# Reads go into one of two buffers shared by every connection of the process
# (a read is handled in full before the next): a small one while a head is
# expected or a body may yet be spliced, so little of a body passes through
# Python before the rest goes through the kernel, and a large one for bodies
# that are copied.
_HEAD_READ = 16 * 1024
_BODY_READ = 256 * 1024
_CHUNK_END = b"0\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LINGER_S = 5.0                       # how long an answered request's body is read and dropped
# Bodies with at least this much left go socket to socket inside the kernel (``cluster.routing.splice``).
SPLICE_MIN = 64 * 1024

# Reasons a client connection stops being read (bits; reading resumes when none is left).
_HOLD_CONNECTING = 1       # the request's backend is not chosen yet: hold its body back
_HOLD_BACKPRESSURE = 2     # the backend's socket buffer is full
_HOLD_AWAITING = 4         # the request is complete; its response is in flight
_HOLD_SPLICING = 8         # the rest of the request body is being spliced to the node


# Phases by module-level name: the hot paths compare with ``is`` and no lookup.
_QUEUED, _CONNECTING, _HANDED_OVER, _NODE_WRITING = (
    Phase.QUEUED, Phase.CONNECTING, Phase.HANDED_OVER, Phase.NODE_WRITING)
_SENT, _INTERIM, _RELAYING = Phase.SENT, Phase.INTERIM, Phase.RELAYING
_ANSWERED, _CUT, _ABORTED = Phase.ANSWERED, Phase.CUT, Phase.ABORTED

# What an exchange holds once it is over: its own stream and parser point back at
# it, and dropping them then lets reference counting free it (no cyclic GC work).
_DETACHED = MessageStream(lambda: None, lambda data: None, lambda: None, 0)


class RoutingProxy:
    """One endpoint: accepts client connections on ``start(host, port)`` and
    routes each request with ``policy``.

    ``health`` receives ``mark_down`` on connect failures; ``affinity`` may be
    shared by every endpoint of a cluster so a session begun through one
    endpoint continues through another.
    """

    def __init__(self, policy: EndpointPolicy, health: HealthView,
                 affinity: UploadAffinity | None = None, *, connect_timeout_s: float = 1.0,
                 client_idle_timeout_s: float = 75.0, backend_idle_timeout_s: float = 30.0,
                 max_idle_per_backend: int = 64, splice_min: int | None = SPLICE_MIN,
                 redirect_blobs: bool = False, node_redirects: bool = False,
                 handoff_blobs: bool = True,
                 server_tls: ssl.SSLContext | None = None,
                 backend_tls: ssl.SSLContext | None = None) -> None:
        self.policy = policy
        # HTTPS to clients, and to nodes (a TLS cluster has both or neither).
        self.server_tls = server_tls
        self.backend_tls = backend_tls
        self.health = health
        self.affinity = affinity if affinity is not None else UploadAffinity()
        self.connect_timeout_s = connect_timeout_s
        self.client_idle_timeout_s = client_idle_timeout_s
        self.backend_idle_timeout_s = backend_idle_timeout_s
        self.requests_by_backend: Counter[str] = Counter()
        self.failovers = 0                # requests sent on after a candidate failed
        self.unavailable_responses = 0    # 503s for want of a healthy node
        self.not_forwarded = 0            # 404s for paths endpoints do not carry
        self.illegal_transitions = 0      # moves of an exchange its lifecycle refused (bugs)
        self.redirect_blobs = redirect_blobs
        # Redirects are the nodes' to answer (they authenticate, and sign a grant).
        self.node_redirects = node_redirects
        self.redirects = 0                # blob downloads sent to a node with a 307
        # Relayed blob downloads are handed over to the node where it takes them.
        self.handoffs = Handoffs() if handoff_blobs and server_tls is None else None
        self.handed_over = 0              # blob downloads the node wrote on the client's socket
        # Counted bodies with this much left go through the kernel (None: never).
        # Never through TLS: what is on the socket is ciphertext, and reads stay
        # large (a small read is only worth it while a splice may follow).
        self.splice_min = splice_min if kernel.AVAILABLE and splice_min and server_tls is None \
            else 0
        self.spliced_bytes = 0            # body bytes taken from a socket by a splice
        self.pipes = kernel.SHARED
        self.host = "127.0.0.1"
        self.port = 0
        self._pool = _BackendPool(self, max_idle_per_backend)
        # Injected by the fault controller; named as `georeg fault http` names endpoints.
        self.http_faults = HttpFaults(policy.name.replace("@", ":"))
        self._connecting: set[asyncio.Task] = set()
        self._clients: set[_ClientConnection] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task | None = None

    @classmethod
    def global_endpoint(cls, client_region: str, replicas: Replicas, latency_ms: LatencyMs,
                        health: HealthView, affinity: UploadAffinity | None = None, *,
                        zone_spread: ZoneSpread = ZoneSpread.REPOSITORY,
                        **options) -> RoutingProxy:
        return cls(GlobalPolicy(client_region, replicas, latency_ms, health,
                                zone_spread=zone_spread), health, affinity, **options)

    @classmethod
    def regional_endpoint(cls, replica: ReplicaGroup, health: HealthView,
                          affinity: UploadAffinity | None = None, *,
                          zone_spread: ZoneSpread = ZoneSpread.REPOSITORY,
                          **options) -> RoutingProxy:
        return cls(RegionalPolicy(replica, health, zone_spread=zone_spread), health, affinity,
                   **options)

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def scheme(self) -> bytes:
        return b"https" if self.server_tls is not None else b"http"

    @property
    def url(self) -> str:
        return f"{self.scheme.decode()}://{self.host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 picks a free port); returns the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ClientConnection(self), host, port,
                                                backlog=1024, reuse_address=True,
                                                ssl=self.server_tls)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        period = min(self.client_idle_timeout_s, self.backend_idle_timeout_s) / 4
        self._sweeper = loop.create_task(self._sweep(period))
        log.info("endpoint_listening", endpoint=self.name, host=host, port=self.port)
        return self.port

    async def stop(self) -> None:
        """Stop accepting, close every client and backend connection."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        self._pool.closed = True
        if self._server is not None:
            self._server.close()
        for client in list(self._clients):
            client.shut()
        if self.handoffs is not None:
            self.handoffs.close_all()
        self._pool.close_all()
        for task in list(self._connecting):
            task.cancel()
        await asyncio.gather(*self._connecting, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def node_lost(self, name: str) -> int:
        """Health checks took node ``name`` out of routing: every read sent to
        it and still without a response byte goes to the next candidate now,
        as if its connection had closed (``_Exchange.node_lost``). How many
        moved."""
        return sum(client.queue[0].node_lost(name) for client in list(self._clients)
                   if client.queue)

    async def _sweep(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for client in list(self._clients):
                if not client.queue and now - client.idle_since > self.client_idle_timeout_s:
                    client.shut()
            self._pool.expire(now - self.backend_idle_timeout_s)


class _BackendPool:
    """Idle keep-alive connections per node address, most recently used first."""

    def __init__(self, proxy: RoutingProxy, max_idle: int) -> None:
        self.proxy = proxy
        self.max_idle = max_idle
        self.closed = False
        self._idle: dict[NodeEndpoint, list[_BackendConnection]] = {}

    def take(self, node: NodeEndpoint) -> _BackendConnection | None:
        idle = self._idle.get(node)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def put(self, conn: _BackendConnection) -> None:
        idle = self._idle.setdefault(conn.node, [])
        if conn.closed or self.closed or len(idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def discard(self, conn: _BackendConnection) -> None:
        idle = self._idle.get(conn.node)
        if idle and conn in idle:
            idle.remove(conn)

    def expire(self, idle_before: float) -> None:
        for idle in self._idle.values():
            for conn in [c for c in idle if c.idle_since < idle_before]:
                idle.remove(conn)
                conn.close()

    def close_all(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


class _ReadBuffers:
    """The process's two read buffers (see ``_HEAD_READ``)."""

    head: memoryview | None = None
    body: memoryview | None = None

    @classmethod
    def get(cls, small: bool) -> memoryview:
        if small:
            if cls.head is None:
                cls.head = memoryview(bytearray(_HEAD_READ))
            return cls.head
        if cls.body is None:
            cls.body = memoryview(bytearray(_BODY_READ))
        return cls.body


class _BackendConnection(asyncio.BufferedProtocol):
    """One connection to a node; serves one exchange at a time."""

    def __init__(self, node: NodeEndpoint, proxy: RoutingProxy) -> None:
        self.node = node
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.closed = False
        self.idle_since = 0.0
        self.fd = -1
        self._buffer: memoryview | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        self.fd = _socket_fd(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        exchange = self.exchange
        self._buffer = _ReadBuffers.get(exchange is None or exchange.stream.small_reads)
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        exchange = self.exchange
        if exchange is None:        # nothing was asked: a confused server, not to be reused
            self.close()
            return
        exchange.backend_data(self._buffer[:nbytes])

    def eof_received(self) -> bool:
        return False                # close; connection_lost tells the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy._pool.discard(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.backend_lost(self, exc)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.hold(_HOLD_BACKPRESSURE)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.release(_HOLD_BACKPRESSURE)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _ClientConnection(asyncio.BufferedProtocol):
    """One client connection: parses requests and runs their exchanges in order."""

    def __init__(self, proxy: RoutingProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.stream = MessageStream(lambda: httptools.HttpRequestParser(self), self.on_body,
                                     self.on_message_complete, _MAX_HEAD, self._take_body,
                                     proxy.splice_min)
        self.queue: deque[_Exchange] = deque()   # the first is in flight
        self.receiving: _Exchange | None = None  # whose request body is arriving
        self.peer = b""
        self.local = b""
        self.local_ip = ""
        self.draining: _Exchange | None = None
        self._close_after_drain = False     # the drained request's response closes the connection
        self._linger: asyncio.TimerHandle | None = None
        self.closed = False
        self.closing = False
        self.write_paused = False
        self.idle_since = time.monotonic()
        self._holds = 0
        self._starting = False          # in _start_first's loop
        self._start_again = False
        self._url: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self.fd = -1
        self._buffer: memoryview | None = None

    # -- transport callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        self.fd = _socket_fd(transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0].encode() if peer else b""
        local = transport.get_extra_info("sockname")
        self.local = f"{local[0]}:{local[1]}".encode() if local else b"localhost"
        self.local_ip = local[0] if local else ""
        self.proxy._clients.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        self._buffer = _ReadBuffers.get(self.stream.small_reads)
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.closing:
            return
        try:
            self.stream.feed(data)
        except HeadTooLarge:
            self._refuse(431, "UNSUPPORTED", "request head too large")
        except httptools.HttpParserUpgrade:
            self._refuse(501, "UNSUPPORTED", "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, HeadTooLarge):
                self._refuse(431, "UNSUPPORTED", "request head too large")
            elif cause is not None:          # a fault of ours, not the client's
                log.error("proxy_fault", endpoint=self.proxy.name, exc_info=cause)
                self.shut()
            else:
                self._refuse(400, "UNSUPPORTED", f"malformed HTTP request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy._clients.discard(self)
        if self._linger:
            self._linger.cancel()
        for exchange in self.queue:
            exchange.abort()
        self.queue.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.queue and (backend := self.queue[0].backend) is not None:
            backend.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.queue and (backend := self.queue[0].backend) is not None \
                and self.queue[0].resp_splice is None:
            backend.transport.resume_reading()

    # -- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.stream.begun()
        self._url = []
        self._headers = []
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._head_size += len(url)
        if self._head_size > _MAX_HEAD:
            raise HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > _MAX_HEAD:
            raise HeadTooLarge

    def on_headers_complete(self) -> None:
        parser = self.stream.parser
        exchange = _Exchange(self, parser.get_method(), b"".join(self._url), self._headers,
                             parser.get_http_version(), parser.should_keep_alive())
        self.receiving = exchange
        self.queue.append(exchange)
        self.stream.headers_done(exchange.req_length)
        if len(self.queue) == 1:
            self._start_first()

    def on_body(self, data: bytes) -> None:
        if self.receiving is not None:
            self.receiving.request_body(data)

    def on_message_complete(self) -> None:
        self.stream.ended()
        exchange, self.receiving = self.receiving, None
        if exchange is not None:
            exchange.request_done()

    def _take_body(self, left: int) -> bool:
        exchange = self.receiving
        return exchange is not None and exchange.splice_request(left)

    # -- used by exchanges -------------------------------------------------------------

    def hold(self, reason: int) -> None:
        if not self._holds and not self.closed:
            self.transport.pause_reading()
        self._holds |= reason

    def release(self, reason: int) -> None:
        if self._holds & reason:
            self._holds &= ~reason
            if not self._holds and not self.closed:
                self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def finished(self, exchange: _Exchange, close: bool) -> None:
        """``exchange`` (the first in the queue) has sent its whole response."""
        answered_early = not exchange.request_complete and (exchange.req_length
                                                            or exchange.req_chunked)
        if self.closing or self.closed or (close and not answered_early):
            self.closing = True
            if not self.closed:
                self.transport.close()      # after what is buffered has been sent
            return
        if answered_early:
            # Answered before its body ended (an early 404, a 503, a node's 403
            # to an upload past its storage limit): read the rest and drop it, for
            # a while, rather than close on a client that is still sending — it
            # might see a reset instead of its answer. A connection that closes
            # after this answer (the client sent ``Connection: close``, as skopeo
            # does on a streamed upload) closes once the body has ended
            # (``drained``). (A request without a body is only between its head
            # and its end, in this same parser call.)
            self._close_after_drain = close
            self.draining = exchange
            self._linger = asyncio.get_running_loop().call_later(_LINGER_S, self._linger_over)
            self.release(_HOLD_CONNECTING | _HOLD_BACKPRESSURE | _HOLD_AWAITING)
            return
        if self.queue and self.queue[0] is exchange:
            self.queue.popleft()
        exchange.stream = _DETACHED
        self.idle_since = time.monotonic()
        if self.queue:
            following = self.queue[0]
            self.release(_HOLD_BACKPRESSURE)
            if not following.request_complete:
                self.release(_HOLD_AWAITING)
            self._start_first()
        else:
            self.release(_HOLD_AWAITING | _HOLD_BACKPRESSURE)

    def _start_first(self) -> None:
        """Start the first exchange of the queue. One the proxy answers at once
        (a redirect, a 503) finishes inside its ``start``, which brings here
        again for the next: that call only asks this loop to go on, so a long
        pipeline of such requests is a loop, not a recursion."""
        if self._starting:
            self._start_again = True
            return
        self._starting = True
        try:
            self._start_again = True
            while self._start_again and self.queue and not self.closing:
                self._start_again = False
                self.queue[0].start()
        finally:
            self._starting = False

    def drained(self, exchange: _Exchange) -> None:
        """The body of an already answered request has ended: carry on."""
        if self.draining is exchange:
            self.draining = None
            if self._linger:
                self._linger.cancel()
            self.finished(exchange, close=self._close_after_drain)

    def _linger_over(self) -> None:
        self.draining = None
        self.closing = True
        if not self.closed:
            self.transport.close()

    def shut(self) -> None:
        """Close now (the proxy is stopping or the connection sat idle)."""
        self.closing = True
        for exchange in self.queue:
            exchange.abort()
        if self.transport is None or self.closed:
            return
        if self.queue:
            self.transport.abort()           # a response is cut short: say so with a reset
        else:
            self.transport.close()

    def reset(self) -> None:
        """Reset the connection (an injected fault: Toxiproxy's ``reset_peer``):
        with SO_LINGER 0 the kernel answers the close with an RST, so the
        client reads ECONNRESET, not an orderly end."""
        if self.transport is not None and not self.closed:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.shut()

    def _refuse(self, status: int, code: str, message: str) -> None:
        """A request the proxy cannot parse or forward: answer if nothing of a
        response is on the wire yet, and close."""
        self.closing = True
        if not self.queue or not self.queue[0].phase.response_begun:
            detail = {"outcome": Outcome.DEFINITE.value} if status >= 500 else {}  # never sent on
            self.write(_local_response(status, code, message, detail, close=True))
        for exchange in self.queue:
            exchange.abort()
        if not self.closed:
            self.transport.close()


class _Exchange:
    """One request and its response, from routing to the last body byte.

    Its phase (``cluster.routing.lifecycle``) is its state, changed only by
    ``_to``; the other fields are data: what the request is, where it went,
    how the response is framed, and the handles of what runs for it (a
    connect, a splice per direction, a hand-over). Two facts of the request
    direction only ever turn true: ``body_sent`` (some of the body left the
    proxy: the request can no longer go to another node) and
    ``request_complete`` (the client sent its last byte).
    """

    __slots__ = (
        "phase",
        # the request
        "client", "proxy", "method", "route", "head", "keep_alive", "http_10", "req_chunked",
        "req_length", "continue_due", "pending", "body_sent", "request_complete",
        # what the client asked for, as it asked it (for a redirect, a 404)
        "url",
        # where it goes
        "candidates", "fresh_only", "backend", "reused", "connecting", "connecting_to", "failed_over",
        # the response
        "stream", "reason", "resp_headers", "resp_chunked", "resp_length", "resp_until_eof",
        "resp_keep_alive", "close_client",
        # bodies moving in the kernel (cluster.routing.splice), one per direction
        "req_splice", "resp_splice",
        # a download the node writes itself (cluster.routing.handoff), while it does
        "handoff", "handoff_serial",
        # a blob GET the node is asked to answer with a redirect (node_redirects)
        "redirecting",
        # an injected truncation (cluster.routing.http_faults): body bytes still let through
        "truncating", "truncate_left",
    )

    def __init__(self, client: _ClientConnection, method: bytes, url: bytes,
                 headers: list[tuple[bytes, bytes]], version: str, keep_alive: bool) -> None:
        self.phase = _QUEUED
        self.client = client
        self.proxy = client.proxy
        self.method = method
        self.url = url
        self.route: RequestRoute = request_route(method.decode("latin-1"), url.decode("latin-1"))
        self.keep_alive = keep_alive and not client.closing
        self.http_10 = version == "1.0"
        self.req_chunked = False
        self.req_length = 0
        self.continue_due = False      # the client waits for a 100 Continue before its body
        self.head = self._forward_head(method, url, headers)
        self.candidates: list[NodeEndpoint] = []
        self.fresh_only: NodeEndpoint | None = None
        self.backend: _BackendConnection | None = None   # set in SENT, INTERIM, RELAYING only
        self.reused = False
        self.connecting: asyncio.Task | None = None     # set in CONNECTING only
        self.connecting_to: str | None = None           # its node's name
        self.pending: list[bytes] = []
        self.body_sent = False
        self.request_complete = False
        self.stream = _DETACHED
        self.reason = b""
        self.resp_headers: list[tuple[bytes, bytes]] = []
        self.resp_chunked = False
        self.resp_length: int | None = None
        self.resp_until_eof = False
        self.resp_keep_alive = False
        self.close_client = False
        self.failed_over = False
        self.req_splice: kernel.Splice | None = None
        self.resp_splice: kernel.Splice | None = None
        self.handoff: Channel | None = None             # set in HANDED_OVER, NODE_WRITING only
        self.handoff_serial = 0
        self.redirecting = False
        self.truncating = False
        self.truncate_left: int | None = None

    def _to(self, phase: Phase) -> None:
        """The one place an exchange changes phase. A move ``TRANSITIONS`` does
        not hold is a bug in this module: refused, loudly."""
        if phase not in TRANSITIONS[self.phase]:
            self.proxy.illegal_transitions += 1
            log.error("illegal_transition", endpoint=self.proxy.name, phase=self.phase.name,
                      to=phase.name, method=self.method.decode("latin-1"))
            raise IllegalTransition(self.phase, phase)
        self.phase = phase

    def _forward_head(self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
        parts = [method, b" ", url, b" HTTP/1.1\r\n"]
        drop = _HOP_BY_HOP
        for name, value in headers:
            lower = name.lower()
            if lower == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                if tokens - {b"close", b"keep-alive"}:
                    drop = drop | tokens
        forwarded_for = self.client.peer
        has_host = False
        for name, value in headers:
            lower = name.lower()
            if lower in drop:
                continue
            if lower == b"transfer-encoding":
                self.req_chunked = value.lower().rstrip().endswith(b"chunked")
            elif lower == b"content-length":
                self.req_length = int(value)        # llhttp has checked it is a number
            elif lower == b"expect":
                if value.strip().lower() == b"100-continue":
                    self.continue_due = not self.http_10
                    continue
            elif lower == b"x-forwarded-for":
                forwarded_for = value + b", " + forwarded_for
                continue
            elif lower == b"host":
                has_host = True
            parts += (name, b": ", value, b"\r\n")
        if not has_host:            # HTTP/1.0 may omit it; HTTP/1.1 servers require it
            parts += (b"Host: ", self.client.local, b"\r\n")
        parts += (b"X-Forwarded-For: ", forwarded_for, b"\r\n\r\n")
        return b"".join(parts)

    # -- routing and connecting (QUEUED → CONNECTING / SENT / HANDED_OVER / ANSWERED) ----

    def start(self) -> None:
        if not self.route.forwarded:
            self._not_forwarded()
            return
        proxy = self.proxy
        if proxy.http_faults.rules and self._injected_fault():
            return
        upload_id = self.route.upload_id
        pinned = proxy.affinity.node_for(upload_id) if upload_id else None
        self.candidates = proxy.policy.candidates(self.route, pinned)
        self.client.hold(_HOLD_CONNECTING)
        if self.route.blob and self.method == b"GET" and self.candidates and not self.truncating:
            if proxy.redirect_blobs and self.url.startswith(b"/"):   # origin form: a Location
                if not proxy.node_redirects:
                    self._redirect(self.candidates[0])
                    return
                self._ask_redirect()
            elif proxy.handoffs is not None and self._hand_over():
                return
        self._next()

    def _injected_fault(self) -> bool:
        """Act on an HTTP fault matching this request, if one draws it; True
        if the exchange is over (answered, or its connection reset)."""
        path = self.url.split(b"?", 1)[0].decode("latin-1")
        decision = self.proxy.http_faults.decide(self.method.decode("latin-1"), path)
        if decision is None:
            return False
        log.info("http_fault_injected", endpoint=self.proxy.name, fault=decision.fault_id,
                 action=decision.action, method=self.method.decode("latin-1"), path=path)
        if decision.action == "truncate":
            self.truncating = True
            return False
        if decision.action == "reset":
            self.client.reset()     # aborts this exchange; a client sees ECONNRESET
            return True
        self._injected_status(decision)
        return True

    def _injected_status(self, decision: HttpFaultDecision) -> None:
        code, message, headers = decision.error()
        self._respond(decision.status, code, message, {"fault": decision.fault_id},
                      Outcome.DEFINITE, {FAULT_HEADER: decision.fault_id, **headers})

    def _next(self) -> None:
        """Send the request to the next candidate (→ CONNECTING, or SENT on a
        pooled connection), or answer 503 when none is left (→ ANSWERED).
        The candidates were ranked when the request came: one found down
        since (a zone sibling of a node lost under it) is passed over."""
        healthy = self.proxy.health.healthy
        if self.fresh_only is not None and healthy(self.fresh_only.name):
            node, self.fresh_only = self.fresh_only, None
        else:
            self.fresh_only = None
            while self.candidates and not healthy(self.candidates[0].name):
                self.candidates.pop(0)
            if not self.candidates:
                self._unavailable()
                return
            node = self.candidates.pop(0)
            conn = self.proxy._pool.take(node)
            if conn is not None:
                self._attach(conn, reused=True)
                return
        self._to(_CONNECTING)
        task = asyncio.get_running_loop().create_task(self._connect(node))
        self.connecting, self.connecting_to = task, node.name
        self.proxy._connecting.add(task)
        task.add_done_callback(self.proxy._connecting.discard)

    async def _connect(self, node: NodeEndpoint) -> None:
        proxy = self.proxy
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        try:
            async with asyncio.timeout(proxy.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _BackendConnection(node, proxy), node.host, node.port,
                    **_tls_to(node, proxy.backend_tls))
        except (OSError, TimeoutError) as exc:       # ssl.SSLError is an OSError
            if self.connecting is not task:         # moved on meanwhile (node_lost)
                return
            self.connecting = None
            reason = (f"connect to {node.host}:{node.port} timed out"
                      if isinstance(exc, TimeoutError) else
                      f"connect to {node.host}:{node.port} failed: {exc.strerror or exc}")
            proxy.health.mark_down(node.name, reason)
            log.warning("node_marked_down", endpoint=proxy.name, node=node.name, reason=reason)
            self._failover()
            return
        if self.connecting is not task:     # moved on: its node was found down meanwhile
            conn.close()
            return
        self.connecting = None
        if self.phase is not _CONNECTING:      # aborted meanwhile
            proxy._pool.put(conn)
            return
        self._attach(conn, reused=False)

    def _failover(self) -> None:
        if not self.failed_over:
            self.failed_over = True
            self.proxy.failovers += 1
        self._next()

    def _attach(self, conn: _BackendConnection, reused: bool) -> None:
        """Send the request on ``conn`` (→ SENT): its head, what of its body
        has come, and to the client the ``100 Continue`` it waits for."""
        self._to(_SENT)
        self.backend = conn
        self.reused = reused
        conn.exchange = self
        self.stream = MessageStream(lambda: httptools.HttpResponseParser(self), self.on_body,
                                    self.on_message_complete, _MAX_HEAD, self.splice_response,
                                    self.proxy.splice_min)
        self.proxy.requests_by_backend[conn.node.name] += 1
        transport = conn.transport
        transport.write(self.head)
        if self.client.write_paused:
            transport.pause_reading()
        if self.pending:
            for piece in self.pending:
                self._send_body(transport, piece)
            self.pending.clear()
        if self.request_complete:
            if self.req_chunked:
                transport.write(_CHUNK_END)
                self.body_sent = True
        elif self.continue_due:
            self.continue_due = False
            self.client.write(_CONTINUE)
        self.client.release(_HOLD_CONNECTING)

    def _send_body(self, transport: asyncio.Transport, data: bytes) -> None:
        if self.req_chunked:
            transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            transport.write(data)
        self.body_sent = True

    # -- downloads the node writes itself (HANDED_OVER, NODE_WRITING) --------------------

    def _hand_over(self) -> bool:
        """Pass the client's socket to the first candidate, which writes the
        response on it (``cluster.routing.handoff``); False to relay the request."""
        client = self.client
        if (client.fd < 0 or self.http_10 or self.req_length or self.req_chunked
                or self.continue_due or client.write_paused
                or client.transport.get_write_buffer_size()):
            return False            # a body to pass on, or response bytes of ours still queued
        node = self.candidates[0]
        channel = self.proxy.handoffs.channel(node)
        if channel is None:
            return False
        self.close_client = not self.keep_alive or client.closing
        extra = b"%s: %s\r\n" % (REPLICA_HEADER, node.name.encode())
        if self.close_client:
            extra += b"Connection: close\r\n"
        serial = channel.hand(client.fd, self.head, extra, self)
        if serial is None:
            return False
        self.handoff, self.handoff_serial = channel, serial
        self._to(_HANDED_OVER)      # the node may write at any moment; the proxy must not
        client.release(_HOLD_CONNECTING)
        return True

    def handoff_writing(self) -> None:
        self._to(_NODE_WRITING)
        self.proxy.handed_over += 1
        self.proxy.requests_by_backend[self.handoff.node.name] += 1

    def handoff_done(self) -> None:
        self.handoff = None
        self._to(_ANSWERED)
        self.client.finished(self, self.close_client)

    def handoff_declined(self) -> None:
        """Nothing was written (an error to answer, the node is gone): relay it,
        to the same node first, as any request."""
        if self.phase is _NODE_WRITING:
            # "Not served" after "writing": the node broke the protocol, and may
            # have written. A second response must never follow: as a cut.
            self.handoff_cut()
            return
        self.handoff = None
        self._next()

    def handoff_cut(self) -> None:
        node = self.handoff.node.name if self.handoff else None
        self.handoff = None
        log.warning("response_cut", endpoint=self.proxy.name, node=node, side="node",
                    reason="the node stopped writing a handed-over download")
        self._cut()

    # -- the request ---------------------------------------------------------------------

    def request_body(self, data: bytes) -> None:
        backend = self.backend
        if backend is not None:
            self._send_body(backend.transport, data)
        elif not self.phase.over:
            self.pending.append(data)
        # else answered already: the rest is read and dropped

    def request_done(self) -> None:
        self.request_complete = True
        if self.phase.over:
            self.client.drained(self)
            return
        if self.backend is not None and self.req_chunked:
            self.backend.transport.write(_CHUNK_END)
            self.body_sent = True
        self.client.hold(_HOLD_AWAITING)

    # -- bodies in the kernel ------------------------------------------------------------

    def splice_request(self, left: int) -> bool:
        """Take the rest of the request body (``left`` bytes) straight from the
        client's socket to the node's, if nothing else is on its way there."""
        conn = self.backend
        if (conn is None or self.pending or conn.fd < 0 or self.client.fd < 0
                or conn.transport.get_write_buffer_size()):
            return False
        client = self.client
        splice = kernel.Splice.open(self.proxy.pipes, client.fd, conn.fd, left,
                                    self._request_spliced)
        if splice is None:
            return False
        self.req_splice = splice
        client.hold(_HOLD_SPLICING)
        splice.start()
        return True

    def _request_spliced(self, broken: kernel.SpliceBroken | None) -> None:
        splice, self.req_splice = self.req_splice, None
        client = self.client
        self._took(splice)
        if broken is not None and broken.side == "source":      # the client hung up
            self._cancel_splices()
            client.closing = True
            if not client.closed:
                client.transport.abort()     # connection_lost aborts the exchange
            return
        client.stream.handed_back(splice.taken)
        client.release(_HOLD_SPLICING)
        if broken is not None and (conn := self.backend) is not None:
            # The node's connection failed under the body: it answers nothing now.
            # As when the copy path loses a node: 502, and the rest of the body is
            # read and dropped.
            log.warning("node_lost_mid_request", endpoint=self.proxy.name, node=conn.node.name,
                        reason=broken.reason)
            conn.abort()
            self.backend_lost(conn, None)

    def splice_response(self, left: int) -> bool:
        """Take the rest of the response body (``left`` bytes) straight from the
        node's socket to the client's, once everything before it has left."""
        client = self.client
        conn = self.backend
        if (conn is None or self.truncating or client.closed or client.write_paused or conn.fd < 0
                or client.fd < 0 or client.transport.get_write_buffer_size()):
            return False
        splice = kernel.Splice.open(self.proxy.pipes, conn.fd, client.fd, left,
                                    self._response_spliced)
        if splice is None:
            return False
        self.resp_splice = splice
        conn.transport.pause_reading()
        splice.start()
        return True

    def _response_spliced(self, broken: kernel.SpliceBroken | None) -> None:
        splice, self.resp_splice = self.resp_splice, None
        self.proxy.spliced_bytes += splice.taken
        conn = self.backend
        if conn is None:        # cannot happen: every end of an exchange cancels its splices
            return
        if broken is None:
            conn.transport.resume_reading()
            self.stream.handed_back(splice.taken)
            return
        # Cut mid-response, from either end: the client sees its connection close
        # and retries; the node's connection is not reused.
        log.warning("response_cut", endpoint=self.proxy.name, node=conn.node.name,
                    side=broken.side, reason=broken.reason)
        self.backend = None
        conn.exchange = None
        conn.abort()
        self._cut()

    def _unsplice(self) -> bool:
        """Stop moving the request body in the kernel (the exchange is answered or
        its node is gone); the client's stream reads the rest as usual. True if a
        request body was cut short on its way to the node."""
        splice, self.req_splice = self.req_splice, None
        if splice is None:
            return False
        taken = splice.cancel()
        self._took(splice)
        self.client.stream.handed_back(taken)
        self.client.release(_HOLD_SPLICING)
        return True

    def _took(self, splice: kernel.Splice) -> None:
        """Account for a request splice that is over. Bytes it took from the
        client cannot be sent again (some may have died in the pipe), so the
        request can no longer be retried elsewhere once it took any."""
        self.proxy.spliced_bytes += splice.taken
        if splice.taken:
            self.body_sent = True

    def _cancel_splices(self) -> None:
        """Stop both directions without handing anything back: the client's
        connection is being closed."""
        for splice in (self.req_splice, self.resp_splice):
            if splice is not None:
                self.proxy.spliced_bytes += splice.cancel()
        self.req_splice = self.resp_splice = None

    # -- the response (httptools callbacks): SENT → INTERIM → SENT → RELAYING ----------

    def backend_data(self, data: bytes) -> None:
        try:
            self.stream.feed(data)
        except HeadTooLarge:
            self._broken(f"response head from {self.backend.node.name} too large")
        except httptools.HttpParserError as exc:
            node = self.backend.node.name if self.backend else None
            if exc.__context__ is not None:  # a fault of ours, not the node's
                log.error("proxy_fault", endpoint=self.proxy.name, node=node,
                          exc_info=exc.__context__)
            else:
                log.warning("bad_backend_response", endpoint=self.proxy.name, node=node,
                            error=str(exc))
            self._broken(f"invalid HTTP response from {node}: {exc}")

    def on_message_begin(self) -> None:
        self.stream.begun()
        self.resp_headers = []
        self.reason = b""

    def on_status(self, data: bytes) -> None:
        self.reason += data

    def on_header(self, name: bytes, value: bytes) -> None:
        self.resp_headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.phase.over:         # bytes after the end of what it answered: dropped
            self.stream.headers_done(None)
            return
        parser = self.stream.parser
        status = parser.get_status_code()
        if status < 200:
            # Interim responses are the proxy's business (100) or optional (103): dropped.
            self._to(_INTERIM)
            self.stream.headers_done(None)
            if status == 101:
                self._broken("protocol upgrades are not supported")
            return
        self.resp_keep_alive = parser.should_keep_alive()
        self._to(_RELAYING)
        self.client.write(self._client_head(status))
        if self.truncating and self.method != b"HEAD" and status not in (204, 304) \
                and self.resp_length != 0:
            # Half a counted body; of one framed otherwise, none.
            self.truncate_left = (self.resp_length or 0) // 2
        self.stream.headers_done(self.resp_length)
        if self.method == b"HEAD":
            self._finish()

    def on_body(self, data: bytes) -> None:
        if self.phase is not _RELAYING or self.client.closed:
            return
        if self.truncate_left is not None and len(data) >= self.truncate_left:
            self._truncate(data[:self.truncate_left])
            return
        if self.truncate_left is not None:
            self.truncate_left -= len(data)
        if self.resp_chunked:
            self.client.transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.client.transport.write(data)

    def on_message_complete(self) -> None:
        self.stream.ended()
        phase = self.phase
        if phase is _RELAYING:
            self._finish()
        elif phase is _INTERIM:
            self._to(_SENT)           # the final response is still to come

    def _client_head(self, status: int) -> bytes:
        node = self.backend.node
        parts = [b"HTTP/1.1 %d " % status, self.reason, b"\r\n"]
        length = None
        chunked = False
        upload_id = None
        for name, value in self.resp_headers:
            lower = name.lower()
            if lower in _HOP_BY_HOP:
                continue
            if lower == b"content-length":
                length = int(value)             # llhttp has checked it is a number
            elif lower == b"transfer-encoding":
                chunked = value.lower().rstrip().endswith(b"chunked")
                if self.http_10:
                    continue           # an HTTP/1.0 client gets the body unframed
            elif lower == b"docker-upload-uuid":
                upload_id = value.decode("latin-1").strip()
            elif lower == b"location" and upload_id is None:
                upload_id = upload_id_of(value.decode("latin-1"))
            parts += (name, b": ", value, b"\r\n")
        self._learn_upload(status, upload_id, node)
        if self.redirecting and status == 307:
            self.proxy.redirects += 1
        bodiless = self.method == b"HEAD" or status in (204, 304)
        self.resp_chunked = chunked and not bodiless and not self.http_10
        self.resp_length = None if bodiless or chunked else length
        self.resp_until_eof = not bodiless and length is None and not chunked
        self.close_client = (not self.keep_alive or self.resp_until_eof
                             or (chunked and self.http_10) or self.client.closing)
        parts += (REPLICA_HEADER, b": ", node.name.encode(), b"\r\n")
        if self.close_client:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _learn_upload(self, status: int, upload_id: str | None, node: NodeEndpoint) -> None:
        affinity = self.proxy.affinity
        if upload_id and 200 <= status < 300:
            affinity.remember(upload_id, node.name)
        session = self.route.upload_id
        if session and 200 <= status < 300 and self.method in (b"PUT", b"DELETE"):
            affinity.forget(session)

    def _finish(self) -> None:
        """The whole response is with the client, or in its socket buffer
        (RELAYING → ANSWERED)."""
        body_cut = self._unsplice()
        self._to(_ANSWERED)
        if self.resp_chunked:
            self.client.write(_CHUNK_END)
        conn, self.backend = self.backend, None
        conn.exchange = None
        if self.client.write_paused:
            conn.transport.resume_reading()
        if (self.resp_keep_alive and self.request_complete and not self.resp_until_eof
                and not body_cut):
            self.proxy._pool.put(conn)
        else:
            conn.close()
        self.client.finished(self, close=self.close_client)

    # -- failures --------------------------------------------------------------------

    def backend_lost(self, conn: _BackendConnection, exc: Exception | None) -> None:
        if conn is not self.backend:    # not (or no longer) this exchange's connection
            return
        self._unsplice()
        node = conn.node
        if self.phase is _RELAYING:
            if self.resp_until_eof:       # that is how such a response ends
                self.resp_keep_alive = False
                self._finish()
                return
            # Died mid-response: the client sees its connection close and retries.
            log.warning("backend_lost_mid_response", endpoint=self.proxy.name, node=node.name)
            self.backend = None
            self._cut()
            return
        self.backend = None
        if not self.body_sent:
            # Nothing of this request can have been acted upon beyond its head:
            # send it on. A pooled connection may just have been closed by the
            # node while idle; try the same node once more, on a fresh connection.
            if self.reused:
                self._resend(same_node=node)
            else:
                reason = "connection closed before a response"
                self.proxy.health.mark_down(node.name, reason)
                log.warning("node_marked_down", endpoint=self.proxy.name, node=node.name,
                            reason=reason)
                self._resend()
            return
        self._respond(502, "UNAVAILABLE",
                      f"replica node {node.name} closed the connection before answering; "
                      "the request may or may not have taken effect",
                      {"node": node.name, "region": node.region}, self._sent_outcome())

    def node_lost(self, name: str) -> bool:
        """Node ``name`` was found down while this exchange waits on it. A
        ``GET`` or ``HEAD`` with no response byte back yet changed nothing
        there: it goes to the next candidate (SENT → CONNECTING / SENT, or a
        503 with none left), its connection to the lost node dropped. Anything
        else waits on: a write may have taken effect, a response under way
        cannot be started again, and a hand-over's socket is the node's. A
        request still connecting to it connects elsewhere, whatever its method.

        The request left behind may still be served: a paused node, once
        continued, can read it from its socket before it sees the reset, and
        answers into nothing. A throttle then counts it twice when the next
        candidate is a zone sibling sharing the region's limit (once there,
        once by the resumed node)."""
        if self.phase is _CONNECTING:
            # Nothing sent yet, whatever the method: connect elsewhere (a
            # paused node's kernel would accept the connection, and then
            # nothing would answer on it).
            if self.connecting is None or self.connecting_to != name:
                return False
            self.connecting = None      # its task closes what it connects (not cancelled:
            # a connection made just now would be lost unclosed)
            log.warning("request_moved", endpoint=self.proxy.name, node=name,
                        reason="health checks lost the node while connecting to it")
            self._failover()
            return True
        conn = self.backend
        if (conn is None or conn.node.name != name or self.phase is not _SENT
                or self.method not in _READS or self.body_sent):
            return False
        log.warning("request_moved", endpoint=self.proxy.name, node=name,
                    reason="health checks lost the node before it answered")
        self.backend = None
        conn.exchange = None
        conn.abort()
        self._resend()
        return True

    def _resend(self, same_node: NodeEndpoint | None = None) -> None:
        """Send the request again, nothing of it having been acted upon: on a
        fresh connection to ``same_node`` (its pooled one was closed while
        idle), or to the next candidate (→ CONNECTING / SENT, or a 503)."""
        self.stream = _DETACHED
        self.client.hold(_HOLD_CONNECTING)
        if same_node is not None:
            self.fresh_only = same_node
            self._next()
        else:
            self._failover()

    def _broken(self, why: str) -> None:
        """The backend spoke something we cannot forward."""
        if self.phase.over:
            return      # after the end of a response (its connection is pooled or closed)
        self._unsplice()
        conn, self.backend = self.backend, None
        if conn is not None:
            conn.exchange = None
            conn.abort()
        if self.phase.response_begun:
            self._cut()
        else:
            self._respond(502, "UNAVAILABLE", why, {"node": conn.node.name if conn else None},
                          self._sent_outcome())

    def _truncate(self, last: bytes) -> None:
        """An injected truncation: the last bytes let through, then the client's
        connection is cut (and the node's, mid-response, is not reused)."""
        if last and not self.resp_chunked:
            self.client.transport.write(last)
        conn, self.backend = self.backend, None
        if conn is not None:
            conn.exchange = None
            conn.abort()
        log.info("http_fault_truncated", endpoint=self.proxy.name, method=self.method.decode())
        self._cut(flush=True)

    def _cut(self, *, flush: bool = False) -> None:
        """The response was cut short (→ CUT): the client sees its connection
        close, and retries. ``flush``: what is already written (an injected
        truncation's head and half body) goes out first, then a FIN."""
        self._to(_CUT)
        self._cancel_splices()
        client = self.client
        client.closing = True
        if not client.closed:
            # connection_lost then aborts what is queued.
            if flush:
                client.transport.close()
            else:
                client.transport.abort()

    def _not_forwarded(self) -> None:
        """A path endpoints do not carry (``policy.request_route``): a node's
        internal route, or nothing of the registry's. No node is asked."""
        self.proxy.not_forwarded += 1
        path = self.url.split(b"?", 1)[0].decode("latin-1")
        self._respond(404, "UNSUPPORTED",
                      "not found: this path is not served by the registry's endpoints (a "
                      "node's own routes are reachable on the node's port only)",
                      {"endpoint": self.proxy.name, "path": path}, Outcome.DEFINITE)

    def _unavailable(self) -> None:
        self.proxy.unavailable_responses += 1
        why = self.proxy.policy.unavailable()
        self._respond(503, "UNAVAILABLE", why.message, why.detail, Outcome.DEFINITE)

    def _sent_outcome(self) -> Outcome:
        """The outcome of a request a node received and did not answer."""
        return Outcome.DEFINITE if self.method in _READS else Outcome.INDEFINITE

    def _respond(self, status: int, code: str, message: str, detail: dict,
                 outcome: Outcome, headers: dict[str, str] | None = None) -> None:
        """Answer with an OCI error from the proxy itself (no node will)."""
        detail = {"outcome": outcome.value, **detail}
        self._answer(lambda close: _local_response(status, code, message, detail, close,
                                                   head_only=self.method == b"HEAD",
                                                   headers=headers))

    def _ask_redirect(self) -> None:
        """Ask the node to answer this blob GET with its own redirect: the
        marker goes last in the head, with the address the client reached us
        at (for a node listening everywhere, as ``_redirect`` uses it)."""
        self.redirecting = True
        self.head = b"%s%s: %s\r\n\r\n" % (self.head[:-2], REDIRECT_REQUEST_HEADER,
                                             self.client.local_ip.encode())

    def _redirect(self, node: NodeEndpoint) -> None:
        """Send the client to ``node`` for this blob, as ACR sends it to a
        storage or data endpoint."""
        proxy = self.proxy
        proxy.redirects += 1
        proxy.requests_by_backend[node.name] += 1
        host = node.host
        if listens_everywhere(host):            # a node listening everywhere: where the client
            host = self.client.local_ip or "127.0.0.1"   # reached us reaches the node too
        if ":" in host:
            host = f"[{host}]"
        location = b"%s://%s:%d%s" % (proxy.scheme, host.encode(), node.port, self.url)
        self._answer(lambda close: _redirect_response(location, node.name, close))

    def _answer(self, response: Callable[[bool], bytes]) -> None:
        """Answer from the proxy itself (→ ANSWERED): ``response(close)`` is the
        whole message, told whether the connection closes after it."""
        self._to(_ANSWERED)
        close = not self.keep_alive or self.client.closing
        self.client.write(response(close))
        self.client.release(_HOLD_CONNECTING)
        self.client.finished(self, close)

    def abort(self) -> None:
        """The client is gone (or the proxy stops): drop everything in flight
        (→ ABORTED; an exchange already over stays as it ended)."""
        if not self.phase.over:
            self._to(_ABORTED)
        self._cancel_splices()
        self.stream = _DETACHED
        if self.handoff is not None:
            self.handoff.forget(self.handoff_serial)
            self.handoff = None
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        conn, self.backend = self.backend, None
        if conn is not None:
            conn.exchange = None
            conn.abort()


def _tls_to(node: NodeEndpoint, context: ssl.SSLContext | None) -> dict:
    """``create_connection``'s TLS arguments for ``node``: the name its
    certificate is checked for is the address it is reached at (a node
    listening everywhere is reached, and named, as 127.0.0.1)."""
    if context is None:
        return {}
    host = "127.0.0.1" if listens_everywhere(node.host) else node.host
    return {"ssl": context, "server_hostname": host}


def _socket_fd(transport: asyncio.BaseTransport) -> int:
    """The descriptor of a plain socket transport, or -1 (no kernel splicing)."""
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_extra_info("sslcontext") is not None:
        return -1
    return sock.fileno()


_REASONS = {400: b"Bad Request", 404: b"Not Found", 429: b"Too Many Requests",
            431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
            501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable",
            504: b"Gateway Timeout"}


def _local_response(status: int, code: str, message: str, detail: dict, close: bool,
                    head_only: bool = False, headers: dict[str, str] | None = None) -> bytes:
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": detail}]}).encode()
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Docker-Distribution-API-Version: registry/2.0\r\n"
            % (status, _REASONS.get(status, b"Error"), len(body)))
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n".encode("latin-1")
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + (b"" if head_only else body)


def _redirect_response(location: bytes, node_name: str, close: bool) -> bytes:
    return (b"HTTP/1.1 307 Temporary Redirect\r\nLocation: %s\r\nContent-Length: 0\r\n"
            b"Docker-Distribution-API-Version: registry/2.0\r\n%s: %s\r\n%s\r\n"
            % (location, REPLICA_HEADER, node_name.encode(),
               b"Connection: close\r\n" if close else b""))
