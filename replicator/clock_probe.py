"""Probing peers' clocks: what tells a node that its clock, or a peer's, is off.

Every ``interval_s`` the node asks each peer's ``Health`` for its wall clock
and brackets the answer between its own readings before and after the call:
the peer's clock minus this node's is the answer minus the midpoint, known to
within half the round trip (the way NTP and CockroachDB's remote clock monitor
measure). The measurements go to the node's ``ClockGuard``
(``registry_node.clock``), which decides whether this node may stamp writes;
here they are only counted (``georeg_clock_offset_seconds``,
``georeg_clock_offset_exceeded_total{seen_in="probe"}``, ``georeg_clock_skewed``)
and logged when the verdict changes.

A peer that does not answer is not measured (its last measurement ages out
of the guard's window): an unreachable peer is neither evidence for nor
against this node's clock. Probes of all peers run at once, each bounded by
a timeout, so a paused peer delays no other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import structlog

from registry_node.clock import PROBE_TIMEOUT_S, ClockGuard, offset_bracket
from registry_node.hlc import HybridLogicalClock

from .errors import ReplicationError
from .metrics import ReplicationMetrics
from .peers import PeerClient

log = structlog.get_logger("georeg.clock")


class ClockProbe:
    def __init__(self, guard: ClockGuard, hlc: HybridLogicalClock,
                 clients: Callable[[], Sequence[PeerClient]], metrics: ReplicationMetrics,
                 interval_s: float) -> None:
        self.guard = guard
        self.hlc = hlc
        self.clients = clients
        self.metrics = metrics
        self.interval_s = interval_s
        guard.probe_interval_s = interval_s
        self._skewed = False
        metrics.clock_skewed.set_function(lambda: 1 if self._verdict() else 0)

    def _verdict(self) -> bool:
        return self.guard.refusal(self.hlc.last) is not None

    async def run(self) -> None:
        while True:         # for the node's lifetime; cancelled when replication stops
            try:
                await self.round()
            except Exception:  # a failed round must not stop the next: the fence rests on them
                log.exception("clock_probe_failed")
            await asyncio.sleep(self.interval_s)

    async def round(self) -> None:
        """Probe every peer once, at once."""
        await asyncio.gather(*(self._probe(client) for client in self.clients()))
        skewed = self._verdict()
        if skewed != self._skewed:
            self._skewed = skewed
            if skewed:
                log.warning("clock_skewed", **self.guard.describe(self.hlc.last))
            else:
                log.info("clock_recovered", peers=self.guard.describe(self.hlc.last)["peers"])

    async def _probe(self, client: PeerClient) -> None:
        clock = self.guard.clock
        before = clock.now_ns()
        try:
            reply = await client.health(timeout=PROBE_TIMEOUT_S)
        except ReplicationError:
            return
        after = clock.now_ns()
        if not reply.wall_ns:
            return          # a peer from before clock probes
        lo, hi = offset_bracket(before, reply.wall_ns, after)
        offset_s = (lo + hi) / 2e9
        measured = self.guard.record(client.name, offset_s, (hi - lo) / 2e9)
        self.metrics.clock_offset.labels(client.name).set(offset_s)
        if measured.exceeds(self.guard.max_offset_s):
            self.metrics.clock_offset_exceeded.labels(client.name, "probe").inc()
