"""What every ``georeg`` command shares: the data dir option, the error a
command raises to stop with a message, and the call to a running cluster's
management API, which carries the cluster owner's credential from the data
dir when there is one (``cluster.control.access``). It imports no command
module, so every command module can import it.
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
import sys
from collections.abc import Callable
from pathlib import Path

from ..control.access import AdminLogin, CredentialMissing, authorization, read_owner_credential
from ..control.management_client import ManagementError, request, stream
from ..control.plan import ca_file
from ..control.state import running_state
from ..control.tls import client_context

DEFAULT_DATA_DIR = Path(".georeg")


class CliError(Exception):
    """Stops a command: ``georeg: <message>`` on stderr, exit status 2."""


def add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                   help="the cluster's data dir (default ./.georeg)")


def data_dir_of(args: argparse.Namespace) -> Path:
    return args.data_dir or DEFAULT_DATA_DIR


def command(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command's entry point: a ``CliError`` it raises becomes a message and exit status 2."""
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CliError as exc:
            print(f"georeg: {exc}", file=sys.stderr)
            return 2
    return run


def management_url(data_dir: Path) -> str:
    state = running_state(data_dir)
    if state is None or not state.get("management"):
        raise CliError(f"no georeg cluster is running from {data_dir}; start one with "
                       f"`georeg up --data-dir {data_dir}` (or pass the right --data-dir)")
    return state["management"]


def call(data_dir: Path, method: str, path: str, body: dict | None = None,
         timeout: float = 120) -> object:
    """One request to the management API of the cluster running from ``data_dir``,
    with the owner credential kept there (a cluster without auth has none)."""
    with _reaching(data_dir) as (url, headers, tls):
        return request(url, method, path, body, timeout, headers=headers, tls=tls)


def call_streaming(data_dir: Path, method: str, path: str, data=None,
                   headers: dict[str, str] | None = None, timeout: float = 120):
    """As ``call``, with a body of bytes or a file and the answer's bytes as
    they come (``management_client.stream``)."""
    with _reaching(data_dir) as (url, owner, tls):
        yield from stream(url, method, path, data, timeout, {**owner, **(headers or {})}, tls)


@contextlib.contextmanager
def _reaching(data_dir: Path):
    """(URL, owner headers, TLS context) of the running cluster; its refusals as ``CliError``."""
    url = management_url(data_dir)
    headers, missing = {}, None
    try:
        headers = authorization(read_owner_credential(data_dir))
    except CredentialMissing as exc:
        missing = exc
    try:
        yield url, headers, cluster_tls(data_dir) if url.startswith("https:") else None
    except ManagementError as exc:
        if exc.status == 401 and missing is not None:
            raise CliError(f"{exc}\n{missing}") from None
        raise CliError(str(exc)) from None


def cluster_tls(data_dir: Path) -> ssl.SSLContext | None:
    """What a command that asks nodes or endpoints itself trusts: the cluster CA
    kept in ``data_dir`` (None when the cluster has none; its URLs are then
    plain HTTP, and a context would never be used)."""
    path = ca_file(data_dir)
    try:
        return client_context(path)
    except FileNotFoundError:
        return None
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"cannot use the cluster CA {path}: {exc}") from None


def admin_login(data_dir: Path) -> AdminLogin:
    """The admin credentials a client logs in with, as the running cluster's
    ``credential show`` answers them (from the one home of the plaintexts,
    checked against the hash the registry holds): the first password that works."""
    login = AdminLogin.from_shown(call(data_dir, "GET", "/georeg/v1/registry/credentials"))
    if login is None:
        raise CliError(f"no admin password kept in {data_dir}/auth/admin-passwords.json works "
                       f"any more; `georeg credential renew --password-name password` makes "
                       f"a new one")
    return login


def event_loop():
    """uvloop where available (the supervisor proxies every byte between nodes
    and clients, and uvloop's loop and child watcher cost less idle CPU), else asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        import asyncio
        return asyncio
    return uvloop
