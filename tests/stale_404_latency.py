"""How long a node takes to answer 404 for a manifest that exists nowhere,
while one of its peers sits behind a stalled link (connection accepted,
nothing delivered: ``georeg fault link A B --stall``).

    .venv/bin/python -m tests.stale_404_latency [--requests 40] [--digest-requests 10]
                                                [--no-stall]

Not a test (pytest does not collect it): a measurement, printed as a table.
A cluster of three regions (eastus, westeurope, westus; no zones, no paired
copies, the WAN model on) runs as real node processes; once every node is
subscribed to every peer, the link between eastus and westeurope is stalled
both ways and eastus is asked, one request at a time, through its own port;
each kind of request meets a stall of its own (stalled before its first
request, healed after its last, every subscription back and every peer
heard from again before the next),
since how long a stall has lasted matters: a gRPC channel that has given up
on its connection fails a hurried call at once.

* ``HEAD tag``: a tag never pushed, a new one each time (what ``skopeo copy``
  and every push of a new tag ask first);
* ``GET tag``: the same with GET;
* ``GET digest``: a manifest digest nobody has, a new one each time.

Every answer must be 404 (anything else fails the run). Reported per kind:
the first request (the one that may meet the stall before anything else
has), the median and p99 (nearest rank: the slowest below 100 requests) of
all, the slowest, and how much CPU processes outside this cluster used
meanwhile (the machine is shared). ``--no-stall`` measures the same without
the fault: what a 404 costs with every peer answering (one round trip to
the farthest peer). Where the node reports its rescue counters
(``/georeg/v1/node``: lookup rounds, and rounds per peer that did not wait
for it), they are printed after the table.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from cluster.control import spec as specs
from cluster.testing import RunningCluster

from .helpers import eventually
from .proxy_overhead import OtherLoad

# Auth off: this measures how a node answers for content nowhere, as the
# figures in docs/ were first taken (on an open cluster); what access control
# adds to a request is tests/auth_overhead.py's to measure.
SPEC = {"home_region": "eastus", "paired_copies": False, "auth": "none",
        "replicas": [{"region": "westeurope"}, {"region": "westus"}]}
ASKED, STALLED = "eastus", "westeurope"
KINDS = ("HEAD tag", "GET tag", "GET digest")


async def _info(http: aiohttp.ClientSession, url: str) -> dict | None:
    try:
        async with http.get(f"{url}/georeg/v1/node") as r:
            return await r.json() if r.status == 200 else None
    except aiohttp.ClientError:
        return None


async def _subscribed(http: aiohttp.ClientSession, urls: list[str]) -> bool:
    for url in urls:
        info = await _info(http, url)
        if not info or not info["peers"] or not all(p["connected"] for p in info["peers"]):
            return False
    return True


async def _heard_again(http: aiohttp.ClientSession, url: str) -> bool:
    """Whether ``url``'s node has heard from every peer since the last stall
    (a node that keeps no such state has); asks it once more for a missing
    tag, unmeasured, which is how a silent peer is heard from again."""
    async with http.head(f"{url}/v2/absent/app/manifests/warm-{time.time_ns()}") as r:
        await r.read()
    info = await _info(http, url)
    return info is not None and not any(p.get("silent") for p in info["peers"])


async def _measure(http: aiohttp.ClientSession, url: str, kind: str, count: int,
                   pids: list[int]) -> dict:
    method = "HEAD" if kind == "HEAD tag" else "GET"
    other = OtherLoad(pids)
    other.start()
    started = time.monotonic()
    times: list[float] = []
    for i in range(count):
        nonce = f"{os.getpid()}-{time.time_ns()}-{i}"
        if kind == "GET digest":
            reference = "sha256:" + hashlib.sha256(nonce.encode()).hexdigest()
        else:
            reference = f"never-{nonce}"
        t0 = time.perf_counter()
        async with http.request(method, f"{url}/v2/absent/app/manifests/{reference}") as r:
            await r.read()
            status = r.status
        times.append(time.perf_counter() - t0)
        if status != 404:
            raise SystemExit(f"{kind}: {reference} answered {status}, not 404")
    window = time.monotonic() - started
    ordered = sorted(times)
    return {"kind": kind, "n": count, "first": times[0], "median": statistics.median(times),
            "p99": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
            "max": ordered[-1], "other_cores": other.seconds() / window if window else 0.0}


async def _run(running: RunningCluster, counts: dict[str, int],
               stall: bool) -> tuple[list[dict], dict | None]:
    # The cluster runs on its own thread; ``running.run`` blocks this loop only.
    urls = [running.node_url(n) for n in running.cluster.supervisor.nodes]
    url = running.node_url(ASKED)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        pids = [n.pid for n in running.cluster.supervisor.nodes.values() if n.pid]
        pids.append(os.getpid())
        rows = []
        for kind in KINDS:
            await eventually(lambda: _subscribed(http, urls), timeout=120, interval=0.2,
                             what="every node subscribed to every peer")
            fault = running.run(lambda: running.cluster.faults.inject(
                "link", a=ASKED, b=STALLED, stall=True)) if stall else None
            rows.append(await _measure(http, url, kind, counts[kind], pids))
            if fault is not None:
                running.run(lambda f=fault: running.cluster.faults.heal(f.id))
                await eventually(lambda: _heard_again(http, url), timeout=120, interval=0.2,
                                 what=f"{ASKED} hearing from {STALLED} again")
        info = await _info(http, url)
    return rows, (info or {}).get("rescue")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40, help="per tag kind")
    parser.add_argument("--digest-requests", type=int, default=10)
    parser.add_argument("--no-stall", action="store_true", help="measure without the fault")
    args = parser.parse_args()
    counts = {"HEAD tag": args.requests, "GET tag": args.requests,
              "GET digest": args.digest_requests}
    with tempfile.TemporaryDirectory(prefix="georeg-404-") as tmp:
        with RunningCluster(specs.parse(SPEC), Path(tmp)) as running:
            rows, rescue = asyncio.run(_run(running, counts, not args.no_stall))
    print(f"404 for a manifest that exists nowhere, asked of {ASKED}; "
          f"link {ASKED} <-> {STALLED} {'healthy' if args.no_stall else 'stalled'}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'request':<12} {'n':>4} {'first':>9} {'median':>9} {'p99':>9} {'max':>9} "
          f"{'other load':>11}")
    for row in rows:
        print(f"{row['kind']:<12} {row['n']:>4} {row['first'] * 1000:>7.1f}ms "
              f"{row['median'] * 1000:>7.1f}ms {row['p99'] * 1000:>7.1f}ms "
              f"{row['max'] * 1000:>7.1f}ms {row['other_cores']:>6.2f} core")
    if rescue is not None:
        print(f"{ASKED}'s rescue: {rescue}")


if __name__ == "__main__":
    main()
