"""``georeg purge`` (after ``acr purge``): delete old tags by filter, and with
``--untagged`` the manifests left without a tag, through the registry's own
data plane (``cluster.control.purge`` has the rules). It talks to one
replica's regional endpoint (``--region``, default the home region) as a
client, with the admin user's credentials on a cluster with auth (or
``--username``/``--password``); its deletes replicate like any other. Content
confined to a region is seen only through that region: purge it with
``--region`` there.

Exit status: 0 when done (what was deleted, or would be with --dry-run, and
what was skipped as locked or in use, one line each); 1 when some deletes
failed (each named with the registry's answer; the others were made and are
listed); 2 for bad input — a regex that does not compile, a filter without
``:``, an ``--ago`` that is no duration, a filter that matches no repository —
with nothing deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp

from ..control import purge as purges
from ..control.access import AdminLogin
from .common import CliError, add_data_dir, admin_login, call, cluster_tls, command, data_dir_of


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "purge", help="delete old tags and untagged manifests by filter (acr purge)",
        description="As acr purge: delete the tags a --filter matches (REPO_REGEX:TAG_REGEX, "
                    "each regex matching a whole name) that were last updated longer than --ago "
                    "ago (2d3h6m, 7d, 90m, 0d), keeping the --keep most recent of each "
                    "repository; with --untagged, then the manifests with no "
                    "tag older than --ago, except what an index that stays holds and referrers "
                    "of images that stay. Locked tags and manifests are skipped and named. "
                    "--dry-run says what would go. A client of the data plane: its deletes "
                    "replicate to every region. docs/lifecycle.md has the rules.")
    purges.add_arguments(p)
    p.add_argument("--username", "-u", help="a registry user (default: the admin user)")
    p.add_argument("--password", "-p", help="its password or token")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_data_dir(p)
    p.set_defaults(func=command(run_purge))


def run_purge(args: argparse.Namespace) -> int:
    try:
        request = purges.request_of(args)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    data_dir = data_dir_of(args)
    status = call(data_dir, "GET", "/georeg/v1/cluster")
    region = request.region or status["home_region"]
    base = status["regional_endpoints"].get(region)
    if base is None:
        raise CliError(f"{region} has no regional endpoint here; the replicas are "
                       f"{', '.join(sorted(status['regional_endpoints'])) or 'none routed'}")
    if args.username is not None:
        login = AdminLogin(args.username, args.password or "")
    elif status.get("auth") == "token":
        login = admin_login(data_dir)
    else:
        login = None
    headers = login.headers() if login is not None else {}
    tls = cluster_tls(data_dir) if base.startswith("https:") else None
    try:
        report = asyncio.run(purges.run_purge(base, headers, request, time.time(), tls))
    except purges.PurgeError as exc:
        raise CliError(str(exc)) from None
    except aiohttp.ClientError as exc:
        raise CliError(f"{base} cannot be reached: {exc}") from None
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for line in purges.summary(report):
            print(line)
    return 1 if report.failed else 0
