"""The recycle bin: soft delete (ACR's soft delete policy), kept with
geo-replication and with retention, which ACR supports with neither.

Owns the entries of ``bin\\0<repo>\\0…`` and the ``binref\\0…`` references of
the manifests in them (``keys``), the policy (``SoftDeletePolicy``, a field of
the registry's properties, ``configuration``), what the bin lists, and the
purge. ``Registry`` puts things in (a delete), takes them out (a restore, a
push that brings the same manifest or tag back); ``Replica`` does the same for
replicated deletes and puts.

Rules
    * The decision is made once, where the client's delete is taken: with
      the policy on there, the delete's event says so (``Event.recycled``,
      with the tags the manifest had there, ``recycled_tags``), and every
      region that applies the delete keeps what it ends in its bin, stamped
      with the delete's stamp and the origin's acknowledgement time. Every
      region that applies the same winning delete holds the same entry (a
      manifest's body is its digest's, the tags come from the event).
    * An entry is the state of its register: it exists while the register's
      winning write is the soft delete it records. A delete that wins over an
      older one replaces the entry (same body, the newer delete's tags and
      time); a put that wins (a restore, a push of the same manifest or tag)
      ends it. A delete that loses creates nothing.
    * A manifest in the bin keeps every blob it references from garbage
      collection (``binref\\0<target>\\0<repo>\\0<digest>``, which
      ``unreferenced`` and ``gc`` count as a reference) — but not visible:
      the repository does not serve its blobs, nor does it keep its child
      manifests from deletion.
    * Purge: an entry goes once ``deleted + days`` has passed on this node's
      clock, ``days`` being the policy's *current* value (ACR's rule: raising
      the days keeps entries longer). Local, logged nothing: every region
      purges the same entries, each by its own clock. A sweep looks at
      ``PURGE_BATCH`` entries at most, and goes on where it stopped.

No HTTP here, no commit: staging into a ``Batch`` and reading the store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from . import keys
from .metastore import Batch, MetadataStore
from .records import (
    ManifestRecord,
    RecycledManifest,
    RecycledTag,
    Stamp,
    decode,
    encode,
    stamp_of,
)

MIN_DAYS, MAX_DAYS, DEFAULT_DAYS = 1, 90, 7
DAY_NS = 86_400 * 10**9
PURGE_BATCH = 1000          # entries a purge sweep looks at, at most


class SoftDeletePolicy(msgspec.Struct, frozen=True):
    """ACR's soft delete policy: ``status`` Enabled / Disabled, ``retentionDays``."""

    enabled: bool = False
    days: int = DEFAULT_DAYS


def policy_problem(policy: SoftDeletePolicy) -> str | None:
    """Why ``policy`` cannot be stored, or ``None``."""
    if isinstance(policy.days, bool) or not MIN_DAYS <= policy.days <= MAX_DAYS:
        return f"soft delete days are {MIN_DAYS} to {MAX_DAYS}, not {policy.days!r}"
    return None


@dataclass(frozen=True, slots=True)
class PurgeReport:
    looked_at: int
    purged_manifests: int
    purged_tags: int


class RecycleBin:
    """One node's recycle bins (every repository's)."""

    def __init__(self, meta: MetadataStore, wall_ns: Callable[[], int]) -> None:
        self.meta = meta
        self._wall_ns = wall_ns
        # The live policy; the node wires it to its configuration.
        self.policy: Callable[[], SoftDeletePolicy] = SoftDeletePolicy
        self._resume: bytes | None = None      # where the next purge sweep starts
        self.purged_total = {"manifest": 0, "tag": 0}
        self.restored_total = 0

    # -- reading -----------------------------------------------------------------

    def _get(self, batch: Batch | None, key: bytes) -> bytes | None:
        if batch is not None:
            if key in batch.deletes:
                return None
            if key in batch.puts:
                return batch.puts[key]
        return self.meta.get(key)

    def manifest(self, repo: str, digest: str, batch: Batch | None = None
                 ) -> RecycledManifest | None:
        raw = self._get(batch, keys.recycled_manifest(repo, digest))
        return decode(raw, RecycledManifest) if raw is not None else None

    def tag(self, repo: str, tag: str) -> RecycledTag | None:
        raw = self.meta.get(keys.recycled_tag(repo, tag))
        return decode(raw, RecycledTag) if raw is not None else None

    def manifests(self, repo: str) -> list[tuple[str, RecycledManifest]]:
        return [(keys.parse(k, keys.RecycledManifestKey).digest, decode(v, RecycledManifest))
                for k, v in self.meta.scan(keys.recycled_manifest_prefix(repo))]

    def tags(self, repo: str) -> list[tuple[str, RecycledTag]]:
        return [(keys.parse(k, keys.RecycledTagKey).tag, decode(v, RecycledTag))
                for k, v in self.meta.scan(keys.recycled_tag_prefix(repo))]

    def holds(self, repo: str) -> bool:
        return self.meta.has_prefix(keys.recycle_bin_prefix(repo))

    def purge_ns(self, deleted_ns: int) -> int:
        """When an entry deleted at ``deleted_ns`` goes, under the current policy."""
        return deleted_ns + self.policy().days * DAY_NS

    def find_by_tag(self, repo: str, tag: str) -> tuple[str, RecycledManifest] | None:
        """The most recently deleted manifest of the bin that had ``tag``: the
        latest delete by stamp, as last-writer-wins orders writes (origin wall
        clocks may disagree across regions)."""
        found = [(d, e) for d, e in self.manifests(repo) if tag in e.tags]
        return max(found, key=lambda item: stamp_of(item[1])) if found else None

    # -- staging -----------------------------------------------------------------

    def stage_manifest(self, batch: Batch, repo: str, digest: str, record: ManifestRecord,
                       tags: tuple[str, ...], stamp: Stamp, deleted_ns: int) -> None:
        """Keep a deleted manifest (replacing an older delete's entry of it)."""
        self.stage_manifest_end(batch, repo, digest)
        hlc, region, zone = stamp
        batch.put(keys.recycled_manifest(repo, digest), encode(RecycledManifest(
            record, tuple(tags), deleted_ns, hlc, region, zone)))
        for target in record.references:
            batch.put(keys.recycled_ref(target, repo, digest), b"")

    def stage_manifest_end(self, batch: Batch, repo: str, digest: str) -> None:
        """The manifest leaves the bin (restored, pushed again, replaced, purged)."""
        entry = self.manifest(repo, digest, batch)
        if entry is None:
            return
        batch.delete(keys.recycled_manifest(repo, digest))
        for target in entry.record.references:
            batch.delete(keys.recycled_ref(target, repo, digest))

    def stage_tag(self, batch: Batch, repo: str, tag: str, digest: str, stamp: Stamp,
                  deleted_ns: int) -> None:
        hlc, region, zone = stamp
        batch.put(keys.recycled_tag(repo, tag), encode(RecycledTag(digest, deleted_ns, hlc,
                                                                   region, zone)))

    def stage_tag_end(self, batch: Batch, repo: str, tag: str) -> None:
        """The tag leaves the bin (set again, restored, ended by a newer write)."""
        if self._get(batch, keys.recycled_tag(repo, tag)) is not None:
            batch.delete(keys.recycled_tag(repo, tag))

    # -- purge -------------------------------------------------------------------

    def purge(self, limit: int = PURGE_BATCH) -> PurgeReport:
        """One bounded sweep: entries past their purge time go, with their
        references (their blobs become GC candidates as any unreferenced
        blob). Synchronous: one commit, in one event-loop step."""
        now = self._wall_ns()
        batch = Batch()
        looked = purged_manifests = purged_tags = 0
        last = None
        for key, raw in self.meta.scan(keys.RECYCLE_BIN, self._resume):
            if looked == limit:
                break
            looked += 1
            last = key
            match keys.parse(key):
                case keys.RecycledManifestKey(repository=repo, digest=digest):
                    if self.purge_ns(decode(raw, RecycledManifest).deleted_ns) <= now:
                        self.stage_manifest_end(batch, repo, digest)
                        purged_manifests += 1
                case keys.RecycledTagKey():
                    if self.purge_ns(decode(raw, RecycledTag).deleted_ns) <= now:
                        batch.delete(key)
                        purged_tags += 1
        # A sweep that reached the end starts the next one from the beginning.
        self._resume = last if looked == limit else None
        if batch:
            self.meta.commit(batch)
        self.purged_total["manifest"] += purged_manifests
        self.purged_total["tag"] += purged_tags
        return PurgeReport(looked, purged_manifests, purged_tags)
