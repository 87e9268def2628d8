"""Where a registry request goes: the routing policies of the global and the
regional endpoints, node health as routing sees it, and upload affinity.

This module is IO-free. It owns the *decisions*; ``cluster.routing.proxy`` owns the
sockets and asks it, per request, for an ordered list of candidate nodes. The
clock is injected, so every rule here is testable without sockets or sleeps.

Vocabulary
    NodeEndpoint   one registry node process (a region, or one zone of a
                   zone-redundant region) and the address that reaches it
    ReplicaGroup   one replica (a region): its zone nodes and whether global
                   endpoint routing is enabled for it (ACR's
                   ``regionEndpointEnabled``)
    Replicas       the registry's replicas as routing sees them, shared by all
                   endpoints so a routing flag changes every endpoint at once
    HealthView     what routing knows of each node's health (``NodeHealth`` is
                   the implementation; the supervisor reports, the proxy marks
                   nodes down on connect failures)
    UploadAffinity upload session id -> the node that issued it

Invariants
    * A global endpoint offers only nodes that are healthy and whose replica
      has routing enabled, nearest replica first (by the injected latency
      function), so a disabled or failed replica is skipped on the very next
      request.
    * A regional endpoint offers only its own region's healthy zone nodes;
      it never fails over to another region, and ignores the routing flag
      (as ACR's regional endpoints do).
    * An upload session's node comes first whenever it is healthy and belongs
      to the endpoint's reach, even if its routing was disabled or a nearer
      replica recovered since the session began: a push never fails because
      routing moved. If that node is down the other candidates follow, and
      they answer ``BLOB_UPLOAD_UNKNOWN``, which clients handle by restarting
      the upload.
    * Within a region, zone nodes are ordered by rendezvous hashing of the
      repository name (``ZoneSpread.REPOSITORY``, the default) so one
      repository's blobs and manifests land on the same zone node while it is
      healthy: a quorum-acknowledged write is then always visible to the next
      request of the same push, and load still spreads across repositories.
      ``ZoneSpread.ROTATE`` rotates per request instead. Requests without a
      repository (``/v2/``, ``_catalog``) always rotate.
    * ``candidates`` never returns a node twice and never an unhealthy one.
    * Endpoints carry the registry's public API and nothing else
      (``request_route``): a node's internal routes (its storage fault seam,
      inventory, own status, metrics) answer 404 at every endpoint, however
      the request target is written, and stay reachable on the node's port.
"""

from __future__ import annotations

import enum
import itertools
import re
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

Clock = Callable[[], float]
LatencyMs = Callable[[str, str], float]      # (client region, replica region) -> one-way ms


@dataclass(frozen=True, slots=True)
class NodeEndpoint:
    """One registry node and the address the routing layer reaches it at."""

    name: str                 # unique in the cluster, e.g. "eastus-1" or "westeurope"
    region: str
    zone: str                 # "" for a region without zone redundancy
    host: str
    port: int


@dataclass(slots=True, eq=False)
class ReplicaGroup:
    """One replica (region) of the registry: its zone nodes and routing flag."""

    region: str
    nodes: tuple[NodeEndpoint, ...]
    routing_enabled: bool = True

    def __post_init__(self) -> None:
        self.nodes = tuple(self.nodes)
        if not self.nodes:
            raise ValueError(f"replica {self.region} has no nodes")
        strays = [n.name for n in self.nodes if n.region != self.region]
        if strays:
            raise ValueError(f"replica {self.region} lists nodes of other regions: {strays}")


class Replicas:
    """The registry's replicas, by region, shared by every endpoint.

    Changing a routing flag or the set of replicas bumps ``version``, which
    endpoints use to drop cached rankings.
    """

    def __init__(self, groups: Iterable[ReplicaGroup] = ()) -> None:
        self._groups: dict[str, ReplicaGroup] = {}
        self._nodes: dict[str, NodeEndpoint] = {}
        self.version = 0
        for group in groups:
            self.add(group)

    def __iter__(self) -> Iterator[ReplicaGroup]:
        return iter(list(self._groups.values()))

    def __len__(self) -> int:
        return len(self._groups)

    def __contains__(self, region: object) -> bool:
        return region in self._groups

    def get(self, region: str) -> ReplicaGroup:
        try:
            return self._groups[region]
        except KeyError:
            raise KeyError(f"no replica in region {region!r}; replicas: "
                           f"{sorted(self._groups)}") from None

    def node(self, name: str) -> NodeEndpoint | None:
        return self._nodes.get(name)

    def add(self, group: ReplicaGroup) -> None:
        if group.region in self._groups:
            raise ValueError(f"a replica in {group.region} already exists")
        clash = [n.name for n in group.nodes if n.name in self._nodes]
        if clash:
            raise ValueError(f"node names already in use: {clash}")
        self._groups[group.region] = group
        self._nodes.update((n.name, n) for n in group.nodes)
        self.version += 1

    def remove(self, region: str) -> ReplicaGroup:
        group = self.get(region)
        del self._groups[region]
        for n in group.nodes:
            self._nodes.pop(n.name, None)
        self.version += 1
        return group

    def update_node(self, node: NodeEndpoint) -> None:
        """A node now answers at another address (restarted on a new port):
        swap it in place, so every endpoint uses the new address next."""
        old = self._nodes.get(node.name)
        if old is None:
            raise KeyError(f"no node named {node.name!r}")
        if (old.region, old.zone) != (node.region, node.zone):
            raise ValueError(f"{node.name} cannot move from {old.region}/{old.zone} to "
                             f"{node.region}/{node.zone}; remove and add its replica instead")
        group = self._groups[node.region]
        group.nodes = tuple(node if n.name == node.name else n for n in group.nodes)
        self._nodes[node.name] = node
        self.version += 1

    def set_routing(self, region: str, enabled: bool) -> None:
        """Enable or disable global endpoint routing to a replica (it keeps
        replicating and serving its regional endpoint either way)."""
        self.get(region).routing_enabled = enabled
        self.version += 1


# -- health ----------------------------------------------------------------------


class HealthView(Protocol):
    """Node health as routing needs it."""

    def healthy(self, node_name: str) -> bool: ...

    def mark_down(self, node_name: str, reason: str) -> None:
        """Passive evidence (a refused or timed-out connection): stop routing
        to the node now."""


@dataclass(slots=True)
class _NodeState:
    reported_down: str | None = None      # reason, from the supervisor or a probe
    passive_down: str | None = None       # reason, from the proxy's own failures
    passive_until: float = 0.0


class NodeHealth:
    """The ``HealthView`` the cluster uses.

    Two sources, kept apart:

    * ``report(name, up, reason)`` is authoritative (the supervisor's or a
      probe's verdict) and lasts until the next report;
    * ``mark_down(name, reason)`` is the proxy's passive evidence; it lasts
      ``passive_hold_s`` (then the node gets another chance: a refused
      connection costs nothing) or until a report says the node is up.

    A node nobody has heard of is healthy.
    """

    def __init__(self, *, passive_hold_s: float = 5.0, clock: Clock = time.monotonic) -> None:
        self.passive_hold_s = passive_hold_s
        self._clock = clock
        self._states: dict[str, _NodeState] = {}
        self._down: set[str] = set()     # names with any live down mark: the hot path's check

    def healthy(self, node_name: str) -> bool:
        if node_name not in self._down:
            return True
        state = self._states[node_name]
        if state.reported_down is not None:
            return False
        if state.passive_down is not None and self._clock() < state.passive_until:
            return False
        state.passive_down = None
        self._down.discard(node_name)
        return True

    def mark_down(self, node_name: str, reason: str) -> None:
        state = self._states.setdefault(node_name, _NodeState())
        state.passive_down = reason
        state.passive_until = self._clock() + self.passive_hold_s
        self._down.add(node_name)

    def report(self, node_name: str, up: bool, reason: str = "") -> None:
        state = self._states.setdefault(node_name, _NodeState())
        if up:
            state.reported_down = state.passive_down = None
            self._down.discard(node_name)
        else:
            state.reported_down = reason or "reported down"
            self._down.add(node_name)

    def reason(self, node_name: str) -> str | None:
        """Why the node is down, or None if it is healthy."""
        if self.healthy(node_name):
            return None
        state = self._states[node_name]
        return state.reported_down or state.passive_down

    def down(self) -> dict[str, str]:
        """Every node currently down, with the reason."""
        return {name: reason for name in list(self._down)
                if (reason := self.reason(name)) is not None}


# -- requests ----------------------------------------------------------------------

_UPLOAD = re.compile(r"/v2/(.+)/blobs/uploads/([^/]+)")
_REPOSITORY = re.compile(r"/v2/(.+)/(?:blobs|manifests|tags|referrers)/")
_BLOB = re.compile(r"/v2/.+/blobs/[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")


@dataclass(frozen=True, slots=True)
class RequestRoute:
    """What routing needs to know of a request: its repository (for zone
    placement), its upload session, if it continues one, whether it names a
    blob by digest (a download, when it is a GET), and whether endpoints
    forward it at all (``request_route``)."""

    repository: str | None = None
    upload_id: str | None = None
    blob: bool = False
    forwarded: bool = True


def route_of(path: str) -> RequestRoute:
    """The route of a request path (without its query string)."""
    # The substring test first: it is what a request that continues no upload
    # costs, instead of the expression's backtracking over the whole path.
    if "/blobs/uploads/" in path and (match := _UPLOAD.fullmatch(path)):
        return RequestRoute(match[1], match[2])
    if match := _REPOSITORY.match(path):
        return RequestRoute(match[1], blob=_BLOB.fullmatch(path) is not None)
    return RequestRoute()


# -- what endpoints forward --------------------------------------------------------
#
# An allowlist, not a blocklist: a route added to nodes later stays behind the
# endpoints until it is named here. Endpoints forward the registry API (OCI's
# ``/v2/``), ACR's own ``/acr/v1/`` and its token service ``/oauth2/``; a node's
# other routes are for the cluster around it (``/georeg/v1/faults/storage``
# makes a node refuse writes, ``/georeg/v1/inventory`` lists all it stores,
# ``/georeg/v1/node`` and ``/metrics`` describe the node), and answer 404.
#
# One exception: ``GET``/``HEAD /georeg/v1/replication/status`` stays forwarded.
# It is per image (repository and reference in the query), read-only, and the
# question a registry client asks about an image it can pull ("has my push
# reached every region?"), so a client that reaches the registry only
# through its endpoints must be able to ask it. It reveals nothing a pull of
# that image through the same endpoint does not: on an auth cluster the node's
# own request chain asks for ``pull`` on the repository it names, as it does
# for a manifest read (``registry_node.api.auth``; endpoints never decide
# access). Every other method on it is refused here.

FORWARDED_PREFIXES = ("/v2/", "/acr/v1/", "/oauth2/")
FORWARDED_PATHS = frozenset({"/v2"})
PUBLIC_NODE_READS = frozenset({"/georeg/v1/replication/status"})
_READ_METHODS = frozenset({"GET", "HEAD"})
NOT_FORWARDED = RequestRoute(forwarded=False)

_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*(.*)", re.DOTALL)


def node_path(target: str) -> str | None:
    """The path of a request target as a node routes it, made canonical, for
    deciding whether endpoints forward the request; None for a target that
    names no path (``*``, an authority).

    A node (aiohttp) takes the path of an absolute-form target (``GET
    http://host/p``), cuts it at the first ``?`` (or ``#``), decodes
    percent-escapes once except ``%2F`` and ``%25``, and matches its routes
    on that, leaving dot segments and doubled slashes as they are (aiohttp
    3.14, yarl 1.25). This does all of that, and more: it decodes ``%2F`` and
    ``%25`` too, resolves ``.`` and ``..`` segments and merges doubled slashes.
    Every target a node routes to an internal route therefore comes out here
    as that route's path, so the decision is at least as strict as the node's
    reading; the request is forwarded as the client wrote it.
    """
    if target.startswith("/"):
        path = target.split("?", 1)[0]
    else:
        match = _ABSOLUTE_FORM.fullmatch(target)
        if match is None:
            return None
        path = match[1].split("?", 1)[0]
    if "#" in path:
        path = path.split("#", 1)[0]
    if "%" in path:
        path = _ESCAPE.sub(_unescaped, path)
    if "//" in path or "/." in path or not path.startswith("/"):
        path = _resolved(path)
    return path


def _unescaped(escape: re.Match) -> str:
    return chr(int(escape[1], 16))


def _resolved(path: str) -> str:
    """``path`` with its dot segments resolved (RFC 3986 5.2.4) and empty
    segments dropped; a path that ends with a separator or a dot segment
    keeps one trailing ``/``."""
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment and segment != ".":
            segments.append(segment)
    out = "/" + "/".join(segments)
    if segments and path.rpartition("/")[2] in ("", ".", ".."):
        out += "/"
    return out


def request_route(method: str, target: str) -> RequestRoute:
    """The route of a request as it came to an endpoint (``target`` as
    written: origin or absolute form, with its query); ``NOT_FORWARDED`` for
    one that endpoints answer 404 themselves. This is the rule of what
    endpoints carry: the registry's API, and public reads of a node."""
    path = node_path(target)
    if path is not None and (path.startswith(FORWARDED_PREFIXES) or path in FORWARDED_PATHS
                             or (path in PUBLIC_NODE_READS and method in _READ_METHODS)):
        return route_of(path)
    return NOT_FORWARDED


def upload_id_of(location: str) -> str | None:
    """The upload session id in a ``Location`` header (a path or a URL)."""
    path = location.split("?", 1)[0]
    if "://" in path:
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    match = _UPLOAD.fullmatch(path)
    return match[2] if match else None


class UploadAffinity:
    """Upload session id -> the node that issued it; bounded, with expiry.

    Entries live ``ttl_s`` since their last use (a node forgets an idle
    session after a day by default, so should we) and at most ``max_entries``
    are kept, least recently used first out.
    """

    def __init__(self, *, max_entries: int = 100_000, ttl_s: float = 24 * 3600.0,
                 clock: Clock = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, upload_id: str, node_name: str) -> None:
        now = self._clock()
        self._entries[upload_id] = (node_name, now + self.ttl_s)
        self._entries.move_to_end(upload_id)
        self._expire(now)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def node_for(self, upload_id: str) -> str | None:
        entry = self._entries.get(upload_id)
        if entry is None:
            return None
        node_name, expires = entry
        now = self._clock()
        if now >= expires:
            del self._entries[upload_id]
            return None
        self._entries[upload_id] = (node_name, now + self.ttl_s)
        self._entries.move_to_end(upload_id)
        return node_name

    def forget(self, upload_id: str) -> None:
        self._entries.pop(upload_id, None)

    def _expire(self, now: float) -> None:
        # Entries are in order of last use, hence of expiry: expired ones lead.
        while self._entries:
            _, (_, expires) = next(iter(self._entries.items()))
            if expires > now:
                return
            self._entries.popitem(last=False)


# -- policies ----------------------------------------------------------------------


class ZoneSpread(enum.Enum):
    REPOSITORY = "repository"    # rendezvous hash of the repository name
    ROTATE = "rotate"            # round robin per request


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Why an endpoint has nowhere to send a request (the body of its 503)."""

    message: str
    detail: dict = field(default_factory=dict)


class EndpointPolicy(Protocol):
    """What the proxy asks of a routing policy."""

    name: str

    def candidates(self, route: RequestRoute, pinned: str | None = None) -> list[NodeEndpoint]:
        """Nodes to try, in order; ``pinned`` is the node that owns the
        request's upload session, if known."""

    def unavailable(self) -> Unavailable:
        """Why ``candidates`` is empty."""


def _zone_order(nodes: Sequence[NodeEndpoint], route: RequestRoute, spread: ZoneSpread,
                turn: int) -> list[NodeEndpoint]:
    if len(nodes) <= 1:
        return list(nodes)
    if spread is ZoneSpread.REPOSITORY and route.repository is not None:
        key = route.repository.encode()
        return sorted(nodes, key=lambda n: zlib.crc32(n.name.encode(), zlib.crc32(key)),
                      reverse=True)
    k = turn % len(nodes)
    return [*nodes[k:], *nodes[:k]]


class _Placement:
    """Shared by both policies: pinned node first, zones ordered, no duplicates."""

    def __init__(self, health: HealthView, spread: ZoneSpread) -> None:
        self.health = health
        self.spread = spread
        self._turns = itertools.count()

    def order(self, groups: Iterable[ReplicaGroup], route: RequestRoute,
              pinned: NodeEndpoint | None) -> list[NodeEndpoint]:
        healthy = self.health.healthy
        out: list[NodeEndpoint] = []
        if pinned is not None and healthy(pinned.name):
            out.append(pinned)
        turn = next(self._turns)
        for group in groups:
            nodes = [n for n in group.nodes
                     if (pinned is None or n.name != pinned.name) and healthy(n.name)]
            out += _zone_order(nodes, route, self.spread, turn)
        return out


def distance(client_region: str, latency_ms: LatencyMs) -> Callable[[str], tuple[float, str]]:
    """The order global routing ranks replica regions in for ``client_region``:
    nearest first, ties by region name (also what a deployment renders its
    global endpoints from)."""
    return lambda region: (latency_ms(client_region, region), region)


class GlobalPolicy:
    """The global endpoint as seen from one client location: the nearest
    healthy, routable replica first, then the next nearest, and so on.

    The ranking by latency is cached for ``rank_ttl_s`` (the WAN model's
    latencies change with faults, but not per request) and recomputed at once
    when the set of replicas or a routing flag changes.
    """

    def __init__(self, client_region: str, replicas: Replicas, latency_ms: LatencyMs,
                 health: HealthView, *, zone_spread: ZoneSpread = ZoneSpread.REPOSITORY,
                 rank_ttl_s: float = 1.0, clock: Clock = time.monotonic) -> None:
        self.client_region = client_region
        self.replicas = replicas
        self.latency_ms = latency_ms
        self.health = health
        self.name = f"global@{client_region}"
        self.rank_ttl_s = rank_ttl_s
        self._clock = clock
        self._placement = _Placement(health, zone_spread)
        self._ranked: list[ReplicaGroup] = []
        self._ranked_key: tuple[int, float] | None = None

    def ranked(self) -> list[ReplicaGroup]:
        """Routable replicas, nearest first (ties by region name)."""
        now = self._clock()
        key = self._ranked_key
        if key is None or key[0] != self.replicas.version or now >= key[1]:
            routable = [g for g in self.replicas if g.routing_enabled]
            nearest = distance(self.client_region, self.latency_ms)
            self._ranked = sorted(routable, key=lambda g: nearest(g.region))
            self._ranked_key = (self.replicas.version, now + self.rank_ttl_s)
        return self._ranked

    def candidates(self, route: RequestRoute, pinned: str | None = None) -> list[NodeEndpoint]:
        pinned_node = self.replicas.node(pinned) if pinned else None
        return self._placement.order(self.ranked(), route, pinned_node)

    def unavailable(self) -> Unavailable:
        replicas = {}
        for group in self.replicas:
            if not group.routing_enabled:
                replicas[group.region] = "routing disabled"
            else:
                replicas[group.region] = {n.name: _down_reason(self.health, n.name) or "healthy"
                                          for n in group.nodes}
        return Unavailable(
            f"no healthy replica with routing enabled for clients in {self.client_region}",
            {"endpoint": self.name, "replicas": replicas})


class RegionalPolicy:
    """A regional endpoint: one replica's healthy zone nodes, never another region."""

    def __init__(self, replica: ReplicaGroup, health: HealthView, *,
                 zone_spread: ZoneSpread = ZoneSpread.REPOSITORY) -> None:
        self.replica = replica
        self.health = health
        self.name = f"regional@{replica.region}"
        self._placement = _Placement(health, zone_spread)

    def candidates(self, route: RequestRoute, pinned: str | None = None) -> list[NodeEndpoint]:
        pinned_node = None
        if pinned:
            pinned_node = next((n for n in self.replica.nodes if n.name == pinned), None)
        return self._placement.order((self.replica,), route, pinned_node)

    def unavailable(self) -> Unavailable:
        region = self.replica.region
        return Unavailable(
            f"region {region} is unavailable: none of its nodes is healthy",
            {"endpoint": self.name, "region": region,
             "nodes": {n.name: _down_reason(self.health, n.name) or "healthy"
                       for n in self.replica.nodes}})


def _down_reason(health: HealthView, node_name: str) -> str | None:
    reason = getattr(health, "reason", None)
    if reason is not None:
        return reason(node_name)
    return None if health.healthy(node_name) else "down"
