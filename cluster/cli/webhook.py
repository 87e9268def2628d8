"""``georeg webhook …``: webhooks, after ``az acr webhook``. A webhook belongs
to one replica's region (``--location``, default the home region): the nodes
there POST an event to its URI for what that replica receives — the push it
took, and the copy when it lands there. Changes go through the home region;
list, show and get-config answer from any region, and ping, list-events and
redeliver from the webhook's own. The URI and custom headers, which often
carry the receiver's credential, are shown only by ``get-config``.
"""

from __future__ import annotations

import argparse
import json
import urllib.parse

from rich.console import Console
from rich.table import Table

from .common import add_data_dir, call, command, data_dir_of

ACR_ACTIONS = "push, delete, quarantine, chart_push, chart_delete"
GEOREG_ACTIONS = "replicated, replication_failed"
ACTIONS_HELP = (f"what fires it, one or more of: {ACR_ACTIONS} (ACR's), and georeg's own "
                f"{GEOREG_ACTIONS} (every replica residency allows has the image / a replica "
                "gave up on it)")
SCOPE_HELP = ("which repositories and tags fire it: 'repo:tag' one tag, 'repo:*' every tag of a repository, "
              "'repo' the same as 'repo:latest'; empty (the default) every repository")
HEADERS_HELP = ("custom headers sent with every delivery, as KEY=VALUE (KEY alone for an "
                "empty value); shown again only by get-config")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "webhook", help="webhooks that tell a receiver what each replica received (az acr webhook)",
        description="Webhooks: an HTTP POST to a URI when a replica receives a push (or a "
                    "delete, a quarantine, a Helm chart), in the region the webhook belongs to; "
                    "georeg retries a delivery that fails, keeps a log of them (list-events) and "
                    "adds 'replicated' (every region has the image) and 'replication_failed'. At "
                    "most 2 / 10 / 500 per registry on Basic / Standard / Premium. Changes go "
                    "through the home region: while it cannot be reached they fail with exit "
                    "status 2; every replica keeps delivering what it holds.")
    commands = p.add_subparsers(dest="webhook_command", required=True, metavar="COMMAND")

    c = commands.add_parser(
        "create", help="create a webhook",
        description="Create a webhook in one replica's region. Prints it as JSON, without its "
                    "URI and header values (`georeg webhook get-config` shows those).")
    _add_name(c)
    c.add_argument("--uri", required=True, metavar="URI",
                   help="the service URI events are POSTed to (http:// or https://)")
    c.add_argument("--actions", required=True, nargs="+", metavar="ACTION", help=ACTIONS_HELP)
    _add_settings(c)
    add_data_dir(c)
    c.set_defaults(func=command(run_create))

    c = commands.add_parser("list", help="list webhooks (never their URI or header values)")
    c.add_argument("--json", action="store_true", help="print JSON")
    add_data_dir(c)
    c.set_defaults(func=command(run_list))

    c = commands.add_parser("show", help="show one webhook (JSON, no URI or header values)")
    _add_name(c)
    add_data_dir(c)
    c.set_defaults(func=command(run_show))

    c = commands.add_parser(
        "update", help="change a webhook; what is not given stays",
        description="Change what is given and keep the rest. --headers replaces every custom "
                    "header (--headers '' removes them). A disabled webhook fires no event.")
    _add_name(c)
    c.add_argument("--uri", metavar="URI", help="a new service URI")
    c.add_argument("--actions", nargs="+", metavar="ACTION", help=ACTIONS_HELP)
    _add_settings(c, defaults=False)
    add_data_dir(c)
    c.set_defaults(func=command(run_update), parser=c)

    c = commands.add_parser("delete", help="delete a webhook")
    _add_name(c)
    add_data_dir(c)
    c.set_defaults(func=command(run_delete))

    c = commands.add_parser(
        "get-config", help="the webhook's service URI and custom headers, values included",
        description="Prints {\"serviceUri\", \"customHeaders\"} as JSON: the one command that "
                    "shows them (they often carry the receiver's credential).")
    _add_name(c)
    add_data_dir(c)
    c.set_defaults(func=command(run_get_config))

    c = commands.add_parser(
        "ping", help="send the webhook a ping event; prints its id",
        description="Queue a ping event in the webhook's region and print its id; "
                    "`georeg webhook list-events` shows how its delivery went. Works while the "
                    "home region is down, not while the webhook's region is.")
    _add_name(c)
    add_data_dir(c)
    c.set_defaults(func=command(run_ping))

    c = commands.add_parser(
        "list-events", help="the webhook's deliveries, newest first",
        description="The deliveries the webhook's region keeps, newest first: each event's "
                    "action, state (pending, delivered, failed, gave_up), attempts with their "
                    "status and timing, the request sent (custom header values as ***) and the "
                    "receiver's response.")
    _add_name(c)
    c.add_argument("--limit", type=int, metavar="N", help="at most N events (1 to 1000)")
    c.add_argument("--json", action="store_true", help="print JSON (requests and responses)")
    add_data_dir(c)
    c.set_defaults(func=command(run_list_events))

    c = commands.add_parser(
        "redeliver", help="send one event again",
        description="Queue one event for delivery again, in the webhook's region; prints the "
                    "id its delivery is listed under (`georeg webhook list-events`).")
    _add_name(c)
    c.add_argument("event_id", metavar="EVENT_ID", help="the event, as list-events shows it")
    add_data_dir(c)
    c.set_defaults(func=command(run_redeliver))


def _add_name(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", "-n", required=True,
                   help="the webhook's name: 5 to 50 letters and digits")


def _add_settings(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    p.add_argument("--scope", default="" if defaults else None, help=SCOPE_HELP)
    p.add_argument("--headers", nargs="*", metavar="KEY=VALUE", help=HEADERS_HELP)
    p.add_argument("--status", choices=("enabled", "disabled"),
                   default="enabled" if defaults else None,
                   help="a disabled webhook fires no event" + (" (default enabled)" if defaults
                                                              else ""))
    p.add_argument("--location", metavar="REGION",
                   help="the replica region whose nodes fire it" + (
                       " (default: the home region)" if defaults else ""))
    p.add_argument("--receiver-location", metavar="REGION",
                   help="where the receiver sits, for the modelled WAN's latency (default: the "
                        "webhook's region)")


def _headers(entries: list[str] | None) -> dict[str, str] | None:
    """``KEY=VALUE ...`` as a dict; ``''`` alone (az's way to clear them) as {}."""
    if entries is None:
        return None
    headers = {}
    for entry in entries:
        if entry == "":
            continue
        key, _, value = entry.partition("=")
        headers[key] = value
    return headers


def _path(name: str = "", *rest: str) -> str:
    parts = [name, *rest] if name else []
    return "/georeg/v1/webhooks" + "".join("/" + urllib.parse.quote(p, safe="") for p in parts)


def _settings(args: argparse.Namespace) -> dict:
    return {k: v for k, v in (("scope", args.scope), ("customHeaders", _headers(args.headers)),
                              ("status", args.status), ("location", args.location),
                              ("receiverLocation", args.receiver_location)) if v is not None}


def _print(answer: object) -> None:
    print(json.dumps(answer, indent=2))


def run_create(args: argparse.Namespace) -> int:
    body = {"name": args.name, "serviceUri": args.uri, "actions": args.actions, **_settings(args)}
    _print(call(data_dir_of(args), "POST", _path(), body))
    return 0


def run_list(args: argparse.Namespace) -> int:
    webhooks = call(data_dir_of(args), "GET", _path())
    if args.json:
        _print(webhooks)
        return 0
    table = Table("name", "location", "actions", "scope", "status", "created")
    for w in webhooks:
        table.add_row(w["name"], w["location"], " ".join(w["actions"]), w["scope"] or "(all)",
                      w["status"], w["creationDate"] or "")
    Console().print(table)
    return 0


def run_show(args: argparse.Namespace) -> int:
    _print(call(data_dir_of(args), "GET", _path(args.name)))
    return 0


def run_update(args: argparse.Namespace) -> int:
    body = {k: v for k, v in (("serviceUri", args.uri), ("actions", args.actions)) if v is not None}
    body.update(_settings(args))
    if not body:
        args.parser.error("give at least one of --uri, --actions, --scope, --headers, --status, "
                          "--location, --receiver-location")
    _print(call(data_dir_of(args), "PATCH", _path(args.name), body))
    return 0


def run_delete(args: argparse.Namespace) -> int:
    call(data_dir_of(args), "DELETE", _path(args.name))
    return 0


def run_get_config(args: argparse.Namespace) -> int:
    _print(call(data_dir_of(args), "GET", _path(args.name, "config")))
    return 0


def run_ping(args: argparse.Namespace) -> int:
    _print(call(data_dir_of(args), "POST", _path(args.name, "ping")))
    return 0


def run_list_events(args: argparse.Namespace) -> int:
    query = f"?limit={args.limit}" if args.limit is not None else ""
    events = call(data_dir_of(args), "GET", _path(args.name, "events") + query)
    if args.json:
        _print(events)
        return 0
    table = Table("id", "action", "state", "attempts", "last status", "created")
    for e in events:
        attempts = e["attempts"]
        last = attempts[-1] if attempts else {}
        table.add_row(str(e["id"]), str(e["action"]), str(e["state"]), str(len(attempts)),
                      str(last.get("status") or last.get("error") or ""), str(e["created"] or ""))
    Console().print(table)
    return 0


def run_redeliver(args: argparse.Namespace) -> int:
    _print(call(data_dir_of(args), "POST", _path(args.name, "events", args.event_id, "redeliver")))
    return 0
