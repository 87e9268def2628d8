"""`georeg chaos run FILE|NAME` and `georeg chaos list`: scripted fault scenarios;
`georeg chaos random`: the seeded random nemesis (``cluster.faults.nemesis``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
from pathlib import Path

import msgspec
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from registry_node import logs

from ..control import spec as specs
from ..control.access import CredentialMissing, read_owner_credential
from ..control.cluster import Cluster
from ..control.management import ManagementServer
from ..control.state import running_state, saved_spec
from ..faults import nemesis
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
    c = commands.add_parser(
        "random", help="a seeded random nemesis under the standard workload",
        description="Pushes, pulls, retags and deletes from every client location while a "
                    "seeded nemesis injects and heals random faults; then heals everything "
                    "and checks the invariants: every acknowledged push pullable in every "
                    "region residency allows, tags agreeing everywhere, acknowledged deletes "
                    "applied everywhere, confined content in its region, no plaintext on disk, "
                    "`georeg verify` clean. The schedule is a function of the seed, duration, "
                    "kinds, intensity and the cluster's topology only: the same seed replays "
                    "it. When an invariant breaks, the run is replayed with faults removed "
                    "(--shrink-runs) to find the shortest fault history that still breaks it. "
                    "Runs against the cluster in --data-dir, or one it starts.")
    c.add_argument("--duration", type=float, default=120.0, help="seconds of workload (120)")
    c.add_argument("--seed", type=int, help="the seed to replay (default: a fresh one, printed)")
    c.add_argument("--kinds", metavar="K,K…",
                   help=f"fault kinds to draw from (default all: {', '.join(nemesis.NEMESIS)})")
    c.add_argument("--intensity", type=float, default=nemesis.DEFAULT_INTENSITY,
                   help="faults started per 10 s, on average (1)")
    c.add_argument("--shrink-runs", type=int, default=8, metavar="N",
                   help="replays at most spent shrinking a failing run's fault history (8; 0: "
                        "do not shrink)")
    c.add_argument("--only", metavar="N,N…",
                   help="run only these steps of the schedule (1-based, as numbered in a "
                        "shrunk history's replay line)")
    c.add_argument("--schedule-only", action="store_true",
                   help="print the fault schedule and exit (no run; the topology is that of "
                        "the spec saved in --data-dir, else the default spec's)")
    c.add_argument("--data-dir", type=Path, help="a running cluster's data dir (default: start one)")
    c.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    c.add_argument("--auth", choices=specs.AUTH_MODES,
                   help="access control of a cluster it starts (default: the default spec's)")
    c.set_defaults(func=command(run_random))


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


async def _run_scenario(scenario, args, state, against=None) -> dict:
    """The scenario against the cluster running from --data-dir (``state``), or
    against a cluster started for it here, in --data-dir or a scratch dir.
    ``against(management, owner, tls)`` runs it (default: ``_run_against``)."""
    if against is None:
        def against(management, owner, tls):
            return _run_against(scenario, args, management, owner, tls)
    if state is not None:
        try:
            owner = read_owner_credential(args.data_dir) if _has_auth(args.data_dir) else None
        except CredentialMissing as exc:
            raise CliError(str(exc)) from None
        return await against(state["management"], owner, cluster_tls(args.data_dir))
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
            return await against(management.url, owner,
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


def run_random(args: argparse.Namespace) -> int:
    logs.configure("console", "warning", sys.stderr)
    if args.duration <= 0 or args.intensity <= 0:
        raise CliError("--duration and --intensity must be positive")
    if args.shrink_runs < 0:
        raise CliError("--shrink-runs must not be negative")
    try:
        kinds = nemesis.kinds_from(args.kinds)
    except nemesis.NemesisError as exc:
        raise CliError(str(exc)) from None
    try:
        only = tuple(int(n) for n in args.only.split(",")) if args.only else None
    except ValueError:
        raise CliError(f"--only takes step numbers such as 1,3, not {args.only!r}") from None
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(nemesis.SEED_LIMIT)
    replay = replay_command(seed, args.duration, kinds, args.intensity, args.auth, only)
    print(f"random nemesis, seed {seed} (replay: {replay})", file=sys.stderr)
    scenario = nemesis.scenario(seed, args.duration)
    state = running_state(args.data_dir) if args.data_dir else None
    if args.schedule_only:
        spec = (saved_spec(args.data_dir) if args.data_dir else None) \
            or scenario_cluster(scenario, seed, args.auth)
        topology = nemesis.Topology.from_spec(spec)
        for step in chosen(nemesis.plan(seed, args.duration, kinds, args.intensity, topology),
                           only):
            print(step.describe())
        return 0

    async def against(management, owner, tls) -> dict:
        return await random_run(scenario, kinds, args.intensity, management, owner, tls,
                                shrink_runs=args.shrink_runs, only=only, auth=args.auth)

    try:
        report = asyncio.run(_run_scenario(scenario, args, state, against))
    except ScenarioError as exc:
        raise CliError(str(exc)) from None
    print(random_summary(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


def replay_command(seed: int, duration: float, kinds, intensity: float,
                   auth: str | None = None, only=None) -> str:
    """The command that runs the same schedule again (every input it depends on)."""
    return " ".join(["georeg chaos random", f"--seed {seed}", f"--duration {duration:g}",
                     f"--kinds {','.join(kinds)}", f"--intensity {intensity:g}",
                     *([f"--auth {auth}"] if auth else []),
                     *([f"--only {','.join(map(str, only))}"] if only else [])])


def chosen(steps: list, only) -> list:
    """The steps ``--only`` names (1-based), or all of them."""
    if only is None:
        return steps
    bad = [n for n in only if not 1 <= n <= len(steps)]
    if bad:
        raise CliError(f"--only {bad}: the schedule has steps 1 to {len(steps)}")
    return [steps[n - 1] for n in sorted(set(only))]


def broken_invariants(report: dict) -> list[str]:
    return sorted(report["broken"]) or [k for k, ok in report["checks"].items() if not ok]


async def random_run(scenario, kinds, intensity: float, management: str, owner: str | None,
                     tls=None, *, shrink_runs: int = 0, only=None, auth: str | None = None) -> dict:
    """One random-nemesis run against a cluster (its topology read from the
    management API); if an invariant breaks, its fault history shrunk by up to
    ``shrink_runs`` replays on the same cluster (each in repositories of its own)."""
    status = await ChaosRun(scenario, management, owner=owner, tls=tls).status()
    topology = nemesis.Topology.from_status(status)
    planned = nemesis.plan(scenario.seed, scenario.duration_s, kinds, intensity, topology)
    steps = chosen(planned, only)
    report = await ChaosRun(scenario, management, owner=owner, tls=tls, steps=steps).run()

    def replay(history) -> str:
        numbers = [planned.index(s) + 1 for s in history]
        return replay_command(scenario.seed, scenario.duration_s, kinds, intensity, auth,
                              numbers if numbers != list(range(1, len(planned) + 1)) else None)

    report["replay"] = replay(steps)
    report["nemesis"] = {"kinds": list(kinds), "intensity": intensity,
                         "topology": [f"{r}{'/' + ','.join(z) if z != ('',) else ''}"
                                      for r, z in topology.regions]}
    broken = broken_invariants(report)
    if not broken or not shrink_runs:
        return report
    replays = 0

    async def still_breaks(history) -> bool:
        nonlocal replays
        replays += 1
        print(f"shrinking: replay {replays} of at most {shrink_runs + 1}, "
              f"{len(history)} fault(s)", file=sys.stderr, flush=True)
        again = msgspec.structs.replace(scenario, name=f"{scenario.name}-shrink{replays}")
        # Its own content (salted with its name) and its own repositories
        # judged: what the first run left, broken or not, is not the replay's.
        replay = await ChaosRun(again, management, owner=owner, tls=tls, steps=history,
                                scope=f"chaos/{again.name}/").run()
        return broken[0] in replay["broken"] or not replay["checks"].get(broken[0], True)

    shortest, runs = await nemesis.shrink(steps, still_breaks, shrink_runs)
    # The predicate depends on timing: the shrunk history is confirmed once more.
    confirmed = runs == 0 or await still_breaks(shortest)
    report["shrunk"] = {"invariant": broken[0], "replays": runs + 1, "confirmed": confirmed,
                        "history": [s.describe() for s in shortest],
                        "replay": replay(shortest) if shortest else None}
    return report


def random_summary(report: dict) -> str:
    lines = [summary(report)]
    n = report.get("nemesis")
    if n:
        lines.append(f"  nemesis: kinds {', '.join(n['kinds'])}; intensity {n['intensity']:g}; "
                     f"topology {' '.join(n['topology'])}")
    if not report["passed"]:
        lines.append(f"  BROKEN: {', '.join(broken_invariants(report))}; replay with "
                     f"{report.get('replay') or '--seed ' + str(report['seed'])}")
    shrunk = report.get("shrunk")
    if shrunk:
        lines.append(f"  shortest fault history still breaking {shrunk['invariant']} "
                     f"({shrunk['replays']} replays, "
                     f"{'confirmed' if shrunk['confirmed'] else 'NOT confirmed by a last replay'}): "
                     + ("; ".join(shrunk["history"]) or "none: it breaks without faults"))
        if shrunk["replay"]:
            lines.append(f"  replay it with {shrunk['replay']}")
    return "\n".join(lines)
