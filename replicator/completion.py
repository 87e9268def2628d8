"""Replication completion: has every replica residency allows an image, or
has one of them given up on it — the question behind the webhook actions
``replicated`` and ``replication_failed`` (``registry_node.webhooks``), asked
of one node and answered from what every node's per-image status knows.

What counts
    A replica is a region (as in ACR). A region holds an image once as many of
    its nodes hold it as a push taken there needs before it is acknowledged:
    one node for a region that is not zone redundant; for a zone-redundant
    region its write quorum — this node's own region as its view says
    (``ZoneRedundancy.write_quorum``), another region a majority of the zones
    the plan placed there (``ClusterView.remote_zones``; the spec's quorum is
    a majority, and views do not carry other regions' quorums). So
    ``replicated`` means the image is in each region as durably as if it had
    been pushed there: one zone's outage neither loses it nor holds the event
    back. A region's arrival is when the quorum-th of its nodes stored it
    (a node's arrival is what per-image status reports: its manifest
    record's ``created_ns``), exactly, so that any node asked, at any time,
    gives the same times: a node of the region that said no to a question
    sent before that time may have had the image sooner, so it is asked
    again at once, and the answer waits for it (``Standing.unsure``; the
    question's time is this node's clock, the arrival the holder's: one
    machine's clock, or as close as the nodes' clocks are; a node that cannot
    be asked is not waited for). A region has given up once so many of its nodes
    recorded a permanent failure for the image that the rest cannot make a
    quorum (for one node: that node's failure, with its reason). A node that
    cannot be asked is not a failure: its region is pending.

Which regions
    Those residency allows the image in, judged on its origin region (the
    ``residency_region`` of the first holder's record): a confined region's
    content is waited for in that region alone. Until some node reports the
    image, its origin is unknown and every region is pending. The regions are
    this node's and its peers' (the view as it is now, peers added or
    removed while waiting included). While a region is restored from its
    paired copy, the copy is a peer of that region's nodes, known to their
    views only by its (pair) region: a wait asked of one of them then counts
    that region too, until views say which peers are copies.

Cost
    Many images are waited on at once (every push, with ``replicated``
    webhooks). Each node asked has one round loop here: a round asks that
    node, in one ``GetImageStatuses`` call (``MAX_BATCH`` images per call),
    about every image due to be asked of it, and rounds start at most every
    ``ROUND_INTERVAL_S`` per node, whatever the number of images. An image is
    asked of a node again after an interval that doubles from
    ``ROUND_INTERVAL_S`` up to ``MAX_INTERVAL_S`` (bounded backoff: an image
    stuck behind a partition costs a lookup every few seconds per node, not
    one per round), and no longer once the node or its region is settled.
    Answers are prompted rather than polled for in the common case: a
    ``manifest_put`` on the stream from a peer means that peer holds the
    manifest (its log carries only what it stored), and this node applying
    one means it does; either makes the image due at that node at once
    (``held``). The interval is then only the backstop (content repaired by
    anti-entropy, a stream that is down). Waiters of one image share its
    answers. This node is asked without a call.

No gRPC, aiohttp or storage here: how a node is asked is injected (``Ask``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from registry_node.errors import RegistryError
from registry_node.reference import Digest, validate_name
from registry_node.webhooks import Completion

from .residency import ResidencyPolicy
from .topology import ClusterView

log = structlog.get_logger("georeg.replication")

ROUND_INTERVAL_S = 0.25     # rounds per node at most every this, and an image's first interval
MAX_INTERVAL_S = 4.0        # the longest an image waits to be asked a node again
MAX_BATCH = 1000            # images per call (GetImageStatuses' limit)


def iso_time(ns: int) -> str:
    """A wall time in ns as ISO 8601 UTC with milliseconds (as per-image status shows it)."""
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class NodeReport:
    """What one node says of one image (a node that could not be asked says nothing)."""

    present: bool
    arrived_ns: int = 0
    origin_region: str = ""         # whose residency applies (the record's residency_region)
    origin_acked_ns: int = 0
    failure: str = ""               # its last permanent failure to replicate the image


@dataclass(frozen=True, slots=True)
class ReplicaRegion:
    """A replica region as this node knows it: the nodes it can ask there, how
    many nodes the plan put there, and how many must hold an image."""

    name: str
    nodes: tuple[str, ...]
    size: int
    quorum: int


def replica_regions(view: ClusterView) -> tuple[ReplicaRegion, ...]:
    """The replica regions of ``view`` (see the module docstring), by name."""
    nodes: dict[str, list[str]] = {view.region: [view.name]}
    for peer in view.peers:
        nodes.setdefault(peer.region, []).append(peer.name)
    regions = []
    for region, names in sorted(nodes.items()):
        if region == view.region and view.zone_redundant:
            size, quorum = view.zone_redundancy.zone_count, view.zone_redundancy.write_quorum
        elif region != view.region and view.remote_zones.get(region):
            size = len(view.remote_zones[region])
            quorum = size // 2 + 1
        else:
            size = quorum = 1
        regions.append(ReplicaRegion(region, tuple(names), max(size, len(names)), quorum))
    return tuple(regions)


@dataclass(slots=True)
class Heard:
    """What this node has heard about one image: each node's latest report,
    the wall time (this node's clock) its question was sent, and the nodes
    that could not be asked last time."""

    reports: dict[str, NodeReport] = field(default_factory=dict)
    asked_ns: dict[str, int] = field(default_factory=dict)
    unreachable: set[str] = field(default_factory=set)

    def answered(self, node: str, report: NodeReport, asked_ns: int) -> None:
        self.reports[node] = report
        self.asked_ns[node] = asked_ns
        self.unreachable.discard(node)

    def silent(self, node: str) -> None:
        self.unreachable.add(node)
        if node in self.reports and not self.reports[node].present:
            del self.reports[node]      # what it said before may be out of date

    def holds(self, node: str) -> bool:
        return node in self.reports and self.reports[node].present


@dataclass(frozen=True, slots=True)
class Standing:
    """Where one image stands in one region. ``holds`` with ``unsure`` nodes:
    the region holds it, but one of those may have had it sooner than
    ``arrived_ns`` says (its last answer came from before then): ask again."""

    holds: bool = False
    arrived_ns: int = 0
    failure: str = ""               # the region has given up: why
    unsure: tuple[str, ...] = ()


def region_standing(region: ReplicaRegion, heard: Heard) -> Standing:
    """Whether ``region`` holds the image (and since when), has given up on
    it, or neither, from what its nodes said."""
    reports = heard.reports
    arrivals = sorted(reports[n].arrived_ns for n in region.nodes if heard.holds(n))
    if len(arrivals) >= region.quorum:
        arrived = arrivals[region.quorum - 1]
        # The quorum-th arrival is exact once every other node is known to
        # have come later: it said no to a question sent after that time
        # (clocks of one machine, or as close as the nodes' clocks are).
        unsure = tuple(n for n in region.nodes if not heard.holds(n)
                       and n not in heard.unreachable
                       and heard.asked_ns.get(n, 0) < arrived)
        return Standing(holds=True, arrived_ns=arrived, unsure=unsure)
    failed = [reports[n].failure for n in region.nodes
              if n in reports and not reports[n].present and reports[n].failure]
    if failed and len(failed) > region.size - region.quorum:
        return Standing(failure=failed[0])
    return Standing()


def origin_of(reports: dict[str, NodeReport]) -> str:
    """The region whose residency decides where the image may go: that of the
    holder acknowledged first, as per-image status takes it ("" if none holds it)."""
    holders = [r for r in reports.values() if r.present and r.origin_region]
    if not holders:
        return ""
    return min(holders, key=lambda r: r.origin_acked_ns or 1 << 62).origin_region


@dataclass(frozen=True, slots=True)
class Verdict:
    """An image's ``Completion`` as far as it is known, whether it is the
    answer (``settled``), the nodes whose answers could still change it
    (``open_nodes``), and those of them to ask at once (``unsure``)."""

    completion: Completion
    settled: bool
    open_nodes: frozenset[str]
    unsure: frozenset[str]


def verdict(repository: str, regions: Sequence[ReplicaRegion], residency: ResidencyPolicy,
            heard: Heard) -> Verdict:
    origin = origin_of(heard.reports)
    arrivals: dict[str, str] = {}
    failures: dict[str, str] = {}
    pending: list[str] = []
    open_nodes: set[str] = set()
    unsure: set[str] = set()
    for region in regions:
        if origin and not residency.allows(origin, repository, region.name):
            continue
        standing = region_standing(region, heard)
        if standing.holds:
            arrivals[region.name] = iso_time(standing.arrived_ns)
            unsure.update(standing.unsure)
            continue
        if standing.failure:
            failures[region.name] = standing.failure
        else:
            pending.append(region.name)
        open_nodes.update(n for n in region.nodes if not heard.holds(n))
    complete = bool(origin) and not pending and not failures
    return Verdict(Completion(complete, arrivals, failures, tuple(pending)),
                   settled=bool(failures) or (complete and not unsure),
                   open_nodes=frozenset(open_nodes | unsure), unsure=frozenset(unsure))


# How a node is asked about images: its reports in the order asked, or a
# ``ReplicationError`` (or OSError) when it cannot be asked now.
Ask = Callable[[str, Sequence[tuple[str, str]]], Awaitable[Sequence[NodeReport]]]


@dataclass(eq=False, slots=True)
class _Watch:
    repository: str
    digest: str
    answered: asyncio.Future[None]
    heard: Heard = field(default_factory=Heard)
    verdict: Verdict | None = None
    waiters: int = 0

    @property
    def open_nodes(self) -> frozenset[str]:
        return self.verdict.open_nodes if self.verdict is not None else frozenset()


@dataclass(slots=True)
class _Due:
    at: float
    interval: float
    hurried: bool = False        # since its round started: keep it due


class ImageCompletion:
    """``registry_node.webhooks.ReplicationCompletion`` for one node (see the
    module docstring). ``regions`` says the replica regions now, ``ask`` asks
    a node (by name) about images; ``wall_ns`` is this node's clock, the one
    it stamps arrivals with."""

    def __init__(self, regions: Callable[[], Sequence[ReplicaRegion]], residency: ResidencyPolicy,
                 ask: Ask, *, wall_ns: Callable[[], int] = time.time_ns,
                 round_interval_s: float = ROUND_INTERVAL_S,
                 max_interval_s: float = MAX_INTERVAL_S, max_batch: int = MAX_BATCH) -> None:
        self.regions = regions
        self.residency = residency
        self.ask = ask
        self.wall_ns = wall_ns
        self.round_interval_s = round_interval_s
        self.max_interval_s = max_interval_s
        self.max_batch = max_batch
        self._watches: dict[tuple[str, str], _Watch] = {}
        self._rounds: dict[str, _NodeRounds] = {}
        self._closed = False

    @property
    def waiting(self) -> int:
        """Images waited on now."""
        return len(self._watches)

    async def wait(self, repository: str, digest: str, *, deadline_s: float) -> Completion:
        """As ``ReplicationCompletion.wait``; ``deadline_s`` is seconds from now.
        Every answer comes from what the nodes have stored (arrival times
        included), so asking again — after a restart, say — answers the same."""
        try:
            validate_name(repository)
            Digest.parse(digest)
        except RegistryError:
            raise ValueError(f"{repository[:300]!r} {digest[:140]!r} is not a repository and "
                             "a manifest digest") from None
        key = (repository, digest)
        watch = self._watches.get(key)
        if watch is None:
            if self._closed:
                return Completion(False, pending=tuple(r.name for r in self.regions()))
            watch = _Watch(repository, digest, asyncio.get_running_loop().create_future())
            watch.verdict = verdict(repository, self.regions(), self.residency, watch.heard)
            self._watches[key] = watch
            self._schedule(watch)
        watch.waiters += 1
        try:
            if not watch.answered.done():
                await asyncio.wait([watch.answered], timeout=max(deadline_s, 0.0))
        finally:
            watch.waiters -= 1
            if watch.waiters == 0 and self._watches.get(key) is watch:
                self._forget(watch)
        return watch.verdict.completion

    def held(self, node: str, repository: str, digest: str) -> None:
        """``node`` is known to hold the manifest ``digest`` in ``repository``
        (a ``manifest_put`` in its log): if the image is waited on, ask that
        node about it in its next round."""
        watch = self._watches.get((repository, digest))
        if watch is None or node not in watch.open_nodes:
            return
        rounds = self._rounds.get(node)
        if rounds is not None:
            rounds.hurry((repository, digest))

    async def close(self) -> None:
        """Stop asking: every wait returns with what is known, and waits that
        start from now on return at once."""
        self._closed = True
        for watch in list(self._watches.values()):
            self._settle(watch)
        rounds, self._rounds = list(self._rounds.values()), {}
        for node_rounds in rounds:
            await node_rounds.stop()

    # -- the rounds ------------------------------------------------------------------

    def _schedule(self, watch: _Watch) -> None:
        key = (watch.repository, watch.digest)
        for node in watch.open_nodes:
            rounds = self._rounds.get(node)
            if rounds is None:
                rounds = self._rounds[node] = _NodeRounds(node, self)
            rounds.add(key)

    def _apply(self, node: str, keys: Sequence[tuple[str, str]],
               reports: Sequence[NodeReport] | None, asked_ns: int) -> None:
        """What ``node`` said of ``keys`` when asked at ``asked_ns`` (None: it
        could not be asked)."""
        regions = self.regions()
        for n, key in enumerate(keys):
            watch = self._watches.get(key)
            if watch is None:
                continue
            if reports is not None:
                watch.heard.answered(node, reports[n], asked_ns)
            else:
                watch.heard.silent(node)
            was_open = watch.open_nodes
            watch.verdict = verdict(watch.repository, regions, self.residency, watch.heard)
            if watch.verdict.settled:
                self._settle(watch)
                continue
            for settled in was_open - watch.open_nodes:
                if settled in self._rounds:
                    self._rounds[settled].drop(key)
            self._schedule(watch)     # a region may have been added meanwhile
            for unsure in watch.verdict.unsure:
                self._rounds[unsure].hurry(key)

    def _settle(self, watch: _Watch) -> None:
        if not watch.answered.done():
            watch.answered.set_result(None)
        self._forget(watch)

    def _forget(self, watch: _Watch) -> None:
        key = (watch.repository, watch.digest)
        if self._watches.get(key) is watch:
            del self._watches[key]
        for rounds in self._rounds.values():
            rounds.drop(key)

    def _still_open(self, node: str, key: tuple[str, str]) -> bool:
        watch = self._watches.get(key)
        return watch is not None and node in watch.open_nodes


class _NodeRounds:
    """The rounds that ask one node: when each image is due to be asked
    there, and a task that asks, in one call per round, every image due
    (or about to be: within one round interval, so that images waited on
    at nearly the same time share calls)."""

    def __init__(self, node: str, owner: ImageCompletion) -> None:
        self.node = node
        self.owner = owner
        self.due: dict[tuple[str, str], _Due] = {}
        self._wake = asyncio.Event()
        self._sleeping_until = 0.0
        self._last_round = float("-inf")
        self._task: asyncio.Task | None = None

    def add(self, key: tuple[str, str]) -> None:
        if key in self.due:
            return
        now = asyncio.get_running_loop().time()
        self.due[key] = _Due(now, self.owner.round_interval_s)
        self._nudge(now)

    def hurry(self, key: tuple[str, str]) -> None:
        due = self.due.get(key)
        if due is None:
            return
        now = asyncio.get_running_loop().time()
        due.at = min(due.at, now)
        due.hurried = True
        self._nudge(now)

    def drop(self, key: tuple[str, str]) -> None:
        self.due.pop(key, None)

    def _nudge(self, now: float) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"completion:{self.node}")
        # Woken only to start a round sooner than planned, never sooner than
        # the round interval allows: a burst of hints wakes it once.
        if self._sleeping_until > max(now, self._last_round + self.owner.round_interval_s):
            self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.owner.round_interval_s
        while self.due:
            try:
                await self._round(loop, interval)
            except asyncio.CancelledError:
                raise
            except Exception:   # a bug here must not end the waits: they would hang to their deadlines
                log.exception("completion_round_failed", node=self.node)
                self._last_round = loop.time()

    async def _round(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        """Sleep until the next round is due (or something is hurried), or run it."""
        now = loop.time()
        start = max(min(d.at for d in self.due.values()), self._last_round + interval)
        if start > now:
            self._sleeping_until = start
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), start - now)
            self._sleeping_until = 0.0
            return
        self._last_round = now
        for key in [k for k in self.due if not self.owner._still_open(self.node, k)]:
            del self.due[key]
        keys = [key for key, due in self.due.items() if due.at <= now + interval]
        for key in keys:
            self.due[key].hurried = False
        for first in range(0, len(keys), self.owner.max_batch):
            await self._ask(keys[first:first + self.owner.max_batch])
        after = loop.time()
        for key in keys:
            due = self.due.get(key)
            if due is not None and not due.hurried:     # still open here: ask again, later
                due.interval = min(due.interval * 2, self.owner.max_interval_s)
                due.at = after + due.interval

    async def _ask(self, keys: list[tuple[str, str]]) -> None:
        asked_ns = self.owner.wall_ns()
        try:
            reports = await self.owner.ask(self.node, keys)
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # noqa: BLE001 - any failure to ask is "unreachable now"
            log.debug("completion_ask_failed", node=self.node, images=len(keys), error=str(exc))
            reports = None
        if reports is not None and len(reports) != len(keys):
            log.warning("completion_answer_mismatch", node=self.node, asked=len(keys),
                        answered=len(reports))
            reports = None
        self.owner._apply(self.node, keys, reports, asked_ns)
