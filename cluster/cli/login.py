"""``georeg login``: the registry's credentials written where clients look.

On a cluster with ``auth = "token"`` the admin user's credentials (made at
the cluster's first start, renewed by ``georeg credential renew``; the
running cluster's ``credential show`` says which work) go into a client
auth file, for every address a client may use: each global and regional
endpoint and each node (a token from any of them works on all). The file
format is the one skopeo, podman, docker and oras read:
``{"auths": {"HOST:PORT": {"auth": base64("user:password")}}}``; what the
file held for other registries stays.

Where (as containers-auth.json(5) and skopeo-login(1) say):
``--authfile PATH``; else ``$REGISTRY_AUTH_FILE``; else
``$XDG_RUNTIME_DIR/containers/auth.json`` (``/run/containers/<uid>/auth.json``
without ``XDG_RUNTIME_DIR``). With ``--docker``: ``$DOCKER_CONFIG/config.json``,
else ``~/.docker/config.json`` (docker, and oras-py, which reads only that).

The file is written mode 0600 (it holds a password) and replaced atomically.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
from pathlib import Path

from ..control.plan import plan
from ..control.private_files import write_private
from ..control.state import saved_spec
from .common import CliError, add_data_dir, admin_login, command, data_dir_of


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "login", help="write the registry's credentials where skopeo, podman, docker look",
        description="Write the admin user's credentials of a running cluster with auth = "
                    "\"token\" (what `georeg credential show` shows) into a client auth file, for every endpoint and node address of the cluster. "
                    "Default file: $REGISTRY_AUTH_FILE, else $XDG_RUNTIME_DIR/containers/"
                    "auth.json (skopeo, podman); --docker: $DOCKER_CONFIG/config.json, else "
                    "~/.docker/config.json (docker, oras).")
    add_data_dir(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--authfile", type=Path, metavar="PATH", help="write this file instead")
    where.add_argument("--docker", action="store_true",
                       help="write Docker's config.json (also read by oras)")
    p.set_defaults(func=command(run_login))


def auth_file(args: argparse.Namespace, env: dict[str, str] | os._Environ = os.environ) -> Path:
    if args.authfile is not None:
        return args.authfile
    if args.docker:
        if env.get("DOCKER_CONFIG"):
            return Path(env["DOCKER_CONFIG"]) / "config.json"
        return Path.home() / ".docker" / "config.json"
    if env.get("REGISTRY_AUTH_FILE"):
        return Path(env["REGISTRY_AUTH_FILE"])
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json"
    return Path(f"/run/containers/{os.getuid()}/auth.json")


def addresses(data_dir: Path) -> list[str]:
    """``HOST:PORT`` of every endpoint and node of the cluster in ``data_dir``
    (as its saved spec places them), ``localhost`` beside ``127.0.0.1``."""
    spec = saved_spec(data_dir)
    if spec is None:
        raise CliError(f"{data_dir} holds no georeg cluster; start one with "
                       f"`georeg up --data-dir {data_dir}`")
    if not spec.auth_enabled:
        raise CliError(f"the cluster in {data_dir} runs without auth (auth = \"none\"): "
                       f"clients need no login. `georeg up --auth token` turns it on")
    return plan(spec, Path(data_dir).resolve()).client_addresses()


def write_auth_file(path: Path, entries: dict[str, str]) -> None:
    """``entries`` (address → base64 user:password) merged into the auth file at ``path``."""
    try:
        doc = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot update {path}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("auths", {}), dict):
        raise CliError(f"{path} is not an auth file ({{\"auths\": {{…}}}}); give another "
                       f"with --authfile")
    auths = doc.setdefault("auths", {})
    for address, auth in entries.items():
        auths[address] = {**(auths.get(address) or {}), "auth": auth}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, (json.dumps(doc, indent=2) + "\n").encode())


def run_login(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    where = addresses(data_dir)
    admin = admin_login(data_dir)
    auth = base64.b64encode(f"{admin.username}:{admin.password}".encode()).decode()
    path = auth_file(args)
    write_auth_file(path, dict.fromkeys(where, auth))
    print(f"Logged in as {admin.username} to {len(where)} addresses ({where[0]} … {where[-1]}): "
          f"credentials written to {path}")
    return 0
