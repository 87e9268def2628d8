"""`georeg node`: one registry node process (replicating when given --cluster).

Kept apart from the rest of the CLI so that a node process, of which a cluster
runs many, loads only what a node needs.
"""

from __future__ import annotations

import argparse
import errno
import ssl
import sys
from pathlib import Path

from registry_node import broken_build
from registry_node.config import (
    MIN_MBPS,
    SHUTDOWN_GRACE_S,
    burst_seconds,
    identity_fraction,
    parse_rate,
    valid_mbps,
    with_overrides,
)
from registry_node.tiers import parse_size


def register(sub: argparse._SubParsersAction) -> None:
    _add_node(sub)


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, e.g. 127.0.0.1:5000, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}")
    return seconds


def request_rate(value: str) -> float:
    """A command line's rate of requests: ``N`` (per minute), ``N/min`` or
    ``N/s``, within throttling's bounds (``registry_node.config.request_rate``);
    ``georeg node``'s limits and ``georeg fault throttle --rate`` alike."""
    try:
        return parse_rate(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fraction(value: str) -> float:
    try:
        return identity_fraction(float(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _burst(value: str) -> float:
    try:
        return burst_seconds(float(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _mbps(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        rate = -1
    if not valid_mbps(rate):
        raise argparse.ArgumentTypeError(f"expected a number of Mbit/s, 0 (unshaped) or from "
                                         f"{MIN_MBPS} on, got {value!r}")
    return rate


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_node(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "node", help="run one standalone registry node",
        description="Run one georeg registry node: an OCI registry (distribution-spec v1.1) with "
                    "encrypted storage, serving http://HOST:PORT/v2/ (https with --tls-cert). Stops cleanly on SIGTERM or "
                    "Ctrl-C; restart it on the same --data-dir to resume with everything intact.")
    p.add_argument("--data-dir", type=Path, required=True,
                   help="where the node keeps its metadata, blobs and (by default) its key")
    p.add_argument("--listen", type=_listen, default=("127.0.0.1", 5000), metavar="HOST:PORT",
                   help="address to serve on (default 127.0.0.1:5000; port 0 picks a free port)")
    p.add_argument("--region", help="Azure region this node simulates (default: local)")
    p.add_argument("--zone", help="availability zone within the region, e.g. 1")
    p.add_argument("--key-file", type=Path,
                   help="32-byte node key (raw, hex or base64, mode 0600); default: "
                        "DATA_DIR/node.key, created on first start")
    p.add_argument("--configuration-key-file", type=Path, metavar="FILE",
                   help="the cluster's configuration key (32 bytes: raw, hex or base64; mode "
                        "0600), which seals webhook header values at rest and in replication "
                        "(`georeg up` passes every node the same one). Default: a key of the "
                        "node's own, derived from its node key, which no other node can open")
    p.add_argument("--gc-grace", type=_seconds, default=3600.0, metavar="SECONDS",
                   help="keep unreferenced blobs at least this long (default 3600)")
    p.add_argument("--gc-interval", type=_seconds, default=60.0, metavar="SECONDS",
                   help="how often garbage collection runs (default 60)")
    p.add_argument("--upload-ttl", type=_seconds, default=86400.0, metavar="SECONDS",
                   help="expire upload sessions idle this long (default 86400)")
    p.add_argument("--storage-limit", type=_size, metavar="SIZE",
                   help="refuse clients' uploads that would take the blobs and manifests this "
                        "node stores past SIZE (bytes, or with a unit: 200MiB, 40TiB; default: "
                        "the registry maximum of the registry's tier)")
    p.add_argument("--shutdown-grace", type=_seconds, default=SHUTDOWN_GRACE_S, metavar="SECONDS",
                   help="on SIGTERM, how long requests in flight may take to finish "
                        f"(default {SHUTDOWN_GRACE_S:g})")
    p.add_argument("--cluster", type=Path, metavar="FILE",
                   help="this node's view of its cluster (JSON written by `georeg up`): its "
                        "name, region, zone, peers and their replication addresses, residency; "
                        "turns on replication. --region/--zone then default to the file's")
    auth = p.add_argument_group(
        "authentication", "Off unless --auth-ca is given. Then every /v2/ route needs credentials "
        "(Basic or a bearer token from this node's /oauth2/token), as ACR's do; tokens minted by "
        "any node whose certificate the same CA issued are valid here. Who may log in is the "
        "registry configuration this node holds (admin user, tokens, scope maps, identities, "
        "role assignments), written through the home region and replicated.")
    auth.add_argument("--auth-ca", type=Path, metavar="FILE",
                      help="the cluster CA's certificate (PEM): trusted to vouch for token keys")
    auth.add_argument("--auth-key", type=Path, metavar="FILE",
                      help="this node's P-256 private key (PEM, mode 0600) that signs its tokens")
    auth.add_argument("--auth-cert", type=Path, metavar="FILE",
                      help="this node's certificate for --auth-key, issued by --auth-ca (PEM)")
    auth.add_argument("--auth-service", metavar="NAME",
                      help="the login server named in challenges and tokens (the audience); "
                           "the same on every node of a cluster (`georeg up` passes the "
                           "registry's login server); default: georeg")
    auth.add_argument("--internal-credential-file", type=Path, metavar="FILE",
                      help="a file (mode 0600) holding the cluster's internal credential: the "
                           "node's internal routes (/georeg/v1/..., /metrics; not "
                           "/georeg/v1/replication/status) then answer only requests that carry "
                           "it as `Authorization: Bearer`; with --auth-ca and without this "
                           "file, they answer no one. A file, so the secret is never on a "
                           "command line")
    tls = p.add_argument_group(
        "TLS", "Off unless --tls-cert is given. Then the node serves HTTPS only (HTTP/1.1 over "
        "TLS 1.2 or later) on --listen, and endpoints relay blob downloads rather than handing "
        "the client's socket to the node. `georeg up` passes the certificate the cluster CA "
        "issued to the node, for 127.0.0.1, localhost and the registry's login server.")
    tls.add_argument("--tls-cert", type=Path, metavar="FILE",
                     help="the certificate (PEM, chain allowed) the node serves HTTPS with")
    tls.add_argument("--tls-key", type=Path, metavar="FILE",
                     help="the private key of --tls-cert (PEM, mode 0600)")
    tls.add_argument("--tls-ca", type=Path, metavar="FILE",
                     help="the CA that issued --tls-cert (PEM): without --auth-ca, what the node "
                          "trusts for peers when its cluster view asks for mutual TLS")
    hooks = p.add_argument_group(
        "webhooks", "How the node delivers its region's webhooks (with --cluster, whether it "
        "delivers and the WAN latency to receivers come from the file)")
    hooks.add_argument("--webhook-timeout", type=_seconds, metavar="SECONDS",
                       help="how long one delivery attempt may take (default 10)")
    hooks.add_argument("--webhook-backoff-cap", type=_seconds, metavar="SECONDS",
                       help="the longest wait between two attempts (default 30)")
    hooks.add_argument("--webhook-retry-horizon", type=_seconds, metavar="SECONDS",
                       help="an event is retried until this old, then given up (default 86400)")
    hooks.add_argument("--webhook-log-size", type=int, metavar="N",
                       help="finished deliveries kept per webhook for list-events (default 100)")
    throttling = p.add_argument_group(
        "throttling", "Request limits, as ACR's tiers have them (off unless a rate is given; "
        "with --cluster, the file's, which these override): past a limit a request gets 429 "
        "TOOMANYREQUESTS with Retry-After. Reads are GET/HEAD/OPTIONS, writes PUT/PATCH/POST, "
        "deletes DELETE, referrers listings their own")
    for kind in ("reads", "writes", "deletes", "referrers"):
        throttling.add_argument(f"--{kind}-per-min", type=request_rate, metavar="N",
                                help=f"{kind} this node admits per minute (N, N/min or N/s)")
    throttling.add_argument("--per-identity-fraction", type=_fraction, metavar="F",
                            help="the share of each rate one identity may use (default 0.5)")
    throttling.add_argument("--burst", type=_burst, metavar="SECONDS",
                            help="a bucket holds this many seconds of its rate (default 60: a "
                                 "minute's worth; at least one request)")
    shaping = p.add_argument_group(
        "bandwidth", "Blob uploads and downloads shaped (delayed, never refused) to a rate shared "
        "by every transfer in that direction, as ACR's tiers limit a replica's bandwidth; off "
        "unless given (with --cluster, the file's share of the spec's [limits]; these override "
        "it). Replication is never shaped here: the WAN links model its bandwidth")
    shaping.add_argument("--download-mbps", type=_mbps, metavar="MBIT/S",
                         help="blob bytes the node sends to clients, in megabits per second "
                              "(0: unshaped)")
    shaping.add_argument("--upload-mbps", type=_mbps, metavar="MBIT/S",
                         help="blob bytes clients send the node, in megabits per second "
                              "(0: unshaped)")
    p.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                   help="log format on stderr (default: console on a terminal, else json)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.set_defaults(func=_run_node)


def _run_node(args: argparse.Namespace) -> int:
    if args.log_format == "json" or (args.log_format == "auto" and not sys.stderr.isatty()):
        # structlog imports rich, if present, only to draw tracebacks on a
        # terminal; a node logging JSON never does, and each node process is
        # ~3 MiB smaller without it.
        sys.modules.setdefault("rich", None)  # type: ignore[arg-type]
    from registry_node import allocator

    allocator.tune()  # first: before any library starts a thread
    import msgspec

    from registry_node import logs
    from registry_node.auth.tokens import AuthConfigError
    from registry_node.config import NodeConfig
    from registry_node.crypto import KeyFileError
    from registry_node.node import DataDirError
    from registry_node.server import EXIT_ADDRESS_IN_USE, run, tls_context

    logs.configure(args.log_format, args.log_level, sys.stderr)
    host, port = args.listen
    region, zone = args.region, args.zone
    extensions = []
    from registry_node.config import BandwidthSettings, WebhookSettings

    webhooks = WebhookSettings()
    limits, siblings = None, ()
    bandwidth = BandwidthSettings()
    if args.cluster is not None:
        from replicator.runtime import Replication
        from replicator.topology import ClusterView

        try:
            view = ClusterView.load(args.cluster)
        except (OSError, ValueError) as exc:
            print(f"georeg node: cannot use --cluster {args.cluster}: {exc}", file=sys.stderr)
            return 2
        if (region or view.region) != view.region or (zone or view.zone) != view.zone:
            print(f"georeg node: --region/--zone say {region}/{zone} but {args.cluster} is for "
                  f"{view.region}/{view.zone}", file=sys.stderr)
            return 2
        region, zone = view.region, view.zone
        webhooks = view.webhook_settings
        limits = view.request_limits
        # Throttling's zone siblings: what one zone admits counts in the others.
        siblings = tuple(peer.http for peer in view.zone_peers if peer.http)
        bandwidth = view.bandwidth
        extensions.append(Replication(view, args.cluster))
    tuning = {field: value for field, value in (
        ("timeout_s", args.webhook_timeout), ("backoff_cap_s", args.webhook_backoff_cap),
        ("retry_horizon_s", args.webhook_retry_horizon), ("log_size", args.webhook_log_size))
        if value is not None}
    try:
        webhooks = msgspec.structs.replace(webhooks, **tuning)
        overrides = _limit_overrides(args)
        limits = with_overrides(limits, overrides)
    except ValueError as exc:
        print(f"georeg node: {exc}", file=sys.stderr)
        return 2
    bandwidth = msgspec.structs.replace(bandwidth, **{field: value for field, value in (
        ("download_mbps", args.download_mbps), ("upload_mbps", args.upload_mbps))
        if value is not None})
    config = NodeConfig(data_dir=args.data_dir, host=host, port=port, region=region or "local",
                        zone=zone or "", key_file=args.key_file,
                        configuration_key_file=args.configuration_key_file,
                        gc_grace_s=args.gc_grace,
                        gc_interval_s=args.gc_interval, upload_ttl_s=args.upload_ttl,
                        storage_limit=args.storage_limit,
                        shutdown_grace_s=args.shutdown_grace, auth_ca_file=args.auth_ca,
                        auth_key_file=args.auth_key, auth_cert_file=args.auth_cert,
                        auth_service=args.auth_service or "",
                        internal_credential_file=args.internal_credential_file,
                        tls_cert_file=args.tls_cert, tls_key_file=args.tls_key or args.tls_cert,
                        tls_ca_file=args.tls_ca, webhooks=webhooks, request_limits=limits,
                        request_limit_overrides=overrides,
                        zone_siblings=siblings, bandwidth=bandwidth,
                        unchecked_replication=broken_build.from_environment())
    if (args.tls_key or args.tls_ca) and args.tls_cert is None:
        print("georeg node: --tls-key and --tls-ca need --tls-cert", file=sys.stderr)
        return 2
    try:
        tls_context(config)         # checked before anything opens
    except (OSError, ssl.SSLError) as exc:
        print(f"georeg node: cannot serve TLS with {args.tls_cert} and {config.tls_key_file}: "
              f"{getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 2
    try:
        run(config, extensions)
    except (DataDirError, KeyFileError, AuthConfigError) as exc:
        print(f"georeg node: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"georeg node: cannot serve on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ADDRESS_IN_USE if exc.errno == errno.EADDRINUSE else 2
    return 0


def _limit_overrides(args: argparse.Namespace) -> dict[str, float]:
    """The command line's request limits, as ``RequestLimits``' fields; kept
    over the view's at start and at every reload of it (``Throttle.overrides``)."""
    given = {"reads_per_min": args.reads_per_min, "writes_per_min": args.writes_per_min,
             "deletes_per_min": args.deletes_per_min,
             "referrers_per_min": args.referrers_per_min,
             "per_identity_fraction": args.per_identity_fraction, "burst_s": args.burst}
    return {field: value for field, value in given.items() if value is not None}
