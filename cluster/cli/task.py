"""``georeg task`` (after ``az acr task``): tasks — named builds of a context
directory or a git branch on the cluster's machine (``cluster.control.tasks``),
created and changed here, run by hand or by their base-image and commit
triggers (``cluster.control.triggers``) — and the runs of tasks and quick
builds (``cluster.control.builds``): their list with what triggered each, one
run, its log, canceling one.

Exit status: 0; 1 when a run that ``task run`` waited for did not succeed;
2 when the cluster refuses (no such task or run; a run that has ended cannot
be canceled).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from urllib.parse import quote, urlencode

from registry_node.identities import InvalidValue
from registry_node.tasks import DEFAULT_TIMEOUT_S, build_arg

from .build import follow, registry_login_header
from .common import CliError, add_data_dir, call, call_streaming, command, data_dir_of


def register(sub: argparse._SubParsersAction) -> None:
    task = sub.add_parser("task", help="tasks and their runs (az acr task)",
                          description="Runs of quick builds (georeg build) and tasks.")
    verbs = task.add_subparsers(dest="verb", required=True, metavar="VERB")

    for verb, helps, func in (("create", "create a task: a build of a context directory "
                                         "or a git branch", create),
                              ("update", "change a task: the options given change, the "
                                         "others stay", update)):
        creating = verb == "create"
        p = verbs.add_parser(verb, help=helps)
        p.add_argument("--name", "-n", required=True)
        p.add_argument("--image", "-t", required=creating, metavar="REPO:TAG",
                       help="the image it builds; run variables allowed ({{.Run.ID}})")
        p.add_argument("--context", "-c", required=creating, type=Path, metavar="DIR",
                       help="the build context: a directory on the cluster's machine, or a "
                            "git repository there (with --branch)")
        p.add_argument("--branch", metavar="BRANCH",
                       help="build the tip of this branch of the git repository at --context "
                            "(its committed tree, not the working copy)")
        p.add_argument("--file", "-f", metavar="PATH", help="the Containerfile, relative to "
                                                            "the context (default: Containerfile)")
        p.add_argument("--build-arg", action="append", default=None, metavar="KEY=VALUE",
                       help="repeat for each; on update, the given ones replace them all")
        p.add_argument("--region", help="the region whose build agent runs it (default: home)")
        p.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_S if creating else None,
                       metavar="SECONDS")
        p.add_argument("--base-image-trigger-enabled", choices=("true", "false"),
                       default="true" if creating else None,
                       help="rebuild when the tag of its runtime base image moves in its "
                            "region (default true)")
        p.add_argument("--commit-trigger-enabled", choices=("true", "false"),
                       help="rebuild when --branch gets a new commit (default false)")
        if not creating:
            p.add_argument("--status", choices=("Enabled", "Disabled"),
                           help="a disabled task neither runs nor is triggered")
        add_data_dir(p)
        p.set_defaults(func=command(func))

    for verb, helps, func in (("show", "one task", show), ("delete", "delete a task", delete)):
        p = verbs.add_parser(verb, help=helps)
        p.add_argument("--name", "-n", required=True)
        add_data_dir(p)
        p.set_defaults(func=command(func))

    p = verbs.add_parser("list", help="tasks")
    p.add_argument("--json", action="store_true")
    add_data_dir(p)
    p.set_defaults(func=command(list_tasks))

    p = verbs.add_parser("run", help="run a task now, its log streamed here")
    p.add_argument("--name", "-n", required=True)
    p.add_argument("--username", "-u", help="the registry login the run pushes as (default: "
                                            "the admin user); its password on stdin")
    p.add_argument("--password-stdin", action="store_true")
    p.add_argument("--no-logs", action="store_true", help="print the run's id; do not wait")
    add_data_dir(p)
    p.set_defaults(func=command(run))

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


def _task_path(name: str, rest: str = "") -> str:
    return f"/georeg/v1/tasks/{quote(name, safe='')}{rest}"


def _task_body(args: argparse.Namespace) -> dict:
    """The API's fields for the options given (an option left out is left out)."""
    body: dict = {}
    if args.build_arg is not None:
        body["buildArgs"] = []
        for text in args.build_arg:
            try:
                body["buildArgs"].append(list(build_arg(text)))
            except InvalidValue as exc:
                raise CliError(str(exc)) from None
    if args.context is not None:
        body["contextPath"] = str(args.context.resolve())
    for option, field in (("image", "image"), ("file", "file"), ("region", "region"),
                          ("timeout", "timeout"), ("branch", "branch"),
                          ("status", "status")):
        if getattr(args, option, None) is not None:
            body[field] = getattr(args, option)
    for option, field in (("base_image_trigger_enabled", "baseImageTriggerEnabled"),
                          ("commit_trigger_enabled", "commitTriggerEnabled")):
        if getattr(args, option) is not None:
            body[field] = getattr(args, option) == "true"
    return body


def create(args: argparse.Namespace) -> int:
    body = {"name": args.name, **_task_body(args)}
    print(json.dumps(call(data_dir_of(args), "POST", "/georeg/v1/tasks", body), indent=2))
    return 0


def update(args: argparse.Namespace) -> int:
    body = _task_body(args)
    if not body:
        raise CliError("give at least one option to change (georeg task update --help)")
    print(json.dumps(call(data_dir_of(args), "PATCH", _task_path(args.name), body), indent=2))
    return 0


def show(args: argparse.Namespace) -> int:
    print(json.dumps(call(data_dir_of(args), "GET", _task_path(args.name)), indent=2))
    return 0


def delete(args: argparse.Namespace) -> int:
    call(data_dir_of(args), "DELETE", _task_path(args.name))
    print(f"deleted task {args.name}")
    return 0


def list_tasks(args: argparse.Namespace) -> int:
    tasks = call(data_dir_of(args), "GET", "/georeg/v1/tasks")
    if args.json:
        print(json.dumps(tasks, indent=2))
        return 0
    print(f"{'NAME':<20} {'STATUS':<9} {'REGION':<14} {'IMAGE':<30} CONTEXT")
    for t in tasks:
        print(f"{t['name']:<20} {t['status']:<9} {t['region'] or '(home)':<14} "
              f"{t['image']:<30} {t['contextPath']}")
    return 0


def run(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    headers = registry_login_header(args, data_dir)
    answer = b"".join(call_streaming(data_dir, "POST", _task_path(args.name, "/runs"),
                                     b"", headers))
    run_id = json.loads(answer)["runId"]
    print(f"Queued a run of task {args.name} with run ID: {run_id}", file=sys.stderr)
    if args.no_logs:
        print(run_id)
        return 0
    return follow(data_dir, run_id)


def _run_path(run_id: str, rest: str = "") -> str:
    return f"/georeg/v1/runs/{quote(run_id, safe='')}{rest}"


def list_runs(args: argparse.Namespace) -> int:
    query = f"?{urlencode({'task': args.name})}" if args.name else ""
    runs = call(data_dir_of(args), "GET", f"/georeg/v1/runs{query}")
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    print(f"{'RUN ID':<8} {'TASK':<16} {'STATUS':<10} {'TRIGGER':<13} {'REGION':<14} "
          f"{'STARTED':<26} {'IMAGE':<40} CAUSE")
    for r in runs:
        print(f"{r['runId']:<8} {r['task'] or '':<16} {r['status']:<10} {r['trigger']:<13} "
              f"{r['region']:<14} {r['startTime'] or '':<26} {r['image']:<40} {cause(r)}")
    return 0


def cause(run: dict) -> str:
    """What triggered a run, in a few words: the base image and digest it was
    rebuilt for, or the commit."""
    images = (run.get("imageUpdateTrigger") or {}).get("images")
    if images:
        return f"{images[0]['repository']}:{images[0]['tag']}@{images[0]['digest'][:19]}"
    commit = (run.get("sourceTrigger") or {}).get("commitId")
    return f"{run['sourceTrigger'].get('branchName')}@{commit[:12]}" if commit else ""


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
