"""The image's three stages as directories: ``base`` (Debian), ``deps`` (wheels)
and ``app`` (georeg), see the package docstring.

``base`` and ``deps`` are cached under ``cache/<stage>-<key>``, the key a hash of
everything that makes the stage here: mmdebstrap's arguments; for ``deps``
either the RECORDs of the build environment's installed wheels (copied when it
is the image's CPython and their tags run on bookworm, ``venv_wheels``), or the
requirements, the pinned versions and the wheel platform given to pip; and the
Python that compiles the byte code. What the key cannot see is the Debian
archive moving on (a point release, a security update): a cached ``base`` keeps
the packages of the day it was built until ``--refresh`` rebuilds it; nor, on
the pip path, the host's pip configuration (an index or ``find-links`` that
offers another file for a pinned version). A stage is built
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

from packaging.requirements import Requirement
from packaging.tags import parse_tag

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
# No linux_x86_64: PyPI refuses it, so it would only match a wheel built on some host.
PLATFORMS = ["manylinux2014_x86_64"] + [
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
# package lists and Debian's byte code (``compile_bytecode`` compiles the wheels and georeg).
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
    return [req for req in declared if _name(Requirement(req).name) not in LEFT_OUT]


def _name(name: str) -> str:
    """A distribution's name as PEP 503 normalises it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions() -> list[str]:
    """``name==version`` of every distribution in the running environment
    (georeg's own aside): the image gets the versions the tests ran against."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = _name(dist.metadata["Name"])
        if name != "georeg":
            pins[name] = f"{name}=={dist.version}"
    return sorted(pins.values())


def _same_python() -> bool:
    """Whether this is CPython ``PYTHON``, the image's: its wheels and byte code fit it."""
    return (sys.implementation.name, f"{sys.version_info[0]}.{sys.version_info[1]}") == (
        "cpython", PYTHON)


# How ``compile_bytecode`` compiles (part of the ``deps`` key).
PYC = "compileall unchecked-hash, PYTHONHASHSEED=0"


def compile_bytecode(root: Path, rel: str) -> None:
    """Byte code for the modules under ``root/rel``, named as at ``/rel`` in the
    image, when this Python is the image's (``_same_python``): unchecked-hash pycs
    (PEP 552) hold no mtime and are never checked against their source, and the
    read-only image's user imports without compiling every module at each start.
    A fresh interpreter with a fixed hash seed compiles them: marshal's output
    follows set order (string hashes) and objects' reference counts, i.e. what
    the compiling process imported before."""
    if _same_python():
        subprocess.run([sys.executable, "-s", "-m", "compileall", "-q", "-j", "1",
                        "--invalidation-mode", "unchecked-hash", "-d", f"/{rel}", str(root / rel)],
                       check=True, stdin=subprocess.DEVNULL,
                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                            "PYTHONHASHSEED": "0"})


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet",
                    *args], check=True, stdin=subprocess.DEVNULL)


# manylinux_2_N runs on glibc 2.N and later: bookworm's is 2.36.
GLIBC = (2, 36)
_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
# What pip writes at install time, not what the wheel holds.
_INSTALL_RECORDS = {"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"}


def _fits_image(tag: str) -> bool:
    """Whether a wheel tag (``cp311-cp311-manylinux_2_17_x86_64``) runs on bookworm's
    CPython 3.11 on x86_64."""
    for one in parse_tag(tag):
        if one.interpreter not in {"py3", f"cp{PYTHON.replace('.', '')}"} and not (
                one.abi == "abi3" and one.interpreter.startswith("cp3")):
            return False
        if one.platform == "any":
            continue
        glibc = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", one.platform)
        legacy = re.fullmatch(r"(manylinux\d+)_x86_64", one.platform)
        needs = ((int(glibc[1]), int(glibc[2])) if glibc
                 else _LEGACY_MANYLINUX.get(legacy[1]) if legacy else None)
        if needs is None or needs > GLIBC:
            return False
    return True


def _closure(reqs: list[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions ``reqs`` need, transitively (markers evaluated
    here, extras followed), by name; ``LookupError`` when one is not installed."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [(Requirement(req), "") for req in reqs]
    for _ in range(10_000):  # bounded: a dependency graph, each name visited once
        if not todo:
            return [found[name] for name in sorted(found)]
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        name = _name(req.name)
        try:
            dist = found.get(name) or importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError as e:
            raise LookupError(f"{req.name} is not installed") from e
        new = name not in found
        found[name] = dist
        for wanted in ([""] if new else []) + sorted(req.extras):
            todo.extend((Requirement(r), wanted) for r in dist.requires or [])
    raise LookupError("requirements closure did not converge")


def venv_wheels(project: Path) -> list[importlib.metadata.Distribution] | None:
    """The running environment's installed distributions that the image needs,
    when they can be copied into it as they are: this Python is CPython
    ``PYTHON`` and every wheel's tags run on bookworm (``_fits_image``); else None."""
    if not _same_python():
        return None
    try:
        dists = _closure(requirements(project))
    except LookupError:
        return None
    for dist in dists:
        wheel = dist.read_text("WHEEL") or ""
        tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines()
                if line.startswith("Tag:")]
        if not tags or not all(_fits_image(tag) for tag in tags) or not dist.files:
            return None
    return dists


def _installed_files(dist: importlib.metadata.Distribution) -> list[str]:
    """What ``dist``'s RECORD lists that a wheel holds: no byte code, scripts
    (``../../bin``) or pip's own install records."""
    return sorted(str(f) for f in dist.files
                  if not str(f).startswith("..") and "__pycache__" not in f.parts
                  and not (f.parts[0].endswith(".dist-info") and f.name in _INSTALL_RECORDS))


def deps(cache: Path, project: Path, refresh: bool = False) -> tuple[Path, str]:
    """The runtime requirements for bookworm's CPython, unpacked, and how they
    were got: copied from this environment (``venv_wheels``), else fetched by pip."""
    reqs = requirements(project)
    dists = venv_wheels(project)
    if dists is not None:
        contents = [(dist.metadata["Name"], dist.version, dist.read_text("RECORD"))
                    for dist in dists]

        def copy(root: Path) -> None:
            for dist in dists:
                for rel in _installed_files(dist):
                    target = root / DEPS / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(dist.locate_file(rel), target)
            compile_bytecode(root, DEPS)

        names = " ".join(f"{name}=={version}" for name, version, _ in contents)
        key = _key("venv", reqs, contents, PYC, sys.version)
        return (_cached(cache, "deps", key, refresh, copy),
                f"wheels installed in the build environment: {names}")

    pins = pinned_versions()
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
        compile_bytecode(root, DEPS)

    key = _key(reqs, pins, platform, PYC, sys.version)
    return _cached(cache, "deps", key, refresh, build), "pip: " + " ".join(reqs)


def git(project: Path, *args: str) -> str:
    """``git -C project args…``'s output, stripped."""
    return subprocess.run(["git", "-C", str(project), *args], check=True, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL).stdout.strip()


def _source_files(project: Path) -> list[str]:
    """The checkout's files as git sees them (tracked, and new ones not ignored):
    never a stale ``build/`` or ``.venv`` leaking into the wheel."""
    out = git(project, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    return sorted(name for name in out.split("\0") if name and (project / name).is_file())


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
    compile_bytecode(root, APP)
    launcher = root / LAUNCHER
    launcher.parent.mkdir(parents=True)
    launcher.write_text(
        f"#!/usr/bin/python{PYTHON}\n"
        "import sys\n"
        f"sys.path[:0] = ['/{APP}', '/{DEPS}']\n"
        "from cluster.cli.main import main\n"
        "sys.exit(main())\n")
    launcher.chmod(0o755)
