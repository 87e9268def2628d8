"""`georeg replication status REPO:TAG` — per-image replication status, as a table.

Asks one node (any node: each answers for the whole cluster) through its HTTP
API, ``GET /georeg/v1/replication/status``.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

from rich.console import Console
from rich.table import Table

_STYLE = {"present": "green", "pending": "yellow", "stale": "yellow", "excluded": "dim",
          "failed": "red", "unreachable": "red"}


def split_image(ref: str) -> tuple[str, str]:
    """``repo:tag`` or ``repo@sha256:…`` → (repository, reference)."""
    if "@" in ref:
        repo, _, digest = ref.partition("@")
        return repo, digest
    repo, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return repo, tag


def _any_node(args: argparse.Namespace) -> str:
    """A healthy node of the cluster found through --data-dir."""
    from .cluster_cli import CliError, _data_dir, call

    status = call(_data_dir(args), "GET", "/georeg/v1/cluster")
    for node in status["nodes"]:
        if node["healthy"]:
            return node["http"]
    raise CliError("no node of the cluster is healthy")


def register(sub: argparse._SubParsersAction, add_target) -> None:
    p = sub.add_parser(
        "status", help="where an image has replicated to, per replica",
        description="Show, for every replica of the cluster, whether an image is present (and "
                    "when it arrived, and its lag behind the push), pending, excluded by data "
                    "residency, failed (and why), or unreachable. Exit status 0 when the image "
                    "is present everywhere residency allows, 1 otherwise.")
    p.add_argument("image", metavar="REPO:TAG|REPO@DIGEST")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    add_target(p)
    from .cluster_cli import _run

    p.set_defaults(func=_run(run_status))


def run_status(args: argparse.Namespace) -> int:
    repo, reference = split_image(args.image)
    base = (args.node_url or _any_node(args)).rstrip("/")
    query = urllib.parse.urlencode({"repository": repo, "reference": reference})
    try:
        with urllib.request.urlopen(f"{base}/georeg/v1/replication/status?{query}", timeout=10) as r:
            answer = json.load(r)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        print(f"georeg: {base} answered {exc.code}: {detail}", file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError) as exc:
        print(f"georeg: cannot reach {base}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0 if answer["complete"] else 1
    console = Console()
    origin = answer["origin"]
    console.print(f"[bold]{repo}:{reference}[/] → {answer['digest'] or 'unknown'}"
                  + (f"  pushed in {origin['region']} at {origin['acked_at']}" if origin["region"] else ""))
    table = Table("replica", "region", "zone", "state", "arrived", "lag (ms)", "detail")
    for r in answer["replicas"]:
        state = r["state"]
        table.add_row(r["name"], r["region"], r["zone"] or "-",
                      f"[{_STYLE.get(state, '')}]{state}[/]", r.get("arrived_at") or "",
                      "" if r.get("lag_ms") is None else f"{r['lag_ms']:.1f}",
                      r.get("reason") or r.get("digest") or "")
    console.print(table)
    console.print("complete: every replica allowed by residency has it" if answer["complete"]
                  else "not complete yet")
    return 0 if answer["complete"] else 1
