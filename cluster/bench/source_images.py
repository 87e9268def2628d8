"""What ``georeg bench import`` and ``georeg bench cache`` share: images
pushed (untimed) into the reference registry (``cluster.bench.reference``:
Debian's ``docker-registry``) on loopback, the source the import copies from
and the upstream the cache pulls through, beside a cluster in a child process
(``clusterproc``); the skopeo set-up both drive it with; and the figures both
report, MB/s of blob bytes (10^6 bytes) per side and round.

Invariants: every (side, round) gets a fresh set of ``images`` images of
``layers`` random layers of ``layer_bytes`` each, drawn from one seeded
generator in the order rounds, then sides, then images, so no side finds a
blob another already brought and a given seed always yields the same
content; the source, the cluster and (unless the caller gave a workdir) the
temp dir are gone when ``source_and_cluster`` exits, however it exits.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from ..control import spec as specs
from ..testing import on_any_ports
from . import procfs
from .clusterproc import ClusterProcess
from .reference import ReferenceRegistry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass(frozen=True)
class ImageSetOptions:
    """How many images per side and round, of how many layers of how many
    bytes, over how many rounds."""

    images: int = 4
    layers: int = 2
    layer_bytes: int = 8 << 20
    repeat: int = 3

    def quick(self):
        """A smoke run's sizes, of the same options class."""
        return type(self)(images=2, layers=1, layer_bytes=1 << 20, repeat=1)


@dataclass
class SideTime:
    """One side's wall time in one round, and the blob bytes it moved."""

    side: str
    round: int
    seconds: float
    blob_bytes: int

    @property
    def mb_per_s(self) -> float:
        return self.blob_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def median_mb_per_s(times: Sequence[SideTime], side: str) -> float:
    """The median MB/s of one side (0 without a figure)."""
    values = [t.mb_per_s for t in times if t.side == side]
    return statistics.median(values) if values else 0.0


def describe_sides(title: str, options: ImageSetOptions, times: Sequence[SideTime],
                   sides: Sequence[str]) -> list[str]:
    """The report's head line and one line per side: its median and every run."""
    lines = [f"{title}: {options.images} images × {options.layers} layers × "
             f"{options.layer_bytes / 1e6:.1f} MB, {options.repeat} rounds (medians)"]
    for side in sides:
        runs = ", ".join(f"{t.mb_per_s:.1f}" for t in times if t.side == side)
        lines.append(f"  {side:<7} {median_mb_per_s(times, side):8.1f} MB/s   (runs: {runs})")
    return lines


def describe_others(other_cores: float, load_average: Sequence[float]) -> str:
    return (f"  other processes used {other_cores:.2f} cores meanwhile; load average "
            + " ".join(f"{x:.2f}" for x in load_average))


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


async def fill_source(url: str, options: ImageSetOptions, sides: Sequence[str], seed: int = 19
                      ) -> dict[tuple[str, int], list[SourceImage]]:
    """A fresh set of images per (side, round), pushed into the source as
    ``bench/{side}{round}/img{i}:1.0``."""
    rng = random.Random(seed)
    sets: dict[tuple[str, int], list[SourceImage]] = {}
    async with aiohttp.ClientSession() as http:
        for round_ in range(options.repeat):
            for side in sides:
                sets[side, round_] = [
                    await push_image(http, url, f"bench/{side}{round_}/img{i}", rng,
                                     options.layers, options.layer_bytes)
                    for i in range(options.images)]
    return sets


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


# -- the source and the cluster ---------------------------------------------------------------


@dataclass
class SourceAndCluster:
    """The filled source beside a running cluster: ``sets`` by (side, round),
    ``source`` (host:port of the reference) and ``endpoint`` (host:port of the
    home region's regional endpoint)."""

    workdir: Path
    reference: ReferenceRegistry
    cluster: ClusterProcess
    sets: dict[tuple[str, int], list[SourceImage]]
    source: str
    endpoint: str

    def quiet_others(self, quiet_wait_s: float) -> procfs.OtherCpu:
        """Wait up to ``quiet_wait_s`` for other processes to go quiet; then
        the meter of the CPU they use from now on."""
        pids = self.cluster.all_pids() + [self.reference.pid]
        asyncio.run(procfs.wait_for_quiet(pids, quiet_wait_s))
        return procfs.OtherCpu(self.cluster.all_pids() + [self.reference.pid])


@contextmanager
def source_and_cluster(spec: specs.ClusterSpec, options: ImageSetOptions, sides: Sequence[str],
                       workdir: Path | None, prefix: str) -> Iterator[SourceAndCluster]:
    """Start the reference registry in ``workdir / "source"``, fill it for
    ``sides``, start the cluster in ``workdir / "cluster"`` (a temp dir named
    ``prefix…`` unless ``workdir``, removed afterwards); stop both on exit."""
    if shutil.which("skopeo") is None:
        raise RuntimeError("skopeo is not installed (Debian package skopeo)")
    keep = workdir is not None
    workdir = workdir or Path(tempfile.mkdtemp(prefix=prefix))
    reference = ReferenceRegistry(workdir / "source").start()
    cluster: ClusterProcess | None = None
    try:
        sets = asyncio.run(fill_source(reference.url, options, sides))
        cluster = ClusterProcess.start(on_any_ports(spec), workdir / "cluster")
        regional = next(e for e in cluster.plan.endpoints
                        if e.kind == "regional" and e.region == cluster.spec.home_region)
        yield SourceAndCluster(workdir, reference, cluster, sets,
                               source=reference.url.removeprefix("http://"),
                               endpoint=f"{cluster.plan.host}:{regional.port}")
    finally:
        if cluster is not None:
            cluster.stop()
        reference.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
