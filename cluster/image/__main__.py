"""``python -m cluster.image``: build georeg's OCI image layout (``make image``)
and optionally push it with skopeo; prints how long it took and how big it is."""

from __future__ import annotations

import argparse
import os
import platform
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


class BuildError(Exception):
    """A build that cannot go on, with the message for its user."""


# Debian's names for the machines whose Debian stage and wheels the image can hold;
# mmdebstrap builds the host's architecture, and the wheel tags are x86_64's.
ARCHITECTURES = {"x86_64": "amd64"}


def architecture() -> str:
    machine = platform.machine()
    if machine not in ARCHITECTURES:
        raise BuildError(f"make image builds on x86_64 (amd64) only, not on {machine}: "
                         "the wheel tags and the config's architecture are amd64's")
    return ARCHITECTURES[machine]


def source_date_epoch(project: Path) -> int:
    """``SOURCE_DATE_EPOCH`` when set, else the checkout's last commit time."""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    return int(rootfs.git(project, "log", "-1", "--format=%ct"))


def revision(project: Path) -> str:
    """The commit built, marked ``-dirty`` when the checkout differs from it."""
    head = rootfs.git(project, "rev-parse", "HEAD")
    return f"{head}-dirty" if rootfs.git(project, "status", "--porcelain") else head


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
        architecture=architecture(),
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
    deps, got = rootfs.deps(cache, project, refresh)
    cached = [
        layout.cached_layer(rootfs.base(cache, refresh), store, STAGE_EPOCH,
                            f"mmdebstrap --variant=extract {rootfs.SUITE}: "
                            f"{' '.join(rootfs.PACKAGES)}", owners),
        layout.cached_layer(deps, store, STAGE_EPOCH, got, owners),
    ]
    for layer in cached:
        layout.link_blob(store, blobs, layer.digest)
    return [*cached, layout.pack_layer(app, blobs, epoch, f"georeg {revision(project)}", owners)]


def assemble(project: Path, app: Path, out: Path, cache: Path, tag: str,
             refresh: bool = False) -> tuple[str, list[layout.Layer]]:
    """The image of the checkout at ``project``, georeg's stage already made in
    ``app`` (``rootfs.app``), as layout ``out``; its manifest digest and layers."""
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        epoch = source_date_epoch(project)
        image_layers = layers(project, cache, app, partial / "blobs" / "sha256", epoch, refresh)
        digest = layout.write_layout(partial, image_layers, image_spec(project), epoch, tag)
        (partial / MARKER).write_text("an OCI image layout written by `make image`; "
                                      "the next build replaces this directory\n")
        partial.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return digest, image_layers


# Marks a layout this module wrote. Besides one, ``--out`` replaces only an empty
# directory or a bare OCI layout (one written before the marker was).
MARKER = ".georeg-image"
LAYOUT_ONLY = {"oci-layout", "index.json", "blobs"}


def _check_replaceable(out: Path) -> None:
    """Refuse an ``out`` that exists and is neither empty nor a layout made here."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BuildError(f"--out {out} is not a directory: refusing to replace it")
    if not out.is_dir() or (out / MARKER).is_file():
        return
    names = {path.name for path in out.iterdir()}
    if names and not ("oci-layout" in names and names <= LAYOUT_ONLY):
        raise BuildError(f"--out {out} is neither empty nor an OCI image layout (it holds "
                         f"more than {', '.join(sorted(LAYOUT_ONLY))}, and no {MARKER}): "
                         "refusing to delete it; choose an empty or new directory")


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


# The programs a build runs, with the Debian package of each.
PROGRAMS = {"git": "git", "mmdebstrap": "mmdebstrap"}
PUSH_PROGRAMS = {"skopeo": "skopeo"}


def _check_programs(programs: dict[str, str]) -> None:
    for name, package in programs.items():
        if not shutil.which(name):
            raise BuildError(f"{name} is not installed (Debian package {package}; "
                             "`make install` installs it)")


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
    try:
        return _run(args)
    except BuildError as e:
        print(f"make image: {e}", file=sys.stderr)
    except subprocess.CalledProcessError as e:
        cmd = e.cmd if isinstance(e.cmd, list) else shlex.split(str(e.cmd))
        step = " ".join(str(part) for part in cmd[:4] if part != "--quiet")
        detail = (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes)
                  else e.stderr or "").strip()[-2000:]
        print(f"make image: {step} failed (exit {e.returncode})" + (f":\n{detail}" if detail
                                                                     else ""), file=sys.stderr)
    return 1


def _run(args: argparse.Namespace) -> int:
    _check_programs({**PROGRAMS, **(PUSH_PROGRAMS if args.push else {})})
    architecture()
    _check_replaceable(args.out)  # before the build's minutes, and again when it ends
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
