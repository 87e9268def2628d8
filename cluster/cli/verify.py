"""`georeg verify`: the convergence check of a running cluster (see cluster.faults.verify).

It runs in the CLI's own process: the management API says which nodes exist,
where they answer and where their data lives; the saved spec gives the
residency policy. Exit 0: clean; 1: divergent; 2: the check could not be made.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..control.access import CredentialMissing, authorization, read_internal_credential
from ..control.state import saved_spec
from ..faults.verify import targets_from_status, verify
from .common import CliError, add_data_dir, call, cluster_tls, command, data_dir_of


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify", help="check that every live replica has converged, complete and resident",
        description="Compare every live replica: tags and manifests (as last-writer-wins "
                    "registers, where residency lets them travel), what each node serves "
                    "against what it stores, that every served manifest is complete (its blobs "
                    "and child manifests answer 200 with the right size), and residency on "
                    "disk (no blob file, metadata key or log event of content confined to "
                    "another region), and bit rot each node found: repaired from a replica, or "
                    "quarantined and unrepairable. Names every divergence. Exit 0: clean; 1: divergent; "
                    "2: cannot check (fewer than two nodes up, cluster not running, timeout).")
    add_data_dir(p)
    p.add_argument("--json", action="store_true", help="the full report, machine-readable")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="give up (exit 2) after this many seconds (default 60)")
    p.add_argument("--scrub", action="store_true",
                   help="first have every node read and authenticate its stored blobs "
                        "(at most 1 GiB each, at 64 MiB/s), repairing any that rotted")
    p.set_defaults(func=command(run_verify))


def run_verify(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    status = call(data_dir, "GET", "/georeg/v1/cluster", timeout=args.timeout)
    spec = saved_spec(data_dir)
    if spec is None:
        raise CliError(f"{data_dir} has no saved spec; is it a georeg cluster's data dir?")
    headers = {}
    if spec.auth_enabled:      # it asks every node itself, as the cluster does
        try:
            headers = authorization(read_internal_credential(data_dir))
        except CredentialMissing as exc:
            raise CliError(str(exc)) from None
    report = asyncio.run(verify(targets_from_status(status), policy=spec.residency_policy(),
                                timeout=args.timeout, headers=headers,
                                tls=cluster_tls(data_dir), scrub=args.scrub))
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _print(report)
    return report.exit_code


def _print(report) -> None:
    console = Console()
    colour = {"clean": "green", "divergent": "red"}.get(report.status, "yellow")
    checked = ", ".join(report.checked) or "none"
    console.print(f"[bold {colour}]{report.status}[/]: checked {len(report.checked)} node(s) "
                  f"({checked}) in {report.elapsed_s:.1f}s")
    if report.error:
        console.print(f"[yellow]cannot verify:[/] {escape(report.error)}")
    for n in report.not_checked:
        console.print(f"[yellow]not checked[/] {n['node']} ({n['region']}): {escape(n['reason'])}")
    if report.counts:
        table = Table("node", "repositories", "tags", "manifests", "blobs", title="Checked",
                      title_justify="left")
        for node, c in report.counts.items():
            table.add_row(node, str(c["repositories"]), str(c["tags"]), str(c["manifests"]),
                          str(c["blobs"]))
        console.print(table)
    if report.repairs:
        table = Table("node", "repaired", "unrepairable", "quarantined", "scrubbed",
                      title="Bit rot", title_justify="left")
        for node, r in report.repairs.items():
            scrub = r.get("scrub")
            table.add_row(node, _digests(r["repaired"]), _digests(r["unrepairable"]),
                          str(r["quarantined"]),
                          f"{scrub['checked']} blob(s)" if scrub else "—")
        console.print(table)
    if report.divergences:
        console.print(f"[bold]{len(report.divergences)} divergence(s)[/]")
    for d in report.divergences:
        what = f"tag {d.tag}" if d.tag else (d.digest or "")
        where = " · ".join(escape(v) for v in (d.node, d.repository, what) if v)
        console.print(f"[red]{d.kind}[/] {where}")
        console.print(f"    expected: {escape(_show(d.expected))}   actual: {escape(_show(d.actual))}",
                      soft_wrap=True)
        console.print(f"    {escape(d.detail)}", soft_wrap=True)
        if d.location:
            console.print(f"    at {escape(d.location)}", soft_wrap=True)
    for note in report.notes:
        console.print(f"[dim]note: {escape(note)}[/]")


def _digests(entries: list[dict]) -> str:
    return "\n".join(escape(e["digest"][:19] + "…" + (f" from {e['source']}" if e.get("source")
                                                      else "")) for e in entries) or "—"


def _show(value: object) -> str:
    if value is None:
        return "—"
    return value if isinstance(value, str) else json.dumps(value)
