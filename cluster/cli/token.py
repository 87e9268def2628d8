"""``georeg token …``: repository-scoped tokens, after ``az acr token``. A
token's name is its username; its two passwords are shown once, when created
or generated, and are never readable again. A token uses one scope map, given
by name or made from ``--repository`` (``<token>-scope-map``, as ACR does).
Changes go through the home region.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse

from rich.console import Console
from rich.table import Table

from .common import add_data_dir, call, command, data_dir_of
from .scope_map import add_repository, repositories

SHOWN_ONCE = ("georeg: the passwords above are shown this once; store them now "
              "(`georeg token credential generate` makes new ones)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "token", help="repository-scoped tokens and their passwords (az acr token)",
        description="Tokens: a username (the token's name) and two passwords that give what "
                    "one scope map allows. At most 100 / 500 / 50,000 per registry on Basic / "
                    "Standard / Premium. Changes go through the home region: while it cannot "
                    "be reached they fail with exit status 2; every replica keeps enforcing "
                    "what it holds.")
    commands = p.add_subparsers(dest="token_command", required=True, metavar="COMMAND")

    c = commands.add_parser("create", help="create a token; prints its passwords once",
                            description="Create a token with two generated passwords, printed "
                                        "once as JSON. Give --scope-map, or --repository to "
                                        "create the scope map <token>-scope-map.")
    c.add_argument("--name", required=True, help="the token's name (its username)")
    c.add_argument("--scope-map", help="an existing scope map (system or user)")
    add_repository(c)
    c.add_argument("--status", choices=("enabled", "disabled"), default="enabled")
    c.add_argument("--expiration-in-days", type=int, metavar="N",
                   help="the passwords expire after N days (default: never)")
    add_data_dir(c)
    c.set_defaults(func=command(run_create), parser=c)

    c = commands.add_parser("list", help="list tokens (never their passwords)")
    c.add_argument("--json", action="store_true", help="print JSON")
    add_data_dir(c)
    c.set_defaults(func=command(run_list))

    c = commands.add_parser("show", help="show one token (JSON, no password values)")
    c.add_argument("--name", required=True)
    add_data_dir(c)
    c.set_defaults(func=command(run_show))

    c = commands.add_parser("update", help="change a token's scope map or status",
                            description="A disabled token cannot log in, and tokens it was "
                                        "given stop working, on each replica as the change "
                                        "reaches it.")
    c.add_argument("--name", required=True)
    c.add_argument("--scope-map")
    c.add_argument("--status", choices=("enabled", "disabled"))
    add_data_dir(c)
    c.set_defaults(func=command(run_update), parser=c)

    c = commands.add_parser("delete", help="delete a token (its scope map stays)")
    c.add_argument("--name", required=True)
    add_data_dir(c)
    c.set_defaults(func=command(run_delete))

    cred = commands.add_parser("credential", help="a token's passwords")
    cred_commands = cred.add_subparsers(dest="token_credential_command", required=True,
                                        metavar="COMMAND")
    c = cred_commands.add_parser(
        "generate", help="a new value for password1 or password2; printed once",
        description="Replace one of the token's passwords with a generated one, printed once; "
                    "the old value stops working on each replica as the change reaches it.")
    c.add_argument("--name", required=True, help="the token")
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--password1", action="store_const", const="password1", dest="slot")
    which.add_argument("--password2", action="store_const", const="password2", dest="slot")
    c.add_argument("--expiration-in-days", type=int, metavar="N",
                   help="the new password expires after N days (default: never)")
    add_data_dir(c)
    c.set_defaults(func=command(run_generate))


def _path(name: str = "") -> str:
    return "/georeg/v1/tokens" + ("/" + urllib.parse.quote(name, safe="") if name else "")


def run_create(args: argparse.Namespace) -> int:
    if bool(args.scope_map) == bool(args.repository):
        args.parser.error("give either --scope-map or --repository")
    body = {"name": args.name, "status": args.status,
            "repositories": repositories(args.parser, args.repository, "--repository")}
    if args.scope_map:
        body["scopeMap"] = args.scope_map
    if args.expiration_in_days is not None:
        body["expirationInDays"] = args.expiration_in_days
    print(json.dumps(call(data_dir_of(args), "POST", _path(), body), indent=2))
    print(SHOWN_ONCE, file=sys.stderr)
    return 0


def run_list(args: argparse.Namespace) -> int:
    tokens = call(data_dir_of(args), "GET", _path())
    if args.json:
        print(json.dumps(tokens, indent=2))
        return 0
    table = Table("name", "status", "scope map", "created", "passwords (expiry)")
    for t in tokens:
        table.add_row(t["name"], t["status"], t["scopeMap"], t["creationDate"] or "",
                      ", ".join(f"{p['name']} ({p['expiry'] or 'never'})"
                                for p in t["credentials"]["passwords"]))
    Console().print(table)
    return 0


def run_show(args: argparse.Namespace) -> int:
    print(json.dumps(call(data_dir_of(args), "GET", _path(args.name)), indent=2))
    return 0


def run_update(args: argparse.Namespace) -> int:
    body = {k: v for k, v in (("scopeMap", args.scope_map), ("status", args.status)) if v}
    if not body:
        args.parser.error("give --scope-map and/or --status")
    print(json.dumps(call(data_dir_of(args), "PATCH", _path(args.name), body), indent=2))
    return 0


def run_delete(args: argparse.Namespace) -> int:
    call(data_dir_of(args), "DELETE", _path(args.name))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    body: dict = {"name": args.slot}
    if args.expiration_in_days is not None:
        body["expirationInDays"] = args.expiration_in_days
    print(json.dumps(call(data_dir_of(args), "POST", _path(args.name) + "/credentials", body),
                     indent=2))
    print(SHOWN_ONCE, file=sys.stderr)
    return 0
