"""Bit rot found, quarantined and mended from a replica.

A blob file whose bytes no longer authenticate (``crypto.BlobCorrupt``: a
flipped bit, a torn sector, ``georeg fault bitrot``) is never served.
Whoever finds it — a client's GET, a peer fetching it from here, a scrub —
hands it to ``BlobRepair.found``, which

1. moves the file aside, into ``quarantine/`` (``BlobStore.quarantine``: only
   while it still fails authentication, so a copy repaired meanwhile stays),
   where an operator can inspect it; the quarantine is bounded;
2. fetches the blob again through ``BlobSources`` — replication's transfer,
   from a peer that residency allows (``replicator.repair``): any replica for
   content that may travel, only this region's other zones for content
   confined here, never anyone else; the bytes are checked against the
   digest before they are stored, and the blob's record is left as it is;
3. records what happened: repaired (from which peer), unrepairable and why,
   or failed (no allowed peer answered in time): a failed repair is tried
   again in the background (``retry_due``), with capped backoff on the
   node's injected clock, and a scrub tries again every quarantined blob
   whose file is not back (one quarantined before a restart, too).

A standalone node has no one to fetch from: its rotten file is quarantined
all the same (so HEAD and GET agree that the blob is not here, and pushing
it again restores it), and the blob is unrepairable.

What a client sees
    A GET that finds the rot before it sent a byte (in the header, or in the
    first MiB: ``api.blobs``) waits for the repair, at most
    ``REQUEST_WAIT_S``, and is answered from the repaired copy. Past the
    wait, ``503 blob being repaired`` with ``Retry-After``; for a blob no
    allowed peer holds, ``404 BLOB_UNKNOWN`` (as HEAD answers: the blob is
    not here) with ``detail.repair: "unrepairable"`` and why — and every
    later GET tries again (a sibling zone may be back), answering at once
    when there is still no allowed peer. Rot found mid-stream, after the
    headers, cuts the connection as before (on the HTTP chain and on a
    hand-over alike: ``api.blobs.Download`` reports it); the repair runs
    anyway, so the client's retry gets the repaired copy.

Invariants
    * One repair per digest at a time (single flight); every repair still
      running is cancelled when the node stops (``close``).
    * A repair changes no record and logs no event: the blob is the same
      blob, its bytes are only fetched again.
    * What happened is kept for the last ``HISTORY`` digests, in memory;
      the quarantine directory is the durable trace (a quarantined digest
      whose file is back was repaired, one whose file is missing was not).
    * A scrub reads at most ``budget_bytes`` per call, at most
      ``rate_bytes_s`` a second (on the injected clock), resuming after the
      last digest it read; it waits for the repairs it started at most
      ``SCRUB_WAIT_S``, less than a caller's read timeout (``georeg verify``).
    * A blob is counted unrepairable once, when it enters that state, not at
      every GET that tries again.

Counted at ``GET /metrics`` (``api.metrics``):
``georeg_blob_quarantined_total``, ``georeg_blob_repairs_total``,
``georeg_blob_unrepairable_total``.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Protocol, TypeVar

import structlog

from .blobstore import BlobStore
from .errors import ErrorCode, Outcome, RegistryError

T = TypeVar("T")
log = structlog.get_logger("georeg.repair")

REQUEST_WAIT_S = 10.0       # a client's GET waits this long for its blob's repair
REPAIR_TIMEOUT_S = 60.0     # one repair's fetch, whoever waits for it
SCRUB_WAIT_S = 20.0         # a scrub waits this long for the repairs it started
RETRY_BASE_S = 5.0          # a failed repair is tried again after this, doubling…
RETRY_CAP_S = 120.0         # …up to this
RETRY_TICK_S = 1.0          # how often the background looks for retries due
HISTORY = 256


class Unrepairable(Exception):
    """No peer that residency allows can provide the blob; the message says why."""


class BlobSources(Protocol):
    async def refetch(self, digest: str) -> str:
        """Fetch ``digest``'s bytes again, from a peer residency allows, into
        its place (its record stays as it is); return that peer's name.
        ``Unrepairable`` when no allowed peer can provide it; any other
        exception: this attempt failed, a later one may not."""


@dataclass
class Repair:
    digest: str
    found_ns: int
    reason: str                     # why the copy was refused
    state: str = "repairing"        # repairing | repaired | unrepairable | failed
    source: str = ""                # the peer the good copy came from
    detail: str = ""                # why unrepairable, or why the attempt failed
    quarantined_to: str = ""
    done_ns: int = 0
    attempt: int = 1                # the how-manieth attempt in a row to repair it
    retry_at: float = 0.0           # failed: when to try again (the injected monotonic clock)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in ("", 0)}


def being_repaired(digest: str, detail: str = "") -> RegistryError:
    return RegistryError(
        ErrorCode.UNAVAILABLE,
        {"digest": str(digest), "reason": "this replica's copy failed its integrity check; it was "
                                     "quarantined and is being fetched again from a replica. "
                                     "Retry" + (f" ({detail})" if detail else "")},
        message="blob being repaired", headers={"Retry-After": "2"}, outcome=Outcome.DEFINITE)


def blob_unrepairable(digest: str, detail: str) -> RegistryError:
    """Not here (as HEAD says: its file is in quarantine), and not coming back
    on its own: a 4xx, so that clients do not retry a state that will not change."""
    return RegistryError(
        ErrorCode.BLOB_UNKNOWN,
        {"digest": str(digest), "repair": "unrepairable",
         "reason": f"this replica's copy failed its integrity check and was quarantined; "
                   f"{detail}. Push the blob again to this region to restore it"},
        outcome=Outcome.DEFINITE)


class BlobRepair:
    def __init__(self, blobs: BlobStore, run_blocking: Callable[[Callable[[], T]], Awaitable[T]],
                 *, recorded: Callable[[str], bool], wall_ns: Callable[[], int] = time.time_ns,
                 monotonic: Callable[[], float] = time.monotonic,
                 timeout_s: float = REPAIR_TIMEOUT_S) -> None:
        self._blobs = blobs
        self._run = run_blocking
        self._recorded = recorded       # whether the node has a record of a digest (blocking)
        self._wall_ns = wall_ns
        self._monotonic = monotonic
        self.timeout_s = timeout_s
        # Set by replication while it runs; None: no peers (a standalone node).
        self.sources: BlobSources | None = None
        self.history: OrderedDict[str, Repair] = OrderedDict()
        self._running: dict[str, asyncio.Task[Repair]] = {}
        self.quarantined_total = 0
        self.repaired_total = 0
        self.unrepairable_total = 0
        # Digests counted unrepairable and not repaired since (at most one per
        # stored blob): counted once, not at every GET that tries again.
        self._unrepairable: set[str] = set()
        self._scrub_after = ""

    # -- finding and mending -----------------------------------------------------------

    def found(self, digest: str, reason: str) -> asyncio.Task[Repair]:
        """``digest``'s file failed authentication (``reason``): quarantine it
        and fetch it again, unless that is under way already."""
        task = self._running.get(digest)
        if task is None:
            task = asyncio.ensure_future(self._repair(digest, reason))
            self._running[digest] = task
            task.add_done_callback(lambda _: self._running.pop(digest, None))
        return task

    async def mend(self, digest: str, reason: str, wait_s: float = REQUEST_WAIT_S) -> None:
        """For a client's request: return once ``digest`` is repaired, or raise
        the ``RegistryError`` that says it is not (yet)."""
        task = self.found(digest, reason)
        try:
            repair = await asyncio.wait_for(asyncio.shield(task), wait_s)
        except TimeoutError:
            raise being_repaired(digest) from None
        if repair.state == "repaired":
            return
        if repair.state == "unrepairable":
            raise blob_unrepairable(digest, repair.detail)
        raise being_repaired(digest, repair.detail)

    def missing_after_rot(self, digest: str) -> bool:
        """Whether ``digest``'s file is missing because it was quarantined here
        (a GET should then try the repair again rather than answer 404)."""
        last = self.history.get(digest)
        if last is not None:
            return last.state != "repaired" or digest in self._running
        return self._blobs.is_quarantined(digest)      # found before a restart

    async def _repair(self, digest: str, reason: str) -> Repair:
        previous = self.history.get(digest)
        repair = Repair(digest, self._wall_ns(), reason)
        if previous is not None and previous.state == "failed":
            repair.attempt = previous.attempt + 1
        self.history[digest] = repair
        self.history.move_to_end(digest)
        while len(self.history) > HISTORY:
            self.history.popitem(last=False)
        try:
            moved = await self._run(lambda: self._blobs.quarantine(
                digest, self._wall_ns(), keep=self._keep_quarantined))
        except OSError as exc:
            return self._done(repair, "failed", f"could not quarantine the file: {exc}")
        if moved is not None:
            self.quarantined_total += 1
            repair.quarantined_to = str(moved)
            log.error("blob_quarantined", digest=digest, reason=reason, to=str(moved))
        elif self._blobs.exists(digest):
            return self._done(repair, "repaired", "the file in place is intact")
        if self.sources is None:
            return self._done(repair, "unrepairable", "this node has no peers to fetch it from")
        try:
            repair.source = await asyncio.wait_for(self.sources.refetch(digest), self.timeout_s)
        except Unrepairable as exc:
            return self._done(repair, "unrepairable", str(exc))
        except TimeoutError:
            return self._done(repair, "failed", f"no copy arrived within {self.timeout_s:g}s")
        except Exception as exc:  # noqa: BLE001 - any failure of one attempt is reported
            return self._done(repair, "failed", str(exc) or type(exc).__name__)
        return self._done(repair, "repaired", "")

    def _done(self, repair: Repair, state: str, detail: str) -> Repair:
        repair.state, repair.detail, repair.done_ns = state, detail, self._wall_ns()
        if state == "repaired":
            self._unrepairable.discard(repair.digest)
            if repair.source:
                self.repaired_total += 1
        elif state == "unrepairable" and repair.digest not in self._unrepairable:
            self._unrepairable.add(repair.digest)
            self.unrepairable_total += 1
        elif state == "failed":
            repair.retry_at = self._monotonic() + min(
                RETRY_CAP_S, RETRY_BASE_S * 2 ** min(repair.attempt - 1, 16))
        (log.info if state == "repaired" else log.error)(
            "blob_repair", digest=repair.digest, state=state, source=repair.source or None,
            detail=detail or None, attempt=repair.attempt)
        return repair

    def _keep_quarantined(self, digest: str) -> bool:
        """Whether a quarantined file is the only trace of a blob not repaired:
        its file is not back and its record is still here (blocking)."""
        return not self._blobs.exists(digest) and self._recorded(digest)

    # -- trying again ------------------------------------------------------------------

    def retry_due(self) -> list[str]:
        """Start again every failed repair whose backoff (on the injected
        clock) has passed; the digests started."""
        now = self._monotonic()
        due = [r.digest for r in self.history.values()
               if r.state == "failed" and r.retry_at <= now and r.digest not in self._running]
        for digest in due:
            self.found(digest, self.history[digest].reason)
        return due

    async def retry_forever(self, tick_s: float = RETRY_TICK_S) -> None:
        """``retry_due`` every ``tick_s`` until cancelled (the node's lifetime)."""
        while True:
            await asyncio.sleep(tick_s)
            self.retry_due()

    async def close(self) -> None:
        """Cancel the repairs still running (the node is stopping) and wait for them."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- scrubbing ---------------------------------------------------------------------

    async def scrub(self, budget_bytes: int, rate_bytes_s: float,
                    wait_s: float = SCRUB_WAIT_S) -> dict:
        """Read and authenticate stored blobs (those with a record), after the
        last one the previous scrub read, until ``budget_bytes`` are read;
        start the repair of what fails, and again of every quarantined blob
        whose file is not back; wait for those repairs at most ``wait_s``.
        A blob the disk cannot read (EIO) is passed over and counted
        (``unreadable``). ``complete``: the pass reached the last blob (the
        next starts from the first)."""
        digests = await self._run(lambda: sorted(d for d in self._blobs.digests()
                                                 if self._recorded(d)))
        start = next((i for i, d in enumerate(digests) if d > self._scrub_after), len(digests))
        began = self._monotonic()
        read = checked = unreadable = 0
        repairs: dict[str, asyncio.Task[Repair]] = {}
        complete = True
        for digest in digests[start:]:
            if read >= budget_bytes:
                complete = False
                break
            self._scrub_after = digest
            try:
                size, why = await self._run(lambda d=digest: self._check(d))
            except FileNotFoundError:
                continue
            except OSError as exc:
                unreadable += 1
                log.warning("scrub_unreadable", digest=digest, error=str(exc))
                continue
            read += size
            checked += 1
            if why is not None:
                repairs[digest] = self.found(digest, why)
            if rate_bytes_s > 0:    # paced: no faster than the rate, on average
                ahead = read / rate_bytes_s - (self._monotonic() - began)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        if complete:
            self._scrub_after = ""
        for digest in await self._run(self._not_back):
            repairs.setdefault(digest, self.found(digest, "its file was quarantined"))
        if repairs:
            await asyncio.wait([asyncio.shield(t) for t in repairs.values()], timeout=wait_s)
        rotten = [t.result().as_dict() if t.done() and not t.cancelled() and t.exception() is None
                  else {"digest": d, "state": "repairing"} for d, t in repairs.items()]
        return {"checked": checked, "bytes": read, "unreadable": unreadable,
                "complete": complete, "rotten": rotten}

    def _check(self, digest: str) -> tuple[int, str | None]:
        size = self._blobs.path(digest).stat().st_size
        return size, self._blobs.verify(digest)

    def _not_back(self) -> list[str]:
        """Quarantined digests whose file is not back, that the node still
        records and that no repair is at (blocking)."""
        return sorted({d for d, _, _, _ in self._blobs.quarantined()
                       if d not in self._running and self._keep_quarantined(d)})

    # -- reporting ---------------------------------------------------------------------

    def report(self) -> dict:
        """What was found and done, for ``georeg verify``. Blocking (it lists
        the quarantine directory)."""
        by_state: dict[str, list[dict]] = {s: [] for s in
                                           ("repaired", "unrepairable", "repairing", "failed")}
        for repair in self.history.values():
            by_state[repair.state].append(repair.as_dict())
        quarantine = [{"digest": digest, "file": str(path), "bytes": size, "moved_ns": moved,
                       "blob_file_back": self._blobs.exists(digest)}
                      for digest, path, size, moved in self._blobs.quarantined()]
        return {**by_state, "quarantine": quarantine,
                "totals": {"quarantined": self.quarantined_total,
                           "repaired": self.repaired_total,
                           "unrepairable": self.unrepairable_total}}
