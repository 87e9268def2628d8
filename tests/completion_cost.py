"""What waiting on many images costs: replication completion on a small cluster.

    .venv/bin/python -m tests.completion_cost [--images 1000] [--window 20]

Not a test (pytest does not collect it): a measurement, printed as a table.
One in-process cluster of two regions (eastus, westeurope: one node each,
real gRPC on loopback through the harness's TCP links; anti-entropy off, so
nothing else runs), every node's CPU in this process. westeurope is cut off
from eastus one way: it answers questions but never receives, so every image
stays pending there and is asked about for as long as it is waited on. The
images are put in eastus through its ``Registry`` (a config and a layer each).

Reported, as CPU of this process (every node, link and thread, all busy
because of the waits) per second of wall time, above the same cluster idle:

* ``idle``: no waits (the baseline, subtracted from the rest);
* ``ramp``: the first ``RAMP_S`` after N waits begin (each image asked at
  0.25 s, then 0.5, 1, 2, 4 s intervals);
* ``steady``: the next ``--window`` seconds (each image asked every 4 s);
* the calls and images asked per second in each phase (the metrics);

and, for scale, one round of questions about all N images asked of
westeurope as one ``GetImageStatuses`` call against N ``GetImageStatus``
calls (16 at once), as CPU of the whole process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from registry_node.app import REPLICATION_COMPLETION
from registry_node.reference import Digest
from replicator.topology import ReplicationSettings

from .helpers import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, descriptor, digest_of
from .replication_harness import InProcessCluster

RAMP_S = 8.0
IDLE_S = 10.0


async def _chunks(data: bytes):
    yield data


async def fill(registry, images: int) -> list[str]:
    digests = []
    for i in range(images):
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": i}).encode()
        layer = f"layer of image {i}".encode()
        for blob in (config, layer):
            await registry.put_blob("cost/app", Digest.parse(digest_of(blob)), _chunks(blob),
                                    len(blob))
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": descriptor(config, OCI_CONFIG),
                           "layers": [descriptor(layer, OCI_LAYER)]}).encode()
        await registry.put_manifest("cost/app", f"v{i}", body, OCI_MANIFEST)
        digests.append(digest_of(body))
    return digests


def _asked(cluster: InProcessCluster) -> tuple[float, float]:
    """Calls and images eastus's completion asked westeurope, so far."""
    metrics = cluster.nodes["eastus"].replication.metrics
    calls = sum(metrics.completion_requests.labels("westeurope", call)._value.get()
                for call in ("batch", "single"))
    return calls, metrics.completion_images.labels("westeurope")._value.get()


async def _phase(cluster: InProcessCluster, seconds: float) -> dict[str, float]:
    cpu, wall, (calls, images) = time.process_time(), time.monotonic(), _asked(cluster)
    await asyncio.sleep(seconds)
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    after_calls, after_images = _asked(cluster)
    return {"cpu": cpu / wall, "calls": (after_calls - calls) / wall,
            "images": (after_images - images) / wall}


async def one_round(cluster: InProcessCluster, digests: list[str]) -> tuple[float, float]:
    """CPU seconds of asking westeurope about every image once: batched, and one by one."""
    client = next(c for c in cluster.nodes["eastus"].replication.clients
                  if c.name == "westeurope")
    images = [("cost/app", d) for d in digests]
    cpu = time.process_time()
    for first in range(0, len(images), 1000):
        await client.image_statuses(images[first:first + 1000], 30.0)
    batched = time.process_time() - cpu
    gate = asyncio.Semaphore(16)

    async def one(repository: str, digest: str):
        async with gate:
            return await client.image_status_ref(repository, digest, "", 30.0)

    cpu = time.process_time()
    await asyncio.gather(*(one(r, d) for r, d in images))
    return batched, time.process_time() - cpu


async def measure(images: int, window: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="georeg-completion-cost-") as tmp:
        cluster = await InProcessCluster(
            Path(tmp), [("eastus", ""), ("westeurope", "")],
            settings=ReplicationSettings(anti_entropy_interval_s=3600)).start()
        try:
            await cluster.wait_ready()
            cluster.partition("westeurope", "eastus", one_way=True)
            east = cluster.nodes["eastus"]
            digests = await fill(east.registry, images)
            await asyncio.sleep(2.0)      # the pushes' own work done
            idle = await _phase(cluster, IDLE_S)
            completion = east.runner.app[REPLICATION_COMPLETION]
            waits = [asyncio.ensure_future(completion.wait("cost/app", d, deadline_s=3600))
                     for d in digests]
            ramp = await _phase(cluster, RAMP_S)
            steady = await _phase(cluster, window)
            pending = sum(not w.done() for w in waits)
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            batched, single = await one_round(cluster, digests)
            return {"images": images, "pending": pending, "idle": idle, "ramp": ramp,
                    "steady": steady, "round_batched_s": batched, "round_single_s": single}
        finally:
            await cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000])
    parser.add_argument("--window", type=float, default=20.0)
    args = parser.parse_args()
    print(f"{'images':>7} {'phase':>7} {'CPU % of a core':>16} {'above idle':>11} "
          f"{'calls/s':>8} {'images asked/s':>15}")
    for n in args.images:
        row = asyncio.run(measure(n, args.window))
        base = row["idle"]["cpu"]
        for phase in ("idle", "ramp", "steady"):
            p = row[phase]
            print(f"{n:>7} {phase:>7} {100 * p['cpu']:>16.1f} {100 * (p['cpu'] - base):>11.1f} "
                  f"{p['calls']:>8.2f} {p['images']:>15.0f}")
        print(f"{n:>7} one round of all images asked of westeurope: "
              f"{1000 * row['round_batched_s']:.0f} ms CPU batched, "
              f"{1000 * row['round_single_s']:.0f} ms CPU one call per image "
              f"({row['pending']} still pending when the waits were cancelled)")


if __name__ == "__main__":
    main()
