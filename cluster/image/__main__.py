"""``python -m cluster.image``: build georeg's OCI image layout (``make image``)
and optionally push it with skopeo; prints how long it took and how big it is."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from . import layout, rootfs

PORT = 5000
TITLE = "georeg"


def source_date_epoch(project: Path) -> int:
    """``SOURCE_DATE_EPOCH`` when set, else the checkout's last commit time."""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    out = subprocess.run(["git", "-C", str(project), "log", "-1", "--format=%ct"],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


def revision(project: Path) -> str:
    """The commit built, marked ``-dirty`` when the checkout differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(project), *args], check=True,
                              capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "HEAD")
    return f"{head}-dirty" if git("status", "--porcelain") else head


def image_spec(project: Path) -> layout.ImageSpec:
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    return layout.ImageSpec(
        entrypoint=[f"/{rootfs.LAUNCHER}", "node"],
        cmd=["--data-dir", f"/{rootfs.DATA}", "--listen", f"0.0.0.0:{PORT}"],
        user=f"{rootfs.USER.uid}:{rootfs.USER.gid}",
        env=["PATH=/usr/local/bin:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE=1",
             "PYTHONUNBUFFERED=1"],
        exposed_ports=[f"{PORT}/tcp"],
        volumes=[f"/{rootfs.DATA}"],
        working_dir=f"/{rootfs.DATA}",
        annotations={
            "org.opencontainers.image.title": TITLE,
            "org.opencontainers.image.description": meta["description"],
            "org.opencontainers.image.version": meta["version"],
            "org.opencontainers.image.revision": revision(project),
            "org.opencontainers.image.licenses": meta["license"]["text"],
        })


# The cached stages' layers clamp every mtime to the epoch itself: their content is
# keyed by what made them, not by a commit, so one commit's image shares them with
# the next one's (registries store and clients pull them once).
STAGE_EPOCH = 0


def layers(project: Path, cache: Path, app: Path, blobs: Path, epoch: int,
           refresh: bool = False) -> list[layout.Layer]:
    """The image's three layers, their blobs in ``blobs``: the cached stages'
    (packed once, see ``layout.cached_layer``) and georeg's, packed now."""
    owners = {rootfs.DATA: rootfs.USER}
    store = cache / "blobs"
    cached = [
        layout.cached_layer(rootfs.base(cache, refresh), store, STAGE_EPOCH,
                            f"mmdebstrap --variant=extract {rootfs.SUITE}: "
                            f"{' '.join(rootfs.PACKAGES)}", owners),
        layout.cached_layer(rootfs.deps(cache, project, refresh), store, STAGE_EPOCH,
                            "pip: " + " ".join(rootfs.requirements(project)), owners),
    ]
    for layer in cached:
        layout.link_blob(store, blobs, layer.digest)
    return [*cached, layout.pack_layer(app, blobs, epoch, f"georeg {revision(project)}", owners)]


def assemble(project: Path, app: Path, out: Path, cache: Path, tag: str,
             refresh: bool = False) -> tuple[str, list[layout.Layer]]:
    """The image of the checkout at ``project``, georeg's stage already made in
    ``app`` (``rootfs.app``), as layout ``out``; its manifest digest and layers."""
    if out.exists():
        shutil.rmtree(out)
    epoch = source_date_epoch(project)
    image_layers = layers(project, cache, app, out / "blobs" / "sha256", epoch, refresh)
    return layout.write_layout(out, image_layers, image_spec(project), epoch, tag), image_layers


def build(project: Path, out: Path, cache: Path, tag: str,
          refresh: bool = False) -> tuple[str, list[layout.Layer]]:
    """``assemble`` with georeg's stage made from the checkout, in a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        app = Path(tmp, "app")
        rootfs.app(project, app)
        return assemble(project, app, out, cache, tag, refresh)


def push(out: Path, tag: str, dest: str, flags: list[str]) -> None:
    ref = dest if "://" in dest else f"docker://{dest}"
    subprocess.run(["skopeo", "copy", "--quiet", *flags, f"oci:{out}:{tag}", ref], check=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.image", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("build/image"),
                        help="the OCI image layout to write (default: build/image)")
    parser.add_argument("--tag", default="latest", help="the tag inside the layout")
    parser.add_argument("--cache", type=Path, default=rootfs.default_cache(),
                        help="where the Debian and wheel stages are kept between builds")
    parser.add_argument("--refresh", action="store_true",
                        help="rebuild the cached stages (e.g. for Debian's security updates)")
    parser.add_argument("--push", metavar="HOST/REPO:TAG",
                        help="then copy the image there with skopeo")
    parser.add_argument("--push-flags", default="",
                        help="extra skopeo copy flags, e.g. '--dest-tls-verify=false'")
    args = parser.parse_args(argv)
    project = Path(__file__).resolve().parents[2]
    started = time.monotonic()
    digest, image_layers = build(project, args.out, args.cache, args.tag, args.refresh)
    took = time.monotonic() - started
    print(f"image {args.out} ({args.tag}): {digest}")
    print(f"built in {took:.1f} s; {len(image_layers)} layers, "
          f"{_mb(sum(layer.size for layer in image_layers))} compressed "
          f"({', '.join(_mb(layer.size) for layer in image_layers)}), "
          f"{_mb(sum(layer.uncompressed for layer in image_layers))} unpacked")
    if args.push:
        started = time.monotonic()
        push(args.out, args.tag, args.push, shlex.split(args.push_flags))
        print(f"pushed to {args.push} in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
