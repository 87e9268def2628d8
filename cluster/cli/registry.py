"""``georeg registry …``: the registry resource itself, after ``az acr show``,
``az acr update`` (its admin user and anonymous pull switches, and its tier,
``--sku``), ``az acr config retention`` (``retention show|update``: the
policy for untagged manifests), ``az acr show-usage`` and ``az acr
check-health``. The switches
and the tier are registry configuration (``registry_node.configuration``):
written through the home region's management API and replicated to every
node, which enforces what it holds. ``show-usage`` and ``check-health`` ask
the running cluster (``cluster.control.usage``, ``cluster.control.health``).
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from registry_node.tiers import TIERS, format_size
from registry_node.untagged import MAX_DAYS, MIN_DAYS, check_days

from . import soft_delete
from .common import add_data_dir, call, command, data_dir_of

_BOOL = ("true", "false")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "registry", help="the registry's own settings (az acr show / az acr update)",
        description="The registry resource: its name, tier, home region, the switches for "
                    "the admin user and anonymous pull, its usage against the tier's limits and "
                    "its health. Changes go through the home region, "
                    "which holds the control plane: while it cannot be reached (down, or cut off "
                    "from the network), update fails with exit status 2; every node keeps "
                    "enforcing the settings it has.")
    commands = p.add_subparsers(dest="registry_command", required=True, metavar="COMMAND")

    c = commands.add_parser("show", help="the registry and its settings",
                            description="Show the registry: name, home region (location), login "
                                        "server, tier (sku), adminUserEnabled, "
                                        "anonymousPullEnabled, zoneRedundancy.")
    c.add_argument("--json", action="store_true", help="print the raw JSON answer")
    add_data_dir(c)
    c.set_defaults(func=command(run_registry_show))

    c = commands.add_parser(
        "update", help="turn the admin user or anonymous pull on or off, or change the tier",
        description="Change the registry's switches or its tier; what is not given keeps its "
                    "value. --admin-enabled: the admin user (username = registry name), disabled "
                    "by default, as in ACR. --anonymous-pull-enabled: unauthenticated pulls "
                    "(data-plane reads only; the Standard and Premium tiers only). --sku: the "
                    "tier, live at once (Basic -> Premium allows replicas without a restart); a "
                    "move down is refused, naming every reason, while the registry holds what "
                    "the lower tier has no room for: replicas or zone redundancy (below "
                    "Premium), more webhooks, tokens or scope maps than it allows, anonymous "
                    "pull (Basic), more storage than its maximum. The change is written in the "
                    "home region and reaches every replica by replication.")
    c.add_argument("--admin-enabled", choices=_BOOL, help="enable the admin user")
    c.add_argument("--anonymous-pull-enabled", choices=_BOOL, help="allow anonymous pull")
    c.add_argument("--sku", type=_tier, metavar="{" + ",".join(TIERS) + "}",
                   help="the registry's tier")
    add_data_dir(c)
    c.set_defaults(func=command(run_registry_update), parser=c)

    _register_retention(commands)

    c = commands.add_parser(
        "show-usage", help="storage and counted resources against the tier's limits",
        description="As az acr show-usage: the registry's storage (Size: counted once for the "
                    "registry, against the tier's included storage), webhooks, scope maps, "
                    "tokens and, on Premium, geo-replications, each against its limit. Then "
                    "georeg's detail: the rule that counted the storage once, the limit uploads "
                    "are refused at (the spec's [limits] storage_limit, else the tier's maximum) "
                    "and every node's usage. --json prints the raw answer (ACR's value[] and "
                    "georeg's storage and replicas).")
    c.add_argument("--json", action="store_true", help="print the raw JSON answer")
    add_data_dir(c)
    c.set_defaults(func=command(run_registry_show_usage))

    c = commands.add_parser(
        "check-health", help="check the registry's endpoints, authentication and replicas",
        description="As az acr check-health --name: the registry side of it, for a local "
                    "cluster. Checks the control plane (a home node answers), every global and "
                    "regional endpoint (reachable, issues a challenge on /v2/), with auth the "
                    "admin user's refresh and access tokens on each, and every replica node. "
                    "Failures carry ACR's error codes (CONNECTIVITY_CHALLENGE_ERROR, …) or "
                    "georeg's (CONTROL_PLANE_UNAVAILABLE, REPLICA_UNAVAILABLE), and the broken "
                    "parts are named by region. Exit status 0 when healthy, 1 when not.")
    c.add_argument("--json", action="store_true", help="print the raw JSON answer")
    add_data_dir(c)
    c.set_defaults(func=command(run_registry_check_health))

    soft_delete.register(commands)


def _register_retention(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "retention", help="the retention policy for untagged manifests (az acr config retention)",
        description="ACR's retention policy for untagged manifests (Premium): once enabled, a "
                    "manifest untagged from then on is deleted when it has been untagged for "
                    "--days (0 to 365, default 7), unless it or its repository is delete- or "
                    "write-locked, an index holds it, or it is a referrer of a present image. "
                    "Each region decides for the manifests first pushed there, and its deletes "
                    "replicate like any other: every region deletes the same manifests. "
                    "docs/lifecycle.md has the rules.")
    retention = p.add_subparsers(dest="retention_command", required=True, metavar="COMMAND")
    c = retention.add_parser("show", help="the policy: days, status, enabled since",
                             description="Show the retention policy: its type "
                                         "(UntaggedManifests), days, status and, when enabled, "
                                         "since when.")
    c.add_argument("--json", action="store_true", help="print the raw JSON answer")
    add_data_dir(c)
    c.set_defaults(func=command(run_retention_show))
    c = retention.add_parser(
        "update", help="set the days or enable/disable the policy",
        description="Change the policy; what is not given keeps its value. Written in the home "
                    "region (exit status 2 while it cannot be reached) and replicated to every "
                    "node. Enabling applies to manifests untagged from then on: those untagged "
                    "before are kept, as in ACR.")
    c.add_argument("--days", type=_days, help="days an untagged manifest is kept (0 to 365)")
    c.add_argument("--status", choices=("enabled", "disabled"), help="enable or disable it")
    c.add_argument("--type", choices=("UntaggedManifests",), default="UntaggedManifests",
                   help="what the policy is about (ACR knows only UntaggedManifests)")
    add_data_dir(c)
    c.set_defaults(func=command(run_retention_update), parser=c)


def _days(value: str) -> int:
    try:
        return check_days(int(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of days from {MIN_DAYS} to "
                                         f"{MAX_DAYS}, not {value!r}") from None


def _show_retention(policy: dict) -> None:
    table = Table("type", "days", "status", "enabled since")
    table.add_row(policy["type"], str(policy["days"]), policy["status"],
                  policy["enabledSince"] or "-")
    Console().print(table)


def run_retention_show(args: argparse.Namespace) -> int:
    policy = call(data_dir_of(args), "GET", "/georeg/v1/registry/retention")
    if args.json:
        print(json.dumps(policy, indent=2))
    else:
        _show_retention(policy)
    return 0


def run_retention_update(args: argparse.Namespace) -> int:
    body = {k: v for k, v in (("days", args.days), ("status", args.status)) if v is not None}
    if not body:
        args.parser.error("give --days and/or --status")
    _show_retention(call(data_dir_of(args), "PATCH", "/georeg/v1/registry/retention", body))
    return 0


def _tier(value: str) -> str:
    for tier in TIERS:
        if tier.lower() == value.lower():
            return tier
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(TIERS)}, got {value!r}")


def _show(registry: dict) -> None:
    table = Table("name", "location", "sku", "admin user", "anonymous pull", "zone redundancy")
    table.add_row(registry["name"], registry["location"], registry["sku"]["name"],
                  "enabled" if registry["adminUserEnabled"] else "disabled",
                  "enabled" if registry["anonymousPullEnabled"] else "disabled",
                  registry.get("zoneRedundancy", "Disabled").lower())
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
    if args.sku is not None:
        body["sku"] = args.sku
    if not body:
        args.parser.error("give --admin-enabled, --anonymous-pull-enabled and/or --sku")
    _show(call(data_dir_of(args), "PATCH", "/georeg/v1/registry", body))
    return 0


def _amount(value: int, unit: str) -> str:
    return format_size(value) if unit == "Bytes" else f"{value:,}"


def run_registry_show_usage(args: argparse.Namespace) -> int:
    usage = call(data_dir_of(args), "GET", "/georeg/v1/registry/usages")
    if args.json:
        print(json.dumps(usage, indent=2))
        return 0
    console = Console()
    table = Table("name", "current value", "limit", "unit")
    for entry in usage["value"]:
        table.add_row(entry["name"], _amount(entry["currentValue"], entry["unit"]),
                      _amount(entry["limit"], entry["unit"]), entry["unit"])
    console.print(table)
    storage = usage["storage"]
    console.print(f"storage counted once: {format_size(storage['bytes'])} ({storage['rule']}); "
                  f"uploads refused past {format_size(storage['limit_bytes'])} "
                  f"({storage['limit']})")
    if "warning" in storage:
        console.print(f"[bold yellow]warning:[/] {storage['warning']}")
    nodes = Table("node", "region", "zone", "bytes", "blobs", "manifests")
    for name, held in usage["replicas"].items():
        nodes.add_row(name, held["region"], held["zone"] or "-", format_size(held["bytes"]),
                      str(held["blobs"]), str(held["manifests"]))
    for name, reason in usage["unavailable"].items():
        nodes.add_row(name, "-", "-", "unavailable", "-", reason)
    console.print(nodes)
    return 0


def run_registry_check_health(args: argparse.Namespace) -> int:
    health = call(data_dir_of(args), "GET", "/georeg/v1/registry/health")
    if args.json:
        print(json.dumps(health, indent=2))
    else:
        for check in health["checks"]:
            outcome = check["status"] if check["status"] != "ERROR" else \
                f"ERROR {check['code']}"
            detail = f" ({check['message']})" if check["message"] else ""
            print(f"{check['check']} [{check['target']}] : {outcome}{detail}")
        if health["broken"]:
            print("broken:")
            for line in health["broken"]:
                print(f"  {line}")
        else:
            print("healthy")
    return 0 if health["healthy"] else 1
