"""``georeg bench cache``: what the pull-through cache costs a client (issue
19's acceptance: the first pull through the cache at most 20 % slower than a
direct pull from upstream; the second pull at least 0.95× as fast as a pull
of an image pushed into the registry).

The upstream is the reference registry (``cluster.bench.reference``: Debian's
``docker-registry``) on loopback, filled (untimed) with a fresh set of
``images`` images of ``layers`` random layers of ``layer_bytes`` each per
side and round, so no side finds what another brought. The cluster runs in a
child process (``clusterproc``; the default spec unless ``config``), with one
wildcard rule, ``SOURCE/* => cached/*``. Every pull is ``skopeo copy`` of one
image after another into a local ``dir:`` (the client's disk, emptied after
each image), four sides a round:

  direct   from the upstream itself
  first    the same kind of image through the cache, from the home region's
           regional endpoint (the node fetches it from upstream in the request)
  second   that same image again (now local)
  local    an image pushed into the cluster beforehand (untimed), not cached

Rounds alternate the order of direct/first and of second/local. Per side and
round: the wall time from the first pull to the last, and MB/s of blob bytes
(10^6 bytes). Reported: the medians, first ÷ direct of the times (goal ≤ 1.2)
and second ÷ local of the throughputs (goal ≥ 0.95), with the CPU other
processes used meanwhile (the machine is shared). Timings are reported,
never enforced.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from ..control import spec as specs
from ..testing import on_any_ports
from . import procfs
from .clusterproc import ClusterProcess
from .import_ import SourceImage, push_image, skopeo_env
from .reference import ReferenceRegistry

FIRST_GOAL = 1.2        # first pull through the cache ÷ direct pull, of the times: at most
SECOND_GOAL = 0.95      # second pull ÷ local pull, of the throughputs: at least
SIDES = ("direct", "first", "second", "local")
PREFIX = "cached"


@dataclass(frozen=True)
class CacheBenchOptions:
    images: int = 4
    layers: int = 2
    layer_bytes: int = 8 << 20
    repeat: int = 3

    def quick(self) -> CacheBenchOptions:
        return CacheBenchOptions(images=2, layers=1, layer_bytes=1 << 20, repeat=1)


@dataclass
class PullTime:
    side: str
    round: int
    seconds: float
    blob_bytes: int

    @property
    def mb_per_s(self) -> float:
        return self.blob_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class CacheBenchResult:
    options: CacheBenchOptions
    pulls: list[PullTime] = field(default_factory=list)
    other_cores: float = 0.0
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def median(self, side: str) -> float:
        """The median MB/s of one side (0 without a figure)."""
        values = [p.mb_per_s for p in self.pulls if p.side == side]
        return statistics.median(values) if values else 0.0

    @property
    def first_ratio(self) -> float | None:
        """First pull through the cache ÷ direct pull, of the times (the
        inverse of the throughputs' ratio): 1.1 is 10 % slower."""
        first = self.median("first")
        return self.median("direct") / first if first > 0 and self.median("direct") > 0 \
            else None

    @property
    def second_ratio(self) -> float | None:
        """Second pull ÷ local pull, of the throughputs."""
        local = self.median("local")
        return self.median("second") / local if local > 0 else None

    @property
    def goals_met(self) -> dict[str, bool | None]:
        first, second = self.first_ratio, self.second_ratio
        return {"first": None if first is None else first <= FIRST_GOAL,
                "second": None if second is None else second >= SECOND_GOAL}

    def to_json(self) -> dict:
        return {"options": vars(self.options),
                "pulls": [{**vars(p), "mb_per_s": p.mb_per_s} for p in self.pulls],
                "median_mb_per_s": {side: self.median(side) for side in SIDES},
                "first_over_direct_time": self.first_ratio, "first_goal": FIRST_GOAL,
                "second_over_local_throughput": self.second_ratio, "second_goal": SECOND_GOAL,
                "goals_met": self.goals_met, "other_cores": self.other_cores,
                "load_average": list(self.load_average)}


async def fill_source(url: str, options: CacheBenchOptions, seed: int = 19
                      ) -> dict[tuple[str, int], list[SourceImage]]:
    """A fresh set per round for direct, first (pulled again by second) and local."""
    rng = random.Random(seed)
    sets: dict[tuple[str, int], list[SourceImage]] = {}
    async with aiohttp.ClientSession() as http:
        for round_ in range(options.repeat):
            for side in ("direct", "first", "local"):
                sets[side, round_] = [
                    await push_image(http, url, f"bench/{side}{round_}/img{i}", rng,
                                     options.layers, options.layer_bytes)
                    for i in range(options.images)]
    return sets


def pull(images: list[str], env: dict, flags: list[str], into: Path) -> float:
    """``skopeo copy`` of each ``docker://`` reference into ``into``, one after
    another; the seconds taken."""
    start = time.perf_counter()
    for reference in images:
        subprocess.run(["skopeo", *flags, reference, f"dir:{into}"], env=env, check=True,
                       capture_output=True, timeout=600)
        shutil.rmtree(into, ignore_errors=True)
    return time.perf_counter() - start


def run(spec: specs.ClusterSpec, options: CacheBenchOptions, workdir: Path | None = None,
        quiet_wait_s: float = 30.0) -> CacheBenchResult:
    if shutil.which("skopeo") is None:
        raise RuntimeError("skopeo is not installed (Debian package skopeo)")
    keep = workdir is not None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="georeg-bench-cache-"))
    reference = ReferenceRegistry(workdir / "source").start()
    cluster: ClusterProcess | None = None
    try:
        sets = asyncio.run(fill_source(reference.url, options))
        cluster = ClusterProcess.start(on_any_ports(spec), workdir / "cluster")
        regional = next(e for e in cluster.plan.endpoints
                        if e.kind == "regional" and e.region == cluster.spec.home_region)
        endpoint = f"{cluster.plan.host}:{regional.port}"
        source = reference.url.removeprefix("http://")
        cluster.call("POST", "/georeg/v1/cache-rules", {
            "name": "bench", "sourceRepository": f"{source}/*",
            "targetRepository": f"{PREFIX}/*"})
        env, flags = skopeo_env(workdir / "skopeo", endpoint, cluster.registry_headers())
        # The local side's images are pushed into the cluster first (untimed).
        for round_ in range(options.repeat):
            for image in sets["local", round_]:
                subprocess.run(["skopeo", *flags,
                                f"docker://{source}/{image.repository}:1.0",
                                f"docker://{endpoint}/{image.repository}:1.0"],
                               env=env, check=True, capture_output=True, timeout=600)
        result = CacheBenchResult(options)
        asyncio.run(procfs.wait_for_quiet(cluster.all_pids() + [reference.pid], quiet_wait_s))
        others = procfs.OtherCpu(cluster.all_pids() + [reference.pid])
        into = workdir / "pulled"
        for round_ in range(options.repeat):
            refs = {
                "direct": [f"docker://{source}/{i.repository}:1.0"
                           for i in sets["direct", round_]],
                "first": [f"docker://{endpoint}/{PREFIX}/{i.repository}:1.0"
                          for i in sets["first", round_]],
                "local": [f"docker://{endpoint}/{i.repository}:1.0"
                          for i in sets["local", round_]]}
            refs["second"] = refs["first"]
            pairs = [("direct", "first"), ("second", "local")]
            if round_ % 2:
                pairs = [tuple(reversed(p)) for p in pairs]
            for side in [s for p in pairs for s in p]:
                seconds = pull(refs[side], env, flags, into)
                source_set = "first" if side == "second" else side
                result.pulls.append(PullTime(side, round_, seconds,
                                             sum(i.blob_bytes for i in sets[source_set, round_])))
        result.other_cores = others.cores()
        result.load_average = os.getloadavg()
        return result
    finally:
        if cluster is not None:
            cluster.stop()
        reference.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def describe(result: CacheBenchResult) -> str:
    o = result.options
    lines = [f"pulls through the cache: {o.images} images × {o.layers} layers × "
             f"{o.layer_bytes / 1e6:.1f} MB, {o.repeat} rounds (medians)"]
    for side in SIDES:
        runs = ", ".join(f"{p.mb_per_s:.1f}" for p in result.pulls if p.side == side)
        lines.append(f"  {side:<7} {result.median(side):8.1f} MB/s   (runs: {runs})")
    met = result.goals_met
    if result.first_ratio is not None:
        lines.append(f"  first pull ÷ direct pull, time: {result.first_ratio:.2f}× (goal ≤ "
                     f"{FIRST_GOAL:.2f}×: {'met' if met['first'] else 'NOT met'})")
    if result.second_ratio is not None:
        lines.append(f"  second pull ÷ local pull, MB/s: {result.second_ratio:.2f}× (goal ≥ "
                     f"{SECOND_GOAL:.2f}×: {'met' if met['second'] else 'NOT met'})")
    lines.append(f"  other processes used {result.other_cores:.2f} cores meanwhile; load average "
                 + " ".join(f"{x:.2f}" for x in result.load_average))
    return "\n".join(lines)
