"""The Python API of a georeg cluster: start one, find its endpoints, manage
its replicas, inject faults, verify it, stop it. ``georeg up``, the management
REST API (``cluster.control.management``, which serves a ``Cluster``) and the
pytest plugin are all thin layers over ``Cluster``.

    async with await Cluster.start(data_dir=tmp) as cluster:
        url = cluster.global_endpoint("westeurope")     # as a client there sees it
        ...

The home region holds the control plane, as in ACR: while no node of the
home region can be reached over the network (crashed, stopped, or cut off),
configuration changes (replicas, routing, restores, registry configuration)
fail with ``ControlPlaneUnavailable``; pushes and pulls go on through the
other replicas. Registry configuration (``registry_node.configuration``) is
written through one home node, which stamps and logs it; replication carries
it to every node, and every node answers reads of it from what it holds.
The registry's identities (admin credentials, tokens, scope maps, identities,
role assignments) have their own commands, ``Cluster.access``
(``cluster.control.identities``), after ``az acr``, and so do webhooks,
``Cluster.webhooks`` (``cluster.control.webhooks``); an auth cluster's own
credentials (CA, owner and internal secrets) are ``cluster.control.access``'s.
Reachability is asked of the network itself: a request to each home node
through its management link (``ClusterPlan.management_links``), which every
fault that cuts a node off cuts as well.

A replica's status is ACR's: ``provisioningState`` says whether the replica
exists (it stays ``Succeeded`` through an outage: nothing failed to
provision); ``status.displayStatus`` goes Creating → Syncing → Ready, shows
``Unavailable`` while none of its nodes is up, and Syncing again while a node
that was down catches up (``ReplicaProgress``); ``status.message`` names the
zones that are down.

Ports: the plan gives every listener its port, from the spec's
``network.port_base``, so that a node keeps its port across restarts and the
links, views and endpoints that name it stay right. A spec that leaves the
base open (``port_base = 0``: tests, benchmarks, chaos runs, anyone who does
not care) gets a random range below the kernel's ephemeral ports, and a fresh
one whenever a port of it turns out to be held by another process
(``PortInUse``): whether a port is free is learnt by binding it, never by
checking first and binding later. Every socket of this process (management
API, links, endpoints) is bound before anything is written; a node process
binds its own two when it starts, and one in use makes it exit with a status
of its own. The base the cluster got travels on in its spec (saved, shown).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import msgspec
import structlog

from registry_node import tiers
from registry_node.cache_rules import CACHE_RULE, CREDENTIAL_SET
from registry_node.configuration import check_name, kind_of
from registry_node.configuration_key import ConfigurationKey
from registry_node.errors import RegistryError
from registry_node.identities import SCOPE_MAP, TOKEN
from registry_node.tasks import TASK
from registry_node.webhooks import WEBHOOK
from replicator.topology import ReplicationSettings

from ..faults.controller import FaultController
from ..faults.verify import NodeTarget, VerifyReport, down_reason, verify
from ..routing.endpoints import Endpoints
from . import sku as skus
from . import spec as specs
from . import usage as usages
from .access import (
    ClusterSecrets,
    configuration_key,
    endpoint_certificate,
    open_ca,
    provision,
    provision_node,
)
from .cache import RegistryCache
from .containerfile import task_context
from .errors import (
    ClusterError,
    Conflict,
    ControlPlaneUnavailable,
    NodeRefusal,
    NotFound,
    PortInUse,
)
from .hosts import NodeHost
from .identities import ACCESS_KINDS, RegistryAccess
from .lifecycle import RETENTION_FIELDS, RegistryLifecycle, purge_as_client
from .plan import ClusterPlan, plan
from .schedules import Scheduler
from .state import save_spec, saved_spec
from .supervisor import NodeRuntime, Supervisor
from .tls import ClusterTls
from .webhooks import RegistryWebhooks, delivering_node, masked

log = structlog.get_logger("georeg.cluster")

RegistryChanges = Callable[[str, dict], Awaitable[dict | None]]
"""``changes(home, current)`` of ``Cluster.update_registry_object``: the fields
of the registry object to set, or None to write nothing."""

# Fields of the registry object its own commands write (credential renew, --sku,
# retention update, soft-delete update): a generic write of the object
# (``Cluster.set_configuration``) refuses them and keeps their values.
KEPT_REGISTRY_FIELDS = ("admin_passwords", "sku", *RETENTION_FIELDS, "soft_delete")


@dataclass(frozen=True, slots=True)
class Endpoint:
    kind: str      # global | regional
    region: str
    url: str


# Ranges tried for a spec that leaves its ports open before giving up.
PORT_BASE_ATTEMPTS = 12
# Where such ranges start: well above the well-known ports (and above the
# 10000-19999 the tests' process harness hands out), below the kernel's
# ephemeral ones, which any outgoing connection may take while a node is down
# between a crash and its restart.
ANY_PORTS_FROM = 20000

# How long the control plane waits for a home node to answer through its
# management link before counting it unreachable (a cut link refuses at once;
# this bounds a stalled or hung one).
CONTROL_PLANE_PROBE_S = 2.0


@dataclass
class ReplicaProgress:
    """A replica's sync state, as ACR shows it: Creating → Syncing → Ready,
    and Ready → Syncing when a node that was down is back but has not caught
    up with what it missed (``missed``), Ready again once it has. Transitions
    happen only in ``Cluster._update_progress``. Whether nodes are down right
    now is no state here: the supervisor knows, and ``_display`` reads it."""

    state: str = "Creating"
    images_done: int = 0
    images_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    created_at: float = 0.0
    missed: set[str] = field(default_factory=set)   # nodes down since the replica was last in sync
    shown: tuple[str, str] = ("", "")              # (displayStatus, message) last reported
    shown_since: float = 0.0                        # when displayStatus last changed (ACR's timestamp)


class Cluster:
    def __init__(self, spec: specs.ClusterSpec, data_dir: Path, *,
                 settings: ReplicationSettings | None = None,
                 routing: bool = True,
                 node_args: tuple[str, ...] = (),
                 node_env: Mapping[str, str] | None = None,
                 hosts: Mapping[str, NodeHost] | None = None) -> None:
        # The seed is decided here once, if the spec left it open, and travels
        # in the spec from now on: into the plan, the saved spec (a resumed
        # cluster replays it) and the status.
        self.spec = spec = spec.seeded()
        self.data_dir = data_dir.resolve()
        # The spec's [replication] table, unless the caller gives settings outright.
        self.settings = settings or spec.replication.settings()
        self.plan: ClusterPlan = plan(spec, self.data_dir)
        # ``node_env``: for test harnesses only, never from a spec or the CLI
        # (cluster.control.supervisor.node_environment). ``hosts``: by address,
        # where the nodes the spec's [network.hosts] places run (cluster.control.hosts).
        self.supervisor = Supervisor(self.plan, settings=self.settings, extra_node_args=node_args,
                                     node_env=node_env, hosts=hosts)
        self.routing_enabled = routing
        self.routing: Endpoints | None = None      # when routing is on
        self.progress: dict[str, ReplicaProgress] = {}
        self.restoring: set[str] = set()   # regions whose nodes peer with their paired copy
        self.faults = FaultController(self)
        # With auth: the cluster's own credentials, made at first start
        # (cluster.control.access).
        self.secrets: ClusterSecrets | None = None
        # Seals webhook header values (cluster.control.access; made at first start).
        self.configuration_key: ConfigurationKey | None = None
        # With TLS: what the endpoints serve with and reach nodes with, and what
        # this process's own requests to nodes trust (cluster.control.tls).
        self.tls: ClusterTls | None = ClusterTls() if spec.tls else None
        self._http: aiohttp.ClientSession | None = None   # requests over management links
        self.started_at = 0.0
        # Seconds from the start to every node healthy, and to ready (subscribed
        # to every peer and writable, endpoints up); None until reached.
        self.healthy_after_s: float | None = None
        self.ready_after_s: float | None = None
        self._stopped = asyncio.Event()
        # Admin credentials, tokens, scope maps, identities, role assignments.
        self.access = RegistryAccess(registry=spec.registry, tier=lambda: self.tier,
                                     data_dir=self.data_dir, home=self._control_plane,
                                     reader=self._config_reader, call=self._node_call)
        # Webhooks: their configuration, and what their regions' nodes deliver.
        self.webhooks = RegistryWebhooks(
            tier=lambda: self.tier, home_region=lambda: self.spec.home_region,
            replica_regions=lambda: [r.region for r in self.spec.all_replicas],
            home=self._control_plane, reader=self._config_reader, call=self._node_call,
            deliverer=lambda region: delivering_node(self.plan, region, self.answers),
            forward=self._node_request, key=self._configuration_key)
        # Cache rules and credential sets (the pull-through cache's configuration).
        self.cache = RegistryCache(home=self._control_plane, reader=self._config_reader,
                                   call=self._node_call, key=self._configuration_key)
        # The retention policy for untagged manifests, and its sweeps (``run``,
        # from the start to the stop).
        self.lifecycle = RegistryLifecycle(
            update=self.update_registry_object, reader=self._config_reader,
            current=self._current_registry, plan=lambda: self.plan,
            regions=lambda: [r.region for r in self.spec.all_replicas],
            home_region=lambda: self.spec.home_region, tier=lambda: self.tier,
            answers=self.answers, request=self._node_request)
        # The spec's [[schedules]] (cluster.control.schedules), run from the start to the stop.
        self.schedules = Scheduler(spec.schedules, lambda request: purge_as_client(self, request),
                                   state_file=self.data_dir / "schedules.json")
        self._lifecycle_tasks: list[asyncio.Task] = []
        # A tier change and a new replica, one at a time (a replica needs
        # Premium; a move down needs no replica).
        self.tier_lock = asyncio.Lock()
        # The management API's port, bound (not listening: connections are
        # refused) from the start until a ManagementServer serves it.
        self._management_socket: socket.socket | None = None

    # -- lifecycle -------------------------------------------------------------------

    @classmethod
    async def start(cls, spec: specs.ClusterSpec | None = None, data_dir: Path | None = None,
                    *, port_bases: Iterable[int] | None = None, **options) -> Cluster:
        """Start a cluster. With ``port_base = 0`` in the spec, on the first of
        ``port_bases`` (default: random draws, ``any_port_bases``) whose ports
        are all free when bound; with a base given, on that one or not at all."""
        data_dir = Path(data_dir or (spec.network.data_dir if spec else ".georeg"))
        spec = spec or saved_spec(data_dir) or specs.load(None)
        if spec.network.port_base != specs.ANY_PORT_BASE:
            cluster = cls(spec, data_dir, **options)
            try:
                await cluster._start()
            except PortInUse as exc:
                layout = specs.port_layout(spec)
                raise PortInUse(f"{exc}; this cluster uses ports from network.port_base "
                                f"{layout.base} to {max(layout.all_ports())}: stop what holds it, "
                                f"or set another port_base (0: any free range)") from None
            return cluster
        spec = spec.seeded()               # one seed, whichever range the cluster gets
        bases = iter(port_bases) if port_bases is not None else any_port_bases(spec)
        refused: list[str] = []
        for base in bases:
            cluster = cls(spec.with_port_base(base), data_dir, **options)
            try:
                await cluster._start()
                return cluster
            except PortInUse as exc:
                log.info("cluster_ports_in_use", port_base=base, error=str(exc).splitlines()[0])
                refused.append(f"{base}: {str(exc).splitlines()[0]}")
                if len(refused) >= PORT_BASE_ATTEMPTS:
                    break
        raise PortInUse("no free range of ports for the cluster; tried port_base "
                        + "; ".join(refused))

    async def _start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.started_at = time.time()
        clock = time.monotonic()
        try:
            # This process's own sockets first: a port in use fails the start
            # before anything is written.
            try:
                self._management_socket = _reserve(*self.management_address)
                await self.supervisor.open_links()
                if self.routing_enabled:
                    self.routing = Endpoints(self)
                    await self.routing.start()
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(str(exc)) from None
                raise
            save_spec(self.data_dir, self.spec)
            self.secrets = await asyncio.get_running_loop().run_in_executor(
                None, provision, self.plan)
            self.configuration_key = await asyncio.get_running_loop().run_in_executor(
                None, configuration_key, self.plan)
            if self.tls is not None:
                served = await asyncio.get_running_loop().run_in_executor(
                    None, endpoint_certificate, self.plan)
                self.tls.load(served.ca_file, served.cert_file, served.key_file)
            self.supervisor.internal_headers = self.internal_headers()
            log.info("cluster_starting", seed=self.spec.seed, data_dir=str(self.data_dir),
                     port_base=self.spec.network.port_base)
            await self.supervisor.start()
            for replica in self.spec.all_replicas:
                self.progress.setdefault(replica.region, ReplicaProgress(created_at=time.time()))
            self.supervisor.on_health_change(self._on_node_health)
            await self.supervisor.wait_healthy()
            self.healthy_after_s = time.monotonic() - clock
            await self.wait_ready()
            self.ready_after_s = time.monotonic() - clock
            await self._tier_at_start()
            if self.spec.auth_enabled:
                await self._admin_user_everywhere()
            self._lifecycle_tasks = [
                asyncio.create_task(self.lifecycle.run(), name="retention"),
                asyncio.create_task(self.schedules.forever(), name="schedules")]
        except BaseException:
            await self.stop()
            raise

    def _configuration_key(self) -> ConfigurationKey:
        if self.configuration_key is None:
            raise ClusterError("the cluster has not started: its configuration key is made "
                               "at its start")
        return self.configuration_key

    async def _tier_at_start(self) -> None:
        """The registry's tier is registry configuration (``RegistryProperties.sku``,
        which every node holds): at a start the home node's value wins over the
        spec's (a tier changed with ``update_registry`` outlives the spec file);
        a registry that never recorded one records the spec's, unless that is
        what every node reads anyway (``tiers.DEFAULT_TIER``: no write, so a
        default cluster starts as it did). Such a registry has run as the
        default tier, so recording a lower one is a move down, checked as
        ``update_registry`` checks it (``sku.refusals``): refused, the start
        fails with the reasons and nothing is written. Home unreachable: the
        saved spec's tier holds until it returns."""
        async def recorded_tier(home: str, current: dict) -> dict | None:
            stored = current.get("sku") or ""
            if stored and stored != self.spec.tier:
                self._adopt_tier(stored)
            elif not stored and self.spec.tier != tiers.DEFAULT_TIER:
                state = await self._tier_state(
                    home, tiers.DEFAULT_TIER, self.spec.tier,
                    bool(current.get("anonymous_pull_enabled")))
                reasons = skus.refusals(tiers.DEFAULT_TIER, self.spec.tier, state)
                if reasons:
                    raise Conflict(
                        skus.refusal_message(tiers.DEFAULT_TIER, self.spec.tier, reasons)
                        + f" (the spec says tier = {self.spec.tier!r}; this registry "
                        f"recorded no tier, so it has run as {tiers.DEFAULT_TIER}: start "
                        f"it with that tier, then change it with `georeg registry update "
                        f"--sku`)")
                return {"name": self.spec.registry, "sku": self.spec.tier}
            return None

        try:
            await self.update_registry_object(recorded_tier)
        except ControlPlaneUnavailable as exc:       # a restart with home down
            log.warning("tier_not_checked", tier=self.spec.tier, error=str(exc))

    def _adopt_tier(self, tier: str, spec: specs.ClusterSpec | None = None) -> None:
        """The cluster's spec (and the saved one) with the registry's live tier
        (``spec``: that spec, validated already)."""
        spec = spec or self._spec_with_tier(tier)
        self.spec = spec
        self.plan = replace(self.plan, spec=spec)
        self.supervisor.plan = self.plan
        save_spec(self.data_dir, spec)
        # What the tier decides on each node (its request limits and blob
        # bandwidth: ``plan.view``) follows at once: every node reloads its view.
        self._write_views()
        log.info("tier", tier=tier)

    def _spec_with_tier(self, tier: str) -> specs.ClusterSpec:
        return specs.validate(msgspec.structs.replace(self.spec, tier=tier),
                              f"the registry's tier ({tier})")

    async def _admin_user_everywhere(self, timeout: float = 30.0) -> None:
        """At an auth cluster's first start, the admin user enabled through the
        home node (``RegistryAccess.enable_admin_at_first_start``; a restart
        changes nothing), and the start waits until every node holds it, so
        the credentials ``georeg up`` prints work on every node and endpoint."""
        try:
            if not await self.access.enable_admin_at_first_start():
                return
        except ControlPlaneUnavailable as exc:       # a restart with home down
            log.warning("admin_user_not_checked", error=str(exc))
            return
        home = await self._control_plane()
        written = (await self._node_call(home, "GET", "/registry/default"))["value"]
        deadline = time.monotonic() + timeout
        # The nodes that serve clients (paired-region copies are storage only).
        waiting = [n.name for n in self.plan.nodes
                   if not self.supervisor.nodes[n.name].intended_down]
        while waiting:
            for name in list(waiting):
                try:
                    held = (await self._node_call(name, "GET", "/registry/default"))["value"]
                except NodeRefusal:
                    continue
                if held.get("admin_passwords") == written["admin_passwords"]:
                    waiting.remove(name)
            if waiting and time.monotonic() > deadline:
                raise ClusterError(f"the admin user did not reach {', '.join(waiting)} within "
                                   f"{timeout:g}s")
            if waiting:
                await asyncio.sleep(0.05)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every node is healthy, subscribed to every peer, and writable."""
        deadline = time.monotonic() + timeout
        while True:
            await self.supervisor.wait_healthy(max(0.1, deadline - time.monotonic()))
            if all(_ready(n) for n in self.supervisor.nodes.values() if not n.intended_down):
                return
            if time.monotonic() > deadline:
                slow = [n.name for n in self.supervisor.nodes.values() if not _ready(n)]
                raise ClusterError(f"nodes not subscribed to their peers after {timeout:g}s: {slow}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        for task in self._lifecycle_tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._lifecycle_tasks = []
        if self._management_socket is not None:
            self._management_socket.close()
            self._management_socket = None
        await self.faults.close()
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self.routing is not None:
            await self.routing.stop()
            self.routing = None
        await self.supervisor.stop()
        self._stopped.set()

    def request_stop(self) -> None:
        """Ask ``serve_forever`` to return (management ``shutdown``, signals)."""
        self._stopped.set()

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- endpoints -------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.plan.host

    @property
    def management_address(self) -> tuple[str, int]:
        """Where the management API listens when one serves this cluster."""
        return self.host, self.plan.management_port

    def take_management_socket(self) -> socket.socket | None:
        """The management API's bound socket, for the one server that serves it."""
        sock, self._management_socket = self._management_socket, None
        return sock

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint(e.kind, e.region, f"{self.scheme}://{self.host}:{e.port}")
                for e in self.plan.endpoints]

    def global_endpoint(self, client_region: str) -> str:
        for e in self.endpoints():
            if e.kind == "global" and e.region == client_region:
                return e.url
        raise NotFound(f"no global endpoint for client location {client_region}; the spec's "
                       f"client_locations are {', '.join(self.spec.client_locations)}")

    def regional_endpoint(self, region: str) -> str:
        for e in self.endpoints():
            if e.kind == "regional" and e.region == region:
                return e.url
        raise NotFound(f"{region} has no replica")

    @property
    def scheme(self) -> str:
        """``https`` on a cluster with ``tls = true``: what every URL here says."""
        return self.plan.scheme

    @property
    def ca_file(self) -> Path | None:
        """The cluster CA's certificate, which a client trusts on a TLS cluster
        (None on a cluster that has no CA)."""
        return self.plan.ca_file if self.spec.needs_ca else None

    def node_url(self, name: str) -> str:
        node = self.plan.node(name)
        return f"{self.scheme}://{node.host}:{node.http_port}"

    def management_link_url(self, name: str) -> str:
        """A serving node's HTTP API as the management API reaches it: through the
        node's management link, so not while the node is cut off from the network
        (TLS passes through the link; the node's certificate names the host)."""
        return f"{self.scheme}://{self.plan.management_link(name).address}"

    def internal_headers(self) -> dict[str, str]:
        """What the cluster's own requests to its nodes carry: the internal
        credential on a cluster with auth (``registry_node.api.internal``)."""
        return self.secrets.internal_headers() if self.secrets is not None else {}

    def http(self) -> aiohttp.ClientSession:
        """The session for requests over management links. A fresh connection per
        request: a pooled one may belong to a link cut or a node restarted since.
        It carries the internal credential: the cluster itself is asking."""
        if self._http is None:
            tls = self.tls.client if self.tls is not None else True
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, ssl=tls),
                headers=self.internal_headers())
        return self._http

    def nodes(self) -> dict[str, NodeRuntime]:
        return self.supervisor.nodes

    # -- status ----------------------------------------------------------------------

    def replica_specs(self) -> dict[str, specs.ReplicaSpec]:
        return {r.region: r for r in self.spec.all_replicas}

    def _update_progress(self) -> None:
        """Every replica's sync state and progress (see ``ReplicaProgress``),
        against the content its region may hold (residency) as the other
        replicas report it. A replica in sync stays Ready while ordinary
        replication runs a few events behind; only a node that missed time
        (down, or not yet up since creation) makes it Syncing."""
        policy = self.spec.residency_policy()
        nodes = self.supervisor.nodes
        for region, progress in self.progress.items():
            mine = [n for n in nodes.values() if n.plan.region == region and not n.plan.copy_of]
            if not mine:
                continue
            down = {n.name for n in mine if not n.healthy}
            if progress.state == "Creating" and down:
                self._show(progress, mine)
                continue
            expected: dict[str, dict[str, int]] = {}
            for other in nodes.values():
                for origin, counts in (other.info.get("content") or {}).items():
                    if not policy.allows(origin, "", region):
                        continue
                    best = expected.setdefault(origin, {"images": 0, "bytes": 0})
                    best["images"] = max(best["images"], counts["images"])
                    best["bytes"] = max(best["bytes"], counts["bytes"])
            live = [n for n in mine if n.healthy]
            have = [n.info.get("content") or {} for n in live]
            done_images = min((sum(c.get(o, {}).get("images", 0) for o in expected) for c in have),
                              default=0)
            done_bytes = min((sum(c.get(o, {}).get("bytes", 0) for o in expected) for c in have),
                             default=0)
            progress.images_total = sum(e["images"] for e in expected.values())
            progress.bytes_total = sum(e["bytes"] for e in expected.values())
            progress.images_done = min(done_images, progress.images_total)
            progress.bytes_done = min(done_bytes, progress.bytes_total)
            progress.missed |= down
            in_sync = (bool(live) and all(_caught_up(n, nodes) for n in live)
                       and progress.images_done >= progress.images_total)
            if in_sync:
                progress.missed &= down          # those back have caught up
                progress.state = "Ready"
            elif progress.state != "Ready" or progress.missed - down:
                progress.state = "Syncing"
            self._show(progress, mine)

    @staticmethod
    def _show(progress: ReplicaProgress, nodes: list[NodeRuntime]) -> None:
        shown = _display(progress, nodes)
        if shown[0] != progress.shown[0]:
            progress.shown_since = time.time()
        progress.shown = shown

    def _on_node_health(self, node: NodeRuntime) -> None:
        """A node changed health: a replica's status follows at once, so that a
        node down and back between two looks at the status is still known to
        have missed what was pushed meanwhile."""
        self._update_progress()

    def status(self) -> dict:
        self._update_progress()
        replicas = self.replica_specs()
        routing = self.routing.routing_flags() if self.routing else {}
        nodes = []
        for node in self.supervisor.nodes.values():
            if node.plan.copy_of:
                continue
            info = node.info
            peers = info.get("peers", [])
            nodes.append({
                "name": node.name, "region": node.plan.region, "zone": node.plan.zone,
                "http": node.url, "data_dir": str(node.plan.data_dir), "pid": node.pid,
                "host": node.plan.own_host,
                "health": node.state,
                "healthy": node.healthy, "reason": node.reason or None,
                "routing": routing.get(node.plan.region, replicas[node.plan.region].global_routing),
                "writable": info.get("writable"),
                "replication": {
                    "peers_connected": sum(1 for p in peers if p["connected"]),
                    "peers": len(peers),
                    "behind_events": max((p["behind_events"] for p in peers), default=0),
                },
                "storage_bytes": sum(c["bytes"] for c in (info.get("content") or {}).values()),
                "images": sum(c["images"] for c in (info.get("content") or {}).values()),
                "throttle": info.get("throttle"),
            })
        return {
            "registry": self.spec.registry,
            "tier": self.spec.tier,
            "auth": self.spec.auth,
            "tls": self.spec.tls,
            "ca_file": str(self.ca_file) if self.ca_file is not None else None,
            "login_server": self.spec.login_server if self.spec.auth_enabled else None,
            "admin_username": self.spec.registry if self.spec.auth_enabled else None,
            "home_region": self.spec.home_region,
            "blob_downloads": self.spec.blob_downloads,
            "seed": self.spec.seed,
            "startup_s": {"healthy": self.healthy_after_s, "ready": self.ready_after_s},
            "data_dir": str(self.data_dir),
            "replicas": [self.replica_status(r.region) for r in self.spec.all_replicas],
            "nodes": nodes,
            "paired_copies": [{
                "name": n.name, "keeps": n.plan.copy_of, "region": n.plan.region,
                "data_dir": str(n.plan.data_dir), "host": n.plan.own_host,
                "health": n.state, "healthy": n.healthy, "http": n.url,
                "images": sum(c["images"] for c in (n.info.get("content") or {}).values()),
            } for n in self.supervisor.nodes.values() if n.plan.copy_of],
            "global_endpoints": {e.region: e.url for e in self.endpoints() if e.kind == "global"},
            "regional_endpoints": {e.region: e.url for e in self.endpoints() if e.kind == "regional"},
            "residency": msgspec.to_builtins(self.spec.residency_policy()),
            "endpoint_traffic": self.routing.stats() if self.routing else {},
            "throttling": self.throttling(nodes),
        }

    def throttling(self, nodes: list[dict]) -> dict:
        """Request throttling per replica: the spec's limits (None: off), the
        throttling faults on it, and what its nodes refused since they
        started, by kind and by identity, as the nodes last reported it."""
        limits = self.spec.limits.request_limits(self.tier)
        out = {}
        for replica in self.spec.all_replicas:
            refused: dict[str, int] = {}
            by_identity: dict[str, dict[str, int]] = {}
            fault: dict[str, float] = {}
            for node in nodes:
                state = node.get("throttle") if node["region"] == replica.region else None
                if not state:
                    continue
                for kind, count in state["refused"].items():
                    refused[kind] = refused.get(kind, 0) + count
                for identity, counts in state["refused_by_identity"].items():
                    mine = by_identity.setdefault(identity, {})
                    for kind, count in counts.items():
                        mine[kind] = mine.get(kind, 0) + count
                fault = state["fault"] or fault
            out[replica.region] = {
                "limits": None if limits is None else limits.per_minute(),
                "per_identity_fraction": None if limits is None else limits.per_identity_fraction,
                "fault": fault, "refused": refused, "refused_by_identity": by_identity}
        return out

    def replica_status(self, region: str) -> dict:
        self._update_progress()
        replica = self.replica_specs().get(region)
        if replica is None:
            raise NotFound(f"{region} has no replica; `georeg replication list` shows them")
        progress = self.progress.get(region) or ReplicaProgress()
        routing = self.routing.routing_flags() if self.routing else {}
        nodes = [n for n in self.supervisor.nodes.values()
                 if n.plan.region == region and not n.plan.copy_of]
        shown, message = progress.shown if progress.shown[0] else _display(progress, nodes)
        return {
            "name": region, "location": region,
            "home": region == self.spec.home_region,
            # The replica exists: an outage is no failed provisioning (ACR keeps
            # Succeeded and tells the outage in the status).
            "provisioningState": "Succeeded",
            "status": {"displayStatus": shown, "message": message,
                       "timestamp": progress.shown_since or progress.created_at},
            "regionEndpointEnabled": routing.get(region, replica.global_routing),
            "zoneRedundancy": "Enabled" if replica.zone_redundant else "Disabled",
            "sync": {"images": [progress.images_done, progress.images_total],
                     "bytes": [progress.bytes_done, progress.bytes_total]},
            "nodes": [n.name for n in nodes],
        }

    # -- verification ------------------------------------------------------------------

    def verify_targets(self) -> list[NodeTarget]:
        """Every node (paired-region copies included) as ``georeg verify`` checks it."""
        # A node on a host of its own is checked over the network only: its data
        # dir is on that host, which this process never reads.
        return [NodeTarget(n.name, n.plan.region, n.url, n.plan.zone,
                           None if n.plan.own_host else n.plan.data_dir, n.healthy,
                           "" if n.healthy else down_reason(n.state, n.reason), n.plan.copy_of)
                for n in self.supervisor.nodes.values()]

    async def verify(self, timeout: float = 60.0, disk: bool = True,
                     scrub: bool = False) -> VerifyReport:
        """``georeg verify`` on this cluster (see ``cluster.faults.verify``)."""
        return await verify(self.verify_targets(), policy=self.spec.residency_policy(),
                            timeout=timeout, disk=disk, headers=self.internal_headers(),
                            tls=self.tls.client if self.tls is not None else None, scrub=scrub)

    # -- management -------------------------------------------------------------------

    async def answers(self, name: str, timeout: float = CONTROL_PLANE_PROBE_S) -> bool:
        """Whether a serving node answers over the network: ``GET /georeg/v1/node``
        through its management link. False when the node is down, hung, or cut
        off (an isolation cuts the link: it refuses the connection at once)."""
        try:
            async with self.http().get(f"{self.management_link_url(name)}/georeg/v1/node",
                                       timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def control_plane(self) -> str:
        """The name of a home node that answers, or ``ControlPlaneUnavailable``:
        what a registry operation beyond configuration (an import) asks first."""
        return await self._control_plane()

    async def _control_plane(self) -> str:
        """The home region holds the control plane: a configuration change goes
        ahead only if some home node answers over the network; returns the name
        of the first that did. Asked of the
        network rather than of the supervisor's health (which sees the processes)
        or of the fault controller's records (which know only the faults it
        injected), so that whatever cuts the home region off, now or later, a
        crash, an isolation or a link fault, stops configuration as it would in
        Azure."""
        names = {asyncio.ensure_future(self.answers(n.name)): n.name
                 for n in self.plan.nodes_in(self.spec.home_region)}
        probes = set(names)
        try:
            while probes:
                done, probes = await asyncio.wait(probes, return_when=asyncio.FIRST_COMPLETED)
                for probe in done:
                    if probe.result():
                        return names[probe]
        finally:
            for probe in probes:         # one home node answered: the rest need not
                probe.cancel()
        raise ControlPlaneUnavailable(
            f"the home region {self.spec.home_region} holds the control plane and cannot be "
            "reached (down, or cut off from the network); configuration changes are unavailable "
            "until it returns. Pushes, pulls and deletes keep working through the other replicas")

    # -- registry configuration (registry_node.configuration) ---------------------------

    async def _node_call(self, name: str, method: str, path: str,
                         body: dict | None = None) -> dict:
        """One request to a node's configuration routes (``path`` below
        ``/georeg/v1/configuration``); see ``_node_request``."""
        return await self._node_request(name, method, f"/georeg/v1/configuration{path}", body)

    async def _node_request(self, name: str, method: str, path: str,
                            body: dict | None = None) -> dict:
        """One request to a node's own route, over its management link
        (``ask_node``)."""
        return await ask_node(self.http(), name, f"{self.management_link_url(name)}{path}",
                              method, body)

    @staticmethod
    def _object_path(kind: str, name: str | None = None) -> str:
        """``/{kind}[/{name}]`` of a node's configuration routes, checked first:
        a name such as ``../x`` must be refused here, not resolved by the URL
        into another route of the node."""
        try:
            spec = kind_of(kind)
            path = "/" + urllib.parse.quote(spec.name, safe="")
            if name is not None:
                path += "/" + urllib.parse.quote(check_name(spec, name), safe="")
        except RegistryError as exc:
            raise NodeRefusal(f"{exc.message}: {exc.detail}", exc.status,
                              "NotFound" if exc.status == 404 else "BadRequest") from None
        return path

    async def _config_reader(self) -> str:
        """A node to read configuration from: a home node if one answers, else
        any node that does (every node holds the configuration)."""
        try:
            return await self._control_plane()
        except ControlPlaneUnavailable:
            for node in self.plan.nodes:
                if await self.answers(node.name):
                    return node.name
            raise ClusterError("no node of the cluster answers") from None

    async def list_configuration(self, kind: str) -> list[dict]:
        """Live objects of one kind (``registry_node.configuration.KINDS``);
        a webhook's header values show as ``***`` (``webhooks.get_config``
        is the one read that shows them)."""
        path = self._object_path(kind)
        answer = await self._node_call(await self._config_reader(), "GET", path)
        return [_shown(o) for o in answer["objects"] if not o["deleted"]]

    async def get_configuration(self, kind: str, name: str) -> dict:
        path = self._object_path(kind, name)
        return _shown(await self._node_call(await self._config_reader(), "GET", path))

    async def set_configuration(self, kind: str, name: str, value: dict) -> dict:
        """Write an object through the home region (validated there, stamped,
        replicated to every node); ``ControlPlaneUnavailable`` while it is down.
        Identities have their own commands (``access``), which generate their
        secrets and check what they refer to, and so do webhooks (``webhooks``),
        which check their region and the tier's limit; the registry object's name and
        the fields its own commands write (``KEPT_REGISTRY_FIELDS``) are the control
        plane's and keep their values."""
        path = self._object_path(kind, name)
        self._written_by_its_commands(kind)
        if kind == TASK:
            # A task's context is read by the supervisor: the same check as
            # `georeg task create`, whoever writes it (it is made again at each run).
            task_context(str(value.get("context", "")) if isinstance(value, dict) else "",
                         self.spec.tasks.context_roots, self.data_dir)
        if kind != "registry":
            return await self._node_call(await self._control_plane(), "PUT", path, value)
        owned = sorted({"name", *KEPT_REGISTRY_FIELDS} & set(value))
        if owned:
            raise ClusterError(f"{', '.join(owned)}: set by the control plane (use `georeg "
                               "credential renew` for the admin passwords, `georeg registry "
                               "update --sku` for the tier, `georeg registry retention update` "
                               "for the retention policy, `georeg registry soft-delete update` "
                               "for soft delete)")
        async with self.access.lock:
            home = await self._control_plane()
            current = await self._current_registry(home)
            return await self._node_call(home, "PUT", path, {
                **value, "name": self.spec.registry,
                **{f: current[f] for f in KEPT_REGISTRY_FIELDS if f in current}})

    async def delete_configuration(self, kind: str, name: str) -> dict:
        path = self._object_path(kind, name)
        self._written_by_its_commands(kind)
        return await self._node_call(await self._control_plane(), "DELETE", path)

    @staticmethod
    def _written_by_its_commands(kind: str) -> None:
        if kind in (CACHE_RULE, CREDENTIAL_SET):
            raise ClusterError(f"{kind} objects are written by `georeg cache|credential-set "
                               "create|delete` (or Cluster.cache), which check overlaps, the "
                               "limit of rules and seal passwords")
        if kind == WEBHOOK:
            raise ClusterError("webhooks are written by `georeg webhook create|update|delete` "
                               "(or Cluster.webhooks), which check their region and the "
                               "tier's limit")
        if kind in ACCESS_KINDS:
            command = {"role-assignment": "role assignment"}.get(kind, kind)
            raise ClusterError(f"{kind} objects are written by `georeg {command} create|update|"
                               "delete` (or Cluster.access), which check them and generate "
                               "their secrets")

    async def _current_registry(self, home: str) -> dict:
        try:
            return (await self._node_call(home, "GET", "/registry/default"))["value"]
        except NodeRefusal as exc:
            if exc.status != 404:
                raise
            return {}

    async def registry_object(self) -> dict:
        """The registry object (``registry/default``: its switches, tier and
        policies, ``RegistryProperties``) as the home region holds it; ``{}``
        if it was never written."""
        return await self._current_registry(await self._control_plane())

    async def update_registry_object(self, changes: RegistryChanges,
                                     then: Callable[[dict], None] | None = None) -> dict:
        """Change fields of the registry object through the home region (every
        node holds it) — the one read-modify-write of it, so that no two
        changes (the tier, the admin user, a policy) overwrite each other: the
        tier's, access's and webhooks' locks are held throughout (whatever is
        counted against the tier is created under one of them).

        ``changes(home, current)`` returns the fields to set (the rest keep
        their values), or None to write nothing; it may await checks and raise
        to refuse, and then nothing is written. ``then(written)`` runs after
        the write, still under the locks. Returns the object as written (or
        as it was, if nothing was)."""
        async with self.tier_lock, self.access.lock, self.webhooks.lock:
            home = await self._control_plane()
            current = await self._current_registry(home)
            changed = await changes(home, current)
            if changed is None:
                return current
            value = {**current, **changed}
            await self._node_call(home, "PUT", "/registry/default", value)
            if then is not None:
                then(value)
            return value

    @property
    def tier(self) -> str:
        """The registry's live tier: what the home region last recorded
        (``update_registry``), kept in the spec this control plane runs."""
        return self.spec.tier

    async def registry_properties(self) -> dict:
        """The registry resource, as ``az acr show`` shows it."""
        try:
            stored = (await self.get_configuration("registry", "default"))["value"]
        except NodeRefusal as exc:
            if exc.status != 404:
                raise
            stored = {}
        home = self.replica_specs()[self.spec.home_region]
        return {"name": self.spec.registry, "location": self.spec.home_region,
                "loginServer": self.spec.login_server,
                "sku": {"name": self.tier, "tier": self.tier},
                "provisioningState": "Succeeded",
                "adminUserEnabled": bool(stored.get("admin_enabled", False)),
                "anonymousPullEnabled": bool(stored.get("anonymous_pull_enabled", False)),
                "zoneRedundancy": "Enabled" if home.zone_redundant else "Disabled"}

    async def update_registry(self, *, admin_enabled: bool | None = None,
                              anonymous_pull_enabled: bool | None = None,
                              sku: str | None = None) -> dict:
        """``az acr update --admin-enabled / --anonymous-pull-enabled / --sku``:
        what is given changes, the rest keeps its value; the admin user gets its
        two passwords the first time it is enabled (``access``). A new tier is
        written through the home region (every node holds it) and is live at
        once: Basic → Premium allows replicas without a restart. A move the
        registry's state forbids (``sku.refusals``) is a ``Conflict`` that names
        every reason; nothing changes then."""
        target = None
        if sku is not None:
            target = tiers.canonical(sku)
            if target is None:
                raise ClusterError(f"sku {sku[:32]!r} is not one of {', '.join(tiers.TIERS)}")
        # Whatever is counted against the tier is created under one of the
        # locks ``update_registry_object`` holds (replicas under the tier's):
        # the check and the change cannot interleave with one.
        new_spec = None

        async def switched(home: str, current: dict) -> dict:
            nonlocal new_spec
            tier = target or self.tier
            anonymous = anonymous_pull_enabled if anonymous_pull_enabled is not None \
                else bool(current.get("anonymous_pull_enabled"))
            if (target is None or target == self.tier) and anonymous_pull_enabled \
                    and not tiers.limits(tier).anonymous_pull:
                raise ClusterError(f"anonymous pull needs the Standard or Premium tier; this "
                                   f"registry is {tier}")
            if target is not None and target != self.tier:
                state = await self._tier_state(home, self.tier, target, anonymous)
                reasons = skus.refusals(self.tier, target, state)
                if reasons:
                    raise Conflict(skus.refusal_message(self.tier, target, reasons))
                new_spec = self._spec_with_tier(target)    # checked before anything is written
            value = self.access.registry_value(current, admin_enabled=admin_enabled,
                                               anonymous_pull_enabled=anonymous_pull_enabled)
            if target is not None:
                value["sku"] = target
            return value

        def adopted(_written: dict) -> None:
            if new_spec is not None:
                self._adopt_tier(new_spec.tier, new_spec)

        await self.update_registry_object(switched, adopted)
        return await self.registry_properties()

    async def _tier_state(self, home: str, current: str, target: str,
                          anonymous_pull: bool) -> skus.TierState:
        """What the registry holds that ``target`` limits, as the home node
        holds it; its storage only where ``target`` allows less than the
        ``current`` tier and no replica refuses the move already (counting it
        asks every region, which need not all answer for a refusal)."""
        async def count(kind: str) -> int:
            answer = await self._node_call(home, "GET", self._object_path(kind))
            return sum(1 for o in answer["objects"] if not o["deleted"])

        webhooks, tokens, scope_maps, stored = await asyncio.gather(
            count(WEBHOOK), count(TOKEN), count(SCOPE_MAP), self._current_registry(home))
        shrinks = tiers.limits(target).maximum_storage < tiers.limits(current).maximum_storage
        storage = (await self.storage())["bytes"] if shrinks and not self.spec.replicas else 0
        return skus.TierState(
            geo_replicas=tuple(r.region for r in self.spec.replicas),
            zone_redundant=tuple(r.region for r in self.spec.all_replicas if r.zone_redundant),
            webhooks=webhooks, tokens=tokens, scope_maps=scope_maps, anonymous_pull=anonymous_pull,
            storage_bytes=storage, retention_enabled=bool(stored.get("retention_enabled")))

    async def storage(self) -> dict:
        """The registry's storage, counted once (``usage.registry_size``), and
        every serving node's: ``{"bytes", "rule", "nodes": {name: usage},
        "unavailable": {name: reason}}``."""
        nodes = self.plan.nodes
        answers = await asyncio.gather(
            *(usages.node_usage(self.http(), n.name, self.management_link_url(n.name))
              for n in nodes), return_exceptions=True)
        held, unavailable, by_region = {}, {}, {}
        for node, answer in zip(nodes, answers, strict=True):
            if isinstance(answer, NodeRefusal):
                unavailable[node.name] = str(answer)
                continue
            if isinstance(answer, BaseException):
                raise answer
            held[node.name] = {"region": node.region, "zone": node.zone, **answer}
            by_region.setdefault(node.region, usages.storage_of(answer))
        size, rule = usages.registry_size(self.spec.home_region,
                                          [r.region for r in self.spec.all_replicas], by_region,
                                          self.spec.residency_policy())
        return {"bytes": size, "rule": rule, "nodes": held, "unavailable": unavailable}

    async def usage(self) -> dict:
        """``az acr show-usage``: ACR's ``value[]`` and georeg's storage detail
        (``cluster.control.usage``)."""
        reader = await self._config_reader()

        async def count(kind: str) -> int:
            answer = await self._node_call(reader, "GET", self._object_path(kind))
            return sum(1 for o in answer["objects"] if not o["deleted"])

        storage, webhooks, tokens, scope_maps = await asyncio.gather(
            self.storage(), count(WEBHOOK), count(TOKEN), count(SCOPE_MAP))
        tier = self.tier
        return {
            "value": usages.usage_list(tier, storage["bytes"], webhooks, scope_maps, tokens,
                                       len(self.spec.all_replicas)),
            "storage": usages.storage_report(storage["bytes"], storage["rule"], tier,
                                             self.spec.limits.storage_limit_bytes),
            "replicas": storage["nodes"],
            "unavailable": storage["unavailable"],
        }

    async def create_replication(self, region: str, *, zone_redundant: bool = False,
                                 global_routing: bool = True) -> dict:
        async with self.tier_lock:       # never beside a tier change that checks the replicas
            return await self._create_replication(region, zone_redundant, global_routing)

    async def _create_replication(self, region: str, zone_redundant: bool,
                                  global_routing: bool) -> dict:
        await self._control_plane()
        new_spec = self.spec.with_replicas(
            (*self.spec.replicas, specs.ReplicaSpec(region, zone_redundant, global_routing)))
        new_spec = specs.validate(new_spec, f"replication create {region}")
        new_plan = plan(new_spec, self.data_dir)
        old_names = {n.name for n in self.plan.all_nodes}
        added = [n for n in new_plan.all_nodes if n.name not in old_names]
        self.progress[region] = ReplicaProgress(created_at=time.time())
        for link in (*new_plan.links, *new_plan.management_links):
            if (link.source, link.target) not in self.supervisor.links:
                await self.supervisor.add_link(link)
        if self.spec.needs_ca:
            ca = open_ca(new_plan)
            for node in added:
                provision_node(ca, new_plan, node)
        self.spec, self.plan = new_spec, new_plan
        self.supervisor.plan = new_plan
        for node in added:
            self.supervisor.nodes[node.name] = NodeRuntime(node)
        self._write_views()                               # peers learn of the newcomer
        save_spec(self.data_dir, new_spec)
        await asyncio.gather(*(self.supervisor.start_node(n.name) for n in added))
        if self.routing is not None:
            await self.routing.refresh()
        log.info("replication_created", region=region, nodes=[n.name for n in added])
        return self.replica_status(region)

    async def update_replication(self, region: str, *, global_routing: bool) -> dict:
        await self._control_plane()
        if region not in self.replica_specs():
            raise NotFound(f"{region} has no replica")
        if self.routing is not None:
            self.routing.set_routing(region, global_routing)
        replicas = tuple(specs.ReplicaSpec(r.region, r.zone_redundant, global_routing)
                         if r.region == region else r for r in self.spec.replicas)
        if region == self.spec.home_region:
            self.spec = msgspec.structs.replace(self.spec, home_global_routing=global_routing)
        else:
            self.spec = self.spec.with_replicas(replicas)
        save_spec(self.data_dir, self.spec)
        return self.replica_status(region)

    def _write_views(self) -> None:
        for node in self.plan.all_nodes:
            view = self.plan.view(node, self.settings,
                                  with_pair_copy=node.region in self.restoring and not node.copy_of)
            self.supervisor.put_view(node, view)

    async def restore_region(self, region: str, timeout: float = 300.0) -> dict:
        """Rebuild a region from its paired-region copy (and every other replica):
        its nodes peer with the copy until they hold all it holds. A confined
        region has no copy; what reached no other replica is gone, and the
        answer says so."""
        await self._control_plane()
        if region not in self.replica_specs():
            raise NotFound(f"{region} has no replica")
        members = [self.supervisor.nodes[n.name] for n in self.plan.nodes_in(region)]
        await asyncio.gather(*(self.supervisor.start_node(n.name) for n in members if n.pid is None))
        pair = self.plan.pair_copy(region)
        before = min(_images(n) for n in members)
        if pair is None:
            await self.wait_ready(timeout)
            after = min(_images(n) for n in members)
            return {"region": region, "paired_copy": None, "images_before": before,
                    "images_after": after,
                    "message": f"{region} keeps its data in the region (Azure gives it no "
                               f"paired-region copy): content that had reached no other replica "
                               f"is lost. {region} re-synced what the other replicas hold "
                               f"({after} images)."}
        self.restoring.add(region)
        self._write_views()
        deadline = time.monotonic() + timeout
        try:
            copy = self.supervisor.nodes[pair.name]
            while True:
                await asyncio.sleep(0.2)
                done = all(_caught_up_with(n, pair.name) for n in members)
                if done and all(_images(n) >= _images(copy) for n in members):
                    break
                if time.monotonic() > deadline:
                    raise ClusterError(f"{region} did not catch up with its paired copy in "
                                       f"{timeout:g}s")
        finally:
            self.restoring.discard(region)
            self._write_views()
        after = min(_images(n) for n in members)
        return {"region": region, "paired_copy": pair.name, "pair_region": pair.region,
                "images_before": before, "images_after": after,
                "message": f"{region} restored from its copy in {pair.region}: "
                           f"{after} images (had {before})."}

    async def delete_replication(self, region: str) -> None:
        await self._control_plane()
        if region == self.spec.home_region:
            raise ClusterError(f"{region} is the home region; the home replica cannot be deleted")
        if region not in self.replica_specs():
            raise NotFound(f"{region} has no replica")
        gone = [n.name for n in self.plan.all_nodes if n.region == region or n.copy_of == region]
        new_spec = self.spec.with_replicas(tuple(r for r in self.spec.replicas if r.region != region))
        for name in gone:
            await self.supervisor.stop_node(name, graceful=True)
            del self.supervisor.nodes[name]
        for key in [k for k in self.supervisor.links if k[0] in gone or k[1] in gone]:
            await self.supervisor.links.pop(key).stop()
        for name in gone:  # a deleted replica's data goes with it, as in ACR
            self.supervisor.remove_data(name)
        self.plan = _without(self.plan, gone, new_spec)
        self.spec = new_spec
        self.supervisor.plan = self.plan
        self._write_views()
        self.progress.pop(region, None)
        save_spec(self.data_dir, new_spec)
        if self.routing is not None:
            await self.routing.refresh()


def _without(current: ClusterPlan, gone: list[str], spec: specs.ClusterSpec) -> ClusterPlan:
    return replace(current, spec=spec,
                   nodes=tuple(n for n in current.nodes if n.name not in gone),
                   pair_copies=tuple(n for n in current.pair_copies if n.name not in gone),
                   links=tuple(link for link in current.links
                               if link.source not in gone and link.target not in gone),
                   management_links=tuple(link for link in current.management_links
                                          if link.target not in gone),
                   endpoints=tuple(e for e in current.endpoints
                                   if not (e.kind == "regional" and e.region not in
                                           {r.region for r in spec.all_replicas})))


async def ask_node(http: aiohttp.ClientSession, name: str, url: str, method: str,
                   body: dict | None = None) -> dict:
    """One request to node ``name`` at ``url`` and its JSON answer; a refusal
    becomes a ``NodeRefusal`` with the node's reason and status, no answer a
    503 ``NodeUnavailable``."""
    try:
        async with http.request(method, url, json=body,
                                timeout=aiohttp.ClientTimeout(total=30)) as r:
            answer = await r.json(content_type=None)
            if r.status < 400:
                return answer
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        raise NodeRefusal(f"{name} did not answer: {exc}", 503, "NodeUnavailable") from None
    error = (answer.get("errors") or [{}])[0] if isinstance(answer, dict) else {}
    detail = error.get("detail")
    reason = detail.get("reason") if isinstance(detail, dict) else detail
    message = error.get("message", f"HTTP {r.status}") + (f": {reason}" if reason else "")
    code = {400: "BadRequest", 404: "NotFound", 413: "BadRequest"}.get(
        r.status, error.get("code", "Unavailable"))
    raise NodeRefusal(message, r.status, code)


def _shown(stored: dict) -> dict:
    """A stored configuration object as a read outside ``get-config`` may show it."""
    if stored.get("kind") == WEBHOOK and isinstance(stored.get("value"), dict):
        return {**stored, "value": masked(stored["value"])}
    if stored.get("kind") == CREDENTIAL_SET and isinstance(stored.get("value"), dict):
        return {**stored, "value": {**stored["value"], "password": "***"}}
    return stored


def _images(node: NodeRuntime) -> int:
    return sum(c["images"] for c in (node.info.get("content") or {}).values())


def _caught_up_with(node: NodeRuntime, peer: str) -> bool:
    return any(p["name"] == peer and p["connected"] and p["behind_events"] == 0
               for p in node.info.get("peers", []))


def _ready(node: NodeRuntime) -> bool:
    info = node.info
    return (node.healthy and bool(info.get("writable"))
            and all(p["connected"] for p in info.get("peers", [])))


def _caught_up(node: NodeRuntime, nodes: dict[str, NodeRuntime]) -> bool:
    """Writable, and subscribed to and level with every peer that is up (a peer
    that is down has nothing to send until it returns)."""
    if not (node.healthy and node.info.get("writable")):
        return False
    for peer in node.info.get("peers", []):
        other = nodes.get(peer["name"])
        if other is not None and not other.healthy:
            continue
        if not peer["connected"] or peer["behind_events"]:
            return False
    return True


def _display(progress: ReplicaProgress, nodes: list[NodeRuntime]) -> tuple[str, str]:
    """``(displayStatus, message)`` of a replica: its sync state, unless none of
    its nodes is up (Unavailable); zones that are down are named either way."""
    down = [n for n in nodes if not n.healthy]
    if progress.state == "Creating":
        return "Creating", "starting the replica's nodes"
    if nodes and len(down) == len(nodes):
        if len(nodes) == 1:
            return "Unavailable", f"replica is unavailable: its node is down ({down[0].state})"
        return "Unavailable", (f"replica is unavailable: {_zones([n.plan.zone for n in down])} "
                               f"of {len(nodes)} are down ({_states(down)})")
    message = _progress_message(progress)
    clocks = {n.name: n.info.get("clock") or {} for n in nodes if n.healthy}
    skewed = [name for name, clock in clocks.items() if clock.get("skewed")]
    if skewed:
        # The node's own verdict (registry_node.clock), not re-derived here.
        resume = [f"{name} in {clocks[name]['writes_resume_in_s']:.0f}s" for name in skewed
                  if clocks[name].get("writes_resume_in_s")]
        message = (f"clock skewed on {', '.join(skewed)}: writes refused there"
                   f"{' (they resume ' + ', '.join(resume) + ')' if resume else ''}, reads go "
                   f"on (`georeg fault list`, docs/faults.md); {message}")
    if down:
        zones = _zones([n.plan.zone for n in down])   # only a zone-redundant replica has some up
        # The nodes say whether they can reach a write quorum; not re-derived here.
        reads_only = "" if any(n.info.get("writable") for n in nodes if n.healthy) else \
            "; no write quorum: the replica serves reads only"
        message = (f"{zones} of {len(nodes)} unavailable ({_states(down)}){reads_only}; "
                   f"{message}")
    return progress.state, message


def _zones(zones: list[str]) -> str:
    if len(zones) == 1:
        return f"zone {zones[0]}"
    return f"zones {', '.join(zones[:-1])} and {zones[-1]}"


def _states(nodes: list[NodeRuntime]) -> str:
    states = sorted({n.state for n in nodes})
    return ", ".join(states)


def _progress_message(p: ReplicaProgress) -> str:
    if p.state == "Ready":
        return "replica is in sync"
    mib = 1024 * 1024
    return (f"syncing: {p.images_done}/{p.images_total} images, "
            f"{p.bytes_done / mib:.1f}/{p.bytes_total / mib:.1f} MiB")


def _reserve(host: str, port: int) -> socket.socket:
    """``host:port`` bound, not listening yet (``ManagementServer`` listens on it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"port {port} (management API) is in use"
                      if exc.errno == errno.EADDRINUSE else exc.strerror) from None
    return sock


def _ephemeral_ports() -> tuple[int, int]:
    with contextlib.suppress(OSError, ValueError):
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    return 32768, 60999        # Linux's default


def any_port_bases(spec: specs.ClusterSpec, rng: random.Random | None = None) -> Iterator[int]:
    """Port bases for a spec that leaves them open: random, so that clusters
    started at once (test workers, CI jobs on one machine) seldom meet, each
    with its whole range above ``ANY_PORTS_FROM`` and below the ephemeral
    ports (or, where those start too low, below the highest port)."""
    rng = rng or random.Random()
    layout = specs.port_layout(spec.with_port_base(1))
    span = max(p for p in layout.all_ports() if p != spec.network.management_port)
    low, _ = _ephemeral_ports()
    top = low - span if low - span > ANY_PORTS_FROM + 1000 else specs.MAX_PORT - span
    while True:
        yield rng.randrange(ANY_PORTS_FROM, top)
