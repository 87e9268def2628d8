"""The image's three stages as directories: ``base`` (Debian), ``deps`` (wheels)
and ``app`` (georeg), see the package docstring.

``base`` and ``deps`` are cached under ``cache/<stage>-<key>``, the key a hash of
everything that makes the stage here: mmdebstrap's arguments, or the
requirements, the pinned versions and the wheel platform. What the key cannot
see is the Debian archive moving on (a point release, a security update): a
cached ``base`` keeps the packages of the day it was built until ``--refresh``
rebuilds it (``deps`` cannot drift: every version is pinned). A stage is built
in a temporary directory and renamed into place whole, so an interrupted build
leaves no half stage that a later one would trust.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

from .layout import Owner

SUITE = "bookworm"
MIRRORS = [
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
]
# Python, and libstdc++ which manylinux wheels (grpcio, rocksdict) link against
# without bundling. Unpacked, not installed: no dpkg, apt or shell is needed at
# run time, and no maintainer script runs.
PACKAGES = ["python3", "libstdc++6"]
PYTHON = "3.11"  # bookworm's python3, the ABI the wheels are chosen for
# Wheels that run on bookworm's glibc (2.36); pip takes the tags literally.
PLATFORMS = ["manylinux2014_x86_64", "linux_x86_64"] + [
    f"manylinux_2_{minor}_x86_64" for minor in range(17, 37)]
# Runtime requirements left out of the image: matplotlib (with numpy, pillow and
# fonttools, about 100 MB) only draws `georeg bench lag`'s chart.
LEFT_OUT = {"matplotlib"}

USER = Owner(10001, 10001, "georeg", "georeg")
DATA = "data"
DEPS = "opt/georeg/deps"
APP = "opt/georeg/app"
LAUNCHER = "usr/local/bin/georeg"
# Where a runtime mounts its own file systems: mmdebstrap's extract makes none.
MOUNT_POINTS = ["proc", "sys", "run"]

# What a container of a registry never reads: docs, manuals, translations,
# package lists and byte code (Python compiles in memory; the image is read-only).
STRIP = ["usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
         "usr/share/lintian", "usr/share/bug", "usr/share/doc-base", "usr/share/applications",
         "usr/share/pixmaps", "usr/share/polkit-1", "var/lib/apt/lists", "var/cache",
         "var/log", "etc/hostname", "etc/resolv.conf", "etc/cron.daily", "etc/logrotate.d",
         # iconv modules: Python has its own codecs.
         "usr/lib/x86_64-linux-gnu/gconv",
         f"usr/lib/python{PYTHON}/idlelib", f"usr/lib/python{PYTHON}/lib2to3",
         f"usr/lib/python{PYTHON}/pydoc_data", f"usr/lib/python{PYTHON}/ensurepip"]


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "georeg" / "image"


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _cached(cache: Path, stage: str, key: str, refresh: bool, build) -> Path:
    """``cache/<stage>-<key>``, made by ``build(tmpdir)`` unless it is there."""
    done = cache / f"{stage}-{key}"
    if done.is_dir() and not refresh:
        return done
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{stage}-", dir=cache))
    try:
        build(work / "root")
        if done.exists() and not refresh:
            return done  # another build made it meanwhile: the same inputs, keep theirs
        for record in cache.glob(f"{done.name}.layer-*"):  # layers packed from the old one
            record.unlink()
        if done.exists():
            shutil.rmtree(done)
        (work / "root").rename(done)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return done


def _strip(root: Path) -> None:
    for rel in STRIP:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for cache in sorted(root.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache)


def base(cache: Path, refresh: bool = False) -> Path:
    """Debian's Python and C libraries, the image's user and its ``/data``."""
    args = ["mmdebstrap", "--quiet", "--variant=extract", "--format=directory",
            f"--include={','.join(PACKAGES)}"]

    def build(root: Path) -> None:
        env = {**os.environ, "SOURCE_DATE_EPOCH": "0"}
        subprocess.run([*args, SUITE, str(root), *MIRRORS], check=True, env=env,
                       stdin=subprocess.DEVNULL)
        _strip(root)
        for dev in (root / "dev").iterdir():  # a runtime provides /dev
            dev.unlink() if not dev.is_dir() or dev.is_symlink() else shutil.rmtree(dev)
        (root / "etc" / "passwd").write_text(
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"{USER.user}:x:{USER.uid}:{USER.gid}:georeg:/{DATA}:/usr/sbin/nologin\n")
        (root / "etc" / "group").write_text(f"root:x:0:\n{USER.group}:x:{USER.gid}:\n")
        for name in [DATA, *MOUNT_POINTS]:
            (root / name).mkdir(exist_ok=True)

    return _cached(cache, "base", _key(args, MIRRORS, STRIP, MOUNT_POINTS, USER.uid), refresh,
                   build)


def requirements(project: Path) -> list[str]:
    """georeg's runtime requirements from ``pyproject.toml``, less ``LEFT_OUT``."""
    declared = tomllib.loads((project / "pyproject.toml").read_text())["project"]["dependencies"]
    return [req for req in declared
            if re.match(r"[A-Za-z0-9._-]+", req).group(0).lower() not in LEFT_OUT]


def pinned_versions() -> list[str]:
    """``name==version`` of every distribution in the running environment
    (georeg's own aside): the image gets the versions the tests ran against."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if name != "georeg":
            pins[name] = f"{name}=={dist.version}"
    return sorted(pins.values())


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet",
                    *args], check=True, stdin=subprocess.DEVNULL)


def deps(cache: Path, project: Path, refresh: bool = False) -> Path:
    """The runtime requirements' wheels for bookworm's CPython, unpacked."""
    reqs, pins = requirements(project), pinned_versions()
    platform = [f"--platform={tag}" for tag in PLATFORMS] + [
        f"--python-version={PYTHON}", "--implementation=cp", f"--abi=cp{PYTHON.replace('.', '')}",
        "--only-binary=:all:"]

    def build(root: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            constraints = Path(tmp, "constraints.txt")
            constraints.write_text("\n".join(pins) + "\n")
            _pip("install", "--no-compile", "--target", str(root / DEPS), *platform,
                 "--constraint", str(constraints), *reqs)
        shutil.rmtree(root / DEPS / "bin", ignore_errors=True)  # scripts with this host's paths
        _strip(root)

    return _cached(cache, "deps", _key(reqs, pins, platform), refresh, build)


def _source_files(project: Path) -> list[str]:
    """The checkout's files as git sees them (tracked, and new ones not ignored):
    never a stale ``build/`` or ``.venv`` leaking into the wheel."""
    out = subprocess.run(["git", "-C", str(project), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], check=True, capture_output=True).stdout
    return sorted(name for name in out.decode().split("\0")
                  if name and (project / name).is_file())


def app(project: Path, root: Path) -> None:
    """georeg itself under ``root``: a wheel of the checkout, unpacked, and the launcher."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "src")
        for name in _source_files(project):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(project / name, src / name)
        _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(Path(tmp, "wheel")),
             str(src))
        (wheel,) = Path(tmp, "wheel").glob("georeg-*.whl")
        # A pure wheel unpacked is importable as it is; pip would add a
        # direct_url.json naming this temporary directory.
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(root / APP)
    launcher = root / LAUNCHER
    launcher.parent.mkdir(parents=True)
    launcher.write_text(
        f"#!/usr/bin/python{PYTHON}\n"
        "import sys\n"
        f"sys.path[:0] = ['/{APP}', '/{DEPS}']\n"
        "from cluster.cli.main import main\n"
        "sys.exit(main())\n")
    launcher.chmod(0o755)
