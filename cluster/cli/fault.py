"""`georeg fault …`: inject and heal faults in a running cluster (see cluster.faults.controller)."""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console
from rich.table import Table

from ..faults.controller import DEFAULT_THROTTLE_RATE, REQUEST_KINDS
from .common import CliError, add_data_dir, call, command, data_dir_of
from .node import request_rate


def _duration(p: argparse.ArgumentParser) -> None:
    """How long a fault lasts, and whether it flaps (every kind that heals)."""
    p.add_argument("--duration", type=float, metavar="SECONDS",
                   help="heal by itself after this many seconds (default: until `georeg fault heal`)")
    p.add_argument("--flap", metavar="ON_S/OFF_S",
                   help="come and go: in effect ON_S seconds, lifted OFF_S seconds, again and "
                        "again until healed (healing leaves it lifted), e.g. --flap 2/3")
    p.add_argument("--flap-jitter", type=float, default=0.0, metavar="FRACTION",
                   help="with --flap: each period drawn within ±FRACTION of its length, e.g. 0.2")
    p.add_argument("--flap-seed", type=int, metavar="N",
                   help="with --flap: the seed of the jitter draws (default: from the cluster's "
                        "seed and the fault's number); the same seed gives the same schedule")
    add_data_dir(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fault", help="break the cluster on purpose: outages, partitions, slow links, disks, "
                      "bit rot, throttling, pauses; most of them flapping",
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
    _duration(c)
    c.set_defaults(func=command(lambda a: _inject(
        a, "link", a=a.a, b=a.b, latency_ms=a.latency, jitter_ms=a.jitter,
        bandwidth_mbps=a.bandwidth, reset_probability=a.reset_prob, stall=a.stall)))

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
        "pause", help="a grey failure: a node stops answering without dying (SIGSTOP)",
        description="Pause a region's nodes, one zone's node or one node by name: SIGSTOP, so "
                    "its sockets stay open and nothing answers (not a refused connection). "
                    "Global endpoints notice by their health checks' timeouts and move clients "
                    "to the next replica (docs/faults.md gives the measured bound); peers go on "
                    "replicating between themselves; healing sends SIGCONT and the node catches "
                    "up. With --stall-bodies nothing is stopped: the node answers health checks, "
                    "manifests and HEAD, but holds every blob download after its headers.")
    c.add_argument("where", metavar="REGION|REGION/ZONE|NODE")
    c.add_argument("--stall-bodies", action="store_true",
                   help="only blob bodies stall (headers sent, then nothing until healed)")
    _duration(c)
    c.set_defaults(func=command(_inject_pause))

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
    if getattr(args, "flap", None):
        body.update(flap=args.flap, flap_jitter=args.flap_jitter)
        if args.flap_seed is not None:
            body["flap_seed"] = args.flap_seed
    elif getattr(args, "flap_jitter", 0) or getattr(args, "flap_seed", None) is not None:
        raise CliError("--flap-jitter and --flap-seed shape a flap: give --flap ON_S/OFF_S too")
    fault = call(data_dir_of(args), "POST", "/georeg/v1/faults", body)
    heals = f" (heals in {fault['duration_s']:g} s)" if fault.get("duration_s") else ""
    print(f"{fault['id']}: {fault['description']}{heals}")
    return 0


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


def _inject_pause(args: argparse.Namespace) -> int:
    where, _, zone = args.where.partition("/")
    return _inject(args, "pause", region=where, zone=zone or None, stall_bodies=args.stall_bodies)


def _state(fault: dict) -> str:
    if not fault["active"]:
        return "healed"
    flap = fault.get("flap")
    if not flap:
        return "[red]active[/]"
    left = max(0.0, (flap["phase_ends_at"] or time.time()) - time.time())
    colour = "red" if flap["phase"] == "on" else "yellow"
    return f"[{colour}]flapping: {flap['phase']}[/] ({left:.1f} s left)"


def run_list(args: argparse.Namespace) -> int:
    faults = call(data_dir_of(args), "GET", "/georeg/v1/faults")
    if args.json:
        print(json.dumps(faults, indent=2))
        return 0
    table = Table("id", "kind", "state", "description")
    for f in sorted(faults, key=lambda f: (not f["active"], f["started_at"])):
        table.add_row(f["id"], f["kind"], _state(f), f["description"])
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
