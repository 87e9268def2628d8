"""``georeg up``, ``down``, ``status`` and ``region restore``: the cluster as a whole.

``up`` runs the cluster in this process (or in the background with
``--detach``) and serves its management API; every other command finds a
running cluster through ``<data dir>/cluster.json`` (``cluster.control.state``)
and talks to that API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from registry_node import logs

from ..control import spec as specs
from ..control.access import AdminLogin
from ..control.cluster import Cluster
from ..control.dashboard import dashboard_url
from ..control.errors import ClusterError
from ..control.management import ManagementServer
from ..control.state import running_state, saved_spec
from ..control.supervisor import NodeStartError
from .common import (
    DEFAULT_DATA_DIR,
    CliError,
    add_data_dir,
    admin_login,
    call,
    command,
    data_dir_of,
    event_loop,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up", help="start a multi-region registry cluster on this machine",
        description="Start every node of the cluster (one process per region and zone), the WAN "
                    "links between them, the global and regional endpoints and the management "
                    "API; wait until all are healthy; print the endpoints. Ctrl-C (or `georeg "
                    "down`) stops everything. Data persists in the data dir, and a second `up` "
                    "resumes it, replicas created since included.")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="cluster spec (TOML); default: the spec saved in the data dir, else the "
                        "built-in default (Premium, home eastus with zones, westeurope with "
                        "zones, brazilsouth, southeastasia)")
    add_data_dir(p)
    p.add_argument("--seed", type=int,
                   help="seed of the WAN links' random draws (jitter, resets); default: the "
                        "spec's (--config, or the one the data dir's cluster last ran with), "
                        "else a new one. `up` prints it, so a run can be replayed")
    p.add_argument("--auth", choices=specs.AUTH_MODES,
                   help="token (the default): every node and endpoint wants credentials, as "
                        "ACR does (the admin user's password is generated at first start and "
                        "printed; `georeg login` hands it to skopeo, podman, docker); none: an "
                        "open registry that anyone who reaches a port may push to, delete "
                        "from or shut down. Default: the spec's auth (default token)")
    p.add_argument("--tls", action="store_true", default=None,
                   help="serve HTTPS on every node and endpoint, with certificates from the "
                        "cluster CA made at first start (in DATA_DIR/auth/ca) for 127.0.0.1, "
                        "localhost and the login server; `georeg ca export` says how to trust "
                        "it. Default: the spec's tls (default false)")
    p.add_argument("--detach", action="store_true",
                   help="run in the background; stop it with `georeg down`")
    p.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    # The background child of --detach: its stdout is a log file, so it prints
    # no password (the parent prints them, from the data dir).
    p.add_argument("--detached-child", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=command(run_up))

    p = sub.add_parser("down", help="stop a cluster started with `georeg up`",
                       description="Stop every process of the cluster running from the data dir. "
                                   "Data stays; `georeg up` resumes it.")
    add_data_dir(p)
    p.set_defaults(func=command(run_down))

    p = sub.add_parser("status", help="health, routing, replication and storage of every node",
                       description="Show every replica and zone of the running cluster: health, "
                                   "global routing, replication state (Creating → Syncing → "
                                   "Ready, with progress; Unavailable while none of a replica's "
                                   "nodes is up, Syncing again while one that was down catches "
                                   "up; the zones that are down are named), lag and storage, and "
                                   "its endpoints. Exit status 1 when a node is not healthy.")
    add_data_dir(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=command(run_status))


def register_region(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("region", help="regions: restore one from its paired-region copy")
    regions = p.add_subparsers(dest="region_command", required=True, metavar="COMMAND")
    c = regions.add_parser(
        "restore", help="rebuild a (destroyed) region from its paired-region copy",
        description="Azure keeps a copy of each region's data in its paired region (except "
                    "Brazil South and Southeast Asia, whose data stays in the region). This "
                    "rebuilds the region's nodes from that copy and from every other replica, "
                    "recovering content that had reached no other replica. For a confined "
                    "region it says plainly what could not be recovered.")
    c.add_argument("region")
    add_data_dir(c)
    c.set_defaults(func=command(run_region_restore))


def run_up(args: argparse.Namespace) -> int:
    data_dir = args.data_dir
    spec = None
    if args.config is not None:
        try:
            spec = specs.load(args.config)
        except specs.SpecError as exc:
            raise CliError(str(exc)) from None
    data_dir = data_dir or Path(spec.network.data_dir if spec else DEFAULT_DATA_DIR)
    state = running_state(data_dir)
    if state is not None:
        raise CliError(f"a cluster is already running from {data_dir} (pid {state['pid']}, "
                       f"management {state['management']}); stop it with `georeg down` first")
    if spec is None:
        try:
            spec = saved_spec(data_dir) or specs.load(None)
        except (specs.SpecError, ValueError) as exc:
            raise CliError(f"cannot resume from {data_dir}: {exc}") from None
    if args.seed is not None:
        try:
            spec = specs.validate(spec.seeded(args.seed), "--seed")
        except specs.SpecError as exc:
            raise CliError(str(exc)) from None
    if args.auth is not None:
        spec = spec.with_auth(args.auth)
    if args.tls:
        spec = spec.with_tls(True)
    if args.detach:
        return _detach(args, data_dir)
    logs.configure(args.log_format, "warning", sys.stderr)
    # A port in use is found by binding it (Cluster.start says which, and what
    # to do); a check here first would only race with whoever takes it next.
    return event_loop().run(_up(spec, data_dir, show_secrets=not args.detached_child))


async def _up(spec, data_dir: Path, show_secrets: bool = True) -> int:
    try:
        cluster = await Cluster.start(spec, data_dir)
    except (NodeStartError, ClusterError, OSError) as exc:
        print(f"georeg: the cluster did not start: {exc}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, cluster.request_stop)
    try:
        async with ManagementServer(cluster) as management:
            admin = None
            if cluster.spec.auth_enabled and show_secrets:
                admin = await cluster.access.admin_login()
            print_endpoints({**cluster.status(), "management": management.url}, admin)
            print("Ctrl-C (or `georeg down`) stops the cluster.", flush=True)
            await cluster.serve_forever()
    finally:
        print("stopping…", flush=True)
        await cluster.stop()
        print("stopped; data kept in", cluster.data_dir, flush=True)
    return 0


def _detach(args: argparse.Namespace, data_dir: Path) -> int:
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "logs" / "supervisor.log"
    argv = [sys.executable, "-m", "cluster.cli", "up", "--data-dir", str(data_dir),
            "--log-format", "json", "--detached-child"]
    if args.config:
        argv += ["--config", str(args.config)]
    if args.seed is not None:
        argv += ["--seed", str(args.seed)]
    if args.auth is not None:
        argv += ["--auth", args.auth]
    if args.tls:
        argv.append("--tls")
    with open(log_path, "ab") as log:
        child = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-20:]
            raise CliError("the cluster did not start:\n" + "\n".join(tail))
        if running_state(data_dir) is not None:
            status = call(data_dir, "GET", "/georeg/v1/cluster")
            admin = None
            if status.get("auth") == "token":
                with contextlib.suppress(CliError):     # the admin user disabled since
                    admin = admin_login(data_dir)
            print_endpoints(status, admin)
            print(f"Running in the background (pid {child.pid}); `georeg down --data-dir "
                  f"{data_dir}` stops it. Logs: {data_dir / 'logs'}")
            return 0
        time.sleep(0.1)
    os.killpg(child.pid, signal.SIGTERM)
    raise CliError(f"the cluster did not become ready within 60 s; see {log_path}")


def run_down(args: argparse.Namespace) -> int:
    where = data_dir_of(args)
    state = running_state(where)
    if state is None:
        raise CliError(f"no georeg cluster is running from {where}")
    call(where, "POST", "/georeg/v1/shutdown")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not _running(state["pid"]):
            print(f"stopped the cluster in {where}")
            return 0
        time.sleep(0.1)
    raise CliError(f"the supervisor (pid {state['pid']}) did not stop within 60 s")


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs. A detached supervisor's parent is init; where
    init does not reap (a container whose first process is a shell), the exited
    supervisor stays a zombie, which signal 0 still finds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:                      # no /proc: ask the kernel the portable way
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def print_endpoints(status: dict, admin: AdminLogin | None = None) -> None:
    """What `georeg up` shows once the cluster it started is ready; with
    ``admin``, the credentials a client logs in with."""
    console = Console()
    startup = status["startup_s"]
    took = f" in {startup['healthy']:.1f} s (replicating and ready in {startup['ready']:.1f} s)"
    healthy = sum(1 for n in status["nodes"] if n["healthy"])
    console.print(f"[bold]georeg[/] registry [bold]{status['registry']}[/] ({status['tier']}, home "
                  f"{status['home_region']}): {healthy}/{len(status['nodes'])} nodes healthy{took}; "
                  f"data in {status['data_dir']}")
    if status.get("seed") is not None:
        console.print(f"WAN links seeded with {status['seed']} (`georeg up --seed {status['seed']}` "
                      "replays their jitter and resets)", highlight=False)
    table = Table("endpoint", "for", "URL", title="Endpoints", title_justify="left")
    for region, url in status["global_endpoints"].items():
        table.add_row("global", f"clients in {region}", url)
    for region, url in status["regional_endpoints"].items():
        table.add_row("regional", f"{region} only", url)
    if status.get("management"):
        table.add_row("management", "georeg CLI / REST", status["management"])
        table.add_row("dashboard", "a browser (`georeg dashboard --open`)",
                      dashboard_url(status["management"]))
    console.print(table)
    if status.get("blob_downloads") == "redirect":
        console.print("Blob downloads through an endpoint are redirected (307) to the node it "
                      "routes them to (blob_downloads = \"redirect\").")
    _node_table(console, status)
    copies = status.get("paired_copies") or []
    if copies:
        console.print("Paired-region copies (storage only, for `georeg region restore`): "
                      + ", ".join(f"{c['keeps']} → {c['region']}" for c in copies))
    first = next(iter(status["global_endpoints"].values()), "http://127.0.0.1:5000")
    host = first.partition("://")[2]
    data_dir = status["data_dir"]
    # How skopeo reaches an endpoint: verifying the cluster CA on a TLS cluster.
    verify = "--dest-tls-verify=false"
    if status.get("tls"):
        certs = f"{data_dir}/certs"
        console.print(f"HTTPS everywhere, certificates from the cluster CA {status['ca_file']}; "
                      f"`georeg ca export --data-dir {data_dir}` says how to trust it.",
                      highlight=False)
        verify = f"--dest-cert-dir {certs}"
        setup = f"georeg ca export --data-dir {data_dir} --cert-dir {certs} >/dev/null && "
    else:
        setup = ""
    if status.get("auth") == "token":
        _print_login(console, data_dir, host, admin, setup, verify)
        return
    console.print("Open cluster (auth = \"none\"): no login; anyone who reaches these ports "
                  "may push, delete and shut it down.", highlight=False)
    console.print(f"Try: {setup}skopeo copy {verify} docker-archive:image.tar "
                  f"docker://{host}/demo/app:v1", highlight=False)


def _print_login(console: Console, data_dir: str, host: str, admin: AdminLogin | None,
                 setup: str, verify: str) -> None:
    """An auth cluster's way in, for someone who has read nothing else: the
    admin login, the command that hands it to clients, and a first push
    (``setup``: what a TLS cluster's clients need first; ``verify``: skopeo's
    TLS option for it)."""
    if admin is None:
        # A detached child (its output is a log file) or an admin user disabled since.
        console.print(f"Registry credentials: `georeg credential show --data-dir {data_dir}` "
                      f"shows the admin login (if the admin user is disabled, `georeg registry "
                      f"update --admin-enabled true` enables it; `georeg token create` makes a "
                      f"repository-scoped one).", highlight=False)
        return
    console.print(f"[bold]Registry credentials[/] (every endpoint and node): username "
                  f"[bold]{admin.username}[/], password [bold]{admin.password}[/]",
                  highlight=False)
    console.print(f"Generated at the cluster's first start for a cluster on this machine, kept in "
                  f"{data_dir}/auth/admin-passwords.json (mode 0600); `georeg credential "
                  f"show|renew` shows and renews them. The management API and this CLI use the "
                  f"cluster owner's credential in {data_dir}/auth/owner.secret.", highlight=False)
    login_verify = verify.replace("--dest-", "--")
    if setup:
        console.print(f"Trust:   {setup.partition(' >/dev/null')[0]}", highlight=False, soft_wrap=True)
    console.print(f"Log in:  georeg login --data-dir {data_dir}\n"
                  f"         (writes them where skopeo and podman look: $REGISTRY_AUTH_FILE, else "
                  f"$XDG_RUNTIME_DIR/containers/auth.json; --docker: ~/.docker/config.json for "
                  f"docker and oras)\n"
                  f"     or: echo {admin.password} | skopeo login {login_verify} "
                  f"-u {admin.username} --password-stdin {host}\n"
                  f"Then:    skopeo copy {verify} docker-archive:image.tar "
                  f"docker://{host}/demo/app:v1", highlight=False, soft_wrap=True)


def _node_table(console: Console, status: dict) -> None:
    table = Table("node", "health", "routing", "peers", "behind", "images", "stored", "URL",
                  title="Nodes", title_justify="left")
    for n in status["nodes"]:
        rep = n["replication"]
        health = n["health"] + (f" ({n['reason']})" if n["reason"] and not n["healthy"] else "")
        table.add_row(n["name"], f"[{'green' if n['healthy'] else 'red'}]{health}[/]",
                      "on" if n["routing"] else "[yellow]off[/]",
                      f"{rep['peers_connected']}/{rep['peers']}", str(rep["behind_events"]),
                      str(n["images"]), _size(n["storage_bytes"]), n["http"])
    console.print(table)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run_status(args: argparse.Namespace) -> int:
    status = call(data_dir_of(args), "GET", "/georeg/v1/cluster")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    console = Console()
    table = Table("replica", "home", "zones", "routing", "status", "sync", title="Replicas",
                  title_justify="left")
    for r in status["replicas"]:
        table.add_row(r["name"], "yes" if r["home"] else "", r["zoneRedundancy"],
                      "on" if r["regionEndpointEnabled"] else "[yellow]off[/]",
                      r["status"]["displayStatus"], r["status"]["message"])
    console.print(table)
    _node_table(console, status)
    _traffic_table(console, status)
    _throttling_table(console, status)
    return 0 if all(n["healthy"] for n in status["nodes"]) else 1


def _throttling_table(console: Console, status: dict) -> None:
    """Requests each replica refused 429 since its nodes started, by kind and
    identity; shown when a replica is throttled (limits or a fault) or refused any."""
    replicas = {region: t for region, t in (status.get("throttling") or {}).items()
                if t["limits"] or t["fault"] or any(t["refused"].values())}
    if not replicas:
        return
    table = Table("replica", "limits /min (reads, writes, deletes, referrers)", "fault /min",
                  "refused: reads", "writes", "deletes", "referrers", "by identity",
                  title="Throttled requests (429, since each node started)",
                  title_justify="left")

    def rates(per_minute: dict | None) -> str:
        if not per_minute:
            return "-"
        return " / ".join(_number(per_minute[k]) if k in per_minute else "-"
                          for k in ("read", "write", "delete", "referrers"))

    for region, t in replicas.items():
        identities = sorted(t["refused_by_identity"].items(), key=lambda item: -sum(item[1].values()))
        who = ", ".join(f"{identity} {sum(counts.values())}" for identity, counts in identities[:3])
        if len(identities) > 3:
            who += f", +{len(identities) - 3} more"
        limits = rates(t["limits"])
        if t["limits"] and t["per_identity_fraction"] is not None:
            limits += f" (each identity {_number(t['per_identity_fraction'])} of it)"
        table.add_row(region, limits, rates(t["fault"]),
                      *(str(t["refused"].get(k, 0)) for k in ("read", "write", "delete", "referrers")),
                      who or "-")
    console.print(table)


def _number(value: object) -> str:
    """A number a node reported, or "?" for what is none (a node's JSON has
    null where a number was not finite): status shows what it can."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:g}"
    return "?"


def _traffic_table(console: Console, status: dict) -> None:
    """Where each endpoint sent its requests since the cluster started; only
    endpoints that carried any."""
    used = {name: t for name, t in (status.get("endpoint_traffic") or {}).items()
            if t["requests"] or t["unavailable"]}
    if not used:
        return
    table = Table("endpoint", "requests → node", "failovers", "503s", "downloads handed over",
                  "redirects", title="Endpoint traffic (since start)", title_justify="left")
    for name, t in used.items():
        kind, _, region = name.partition(":")
        routed = ", ".join(f"{node} {count}" for node, count in
                           sorted(t["requests"].items(), key=lambda item: -item[1]))
        label = f"global, clients in {region}" if kind == "global" else f"regional, {region} only"
        table.add_row(label, routed or "-", str(t["failovers"]),
                      str(t["unavailable"]), str(t.get("handed_over", 0)), str(t["redirects"]))
    console.print(table)


def run_region_restore(args: argparse.Namespace) -> int:
    result = call(data_dir_of(args), "POST", f"/georeg/v1/regions/{args.region}/restore",
                  timeout=600)
    print(result["message"])
    return 0 if result["paired_copy"] else 1
