"""How long a paused node (``georeg fault pause``: SIGSTOP, sockets open,
nothing answers) keeps its global endpoint's clients before they move.

    .venv/bin/python -m tests.pause_failover [--runs 10]

Not a test (pytest does not collect it): a measurement, printed as a table.
A cluster of eastus (home), westeurope and westus,
each with its paired copy (auth on), runs as real node processes. Each run
pauses eastus, and the time from the pause to an answer from another node
through eastus's global endpoint is the run's failover time, for two
clients: one that asks ``GET /v2/`` every 50 ms and gives up on each request
after 250 ms, and one that sends a single request right after the pause (to
eastus: routing does not know yet) and waits for its answer. Then eastus is resumed and the
next run starts once routing sends eastus's clients home again, after a
random part of the health checks' period (a failure does not wait for it). Reported:
median and max over the runs, and the CPU load of the machine meanwhile
(the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from cluster.control import spec as specs
from cluster.control.supervisor import HEALTH_INTERVAL_S
from cluster.testing import RunningCluster

SPEC = {"home_region": "eastus", "replicas": [{"region": "westeurope"}, {"region": "westus"}]}


async def answered_by(http: aiohttp.ClientSession, url: str, timeout: float) -> str | None:
    """Which node answers ``GET /v2/`` through ``url`` now; None if nothing
    answers within ``timeout`` (a client giving up on a silent node)."""
    try:
        async with http.get(f"{url}/v2/", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return r.headers.get("X-Georeg-Replica") if r.status == 200 else None
    except (TimeoutError, aiohttp.ClientError):
        return None


async def one_run(running: RunningCluster, http: aiohttp.ClientSession,
                  rng: random.Random, patient: bool) -> float:
    east = running.endpoint("eastus")
    deadline = time.monotonic() + 30
    while await answered_by(http, east, 2.0) != "eastus":     # home again
        if time.monotonic() > deadline:
            raise RuntimeError("eastus did not come back")
        await asyncio.sleep(0.05)
    # At a random point of the health checks' period, as a real failure comes.
    await asyncio.sleep(rng.uniform(0, HEALTH_INTERVAL_S))
    fault = await asyncio.to_thread(running.inject, "pause", region="eastus")
    paused_at = time.monotonic()
    try:
        if patient:         # one request, sent to eastus before routing knows
            served = await answered_by(http, east, 30)
            if served in (None, "eastus"):
                raise RuntimeError(f"the waiting request was answered by {served}")
            return time.monotonic() - paused_at
        while (await answered_by(http, east, 0.25)) in (None, "eastus"):
            if time.monotonic() - paused_at > 30:
                raise RuntimeError("clients never moved")
            await asyncio.sleep(0.05)
        return time.monotonic() - paused_at
    finally:
        await asyncio.to_thread(running.heal, fault.id)


async def measure(running: RunningCluster, runs: int, patient: bool) -> list[float]:
    async with running.http() as http:
        rng = random.Random(runs)
        return [await one_run(running, http, rng, patient) for _ in range(runs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, \
            RunningCluster(specs.parse(SPEC), Path(tmp)) as running:
        for patient, what in ((False, "a client retrying every 250 ms"),
                              (True, "a request sent to eastus, waiting")):
            load_before = os.getloadavg()[0]
            times = asyncio.run(measure(running, args.runs, patient))
            load_after = os.getloadavg()[0]
            print(f"pause eastus → answered elsewhere: {what} ({args.runs} runs)")
            print(f"  median {statistics.median(times):.2f} s   max {max(times):.2f} s   "
                  f"min {min(times):.2f} s")
            print(f"  every run: {', '.join(f'{t:.2f}' for t in times)}")
            print(f"  load average (1 min) {load_before:.2f} before, {load_after:.2f} after, "
                  f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
