"""``georeg build`` (after ``az acr build``) and ``georeg task`` runs: a local
build context is uploaded to the running cluster as a gzip tar archive, built
by the build agent of one region (``cluster.control.builds``) and pushed
there; the run's log is streamed here as it is written.

The build is authorised with the caller's registry login (``--username``
with ``--password-stdin``; by default the admin user's, as ``georeg login``
writes it): it must be allowed to push to the image's repository.

Exit status: 0 when the run succeeded, 1 when it failed, timed out or was
canceled (its log says why), 2 when the cluster refused it before it ran.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tarfile
import tempfile
from pathlib import Path
from urllib.parse import quote, urlencode

from registry_node.tasks import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S

from ..control.state import saved_spec
from .common import CliError, add_data_dir, admin_login, call, call_streaming, command, data_dir_of

# A build's own timeout bounds it on the cluster; this bounds the wait for a log chunk.
LOG_TIMEOUT_S = 600


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build", help="build an image in a region of the cluster (az acr build)",
        description="Upload CONTEXT (a directory) and build its Containerfile with buildah in "
                    "one region's build agent (default: the home region); the image is pushed "
                    "there and replicated like any push. FROM images come from this registry: "
                    "write FROM {{.Run.Registry}}/REPO:TAG. Run variables {{.Run.ID}}, "
                    "{{.Run.Registry}}, {{.Run.Date}} are substituted in the Containerfile and "
                    "-t. Exit status 0 on success, 1 if the run failed, 2 if it was refused.")
    p.add_argument("context", type=Path, metavar="CONTEXT", help="the build context directory")
    p.add_argument("-t", "--image", required=True, metavar="REPO:TAG",
                   help="the image to build and push")
    add_run_options(p)
    p.set_defaults(func=command(run_build))


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--file", metavar="PATH",
                   help="the Containerfile, relative to the context (default: Containerfile, "
                        "else Dockerfile)")
    p.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a build argument (repeatable; not for secrets: local users "
                        "can read it on buildah's command line)")
    p.add_argument("--region", help="the region whose build agent builds and pushes "
                                    "(default: the home region)")
    p.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help=f"the run's timeout (default {DEFAULT_TIMEOUT_S}, at most "
                        f"{MAX_TIMEOUT_S}: the 3-hour login the agent works with, less "
                        f"time for the push)")
    p.add_argument("--username", "-u", help="the registry login the build pushes as (default: "
                                            "the admin user); its password on stdin")
    p.add_argument("--password-stdin", action="store_true",
                   help="read --username's password from stdin (one line)")
    p.add_argument("--no-logs", action="store_true",
                   help="queue the run and print its id; do not wait for it")
    add_data_dir(p)


def registry_login_header(args: argparse.Namespace, data_dir: Path) -> dict[str, str]:
    """The caller's registry login, for a cluster with auth."""
    spec = saved_spec(data_dir)
    if spec is not None and not spec.auth_enabled:
        return {}
    if args.username is not None:
        if not args.password_stdin:
            raise CliError("--username needs --password-stdin (a password on the command line "
                           "is visible to every user)")
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CliError("--password-stdin: stdin gave no password")
        username = args.username
    else:
        admin = admin_login(data_dir)
        username, password = admin.username, admin.password
    value = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"X-Registry-Authorization": f"Basic {value}"}


def _context_archive(context: Path, into) -> None:
    if not context.is_dir():
        raise CliError(f"{context} is not a directory: give the build context directory")
    with tarfile.open(fileobj=into, mode="w:gz") as tar:
        tar.add(context, arcname=".")
    into.flush()
    into.seek(0)


def run_build(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    query = [("image", args.image), ("timeout", str(args.timeout))]
    query += [("file", args.file)] if args.file else []
    query += [("region", args.region)] if args.region else []
    query += [("buildArg", a) for a in args.build_arg]
    headers = {**registry_login_header(args, data_dir),
               "Content-Type": "application/gzip"}
    with tempfile.TemporaryFile() as archive:
        _context_archive(args.context, archive)
        size = archive.seek(0, 2)
        archive.seek(0)
        headers["Content-Length"] = str(size)
        answer = b"".join(call_streaming(data_dir, "POST", f"/georeg/v1/builds?{urlencode(query)}",
                                         archive, headers, timeout=LOG_TIMEOUT_S))
    run = json.loads(answer)
    print(f"Queued a build with run ID: {run['runId']}", file=sys.stderr)
    if args.no_logs:
        print(run["runId"])
        return 0
    return follow(data_dir, run["runId"])


def follow(data_dir: Path, run_id: str) -> int:
    """The run's log streamed to stdout until it ends; 0 if it succeeded."""
    for chunk in call_streaming(data_dir, "GET", f"/georeg/v1/runs/{quote(run_id)}/log"
                                                 f"?follow=true", timeout=LOG_TIMEOUT_S):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
    run = call(data_dir, "GET", f"/georeg/v1/runs/{quote(run_id)}")
    for image in run["outputImages"]:
        print(f"{image['registry']}/{image['repository']}:{image['tag']}@{image['digest']}",
              file=sys.stderr)
    print(f"Run ID: {run_id} was {run['status']}", file=sys.stderr)
    return 0 if run["status"] == "Succeeded" else 1
