"""``georeg bench replication``: how fast replication moves 1 MiB layers from
one node to another, beside how fast that node takes the same layers from a
client.

Two single-node regions (A = eastus, B = westeurope; no paired-region copies),
on loopback without the modelled WAN unless asked, in a child process
(``clusterproc``). Three phases, each with its own ``layers`` distinct layers:

    push      B cut off from A (a partition): the client pushes the layers to A at
              concurrency 8 (``workload.Client.push_layers``, as ``bench node``).
              → A's push throughput, nothing else running.
    catch-up  the partition heals; B fetches everything it missed.
              → replication throughput = bytes ÷ (last byte in − first byte in),
              read from B's ``georeg_replication_bytes_total{direction="in"}``,
              polled every 20 ms.
    live      link up: the client pushes new layers to A while B replicates them.
              → A's push throughput under replication, and B's throughput
              = bytes ÷ (B has them all − push start).

Target (the replication issue): catch-up throughput ≥ 0.5 × A's push
throughput. MB = 10⁶ bytes. Reported, never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
from rich.console import Console
from rich.table import Table

from ..control import spec as specs
from ..testing import on_any_ports
from .clusterproc import ClusterProcess
from .lag_report import Host, host
from .procfs import MIB
from .workload import Client, RandomBytes, Sample, open_session

POLL_S = 0.02
TARGET_RATIO = 0.5


@dataclass(frozen=True)
class ReplicationBenchOptions:
    layers: int = 256
    layer_bytes: int = MIB
    concurrency: int = 8
    wan: bool = False
    workdir: Path | None = None
    timeout_s: float = 300.0
    seed: int = 2


@dataclass
class ReplicationResults:
    host: Host
    workload: dict
    push: Sample | None = None
    catch_up_mb_s: float = 0.0
    catch_up_s: float = 0.0
    live_push: Sample | None = None
    live_replication_mb_s: float = 0.0
    live_lag_after_push_s: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        return self.catch_up_mb_s / self.push.value if self.push and self.push.value else None

    def to_json(self) -> dict:
        return {"host": asdict(self.host), "workload": self.workload,
                "load_average_before": self.load_before,
                "push_mb_s": self.push.value if self.push else None,
                "catch_up_mb_s": self.catch_up_mb_s, "catch_up_s": self.catch_up_s,
                "ratio": self.ratio, "target": f"≥ {TARGET_RATIO:g}×",
                "met": self.ratio is not None and self.ratio >= TARGET_RATIO,
                "live_push_mb_s": self.live_push.value if self.live_push else None,
                "live_replication_mb_s": self.live_replication_mb_s,
                "live_lag_after_push_s": self.live_lag_after_push_s,
                "samples": {"push": asdict(self.push) if self.push else None,
                            "live_push": asdict(self.live_push) if self.live_push else None}}

    def print(self, console: Console) -> None:
        w = self.workload
        console.print(f"[bold]machine[/bold]  {self.host.describe()} · load average before "
                      + " ".join(f"{x:.2f}" for x in self.load_before))
        table = Table(title=f"replication A → B vs push to A: {w['layers']} × "
                            f"{w['layer_bytes'] // 1024} KiB layers, c={w['concurrency']}, "
                            f"{'modelled WAN' if w['wan'] else 'loopback'} (MB = 10⁶ bytes)")
        for name, justify in (("measurement", "left"), ("MB/s", "right"), ("÷ push", "right"),
                              ("target", "center")):
            table.add_column(name, justify=justify)
        push = self.push.value if self.push else 0.0
        ratio = self.ratio
        table.add_row("push to A (B cut off), client c=8", f"{push:.1f}", "1.00×", "")
        table.add_row("replication A → B, catch-up after the cut heals", f"{self.catch_up_mb_s:.1f}",
                      f"{ratio:.2f}×" if ratio else "—",
                      ("[green]✓[/green]" if ratio >= TARGET_RATIO else "[red]✗[/red]")
                      + f" ≥ {TARGET_RATIO:g}×" if ratio else "—")
        live = self.live_push.value if self.live_push else 0.0
        table.add_row("push to A while B replicates", f"{live:.1f}",
                      f"{live / push:.2f}×" if push else "—", "")
        table.add_row("replication A → B, live (push start → B has all)",
                      f"{self.live_replication_mb_s:.1f}",
                      f"{self.live_replication_mb_s / push:.2f}×" if push else "—", "")
        console.print(table)
        console.print(f"[dim]live: B had every layer {self.live_lag_after_push_s * 1000:.0f} ms "
                      f"after the last push was acknowledged[/dim]")
        for note in self.notes:
            console.print(f"[yellow]{note}[/yellow]")


def cluster_spec(options: ReplicationBenchOptions) -> specs.ClusterSpec:
    spec = specs.ClusterSpec(registry="georegbench", home_region="eastus", paired_copies=False,
                             replicas=(specs.ReplicaSpec("westeurope"),),
                             wan=specs.WanSpec(enabled=options.wan))
    spec = specs.validate(spec, "bench replication")
    return on_any_ports(spec)


@dataclass(frozen=True)
class _Target:
    name: str
    url: str
    pid: int


class BytesIn:
    """B's replication bytes received, from its Prometheus metrics."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url + "/metrics"

    async def read(self) -> float:
        async with self.session.get(self.url) as r:
            text = await r.text()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("georeg_replication_bytes_total{") and 'direction="in"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    async def wait_for(self, target: float, deadline: float) -> tuple[float, float]:
        """Poll until ``target`` bytes are in; (first time any increase was seen,
        time the target was reached), as ``time.monotonic()``."""
        base = await self.read()
        first = 0.0
        while True:
            now = time.monotonic()
            got = await self.read() - base
            if got > 0 and not first:
                first = now
            if got >= target:
                return first or now, time.monotonic()
            if now > deadline:
                raise TimeoutError(f"B received {got:.0f} of {target:.0f} bytes in time")
            await asyncio.sleep(POLL_S)  # the sampling interval of the measurement


async def run(options: ReplicationBenchOptions, console: Console | None = None) -> ReplicationResults:
    console = console or Console(stderr=True)
    with contextlib.ExitStack() as stack:
        workdir = options.workdir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="georeg-repl-")))
        spec = cluster_spec(options)
        console.print(f"[dim]starting eastus (A) and westeurope (B) in {workdir}[/dim]")
        cluster = ClusterProcess.start(spec, workdir / "cluster")
        stack.callback(cluster.stop)
        a, b = cluster.nodes
        results = ReplicationResults(host(), {
            "layers": options.layers, "layer_bytes": options.layer_bytes,
            "concurrency": options.concurrency, "wan": options.wan, "seed": options.seed})
        results.load_before = os.getloadavg()
        content = RandomBytes(options.seed)
        total = options.layers * options.layer_bytes
        deadline = lambda: time.monotonic() + options.timeout_s  # noqa: E731
        async with open_session(options.concurrency, cluster.tls,
                                cluster.registry_headers()) as session, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=cluster.tls or True),
                                      headers=cluster.internal_headers()) as probe:
            client = Client(_Target(a.name, cluster.http(a.name), cluster.pids[a.name]), session,
                            options.concurrency)
            bytes_in = BytesIn(probe, cluster.http(b.name))
            with console.status("push to A with B cut off"):
                cluster.inject("partition", a=a.region, b=b.region)
                layers = content.layers(options.layers, options.layer_bytes)
                results.push = await client.push_layers("bench/catch-up", layers)
            with console.status("B catching up"):
                waiting = asyncio.ensure_future(bytes_in.wait_for(total, deadline()))
                await asyncio.sleep(0.1)  # let the waiter take its baseline before healing
                cluster.heal_all()
                first, done = await waiting
                results.catch_up_s = done - first
                results.catch_up_mb_s = total / (done - first) / 1e6
            del layers
            with console.status("live: push to A while B replicates"):
                layers = content.layers(options.layers, options.layer_bytes)
                waiting = asyncio.ensure_future(bytes_in.wait_for(total, deadline()))
                await asyncio.sleep(0.1)  # the waiter's baseline, as above
                started = time.monotonic()
                results.live_push = await client.push_layers("bench/live", layers)
                pushed = time.monotonic()
                _, done = await waiting
                results.live_replication_mb_s = total / (done - started) / 1e6
                results.live_lag_after_push_s = max(0.0, done - pushed)
        return results


__all__ = ["ReplicationBenchOptions", "ReplicationResults", "cluster_spec", "run"]
