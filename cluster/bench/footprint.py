"""`georeg bench footprint`: what a cluster costs the machine it runs on.

Starts a cluster (the default spec unless ``--config``), and reports:

* startup: from the first process spawned to every node healthy, and to every
  node subscribed to every peer and writable (what `georeg up` waits for);
* idle CPU: over a quiet window after startup, each process's CPU time (user
  plus system, from ``/proc``) divided by the window — per node, and the
  whole cluster including the supervisor (links, endpoints, health checks);
* memory: each node's resident set (VmRSS) at the end of the idle window;
  with ``--after-images N``, again ``--settle`` seconds after N images (a
  config and three 1 MiB layers each) were pushed through the global
  endpoints in turn and their blobs pulled back — what a node keeps once a
  busy moment is over, which is what "idle" means for a registry in use.

Startup is measured ``--repeat`` times (a fresh data dir each time) and the
median reported; the machine's load average is printed beside the figures.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..control import spec as specs
from ..control.cluster import Cluster
from ..testing import on_any_ports
from .lag import prepare
from .procfs import MIB, cpu_seconds, rss_bytes
from .workload import Client, RandomBytes, open_session, run_concurrently

# The figures last measured with this command (docs/benchmarks.md, "Startup,
# idle cost and memory"), which deployments size their requests from
# (``cluster.deploy``): a node's resident set after a workload, the worst
# seen; and the whole default cluster's idle CPU (8 nodes, 2 paired copies,
# the supervisor), as a fraction of one core. Measure again when they move.
MEASURED_NODE_RSS_MIB = 82.4
MEASURED_CLUSTER_IDLE_CPU = 0.032
MEASURED_CLUSTER_PROCESSES = 11


async def _start(spec: specs.ClusterSpec, data_dir: Path) -> tuple[Cluster, float, float]:
    """A started cluster, with the seconds it took to every node healthy and to
    ready, as the cluster measured them (a range of ports found in use and
    left for another is not counted)."""
    cluster = await Cluster.start(spec, data_dir)
    assert cluster.healthy_after_s is not None and cluster.ready_after_s is not None
    return cluster, cluster.healthy_after_s, cluster.ready_after_s


async def measure(spec: specs.ClusterSpec, repeat: int, idle_s: float,
                  after_images: int = 0, settle_s: float = 25.0) -> dict:
    spec = on_any_ports(spec)
    healthy, ready = [], []
    result: dict = {}
    for run in range(repeat):
        with tempfile.TemporaryDirectory(prefix="georeg-footprint-") as tmp:
            cluster, to_healthy, to_ready = await _start(spec, Path(tmp))
            healthy.append(to_healthy)
            ready.append(to_ready)
            if run == repeat - 1:
                result = await _idle(cluster, idle_s)
                if after_images:
                    result["after"] = await _after_workload(cluster, after_images, settle_s)
            await cluster.stop()
    result["startup_healthy_s"] = statistics.median(healthy)
    result["startup_ready_s"] = statistics.median(ready)
    result["startup_runs"] = {"healthy_s": healthy, "ready_s": ready}
    result["load_average"] = os.getloadavg()
    return result


async def _idle(cluster: Cluster, idle_s: float) -> dict:
    await asyncio.sleep(2.0)  # let start-up work (first anti-entropy rounds) pass
    pids = {name: node.pid for name, node in cluster.supervisor.nodes.items() if node.pid}
    pids["supervisor"] = os.getpid()
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.monotonic()
    await asyncio.sleep(idle_s)
    window = time.monotonic() - started
    cpu = {name: (cpu_seconds(pid) - before[name]) / window for name, pid in pids.items()}
    rss = {name: rss_bytes(pid) for name, pid in pids.items()}
    return {"idle_window_s": window, "idle_cpu": cpu, "rss": rss}


@dataclass(frozen=True)
class _Endpoint:
    name: str
    url: str
    pid: int = 0


async def _after_workload(cluster: Cluster, images: int, settle_s: float) -> dict:
    endpoints = [_Endpoint(f"global@{e.region}", e.url) for e in cluster.endpoints()
                 if e.kind == "global"]
    content = RandomBytes(seed=7)
    credentials = {}
    if cluster.spec.auth_enabled:          # the workload is a client: it logs in as admin
        login = await cluster.access.admin_login()
        if login is None:
            raise RuntimeError("the workload logs in as the admin user, which is disabled")
        credentials = login.headers()
    started = time.monotonic()
    async with open_session(8, cluster.tls.client if cluster.tls else None,
                            credentials) as session:
        clients = [Client(e, session) for e in endpoints]

        async def one(i: int) -> None:
            client = clients[i % len(clients)]
            image = prepare(content, f"footprint/app{i % 4}", layers=3, layer_bytes=MIB)
            for digest, data in image.blobs:
                await client.push_blob(image.repository, digest, data, len(data))
            await client.push_manifest(image.repository, f"v{i}", image.manifest)
            for digest, data in image.blobs:
                await client.pull_blob(image.repository, digest, len(data))

        await run_concurrently(range(images), 8, one)
    workload_s = time.monotonic() - started
    await asyncio.sleep(settle_s)  # a settling window, then a reading: not a wait for a condition
    pids = {name: node.pid for name, node in cluster.supervisor.nodes.items() if node.pid}
    return {"images": images, "workload_s": workload_s, "settle_s": settle_s,
            "rss": {name: rss_bytes(pid) for name, pid in pids.items()}}


def run(config: Path | None, repeat: int, idle_s: float, after_images: int = 0,
        settle_s: float = 25.0) -> dict:
    spec = specs.load(config)
    result = asyncio.run(measure(spec, repeat, idle_s, after_images, settle_s))
    console = Console()
    load = ", ".join(f"{x:.2f}" for x in result["load_average"])
    console.print(f"[bold]georeg cluster footprint[/] ({spec.node_count()} nodes + "
                  f"{len(spec.paired_regions())} paired copies; load average {load})")
    console.print(f"startup to all healthy: {result['startup_healthy_s']:.2f} s, to all subscribed "
                  f"and writable: {result['startup_ready_s']:.2f} s (median of {repeat})")
    after = result.get("after", {}).get("rss")
    table = Table("process", "idle CPU", "RSS", *(["RSS after workload"] if after else []))
    for name in sorted(result["rss"], key=lambda n: (n == "supervisor", n)):
        table.add_row(name, f"{result['idle_cpu'][name]:.2%}", f"{result['rss'][name] / MIB:.1f} MiB",
                      *([f"{after[name] / MIB:.1f} MiB" if name in after else "-"] if after else []))
    total = sum(result["idle_cpu"].values())
    table.add_row("[bold]whole cluster[/]", f"[bold]{total:.2%}[/] of one core",
                  f"{sum(result['rss'].values()) / MIB:.0f} MiB",
                  *([f"{sum(after.values()) / MIB:.0f} MiB (nodes)"] if after else []))
    console.print(table)
    console.print(f"idle CPU over {result['idle_window_s']:.1f} s; machine: {os.cpu_count()} cores")
    if after:
        a = result["after"]
        console.print(f"RSS after workload: {a['settle_s']:.0f} s after {a['images']} images of 3 MiB "
                      f"were pushed through the global endpoints and pulled back "
                      f"({a['workload_s']:.1f} s); nodes {min(after.values()) / MIB:.1f}-"
                      f"{max(after.values()) / MIB:.1f} MiB")
    return result
