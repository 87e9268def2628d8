"""What a tier's bandwidth looks like to a client: one blob (100 MiB unless
told) pushed and pulled through the global endpoint of a one-region cluster
per tier, with ``[limits] limits = "tier"``, and the same cluster with limits
off (the machine's own speed, for scale).

    .venv/bin/python -m tests.bandwidth_figure [--mib 100] [--runs 1]
                                               [--tiers Basic,Standard,Premium,Premium-zones,off]

Not a test (pytest does not collect it): a measurement, printed as a table.
``Premium-zones`` is a zone-redundant Premium home region: each zone node
gets a third of the replica's budget (``cluster.control.plan.node_bandwidth``),
and one repository's transfers go to one zone. Every pull is hashed and
checked, so a fast wrong answer fails the run. The time includes the
endpoint (a pull is handed over to the node, a push spliced to it).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import tempfile
import time
from pathlib import Path

import aiohttp

from cluster.control import spec as specs
from cluster.control.cluster import Cluster
from registry_node import logs

MIB = 1 << 20


def spec_for(tier: str) -> specs.ClusterSpec:
    raw: dict = {"registry": "bandwidth", "auth": "none", "paired_copies": False,
                 "wan": {"enabled": False}, "network": {"port_base": 0}}
    if tier == "off":
        raw["tier"] = "Premium"
    elif tier == "Premium-zones":
        raw |= {"tier": "Premium", "home_zone_redundant": True, "limits": {"limits": "tier"}}
    else:
        raw |= {"tier": tier, "limits": {"limits": "tier"}}
    return specs.parse(raw, tier)


async def measure(tier: str, data: bytes, runs: int) -> list[tuple[float, float]]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with tempfile.TemporaryDirectory(prefix="georeg-bw-") as tmp:
        cluster = await Cluster.start(spec_for(tier), Path(tmp))
        try:
            await cluster.wait_ready()
            url = cluster.global_endpoint("eastus")
            timings = []
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=600)) as session:
                for run in range(runs):
                    repo = f"figure/run{run}"
                    started = time.monotonic()
                    async with session.post(f"{url}/v2/{repo}/blobs/uploads/",
                                            params={"digest": digest}, data=data) as r:
                        assert r.status == 201, await r.text()
                    pushed = time.monotonic() - started
                    started = time.monotonic()
                    pulled_hash = hashlib.sha256()
                    async with session.get(f"{url}/v2/{repo}/blobs/{digest}") as r:
                        assert r.status == 200, await r.text()
                        async for chunk in r.content.iter_chunked(1 << 20):
                            pulled_hash.update(chunk)
                    pulled = time.monotonic() - started
                    assert "sha256:" + pulled_hash.hexdigest() == digest, "pulled wrong bytes"
                    timings.append((pushed, pulled))
            return timings
        finally:
            await cluster.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--tiers", default="Basic,Standard,Premium,Premium-zones,off")
    args = parser.parse_args()
    logs.configure("console", "warning")
    data = os.urandom(args.mib * MIB)
    size_mb = len(data) / 1e6
    print(f"{args.mib} MiB blob through the global endpoint, {args.runs} run(s) each")
    print(f"{'tier':<14} {'limit down/up MB/s':>19} {'push s':>8} {'MB/s':>7} "
          f"{'pull s':>8} {'MB/s':>7}")
    for tier in args.tiers.split(","):
        spec = spec_for(tier)
        down, up = spec.limits.bandwidth(spec.tier)
        zones = len(spec.all_replicas[0].zones)
        limit = f"{down / 8 / zones:.4g}/{up / 8 / zones:.4g}" + (f" ×{zones}" if zones > 1 else "")
        for pushed, pulled in await measure(tier, data, args.runs):
            print(f"{tier:<14} {limit if down else 'off':>19} {pushed:8.2f} {size_mb / pushed:7.1f} "
                  f"{pulled:8.2f} {size_mb / pulled:7.1f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
