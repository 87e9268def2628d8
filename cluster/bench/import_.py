"""``georeg bench import``: how fast ``georeg import`` copies images from a
registry, against ``skopeo copy`` of the same images from the same source
into the same cluster (issue 19's acceptance: import ≥ 1.0× skopeo).

The source is the reference registry (``cluster.bench.reference``: Debian's
``docker-registry``) on loopback, filled (untimed) with ``images`` images of
``layers`` random layers of ``layer_bytes`` each, a fresh set for every side
of every round, so neither side finds a blob the other already copied. The
cluster runs in a child process (``clusterproc``; the default spec unless
``config``). Both sides write into the home region: skopeo through its
regional endpoint (``skopeo copy --preserve-digests``, one image after
another, as a pipeline copying a list would), the import through the
management API (``POST /georeg/v1/imports``, one image after another), which
pushes into a home node over its management link. Rounds alternate which
side goes first. Per side and round: the wall time from the first request to
the last answer, and MB/s of blob bytes (10^6 bytes; manifests are left
out: they are the same on both sides and tiny).

Reported: each side's median MB/s and the ratio import ÷ skopeo of the
medians, against the goal (≥ 1.0), with the CPU other processes used while
it ran (the machine is shared). Timings are reported, never enforced.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..control import spec as specs
from .clusterproc import ClusterProcess
from .source_images import (
    ImageSetOptions,
    SideTime,
    SourceImage,
    describe_others,
    describe_sides,
    median_mb_per_s,
    skopeo_env,
    source_and_cluster,
)

GOAL_RATIO = 1.0
SIDES = ("import", "skopeo")


@dataclass(frozen=True)
class ImportBenchOptions(ImageSetOptions):
    pass


RoundTime = SideTime


@dataclass
class ImportBenchResult:
    options: ImportBenchOptions
    rounds: list[RoundTime] = field(default_factory=list)
    other_cores: float = 0.0
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def median(self, side: str) -> float:
        return median_mb_per_s(self.rounds, side)

    @property
    def ratio(self) -> float | None:
        """import ÷ skopeo, of the medians (None without a skopeo figure)."""
        skopeo = self.median("skopeo")
        return self.median("import") / skopeo if skopeo > 0 else None

    @property
    def goal_met(self) -> bool | None:
        return None if self.ratio is None else self.ratio >= GOAL_RATIO

    def to_json(self) -> dict:
        return {"options": vars(self.options),
                "rounds": [{**vars(r), "mb_per_s": r.mb_per_s} for r in self.rounds],
                "median_mb_per_s": {side: self.median(side) for side in SIDES},
                "ratio": self.ratio, "goal": GOAL_RATIO, "goal_met": self.goal_met,
                "other_cores": self.other_cores, "load_average": list(self.load_average)}


# -- the two sides ----------------------------------------------------------------------------


def run_skopeo(images: list[SourceImage], source: str, endpoint: str, root: Path,
               headers: dict[str, str]) -> float:
    env, flags = skopeo_env(root, endpoint, headers)
    start = time.perf_counter()
    for image in images:
        subprocess.run(["skopeo", *flags, f"docker://{source}/{image.repository}:1.0",
                        f"docker://{endpoint}/{image.repository}:1.0"],
                       env=env, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - start


def run_import(images: list[SourceImage], source: str, cluster: ClusterProcess) -> float:
    start = time.perf_counter()
    for image in images:
        answer = cluster.call("POST", "/georeg/v1/imports", {
            "source": f"{source}/{image.repository}:1.0",
            "targetTags": [f"{image.repository}:1.0"]}, timeout=600)
        if answer["digest"] != image.digest:
            raise RuntimeError(f"imported {image.repository} as {answer['digest']}, "
                               f"not {image.digest}")
    return time.perf_counter() - start


def run(spec: specs.ClusterSpec, options: ImportBenchOptions, workdir: Path | None = None,
        quiet_wait_s: float = 30.0) -> ImportBenchResult:
    with source_and_cluster(spec, options, SIDES, workdir, "georeg-bench-import-") as bench:
        cluster, source, endpoint = bench.cluster, bench.source, bench.endpoint
        headers = cluster.registry_headers()
        result = ImportBenchResult(options)
        others = bench.quiet_others(quiet_wait_s)
        for round_ in range(options.repeat):
            order = SIDES if round_ % 2 == 0 else tuple(reversed(SIDES))
            for side in order:
                images = bench.sets[side, round_]
                if side == "skopeo":
                    seconds = run_skopeo(images, source, endpoint,
                                         bench.workdir / f"skopeo{round_}", headers)
                else:
                    seconds = run_import(images, source, cluster)
                result.rounds.append(RoundTime(side, round_, seconds,
                                               sum(i.blob_bytes for i in images)))
        result.other_cores = others.cores()
        result.load_average = os.getloadavg()
        return result


def describe(result: ImportBenchResult) -> str:
    lines = describe_sides("import vs skopeo copy", result.options, result.rounds, SIDES)
    ratio = result.ratio
    if ratio is not None:
        lines.append(f"  ratio import ÷ skopeo {ratio:.2f}× (goal ≥ {GOAL_RATIO:.1f}×: "
                     f"{'met' if result.goal_met else 'NOT met'})")
    lines.append(describe_others(result.other_cores, result.load_average))
    return "\n".join(lines)
