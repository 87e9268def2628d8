"""Anti-entropy: repairs what the event stream missed (partitions longer than
a log, crashes, a node rebuilt from nothing, a permanent failure that has
since become possible).

Periodically, and whenever a subscription (re)connects, a node asks each peer
for per-repository fingerprints over the state both may hold (residency), and
for every repository that differs, the peer's full register state (tags, manifests, and the changeable attributes of the
repository, its tags and manifests); each register is then applied through
``Transfer`` exactly as if it had arrived as an event. Registry configuration is compared the same way, by one fingerprint
over all of it (registry-wide: no residency), and fetched whole where it
differs. Pull-only: every node repairs itself from its peers, so with all
nodes doing it the cluster converges whenever the replica graph is connected.

Both sides read their fingerprints from sums maintained on write
(``registry_node.fingerprints``). Repositories are compared by bucket first
(a fixed number of sums, whatever the node holds), then only those of the
buckets that differ, so a round between converged nodes costs the same at
ten images as at a hundred thousand. With per-repository residency rules a
bucket's sum cannot be filtered, and every repository's fingerprint is
compared (still a read each). A peer of an older georeg is compared in the
scheme it knows (recomputed: O(content)).

With bounded metadata (``replicator.retention``) one more rule applies: a
deletion past the tombstone grace, for a key this node holds nothing of (no
value, no tombstone), is not stored. Nodes collect a tombstone at different
moments; storing it again here would only have it logged and collected again
(see ``replicator.retention`` for why nothing is lost). ``resync`` is the
repair of a subscriber whose cursor fell below a peer's log floor: a full
round that waits for any round in progress and raises on failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import structlog

from registry_node import fingerprints, keys
from registry_node.records import EventKind
from registry_node.replica import RegisterState, register_event

from .convert import event_from_wire, register_from_wire
from .errors import Outcome, ReplicationError, permanent
from .peers import PeerClient
from .residency import ResidencyPolicy
from .transfer import Transfer
from .wire.v1 import replication_pb2 as pb

log = structlog.get_logger("georeg.replication")

YIELD_EVERY = 1000   # fingerprints read between two turns of the event loop


class AntiEntropy:
    def __init__(self, transfer: Transfer, residency: ResidencyPolicy,
                 peers: Sequence[PeerClient], interval_s: float) -> None:
        self.transfer = transfer
        self.replica = transfer.replica
        self.region = transfer.replica.registry.identity.region
        self.residency = residency
        self.peers = list(peers)
        self.interval_s = interval_s
        self._locks: dict[str, asyncio.Lock] = {p.name: asyncio.Lock() for p in self.peers}
        self.rounds = 0
        self.repaired = 0
        # What rounds looked at: buckets found differing, repositories whose
        # fingerprints were compared, and whose whole state was fetched.
        self.buckets_differing = 0
        self.compared = 0
        self.fetched = 0
        self.stale_deletions = 0  # a peer's deletions past the grace, not stored (see above)
        # Bounded metadata (``replicator.retention``), wired by the runtime.
        self.stale_deletion: Callable[[int], bool] = lambda hlc: False

    def counters(self) -> dict[str, int]:
        """What rounds have done since the node started (reported by the node
        and at ``/metrics``, so that a round's cost can be read from outside)."""
        return {"rounds": self.rounds, "repaired": self.repaired,
                "buckets_differing": self.buckets_differing, "compared": self.compared,
                "fetched": self.fetched}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            for peer in self.peers:
                await self.sync_with(peer)
            self.rounds += 1

    async def sync_with(self, peer: PeerClient) -> int:
        """Repair this node from ``peer``; returns how many registers changed here."""
        lock = self._locks.setdefault(peer.name, asyncio.Lock())
        if lock.locked():
            return 0
        async with lock:
            try:
                return await self._sync(peer)
            except ReplicationError as exc:
                log.info("anti_entropy_failed", peer=peer.name, error=exc.reason)
                return 0

    async def resync(self, peer: PeerClient) -> int:
        """Repair this node from ``peer`` in full, for a cursor its log no longer
        continues: waits for a round with it in progress rather than skipping,
        and raises ``ReplicationError`` if it fails. Every deletion this node
        missed is among the peer's tombstones still: the peer collects none
        before every reader, this node included, read past it."""
        lock = self._locks.setdefault(peer.name, asyncio.Lock())
        async with lock:
            return await self._sync(peer)

    def _visible(self, repository: str, peer_region: str):
        def visible(origin_region: str) -> bool:
            return (self.residency.allows(origin_region, repository, peer_region)
                    and self.residency.allows(origin_region, repository, self.region))
        return visible

    async def _repository_summaries(self, peer: PeerClient) -> tuple[pb.Summary, list]:
        """The peer's summary, and its fingerprints of the repositories worth
        comparing: by bucket where both sides can (only the repositories of the
        buckets that differ), otherwise every repository. The fingerprints are
        in the scheme of the summary returned with them (the one that carried
        them: a peer replaced between two questions may answer them in two)."""
        if self.residency.repositories:       # per-repository rules: no bucket sums
            summary = await peer.summarize()
            return summary, list(summary.repositories)
        summary = await peer.summarize(buckets_only=True)
        if summary.bucket_count == 0:
            return summary, list(summary.repositories)   # it answered per repository
        if summary.bucket_count != keys.FINGERPRINT_BUCKETS:
            # Buckets laid out otherwise: not comparable with ours, and the
            # reply carries no repositories. Ask for every repository's.
            summary = await peer.summarize()
            return summary, list(summary.repositories)
        theirs = {b.bucket: b.fingerprint for b in summary.buckets}
        visible = self._visible("", peer.peer.region)
        differing = [b for b in range(keys.FINGERPRINT_BUCKETS)
                     if theirs.get(b, fingerprints.EMPTY) != self.replica.bucket_fingerprint(b, visible)]
        self.buckets_differing += len(differing)
        if not differing:
            return summary, []
        summary = await peer.summarize(buckets=differing)
        return summary, list(summary.repositories)

    async def _sync(self, peer: PeerClient) -> int:
        summary, entries = await self._repository_summaries(peer)
        if summary.fingerprint_scheme == fingerprints.SUMMED_WITHOUT_ATTRIBUTES:
            # A georeg from before attributes were summed answered in its own
            # sums, which this node does not keep: ask it in the scheme both know.
            summary = await peer.summarize(scheme=fingerprints.RECOMPUTED)
            entries = list(summary.repositories)
        scheme = summary.fingerprint_scheme   # an older peer leaves it unset: RECOMPUTED
        if scheme not in (fingerprints.RECOMPUTED, fingerprints.SUMMED):
            raise permanent(f"{peer.name} fingerprints in unknown scheme {scheme}")
        changed = 0
        for n, entry in enumerate(entries, 1):
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)   # every repository may differ (a new replica)
            repo = entry.repository
            mine = self.replica.fingerprint(repo, self._visible(repo, peer.peer.region), scheme)
            self.compared += 1
            if mine == entry.fingerprint:
                continue
            self.fetched += 1
            state = await peer.repository_state(repo)
            changed += await self._merge(repo, [register_from_wire(r) for r in state.manifests],
                                         [register_from_wire(r) for r in state.tags], peer)
            changed += await self._merge_attributes(repo, state.attributes, peer)
        if summary.configuration_fingerprint != self.replica.configuration.fingerprint():
            changed += await self._merge_configuration(peer)
        if changed:
            self.repaired += changed
            log.info("anti_entropy_repaired", peer=peer.name, changes=changed)
        return changed

    async def _merge_configuration(self, peer: PeerClient) -> int:
        """Registry configuration: registry-wide, so every register the peer
        holds, applied as the event it amounts to (newer wins, as always)."""
        state = await peer.configuration_state()
        changed = 0
        for message in state.registers:
            if await self.transfer.apply(event_from_wire(message), [peer]):
                changed += 1
        return changed

    async def _merge(self, repo: str, manifests: list[RegisterState], tags: list[RegisterState],
                     peer: PeerClient) -> int:
        sources = [peer, *(p for p in self.peers if p is not peer)]
        steps = (
            [(EventKind.MANIFEST_PUT, r) for r in manifests if not r.deleted]
            + [(EventKind.TAG_SET, r) for r in tags if not r.deleted]
            + [(EventKind.TAG_DELETE, r) for r in tags if r.deleted]
            + [(EventKind.MANIFEST_DELETE, r) for r in manifests if r.deleted]
        )
        changed = 0
        for kind, register in steps:
            if not self._adoptable(repo, kind, register):
                self.stale_deletions += 1
                continue
            try:
                if await self.transfer.apply(register_event(repo, kind, register), sources):
                    changed += 1
            except ReplicationError as exc:
                if exc.outcome is Outcome.PERMANENT:
                    self.replica.record_failure(repo, register.digest, exc.reason, peer.name)
                    continue
                raise
        return changed

    async def _merge_attributes(self, repo: str, registers: Sequence[pb.Event],
                                peer: PeerClient) -> int:
        """Attributes registers (locks), each applied as the ``attributes_set``
        event it amounts to: newer wins by stamp, as on the log, so a lock
        this node missed is adopted and one it holds newer is kept. Events of
        another repository (a confused peer) are not applied."""
        changed = 0
        for message in registers:
            event = event_from_wire(message)
            if event.kind is not EventKind.ATTRIBUTES_SET or event.repository != repo:
                continue
            if await self.transfer.apply(event, [peer]):
                changed += 1
        return changed

    def _adoptable(self, repo: str, kind: EventKind, register: RegisterState) -> bool:
        """Whether to apply ``register`` (see the module docstring): always where
        this node holds something of its key, for last-writer-wins to decide."""
        deletion = kind in (EventKind.TAG_DELETE, EventKind.MANIFEST_DELETE)
        if not (deletion and self.stale_deletion(register.stamp[0])):
            return True
        return self.replica.holds_register(repo, kind, register.key)
