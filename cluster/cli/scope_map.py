"""``georeg scope-map …``: scope maps, after ``az acr scope-map``. A scope map
lists what a token may do, as actions ``repositories/<repository>/<action>``
where the repository is a name, ``prefix/*`` or ``*`` and the action one of
content/read, content/write, content/delete, metadata/read, metadata/write.
The system scope maps (``_repositories_pull``, ``_push``, ``_admin`` …) are
built in and read-only. Changes go through the home region.
"""

from __future__ import annotations

import argparse
import json
import urllib.parse

from rich.console import Console
from rich.table import Table

from .common import add_data_dir, call, command, data_dir_of

ACTIONS = "content/read, content/write, content/delete, metadata/read, metadata/write"
REPOSITORY_HELP = (f"a repository (a name, prefix/* or *) and its actions ({ACTIONS}); "
                   "repeat for more repositories")


def add_repository(p: argparse.ArgumentParser, flag: str = "--repository", **kwargs) -> None:
    p.add_argument(flag, action="append", nargs="+", metavar=("REPOSITORY", "ACTION"),
                   default=[], help=REPOSITORY_HELP, **kwargs)


def repositories(parser: argparse.ArgumentParser, entries: list[list[str]], flag: str) -> list:
    for entry in entries:
        if len(entry) < 2:
            parser.error(f"{flag} {entry[0]}: give at least one action ({ACTIONS})")
    return entries


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scope-map", help="what tokens may do, per repository (az acr scope-map)",
        description="Scope maps: the repository actions a token is allowed, as actions "
                    "repositories/<repository>/<action>, where the repository is a name, "
                    f"prefix/* or *, and the action one of {ACTIONS}. The system scope maps "
                    "(_repositories_pull, _repositories_push, _repositories_admin, ...) are "
                    "built in and read-only. Changes go through the home region: while it "
                    "cannot be reached they fail with exit status 2.")
    commands = p.add_subparsers(dest="scope_map_command", required=True, metavar="COMMAND")

    c = commands.add_parser("create", help="create a scope map",
                            description="Create a scope map (at most 100 / 500 / 50,000 per "
                                        "registry on Basic / Standard / Premium).")
    c.add_argument("--name", required=True, help="the scope map's name")
    add_repository(c, required=True)
    c.add_argument("--description", default="", help="what it is for")
    add_data_dir(c)
    c.set_defaults(func=command(run_create), parser=c)

    c = commands.add_parser("list", help="list the system and user scope maps")
    c.add_argument("--json", action="store_true", help="print JSON")
    add_data_dir(c)
    c.set_defaults(func=command(run_list))

    c = commands.add_parser("show", help="show one scope map (JSON)")
    c.add_argument("--name", required=True)
    add_data_dir(c)
    c.set_defaults(func=command(run_show))

    c = commands.add_parser("update", help="add or remove actions, change the description",
                            description="Change a user scope map; its tokens get the new "
                                        "actions on each replica as the change reaches it.")
    c.add_argument("--name", required=True)
    add_repository(c, "--add-repository")
    add_repository(c, "--remove-repository")
    c.add_argument("--description")
    add_data_dir(c)
    c.set_defaults(func=command(run_update), parser=c)

    c = commands.add_parser("delete", help="delete a user scope map no token uses")
    c.add_argument("--name", required=True)
    add_data_dir(c)
    c.set_defaults(func=command(run_delete))


def _path(name: str = "") -> str:
    return "/georeg/v1/scope-maps" + ("/" + urllib.parse.quote(name, safe="") if name else "")


def run_create(args: argparse.Namespace) -> int:
    body = {"name": args.name, "description": args.description,
            "repositories": repositories(args.parser, args.repository, "--repository")}
    print(json.dumps(call(data_dir_of(args), "POST", _path(), body), indent=2))
    return 0


def run_list(args: argparse.Namespace) -> int:
    maps = call(data_dir_of(args), "GET", _path())
    if args.json:
        print(json.dumps(maps, indent=2))
        return 0
    table = Table("name", "type", "actions", "description")
    for m in maps:
        table.add_row(m["name"], m["scopeMapType"], "\n".join(m["actions"]), m["description"])
    Console().print(table)
    return 0


def run_show(args: argparse.Namespace) -> int:
    print(json.dumps(call(data_dir_of(args), "GET", _path(args.name)), indent=2))
    return 0


def run_update(args: argparse.Namespace) -> int:
    body = {"addRepositories": repositories(args.parser, args.add_repository, "--add-repository"),
            "removeRepositories": repositories(args.parser, args.remove_repository,
                                               "--remove-repository")}
    if args.description is not None:
        body["description"] = args.description
    print(json.dumps(call(data_dir_of(args), "PATCH", _path(args.name), body), indent=2))
    return 0


def run_delete(args: argparse.Namespace) -> int:
    call(data_dir_of(args), "DELETE", _path(args.name))
    return 0
