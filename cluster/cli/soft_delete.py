"""``georeg registry soft-delete show|update``: the soft delete policy, after
``az acr config soft-delete``, written through the home region
(``cluster.control.soft_delete``). The recycle bin it fills is read and
emptied by ``georeg repository list-deleted`` and ``restore``.
"""

from __future__ import annotations

import argparse
import json

from registry_node.recycle_bin import MAX_DAYS, MIN_DAYS

from .common import add_data_dir, call, command, data_dir_of


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``soft-delete`` to ``georeg registry``'s commands."""
    p = commands.add_parser(
        "soft-delete", help="the soft delete policy (az acr config soft-delete)",
        description="Soft delete keeps deleted manifests and tags in a recycle bin for "
                    f"{MIN_DAYS} to {MAX_DAYS} days (default 7), listed by `georeg repository "
                    "list-deleted` and brought back by `georeg repository restore`; then they are "
                    "purged. Unlike ACR, it works on a geo-replicated registry and beside the "
                    "retention policy. See docs/soft-delete.md.")
    sub = p.add_subparsers(dest="soft_delete_command", required=True, metavar="COMMAND")
    c = sub.add_parser("show", help="the policy: status and retention days")
    add_data_dir(c)
    c.set_defaults(func=command(run_show))
    c = sub.add_parser(
        "update", help="turn soft delete on or off, or change its days",
        description="Change the policy; what is not given keeps its value. --days counts from "
                    "each delete and is read when entries are purged: raising it keeps what is "
                    "already in the bin longer (ACR's rule). Written in the home region (exit "
                    "status 2 while it cannot be reached) and replicated to every region.")
    c.add_argument("--days", type=_days, metavar=f"{MIN_DAYS}..{MAX_DAYS}",
                   help="days a deleted manifest or tag stays recoverable")
    c.add_argument("--status", choices=("enabled", "disabled"))
    add_data_dir(c)
    c.set_defaults(func=command(run_update), parser=c)


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if not MIN_DAYS <= days <= MAX_DAYS:
        raise argparse.ArgumentTypeError(f"days are {MIN_DAYS} to {MAX_DAYS}, not {days}")
    return days


def run_show(args: argparse.Namespace) -> int:
    print(json.dumps(call(data_dir_of(args), "GET", "/georeg/v1/registry/soft-delete"),
                     indent=2))
    return 0


def run_update(args: argparse.Namespace) -> int:
    body: dict = {}
    if args.status is not None:
        body["status"] = args.status
    if args.days is not None:
        body["retentionDays"] = args.days
    if not body:
        args.parser.error("give --status and/or --days")
    print(json.dumps(call(data_dir_of(args), "PATCH", "/georeg/v1/registry/soft-delete", body),
                     indent=2))
    return 0
