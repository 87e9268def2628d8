"""The lag benchmark's results: per origin → destination pair statistics, the
targets, the table printed for people and the JSON written for machines.

Per pair, over every image pushed at the origin node and recorded at the
destination node:

* lag = arrival at the destination − the client's receipt of the manifest
  PUT's 201 (ms); p50/p95/p99 are nearest-rank percentiles;
* floor = the median of the images' floors (``floor``: the least any protocol
  could do over the modelled link, from the push's own timeline); ratios are
  lag ÷ floor, shown only where the floor is at least 1 ms (zones of one
  region, loopback: the floor is ~0 or below); ``below_floor_ms`` = the most
  any image's lag fell below its own floor (0 if none did): more than the
  run's clock error (``clocks``) means the floor or the clocks are wrong;
* throughput = bytes of the pair's images ÷ (last arrival − first push start);
* node ack offset = the origin's own stamp of the acknowledgement − the
  client's receipt of the 201 (negative: the node stamps before it answers, and
  in a zone-redundant region before the second zone confirms).

Targets (reported, never asserted): with the modelled WAN, p50 ≤ 1.25 × floor
+ 20 ms and p99 ≤ 2 × floor + 50 ms; on loopback (no modelled WAN), p50 < 50 ms
and p99 < 200 ms. Zone peers of the origin may show negative lag: zone quorum
makes one of them hold the image before the client is answered.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .clocks import ClockCheck
from .floor import FORMULA, NS_PER_MS, ImagePush
from .procfs import cpu_model


@dataclass(frozen=True)
class Host:
    cpu_model: str
    cores: int
    python: str
    kernel: str

    def describe(self) -> str:
        return f"{self.cpu_model}, {self.cores} cores · Linux {self.kernel} · Python {self.python}"


def host() -> Host:
    return Host(cpu_model(), os.cpu_count() or 0, platform.python_version(), platform.release())


@dataclass(frozen=True)
class Arrival:
    """One image recorded at one destination."""

    origin: str
    destination: str
    repository: str
    size: int
    started_ns: int          # the client began pushing the image
    acked_ns: int            # the client received the manifest PUT's 201
    arrived_ns: int          # the destination committed manifest and tag
    node_acked_ns: int       # the origin's own stamp of the acknowledgement (0: unknown)
    floor_ms: float
    layer_held_ns: int = 0                     # the client sent the largest blob's PUT ?digest=
    layer_floor_ms: float = math.nan           # floor.layer_floor_ms of the largest blob

    @property
    def since_layer_held_ms(self) -> float:
        """Arrival after the origin held the image's largest blob (no earlier
        than the client sent its final PUT)."""
        return (self.arrived_ns - self.layer_held_ns) / NS_PER_MS

    @property
    def lag_ms(self) -> float:
        return (self.arrived_ns - self.acked_ns) / NS_PER_MS

    @property
    def over_floor_ms(self) -> float:
        return self.lag_ms - self.floor_ms


@dataclass(frozen=True)
class Verification:
    """A recorded arrival against what real GETs at the destination observed."""

    origin: str
    destination: str
    repository: str
    acked_ns: int
    recorded_ns: int         # arrival as the node recorded it (0: never read)
    seen_ns: int             # the first GET that listed the tag answered (0: never)
    previous_sent_ns: int    # the last GET that did not list it was sent
    slack_ns: int

    @property
    def get_minus_recorded_ms(self) -> float:
        return (self.seen_ns - self.recorded_ns) / NS_PER_MS

    @property
    def window_ms(self) -> float:
        return (self.seen_ns - self.previous_sent_ns) / NS_PER_MS

    @property
    def consistent(self) -> bool:
        """Recorded within the observation window: not after the GET that saw it,
        not before the last GET that did not (less the stamp-to-commit slack)."""
        return bool(self.recorded_ns and self.seen_ns) and \
            self.previous_sent_ns - self.slack_ns <= self.recorded_ns <= self.seen_ns


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def link_delivery(before: list[dict], after: list[dict], regions: dict[str, str] | None = None,
                  images: dict[str, int] | None = None) -> dict:
    """How late the cluster's links delivered what crossed them between two
    ``GET /georeg/v1/links`` snapshots: bytes, chunks, lateness percentiles
    (as bucket upper bounds, ms; None past the last bound) over all links and
    for the worst three, and how often a receiver's full socket held a chunk.

    With ``regions`` (node name → region), also the bytes per region pair
    (``by_region_pair``): a link ``a -> b`` carries ``a``'s connections to
    ``b``, whose replies (events, blobs) are most of it, so its bytes count
    for ``region(b) -> region(a)``, the way the content went; requests and
    acknowledgements ride along. ``images`` (region → images pushed there)
    turns them into bytes per image pushed in the pair's source region, which
    is what one WAN copy per region shows in."""
    earlier = {link["name"]: link for link in before}
    bounds: list[float] = []
    total: list[int] = []
    per_link = []
    delivered = held = 0
    by_pair: dict[tuple[str, str], int] = {}
    for link in after:
        was = earlier.get(link["name"], {})
        counts = [n - m for n, m in zip(link["lateness_counts"],
                                        was.get("lateness_counts") or [0] * len(link["lateness_counts"]),
                                        strict=True)]
        bounds = link["lateness_bounds_ms"]
        total = [a + b for a, b in zip(total, counts, strict=True)] if total else counts
        moved = link["bytes"] - was.get("bytes", 0)
        delivered += moved
        if regions is not None and link.get("from") in regions and link.get("to") in regions:
            pair = (regions[link["to"]], regions[link["from"]])
            by_pair[pair] = by_pair.get(pair, 0) + moved
        held += link["held_by_receiver"] - was.get("held_by_receiver", 0)
        if sum(counts):
            per_link.append((link["name"], counts))

    def quantile(counts: list[int], q: float) -> float | None:
        need, seen = q * sum(counts), 0
        for bound, n in zip([*bounds, None], counts, strict=True):
            seen += n
            if seen >= need:
                return bound
        return None

    worst = sorted(per_link, key=lambda item: [-n for n in reversed(item[1])])[:3]
    pairs = {}
    for (source, destination), moved in sorted(by_pair.items()):
        pushed = (images or {}).get(source, 0)
        pairs[f"{source} -> {destination}"] = {
            "wan": source != destination, "bytes": moved,
            "bytes_per_image": round(moved / pushed) if pushed else None}
    return {
        "by_region_pair": pairs,
        "bytes": delivered, "chunks": sum(total), "held_by_receiver": held,
        "lateness_ms_at_most": {"p50": quantile(total, 0.5), "p99": quantile(total, 0.99),
                                "p999": quantile(total, 0.999)} if sum(total) else None,
        "worst_links_p99_ms_at_most": {name: quantile(counts, 0.99) for name, counts in worst},
        "meaning": "how long after its modelled delivery time a chunk was written to its "
                   "receiver (the supervisor's loop was busy, or the receiver's socket was "
                   "full); lag includes it",
    }


@dataclass(frozen=True)
class PairStats:
    origin: str
    destination: str
    samples: int
    missing: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    min_ms: float
    mean_ms: float
    floor_ms: float
    floor_max_ms: float
    below_floor_ms: float
    throughput_mb_s: float
    node_ack_offset_ms: float
    wan: bool

    @property
    def p50_ratio(self) -> float | None:
        return self.p50_ms / self.floor_ms if self.floor_ms >= 1 else None

    @property
    def p99_ratio(self) -> float | None:
        return self.p99_ms / self.floor_ms if self.floor_ms >= 1 else None

    @property
    def p50_limit_ms(self) -> float:
        return 1.25 * self.floor_ms + 20 if self.wan else 50.0

    @property
    def p99_limit_ms(self) -> float:
        return 2 * self.floor_ms + 50 if self.wan else 200.0

    @property
    def met(self) -> bool:
        if self.missing:
            return False
        if self.wan:
            return self.p50_ms <= self.p50_limit_ms and self.p99_ms <= self.p99_limit_ms
        return self.p50_ms < self.p50_limit_ms and self.p99_ms < self.p99_limit_ms

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(p50_ratio=self.p50_ratio, p99_ratio=self.p99_ratio,
                    p50_limit_ms=self.p50_limit_ms, p99_limit_ms=self.p99_limit_ms, met=self.met)
        return data


LARGE_TARGET_RATIO = 1.3


@dataclass(frozen=True)
class LargeLayerStats:
    """Large-layer mode, one origin and one destination (a node, or a region:
    its last node to hold each image) over the rounds, medians of them:

    * arrival after the client's receipt of the manifest's 201 (min, max too)
      beside the physics floor (``floor.image_floor_ms``). With zone quorum,
      the layer's PUT is answered only once a second zone holds it, so the
      origin held the layer long before the ack and this floor is ≤ 0;
    * arrival after the origin held the layer (``since_held``) beside the
      bandwidth floor, one way + size ÷ B (``floor.layer_floor_ms``), and
      their ratio, the one the target (≤ 1.3) is stated on: how well the
      transfer uses the link, whatever the push did before the ack."""

    origin: str
    destination: str
    region: str
    rounds: int
    arrival_ms: float
    arrival_min_ms: float
    arrival_max_ms: float
    floor_ms: float
    since_held_ms: float
    since_held_min_ms: float
    since_held_max_ms: float
    bandwidth_floor_ms: float

    @property
    def floor_ratio(self) -> float | None:
        return self.arrival_ms / self.floor_ms if self.floor_ms >= 1 else None

    @property
    def bandwidth_ratio(self) -> float | None:
        return (self.since_held_ms / self.bandwidth_floor_ms
                if self.bandwidth_floor_ms >= 1 else None)

    @property
    def met(self) -> bool | None:
        ratio = self.bandwidth_ratio
        return None if ratio is None else ratio <= LARGE_TARGET_RATIO

    def to_json(self) -> dict:
        return asdict(self) | {"floor_ratio": self.floor_ratio,
                               "bandwidth_floor_ratio": self.bandwidth_ratio, "met": self.met}


def target_text(wan: bool) -> str:
    if wan:
        return "p50 ≤ 1.25×floor + 20 ms and p99 ≤ 2×floor + 50 ms"
    return "p50 < 50 ms and p99 < 200 ms (loopback)"


@dataclass
class LagResults:
    host: Host
    workload: dict
    cluster: dict
    fault: str | None = None
    pushes: list[ImagePush] = field(default_factory=list)
    arrivals: list[Arrival] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    verification: list[Verification] = field(default_factory=list)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    other_cpu_cores: float = 0.0
    cluster_cpu: dict = field(default_factory=dict)   # {"wall_s", "cpu_s": {process: s}}
    link_delivery: dict | None = None                 # see link_delivery()
    clocks: ClockCheck | None = None                  # the clock error of the lags

    @property
    def wan(self) -> bool:
        return bool(self.cluster.get("wan_enabled"))

    def pairs(self) -> list[PairStats]:
        order = [n["name"] for n in self.cluster["nodes"]]
        grouped: dict[tuple[str, str], list[Arrival]] = {}
        for arrival in self.arrivals:
            grouped.setdefault((arrival.origin, arrival.destination), []).append(arrival)
        missing: dict[tuple[str, str], int] = {}
        for key in self.missing:
            missing[key] = missing.get(key, 0) + 1
            grouped.setdefault(key, [])
        stats = []
        for (origin, dest), arrivals in sorted(
                grouped.items(), key=lambda kv: (order.index(kv[0][0]), order.index(kv[0][1]))):
            if not arrivals:
                stats.append(PairStats(origin, dest, 0, missing.get((origin, dest), 0),
                                       *([math.nan] * 11), wan=self.wan))
                continue
            lags = [a.lag_ms for a in arrivals]
            floors = [a.floor_ms for a in arrivals]
            span_s = (max(a.arrived_ns for a in arrivals)
                      - min(a.started_ns for a in arrivals)) / 1e9
            offsets = [(a.node_acked_ns - a.acked_ns) / NS_PER_MS for a in arrivals
                       if a.node_acked_ns]
            stats.append(PairStats(
                origin, dest, len(arrivals), missing.get((origin, dest), 0),
                p50_ms=percentile(lags, 0.50), p95_ms=percentile(lags, 0.95),
                p99_ms=percentile(lags, 0.99), max_ms=max(lags), min_ms=min(lags),
                mean_ms=statistics.fmean(lags), floor_ms=statistics.median(floors),
                floor_max_ms=max(floors),
                below_floor_ms=max(0.0, -min(a.over_floor_ms for a in arrivals)),
                throughput_mb_s=sum(a.size for a in arrivals) / span_s / 1e6 if span_s > 0 else 0,
                node_ack_offset_ms=statistics.median(offsets) if offsets else math.nan,
                wan=self.wan))
        return stats

    @property
    def large_layer(self) -> bool:
        return bool(self.workload.get("large_layer"))

    def large_layer_stats(self, by_region: bool) -> list[LargeLayerStats]:
        """Per origin → destination node, or (``by_region``) per origin →
        destination region, each round's last node of the region counting."""
        order = [n["name"] for n in self.cluster["nodes"]]
        regions = {n["name"]: n["region"] for n in self.cluster["nodes"]}
        rounds: dict[tuple[str, str], dict[str, Arrival]] = {}
        for a in self.arrivals:
            where = regions[a.destination] if by_region else a.destination
            same = rounds.setdefault((a.origin, where), {})
            if a.repository not in same or a.arrived_ns > same[a.repository].arrived_ns:
                same[a.repository] = a
        stats = []
        for (origin, where), latest in sorted(rounds.items(), key=lambda kv: (
                order.index(kv[0][0]),
                min(order.index(a.destination) for a in kv[1].values()))):
            lags = [a.lag_ms for a in latest.values()]
            held = [a.since_layer_held_ms for a in latest.values()]
            stats.append(LargeLayerStats(
                origin, where, regions.get(where, where), len(lags), statistics.median(lags),
                min(lags), max(lags), statistics.median(a.floor_ms for a in latest.values()),
                statistics.median(held), min(held), max(held),
                statistics.median(a.layer_floor_ms for a in latest.values())))
        return stats

    def verification_summary(self) -> dict | None:
        if not self.verification:
            return None
        deltas = [v.get_minus_recorded_ms for v in self.verification if v.recorded_ns and v.seen_ns]
        windows = [v.window_ms for v in self.verification if v.recorded_ns and v.seen_ns]
        return {
            "checks": len(self.verification),
            "consistent": sum(v.consistent for v in self.verification),
            "all_consistent": all(v.consistent for v in self.verification),
            "get_minus_recorded_ms": {"min": min(deltas), "median": statistics.median(deltas),
                                      "max": max(deltas)} if deltas else None,
            "observation_window_ms": {"median": statistics.median(windows),
                                      "max": max(windows)} if windows else None,
            "rule": "recorded arrival ≥ last GET not listing the tag (sent) − 5 ms and "
                    "≤ first GET listing it (answered)",
        }

    def to_json(self) -> dict:
        return {
            "host": asdict(self.host),
            "load_average_before": self.load_before, "load_average_after": self.load_after,
            "other_processes_cpu_cores": self.other_cpu_cores,
            "cluster_cpu": self.cluster_cpu,
            "link_delivery": self.link_delivery,
            "workload": self.workload,
            "cluster": self.cluster,
            "fault": self.fault,
            "floor_formula": FORMULA,
            "clocks": self.clocks.to_json() if self.clocks else None,
            "target": target_text(self.wan),
            "pairs": [p.to_json() | self._samples(p.origin, p.destination) for p in self.pairs()],
            **({"large_layer": {
                "target": f"arrival after the layer was held ≤ {LARGE_TARGET_RATIO:g} × "
                          "(one way + size ÷ B)",
                "nodes": [s.to_json() for s in self.large_layer_stats(by_region=False)],
                "regions": [s.to_json() for s in self.large_layer_stats(by_region=True)],
            }} if self.large_layer else {}),
            "verification": self.verification_summary(),
            "verification_checks": [asdict(v) | {"consistent": v.consistent,
                                                 "get_minus_recorded_ms": v.get_minus_recorded_ms}
                                    for v in self.verification],
            "images": len(self.pushes),
            "push_timelines": [_timeline(p) for p in self.pushes],
        }

    def _samples(self, origin: str, destination: str) -> dict:
        mine = [a for a in self.arrivals if (a.origin, a.destination) == (origin, destination)]
        return {"lags_ms": [a.lag_ms for a in mine], "floors_ms": [a.floor_ms for a in mine],
                "since_layer_held_ms": [a.since_layer_held_ms for a in mine],
                "layer_floors_ms": [a.layer_floor_ms for a in mine]}

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(_finite(self.to_json()), indent=2, allow_nan=False) + "\n")


def _timeline(push: ImagePush) -> dict:
    """One push, every time in ms relative to its acknowledgement (``acked_ns``,
    the client's clock, to line a push up with the nodes' logs)."""
    def rel(ns: int) -> float:
        return round((ns - push.acked_ns) / NS_PER_MS, 3)
    return {"origin": push.origin, "repository": push.repository, "size": push.size,
            "acked_ns": push.acked_ns, "started_ms": rel(push.started_ns),
            "manifest_sent_ms": rel(push.manifest_sent_ns), "manifest_size": push.manifest_size,
            "blobs": [{"size": b.size, "patch_sent_ms": rel(b.first_sent_ns),
                       "put_sent_ms": rel(b.sent_ns), "acked_ms": rel(b.acked_ns)}
                      for b in push.blobs]}


def _finite(value):
    """NaN (no sample) becomes null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"


def _below(pair: PairStats, clocks: ClockCheck | None) -> str:
    text = _ms(pair.below_floor_ms)
    error = clocks.error_ms if clocks else None
    if error is not None and pair.below_floor_ms > error:
        return f"[red]{text}[/red]"
    return text


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _print_large_layer(results: LagResults, console: Console) -> None:
    for by_region in (True, False):
        table = Table(title=f"large layer: arrival at each destination "
                            f"{'region (its last node)' if by_region else 'node'} − origin's ack "
                            "(ms), median of the rounds",
                      caption=("after ack: arrival − the client's receipt of the manifest's 201 "
                               "(floor: the physics floor, ≤ 0 when zone quorum held the layer's "
                               "PUT)\nsince held: arrival − the layer's PUT ?digest= sent; bw "
                               "floor: one way + size ÷ B\ntarget: since held ≤ "
                               f"{LARGE_TARGET_RATIO:g} × bw floor") if not by_region else None,
                      caption_justify="left")
        for name in ("origin → destination", "n", "after ack", "min", "max", "floor",
                     "since held", "min ", "max ", "bw floor", "ratio", "target"):
            table.add_column(name, justify="left" if name.startswith("origin") else "right")
        for s in results.large_layer_stats(by_region):
            met = {True: "[green]✓[/green]", False: "[red]✗[/red]", None: "—"}[s.met]
            table.add_row(f"{s.origin} → {s.destination}", str(s.rounds), _ms(s.arrival_ms),
                          _ms(s.arrival_min_ms), _ms(s.arrival_max_ms), _ms(s.floor_ms),
                          _ms(s.since_held_ms), _ms(s.since_held_min_ms), _ms(s.since_held_max_ms),
                          _ms(s.bandwidth_floor_ms), _ratio(s.bandwidth_ratio), met)
        console.print(table)
    missing = len(results.missing)
    if missing:
        console.print(f"[red]{missing} image copies never arrived[/red]")


def print_table(results: LagResults, console: Console | None = None) -> None:
    console = console or Console()
    load = " ".join(f"{x:.2f}" for x in results.load_before)
    console.print(f"[bold]machine[/bold]  {results.host.describe()} · load average before "
                  f"{load}, other processes used {results.other_cpu_cores:.2f} cores meanwhile")
    w = results.workload
    size = w["layer_bytes"]
    layer = f"{size // (1 << 20)} MiB" if size % (1 << 20) == 0 else f"{size // 1024} KiB"
    mode = (f"modelled WAN ({results.cluster['bandwidth_mbps']:g} Mbps per direction)"
            if results.wan else "loopback, no modelled WAN")
    console.print(f"[bold]workload[/bold] {len(results.pushes)} images ({w['layers']} × {layer} "
                  f"layers + config), {w['rate_per_origin']:g}/s per origin · {mode}")
    if results.fault:
        console.print(f"[bold yellow]fault[/bold yellow]    {results.fault}")
    table = Table(title="replication lag: arrival at the destination − origin's ack (ms)",
                  caption=f"{FORMULA}\ntarget: {target_text(results.wan)}",
                  caption_justify="left")
    for name, justify in (("origin → destination", "left"), ("n", "right"), ("p50", "right"),
                          ("p95", "right"), ("p99", "right"), ("max", "right"),
                          ("floor", "right"), ("below", "right"), ("p50/floor", "right"),
                          ("p99/floor", "right"),
                          ("target", "center"), ("MB/s", "right"), ("node ack", "right")):
        table.add_column(name, justify=justify)
    for p in results.pairs():
        n = str(p.samples) + (f" [red](−{p.missing})[/red]" if p.missing else "")
        table.add_row(f"{p.origin} → {p.destination}", n, _ms(p.p50_ms), _ms(p.p95_ms),
                      _ms(p.p99_ms), _ms(p.max_ms), _ms(p.floor_ms), _below(p, results.clocks),
                      _ratio(p.p50_ratio),
                      _ratio(p.p99_ratio), "[green]✓[/green]" if p.met else "[red]✗[/red]",
                      f"{p.throughput_mb_s:.2f}", _ms(p.node_ack_offset_ms))
    if results.large_layer:
        _print_large_layer(results, console)
    else:
        console.print(table)
    console.print("[dim]floor: the least any protocol could do on the modelled link (median of "
                  "the images'); below: the most an image's lag fell under its own floor (ms; red "
                  "beyond the clock error). node ack: the origin's own acknowledgement stamp − the "
                  "client's receipt of the 201, median (ms). MB = 10⁶ bytes.[/dim]")
    clocks = results.clocks
    if clocks is not None:
        error = clocks.error_ms
        console.print("[bold]clocks[/bold] " + (
            f"error ≤ {error:.2f} ms: every node's clock bracketed against the benchmark's by "
            f"Health probes before and after (same CLOCK_REALTIME), wall clock adjusted "
            f"{clocks.adjusted_ns / NS_PER_MS:.3f} ms meanwhile" if error is not None else
            f"[yellow]unknown[/yellow]: {', '.join(clocks.unknown)} did not tell their clock"))
    if results.cluster_cpu.get("cpu_s"):
        wall = results.cluster_cpu["wall_s"]
        busiest = sorted(results.cluster_cpu["cpu_s"].items(), key=lambda kv: -kv[1])
        total = sum(v for _, v in busiest)
        console.print(f"[bold]cluster CPU[/bold] {total / wall:.2f} cores over {wall:.0f} s of "
                      "pushing and replicating: " + ", ".join(
                          f"{name} {seconds / wall:.2f}" for name, seconds in busiest[:5]))
    links = results.link_delivery
    if links and links["lateness_ms_at_most"]:
        late = links["lateness_ms_at_most"]

        def at_most(ms: float | None) -> str:
            return f"≤ {ms:g} ms" if ms is not None else "more than 2 s"

        worst = ", ".join(f"{name} {at_most(ms)}" for name, ms
                          in links["worst_links_p99_ms_at_most"].items())
        console.print(f"[bold]links[/bold] {links['bytes'] / 1e6:,.0f} MB crossed; chunks reached "
                      f"their receivers {at_most(late['p50'])} after their modelled time at the "
                      f"median, {at_most(late['p99'])} at p99 (worst links at p99: {worst}); a "
                      f"receiver's full socket held a due chunk {links['held_by_receiver']:,} "
                      "times. Lag includes this lateness: it is the machine, not the model.")
    pairs = {name: pair for name, pair in ((links or {}).get("by_region_pair") or {}).items()
             if pair["wan"] and pair["bytes_per_image"]}
    if pairs:
        console.print("[bold]WAN bytes per image pushed in the source region[/bold] (source -> "
                      "destination; everything on the links, both directions): " + ", ".join(
                          f"{name} {pair['bytes_per_image'] / 1e6:.2f} MB"
                          for name, pair in pairs.items()))
    summary = results.verification_summary()
    if summary:
        d, window = summary["get_minus_recorded_ms"], summary["observation_window_ms"]
        verdict = "[green]consistent[/green]" if summary["all_consistent"] else "[red]INCONSISTENT[/red]"
        detail = (f"GET-observed − recorded: min {d['min']:.2f}, median {d['median']:.2f}, max "
                  f"{d['max']:.2f} ms; poll window median {window['median']:.2f} ms"
                  if d else "no observations")
        console.print(f"[bold]verification[/bold] {summary['consistent']}/{summary['checks']} "
                      f"recorded arrivals within the real-GET observation window: {verdict} "
                      f"({detail})")
