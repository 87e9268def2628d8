"""Fault injection: break a running cluster the ways real regions break, and heal it.

Kinds (each optionally healing itself after a duration):

    region-outage REGION --mode crash|stop|isolate    every node of a region
    zone-outage REGION ZONE --mode crash|stop|isolate  one zone node
    partition A B [--one-way]                          links between two regions cut
    link A B --latency/--jitter/--bandwidth/--reset-prob/--stall
             --loss/--corrupt/--duplicate/--reorder [--seed]  lossy, per TCP segment
    routing REGION off                                 out of global routing, still syncing
    disk REGION[/ZONE] --full | --slow MS | --eio read|write [--prob P]
                                                       storage faults on nodes
    bitrot REGION[/ZONE] [--blobs N] [--seed S] [--digest D]
                                                       bytes flipped in stored blob files
    throttle REGION [--rate N/min] [--kind K]          429s past N requests a minute
    destroy REGION                                     data dirs wiped, restarted empty
    http ENDPOINT --status S|--reset|--truncate-body [--prob P] [--method M]
         [--path-regex RE] [--seed N]                  what clients meet at an endpoint
    clock NODE|REGION[/ZONE] --offset S | --drift R    the node's wall clock runs off
    pause REGION|REGION/ZONE|NODE [--stall-bodies]     SIGSTOP: open sockets, no answers
                                                       (or: only blob bodies stall)

Any fault but an act (``destroy``, ``bitrot``: done at once, nothing to
lift) may flap (``flap="ON_S/OFF_S"``, optional
``flap_jitter`` and ``flap_seed``; ``cluster.faults.flap``): applied at once, lifted after ON_S,
applied again after OFF_S, and so on until healed, which leaves it lifted.
A fault in its *off* phase is still listed (and active) but counts for
nothing: every composition below looks at faults *in effect* only. The flap
seed defaults to one drawn from the cluster's seed and the fault's number, so
a cluster started from the same seed flaps the same way.

A pause is a grey failure: the node's processes are stopped (SIGSTOP), their
sockets stay open and nothing answers. Routing notices only by its health
checks' timeouts (``cluster.control.supervisor``: two consecutive checks
without an answer) and moves clients then; healing sends SIGCONT and the node
catches up by itself. With ``stall_bodies`` nothing is stopped: the node
answers everything but holds blob bodies after their headers
(``registry_node.body_stall``), which no health check sees. See
docs/faults.md for the measured bounds. A stopped node is sent nothing
(``_put_node``): a throttling, disk or clock fault injected, healed or
flapped meanwhile is recorded and sent when it continues (``_continue``),
and bit rot is refused.

Routing faults compose per region: routing is off if any routing fault in
effect says off, on if one says on, else the operator's flag
(``georeg replication update``), recomputed at every change, so a flap's off
phase never turns routing back on under a steady routing-off fault.

Disk faults compose per node like throttling faults: each node gets what
all disk faults in effect on it add up to (full if any is; the largest delay;
EIO probabilities combined as independent failures; the newest seed), sent
again to a node the controller (re)starts. Bit rot is an act, not a standing
fault: it is healed at once, and what the node does about it (quarantine,
repair from a replica residency allows: ``registry_node.blob_repair``) is
the node's; ``georeg verify`` reports it.

Faults are applied only at the seams: node processes (signals), the WAN links
(``cluster.network.links``), the routing layer (routing flags, and HTTP
faults at the endpoints: ``cluster.routing.http_faults``), each node's storage fault seam,
and each node's throttle (``registry_node.throttle``).
Link faults compose: every link's effective fault is recomputed from all active
faults that touch it (cut if any cuts, latencies add, the lowest bandwidth
wins), so healing one fault never heals another. Throttling faults compose
the same way: each node gets, by kind, the lowest rate of the active ones on
its region (``PUT /georeg/v1/faults/throttle``, the whole map each time).

A throttling fault limits the region's replica as a whole (its zones share
it), all identities together, on top of any ``[limits]``: past ``rate``
requests a minute of ``kind`` (every kind unless one is named: read, write,
delete, referrers), clients get ``429 TOOMANYREQUESTS`` with ``Retry-After``,
as from ACR under load. Like a storage fault it lives in the node's memory,
so the controller sends it again to a node it (re)starts (healing an
outage, destroying a region) while the fault is active. A throttling fault
is applied on every node of the region or on none: if one node cannot take
it, the nodes that took it are told their rates without it again.

A clock fault skews one node's wall clock — every stamp it makes, its HLC's
physical part included — by an offset and/or a drift rate counted from the
fault's start (``PUT /georeg/v1/faults/clock``; ``registry_node.clock``). One
clock fault per node at a time. Like a storage fault it lives in the node's
memory and is sent again, with the same start, to a node the controller
(re)starts, so the clock picks up where it was. Healing sets the clock right;
what the node does about the stamps it made meanwhile is the node's.

``crash`` is SIGKILL; ``stop`` is SIGTERM (graceful); ``isolate`` keeps the
processes alive and cuts every link to and from them, and clients can no
longer reach them either (they leave routing and their regional endpoint
answers 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import structlog

from registry_node.clock import skew_problem
from registry_node.config import request_rate

from ..control.regions import REGIONS, unknown_region_message
from ..network.links import LinkFaults
from ..routing.http_faults import ACTIONS as HTTP_ACTIONS
from ..routing.http_faults import HttpFaultRule
from .flap import ON, Flap, FlapError

log = structlog.get_logger("georeg.faults")

KINDS = ("region-outage", "zone-outage", "partition", "link", "routing", "disk", "throttle",
         "destroy", "bitrot", "http", "clock", "pause")
OUTAGES = ("region-outage", "zone-outage")
ACTS = ("destroy", "bitrot")        # done at once, nothing left to heal: they cannot flap
_HEALTHY_DISK = {"full": False, "slow_ms": 0.0, "eio_read": 0.0, "eio_write": 0.0}
EIO_OPERATIONS = ("read", "write")
MODES = ("crash", "stop", "isolate")
# What a throttling fault may limit (registry_node.throttle.KINDS), and its default rate.
REQUEST_KINDS = ("read", "write", "delete", "referrers")
DEFAULT_THROTTLE_RATE = 60.0
# Kinds whose random draws take a seed (a scenario gives each step one of its own).
SEEDED_KINDS = ("link", "http")
_HTTP_RULE_FIELDS = ("action", "status", "probability", "method", "path_regex", "seed")
# The seams of a node's memory the controller sets (``PUT /georeg/v1/faults/<seam>``),
# what each fault is called in messages, and the state of a node no fault touches.
# Sent again to a node (re)started or continued in this order.
NODE_SEAMS = ("throttle", "storage", "clock")
_SEAM_FAULTS = {"throttle": "throttling fault", "storage": "storage fault",
                "clock": "clock fault", "stall": "body stall"}
_HEALTHY = {"throttle": {}, "storage": _HEALTHY_DISK, "clock": {}}
_SEAM_KINDS = ("throttle", "disk", "clock")     # the faults set at those seams
NODE_TIMEOUT_S = 10.0       # a node that has not answered a fault's PUT by then is unreachable


class FaultError(ValueError):
    """A fault that cannot be injected as asked; the message says why."""


@dataclass
class Fault:
    id: str
    kind: str
    target: dict
    description: str
    started_at: float
    duration_s: float | None = None
    healed_at: float | None = None
    nodes: list[str] = field(default_factory=list)          # nodes it acts on
    links: list[tuple[str, str]] = field(default_factory=list)
    link_faults: LinkFaults | None = None
    arguments: dict = field(default_factory=dict)          # as injected, to apply it again
    flap: Flap | None = None
    phase: str = ON                                        # off: lifted for now (flapping)
    phase_ends_at: float | None = None
    waiting: list[str] = field(default_factory=list)       # paused nodes not yet sent it
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def active(self) -> bool:
        return self.healed_at is None

    @property
    def in_effect(self) -> bool:
        """Active and not in a flap's off phase: what the cluster feels now."""
        return self.healed_at is None and self.phase == ON

    def as_dict(self) -> dict:
        return {
            "id": self.id, "kind": self.kind, "target": self.target,
            "description": self.description + (f"; {self.flap.describe()}" if self.flap else "")
            + (f"; takes effect on {', '.join(self.waiting)} when it continues (paused)"
               if self.waiting and self.in_effect else ""),
            "active": self.active,
            "started_at": self.started_at, "duration_s": self.duration_s,
            "heals_at": self.started_at + self.duration_s if self.duration_s else None,
            "healed_at": self.healed_at, "nodes": self.nodes,
            "flap": None if self.flap is None else {
                **self.flap.as_dict(), "phase": self.phase if self.active else None,
                "phase_ends_at": self.phase_ends_at if self.active else None},
        }


class FaultController:
    def __init__(self, cluster) -> None:  # cluster: cluster.control.cluster.Cluster
        self.cluster = cluster
        self.faults: dict[str, Fault] = {}
        self._ids = itertools.count(1)
        self._timers: dict[str, asyncio.Task] = {}
        self._flappers: dict[str, asyncio.Task] = {}
        self._stalled: set[str] = set()     # nodes told to stall blob bodies
        self._deferred: dict[str, set[str]] = {}  # paused node -> seams not sent it meanwhile
        self._session: aiohttp.ClientSession | None = None
        # Called after every change a fault makes (injected, healed, a flap's
        # phase), from wherever it came (the CLI, a page, a scenario, a timer):
        # what shows faults (the dashboard) looks again at once. Called on the
        # controller's loop, in the change: each must be quick; one that raises
        # is logged and skipped (``_settle``), never failing the change.
        self.watchers: list[Callable[[], None]] = []

    # -- helpers -----------------------------------------------------------------------

    def _nodes_in(self, region: str) -> list[str]:
        names = [n.name for n in self.cluster.plan.nodes if n.region == region]
        if not names:
            raise FaultError(f"{region} has no replica" + (
                "" if region in REGIONS else "; " + unknown_region_message(region)))
        return names

    def _node(self, region: str, zone: str) -> str:
        for node in self.cluster.plan.nodes:
            if node.region == region and node.zone == zone:
                return node.name
        zones = [n.zone for n in self.cluster.plan.nodes if n.region == region]
        if not zones:
            raise FaultError(f"{region} has no replica")
        if zones == [""]:
            raise FaultError(f"{region} is not zone redundant: name the region alone "
                             "(region-outage, or REGION without a zone)")
        raise FaultError(f"{region} has zones {', '.join(zones)}, not {zone!r}")

    def _targets(self, where: str, zone: str | None = None) -> list[str]:
        """REGION (every node of it), REGION with ZONE (``zone``, or ``where``
        as ``REGION/ZONE``), or one NODE by name."""
        if not zone:
            where, _, zone = where.partition("/")
        if zone:
            return [self._node(where, str(zone))]
        if any(n.name == where for n in self.cluster.plan.nodes):
            return [where]
        return self._nodes_in(where)

    def _one_node(self, where: str, zone: str | None = None, why: str = "") -> str:
        """As ``_targets``, for a fault that strikes one node: a zone-redundant
        region must be narrowed to one (``why``: said after the message)."""
        nodes = self._targets(where, zone)
        if len(nodes) > 1:
            raise FaultError(f"{where} is zone redundant: name one node ({', '.join(nodes)}) "
                             f"or a zone, e.g. {where}/1" + (f" ({why})" if why else ""))
        return nodes[0]

    def _links_between(self, a: list[str], b: list[str], both: bool = True) -> list[tuple[str, str]]:
        links = [(s, t) for s in a for t in b if (s, t) in self.cluster.supervisor.links]
        if both:
            links += [(t, s) for s in a for t in b if (t, s) in self.cluster.supervisor.links]
        return links

    def _links_touching(self, names: list[str]) -> list[tuple[str, str]]:
        return [key for key in self.cluster.supervisor.links if key[0] in names or key[1] in names]

    def _apply_links(self, keys: list[tuple[str, str]]) -> None:
        """Recompute each link's fault from every active fault that touches it."""
        for key in set(keys):
            link = self.cluster.supervisor.links.get(key)
            if link is None:
                continue
            combined = LinkFaults()
            for fault in self.faults.values():
                if fault.in_effect and key in fault.links and fault.link_faults is not None:
                    combined = _combine(combined, fault.link_faults)
            link.set_faults(combined)

    def _isolated_nodes(self) -> set[str]:
        return {n for f in self.faults.values()
                if f.in_effect and f.target.get("mode") == "isolate" for n in f.nodes}

    def _sync_routing(self) -> None:
        """Routing as the faults in effect say: isolated nodes unreachable, and
        each region a routing fault has touched routed per ``_routing_flag``."""
        routing = self.cluster.routing
        if routing is None:
            return
        routing.set_unreachable(self._isolated_nodes())
        flags = routing.routing_flags()
        for region in {f.target["region"] for f in self.faults.values() if f.kind == "routing"}:
            if flags.get(region) != (flag := self._routing_flag(region)):
                routing.set_routing(region, flag)

    async def _session_get(self) -> aiohttp.ClientSession:
        if self._session is None:
            tls = self.cluster.tls
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=NODE_TIMEOUT_S), headers=self.cluster.internal_headers(),
                connector=aiohttp.TCPConnector(ssl=tls.client if tls is not None else True))
        return self._session

    async def close(self) -> None:
        tasks = (*self._timers.values(), *self._flappers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)    # no change left half done
        if self._session is not None:
            await self._session.close()

    # -- injecting ---------------------------------------------------------------------

    async def inject(self, kind: str, *, duration_s: float | None = None,
                     flap: str | None = None, flap_jitter: float = 0.0,
                     flap_seed: int | None = None,
                     **target) -> Fault:
        if kind not in KINDS:
            raise FaultError(f"unknown fault kind {kind!r}; one of {', '.join(KINDS)}")
        if duration_s is not None and duration_s <= 0:
            raise FaultError("a duration must be positive (seconds)")
        number = next(self._ids)
        fault = Fault(f"f{number}", kind, target, "", time.time(), duration_s,
                      arguments=dict(target))
        if flap is not None:
            if kind in ACTS:
                raise FaultError(f"{kind} cannot flap: it has nothing to heal")
            try:
                fault.flap = Flap.parse(flap, flap_jitter, self._flap_seed(number)
                                        if flap_seed is None else flap_seed)
            except (FlapError, TypeError) as exc:
                raise FaultError(str(exc)) from None
        elif flap_jitter or flap_seed is not None:
            raise FaultError("flap_jitter and flap_seed shape a flap: give flap (ON_S/OFF_S) too")
        await self._apply(fault)
        self.faults[fault.id] = fault
        self._settle(fault)
        if duration_s:
            self._timers[fault.id] = asyncio.create_task(self._heal_later(fault.id, duration_s))
        if fault.flap is not None:
            self._flappers[fault.id] = asyncio.create_task(self._flap(fault),
                                                           name=f"flap:{fault.id}")
        log.info("fault_injected", id=fault.id, kind=kind, description=fault.description)
        return fault

    async def _apply(self, fault: Fault) -> None:
        """Put ``fault`` in effect (at injection, and at each flap's on phase)."""
        await getattr(self, "_inject_" + fault.kind.replace("-", "_"))(fault, **fault.arguments)
        if fault.kind in _SEAM_KINDS:       # sent when they continue (``_put_node``)
            fault.waiting = [n for n in fault.nodes if self._paused(n)]

    def _settle(self, fault: Fault) -> None:
        """The links and routing, recomputed after ``fault`` changed phase; the
        watchers told."""
        if fault.links:
            self._apply_links(fault.links)
        self._sync_routing()
        for watcher in list(self.watchers):
            try:
                watcher()
            except Exception as exc:    # noqa: BLE001 - what shows a fault never breaks one
                log.warning("fault_watcher_failed", id=fault.id, watcher=repr(watcher),
                            error=str(exc) or type(exc).__name__)

    def _flap_seed(self, number: int) -> int:
        """A flap's seed when none is given: from the cluster's seed and the
        fault's number, so a cluster started from one seed flaps alike."""
        return random.Random(f"{self.cluster.spec.seed}/f{number}").randrange(2**32)

    async def _flap(self, fault: Fault) -> None:
        """Walk ``fault.flap``'s schedule until the fault heals (which cancels
        this between phases, never within a change: see ``heal``)."""
        assert fault.flap is not None
        for phase, seconds in fault.flap.periods():
            if phase != fault.phase:
                async with fault.lock:
                    # The phase first: every composition counts faults in effect.
                    fault.phase = phase
                    try:
                        if phase == ON:
                            await self._apply(fault)
                        else:
                            await self._lift(fault)
                    except Exception as exc:    # noqa: BLE001 - a flap outlives any one change
                        # A lift that failed left the fault in effect (a node
                        # that did not restart is still down): say so, so that
                        # healing lifts it. An apply that failed may have half
                        # applied it: on, healing undoes what there is.
                        fault.phase = ON
                        log.warning("flap_change_failed", id=fault.id, phase=phase,
                                    error=str(exc) or type(exc).__name__)
                    self._settle(fault)
                log.info("fault_flapped", id=fault.id, phase=fault.phase)
            fault.phase_ends_at = time.time() + seconds
            await asyncio.sleep(seconds)

    async def _heal_later(self, fault_id: str, after: float) -> None:
        await asyncio.sleep(after)
        self._timers.pop(fault_id, None)
        with contextlib.suppress(KeyError, FaultError):
            await self.heal(fault_id)

    async def _outage(self, fault: Fault, nodes: list[str], mode: str) -> None:
        if mode not in MODES:
            raise FaultError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        fault.nodes = nodes
        if mode in ("crash", "stop"):
            await asyncio.gather(*(self.cluster.supervisor.stop_node(n, graceful=mode == "stop")
                                   for n in nodes))
        else:
            fault.links = self._links_touching(nodes)
            fault.link_faults = LinkFaults(cut_forward=True, cut_backward=True)

    async def _inject_region_outage(self, fault: Fault, region: str, mode: str = "crash") -> None:
        nodes = self._nodes_in(region)
        await self._outage(fault, nodes, mode)
        fault.description = f"{region} down ({mode}): {', '.join(nodes)}"

    async def _inject_zone_outage(self, fault: Fault, region: str, zone: str,
                                  mode: str = "crash") -> None:
        node = self._node(region, str(zone))
        await self._outage(fault, [node], mode)
        fault.description = f"{region} zone {zone} down ({mode}): {node}"

    async def _inject_partition(self, fault: Fault, a: str, b: str, one_way: bool = False) -> None:
        if a == b:
            raise FaultError("a partition needs two different regions")
        fault.links = self._links_between(self._nodes_in(a), self._nodes_in(b), both=not one_way)
        fault.link_faults = LinkFaults(cut_forward=True, cut_backward=True)
        arrow = "cannot reach" if one_way else "and"
        fault.description = f"partition: {a} {arrow} {b}" + ("" if one_way else " cut off from each other")

    async def _inject_link(self, fault: Fault, a: str, b: str, latency_ms: float = 0.0,
                           jitter_ms: float = 0.0, bandwidth_mbps: float = 0.0,
                           reset_probability: float = 0.0, stall: bool = False,
                           loss: float = 0.0, corrupt: float = 0.0, duplicate: float = 0.0,
                           reorder: bool = False, seed: int | None = None) -> None:
        lossy = {"reset probability": reset_probability, "loss": loss, "corrupt": corrupt,
                 "duplicate": duplicate}
        for name, p in lossy.items():
            if not isinstance(p, int | float) or not 0 <= p <= 1:
                raise FaultError(f"{name} must be a probability between 0 and 1, not {p!r}")
        if min(latency_ms, jitter_ms, bandwidth_mbps) < 0:
            raise FaultError("latency, jitter and bandwidth must not be negative")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise FaultError(f"seed must be a non-negative integer, not {seed!r}")
        if not (latency_ms or jitter_ms or bandwidth_mbps or reset_probability or stall
                or loss or corrupt or duplicate or reorder):
            raise FaultError("say how to degrade the link: --latency, --jitter, --bandwidth, "
                             "--reset-prob, --stall, --loss, --corrupt, --duplicate or --reorder")
        fault.links = self._links_between(self._nodes_in(a), self._nodes_in(b))
        fault.link_faults = LinkFaults(stall=stall, reset_probability=reset_probability,
                                       extra_latency_ms=latency_ms, extra_jitter_ms=jitter_ms,
                                       bandwidth_mbps=bandwidth_mbps, loss=loss, corrupt=corrupt,
                                       duplicate=duplicate, reorder=reorder, seed=seed)
        parts = [f"+{latency_ms:g} ms" if latency_ms else "", f"±{jitter_ms:g} ms" if jitter_ms else "",
                 f"{bandwidth_mbps:g} Mbps" if bandwidth_mbps else "",
                 f"resets {reset_probability:.0%}" if reset_probability else "", "stalled" if stall else "",
                 *_lossy_parts(loss, corrupt, duplicate, reorder),
                 f"seed {seed}" if seed is not None else ""]
        fault.description = f"link {a} ↔ {b} degraded: {', '.join(p for p in parts if p)}"

    async def _inject_routing(self, fault: Fault, region: str, enabled: bool = False) -> None:
        self._nodes_in(region)
        if self.cluster.routing is None:
            raise FaultError("this cluster runs without routing endpoints")
        fault.target["enabled"] = bool(enabled)     # put in effect by _settle (_sync_routing)
        fault.description = f"global routing {'on' if enabled else 'off'} for {region} (it keeps syncing)"

    def _routing_flag(self, region: str) -> bool:
        """Global routing for ``region`` as the faults in effect leave it: off
        if any routing fault in effect says off, else on if one says on, else
        the operator's flag (``georeg replication update``)."""
        says = {f.target["enabled"] for f in self.faults.values()
                if f.in_effect and f.kind == "routing" and f.target["region"] == region}
        if says:
            return all(says)
        replica = self.cluster.replica_specs().get(region)
        return replica.global_routing if replica is not None else True

    async def _counted_in_effect(self, fault: Fault, apply: Callable[[], Awaitable[None]],
                                 undo: Callable[[], Awaitable[None]]) -> None:
        """Apply a fault whose nodes are sent what the faults in effect add up
        to: it is registered first, so what ``apply`` sends includes it. None
        or all: if ``apply`` fails at injection, the fault is dropped and
        ``undo`` sends the nodes their state without it (a flap applying it
        again keeps it listed)."""
        injecting = fault.id not in self.faults
        self.faults[fault.id] = fault
        try:
            await apply()
        except FaultError:
            if injecting:
                del self.faults[fault.id]
                await undo()
            raise

    def _paused(self, name: str) -> bool:
        """Whether a pause fault has ``name``'s process stopped (SIGSTOP)."""
        node = self.cluster.supervisor.nodes.get(name)
        return node is not None and node.paused

    async def _put_node(self, name: str, seam: str, body: dict, *,
                        healing: bool = False) -> dict | None:
        """Set a fault held in a node's memory (``PUT /georeg/v1/faults/<seam>``);
        returns what the node answers. Healing (or undoing), a node that cannot
        take it is passed over (None): down, it comes back without it, and a
        node that refused it kept what it had.

        A node a pause stopped is sent nothing (None): the request would wait
        in its socket past any timeout and be acted on when it continues, late
        and in any order with the ones after it. The seam is noted instead, and
        ``_continue`` sends the node that seam's state as it is then."""
        if self._paused(name):
            self._deferred.setdefault(name, set()).add(seam)
            return None
        what = _SEAM_FAULTS[seam]
        session = await self._session_get()
        url = self.cluster.node_url(name) + f"/georeg/v1/faults/{seam}"
        try:
            async with session.put(url, json=body) as r:
                if r.status != 200:
                    raise FaultError(f"{name} refused the {what}: HTTP {r.status}")
                return await r.json()
        except (aiohttp.ClientError, TimeoutError, FaultError) as exc:
            error = str(exc) or f"no answer in {NODE_TIMEOUT_S:g} s"
            if not healing:
                if isinstance(exc, FaultError):
                    raise
                raise FaultError(f"{name} is unreachable: {error}") from None
            log.warning("fault_heal_failed", node=name, fault=what, error=error)
            return None

    def _node_state(self, seam: str, node: str) -> dict:
        """What the faults in effect on ``node`` add up to at one of ``NODE_SEAMS``."""
        if seam == "throttle":
            return self._throttle_rates(node)
        if seam == "storage":
            return self._storage_state(node)
        return next((self._clock_skew(f) for f in self.faults.values()
                     if f.in_effect and f.kind == "clock" and node in f.nodes), {})

    async def _put_node_state(self, nodes: list[str], seam: str, *,
                              healing: bool = False) -> None:
        """PUT to each node what its faults in effect at ``seam`` add up to,
        through ``_put_node``."""
        for name in nodes:
            await self._put_node(name, seam, self._node_state(seam, name), healing=healing)

    async def _resend(self, seams: dict[str, set[str]]) -> None:
        """Send each node its state at the seams named for it, as the faults in
        effect say now (a node that cannot take it is passed over, as when healing)."""
        for seam in NODE_SEAMS:
            await self._put_node_state([n for n, named in seams.items() if seam in named],
                                       seam, healing=True)
        for fault in self.faults.values():      # what they wait for is theirs now
            fault.waiting = [n for n in fault.waiting if n not in seams]

    async def _storage(self, nodes: list[str], *, healing: bool = False) -> None:
        """Send each node what its active disk faults add up to."""
        await self._put_node_state(nodes, "storage", healing=healing)

    def _storage_state(self, node: str) -> dict:
        """What the disk faults in effect on ``node`` add up to (see the module docstring)."""
        state = dict(_HEALTHY_DISK)
        for fault in self.faults.values():
            if fault.in_effect and fault.kind == "disk" and node in fault.nodes:
                t = fault.target
                state["full"] = state["full"] or bool(t.get("full"))
                state["slow_ms"] = max(state["slow_ms"], float(t.get("slow_ms") or 0.0))
                if t.get("eio"):
                    key = "eio_" + t["eio"]
                    state[key] = 1 - (1 - state[key]) * (1 - t.get("probability", 1.0))
                if t.get("seed") is not None:
                    state["seed"] = t["seed"]
        return state

    async def _inject_disk(self, fault: Fault, region: str, zone: str | None = None,
                           full: bool = False, slow_ms: float = 0.0, eio: str | None = None,
                           probability: float = 1.0, seed: int | None = None) -> None:
        if not full and not slow_ms and not eio:
            raise FaultError("say what is wrong with the disk: --full, --slow MS or --eio read|write")
        if eio is not None and eio not in EIO_OPERATIONS:
            raise FaultError(f"eio must be one of {', '.join(EIO_OPERATIONS)}, not {eio!r}")
        if not 0 < probability <= 1:
            raise FaultError("the probability of an I/O error must be above 0 and at most 1")
        nodes = fault.nodes = self._targets(region, zone)
        if eio:     # a flap applies it again with the seed drawn the first time
            seed = fault.target["seed"] = _replayable(fault.target.get("seed", seed))
        what = "full" if full else f"slow (+{slow_ms:g} ms per write)" if slow_ms else \
            f"failing {eio}s with EIO" + (f" ({probability:.0%})" if probability < 1 else "") \
            + f" (seed {seed})"
        fault.description = f"disk {what} on {', '.join(nodes)}"
        await self._counted_in_effect(fault, lambda: self._storage(nodes),
                                      lambda: self._storage(nodes, healing=True))

    async def _inject_bitrot(self, fault: Fault, region: str, zone: str | None = None,
                             blobs: int = 1, seed: int | None = None,
                             digests: list[str] | None = None) -> None:
        if blobs < 1:
            raise FaultError("bit rot needs at least one blob (--blobs N)")
        node = self._one_node(region, zone, "bit rot strikes one disk")
        if self._paused(node):      # an act, done now or not at all (see ``_put_node``)
            raise FaultError(f"{node} is paused: bit rot strikes a running node; heal the "
                             "pause first")
        fault.nodes = [node]
        seed = fault.target["seed"] = _replayable(seed)
        session = await self._session_get()
        url = self.cluster.node_url(node) + "/georeg/v1/faults/bitrot"
        try:
            async with session.post(url, json={"blobs": blobs, "seed": seed,
                                               **({"digests": digests} if digests else {})}) as r:
                if r.status != 200:
                    raise FaultError(f"{node} refused the bit rot: HTTP {r.status} "
                                     f"{(await r.text())[:300]}")
                answer = await r.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FaultError(f"{node} is unreachable: {exc}") from None
        rotted = answer["rotted"]
        if answer.get("missing"):
            raise FaultError(f"{node} stores no blob {', '.join(answer['missing'])}: "
                             f"nothing rotted")
        fault.target["rotted"] = rotted
        digests = ", ".join(r["digest"][:19] + "…" for r in rotted) or "none: no blob stored"
        fault.description = (f"bit rot on {node}: {len(rotted)} blob file(s) flipped "
                             f"({digests}; seed {seed})")
        fault.healed_at = time.time()  # nothing to heal: the node repairs what it finds

    async def _inject_throttle(self, fault: Fault, region: str,
                               rate_per_min: float = DEFAULT_THROTTLE_RATE,
                               request_kind: str | None = None) -> None:
        kind = request_kind
        if kind is not None and kind not in REQUEST_KINDS:
            raise FaultError(f"request_kind must be one of {', '.join(REQUEST_KINDS)}, not "
                             f"{kind!r}")
        try:
            rate_per_min = request_rate(rate_per_min, "the rate")
        except ValueError as exc:
            raise FaultError(str(exc)) from None
        fault.nodes = self._nodes_in(region)
        fault.target["rates"] = {k: rate_per_min for k in ((kind,) if kind else REQUEST_KINDS)}
        what = f"{kind}s" if kind else "every request"
        fault.description = f"{region} throttled: {what} past {rate_per_min:g}/min get 429"
        await self._counted_in_effect(fault, lambda: self._apply_throttles(fault.nodes),
                                      lambda: self._apply_throttles(fault.nodes, healing=True))

    def _throttle_rates(self, node: str) -> dict[str, float]:
        """The lowest rate, by kind, of the active throttling faults on ``node``."""
        rates: dict[str, float] = {}
        for fault in self.faults.values():
            if fault.in_effect and fault.kind == "throttle" and node in fault.nodes:
                for kind, rate in fault.target["rates"].items():
                    rates[kind] = min(rate, rates.get(kind, rate))
        return rates

    async def _apply_throttles(self, nodes: list[str], *, healing: bool = False) -> None:
        """Send each node its throttling faults' rates (``_put_node_state``)."""
        await self._put_node_state(nodes, "throttle", healing=healing)

    async def restarted(self, nodes: list[str]) -> None:
        """Nodes just (re)started: those a throttling, disk or clock fault in
        effect covers get it again (a fault lives in the node's memory; a
        clock keeps its fault's start), and a pause still in effect stops or
        stalls them again, last, as a stopped node takes no request."""
        self._stalled.difference_update(nodes)      # a new process holds no fault
        for name in nodes:
            self._deferred.pop(name, None)
        await self._resend({n: {seam for seam in NODE_SEAMS
                                if self._node_state(seam, n) != _HEALTHY[seam]} for n in nodes})
        paused = [n for n in nodes if any(self._pauses(n))]
        if paused:
            await self._apply_pauses(paused, healing=True)

    # -- grey failures ---------------------------------------------------------------------

    async def _inject_pause(self, fault: Fault, region: str, zone: str | None = None,
                            stall_bodies: bool = False) -> None:
        fault.nodes = self._targets(region, zone)
        fault.target["mode"] = "stall-bodies" if stall_bodies else "stop"
        await self._counted_in_effect(fault, lambda: self._apply_pauses(fault.nodes),
                                      lambda: self._apply_pauses(fault.nodes, healing=True))
        nodes = ", ".join(fault.nodes)
        fault.description = (f"blob bodies stall on {nodes} (health checks, manifests and "
                             "HEAD answer)" if stall_bodies else
                             f"paused (SIGSTOP: sockets open, nothing answers): {nodes}")

    def _pauses(self, node: str) -> tuple[bool, bool]:
        """Whether pause faults in effect stop ``node``, and stall its bodies."""
        modes = {f.target["mode"] for f in self.faults.values()
                 if f.in_effect and f.kind == "pause" and node in f.nodes}
        return "stop" in modes, "stall-bodies" in modes

    async def _apply_pauses(self, nodes: list[str], *, healing: bool = False) -> None:
        """Stop or continue each node, and stall or release its blob bodies, as
        the pause faults in effect say (the one being injected is counted in
        effect: it is registered before this runs)."""
        supervisor = self.cluster.supervisor
        for name in nodes:
            stop, stall = self._pauses(name)
            if stall != (name in self._stalled):
                await self._continue(name)          # a stopped node answers no request
                await self._put_node(name, "stall", {"bodies": stall}, healing=healing)
                (self._stalled.add if stall else self._stalled.discard)(name)
            if not stop:
                await self._continue(name)
            elif not supervisor.pause_node(name) and not healing:
                raise FaultError(f"{name} is not running: there is nothing to pause")

    async def _continue(self, name: str) -> None:
        """SIGCONT ``name`` if a pause stopped it, and send it, at once, the
        state of each seam a fault injected, healed or flapped while it was
        stopped left unsent (``_put_node``): it acts on that before anything else."""
        if not self._paused(name):
            return
        self.cluster.supervisor.resume_node(name)
        await self._resend({name: self._deferred.pop(name, set())})

    # -- clocks ------------------------------------------------------------------------

    async def _inject_clock(self, fault: Fault, node: str, zone: str | None = None,
                            offset_s: float = 0.0, drift: float = 1.0) -> None:
        try:
            offset_s, drift = float(offset_s), float(drift)
        except (TypeError, ValueError):
            raise FaultError("offset_s and drift must be numbers") from None
        problem = skew_problem(offset_s, drift)
        if problem is not None:
            raise FaultError(problem)
        if not offset_s and drift == 1.0:
            raise FaultError("say how the clock is off: --offset S (e.g. +300s, -2s) and/or "
                             "--drift RATE (e.g. 1.5: 1.5 s pass per second)")
        name = self._one_node(node, zone)
        for other in self.faults.values():
            if other.active and other.kind == "clock" and other is not fault and name in other.nodes:
                raise FaultError(f"{name}'s clock is already skewed by {other.id}; heal it first")
        fault.nodes = [name]
        fault.target.update(offset_s=offset_s, drift=drift,
                            since_ns=int(fault.started_at * 1e9))
        await self._put_node(name, "clock", self._clock_skew(fault))
        parts = [f"{offset_s:+g}s" if offset_s else "", f"drifting ×{drift:g}" if drift != 1.0 else ""]
        fault.description = f"clock of {name} off: {', '.join(p for p in parts if p)}"

    @staticmethod
    def _clock_skew(fault: Fault) -> dict:
        t = fault.target
        return {"offset_s": t.get("offset_s", 0.0), "drift": t.get("drift", 1.0),
                "since_ns": t["since_ns"]}

    async def _inject_destroy(self, fault: Fault, region: str) -> None:
        nodes = self._nodes_in(region)
        fault.nodes = nodes
        supervisor = self.cluster.supervisor
        await asyncio.gather(*(supervisor.stop_node(n, graceful=False) for n in nodes))
        for name in nodes:
            supervisor.remove_data(name)
        await asyncio.gather(*(supervisor.start_node(n) for n in nodes))
        await self.restarted(nodes)
        fault.description = f"{region} destroyed: data wiped, restarted empty ({', '.join(nodes)})"
        fault.healed_at = time.time()  # nothing to heal: it re-syncs by itself

    def _endpoints(self, endpoint: str) -> list[tuple[str, str]]:
        """The proxies ``endpoint`` names: ``global`` (every client location's),
        ``global:REGION`` (one), ``REGION`` or ``regional:REGION`` (a regional one)."""
        routing = self.cluster.routing
        if routing is None:
            raise FaultError("this cluster runs without routing endpoints")
        kind, _, region = endpoint.rpartition(":")
        if endpoint == "global":
            keys = [k for k in routing.proxies if k[0] == "global"]
        else:
            keys = [(kind or "regional", region)] if (kind or "regional", region) in routing.proxies \
                else []
        if not keys:
            names = ", ".join(sorted({"global"} | {f"{k}:{r}" for k, r in routing.proxies}))
            raise FaultError(f"no endpoint {endpoint!r}; one of {names} (a bare region is its "
                             "regional endpoint)")
        return keys

    async def _inject_http(self, fault: Fault, endpoint: str, action: str = "status",
                           status: int = 503, probability: float = 1.0, method: str | None = None,
                           path_regex: str | None = None, seed: int | None = None) -> None:
        if action not in HTTP_ACTIONS:
            raise FaultError(f"action must be one of {', '.join(HTTP_ACTIONS)}, not {action!r}")
        keys = self._endpoints(str(endpoint))
        rule = dict(action=action, status=status, probability=probability,
                    method=method.upper() if isinstance(method, str) else method,
                    path_regex=path_regex,
                    seed=self.cluster.spec.seed if seed is None else seed)
        try:
            HttpFaultRule(fault.id, **rule)
        except (ValueError, TypeError) as exc:
            raise FaultError(str(exc)) from None
        fault.target.update(rule, endpoints=[f"{k}:{r}" for k, r in keys])
        what = {"status": f"HTTP {status}", "reset": "connection reset",
                "truncate": "response bodies cut halfway"}[action]
        scope = " ".join(x for x in (method and method.upper(), path_regex and f"~{path_regex}")
                         if x) or "every request"
        fault.description = (f"{endpoint} endpoint: {what} for {scope}"
                             + (f", {probability:.0%} of them" if probability < 1 else ""))
        self.faults[fault.id] = fault       # in effect while applied, as throttling
        self._apply_http(keys)

    def _apply_http(self, keys: list[tuple[str, str]] | None = None) -> None:
        """Give each endpoint the rules of the HTTP faults in effect on it, in the
        order they were injected."""
        routing = self.cluster.routing
        if routing is None:
            return
        for key in keys if keys is not None else list(routing.proxies):
            proxy = routing.proxies.get(key)
            if proxy is None:
                continue
            name = f"{key[0]}:{key[1]}"
            proxy.http_faults.set_rules([
                HttpFaultRule(f.id, **{k: f.target[k] for k in _HTTP_RULE_FIELDS})
                for f in self.faults.values()
                if f.in_effect and f.kind == "http" and name in f.target["endpoints"]])

    def http_injected(self) -> dict[str, int]:
        """Requests each HTTP fault acted on, over every endpoint."""
        counts: dict[str, int] = {}
        for proxy in (self.cluster.routing.proxies.values() if self.cluster.routing else ()):
            for fid, n in proxy.http_faults.injected.items():
                counts[fid] = counts.get(fid, 0) + n
        return counts

    # -- healing -------------------------------------------------------------------------

    async def heal(self, fault_id: str) -> Fault:
        fault = self.faults.get(fault_id)
        if fault is None:
            raise KeyError(fault_id)
        if not fault.active:
            return fault
        timer = self._timers.pop(fault_id, None)
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()
        flapper = self._flappers.pop(fault_id, None)
        async with fault.lock:          # not in the middle of a flap's change
            if flapper is not None:
                flapper.cancel()
            if not fault.active:        # healed meanwhile
                return fault
            fault.healed_at = time.time()
            fault.phase_ends_at = None
            # A clock healed in a flap's off phase is lifted again (the same
            # request), for the node's word on when its writes resume.
            if fault.phase == ON or fault.kind == "clock":
                await self._lift(fault)
            self._settle(fault)
        log.info("fault_healed", id=fault.id, kind=fault.kind)
        return fault

    async def _lift(self, fault: Fault) -> None:
        """Undo what ``fault`` does (healed, or a flap's off phase); faults
        still in effect keep theirs."""
        kind, target = fault.kind, fault.target
        if kind in OUTAGES and target.get("mode", "crash") != "isolate":
            still_down = {n for f in self.faults.values() if f.in_effect and f is not fault
                          and f.kind in OUTAGES for n in f.nodes}
            started = [n for n in fault.nodes if n not in still_down]
            await asyncio.gather(*(self.cluster.supervisor.start_node(n) for n in started))
            await self.restarted(started)
        elif kind == "disk":
            await self._storage(fault.nodes, healing=True)
        elif kind == "throttle":
            await self._apply_throttles(fault.nodes, healing=True)
        elif kind == "pause":
            await self._apply_pauses(fault.nodes, healing=True)
        elif kind == "http":
            self._apply_http()
        elif kind == "clock":
            clock = await self._put_node(fault.nodes[0], "clock", {}, healing=True)
            resume_s = (clock or {}).get("writes_resume_in_s")
            if resume_s and not fault.active:   # healed; the node's own figure (stamps made ahead)
                fault.description += (f"; writes resume there in {resume_s:.0f}s, once its "
                                      "clock has passed the stamps it made while ahead")

    async def heal_all(self) -> list[Fault]:
        return [await self.heal(f.id) for f in list(self.faults.values()) if f.active]

    def active(self) -> list[Fault]:
        return [f for f in self.faults.values() if f.active]


def _replayable(seed: int | None) -> int:
    """The seed a random fault runs with: the one given, or one picked now
    (and then shown in the fault's description), so every run can be replayed."""
    return seed if seed is not None else random.randrange(1 << 31)


def _combine(a: LinkFaults, b: LinkFaults) -> LinkFaults:
    bandwidths = [x for x in (a.bandwidth_mbps, b.bandwidth_mbps) if x > 0]
    return LinkFaults(
        cut_forward=a.cut_forward or b.cut_forward,
        cut_backward=a.cut_backward or b.cut_backward,
        stall=a.stall or b.stall,
        reset_probability=max(a.reset_probability, b.reset_probability),
        extra_latency_ms=a.extra_latency_ms + b.extra_latency_ms,
        extra_jitter_ms=a.extra_jitter_ms + b.extra_jitter_ms,
        bandwidth_mbps=min(bandwidths) if bandwidths else 0.0,
        # Independent losses compose as 1 - (1-a)(1-b); the first seed given wins.
        loss=1 - (1 - a.loss) * (1 - b.loss),
        corrupt=1 - (1 - a.corrupt) * (1 - b.corrupt),
        duplicate=1 - (1 - a.duplicate) * (1 - b.duplicate),
        reorder=a.reorder or b.reorder,
        seed=a.seed if a.seed is not None else b.seed,
    )


def _lossy_parts(loss: float, corrupt: float, duplicate: float, reorder: bool) -> list[str]:
    """How a lossy link fault reads in ``georeg fault list`` (the model is
    ``cluster.network.links``): what each does to the TCP streams it carries."""
    return [f"loss {loss:.2%} of segments (retransmitted)" if loss else "",
            f"corrupt {corrupt:.2%} of segments (bytes flipped)" if corrupt else "",
            f"duplicate {duplicate:.2%} of segments (wire time only)" if duplicate else "",
            "reorder (repaired by TCP: no effect on streams)" if reorder else ""]

