"""What request throttling costs a node when no limit is hit: the instructions
each ``georeg node`` process runs per small operation (valgrind's callgrind,
``tests.auth_overhead.CallgrindNode``), a count the other load on this shared
machine cannot move.

    .venv/bin/python -m tests.throttle_overhead [--runs 3] [--ops 300] [--base REV]

Not a test (pytest does not collect it): a measurement, printed as a table.

Node processes from the same code, each on its own data dir, driven one at a
time in a rotated order, with the operations of ``tests.auth_overhead``
(manifest HEAD and GET, tags list, 1 KiB blob GET, 1 KiB blob push):

* with auth, as a cluster starts a node (the client sends one bearer token):
  ``off`` (no limits: the throttle is idle), ``off2`` (the same: the A/A
  noise), ``on`` (limits on every kind at a billion a minute, never reached:
  the replica's and the identity's buckets on every request);
* without auth: ``open-off`` and ``open-on``, the same pair;
* with ``--base REV``: ``base`` and ``open-base``, the code at ``REV`` (the
  commit before throttling), exported to a temporary directory and run from
  there: what the idle throttle costs against no throttle at all.

The ratio to judge is ``on/off`` (and ``open-on/open-off``): the machinery's
cost on requests it lets through; ``off/base`` is what its presence costs
while nothing is limited.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from unittest import mock

import aiohttp

from .auth_helpers import auth_files, identities, seed_configuration
from .auth_overhead import OPS, CallgrindNode, Target, bearer_for, run_all

NEVER = str(10**9)              # a rate per minute no benchmark reaches
LIMITS = ["--reads-per-min", NEVER, "--writes-per-min", NEVER, "--deletes-per-min", NEVER,
          "--referrers-per-min", NEVER]


class ElsewhereNode(CallgrindNode):
    """A callgrind node run from another source tree (``--base``): its process
    starts in that tree, so ``python -m cluster.cli`` imports that code."""

    source: Path | None = None

    def start(self, timeout: float = 240.0):
        real = subprocess.Popen
        source = self.source

        def from_source(args, *rest, **kwargs):
            env = {**os.environ, "PYTHONPATH": str(source)}
            return real(args, *rest, cwd=source, env=env, **kwargs)

        with mock.patch.object(subprocess, "Popen", from_source):
            return super().start(timeout)


def export(rev: str, into: Path) -> Path:
    into.mkdir()
    archive = subprocess.run(["git", "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


async def start(root: Path, base: Path | None, concurrency: int):
    files = auth_files(root, "auth")
    args = files.node_args("auth")
    nodes: dict[str, CallgrindNode] = {
        "off": CallgrindNode(root / "off", args), "off2": CallgrindNode(root / "off2", args),
        "on": CallgrindNode(root / "on", [*args, *LIMITS]),
        "open-off": CallgrindNode(root / "open-off"),
        "open-on": CallgrindNode(root / "open-on", LIMITS)}
    if base is not None:
        nodes["base"] = ElsewhereNode(root / "base", args)
        nodes["open-base"] = ElsewhereNode(root / "open-base")
        for name in ("base", "open-base"):
            nodes[name].source = base
    targets: dict[str, Target] = {}
    try:
        for node in nodes.values():
            node.start()
        async with aiohttp.ClientSession(headers=files.internal_headers(),
                                         timeout=aiohttp.ClientTimeout(total=600)) as http:
            for name, node in nodes.items():
                if not name.startswith("open"):
                    await seed_configuration(http, node.url, identities())
            tokens = {name: await bearer_for(http, node.url) for name, node in nodes.items()
                      if not name.startswith("open")}
        for name, node in nodes.items():
            headers = {"Authorization": f"Bearer {tokens[name]}"} if name in tokens else {}
            targets[name] = Target(name, node, headers, concurrency)
            await targets[name].setup()
    except BaseException:
        await stop(nodes, targets)
        raise
    return nodes, targets


async def stop(nodes, targets) -> None:
    for target in targets.values():
        await target.session.close()
    for node in nodes.values():
        node.close()


async def main(runs: int, ops: int, concurrency: int, rev: str | None) -> None:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind (callgrind, callgrind_control)")
    with tempfile.TemporaryDirectory() as tmp:
        base = export(rev, Path(tmp) / "base-source") if rev else None
        nodes, targets = await start(Path(tmp), base, concurrency)
        try:
            order = list(targets)
            counts: dict[tuple[str, str], list[float]] = {}
            for kind in OPS:
                for run in range(runs):
                    for name in order[run % len(order):] + order[:run % len(order)]:
                        target = targets[name]
                        await run_all(min(ops, 50), concurrency, target.operation(kind))   # warm
                        target.node.instructions()
                        await run_all(ops, concurrency, target.operation(kind))
                        counts.setdefault((name, kind), []).append(
                            target.node.instructions() / ops)
                print(f"{kind:16}: " + ", ".join(
                    f"{n} {statistics.median(counts[n, kind]) / 1000:.1f}k" for n in order),
                    flush=True)
        finally:
            await stop(nodes, targets)
    print(f"\n{ops} ops per step, concurrency {concurrency}, {runs} steps per node and "
          f"operation; instructions per operation (callgrind), median over steps")
    with_base = rev is not None
    header = f"{'operation':16} {'off':>8} {'on':>8} {'on/off':>7} {'A/A':>6}"
    header += f" {'off/base':>9}" if with_base else ""
    header += f" | {'open-off':>9} {'open-on':>8} {'on/off':>7}"
    header += f" {'off/base':>9}" if with_base else ""
    print(header)
    for kind in OPS:
        m = {name: statistics.median(counts[name, kind]) for name in order}
        line = (f"{kind:16} {m['off'] / 1000:7.1f}k {m['on'] / 1000:7.1f}k "
                f"{m['on'] / m['off']:7.3f} {m['off2'] / m['off']:6.3f}")
        if with_base:
            line += f" {m['off'] / m['base']:9.3f}"
        line += (f" | {m['open-off'] / 1000:8.1f}k {m['open-on'] / 1000:7.1f}k "
                 f"{m['open-on'] / m['open-off']:7.3f}")
        if with_base:
            line += f" {m['open-off'] / m['open-base']:9.3f}"
        print(line)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ops", type=int, default=300, help="operations per measured step")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--base", metavar="REV",
                        help="also run the code at REV (git), e.g. the commit before throttling")
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.ops, args.concurrency, args.base))
