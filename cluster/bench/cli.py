"""`georeg bench …` subcommands."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks",
                           description="Benchmarks of georeg, measured on this machine.")
    benchmarks = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    _add_node(benchmarks)


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}")
    return number


def _add_node(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "node", help="one georeg node against the reference registry, side by side",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Start a georeg node (encryption on, as always) and the reference registry
(CNCF distribution, Debian's docker-registry, filesystem storage), both on
loopback in a temp dir, drive both with the same workload from one client
process, and print a table of both sides, their ratio and the targets:

  push      N distinct layers at concurrency 8, POST -> PATCH -> PUT ?digest=  MB/s
  pull      the same layers at concurrency 8, sha256 checked                 MB/s
  small     HEAD blob, GET manifest by tag, GET tags list at concurrency 8   ops/s, p99
  big       one 512 MiB blob streamed up, then down (hash checked)          MB/s
            and the server's peak RSS during both

Each step is warmed up, then measured --repeat times (median reported, range
shown); the registries alternate going first. MB is 10^6 bytes. Targets are
reported, never enforced: the exit status is 0 whatever the numbers.""",
        epilog="""\
examples:
  georeg bench node                         the full benchmark (a few minutes)
  georeg bench node --quick                 a smoke version, under 30 s
  georeg bench node --json bench.json       also write every run to a file
  georeg bench node --only georeg --node-arg=--log-level=warning
                                            try a node setting, node side only
  georeg bench node --profile /tmp/prof     py-spy profile of the node per step""")
    scale = p.add_argument_group("scale")
    scale.add_argument("--layers", type=_positive, help="layers pushed and pulled per run (default 256)")
    scale.add_argument("--layer-kib", type=_positive, help="size of each layer in KiB (default 1024)")
    scale.add_argument("--concurrency", type=_positive, help="requests in flight (default 8)")
    scale.add_argument("--images", type=_positive,
                       help="tagged images the small operations read (default 32)")
    scale.add_argument("--small-ops", type=_positive,
                       help="requests per small operation per run (default 3000)")
    scale.add_argument("--big-mib", type=_positive, help="size of the big blob in MiB (default 512)")
    scale.add_argument("--repeat", type=_positive, help="measured runs of every step (default 3)")
    scale.add_argument("--quick", action="store_true",
                       help="smoke version, under 30 s: 64 layers, 1000 small ops, 128 MiB blob, 1 run "
                            "(explicit options above still apply)")
    scale.add_argument("--no-warmup", action="store_true", help="skip the warm-up requests")
    what = p.add_argument_group("what runs")
    what.add_argument("--only", choices=("georeg", "reference"),
                      help="benchmark one side only (no ratios)")
    what.add_argument("--node-arg", action="append", default=[], metavar="ARG",
                      help="extra argument for `georeg node`, repeatable "
                           "(e.g. --node-arg=--log-level=warning)")
    what.add_argument("--reference-binary", metavar="PATH",
                      help="the reference registry (default /usr/bin/docker-registry)")
    what.add_argument("--quiet-wait", type=float, default=30.0, metavar="SECONDS",
                      help="before each step, wait up to this long for other processes on the "
                           "machine to go quiet (default 30; 0 never waits)")
    what.add_argument("--workdir", type=Path,
                      help="keep data and server logs here (default: a temp dir, removed)")
    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, metavar="FILE", help="write the results, every run included")
    out.add_argument("--profile", type=Path, metavar="DIR",
                     help="record the node with py-spy during the first run of each step, one "
                          "file per step (those runs are slowed by sampling)")
    out.add_argument("--profile-format", choices=("raw", "flamegraph", "speedscope"), default="raw",
                     help="py-spy output format (default raw: collapsed stacks, one per line)")
    out.add_argument("--profile-native", action="store_true",
                     help="include native frames (C extensions: uvloop, OpenSSL, RocksDB)")
    p.set_defaults(func=_run_node_bench)


def _run_node_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .node import NodeBenchOptions, run
    from .procfs import MIB
    from .report import GEOREG, REFERENCE, print_table
    from .server import ServerStartError
    from .workload import WorkloadError

    options = NodeBenchOptions()
    if args.quick:
        options = options.quick()
    given = {"layers": args.layers, "concurrency": args.concurrency, "images": args.images,
             "small_ops": args.small_ops, "repeat": args.repeat,
             "layer_bytes": args.layer_kib and args.layer_kib * 1024,
             "big_bytes": args.big_mib and args.big_mib * MIB}
    options = replace(options, **{k: v for k, v in given.items() if v is not None},
                      warmup=not args.no_warmup, node_args=tuple(args.node_arg),
                      targets=(args.only,) if args.only else (GEOREG, REFERENCE),
                      reference_binary=args.reference_binary, workdir=args.workdir,
                      profile_dir=args.profile, profile_format=args.profile_format,
                      profile_native=args.profile_native, quiet_wait_s=args.quiet_wait)
    try:
        results = _event_loop_run(run(options))
    except (ServerStartError, WorkloadError) as exc:
        print(f"georeg bench node: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("georeg bench node: interrupted; servers stopped", file=sys.stderr)
        return 130
    console = Console()
    if not console.is_terminal:  # a file or pipe: wide enough that rows do not wrap
        console = Console(width=160)
    print_table(results, console)
    if args.json:
        results.write_json(args.json)
        print(f"results written to {args.json}", file=sys.stderr)
    return 0


def _event_loop_run(coroutine):
    """Run on uvloop, as the node does, so the client's own overhead is small."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        import asyncio

        return asyncio.run(coroutine)
    return uvloop.run(coroutine)
