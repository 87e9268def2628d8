"""Where node processes run: a host is something the control process can start
a process on and put a file on, and nothing more (docs/multihost.md).

The supervisor starts every node through its host (``NodeHost.command``) and
puts there every file the node's command line names (``NodeHost.put``: its
view, and on an auth or TLS cluster its key, certificate, the CA and the
internal credential; the configuration key): it never reads a node's files
back, so a node on another host needs no file system shared with anyone.
Removing a node's data (a deleted replica, a destroy fault) is the host's
too (``NodeHost.remove``). What the control process learns of a node, it
learns over the network (health, status, ``georeg verify``).

``LocalHost`` is this machine, the one-machine default. Another host is any
implementation of ``NodeHost`` given to the cluster by the address the spec
places nodes at (``Cluster(hosts={address: host})``): one machine's network
namespaces (``cluster.network.namespaces``), or a remote machine (a prefix
such as ``ssh HOST`` and a file copy). A node's process is the command's
process here: signals to its process group (stop, kill, pause) reach the
node itself wherever the command runs it in place (namespaces, chroot);
through a remote shell they reach the shell.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Protocol


class NodeHost(Protocol):
    """What the supervisor needs of a host to run nodes on it."""

    def command(self, argv: list[str]) -> list[str]:
        """The command line that runs ``argv`` on this host (its Python, its
        paths: ``argv[0]`` is this process's interpreter)."""
        ...

    def put(self, path: Path, data: bytes) -> None:
        """``data`` at ``path`` on this host (mode 0600, parents made), replacing
        what was there at once: a node that reads the file sees the old or the
        new, never a part."""
        ...

    def remove(self, path: Path) -> None:
        """The tree at ``path`` on this host gone (nothing if it is not there)."""
        ...

    def sees(self, path: Path) -> bool:
        """Whether a process on this host can read this machine's ``path``
        (the supervisor refuses a host that sees the cluster's data dir: the
        CA key, every node's key and the credentials are there)."""
        ...


class LocalHost:
    """This machine: commands run as they are, files are written here."""

    def command(self, argv: list[str]) -> list[str]:
        return argv

    def put(self, path: Path, data: bytes) -> None:
        write_replacing(path, data)

    def remove(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def sees(self, path: Path) -> bool:
        return True


LOCAL = LocalHost()

# A temporary file of ``write_replacing`` this old is one a killed writer left
# (a live one is renamed within milliseconds): the next write removes it.
STALE_TMP_S = 60.0


def write_replacing(path: Path, data: bytes) -> None:
    """``data`` at ``path`` (0600, parents made), through a temporary file renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # What a writer killed mid-write left (a key, maybe): never another
    # writer's file in flight, which is younger.
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > STALE_TMP_S:
                stale.unlink()
    # A name of its own (mkstemp, 0600): nodes sharing a host start at once,
    # and each start puts the files they share.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
