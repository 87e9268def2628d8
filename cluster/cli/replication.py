"""``georeg replication …``: the registry's replicas, after ``az acr
replication`` (``list``, ``create``, ``show``, ``update``, ``delete``, through
the management API), and ``status REPO:TAG``, where one image has replicated
to, asked of any node (each answers for the whole cluster) through its HTTP
API, ``GET /georeg/v1/replication/status`` (on an auth cluster with the
credentials its data dir holds: ``_credentials_for``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
from rich.table import Table

from ..control.access import CredentialMissing, authorization, read_internal_credential
from ..control.management_client import open_direct
from ..control.state import running_state, saved_spec
from .common import CliError, add_data_dir, admin_login, call, cluster_tls, command, data_dir_of
from .login import auth_file

_STYLE = {"present": "green", "pending": "yellow", "stale": "yellow", "excluded": "dim",
          "failed": "red", "unreachable": "red"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replication", help="replicas (az acr replication) and per-image status",
                       description="Geo-replicas of the registry, after `az acr replication`. "
                                   "The home region holds the control plane: while it cannot be "
                                   "reached (down, or cut off from the network), create, update "
                                   "and delete fail with exit status 2.")
    commands = p.add_subparsers(dest="replication_command", required=True, metavar="COMMAND")

    c = commands.add_parser(
        "list", help="list replicas",
        description="List the replicas, each with its status as ACR shows it: Creating, "
                    "Syncing (with progress), Ready, or Unavailable while none of its nodes is up; "
                    "the message names the zones that are down. provisioningState stays "
                    "Succeeded through an outage.")
    add_data_dir(c)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=command(run_replication_list))

    c = commands.add_parser(
        "create", help="add a replica; it syncs existing content (watch `georeg replication show`)",
        description="Add a replica in a region. Its nodes start, every other node learns of "
                    "them, and the replica syncs everything residency allows it to hold; its "
                    "status goes Creating → Syncing → Ready, with progress.")
    c.add_argument("--location", "-l", required=True, help="region, e.g. japaneast")
    c.add_argument("--zone-redundancy", choices=("Enabled", "Disabled"), default="Disabled")
    c.add_argument("--region-endpoint-enabled", "--global-endpoint-routing", dest="routing",
                   choices=("true", "false"), default="true")
    c.add_argument("--wait", action="store_true", help="wait until the replica is Ready")
    add_data_dir(c)
    c.set_defaults(func=command(run_replication_create))

    c = commands.add_parser("show", help="one replica, with its sync progress")
    c.add_argument("--name", "-n", required=True, metavar="REGION")
    add_data_dir(c)
    c.set_defaults(func=command(run_replication_show))

    c = commands.add_parser(
        "update", help="take a replica in or out of global routing",
        description="With --global-endpoint-routing false, the global endpoints stop sending "
                    "clients to this replica (e.g. for maintenance); it keeps replicating both "
                    "ways, and its regional endpoint keeps working.")
    c.add_argument("--name", "-n", required=True, metavar="REGION")
    c.add_argument("--global-endpoint-routing", "--region-endpoint-enabled", dest="routing",
                   choices=("true", "false"), required=True)
    add_data_dir(c)
    c.set_defaults(func=command(run_replication_update))

    c = commands.add_parser("delete", help="remove a replica and its data (not the home one)")
    c.add_argument("--name", "-n", required=True, metavar="REGION")
    add_data_dir(c)
    c.set_defaults(func=command(run_replication_delete))

    c = commands.add_parser(
        "status", help="where an image has replicated to, per replica",
        description="Show, for every replica of the cluster, whether an image is present (and "
                    "when it arrived, and its lag behind the push), pending, excluded by data "
                    "residency, failed (and why), or unreachable. Exit status 0 when the image "
                    "is present everywhere residency allows, 1 otherwise.")
    c.add_argument("image", metavar="REPO:TAG|REPO@DIGEST")
    c.add_argument("--json", action="store_true", help="print the raw JSON answer")
    c.add_argument("--node", dest="node_url", metavar="URL",
                   help="HTTP address of any node or endpoint (default: a node found through "
                        "--data-dir)")
    c.add_argument("--authfile", type=Path, metavar="PATH",
                   help="on a registry with auth, the client auth file with credentials for "
                        "--node's address (default: where `georeg login` writes, "
                        "$REGISTRY_AUTH_FILE, ...); not needed for the cluster running from "
                        "--data-dir, whose own credentials are used")
    add_data_dir(c)
    c.set_defaults(func=command(run_status))


def _replica_table(replicas: list[dict]) -> None:
    table = Table("name", "location", "home", "zone redundancy", "routing", "status", "message")
    for r in replicas:
        table.add_row(r["name"], r["location"], "yes" if r["home"] else "", r["zoneRedundancy"],
                      "on" if r["regionEndpointEnabled"] else "off", r["status"]["displayStatus"],
                      r["status"]["message"])
    Console().print(table)


def run_replication_list(args: argparse.Namespace) -> int:
    replicas = call(data_dir_of(args), "GET", "/georeg/v1/replications")
    if args.json:
        print(json.dumps(replicas, indent=2))
    else:
        _replica_table(replicas)
    return 0


def run_replication_create(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    body = {"location": args.location, "zoneRedundancy": args.zone_redundancy,
            "regionEndpointEnabled": args.routing == "true"}
    replica = call(data_dir, "POST", "/georeg/v1/replications", body)
    _replica_table([replica])
    if not args.wait:
        return 0
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn()) as progress:
        task = progress.add_task(f"syncing {args.location}", total=None)
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            replica = call(data_dir, "GET", f"/georeg/v1/replications/{args.location}")
            done, total = replica["sync"]["bytes"]
            progress.update(task, completed=done, total=max(total, 1),
                            description=f"{args.location}: {replica['status']['message']}")
            if replica["status"]["displayStatus"] == "Ready":
                progress.update(task, completed=max(total, 1))
                return 0
            time.sleep(0.25)
    raise CliError(f"{args.location} is not Ready after an hour")


def run_replication_show(args: argparse.Namespace) -> int:
    replica = call(data_dir_of(args), "GET", f"/georeg/v1/replications/{args.name}")
    print(json.dumps(replica, indent=2))
    return 0


def run_replication_update(args: argparse.Namespace) -> int:
    replica = call(data_dir_of(args), "PATCH", f"/georeg/v1/replications/{args.name}",
                   {"regionEndpointEnabled": args.routing == "true"})
    _replica_table([replica])
    return 0


def run_replication_delete(args: argparse.Namespace) -> int:
    call(data_dir_of(args), "DELETE", f"/georeg/v1/replications/{args.name}")
    print(f"deleted the replica in {args.name}")
    return 0


# -- per-image status ---------------------------------------------------------------


def split_image(ref: str) -> tuple[str, str]:
    """``repo:tag`` or ``repo@sha256:…`` → (repository, reference)."""
    if "@" in ref:
        repo, _, digest = ref.partition("@")
        return repo, digest
    repo, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return repo, tag


def _any_node(args: argparse.Namespace) -> str:
    """A healthy node of the cluster found through --data-dir."""
    status = call(data_dir_of(args), "GET", "/georeg/v1/cluster")
    for node in status["nodes"]:
        if node["healthy"]:
            return node["http"]
    raise CliError("no node of the cluster is healthy")


def _credentials_for(args: argparse.Namespace, base: str) -> dict[str, str]:
    """What to send ``base`` on an auth cluster running from --data-dir: a node
    of it gets the cluster's internal credential (the cluster asking its own
    node, as ``georeg verify`` does), an endpoint of it the admin user's (a
    client's credential, for the client-facing address); an address the
    cluster does not serve gets none of its secrets."""
    data_dir = data_dir_of(args)
    spec = saved_spec(data_dir) if running_state(data_dir) is not None else None
    if spec is None or not spec.auth_enabled:
        return _from_auth_file(args, base)
    status = call(data_dir, "GET", "/georeg/v1/cluster")
    if base in {n["http"].rstrip("/") for n in status["nodes"]}:
        try:
            return authorization(read_internal_credential(data_dir))
        except CredentialMissing as exc:
            raise CliError(str(exc)) from None
    endpoints = [*status.get("global_endpoints", {}).values(),
                 *status.get("regional_endpoints", {}).values()]
    if base in {e.rstrip("/") for e in endpoints}:
        return admin_login(data_dir).headers()
    return _from_auth_file(args, base)


def _from_auth_file(args: argparse.Namespace, base: str) -> dict[str, str]:
    """Basic credentials for ``base``'s HOST:PORT from the client auth file
    (``--authfile``, else where ``georeg login`` writes), as skopeo finds them."""
    path = auth_file(argparse.Namespace(authfile=args.authfile, docker=False))
    try:
        auths = json.loads(path.read_text()).get("auths", {})
    except (OSError, ValueError, AttributeError):
        return {}
    entry = auths.get(urllib.parse.urlsplit(base).netloc) if isinstance(auths, dict) else None
    if isinstance(entry, dict) and isinstance(entry.get("auth"), str):
        return {"Authorization": f"Basic {entry['auth']}"}
    return {}


def run_status(args: argparse.Namespace) -> int:
    repo, reference = split_image(args.image)
    base = (args.node_url or _any_node(args)).rstrip("/")
    query = urllib.parse.urlencode({"repository": repo, "reference": reference})
    request = urllib.request.Request(f"{base}/georeg/v1/replication/status?{query}",
                                     headers=_credentials_for(args, base))
    try:
        with open_direct(request, timeout=10, tls=cluster_tls(data_dir_of(args))) as r:
            answer = json.load(r)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        print(f"georeg: {base} answered {exc.code}: {detail}", file=sys.stderr)
        if exc.code == 401:
            print("georeg: the registry wants credentials with pull on the repository: run "
                  "georeg with the cluster's --data-dir, or log in first (`georeg login`, or "
                  "--authfile)", file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError) as exc:
        print(f"georeg: cannot reach {base}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0 if answer["complete"] else 1
    console = Console()
    origin = answer["origin"]
    console.print(f"[bold]{repo}:{reference}[/] → {answer['digest'] or 'unknown'}"
                  + (f"  pushed in {origin['region']} at {origin['acked_at']}" if origin["region"] else ""))
    table = Table("replica", "region", "zone", "state", "arrived", "lag (ms)", "detail")
    for r in answer["replicas"]:
        state = r["state"]
        table.add_row(r["name"], r["region"], r["zone"] or "-",
                      f"[{_STYLE.get(state, '')}]{state}[/]", r.get("arrived_at") or "",
                      "" if r.get("lag_ms") is None else f"{r['lag_ms']:.1f}",
                      r.get("reason") or r.get("digest") or "")
    console.print(table)
    console.print("complete: every replica allowed by residency has it" if answer["complete"]
                  else "not complete yet")
    return 0 if answer["complete"] else 1
