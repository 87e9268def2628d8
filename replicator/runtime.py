"""Replication inside one node process: wires the pieces and owns their lifetime.

``Replication`` is a node extension (``registry_node.app.Extension``): given the
node's ``ClusterView`` it serves the replication gRPC service (over mutual TLS
with the node's certificate when the view says so: an auth cluster's nodes
accept and dial only peers with a certificate from the cluster CA), subscribes to
every peer, runs anti-entropy, plugs zone quorum into the registry's writes,
adds its metrics to the node's ``GET /metrics``, and adds two HTTP routes
beside the OCI API:

    GET /georeg/v1/node                     this node, its peers and subscriptions
    GET /georeg/v1/replication/status       per-image replication status

While it runs it answers webhook delivery's question (``ReplicationCompletion``:
has every replica residency allows an image) as ``app[REPLICATION_COMPLETION]``
(``replicator.completion``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import msgspec
import structlog
from aiohttp import web

from registry_node import allocator
from registry_node.api.common import BANDWIDTH
from registry_node.api.metrics import METRICS
from registry_node.api.throttling import THROTTLE
from registry_node.app import NODE, REPLICATION_COMPLETION
from registry_node.auth.tokens import AuthConfigError
from registry_node.bandwidth import Bandwidth
from registry_node.config import NodeConfig
from registry_node.durability import LocalDurability
from registry_node.records import Cursor
from registry_node.replica import Replica
from registry_node.throttle import Throttle

from .antientropy import AntiEntropy
from .clock_probe import ClockProbe
from .completion import ImageCompletion, NodeReport, replica_regions
from .errors import definite
from .feed import LogFeed
from .intake import Relay, RelayedCursors
from .metrics import ReplicationMetrics
from .peer_identity import PeerCredentials
from .peers import SERVER_OPTIONS, PeerClient
from .quorum import ZoneQuorum
from .repair import PeerRefetch
from .retention import LogRetention
from .service import ReplicationService
from .staleness import PeerRescue
from .status import STATUS_TIMEOUT_S, ImageStatus
from .subscription import OriginStreams, Subscription
from .topology import ClusterView, Peer, event_receiver
from .transfer import HeldBlobs, Transfer
from .wire.integrity import add_servicer
from .wire.v1 import replication_pb2 as pb

log = structlog.get_logger("georeg.replication")


VIEW_POLL_S = 1.0


class Replication:
    def __init__(self, view: ClusterView, view_file: Path | None = None) -> None:
        self.view = view
        self.view_file = view_file
        self.residency = view.residency
        self.metrics = ReplicationMetrics(view.region)
        self.grpc_address = ""
        self.credentials: PeerCredentials | None = None   # mutual TLS (view.mutual_tls)
        self.clients: list[PeerClient] = []
        self.subscriptions: list[Subscription] = []
        self.origins = OriginStreams()
        self.service: ReplicationService | None = None
        self.transfer: Transfer | None = None
        self.anti_entropy: AntiEntropy | None = None
        self.retention: LogRetention | None = None
        self.quorum: ZoneQuorum | None = None
        self.replica: Replica | None = None
        self._status = ImageStatus(self)
        self._tasks: dict[str, asyncio.Task] = {}
        self.rescue: PeerRescue | None = None
        self.completion: ImageCompletion | None = None
        self.relayed: RelayedCursors | None = None
        self.throttle: Throttle | None = None      # the node's, while it runs
        self.bandwidth: Bandwidth | None = None    # the node's, while it runs
        self.clock_probe: ClockProbe | None = None

    # -- Extension -----------------------------------------------------------------

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/georeg/v1/node", self._node_info)
        router.add_get("/georeg/v1/replication/status", self._status.handle)

    def describe(self) -> str:
        return f"replication on {self.grpc_address}"

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        node = app[NODE]
        self.throttle = app[THROTTLE]
        self.bandwidth = app[BANDWIDTH]
        view = self.view
        settings = view.replication
        self.replica = replica = Replica(node.registry, node.configuration)
        feed = LogFeed(node.meta)
        self.metrics.track_log(lambda: node.meta.last_seq)
        self.metrics.refresh = self._refresh_queue_depths
        self.metrics.track_anti_entropy(self._anti_entropy_counters)
        self.retention = LogRetention(
            node.meta, readers=self._log_readers,
            horizon_s=settings.peer_horizon_s, grace_s=settings.tombstone_grace_s,
            retain_events=settings.log_retain_events, interval_s=settings.compaction_interval_s,
            wall_ns=node.registry.wall_ns)
        self.metrics.track_retention(self._metadata_counters)
        app[METRICS].registry.register(self.metrics)
        if view.zone_redundant:
            self.quorum = ZoneQuorum(_label(view.region, view.zone), list(view.quorum_zones),
                                     write_quorum=view.zone_redundancy.write_quorum,
                                     timeout_s=settings.quorum_timeout_s)
            node.registry.quorum = self.quorum
        self.credentials = _credentials(view, node.config)
        self.clients = [self._client(peer, view) for peer in view.peers]
        self.relayed = RelayedCursors(lambda: node.meta.last_seq)
        held = HeldBlobs()   # bytes that came with events: a sibling may have them before the store
        self.transfer = Transfer(replica, self.residency, self.metrics,
                                 concurrency=settings.transfer_concurrency,
                                 one_wan_copy_per_region=settings.one_wan_copy_per_region,
                                 region_zones=view.zone_redundancy.zones,
                                 zone_peer=view.is_zone_peer,
                                 sibling_reachable=self._sibling_connected, held=held)
        self.service = ReplicationService(
            replica, feed, self.residency, self.quorum, self.metrics, settings.chunk_size,
            one_wan_copy_per_region=settings.one_wan_copy_per_region,
            remote_zones=lambda: self.view.remote_zones, held=held,
            certified_peers=self.credentials is not None, retention=self.retention,
            one_wan_event_copy_per_region=settings.one_wan_event_copy_per_region,
            region_zones=view.zone_redundancy.zones, relayed=self.relayed)
        server = grpc.aio.server(options=SERVER_OPTIONS)
        # Sealed over plain gRPC (wire.integrity); TLS authenticates every byte itself.
        add_servicer(self.service, server, sealed=self.credentials is None,
                     refused=self._integrity_refused)
        port = _listen(server, view.grpc_listen, self.credentials)
        host = view.grpc_listen.rpartition(":")[0]
        self.grpc_address = f"{host}:{port}"
        await server.start()
        self.completion = ImageCompletion(lambda: replica_regions(self.view), self.residency,
                                          self._image_reports, wall_ns=node.registry.wall_ns)
        self.metrics.track_completion(lambda: self.completion.waiting)
        app[REPLICATION_COMPLETION] = self.completion
        self.anti_entropy = AntiEntropy(self.transfer, self.residency, self.clients,
                                        settings.anti_entropy_interval_s)
        self.anti_entropy.stale_deletion = self.retention.stale_deletion
        self.rescue = PeerRescue(self)
        node.registry.peers = self.rescue
        node.registry.repair.sources = PeerRefetch(self)   # bit rot fetched again
        self.subscriptions = []
        for client in self.clients:
            self._subscribe(client)
        self.clock_probe = ClockProbe(node.registry.clock, node.registry.hlc, lambda: self.clients,
                                      self.metrics, settings.clock_probe_interval_s)
        tasks = [asyncio.create_task(self.anti_entropy.run(), name="anti-entropy"),
                 asyncio.create_task(self.retention.run(), name="retention"),
                 asyncio.create_task(self.clock_probe.run(), name="clock-probe")]
        if self.view_file is not None:
            tasks.append(asyncio.create_task(self._watch_view(), name="view-watch"))
        log.info("replication_started", grpc=self.grpc_address, peers=[c.name for c in self.clients],
                 zone_redundant=view.zone_redundant)
        try:
            yield
        finally:
            await self.completion.close()
            tasks += self._tasks.values()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await server.stop(grace=1.0)
            for client in self.clients:
                await client.close()
            node.registry.quorum = LocalDurability()
            node.registry.peers = None
            node.registry.repair.sources = None
            app[METRICS].registry.unregister(self.metrics)

    # -- peers -----------------------------------------------------------------------

    def _client(self, peer: Peer, view: ClusterView) -> PeerClient:
        return PeerClient(peer, self.replica.registry.identity, credentials=self.credentials,
                          my_name=view.name, integrity_refused=self._integrity_refused)

    def _integrity_refused(self, message: str) -> None:
        self.metrics.integrity_refused.labels(message).inc()

    def _subscribe(self, client: PeerClient) -> None:
        remote = client.peer.region != self.view.region
        zone_peer = self.view.is_zone_peer(client.peer)
        subscription = Subscription(client, self.transfer, lambda: self.clients, self.metrics,
                                    on_connect=self.anti_entropy.sync_with,
                                    acknowledge=zone_peer,
                                    origins=self.origins, resync=self.anti_entropy.resync,
                                    relay=self._relay_for(client.peer),
                                    on_advance=self.relayed.advanced if remote else None,
                                    on_relayed=self._vouched if zone_peer else None,
                                    manifest_held=self.completion.held, node_name=self.view.name)
        self.subscriptions.append(subscription)
        self.origins.add(subscription)
        self._tasks[client.name] = asyncio.create_task(subscription.run(),
                                                       name=f"subscription:{client.name}")

    async def _image_reports(self, node: str,
                             images: Sequence[tuple[str, str]]) -> list[NodeReport]:
        """What ``node`` (this one, or a peer by name) says of each image, for
        replication completion; ``ReplicationError`` when it cannot be asked."""
        if node == self.view.name:
            self.metrics.completion_requests.labels(node, "local").inc()
            reply = await self.service.GetImageStatuses(pb.ImageStatusesRequest(images=[
                pb.ImageRef(repository=r, digest=d) for r, d in images]), None)
            replies = list(reply.images)
        else:
            client = next((c for c in self.clients if c.name == node), None)
            if client is None:
                raise definite(f"{node} is no longer a peer")
            # Hurried: a peer that is down costs a refused connect, not the timeout.
            replies = await client.hurried().image_statuses(images, STATUS_TIMEOUT_S)
            if client.statuses_batched:
                self.metrics.completion_requests.labels(node, "batch").inc()
            else:
                self.metrics.completion_requests.labels(node, "single").inc(len(images))
        self.metrics.completion_images.labels(node).inc(len(images))
        return [NodeReport(r.present, r.arrived_ns, r.origin_region, r.origin_acked_ns, r.failure)
                for r in replies]

    def _relay_for(self, peer: Peer) -> Relay | None:
        """The sibling zone that reads ``peer``'s log whole for this region, when
        that is not this node (``replicator.intake``); None: this node reads it whole."""
        view = self.view
        if (not view.replication.one_wan_event_copy_per_region or not view.zone_redundant
                or peer.region == view.region):
            return None
        zone = event_receiver(view.zone_redundancy.zones, peer.region, peer.zone,
                              view.remote_zones.get(peer.region, ()))
        if zone == view.zone:
            return None
        return Relay(zone, lambda: self._sibling_connected(zone))

    def _vouched(self, relayed) -> None:
        """A sibling's relayed cursors, its batch applied here: hand each to the
        subscription to that peer."""
        by_name = {s.peer.name: s for s in self.subscriptions}
        for entry in relayed:
            subscription = by_name.get(entry.peer)
            if subscription is not None and subscription.relay is not None:
                subscription.vouch(Cursor(entry.node_id, entry.seq))

    def _sibling_connected(self, zone: str) -> bool:
        """Whether this node's stream from its region's ``zone`` is up."""
        return any(s.connected for s in self.subscriptions
                   if s.peer.peer.region == self.view.region and s.peer.peer.zone == zone)

    async def _watch_view(self) -> None:
        """Peers come and go while the node runs (``georeg replication create`` /
        ``delete``): the supervisor rewrites this node's view file, and the node
        reconciles its subscriptions with it."""
        assert self.view_file is not None
        last = self.view_file.stat().st_mtime_ns
        while True:
            await asyncio.sleep(VIEW_POLL_S)
            try:
                mtime = self.view_file.stat().st_mtime_ns
                if mtime == last:
                    continue
                view = ClusterView.load(self.view_file)
                last = mtime
            except (OSError, ValueError) as exc:
                log.warning("view_unreadable", file=str(self.view_file), error=str(exc))
                continue
            await self.reconcile(view)

    async def reconcile(self, view: ClusterView) -> None:
        if view.request_limits != self.view.request_limits and self.throttle is not None:
            # The spec's [limits] or the registry's tier changed: the plan wrote
            # the replica's new limits (registry_node.throttle), taken at once.
            self.throttle.configure(view.request_limits)
            log.info("request_limits_changed", limits=str(view.request_limits))
        if view.bandwidth != self.view.bandwidth and self.bandwidth is not None:
            # Likewise the replica's blob bandwidth: transfers that start from
            # now on spend the new budgets (registry_node.bandwidth).
            self.bandwidth.configure(view.bandwidth)
            log.info("bandwidth_changed", download_mbps=view.bandwidth.download_mbps,
                     upload_mbps=view.bandwidth.upload_mbps)
        if view.zone_redundancy != self.view.zone_redundancy:
            # The quorum and every acknowledging subscription were built from
            # the decision this node started with; half-applying another one
            # would mix them. (The plan never changes it for a running node.)
            log.warning("zone_redundancy_changed", running=str(self.view.zone_redundancy),
                        new=str(view.zone_redundancy), effect="at the next start")
            view = msgspec.structs.replace(view, zone_redundancy=self.view.zone_redundancy)
        wanted = {p.name: p for p in view.peers}
        current = {c.name: c for c in self.clients}
        for name, client in current.items():
            if name not in wanted or wanted[name] != client.peer:
                await self._drop_peer(client)
        # The new view before any subscription is built or re-derived from it:
        # which zone reads a peer whole (``_relay_for``) depends on the remote
        # regions' zones it names, and every zone of this region must name the
        # same one as a zone started on this view does, or none reads it whole.
        self.view = view
        for name, peer in wanted.items():
            if name not in current or current[name].peer != peer:
                client = self._client(peer, self.view)
                self.clients.append(client)
                self.anti_entropy.peers.append(client)
                self._subscribe(client)
        await self._rederive_relays()
        log.info("peers_reconciled", peers=sorted(wanted))

    async def _rederive_relays(self) -> None:
        """Give each subscription whose receiving zone the current view names
        differently its new relay, restarting it (its session reads lean or
        whole, with a relay watcher or without, by the relay it began with)."""
        for subscription in list(self.subscriptions):
            relay = self._relay_for(subscription.peer.peer)
            if _relay_zone(relay) == _relay_zone(subscription.relay):
                continue
            name = subscription.peer.name
            log.info("relay_changed", peer=name, zone=_relay_zone(relay),
                     was=_relay_zone(subscription.relay))
            task = self._tasks.pop(name, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            subscription.relay = relay
            self._tasks[name] = asyncio.create_task(subscription.run(),
                                                    name=f"subscription:{name}")

    async def _drop_peer(self, client: PeerClient) -> None:
        if self.replica is not None:
            self.replica.registry.clock.forget(client.name)
        task = self._tasks.pop(client.name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for subscription in self.subscriptions:
            if subscription.peer is client:
                self.origins.remove(subscription)
        self.subscriptions = [s for s in self.subscriptions if s.peer is not client]
        self.relayed.forget(client.name)
        self.clients.remove(client)
        if client in self.anti_entropy.peers:
            self.anti_entropy.peers.remove(client)
        await client.close()

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
            # This node's clock against its peers' (registry_node.clock): skewed
            # means it refuses writes.
            "clock": node.registry.clock.describe(node.registry.hlc.last),
            "zone_redundant": self.view.zone_redundant,
            "zones": self.view.zone_redundancy.zone_count,
            "write_quorum": self.view.zone_redundancy.write_quorum,
            "peers": [{
                "name": s.peer.name, "region": s.peer.peer.region, "zone": s.peer.peer.zone,
                "connected": s.connected, "behind_events": s.lag_events,
                "last_error": s.last_error or None, "resyncs": s.resyncs,
                "lean": s.lean, "relay_fallbacks": s.fallbacks,
                "silent": self.rescue.is_silent(s.peer.name) if self.rescue else False,
                "clock_skewed": s.peer.name in node.registry.clock.off_peers(),
            } for s in self.subscriptions],
            "rescue": {
                "rescued": self.rescue.rescued if self.rescue else 0,
                "lookup_rounds": self.rescue.rounds if self.rescue else 0,
                "not_waited_for": dict(self.rescue.not_waited_for) if self.rescue else {},
            },
            "anti_entropy": self._anti_entropy_counters(),
            "metadata": self._metadata_counters(),
            "content": self.replica.content_summary() if self.replica else {},
            "memory": _memory(node),
            # Request throttling here: limits, fault, refusals (``georeg status``).
            "throttle": request.app[THROTTLE].describe(),
        })

    def _anti_entropy_counters(self) -> dict[str, int]:
        if self.anti_entropy is None:
            return dict.fromkeys(("rounds", "repaired", "buckets_differing", "compared",
                                  "fetched"), 0)
        return self.anti_entropy.counters()

    def _metadata_counters(self) -> dict[str, int]:
        """Bounded metadata: the log and tombstones (``retention``), and the
        peers' deletions past the grace anti-entropy did not store."""
        if self.retention is None:
            return {}
        counts = self.retention.counters()
        if self.anti_entropy is not None:
            counts["stale_deletions_skipped"] = self.anti_entropy.stale_deletions
        return counts

    def _log_readers(self) -> list[str]:
        """Every node that may read this node's log, as the plan named them (the
        peers, for a view that does not)."""
        if self.view.readers is not None:
            return list(self.view.readers)
        return [p.name for p in self.view.peers]

    def _refresh_queue_depths(self) -> None:
        for sub in self.subscriptions:
            self.metrics.queue_depth.labels(sub.peer.name).set(sub.lag_events)


def _memory(node) -> dict[str, int]:
    """Where this process's memory is: resident set, RocksDB's memtables and block
    cache, the C heap (in use, and free but not given back), Python's objects."""
    rss = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return {"rss_bytes": rss, "rocksdb_bytes": node.meta.memory_bytes(),
            **allocator.heap(), "python_blocks": sys.getallocatedblocks()}


def _label(region: str, zone: str) -> str:
    return f"{region}/{zone}" if zone else region


def _relay_zone(relay: Relay | None) -> str | None:
    """The zone a relay names; None: this node reads the peer whole."""
    return relay.zone if relay is not None else None


def _credentials(view: ClusterView, config: NodeConfig) -> PeerCredentials | None:
    """The node's credentials for replicating over mutual TLS, when its view
    says to; ``AuthConfigError`` when it says so but the node has no certificate."""
    if not view.mutual_tls:
        return None
    # The auth certificate where the node has one, else the one it serves HTTPS
    # with (a TLS cluster without auth): the same CA issued both.
    files = (config.auth_ca_file, config.auth_key_file, config.auth_cert_file)
    if config.auth_ca_file is None:
        files = (config.tls_ca_file, config.tls_key_file, config.tls_cert_file)
    ca_file, key_file, cert_file = files
    if ca_file is None or key_file is None or cert_file is None:
        raise AuthConfigError(f"{view.name} replicates over mutual TLS (its cluster has auth "
                              f"or TLS) but was given no certificate (--auth-ca, --auth-key, "
                              f"--auth-cert, or --tls-ca, --tls-key, --tls-cert)")
    try:
        return PeerCredentials.load(ca_file, key_file, cert_file)
    except OSError as exc:
        raise AuthConfigError(f"cannot read {view.name}'s certificate for replication: "
                              f"{exc.strerror or exc}") from None


def _listen(server: grpc.aio.Server, address: str,
            credentials: PeerCredentials | None = None) -> int:
    """Add ``address`` to ``server``; the port bound. gRPC says only that the
    bind failed; an ``OSError`` says why, so that a port in use is told apart
    (``georeg node`` exits with its own status for it, and a cluster starting
    on any free range tries another)."""
    try:
        if credentials is not None:
            return server.add_secure_port(address, credentials.server())
        return server.add_insecure_port(address)
    except RuntimeError as exc:
        host, _, port = address.rpartition(":")
        probe = socket.socket()
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host.strip("[]"), int(port)))
        except OSError as why:
            raise OSError(why.errno, f"cannot listen for replication on {address}: "
                                     f"{why.strerror}") from exc
        finally:
            probe.close()
        raise OSError(errno.EIO, f"cannot listen for replication on {address}: {exc}") from exc
