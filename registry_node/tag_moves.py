"""Tag moves: where this node's tags were pointed, read from its event log,
for the control process's base-image triggers (``cluster.control.triggers``).

One hook for every way a tag moves. A tag is moved only by a commit that
logs a ``TAG_SET`` in the same batch: a client's push
(``Registry.put_manifest``), a copy replication applies
(``Replica.apply_tag``), a restore from the recycle bin. So the log, read
after a cursor, holds every move this node took, local or arriving, in the
order it took them, and nothing lives only in memory: a reader that went
away resumes from its cursor. A move is served only while the tag still
points where it moved it (``_holds``): one superseded since is followed by
the later one in the log, and a replicated tag set a newer delete made a
tombstone points nowhere. A reader whose cursor is below the log's floor
(truncated since) is told so (``TagMoves.floor``), and one whose cursor is
past the log's head (a log that restarted lower: the node's data wiped, a
replica re-created under its name) is told so at once (``TagMoves.reset``,
its ``next`` the head); either must work out what it missed some other way.

Moves are served at commit, before the batch's fsync and its zone quorum:
a trigger may fire for a push that is then answered 503. That is harmless
(the run it starts resolves the tag again).

Waiting is event-driven: a reader asking after the head waits for the next
commit (``MetadataStore.on_commit``), bounded by its own timeout, never a
poll of the registry.

No aiohttp here (``api.tag_moves`` is the route).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict, dataclass

from . import keys
from .metastore import MetadataStore
from .records import EventKind, TagRecord, decode

# Log events read per answer (moves are a subset of them).
READ_LIMIT = 1000
MAX_WAIT_S = 30.0


@dataclass(frozen=True, slots=True)
class TagMove:
    seq: int
    repository: str
    tag: str
    digest: str


@dataclass(frozen=True, slots=True)
class TagMoves:
    moves: list[TagMove]
    next: int               # the cursor to ask after next time
    floor: int              # the log holds events after this only
    reset: bool = False     # the cursor was past the head: this log is not the one it read

    def as_dict(self) -> dict:
        return {"moves": [asdict(m) for m in self.moves], "next": self.next, "floor": self.floor,
                "reset": self.reset}


class TagMoveLog:
    """The tag moves of one node's log, and a wait for the next commit."""

    def __init__(self, meta: MetadataStore) -> None:
        self.meta = meta
        self._grew = asyncio.Event()
        self._closed = False
        meta.on_commit(self._committed)

    def close(self) -> None:
        """The node is shutting down: every waiting reader answers now."""
        self._closed = True
        self._committed(0)

    def _committed(self, _seq: int) -> None:
        # A fresh event per generation: every reader waiting on the old one wakes.
        grew, self._grew = self._grew, asyncio.Event()
        grew.set()

    def read(self, after: int | None, limit: int = READ_LIMIT) -> TagMoves:
        """The moves logged after ``after`` (None: none, the cursor at the head)."""
        if after is None or after > self.meta.last_seq:
            return TagMoves([], self.meta.last_seq, self.meta.log_floor,
                            reset=after is not None)
        events = self.meta.read_log(max(after, self.meta.log_floor), limit)
        moves = [TagMove(e.seq, e.repository, e.tag, e.digest) for e in events
                 if e.kind is EventKind.TAG_SET and self._holds(e.repository, e.tag, e.digest)]
        return TagMoves(moves, events[-1].seq if events else max(after, self.meta.log_floor),
                        self.meta.log_floor)

    def _holds(self, repository: str, tag: str, digest: str) -> bool:
        """The tag points at ``digest`` now. A replicated tag set that a newer
        manifest delete turned into a tombstone is logged as a ``TAG_SET`` too,
        and a move superseded since is followed by the later one: neither is a
        move a trigger could build on."""
        raw = self.meta.get(keys.tag(repository, tag))
        return raw is not None and decode(raw, TagRecord).digest == digest

    async def wait(self, after: int | None, timeout_s: float) -> TagMoves:
        """As ``read``, but while no tag moved after ``after``, wait up to
        ``timeout_s`` for commits that move one (the cursor advances past those
        that do not)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(timeout_s, 0.0), MAX_WAIT_S)
        while True:                     # bounded by the deadline
            grew = self._grew
            found = self.read(after)
            left = deadline - loop.time()
            if (found.moves or after is None or found.reset or left <= 0 or self._closed
                    or found.next < self.meta.last_seq):
                return found            # (more to read than one answer holds: answer now)
            after = found.next
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(grew.wait(), left)
