"""From a validated, seeded spec to the concrete cluster: which nodes exist,
their ports and data dirs, which WAN links connect them, and what each node is
told about its peers (its ``ClusterView``). Pure: no processes, no sockets.

Every node reaches every other node through its own link (one per ordered
pair), so a fault can cut one direction between two zones without touching
anything else. The management API reaches each serving node through a link of
its own too (``management_links``, from ``MANAGEMENT``): what cuts a node off
from the network cuts it off from the control plane's requests as well.

Decisions travel from here as data, never re-inferred downstream: each node's
plan carries its region's zone redundancy (zones and write quorum, from the
spec's ``ReplicaSpec``), which its view hands to the node; each link's plan
carries its own seed, derived from the cluster's; on a cluster with
``auth = "token"``, each node's plan names the files of its access
(``NodeAccess``: CA, its key and certificate, the login server, the internal
credential; the identities it enforces are the replicated registry
configuration it holds), which ``cluster.control.access``
provisions at start and the supervisor hands to the node as paths, never as
secrets; on a cluster with ``tls = true``, each node's plan names the
certificate it serves HTTPS with (``NodeTls``, from the same CA), and
every URL of a node says ``https``; on a cluster whose ``[limits]`` turn
throttling on, each serving node's view carries its replica's request
limits (the tier's rates and the spec's overrides, for the whole replica,
which its zone nodes share through the zone peers' addresses its view
lists: ``registry_node.throttle``); on every cluster, each serving node's
plan names the cluster's configuration key file (``configuration_key``,
which seals webhook header values; a paired-region copy, which never
delivers, gets none); each serving node's view carries its share of its
replica's blob bandwidth (``node_bandwidth``: the budget divided by the
replica's zones).

Hosts (docs/multihost.md): a node runs on the control process's host,
listening on loopback, unless the spec's ``[network.hosts]`` places its
region, or the node itself, on a host of its own, by address (``placement``).
A node so placed listens on that address, and every file
its command line names (data dir, view, access and TLS files, configuration
key) is a path on that host, under ``network.host_data_dir`` (``host_root``):
the control process puts them there through the host (``cluster.control.hosts``)
and never reads them back. Links, endpoints and the management API stay on
the control process's host (``ClusterPlan.host``, the spec's ``network.host``),
and reach each node at its own address; a node reaches its peers through its
links (``LinkPlan.listen_host``: loopback for a node on the control process's
host, ``network.host`` for a placed one), so every byte between two hosts
crosses a link. A paired-region copy runs on its pair region's host when
that region is placed, on the control process's host otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from registry_node.config import BandwidthSettings
from replicator.topology import ClusterView, Peer, ReplicationSettings, ZoneRedundancy

from ..network.links import LinkModel, link_seed
from .regions import REGIONS
from .spec import ANY_PORT_BASE, ClusterSpec, ReplicaSpec, port_layout

# Where a cluster keeps its access material, under its data dir (the layout
# is ``cluster.control.access``'s; the plan only names the files).
AUTH_DIR = "auth"


def configuration_key_file(data_dir: Path) -> Path:
    """The cluster's configuration key (``registry_node.configuration_key``),
    made at first start by ``cluster.control.access`` on every cluster."""
    return data_dir / AUTH_DIR / "configuration.key"


@dataclass(frozen=True, slots=True)
class NodeAccess:
    """What a node of an auth cluster is given (``georeg node --auth-*``), as files."""

    ca_file: Path
    key_file: Path
    cert_file: Path
    service: str                 # the login server: challenges' service, tokens' audience
    internal_credential_file: Path


def node_access(spec: ClusterSpec, data_dir: Path, name: str) -> NodeAccess | None:
    """The files of node ``name``'s access (None on a cluster without auth)."""
    if not spec.auth_enabled:
        return None
    auth = data_dir / AUTH_DIR
    return NodeAccess(ca_file=auth / "ca" / "ca.pem",
                      key_file=auth / "ca" / "nodes" / name / "node.key",
                      cert_file=auth / "ca" / "nodes" / name / "node.pem",
                      service=spec.login_server,
                      internal_credential_file=auth / "internal.secret")


@dataclass(frozen=True, slots=True)
class NodeTls:
    """What a node of a TLS cluster serves HTTPS with (``georeg node --tls-*``), as
    files: its certificate from the cluster CA (the one its access names on an
    auth cluster) and the CA, which it trusts for peers in replication."""

    ca_file: Path
    key_file: Path
    cert_file: Path


def ca_file(data_dir: Path) -> Path:
    """The cluster CA's certificate under ``data_dir`` (there on a cluster with auth or TLS)."""
    return data_dir / AUTH_DIR / "ca" / "ca.pem"


def node_tls(spec: ClusterSpec, data_dir: Path, name: str) -> NodeTls | None:
    """The files node ``name`` serves HTTPS with (None on a cluster without TLS)."""
    if not spec.tls:
        return None
    ca = data_dir / AUTH_DIR / "ca"
    return NodeTls(ca_file=ca_file(data_dir), key_file=ca / "nodes" / name / "node.key",
                   cert_file=ca / "nodes" / name / "node.pem")


# Where a node on the control process's host listens.
LOOPBACK = "127.0.0.1"

# The source of a management link: the management API, which is no node.
MANAGEMENT = "management"


@dataclass(frozen=True, slots=True)
class NodePlan:
    name: str
    region: str
    zone: str
    http_port: int
    grpc_port: int
    data_dir: Path
    view_file: Path
    log_file: Path
    copy_of: str = ""          # a paired-region copy: the replica region it keeps
    # Its region's zones and write quorum (a paired-region copy is storage: none).
    zone_redundancy: ZoneRedundancy = ZoneRedundancy()
    access: NodeAccess | None = None    # on an auth cluster: its credentials' files
    tls: NodeTls | None = None          # on a TLS cluster: what it serves HTTPS with
    configuration_key: Path | None = None   # the cluster's configuration key file (serving nodes)
    # The spec's [limits] storage_limit, in bytes (serving nodes; None: the
    # node applies the live tier's registry maximum).
    storage_limit: int | None = None
    # Where the node listens and is reached; its files are on that host, under
    # ``host_root``, when it is placed on a host of its own (None: on the
    # control process's host, in the cluster's data dir).
    host: str = LOOPBACK
    host_root: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.region}/{self.zone}" if self.zone else self.region

    @property
    def own_host(self) -> str | None:
        """The address of the host of its own it runs on (None: the control
        process's host, where its files are readable)."""
        return self.host if self.host_root is not None else None

    @property
    def given_files(self) -> tuple[Path, ...]:
        """The files its command line names that the cluster makes (access, TLS,
        configuration key), as paths where the node runs."""
        files = [f for given in (self.access, self.tls) if given is not None
                 for f in (given.ca_file, given.key_file, given.cert_file)]
        if self.access is not None:
            files.append(self.access.internal_credential_file)
        if self.configuration_key is not None:
            files.append(self.configuration_key)
        return tuple(dict.fromkeys(files))


def node_arguments(node: NodePlan, listen: str) -> list[str]:
    """``georeg node``'s arguments for ``node`` listening on ``listen``: the one
    mapping of a plan to a node's command line, wherever the plan's files are
    (the supervisor's data dir, or a deployment's mounts)."""
    args = ["--data-dir", str(node.data_dir), "--listen", listen,
            "--cluster", str(node.view_file), "--log-format", "json"]
    if node.access is not None:
        a = node.access
        args += ["--auth-ca", str(a.ca_file), "--auth-key", str(a.key_file),
                 "--auth-cert", str(a.cert_file), "--auth-service", a.service,
                 "--internal-credential-file", str(a.internal_credential_file)]
    if node.tls is not None:
        t = node.tls
        args += ["--tls-cert", str(t.cert_file), "--tls-key", str(t.key_file),
                 "--tls-ca", str(t.ca_file)]
    if node.configuration_key is not None:
        args += ["--configuration-key-file", str(node.configuration_key)]
    if node.storage_limit is not None:
        args += ["--storage-limit", str(node.storage_limit)]
    return args


@dataclass(frozen=True, slots=True)
class LinkPlan:
    source: str          # node name
    target: str
    port: int
    target_port: int
    model: LinkModel
    seed: int            # of this link's random draws (jitter, resets)
    target_host: str = LOOPBACK      # the target node's host
    # Where the link listens: loopback for a source on the control process's
    # host, the plan's host (which every host reaches) for one on a host of its own.
    listen_host: str = LOOPBACK

    @property
    def name(self) -> str:
        return f"{self.source}->{self.target}"

    @property
    def address(self) -> str:
        """``HOST:PORT`` its source dials."""
        return f"{self.listen_host}:{self.port}"


@dataclass(frozen=True, slots=True)
class EndpointPlan:
    kind: str            # "global" (per client location) or "regional" (per replica)
    region: str
    port: int


@dataclass(frozen=True, slots=True)
class ClusterPlan:
    spec: ClusterSpec
    data_dir: Path
    host: str
    nodes: tuple[NodePlan, ...]
    links: tuple[LinkPlan, ...]
    endpoints: tuple[EndpointPlan, ...]
    management_port: int
    pair_copies: tuple[NodePlan, ...] = ()
    management_links: tuple[LinkPlan, ...] = ()   # MANAGEMENT -> each serving node's HTTP port

    @property
    def seed(self) -> int:
        """The cluster's seed, from which every link's is derived."""
        assert self.spec.seed is not None   # plan() takes only a seeded spec
        return self.spec.seed

    @property
    def scheme(self) -> str:
        """``https`` on a TLS cluster: what every URL of a node or endpoint says."""
        return self.spec.scheme

    @property
    def ca_file(self) -> Path:
        """Where the cluster CA's certificate is (made at first start, with auth or TLS)."""
        return ca_file(self.data_dir)

    @property
    def all_nodes(self) -> tuple[NodePlan, ...]:
        """Serving nodes, then the storage-only paired-region copies."""
        return self.nodes + self.pair_copies

    def client_addresses(self) -> list[str]:
        """``HOST:PORT`` of every endpoint and every node serving clients
        (``localhost`` beside ``127.0.0.1``): where a client may log in."""
        listeners = [(self.host, e.port) for e in self.endpoints]
        listeners += [(n.host, n.http_port) for n in self.nodes]
        return [f"{name}:{port}" for host, port in listeners
                for name in ([host] + (["localhost"] if host == "127.0.0.1" else []))]

    def host_ports(self) -> list[int]:
        """The ports nodes on hosts of their own dial on the control process's
        address: their links (nothing else there is theirs to reach)."""
        return sorted(link.port for link in self.links if link.listen_host != LOOPBACK)

    def control_copy(self, node: NodePlan, path: Path) -> Path:
        """Where the control process keeps the file ``node``'s plan names at
        ``path`` (the path itself for a node on the control process's host)."""
        if node.host_root is None:
            return path
        return self.data_dir / path.relative_to(node.host_root)

    def node(self, name: str) -> NodePlan:
        for node in self.all_nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def pair_copy(self, region: str) -> NodePlan | None:
        for node in self.pair_copies:
            if node.copy_of == region:
                return node
        return None

    def nodes_in(self, region: str) -> list[NodePlan]:
        return [n for n in self.nodes if n.region == region]

    def link(self, source: str, target: str) -> LinkPlan:
        for link in self.links:
            if link.source == source and link.target == target:
                return link
        raise KeyError((source, target))

    def management_link(self, node: str) -> LinkPlan:
        for link in self.management_links:
            if link.target == node:
                return link
        raise KeyError((MANAGEMENT, node))

    def view(self, node: NodePlan, settings: ReplicationSettings | None = None, *,
             with_pair_copy: bool = False) -> ClusterView:
        """What ``node`` is told of its peers. A paired-region copy knows only the
        nodes of the region it keeps; a replica node knows every other replica
        node, and its region's copy only while the region is being restored.

        And who reads its log (``readers``, for bounded metadata): a replica
        node's are every other replica node and its region's copy, which
        subscribes to it always (its tombstones wait for the copy too). A
        copy's log is read by nobody outside a restore, so it names none: its
        tombstones need not wait for nodes that never read them, and a node
        restored from it also reads every other replica, which hold their
        tombstones for it."""
        if node.copy_of:
            others = self.nodes_in(node.copy_of)
            readers: tuple[str, ...] = ()
        else:
            others = [n for n in self.nodes if n.name != node.name]
            readers = tuple(n.name for n in others)
            pair = self.pair_copy(node.region)
            if pair is not None:
                readers += (pair.name,)
                if with_pair_copy:
                    others.append(pair)
        peers = tuple(
            Peer(name=other.name, region=other.region, zone=other.zone,
                 grpc=f"{self.link(node.name, other.name).address}",
                 rtt_ms=2 * self.link(node.name, other.name).model.latency_ms,
                 bandwidth_mbps=self.link(node.name, other.name).model.bandwidth_mbps,
                 http=f"{self.spec.scheme}://{other.host}:{other.http_port}")
            for other in others)
        remote_zones = {other.region: other.zone_redundancy.zones for other in others
                        if other.zone_redundancy.enabled and other.region != node.region}
        # Webhooks: one node per replica region fires them (its first zone; a
        # paired copy never), after the modelled one-way latency to the receiver;
        # timeouts, retries and the delivery log as the spec's [webhooks] says.
        redundancy = node.zone_redundancy
        wan = self.spec.wan_model()
        webhooks = self.spec.webhooks.settings(
            deliver=not node.copy_of and (not redundancy.enabled
                                          or node.zone == min(redundancy.zones)),
            wan_latency_ms={region: wan.link(node.region, region).latency_ms
                            for region in REGIONS})
        # Throttling: the replica's limits, as the spec's [limits] and tier say,
        # on each of its zone nodes, which share what they admit with the zone
        # peers listed here (registry_node.throttle); a paired copy serves no client.
        limits = None if node.copy_of else self.spec.limits.request_limits(self.spec.tier)
        return ClusterView(name=node.name, region=node.region, zone=node.zone,
                           grpc_listen=f"{node.host}:{node.grpc_port}", peers=peers,
                           zone_redundancy=node.zone_redundancy, remote_zones=remote_zones,
                           residency=self.spec.residency_policy(),
                           replication=settings or ReplicationSettings(),
                           mutual_tls=node.access is not None or node.tls is not None,
                           readers=readers, webhooks=webhooks, request_limits=limits,
                           bandwidth=node_bandwidth(self.spec, node))


def node_bandwidth(spec: ClusterSpec, node: NodePlan) -> BandwidthSettings:
    """``node``'s share of its replica's blob bandwidth (the spec's ``[limits]``).

    A replica's budget is the replica's, not each zone's; zones are separate
    processes (on separate machines, beyond one), so each zone node gets the
    budget divided by the zones. The replica as a whole never exceeds it; the
    error is that one zone cannot borrow what the others leave unused: a
    transfer, and every transfer of repositories that routing sends to one
    zone, gets a third of the replica's rate while the other zones are idle,
    and a replica with a zone down has two thirds. A paired-region copy
    serves no client and is not shaped."""
    if node.copy_of:
        return BandwidthSettings()
    download, upload = spec.limits.bandwidth(spec.tier)
    zones = node.zone_redundancy.zone_count
    return BandwidthSettings(download_mbps=download / zones, upload_mbps=upload / zones)


def node_name(region: str, zone: str) -> str:
    return f"{region}-{zone}" if zone else region


def zone_redundancy(replica: ReplicaSpec) -> ZoneRedundancy:
    """What the spec decided for ``replica``'s region, as its nodes are told it."""
    if not replica.zone_redundant:
        return ZoneRedundancy()
    return ZoneRedundancy(enabled=True, zones=replica.zones, write_quorum=replica.write_quorum)


def placement(spec: ClusterSpec, name: str, region: str) -> tuple[str, Path | None]:
    """Where node ``name`` of ``region`` runs: the address it listens on, and
    the directory its files are under on a host of its own (``host_root``).
    On the control process's host: loopback (only its links, the endpoints
    and the supervisor reach it, and all of them are there, whatever address
    ``network.host`` opens to clients) and None (its files are in the
    cluster's data dir). On a host of its own: that host's address and
    ``network.host_data_dir``, whatever the control data dir is (both can
    be ``/data``: the decision is this one, never re-inferred from paths)."""
    hosts = spec.network.hosts
    address = hosts.get(name) or hosts.get(region)
    if address is None:
        return LOOPBACK, None
    return address, Path(spec.network.host_data_dir)


def plan(spec: ClusterSpec, data_dir: Path) -> ClusterPlan:
    if spec.seed is None:
        raise ValueError("plan a seeded spec (ClusterSpec.seeded): the links' draws derive "
                         "from its seed")
    if spec.network.port_base == ANY_PORT_BASE:
        raise ValueError("plan a spec whose ports are decided: Cluster.start picks a base for "
                         "port_base 0 (ClusterSpec.with_port_base)")
    layout = port_layout(spec)
    host = spec.network.host
    nodes: list[NodePlan] = []
    for replica in spec.all_replicas:
        redundancy = zone_redundancy(replica)
        for zone in replica.zones:
            i = len(nodes)
            name = node_name(replica.region, zone)
            address, host_root = placement(spec, name, replica.region)
            root = host_root or data_dir
            nodes.append(NodePlan(
                name=name, region=replica.region, zone=zone, http_port=layout.node_http(i),
                grpc_port=layout.node_grpc(i), data_dir=root / "nodes" / name,
                view_file=root / "views" / f"{name}.json",
                log_file=data_dir / "logs" / f"{name}.log", zone_redundancy=redundancy,
                access=node_access(spec, root, name), tls=node_tls(spec, root, name),
                configuration_key=configuration_key_file(root),
                storage_limit=spec.limits.storage_limit_bytes,
                host=address, host_root=host_root))
    wan = spec.wan_model()
    links: list[LinkPlan] = []

    def link(source: NodePlan, target: NodePlan, port: int) -> LinkPlan:
        return LinkPlan(source.name, target.name, port, target.grpc_port,
                        wan.link(source.region, target.region),
                        link_seed(spec.seed, source.name, target.name), target.host,
                        LOOPBACK if source.host_root is None else host)

    # Ordered so that adding a replica only appends links: every port already in
    # use keeps its meaning while the cluster runs.
    for k, newer in enumerate(nodes):
        for older in nodes[:k]:
            for source, target in ((newer, older), (older, newer)):
                links.append(link(source, target, layout.link(len(links))))
    pairs: list[NodePlan] = []
    for k, (region, pair_region) in enumerate(spec.paired_regions().items()):
        name = f"pair-{region}"
        address, host_root = placement(spec, name, pair_region)
        root = host_root or data_dir
        pairs.append(NodePlan(
            name=name, region=pair_region, zone="", http_port=layout.pair_http(k),
            grpc_port=layout.pair_grpc(k), data_dir=root / "pairs" / region,
            view_file=root / "views" / f"{name}.json", log_file=data_dir / "logs" / f"{name}.log",
            copy_of=region, access=node_access(spec, root, name),
            tls=node_tls(spec, root, name), host=address, host_root=host_root))
        for member in (n for n in nodes if n.region == region):
            for source, target in ((pairs[-1], member), (member, pairs[-1])):
                links.append(link(source, target,
                                  layout.pair_link(len(links) - layout.link_count)))
    # Nothing models where the management API sits, so its links add no latency.
    management = tuple(LinkPlan(MANAGEMENT, node.name, layout.management_link(i), node.http_port,
                                LinkModel(), link_seed(spec.seed, MANAGEMENT, node.name),
                                node.host)
                       for i, node in enumerate(nodes))
    endpoints = [EndpointPlan("global", loc, layout.global_endpoint(i))
                 for i, loc in enumerate(spec.client_locations)]
    endpoints += [EndpointPlan("regional", r.region, layout.regional_endpoint(i))
                  for i, r in enumerate(spec.all_replicas)]
    return ClusterPlan(spec, data_dir, host, tuple(nodes), tuple(links), tuple(endpoints),
                       layout.management, tuple(pairs), management)
