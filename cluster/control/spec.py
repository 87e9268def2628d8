"""The cluster spec: a TOML file describing the registry to simulate, validated
with errors that say what to change. With no file, ``DEFAULT_SPEC`` is used.

Example (every key optional except where noted)::

    registry = "contoso"            # name of the registry
    tier = "Premium"                # Basic | Standard | Premium
    home_region = "eastus"          # where the registry was created; holds the control plane
    home_zone_redundant = true
    home_global_routing = true
    blob_downloads = "relay"        # or "redirect": a 307 to the node, as ACR does
    auth = "token"                  # the default: every node wants credentials, as ACR does
                                    # (ACR's token flow; the admin user's password, the
                                    # cluster owner's credential for the management API and
                                    # the nodes' internal one are generated at first start
                                    # and kept in <data_dir>/auth, mode 0600; `georeg up`
                                    # prints the admin login). "none": the open cluster,
                                    # anyone who reaches a port may push, delete, break it
    tls = false                     # true: every node and endpoint serves HTTPS with a
                                    # certificate from the cluster CA (made at first start
                                    # in <data_dir>/auth/ca, with auth or without); trust it
                                    # with what `georeg ca export` prints
    seed = 42                       # drives the WAN links' random draws (jitter, resets);
                                    # unset: drawn when the cluster is first started, printed,
                                    # and kept with the cluster's data

    [[replicas]]                    # geo-replicas (Premium only), not the home region
    region = "westeurope"
    zone_redundant = true
    global_routing = true           # regionEndpointEnabled / --global-endpoint-routing

    [wan]                           # the WAN model (see cluster.network.wan)
    enabled = true
    bandwidth_mbps = 500
    [[wan.pairs]]
    a = "eastus"
    b = "brazilsouth"
    rtt_ms = 120

    [residency]                     # defaults to Azure's: brazilsouth, southeastasia confined
    confined_regions = ["brazilsouth", "southeastasia"]
    [[residency.repositories]]
    repository = "public/*"
    confined = false

    [replication]                   # how nodes replicate; each key optional (the defaults
    anti_entropy_interval_s = 30    # shown), see replicator.topology.ReplicationSettings
    quorum_timeout_s = 10           # a zone-quorum write waits this long for a second zone
    one_wan_copy_per_region = true  # false: every zone of a remote region fetches its own copy
    peer_horizon_s = 86400          # a peer silent this long no longer holds logs back
    tombstone_grace_s = 86400       # deletes are remembered at least this long (gc_grace)
    log_retain_events = 10000       # events every log keeps, whatever its readers' cursors
    clock_probe_interval_s = 10     # how often each node measures its peers' clocks

    [webhooks]                      # how nodes deliver webhooks; each key optional (the
    timeout_s = 10                  # defaults shown), see registry_node.config.WebhookSettings:
                                    # one attempt, connect to the end of the answer
    backoff_cap_s = 30              # the longest wait between two attempts at one event
    retry_horizon_s = 86400         # an event is retried until this old, then given up
    log_size = 100                  # finished deliveries kept per webhook (list-events)

    [limits]                        # ACR's limits of the registry's tier (ACR-SEMANTICS.md,
    limits = "tier"                 # Tiers): "tier" turns on the tier's request rates and
                                    # blob bandwidth; "off" (the default): only what is
                                    # given below. Each number overrides the tier's; 0
                                    # turns that one off
    writes_per_min = 120            # requests per minute per replica: reads_per_min (GET,
                                    # HEAD, OPTIONS), writes_per_min (PUT, PATCH, POST),
                                    # deletes_per_min, referrers_per_min; Basic and Standard
                                    # 10000 / 2000 / 1000 / 500, Premium 20000 / 4000 / 4000
                                    # / 2000; past one, 429 TOOMANYREQUESTS with Retry-After
    per_identity_fraction = 0.5     # each identity's own share of each rate (ACR: half)
    burst_s = 60                    # a bucket holds this many seconds of its rate (at
                                    # least one request): "60 a minute" admits 60 at
                                    # once, then one a second
    download_mbps = 240             # blob bytes per replica, Mbit/s, shaped, never refused
    upload_mbps = 80                # (a zone-redundant replica's split across its zones);
                                    # Basic / Standard / Premium 30 / 60 / 100 MB/s down,
                                    # 10 / 20 / 50 up (docs/bandwidth.md)
    storage_limit = "200MiB"        # bytes of blobs and manifests a node may hold before
                                    # clients' uploads are refused with 403 DENIED (default:
                                    # the tier's registry maximum, 40 TiB; 100 TiB Premium)

    [[schedules]]                   # jobs the control process runs on its clock (UTC), as
    name = "nightly-purge"          # ACR runs acr purge as a task with a timer trigger:
    cron = "0 1 * * *"              # five fields (minute hour day month weekday);
    command = "purge --filter 'hello-world:.*' --ago 7d --untagged"   # `georeg purge`'s
                                    # options (cluster.control.schedules)

    [network]
    port_base = 5000                # 0: any free range, chosen when the cluster starts
    data_dir = ".georeg"
    client_locations = ["eastus", "westeurope", "japaneast"]   # one global endpoint each
    host = "127.0.0.1"              # where the control process listens (links, endpoints,
                                    # management API); every node's host must reach it

    [network.hosts]                 # multi-host (docs/multihost.md): a region's nodes, or
    brazilsouth = "10.88.0.3"       # one node ("eastus-2"), on a host of their own, by
                                    # address; its files under network.host_data_dir there

Throttling is off unless ``[limits]`` turns it on: a local cluster is no
measure of ACR's capacity, and a user who runs ``make up`` and drives it as
hard as the machine allows (a benchmark, a CI matrix pushing hundreds of
images through the admin login) should see the machine's limits, not a 429
they did not ask for; a user who wants to know how a pipeline fares against
a tier asks for it with one line (``limits = "tier"``).

ACR's rules checked here: geo-replication and zone redundancy need Premium;
zone redundancy needs a region with availability zones; the home region
cannot also be listed as a replica; a region is replicated at most once.
"""

from __future__ import annotations

import difflib
import ipaddress
import random
import tomllib
from dataclasses import dataclass
from pathlib import Path

import msgspec

from registry_node import tiers as tier_table
from registry_node.config import (
    MIN_MBPS,
    RATE_FIELDS,
    RequestLimits,
    WebhookSettings,
    burst_seconds,
    identity_fraction,
    listens_everywhere,
    request_rate,
    valid_mbps,
)
from replicator.residency import ResidencyPolicy
from replicator.topology import ReplicationSettings

from ..network.wan import DEFAULT_BANDWIDTH_MBPS, PairOverride, WanModel
from .regions import CONFINED_BY_DEFAULT, REGIONS, distance_km, unknown_region_message
from .schedules import schedule_problems

TIERS = tier_table.TIERS
SEEDS = 2**32                  # a drawn seed is below this: short enough to copy from a log
BLOB_DOWNLOADS = ("relay", "redirect")
AUTH_MODES = ("token", "none")
# The login server, as ACR names a registry's (``<name>.azurecr.io``): the
# ``service`` of every challenge and the audience of every token, the same on
# every endpoint and node, so a token minted through one works on all.
LOGIN_SERVER_DOMAIN = "azurecr.io"
MAX_PORT = 65535


class SpecError(ValueError):
    """An invalid spec. ``problems`` lists every problem found, each saying what to change."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} is not a valid cluster spec:\n{lines}")


# Zone placement. A zone-redundant replica runs one node in each availability
# zone of its region (Azure's zonal regions have three), and a write there is
# acknowledged once a majority of them hold it. Everything that counts nodes or
# zones asks a ``ReplicaSpec``; the plan hands the decision to each node.
ZONES = ("1", "2", "3")
ZONE_WRITE_QUORUM = len(ZONES) // 2 + 1


class ReplicaSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    region: str
    zone_redundant: bool = False
    global_routing: bool = True

    @property
    def zones(self) -> tuple[str, ...]:
        """The zones this replica has a node in; ``("",)``: one node, no zone."""
        return ZONES if self.zone_redundant else ("",)

    @property
    def write_quorum(self) -> int:
        """Nodes of this replica that must hold a write before it is acknowledged."""
        return ZONE_WRITE_QUORUM if self.zone_redundant else 1


class WanPairSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    a: str
    b: str
    rtt_ms: float | None = None
    jitter_ms: float | None = None
    bandwidth_mbps: float | None = None


class WanSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    enabled: bool = True
    bandwidth_mbps: float = DEFAULT_BANDWIDTH_MBPS
    pairs: tuple[WanPairSpec, ...] = ()


class RepositoryResidencySpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    repository: str
    confined: bool


class ResidencySpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    confined_regions: tuple[str, ...] = CONFINED_BY_DEFAULT
    repositories: tuple[RepositoryResidencySpec, ...] = ()


# ``network.port_base`` meaning "any": the cluster picks a range when it starts
# (``Cluster.start``), on a fresh one whenever a port of it turns out to be in
# use, and keeps the one it got in its saved spec.
ANY_PORT_BASE = 0


class ReplicationSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The ``[replication]`` table: the replication settings a spec may set,
    each None unless given, so the defaults live in one place
    (``ReplicationSettings``)."""

    anti_entropy_interval_s: float | None = None
    quorum_timeout_s: float | None = None
    one_wan_copy_per_region: bool | None = None
    peer_horizon_s: float | None = None
    tombstone_grace_s: float | None = None
    log_retain_events: int | None = None
    clock_probe_interval_s: float | None = None

    def settings(self) -> ReplicationSettings:
        given = {name: getattr(self, name) for name in self.__struct_fields__}
        return ReplicationSettings(**{k: v for k, v in given.items() if v is not None})


class WebhookSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The ``[webhooks]`` table: the delivery settings a spec may set, each None
    unless given, so the defaults live in one place (``WebhookSettings``). The
    rest of a node's webhook settings (which node of a region delivers, the
    latency to receivers) the plan decides, never the spec."""

    timeout_s: float | None = None
    backoff_cap_s: float | None = None
    retry_horizon_s: float | None = None
    log_size: int | None = None

    def settings(self, **decided) -> WebhookSettings:
        """The settings of a node: what this table gives, the plan's ``decided``
        (``deliver``, ``wan_latency_ms``), the defaults for the rest."""
        given = {name: getattr(self, name) for name in self.__struct_fields__}
        return WebhookSettings(**{k: v for k, v in given.items() if v is not None}, **decided)


class TasksSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The ``[tasks]`` table. ``context_roots``: the absolute directories a task's
    context may lie under (``georeg task create --context``); none by default,
    so a task cannot be made until the owner names where its sources live. The
    cluster's data dir is refused whatever this says (``containerfile.task_context``).
    ``commit_poll_seconds``: how often the commit trigger reads the branch tips
    of tasks with a git context (``cluster.control.triggers``), 0.1 to 3600."""

    context_roots: tuple[str, ...] = ()
    commit_poll_seconds: float = 10.0


LIMIT_MODES = ("off", "tier")


class LimitsSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The ``[limits]`` table: ACR's limits of the registry's tier, and numbers
    that override them so a test reaches a limit in seconds.

    ``limits = "tier"`` turns on the tier's request rates (``registry_node.throttle``)
    and blob bandwidth (``registry_node.bandwidth``); "off", the default, turns
    on only what is given here. A number given overrides the tier's either
    way, and 0 turns that one off. The storage limit always holds: the tier's
    registry maximum unless ``storage_limit`` says less (``registry_node.usage``).
    The plan hands each node its share (``cluster.control.plan``); the tier
    is the registry's live one, so a SKU change rewrites every node's view."""

    limits: str = "off"
    reads_per_min: float | None = None
    writes_per_min: float | None = None
    deletes_per_min: float | None = None
    referrers_per_min: float | None = None
    per_identity_fraction: float | None = None
    burst_s: float | None = None
    download_mbps: float | None = None      # blob bytes to clients, per replica
    upload_mbps: float | None = None        # blob bytes from clients, per replica
    # Bytes (or "200MiB", "1.5GiB", "10GB") of blobs and manifests a node may
    # hold before clients' uploads are refused.
    storage_limit: int | str | None = None

    def request_limits(self, tier: str) -> RequestLimits | None:
        """A replica's request limits (None: no kind is limited): the tier's
        rates when ``limits = "tier"``, this table's over them, for the whole
        replica (its zone nodes share them, ``registry_node.throttle``)."""
        rates = {}
        if self.limits == "tier":
            rates = tier_table.limits(tier).requests_per_min()
        rates.update({key: getattr(self, key) for key in RATE_FIELDS
                      if getattr(self, key) is not None})
        rates = {key: rate for key, rate in rates.items() if rate}
        if not rates:
            return None
        given = {key: getattr(self, key) for key in ("per_identity_fraction", "burst_s")
                 if getattr(self, key) is not None}
        return RequestLimits(**rates, **given)

    def bandwidth(self, tier: str) -> tuple[float, float]:
        """A replica's (download, upload) blob bandwidth in Mbit/s; 0: unshaped."""
        down, up = 0.0, 0.0
        if self.limits == "tier":
            down, up = (8.0 * rate for rate in tier_table.limits(tier).bandwidth_mbytes_per_s)
        return (down if self.download_mbps is None else self.download_mbps,
                up if self.upload_mbps is None else self.upload_mbps)

    @property
    def storage_limit_bytes(self) -> int | None:
        if self.storage_limit is None:
            return None
        return tier_table.parse_size(self.storage_limit)


class ScheduleSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A job the control process runs (``cluster.control.schedules``)."""

    name: str
    cron: str
    command: str


class NetworkSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    port_base: int = 5000
    management_port: int | None = None
    data_dir: str = ".georeg"
    client_locations: tuple[str, ...] = ()
    # Where the control process listens: the links, the endpoints and the
    # management API (every node's host must reach it).
    host: str = "127.0.0.1"
    # Multi-host (docs/multihost.md): a region (all its nodes) or one node (by
    # name, "eastus-2") placed on a host of its own, by address. A node placed
    # so listens on that address and keeps its files under ``host_data_dir``
    # on that host, which it shares with nobody but the nodes placed there.
    hosts: dict[str, str] = {}
    host_data_dir: str = "/data"


class ClusterSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    registry: str = "georeg"
    tier: str = "Premium"
    home_region: str = "eastus"
    home_zone_redundant: bool = False
    home_global_routing: bool = True
    # Azure also keeps each region's data in its paired region (except where data
    # is confined); georeg runs that copy as a storage-only node per region.
    paired_copies: bool = True
    # How an endpoint serves a blob download. "relay": on the client's
    # connection to the endpoint, from the node it routed the request to (the
    # endpoint hands the connection to that node, which writes the blob on it;
    # a node found dead before it writes fails over unseen). "redirect": a 307
    # to that node, which serves the bytes itself, as ACR sends clients to a
    # storage or data endpoint. With auth the node answers the 307 (the endpoint
    # decides no access): after checking the credentials, to its own address
    # with a five-minute grant for that blob in the URL, as ACR's SAS URLs.
    blob_downloads: str = "relay"
    # Who may use the registry. "none": anyone who reaches a port (the open
    # cluster). "token": ACR's access rules on every node (``registry_node.auth``),
    # the management API for the cluster owner only, nodes' internal routes for
    # the cluster itself (``cluster.control.access``). "token" by default, as
    # ACR never lets an unauthenticated client in.
    auth: str = "token"
    # Whether nodes and endpoints serve HTTPS. The certificates come from the
    # cluster CA (``cluster.control.ca``), which a cluster makes at first start
    # when either this or auth needs it: TLS does not require auth. With it,
    # replication between nodes uses mutual TLS as on an auth cluster.
    tls: bool = False
    # One seed drives every random draw of the cluster's WAN links (each link
    # derives its own from it, cluster.network.links.link_seed), so a run is
    # replayed from the seed it printed. None: not decided yet (``seeded``).
    seed: int | None = None
    replicas: tuple[ReplicaSpec, ...] = ()
    wan: WanSpec = WanSpec()
    residency: ResidencySpec = ResidencySpec()
    replication: ReplicationSpec = ReplicationSpec()
    webhooks: WebhookSpec = WebhookSpec()
    limits: LimitsSpec = LimitsSpec()
    schedules: tuple[ScheduleSpec, ...] = ()
    network: NetworkSpec = NetworkSpec()
    tasks: TasksSpec = TasksSpec()

    # -- derived -----------------------------------------------------------------

    @property
    def all_replicas(self) -> tuple[ReplicaSpec, ...]:
        """The home replica first, then the geo-replicas, as ACR lists them."""
        home = ReplicaSpec(self.home_region, self.home_zone_redundant, self.home_global_routing)
        return (home, *self.replicas)

    @property
    def auth_enabled(self) -> bool:
        return self.auth == "token"

    @property
    def login_server(self) -> str:
        """The registry's login server name, as ACR's: ``<registry>.azurecr.io``."""
        return f"{self.registry}.{LOGIN_SERVER_DOMAIN}"

    @property
    def client_locations(self) -> tuple[str, ...]:
        return self.network.client_locations or tuple(r.region for r in self.all_replicas)

    def wan_model(self) -> WanModel:
        return WanModel(tuple(PairOverride(p.a, p.b, p.rtt_ms, p.jitter_ms, p.bandwidth_mbps)
                              for p in self.wan.pairs),
                        bandwidth_mbps=self.wan.bandwidth_mbps, enabled=self.wan.enabled)

    def residency_policy(self) -> ResidencyPolicy:
        from replicator.residency import RepositoryRule

        return ResidencyPolicy(
            confined_regions=tuple(self.residency.confined_regions),
            repositories=tuple(RepositoryRule(r.repository, r.confined)
                               for r in self.residency.repositories))

    def with_replicas(self, replicas: tuple[ReplicaSpec, ...]) -> ClusterSpec:
        return msgspec.structs.replace(self, replicas=replicas)

    def seeded(self, seed: int | None = None) -> ClusterSpec:
        """This spec with its seed decided: ``seed`` if given, else its own,
        else one drawn now from the operating system's randomness."""
        if seed is None:
            seed = self.seed if self.seed is not None else random.SystemRandom().randrange(SEEDS)
        return msgspec.structs.replace(self, seed=seed)

    def with_auth(self, auth: str) -> ClusterSpec:
        return msgspec.structs.replace(self, auth=auth)

    def with_tls(self, tls: bool) -> ClusterSpec:
        return msgspec.structs.replace(self, tls=tls)

    @property
    def needs_ca(self) -> bool:
        """Whether the cluster has a CA: for auth's tokens and peers, or for TLS."""
        return self.auth_enabled or self.tls

    @property
    def scheme(self) -> str:
        """What clients speak to nodes and endpoints: ``https`` on a TLS cluster."""
        return "https" if self.tls else "http"

    def with_port_base(self, base: int) -> ClusterSpec:
        """This spec listening from ``base`` (``ANY_PORT_BASE``: wherever is free
        when it starts)."""
        return msgspec.structs.replace(self, network=msgspec.structs.replace(
            self.network, port_base=base))

    def node_count(self) -> int:
        return sum(len(r.zones) for r in self.all_replicas)

    def paired_regions(self) -> dict[str, str]:
        """Replica region → the paired region holding its copy (confined regions have none)."""
        if not self.paired_copies:
            return {}
        policy = self.residency_policy()
        return {r.region: REGIONS[r.region].pair for r in self.all_replicas
                if r.region in REGIONS and REGIONS[r.region].pair
                and not policy.confined(r.region, "")}


DEFAULT_SPEC = ClusterSpec(
    registry="georeg",
    tier="Premium",
    home_region="eastus",
    home_zone_redundant=True,
    replicas=(
        ReplicaSpec("westeurope", zone_redundant=True),
        ReplicaSpec("brazilsouth"),
        ReplicaSpec("southeastasia"),
    ),
)


# -- loading and validation ------------------------------------------------------


def load(path: Path | None) -> ClusterSpec:
    """The spec at ``path`` (or the default), validated; raises ``SpecError``."""
    if path is None:
        return validate(DEFAULT_SPEC, "the built-in default spec")
    source = str(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(source, [f"{path} does not exist"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(source, [f"not valid TOML: {exc}"]) from None
    return parse(raw, source)


def parse(raw: dict, source: str = "spec") -> ClusterSpec:
    _check_keys(raw, source)
    try:
        spec = msgspec.convert(raw, ClusterSpec)
    except msgspec.ValidationError as exc:
        raise SpecError(source, [_explain(exc)]) from None
    return validate(spec, source)


_FIELDS = {"": set(ClusterSpec.__struct_fields__), "replicas": set(ReplicaSpec.__struct_fields__),
           "wan": set(WanSpec.__struct_fields__), "residency": set(ResidencySpec.__struct_fields__),
           "network": set(NetworkSpec.__struct_fields__),
           "replication": set(ReplicationSpec.__struct_fields__),
           "webhooks": set(WebhookSpec.__struct_fields__),
           "limits": set(LimitsSpec.__struct_fields__),
           "tasks": set(TasksSpec.__struct_fields__),
           "schedules": set(ScheduleSpec.__struct_fields__)}


def _check_keys(raw: dict, source: str) -> None:
    """Unknown keys, with the nearest known one suggested (typos are the usual cause)."""
    problems = []

    def check(table: dict, known: set[str], where: str) -> None:
        for key in table:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"
                problems.append(f"unknown key {where}{key!r}{hint}")

    check(raw, _FIELDS[""], "")
    for array in ("replicas", "schedules"):
        for i, table in enumerate(raw.get(array) or []):
            if isinstance(table, dict):
                check(table, _FIELDS[array], f"{array}[{i}].")
    for section in ("wan", "residency", "replication", "webhooks", "limits", "network", "tasks"):
        if isinstance(raw.get(section), dict):
            check(raw[section], _FIELDS[section], f"{section}.")
    if problems:
        raise SpecError(source, problems)


def _explain(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    where = text.rpartition(" - at `")[2].rstrip("`") if " - at `" in text else ""
    path = where.replace("$.", "").replace("$", "")
    what = text.split(" - at ")[0]
    return f"{path}: {what}" if path else what


def validate(spec: ClusterSpec, source: str) -> ClusterSpec:
    problems: list[str] = []
    if spec.tier not in TIERS:
        close = difflib.get_close_matches(spec.tier.capitalize(), TIERS, n=1)
        problems.append(f"tier {spec.tier!r} is not one of {', '.join(TIERS)}"
                        + (f"; did you mean {close[0]!r}?" if close else ""))
    if spec.blob_downloads not in BLOB_DOWNLOADS:
        close = difflib.get_close_matches(spec.blob_downloads.lower(), BLOB_DOWNLOADS, n=1)
        problems.append(f"blob_downloads {spec.blob_downloads!r} is not one of 'relay' (the "
                        f"endpoint streams blobs) or 'redirect' (it answers 307 to the node)"
                        + (f"; did you mean {close[0]!r}?" if close else ""))
    if spec.auth not in AUTH_MODES:
        close = difflib.get_close_matches(spec.auth.lower(), AUTH_MODES, n=1)
        problems.append(f"auth {spec.auth!r} is not one of 'token' (credentials needed, as ACR) "
                        f"or 'none' (an open registry)"
                        + (f"; did you mean {close[0]!r}?" if close else ""))
    if not spec.registry or not spec.registry.isalnum() or not 5 <= len(spec.registry) <= 50:
        problems.append(f"registry {spec.registry!r}: ACR registry names are 5–50 letters and digits")

    names = [spec.home_region, *(r.region for r in spec.replicas)]
    for name in dict.fromkeys(names):
        if name not in REGIONS:
            problems.append(unknown_region_message(name))
    for name in spec.network.client_locations:  # (the default is the replica regions)
        if name not in REGIONS:
            problems.append("client_locations: " + unknown_region_message(name))
    for root in spec.tasks.context_roots:
        if not root.startswith("/"):
            problems.append(f"tasks.context_roots: {root[:100]!r} is not an absolute path")
    if not 0.1 <= spec.tasks.commit_poll_seconds <= 3600:
        problems.append("tasks.commit_poll_seconds is 0.1 to 3600 (seconds between two looks "
                        "at a git task's branch)")
    for name in spec.residency.confined_regions:
        if name not in REGIONS:
            problems.append("residency.confined_regions: " + unknown_region_message(name))

    premium = spec.tier == "Premium" or spec.tier not in TIERS  # (a bad tier is reported once)
    if spec.replicas and not premium:
        problems.append(f"geo-replication needs the Premium tier (this spec is {spec.tier}): set "
                        f"tier = \"Premium\" or remove the [[replicas]] tables")
    seen: set[str] = set()
    for i, replica in enumerate(spec.replicas):
        if replica.region == spec.home_region:
            problems.append(f"replicas[{i}]: {replica.region} is the home region, which always has "
                            f"the registry; remove this replica (for zones there, set "
                            f"home_zone_redundant = true)")
        elif replica.region in seen:
            problems.append(f"replicas[{i}]: {replica.region} is replicated twice; keep one")
        seen.add(replica.region)
    for replica in spec.all_replicas:
        if not replica.zone_redundant or replica.region not in REGIONS:
            continue
        where = "home_zone_redundant" if replica.region == spec.home_region else \
            f"zone_redundant for {replica.region}"
        if not premium:
            problems.append(f"{where}: zone redundancy needs the Premium tier")
        if not REGIONS[replica.region].zones:
            nearby = sorted((r.name for r in REGIONS.values() if r.zones),
                            key=lambda name: distance_km(replica.region, name))[:3]
            problems.append(f"{where}: {replica.region} has no availability zones; the nearest "
                            f"regions that do: {', '.join(nearby)}")
    for i, pair in enumerate(spec.wan.pairs):
        for end in (pair.a, pair.b):
            if end not in REGIONS:
                problems.append(f"wan.pairs[{i}]: " + unknown_region_message(end))
        for field_name in ("rtt_ms", "jitter_ms", "bandwidth_mbps"):
            value = getattr(pair, field_name)
            if value is not None and value < 0:
                problems.append(f"wan.pairs[{i}].{field_name} must not be negative")
    if spec.seed is not None and not 0 <= spec.seed < 2**64:
        problems.append(f"seed {spec.seed} must be between 0 and 2**64 - 1")
    if spec.wan.bandwidth_mbps < 0:
        problems.append("wan.bandwidth_mbps must not be negative (0 means unlimited)")
    problems += _replication_problems(spec.replication)
    problems += _webhook_problems(spec.webhooks)
    problems += _limits_problems(spec.limits)
    problems += schedule_problems(spec.schedules)
    problems += _port_problems(spec)
    problems += _host_problems(spec)
    if problems:
        raise SpecError(source, problems)
    return spec


def _host_problems(spec: ClusterSpec) -> list[str]:
    """``[network.hosts]``: each key a node this spec runs (a replica's region,
    a zone node of a zone-redundant replica, or a pair region holding a
    paired copy: a key placing nothing would silently leave a region on
    loopback), each address one a node can listen on and be reached at, a
    control address the hosts can reach (loopback is each host's own), and
    auth on (without it, replication and the nodes' internal routes would be
    open and in plaintext on the hosts' network)."""
    network = spec.network
    if not network.hosts:
        return []
    placeable = {r.region for r in spec.all_replicas} | set(spec.paired_regions().values())
    placeable |= {f"{r.region}-{zone}" for r in spec.all_replicas if r.zone_redundant
                  for zone in r.zones}
    problems = []
    for key, address in network.hosts.items():
        if key not in placeable:
            problems.append(f"network.hosts: {key!r} places no node of this cluster (a "
                            f"replica's region, a zone node of a zone-redundant replica or a "
                            f"pair region holding a paired copy: "
                            f"{', '.join(sorted(placeable))})")
        if _loopback_or_wildcard(address):
            problems.append(f"network.hosts.{key}: {address!r} is not an address other hosts "
                            f"reach; give the host's own address (e.g. 10.88.0.3)")
        elif ":" in address:
            problems.append(f"network.hosts.{key}: {address!r}: IPv6 addresses are not "
                            f"supported here yet; give the host's IPv4 address or name")
    if not spec.auth_enabled:
        problems.append(f"auth {spec.auth!r} with [network.hosts]: nodes on hosts of their own "
                        f"need auth = \"token\" (replication between hosts in mutual TLS, the "
                        f"nodes' internal routes behind the internal credential); without it "
                        f"both are open and in plaintext on the hosts' network")
    if _loopback_or_wildcard(network.host):
        problems.append(f"network.host {network.host!r}: with [network.hosts], the control "
                        f"process (links, endpoints, management API) must listen on an address "
                        f"every host reaches, e.g. its address on the hosts' network")
    if not network.host_data_dir.startswith("/"):
        problems.append(f"network.host_data_dir {network.host_data_dir!r} is not an absolute path")
    return problems


def _loopback_or_wildcard(address: str) -> bool:
    if listens_everywhere(address) or address == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def _replication_problems(replication: ReplicationSpec) -> list[str]:
    problems = []
    for name in ("anti_entropy_interval_s", "quorum_timeout_s", "peer_horizon_s",
                 "clock_probe_interval_s"):
        value = getattr(replication, name)
        if value is not None and not value > 0:
            problems.append(f"replication.{name} must be more than 0 seconds")
    if replication.tombstone_grace_s is not None and replication.tombstone_grace_s < 0:
        problems.append("replication.tombstone_grace_s must not be negative (0: a tombstone "
                        "goes as soon as every live peer has read past it)")
    if replication.log_retain_events is not None and replication.log_retain_events < 0:
        problems.append("replication.log_retain_events must not be negative")
    return problems


def _webhook_problems(webhooks: WebhookSpec) -> list[str]:
    problems = []
    for name in ("timeout_s", "backoff_cap_s", "retry_horizon_s"):
        value = getattr(webhooks, name)
        if value is not None and not value > 0:
            problems.append(f"webhooks.{name} must be more than 0 seconds")
    if webhooks.log_size is not None and webhooks.log_size < 1:
        problems.append("webhooks.log_size must be at least 1 (list-events shows the last "
                        "deliveries kept)")
    return problems


def _limits_problems(limits: LimitsSpec) -> list[str]:
    problems = []
    if limits.limits not in LIMIT_MODES:
        close = difflib.get_close_matches(limits.limits.lower(), LIMIT_MODES, n=1)
        problems.append(f"limits.limits {limits.limits!r} is not one of 'tier' (ACR's limits of "
                        f"the tier) or 'off' (none but the numbers given)"
                        + (f"; did you mean {close[0]!r}?" if close else ""))
    # The node's own bounds (registry_node.config), so the spec refuses what a
    # node would; 0 is the spec's own "not limited".
    for key in RATE_FIELDS:
        value = getattr(limits, key)
        if value is not None and value != 0:
            try:
                request_rate(value, f"limits.{key}")
            except ValueError as exc:
                problems.append(f"{exc} (0: not limited)")
    for key, check in (("per_identity_fraction", identity_fraction), ("burst_s", burst_seconds)):
        try:
            if getattr(limits, key) is not None:
                check(getattr(limits, key))
        except ValueError as exc:
            problems.append(f"limits.{exc}")
    for key in ("download_mbps", "upload_mbps"):
        value = getattr(limits, key)
        if value is not None and not valid_mbps(value):
            problems.append(f"limits.{key} must be a number of Mbit/s, 0 (unshaped) or from "
                            f"{MIN_MBPS} on")
    try:
        if limits.storage_limit is not None:
            tier_table.parse_size(limits.storage_limit)
    except ValueError as exc:
        problems.append(f"limits.storage_limit: {exc}")
    return problems


# -- ports -------------------------------------------------------------------------

# What the port layout has room for (``PortLayout``): ``show-usage``'s limit of
# Geo-replications too, as ACR documents none.
MAX_REPLICAS = 40
MAX_NODES = 40


@dataclass(frozen=True, slots=True)
class PortLayout:
    """Where everything listens, from ``network.port_base`` (P):

    P + i             global endpoint for client location i   (up to 20)
    P + 20 + i        regional endpoint for replica i          (up to 40)
    P + 60 + k        paired-region copy k, HTTP                 (up to 20)
    P + 80 + k        paired-region copy k, gRPC
    P + 99            management API (unless management_port is set)
    P + 100 + i       node i, HTTP                               (up to 40)
    P + 200 + i       node i, gRPC
    P + 300 + j       WAN link j (one per ordered pair of nodes, up to 1560)
    P + 1900 + i      management link to node i (how the management API reaches it)
    P + 2000 + m      WAN link m of a paired-region copy (to and from its region's nodes)
    """

    base: int
    management: int
    locations: int
    replicas: int
    nodes: int
    pair_copies: int = 0
    pair_links: int = 0

    def pair_http(self, k: int) -> int:
        return self.base + 60 + k

    def pair_grpc(self, k: int) -> int:
        return self.base + 80 + k

    def pair_link(self, m: int) -> int:
        return self.base + 2000 + m

    def global_endpoint(self, i: int) -> int:
        return self.base + i

    def regional_endpoint(self, i: int) -> int:
        return self.base + 20 + i

    def node_http(self, i: int) -> int:
        return self.base + 100 + i

    def node_grpc(self, i: int) -> int:
        return self.base + 200 + i

    def link(self, j: int) -> int:
        return self.base + 300 + j

    def management_link(self, i: int) -> int:
        return self.base + 1900 + i

    @property
    def link_count(self) -> int:
        return self.nodes * (self.nodes - 1)

    def all_ports(self) -> list[int]:
        ports = [self.global_endpoint(i) for i in range(self.locations)]
        ports += [self.regional_endpoint(i) for i in range(self.replicas)]
        ports += [self.management]
        ports += [self.node_http(i) for i in range(self.nodes)]
        ports += [self.node_grpc(i) for i in range(self.nodes)]
        ports += [self.link(j) for j in range(self.link_count)]
        ports += [self.management_link(i) for i in range(self.nodes)]
        ports += [self.pair_http(k) for k in range(self.pair_copies)]
        ports += [self.pair_grpc(k) for k in range(self.pair_copies)]
        ports += [self.pair_link(m) for m in range(self.pair_links)]
        return ports


def port_layout(spec: ClusterSpec) -> PortLayout:
    base = spec.network.port_base
    zones = {r.region: len(r.zones) for r in spec.all_replicas}
    pairs = spec.paired_regions()
    return PortLayout(base, spec.network.management_port or base + 99, len(spec.client_locations),
                      len(spec.all_replicas), spec.node_count(), len(pairs),
                      sum(2 * zones[r] for r in pairs))


def _port_problems(spec: ClusterSpec) -> list[str]:
    problems = []
    layout = port_layout(spec)
    base = spec.network.port_base
    if layout.locations > 20:
        problems.append(f"client_locations: at most 20 global endpoints, got {layout.locations}")
    if layout.replicas > MAX_REPLICAS:
        problems.append(f"at most {MAX_REPLICAS} replicas, got {layout.replicas}")
    if layout.nodes > MAX_NODES:
        problems.append(f"at most {MAX_NODES} nodes, got {layout.nodes}")
    if not (1 <= base or base == ANY_PORT_BASE):
        problems.append(f"network.port_base {base} must be a port number, or 0 for any free "
                        f"range")
    top = max(layout.all_ports())
    if top > MAX_PORT:
        problems.append(f"network.port_base {base} leaves no room: this cluster needs ports up to "
                        f"{top}; use a port_base of at most {MAX_PORT - (top - base)}")
    mgmt = spec.network.management_port
    if mgmt is not None and base != ANY_PORT_BASE:   # with any base, a clash is found binding
        used = list(layout.all_ports())
        used.remove(layout.management)
        if mgmt in used:
            problems.append(f"network.management_port {mgmt} collides with a port georeg assigns "
                            f"from port_base {base} (it uses {base}–{top}); pick a port outside "
                            f"that range")
    if mgmt is not None:
        if not 1 <= mgmt <= MAX_PORT:
            problems.append(f"network.management_port {mgmt} is not a port number")
    return problems
