"""The cluster's routing endpoints, wired to its plan and its health checks.

One global endpoint per client location (the registry as a client in that
region sees it: nearest healthy replica with routing enabled, by the WAN
model) and one regional endpoint per replica (pinned, spreading over its
zones). All share one ``Replicas`` (so a routing flag changes every endpoint at
once), one ``NodeHealth`` (fed by the supervisor's checks, and by the proxies'
own connect failures) and one ``UploadAffinity`` (an upload continues on its
node whichever endpoint carries it). On a TLS cluster every endpoint serves
HTTPS and reaches nodes over HTTPS, with the cluster's contexts
(``cluster.tls``: the endpoints' certificate, the CA). The policies and the proxy themselves
live in ``cluster.routing.policy`` and ``cluster.routing.proxy``.
"""

from __future__ import annotations

import structlog

from .policy import NodeEndpoint, NodeHealth, ReplicaGroup, Replicas, UploadAffinity
from .proxy import RoutingProxy

log = structlog.get_logger("georeg.endpoints")


class Endpoints:
    def __init__(self, cluster) -> None:  # cluster: cluster.control.cluster.Cluster
        self.cluster = cluster
        self.health = NodeHealth()
        self.affinity = UploadAffinity()
        self.replicas = Replicas()
        self.proxies: dict[tuple[str, str], RoutingProxy] = {}   # (kind, region) -> proxy
        self.unreachable: set[str] = set()
        self._wan = cluster.spec.wan_model()

    def _latency(self, client_region: str, replica_region: str) -> float:
        return self._wan.one_way_ms(client_region, replica_region)

    def _group(self, region: str) -> ReplicaGroup:
        plan = self.cluster.plan
        nodes = tuple(NodeEndpoint(n.name, n.region, n.zone, n.host, n.http_port)
                      for n in plan.nodes_in(region))
        flag = self.cluster.replica_specs()[region].global_routing
        return ReplicaGroup(region, nodes, flag)

    async def start(self) -> None:
        for replica in self.cluster.spec.all_replicas:
            self.replicas.add(self._group(replica.region))
        self.cluster.supervisor.on_health_change(self._on_health)
        for node in self.cluster.supervisor.nodes.values():
            self._on_health(node)
        await self.refresh()

    async def refresh(self) -> None:
        """Match the endpoints to the plan (replicas created or deleted since)."""
        plan = self.cluster.plan
        wanted_regions = {r.region for r in self.cluster.spec.all_replicas}
        for region in [g.region for g in self.replicas]:
            if region not in wanted_regions:
                self.replicas.remove(region)
        for region in wanted_regions:
            if region not in self.replicas:
                self.replicas.add(self._group(region))
        wanted = {(e.kind, e.region): e for e in plan.endpoints}
        for key in [k for k in self.proxies if k not in wanted]:
            await self.proxies.pop(key).stop()
        spec = self.cluster.spec
        # With auth, a redirect is the node's: it authenticates, then signs a grant.
        options = {"redirect_blobs": spec.blob_downloads == "redirect",
                   "node_redirects": spec.auth_enabled}
        tls = self.cluster.tls
        if tls is not None:
            options.update(server_tls=tls.server, backend_tls=tls.client)
        for key, endpoint in wanted.items():
            if key in self.proxies:
                continue
            if endpoint.kind == "global":
                proxy = RoutingProxy.global_endpoint(endpoint.region, self.replicas, self._latency,
                                                     self.health, self.affinity, **options)
            else:
                proxy = RoutingProxy.regional_endpoint(self.replicas.get(endpoint.region),
                                                       self.health, self.affinity, **options)
            await proxy.start(plan.host, endpoint.port)
            self.proxies[key] = proxy
        for node in self.cluster.supervisor.nodes.values():
            self._on_health(node)

    async def stop(self) -> None:
        for proxy in self.proxies.values():
            await proxy.stop()
        self.proxies.clear()

    # -- state -------------------------------------------------------------------------

    def _on_health(self, node) -> None:  # node: supervisor.NodeRuntime
        if node.name in self.unreachable:
            self.health.report(node.name, False, "isolated (fault injection)")
        elif node.healthy:
            self.health.report(node.name, True)
            return
        else:
            self.health.report(node.name, False, f"{node.state}: {node.reason}".rstrip(": "))
        # Reads still waiting on it for an answer (a node that stopped
        # answering) go to the next replica now, not when their clients give up.
        for proxy in self.proxies.values():
            proxy.node_lost(node.name)

    def set_unreachable(self, names: set[str]) -> None:
        """Nodes clients cannot reach (an isolated region or zone)."""
        changed = names ^ self.unreachable
        self.unreachable = set(names)
        for name in changed:
            node = self.cluster.supervisor.nodes.get(name)
            if node is not None:
                self._on_health(node)

    def set_routing(self, region: str, enabled: bool) -> None:
        self.replicas.set_routing(region, enabled)
        log.info("routing", region=region, enabled=enabled)

    def routing_flags(self) -> dict[str, bool]:
        return {g.region: g.routing_enabled for g in self.replicas}

    def stats(self) -> dict:
        """Per endpoint (``global:<client region>``, ``regional:<region>``), since
        it started: requests routed to each node (redirected ones included),
        requests sent on after a node failed, the endpoint's own 503s, its own
        404s for paths endpoints do not carry (a node's internal routes), blob
        downloads redirected, blob downloads the node wrote on the client's
        connection (handed over), and body bytes relayed inside the kernel."""
        return {f"{kind}:{region}": {"requests": dict(p.requests_by_backend),
                                     "failovers": p.failovers,
                                     "unavailable": p.unavailable_responses,
                                     "not_forwarded": p.not_forwarded,
                                     "redirects": p.redirects,
                                     "handed_over": p.handed_over,
                                     "spliced_bytes": p.spliced_bytes}
                for (kind, region), p in self.proxies.items()}
