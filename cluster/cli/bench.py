"""`georeg bench …` subcommands."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import replace
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks",
                           description="Benchmarks of georeg, measured on this machine.")
    benchmarks = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    _add_node(benchmarks)
    _add_lag(benchmarks)
    _add_replication(benchmarks)
    _add_footprint(benchmarks)
    _add_scale(benchmarks)
    _add_webhooks(benchmarks)
    _add_tiers(benchmarks)
    _add_import(benchmarks)
    _add_cache(benchmarks)


def _add_footprint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "footprint", help="startup time, idle CPU and memory of a whole cluster",
        description="Start a cluster (the default spec unless --config) on free ports, measure "
                    "the time to all-healthy and to all-subscribed, then each process's CPU and "
                    "RSS over an idle window, and print them.")
    p.add_argument("--config", type=Path, metavar="FILE", help="cluster spec (default: built-in)")
    p.add_argument("--repeat", type=int, default=3, help="startups measured (median reported)")
    p.add_argument("--idle", type=float, default=10.0, metavar="SECONDS", help="idle window")
    p.add_argument("--after-images", type=int, default=0, metavar="N",
                   help="then push N images of 3 MiB through the global endpoints (and pull "
                        "their blobs back) and read every node's RSS again (default: skip)")
    p.add_argument("--settle", type=float, default=25.0, metavar="SECONDS",
                   help="how long after that workload RSS is read (default 25: one memory "
                        "trim of the nodes' at least)")
    p.set_defaults(func=_run_footprint)


def _run_footprint(args: argparse.Namespace) -> int:
    from registry_node import logs

    from ..bench.footprint import run

    logs.configure("console", "warning", sys.stderr)
    run(args.config, max(1, args.repeat), args.idle, max(0, args.after_images), args.settle)
    return 0


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

    from ..bench.node import NodeBenchOptions, run
    from ..bench.procfs import MIB
    from ..bench.report import GEOREG, REFERENCE, print_table
    from ..bench.server import ServerStartError
    from ..bench.workload import WorkloadError

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
    results = _run_bench("node", run(options), (ServerStartError, WorkloadError), "servers stopped")
    if isinstance(results, int):
        return results
    console = _console(160)
    print_table(results, console)
    if args.json:
        results.write_json(args.json)
        print(f"results written to {args.json}", file=sys.stderr)
    return 0


def _size(value: str) -> int:
    """1048576, 1MiB, 512KiB, 1M, 64K."""
    text = value.strip().lower().removesuffix("b").removesuffix("i")
    scale = {"k": 1024, "m": 1 << 20, "g": 1 << 30}.get(text[-1:], 1)
    try:
        number = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 1MiB or 256KiB, got {value!r}")
    return number


def _add_lag(sub: argparse._SubParsersAction) -> None:
    from ..bench.floor import FORMULA

    p = sub.add_parser(
        "lag", help="replication lag per origin → destination pair, against the WAN's floor",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""\
Start a cluster (the default spec, or --config) in a child process on free
loopback ports, push images at chosen origin nodes on an open-loop schedule,
and record at every other replica when each image became pullable (the node's
commit of manifest and tag, read from its replication status), against the
client's receipt of the manifest PUT's 201. A few more images are then watched
with real GETs at every destination, to show those recorded arrivals match
what a client sees.

Per pair: p50/p95/p99/max lag, the floor (the least any protocol could do on
the modelled link, per image from its own push timeline; a lag below it by
more than the measured clock error is a bug), the ratio to it, throughput,
and whether the target is met:
  {FORMULA}
  target with the WAN model: p50 ≤ 1.25×floor + 20 ms, p99 ≤ 2×floor + 50 ms
  target on loopback (--no-wan): p50 < 50 ms, p99 < 200 ms
Also: the clock error (every node's clock bracketed against the benchmark's
before and after), the cluster's CPU while it ran, and how late the links
delivered against the model (a chunk the supervisor wrote 30 ms after its modelled time adds
30 ms of lag that is the machine's, not the protocol's).
Targets are reported, never enforced: the exit status is 0 whatever the numbers.""",
        epilog="""\
examples:
  georeg bench lag                              default spec and WAN, a few minutes
  georeg bench lag --no-wan                     loopback, no modelled latency
  georeg bench lag --json lag.json --chart lag.png
  georeg bench lag --fault-link eastus southeastasia --fault-latency 100
  georeg bench lag --images 10 --rate 2 --origin eastus-2 --origin brazilsouth
  georeg bench lag --layer-mib 100              one 100 MiB layer pushed in East US, 3 rounds""")
    p.add_argument("--config", type=Path, metavar="FILE", help="cluster spec (TOML); default: built in")
    p.add_argument("--no-wan", dest="wan", action="store_false", default=None,
                   help="no modelled latency or bandwidth: every link is plain loopback")
    p.add_argument("--data-dir", type=Path, metavar="DIR",
                   help="use the cluster running from DIR (`georeg up`) instead of starting one")
    load = p.add_argument_group("workload")
    load.add_argument("--origin", action="append", metavar="REGION|NODE",
                      help="where images are pushed, repeatable (a region means its first node; "
                           "default: eastus and westeurope)")
    load.add_argument("--images", type=_positive, help="images per origin (default 20)")
    load.add_argument("--layers", type=_positive, help="layers per image (default 3)")
    load.add_argument("--layer-size", type=_size, metavar="SIZE", help="bytes per layer (default 1MiB)")
    load.add_argument("--rate", type=float, help="images per second per origin (default 0.5)")
    load.add_argument("--layer-mib", type=_positive, metavar="MIB",
                      help="large-layer mode: each image is one layer of MIB MiB, pushed alone "
                           "(--images rounds, default 3; origin eastus unless --origin) and "
                           "awaited at every destination before the next; reports arrival per "
                           "destination node and region against the bandwidth floor")
    load.add_argument("--duration", type=float, metavar="SECONDS",
                      help="push for this long: images per origin = rate × duration")
    load.add_argument("--verify", type=int, metavar="N",
                      help="images pushed afterwards, each watched at one destination with real GETs "
                           "(default 8; 0 skips)")
    load.add_argument("--quiet-wait", type=float, default=30.0, metavar="SECONDS",
                      help="wait up to this long for other processes to go quiet first (default 30)")
    fault = p.add_argument_group("fault (one link slowed while measuring)")
    fault.add_argument("--fault-link", nargs=2, metavar=("A", "B"),
                       help="degrade every link between regions A and B, both directions")
    fault.add_argument("--fault-latency", type=float, default=0.0, metavar="MS",
                       help="one-way latency added on that link")
    fault.add_argument("--fault-bandwidth", type=float, default=0.0, metavar="MBPS",
                       help="bandwidth cap on that link")
    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, metavar="FILE", help="write pairs and every sample as JSON")
    out.add_argument("--chart", type=Path, metavar="FILE.png",
                     help="write a PNG: lag distributions per pair, origin × destination heatmaps")
    out.add_argument("--workdir", type=Path, help="keep the cluster's data and logs here")
    out.add_argument("--profile", type=Path, metavar="DIR",
                     help="py-spy (raw) of the --profile-node processes while pushing")
    out.add_argument("--profile-node", action="append", default=[], metavar="NODE",
                     help="node name, or 'supervisor' (the WAN links); repeatable")
    p.set_defaults(func=_run_lag_bench)


def _run_lag_bench(args: argparse.Namespace) -> int:

    from ..bench.clusterproc import ClusterStartError
    from ..bench.lag import LagBenchOptions, run
    from ..bench.lag_report import print_table

    options = LagBenchOptions()
    if args.layer_mib:
        if args.layers or args.layer_size or args.rate or args.duration:
            print("georeg bench lag: --layer-mib sets one layer per image, pushed in rounds: "
                  "drop --layers, --layer-size, --rate and --duration", file=sys.stderr)
            return 2
        options = LagBenchOptions.large(args.layer_mib << 20)
    if args.fault_link and not (args.fault_latency or args.fault_bandwidth):
        print("georeg bench lag: --fault-link needs --fault-latency and/or --fault-bandwidth",
              file=sys.stderr)
        return 2
    rate = args.rate or options.rate
    images = args.images
    if args.duration:
        images = max(1, round(rate * args.duration))
    given = {"config": args.config, "wan": args.wan, "data_dir": args.data_dir,
             "origins": tuple(args.origin) if args.origin else None, "images": images,
             "layers": args.layers, "layer_bytes": args.layer_size, "rate": args.rate,
             "verify": args.verify, "workdir": args.workdir, "profile_dir": args.profile,
             "fault_link": tuple(args.fault_link) if args.fault_link else None}
    options = replace(options, **{k: v for k, v in given.items() if v is not None},
                      fault_latency_ms=args.fault_latency,
                      fault_bandwidth_mbps=args.fault_bandwidth, quiet_wait_s=args.quiet_wait,
                      profile_nodes=tuple(args.profile_node))
    results = _run_bench("lag", run(options), (ClusterStartError, ValueError), "cluster stopped")
    if isinstance(results, int):
        return results
    console = _console(160)
    print_table(results, console)
    if args.json:
        results.write_json(args.json)
        print(f"results written to {args.json}", file=sys.stderr)
    if args.chart:
        from ..bench.lag_chart import write_chart

        if write_chart(results, args.chart):
            print(f"chart written to {args.chart}", file=sys.stderr)
        else:
            print(f"no chart: no image arrived at any destination ({args.chart} not written)",
                  file=sys.stderr)
    return 0


def _add_replication(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replication", help="replication throughput between two nodes vs one node's push throughput",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Two single-node regions, A (eastus) and B (westeurope), on loopback. Push N
distinct layers to A at concurrency 8 while B is cut off (A's push
throughput), heal the cut and time B catching up (replication throughput,
from B's replication byte counter), then push N more with the link up (both
at once). Target: replication ≥ 0.5 × push. Reported, never enforced.""")
    p.add_argument("--layers", type=_positive, help="layers per phase (default 256)")
    p.add_argument("--layer-size", type=_size, metavar="SIZE", help="bytes per layer (default 1MiB)")
    p.add_argument("--concurrency", type=_positive, help="pushes in flight (default 8)")
    p.add_argument("--wan", action="store_true",
                   help="keep the modelled WAN between the two (default: plain loopback)")
    p.add_argument("--workdir", type=Path, help="keep the cluster's data and logs here")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    p.set_defaults(func=_run_replication_bench)


def _run_replication_bench(args: argparse.Namespace) -> int:
    import json

    from ..bench.clusterproc import ClusterStartError
    from ..bench.replication import ReplicationBenchOptions, run
    from ..bench.workload import WorkloadError

    options = ReplicationBenchOptions()
    given = {"layers": args.layers, "layer_bytes": args.layer_size,
             "concurrency": args.concurrency, "workdir": args.workdir}
    options = replace(options, **{k: v for k, v in given.items() if v is not None}, wan=args.wan)
    results = _run_bench("replication", run(options),
                         (ClusterStartError, WorkloadError, TimeoutError),
                         "cluster stopped")
    if isinstance(results, int):
        return results
    console = _console(140)
    results.print(console)
    if args.json:
        args.json.write_text(json.dumps(results.to_json(), indent=2) + "\n")
        print(f"results written to {args.json}", file=sys.stderr)
    return 0


def _add_scale(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scale", help="many small images: push rate, listings, GETs, idle cost, new region",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Push N small manifests (a tiny config and one shared tiny layer per
repository, told apart by an annotation) in R repositories, then read them
back, on three registries in turn: a standalone georeg node, the reference
registry (CNCF distribution), and the default cluster through its home
region's global endpoint (started here on free ports, auth on, as its admin
user). Per registry: manifests pushed per second at concurrency 8, full and
paged (n=100) tag list of the largest repository, _catalog pages, GET
manifest (p50/p99). On the standalone node also: metadata on disk after a
push/delete churn, against the same content without it. On the cluster also: the time until every node holds
the last manifest, whole-cluster idle CPU (empty, after the push, after a new
region) with what its links carried meanwhile, per-node RSS, and
`replication create --location japaneast` until Ready.
Counts are checked (a wrong answer stops the run); timings are reported,
never enforced.""",
        epilog="""\
examples:
  georeg bench scale --quick                       every step at a small size, about a minute
  georeg bench scale -n 10000 -r 100 --json s.json
  georeg bench scale --only cluster --idle 60""")
    size = p.add_argument_group("size")
    size.add_argument("-n", "--manifests", type=_positive,
                      help="manifests pushed (default 100000; --quick 400)")
    size.add_argument("-r", "--repositories", type=_positive,
                      help="repositories they go in (default 10000; --quick 8)")
    size.add_argument("--largest", type=_positive, metavar="N",
                      help="manifests in the first repository, where tags are listed "
                           "(default a tenth of them)")
    size.add_argument("--concurrency", type=_positive, help="requests in flight (default 8)")
    size.add_argument("--reads", type=_positive,
                      help="requests per read measurement; full tag lists a tenth (default 2000)")
    size.add_argument("--page", type=_positive, metavar="N",
                      help="n= of the paged tag list and catalog reads (default 100)")
    size.add_argument("--idle", type=float, metavar="SECONDS",
                      help="each idle window on the cluster (default 30: one anti-entropy "
                           "period)")
    size.add_argument("--quick", action="store_true",
                      help="400 manifests in 8 repositories, 100 reads, 3 s idle windows "
                           "(explicit options above still apply)")
    what = p.add_argument_group("what runs")
    what.add_argument("--only", action="append", choices=("standalone", "reference", "cluster"),
                      help="measure this registry only; repeatable (default: all three)")
    what.add_argument("--catch-up", type=int, metavar="N",
                      help="manifests pushed while a region is isolated, then the time for it "
                           "to list them all after the heal (default 10000; --quick 100; 0 skips)")
    what.add_argument("--churn", type=int, metavar="OPS",
                      help="push/delete operations on the standalone node after its reads, "
                           "then its metadata on disk before and after (default 100000; "
                           "--quick 400; 0 skips)")
    what.add_argument("--no-new-region", action="store_true",
                      help="skip `replication create` on the cluster")
    what.add_argument("--config", type=Path, metavar="FILE",
                      help="cluster spec (TOML); default: built in")
    what.add_argument("--reference-binary", metavar="PATH",
                      help="the reference registry (default /usr/bin/docker-registry)")
    what.add_argument("--workdir", type=Path,
                      help="keep data and logs here (default: a temp dir, removed)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    p.set_defaults(func=_run_scale_bench)


def _run_scale_bench(args: argparse.Namespace) -> int:
    import json

    from ..bench.clusterproc import ClusterStartError
    from ..bench.scale import SIDES, ScaleOptions, print_table, run
    from ..bench.server import ServerStartError
    from ..bench.workload import WorkloadError

    options = ScaleOptions()
    if args.quick:
        options = options.quick()
    given = {"manifests": args.manifests, "repositories": args.repositories,
             "largest": args.largest, "concurrency": args.concurrency, "reads": args.reads,
             "page": args.page, "idle_s": args.idle, "catch_up": args.catch_up, "churn": args.churn, "config": args.config, "workdir": args.workdir,
             "reference_binary": args.reference_binary}
    options = replace(options, **{k: v for k, v in given.items() if v is not None},
                      sides=tuple(s for s in SIDES if not args.only or s in args.only),
                      new_region=not args.no_new_region)
    results = _run_bench("scale", run(options),
                         (ClusterStartError, ServerStartError, WorkloadError, TimeoutError, ValueError),
                         "servers stopped")
    if isinstance(results, int):
        return results
    console = _console(160)
    print_table(results, console)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json}", file=sys.stderr)
    return 0


def _add_webhooks(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "webhooks", help="push → webhook delivery against the WAN floor, 500 webhooks, a hanging receiver",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Start a cluster (the default spec, or --config) in a child process on free
loopback ports and a webhook receiver (an aiohttp server) in this one; push
at one node (--origin, default the home region's first) and measure:

  latency   a `push` webhook per replica region and a `replicated` one in the
            home region; --images images at --rate per second: delivery latency
            from the client's 201 to the receiver's arrival, p50/p99 per webhook,
            against the floor (the image's arrival floor at the webhook's region,
            + the least one-way latency from there to the receiver's location;
            for `replicated`, the latest region's arrival + its way to the home
            region), ratio quoted; and the time after the region held the image
  hanging   --manifests small manifests at c=--concurrency per round: A (no
            webhook) and B (a push webhook whose receiver never answers),
            A B A B … (--pairs), after a warm-up: manifests/s, B÷A, A/A spread
  bulk      --webhooks webhooks (Premium's limit, 500) in the origin's region,
            all matching, then --bulk-pushes pushes: deliveries/s until drained,
            the delivering node's CPU and the receiver's (this process)

Timings are reported, never enforced: the exit status is 0 whatever the numbers.""",
        epilog="""\
examples:
  georeg bench webhooks --quick                  every step small, a few minutes
  georeg bench webhooks --json webhooks.json     the issue's sizes
  georeg bench webhooks --only latency --receiver-location eastus
  georeg bench webhooks --only hanging --pairs 4 --manifests 2000""")
    p.add_argument("--config", type=Path, metavar="FILE", help="cluster spec (TOML); default: built in")
    p.add_argument("--no-wan", dest="wan", action="store_false", default=None,
                   help="no modelled latency or bandwidth: every link is plain loopback")
    p.add_argument("--origin", metavar="REGION|NODE",
                   help="where images are pushed (default: the home region's first node)")
    p.add_argument("--receiver-location", metavar="REGION",
                   help="where every receiver sits in the modelled WAN (default: each webhook's "
                        "own region)")
    p.add_argument("--only", action="append", choices=("latency", "hanging", "bulk"),
                   help="run this step only; repeatable (default: all three)")
    size = p.add_argument_group("size")
    size.add_argument("--images", type=_positive, help="latency: images pushed (default 20)")
    size.add_argument("--rate", type=float, help="latency: images per second (default 0.5)")
    size.add_argument("--layers", type=_positive, help="latency: layers per image (default 3)")
    size.add_argument("--layer-size", type=_size, metavar="SIZE",
                      help="latency: bytes per layer (default 1MiB)")
    size.add_argument("--manifests", type=_positive,
                      help="hanging: manifests per round (default 1000)")
    size.add_argument("--pairs", type=_positive, help="hanging: A/B round pairs (default 2)")
    size.add_argument("--concurrency", type=_positive, help="hanging: pushes in flight (default 8)")
    size.add_argument("--webhooks", type=_positive, help="bulk: webhooks (default 500)")
    size.add_argument("--bulk-pushes", type=_positive, metavar="N",
                      help="bulk: pushes, each delivered to every webhook (default 20)")
    size.add_argument("--quick", action="store_true",
                      help="6 images at 1/s, 300 manifests per round, 100 webhooks × 5 pushes "
                           "(explicit options above still apply)")
    p.add_argument("--quiet-wait", type=float, default=30.0, metavar="SECONDS",
                   help="wait up to this long for other processes to go quiet first (default 30)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="the longest a step waits for its deliveries (default 300)")
    p.add_argument("--workdir", type=Path, help="keep the cluster's data and logs here")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    p.set_defaults(func=_run_webhooks_bench)


def _run_webhooks_bench(args: argparse.Namespace) -> int:
    import json

    from ..bench.clusterproc import ClusterStartError
    from ..bench.webhooks import STEPS, WebhookBenchOptions, print_report, run
    from ..bench.workload import WorkloadError

    options = WebhookBenchOptions()
    if args.quick:
        options = options.quick()
    given = {"config": args.config, "wan": args.wan, "origin": args.origin,
             "receiver_location": args.receiver_location, "images": args.images,
             "rate": args.rate, "layers": args.layers, "layer_bytes": args.layer_size,
             "manifests": args.manifests, "pairs": args.pairs, "concurrency": args.concurrency,
             "webhooks": args.webhooks, "bulk_pushes": args.bulk_pushes,
             "timeout_s": args.timeout, "workdir": args.workdir}
    options = replace(options, **{k: v for k, v in given.items() if v is not None},
                      steps=tuple(s for s in STEPS if not args.only or s in args.only),
                      quiet_wait_s=args.quiet_wait)
    results = _run_bench("webhooks", run(options),
                         (ClusterStartError, WorkloadError, TimeoutError, ValueError),
                         "cluster stopped")
    if isinstance(results, int):
        return results
    print_report(results, _console(160))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json}", file=sys.stderr)
    return 0


def _add_tiers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tiers", help="each tier's request and bandwidth limits driven past; what throttling costs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
For each tier, a one-region cluster (auth on, no WAN model) with the tier's
limits on ([limits] limits = "tier", burst --burst seconds instead of a
minute), its node driven directly:

  reads     GET manifest by tag, open loop at --over × the limit: one identity
            against its share (half), then --identities identities together
            against the replica's rate; admitted/min over --window seconds
            after the first 429 (+ --settle), against the limit, ±5 %
  writes    the same with POST upload starts
  bandwidth one blob of the download budget × --transfer seconds, streamed up
            (against the upload budget) and down (against the download one)
  overhead  HEAD and GET manifest at c=--concurrency on three clusters, off,
            on (every rate at a billion a minute: the buckets on every request,
            never empty) and off2 (A/A), and the reference registry, in
            --rounds rotated rounds: on÷off, off2÷off, reference÷off (target:
            on÷off ≥ 0.95); also the client's unshaped speed on off

Offered, admitted and refused (429, by the limit its body names) are all
reported; 429s are never counted as achieved. Figures are reported, never
enforced: the exit status is 0 whatever the numbers.""",
        epilog="""\
examples:
  georeg bench tiers                               every tier, every step (~10 minutes)
  georeg bench tiers --quick                       smoke: rates × 0.25, 2 s windows
  georeg bench tiers --tiers Premium --only reads --burst 60
  georeg bench tiers --only overhead --rounds 11 --json overhead.json""")
    p.add_argument("--tiers", metavar="LIST",
                   help="comma-separated, of Basic, Standard, Premium (default: all three)")
    p.add_argument("--only", action="append", choices=("reads", "writes", "bandwidth", "overhead"),
                   help="run this step only; repeatable (default: all four)")
    size = p.add_argument_group("size")
    size.add_argument("--scale", type=float, help="every rate and bandwidth × this (default 1)")
    size.add_argument("--burst", type=float, metavar="SECONDS",
                      help="a bucket holds this many seconds of its rate (default 2; the "
                           "tier's own is 60: the steady state is the same, the drain longer)")
    size.add_argument("--over", type=float, help="offered ÷ limit (default 1.5)")
    size.add_argument("--identities", type=_positive,
                      help="identities sharing the load in the replica steps (default 4)")
    size.add_argument("--window", type=float, metavar="SECONDS",
                      help="steady-state window of each rate step (default 20)")
    size.add_argument("--settle", type=float, metavar="SECONDS",
                      help="after the first 429, before the window (default 1)")
    size.add_argument("--transfer", type=float, metavar="SECONDS",
                      help="the blob is the download budget × this (default 5)")
    size.add_argument("--rounds", type=_positive, help="overhead rounds (default 7)")
    size.add_argument("--ops", type=_positive,
                      help="overhead: requests per operation per target per round (default 4000)")
    size.add_argument("--concurrency", type=_positive, help="overhead: in flight (default 8)")
    size.add_argument("--quick", action="store_true",
                      help="smoke: rates and bandwidth × 0.25, burst 0.5 s, 2 s windows, 1 s "
                           "transfers, 2 overhead rounds of 300 (explicit options still apply)")
    p.add_argument("--reference-binary", metavar="PATH",
                   help="the reference registry (default /usr/bin/docker-registry)")
    p.add_argument("--workdir", type=Path, help="keep the clusters' data and logs here")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    p.set_defaults(func=_run_tiers_bench)


def _run_tiers_bench(args: argparse.Namespace) -> int:
    import json

    from ..bench.clusterproc import ClusterStartError
    from ..bench.server import ServerStartError
    from ..bench.tiers import STEPS, TiersBenchOptions, print_report, run
    from ..bench.workload import WorkloadError

    options = TiersBenchOptions()
    if args.quick:
        options = options.quick()
    tiers = None
    if args.tiers:
        from registry_node.tiers import canonical

        tiers = tuple(canonical(t) or t for t in args.tiers.split(",") if t.strip())
    given = {"tiers": tiers, "scale": args.scale, "burst_s": args.burst, "over": args.over,
             "identities": args.identities, "window_s": args.window, "settle_s": args.settle,
             "transfer_s": args.transfer, "rounds": args.rounds, "ops": args.ops,
             "concurrency": args.concurrency, "reference_binary": args.reference_binary,
             "workdir": args.workdir}
    options = replace(options, **{k: v for k, v in given.items() if v is not None},
                      steps=tuple(s for s in STEPS if not args.only or s in args.only))
    results = _run_bench("tiers", run(options),
                         (ClusterStartError, ServerStartError, WorkloadError, TimeoutError,
                          ValueError), "clusters stopped")
    if isinstance(results, int):
        return results
    print_report(results, _console(170))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json}", file=sys.stderr)
    return 0


def _run_bench(command: str, coroutine, errors: tuple[type[BaseException], ...],
               stopped: str):
    """The benchmark's results, or the exit status once it has said why there
    are none: 2 for what it could not do (``errors``), 130 when interrupted."""
    try:
        return _event_loop_run(coroutine)
    except errors as exc:
        print(f"georeg bench {command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"georeg bench {command}: interrupted; {stopped}", file=sys.stderr)
        return 130


def _console(width: int):
    """The terminal's console, or, to a file or pipe, one wide enough that rows
    do not wrap (a ``rich.console.Console``)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=width)


def _event_loop_run(coroutine):
    """Run the benchmark client on the standard asyncio loop (GEOREG_BENCH_LOOP=uvloop
    for uvloop). Measured here: an aiohttp client on uvloop reads large bodies
    from an aiohttp server 2-3x slower than on asyncio (≈250 vs ≈680 MB/s from a
    georeg node; curl reads the same node at ≈1100 MB/s), while the reference's
    Go server is read at about the same speed either way (≈810 vs ≈770 MB/s).
    The asyncio client is the one that does not handicap either side."""
    import asyncio
    import os

    if os.environ.get("GEOREG_BENCH_LOOP") == "uvloop":
        import uvloop

        return uvloop.run(coroutine)
    return asyncio.run(coroutine)


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import", help="georeg import against skopeo copy, same images, same source",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Start the reference registry (Debian's docker-registry) as the source and a
cluster (the default spec, or --config) in a child process, both on loopback;
fill the source with a fresh set of images per side and round, then copy them
into the home region with `georeg import` (the management API) and with
`skopeo copy --preserve-digests` (its regional endpoint), rounds alternating
which goes first. Prints each side's median MB/s of blob bytes and the ratio
import ÷ skopeo against the goal (≥ 1.0), with the CPU other processes used
meanwhile. Timings are reported, never enforced.""")
    _add_image_set_options(p, workdir_help="keep the source's and cluster's data here")
    p.set_defaults(func=_run_import_bench)


def _run_import_bench(args: argparse.Namespace) -> int:
    from ..bench.clusterproc import ClusterStartError
    from ..bench.import_ import ImportBenchOptions, describe, run
    from ..bench.server import ServerStartError

    return _run_image_set_bench("import", args, ImportBenchOptions(), run, describe,
                                (ClusterStartError, ServerStartError, RuntimeError, OSError))


def _add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache", help="pulls through the pull-through cache against direct and local pulls",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Start the reference registry (Debian's docker-registry) as the upstream and a
cluster (the default spec, or --config) in a child process, both on loopback,
with one cache rule (UPSTREAM/* => cached/*); then, per round, pull with skopeo
into a local dir: fresh images straight from the upstream (direct), fresh
images through the cache (first: fetched from upstream in the request), those
again (second: now local), and images pushed into the cluster beforehand
(local). Prints each side's median MB/s, first ÷ direct of the times (goal
≤ 1.2) and second ÷ local of the throughputs (goal ≥ 0.95), with the CPU other
processes used meanwhile. Timings are reported, never enforced.""")
    _add_image_set_options(p, workdir_help="keep the upstream's and cluster's data here")
    p.set_defaults(func=_run_cache_bench)


def _run_cache_bench(args: argparse.Namespace) -> int:
    from ..bench.cache import CacheBenchOptions, describe, run
    from ..bench.clusterproc import ClusterStartError
    from ..bench.server import ServerStartError

    return _run_image_set_bench("cache", args, CacheBenchOptions(), run, describe,
                                (ClusterStartError, ServerStartError, RuntimeError, OSError,
                                 subprocess.CalledProcessError))


def _add_image_set_options(p: argparse.ArgumentParser, workdir_help: str) -> None:
    """The options ``bench import`` and ``bench cache`` share: the cluster spec,
    the image set's sizes (``source_images.ImageSetOptions``), the quiet wait,
    where to keep the data and where to write the results."""
    p.add_argument("--config", type=Path, metavar="FILE", help="cluster spec (default: built-in)")
    p.add_argument("--images", type=_positive, help="images per side and round (default 4)")
    p.add_argument("--layers", type=_positive, help="layers per image (default 2)")
    p.add_argument("--layer-kib", type=_positive, help="KiB per layer (default 8192)")
    p.add_argument("--repeat", type=_positive, help="rounds (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="2 images of one 1 MiB layer, one round (explicit options still apply)")
    p.add_argument("--quiet-wait", type=float, default=30.0, metavar="SECONDS",
                   help="wait up to this long for other processes to go quiet first (default 30)")
    p.add_argument("--workdir", type=Path, help=workdir_help)
    p.add_argument("--json", type=Path, metavar="FILE", help="write the results")


def _run_image_set_bench(command: str, args: argparse.Namespace, options, run, describe,
                         errors: tuple[type[BaseException], ...]) -> int:
    """Run ``bench import`` or ``bench cache``: ``options`` (that bench's
    defaults) with --quick and the explicit sizes applied, then ``run``; print
    ``describe`` of the result and write its JSON if asked. 2, having said why,
    on ``errors``."""
    import json

    from ..control import spec as specs

    if args.quick:
        options = options.quick()
    given = {"images": args.images, "layers": args.layers, "repeat": args.repeat,
             "layer_bytes": args.layer_kib and args.layer_kib * 1024}
    options = replace(options, **{k: v for k, v in given.items() if v is not None})
    try:
        result = run(specs.load(args.config), options, args.workdir, args.quiet_wait)
    except (specs.SpecError, *errors) as exc:
        print(f"georeg bench {command}: {exc}", file=sys.stderr)
        return 2
    print(describe(result))
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        print(f"results written to {args.json}", file=sys.stderr)
    return 0
