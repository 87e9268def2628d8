"""A node's settings: where its data lives, where it listens, who it is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import msgspec

# How long requests in flight (downloads handed over included) may take to
# finish once the node is told to stop.
SHUTDOWN_GRACE_S = 5.0


def listens_everywhere(host: str) -> bool:
    """Whether a listen address means every address of the machine (no one
    dials it: a client reaches such a listener at one of its addresses)."""
    return host.strip("[]") in ("", "0.0.0.0", "::")


class WebhookSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How this node delivers webhooks (``registry_node.webhook_delivery``).

    ``deliver``: whether this node fires its region's webhooks for what the
    region receives; in a zone-redundant region only one node does (the plan
    decides: the node of the region's first zone), a standalone node always.
    ``wan_latency_ms``: the modelled one-way latency from this node's region
    to each region a receiver may sit in (``receiver_location``), applied
    before each attempt; a region not listed is 0 away."""

    deliver: bool = True
    wan_latency_ms: dict[str, float] = msgspec.field(default_factory=dict)
    timeout_s: float = 10.0              # one attempt, connect to the end of the response
    retry_horizon_s: float = 24 * 3600.0 # an event is retried until this old, then given up
    backoff_base_s: float = 0.5          # exponential, full jitter, capped
    backoff_cap_s: float = 30.0
    retry_after_cap_s: float = 300.0     # the most of a receiver's Retry-After honoured
    log_size: int = 100                  # finished deliveries kept per webhook
    completion_wait_s: float = 30.0      # one question to replication (replicated, ..._failed)
    completion_horizon_s: float = 24 * 3600.0   # asked until this old, then dropped

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.backoff_base_s <= 0 or self.backoff_cap_s <= 0:
            raise ValueError("webhook timeout and backoff must be positive")
        if self.log_size < 1:
            raise ValueError("a webhook's delivery log keeps at least one delivery")


# The bounds of request throttling's numbers (``registry_node.throttle``), one
# rule for every way in: the spec, ``georeg node``, the fault CLI and API, the
# fault controller. A rate is finite and at least one request in 100 minutes,
# so a wait is always a finite number of seconds (``Throttled.retry_after``);
# an identity's share is at least a millionth; a bucket holds at most about
# eleven days of its rate, so no bucket holds an infinite number of tokens.
MIN_RATE_PER_MIN = 0.01
MAX_RATE_PER_MIN = 1e9
MIN_IDENTITY_FRACTION = 1e-6
MAX_BURST_S = 1e6
_RATE_UNITS = {"": 1.0, "min": 1.0, "m": 1.0, "s": 60.0, "sec": 60.0}


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def request_rate(value: object, what: str = "a rate") -> float:
    """``value`` as requests per minute, or ``ValueError`` saying what a rate is."""
    if not _number(value) or not MIN_RATE_PER_MIN <= value <= MAX_RATE_PER_MIN:
        raise ValueError(f"{what} must be a number of requests per minute from "
                         f"{MIN_RATE_PER_MIN:g} to {MAX_RATE_PER_MIN:g}, got {value!r}")
    return float(value)


def identity_fraction(value: object) -> float:
    """``value`` as an identity's share of each rate, or ``ValueError``."""
    if not _number(value) or not MIN_IDENTITY_FRACTION <= value <= 1:
        raise ValueError(f"per_identity_fraction must be a number from {MIN_IDENTITY_FRACTION:g} "
                         f"to 1 (ACR: 0.5, half the registry's limit for each identity), "
                         f"got {value!r}")
    return float(value)


def burst_seconds(value: object) -> float:
    """``value`` as the seconds of its rate a bucket holds, or ``ValueError``."""
    if not _number(value) or not 0 < value <= MAX_BURST_S:
        raise ValueError(f"burst_s must be a number of seconds, more than 0 and at most "
                         f"{MAX_BURST_S:g}, got {value!r}")
    return float(value)


def parse_rate(text: str) -> float:
    """``N``, ``N/min`` or ``N/s`` (as the command lines take a rate) → requests
    per minute, within ``request_rate``'s bounds; ``ValueError`` otherwise."""
    number, _, unit = text.strip().partition("/")
    per = _RATE_UNITS.get(unit.strip().lower())
    try:
        rate = float(number)
    except ValueError:
        per = None
    if per is None:
        raise ValueError(f"expected a rate such as 60/min or 2/s, got {text!r}")
    return request_rate(rate * per, f"a rate ({text})")


class RequestLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The requests this node's replica admits (``registry_node.throttle``), as
    the plan decided them from the spec's ``[limits]``.

    Rates are per minute, by kind of request, for the whole replica (a
    zone-redundant one included: its zones share what they admit, below);
    None: that kind is not limited. Each identity may use
    ``per_identity_fraction`` of each rate on its own. A bucket holds
    ``burst_s`` seconds of its rate (at least one request): a minute's worth
    unless told, so "60 a minute" admits 60 at once, then one a second. Every
    number keeps the bounds above (``request_rate`` and the rest)."""

    reads_per_min: float | None = None
    writes_per_min: float | None = None
    deletes_per_min: float | None = None
    referrers_per_min: float | None = None
    per_identity_fraction: float = 0.5
    burst_s: float = 60.0

    def __post_init__(self) -> None:
        for name in RATE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                request_rate(value, name)
        identity_fraction(self.per_identity_fraction)
        burst_seconds(self.burst_s)

    def per_minute(self) -> dict[str, float]:
        """The limited kinds (``registry_node.throttle.KINDS``) and their rates."""
        rates = {"read": self.reads_per_min, "write": self.writes_per_min,
                 "delete": self.deletes_per_min, "referrers": self.referrers_per_min}
        return {kind: rate for kind, rate in rates.items() if rate is not None}


RATE_FIELDS = ("reads_per_min", "writes_per_min", "deletes_per_min", "referrers_per_min")


def with_overrides(limits: RequestLimits | None,
                   overrides: dict[str, float]) -> RequestLimits | None:
    """``limits`` (None: none) with a command line's ``overrides`` (field →
    value, ``RequestLimits``' fields) over them: what a node started with
    ``--cluster`` and ``--reads-per-min`` and the like keeps across every
    reload of its view. ``ValueError`` for a value out of bounds."""
    if not overrides:
        return limits
    base = msgspec.structs.asdict(limits) if limits is not None else {}
    return RequestLimits(**{**base, **overrides})


# The slowest bandwidth a node is shaped to: below it a transfer's smallest
# quantum (16 KiB) would take minutes, and clients give up on a silent
# connection long before a blob arrives.
MIN_MBPS = 0.01


def valid_mbps(rate: float) -> bool:
    """A bandwidth a node can be shaped to: 0 (unshaped), or finite from ``MIN_MBPS``."""
    return rate == 0 or MIN_MBPS <= rate < float("inf")


class BandwidthSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """This node's share of its replica's blob bandwidth (``registry_node.bandwidth``),
    in megabits per second; 0: unshaped, the default. With ``--cluster`` the
    plan decides it from the spec's ``[limits]`` (a zone-redundant replica's
    budget split evenly across its zones)."""

    download_mbps: float = 0.0          # blob bytes the node sends to clients
    upload_mbps: float = 0.0            # blob bytes clients send the node

    def __post_init__(self) -> None:
        for rate in (self.download_mbps, self.upload_mbps):
            if not valid_mbps(rate):
                raise ValueError(f"a bandwidth is a number of Mbit/s, 0 (unshaped) or from "
                                 f"{MIN_MBPS} on; got {rate}")

    @property
    def shaped(self) -> bool:
        return self.download_mbps > 0 or self.upload_mbps > 0


@dataclass(frozen=True, slots=True)
class NodeConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 5000
    region: str = "local"
    zone: str = ""
    key_file: Path | None = None        # default: <data_dir>/node.key, created if absent
    # The cluster's configuration key (a file, mode 0600), which seals webhook
    # header values (registry_node.configuration_key); default: the node's own,
    # derived from its node key, which no other node can open.
    configuration_key_file: Path | None = None
    gc_grace_s: float = 3600.0          # unreferenced blobs younger than this are kept
    gc_interval_s: float = 60.0
    upload_ttl_s: float = 24 * 3600.0   # idle upload sessions older than this expire
    # Bytes of blobs and manifests the node may hold before clients' uploads are
    # refused (``registry.Registry.check_storage``); None: the live tier's
    # registry maximum (``tiers``).
    storage_limit: int | None = None
    shutdown_grace_s: float = SHUTDOWN_GRACE_S
    sync: bool = True                   # fsync metadata and blobs before acknowledging
    io_threads: int = 4
    extra: dict[str, str] = field(default_factory=dict)
    # TEST ONLY (registry_node.broken_build): replicated bytes taken unchecked.
    unchecked_replication: bool = False
    # Authentication of the data plane: off unless the CA file is given, and then
    # the node's signing key and certificate (issued by that CA) are needed too.
    auth_ca_file: Path | None = None
    auth_key_file: Path | None = None
    auth_cert_file: Path | None = None
    auth_service: str = ""              # the login server (token audience); default: "georeg"
    # The cluster's internal credential (a file holding it): the node's internal
    # routes then answer only requests carrying it (registry_node.api.internal).
    internal_credential_file: Path | None = None
    # HTTPS: off unless the certificate is given; then the node serves TLS only.
    # The CA (the one that issued the certificate) is what it trusts for peers
    # in replication when it has no --auth-ca.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    webhooks: WebhookSettings = WebhookSettings()
    # Request throttling (``registry_node.throttle``): None, none unless a fault
    # asks for it (``PUT /georeg/v1/faults/throttle``).
    request_limits: RequestLimits | None = None
    # The command line's request limits (``RequestLimits``' fields), kept over
    # whatever limits the cluster view says, at start and at every reload.
    request_limit_overrides: dict[str, float] = field(default_factory=dict)
    # The base URLs of the other zone nodes of this node's replica (from its
    # cluster view), with which it shares what throttling admits, so the
    # replica's limits hold across its zones (``registry_node.throttle``).
    zone_siblings: tuple[str, ...] = ()
    bandwidth: BandwidthSettings = BandwidthSettings()

    @property
    def auth_enabled(self) -> bool:
        return self.auth_ca_file is not None

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def scheme(self) -> str:
        return "https" if self.tls_enabled else "http"

    @property
    def key_path(self) -> Path:
        return self.key_file or self.data_dir / "node.key"
