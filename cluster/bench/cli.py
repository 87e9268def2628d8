"""`georeg bench …` subcommands."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
