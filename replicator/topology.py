"""What one node knows of its cluster: itself, its peers and how to reach them,
the residency policy, and replication settings.

It arrives as a JSON file (``georeg node --cluster FILE``), written by the
cluster supervisor. Peer addresses are as seen *from this node*: between
regions they point at WAN link proxies, so faults and latency apply.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from .residency import ResidencyPolicy


class Peer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    region: str
    zone: str = ""
    grpc: str = ""                 # host:port, as reachable from this node
    http: str = ""                 # base URL of its OCI API, for status pages

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
    # In a zone-redundant region, one zone fetches each blob across the WAN and
    # its siblings fetch it from that zone (replicator.transfer): a third of the
    # inter-region bytes, for ~20 ms more lag at the p50 (georeg bench lag,
    # default spec), the siblings' copies waiting on the fetching zone's.
    one_wan_copy_per_region: bool = False
    chunk_size: int = 1 << 20


class ClusterView(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str                      # this node's name
    region: str
    zone: str = ""
    grpc_listen: str = "127.0.0.1:0"
    peers: tuple[Peer, ...] = ()
    residency: ResidencyPolicy = ResidencyPolicy()
    replication: ReplicationSettings = ReplicationSettings()

    @property
    def zone_peers(self) -> tuple[Peer, ...]:
        """The other zones of this node's region (empty unless zone redundant)."""
        return tuple(p for p in self.peers if p.region == self.region and self.zone and p.zone)

    @property
    def zone_redundant(self) -> bool:
        return bool(self.zone_peers)

    @classmethod
    def load(cls, path: Path) -> ClusterView:
        try:
            return msgspec.json.decode(path.read_bytes(), type=cls)
        except msgspec.ValidationError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def dump(self, path: Path) -> None:
        path.write_bytes(msgspec.json.format(msgspec.json.encode(self)))
