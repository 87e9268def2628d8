"""What one garbage-collection pass costs on a node holding N images and no garbage.

    .venv/bin/python -m tests.gc_idle_cost [--images 0 1000 10000] [--passes 5]

Not a test (pytest does not collect it): a measurement, printed as a table.
For each N, a fresh node in this process (its real metadata store and blob
store in a temporary dir, fsync off) gets N images in 100 repositories
through its ``Registry``: each image its own config and layer, every image
also one base layer shared by all, the manifest PUT by tag. Its clocks are
then moved past the GC grace, so every blob is old enough to go and only its
references keep it. Reported: the CPU (this process, every thread) of the
first pass after the grace (it may do once-per-process work) and the median
of the next ``--passes`` passes (what the node spends every ``interval_s``
while idle), and that no pass reclaimed anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from registry_node.config import NodeConfig
from registry_node.gc import GarbageCollector
from registry_node.node import Node
from registry_node.reference import Digest

from .helpers import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, ManualClock, descriptor, digest_of

GRACE_S = 3600.0
REPOSITORIES = 100
BASE_LAYER = b"base layer shared by every image"


async def _chunks(data: bytes):
    yield data


async def fill(node: Node, images: int) -> None:
    registry = node.registry
    for i in range(images):
        repo = f"scale/r{i % REPOSITORIES:03d}"
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": i}).encode()
        layer = f"layer of image {i}".encode()
        for blob in (config, layer, BASE_LAYER):
            await registry.put_blob(repo, Digest.parse(digest_of(blob)), _chunks(blob), len(blob))
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": descriptor(config, OCI_CONFIG),
                           "layers": [descriptor(BASE_LAYER, OCI_LAYER),
                                      descriptor(layer, OCI_LAYER)]}).encode()
        await registry.put_manifest(repo, f"v{i}", body, OCI_MANIFEST)


async def measure(images: int, passes: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="georeg-gc-cost-") as tmp:
        clock = ManualClock()
        node = Node.open(NodeConfig(data_dir=Path(tmp) / "node", region="eastus", sync=False),
                         wall_ns=clock.wall_ns, monotonic=clock.monotonic)
        try:
            started = time.perf_counter()
            await fill(node, images)
            filled_s = time.perf_counter() - started
            node.meta.flush()
            gc = GarbageCollector(node.registry, grace_s=GRACE_S, upload_ttl_s=GRACE_S,
                                  interval_s=60)
            clock.advance(GRACE_S + 1)
            cpu: list[float] = []
            reclaimed = 0
            for _ in range(passes + 1):
                before = time.process_time()
                report = await gc.collect()
                cpu.append(time.process_time() - before)
                reclaimed += report.blobs_reclaimed + report.uploads_expired
                clock.advance(60)
            return {"images": images, "fill_s": filled_s, "first_ms": cpu[0] * 1000,
                    "idle_ms": statistics.median(cpu[1:]) * 1000, "reclaimed": reclaimed}
        finally:
            node.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[0, 1000, 10000])
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    print(f"{'images':>8} {'fill s':>8} {'first pass ms CPU':>18} {'idle pass ms CPU':>17} reclaimed")
    for n in args.images:
        row = asyncio.run(measure(n, args.passes))
        print(f"{row['images']:>8} {row['fill_s']:>8.1f} {row['first_ms']:>18.1f} "
              f"{row['idle_ms']:>17.2f} {row['reclaimed']:>9}")


if __name__ == "__main__":
    main()
