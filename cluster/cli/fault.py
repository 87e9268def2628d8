"""`georeg fault …`: inject and heal faults in a running cluster (see cluster.faults.controller)."""

from __future__ import annotations

import argparse
import json
import math

from rich.console import Console
from rich.table import Table

from registry_node.clock import MAX_OFFSET_S, skew_problem

from ..faults.controller import DEFAULT_THROTTLE_RATE, REQUEST_KINDS
from ..routing.http_faults import STATUSES as HTTP_STATUSES
from .common import CliError, add_data_dir, call, command, data_dir_of
from .node import request_rate


def _duration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, metavar="SECONDS",
                   help="heal by itself after this many seconds (default: until `georeg fault heal`)")
    add_data_dir(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fault", help="break the cluster on purpose: outages, partitions, slow or lossy links, "
                      "disks, bit rot, throttling, HTTP errors at endpoints, clocks",
        description="Inject faults into the running cluster and heal them. Every fault gets an "
                    "id (`georeg fault list`); `georeg fault heal ID` or `--all` heals.")
    faults = p.add_subparsers(dest="fault_command", required=True, metavar="FAULT")

    c = faults.add_parser("region-outage", help="a whole region goes down",
                          description="crash: SIGKILL every node of the region; stop: graceful "
                                      "shutdown; isolate: processes stay up, every link to and "
                                      "from the region is cut and clients cannot reach it.")
    c.add_argument("region")
    c.add_argument("--mode", choices=("crash", "stop", "isolate"), default="crash")
    _duration(c)
    c.set_defaults(func=command(lambda a: _inject(a, "region-outage", region=a.region, mode=a.mode)))

    c = faults.add_parser("zone-outage", help="one availability zone goes down")
    c.add_argument("region")
    c.add_argument("zone")
    c.add_argument("--mode", choices=("crash", "stop", "isolate"), default="crash")
    _duration(c)
    c.set_defaults(func=command(lambda a: _inject(a, "zone-outage", region=a.region, zone=a.zone,
                                               mode=a.mode)))

    c = faults.add_parser("partition", help="cut the network between two regions",
                          description="Cut every link between regions A and B (both ways), or "
                                      "with --one-way only A → B: A's nodes can no longer reach "
                                      "B's, while B still reaches A.")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--one-way", action="store_true")
    _duration(c)
    c.set_defaults(func=command(lambda a: _inject(a, "partition", a=a.a, b=a.b, one_way=a.one_way)))

    c = faults.add_parser("link", help="degrade the link between two regions")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--latency", type=float, default=0.0, metavar="MS", help="extra one-way latency")
    c.add_argument("--jitter", type=float, default=0.0, metavar="MS")
    c.add_argument("--bandwidth", type=float, default=0.0, metavar="MBPS", help="bandwidth cap")
    c.add_argument("--reset-prob", type=float, default=0.0, metavar="P",
                   help="probability that a chunk of traffic resets its connection")
    c.add_argument("--stall", action="store_true", help="accept connections, deliver nothing")
    lossy = c.add_argument_group(
        "a lossy path", "per TCP segment (1448 bytes), as TCP streams feel it (docs/faults.md)")
    lossy.add_argument("--loss", type=float, default=0.0, metavar="P",
                       help="segments lost: each costs a retransmission (one RTT, or a 200 ms "
                            "timeout at a burst's tail) and loss caps the rate as TCP does")
    lossy.add_argument("--corrupt", type=float, default=0.0, metavar="P",
                       help="segments whose damage TCP's checksum missed: a byte flipped in the "
                            "stream (replication refuses it and asks again; never stored)")
    lossy.add_argument("--duplicate", type=float, default=0.0, metavar="P",
                       help="segments sent twice: wire time only (TCP drops the copy)")
    lossy.add_argument("--reorder", action="store_true",
                       help="accepted for netem parity; TCP reorders for its reader: no effect")
    lossy.add_argument("--seed", type=int, metavar="N",
                       help="draw the segments' fates from this seed (default: the cluster's)")
    _duration(c)
    c.set_defaults(func=command(lambda a: _inject(
        a, "link", a=a.a, b=a.b, latency_ms=a.latency, jitter_ms=a.jitter,
        bandwidth_mbps=a.bandwidth, reset_probability=a.reset_prob, stall=a.stall,
        **_lossy(a))))

    c = faults.add_parser("routing", help="take a replica out of global routing (it keeps syncing)")
    c.add_argument("region")
    c.add_argument("state", choices=("off", "on"))
    _duration(c)
    c.set_defaults(func=command(lambda a: _inject(a, "routing", region=a.region,
                                               enabled=a.state == "on")))

    c = faults.add_parser(
        "disk", help="a full, slow or failing disk on a region's (or one zone's) nodes",
        description="Break the disk of a region's nodes (or one zone's node). --full: writes "
                    "fail with 507, reads go on. --slow MS: every write and sync takes MS "
                    "longer. --eio read: blob file reads fail with EIO (clients get a "
                    "retryable 503 disk I/O error); --eio write: every write — blob, upload, "
                    "metadata — fails with EIO before it begins (503; an upload in progress "
                    "ends, nothing half-written is kept), each with probability --prob, "
                    "drawn from --seed.")
    c.add_argument("where", metavar="REGION[/ZONE]")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--full", action="store_true", help="writes fail with 507; reads go on")
    what.add_argument("--slow", type=float, metavar="MS", help="add MS to every write and sync")
    what.add_argument("--eio", choices=("read", "write"),
                      help="blob reads, or all writes, fail with EIO")
    c.add_argument("--prob", type=float, default=1.0, metavar="P",
                   help="with --eio: the probability that an operation fails (default 1)")
    c.add_argument("--seed", type=int, help="with --eio: seed of the failures' random draw "
                                            "(default: one picked and shown, to replay the run)")
    _duration(c)
    c.set_defaults(func=command(_inject_disk))

    c = faults.add_parser(
        "bitrot", help="flip bytes in stored blob files; the node must notice and repair",
        description="Flip one byte in each of N blob files stored on one node (chosen, like "
                    "the byte, with --seed). The node never serves the rotten bytes (they "
                    "fail authentication): the first read that meets one moves the file into "
                    "quarantine and fetches the blob again from a replica residency allows "
                    "(content confined to the region: only its other zones). `georeg verify` "
                    "reports what was repaired and what could not be; `georeg verify --scrub` "
                    "finds rot before a client does. Nothing to heal afterwards.")
    c.add_argument("where", metavar="REGION[/ZONE]",
                   help="one node: a region, or a zone of a zone-redundant one (eastus/2)")
    c.add_argument("--blobs", type=int, default=1, metavar="N",
                   help="how many blob files to rot (default 1)")
    c.add_argument("--seed", type=int, help="seed of which files and bytes rot (default: one "
                                            "picked and shown, to replay the run)")
    c.add_argument("--digest", action="append", metavar="DIGEST",
                   help="rot only among these blobs (repeatable), e.g. one layer of an image; "
                        "refused if the node does not store one of them")
    add_data_dir(c)
    c.set_defaults(func=command(_inject_bitrot))

    c = faults.add_parser(
        "throttle", help="a region answers 429 past a request rate, as ACR under load",
        description="Throttle a region's replica (all its zones together, every identity "
                    "together, on top of any [limits] of the spec): past RATE requests a "
                    "minute of KIND (every kind unless one is named), clients get 429 "
                    "TOOMANYREQUESTS with a Retry-After in seconds. Endpoints never fail over on "
                    "a 429: clients of the region keep meeting it. For tests that cannot wait "
                    "for a real limit.")
    c.add_argument("region")
    c.add_argument("--rate", type=request_rate, default=DEFAULT_THROTTLE_RATE, metavar="N/min",
                   help=f"requests admitted per minute, e.g. 60/min or 2/s (default "
                        f"{DEFAULT_THROTTLE_RATE:g}/min)")
    c.add_argument("--kind", choices=REQUEST_KINDS,
                   help="read (GET, HEAD, OPTIONS), write (PUT, PATCH, POST), delete, referrers "
                        "(listings); default: every kind, each at RATE")
    _duration(c)
    c.set_defaults(func=command(lambda a: _inject(a, "throttle", region=a.region,
                                               rate_per_min=a.rate, request_kind=a.kind)))

    c = faults.add_parser("destroy", help="wipe a region's data; it restarts empty and re-syncs",
                          description="Destroy a region: SIGKILL its nodes, delete their data dirs "
                                      "and restart them empty. They re-sync from the other "
                                      "replicas; `georeg region restore` also brings back what "
                                      "only its paired-region copy holds.")
    c.add_argument("region")
    add_data_dir(c)
    c.set_defaults(func=command(lambda a: _inject(a, "destroy", region=a.region)))

    c = faults.add_parser(
        "http", help="an endpoint answers errors, resets or cuts responses short (test retries)",
        description="Make a routing endpoint misbehave for the requests that match (--method, "
                    "--path-regex), each with probability --prob: answer --status itself (an OCI "
                    "error body; 429 and 503 with Retry-After) without any node seeing the "
                    "request, --reset the client's connection before the request goes anywhere, "
                    "or --truncate-body: relay the response and cut the connection halfway "
                    "through its body. ENDPOINT: `global` (every client location's global "
                    "endpoint), `global:REGION` (one of them), or REGION (its regional endpoint).")
    c.add_argument("endpoint", metavar="ENDPOINT")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--status", type=int, choices=HTTP_STATUSES, metavar="STATUS",
                      help=f"answer this status: one of {', '.join(map(str, HTTP_STATUSES))}")
    what.add_argument("--reset", action="store_true", help="reset the client's connection")
    what.add_argument("--truncate-body", action="store_true",
                      help="cut the response's connection halfway through its body")
    c.add_argument("--prob", type=float, default=1.0, metavar="P",
                   help="probability that a matching request is hit (default 1)")
    c.add_argument("--method", help="only this method (GET, HEAD, PUT, PATCH, POST, DELETE)")
    c.add_argument("--path-regex", metavar="RE", help="only paths this regex matches (searched; "
                                                      "the query string is not part of the path)")
    c.add_argument("--seed", type=int, metavar="N",
                   help="draw which requests are hit from this seed (default: the cluster's)")
    _duration(c)
    c.set_defaults(func=command(_inject_http))

    c = faults.add_parser(
        "clock", help="a node's wall clock runs off: an offset, a drift, or both",
        description="Skew one node's wall clock — and so its HLC stamps, created and updated "
                    "times, lag figures — by --offset (e.g. +300s, -2s, 800ms) and/or --drift "
                    "RATE (1.5: the clock gains half a second every second, from now). Within "
                    f"the tolerated {MAX_OFFSET_S * 1000:g} ms nothing changes but the "
                    "timestamps; beyond it the node, once its clock probes show it off a "
                    "majority of its peers, refuses writes (503, reads go on) and its peers "
                    "flag it (`georeg status`, georeg_clock_offset_exceeded_total). Healing "
                    "sets the clock right. See docs/faults.md, \"Clock skew\".")
    c.add_argument("node", metavar="NODE|REGION[/ZONE]",
                   help="a node by name (georeg status), a region's only node, or a zone")
    c.add_argument("--offset", type=clock_offset, default=0.0, metavar="±S",
                   help="how far off: seconds (+300s, 1.5) or milliseconds (800ms), at most a "
                        "year; a clock behind: --offset=-2s")
    c.add_argument("--drift", type=drift_rate, default=1.0, metavar="RATE",
                   help="seconds the clock counts per real second (default 1; 0.01 to 100)")
    _duration(c)
    c.set_defaults(func=command(_inject_clock))

    c = faults.add_parser("list", help="faults injected, active first")
    c.add_argument("--json", action="store_true")
    add_data_dir(c)
    c.set_defaults(func=command(run_list))

    c = faults.add_parser("heal", help="heal one fault, or all")
    c.add_argument("id", nargs="?")
    c.add_argument("--all", action="store_true")
    add_data_dir(c)
    c.set_defaults(func=command(run_heal))


def _inject(args: argparse.Namespace, kind: str, **target) -> int:
    body = {"kind": kind, **target}
    if getattr(args, "duration", None):
        body["duration_s"] = args.duration
    fault = call(data_dir_of(args), "POST", "/georeg/v1/faults", body)
    heals = f" (heals in {fault['duration_s']:g} s)" if fault.get("duration_s") else ""
    print(f"{fault['id']}: {fault['description']}{heals}")
    return 0


def _lossy(args: argparse.Namespace) -> dict:
    """The lossy-path options given (so a plain link fault sends none of them)."""
    given = {"loss": args.loss, "corrupt": args.corrupt, "duplicate": args.duplicate,
             "reorder": args.reorder}
    seed = {"seed": args.seed} if args.seed is not None else {}
    return {**{k: v for k, v in given.items() if v}, **seed}


def _inject_http(args: argparse.Namespace) -> int:
    action = "reset" if args.reset else "truncate" if args.truncate_body else "status"
    target = {"endpoint": args.endpoint, "action": action, "probability": args.prob}
    if args.status:
        target["status"] = args.status
    for name in ("method", "path_regex", "seed"):
        if getattr(args, name) is not None:
            target[name] = getattr(args, name)
    return _inject(args, "http", **target)


def _inject_disk(args: argparse.Namespace) -> int:
    region, _, zone = args.where.partition("/")
    if not args.eio and (args.prob != 1.0 or args.seed is not None):
        raise CliError("--prob and --seed go with --eio")
    return _inject(args, "disk", region=region, zone=zone or None, full=args.full,
                   slow_ms=args.slow or 0.0, eio=args.eio, probability=args.prob,
                   seed=args.seed)


def _inject_bitrot(args: argparse.Namespace) -> int:
    region, _, zone = args.where.partition("/")
    return _inject(args, "bitrot", region=region, zone=zone or None, blobs=args.blobs,
                   seed=args.seed, digests=args.digest)


def clock_offset(text: str) -> float:
    """``+300s``, ``-2s``, ``800ms``, ``1.5`` (seconds) as seconds."""
    value = text.strip().lower()
    scale = 1.0
    if value.endswith("ms"):
        value, scale = value[:-2], 0.001
    elif value.endswith("s"):
        value = value[:-1]
    try:
        seconds = float(value) * scale
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(f"{text!r} is no offset: say e.g. +300s, -2s or 800ms")
    return _within_bounds(seconds, 1.0, seconds)


def drift_rate(text: str) -> float:
    """``1.5``: seconds the clock counts per real second."""
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is no rate: say e.g. 1.5") from None
    return _within_bounds(0.0, rate, rate)


def _within_bounds(offset_s: float, drift: float, value: float) -> float:
    """``value``, when the skew it is part of is one a node takes (``skew_problem``)."""
    problem = skew_problem(offset_s, drift)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def _inject_clock(args: argparse.Namespace) -> int:
    return _inject(args, "clock", node=args.node, offset_s=args.offset, drift=args.drift)


def run_list(args: argparse.Namespace) -> int:
    faults = call(data_dir_of(args), "GET", "/georeg/v1/faults")
    if args.json:
        print(json.dumps(faults, indent=2))
        return 0
    table = Table("id", "kind", "state", "description")
    for f in sorted(faults, key=lambda f: (not f["active"], f["started_at"])):
        table.add_row(f["id"], f["kind"], "[red]active[/]" if f["active"] else "healed",
                      f["description"])
    Console().print(table)
    return 0


def run_heal(args: argparse.Namespace) -> int:
    if args.all == bool(args.id):
        raise CliError("give a fault id (see `georeg fault list`) or --all")
    if args.all:
        healed = call(data_dir_of(args), "DELETE", "/georeg/v1/faults")
        print(f"healed {len(healed)} fault(s)")
    else:
        fault = call(data_dir_of(args), "DELETE", f"/georeg/v1/faults/{args.id}")
        print(f"healed {fault['id']}: {fault['description']}")
    return 0
