"""``georeg cache …`` and ``georeg credential-set …``: the pull-through cache,
after ``az acr cache`` and ``az acr credential-set``. A cache rule makes a
repository of this registry a cache of an upstream repository: a pull of a
tag or digest not held yet is fetched from upstream by the replica that
serves it, stored, and returned in the same request; later pulls are local,
and tags are never refreshed automatically (ACR's rule). Changes go through
the home region; list and show answer from any region.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse

from rich.console import Console
from rich.table import Table

from .common import CliError, add_data_dir, call, command, data_dir_of


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache", help="pull-through cache rules (az acr cache)",
        description="Cache rules: a pull from a target repository of a tag or digest the "
                    "registry does not hold yet is fetched from the source repository upstream "
                    "(with the rule's credential set), stored, replicated like a push, and "
                    "served in the same request. Later pulls are local; a cached tag is never "
                    "refreshed from upstream. Wildcards: HOST/* => PREFIX/* or *, HOST/PATH/* "
                    "=> PREFIX/*; wildcard rules may not overlap. At most 1,000 rules.")
    commands = p.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")

    c = commands.add_parser("create", help="create a cache rule")
    _add_name(c, "cache rule")
    c.add_argument("--source-repo", "-s", required=True, metavar="HOST/REPO",
                   help="the upstream repository: HOST/REPOSITORY, HOST/PATH/* or HOST/*")
    c.add_argument("--target-repo", "-t", required=True, metavar="REPO",
                   help="the repository here: REPOSITORY, PREFIX/* or * (a wildcard source "
                        "needs a wildcard target)")
    c.add_argument("--cred-set", "-c", metavar="NAME",
                   help="the credential set to pull from upstream with (default: anonymous)")
    add_data_dir(c)
    c.set_defaults(func=command(run_create))

    _add_list_show_delete(commands, "cache-rules", "cache rule", _RULE_COLUMNS,
                          delete_help="delete a cache rule (what it cached stays)")


def register_credential_set(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "credential-set", help="upstream credentials for cache rules (az acr credential-set)",
        description="Credential sets: a username and password for an upstream login server, "
                    "used by cache rules to pull. The password is sealed with the cluster's "
                    "configuration key wherever it is stored or replicated, and never shown.")
    commands = p.add_subparsers(dest="credential_set_command", required=True, metavar="COMMAND")

    c = commands.add_parser("create", help="create a credential set")
    _add_name(c, "credential set")
    c.add_argument("--login-server", "-l", required=True, metavar="HOST",
                   help="the upstream registry's host[:port], e.g. registry.example.com")
    c.add_argument("--username", "-u", required=True, help="the upstream username")
    _add_password(c)
    add_data_dir(c)
    c.set_defaults(func=command(run_create_credential_set))

    c = commands.add_parser("update", help="change a credential set's username and password")
    _add_name(c, "credential set")
    c.add_argument("--username", "-u", help="a new username")
    _add_password(c)
    add_data_dir(c)
    c.set_defaults(func=command(run_update_credential_set))

    _add_list_show_delete(commands, "credential-sets", "credential set", _SET_COLUMNS,
                          list_help="list credential sets (never a password)",
                          show_help="show one credential set (JSON, no password)",
                          delete_help="delete a credential set no cache rule uses")


# What the tables of ``list`` show: (heading, field of the API's answer).
_RULE_COLUMNS = (("name", "name"), ("source", "sourceRepository"),
                 ("target", "targetRepository"), ("credential set", "credentialSetName"),
                 ("created", "creationDate"))
_SET_COLUMNS = (("name", "name"), ("login server", "loginServer"),
                ("username", "username"), ("created", "creationDate"))


def _add_list_show_delete(commands: argparse._SubParsersAction, base: str, what: str,
                          columns: tuple[tuple[str, str], ...], *, delete_help: str,
                          list_help: str = "", show_help: str = "") -> None:
    """``list``, ``show`` and ``delete`` of the objects at ``/georeg/v1/<base>``:
    the same three commands for cache rules and credential sets."""
    c = commands.add_parser("list", help=list_help or f"list {what}s")
    c.add_argument("--json", action="store_true", help="print JSON")
    add_data_dir(c)
    c.set_defaults(func=command(lambda args: _run_list(args, base, columns)))

    c = commands.add_parser("show", help=show_help or f"show one {what} (JSON)")
    _add_name(c, what)
    add_data_dir(c)
    c.set_defaults(func=command(lambda args: _run_show(args, base)))

    c = commands.add_parser("delete", help=delete_help)
    _add_name(c, what)
    add_data_dir(c)
    c.set_defaults(func=command(lambda args: _run_delete(args, base)))


def _add_name(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--name", "-n", required=True,
                   help=f"the {what}'s name: 1 to 50 letters, digits and hyphens")


def _add_password(p: argparse.ArgumentParser) -> None:
    secret = p.add_mutually_exclusive_group()
    secret.add_argument("--password", "-p", help="the upstream password or token; "
                                                 "--password-stdin keeps it out of ps")
    secret.add_argument("--password-stdin", action="store_true",
                        help="read the password from stdin (one line)")


def _password(args: argparse.Namespace, required: bool) -> str | None:
    if args.password_stdin:
        # The command line is visible to every user (ps); stdin is not.
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CliError("--password-stdin: stdin gave no password")
        return password
    if args.password is None and required:
        raise CliError("give --password or --password-stdin")
    return args.password


def _path(base: str, name: str = "") -> str:
    return f"/georeg/v1/{base}" + (f"/{urllib.parse.quote(name, safe='')}" if name else "")


def _print(answer: object) -> None:
    print(json.dumps(answer, indent=2))


def run_create(args: argparse.Namespace) -> int:
    body = {"name": args.name, "sourceRepository": args.source_repo,
            "targetRepository": args.target_repo}
    if args.cred_set:
        body["credentialSetName"] = args.cred_set
    _print(call(data_dir_of(args), "POST", _path("cache-rules"), body))
    return 0


def run_create_credential_set(args: argparse.Namespace) -> int:
    body = {"name": args.name, "loginServer": args.login_server, "username": args.username,
            "password": _password(args, required=True)}
    _print(call(data_dir_of(args), "POST", _path("credential-sets"), body))
    return 0


def run_update_credential_set(args: argparse.Namespace) -> int:
    body = {k: v for k, v in (("username", args.username),
                              ("password", _password(args, required=False))) if v is not None}
    _print(call(data_dir_of(args), "PATCH", _path("credential-sets", args.name), body))
    return 0


def _run_list(args: argparse.Namespace, base: str, columns: tuple[tuple[str, str], ...]) -> int:
    objects = call(data_dir_of(args), "GET", _path(base))
    if args.json:
        _print(objects)
        return 0
    table = Table(*(heading for heading, _ in columns))
    for o in objects:
        table.add_row(*(o[field] or "" for _, field in columns))
    Console().print(table)
    return 0


def _run_show(args: argparse.Namespace, base: str) -> int:
    _print(call(data_dir_of(args), "GET", _path(base, args.name)))
    return 0


def _run_delete(args: argparse.Namespace, base: str) -> int:
    call(data_dir_of(args), "DELETE", _path(base, args.name))
    return 0
