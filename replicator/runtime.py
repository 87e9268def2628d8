"""Replication inside one node process: wires the pieces and owns their lifetime.

``Replication`` is a node extension (``registry_node.app.Extension``): given the
node's ``ClusterView`` it serves the replication gRPC service, subscribes to
every peer, runs anti-entropy, plugs zone quorum into the registry's writes,
and adds three HTTP routes beside the OCI API:

    GET /georeg/v1/node                     this node, its peers and subscriptions
    GET /georeg/v1/replication/status       per-image replication status
    GET /metrics                            Prometheus metrics
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from registry_node.app import NODE
from registry_node.durability import LocalDurability
from registry_node.replica import Replica

from .antientropy import AntiEntropy
from .feed import LogFeed
from .metrics import ReplicationMetrics
from .peers import SERVER_OPTIONS, PeerClient
from .quorum import ZoneQuorum
from .service import ReplicationService
from .status import ImageStatus
from .subscription import Subscription
from .topology import ClusterView
from .transfer import Transfer
from .wire.v1 import replication_pb2_grpc as pbg

log = structlog.get_logger("georeg.replication")


class Replication:
    def __init__(self, view: ClusterView) -> None:
        self.view = view
        self.residency = view.residency
        self.metrics = ReplicationMetrics(view.region)
        self.grpc_address = ""
        self.clients: list[PeerClient] = []
        self.subscriptions: list[Subscription] = []
        self.service: ReplicationService | None = None
        self.transfer: Transfer | None = None
        self.anti_entropy: AntiEntropy | None = None
        self.quorum: ZoneQuorum | None = None
        self.replica: Replica | None = None
        self._status = ImageStatus(self)

    # -- Extension -----------------------------------------------------------------

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/georeg/v1/node", self._node_info)
        router.add_get("/georeg/v1/replication/status", self._status.handle)
        router.add_get("/metrics", self._metrics)

    def describe(self) -> str:
        return f"replication on {self.grpc_address}"

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        node = app[NODE]
        view = self.view
        identity = node.identity
        settings = view.replication
        self.replica = replica = Replica(node.registry)
        feed = LogFeed(node.meta)
        self.metrics.track_log(lambda: node.meta.last_seq)
        if view.zone_redundant:
            self.quorum = ZoneQuorum(_label(view.region, view.zone),
                                     [p.label for p in view.zone_peers],
                                     timeout_s=settings.quorum_timeout_s)
            node.registry.quorum = self.quorum
        self.clients = [PeerClient(peer, identity) for peer in view.peers]
        self.transfer = Transfer(replica, self.residency, self.metrics,
                                 concurrency=settings.transfer_concurrency)
        self.service = ReplicationService(replica, feed, self.residency, self.quorum,
                                          self.metrics, settings.chunk_size)
        server = grpc.aio.server(options=SERVER_OPTIONS)
        pbg.add_ReplicationServicer_to_server(self.service, server)
        port = server.add_insecure_port(view.grpc_listen)
        host = view.grpc_listen.rpartition(":")[0]
        self.grpc_address = f"{host}:{port}"
        await server.start()
        self.anti_entropy = AntiEntropy(self.transfer, self.residency, self.clients,
                                        settings.anti_entropy_interval_s)
        self.subscriptions = [
            Subscription(client, self.transfer, lambda: self.clients, self.metrics,
                         on_connect=self.anti_entropy.sync_with)
            for client in self.clients
        ]
        tasks = [asyncio.create_task(s.run(), name=f"subscription:{s.peer.name}")
                 for s in self.subscriptions]
        tasks.append(asyncio.create_task(self.anti_entropy.run(), name="anti-entropy"))
        log.info("replication_started", grpc=self.grpc_address, peers=[c.name for c in self.clients],
                 zone_redundant=view.zone_redundant)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await server.stop(grace=1.0)
            for client in self.clients:
                await client.close()
            node.registry.quorum = LocalDurability()

    # -- HTTP ----------------------------------------------------------------------

    async def _node_info(self, request: web.Request) -> web.Response:
        node = request.app[NODE]
        return web.json_response({
            "name": self.view.name,
            "region": self.view.region,
            "zone": self.view.zone,
            "node_id": node.identity.node_id,
            "grpc": self.grpc_address,
            "last_seq": node.meta.last_seq,
            "writable": self.quorum.writable if self.quorum else True,
            "zone_redundant": self.view.zone_redundant,
            "peers": [{
                "name": s.peer.name, "region": s.peer.peer.region, "zone": s.peer.peer.zone,
                "connected": s.connected, "behind_events": s.lag_events,
                "last_error": s.last_error or None,
            } for s in self.subscriptions],
            "anti_entropy": {
                "rounds": self.anti_entropy.rounds if self.anti_entropy else 0,
                "repaired": self.anti_entropy.repaired if self.anti_entropy else 0,
            },
        })

    async def _metrics(self, request: web.Request) -> web.Response:
        for sub in self.subscriptions:
            self.metrics.queue_depth.labels(sub.peer.name).set(sub.lag_events)
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _label(region: str, zone: str) -> str:
    return f"{region}/{zone}" if zone else region
