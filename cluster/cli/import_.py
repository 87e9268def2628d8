"""``georeg import`` (after ``az acr import``): copy an image from another
registry into this one, server-side: the running cluster's management API
pulls it and pushes it into one region (``cluster.control.imports``), and
replication takes it everywhere residency allows.

Exit status: 0 when imported, 2 on any refusal (a malformed source, an image
the source does not have, credentials it refuses, an existing tag without
--force, a source that fails mid-copy), with the reason on stderr; nothing is
left that a client could pull half of.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import CliError, add_data_dir, call, command, data_dir_of

# An import moves whole images; the management API answers when it is done.
IMPORT_TIMEOUT_S = 3600


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import", help="import an image from another registry (az acr import)",
        description="Import an image from any OCI registry, by tag or digest, server-side: "
                    "digests are kept, an index comes with every platform, and with "
                    "--include-referrers its signatures and SBOMs come too. An existing target "
                    "tag refuses the import unless --force. Exit status 2 on a refusal.")
    p.add_argument("--source", required=True, metavar="REGISTRY/REPO:TAG|REGISTRY/REPO@DIGEST",
                   help="the image to import (no tag: latest)")
    p.add_argument("--image", "-t", action="append", default=[], metavar="REPO[:TAG]",
                   help="a target tag (repeatable; default: the source's repository and tag)")
    p.add_argument("--repository", action="append", default=[], metavar="REPO",
                   help="a target repository that gets the manifest with no tag (repeatable)")
    p.add_argument("--username", "-u", help="the source registry's user")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument("--password", "-p", help="the source registry's password (or token); "
                                                 "--password-stdin keeps it out of ps")
    secret.add_argument("--password-stdin", action="store_true",
                        help="read the source registry's password from stdin (one line)")
    p.add_argument("--force", action="store_true", help="replace target tags that exist")
    p.add_argument("--include-referrers", action="store_true",
                   help="also import the manifests that refer to it (signatures, SBOMs)")
    p.add_argument("--region", help="the replica region to import into (default: the home "
                                    "region); replication takes it on from there")
    p.add_argument("--source-ca-file", type=Path, metavar="PEM",
                   help="the CA that the source's HTTPS certificate chains to (a loopback "
                        "source without one is reached over plain HTTP)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    add_data_dir(p)
    p.set_defaults(func=command(run_import))


def run_import(args: argparse.Namespace) -> int:
    body: dict = {"source": args.source, "targetTags": args.image,
                  "untaggedTargetRepositories": args.repository,
                  "mode": "Force" if args.force else "NoForce",
                  "includeReferrers": args.include_referrers}
    if args.region:
        body["region"] = args.region
    if args.password_stdin:
        # The command line is visible to every user (ps); stdin is not.
        args.password = sys.stdin.readline().rstrip("\r\n")
        if not args.password:
            raise CliError("--password-stdin: stdin gave no password")
    if args.username is not None or args.password is not None:
        if args.username is None or args.password is None:
            raise CliError("give --username and --password together")
        body["username"], body["password"] = args.username, args.password
    if args.source_ca_file is not None:
        try:
            body["sourceCaPem"] = args.source_ca_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read --source-ca-file {args.source_ca_file}: {exc}") from None
    answer = call(data_dir_of(args), "POST", "/georeg/v1/imports", body,
                  timeout=IMPORT_TIMEOUT_S)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    targets = answer["targetTags"] + [f"{r} (untagged)" for r in
                                       answer["untaggedTargetRepositories"]]
    print(f"imported {answer['source']} ({answer['digest']}) into {answer['region']}: "
          f"{', '.join(targets)}")
    print(f"  {answer['manifests']} manifests ({answer['referrers']} referrers), "
          f"{answer['blobs']} blobs, {answer['blobsCopied']} copied "
          f"({answer['bytesCopied']:,} bytes)")
    for tag in answer["replacedTags"]:
        print(f"  replaced {tag} (--force)", file=sys.stderr)
    return 0
