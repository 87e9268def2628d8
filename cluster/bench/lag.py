"""``georeg bench lag``: how long after a push in one region an image becomes
pullable in every other replica, per origin → destination pair, beside the
physical floor of the modelled WAN (``floor``) and the run's clock error
(``clocks``: how far a node's stamps may be from this process's).

The run
    1. start a cluster in a child process (``clusterproc``) on free ports, or
       use one running from ``--data-dir``; optionally slow one link;
    2. wait (boundedly) for the machine to go quiet, then push: each origin node
       gets ``images`` images on an open-loop schedule of ``rate`` images per
       second (origins staggered), each image = a small config + ``layers``
       distinct random layers pushed concurrently (POST → PATCH → PUT ?digest=),
       then its manifest PUT by tag; every image has its own repository;
    3. collect, from every destination node, when the image arrived;
    4. verify the arrival timestamps against real GETs on a few more images.

What "pullable" is, and how it is measured
    A destination can serve ``GET /v2/<repo>/manifests/<tag>`` from its own
    store once the tag is committed there (``Replica.apply_tag`` refuses a tag
    whose manifest, hence blobs, is missing). The node records that moment, on
    the machine's clock, as the tag's ``arrived_ns`` (and the manifest's); the
    benchmark reads max(manifest, tag) arrival per node over the replication
    gRPC service's ``GetImageStatus`` (the source of ``replication/status``),
    directly on each node's gRPC port, after the pushes, so measuring adds no
    load while replication runs (on a cluster with auth over mutual TLS, each
    node asked with its own certificate; pushes and GETs carry the admin
    user's credentials: ``ClusterProcess``). Lag = arrival − the client's receipt of the
    manifest PUT's 201 (``time.time_ns()`` in this process: one clock). The
    origin's own recorded acknowledgement is reported beside it.

    The verification step proves that equivalence on fresh images: before each
    manifest PUT it polls every destination in a tight loop with real GETs and
    notes the first answer that lists the tag (``GET /v2/<repo>/tags/list``),
    then GETs the manifest by tag there (must be 200 with the pushed digest).
    It polls the tag list rather than the manifest because a node answers a
    manifest GET for content it lacks by fetching it from a peer (bounded
    staleness), which would make the poll itself the replication. A recorded
    arrival is consistent when it lies within the poll's observation window:
    not after the GET that saw the tag, not before the last GET that did not
    (less 5 ms for the synced commit that follows the stamp).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from replicator.wire.v1 import replication_pb2 as pb
from replicator.wire.v1 import replication_pb2_grpc as pbg

from ..control import spec as specs
from ..testing import on_any_ports
from . import procfs
from .clocks import ClockBracket, ClockCheck, bracket, wall_minus_raw_ns
from .clusterproc import ClusterProcess, ClusterStartError
from .floor import BlobPush, ImagePush, image_floor_ms, layer_floor_ms
from .lag_report import Arrival, LagResults, Verification, host, link_delivery
from .procfs import MIB
from .profile import Profile
from .workload import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    Client,
    RandomBytes,
    open_session,
    sha256_digest,
)

COMMIT_SLACK_NS = 5_000_000       # a tag is stamped just before its (synced) write batch commits
# Large-layer mode waits at most this long for the machine to go quiet before each round.
ROUND_QUIET_WAIT_S = 10.0
LARGE_PIECE = 16 * MIB            # a large layer is made of pieces this size (see _layer)


@dataclass(frozen=True)
class LagBenchOptions:
    config: Path | None = None
    wan: bool | None = None            # None: as the spec says; False: loopback, no modelled WAN
    origins: tuple[str, ...] = ("eastus", "westeurope")   # regions (their first node) or node names
    images: int = 20                   # per origin
    layers: int = 3
    layer_bytes: int = MIB
    rate: float = 0.5                  # images per second, per origin
    verify: int = 8                    # images pushed afterwards, each watched by real GETs
    verify_interval_ms: float = 1.0
    fault_link: tuple[str, str] | None = None
    fault_latency_ms: float = 0.0
    fault_bandwidth_mbps: float = 0.0
    data_dir: Path | None = None       # a running cluster to use instead of starting one
    workdir: Path | None = None        # kept when given; else a temp dir, removed afterwards
    quiet_wait_s: float = 30.0
    arrival_timeout_s: float = 120.0
    seed: int = 1
    profile_dir: Path | None = None
    profile_nodes: tuple[str, ...] = ()  # node names, or "supervisor" (the WAN links)
    # Large-layer mode: each image is pushed alone, and its arrival everywhere
    # awaited before the next (rounds, not an open-loop schedule).
    large_layer: bool = False

    @classmethod
    def large(cls, layer_bytes: int, **given) -> LagBenchOptions:
        """Large-layer mode: ``images`` rounds (3 by default), each one image of
        one ``layer_bytes`` layer pushed at each origin (East US by default)
        and awaited at every destination before the next round."""
        defaults = {"origins": ("eastus",), "images": 3, "verify": 0,
                    "arrival_timeout_s": 300.0}
        return cls(**(defaults | given), layers=1, layer_bytes=layer_bytes, large_layer=True)

    def workload(self) -> dict:
        return {"origins": list(self.origins), "images_per_origin": self.images,
                "large_layer": self.large_layer,
                "layers": self.layers, "layer_bytes": self.layer_bytes, "rate_per_origin": self.rate,
                "verify_images": self.verify, "verify_interval_ms": self.verify_interval_ms,
                "seed": self.seed,
                "client": "one process, aiohttp on uvloop; layers of an image pushed concurrently"}


@dataclass(frozen=True)
class NodeTarget:
    """A node as ``workload.Client`` sees it."""

    name: str
    url: str
    pid: int


@dataclass
class PreparedImage:
    repository: str
    tag: str
    blobs: list[tuple[str, bytes]]     # config first, then layers
    manifest: bytes
    digest: str


class TimedClient(Client):
    """``Client`` with the timestamps the floor needs."""

    async def push_blob_timed(self, repo: str, digest: str, body: bytes) -> BlobPush:
        async with self.session.post(self._url(f"/v2/{repo}/blobs/uploads/"),
                                     headers={"Content-Length": "0"}) as r:
            await _expect(r, 202, "POST blob upload", self.target.name)
            location = self._location(r)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(body))}
        first = time.time_ns()
        async with self.session.patch(location, data=body, headers=headers) as r:
            await _expect(r, 202, "PATCH blob upload", self.target.name)
            location = self._location(r)
        sent = time.time_ns()
        async with self.session.put(location.update_query(digest=digest),
                                    headers={"Content-Length": "0"}) as r:
            await _expect(r, 201, "PUT blob upload", self.target.name)
            acked = time.time_ns()
        return BlobPush(len(body), first, sent, acked)

    async def push_image(self, origin: str, image: PreparedImage,
                         before_manifest: Callable[[], None] | None = None) -> ImagePush:
        started = time.time_ns()
        blobs = await asyncio.gather(*(self.push_blob_timed(image.repository, d, b)
                                       for d, b in image.blobs))
        if before_manifest is not None:
            before_manifest()
        sent = time.time_ns()
        await self.push_manifest(image.repository, image.tag, image.manifest)
        acked = time.time_ns()
        return ImagePush(origin, image.repository, image.tag, image.digest, tuple(blobs),
                         started, sent, acked, len(image.manifest))


async def _expect(response: aiohttp.ClientResponse, status: int, what: str, name: str) -> None:
    if response.status != status:
        body = (await response.read())[:300].decode(errors="replace")
        raise RuntimeError(f"{name}: {what} answered {response.status}, expected {status}: {body}")


def prepare(content: RandomBytes, repository: str, layers: int, layer_bytes: int) -> PreparedImage:
    config = json.dumps({"architecture": "amd64", "os": "linux", "repository": repository,
                         "nonce": os.urandom(8).hex()}).encode()
    blobs = [(sha256_digest(config), config)]
    for _ in range(layers):
        data = _layer(content, layer_bytes)
        blobs.append((sha256_digest(data), data))
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": blobs[0][0], "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": len(b)} for d, b in blobs[1:]],
    }).encode()
    return PreparedImage(repository, "v1", blobs, manifest, sha256_digest(manifest))


def _layer(content: RandomBytes, size: int) -> bytes:
    """``size`` incompressible bytes, distinct from every other layer's; larger
    than the content's random pool, in pieces each of which is distinct."""
    if size <= LARGE_PIECE:
        return content.blob(size)
    return b"".join(content.blob(min(LARGE_PIECE, size - at)) for at in range(0, size, LARGE_PIECE))


# -- arrivals, as the nodes recorded them ----------------------------------------------------


@dataclass
class RecordedArrival:
    arrived_ns: int         # max(manifest, tag) arrival on the node
    tag_acked_ns: int       # the origin's own stamp of the acknowledgement


class ArrivalReader:
    """``GetImageStatus`` on each node's own gRPC port (not through the WAN links)."""

    def __init__(self, cluster: ClusterProcess) -> None:
        # Each node asked with its own identity (mutual TLS on a cluster with auth).
        self._channels = {n.name: cluster.grpc_channel(n.name) for n in cluster.nodes}
        self._stubs = {name: pbg.ReplicationStub(ch) for name, ch in self._channels.items()}
        self._regions = {n.name: (n.region, n.zone) for n in cluster.nodes}

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(grace=None)

    async def read(self, node: str, push: ImagePush) -> RecordedArrival | None:
        region, zone = self._regions[node]
        try:
            reply = await self._stubs[node].GetImageStatus(pb.ImageStatusRequest(
                repository=push.repository, tag=push.tag,
                requester=pb.NodeRef(region=region, zone=zone)), timeout=10)
        except grpc.aio.AioRpcError:
            return None
        if not (reply.present and reply.digest == push.digest and reply.tag_arrived_ns):
            return None
        return RecordedArrival(max(reply.arrived_ns, reply.tag_arrived_ns), reply.tag_acked_ns)

    async def clocks(self) -> tuple[list[ClockBracket], list[str]]:
        """Every node's clock bracketed against ours (``clocks``), one node at a
        time so that no probe waits behind another; and the nodes that did not
        tell their clock."""
        found, unknown = [], []
        for node, stub in self._stubs.items():
            async def wall(stub=stub) -> int:
                return (await stub.Health(pb.HealthRequest(), timeout=10)).wall_ns
            try:
                probed = await bracket(node, wall)
            except grpc.aio.AioRpcError:
                probed = None
            if probed is None:
                unknown.append(node)
            else:
                found.append(probed)
        return found, unknown


# -- the run ----------------------------------------------------------------------------------


async def run(options: LagBenchOptions, console: Console | None = None) -> LagResults:
    console = console or Console(stderr=True)
    say = lambda text: console.print(f"[dim]{text}[/dim]")  # noqa: E731
    with contextlib.ExitStack() as stack:
        if options.data_dir is not None:
            cluster = ClusterProcess.attach(options.data_dir)
            say(f"using the cluster running from {options.data_dir}")
        else:
            if options.workdir is not None:
                workdir = options.workdir
            else:
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="georeg-lag-")))
            spec = cluster_spec(options)
            say(f"starting {spec.node_count()} nodes (+ {len(spec.paired_regions())} paired-region "
                f"copies) "
                f"({'modelled WAN' if spec.wan.enabled else 'loopback, no modelled WAN'}) "
                f"in {workdir}")
            cluster = ClusterProcess.start(spec, workdir / "cluster")
            stack.callback(cluster.stop)
        return await _Run(options, cluster, say, console).run()


def cluster_spec(options: LagBenchOptions) -> specs.ClusterSpec:
    import msgspec

    spec = specs.load(options.config)
    if options.wan is not None:
        spec = msgspec.structs.replace(spec, wan=msgspec.structs.replace(spec.wan,
                                                                         enabled=options.wan))
    return on_any_ports(spec)


@dataclass
class _Run:
    options: LagBenchOptions
    cluster: ClusterProcess
    say: Callable[[str], None]
    console: Console
    pushes: list[ImagePush] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    credentials: dict[str, str] = field(default_factory=dict)   # the registry client's

    async def run(self) -> LagResults:
        options, cluster = self.options, self.cluster
        self.credentials = cluster.registry_headers()
        origins = [cluster.resolve_node(o) for o in options.origins]
        if len({o.name for o in origins}) != len(origins):
            raise ValueError(f"origins name the same node twice: {options.origins}")
        fault = None
        if options.fault_link is not None:
            a, b = options.fault_link
            fault = cluster.inject("link", a=a, b=b, latency_ms=options.fault_latency_ms,
                                   bandwidth_mbps=options.fault_bandwidth_mbps)
            self.say(f"fault: {fault['description']}")
        content = RandomBytes(options.seed)
        prepared = {o.name: [prepare(content, f"lag/{o.name}/img{i}", options.layers,
                                     options.layer_bytes) for i in range(options.images)]
                    for o in origins}
        results = LagResults(host(), options.workload(), spec_summary(cluster),
                             fault=fault["description"] if fault else None)
        results.load_before = os.getloadavg()
        if options.quiet_wait_s > 0:
            load = await procfs.wait_for_quiet(cluster.all_pids(), options.quiet_wait_s)
            if load >= 0.1:
                self.say(f"other processes still use {load:.0%} of a core; measuring anyway")
        reader = ArrivalReader(cluster)
        try:
            adjusted_from = wall_minus_raw_ns()
            before, unknown = await reader.clocks()
            with self._progress() as progress:
                others = procfs.OtherCpu(cluster.all_pids())
                cpu = _ClusterCpu(cluster)
                links_before = self._links()
                with self._profiles():
                    if options.large_layer:
                        results.arrivals = await self._rounds(origins, prepared, reader, progress)
                    else:
                        await self._push_all(origins, prepared, progress)
                        results.arrivals = await self._collect(reader, progress, self.pushes)
                after, unknown_after = await reader.clocks()
                results.clocks = ClockCheck(before, after, sorted({*unknown, *unknown_after}),
                                            wall_minus_raw_ns() - adjusted_from)
                results.other_cpu_cores = others.cores()
                results.cluster_cpu = cpu.seconds()
                links_after = self._links()
                if links_before is not None and links_after is not None:
                    results.link_delivery = link_delivery(
                        links_before, links_after,
                        regions={n.name: n.region for n in cluster.plan.all_nodes},
                        images=Counter(cluster.node(p.origin).region for p in self.pushes))
                if options.verify:
                    results.verification = await self._verify(origins, content, reader, progress)
        finally:
            await reader.close()
        results.pushes = self.pushes
        results.missing = self.missing
        results.load_after = os.getloadavg()
        return results

    def _links(self) -> list[dict] | None:
        """The links' delivery counters, or None from a cluster that has no such
        endpoint (an older georeg attached with --data-dir)."""
        try:
            return self.cluster.call("GET", "/georeg/v1/links")  # type: ignore[return-value]
        except ClusterStartError:
            return None

    def _progress(self) -> Progress:
        return Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=self.console, transient=False)

    @contextlib.contextmanager
    def _profiles(self):
        options = self.options
        with contextlib.ExitStack() as stack:
            if options.profile_dir is not None:
                options.profile_dir.mkdir(parents=True, exist_ok=True)
                for name in options.profile_nodes:
                    pid = (self.cluster.supervisor_pid if name == "supervisor"
                           else self.cluster.pids[name])
                    stack.enter_context(Profile(pid, options.profile_dir / f"lag-{name}.txt"))
            yield

    def _destinations(self, origin) -> list:
        policy = self.cluster.spec.residency_policy()
        return [n for n in self.cluster.nodes if n.name != origin.name
                and policy.allows(origin.region, f"lag/{origin.name}/img0", n.region)]

    async def _push_all(self, origins, prepared, progress: Progress) -> None:
        options = self.options
        task = progress.add_task("pushing (acknowledged images)", total=len(origins) * options.images)
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05

        async def one_origin(k: int, origin) -> None:
            target = NodeTarget(origin.name, self.cluster.http(origin.name),
                                self.cluster.pids.get(origin.name, 0))
            async with open_session(options.layers + 2, self.cluster.tls,
                                    self.credentials) as session:
                client = TimedClient(target, session, options.layers + 2)

                async def push(image: PreparedImage) -> None:
                    self.pushes.append(await client.push_image(origin.name, image))
                    progress.advance(task)

                async with asyncio.TaskGroup() as group:
                    for i, image in enumerate(prepared[origin.name]):
                        at = start + (i + k / len(origins)) / options.rate
                        await asyncio.sleep(max(0.0, at - loop.time()))  # the open-loop schedule
                        group.create_task(push(image))

        async with asyncio.TaskGroup() as group:
            for k, origin in enumerate(origins):
                group.create_task(one_origin(k, origin))

    async def _rounds(self, origins, prepared, reader: ArrivalReader,
                      progress: Progress) -> list[Arrival]:
        """Large-layer mode: one image at a time, at one origin at a time, each
        awaited at every destination before the next is pushed, so that no
        transfer shares the machine or a link with another image's."""
        options = self.options
        task = progress.add_task("pushing (acknowledged images)", total=len(origins) * options.images)
        arrivals: list[Arrival] = []
        for i in range(options.images):
            for origin in origins:
                if options.quiet_wait_s > 0:
                    await procfs.wait_for_quiet(self.cluster.all_pids(),
                                                min(options.quiet_wait_s, ROUND_QUIET_WAIT_S))
                target = NodeTarget(origin.name, self.cluster.http(origin.name),
                                    self.cluster.pids.get(origin.name, 0))
                async with open_session(2, self.cluster.tls, self.credentials) as session:
                    push = await TimedClient(target, session, 2).push_image(
                        origin.name, prepared[origin.name][i])
                self.pushes.append(push)
                progress.advance(task)
                arrivals += await self._collect(reader, progress, [push])
        return arrivals

    async def _collect(self, reader: ArrivalReader, progress: Progress,
                       pushes: list[ImagePush]) -> list[Arrival]:
        by_name = {n.name: n for n in self.cluster.nodes}
        wan = self.cluster.spec.wan_model()
        pending = [(push, dest) for push in pushes
                   for dest in self._destinations(by_name[push.origin])]
        task = progress.add_task("arrivals recorded at destinations", total=len(pending))
        acks = {}
        for push in pushes:
            found = await reader.read(push.origin, push)
            acks[push.repository] = found.tag_acked_ns if found else 0
        arrivals: list[Arrival] = []
        deadline = time.monotonic() + self.options.arrival_timeout_s
        limit = asyncio.Semaphore(8)

        async def check(item) -> bool:
            push, dest = item
            async with limit:
                found = await reader.read(dest.name, push)
            if found is None:
                return False
            origin = by_name[push.origin]
            link = wan.link(origin.region, dest.region)
            largest = max(push.blobs, key=lambda b: b.size)
            arrivals.append(Arrival(push.origin, dest.name, push.repository, push.size,
                                    push.started_ns, push.acked_ns, found.arrived_ns,
                                    acks[push.repository], image_floor_ms(push, link),
                                    largest.sent_ns, layer_floor_ms(largest.size, link)))
            progress.advance(task)
            return True

        while pending:
            done = await asyncio.gather(*(check(item) for item in pending))
            pending = [item for item, ok in zip(pending, done, strict=True) if not ok]
            if pending and time.monotonic() > deadline:
                self.say(f"{len(pending)} image copies had not arrived after "
                         f"{self.options.arrival_timeout_s:g}s; reported as missing")
                break
            if pending:
                await asyncio.sleep(0.1)  # poll interval, bounded by the deadline above
        self.missing += [(push.origin, dest.name) for push, dest in pending]
        return arrivals

    async def _verify(self, origins, content: RandomBytes, reader: ArrivalReader,
                      progress: Progress) -> list[Verification]:
        """Fresh images, one at a time, each watched at one destination with real
        GETs in a tight loop (one at a time, so the poll's resolution stays at
        about a millisecond); destinations rotate through every pair."""
        options = self.options
        task = progress.add_task("verifying against real GETs", total=options.verify)
        checks: list[Verification] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                limit=4, ssl=self.cluster.tls or True), headers=self.credentials) as polling:
            for i in range(options.verify):
                origin = origins[i % len(origins)]
                dests = self._destinations(origin)
                dest = dests[(i // len(origins)) % len(dests)]
                image = prepare(content, f"lag/{origin.name}/verify{i}", options.layers,
                                options.layer_bytes)
                target = NodeTarget(origin.name, self.cluster.http(origin.name), 0)
                watching: list[asyncio.Task] = []

                def watch(out=watching, image=image, dest=dest) -> None:
                    out.append(asyncio.ensure_future(self._watch(polling, dest.name, image)))

                async with open_session(options.layers + 2, self.cluster.tls,
                                        self.credentials) as session:
                    client = TimedClient(target, session, options.layers + 2)
                    push = await client.push_image(origin.name, image, before_manifest=watch)
                seen_ns, previous_ns = await watching[0]
                recorded = None
                deadline = time.monotonic() + 10
                while recorded is None and time.monotonic() < deadline:
                    recorded = await reader.read(dest.name, push)
                checks.append(Verification(
                    origin.name, dest.name, image.repository, push.acked_ns,
                    recorded.arrived_ns if recorded else 0, seen_ns, previous_ns, COMMIT_SLACK_NS))
                progress.advance(task)
        return checks

    async def _watch(self, session: aiohttp.ClientSession, node: str,
                     image: PreparedImage) -> tuple[int, int]:
        """Poll ``node`` until a GET lists the tag; then GET the manifest by tag there.
        Returns (when the first listing GET answered, when the last one that
        did not list it was sent)."""
        base = self.cluster.http(node)
        interval = self.options.verify_interval_ms / 1000
        deadline = time.monotonic() + self.options.arrival_timeout_s
        previous = time.time_ns()
        while time.monotonic() < deadline:
            sent = time.time_ns()
            async with session.get(f"{base}/v2/{image.repository}/tags/list") as r:
                body = await r.read()
                answered = time.time_ns()
            if r.status == 200 and image.tag in (json.loads(body).get("tags") or []):
                async with session.get(f"{base}/v2/{image.repository}/manifests/{image.tag}",
                                       headers={"Accept": OCI_MANIFEST}) as m:
                    await m.read()
                    if m.status != 200 or m.headers.get("Docker-Content-Digest") != image.digest:
                        raise RuntimeError(f"{node} listed {image.repository}:{image.tag} but "
                                           f"GET manifest answered {m.status}")
                return answered, previous
            previous = sent
            await asyncio.sleep(interval)  # the poll interval of the verification
        return 0, previous


class _ClusterCpu:
    """CPU seconds each process of the cluster used meanwhile (the supervisor
    runs the WAN links), and the wall time they were measured over."""

    def __init__(self, cluster: ClusterProcess) -> None:
        self.pids = dict(cluster.pids)
        if cluster.supervisor_pid:
            self.pids["supervisor (links)"] = cluster.supervisor_pid
        self._t0 = time.monotonic()
        self._cpu0 = self._read()

    def _read(self) -> dict[str, float]:
        return procfs.cpu_seconds_by_name(self.pids)

    def seconds(self) -> dict:
        now = self._read()
        return {"wall_s": time.monotonic() - self._t0,
                "cpu_s": {name: now[name] - self._cpu0[name] for name in now if name in self._cpu0}}


def spec_summary(cluster: ClusterProcess) -> dict:
    spec = cluster.spec
    wan = spec.wan_model()
    nodes = cluster.nodes
    return {
        "registry": spec.registry, "wan_enabled": spec.wan.enabled,
        "bandwidth_mbps": spec.wan.bandwidth_mbps if spec.wan.enabled else 0,
        "nodes": [{"name": n.name, "region": n.region, "zone": n.zone} for n in nodes],
        "links": {f"{a.name}->{b.name}": _link_dict(wan.link(a.region, b.region))
                  for a in nodes for b in nodes if a.name != b.name},
    }


def _link_dict(link) -> dict:
    return {"latency_ms": link.latency_ms, "jitter_ms": link.jitter_ms,
            "bandwidth_mbps": link.bandwidth_mbps}


__all__ = ["LagBenchOptions", "cluster_spec", "run"]
