"""The node's aiohttp application factory.

``init_app`` wires routes, middlewares and the lifetimes of the node's
resources (storage, garbage collector) as ``cleanup_ctx`` generators, so the
same factory serves the CLI, the cluster supervisor and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc as python_gc
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import structlog
from aiohttp import web

from . import allocator
from .api import oauth
from .api.auth import GATE, authenticate, pull_check
from .api.common import (
    BANDWIDTH,
    CONFIGURATION,
    PULL_THROUGH,
    REGISTRY,
    RETENTION,
    TAG_MOVES,
    WEBHOOKS,
)
from .api.grey import BODY_STALL
from .api.internal import INTERNAL_CREDENTIAL, expected_header, internal_headers
from .api.metrics import METRICS, NodeMetrics
from .api.middlewares import access, common_headers
from .api.redirects import BLOB_REDIRECTS, BlobRedirects
from .api.routes import add_routes
from .api.throttling import THROTTLE, open_access
from .auth.gate import Gate
from .auth.grants import BlobGrants
from .auth.identities import IdentitySource
from .auth.tokens import AuthConfigError, SigningKey, TokenAuthority, Trust
from .bandwidth import Bandwidth
from .body_stall import BodyStall
from .config import NodeConfig
from .gc import GarbageCollector
from .handoff import HandoffServer
from .identities import ConfigurationIdentities
from .manifest import MAX_MANIFEST_SIZE
from .node import Node
from .pull_through import PullThrough
from .tag_moves import TagMoveLog
from .throttle import Throttle
from .untagged import UntaggedRetention
from .upstream_http import upstream_session
from .webhook_delivery import WebhookDelivery
from .webhook_metrics import WebhookMetrics
from .webhook_sender import HttpSender
from .webhooks import ReplicationCompletion
from .zone_debits import ZoneDebits

NODE: web.AppKey[Node] = web.AppKey("node", Node)
HANDOFF: web.AppKey[HandoffServer] = web.AppKey("handoff", HandoffServer)
# What webhook delivery asks replication (``registry_node.webhooks``): set by the
# replication extension while it runs (its lifetime); a node without replication
# has none, and fires neither ``replicated`` nor ``replication_failed``.
REPLICATION_COMPLETION: web.AppKey[ReplicationCompletion] = web.AppKey(
    "replication_completion", ReplicationCompletion)
log = structlog.get_logger("georeg.node")
# The token audience of a node not given --auth-service. One value, whatever
# identities the node enforces: a cluster passes every node the same login
# server (the plan's NodeAccess.service), and a default that followed the
# identity source would let two nodes of one cluster disagree silently.
DEFAULT_SERVICE = "georeg"


class Extension(Protocol):
    """Something that runs inside a node beside its OCI API (replication does):
    it may add routes, lives as long as the node's storage is open, and may
    add its collectors to the node's metrics (``app[METRICS].registry``)."""

    def add_routes(self, router: web.UrlDispatcher) -> None: ...

    def lifetime(self, app: web.Application) -> AsyncIterator[None]: ...


def init_app(config: NodeConfig, extensions: Sequence[Extension] = (), *,
             wall_ns: Callable[[], int] = time.time_ns,
             monotonic: Callable[[], float] = time.monotonic,
             identities: IdentitySource | None = None) -> web.Application:
    """The node's application. The clocks are injected (``Node.open``): a test
    moves time past a GC grace or an upload TTL instead of waiting for it.
    With ``config.auth_enabled``, registry routes need credentials checked
    against the registry configuration this node holds
    (``ConfigurationIdentities``), or against ``identities`` when a test gives them."""
    middlewares = [access]
    internal = None
    if config.internal_credential_file is not None:
        internal = expected_header(read_internal_credential(config.internal_credential_file))
    # Always there, limits or not: a throttling fault may arrive at any time.
    throttle = Throttle(config.request_limits, monotonic, shared=bool(config.zone_siblings),
                        overrides=config.request_limit_overrides)
    authority = None
    if config.auth_enabled:
        authority = token_authority(config, lambda: wall_ns() / 1e9)
        # Checks the internal credential and throttles too.
        middlewares.append(authenticate(internal, throttle))
    else:
        middlewares.append(open_access(internal, throttle))
    app = web.Application(middlewares=middlewares, client_max_size=MAX_MANIFEST_SIZE + 1)
    app.on_response_prepare.append(common_headers)
    app[METRICS] = NodeMetrics()
    app[THROTTLE] = throttle
    app[METRICS].track_throttle(throttle, config.region)
    app[BANDWIDTH] = bandwidth = Bandwidth.of(config.bandwidth)
    app[BODY_STALL] = BodyStall()      # a grey-failure fault may arrive at any time
    app[METRICS].watch_bandwidth(bandwidth)
    if internal is not None:
        app[INTERNAL_CREDENTIAL] = internal
    add_routes(app.router)
    if authority is not None:
        # Redirected blob downloads carry a grant signed with a key of this
        # process, checked on the node's own clock (``api.redirects``).
        app[BLOB_REDIRECTS] = BlobRedirects(BlobGrants(authority.now), config.host,
                                            config.scheme)
        if identities is not None:
            app[GATE] = Gate(identities, authority, authority.now)
        oauth.add_routes(app.router)
    app.cleanup_ctx.append(_storage(config, wall_ns, monotonic, authority))
    app.cleanup_ctx.append(_handoff)        # ends before the storage closes
    app.cleanup_ctx.append(_pull_through)
    if config.zone_siblings:
        app.cleanup_ctx.append(_zone_debits)
    app.on_shutdown.append(_stop_handoffs)
    for extension in extensions:
        extension.add_routes(app.router)
        app.cleanup_ctx.append(extension.lifetime)
    # After the extensions: replication registers what delivery asks it, and
    # stops only once delivery has.
    app.cleanup_ctx.append(_webhooks)
    app.cleanup_ctx.append(_garbage_collector)
    app.cleanup_ctx.append(_memory_trim)
    # After the extensions: repairs fetch through replication, so they end first.
    app.cleanup_ctx.append(_blob_repair)
    return app


def read_internal_credential(path) -> str:
    """The cluster's internal credential from its file; ``AuthConfigError`` if unusable."""
    try:
        credential = path.read_text().strip()
    except OSError as exc:
        raise AuthConfigError(f"cannot read the internal credential from {path}: "
                              f"{exc.strerror or exc}") from None
    if len(credential) < 16 or not credential.isascii() or not credential.isprintable():
        raise AuthConfigError(f"{path} does not hold an internal credential (at least 16 "
                              f"printable ASCII characters)")
    return credential


def token_authority(config: NodeConfig, now: Callable[[], float]) -> TokenAuthority:
    """The node's token signer and verifier from its settings, checked before
    anything opens; ``AuthConfigError`` says what is wrong. The service (token
    audience) is ``--auth-service``, else ``DEFAULT_SERVICE``."""
    if config.auth_key_file is None or config.auth_cert_file is None:
        raise AuthConfigError("authentication needs the node's signing key and certificate "
                              "as well as the CA (--auth-key, --auth-cert, --auth-ca)")
    trust = Trust.load(config.auth_ca_file, now)
    signing = SigningKey.load(config.auth_key_file, config.auth_cert_file, trust)
    service = config.auth_service or DEFAULT_SERVICE
    return TokenAuthority(signing, trust, service, now)


def _storage(config: NodeConfig, wall_ns: Callable[[], int], monotonic: Callable[[], float],
             authority: TokenAuthority | None):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        node = Node.open(config, wall_ns=wall_ns, monotonic=monotonic)
        app[NODE] = node
        app[REGISTRY] = node.registry
        app[METRICS].watch_repairs(node.registry.repair)
        app[CONFIGURATION] = node.configuration
        app[TAG_MOVES] = TagMoveLog(node.registry.meta)
        app[RETENTION] = retention = UntaggedRetention(node.registry, node.configuration.retention)
        app[METRICS].watch_retention(retention)
        app[METRICS].watch_recycle_bin(node.registry.bin)
        if authority is not None and GATE not in app:
            # The identities this node enforces are the registry configuration it
            # holds: replication brings every change, and enforcement goes on
            # while the home region is down.
            app[GATE] = Gate(ConfigurationIdentities(node.configuration),
                             authority, authority.now)
        yield
        node.close()

    return ctx


async def _handoff(app: web.Application) -> AsyncIterator[None]:
    """Blob downloads the routing proxy hands over (``registry_node.handoff``);
    the server listens once the node's port is known (``server.serve``)."""
    gate = app.get(GATE)        # set by _storage, which runs first, when auth is on
    app[HANDOFF] = handoff = HandoffServer(app[REGISTRY],
                                           pull_check(gate) if gate is not None else None,
                                           app[THROTTLE], bandwidth=app[BANDWIDTH],
                                           stall=app[BODY_STALL])
    yield
    await handoff.close()


async def _pull_through(app: web.Application) -> AsyncIterator[None]:
    """The pull-through cache (``pull_through``); its session to upstreams is
    opened at the first fetch (a node with no cache rule never opens one)."""
    sessions: list = []

    def http():
        if not sessions:
            sessions.append(upstream_session())
        return sessions[0]

    node = app[NODE]
    app[PULL_THROUGH] = PullThrough(node.configuration, node.registry, node.configuration_key,
                                    http)
    yield
    for session in sessions:
        await session.close()


async def _zone_debits(app: web.Application) -> AsyncIterator[None]:
    """What this zone node admits, reported to its replica's other zones
    (``registry_node.throttle``, ``zone_debits``)."""
    config = app[NODE].config
    reports = ZoneDebits(app[THROTTLE], config.zone_siblings,
                         headers=internal_headers(app.get(INTERNAL_CREDENTIAL)),
                         ca_file=config.tls_ca_file or config.auth_ca_file)
    reports.start()
    yield
    await reports.stop()


async def _stop_handoffs(app: web.Application) -> None:
    # aiohttp's shutdown: the site has stopped accepting; requests in flight,
    # hand-overs included, get the same grace. Downloads a grey-failure fault
    # holds are let go, and no new stall is taken (body_stall): they finish
    # within it, not at its end.
    app[BODY_STALL].close()
    app[HANDOFF].stop_accepting(app[NODE].config.shutdown_grace_s)
    if TAG_MOVES in app:
        app[TAG_MOVES].close()      # a long-poll for tag moves answers now, not at its end


async def _webhooks(app: web.Application) -> AsyncIterator[None]:
    """Webhook delivery (``webhook_delivery``) for as long as the storage is open."""
    node = app[NODE]
    sender = HttpSender()
    delivery = WebhookDelivery(
        node.outbox, node.configuration, node.registry, node.config.webhooks, sender,
        WebhookMetrics(app[METRICS].registry, node.outbox.pending_by_webhook),
        key=node.configuration_key,
        # Names the registry in the request of a copy (a client's push names
        # the host it was sent to).
        host=node.config.auth_service or node.config.host,
        completion=lambda: app.get(REPLICATION_COMPLETION))
    app[WEBHOOKS] = delivery
    delivery.start()
    yield
    await delivery.stop()
    await sender.close()


async def _garbage_collector(app: web.Application) -> AsyncIterator[None]:
    node = app[NODE]
    gc = GarbageCollector(node.registry, grace_s=node.config.gc_grace_s,
                          upload_ttl_s=node.config.upload_ttl_s,
                          interval_s=node.config.gc_interval_s)
    task = asyncio.create_task(gc.run(), name="gc")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _blob_repair(app: web.Application) -> AsyncIterator[None]:
    """Failed repairs of rotten blobs tried again (``blob_repair``); every
    repair still running is cancelled, and awaited, when the node stops."""
    repair = app[NODE].registry.repair
    task = asyncio.create_task(repair.retry_forever(), name="blob-repair-retries")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await repair.close()


MEMORY_TRIM_INTERVAL_S = 15.0


class MemoryTrim:
    """Gives back what a busy moment needed, once the node is past it: run every
    ``MEMORY_TRIM_INTERVAL_S``; a pass after writes collects reference cycles
    (aiohttp and grpc leave some per request, holding buffers) and writes
    RocksDB's memtable out to a table file (its arena, up to MEMTABLE_BYTES,
    held 1-1.5 MiB after a few hundred images); every pass then returns freed
    heap memory to the kernel (glibc's ``malloc_trim``, where glibc is the
    allocator). An idle node's pass is only the trim."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._trim = allocator.trimmer()
        self._commits = node.meta.commits

    async def once(self) -> None:
        meta = self.node.meta
        if meta.commits != self._commits:
            self._commits = meta.commits
            python_gc.collect()
            # On the node's executor, which the node drains before it closes the store.
            try:
                await asyncio.get_running_loop().run_in_executor(self.node.executor, meta.flush)
            except Exception as exc:  # noqa: BLE001 - a full disk must not end the trims
                log.warning("memtable_flush_failed", error=str(exc))
        if self._trim is not None:
            self._trim(0)

    async def forever(self) -> None:
        while True:
            await asyncio.sleep(MEMORY_TRIM_INTERVAL_S)
            await self.once()


MEMORY_TRIM: web.AppKey[MemoryTrim] = web.AppKey("memory_trim", MemoryTrim)


async def _memory_trim(app: web.Application) -> AsyncIterator[None]:
    app[MEMORY_TRIM] = trim = MemoryTrim(app[NODE])
    task = asyncio.create_task(trim.forever(), name="memory-trim")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
