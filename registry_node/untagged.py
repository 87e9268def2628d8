"""Retention of untagged manifests (ACR's retention policy,
``az acr config retention``): a manifest untagged after the policy was
enabled is deleted once it has stayed untagged for the policy's days.

Where "untagged since" comes from. Every node keeps a note per manifest that
may be untagged (``keys.untagged``: ``untag\\0<region>\\0<repo>\\0<digest>`` →
``UntaggedNote``: the time on this node's clock, and the HLC stamp of the
change), written in the same batch as the change that may have
made it so (``Registry.stage_untagged``): a tag moving off it or ending
(locally or replicated), the index that held it going, the subject of a
referrer going; never a push (ACR starts the clock at an untag; a multi-arch
build pushes its platforms by digest before the index). A tag set on it deletes
the note. Every such change overwrites the note, so it holds the last time
something left the manifest. A note is a hint, never a decision: the sweep
checks the manifest itself before acting, and drops a note whose manifest is
tagged, held by an index, or a referrer of a present subject (the change that
ends that holding writes a new note). A note costs one small key per
manifest at most, removed with the manifest.

Who decides. The sweep runs on one node of each region, asked by the control
process (``cluster.control.lifecycle``), and decides only for the manifests
first pushed in that region (``ManifestRecord.residency_region``; ``origins``
below): each manifest has exactly one deciding region, which holds it
whatever residency keeps back (content confined to Brazil South never
reaches the home region, so the home region could not decide for it). The
decision travels as a manifest delete (``Registry.delete_manifest``: its
tombstone, its event, replication) stamped with the note's stamp, the
untag's, not the sweep's: a tag or a push stamped after the untag wins
against it everywhere by the rules of any delete, even one the deciding
region never sees (a confined region's); a replica refuses it where it holds
a lock or a tag on the manifest, of any stamp (``Replica._kept_from_retention``). A manifest whose register is newer
than the note (the same bytes pushed again) gets a new note instead.

What is kept. A manifest is deleted only when all of these hold, checked in
the event-loop step that starts its delete:

* the policy is enabled and its note is from after the policy was enabled
  (``RetentionPolicy.enabled_ns``; older notes are dropped: ACR applies the
  policy only to manifests untagged after it was enabled);
* the note is older than ``days`` and than ``settle_s`` (a push's manifest and
  tag travel as two events: the tag on its way gets time to arrive, whatever
  ``days`` says — ``days = 0`` deletes at the first sweep after that);
* no tag names it, no index of its repository holds it, and it is not a
  referrer whose subject is present (a signature or SBOM goes with its image,
  not on its own);
* neither it nor its repository is delete- or write-locked, nor a tag on it
  (``Locks.check_delete_manifest``; ACR: "the retention policy doesn't apply").
  A locked manifest keeps its note and is looked at again on later sweeps.

A sweep looks at most ``limit`` notes, resuming where the last one stopped
and wrapping around, so it is bounded and every note is reached in turn.
No HTTP here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import structlog

from . import keys
from .errors import RegistryError
from .metastore import Batch
from .records import (
    RETENTION_REQUEST,
    ManifestRecord,
    TagRecord,
    UntaggedNote,
    decode,
    encode,
    stamp_of,
)
from .registry import Registry

log = structlog.get_logger("georeg.untagged")

MIN_DAYS, MAX_DAYS, DEFAULT_DAYS = 0, 365, 7      # ACR's range and default
DAY_NS = 86_400 * 10**9
SWEEP_LIMIT = 500          # notes looked at per sweep
SETTLE_S = 60.0            # the least time a manifest stays untagged before it goes
SWEEP_BUDGET_S = 20.0      # a sweep's time (the control process waits 30 s for its answer)


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    enabled: bool = False
    days: int = DEFAULT_DAYS
    enabled_ns: int = 0          # when it was (last) enabled


def check_days(days: object) -> int:
    """``days`` if it is a whole number in ACR's range, else ``ValueError`` saying so."""
    if isinstance(days, bool) or not isinstance(days, int) or not MIN_DAYS <= days <= MAX_DAYS:
        raise ValueError(f"retention days is a whole number from {MIN_DAYS} to {MAX_DAYS}, "
                         f"not {days!r}"[:120])
    return days


@dataclass
class SweepReport:
    enabled: bool
    examined: int = 0
    deleted: list[tuple[str, str]] = field(default_factory=list)    # (repository, digest)
    locked: list[tuple[str, str]] = field(default_factory=list)
    not_due: int = 0
    dropped: int = 0             # notes of manifests tagged, held, gone or untagged before
    failed: int = 0              # deletes refused for another reason (quorum); tried again later
    partial: bool = False        # stopped at its time budget; the next sweep goes on

    def as_dict(self) -> dict:
        return {"enabled": self.enabled, "examined": self.examined,
                "deleted": [{"repository": r, "digest": d} for r, d in self.deleted],
                "locked": [{"repository": r, "digest": d} for r, d in self.locked],
                "notDue": self.not_due, "dropped": self.dropped, "failed": self.failed,
                "partial": self.partial}


class UntaggedRetention:
    """The sweep of one node (see the module docstring). ``policy`` reads the
    registry's policy as this node holds it."""

    def __init__(self, registry: Registry, policy: Callable[[], RetentionPolicy]) -> None:
        self.registry = registry
        self.policy = policy
        self.deleted_total = 0          # manifests this node's sweeps deleted (metrics)
        self._resume: bytes | None = None
        self._lock = asyncio.Lock()     # one sweep at a time

    async def sweep(self, origins: Iterable[str], *, limit: int = SWEEP_LIMIT,
                    settle_s: float = SETTLE_S, budget_s: float = SWEEP_BUDGET_S) -> SweepReport:
        """Delete what is due among the next ``limit`` notes whose manifest was
        first pushed in one of ``origins``, for at most ``budget_s`` (then the
        report is ``partial`` and the next sweep resumes where it stopped)."""
        async with self._lock:
            return await self._sweep(frozenset(origins), limit, settle_s, budget_s)

    async def _sweep(self, origins: frozenset[str], limit: int, settle_s: float,
                     budget_s: float) -> SweepReport:
        policy = self.policy()
        report = SweepReport(policy.enabled)
        if not policy.enabled:
            return report
        registry, meta = self.registry, self.registry.meta
        due_before = registry.wall_ns() - max(policy.days * DAY_NS, int(settle_s * 1e9))
        notes = []
        for key, raw in self._notes(origins, self._resume):
            if len(notes) == limit:
                break
            notes.append((key, raw))
        # A short page is the end of the notes: the next sweep starts over.
        self._resume = notes[-1][0] if len(notes) == limit else None
        tagged: dict[str, set[str]] = {}       # per repository, built once a sweep
        drops: dict[bytes, bytes] = {}
        renotes: dict[bytes, tuple[bytes, bytes]] = {}    # key → (as read, rebased)
        deadline = registry.monotonic() + budget_s
        for i, (key, raw) in enumerate(notes):
            if i and registry.monotonic() > deadline:
                # Out of time (its caller waits 30 s): the next sweep goes on
                # here. One note at least per sweep, so sweeps always advance.
                report.partial = True
                self._resume = notes[i - 1][0]
                break
            report.examined += 1
            if meta.get(key) != raw:
                continue                      # changed since it was read: next sweep
            note = keys.parse(key, keys.UntaggedKey)
            repo, digest = note.repository, note.digest
            since = decode(raw, UntaggedNote)
            verdict = self._verdict(repo, digest, since, policy, due_before, tagged)
            if isinstance(verdict, UntaggedNote):
                renotes[key] = (raw, encode(verdict))
                report.not_due += 1
            elif verdict == "drop":
                drops[key] = raw
                report.dropped += 1
            elif verdict == "not due":
                report.not_due += 1
            elif verdict == "locked":
                report.locked.append((repo, digest))
            elif verdict == "delete":
                # No await between the checks above and the delete's own
                # checks and staging: nothing can change the manifest between.
                try:
                    await registry.delete_manifest(repo, digest, request=RETENTION_REQUEST, stamp=since.hlc)
                except RegistryError as exc:
                    report.failed += 1
                    log.warning("retention_delete_failed", repository=repo, digest=digest,
                                error=str(exc.detail or exc.message)[:200])
                    continue
                report.deleted.append((repo, digest))
                self.deleted_total += 1
        # Drop only notes still as read: one written since is a newer change.
        batch = Batch()
        for key, raw in drops.items():
            if meta.get(key) == raw:
                batch.delete(key)
        for key, (raw, rebased) in renotes.items():
            if meta.get(key) == raw:
                batch.put(key, rebased)
        if batch:
            meta.commit(batch)
        if report.deleted:
            log.info("retention", deleted=len(report.deleted), locked=len(report.locked),
                     examined=report.examined)
        return report

    def _notes(self, origins: frozenset[str], after: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        """The notes of ``origins``' manifests in key order, after ``after``:
        only those (each region's sweep reads its own), so other regions'
        notes never use up a sweep's ``limit``."""
        resume = keys.parse(after, keys.UntaggedKey).region if after is not None else None
        for origin in sorted(origins):
            prefix = keys.untagged_prefix(origin)
            if resume is None or resume == origin:
                yield from self.registry.meta.scan(prefix, after if resume is not None else None)
                resume = None
            elif origin > resume:
                yield from self.registry.meta.scan(prefix)

    def _verdict(self, repo: str, digest: str, since: UntaggedNote, policy: RetentionPolicy,
                 due_before: int, tagged: dict[str, set[str]]) -> str | UntaggedNote:
        """What to do with the note ``since``: "drop", "not due", "locked",
        "delete", or a note to write instead (the
        manifest's register was renewed after the note, by a push of the same
        bytes: a delete with the note's stamp would lose to it elsewhere, so
        the clock restarts now, stamped after that)."""
        meta = self.registry.meta
        raw = meta.get(keys.manifest(repo, digest))
        if raw is None or since.since_ns < policy.enabled_ns:
            return "drop"
        record = decode(raw, ManifestRecord)
        if repo not in tagged:
            tagged[repo] = {decode(v, TagRecord).digest for _, v in meta.scan(keys.tag_prefix(repo))}
        if digest in tagged[repo] or meta.has_prefix(keys.ref_repo_prefix(digest, repo)) \
                or (record.subject and meta.get(keys.manifest(repo, record.subject)) is not None):
            return "drop"
        identity = self.registry.identity
        if stamp_of(record) >= (since.hlc, identity.region, identity.zone):
            return UntaggedNote(self.registry.wall_ns(), record.hlc + 1)
        if since.since_ns > due_before:
            return "not due"
        try:
            self.registry.locks.check_delete_manifest(repo, digest)
        except RegistryError:
            return "locked"
        return "delete"
