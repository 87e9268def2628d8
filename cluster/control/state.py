"""What a cluster leaves in its data dir for other processes to find it.

    <data dir>/spec.json      the spec it last ran with (replicas created since
                              included); a second ``georeg up`` resumes from it
    <data dir>/cluster.json   {"pid", "data_dir", "management", "started_at"}:
                              present while a supervisor serves the management
                              API, removed when it stops
    <data dir>/admin-passwords.json
                              mode 0600: the admin user's passwords in clear,
                              {"password": [...], "password2": [...]}, newest
                              last; only the control plane reads it (``georeg
                              credential show``), nodes hold only hashes

The CLI reads both without importing anything that runs a cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import msgspec

from . import spec as specs

STATE_FILE = "cluster.json"
SPEC_FILE = "spec.json"


def save_spec(data_dir: Path, spec: specs.ClusterSpec) -> None:
    path = Path(data_dir) / SPEC_FILE
    path.write_bytes(msgspec.json.format(msgspec.json.encode(spec)))


def saved_spec(data_dir: Path) -> specs.ClusterSpec | None:
    """The spec a cluster in ``data_dir`` last ran with (replicas created since included)."""
    path = Path(data_dir) / SPEC_FILE
    if not path.exists():
        return None
    spec = msgspec.json.decode(path.read_bytes(), type=specs.ClusterSpec)
    return specs.validate(spec, str(path))


def write_running_state(data_dir: Path, management_url: str, started_at: float | None = None) -> None:
    state = {"pid": os.getpid(), "data_dir": str(data_dir), "management": management_url,
             "started_at": started_at if started_at is not None else time.time()}
    (Path(data_dir) / STATE_FILE).write_text(msgspec.json.encode(state).decode())


def clear_running_state(data_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (Path(data_dir) / STATE_FILE).unlink()


def running_state(data_dir: Path) -> dict | None:
    """The state file of a cluster running from ``data_dir``, if its supervisor lives."""
    path = Path(data_dir) / STATE_FILE
    try:
        state = msgspec.json.decode(path.read_bytes())
    except (FileNotFoundError, msgspec.DecodeError):
        return None
    try:
        os.kill(state["pid"], 0)
    except (ProcessLookupError, KeyError):
        return None
    except PermissionError:
        pass
    return state


ADMIN_PASSWORDS_FILE = "admin-passwords.json"
# Kept per slot: the password being set and the one before it, so that a
# renewal interrupted between this file and the home node's write still shows
# whichever of them the replicated hash names.
_CANDIDATES = 2


def admin_password_candidates(data_dir: Path) -> dict[str, list[str]]:
    try:
        raw = (Path(data_dir) / ADMIN_PASSWORDS_FILE).read_text()
    except FileNotFoundError:
        return {}
    doc = json.loads(raw)
    return {slot: [v for v in values if isinstance(v, str)]
            for slot, values in doc.items() if isinstance(values, list)}


def remember_admin_password(data_dir: Path, slot: str, value: str) -> None:
    """Add ``value`` as the newest candidate for ``slot`` (the file stays 0600 and
    is replaced atomically: a crash leaves the old file or the new one)."""
    candidates = admin_password_candidates(data_dir)
    candidates[slot] = (candidates.get(slot, []) + [value])[-_CANDIDATES:]
    path = Path(data_dir) / ADMIN_PASSWORDS_FILE
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(candidates, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
