"""``georeg bench scale``: what many small images cost a georeg node and cluster,
beside the reference registry where the operation exists.

The content: ``manifests`` small images in ``repositories`` repositories
(``scale/r00000`` …). Every repository holds one tiny config and one tiny layer
(the layer the same bytes everywhere, as a shared base layer is), pushed first
and not timed ("setup"); then ``manifests`` image manifests, each naming that
config and layer and told apart by an annotation, are PUT by tag (``t0000001``
…) at ``concurrency``: the push rate is manifests per second over that phase.
The first repository holds ``largest`` of them (the tag list and its pages are
read there), the others share the rest evenly.

Three registries get the same content and the same reads, one after another
(``standalone`` and ``reference`` without auth, as ``bench node`` runs them;
``cluster`` through the global endpoint of the default cluster's home region,
auth on, as its admin user):

    push        manifests/s at c=8; PUT p50/p99
    tags        full tag list at the largest repository (count checked), p50/p99
    tags_page   ``?n=100&last=<random tag>`` there, p50/p99
    catalog     ``_catalog?n=100&last=<random repository>``, p50/p99; plus one walk
                of every page by its ``Link`` (the repositories counted)
    manifest    GET manifest by tag at random (digest checked), p50/p99

On the cluster only (started here on free ports, the default spec):

    push CPU    the push phase's CPU per manifest pushed, for each process (the
                supervisor with the endpoint's proxy and the links, each node, each
                paired copy): what one acknowledged manifest costs the whole cluster,
                replication to every node included but for the tail still in
                flight when the last 201 arrives
    replicated  the last acknowledged manifest: from the client's receipt of its
                201 to every serving node's own record of holding it
                (``GetImageStatus`` over gRPC, each node asked with its own identity)
    idle        whole-cluster CPU (the supervisor, which runs the links and the
                endpoints, and every process under it: nodes and paired copies),
                as a share of one core over ``idle`` seconds, empty before the push,
                after it, and after the new region; per-node RSS after the push.
                The window after the push starts once the links are back to
                their empty rate (``quiet``; how long that took is reported):
                before, they still carry the push's tail
    catch-up    the last non-home region isolated (every link cut) while ``catch_up``
                manifests are pushed into one repository; from the heal until that
                region's node lists every one of them (its tag list, read there).
                Polled gently so as not to load the node being timed: every
                ``CATCH_UP_POLL_S`` one ``GetImageStatus`` for the last acknowledged
                tag, and the full tag list only once that tag is there; the figure is
                late by up to one interval plus a request (its resolution)
    links       bytes the cluster's links (WAN and zone) carried over that idle
                window, whatever carried them: the counters do not say which part
                is anti-entropy, so they bound a round's bytes from above only
    new region  ``replication create --location japaneast``, through the
                management API with the owner credential, until Ready

On the standalone node only:

    churn       ``churn`` operations after the reads: an image pushed by tag
                (``churn``, in each repository in turn) and deleted by digest, over
                and over, so the final content is what it was before. Metadata on
                disk (the node's ``meta`` directory without RocksDB's text logs,
                the node stopped cleanly) before and after, and their ratio: what
                history a node keeps for content it no longer holds

Invariants
    * A wrong answer (status, digest, count) stops the run (``WorkloadError``);
      the JSON carries the counts it checked, so a test can assert on them.
    * Every process started here is stopped on the way out (``ExitStack``).
    * Timings are reported, never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import grpc
from rich.console import Console
from rich.table import Table
from yarl import URL

from replicator.wire.v1 import replication_pb2 as pb
from replicator.wire.v1 import replication_pb2_grpc as pbg

from ..control import spec as specs
from ..control.plan import NodePlan
from ..testing import on_any_ports
from . import procfs
from .clusterproc import ClusterProcess, ClusterStartError
from .node import GeoregNode
from .procfs import MIB
from .reference import ReferenceRegistry
from .workload import (
    ACCEPT_MANIFESTS,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    Client,
    WorkloadError,
    open_session,
    run_concurrently,
    sha256_digest,
)

STANDALONE, REFERENCE, CLUSTER = "standalone", "reference", "cluster"
SIDES = (STANDALONE, REFERENCE, CLUSTER)
READS = ("tags", "tags_page", "catalog", "manifest")
NEW_REGION = "japaneast"
CATCH_UP_REPOSITORY = "scale/catch-up"
POLL_S = 0.02           # "replicated": one small gRPC status call per node per poll
CATCH_UP_POLL_S = 0.15  # catch-up: the resolution of its figure (see the docstring)
# The idle window after the push starts once the links carry no more than this
# many times what they did empty (at least QUIET_MIN_BYTES_PER_S), looked at
# every QUIET_STEP_S: the first 10-20 s after a 3,000-image push still carry its
# tail (736 KiB in 10 s, 23 KiB in the next 10), which is not idle cost.
QUIET_STEP_S = 2.0
QUIET_FACTOR = 2.0
QUIET_MIN_BYTES_PER_S = 4096
QUIET_TIMEOUT_S = 300.0
LAYER = b"georeg bench scale: one shared tiny layer\n"


@dataclass(frozen=True)
class ScaleOptions:
    manifests: int = 100_000
    repositories: int = 10_000
    largest: int | None = None     # manifests in the first repository; None: a tenth of them
    concurrency: int = 8
    reads: int = 2000              # requests per read operation (full tag lists: a tenth)
    page: int = 100
    idle_s: float = 30.0           # one anti-entropy period of the default spec
    sides: tuple[str, ...] = SIDES
    new_region: bool = True
    catch_up: int = 10_000         # manifests pushed while a region is isolated; 0 skips
    churn: int = 100_000           # push/delete operations on the standalone node; 0 skips
    config: Path | None = None
    workdir: Path | None = None
    reference_binary: str | None = None
    timeout_s: float = 600.0
    seed: int = 1

    def quick(self) -> ScaleOptions:
        """Every step, at a size that runs in about a minute."""
        return replace(self, manifests=400, repositories=8, reads=100, idle_s=3.0, catch_up=100,
                       churn=400)

    @property
    def in_largest(self) -> int:
        if self.repositories == 1:
            return self.manifests
        largest = self.largest if self.largest is not None else max(1, self.manifests // 10)
        # every other repository holds at least one manifest
        return max(1, min(largest, self.manifests - (self.repositories - 1)))

    def validate(self) -> None:
        if self.churn < 0 or self.catch_up < 0:
            raise ValueError("--churn and --catch-up count operations: 0 or more")
        if self.manifests < self.repositories:
            raise ValueError(f"{self.manifests} manifests cannot fill {self.repositories} "
                             f"repositories (at least one each)")

    def workload(self) -> dict:
        return {"manifests": self.manifests, "repositories": self.repositories,
                "largest": self.in_largest, "concurrency": self.concurrency,
                "reads": self.reads, "full_tag_list_reads": self.full_tag_reads,
                "page": self.page, "idle_s": self.idle_s, "sides": list(self.sides),
                "new_region": NEW_REGION if self.new_region else None,
                "catch_up": self.catch_up, "churn": self.churn, "seed": self.seed}

    @property
    def full_tag_reads(self) -> int:
        return max(5, self.reads // 10)


# -- the content ------------------------------------------------------------------------------


class Content:
    """Repositories, tags and manifests, made on the fly and the same for every side."""

    def __init__(self, options: ScaleOptions) -> None:
        self.options = options
        width = len(str(options.repositories))
        self.repositories = [f"scale/r{j:0{width}d}" for j in range(options.repositories)]
        self.layer = (sha256_digest(LAYER), LAYER)
        self.configs = {repo: json.dumps({"architecture": "amd64", "os": "linux",
                                          "repository": repo}).encode()
                        for repo in self.repositories}
        largest, rest = options.in_largest, options.manifests - options.in_largest
        others = options.repositories - 1
        self.counts = [largest] + [rest // others + (1 if k < rest % others else 0)
                                   for k in range(others)]
        self.tag_width = len(str(options.manifests))
        # image i lives in repository owner[i]; dealt round-robin over the others, so
        # every repository grows through the push rather than one after another
        self.owner: list[int] = [0] * largest
        remaining = list(self.counts[1:])
        j = 0
        while len(self.owner) < options.manifests:
            if remaining[j]:
                self.owner.append(j + 1)
                remaining[j] -= 1
            j = (j + 1) % others
        self.digests: list[str] = [""] * options.manifests

    def tag(self, i: int) -> str:
        return f"t{i:0{self.tag_width}d}"

    def manifest(self, i: int) -> tuple[str, str, bytes]:
        """(repository, tag, body) of image ``i``."""
        repo = self.repositories[self.owner[i]]
        config = self.configs[repo]
        body = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config),
                       "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": self.layer[0], "size": len(LAYER)}],
            "annotations": {"org.georeg.bench.image": str(i)},
        }).encode()
        return repo, self.tag(i), body

    def churn_manifest(self, repo: str, k: int) -> bytes:
        """The ``k``-th churn image: like every other image of ``repo``, told apart
        by its own annotation."""
        config = self.configs[repo]
        return json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config),
                       "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": self.layer[0], "size": len(LAYER)}],
            "annotations": {"org.georeg.bench.churn": str(k)},
        }).encode()

    def tags_of(self, j: int) -> list[str]:
        return sorted(self.tag(i) for i in range(self.options.manifests) if self.owner[i] == j)


# -- one registry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    pid: int


def percentiles(latencies_s: list[float]) -> dict:
    ordered = sorted(latencies_s)
    if not ordered:
        return {"p50_ms": None, "p99_ms": None, "count": 0}

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "count": len(ordered)}


async def _first_error(work: Awaitable[None]) -> None:
    """``work``, with a task group's failure raised as its first error (a
    ``WorkloadError`` the command reports) rather than as the group."""
    try:
        await work
    except ExceptionGroup as group:
        while isinstance(group, ExceptionGroup):
            group = group.exceptions[0]
        raise group from None


class ScaleClient(Client):
    """The benchmark's requests against one registry."""

    async def _get(self, url: URL | str, what: str, headers: dict | None = None
                   ) -> tuple[aiohttp.ClientResponse, bytes]:
        async with self.session.get(url, headers=headers) as r:
            body = await r.read()
        if r.status != 200:
            raise WorkloadError(f"{self.target.name}: {what} answered {r.status}: "
                                f"{body[:300].decode(errors='replace')}")
        return r, body

    async def timed(self, count: int, op: Callable[[int], Awaitable[None]]) -> tuple[dict, float]:
        latencies: list[float] = []

        async def one(i: int) -> None:
            started = time.perf_counter()
            await op(i)
            latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await _first_error(run_concurrently(range(count), self.concurrency, one))
        return percentiles(latencies), time.perf_counter() - started

    async def setup(self, content: Content) -> float:
        """Each repository's config and the shared layer; the seconds it took."""
        started = time.perf_counter()

        async def one(repo: str) -> None:
            config = content.configs[repo]
            await self.push_blob(repo, sha256_digest(config), config, len(config))
            await self.push_blob(repo, content.layer[0], LAYER, len(LAYER))

        await _first_error(run_concurrently(content.repositories, self.concurrency, one))
        return time.perf_counter() - started

    async def push(self, content: Content) -> dict:
        last = {"ack_ns": 0, "image": -1}

        async def one(i: int) -> None:
            repo, tag, body = content.manifest(i)
            async with self.session.put(self._url(f"/v2/{repo}/manifests/{tag}"), data=body,
                                        headers={"Content-Type": OCI_MANIFEST}) as r:
                answer = await r.read()
                acked = time.time_ns()
            if r.status != 201:
                raise WorkloadError(f"{self.target.name}: PUT manifest {repo}:{tag} answered "
                                    f"{r.status}: {answer[:300].decode(errors='replace')}")
            content.digests[i] = sha256_digest(body)
            if acked > last["ack_ns"]:
                last.update(ack_ns=acked, image=i)

        shown, seconds = await self.timed(content.options.manifests, one)
        return {**shown, "seconds": seconds, "per_s": content.options.manifests / seconds,
                "pushed": content.options.manifests, "last_image": last["image"],
                "last_ack_ns": last["ack_ns"]}

    async def reads(self, content: Content, rng: random.Random) -> dict:
        options = content.options
        largest = content.repositories[0]
        tags = content.tags_of(0)
        results: dict = {}
        seen: dict[str, int] = {}

        async def full(i: int) -> None:
            _, body = await self._get(self._url(f"/v2/{largest}/tags/list"), "GET tags list")
            seen["tags"] = len(json.loads(body).get("tags") or [])
            if seen["tags"] != len(tags):
                raise WorkloadError(f"{self.target.name}: {largest} lists {seen['tags']} tags, "
                                    f"{len(tags)} were pushed")

        starts = [rng.choice(tags) for _ in range(options.reads)]
        unpaged: list[int] = []

        async def page(i: int) -> None:
            url = self._url(f"/v2/{largest}/tags/list").with_query(n=options.page, last=starts[i])
            _, body = await self._get(url, "GET tags list page")
            got = json.loads(body).get("tags") or []
            if len(got) == len(tags):
                unpaged.append(i)       # the whole list, n and last ignored (distribution 2.x)
            elif len(got) > options.page or any(t <= starts[i] for t in got):
                raise WorkloadError(f"{self.target.name}: a tags page after {starts[i]} "
                                    f"holds {len(got)} tags, not the ones after it")

        repos = content.repositories
        after = [rng.choice(repos) for _ in range(options.reads)]

        async def catalog(i: int) -> None:
            url = self._url("/v2/_catalog").with_query(n=options.page, last=after[i])
            _, body = await self._get(url, "GET _catalog page")
            got = json.loads(body).get("repositories") or []
            if len(got) > options.page or any(r <= after[i] for r in got):
                raise WorkloadError(f"{self.target.name}: a catalog page after {after[i]} "
                                    f"holds {len(got)} repositories, not the ones after it")

        images = [rng.randrange(options.manifests) for _ in range(options.reads)]

        async def manifest(i: int) -> None:
            repo, tag, _ = content.manifest(images[i])
            r, _ = await self._get(self._url(f"/v2/{repo}/manifests/{tag}"), "GET manifest",
                                   {"Accept": ACCEPT_MANIFESTS})
            if r.headers.get("Docker-Content-Digest") != content.digests[images[i]]:
                raise WorkloadError(f"{self.target.name}: {repo}:{tag} answered "
                                    f"{r.headers.get('Docker-Content-Digest')}")

        results["tags"], _ = await self.timed(options.full_tag_reads, full)
        results["tags_page"], _ = await self.timed(options.reads, page)
        results["tags_page"]["paged"] = not unpaged
        results["catalog"], _ = await self.timed(options.reads, catalog)
        results["manifest"], _ = await self.timed(options.reads, manifest)
        results["counts"] = {"tags_at_largest": seen.get("tags", 0),
                             "catalog_repositories": await self.walk_catalog(options.page)}
        return results

    async def churn(self, content: Content, operations: int) -> dict:
        """``operations`` PUTs and DELETEs: image ``churn-k`` pushed by tag ``churn``
        in repository ``k`` mod R, then deleted by its digest, ``operations / 2``
        times; at most ``concurrency`` repositories churn at once, each in order."""
        pairs = operations // 2
        repos = content.repositories
        lanes = min(self.concurrency, len(repos))
        deleted = {"count": 0}

        async def lane(first: int) -> None:
            for k in range(first, pairs, lanes):
                repo = repos[k % len(repos)]
                body = content.churn_manifest(repo, k)
                async with self.session.put(self._url(f"/v2/{repo}/manifests/churn"), data=body,
                                            headers={"Content-Type": OCI_MANIFEST}) as r:
                    answer = await r.read()
                if r.status != 201:
                    raise WorkloadError(f"{self.target.name}: churn PUT {repo}:churn answered "
                                        f"{r.status}: {answer[:300].decode(errors='replace')}")
                digest = sha256_digest(body)
                async with self.session.delete(self._url(f"/v2/{repo}/manifests/{digest}")) as r:
                    answer = await r.read()
                if r.status != 202:
                    raise WorkloadError(f"{self.target.name}: churn DELETE {repo}@{digest} "
                                        f"answered {r.status}: "
                                        f"{answer[:300].decode(errors='replace')}")
                deleted["count"] += 1

        started = time.perf_counter()
        await _first_error(run_concurrently(range(lanes), lanes, lane))
        seconds = time.perf_counter() - started
        return {"operations": 2 * deleted["count"], "seconds": seconds,
                "per_s": 2 * deleted["count"] / seconds if seconds else None}

    async def walk_catalog(self, page: int) -> int:
        """Every ``_catalog`` page by its ``Link``; the repositories counted."""
        url: URL | None = self._url("/v2/_catalog").with_query(n=page)
        names: set[str] = set()
        while url is not None:
            r, body = await self._get(url, "GET _catalog")
            names.update(json.loads(body).get("repositories") or [])
            link = r.headers.get("Link", "")
            url = self._base.join(URL(link.split(";")[0].strip("<> "), encoded=True)) \
                if link else None
        return len(names)


async def measure_side(name: str, target: Target, session: aiohttp.ClientSession,
                       options: ScaleOptions, say: Callable[[str], None],
                       processes: dict[int, str] | None = None) -> tuple[dict, Content]:
    """One registry's push and reads. ``processes`` (pid → name): the push's CPU is
    also split over them, per manifest pushed."""
    content = Content(options)
    client = ScaleClient(target, session, options.concurrency)
    say(f"{name}: setup, {options.repositories} repositories × (config + shared layer)")
    result: dict = {"url": target.url, "setup_s": await client.setup(content)}
    say(f"{name}: pushing {options.manifests} manifests at c={options.concurrency}")
    cpu0 = procfs.cpu_seconds(target.pid) if target.pid else 0.0
    split0 = _cpu_of(processes or {})
    result["push"] = await client.push(content)
    if target.pid:
        result["push"]["server_cpu_s"] = procfs.cpu_seconds(target.pid) - cpu0
    if processes:
        split = _cpu_of(processes)
        result["push"]["cpu_ms_per_manifest"] = {
            processes[pid]: (split[pid] - split0[pid]) * 1000 / options.manifests
            for pid in split if pid in split0}
    say(f"{name}: {result['push']['per_s']:.0f} manifests/s; reading")
    result.update(await client.reads(content, random.Random(options.seed)))
    if target.pid:
        result["rss_after_push_mib"] = procfs.rss_bytes(target.pid) / MIB
    return result, content


async def churn(node: GeoregNode, content: Content, options: ScaleOptions,
                say: Callable[[str], None]) -> dict:
    """The churn step on a standalone node (see the module docstring): metadata on
    disk with the pushed content alone, then after ``options.churn`` push/delete
    operations that end with the same content."""
    node.stop()
    before = metadata_bytes(node.data_dir)
    node.url = ""
    await asyncio.to_thread(node.start)
    say(f"standalone: churn, {options.churn:,} push/delete operations")
    async with open_session(options.concurrency) as session:
        client = ScaleClient(Target(STANDALONE, node.url, node.pid), session, options.concurrency)
        result = await client.churn(content, options.churn)
        result["tags_at_largest"] = len(json.loads(
            (await client._get(client._url(f"/v2/{content.repositories[0]}/tags/list"),
                               "GET tags list"))[1]).get("tags") or [])
    node.stop()
    after = metadata_bytes(node.data_dir)
    return {**result, "metadata_bytes_before": before, "metadata_bytes_after": after,
            "ratio": after / before if before else None}


def metadata_bytes(data_dir: Path) -> int:
    """The node's metadata on disk: its RocksDB directory, without RocksDB's own
    text logs (``LOG``, ``LOG.old.*``), which say how the store ran, not what it holds."""
    return sum(f.stat().st_size for f in (data_dir / "meta").iterdir()
               if f.is_file() and not f.name.startswith("LOG"))


def _cpu_of(processes: dict[int, str]) -> dict[int, float]:
    found = {}
    for pid in processes:
        with contextlib.suppress(OSError):
            found[pid] = procfs.cpu_seconds(pid)
    return found


# -- the cluster ------------------------------------------------------------------------------


def descendants(root: int) -> list[int]:
    """``root`` and every process under it, from ``/proc``'s parent links."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            parent = int(text[text.rindex(")") + 2:].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue.extend(children.get(pid, []))
    return found


async def cluster_idle(cluster: ClusterProcess, seconds: float) -> dict:
    """The cluster's CPU as a share of one core over ``seconds``, and what its links carried."""
    pids = descendants(cluster.supervisor_pid) if cluster.supervisor_pid else cluster.all_pids()

    def cpu() -> dict[int, float]:
        out = {}
        for pid in pids:
            with contextlib.suppress(OSError):
                out[pid] = procfs.cpu_seconds(pid)
        return out

    links0 = _links(cluster)
    before, started = cpu(), time.monotonic()
    await asyncio.sleep(seconds)  # the measuring window, not a wait for a condition
    after, window = cpu(), time.monotonic() - started
    links1 = _links(cluster)
    shares = {p: (after[p] - before[p]) / window for p in after if p in before}
    used = sum(shares.values()) * window
    names = _process_names(cluster)
    carried = {}
    if links0 is not None and links1 is not None:
        was = {link["name"]: link["bytes"] for link in links0}
        carried = {link["name"]: link["bytes"] - was.get(link["name"], 0) for link in links1}
    busiest = max(carried.items(), key=lambda kv: kv[1], default=("", 0))
    return {"window_s": window, "processes": len(after), "cpu_share": used / window,
            "link_bytes_total": sum(carried.values()), "links": len(carried),
            "busiest_link": busiest[0], "busiest_link_bytes": busiest[1],
            "per_process": {names.get(p, f"pid {p}"): share for p, share in sorted(shares.items())}}


async def quiet(cluster: ClusterProcess, empty: dict, timeout_s: float) -> dict:
    """Wait until the cluster's links carry no more than they did empty: every
    ``QUIET_STEP_S``, the bytes all links carried since the last look, until they
    are within ``QUIET_FACTOR`` × the empty window's rate (at least
    ``QUIET_MIN_BYTES_PER_S``). What goes on before that is the tail of the push
    (relays draining, the last fetches), not idle cost; the seconds it took are
    reported. None if the links cannot be read or it never got quiet."""
    empty_rate = empty["link_bytes_total"] / empty["window_s"] if empty.get("window_s") else 0.0
    limit = max(QUIET_MIN_BYTES_PER_S, QUIET_FACTOR * empty_rate)
    started = time.monotonic()
    previous = _links(cluster)
    while previous is not None and time.monotonic() - started < timeout_s:
        await asyncio.sleep(QUIET_STEP_S)  # the sampling interval of the link counters
        now = _links(cluster)
        if now is None:
            break
        was = {link["name"]: link["bytes"] for link in previous}
        carried = sum(link["bytes"] - was.get(link["name"], 0) for link in now)
        if carried / QUIET_STEP_S <= limit:
            return {"seconds": time.monotonic() - started, "bytes_per_s_limit": limit}
        previous = now
    return {"seconds": None, "bytes_per_s_limit": limit}


def _process_names(cluster: ClusterProcess) -> dict[int, str]:
    """pid → node name (serving nodes), "supervisor"; paired copies by their data dir."""
    names = {cluster.supervisor_pid: "supervisor"} if cluster.supervisor_pid else {}
    with contextlib.suppress(ClusterStartError):
        status = cluster.call("GET", "/georeg/v1/cluster")
        names.update({n["pid"]: n["name"] for n in status["nodes"] if n.get("pid")})
        copies = {c["data_dir"]: c["name"] for c in status["paired_copies"]}
        for pid in descendants(cluster.supervisor_pid or 0):
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_text(errors="replace").split("\x00")
                for data_dir, name in copies.items():
                    if data_dir in argv:
                        names[pid] = name
    return names


def _links(cluster: ClusterProcess) -> list[dict] | None:
    try:
        return cluster.call("GET", "/georeg/v1/links")  # type: ignore[return-value]
    except ClusterStartError:
        return None


async def every_node_holds(cluster: ClusterProcess, repo: str, tag: str, digest: str,
                           acked_ns: int, timeout_s: float) -> dict:
    """From ``acked_ns`` to the last serving node's own record of holding ``repo:tag``."""
    channels = {n.name: cluster.grpc_channel(n.name) for n in cluster.nodes}
    try:
        stubs = {name: pbg.ReplicationStub(ch) for name, ch in channels.items()}
        arrived: dict[str, int] = {}
        deadline = time.monotonic() + timeout_s
        while len(arrived) < len(stubs) and time.monotonic() < deadline:
            for node in cluster.nodes:
                if node.name in arrived:
                    continue
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stubs[node.name].GetImageStatus(pb.ImageStatusRequest(
                        repository=repo, tag=tag,
                        requester=pb.NodeRef(region=node.region, zone=node.zone)), timeout=10)
                    if reply.present and reply.digest == digest and reply.tag_arrived_ns:
                        arrived[node.name] = max(reply.arrived_ns, reply.tag_arrived_ns)
            if len(arrived) < len(stubs):
                await asyncio.sleep(POLL_S)  # poll interval, bounded by the deadline above
    finally:
        for channel in channels.values():
            await channel.close(grace=None)
    last = max(arrived.values(), default=0)
    return {"nodes": len(stubs), "holding": len(arrived),
            "after_ack_s": (last - acked_ns) / 1e9 if arrived else None,
            "missing": sorted(set(stubs) - set(arrived))}


async def catch_up(cluster: ClusterProcess, session: aiohttp.ClientSession, url: str,
                   count: int, timeout_s: float, say: Callable[[str], None]) -> dict:
    """Isolate the last region that is not the home region (every link to and from it
    cut, its processes up), push ``count`` manifests into one repository through the
    global endpoint, heal, and time until that region's node lists them all."""
    home = cluster.spec.home_region
    node = next(n for n in reversed(cluster.nodes) if n.region != home)
    repo = CATCH_UP_REPOSITORY
    say(f"cluster: {node.region} isolated; pushing {count} manifests to {repo}")
    fault = cluster.inject("region-outage", region=node.region, mode="isolate")
    try:
        options = ScaleOptions(manifests=count, repositories=1, concurrency=8)
        content = Content(options)
        content.repositories = [repo]
        content.configs = {repo: content.configs.popitem()[1]}
        client = ScaleClient(Target("cluster", url, 0), session, options.concurrency)
        await client.setup(content)
        pushed = await client.push(content)
        _, last_tag, _ = content.manifest(pushed["last_image"])
        last_digest = content.digests[pushed["last_image"]]
        try:
            held_isolated: int | None = await _tags_at(session, cluster.http(node.name), repo)
        except aiohttp.ClientError:
            held_isolated = None    # not reachable from here while isolated
    finally:
        cluster.heal_all()
    healed = time.monotonic()
    deadline = healed + timeout_s
    held = held_isolated or 0
    tag_lists = 0
    channel = cluster.grpc_channel(node.name)
    try:
        stub = pbg.ReplicationStub(channel)
        while held < count and time.monotonic() < deadline:
            await asyncio.sleep(CATCH_UP_POLL_S)  # poll interval, bounded by the deadline above
            # The last acknowledged tag first (one record, the node's own: a manifest HEAD
            # would fetch a missing one from a peer); the full list, up to ``count`` tags,
            # only once it is there, since pushes at c>1 may arrive in any order.
            if await _node_holds(stub, node, repo, last_tag, last_digest):
                held = await _tags_at(session, cluster.http(node.name), repo)
                tag_lists += 1
    finally:
        await channel.close(grace=None)
    seconds = time.monotonic() - healed
    return {"region": node.region, "node": node.name, "fault": fault.get("description"),
            "pushed": pushed["pushed"], "push_per_s": pushed["per_s"],
            "held_while_isolated": held_isolated, "held": held,
            "poll_s": CATCH_UP_POLL_S, "tag_lists_read": tag_lists,
            "seconds_after_heal": seconds if held >= count else None,
            "manifests_per_s": count / seconds if held >= count and seconds else None}


async def _node_holds(stub: pbg.ReplicationStub, node: NodePlan, repo: str, tag: str, digest: str) -> bool:
    """Whether ``node`` records ``repo:tag`` as ``digest`` in its own store (no fetch)."""
    try:
        reply = await stub.GetImageStatus(pb.ImageStatusRequest(
            repository=repo, tag=tag,
            requester=pb.NodeRef(region=node.region, zone=node.zone)), timeout=10)
    except grpc.aio.AioRpcError:
        return False    # not answering yet after the heal: poll again
    return reply.present and reply.digest == digest and bool(reply.tag_arrived_ns)


async def _tags_at(session: aiohttp.ClientSession, node_url: str, repo: str) -> int:
    """Tags ``repo`` lists at one node, read there (a tag list is answered from the
    node's own store; a manifest GET might fetch from a peer)."""
    async with session.get(f"{node_url}/v2/{repo}/tags/list") as r:
        body = await r.read()
    if r.status == 404:
        return 0
    if r.status != 200:
        raise WorkloadError(f"{node_url}: GET {repo} tags answered {r.status}")
    return len(json.loads(body).get("tags") or [])


async def create_region(cluster: ClusterProcess, region: str, timeout_s: float) -> dict:
    started = time.monotonic()
    replica = await asyncio.to_thread(cluster.call, "POST", "/georeg/v1/replications",
                                      {"location": region})
    deadline = started + timeout_s
    while replica["status"]["displayStatus"] != "Ready":
        if time.monotonic() > deadline:
            raise TimeoutError(f"{region} was not Ready after {timeout_s:g}s: "
                               f"{replica['status']['message']}")
        await asyncio.sleep(0.1)  # poll interval, bounded by the deadline above
        replica = await asyncio.to_thread(cluster.call, "GET",
                                          f"/georeg/v1/replications/{region}")
    seconds = time.monotonic() - started
    done, total = replica["sync"]["images"]
    return {"region": region, "seconds": seconds, "images": [done, total],
            "images_per_s": done / seconds if seconds else None}


def node_rss(cluster: ClusterProcess) -> dict[str, float]:
    status = cluster.call("GET", "/georeg/v1/cluster")
    out = {}
    for node in status["nodes"]:
        with contextlib.suppress(OSError, TypeError):
            out[node["name"]] = procfs.rss_bytes(node["pid"]) / MIB
    return out


async def measure_cluster(options: ScaleOptions, workdir: Path, stack: contextlib.ExitStack,
                          say: Callable[[str], None]) -> dict:
    spec = on_any_ports(specs.load(options.config))
    say(f"cluster: starting {spec.node_count()} nodes + {len(spec.paired_regions())} paired "
        f"copies (auth {'on' if spec.auth_enabled else 'off'})")
    started = time.monotonic()
    cluster = await asyncio.to_thread(ClusterProcess.start, spec, workdir / "cluster")
    stack.callback(cluster.stop)
    status = cluster.call("GET", "/georeg/v1/cluster")
    endpoints = status["global_endpoints"]
    region = cluster.spec.home_region if cluster.spec.home_region in endpoints else next(iter(endpoints))
    result: dict = {"started_s": time.monotonic() - started, "auth": cluster.spec.auth_enabled,
                    "nodes": len(status["nodes"]), "paired_copies": len(status["paired_copies"]),
                    "endpoint": f"global@{region}"}
    say(f"cluster: idle, empty ({options.idle_s:g} s)")
    result["idle_empty"] = await cluster_idle(cluster, options.idle_s)
    target = Target(f"cluster (global@{region})", endpoints[region], cluster.supervisor_pid or 0)
    async with open_session(options.concurrency, cluster.tls, cluster.registry_headers()) as session:
        side, content = await measure_side(CLUSTER, target, session, options, say,
                                           _process_names(cluster))
    # the global endpoint's proxy runs in the supervisor: its CPU is not a node's
    side["push"]["supervisor_cpu_s"] = side["push"].pop("server_cpu_s", None)
    result.update(side)
    last = side["push"]["last_image"]
    repo, tag, _ = content.manifest(last)
    say(f"cluster: waiting for every node to hold {repo}:{tag}")
    result["replicated"] = await every_node_holds(
        cluster, repo, tag, content.digests[last], side["push"]["last_ack_ns"], options.timeout_s)
    result["rss_after_push_mib"] = node_rss(cluster)
    say(f"cluster: idle after the push ({options.idle_s:g} s)")
    say("cluster: waiting for the links to go quiet")
    result["quiet_after_push"] = await quiet(cluster, result["idle_empty"],
                                             min(options.timeout_s, QUIET_TIMEOUT_S))
    result["idle_after_push"] = await cluster_idle(cluster, options.idle_s)
    if options.catch_up:
        async with open_session(options.concurrency, cluster.tls,
                                cluster.registry_headers()) as session:
            result["catch_up"] = await catch_up(cluster, session, endpoints[region],
                                                options.catch_up, options.timeout_s, say)
    if options.new_region:
        say(f"cluster: replication create --location {NEW_REGION}")
        result["new_region"] = await create_region(cluster, NEW_REGION, options.timeout_s)
        say(f"cluster: idle with {NEW_REGION} ({options.idle_s:g} s)")
        result["idle_after_new_region"] = await cluster_idle(cluster, options.idle_s)
    return result


# -- the run ----------------------------------------------------------------------------------


async def run(options: ScaleOptions, console: Console | None = None) -> dict:
    options.validate()
    console = console or Console(stderr=True)
    say = lambda text: console.print(f"[dim]{text}[/dim]")  # noqa: E731
    results: dict = {"machine": _machine(options), "workload": options.workload(),
                     "load_average_before": os.getloadavg(), "sides": {}}
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = options.workdir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="georeg-scale-")))
        workdir.mkdir(parents=True, exist_ok=True)
        for name in options.sides:
            if name == CLUSTER:
                results["sides"][CLUSTER] = await measure_cluster(options, workdir, stack, say)
                continue
            server = (GeoregNode(workdir / "standalone") if name == STANDALONE
                      else ReferenceRegistry(workdir / "reference", options.reference_binary))
            stack.callback(server.stop)
            server.start()
            async with open_session(options.concurrency) as session:
                side, content = await measure_side(name, Target(name, server.url, server.pid),
                                                   session, options, say)
            if name == STANDALONE and options.churn:
                assert isinstance(server, GeoregNode)
                side["churn"] = await churn(server, content, options, say)
            results["sides"][name] = side
            server.stop()
    results["load_average_after"] = os.getloadavg()
    results["seconds"] = time.monotonic() - started
    return results


def _machine(options: ScaleOptions) -> dict:
    m = procfs.machine(options.reference_binary or "/usr/bin/docker-registry")
    return {"cpu": m.cpu_model, "cores": m.cores, "python": m.python, "kernel": m.kernel,
            "georeg": m.georeg_commit, "reference": m.reference_version}


# -- the report -------------------------------------------------------------------------------


def print_table(results: dict, console: Console) -> None:
    w, m = results["workload"], results["machine"]
    console.print(f"[bold]machine[/bold]  {m['cpu']}, {m['cores']} cores · Linux {m['kernel']} · "
                  f"Python {m['python']} · georeg {m['georeg']} · {m['reference']}")
    console.print("load average before " + " ".join(f"{x:.2f}" for x in results["load_average_before"])
                  + ", after " + " ".join(f"{x:.2f}" for x in results["load_average_after"])
                  + f" · {results['seconds']:.0f} s")
    sides = results["sides"]
    names = [n for n in SIDES if n in sides]
    table = Table(title=f"{w['manifests']:,} manifests in {w['repositories']:,} repositories "
                        f"({w['largest']:,} in the largest), c={w['concurrency']}")
    table.add_column("measurement")
    for name in names:
        table.add_column(sides[name].get("endpoint", name) if name == CLUSTER else name,
                         justify="right")

    def row(label: str, cell: Callable[[dict], str]) -> None:
        table.add_row(label, *(cell(sides[n]) for n in names))

    def ms(x: float | None) -> str:
        return "—" if x is None else f"{x:.1f}"

    row("push manifests/s", lambda s: f"{s['push']['per_s']:,.0f}")
    row("PUT manifest p50 / p99 ms", lambda s: f"{ms(s['push']['p50_ms'])} / {ms(s['push']['p99_ms'])}")
    labels = {"tags": f"full tag list ({w['largest']:,} tags) p50 / p99 ms",
              "tags_page": f"tag list page n={w['page']} p50 / p99 ms",
              "catalog": f"_catalog page n={w['page']} p50 / p99 ms",
              "manifest": "GET manifest p50 / p99 ms"}
    for key in READS:
        row(labels[key], lambda s, k=key: f"{ms(s[k]['p50_ms'])} / {ms(s[k]['p99_ms'])}"
            if s[k].get("paged", True) else "no paging (whole list)")
    row("RSS after push (MiB)", lambda s: (f"{s['rss_after_push_mib']:.0f}"
                                           if isinstance(s.get("rss_after_push_mib"), float)
                                           else _range(s.get("rss_after_push_mib"))))
    console.print(table)
    turned = sides.get(STANDALONE, {}).get("churn")
    if turned:
        console.print(f"standalone churn: {turned['operations']:,} push/delete operations "
                      f"({turned['per_s']:,.0f}/s); metadata on disk "
                      f"{turned['metadata_bytes_before'] / MIB:,.1f} MiB with the content alone, "
                      f"{turned['metadata_bytes_after'] / MIB:,.1f} MiB after the churn "
                      f"({turned['ratio']:.2f}×)")
    cluster = sides.get(CLUSTER)
    if cluster:
        c = Table(title=f"the cluster: {cluster['nodes']} nodes + {cluster['paired_copies']} paired "
                        f"copies, auth {'on' if cluster['auth'] else 'off'}")
        c.add_column("measurement")
        c.add_column("value", justify="right")
        split = cluster["push"].get("cpu_ms_per_manifest") or {}
        if split:
            top = sorted(split.items(), key=lambda kv: -kv[1])[:3]
            c.add_row(f"CPU per manifest pushed, all {len(split)} processes (most: "
                      + ", ".join(f"{n} {v:.2f}" for n, v in top) + ")",
                      f"{sum(split.values()):.1f} ms")
        rep = cluster["replicated"]
        c.add_row("every node holds the last manifest, after its ack",
                  f"{rep['after_ack_s']:.2f} s" if rep["after_ack_s"] is not None else
                  f"{rep['holding']}/{rep['nodes']} nodes")
        settled = cluster.get("quiet_after_push") or {}
        c.add_row(f"links back to their empty rate (≤ {settled.get('bytes_per_s_limit', 0) / 1024:,.1f} "
                  f"KiB/s) after every node held it",
                  f"{settled['seconds']:.1f} s" if settled.get("seconds") is not None else "not seen")
        for key, label in (("idle_empty", "idle CPU, empty"), ("idle_after_push", "idle CPU, after the push"),
                           ("idle_after_new_region", f"idle CPU, with {NEW_REGION}")):
            if key in cluster:
                i = cluster[key]
                top = max(i["per_process"].items(), key=lambda kv: kv[1], default=("", 0.0))
                c.add_row(f"{label} ({i['processes']} processes, {i['window_s']:.0f} s)",
                          f"{i['cpu_share']:.1%} of one core (most: {top[0]} {top[1]:.1%})")
                c.add_row(f"  links meanwhile ({i['links']}; busiest {i['busiest_link']})",
                          f"{i['link_bytes_total'] / 1024:,.0f} KiB; busiest "
                          f"{i['busiest_link_bytes'] / 1024:,.1f} KiB")
        if "catch_up" in cluster:
            k = cluster["catch_up"]
            c.add_row(f"{k['region']} isolated for {k['pushed']:,} pushes: lists all after the heal "
                      f"(polled every {k['poll_s'] * 1000:.0f} ms)",
                      f"{k['seconds_after_heal']:.2f} s" if k["seconds_after_heal"] is not None
                      else f"{k['held']:,} of {k['pushed']:,}")
        if "new_region" in cluster:
            n = cluster["new_region"]
            c.add_row(f"replication create {n['region']} → Ready ({n['images'][0]:,} images)",
                      f"{n['seconds']:.1f} s")
        console.print(c)


def _range(values: dict | None) -> str:
    if not values:
        return "—"
    return f"{min(values.values()):.0f}–{max(values.values()):.0f} per node"


__all__ = ["CLUSTER", "REFERENCE", "SIDES", "STANDALONE", "ScaleOptions", "print_table", "run"]
