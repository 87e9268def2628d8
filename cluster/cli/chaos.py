"""`georeg chaos run FILE|NAME` and `georeg chaos list`: scripted fault scenarios."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from registry_node import logs

from ..control import spec as specs
from ..control.access import CredentialMissing, read_owner_credential
from ..control.cluster import Cluster
from ..control.management import ManagementServer
from ..control.state import running_state, saved_spec
from ..faults.chaos import SCENARIOS, ChaosRun, ScenarioError, load, run_seed, summary
from ..testing import on_any_ports
from .common import CliError, cluster_tls, command


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chaos", help="run scripted fault scenarios against a cluster",
                       description="Scenarios combine a workload (pushes and pulls through the "
                                   "global endpoints), timed faults and assertions, and end with "
                                   "a report: acknowledged pushes lost, client-visible errors by "
                                   "code and location with their time windows, failovers, time to "
                                   "converge, worst lag, and `georeg verify`.")
    commands = p.add_subparsers(dest="chaos_command", required=True, metavar="COMMAND")
    c = commands.add_parser("list", help="the scenarios that ship with georeg")
    c.set_defaults(func=command(run_list))
    c = commands.add_parser(
        "run", help="run a scenario",
        description="Run a scenario (a TOML file, or the name of a shipped one) against the "
                    "cluster running from --data-dir, or, if none runs there, against a cluster "
                    "it starts (the default spec, on free ports) and stops afterwards.")
    c.add_argument("scenario", metavar="FILE|NAME")
    c.add_argument("--data-dir", type=Path, help="a running cluster's data dir (default: start one)")
    c.add_argument("--seed", type=int, help="override the scenario's seed")
    c.add_argument("--scale", type=float, default=1.0,
                   help="multiply every duration and time (e.g. 0.3 for a short run)")
    c.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    c.add_argument("--auth", choices=specs.AUTH_MODES,
                   help="access control of a cluster it starts (default: the default spec's); "
                        "on a cluster with auth the run uses the owner credential from the data "
                        "dir and its clients log in as the admin user")
    c.set_defaults(func=command(run_scenario))


def find(name: str) -> Path:
    path = Path(name)
    if path.exists():
        return path
    shipped = SCENARIOS / f"{name}.toml"
    if shipped.exists():
        return shipped
    known = ", ".join(sorted(p.stem for p in SCENARIOS.glob("*.toml")))
    raise CliError(f"no scenario file {name}; shipped scenarios: {known}")


def run_list(args: argparse.Namespace) -> int:
    for path in sorted(SCENARIOS.glob("*.toml")):
        scenario = load(path)
        first = scenario.description.split(".")[0].replace("\n", " ")
        print(f"{scenario.name:28} {first}.")
    return 0


def run_scenario(args: argparse.Namespace) -> int:
    logs.configure("console", "warning", sys.stderr)
    try:
        scenario = load(find(args.scenario))
    except ScenarioError as exc:
        raise CliError(str(exc)) from None
    if args.scale <= 0:
        raise CliError("--scale must be positive")
    state = running_state(args.data_dir) if args.data_dir else None
    try:
        report = asyncio.run(_run_scenario(scenario, args, state))
    except ScenarioError as exc:      # the cluster refused the run (e.g. its admin user is off)
        raise CliError(str(exc)) from None
    print(summary(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


async def _run_scenario(scenario, args, state) -> dict:
    """The scenario against the cluster running from --data-dir (``state``), or
    against a cluster started for it here, in --data-dir or a scratch dir."""
    if state is not None:
        try:
            owner = read_owner_credential(args.data_dir) if _has_auth(args.data_dir) else None
        except CredentialMissing as exc:
            raise CliError(str(exc)) from None
        return await _run_against(scenario, args, state["management"], owner,
                                  cluster_tls(args.data_dir))
    scratch = None
    try:
        spec = scenario_cluster(scenario, args.seed, args.auth)
        data_dir = args.data_dir
        if data_dir is None:
            scratch = tempfile.TemporaryDirectory(prefix="georeg-chaos-")
            data_dir = Path(scratch.name)
        print(f"starting a cluster for the scenario in {data_dir} …", file=sys.stderr)
        async with await Cluster.start(spec, data_dir) as cluster, \
                ManagementServer(cluster) as management:
            owner = cluster.secrets.owner if cluster.secrets is not None else None
            return await _run_against(scenario, args, management.url, owner,
                                      cluster.tls.client if cluster.tls is not None else None)
    finally:
        if scratch is not None:
            scratch.cleanup()


def scenario_cluster(scenario, seed: int | None = None,
                     auth: str | None = None) -> specs.ClusterSpec:
    """The cluster a scenario starts when none runs: the default spec on any
    free ports (with ``auth`` when given), seeded with the run's seed, so its
    links replay with the scenario."""
    spec = specs.load(None)
    if auth is not None:
        spec = spec.with_auth(auth)
    return on_any_ports(spec.seeded(run_seed(scenario, seed)))


def _has_auth(data_dir: Path) -> bool:
    spec = saved_spec(data_dir)
    return spec is not None and spec.auth_enabled


async def _run_against(scenario, args, management: str, owner: str | None, tls=None) -> dict:
    run = ChaosRun(scenario, management, seed=args.seed, scale=args.scale, owner=owner, tls=tls)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(),
                  transient=True) as progress:
        task = progress.add_task(f"{scenario.name}", total=scenario.duration_s * args.scale)
        return await run.run(lambda done, total: progress.update(task, completed=done))
