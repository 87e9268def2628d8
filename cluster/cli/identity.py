"""``georeg identity …`` and ``georeg role assignment …``: identities (the
stand-in for Entra service principals: an id and a secret, which log in
through ``/oauth2/exchange`` as ``az acr login`` does) and the roles given to
them, after ``az role assignment``: AcrPull, AcrPush, AcrDelete,
AcrImageSigner, Reader, Contributor, Owner, on the whole registry or on one
repository (``--scope repository/NAME``). Changes go through the home region.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse

from rich.console import Console
from rich.table import Table

from .common import add_data_dir, call, command, data_dir_of

ROLES = ("AcrPull", "AcrPush", "AcrDelete", "AcrImageSigner", "Reader", "Contributor", "Owner")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "identity", help="identities that log in with an id and a secret (service principals)",
        description="Identities: the stand-in for Entra service principals. Each has an id "
                    "(its username) and a secret, shown once when it is created; what it may do "
                    "comes from its role assignments (georeg role assignment).")
    commands = p.add_subparsers(dest="identity_command", required=True, metavar="COMMAND")
    c = commands.add_parser("create", help="create an identity; prints its id and secret once")
    c.add_argument("--name", required=True, help="a display name")
    add_data_dir(c)
    c.set_defaults(func=command(run_create))
    c = commands.add_parser("list", help="list identities (never their secrets)")
    c.add_argument("--json", action="store_true", help="print JSON")
    add_data_dir(c)
    c.set_defaults(func=command(run_list))
    c = commands.add_parser("delete", help="delete an identity and its role assignments")
    c.add_argument("--id", required=True)
    add_data_dir(c)
    c.set_defaults(func=command(run_delete))


def register_role(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("role", help="roles of identities (az role assignment)")
    groups = p.add_subparsers(dest="role_group", required=True, metavar="GROUP")
    a = groups.add_parser(
        "assignment", help="give, list and take away roles",
        description="Role assignments: an identity (--assignee, its id) gets a role on the whole "
                    "registry, or on one repository with --scope repository/NAME. Roles: "
                    f"{', '.join(ROLES)} (ACR's meanings: AcrPull pulls, AcrPush pulls and "
                    "pushes, AcrDelete deletes, Reader pulls, Contributor and Owner do all).")
    commands = a.add_subparsers(dest="role_command", required=True, metavar="COMMAND")
    c = commands.add_parser("create", help="give an identity a role")
    c.add_argument("--role", required=True, choices=ROLES)
    c.add_argument("--assignee", required=True, help="the identity's id")
    c.add_argument("--scope", help="repository/NAME (default: the whole registry)")
    add_data_dir(c)
    c.set_defaults(func=command(run_assign))
    c = commands.add_parser("list", help="list role assignments")
    c.add_argument("--assignee", help="only this identity's")
    c.add_argument("--json", action="store_true", help="print JSON")
    add_data_dir(c)
    c.set_defaults(func=command(run_assignments))
    c = commands.add_parser("delete", help="take a role away (by --ids, or --assignee --role "
                                           "[--scope])")
    c.add_argument("--ids", nargs="+", default=[], metavar="ID", help="assignment ids")
    c.add_argument("--assignee")
    c.add_argument("--role", choices=ROLES)
    c.add_argument("--scope")
    add_data_dir(c)
    c.set_defaults(func=command(run_unassign), parser=c)


def run_create(args: argparse.Namespace) -> int:
    created = call(data_dir_of(args), "POST", "/georeg/v1/identities", {"name": args.name})
    print(json.dumps(created, indent=2))
    print("georeg: the secret above is shown this once; store it now", file=sys.stderr)
    return 0


def run_list(args: argparse.Namespace) -> int:
    identities = call(data_dir_of(args), "GET", "/georeg/v1/identities")
    if args.json:
        print(json.dumps(identities, indent=2))
        return 0
    table = Table("id", "name", "created")
    for i in identities:
        table.add_row(i["id"], i["displayName"], i["creationDate"] or "")
    Console().print(table)
    return 0


def run_delete(args: argparse.Namespace) -> int:
    call(data_dir_of(args), "DELETE", "/georeg/v1/identities/" + urllib.parse.quote(args.id, safe=""))
    return 0


def run_assign(args: argparse.Namespace) -> int:
    body = {"role": args.role, "assignee": args.assignee}
    if args.scope:
        body["scope"] = args.scope
    print(json.dumps(call(data_dir_of(args), "POST", "/georeg/v1/role-assignments", body),
                     indent=2))
    return 0


def run_assignments(args: argparse.Namespace) -> int:
    query = "?" + urllib.parse.urlencode({"assignee": args.assignee}) if args.assignee else ""
    assignments = call(data_dir_of(args), "GET", "/georeg/v1/role-assignments" + query)
    if args.json:
        print(json.dumps(assignments, indent=2))
        return 0
    table = Table("id", "role", "assignee", "scope")
    for a in assignments:
        table.add_row(a["id"], a["roleDefinitionName"], a["principalId"], a["scope"])
    Console().print(table)
    return 0


def run_unassign(args: argparse.Namespace) -> int:
    ids = list(args.ids)
    if not ids:
        if not args.assignee:
            args.parser.error("give --ids, or --assignee (with --role and --scope to narrow)")
        query = "?" + urllib.parse.urlencode({"assignee": args.assignee})
        ids = [a["id"] for a in call(data_dir_of(args), "GET", "/georeg/v1/role-assignments" + query)
               if (args.role is None or a["roleDefinitionName"] == args.role)
               and (args.scope is None or a["scope"] == args.scope)]
        if not ids:
            print("georeg: no role assignment matches", file=sys.stderr)
            return 2
    for assignment in ids:
        call(data_dir_of(args), "DELETE",
             "/georeg/v1/role-assignments/" + urllib.parse.quote(assignment, safe=""))
    return 0
