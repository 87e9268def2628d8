"""What TLS costs a blob download (a benchmark, not a test; run by hand):

    .venv/bin/python -m tests.tls_overhead [--size BYTES] [--rounds N]

Starts two one-node clusters with ``georeg up --detach`` (same spec, WAN off,
auth off), one with ``tls = true``, pushes one blob to each, then downloads it
through each cluster's global endpoint and from each node directly, the four
interleaved in every round (so a busy moment of the machine falls on all of
them) and the order alternated between rounds; the first round only warms
connections. The client is aiohttp in one process, trusting the cluster CA;
its own decryption is part of every TLS figure. Prints the median, min and
max per target and the ratios TLS/plain.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from cluster.control.tls import client_context

SPEC = """\
home_region = "westeurope"
paired_copies = false
auth = "none"
tls = {tls}
[wan]
enabled = false
[network]
port_base = 0
"""


def georeg(*args: str, data_dir: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "cluster.cli", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise SystemExit(f"georeg {' '.join(args)}: {done.stderr}")
    return done.stdout


async def measure(targets: dict[str, str], ca_file: Path, size: int, rounds: int) -> dict:
    blob = os.urandom(size)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    times: dict[str, list[float]] = {name: [] for name in targets}
    connector = aiohttp.TCPConnector(ssl=client_context(ca_file))
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as http:
        for name, url in targets.items():
            if name.startswith("endpoint"):
                async with http.post(f"{url}/v2/bench/blobs/uploads/", params={"digest": digest},
                                     data=blob) as r:
                    assert r.status == 201, await r.text()
        order = list(targets)
        for i in range(rounds + 1):
            for name in (order if i % 2 else reversed(order)):
                started = time.perf_counter()
                got = 0
                async with http.get(f"{targets[name]}/v2/bench/blobs/{digest}") as r:
                    assert r.status == 200, r.status
                    async for chunk in r.content.iter_chunked(1 << 20):
                        got += len(chunk)
                assert got == size
                if i:
                    times[name].append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64 * 2**20)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="georeg-tls-bench-") as tmp:
        root = Path(tmp)
        targets: dict[str, str] = {}
        started = []
        try:
            for kind in ("plain", "tls"):
                (root / f"{kind}.toml").write_text(SPEC.format(tls=str(kind == "tls").lower()))
                data = root / kind
                georeg("up", "--detach", "--config", str(root / f"{kind}.toml"), data_dir=data)
                started.append(data)
                status = json.loads(georeg("status", "--json", data_dir=data))
                targets[f"endpoint {kind}"] = status["global_endpoints"]["westeurope"]
                targets[f"node {kind}"] = status["nodes"][0]["http"]
            times = asyncio.run(measure(targets, root / "tls" / "auth" / "ca" / "ca.pem",
                                        args.size, args.rounds))
        finally:
            for data in started:
                georeg("down", data_dir=data)
    mib = args.size / 2**20
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{mib:g} MiB blob, {args.rounds} rounds, load average {os.getloadavg()[0]:.1f}")
    for name, ts in times.items():
        print(f"  {name:15s} median {medians[name] * 1000:8.1f} ms  {mib / medians[name]:7.1f} MiB/s"
              f"  (min {min(ts) * 1000:.1f}, max {max(ts) * 1000:.1f})")
    for where in ("endpoint", "node"):
        print(f"  {where}: TLS takes {medians[f'{where} tls'] / medians[f'{where} plain']:.2f}x "
              f"the time of plain HTTP")


if __name__ == "__main__":
    main()
