"""What one node knows of its cluster: itself, its peers and how to reach them,
whether its region is zone redundant (and so what a write needs), the
residency policy, and replication settings.

It arrives as a JSON file (``georeg node --cluster FILE``), written by the
cluster supervisor. Peer addresses are as seen *from this node*: between
regions they point at WAN link proxies, so faults and latency apply.

Zone redundancy is decided by the spec and placed by the plan
(``cluster.control.plan``); the view carries that decision as
``ZoneRedundancy`` and the node acts on it alone. Which peers happen to be
listed never changes it: a zone whose entry is missing still counts toward the
write quorum, and peers that carry zones do not make a region redundant that
the plan did not. Only a view file written before views said so (no
``zone_redundancy`` key) has the decision read from its peers, once, as it is
loaded (``ClusterView.load``).

Whether peers talk over mutual TLS is the plan's decision too (an auth
cluster's): ``mutual_tls``, never inferred from what files a node was given.
So are the zones of the *other* zone-redundant regions (``remote_zones``): an
origin sends each such region one copy of a blob, to the zone
``wan_receiver`` names, and that region's zones name the same one
(``replicator.service``, ``replicator.transfer``). A view without the key
(written before views carried it) knows of no remote zones: every remote
node then gets its own copy, as before.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from registry_node.config import BandwidthSettings, RequestLimits, WebhookSettings

from .residency import ResidencyPolicy


class Peer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    region: str
    zone: str = ""
    grpc: str = ""                 # host:port, as reachable from this node
    http: str = ""                 # base URL of its OCI API, for status pages
    # The modelled link to it (the plan's WAN model; 0: unknown, or unlimited
    # bandwidth): what sizes this node's receive window for it (replicator.peers).
    rtt_ms: float = 0.0
    bandwidth_mbps: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.region}/{self.zone}" if self.zone else self.region


class ReplicationSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    anti_entropy_interval_s: float = 30.0
    quorum_timeout_s: float = 10.0
    # Blob transfers at once. Mostly they wait on the WAN's round trips (or on a
    # sibling zone's bounded wait), not on this node, so allow an image's worth
    # from several origins at once.
    transfer_concurrency: int = 16
    # A zone-redundant region receives each blob across the WAN once: an origin
    # sends a blob with its event only to the region's receiving zone for it
    # (``wan_receiver``), that zone fetches what did not come along, and its
    # siblings get it from that zone over the region's own links, from memory
    # as it arrives or while it is stored (replicator.transfer, .service).
    # Off: every zone of a remote region gets its own copy across the WAN.
    one_wan_copy_per_region: bool = True
    # And each event: of a zone-redundant region, one zone reads a remote
    # peer's log whole across the WAN (``event_receiver``); the others take
    # those events from its log over the region's links and read the peer
    # lean, falling back to the whole log if that zone is down or stalls
    # (replicator.intake). Off: every zone reads every peer's log whole.
    one_wan_event_copy_per_region: bool = True
    chunk_size: int = 1 << 20
    # Bounded metadata (replicator.retention): a peer not heard from for
    # peer_horizon_s no longer holds this node's log back (it resynchronises
    # by anti-entropy when it returns); a tombstone goes once every reader,
    # away or not, read past it and tombstone_grace_s passed (gc_grace);
    # the last log_retain_events events are kept whatever the cursors say;
    # a pass every compaction_interval_s.
    peer_horizon_s: float = 24 * 3600.0
    tombstone_grace_s: float = 24 * 3600.0
    log_retain_events: int = 10_000
    compaction_interval_s: float = 60.0
    # How often each peer's clock is probed (replicator.clock_probe): how soon a
    # node whose clock went off stops stamping writes (registry_node.clock).
    # Each round is one Health call per peer: at 2 s the default cluster (11
    # nodes) spent 11 % of a core on probes alone, idle (7 % -> 18 %); at 10 s
    # it is about 2 %, and the HLC rule, not the fence, is what bounds the harm
    # of a far-ahead stamp in the meantime (docs/faults.md, "Clock skew").
    clock_probe_interval_s: float = 10.0


class ZoneRedundancy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The plan's decision for this node's region. Zone redundant: one node in
    each of ``zones``, and a write is acknowledged once ``write_quorum`` of
    them (this one included) hold it. Not zone redundant: the node alone
    acknowledges (``zones`` empty, ``write_quorum`` 1)."""

    enabled: bool = False
    zones: tuple[str, ...] = ()
    write_quorum: int = 1

    def __post_init__(self) -> None:
        if not self.enabled:
            if self.zones or self.write_quorum != 1:
                raise ValueError("a region that is not zone redundant has no zones and a write "
                                 "quorum of 1")
            return
        if len(set(self.zones)) != len(self.zones) or "" in self.zones:
            raise ValueError(f"zones must be distinct zone names, got {list(self.zones)}")
        if not 1 <= self.write_quorum <= len(self.zones):
            raise ValueError(f"write_quorum {self.write_quorum} must be between 1 and the "
                             f"number of zones ({len(self.zones)})")

    @property
    def zone_count(self) -> int:
        """Nodes of the region (1 where it is not zone redundant)."""
        return len(self.zones) if self.enabled else 1


class ClusterView(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str                      # this node's name
    region: str
    zone: str = ""
    grpc_listen: str = "127.0.0.1:0"
    peers: tuple[Peer, ...] = ()
    zone_redundancy: ZoneRedundancy = ZoneRedundancy()
    residency: ResidencyPolicy = ResidencyPolicy()
    replication: ReplicationSettings = ReplicationSettings()
    # The zones of every other zone-redundant region, by region, as the plan
    # placed them (see the module docstring).
    remote_zones: dict[str, tuple[str, ...]] = msgspec.field(default_factory=dict)
    # Replicate over mutual TLS (an auth cluster): the node serves and dials its
    # peers with its certificate from the cluster CA (its --auth-* files) and
    # takes a peer's region and zone from the peer's certificate alone.
    mutual_tls: bool = False
    # Nodes, by name, that read this node's log (bounded metadata waits for
    # them: replicator.retention). Not the same as the peers: a region's paired
    # copy reads its region's nodes always but is their peer only during a
    # restore, and nobody reads a copy's log outside one. None (a view from
    # before the plan said so): the peers.
    readers: tuple[str, ...] | None = None
    # How this node delivers webhooks, as the plan decided: whether it is the
    # one node of its region that fires them, and the modelled one-way latency
    # to each region a receiver may sit in. None (a view from before the plan
    # said so): see ``webhook_settings``.
    webhooks: WebhookSettings | None = None
    # The requests its replica admits (``registry_node.throttle``), as the plan
    # decided from the spec's [limits]; None: none (throttling off, faults
    # aside). Its zone peers (``zone_peers``) share them.
    request_limits: RequestLimits | None = None
    # This node's share of its replica's blob bandwidth, as the plan decided
    # from the spec's [limits] (registry_node.bandwidth); unshaped by default,
    # as in a view from before the plan said so.
    bandwidth: BandwidthSettings = BandwidthSettings()

    def __post_init__(self) -> None:
        if self.zone_redundancy.enabled and self.zone not in self.zone_redundancy.zones:
            raise ValueError(f"zone {self.zone!r} of {self.name} is not one of its region's "
                             f"zones {list(self.zone_redundancy.zones)}")

    @property
    def webhook_settings(self) -> WebhookSettings:
        """``webhooks``; for a view without it, the plan's rule read from the
        zones it names: a zone-redundant region's first zone delivers, a
        region of one node delivers, and no latency is modelled."""
        if self.webhooks is not None:
            return self.webhooks
        zones = self.zone_redundancy.zones
        return WebhookSettings(deliver=not self.zone_redundant or self.zone == min(zones))

    @property
    def zone_redundant(self) -> bool:
        return self.zone_redundancy.enabled

    @property
    def quorum_zones(self) -> tuple[str, ...]:
        """The labels (``region/zone``) of the other zones of this node's region,
        whose confirmations count toward its write quorum: every zone the plan
        placed, listed as a peer here or not."""
        return tuple(f"{self.region}/{zone}" for zone in self.zone_redundancy.zones
                     if zone != self.zone)

    def is_zone_peer(self, peer: Peer) -> bool:
        """Whether ``peer`` is another zone of this node's zone-redundant region."""
        return peer.region == self.region and peer.label in self.quorum_zones

    @property
    def zone_peers(self) -> tuple[Peer, ...]:
        """The listed peers that are other zones of this node's region (none
        unless it is zone redundant)."""
        return tuple(p for p in self.peers if self.is_zone_peer(p))

    @classmethod
    def load(cls, path: Path) -> ClusterView:
        try:
            raw = msgspec.json.decode(path.read_bytes())
            view = msgspec.convert(raw, type=cls)
        except msgspec.DecodeError as exc:   # not JSON, or not a view (ValidationError)
            raise ValueError(f"{path}: {exc}") from None
        if isinstance(raw, dict) and "zone_redundancy" not in raw:
            view = msgspec.structs.replace(view, zone_redundancy=_read_from_peers(view))
        return view

    def encode(self) -> bytes:
        """The view as its file holds it (``load`` reads it back)."""
        return msgspec.json.format(msgspec.json.encode(self))

    def dump(self, path: Path) -> None:
        path.write_bytes(self.encode())


def digest_spin(digest: str) -> int:
    """A number every node derives alike from ``digest`` (uniform: a hash)."""
    return int(digest.rpartition(":")[2][:8] or "0", 16)


def wan_receiver(zones: Sequence[str], digest: str,
                 reachable: Callable[[str], bool] = lambda zone: True) -> str:
    """The zone of a zone-redundant region (its plan's ``zones``) that receives
    ``digest`` across the WAN: the first of the zones, in an order that starts
    at one drawn from the digest (so an image's layers spread over the zones),
    that ``reachable`` says can be reached; the digest's own pick if none can.
    Every node with the same zones and the same answers from ``reachable``
    names the same zone; where their answers differ (a zone cut off from some
    nodes only), a wrong guess costs a sibling one bounded wait."""
    ordered = sorted(zones)
    if not ordered:
        return ""
    start = digest_spin(digest) % len(ordered)
    rotation = ordered[start:] + ordered[:start]
    return next((zone for zone in rotation if reachable(zone)), rotation[0])


def event_receiver(zones: Sequence[str], peer_region: str, peer_zone: str = "",
                   peer_region_zones: Sequence[str] = ()) -> str:
    """The zone of a zone-redundant region (its plan's ``zones``) that reads the
    log of the remote node ``peer_region``/``peer_zone`` whole for the region
    (``replicator.intake``). Every node of the region names the same zone;
    the zones of one remote zone-redundant region (``peer_region_zones``) go
    to different zones here, so no zone reads every WAN stream alone."""
    ordered = sorted(zones)
    if not ordered:
        return ""
    spin = zlib.crc32(peer_region.encode())
    remote = sorted(peer_region_zones)
    spin += remote.index(peer_zone) if peer_zone in remote else zlib.crc32(peer_zone.encode())
    return ordered[spin % len(ordered)]


# What a view written before views carried the decision meant: its region was
# zone redundant when a peer of its region had a zone (and so did this node),
# and a write needed two copies. Applied only where the key is absent.
LEGACY_WRITE_QUORUM = 2


def _read_from_peers(view: ClusterView) -> ZoneRedundancy:
    zones = {p.zone for p in view.peers if p.region == view.region and p.zone}
    if not view.zone or not zones:
        return ZoneRedundancy()
    return ZoneRedundancy(True, tuple(sorted(zones | {view.zone})), LEGACY_WRITE_QUORUM)
