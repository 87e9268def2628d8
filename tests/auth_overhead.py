"""What access control costs a node: small registry operations with a bearer token
against a ``georeg node`` process with auth on, and the same operations against
identical node processes with auth off; and the token endpoint's throughput and
latency.

    .venv/bin/python -m tests.auth_overhead [--runs 9] [--ops 600] [--concurrency 8]
                                            [--tokens 2000] [--patience 60]
    .venv/bin/python -m tests.auth_overhead --instructions --runs 3 --ops 400

Not a test (pytest does not collect it): a measurement, printed as a table.

Three node processes run side by side, each on its own data dir, started the
same way from the same code: ``auth`` (``--auth-ca/--auth-key/--auth-cert``
and ``--internal-credential-file``, as a cluster with auth starts a node, the
test identities of ``tests.auth_helpers`` written into its registry
configuration), ``off`` and ``off2`` (no auth); a fourth client, ``off+token``,
sends the bearer token to ``off``, which ignores it: what carrying a token
costs, apart from checking it. Only one node is driven at a time.
Each run measures every kind of operation on every node, the nodes in a
rotated order from one run to the next (so no node always goes first), with
one client and one connection pool per node. The client against ``auth``
fetches one token (``GET /oauth2/token``, Basic, the admin user) with the
scopes it needs and sends it as ``Bearer`` on every request, as skopeo does;
so the cost measured is the node's: checking the token's signature (or its
cache) and the permission on every request.

Reported per operation: ops/s medians, the ratio of medians ``auth/off``, the
paired ratio (median over runs of that run's ``auth/off``) with its middle
half, and the same paired ratio for ``off2/off``: the A/A comparison, i.e. how
far two identical nodes differ on this machine, which is the noise any
``auth/off`` difference must exceed to mean something.

Node CPU per operation (``/proc``, in clock ticks of 10 ms) needs a few
thousand operations per step to mean anything; throughput and CPU time both move
with what other processes on the machine do. ``--instructions`` counts instead
the instructions each node process runs per operation, under valgrind's
callgrind (``CallgrindNode``): a count that other load does not move (the A/A
ratio was 0.97-1.01 in the runs so far: garbage collection and the node's
periodic memory trim land in some steps and not others, most with pushes), and
the same table for the four clients; it is ~50 times slower, so a few hundred operations per
step and three steps suffice.

The token endpoint: ``--tokens`` requests ``GET /oauth2/token`` with Basic at
``--concurrency``, for the admin user and for a token (``pusher``), each
answer checked; throughput and p50/p99 latency, as the median over runs.

Before each step the run waits (up to ``--patience`` seconds, a minute unless
told) until other processes use less than 15 % of a core and reports what they
used during the step.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from unittest import mock

import aiohttp

from .auth_helpers import (
    ADMIN_PASSWORD,
    PUSH_PASSWORD,
    REGISTRY,
    SERVICE,
    auth_files,
    basic,
    identities,
    seed_configuration,
)
from .helpers import NodeProcess, make_image, push_image
from .proxy_overhead import OtherLoad, cpu_seconds

REPO, PUSHED = "bench/app", "bench/pushed"
TAGS = [f"v{i}" for i in range(10)]
ACCEPT = "application/vnd.oci.image.manifest.v1+json"
SMALL_BLOB = 1024
OPS = ("manifest HEAD", "manifest GET", "tags list", "blob GET 1 KiB", "blob push 1 KiB")


class Target:
    """One node as the client sees it: its URL, its pid, the headers every request carries."""

    def __init__(self, name: str, node: NodeProcess, headers: dict[str, str],
                 concurrency: int) -> None:
        self.name, self.node, self.url = name, node, node.url
        self.session = aiohttp.ClientSession(
            headers=headers, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            connector=aiohttp.TCPConnector(limit=concurrency))
        self.blob = ""

    async def setup(self) -> None:
        image = make_image([SMALL_BLOB], seed=1)
        for tag in TAGS:
            await push_image(self.session, self.url, REPO, image, tag=tag)
        self.blob = "sha256:" + hashlib.sha256(image.layers[0]).hexdigest()

    def operation(self, kind: str) -> Callable[[int], Awaitable[None]]:
        s, url = self.session, self.url

        async def expect(response: aiohttp.ClientResponse, status: int) -> bytes:
            body = await response.read()
            if response.status != status:
                raise RuntimeError(f"{self.name}: {kind} answered {response.status}: {body[:200]!r}")
            return body

        async def manifest_head(i: int) -> None:
            async with s.head(f"{url}/v2/{REPO}/manifests/{TAGS[i % 10]}",
                              headers={"Accept": ACCEPT}) as r:
                await expect(r, 200)

        async def manifest_get(i: int) -> None:
            async with s.get(f"{url}/v2/{REPO}/manifests/{TAGS[i % 10]}",
                             headers={"Accept": ACCEPT}) as r:
                await expect(r, 200)

        async def tags_list(i: int) -> None:
            async with s.get(f"{url}/v2/{REPO}/tags/list") as r:
                await expect(r, 200)

        async def blob_get(i: int) -> None:
            async with s.get(f"{url}/v2/{REPO}/blobs/{self.blob}") as r:
                if len(await expect(r, 200)) != SMALL_BLOB:
                    raise RuntimeError(f"{self.name}: a short blob")

        async def blob_push(i: int) -> None:
            data = os.urandom(SMALL_BLOB)
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            async with s.post(f"{url}/v2/{PUSHED}/blobs/uploads/", params={"digest": digest},
                              data=data, headers={"Content-Type": "application/octet-stream"}) as r:
                await expect(r, 201)

        return dict(zip(OPS, (manifest_head, manifest_get, tags_list, blob_get, blob_push),
                        strict=True))[kind]


async def run_all(count: int, concurrency: int,
                  step: Callable[[int], Awaitable[None]]) -> list[float]:
    """``count`` calls of ``step`` at ``concurrency``; each call's latency in seconds."""
    numbers = iter(range(count))
    latencies: list[float] = []

    async def worker() -> None:
        for i in numbers:
            started = time.perf_counter()
            await step(i)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def measured(others: OtherLoad, count: int, concurrency: int,
                   step: Callable[[int], Awaitable[None]], patience: float = 60.0
                   ) -> tuple[float, list[float], float, float]:
    """(ops/s, latencies, cores other processes used meanwhile, the node's CPU
    seconds per operation); ``others.pids[0]`` is the node's."""
    await others.wait_quiet(patience=patience)
    others.start()
    node_cpu = cpu_seconds(others.pids[0])
    started = time.perf_counter()
    latencies = await run_all(count, concurrency, step)
    seconds = time.perf_counter() - started
    return (count / seconds, latencies, others.seconds() / seconds,
            (cpu_seconds(others.pids[0]) - node_cpu) / count)


async def bearer_for(http: aiohttp.ClientSession, url: str) -> str:
    """One access token for everything the benchmark does, as a client fetches it."""
    params = [("service", SERVICE), ("scope", f"repository:{REPO}:pull,push"),
              ("scope", f"repository:{PUSHED}:pull,push")]
    async with http.get(f"{url}/oauth2/token", params=params,
                        headers=basic(REGISTRY, ADMIN_PASSWORD)) as r:
        if r.status != 200:
            raise RuntimeError(f"token: {r.status} {await r.text()}")
        return (await r.json())["access_token"]


def token_step(session: aiohttp.ClientSession, url: str,
               username: str, password: str) -> Callable[[int], Awaitable[None]]:
    params = {"service": SERVICE, "scope": f"repository:{REPO}:pull,push"}
    headers = basic(username, password)

    async def fetch(i: int) -> None:
        async with session.get(f"{url}/oauth2/token", params=params, headers=headers) as r:
            body = await r.json()
            if r.status != 200 or not body.get("access_token"):
                raise RuntimeError(f"token endpoint answered {r.status}: {body}")

    return fetch


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def start_targets(root: Path, concurrency: int, node_class: type[NodeProcess] = NodeProcess
                        ) -> tuple[dict[str, NodeProcess], dict[str, Target], str]:
    """The three nodes, their data pushed, and the four clients; the access token."""
    files = auth_files(root, "auth")
    # As a cluster with auth starts its nodes: the internal credential too
    # (``files.node_args``), so the auth node checks on every request what a
    # cluster's node checks (``api.auth``).
    nodes = {"auth": node_class(root / "auth", files.node_args("auth")),
             "off": node_class(root / "off"), "off2": node_class(root / "off2")}
    targets: dict[str, Target] = {}
    try:
        for node in nodes.values():
            node.start()
        async with aiohttp.ClientSession(
                headers=files.internal_headers(),
                timeout=aiohttp.ClientTimeout(total=600)) as http:
            await seed_configuration(http, nodes["auth"].url, identities())
            token = await bearer_for(http, nodes["auth"].url)
        for name, node in nodes.items():
            headers = {"Authorization": f"Bearer {token}"} if name == "auth" else {}
            targets[name] = Target(name, node, headers, concurrency)
            await targets[name].setup()
        # The auth-off node again, sent the same bearer token (which it ignores):
        # what carrying the token costs, apart from checking it.
        targets["off+token"] = Target("off+token", nodes["off"],
                                      {"Authorization": f"Bearer {token}"}, concurrency)
        targets["off+token"].blob = targets["off"].blob
    except BaseException:
        await stop_targets(nodes, targets)
        raise
    return nodes, targets, token


async def stop_targets(nodes: dict[str, NodeProcess], targets: dict[str, Target]) -> None:
    for target in targets.values():
        await target.session.close()
    for node in nodes.values():
        node.close()


async def main(runs: int, ops: int, concurrency: int, tokens: int, patience: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        nodes, targets, token = await start_targets(Path(tmp), concurrency)
        try:
            print(f"access token: {len(token)} bytes", flush=True)
            me = os.getpid()
            order = list(targets)
            rates: dict[tuple[str, str], list[float]] = {}
            loads: dict[tuple[str, str], list[float]] = {}
            node_cpu: dict[tuple[str, str], list[float]] = {}
            for run in range(runs):
                names = order[run % len(order):] + order[:run % len(order)]
                for kind in OPS:
                    line = []
                    for name in names:
                        target = targets[name]
                        others = OtherLoad([target.node.proc.pid, me])
                        rate, _, load, cpu = await measured(others, ops, concurrency,
                                                            target.operation(kind), patience)
                        rates.setdefault((name, kind), []).append(rate)
                        node_cpu.setdefault((name, kind), []).append(cpu)
                        loads.setdefault((name, kind), []).append(load)
                        line.append(f"{name} {rate:7.0f}/s (others {load:.2f})")
                    print(f"run {run + 1} {kind:16}: " + ", ".join(line), flush=True)

            token_rates: dict[str, list[float]] = {}
            token_p50: dict[str, list[float]] = {}
            token_p99: dict[str, list[float]] = {}
            auth = nodes["auth"]
            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=concurrency),
                    cookie_jar=aiohttp.DummyCookieJar()) as session:
                who = {"admin": (REGISTRY, ADMIN_PASSWORD), "token": ("pusher", PUSH_PASSWORD)}
                for run in range(runs):
                    for label, (username, password) in who.items():
                        rate, latencies, load, _ = await measured(
                            OtherLoad([auth.proc.pid, me]), tokens, concurrency,
                            token_step(session, auth.url, username, password), patience)
                        token_rates.setdefault(label, []).append(rate)
                        token_p50.setdefault(label, []).append(percentile(latencies, 0.5))
                        token_p99.setdefault(label, []).append(percentile(latencies, 0.99))
                        print(f"run {run + 1} token endpoint ({label}): {rate:7.0f}/s, p99 "
                              f"{percentile(latencies, 0.99) * 1000:.1f} ms (others {load:.2f})",
                              flush=True)
        finally:
            await stop_targets(nodes, targets)

    print(f"\n{ops} ops per step, concurrency {concurrency}, {runs} runs, "
          f"{os.cpu_count()} CPUs; 1 KiB blobs")
    print("ratio = median auth / median off; paired = median over runs of auth/off "
          "(IQR: its middle half); A/A = the same for off2/off; +token = the same for "
          "off+token/off (the auth-off node sent the token); node µs/op: the node "
          "process's CPU per operation, median over runs")
    print(f"{'operation':16} {'off /s':>8} {'off2 /s':>8} {'auth /s':>8} {'ratio':>6} "
          f"{'paired':>7} {'paired IQR':>12} {'A/A':>6} {'A/A IQR':>12} {'+token':>7} "
          f"{'node µs/op off/off2/off+token/auth':>35}")
    for kind in OPS:
        off, off2, auth, carried = (rates[n, kind] for n in ("off", "off2", "auth", "off+token"))
        paired = [a / o for a, o in zip(auth, off, strict=True)]
        aa = [b / o for b, o in zip(off2, off, strict=True)]
        with_token = [c / o for c, o in zip(carried, off, strict=True)]
        pq, aq = quartiles(paired), quartiles(aa)
        print(f"{kind:16} {statistics.median(off):8.0f} {statistics.median(off2):8.0f} "
              f"{statistics.median(auth):8.0f} "
              f"{statistics.median(auth) / statistics.median(off):6.3f} "
              f"{statistics.median(paired):7.3f} {f'{pq[0]:.3f}-{pq[1]:.3f}':>12} "
              f"{statistics.median(aa):6.3f} {f'{aq[0]:.3f}-{aq[1]:.3f}':>12} "
              f"{statistics.median(with_token):7.3f} "
              + "{:>35}".format("/".join(f"{statistics.median(node_cpu[n, kind]) * 1e6:.0f}"
                                         for n in ("off", "off2", "off+token", "auth"))))
    print(f"\ntoken endpoint (GET /oauth2/token, Basic), {tokens} requests per run, "
          f"concurrency {concurrency}: medians over runs")
    print(f"{'login':8} {'tokens/s':>9} {'p50 ms':>7} {'p99 ms':>7}")
    for label in token_rates:
        print(f"{label:8} {statistics.median(token_rates[label]):9.0f} "
              f"{statistics.median(token_p50[label]) * 1000:7.2f} "
              f"{statistics.median(token_p99[label]) * 1000:7.2f}")


class CallgrindNode(NodeProcess):
    """A ``georeg node`` process run under valgrind's callgrind, so the instructions it
    executes can be counted: ``instructions()`` dumps (and zeroes) its counters and
    returns what ran since the last dump. A count does not move with other load on
    the machine, which CPU time and throughput do."""

    def start(self, timeout: float = 240.0) -> NodeProcess:
        self.dumps = self.data_dir.parent / f"{self.data_dir.name}.callgrind"
        real = subprocess.Popen

        def under_callgrind(args, *rest, **kwargs):
            return real(["valgrind", "--tool=callgrind", "--dump-instr=no",
                         f"--callgrind-out-file={self.dumps}.%p", *args], *rest, **kwargs)

        # NodeProcess builds its command inline; prefix it for this start only.
        with mock.patch.object(subprocess, "Popen", under_callgrind):
            return super().start(timeout)

    def instructions(self) -> int:
        pid = self.proc.pid
        before = set(self.dumps.parent.glob(f"{self.dumps.name}.{pid}*"))
        subprocess.run(["callgrind_control", "--dump", str(pid)], check=True,
                       capture_output=True, timeout=120)
        dump, = set(self.dumps.parent.glob(f"{self.dumps.name}.{pid}*")) - before
        for line in dump.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
        raise RuntimeError(f"{dump} holds no instruction total")


async def instructions_main(runs: int, ops: int, concurrency: int) -> None:
    """Instructions per operation of each node process (callgrind), each step a
    zeroed counter, ``ops`` operations, a dump; the nodes in a rotated order."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("--instructions needs valgrind (callgrind, callgrind_control)")
    with tempfile.TemporaryDirectory() as tmp:
        nodes, targets, token = await start_targets(Path(tmp), concurrency, CallgrindNode)
        try:
            print(f"access token: {len(token)} bytes", flush=True)
            order = list(targets)
            counts: dict[tuple[str, str], list[float]] = {}
            for kind in OPS:
                for run in range(runs):
                    for name in order[run % len(order):] + order[:run % len(order)]:
                        target = targets[name]
                        node = target.node
                        await run_all(min(ops, 50), concurrency, target.operation(kind))   # warm
                        node.instructions()
                        await run_all(ops, concurrency, target.operation(kind))
                        counts.setdefault((name, kind), []).append(node.instructions() / ops)
                print(f"{kind:16}: " + ", ".join(
                    f"{n} {statistics.median(counts[n, kind]) / 1000:.1f}k" for n in order),
                    flush=True)
        finally:
            await stop_targets(nodes, targets)
    print(f"\n{ops} ops per step, concurrency {concurrency}, {runs} steps per node and "
          f"operation; instructions each node process ran per operation (callgrind), "
          f"median over steps; ratios of those medians (A/A = off2/off; +token = off+token/off)")
    print(f"{'operation':16} {'off':>9} {'off2':>9} {'off+token':>10} {'auth':>9} "
          f"{'auth/off':>9} {'A/A':>6} {'+token':>7} {'auth spread':>14}")
    for kind in OPS:
        off, off2, carried, auth = (statistics.median(counts[n, kind])
                                    for n in ("off", "off2", "off+token", "auth"))
        spread = f"{min(counts['auth', kind]) / off:.3f}-{max(counts['auth', kind]) / off:.3f}"
        print(f"{kind:16} {off / 1000:8.1f}k {off2 / 1000:8.1f}k {carried / 1000:9.1f}k "
              f"{auth / 1000:8.1f}k {auth / off:9.3f} {off2 / off:6.3f} {carried / off:7.3f} "
              f"{spread:>14}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--ops", type=int, default=600, help="operations per measured step")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2000,
                        help="token requests per run and login kind")
    parser.add_argument("--patience", type=float, default=60.0,
                        help="seconds each step waits for other processes to go quiet "
                             "before it runs anyway (their load is reported either way)")
    parser.add_argument("--instructions", action="store_true",
                        help="count the instructions each node runs per operation (under "
                             "valgrind's callgrind, ~50x slower: use --ops 400 --runs 3) "
                             "instead of throughput; no token endpoint")
    args = parser.parse_args()
    if args.instructions:
        asyncio.run(instructions_main(args.runs, args.ops, args.concurrency))
    else:
        asyncio.run(main(args.runs, args.ops, args.concurrency, args.tokens, args.patience))
