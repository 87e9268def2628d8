"""Hosts on one machine: a network namespace per host, each with its own
address on a bridge, its own root file system, its own user and its own data
(docs/multihost.md). What the multi-host test runs a cluster on, and what a
user can run one on to see a cluster spread over hosts without machines.

``HostNetwork`` owns a bridge (``grb<pid>``) in this process's network
namespace, with the first address of a /24 of ``10.213.0.0/16`` (the control
process's address: links, endpoints and the management API listen there),
chosen under a lock (``LOCK_FILE``) among those no address or route of this
machine covers. Each ``NamespaceHost`` is a holder process (``unshare --net
--mount``) whose namespaces the host's nodes enter (``nsenter`` + ``chroot`` + ``AS_USER``):

- network: loopback and one end of a veth pair (the other end on the
  bridge, ``grv<pid>x<k>``), the host's address, no default route (no
  packet leaves the bridge, whatever this machine forwards), and iptables
  rules in the host's namespace by which eth0 carries packets to and from
  the control address only: hosts never talk to each other, so every byte
  between two hosts crosses a link; ``HostNetwork.confine`` narrows what a
  host may dial there to the cluster's links (not the endpoints, the
  management API or another service of this machine on every address);
- mount: a root file system, read-only, of one of two kinds: ``BoundRoot``
  (the default: a tmpfs with this machine's ``/usr`` and ``/etc`` and the
  Python and georeg packages that run the control process bound at their
  own paths, never the whole checkout; built in a third of a second,
  nothing downloaded) or ``ImageRoot`` (georeg's OCI image unpacked, ``make
  image``: its Python, wheels and launcher); in both, ``/proc``, ``/tmp``
  and a minimal ``/dev``, and the host's own data directory, writable, at
  ``/data`` (``data_mount``);
- user: nodes run as a uid and gid of the host's own (``HOST_UIDS``), which
  owns what is put on the host. ``/proc`` shows every process of this
  machine (there is no PID namespace: a node must be the supervisor's child
  for its signals), but ``/proc/<pid>/root`` of a process of another user
  (the control process, another host's holder or nodes) is closed to it, so
  no other host's ``/data`` nor the control data dir is reachable.

The holder dies with the thread that made it (``setpriv --pdeathsig``: make
hosts from a thread that outlives them), a node with the thread that started
it (the supervisor's guard, asked again by ``AS_USER`` after the user
change, which clears it), and the mounts with the mount namespace once the holder
and the host's nodes are gone; ``close`` kills every process left in the
host's network namespace, and ``HostNetwork.close`` deletes the veths and
the bridge. A bridge left by a process that died without closing (SIGKILL)
is deleted by the next ``HostNetwork`` (``sweep``): its name says whose it was.

Faults on a host: ``isolate`` (its veth down: nothing in or out, as a
machine whose network is cut) and ``heal``; ``kill`` (every process in the
host's namespaces, as a machine that loses power).

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), util-linux, iproute2 and iptables;
``available`` says why not where they are missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import ipaddress
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from ..control.hosts import write_replacing
from ..control.supervisor import NODE_PACKAGES
from ..image import rootfs as image_rootfs

SUBNETS = "10.213"            # /16 whose /24s the bridges take
PREFIX_LEN = 24
BRIDGE_PREFIX = "grb"
VETH_PREFIX = "grv"
READY = "georeg-host-ready"
DEVICES = ("null", "zero", "random", "urandom")
MAX_HOSTS = 250
# Held while a run sweeps, picks its /24 and puts it on its bridge: two runs
# at once never take the same one.
LOCK_FILE = Path("/run/georeg-hostnet.lock")
# Nodes on host k of subnet n run as uid and gid HOST_UIDS + 256 n + k, a user
# no other host (of this run or another) and no process of this machine has:
# /proc/<pid>/root of a process of another user (the control process, another
# host's holder or nodes) is closed to them, as another machine's files would be.
HOST_UIDS = 1_500_000_000
# Run by the root file system's Python, as root, before a command on a host:
# takes the host's user (argv 1, 2) and asks again for the signal on the
# parent's death that was asked for before (the kernel clears it on a change
# of user: the supervisor's guard would be lost), then runs the command (argv
# 3…). Python, which both roots have (georeg's image has no setpriv).
AS_USER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
asked, parent = ctypes.c_int(0), os.getppid()
libc.prctl(2, ctypes.byref(asked))          # PR_GET_PDEATHSIG
os.setgroups([])
os.setgid(int(sys.argv[2]))
os.setuid(int(sys.argv[1]))
if asked.value:
    libc.prctl(1, asked.value)              # PR_SET_PDEATHSIG
    if os.getppid() != parent:              # it died meanwhile
        sys.exit(128 + asked.value)
os.execvp(sys.argv[3], sys.argv[3:])
"""
COMMAND_TIMEOUT_S = 10.0
# In georeg's image: its launcher and its Python.
IMAGE_LAUNCHER = f"/{image_rootfs.LAUNCHER}"
IMAGE_PYTHON = f"/usr/bin/python{image_rootfs.PYTHON}"


def available() -> str:
    """Why namespaces cannot be made here ("" if they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, a bridge, mounts)"
    for program, package in (("ip", "iproute2"), ("unshare", "util-linux"),
                             ("nsenter", "util-linux"), ("setpriv", "util-linux"),
                             ("chroot", "coreutils"), ("iptables", "iptables")):
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
    """The /24s of ``SUBNETS`` that an address or a route of this machine
    covers (a route to all of 10.213.0.0/16, e.g. a VPN's, covers them all)."""
    ours = ipaddress.ip_network(f"{SUBNETS}.0.0/16")
    networks = []
    for line in _run(["ip", "-4", "-o", "addr", "show"]).splitlines():
        words = line.split()
        if "inet" in words:
            networks.append(ipaddress.ip_interface(words[words.index("inet") + 1]).network)
    for line in _run(["ip", "-4", "route", "show", "table", "all"]).splitlines():
        with contextlib.suppress(ValueError, IndexError):
            first = line.split()[0]
            if first not in ("default", "local", "broadcast", "unreachable", "prohibit",
                             "blackhole", "multicast"):
                networks.append(ipaddress.ip_network(first, strict=False))
    used = set()
    for network in networks:
        if network.overlaps(ours):
            used |= {n for n in range(1, 255)
                     if network.overlaps(ipaddress.ip_network(f"{SUBNETS}.{n}.0/24"))}
    return used


CHAIN = "GEOREG-CONTROL"      # a host's: what it may dial on the control address


def _runs(ports: list[int]) -> list[tuple[int, int]]:
    """Sorted ports as (first, last) of each run of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for port in ports:
        if runs and port == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], port)
        else:
            runs.append((port, port))
    return runs


class HostNetwork:
    """A bridge and the hosts on it; ``close`` undoes all of it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.hosts: list[NamespaceHost] = []
        self.bridge = f"{BRIDGE_PREFIX}{os.getpid()}"
        self.ports: list[int] | None = None        # confine's: None, every port
        with open(LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)        # released when closed
            sweep()
            used = _subnets_in_use()
            free = [n for n in range(1, 255) if n not in used]
            if not free:
                raise RuntimeError(f"no free /24 in {SUBNETS}.0.0/16 for a host network (every "
                                   f"one has an address or a route on this machine)")
            # A run's own subnet, from its pid where free.
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
        uid = HOST_UIDS + 256 * self.subnet + k
        host = NamespaceHost(name, self.host_address(k), self.workdir / "hosts" / name,
                             veth=f"{VETH_PREFIX}{os.getpid()}x{k}", bridge=self.bridge,
                             control=self.address, user=(uid, uid), root_fs=root_fs)
        self.hosts.append(host)
        host.start()
        if self.ports is not None:
            host.confine(self.ports)
        return host

    def confine(self, ports: list[int]) -> None:
        """From now on, a host opens connections to the control address on
        ``ports`` only (a cluster's links, ``ClusterPlan.host_ports``): not to
        the endpoints, the management API or any other service of this
        machine that listens on every address. Connections open already
        (and answers to the control process's) go on."""
        self.ports = sorted(set(ports))
        for host in self.hosts:
            host.confine(self.ports)

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
    from, georeg's package directories, nothing else of the checkout), bound
    read-only at their own paths on a small tmpfs."""

    python = sys.executable

    def exposes(self, path: Path) -> bool:
        """Whether a process on the host sees this machine's ``path``."""
        path = path.resolve()
        return any(path.is_relative_to(source) for source in ("/usr", "/etc", *self._python_paths()))

    def mounts(self, root: str) -> list[str]:
        lines = [f"mount -t tmpfs -o mode=755,size=16m georeg-host {root}", f"cd {root}",
                 "mkdir -p usr etc proc dev tmp data"]
        for entry in sorted(Path("/").iterdir()):     # merged /usr: bin -> usr/bin, …
            if entry.is_symlink():
                lines.append(f"ln -s {shlex.quote(os.readlink(entry))} {entry.name}")
        return lines

    def binds(self, root: str) -> list[str]:
        """This machine's paths bound on the root: made once the host's own
        ``/proc``, ``/tmp``, ``/dev`` and ``/data`` are mounted, which would
        hide those under them."""
        lines = []
        for source in ("/usr", "/etc", *self._python_paths()):
            target = f"{root}{shlex.quote(source)}"
            lines += [f"mkdir -p {target}", f"mount --bind -o ro {shlex.quote(source)} {target}"]
        return lines

    def command(self, argv: list[str]) -> list[str]:
        return argv

    @staticmethod
    def _python_paths() -> list[str]:
        """The interpreter, environment and georeg's packages that run here,
        outside /usr: never the whole checkout, where a cluster's data dir
        (keys, credentials) may be (``make up``: ``.georeg``)."""
        packages = {Path(importlib.util.find_spec(name).origin).parent for name in NODE_PACKAGES}
        paths = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), *packages}
        paths = {p for p in paths if not p.is_relative_to("/usr")}
        # Nested ones come with their parent's bind.
        return sorted(str(p) for p in paths
                      if not any(p != q and p.is_relative_to(q) for q in paths))


class ImageRoot:
    """georeg's OCI image unpacked at ``directory`` (``cluster.image.layout.unpack``),
    bound read-only; commands for this process's Python run the image's
    (``georeg`` for ``python -m cluster.cli``)."""

    python = IMAGE_PYTHON

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def exposes(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.directory.resolve())

    def mounts(self, root: str) -> list[str]:
        return [f"mount --bind -o ro {shlex.quote(str(self.directory))} {root}"]

    def binds(self, root: str) -> list[str]:
        return []

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
                 bridge: str, control: str, user: tuple[int, int],
                 root_fs: BoundRoot | ImageRoot | None = None) -> None:
        self.root_fs = root_fs or BoundRoot()
        self.user = user                        # what its nodes run as (HOST_UIDS)
        self.name = name
        self.address = address
        self.directory = directory
        self.root = directory / "root"          # the mount point of its root file system
        self.data = directory / "data"          # what it sees at /data
        self.veth = veth
        self.bridge = bridge
        self.control = control                  # the one address it talks to
        self.holder: subprocess.Popen | None = None

    # -- NodeHost ----------------------------------------------------------------------

    def command(self, argv: list[str]) -> list[str]:
        assert self.holder is not None, f"host {self.name} is not started"
        return ["nsenter", f"--target={self.holder.pid}", "--net", "--mount", "--",
                "chroot", str(self.root), self.root_fs.python, "-I", "-S", "-c", AS_USER,
                *map(str, self.user), *self.root_fs.command(argv)]

    def sees(self, path: Path) -> bool:
        """Whether a process on this host can read this machine's ``path``."""
        return self.root_fs.exposes(path)

    def put(self, path: Path, data: bytes) -> None:
        local = self.local(path)
        write_replacing(local, data)
        self._own(local)

    def _own(self, path: Path) -> None:
        """``path`` and the directories up to ``/data`` owned by the nodes' user."""
        while path.is_relative_to(self.data):
            os.chown(path, *self.user)
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
            self._inside("ip", "addr", "add", f"{self.address}/{PREFIX_LEN}", "dev", "eth0")
            self._inside("ip", "link", "set", "eth0", "up")
            for rule in self._rules():
                self._inside("iptables", "-w", *rule)
        except BaseException:
            self.close()
            raise

    def _rules(self) -> list[list[str]]:
        """Its eth0 carries packets to and from the control address only:
        another host is never dialled directly, so every byte between two
        hosts crosses a link. What it may dial there is the ``CONTROL``
        chain's (every port until ``confine``)."""
        eth0_in, eth0_out = ["-i", "eth0"], ["-o", "eth0"]
        return [["-A", "INPUT", *eth0_in, "-s", self.control, "-j", "ACCEPT"],
                ["-A", "INPUT", *eth0_in, "-j", "DROP"],
                ["-N", CHAIN],
                ["-A", CHAIN, "-j", "ACCEPT"],
                ["-A", "OUTPUT", *eth0_out, "-d", self.control, "-m", "conntrack",
                 "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                ["-A", "OUTPUT", *eth0_out, "-d", self.control, "-j", CHAIN],
                ["-A", "OUTPUT", *eth0_out, "-j", "REJECT"]]

    def confine(self, ports: list[int]) -> None:
        """New connections to the control address on ``ports`` only
        (``HostNetwork.confine``)."""
        self._inside("iptables", "-w", "-F", CHAIN)
        for low, high in _runs(ports):
            self._inside("iptables", "-w", "-A", CHAIN, "-p", "tcp", "--dport", f"{low}:{high}",
                         "-j", "ACCEPT")
        self._inside("iptables", "-w", "-A", CHAIN, "-j", "REJECT")

    def _inside(self, *argv: str) -> str:
        """``argv`` run in this host's network namespace (as root: its set-up)."""
        assert self.holder is not None, f"host {self.name} is not started"
        return _run(["nsenter", f"--target={self.holder.pid}", "--net", *argv])

    def _script(self) -> str:
        """The holder's: loopback up, the root file system mounted, then wait.

        The root's binds of this machine's paths come last: one under a
        directory the host has of its own (a checkout and its venv under
        ``/tmp``, as a CI clone may be) would otherwise be hidden by it."""
        root = shlex.quote(str(self.root))
        lines = ["set -e", "ip link set lo up", *self.root_fs.mounts(root),
                 f"mount -t proc proc {root}/proc",
                 f"mount -t tmpfs -o mode=1777,size=64m tmp {root}/tmp",
                 f"mount -t tmpfs -o mode=755,size=64k dev {root}/dev"]
        for device in DEVICES:
            lines += [f"touch {root}/dev/{device}", f"mount --bind /dev/{device} {root}/dev/{device}"]
        lines += [f"mount --bind {shlex.quote(str(self.data))} {root}{self.data_mount}",
                  *self.root_fs.binds(root), f"echo {READY}", "exec sleep infinity"]
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
