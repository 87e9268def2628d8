"""``georeg bench webhooks``: how soon a webhook tells a receiver about a push,
against the least the modelled WAN allows; how many deliveries a second one
node sustains with a registry's 500 webhooks; and whether a receiver that
hangs slows pushes.

The cluster is started in a child process (``clusterproc``, the default spec
unless ``config``) on free ports. The receiver is a real aiohttp server in
this process, on loopback: ``/hook/{webhook}`` answers 200 at once and notes
the arrival (``time.time_ns()``, the clock the client's 201s are read on);
``/hang/{webhook}`` reads the request and never answers (until the run ends).
Images are pushed at one node (``origin``, a region meaning its first node,
which is also the node that delivers that region's webhooks). Webhooks are
created, pinged and deleted through the management API, as ``georeg webhook``
does; each new webhook's ping is awaited at the receiver before anything is
pushed, so every webhook is known to the node that delivers it.

Steps (``steps``), in this order:

``latency``
    One ``push`` webhook per replica region (``location`` that region), and
    one ``replicated`` webhook in the home region. ``images`` images (a config
    and ``layers`` random layers of ``layer_bytes``, each its own repository)
    pushed at ``rate`` per second on an open-loop schedule. Per webhook: the
    delivery latency, from the client's receipt of the manifest PUT's 201 to
    the receiver's arrival, p50/p99, against the floor (below), and the time
    after the delivering node itself held the image (``GetImageStatus``: the
    webhook pipeline's own share, the modelled hop to the receiver included).
``hanging``
    ``manifests`` small manifests PUT by tag at ``concurrency`` (a tiny config
    and one shared tiny layer, pushed untimed first; a repository per round),
    in rounds A (no webhook at all) and B (one ``push`` webhook in the
    origin's region whose receiver hangs: every attempt times out, is retried,
    and the events pile up in the node's outbox): A B A B … A, ``pairs`` B
    rounds, after an untimed warm-up; between rounds, until every node holds
    the round's last manifest and the cluster's CPU is back near its idle
    level. Reported: manifests/s and the origin's CPU per manifest per round;
    each B against the mean of the A on either side (``bracketed``: a drift
    over the run is not B's doing); the A rounds' spread and consecutive A÷A
    (the noise); the requests the hanging receiver held (proof that B hung).
``bulk``
    ``webhooks`` webhooks (500: Premium's limit) in the origin's region, all
    taking ``push`` on every repository (their creation timed), then
    ``bulk_pushes`` small images pushed one after another: ``webhooks`` ×
    ``bulk_pushes`` deliveries. From the first 201 until the last delivery
    arrived: deliveries/s (overall, and between the 10th and 90th percentile
    arrivals), the delivering node's CPU, this process's (the receiver's: if it
    is near one core, the receiver is the limit), and the deliveries' latency.

The floor (``cluster.bench.floor``): a region's webhook cannot fire before the
region holds the image, nor reach its receiver sooner than the link from that
region to the receiver's location (``receiver_location``; by default each
webhook's own region, ~0.5 ms: a pipeline deploying in its region) carries it::

    push in R         floor = arrival floor at R's delivering node (image_floor_ms;
                              0 latency when that is the node pushed to)
                              + ow(R → receiver)
    replicated in H   floor = max over the regions R residency allows of
                              (arrival floor at R + ow(R → H), none when R = H)
                              + ow(H → receiver)

``ow`` the link's least one-way delay (latency − jitter). Without the WAN
model (``wan=False``) every link is 0 and the floor is the origin's handling.

Invariants
    * Every expected delivery is counted by event id; duplicates (at-least-once
      redeliveries) are counted and reported, never counted twice.
    * A delivery that does not arrive within ``timeout_s`` is reported as
      missing; a wrong answer from the registry stops the run (``WorkloadError``).
    * Every process and server started here is stopped on the way out.
    * Timings are reported, never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import msgspec
from aiohttp import web
from rich.console import Console
from rich.table import Table

from ..control import spec as specs
from ..control.webhooks import delivery_order
from ..network.links import LinkModel
from ..testing import on_any_ports
from . import procfs
from .clusterproc import ClusterProcess, ClusterStartError
from .floor import ImagePush, image_floor_ms, least_one_way_ms
from .lag import ArrivalReader, NodeTarget, TimedClient, prepare
from .lag_report import percentile
from .procfs import MIB
from .workload import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    Client,
    RandomBytes,
    open_session,
    run_concurrently,
    sha256_digest,
)

LATENCY, HANGING, BULK = "latency", "hanging", "bulk"
STEPS = (LATENCY, HANGING, BULK)
WEBHOOKS_PATH = "/georeg/v1/webhooks"
TINY_LAYER = b"georeg bench webhooks: one shared tiny layer\n"
SETTLE_WINDOW_S = 0.5
SETTLE_MAX_S = 20.0
PING_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class WebhookBenchOptions:
    config: Path | None = None
    wan: bool | None = None                 # None: as the spec says; False: loopback
    origin: str = ""                        # region or node pushed to; "": the home region
    receiver_location: str | None = None    # None: each webhook's own region
    steps: tuple[str, ...] = STEPS
    # latency
    images: int = 20
    rate: float = 0.5                       # images per second
    layers: int = 3
    layer_bytes: int = MIB
    # hanging
    manifests: int = 1000                   # per round
    pairs: int = 2                          # A B rounds
    concurrency: int = 8
    # bulk
    webhooks: int = 500
    bulk_pushes: int = 20
    workdir: Path | None = None
    quiet_wait_s: float = 30.0
    timeout_s: float = 300.0
    seed: int = 1

    def quick(self) -> WebhookBenchOptions:
        """Every step at a size that runs in about two minutes with the default cluster."""
        return replace(self, images=6, rate=1.0, manifests=300, webhooks=100, bulk_pushes=5)

    def validate(self) -> None:
        if self.images < 1 or self.manifests < 1 or self.pairs < 1 or self.webhooks < 1 \
                or self.bulk_pushes < 1 or self.rate <= 0 or self.concurrency < 1:
            raise ValueError("sizes, counts and the rate must be positive")
        unknown = set(self.steps) - set(STEPS)
        if unknown:
            raise ValueError(f"unknown steps {sorted(unknown)}; known: {', '.join(STEPS)}")

    def workload(self) -> dict:
        return {"steps": list(self.steps), "images": self.images, "rate_per_s": self.rate,
                "layers": self.layers, "layer_bytes": self.layer_bytes,
                "manifests_per_round": self.manifests, "pairs": self.pairs,
                "concurrency": self.concurrency, "webhooks": self.webhooks,
                "bulk_pushes": self.bulk_pushes,
                "receiver_location": self.receiver_location or "each webhook's own region",
                "seed": self.seed}


# -- the receiver ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    webhook: str
    arrived_ns: int
    id: str
    action: str
    repository: str
    tag: str
    arrivals: dict[str, str]        # ``replication.arrivals`` of a replicated event


class Receiver:
    """The webhooks' receiver, an aiohttp server in this process (see the module
    docstring). ``deliveries`` in order of arrival; ``hung`` requests held."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.hung = 0
        self.url = ""
        self._arrived = asyncio.Event()
        self._release = asyncio.Event()
        self._released: dict[str, asyncio.Event] = {}
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook/{name}", self._hook)
        app.router.add_post("/hang/{name}", self._hang)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def uri(self, name: str, hang: bool = False) -> str:
        return f"{self.url}/{'hang' if hang else 'hook'}/{name}"

    async def _hook(self, request: web.Request) -> web.Response:
        arrived = time.time_ns()
        body = await request.read()
        try:
            event = json.loads(body)
        except ValueError:
            return web.Response(status=400, text="not JSON")
        target = event.get("target") or {}
        self.deliveries.append(Delivery(
            request.match_info["name"], arrived, str(event.get("id", "")),
            str(event.get("action", "")), str(target.get("repository", "")),
            str(target.get("tag", "")), (event.get("replication") or {}).get("arrivals") or {}))
        self._arrived.set()
        return web.Response(status=200)

    async def _hang(self, request: web.Request) -> web.Response:
        await request.read()
        self.hung += 1
        released = self._released.setdefault(request.match_info["name"], asyncio.Event())
        await asyncio.wait([asyncio.ensure_future(self._release.wait()),
                            asyncio.ensure_future(released.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        return web.Response(status=503)

    def release(self, name: str) -> None:
        """Answer (503) every request held for webhook ``name``, now and later."""
        self._released.setdefault(name, asyncio.Event()).set()

    async def until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Wait for deliveries until ``done()``; False if it is not by ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(left, 1.0))
        return True


# -- small pieces -------------------------------------------------------------------------------


def stats_ms(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"count": len(values), "p50_ms": percentile(values, 0.50),
            "p99_ms": percentile(values, 0.99), "max_ms": max(values)}


def _iso_ns(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1e9)


def tiny_manifest(config: bytes, note: str) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": sha256_digest(TINY_LAYER),
                    "size": len(TINY_LAYER)}],
        "annotations": {"org.georeg.bench.webhooks": note},
    }).encode()


class CpuMeter:
    """CPU seconds of named processes (and of this one) since it was made."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._t0 = time.monotonic()
        self._own0 = procfs.own_cpu_seconds()
        self._cpu0 = self._read()

    def _read(self) -> dict[str, float]:
        return procfs.cpu_seconds_by_name(self.pids)

    def cores(self) -> dict:
        """Each process's CPU as cores over the window; ``bench`` is this process."""
        wall = time.monotonic() - self._t0
        now = self._read()
        used = {name: now[name] - self._cpu0[name] for name in now if name in self._cpu0}
        used["bench (receiver and client)"] = procfs.own_cpu_seconds() - self._own0
        return {"wall_s": wall, "cpu_s": used,
                "cores": {name: s / wall for name, s in used.items()} if wall else {}}


# -- the run ----------------------------------------------------------------------------------


async def run(options: WebhookBenchOptions, console: Console | None = None) -> dict:
    options.validate()
    console = console or Console(stderr=True)
    say = lambda text: console.print(f"[dim]{text}[/dim]")  # noqa: E731
    with contextlib.ExitStack() as stack:
        workdir = options.workdir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="georeg-webhooks-")))
        workdir.mkdir(parents=True, exist_ok=True)
        spec = cluster_spec(options)
        say(f"starting {spec.node_count()} nodes (+ {len(spec.paired_regions())} paired-region "
            f"copies) ({'modelled WAN' if spec.wan.enabled else 'loopback, no modelled WAN'}) "
            f"in {workdir}")
        started = time.monotonic()
        cluster = await asyncio.to_thread(ClusterProcess.start, spec, workdir / "cluster")
        stack.callback(cluster.stop)
        receiver = Receiver()
        await receiver.start()
        try:
            bench = _Run(options, cluster, receiver, say)
            return await bench.run(time.monotonic() - started)
        finally:
            await receiver.close()


def cluster_spec(options: WebhookBenchOptions) -> specs.ClusterSpec:
    spec = specs.load(options.config)
    if options.wan is not None:
        spec = msgspec.structs.replace(spec, wan=msgspec.structs.replace(spec.wan,
                                                                         enabled=options.wan))
    return on_any_ports(spec)


class _Run:
    def __init__(self, options: WebhookBenchOptions, cluster: ClusterProcess,
                 receiver: Receiver, say: Callable[[str], None]) -> None:
        self.options = options
        self.cluster = cluster
        self.receiver = receiver
        self.say = say
        self.spec = cluster.spec
        self.wan = cluster.spec.wan_model()
        self.origin = cluster.resolve_node(options.origin or cluster.spec.home_region)
        self.regions = sorted({n.region for n in cluster.nodes},
                              key=lambda r: (r != cluster.spec.home_region, r))
        self.credentials: dict[str, str] = {}

    # -- the management API ---------------------------------------------------------------

    async def call(self, method: str, path: str, body: dict | None = None) -> object:
        return await asyncio.to_thread(self.cluster.call, method, path, body)

    def receiver_of(self, region: str) -> str:
        return self.options.receiver_location or region

    async def create(self, name: str, region: str, actions: list[str], hang: bool = False) -> None:
        await self.call("POST", WEBHOOKS_PATH, {
            "name": name, "serviceUri": self.receiver.uri(name, hang), "actions": actions,
            "location": region, "receiverLocation": self.receiver_of(region)})

    async def delete(self, name: str) -> None:
        await self.call("DELETE", f"{WEBHOOKS_PATH}/{urllib.parse.quote(name)}")

    async def pinged(self, name: str) -> float:
        """Ping ``name`` until its region's delivering node knows it, and wait for
        the ping at the receiver; the seconds from the first try."""
        started = time.monotonic()
        deadline = started + PING_TIMEOUT_S
        while True:
            try:
                answer = await self.call("POST", f"{WEBHOOKS_PATH}/{name}/ping")
                break
            except ClusterStartError as exc:
                if time.monotonic() > deadline:
                    raise ClusterStartError(f"webhook {name} could not be pinged: {exc}") from None
                await asyncio.sleep(0.2)   # the webhook is still on its way to that node
        ident = answer["id"]  # type: ignore[index]
        if not await self.receiver.until(
                lambda: any(d.id == ident for d in self.receiver.deliveries[-50:]),
                max(1.0, deadline - time.monotonic())):
            raise ClusterStartError(f"webhook {name}'s ping did not reach the receiver")
        return time.monotonic() - started

    # -- pushing ----------------------------------------------------------------------------

    def session(self, concurrency: int):
        return open_session(concurrency, self.cluster.tls, self.credentials)

    def target(self) -> NodeTarget:
        return NodeTarget(self.origin.name, self.cluster.http(self.origin.name),
                          self.cluster.pids.get(self.origin.name, 0))

    def allowed(self, repository: str) -> list[str]:
        policy = self.spec.residency_policy()
        return [r for r in self.regions if policy.allows(self.origin.region, repository, r)]

    # -- the steps -----------------------------------------------------------------------

    async def run(self, start_s: float) -> dict:
        options, cluster = self.options, self.cluster
        self.credentials = cluster.registry_headers()
        results: dict = {"machine": _machine(), "workload": options.workload(),
                         "cluster": {"nodes": len(cluster.nodes), "regions": self.regions,
                                     "home": self.spec.home_region, "origin": self.origin.name,
                                     "tier": self.spec.tier, "auth": self.spec.auth_enabled,
                                     "wan": self.spec.wan.enabled, "started_s": start_s},
                         "load_average_before": os.getloadavg(), "steps": {}}
        began = time.monotonic()
        if options.quiet_wait_s > 0:
            load = await procfs.wait_for_quiet(cluster.all_pids(), options.quiet_wait_s)
            results["other_load_at_start"] = load
            if load >= 0.1:
                self.say(f"other processes still use {load:.0%} of a core; measuring anyway")
        for step in STEPS:
            if step not in options.steps:
                continue
            others = procfs.OtherCpu(cluster.all_pids())
            measure = {LATENCY: self.latency, HANGING: self.hanging, BULK: self.bulk}[step]
            result = await measure()
            result["other_processes_cores"] = others.cores()
            result["load_average_after"] = os.getloadavg()
            results["steps"][step] = result
        results["load_average_after"] = os.getloadavg()
        results["seconds"] = time.monotonic() - began
        return results

    async def latency(self) -> dict:
        options = self.options
        home = self.spec.home_region
        hooks = {f"push{region}": (region, "push") for region in self.regions}
        hooks[f"replicated{home}"] = (home, "replicated")
        self.say(f"latency: {len(hooks)} webhooks ({', '.join(hooks)}), pinged")
        for name, (region, action) in hooks.items():
            await self.create(name, region, [action])
        for name in hooks:
            await self.pinged(name)
        content = RandomBytes(options.seed)
        images = [prepare(content, f"whbench/latency/img{i}", options.layers,
                          options.layer_bytes) for i in range(options.images)]
        expected = {(name, image.repository) for image in images for name, (region, action)
                    in hooks.items() if action == "replicated" or region in
                    self.allowed(image.repository)}
        first = len(self.receiver.deliveries)
        self.say(f"latency: {options.images} images at {options.rate:g}/s at {self.origin.name}; "
                 f"{len(expected)} deliveries expected")
        pushes: list[ImagePush] = []
        loop = asyncio.get_running_loop()
        async with self.session(options.layers + 2) as session:
            client = TimedClient(self.target(), session, options.layers + 2)

            async def push(image) -> None:
                pushes.append(await client.push_image(self.origin.name, image))

            async with asyncio.TaskGroup() as group:
                start = loop.time() + 0.05
                for i, image in enumerate(images):
                    await asyncio.sleep(max(0.0, start + i / options.rate - loop.time()))
                    group.create_task(push(image))

        def seen() -> set[tuple[str, str]]:
            return {(d.webhook, d.repository) for d in self.receiver.deliveries[first:]}

        await self.receiver.until(lambda: expected <= seen(), options.timeout_s)
        mine = [d for d in self.receiver.deliveries[first:] if d.webhook in hooks]
        reader = ArrivalReader(self.cluster)
        try:
            held = await self._held(reader, pushes)
        finally:
            await reader.close()
        by_repo = {p.repository: p for p in pushes}
        per_hook = {}
        for name, (region, action) in hooks.items():
            per_hook[name] = self._hook_latency(name, region, action, mine, by_repo, held)
        missing = sorted(expected - seen())
        result = {"webhooks": per_hook, "expected": len(expected), "missing": len(missing),
                  "missing_examples": [list(m) for m in missing[:5]],
                  "duplicates": _duplicates(mine)}
        for name in hooks:
            await self.delete(name)
        return result

    async def _held(self, reader: ArrivalReader, pushes: list[ImagePush]) -> dict:
        """(region, repository) → when the region's delivering node held the image."""
        held: dict[tuple[str, str], int] = {}
        for region in self.regions:
            node = delivery_order(self.cluster.plan, region)[0]
            for push in pushes:
                found = await reader.read(node, push)
                if found is not None:
                    held[(region, push.repository)] = found.arrived_ns
        return held

    def _region_floor_ms(self, push: ImagePush, region: str) -> float:
        node = delivery_order(self.cluster.plan, region)[0]
        link = LinkModel() if node == self.origin.name else self.wan.link(self.origin.region, region)
        return image_floor_ms(push, link)

    def floor_ms(self, push: ImagePush, region: str, action: str) -> float:
        to_receiver = least_one_way_ms(self.wan.link(region, self.receiver_of(region)))
        if action != "replicated":
            return self._region_floor_ms(push, region) + to_receiver
        known = max(self._region_floor_ms(push, r)
                    + (0.0 if r == region else least_one_way_ms(self.wan.link(r, region)))
                    for r in self.allowed(push.repository))
        return known + to_receiver

    def _hook_latency(self, name: str, region: str, action: str, deliveries: list[Delivery],
                      by_repo: dict[str, ImagePush], held: dict) -> dict:
        firsts: dict[str, Delivery] = {}
        for d in deliveries:
            if d.webhook == name and d.repository in by_repo and d.repository not in firsts:
                firsts[d.repository] = d
        latency, floors, after, samples = [], [], [], []
        for repo, d in sorted(firsts.items(), key=lambda item: by_repo[item[0]].acked_ns):
            push = by_repo[repo]
            latency.append((d.arrived_ns - push.acked_ns) / 1e6)
            floors.append(self.floor_ms(push, region, action))
            since = None
            if action == "replicated":
                last = max((_iso_ns(t) for t in d.arrivals.values()), default=0)
                since = d.arrived_ns - last if last else None
            elif (region, repo) in held:
                since = d.arrived_ns - held[(region, repo)]
            if since is not None:
                after.append(since / 1e6)
            samples.append({"repository": repo, "latency_ms": latency[-1], "floor_ms": floors[-1],
                            "after_held_ms": since / 1e6 if since is not None else None})
        shown = stats_ms(latency)
        floor = percentile(floors, 0.5) if floors else None
        below = sum(1 for x, f in zip(latency, floors, strict=True) if x < f)
        return {"region": region, "action": action, "receiver_location": self.receiver_of(region),
                **shown, "floor_p50_ms": floor, "below_floor": below,
                "p50_over_floor_ms": shown["p50_ms"] - floor if floor is not None else None,
                "p50_ratio": shown["p50_ms"] / floor if floor and floor >= 1 else None,
                "p99_ratio": shown["p99_ms"] / floor if floor and floor >= 1 else None,
                "after_held": stats_ms(after),
                "after_held_meaning": ("after the last region's arrival as the payload states it"
                                       if action == "replicated" else
                                       "after the delivering node held the image"),
                "samples": samples}

    async def _setup_tiny(self, client: Client, repository: str) -> bytes:
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "repository": repository}).encode()
        await client.push_blob(repository, sha256_digest(config), config, len(config))
        await client.push_blob(repository, sha256_digest(TINY_LAYER), TINY_LAYER, len(TINY_LAYER))
        return config

    async def hanging(self) -> dict:
        options = self.options
        region = self.origin.region
        rounds: list[dict] = []
        hung = self.receiver.hung
        reader = ArrivalReader(self.cluster)
        async with self.session(options.concurrency) as session:
            client = Client(self.target(), session, options.concurrency)

            async def push_round(label: str, count: int) -> dict:
                # a repository of its own: no round pushes into a bigger one than another
                repository = f"whbench/steady-{label.lower()}"
                config = await self._setup_tiny(client, repository)

                async def one(i: int) -> None:
                    body = tiny_manifest(config, f"{label}-{i}")
                    await client.push_manifest(repository, f"{label}-{i}", body)

                meter = CpuMeter({self.origin.name: self.target().pid})
                cluster_cpu0 = self._cluster_cpu()
                started = time.perf_counter()
                await run_concurrently(range(count), options.concurrency, one)
                seconds = time.perf_counter() - started
                cpu = meter.cores()
                last = tiny_manifest(config, f"{label}-{count - 1}")
                await self._everywhere(reader, repository, f"{label}-{count - 1}",
                                       sha256_digest(last))
                # Every cluster process, until the last manifest is everywhere:
                # what the round cost the whole cluster (its replication included),
                # the figure that bounds throughput on a machine the cluster fills.
                cluster_cpu = self._cluster_cpu() - cluster_cpu0
                return {"round": label, "manifests": count, "seconds": seconds,
                        "per_s": count / seconds,
                        "origin_cpu_ms_per_manifest": cpu["cpu_s"].get(self.origin.name, 0.0)
                        * 1000 / count,
                        "cluster_cpu_ms_per_manifest": cluster_cpu * 1000 / count}

            try:
                idle = await self._idle_cores()
                self.say(f"hanging: warm-up, then A (no webhook) and B (a hanging receiver), "
                         f"A B … A with {options.pairs} B, {options.manifests} manifests each at "
                         f"c={options.concurrency}; cluster idle at {idle:.2f} cores")
                await push_round("warmup", max(1, options.manifests // 4))
                events = None
                plan = [r for k in range(options.pairs) for r in (("A", k), ("B", k))]
                plan.append(("A", options.pairs))
                for kind, k in plan:
                    name = f"hanging{k}"
                    if kind == "B":
                        await self.create(name, region, ["push"], hang=True)
                        await self._known(name)
                    await self._settle(idle)
                    shown = await push_round(f"{kind}{k}", options.manifests)
                    shown["kind"] = kind
                    rounds.append(shown)
                    self.say(f"hanging: round {kind}{k}: {shown['per_s']:.0f} manifests/s")
                    if kind == "B":
                        if k == options.pairs - 1:
                            events = await self.call(
                                "GET", f"{WEBHOOKS_PATH}/{name}/events?limit=1000")
                        await self.delete(name)
                        # Its worker, held by the request in flight, purges the deleted
                        # webhook's events when that request ends: let it end now, so
                        # that the purge falls before the next A round's settling, not
                        # into its measurement (up to the node's timeout later).
                        self.receiver.release(name)
            finally:
                await reader.close()
        return {**bracketed(rounds),
                "idle_cores": idle, "hanging_requests": self.receiver.hung - hung,
                "hanging_webhook_events": _event_summary(events)}

    async def _known(self, name: str) -> None:
        """Until the delivering node knows webhook ``name`` (its ping is accepted;
        a hanging receiver never answers it, so it is not awaited there)."""
        deadline = time.monotonic() + PING_TIMEOUT_S
        while True:
            try:
                await self.call("POST", f"{WEBHOOKS_PATH}/{name}/ping")
                return
            except ClusterStartError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)   # the webhook is still on its way to that node

    async def _everywhere(self, reader: ArrivalReader, repository: str, tag: str,
                          digest: str) -> None:
        """Until every node residency allows holds ``repository:tag`` (bounded)."""
        push = ImagePush(self.origin.name, repository, tag, digest, (), 0, 0, 0)
        nodes = [n.name for n in self.cluster.nodes if n.region in self.allowed(repository)]
        deadline = time.monotonic() + self.options.timeout_s
        while nodes and time.monotonic() < deadline:
            nodes = [n for n in nodes if await reader.read(n, push) is None]
            if nodes:
                await asyncio.sleep(0.1)   # poll interval, bounded by the deadline above

    def _cluster_cpu(self) -> float:
        total = 0.0
        for pid in self.cluster.all_pids():
            with contextlib.suppress(OSError):
                total += procfs.cpu_seconds(pid)
        return total

    async def _window_cores(self) -> float:
        before, started = self._cluster_cpu(), time.monotonic()
        await asyncio.sleep(SETTLE_WINDOW_S)   # the measuring window
        return (self._cluster_cpu() - before) / (time.monotonic() - started)

    async def _idle_cores(self) -> float:
        return min([await self._window_cores() for _ in range(4)])

    async def _settle(self, idle: float) -> None:
        """Until the cluster's CPU is back near idle (the last round's replication
        and anti-entropy done), at most ``SETTLE_MAX_S``."""
        deadline = time.monotonic() + SETTLE_MAX_S
        while time.monotonic() < deadline:
            if await self._window_cores() <= 1.5 * idle + 0.05:
                return

    async def bulk(self) -> dict:
        options = self.options
        region = self.origin.region
        names = [f"bulk{i:05d}" for i in range(options.webhooks)]
        self.say(f"bulk: creating {len(names)} webhooks in {region}")
        started = time.monotonic()
        for name in names:
            await self.create(name, region, ["push"])
        created_s = time.monotonic() - started
        known_s = await self.pinged(names[-1])
        repository = "whbench/bulk"
        expected = options.webhooks * options.bulk_pushes
        self.say(f"bulk: {options.bulk_pushes} pushes → {expected} deliveries")
        first = len(self.receiver.deliveries)
        acks: dict[str, int] = {}
        async with self.session(2) as session:
            client = Client(self.target(), session, 2)
            config = await self._setup_tiny(client, repository)
            meter = CpuMeter({self.origin.name: self.target().pid})
            for i in range(options.bulk_pushes):
                await client.push_manifest(repository, f"b{i}", tiny_manifest(config, f"b{i}"))
                acks[f"b{i}"] = time.time_ns()
        wanted = set(names)

        def delivered() -> set[tuple[str, str]]:
            return {(d.webhook, d.tag) for d in self.receiver.deliveries[first:]
                    if d.webhook in wanted and d.action == "push"}

        await self.receiver.until(lambda: len(delivered()) >= expected,
                                  max(options.timeout_s, expected / 20))
        cpu = meter.cores()
        mine = [d for d in self.receiver.deliveries[first:]
                if d.webhook in wanted and d.action == "push" and d.tag in acks]
        unique = {}
        for d in mine:
            unique.setdefault((d.webhook, d.tag), d)
        arrivals = sorted(d.arrived_ns for d in unique.values())
        first_ack = min(acks.values())
        span_s = (arrivals[-1] - first_ack) / 1e9 if arrivals else None
        steady = None
        if len(arrivals) >= 10:
            lo, hi = arrivals[len(arrivals) // 10], arrivals[(9 * len(arrivals)) // 10]
            if hi > lo:
                steady = (0.8 * len(arrivals)) / ((hi - lo) / 1e9)
        latency = [(d.arrived_ns - acks[d.tag]) / 1e6 for d in unique.values()]
        count = len(unique)
        node_cpu_s = cpu["cpu_s"].get(self.origin.name, 0.0)
        return {"webhooks": options.webhooks, "region": region, "node": self.origin.name,
                "create_s": created_s, "creates_per_s": options.webhooks / created_s,
                "known_after_s": known_s, "pushes": options.bulk_pushes, "expected": expected,
                "delivered": count, "duplicates": _duplicates(mine),
                "seconds": span_s, "per_s": count / span_s if span_s else None,
                "steady_per_s": steady, "latency": stats_ms(latency),
                "cpu": cpu, "node_cpu_ms_per_delivery": node_cpu_s * 1000 / count if count else None}


def bracketed(rounds: list[dict]) -> dict:
    """A B A B … A: each B against the mean of the A before and the A after it,
    so a drift over the run (the machine's other work, the cluster's growing
    content) does not count as B's doing; and the A rounds' spread, the noise
    of the measurement. For throughput and for the origin's CPU per manifest."""
    a = [r for r in rounds if r["kind"] == "A"]
    b = [r for r in rounds if r["kind"] == "B"]

    def ratios(key: str) -> list[float]:
        return [r[key] / ((a[k][key] + a[k + 1][key]) / 2) for k, r in enumerate(b)]

    per_s = [r["per_s"] for r in a]
    mean_a = sum(per_s) / len(per_s)
    throughput, cpu = ratios("per_s"), ratios("origin_cpu_ms_per_manifest")
    cluster_cpu = ratios("cluster_cpu_ms_per_manifest")
    return {"rounds": rounds, "a_per_s": mean_a,
            "b_per_s": sum(r["per_s"] for r in b) / len(b),
            "b_over_a_each": throughput, "b_over_a": sum(throughput) / len(throughput),
            "cpu_b_over_a_each": cpu, "cpu_b_over_a": sum(cpu) / len(cpu),
            "cluster_cpu_b_over_a_each": cluster_cpu,
            "cluster_cpu_b_over_a": sum(cluster_cpu) / len(cluster_cpu),
            "a_over_a_each": [later["per_s"] / earlier["per_s"]
                              for earlier, later in zip(a, a[1:], strict=False)],
            "a_spread": (max(per_s) - min(per_s)) / mean_a}


def _duplicates(deliveries: list[Delivery]) -> int:
    ids = [(d.webhook, d.id) for d in deliveries]
    return len(ids) - len(set(ids))


def _event_summary(events: object) -> dict | None:
    """What ``list-events`` says of the hanging webhook: states and attempt errors."""
    if not isinstance(events, list):
        return None
    states: dict[str, int] = {}
    errors: dict[str, int] = {}
    attempts = 0
    for event in events:
        states[str(event.get("state"))] = states.get(str(event.get("state")), 0) + 1
        for attempt in event.get("attempts") or []:
            attempts += 1
            kind = str(attempt.get("error") or attempt.get("status") or "")[:40]
            errors[kind] = errors.get(kind, 0) + 1
    return {"events": len(events), "states": states, "attempts": attempts, "errors": errors}


def _machine() -> dict:
    return {"cpu": procfs.cpu_model(), "cores": os.cpu_count() or 0,
            "python": platform.python_version(), "kernel": platform.release()}


# -- the report -------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:,.1f}"


def _x(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def print_report(results: dict, console: Console) -> None:
    m, c = results["machine"], results["cluster"]
    console.print(f"[bold]machine[/bold]  {m['cpu']}, {m['cores']} cores · Linux {m['kernel']} · "
                  f"Python {m['python']}")
    console.print(f"cluster {c['nodes']} nodes in {', '.join(c['regions'])}, pushed at "
                  f"{c['origin']}, auth {'on' if c['auth'] else 'off'}, "
                  f"{'modelled WAN' if c['wan'] else 'no WAN model'}; load average before "
                  + " ".join(f"{x:.2f}" for x in results["load_average_before"]) + ", after "
                  + " ".join(f"{x:.2f}" for x in results["load_average_after"])
                  + f" · {results['seconds']:.0f} s")
    steps = results["steps"]
    if LATENCY in steps:
        s = steps[LATENCY]
        t = Table(title=f"push → delivery, {results['workload']['images']} images "
                        f"({s['expected']} deliveries, {s['missing']} missing, "
                        f"{s['duplicates']} duplicates; other processes "
                        f"{s['other_processes_cores']:.2f} cores)")
        for column in ("webhook", "receiver in", "n", "p50 ms", "p99 ms", "floor ms",
                       "p50 − floor", "p50 ratio", "p99 ratio", "after held p50 / p99 ms"):
            t.add_column(column, justify="left" if column == "webhook" else "right")
        for name, h in s["webhooks"].items():
            t.add_row(f"{name} ({h['action']} in {h['region']})", h["receiver_location"],
                      str(h["count"]), _ms(h["p50_ms"]), _ms(h["p99_ms"]), _ms(h["floor_p50_ms"]),
                      _ms(h["p50_over_floor_ms"]), _x(h["p50_ratio"]), _x(h["p99_ratio"]),
                      f"{_ms(h['after_held']['p50_ms'])} / {_ms(h['after_held']['p99_ms'])}")
        console.print(t)
        console.print("[dim]floor: the image's arrival floor at the webhook's region (from the "
                      "client's send of each piece) + the least one-way latency to the "
                      "receiver; ratios only where the floor is ≥ 1 ms. after held: after the "
                      "region's delivering node held the image (replicated: after the last "
                      "region's arrival in the payload)[/dim]")
    if HANGING in steps:
        s = steps[HANGING]
        t = Table(title=f"pushes with a hanging receiver (B) vs no webhook (A): B÷A "
                        f"{s['b_over_a']:.3f} (each B against the A on either side: "
                        + ", ".join(f"{x:.2f}" for x in s["b_over_a_each"])
                        + "); A÷A " + ", ".join(f"{x:.2f}" for x in s["a_over_a_each"])
                        + f", A spread {s['a_spread']:.1%}; CPU per manifest B÷A: origin "
                        f"{s['cpu_b_over_a']:.2f}, whole cluster {s['cluster_cpu_b_over_a']:.2f} "
                        "(" + ", ".join(f"{x:.2f}" for x in s["cluster_cpu_b_over_a_each"])
                        + f"); other processes "
                        f"{s['other_processes_cores']:.2f} cores")
        for column in ("round", "manifests/s", "origin CPU ms/manifest",
                       "cluster CPU ms/manifest"):
            t.add_column(column, justify="right")
        for r in s["rounds"]:
            t.add_row(r["round"], f"{r['per_s']:,.0f}", f"{r['origin_cpu_ms_per_manifest']:.2f}",
                      f"{r['cluster_cpu_ms_per_manifest']:.2f}")
        console.print(t)
        if s["hanging_webhook_events"]:
            e = s["hanging_webhook_events"]
            console.print(f"the hanging receiver held {s['hanging_requests']} requests (each B "
                          f"webhook's worker waits on one until its timeout); the last B "
                          f"webhook's list-events: {e['events']} events {e['states']}, "
                          f"{e['attempts']} finished attempts {e['errors']}")
    if BULK in steps:
        s = steps[BULK]
        cores = s["cpu"]["cores"]
        t = Table(title=f"{s['webhooks']} webhooks in {s['region']}, {s['pushes']} pushes "
                        f"(other processes {s['other_processes_cores']:.2f} cores)")
        t.add_column("measurement")
        t.add_column("value", justify="right")
        t.add_row("created (through the home region, one at a time)",
                  f"{s['create_s']:.1f} s ({s['creates_per_s']:.0f}/s)")
        t.add_row("deliveries (expected)", f"{s['delivered']:,} ({s['expected']:,}), "
                                           f"{s['duplicates']} duplicates")
        t.add_row("deliveries/s, first 201 → last arrival",
                  "—" if s["per_s"] is None else f"{s['per_s']:,.0f} in {s['seconds']:.1f} s")
        t.add_row("deliveries/s, 10th → 90th percentile arrival",
                  "—" if s["steady_per_s"] is None else f"{s['steady_per_s']:,.0f}")
        t.add_row("push → delivery p50 / p99 ms",
                  f"{_ms(s['latency']['p50_ms'])} / {_ms(s['latency']['p99_ms'])}")
        for name, value in cores.items():
            t.add_row(f"CPU {name}", f"{value:.2f} cores")
        t.add_row("delivering node CPU per delivery", f"{_ms(s['node_cpu_ms_per_delivery'])} ms")
        console.print(t)


__all__ = ["STEPS", "WebhookBenchOptions", "print_report", "run"]
