"""Hosts on one machine: a network namespace per host, each with its own
address on a bridge, its own root file system and its own data
(docs/multihost.md). What the multi-host test runs a cluster on, and what a
user can run one on to see a cluster spread over hosts without machines.

``HostNetwork`` owns a bridge (``grb<pid>``) in this process's network
namespace, with the first address of a /24 of ``10.213.0.0/16`` (the control
process's address: links, endpoints and the management API listen there). Each
``NamespaceHost`` is a holder process (``unshare --net --mount``) whose
namespaces the host's nodes enter (``nsenter`` + ``chroot``):

- network: loopback and one end of a veth pair (the other end on the
  bridge, ``grv<pid>x<k>``), the host's address, no default route: a node
  reaches the bridge's subnet and nothing else, and this namespace does not
  forward, so no packet leaves the machine;
- mount: a root file system, read-only, of one of two kinds: ``BoundRoot``
  (the default: a tmpfs with this machine's ``/usr`` and ``/etc`` and the
  Python and georeg that run the control process bound at their own paths;
  built in a third of a second, nothing downloaded) or ``ImageRoot`` (georeg's
  OCI image unpacked, ``make image``: its Python, wheels and launcher, nodes
  running as the image's user); in both, a private ``/proc``, ``/tmp`` and
  minimal ``/dev``, and the host's own data directory, writable, at ``/data``
  (``data_mount``), which no other host sees.

The holder dies with the thread that made it (``setpriv --pdeathsig``), and
its mounts with its mount namespace once it and the host's nodes are gone;
``close`` kills every process left in the host's network namespace, and
``HostNetwork.close`` deletes the veths and the bridge. A bridge left by a
process that died without closing (SIGKILL) is deleted by the next
``HostNetwork`` (``sweep``): its name says whose it was.

Faults on a host: ``isolate`` (its veth down: nothing in or out, as a
machine whose network is cut) and ``heal``; ``kill`` (every process in the
host's namespaces, as a machine that loses power).

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and util-linux and iproute2;
``available`` says why not where they are missing.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from ..control.hosts import write_replacing
from ..image import rootfs as image_rootfs

SUBNETS = "10.213"            # /16 whose /24s the bridges take
PREFIX_LEN = 24
BRIDGE_PREFIX = "grb"
VETH_PREFIX = "grv"
READY = "georeg-host-ready"
DEVICES = ("null", "zero", "random", "urandom")
MAX_HOSTS = 250
COMMAND_TIMEOUT_S = 10.0
# In georeg's image: its launcher, its Python and its user.
IMAGE_LAUNCHER = f"/{image_rootfs.LAUNCHER}"
IMAGE_PYTHON = f"/usr/bin/python{image_rootfs.PYTHON}"
IMAGE_USER = (image_rootfs.USER.uid, image_rootfs.USER.gid)


def available() -> str:
    """Why namespaces cannot be made here ("" if they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, a bridge, mounts)"
    for program, package in (("ip", "iproute2"), ("unshare", "util-linux"),
                             ("nsenter", "util-linux"), ("setpriv", "util-linux"),
                             ("chroot", "coreutils")):
        if shutil.which(program) is None:
            return f"{program} is missing (Debian package {package})"
    try:
        _run(["unshare", "--net", "--mount", "true"])
    except subprocess.CalledProcessError as exc:
        return f"unshare --net --mount failed: {exc.stderr.strip() or exc}"
    return ""


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S).stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep() -> list[str]:
    """Delete the bridges (and their veths) of processes that are gone."""
    gone = []
    for line in _run(["ip", "-o", "link", "show"]).splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        for prefix in (BRIDGE_PREFIX, VETH_PREFIX):
            owner = name.removeprefix(prefix).split("x")[0]
            if name.startswith(prefix) and owner.isdigit() and not _alive(int(owner)):
                with contextlib.suppress(subprocess.CalledProcessError):
                    _run(["ip", "link", "del", name])
                gone.append(name)
    return gone


def _subnets_in_use() -> set[int]:
    used = set()
    for line in _run(["ip", "-4", "-o", "addr", "show"]).splitlines():
        for word in line.split():
            if word.startswith(SUBNETS + "."):
                used.add(int(word.split(".")[2]))
    return used


class HostNetwork:
    """A bridge and the hosts on it; ``close`` undoes all of it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.hosts: list[NamespaceHost] = []
        self.bridge = f"{BRIDGE_PREFIX}{os.getpid()}"
        sweep()
        used = _subnets_in_use()
        free = [n for n in range(1, 255) if n not in used]
        if not free:
            raise RuntimeError(f"no free /24 in {SUBNETS}.0.0/16 for a host network")
        # A run's own subnet, from its pid where free: two runs at once differ.
        self.subnet = next((n for n in free if n >= os.getpid() % 254 + 1), free[0])
        self.address = self.host_address(1)
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        try:
            _run(["ip", "addr", "add", f"{self.address}/{PREFIX_LEN}", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
        except BaseException:
            self.close()
            raise

    def host_address(self, k: int) -> str:
        return f"{SUBNETS}.{self.subnet}.{k}"

    def add_host(self, name: str, root_fs: BoundRoot | ImageRoot | None = None) -> NamespaceHost:
        """A new host on the bridge, with the next address (root file system:
        ``BoundRoot`` unless given)."""
        if len(self.hosts) >= MAX_HOSTS:
            raise RuntimeError(f"at most {MAX_HOSTS} hosts on one bridge")
        k = len(self.hosts) + 2
        host = NamespaceHost(name, self.host_address(k), self.workdir / "hosts" / name,
                             veth=f"{VETH_PREFIX}{os.getpid()}x{k}", bridge=self.bridge,
                             root_fs=root_fs)
        self.hosts.append(host)
        host.start()
        return host

    def close(self) -> None:
        """Every host's processes killed, their veths and the bridge deleted."""
        for host in self.hosts:
            host.close()
        with contextlib.suppress(subprocess.CalledProcessError):
            _run(["ip", "link", "del", self.bridge])

    def __enter__(self) -> HostNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BoundRoot:
    """A root of this machine's ``/usr`` and ``/etc`` and the Python and georeg
    that run here (outside ``/usr``: the venv, the interpreter it was made
    from, the checkout), bound read-only at their own paths on a small tmpfs."""

    user: tuple[int, int] | None = None     # nodes run as root, as this process

    def mounts(self, root: str) -> list[str]:
        lines = [f"mount -t tmpfs -o mode=755,size=16m georeg-host {root}", f"cd {root}",
                 "mkdir -p usr etc proc dev tmp data"]
        for entry in sorted(Path("/").iterdir()):     # merged /usr: bin -> usr/bin, …
            if entry.is_symlink():
                lines.append(f"ln -s {shlex.quote(os.readlink(entry))} {entry.name}")
        for source in ("/usr", "/etc", *self._python_paths()):
            target = f"{root}{shlex.quote(source)}"
            lines += [f"mkdir -p {target}", f"mount --bind -o ro {shlex.quote(source)} {target}"]
        return lines

    def command(self, argv: list[str]) -> list[str]:
        return argv

    @staticmethod
    def _python_paths() -> list[str]:
        """The interpreter, environment and georeg that run here, outside /usr."""
        project = Path(__file__).resolve().parents[2]
        paths = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), project}
        paths = {p for p in paths if not p.is_relative_to("/usr")}
        # Nested ones come with their parent's bind.
        return sorted(str(p) for p in paths
                      if not any(p != q and p.is_relative_to(q) for q in paths))


class ImageRoot:
    """georeg's OCI image unpacked at ``directory`` (``cluster.image.layout.unpack``),
    bound read-only; commands for this process's Python run the image's
    (``georeg`` for ``python -m cluster.cli``), as the image's user."""

    def __init__(self, directory: Path, user: tuple[int, int] = IMAGE_USER) -> None:
        self.directory = directory
        self.user = user

    def mounts(self, root: str) -> list[str]:
        return [f"mount --bind -o ro {shlex.quote(str(self.directory))} {root}"]

    def command(self, argv: list[str]) -> list[str]:
        if argv[:3] == [sys.executable, "-m", "cluster.cli"]:
            return [IMAGE_LAUNCHER, *argv[3:]]
        if argv[:1] == [sys.executable]:
            return [IMAGE_PYTHON, *argv[1:]]
        return argv


class NamespaceHost:
    """One host: its namespaces, address, root file system and data (a ``NodeHost``)."""

    data_mount = Path("/data")

    def __init__(self, name: str, address: str, directory: Path, *, veth: str,
                 bridge: str, root_fs: BoundRoot | ImageRoot | None = None) -> None:
        self.root_fs = root_fs or BoundRoot()
        self.name = name
        self.address = address
        self.directory = directory
        self.root = directory / "root"          # the mount point of its root file system
        self.data = directory / "data"          # what it sees at /data
        self.veth = veth
        self.bridge = bridge
        self.holder: subprocess.Popen | None = None

    # -- NodeHost ----------------------------------------------------------------------

    def command(self, argv: list[str]) -> list[str]:
        assert self.holder is not None, f"host {self.name} is not started"
        user = self.root_fs.user
        userspec = [f"--userspec={user[0]}:{user[1]}"] if user else []
        return ["nsenter", f"--target={self.holder.pid}", "--net", "--mount", "--",
                "chroot", *userspec, str(self.root), *self.root_fs.command(argv)]

    def put(self, path: Path, data: bytes) -> None:
        local = self.local(path)
        write_replacing(local, data)
        self._own(local)

    def _own(self, path: Path) -> None:
        """``path`` and the directories up to ``/data`` owned by the nodes' user."""
        user = self.root_fs.user
        while user is not None and path.is_relative_to(self.data):
            os.chown(path, *user)
            path = path.parent

    def remove(self, path: Path) -> None:
        shutil.rmtree(self.local(path), ignore_errors=True)

    def local(self, path: Path) -> Path:
        """Where ``path`` on this host (under its ``/data``) is on this machine."""
        try:
            return self.data / path.relative_to(self.data_mount)
        except ValueError:
            raise ValueError(f"{path} is not under {self.data_mount}, the only directory of "
                             f"host {self.name} that outlives its processes (set "
                             f"network.host_data_dir = \"{self.data_mount}\")") from None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        self._own(self.data)
        self.holder = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "unshare", "--net", "--mount",
             "sh", "-c", self._script()],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, start_new_session=True)
        line = self.holder.stdout.readline().decode().strip()
        if line != READY:
            self.holder.kill()
            err = self.holder.stderr.read().decode()[-2000:]
            self.holder.wait()
            raise RuntimeError(f"host {self.name} did not start: {line} {err}")
        try:
            _run(["ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0",
                  "netns", str(self.holder.pid)])
            _run(["ip", "link", "set", self.veth, "master", self.bridge, "up"])
            inside = ["nsenter", f"--target={self.holder.pid}", "--net", "ip"]
            _run([*inside, "addr", "add", f"{self.address}/{PREFIX_LEN}", "dev", "eth0"])
            _run([*inside, "link", "set", "eth0", "up"])
        except BaseException:
            self.close()
            raise

    def _script(self) -> str:
        """The holder's: loopback up, the root file system mounted, then wait."""
        root = shlex.quote(str(self.root))
        lines = ["set -e", "ip link set lo up", *self.root_fs.mounts(root),
                 f"mount -t proc proc {root}/proc",
                  f"mount -t tmpfs -o mode=1777,size=64m tmp {root}/tmp",
                  f"mount -t tmpfs -o mode=755,size=64k dev {root}/dev"]
        for device in DEVICES:
            lines += [f"touch {root}/dev/{device}", f"mount --bind /dev/{device} {root}/dev/{device}"]
        lines += [f"mount --bind {shlex.quote(str(self.data))} {root}{self.data_mount}",
                  f"echo {READY}", "exec sleep infinity"]
        return "\n".join(lines)

    def processes(self) -> list[int]:
        """Every process in this host's network namespace but the holder."""
        if self.holder is None or self.holder.poll() is not None:
            return []
        try:
            ns = os.stat(f"/proc/{self.holder.pid}/ns/net")
            mine = (ns.st_dev, ns.st_ino)
        except FileNotFoundError:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.holder.pid:
                continue
            with contextlib.suppress(OSError):
                other = os.stat(entry / "ns" / "net")
                if (other.st_dev, other.st_ino) == mine:
                    found.append(int(entry.name))
        return found

    # -- faults ------------------------------------------------------------------------

    def isolate(self) -> None:
        """Its network cut: its veth down (nothing in or out)."""
        _run(["ip", "link", "set", self.veth, "down"])

    def heal(self) -> None:
        _run(["ip", "link", "set", self.veth, "up"])

    def kill(self) -> list[int]:
        """Every process on it killed at once (SIGKILL), as a machine losing power."""
        pids = self.processes()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def close(self) -> None:
        self.kill()
        if self.holder is not None:
            with contextlib.suppress(ProcessLookupError):
                self.holder.kill()
            self.holder.wait(timeout=COMMAND_TIMEOUT_S)
            for stream in (self.holder.stdout, self.holder.stderr):
                if stream is not None:
                    stream.close()
        with contextlib.suppress(subprocess.CalledProcessError):
            _run(["ip", "link", "del", self.veth])
