"""``georeg schedule list | run``: the spec's ``[[schedules]]`` as the running
cluster's control process runs them (``cluster.control.schedules``): each
with its cron, command, last run (start, end, result, what it did) and next
time; and one run now, outside its times.
"""

from __future__ import annotations

import argparse
import json
import urllib.parse

from rich.console import Console
from rich.table import Table

from .common import add_data_dir, call, command, data_dir_of

# A purge lists and deletes through the data plane; its answer comes when it is done.
RUN_TIMEOUT_S = 3600


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "schedule", help="the spec's scheduled jobs: list them, run one now",
        description="The jobs the spec's [[schedules]] declare (name, five-field cron in UTC, "
                    "a purge command), run by the cluster's control process at their times. "
                    "docs/lifecycle.md has the rules.")
    commands = p.add_subparsers(dest="schedule_command", required=True, metavar="COMMAND")
    c = commands.add_parser("list", help="each schedule with its last run and next time",
                            description="Each schedule: cron, command, last run (start, end, "
                                        "Succeeded or Failed, what it deleted or why it "
                                        "failed) and the next time it runs.")
    c.add_argument("--json", action="store_true", help="print the raw JSON answer")
    add_data_dir(c)
    c.set_defaults(func=command(run_schedule_list))
    c = commands.add_parser("run", help="run one schedule now",
                            description="Run a schedule's command now, outside its times; the "
                                        "run is recorded like a scheduled one. Exit status 1 "
                                        "when the run failed, 2 for an unknown schedule.")
    c.add_argument("name")
    add_data_dir(c)
    c.set_defaults(func=command(run_schedule_run))


def _outcome(run: dict | None) -> str:
    if run is None:
        return "-"
    detail = run["detail"]
    if run["result"] != "Succeeded":
        return f"{run['result']}: {detail.get('error', '')}"
    return (f"Succeeded: {len(detail.get('tagsDeleted', []))} tags, "
            f"{len(detail.get('manifestsDeleted', []))} manifests deleted, "
            f"{len(detail.get('skipped', []))} skipped")


def run_schedule_list(args: argparse.Namespace) -> int:
    schedules = call(data_dir_of(args), "GET", "/georeg/v1/schedules")
    if args.json:
        print(json.dumps(schedules, indent=2))
        return 0
    table = Table("name", "cron", "command", "last run", "result", "next run")
    for s in schedules:
        last = s["lastRun"]
        table.add_row(s["name"], s["cron"], s["command"], last["started"] if last else "-",
                      _outcome(last), s["nextRun"] or "-")
    Console().print(table)
    return 0


def run_schedule_run(args: argparse.Namespace) -> int:
    run = call(data_dir_of(args), "POST",
               f"/georeg/v1/schedules/{urllib.parse.quote(args.name, safe='')}/run",
               timeout=RUN_TIMEOUT_S)
    print(json.dumps(run, indent=2))
    return 0 if run["result"] == "Succeeded" else 1
