"""Soak (``make soak``): rounds of pushes and pulls through the global
endpoints of a small cluster, with every node's resident memory read after
each round once the cluster is idle and converged again. A node whose memory
keeps climbing round after round leaks; one that grows during a round and
returns to its level does not. Not part of ``make test``: it runs for about
ten minutes here."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest

from cluster.bench.procfs import MIB, rss_bytes
from cluster.testing import SMALL_SPEC, RunningCluster

from .helpers import digest_of, make_image, push_image, verified_clean

ROUNDS = int(os.environ.get("GEOREG_SOAK_ROUNDS", "12"))
IMAGES_PER_ROUND = 40
# Growth allowed from the second round's level to the last (allocator noise,
# caches that fill once); a leak of a few KiB per request exceeds it.
GROWTH_ALLOWED_MIB = 12


async def _round(running: RunningCluster, endpoints: list[str], number: int) -> None:
    async with running.http() as session:
        async def one(i: int) -> None:
            base = endpoints[i % len(endpoints)]
            image = make_image([256 * 1024, 64 * 1024, 4096], seed=number * 1000 + i)
            repo = f"soak/app{i % 4}"
            await push_image(session, base, repo, image, tag=f"r{number}-{i}")
            async with session.get(f"{base}/v2/{repo}/manifests/r{number}-{i}",
                                   headers={"Accept": image.media_type}) as r:
                assert r.status == 200, await r.text()
            for blob in image.blobs:
                async with session.get(f"{base}/v2/{repo}/blobs/{digest_of(blob)}") as r:
                    assert r.status == 200
                    await r.read()

        for start in range(0, IMAGES_PER_ROUND, 8):
            await asyncio.gather(*(one(i) for i in range(start, start + 8)))


@pytest.mark.soak
def test_node_memory_levels_off_under_repeated_load() -> None:
    with tempfile.TemporaryDirectory(prefix="georeg-soak-") as tmp, \
            RunningCluster(SMALL_SPEC, Path(tmp)) as running:
        endpoints = [running.endpoint(r) for r in ("eastus", "westeurope")]
        history: dict[str, list[float]] = {}
        for number in range(ROUNDS):
            running.run(lambda n=number: _round(running, endpoints, n), timeout=600)
            verified_clean(running, 300, f"convergence after round {number}")
            pids = {name: node.pid for name, node in
                    running.cluster.supervisor.nodes.items() if node.pid}
            for name, pid in pids.items():
                history.setdefault(name, []).append(rss_bytes(pid) / MIB)
        grown = {name: levels for name, levels in history.items()
                 if levels[-1] - levels[1] > GROWTH_ALLOWED_MIB}
        table = "\n".join(f"{name}: " + " ".join(f"{v:.0f}" for v in levels)
                          for name, levels in sorted(history.items()))
        assert not grown, f"resident memory (MiB) per round keeps growing:\n{table}"
        print(f"resident memory (MiB) per round:\n{table}")
