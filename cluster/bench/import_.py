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

import asyncio
import hashlib
import json
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
from .reference import ReferenceRegistry

GOAL_RATIO = 1.0
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SIDES = ("import", "skopeo")


@dataclass(frozen=True)
class ImportBenchOptions:
    images: int = 4
    layers: int = 2
    layer_bytes: int = 8 << 20
    repeat: int = 3

    def quick(self) -> ImportBenchOptions:
        return ImportBenchOptions(images=2, layers=1, layer_bytes=1 << 20, repeat=1)


@dataclass
class RoundTime:
    side: str
    round: int
    seconds: float
    blob_bytes: int

    @property
    def mb_per_s(self) -> float:
        return self.blob_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ImportBenchResult:
    options: ImportBenchOptions
    rounds: list[RoundTime] = field(default_factory=list)
    other_cores: float = 0.0
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def median(self, side: str) -> float:
        values = [r.mb_per_s for r in self.rounds if r.side == side]
        return statistics.median(values) if values else 0.0

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


# -- the source's content --------------------------------------------------------------------


@dataclass(frozen=True)
class SourceImage:
    repository: str
    digest: str
    blob_bytes: int


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def push_image(http: aiohttp.ClientSession, url: str, repo: str, rng: random.Random,
                layers: int, layer_bytes: int) -> SourceImage:
    blobs = [rng.randbytes(layer_bytes) for _ in range(layers)]
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [_digest(b) for b in blobs]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": _digest(b), "size": len(b)} for b in blobs]}).encode()
    for blob in [config, *blobs]:
        async with http.post(f"{url}/v2/{repo}/blobs/uploads/") as r:
            r.raise_for_status()
            location = r.headers["Location"]
        joiner = "&" if "?" in location else "?"
        async with http.put(f"{location}{joiner}digest={_digest(blob)}", data=blob) as r:
            r.raise_for_status()
    async with http.put(f"{url}/v2/{repo}/manifests/1.0", data=manifest,
                        headers={"Content-Type": OCI_MANIFEST}) as r:
        r.raise_for_status()
    return SourceImage(repo, _digest(manifest), len(config) + layers * layer_bytes)


async def fill_source(url: str, options: ImportBenchOptions, seed: int = 19
                      ) -> dict[tuple[str, int], list[SourceImage]]:
    """A fresh set of images per (side, round), pushed into the source."""
    rng = random.Random(seed)
    sets: dict[tuple[str, int], list[SourceImage]] = {}
    async with aiohttp.ClientSession() as http:
        for round_ in range(options.repeat):
            for side in SIDES:
                sets[side, round_] = [
                    await push_image(http, url, f"bench/{side}{round_}/img{i}", rng, options.layers,
                                options.layer_bytes) for i in range(options.images)]
    return sets


# -- the two sides ----------------------------------------------------------------------------


def skopeo_env(root: Path, endpoint: str, headers: dict[str, str]) -> tuple[dict, list[str]]:
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    auths = {}
    if headers.get("Authorization", "").startswith("Basic "):
        auths[endpoint] = {"auth": headers["Authorization"].removeprefix("Basic ")}
    (root / "auth.json").write_text(json.dumps({"auths": auths}))
    (root / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    (root / "registries.conf").write_text("unqualified-search-registries = []\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root),
           "XDG_RUNTIME_DIR": str(root), "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf"),
           "TMPDIR": str(root / "tmp"), "NO_PROXY": "*", "no_proxy": "*"}
    flags = ["--policy", str(root / "policy.json"), "copy", "--quiet", "--preserve-digests",
             "--authfile", str(root / "auth.json"), "--src-tls-verify=false",
             "--dest-tls-verify=false"]
    return env, flags


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
    if shutil.which("skopeo") is None:
        raise RuntimeError("skopeo is not installed (Debian package skopeo)")
    keep = workdir is not None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="georeg-bench-import-"))
    reference = ReferenceRegistry(workdir / "source").start()
    cluster: ClusterProcess | None = None
    try:
        sets = asyncio.run(fill_source(reference.url, options))
        cluster = ClusterProcess.start(on_any_ports(spec), workdir / "cluster")
        regional = next(e for e in cluster.plan.endpoints
                        if e.kind == "regional" and e.region == cluster.spec.home_region)
        endpoint = f"{cluster.plan.host}:{regional.port}"
        source = reference.url.removeprefix("http://")
        headers = cluster.registry_headers()
        result = ImportBenchResult(options)
        asyncio.run(procfs.wait_for_quiet(cluster.all_pids() + [reference.pid], quiet_wait_s))
        others = procfs.OtherCpu(cluster.all_pids() + [reference.pid])
        for round_ in range(options.repeat):
            order = SIDES if round_ % 2 == 0 else tuple(reversed(SIDES))
            for side in order:
                images = sets[side, round_]
                if side == "skopeo":
                    seconds = run_skopeo(images, source, endpoint, workdir / f"skopeo{round_}",
                                         headers)
                else:
                    seconds = run_import(images, source, cluster)
                result.rounds.append(RoundTime(side, round_, seconds,
                                               sum(i.blob_bytes for i in images)))
        result.other_cores = others.cores()
        result.load_average = os.getloadavg()
        return result
    finally:
        if cluster is not None:
            cluster.stop()
        reference.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def describe(result: ImportBenchResult) -> str:
    o = result.options
    lines = [f"import vs skopeo copy: {o.images} images × {o.layers} layers × "
             f"{o.layer_bytes / 1e6:.1f} MB, {o.repeat} rounds (medians)"]
    for side in SIDES:
        runs = ", ".join(f"{r.mb_per_s:.1f}" for r in result.rounds if r.side == side)
        lines.append(f"  {side:<7} {result.median(side):8.1f} MB/s   (runs: {runs})")
    ratio = result.ratio
    if ratio is not None:
        lines.append(f"  ratio import ÷ skopeo {ratio:.2f}× (goal ≥ {GOAL_RATIO:.1f}×: "
                     f"{'met' if result.goal_met else 'NOT met'})")
    lines.append(f"  other processes used {result.other_cores:.2f} cores meanwhile; load average "
                 + " ".join(f"{x:.2f}" for x in result.load_average))
    return "\n".join(lines)
