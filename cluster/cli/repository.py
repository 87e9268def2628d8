"""``georeg repository list|show|show-tags|show-manifests|update|untag|delete|list-deleted|restore``:
the registry's repositories, after ``az acr repository``, through the
management API, which asks every region (``cluster.control.repositories``):
content pushed in a confined region never leaves it, so no single replica
holds the whole registry. ``show``, ``update``, ``untag``, ``delete --image``
and the detailed listings go to a node of the first region that holds the
repository (ACR's ``/acr/v1/`` there); what they change replicates.

Exit status: 0 when every region answered, 1 when one could not be asked or
refused (the answer may lack what only it holds; stderr names it and says
why), 2 on an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from urllib.parse import urlencode

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
    c.add_argument("--orderby", choices=_ORDERS, help="ACR's listing (one region), by last update")
    c.add_argument("--top", type=int, metavar="N", help="at most N tags (ACR's listing)")
    c.add_argument("--detail", action="store_true",
                   help="ACR's listing with times and changeable attributes")
    c = commands.add_parser(
        "show-manifests", help="manifests of a repository, with tags, times and attributes",
        description="The manifests of a repository as ACR lists them (`az acr repository "
                    "show-manifests`), from a node of the first region that holds it.")
    c.add_argument("--name", "-n", required=True, metavar="REPOSITORY")
    c.add_argument("--orderby", choices=_ORDERS, help="by last update")
    c.add_argument("--top", type=int, metavar="N", help="at most N manifests")
    c.add_argument("--detail", action="store_true", help="times, size and changeable attributes")
    add_data_dir(c)
    c.set_defaults(func=command(run_repository_show_manifests))
    c = commands.add_parser(
        "show", help="properties and changeable attributes of a repository, tag or manifest",
        description="ACR's properties of a repository, or of one image by tag (R:T: the tag's "
                    "attributes) or by digest (R@sha256:…: the manifest's).")
    _target_arguments(c)
    add_data_dir(c)
    c.set_defaults(func=command(run_repository_show))
    c = commands.add_parser(
        "update", help="lock or unlock a repository, tag or manifest (changeable attributes)",
        description="Set changeable attributes (ACR's locks) of a repository, or of one image "
                    "by tag or by digest. --write-enabled false protects from overwrite and "
                    "deletion, --delete-enabled false from deletion, --read-enabled false from "
                    "pulls, --list-enabled false from listings. The change replicates to every "
                    "region; no push racing it reverts it.")
    _target_arguments(c)
    for flag in ("delete", "write", "read", "list"):
        c.add_argument(f"--{flag}-enabled", type=_boolean, metavar="true|false")
    add_data_dir(c)
    c.set_defaults(func=command(run_repository_update))
    c = commands.add_parser(
        "untag", help="remove a tag; its manifest stays",
        description="Remove one tag (ACR's untag): the manifest it named stays, with its other "
                    "tags.")
    c.add_argument("--image", required=True, metavar="REPOSITORY:TAG")
    add_data_dir(c)
    c.set_defaults(func=command(run_repository_untag))
    c = commands.add_parser(
        "delete", help="delete a repository, or one image and every tag on it",
        description="With --name only: delete every manifest and tag of a repository in every "
                    "region that holds it (a region that cannot be asked keeps its copy; stderr "
                    "names it, and the exit status is 1). With --image R:T or R@digest: delete "
                    "that manifest and every tag on it (ACR's delete by tag; `untag` removes "
                    "only the tag).")
    c.add_argument("--name", "-n", metavar="REPOSITORY")
    c.add_argument("--image", metavar="REPOSITORY:TAG|REPOSITORY@DIGEST")
    c.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    add_data_dir(c)
    c.set_defaults(func=command(run_repository_delete))
    c = commands.add_parser(
        "list-deleted", help="soft-deleted manifests and tags (the recycle bin)",
        description="What soft delete keeps of a repository (az acr manifest list-deleted and "
                    "list-deleted-tags): each deleted manifest with the tags it had, each "
                    "untagged tag with the digest it named, when it was deleted and when it will "
                    "be purged. From the first region that holds a bin of it; every region "
                    "holds the same one (a confined repository's only in its region).")
    c.add_argument("--name", "-n", required=True, metavar="REPOSITORY")
    c.add_argument("--json", action="store_true", help="print the raw JSON answer")
    add_data_dir(c)
    c.set_defaults(func=command(run_repository_list_deleted))
    c = commands.add_parser(
        "restore", help="bring a soft-deleted manifest or tag back",
        description="Restore from the recycle bin (az acr manifest restore): R@digest brings back "
                    "the manifest and every tag it had; R:T the manifest most recently deleted "
                    "with tag T, with all its tags (or T alone if it was untagged). A tag that "
                    "names another manifest since the delete is never moved silently: the "
                    "restore is refused (exit status 2, nothing changed) unless --force, which "
                    "moves it back. The restore replicates to every region.")
    c.add_argument("--name", "-n", metavar="REPOSITORY", help="the repository (or give --image)")
    c.add_argument("--image", required=True, metavar="REPOSITORY:TAG|REPOSITORY@DIGEST")
    c.add_argument("--force", action="store_true",
                   help="move back tags that name another manifest since the delete")
    add_data_dir(c)
    c.set_defaults(func=command(run_repository_restore))


_ORDERS = ("time_desc", "time_asc")
_ACR_FIELDS = {"delete": "deleteEnabled", "write": "writeEnabled", "read": "readEnabled",
               "list": "listEnabled"}


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _target_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--name", "-n", metavar="REPOSITORY", help="the repository (or give --image)")
    c.add_argument("--image", metavar="REPOSITORY:TAG|REPOSITORY@DIGEST",
                   help="one image: by tag (the tag's attributes) or by digest (the manifest's)")


def _image(image: str) -> tuple[str, str, str]:
    """``R:T`` → (R, "tag", T); ``R@D`` → (R, "digest", D)."""
    if "@" in image:
        repository, _, digest = image.partition("@")
        if repository and digest:
            return repository, "digest", digest
    else:
        repository, sep, tag = image.rpartition(":")
        if sep and repository and tag and "/" not in tag:
            return repository, "tag", tag
    raise CliError(f"--image {image!r}: give REPOSITORY:TAG or REPOSITORY@DIGEST")


def _target(args: argparse.Namespace) -> tuple[str, str]:
    """(repository, management path of its attributes: the repository's or an image's)."""
    if args.image:
        repository, kind, reference = _image(args.image)
        if args.name and args.name != repository:
            raise CliError(f"--name {args.name} and --image {args.image} name different "
                           f"repositories")
        return repository, f"/georeg/v1/repositories/{repository}/acr?" + urlencode({kind: reference})
    if not args.name:
        raise CliError("give --name REPOSITORY or --image REPOSITORY:TAG|REPOSITORY@DIGEST")
    return args.name, f"/georeg/v1/repositories/{args.name}/acr"


def _checked(answer: object) -> dict:
    """A node's answer passed through the management API: an error is the node's."""
    if isinstance(answer, dict) and answer.get("errors"):
        error = answer["errors"][0]
        detail = error.get("detail")
        reason = detail.get("reason") if isinstance(detail, dict) else detail
        raise CliError(f"{error.get('code')}: {error.get('message')}"
                       + (f" ({reason})" if reason else ""))
    return answer  # type: ignore[return-value]


def run_repository_show(args: argparse.Namespace) -> int:
    _, path = _target(args)
    print(json.dumps(_checked(call(data_dir_of(args), "GET", path)), indent=2))
    return 0


def run_repository_update(args: argparse.Namespace) -> int:
    update = {_ACR_FIELDS[f]: getattr(args, f"{f}_enabled") for f in _ACR_FIELDS
              if getattr(args, f"{f}_enabled") is not None}
    if not update:
        raise CliError("nothing to change: give --write-enabled, --delete-enabled, "
                       "--read-enabled or --list-enabled")
    _, path = _target(args)
    print(json.dumps(_checked(call(data_dir_of(args), "PATCH", path, update)), indent=2))
    return 0


def _listing(args: argparse.Namespace, which: str) -> dict:
    if args.top is not None and args.top < 0:
        raise CliError("--top must be 0 or more")
    query = {}
    if args.orderby:
        query["orderby"] = args.orderby.replace("_", "")
    if args.top is not None:
        query["n"] = args.top
    path = f"/georeg/v1/repositories/{args.name}/acr/{which}"
    return _checked(call(data_dir_of(args), "GET", path + (f"?{urlencode(query)}" if query else "")))


def run_repository_show_manifests(args: argparse.Namespace) -> int:
    manifests = _listing(args, "_manifests")["manifests"]
    if args.detail:
        print(json.dumps(manifests, indent=2))
    else:
        print(json.dumps([{"digest": m["digest"], "tags": m["tags"],
                           "timestamp": m["lastUpdateTime"]} for m in manifests], indent=2))
    return 0


def run_repository_untag(args: argparse.Namespace) -> int:
    repository, kind, tag = _image(args.image)
    if kind != "tag":
        raise CliError("untag removes a tag: give --image REPOSITORY:TAG")
    _checked(call(data_dir_of(args), "DELETE", f"/georeg/v1/repositories/{repository}/_untag/{tag}"))
    print(f"untagged {repository}:{tag}")
    return 0


def region_notes(answer: dict, consequence: str, *, refused: str | None = None) -> list[str]:
    """A line for each region the answer lacks: one that could not be asked
    (``consequence``: what that leaves out), or one that was asked and
    refused (``refused``: what that leaves, ``consequence`` if not given)."""
    return [f"{u['region']} refused: {u['reason']}; {refused or consequence}" if u.get("refused")
            else f"{u['region']} could not be asked: {u['reason']}; {consequence}"
            for u in answer["unavailable"]]


def _unasked(answer: dict, consequence: str, *, refused: str | None = None) -> int:
    """Name on stderr each region that could not be asked or refused; the
    exit status."""
    for note in region_notes(answer, consequence, refused=refused):
        print(f"georeg: {note}", file=sys.stderr)
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
    if args.orderby or args.top is not None or args.detail:
        tags = _listing(args, "_tags")["tags"]
        print(json.dumps(tags if args.detail else [t["name"] for t in tags], indent=2))
        return 0
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
    if args.image:
        return _delete_image(args)
    if not args.name:
        raise CliError("give --name REPOSITORY (the whole repository) or --image (one image)")
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
    return _unasked(result, f"what it holds of {args.name} is not deleted",
                    refused=f"part of {args.name} may be deleted there; run the delete again")


def _delete_image(args: argparse.Namespace) -> int:
    repository, _, reference = _image(args.image)
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError("refusing to delete without confirmation; pass --yes")
        answer = input(f"Delete {args.image} and every tag on its manifest, in every region? "
                       f"[y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            return 1
    result = _checked(call(data_dir_of(args), "DELETE",
                           f"/georeg/v1/repositories/{repository}/_images/{reference}"))
    print(f"deleted {repository}@{result['manifestDeleted']} and every tag on it")
    return 0


def run_repository_list_deleted(args: argparse.Namespace) -> int:
    answer = _checked(call(data_dir_of(args), "GET",
                           f"/georeg/v1/repositories/{args.name}/_deleted"))
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    table = Table("kind", "digest", "tags", "deleted", "purged after")
    for m in answer["manifests"]:
        table.add_row("manifest", m["digest"], ", ".join(m["tags"]), m["deletedTime"],
                      m["purgeTime"])
    for t in answer["tags"]:
        table.add_row("tag", t["digest"], t["name"], t["deletedTime"], t["purgeTime"])
    Console().print(table)
    return 0


def run_repository_restore(args: argparse.Namespace) -> int:
    repository, _, reference = _image(args.image)
    if args.name and args.name != repository:
        raise CliError(f"--name {args.name} and --image {args.image} name different repositories")
    path = f"/georeg/v1/repositories/{repository}/_restore/{reference}"
    result = _checked(call(data_dir_of(args), "POST", path + ("?force=true" if args.force else "")))
    what = f"{repository}@{result['digest']}" if result["manifestRestored"] else "tags of " \
        f"{repository}@{result['digest']}"
    tags = ", ".join(result["tagsRestored"]) or "none"
    print(f"restored {what}; tags restored: {tags}")
    for tag, before in result["tagsMoved"].items():
        print(f"moved {tag} back from {before}")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
