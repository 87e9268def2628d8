"""``georeg task`` (after ``az acr task``): the runs of builds and tasks
(``cluster.control.builds``) — their list, one run, its log, canceling one.

Exit status: 0, or 2 when the cluster refuses (no such run; a run that has
ended cannot be canceled).
"""

from __future__ import annotations

import argparse
import json
import sys
from urllib.parse import quote, urlencode

from .build import follow
from .common import add_data_dir, call, call_streaming, command, data_dir_of


def register(sub: argparse._SubParsersAction) -> None:
    task = sub.add_parser("task", help="tasks and their runs (az acr task)",
                          description="Runs of quick builds (georeg build) and tasks.")
    verbs = task.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("list-runs", help="runs, newest first")
    p.add_argument("--name", help="only the runs of this task")
    p.add_argument("--json", action="store_true", help="print the runs as JSON")
    add_data_dir(p)
    p.set_defaults(func=command(list_runs))

    p = verbs.add_parser("show-run", help="one run as JSON: status, images, base images, times")
    p.add_argument("run_id", metavar="RUN_ID")
    add_data_dir(p)
    p.set_defaults(func=command(show_run))

    p = verbs.add_parser("logs", help="a run's log (followed while it runs)")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--no-follow", action="store_true", help="print what there is and stop")
    add_data_dir(p)
    p.set_defaults(func=command(logs))

    p = verbs.add_parser("cancel-run", help="cancel a queued or running run")
    p.add_argument("run_id", metavar="RUN_ID")
    add_data_dir(p)
    p.set_defaults(func=command(cancel_run))


def _run_path(run_id: str, rest: str = "") -> str:
    return f"/georeg/v1/runs/{quote(run_id, safe='')}{rest}"


def list_runs(args: argparse.Namespace) -> int:
    query = f"?{urlencode({'task': args.name})}" if args.name else ""
    runs = call(data_dir_of(args), "GET", f"/georeg/v1/runs{query}")
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    print(f"{'RUN ID':<8} {'TASK':<16} {'STATUS':<10} {'TRIGGER':<10} {'REGION':<14} "
          f"{'STARTED':<26} IMAGE")
    for r in runs:
        print(f"{r['runId']:<8} {r['task'] or '':<16} {r['status']:<10} {r['trigger']:<10} "
              f"{r['region']:<14} {r['startTime'] or '':<26} {r['image']}")
    return 0


def show_run(args: argparse.Namespace) -> int:
    print(json.dumps(call(data_dir_of(args), "GET", _run_path(args.run_id)), indent=2))
    return 0


def logs(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    if not args.no_follow:
        follow(data_dir, args.run_id)
        return 0
    for chunk in call_streaming(data_dir, "GET", _run_path(args.run_id, "/log")):
        sys.stdout.buffer.write(chunk)
    return 0


def cancel_run(args: argparse.Namespace) -> int:
    run = call(data_dir_of(args), "POST", _run_path(args.run_id, "/cancel"))
    print(f"Run ID: {run['runId']} was {run['status']}")
    return 0
