"""``georeg registry …``: the registry resource itself, after ``az acr show``
and ``az acr update``: its admin user and anonymous pull switches. They are
registry configuration (``registry_node.configuration``): written through the
home region's management API and replicated to every node, which enforces
what it holds.
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from .common import add_data_dir, call, command, data_dir_of

_BOOL = ("true", "false")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "registry", help="the registry's own settings (az acr show / az acr update)",
        description="The registry resource: its name, tier, home region, and the switches "
                    "for the admin user and anonymous pull. Changes go through the home region, "
                    "which holds the control plane: while it cannot be reached (down, or cut off "
                    "from the network), update fails with exit status 2; every node keeps "
                    "enforcing the settings it has.")
    commands = p.add_subparsers(dest="registry_command", required=True, metavar="COMMAND")

    c = commands.add_parser("show", help="the registry and its settings",
                            description="Show the registry: name, home region (location), tier, "
                                        "adminUserEnabled, anonymousPullEnabled.")
    c.add_argument("--json", action="store_true", help="print the raw JSON answer")
    add_data_dir(c)
    c.set_defaults(func=command(run_registry_show))

    c = commands.add_parser(
        "update", help="turn the admin user or anonymous pull on or off",
        description="Change the registry's switches; those not given keep their value. "
                    "--admin-enabled: the admin user (username = registry name), disabled by "
                    "default, as in ACR. --anonymous-pull-enabled: unauthenticated pulls "
                    "(data-plane reads only; the Standard and Premium tiers only). The change "
                    "is written in the home region and reaches every replica by replication.")
    c.add_argument("--admin-enabled", choices=_BOOL, help="enable the admin user")
    c.add_argument("--anonymous-pull-enabled", choices=_BOOL, help="allow anonymous pull")
    add_data_dir(c)
    c.set_defaults(func=command(run_registry_update), parser=c)


def _show(registry: dict) -> None:
    table = Table("name", "location", "sku", "admin user", "anonymous pull")
    table.add_row(registry["name"], registry["location"], registry["sku"]["name"],
                  "enabled" if registry["adminUserEnabled"] else "disabled",
                  "enabled" if registry["anonymousPullEnabled"] else "disabled")
    Console().print(table)


def run_registry_show(args: argparse.Namespace) -> int:
    registry = call(data_dir_of(args), "GET", "/georeg/v1/registry")
    if args.json:
        print(json.dumps(registry, indent=2))
    else:
        _show(registry)
    return 0


def run_registry_update(args: argparse.Namespace) -> int:
    body = {}
    if args.admin_enabled is not None:
        body["adminUserEnabled"] = args.admin_enabled == "true"
    if args.anonymous_pull_enabled is not None:
        body["anonymousPullEnabled"] = args.anonymous_pull_enabled == "true"
    if not body:
        args.parser.error("give --admin-enabled and/or --anonymous-pull-enabled")
    _show(call(data_dir_of(args), "PATCH", "/georeg/v1/registry", body))
    return 0
