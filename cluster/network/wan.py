"""The WAN model: how long a byte takes between two regions, and how many fit.

Round trip = 2 × great-circle distance ÷ speed of light in fibre (≈200 km/ms)
× a path-inflation factor (cables do not follow great circles; routers add
queues) + a fixed overhead for the last miles at both ends. With inflation
1.15 and 5 ms overhead, East US ↔ West Europe comes out at 80 ms, its real
round trip; long detours (Asia to South America) come out somewhat optimistic,
which the spec can correct per pair. One-way latency is half the round trip.

Zones of one region are about 1 ms apart (round trip). Every link has jitter
(a small fraction of its latency) and a bandwidth per direction.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..control.regions import distance_km
from .links import LinkModel

FIBRE_KM_PER_MS = 200.0
PATH_INFLATION = 1.15
OVERHEAD_RTT_MS = 5.0
JITTER_FRACTION = 0.02
ZONE_RTT_MS = 1.0
DEFAULT_BANDWIDTH_MBPS = 500.0       # one direction of an inter-region link
ZONE_BANDWIDTH_MBPS = 0.0            # within a region: not the bottleneck


@dataclass(frozen=True, slots=True)
class PairOverride:
    a: str
    b: str
    rtt_ms: float | None = None
    jitter_ms: float | None = None
    bandwidth_mbps: float | None = None


class WanModel:
    def __init__(self, overrides: tuple[PairOverride, ...] = (), *,
                 bandwidth_mbps: float = DEFAULT_BANDWIDTH_MBPS, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bandwidth_mbps = bandwidth_mbps
        self._overrides = {frozenset((o.a, o.b)): o for o in overrides}

    def rtt_ms(self, a: str, b: str) -> float:
        if a == b:
            return ZONE_RTT_MS
        override = self._overrides.get(frozenset((a, b)))
        if override is not None and override.rtt_ms is not None:
            return override.rtt_ms
        return 2 * distance_km(a, b) / FIBRE_KM_PER_MS * PATH_INFLATION + OVERHEAD_RTT_MS

    def one_way_ms(self, a: str, b: str) -> float:
        return self.rtt_ms(a, b) / 2

    def link(self, a: str, b: str) -> LinkModel:
        """The model of one direction of the link from region ``a`` to ``b``."""
        if not self.enabled:
            return LinkModel()
        override = self._overrides.get(frozenset((a, b)))
        latency = self.one_way_ms(a, b)
        jitter = latency * JITTER_FRACTION
        bandwidth = ZONE_BANDWIDTH_MBPS if a == b else self.bandwidth_mbps
        if override is not None:
            jitter = override.jitter_ms if override.jitter_ms is not None else jitter
            bandwidth = override.bandwidth_mbps if override.bandwidth_mbps is not None else bandwidth
        return LinkModel(latency_ms=latency, jitter_ms=jitter, bandwidth_mbps=bandwidth)
