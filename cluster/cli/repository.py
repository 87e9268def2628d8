"""``georeg repository list|show-tags|delete``: the registry's repositories,
after ``az acr repository``, through the management API, which asks every
region (``cluster.control.repositories``): content pushed in a confined region
never leaves it, so no single replica holds the whole registry.

Exit status: 0 when every region answered, 1 when one could not be asked (the
answer may lack what only it holds; stderr names it and says why), 2 on an
error.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from .common import CliError, add_data_dir, call, command, data_dir_of

_EXIT_STATUS = """Every replica region is asked, each through one of its healthy nodes.
Exit status 0 when every region answered; 1 when a region could not be asked
(all its nodes down, or cut off from the network), which stderr names."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repository", help="repositories (az acr repository)",
                       description="Repositories of the registry, after `az acr repository`, "
                                   "across every replica region (content pushed in a confined "
                                   "region never leaves it).")
    commands = p.add_subparsers(dest="repository_command", required=True, metavar="COMMAND")
    c = commands.add_parser(
        "list", help="list repositories and the regions that hold them",
        description="List every repository of the registry, with the replica regions that hold "
                    "it. " + _EXIT_STATUS)
    c.add_argument("--json", action="store_true",
                   help='print {"repositories": [{"name", "regions"}], "unavailable"}')
    add_data_dir(c)
    c.set_defaults(func=command(run_repository_list))
    c = commands.add_parser(
        "show-tags", help="tags of a repository, with digests, per region",
        description="The tags of a repository: per tag, its digest and the regions where it "
                    "resolves. Regions can disagree while replication catches up, and for good "
                    "where a confined region tagged content it keeps to itself. " + _EXIT_STATUS)
    c.add_argument("--name", "-n", required=True, metavar="REPOSITORY")
    c.add_argument("--json", action="store_true", help="print the answer as JSON")
    add_data_dir(c)
    c.set_defaults(func=command(run_repository_show_tags))
    c = commands.add_parser(
        "delete", help="delete a repository, every manifest and tag, in every region",
        description="Delete every manifest and tag of a repository in every region that holds "
                    "it. A region that cannot be asked keeps its copy; stderr names it, and the "
                    "exit status is 1.")
    c.add_argument("--name", "-n", required=True, metavar="REPOSITORY")
    c.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    add_data_dir(c)
    c.set_defaults(func=command(run_repository_delete))


def _unasked(answer: dict, consequence: str) -> int:
    """Name on stderr each region that could not be asked; the exit status."""
    for region in answer["unavailable"]:
        print(f"georeg: {region['region']} could not be asked: {region['reason']}; {consequence}",
              file=sys.stderr)
    return 1 if answer["unavailable"] else 0


def run_repository_list(args: argparse.Namespace) -> int:
    answer = call(data_dir_of(args), "GET", "/georeg/v1/repositories")
    if args.json:
        print(json.dumps(answer, indent=2))
    elif answer["repositories"]:
        width = max(len("REPOSITORY"), *(len(r["name"]) for r in answer["repositories"]))
        print(f"{'REPOSITORY'.ljust(width)}  REGIONS")
        for repository in answer["repositories"]:
            print(f"{repository['name'].ljust(width)}  {','.join(repository['regions'])}")
    return _unasked(answer, "repositories only it holds are not listed")


def run_repository_show_tags(args: argparse.Namespace) -> int:
    answer = call(data_dir_of(args), "GET", f"/georeg/v1/repositories/{args.name}/tags")
    if args.json:
        print(json.dumps(answer, indent=2))
        return _unasked(answer, "its tags are not shown")
    table = Table("tag", "digest", "regions")
    for tag in answer["tags"]:
        for digest, regions in tag["digests"].items():
            table.add_row(tag["name"], digest, ", ".join(regions))
    Console().print(table)
    for tag in answer["tags"]:
        if not tag["agreed"]:
            print(f"tag {tag['name']} resolves to different digests in different regions: "
                  f"replication is catching up, or a region tagged content it keeps to itself")
    return _unasked(answer, "its tags are not shown")


def run_repository_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError("refusing to delete without confirmation; pass --yes")
        answer = input(f"Delete repository {args.name} and every image in it, in every region? "
                       f"[y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            return 1
    result = call(data_dir_of(args), "DELETE", f"/georeg/v1/repositories/{args.name}")
    manifests, tags = len(result["manifestsDeleted"]), len(result["tagsDeleted"])
    print(f"deleted {_count(manifests, 'manifest')} and {_count(tags, 'tag')} from {args.name} "
          f"in {', '.join(result['regions'])}")
    return _unasked(result, f"what it holds of {args.name} is not deleted")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
