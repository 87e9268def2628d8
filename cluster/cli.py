"""The ``georeg`` command line.

Each subcommand lives in its own module and registers itself here; this file
only builds the parser and dispatches.
"""

from __future__ import annotations

import argparse
import sys

from . import node_cli


def build_parser(only_node: bool = False) -> argparse.ArgumentParser:
    """The whole CLI; with ``only_node``, just `georeg node` — a node process then
    imports nothing it does not run (no rich tables, no benchmarks), which keeps
    each of a cluster's processes a few MiB smaller."""
    parser = argparse.ArgumentParser(
        prog="georeg",
        description="georeg: a geo-replicating OCI container registry cluster on one machine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    node_cli.register(sub)
    if only_node:
        return parser
    from . import cluster_cli

    cluster_cli.register(sub)
    from .bench import cli as bench_cli

    bench_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(only_node=argv[:1] == ["node"]).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
