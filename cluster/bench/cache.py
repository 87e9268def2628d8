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

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..control import spec as specs
from .source_images import (
    ImageSetOptions,
    SideTime,
    describe_others,
    describe_sides,
    median_mb_per_s,
    skopeo_env,
    source_and_cluster,
)

FIRST_GOAL = 1.2        # first pull through the cache ÷ direct pull, of the times: at most
SECOND_GOAL = 0.95      # second pull ÷ local pull, of the throughputs: at least
SIDES = ("direct", "first", "second", "local")
PREFIX = "cached"


@dataclass(frozen=True)
class CacheBenchOptions(ImageSetOptions):
    pass


PullTime = SideTime


@dataclass
class CacheBenchResult:
    options: CacheBenchOptions
    pulls: list[PullTime] = field(default_factory=list)
    other_cores: float = 0.0
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def median(self, side: str) -> float:
        """The median MB/s of one side (0 without a figure)."""
        return median_mb_per_s(self.pulls, side)

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
    # A fresh set per round for direct, first (pulled again by second) and local.
    with source_and_cluster(spec, options, ("direct", "first", "local"), workdir,
                            "georeg-bench-cache-") as bench:
        cluster, sets, source, endpoint = bench.cluster, bench.sets, bench.source, bench.endpoint
        cluster.call("POST", "/georeg/v1/cache-rules", {
            "name": "bench", "sourceRepository": f"{source}/*",
            "targetRepository": f"{PREFIX}/*"})
        env, flags = skopeo_env(bench.workdir / "skopeo", endpoint, cluster.registry_headers())
        # The local side's images are pushed into the cluster first (untimed).
        for round_ in range(options.repeat):
            for image in sets["local", round_]:
                subprocess.run(["skopeo", *flags,
                                f"docker://{source}/{image.repository}:1.0",
                                f"docker://{endpoint}/{image.repository}:1.0"],
                               env=env, check=True, capture_output=True, timeout=600)
        result = CacheBenchResult(options)
        others = bench.quiet_others(quiet_wait_s)
        into = bench.workdir / "pulled"
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


def describe(result: CacheBenchResult) -> str:
    lines = describe_sides("pulls through the cache", result.options, result.pulls, SIDES)
    met = result.goals_met
    if result.first_ratio is not None:
        lines.append(f"  first pull ÷ direct pull, time: {result.first_ratio:.2f}× (goal ≤ "
                     f"{FIRST_GOAL:.2f}×: {'met' if met['first'] else 'NOT met'})")
    if result.second_ratio is not None:
        lines.append(f"  second pull ÷ local pull, MB/s: {result.second_ratio:.2f}× (goal ≥ "
                     f"{SECOND_GOAL:.2f}×: {'met' if met['second'] else 'NOT met'})")
    lines.append(describe_others(result.other_cores, result.load_average))
    return "\n".join(lines)
