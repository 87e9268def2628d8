"""``georeg bench tiers``: what each tier's limits let through when a client
drives past them, and what the throttling machinery costs a small operation
when no limit is hit.

Every registry here is a one-region cluster (``clusterproc``: a child process,
free ports, auth on, no paired copy, no WAN model): the limits are per
replica, and one replica is one node, which the client drives directly (an
endpoint in front would add a proxy's CPU on the same two cores and measure
nothing about the limits). Identities are tokens created through the
management API (``_repositories_push``), sent as Basic on every request.

Limits, per tier (``tiers``), on a cluster whose spec says ``tier`` and
``[limits] limits = "tier"``, with ``burst_s`` (default 2 s) instead of the
tier's minute and, for a smoke run, every rate and bandwidth × ``scale``:

``reads`` and ``writes``
    GET manifest by tag (a read), POST upload start (a write). Two steps each:
    ``identity``, one identity offering ``over`` × its share (the spec's
    ``per_identity_fraction``, ACR's half); ``replica``, ``over`` × the
    replica's rate split evenly across ``identities`` identities (4: each
    offers 0.375 of the rate at ``over`` 1.5, under its own half, so only the
    replica's bucket can refuse). Open loop: each identity's workers send on a
    fixed schedule whatever the answers (a worker behind by more than
    ``CATCH_UP_S`` drops the sends it missed, so what is reported as offered
    is what was sent). The window: from the first 429 (the bucket's burst is
    spent) + ``settle_s``, for ``window_s``; requests are counted by when they
    were sent. Admitted (2xx) per minute against the limit, ±``TOLERANCE``;
    429s are refused, not admitted, and counted by the limit their body names.
    A bucket that holds ``burst_s`` of its rate admits ``rate × T`` over any
    T once it is empty and the client keeps asking: the steady state does
    not depend on the burst, which only decides how long the drain takes
    (with the tier's 60 s, a minute and more per step at ``over`` 1.5).
``bandwidth``
    One blob of the download budget × ``transfer_s`` bytes streamed up
    (timed: the PATCH, from its first byte to its answer; against the upload
    budget) and down (from the GET to its last byte, sha256 checked; against
    the download budget). The client's unshaped speed is measured on the
    ``off`` cluster of ``overhead`` when that step runs (what "driving past"
    the bandwidth means: the client could go that fast).
``overhead``
    Three clusters: ``off`` and ``off2`` (no limits; ``off2 ÷ off`` is the
    A/A noise, two processes as ``on`` and ``off`` are) and ``on`` (every
    rate at a billion a minute: the replica's and the identity's bucket on
    every request, none ever empty), and the reference registry (Debian's
    ``docker-registry``, no auth) as a reference column. ``rounds`` rounds,
    each driving every target in turn (order rotated per round) with ``ops``
    requests per operation (HEAD and GET manifest by tag) at ``concurrency``,
    closed loop. Per round, each target's ops/s against ``off``'s of the same
    round; medians over rounds, with the spread. Target ≤ 5 % (``on ÷ off`` ≥
    0.95), judged against the A/A.

Invariants
    * A wrong answer (not 2xx, not 429) is counted and reported in its row;
      in ``overhead`` any answer but 200 stops the run (``WorkloadError``): a
      429 there means a limit was hit and the step measures nothing.
    * Every cluster and server started here is stopped on the way out.
    * Figures are reported, never enforced: the exit status does not depend
      on them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
from rich.console import Console
from rich.table import Table
from yarl import URL

from registry_node import tiers as tier_table

from ..control import spec as specs
from . import procfs
from .clusterproc import ClusterProcess, ClusterStartError
from .lag import NodeTarget
from .procfs import MIB
from .reference import ReferenceRegistry
from .workload import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    Measured,
    RandomBytes,
    WorkloadError,
    open_session,
    run_concurrently,
    sha256_digest,
)

READS, WRITES, BANDWIDTH, OVERHEAD = "reads", "writes", "bandwidth", "overhead"
STEPS = (READS, WRITES, BANDWIDTH, OVERHEAD)
IDENTITY, REPLICA = "identity", "replica"
OFF, OFF2, ON, REFERENCE = "off", "off2", "on", "reference"
OVERHEAD_TARGETS = (OFF, ON, OFF2, REFERENCE)
SMALL_OPS = ("head_manifest", "get_manifest")
TOLERANCE = 0.05                # the issue's ±5 %
NEVER = 1e9                     # a rate per minute no client here comes near
CATCH_UP_S = 0.25               # a worker further behind its schedule drops what it missed
WORKER_RATE = 25.0              # requests per second one open-loop worker is asked for
REPO, TAG = "bench/tiers", "v1"
UNSHAPED_BYTES = 256 * MIB      # the blob that measures the client's unshaped speed
TOKEN_SCOPE_MAP = "_repositories_push"


@dataclass(frozen=True)
class TiersBenchOptions:
    tiers: tuple[str, ...] = tier_table.TIERS
    steps: tuple[str, ...] = STEPS
    scale: float = 1.0              # every rate and bandwidth × this (smoke runs)
    burst_s: float = 2.0            # a bucket holds this much of its rate (the tier's: 60)
    over: float = 1.5               # offered ÷ limit
    identities: int = 4             # replica steps: identities sharing the offered load
    settle_s: float = 1.0           # after the first 429, before the window
    window_s: float = 20.0          # the steady-state window of each rate step
    transfer_s: float = 5.0         # the blob: the download budget × this many seconds
    rounds: int = 7                 # overhead: rounds of every target
    ops: int = 4000                 # overhead: requests per operation per target per round
    concurrency: int = 8            # overhead: requests in flight
    reference_binary: str | None = None
    workdir: Path | None = None
    seed: int = 1

    def quick(self) -> TiersBenchOptions:
        """A smoke run: rates and bandwidth a quarter of the tier's, short windows."""
        return replace(self, scale=0.25, burst_s=0.5, settle_s=0.3, window_s=2.0,
                       transfer_s=1.0, rounds=2, ops=300)

    def validate(self) -> None:
        unknown = [t for t in self.tiers if t not in tier_table.TIERS]
        if unknown or not self.tiers:
            raise ValueError(f"unknown tiers {unknown}; known: {', '.join(tier_table.TIERS)}")
        bad = set(self.steps) - set(STEPS)
        if bad or not self.steps:
            raise ValueError(f"unknown steps {sorted(bad)}; known: {', '.join(STEPS)}")
        if not (self.scale > 0 and self.burst_s > 0 and self.window_s > 0
                and self.transfer_s > 0 and self.settle_s >= 0):
            raise ValueError("scale, burst, window and transfer must be more than 0")
        if self.over <= 1:
            raise ValueError("--over is offered ÷ limit and must be more than 1 to drive past it")
        if self.identities < 2 or self.rounds < 1 or self.ops < 1 or self.concurrency < 1:
            raise ValueError("identities ≥ 2, rounds, ops and concurrency ≥ 1")

    def workload(self) -> dict:
        return {"tiers": list(self.tiers), "steps": list(self.steps), "scale": self.scale,
                "burst_s": self.burst_s, "over": self.over, "identities": self.identities,
                "settle_s": self.settle_s, "window_s": self.window_s,
                "transfer_s": self.transfer_s, "rounds": self.rounds, "ops": self.ops,
                "concurrency": self.concurrency, "tolerance": TOLERANCE,
                "client": "one process, aiohttp on asyncio, Basic credentials per identity"}


# -- the arithmetic (no I/O) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    sent: float         # monotonic seconds, when the request went out
    status: int
    limit: str = ""     # a 429's refusing limit, as its body names it


def tally(answers: Sequence[Answer], start: float, end: float) -> dict:
    """The answers to requests sent in [start, end), by outcome."""
    inside = [a for a in answers if start <= a.sent < end]
    admitted = sum(1 for a in inside if 200 <= a.status < 300)
    refused = [a for a in inside if a.status == 429]
    return {"sent": len(inside), "admitted": admitted, "refused": len(refused),
            "errors": len(inside) - admitted - len(refused),
            "refused_by": dict(Counter(a.limit or "?" for a in refused))}


def rate_row(step: str, scope: str, identities: int, limit_per_min: float, counts: dict,
             window_s: float, drain_s: float | None) -> dict:
    """One rate step's figures: per minute over the window, against the limit."""
    per_min = 60.0 / window_s
    admitted = counts["admitted"] * per_min
    offered = counts["sent"] * per_min
    ratio = admitted / limit_per_min
    return {"step": step, "scope": scope, "identities": identities,
            "limit_per_min": limit_per_min, "offered_per_min": offered,
            "admitted_per_min": admitted, "refused_per_min": counts["refused"] * per_min,
            "errors": counts["errors"], "refused_by": counts["refused_by"],
            "ratio": ratio, "within": abs(ratio - 1.0) <= TOLERANCE,
            "drove_past": offered >= limit_per_min * (1.0 + TOLERANCE),
            "window_s": window_s, "drain_s": drain_s, "counts": counts}


def bandwidth_row(direction: str, limit_mb_s: float, size: int, seconds: float,
                  unshaped_mb_s: float | None = None) -> dict:
    mb_s = size / seconds / 1e6
    ratio = mb_s / limit_mb_s
    return {"direction": direction, "limit_mb_s": limit_mb_s, "mb_s": mb_s, "bytes": size,
            "seconds": seconds, "ratio": ratio, "within": abs(ratio - 1.0) <= TOLERANCE,
            "unshaped_mb_s": unshaped_mb_s}


def spread(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "each": list(values)}


def overhead_summary(rounds: Sequence[dict[str, dict[str, float]]]) -> dict:
    """``rounds[i][target][op]`` ops/s → per op, each target's ratio to ``off``
    of the same round: median and range over rounds, and each target's median
    ops/s. The verdict compares ``on ÷ off`` with 1 − ``TOLERANCE``."""
    out: dict = {}
    ops = sorted({op for r in rounds for ops in r.values() for op in ops})
    for op in ops:
        targets = [t for t in OVERHEAD_TARGETS if all(op in r.get(t, {}) for r in rounds)]
        row: dict = {"ops_per_s": {t: statistics.median(r[t][op] for r in rounds)
                                   for t in targets}}
        for t in targets:
            if t != OFF:
                row[f"{t}/off"] = spread([r[t][op] / r[OFF][op] for r in rounds])
        if f"{ON}/off" in row:
            on = row[f"{ON}/off"]["median"]
            row["overhead"] = 1.0 - on
            row["within_target"] = on >= 1.0 - TOLERANCE
            # Two processes that differ in nothing must agree within the target
            # first, or throughput cannot tell a 5 % cost from the machine's noise.
            aa = row.get(f"{OFF2}/off")
            row["resolved"] = aa is not None and abs(aa["median"] - 1.0) <= TOLERANCE \
                and 1.0 - 2 * TOLERANCE <= aa["min"] and aa["max"] <= 1.0 + 2 * TOLERANCE
        out[op] = row
    return out


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- clusters -----------------------------------------------------------------------------


def tier_spec(tier: str, options: TiersBenchOptions) -> specs.ClusterSpec:
    """A one-region cluster of ``tier`` with the tier's limits on, ``burst_s``
    as told, and every rate and bandwidth × ``scale`` (given as overrides)."""
    limits: dict = {"limits": "tier", "burst_s": options.burst_s}
    if options.scale != 1.0:
        table = tier_table.limits(tier)
        limits |= {key: rate * options.scale for key, rate in table.requests_per_min().items()}
        down, up = table.bandwidth_mbytes_per_s
        limits |= {"download_mbps": 8.0 * down * options.scale,
                   "upload_mbps": 8.0 * up * options.scale}
    return _spec(tier, limits)


def overhead_spec(name: str) -> specs.ClusterSpec:
    limits = {} if name != ON else {key: NEVER for key in (
        "reads_per_min", "writes_per_min", "deletes_per_min", "referrers_per_min")}
    return _spec(tier_table.PREMIUM, limits)


def _spec(tier: str, limits: dict) -> specs.ClusterSpec:
    raw = {"registry": "benchtiers", "tier": tier, "auth": "token", "paired_copies": False,
           "wan": {"enabled": False}, "network": {"port_base": 0}, "limits": limits}
    return specs.parse(raw, f"bench tiers ({tier})")


class Registry:
    """A cluster's one node as the benchmark drives it: its URL, pid, and
    identities (name → Basic header)."""

    def __init__(self, name: str, cluster: ClusterProcess) -> None:
        self.name = name
        self.cluster = cluster
        node = cluster.nodes[0].name
        self.target = NodeTarget(name, cluster.http(node), cluster.pids.get(node, 0))
        self.identities: dict[str, dict[str, str]] = {}

    @classmethod
    async def start(cls, name: str, spec: specs.ClusterSpec, workdir: Path,
                    stack: contextlib.ExitStack) -> Registry:
        cluster = await asyncio.to_thread(ClusterProcess.start, spec, workdir / name)
        stack.callback(cluster.stop)
        return cls(name, cluster)

    async def identity(self, name: str) -> dict[str, str]:
        """A token ``name`` (created once) as a Basic header, once the node takes it."""
        if name not in self.identities:
            made = await asyncio.to_thread(self.cluster.call, "POST", "/georeg/v1/tokens",
                                           {"name": name, "scopeMap": TOKEN_SCOPE_MAP})
            password = made["credentials"]["passwords"][0]["value"]  # type: ignore[index]
            header = "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()
            self.identities[name] = {"Authorization": header}
            await _until_accepted(self.target.url, self.identities[name])
        return self.identities[name]


async def _until_accepted(url: str, headers: dict[str, str], timeout_s: float = 30.0) -> None:
    """Until the node takes the credentials (configuration reaches it from home)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(headers=headers) as session:
        while True:
            async with session.get(f"{url}/v2/{REPO}/tags/list") as r:
                if r.status in (200, 404, 429):     # 429: authenticated, then throttled
                    return
            if time.monotonic() > deadline:
                raise ClusterStartError(f"{url} did not accept a new token in {timeout_s:.0f} s")
            await asyncio.sleep(0.1)   # poll interval, bounded by the deadline above


def tiny_image() -> tuple[bytes, bytes, bytes]:
    config = b'{"architecture":"amd64","os":"linux","georeg":"bench tiers"}'
    layer = b"georeg bench tiers: a tiny layer\n"
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config),
                   "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": sha256_digest(layer),
                    "size": len(layer)}]}).encode()
    return config, layer, manifest


async def push_tiny_image(target, headers: dict[str, str]) -> None:
    """The image the reads read: each blob a POST and one PUT with its bytes
    (both registries take that), then the manifest; a 429 waited out."""
    config, layer, manifest = tiny_image()
    base = URL(target.url)
    async with open_session(2, headers=headers) as session:
        for blob in (config, layer):
            r = await _send(session, "POST", base.with_path(f"/v2/{REPO}/blobs/uploads/"), 202,
                            "POST blob", target, headers={"Content-Length": "0"})
            location = base.join(URL(r.headers["Location"], encoded=True))
            await _send(session, "PUT", location.update_query(digest=sha256_digest(blob)), 201,
                        "PUT blob", target, data=blob,
                        headers={"Content-Type": "application/octet-stream"})
        await _send(session, "PUT", base.with_path(f"/v2/{REPO}/manifests/{TAG}"), 201,
                    "PUT manifest", target, data=manifest,
                    headers={"Content-Type": OCI_MANIFEST})


async def _send(session: aiohttp.ClientSession, method: str, url, expected: int, what: str,
                target, timeout_s: float = 60.0, **kwargs) -> aiohttp.ClientResponse:
    """One request the benchmark needs answered (not one it measures): a 429 is
    waited out and the request sent again (its body must be bytes, which can
    be). The response, read."""
    deadline = time.monotonic() + timeout_s
    while True:
        async with session.request(method, url, **kwargs) as r:
            await r.read()
            if r.status != 429:
                await _expect(r, expected, what, target)
                return r
            wait = float(r.headers.get("Retry-After", "1"))
        if time.monotonic() > deadline:
            raise WorkloadError(f"{target.name}: {what} was refused (429) for {timeout_s:.0f} s")
        # Retry-After is whole seconds, rounded up; a scaled-down bucket refills sooner.
        await asyncio.sleep(min(wait, 0.2))


# -- open-loop driving -----------------------------------------------------------------------


Request = Callable[[aiohttp.ClientSession], Awaitable[tuple[int, str]]]


def read_request(url: str) -> Request:
    manifest_url = f"{url}/v2/{REPO}/manifests/{TAG}"

    async def get(session: aiohttp.ClientSession) -> tuple[int, str]:
        async with session.get(manifest_url, headers={"Accept": OCI_MANIFEST}) as r:
            return r.status, _limit(r.status, await r.read())

    return get


def write_request(url: str) -> Request:
    start_url = f"{url}/v2/{REPO}/blobs/uploads/"

    async def post(session: aiohttp.ClientSession) -> tuple[int, str]:
        async with session.post(start_url, headers={"Content-Length": "0"}) as r:
            return r.status, _limit(r.status, await r.read())

    return post


def _limit(status: int, body: bytes) -> str:
    if status != 429:
        return ""
    try:
        return str(json.loads(body)["errors"][0]["detail"]["limit"])
    except (ValueError, LookupError, TypeError):
        return "?"


async def drive(headers: Sequence[dict[str, str]], rate_per_s: float, request: Request,
                window_s: float, settle_s: float, drain_timeout_s: float) -> tuple[dict, float]:
    """Each identity (``headers``) sends ``request`` at ``rate_per_s`` on its own
    schedule until the window after the first 429 (+ ``settle_s``) has passed;
    (the window's tally, seconds until the first 429)."""
    answers: list[Answer] = []
    refused = asyncio.Event()
    stop = asyncio.Event()
    began = time.monotonic()

    async def worker(session: aiohttp.ClientSession, interval: float, offset: float) -> None:
        due = began + offset
        while not stop.is_set():
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
                if stop.is_set():
                    return
            elif now - due > CATCH_UP_S:
                due = now                   # too far behind: the missed sends are not made
            sent = time.monotonic()
            status, limit = await request(session)
            answers.append(Answer(sent, status, limit))
            if status == 429:
                refused.set()
            due += interval

    workers = max(1, math.ceil(rate_per_s / WORKER_RATE))
    interval = workers / rate_per_s
    async with contextlib.AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(open_session(workers + 2, headers=h))
                    for h in headers]
        async with asyncio.TaskGroup() as group:
            for s, session in enumerate(sessions):
                for w in range(workers):
                    offset = interval * (w / workers + s / (workers * len(sessions)))
                    group.create_task(worker(session, interval, offset))
            try:
                await asyncio.wait_for(refused.wait(), drain_timeout_s)
            except TimeoutError:
                stop.set()
                raise WorkloadError(
                    f"no request was refused in {drain_timeout_s:.0f} s at "
                    f"{rate_per_s * len(headers) * 60:,.0f}/min offered: the limit is not where "
                    f"it was expected, or the client could not send that fast") from None
            first = min(a.sent for a in answers if a.status == 429)
            start = first + settle_s
            await asyncio.sleep(start + window_s - time.monotonic())
            stop.set()
    return tally(answers, start, start + window_s), first - began


# -- the run ----------------------------------------------------------------------------------


async def run(options: TiersBenchOptions, console: Console | None = None) -> dict:
    options.validate()
    console = console or Console(stderr=True)
    say = lambda text: console.print(f"[dim]{text}[/dim]")  # noqa: E731
    results: dict = {"machine": _machine(), "workload": options.workload(),
                     "load_average_before": _loadavg(), "tiers": {}}
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = options.workdir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="georeg-tiers-")))
        workdir.mkdir(parents=True, exist_ok=True)
        unshaped = None
        if OVERHEAD in options.steps:
            results["overhead"], unshaped = await _overhead(options, workdir, say)
        for tier in options.tiers:
            with contextlib.ExitStack() as tier_stack:
                registry = await Registry.start(tier.lower(), tier_spec(tier, options), workdir,
                                                tier_stack)
                say(f"{tier}: {registry.target.url} (pid {registry.target.pid})")
                results["tiers"][tier] = await _tier(options, tier, registry, unshaped, say)
    results["load_average_after"] = _loadavg()
    results["seconds"] = time.monotonic() - began
    return results


async def _tier(options: TiersBenchOptions, tier: str, registry: Registry,
                unshaped: dict | None, say) -> dict:
    spec = registry.cluster.spec
    limits = spec.limits.request_limits(spec.tier)
    down_mbps, up_mbps = spec.limits.bandwidth(spec.tier)
    out: dict = {"limits": {"per_minute": limits.per_minute() if limits else {},
                            "per_identity_fraction": limits.per_identity_fraction if limits else 1,
                            "burst_s": limits.burst_s if limits else 0,
                            "download_mb_s": down_mbps / 8, "upload_mb_s": up_mbps / 8},
                 "rates": [], "bandwidth": []}
    admin = registry.cluster.registry_headers()
    await push_tiny_image(registry.target, admin)
    solo = [await registry.identity("solo")]
    crowd = [await registry.identity(f"crowd{i}") for i in range(options.identities)]
    url = registry.target.url
    for step, kind, request in ((READS, "read", read_request(url)),
                                (WRITES, "write", write_request(url))):
        if step not in options.steps:
            continue
        replica_rate = limits.per_minute()[kind]
        for scope, who, limit in ((IDENTITY, solo, replica_rate * limits.per_identity_fraction),
                                  (REPLICA, crowd, replica_rate)):
            offered_per_s = limit * options.over / 60.0
            drain_timeout = 10.0 + 3.0 * limits.burst_s / (options.over - 1.0)
            others = procfs.OtherCpu([registry.target.pid])
            counts, drain_s = await drive(who, offered_per_s / len(who), request,
                                          options.window_s, options.settle_s, drain_timeout)
            row = rate_row(step, scope, len(who), limit, counts, options.window_s, drain_s)
            row["other_processes_cores"] = others.cores()
            out["rates"].append(row)
            say(f"{tier} {step} ({scope}, {len(who)} identit{'y' if len(who) == 1 else 'ies'}): "
                f"{row['admitted_per_min']:,.0f}/min admitted of {row['offered_per_min']:,.0f} "
                f"offered, limit {limit:,.0f} ({row['ratio']:.3f})")
    if BANDWIDTH in options.steps and down_mbps > 0 and up_mbps > 0:
        size = max(MIB, int(down_mbps / 8 * 1e6 * options.transfer_s) // MIB * MIB)
        up_s, digest = await _upload(registry.target, admin, size, options.seed,
                                     refill_s=limits.burst_s + 1.0 if limits else 0.0)
        down_s = await _download(registry.target, admin, digest, size)
        for direction, mbps, seconds in (("upload", up_mbps, up_s), ("download", down_mbps, down_s)):
            row = bandwidth_row(direction, mbps / 8, size, seconds,
                                (unshaped or {}).get(direction))
            out["bandwidth"].append(row)
            say(f"{tier} {direction}: {row['mb_s']:.1f} MB/s, limit {row['limit_mb_s']:.1f} "
                f"({row['ratio']:.3f})")
    return out


async def _upload(target, headers: dict[str, str], size: int, seed: int,
                  refill_s: float = 0.0) -> tuple[float, str]:
    """POST, then the PATCH streamed (timed: first byte to its answer), then PUT."""
    content = RandomBytes(seed)
    hasher = hashlib.sha256()
    for piece in content.pieces(size, seed):      # the digest first, off the clock
        hasher.update(piece)
    digest = "sha256:" + hasher.hexdigest()

    async def body():
        for piece in content.pieces(size, seed):
            yield piece

    base = URL(target.url)
    async with open_session(1, headers=headers) as session:
        r = await _send(session, "POST", base.with_path(f"/v2/{REPO}/blobs/uploads/"), 202,
                        "POST upload", target, headers={"Content-Length": "0"})
        location = base.join(URL(r.headers["Location"], encoded=True))
        if refill_s:
            # The PATCH is a write too, and its body cannot be sent twice: the
            # write steps before left the buckets empty, so let them refill.
            await asyncio.sleep(refill_s)
        started = time.perf_counter()
        async with session.patch(location, data=body(), headers={
                "Content-Type": "application/octet-stream", "Content-Length": str(size)}) as r:
            await _expect(r, 202, "PATCH upload", target)
            location = base.join(URL(r.headers["Location"], encoded=True))
        seconds = time.perf_counter() - started
        await _send(session, "PUT", location.update_query(digest=digest), 201, "PUT upload",
                    target, headers={"Content-Length": "0"})
    return seconds, digest


async def _download(target, headers: dict[str, str], digest: str, size: int) -> float:
    """GET the blob, from the request to its last byte; hashed and checked."""
    hasher = hashlib.sha256()
    received = 0
    async with open_session(1, headers=headers) as session:
        started = time.perf_counter()
        async with session.get(f"{target.url}/v2/{REPO}/blobs/{digest}") as r:
            await _expect(r, 200, "GET blob", target)
            async for piece in r.content.iter_any():
                hasher.update(piece)
                received += len(piece)
        seconds = time.perf_counter() - started
    if received != size or "sha256:" + hasher.hexdigest() != digest:
        raise WorkloadError(f"{target.name}: GET blob returned {received} bytes that do not "
                            f"hash to {digest}")
    return seconds


async def _expect(r: aiohttp.ClientResponse, status: int, what: str, target) -> None:
    if r.status != status:
        body = (await r.read())[:300].decode(errors="replace")
        raise WorkloadError(f"{target.name}: {what} answered {r.status}, expected {status}: "
                            f"{body}")


async def _overhead(options: TiersBenchOptions, workdir: Path, say) -> tuple[dict, dict]:
    """The overhead step (module docstring); also the client's unshaped
    transfer speeds on ``off`` (MB/s by direction)."""
    with contextlib.ExitStack() as stack:
        targets: dict[str, tuple[object, dict[str, str]]] = {}
        pids = []
        for name in (OFF, ON, OFF2):
            registry = await Registry.start(name, overhead_spec(name), workdir, stack)
            headers = await registry.identity("bench")
            await push_tiny_image(registry.target, headers)
            targets[name] = (registry.target, headers)
            pids += registry.cluster.all_pids()
            say(f"overhead {name}: {registry.target.url} (pid {registry.target.pid})")
        reference = ReferenceRegistry(workdir / REFERENCE, options.reference_binary)
        stack.callback(reference.stop)
        await asyncio.to_thread(reference.start)
        pids.append(reference.pid)
        await push_tiny_image(reference, {})
        targets[REFERENCE] = (reference, {})
        say(f"overhead reference: {reference.url} (pid {reference.pid})")
        rounds: list[dict[str, dict[str, float]]] = []
        cpu_us: dict[str, dict[str, list[float]]] = {}
        others = procfs.OtherCpu(pids)
        names = list(OVERHEAD_TARGETS)
        for i in range(options.rounds):
            this: dict[str, dict[str, float]] = {}
            for name in names[i % len(names):] + names[:i % len(names)]:
                target, headers = targets[name]
                async with open_session(options.concurrency, headers=headers) as session:
                    for op in SMALL_OPS:
                        await _small_ops(session, target, op, min(options.ops, 200),
                                         options.concurrency)          # warm
                        async with Measured(target.pid) as m:
                            await _small_ops(session, target, op, options.ops,
                                             options.concurrency)
                        this.setdefault(name, {})[op] = options.ops / m.seconds
                        cpu_us.setdefault(name, {}).setdefault(op, []).append(
                            m.server_cpu_s / options.ops * 1e6)
            rounds.append(this)
            say(f"overhead round {i + 1}/{options.rounds}: " + ", ".join(
                f"{n} {this[n]['head_manifest']:,.0f}/s" for n in names))
        summary = overhead_summary(rounds)
        for op, row in summary.items():
            row["server_us_per_op"] = {n: statistics.median(cpu_us[n][op]) for n in cpu_us}
        unshaped = {}
        if BANDWIDTH in options.steps:
            target, headers = targets[OFF]
            size = max(MIB, int(UNSHAPED_BYTES * min(1.0, options.scale)) // MIB * MIB)
            up_s, digest = await _upload(target, headers, size, options.seed + 1)
            down_s = await _download(target, headers, digest, size)
            unshaped = {"upload": size / up_s / 1e6, "download": size / down_s / 1e6,
                        "bytes": size}
            say(f"unshaped on off: up {unshaped['upload']:.0f} MB/s, "
                f"down {unshaped['download']:.0f} MB/s")
        return ({"rounds": rounds, "summary": summary, "unshaped": unshaped,
                 "other_processes_cores": others.cores(),
                 "reference_version": procfs.machine(reference.binary).reference_version},
                unshaped)


async def _small_ops(session: aiohttp.ClientSession, target, op: str, count: int,
                     concurrency: int) -> None:
    url = f"{target.url}/v2/{REPO}/manifests/{TAG}"
    method = session.head if op == "head_manifest" else session.get

    async def one(_: int) -> None:
        async with method(url, headers={"Accept": OCI_MANIFEST}) as r:
            await r.read()
            if r.status != 200:
                raise WorkloadError(f"{target.name}: {op} answered {r.status}: a limit was hit "
                                    f"or the image is missing")

    await run_concurrently(range(count), concurrency, one)


def _machine() -> dict:
    return {"cpu": procfs.cpu_model(), "cores": os.cpu_count() or 0,
            "python": platform.python_version(), "kernel": platform.release()}


# -- the report -------------------------------------------------------------------------------


def _ok(flag: bool) -> str:
    return "✓" if flag else "✗"


def _ratio(row: dict, key: str) -> str:
    s = row.get(key)
    return "—" if s is None else f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f})"


def print_report(results: dict, console: Console) -> None:
    m, w = results["machine"], results["workload"]
    console.print(f"[bold]machine[/bold]  {m['cpu']}, {m['cores']} cores · Linux {m['kernel']} · "
                  f"Python {m['python']}; load average before "
                  + " ".join(f"{x:.2f}" for x in results["load_average_before"]) + ", after "
                  + " ".join(f"{x:.2f}" for x in results["load_average_after"])
                  + f" · {results['seconds']:.0f} s")
    scaled = f", every rate and bandwidth × {w['scale']}" if w["scale"] != 1 else ""
    t = Table(title=f"limits achieved: offered {w['over']}× each limit, window {w['window_s']:g} s "
                    f"after the first 429 + {w['settle_s']:g} s, burst {w['burst_s']:g} s{scaled}")
    for column in ("tier", "step", "identities", "limit /min", "offered /min", "admitted /min",
                   "ratio", f"±{TOLERANCE:.0%}", "refused /min (by)", "errors", "drain s",
                   "others cores"):
        t.add_column(column, justify="left" if column in ("tier", "step") else "right")
    for tier, r in results["tiers"].items():
        for row in r["rates"]:
            by = ", ".join(k if len(row["refused_by"]) == 1 else f"{k} {v}"
                           for k, v in sorted(row["refused_by"].items()))
            offered = f"{row['offered_per_min']:,.0f}" + ("" if row["drove_past"] else " (short)")
            t.add_row(tier, f"{row['step']} ({row['scope']})", str(row["identities"]),
                      f"{row['limit_per_min']:,.0f}", offered,
                      f"{row['admitted_per_min']:,.0f}", f"{row['ratio']:.3f}",
                      _ok(row["within"]), f"{row['refused_per_min']:,.0f} ({by})",
                      str(row["errors"]),
                      "—" if row["drain_s"] is None else f"{row['drain_s']:.1f}",
                      f"{row['other_processes_cores']:.2f}")
    if any(r["rates"] for r in results["tiers"].values()):
        console.print(t)
    bands = [(tier, row) for tier, r in results["tiers"].items() for row in r["bandwidth"]]
    if bands:
        t = Table(title=f"bandwidth: one blob of the download budget × {w['transfer_s']:g} s")
        for column in ("tier", "direction", "MB", "limit MB/s", "MB/s", "ratio",
                       f"±{TOLERANCE:.0%}", "unshaped MB/s"):
            t.add_column(column, justify="left" if column in ("tier", "direction") else "right")
        for tier, row in bands:
            t.add_row(tier, row["direction"], f"{row['bytes'] / 1e6:,.0f}",
                      f"{row['limit_mb_s']:.1f}", f"{row['mb_s']:.1f}", f"{row['ratio']:.3f}",
                      _ok(row["within"]),
                      "—" if row["unshaped_mb_s"] is None else f"{row['unshaped_mb_s']:.0f}")
        console.print(t)
    if "overhead" in results:
        o = results["overhead"]
        t = Table(title=f"throttling on (never reached) vs off: {w['rounds']} rounds × {w['ops']} "
                        f"ops, c={w['concurrency']}, order rotated; other processes "
                        f"{o['other_processes_cores']:.2f} cores; reference: "
                        f"{o['reference_version']}, no auth")
        for column in ("operation", "off /s", "on /s", "off2 /s", "reference /s",
                       "on/off median (range)", "A/A off2/off (range)", "reference/off",
                       "node µs/op off/on/off2", "≤ 5 %"):
            t.add_column(column, justify="left" if column == "operation" else "right")
        for op, row in o["summary"].items():
            ops = row["ops_per_s"]
            us = row["server_us_per_op"]

            t.add_row(op.replace("_", " "), *(f"{ops.get(n, 0):,.0f}" for n in
                                              (OFF, ON, OFF2, REFERENCE)),
                      _ratio(row, "on/off"), _ratio(row, "off2/off"),
                      _ratio(row, "reference/off"),
                      " / ".join(f"{us.get(n, 0):.0f}" for n in (OFF, ON, OFF2)),
                      _ok(row.get("within_target", False)) if row.get("resolved")
                      else "noise")
        console.print(t)
