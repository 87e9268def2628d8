"""``georeg repository list|show-tags|delete``: the registry's repositories,
after ``az acr repository``, through the management API."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from .common import CliError, add_data_dir, call, command, data_dir_of


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repository", help="repositories (az acr repository)",
                       description="Repositories of the registry, after `az acr repository`.")
    commands = p.add_subparsers(dest="repository_command", required=True, metavar="COMMAND")
    c = commands.add_parser("list", help="list repositories")
    add_data_dir(c)
    c.set_defaults(func=command(run_repository_list))
    c = commands.add_parser("show-tags", help="tags of a repository, with digests")
    c.add_argument("--name", "-n", required=True, metavar="REPOSITORY")
    add_data_dir(c)
    c.set_defaults(func=command(run_repository_show_tags))
    c = commands.add_parser("delete", help="delete a repository: every manifest and tag")
    c.add_argument("--name", "-n", required=True, metavar="REPOSITORY")
    c.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    add_data_dir(c)
    c.set_defaults(func=command(run_repository_delete))


def run_repository_list(args: argparse.Namespace) -> int:
    for name in call(data_dir_of(args), "GET", "/georeg/v1/repositories"):
        print(name)
    return 0


def run_repository_show_tags(args: argparse.Namespace) -> int:
    tags = call(data_dir_of(args), "GET", f"/georeg/v1/repositories/{args.name}/tags")
    table = Table("tag", "digest")
    for tag in tags:
        table.add_row(tag["name"], tag["digest"] or "")
    Console().print(table)
    return 0


def run_repository_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError("refusing to delete without confirmation; pass --yes")
        answer = input(f"Delete repository {args.name} and every image in it? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            return 1
    result = call(data_dir_of(args), "DELETE", f"/georeg/v1/repositories/{args.name}")
    print(f"deleted {len(result['manifestsDeleted'])} manifests and {len(result['tagsDeleted'])} "
          f"tags from {args.name}")
    return 0
