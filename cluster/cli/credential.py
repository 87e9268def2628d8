"""``georeg credential …``: the admin user's credentials, after ``az acr
credential show|renew``. The admin user (username = the registry's name) is
disabled until ``georeg registry update --admin-enabled true``, which gives it
two passwords; either can be renewed. Renewing writes through the home region,
so it fails while the home region cannot be reached.
"""

from __future__ import annotations

import argparse
import json

from .common import add_data_dir, call, command, data_dir_of


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "credential", help="the admin user's username and passwords (az acr credential)",
        description="The admin user's credentials. Its username is the registry's name; it has "
                    "two passwords, password and password2, so one can be renewed while clients "
                    "use the other. Enable the admin user first: georeg registry update "
                    "--admin-enabled true.")
    commands = p.add_subparsers(dest="credential_command", required=True, metavar="COMMAND")
    c = commands.add_parser("show", help="print the admin username and both passwords",
                            description="Print the admin user's username and passwords as JSON "
                                        "({\"username\", \"passwords\": [{\"name\", \"value\"}]}).")
    add_data_dir(c)
    c.set_defaults(func=command(run_show))
    c = commands.add_parser(
        "renew", help="replace one admin password with a new one",
        description="Generate a new value for one admin password; the old value stops working "
                    "on each replica as the change reaches it. Prints the credentials.")
    c.add_argument("--password-name", required=True, choices=("password", "password2"),
                   help="which password to renew")
    add_data_dir(c)
    c.set_defaults(func=command(run_renew))


def run_show(args: argparse.Namespace) -> int:
    print(json.dumps(call(data_dir_of(args), "GET", "/georeg/v1/registry/credentials"), indent=2))
    return 0


def run_renew(args: argparse.Namespace) -> int:
    answer = call(data_dir_of(args), "POST", "/georeg/v1/registry/credentials/renew",
                  {"name": args.password_name})
    print(json.dumps(answer, indent=2))
    return 0
