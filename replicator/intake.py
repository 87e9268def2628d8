"""One WAN copy of each event per zone-redundant region: which zone of this
node's region reads a remote peer's log whole across the WAN for the region,
and how its sibling zones know how far it has.

Owns: the record, at every node, of how far each peer's log was applied
before this node's own log reached a given sequence (``RelayedCursors``), and
a subscription's link to the sibling zone it takes a peer's events from
(``Relay``). Nothing here talks to the network; ``replicator.subscription``
and ``replicator.service`` carry it.

**The mechanism.** A node's log holds everything it applied from others, and
its region's other zones read that log anyway (zone quorum needs the stream).
So of a zone-redundant region only one zone, ``topology.event_receiver``'s
pick for the peer, reads a remote peer's log whole; the others subscribe to
that peer *lean* (``SubscribeStart.lean``): it sends them, of its events,
only its own blob events, each naming the zone it gives the blob to for the
region (``wan_receiver``: an image's layers still cross into different zones,
and every zone waits on the zone the peer chose), with the bytes to that zone;
and every batch's ``last_seq`` (the peer's head). They take the rest from the receiving zone's log, over the
region's own links. Each event then crosses the WAN into the region once per
remote node that sends it, not once per zone.

**The cursor a lean subscriber keeps and reports** (``EventBatch.relayed``).
With each batch to a sibling zone a node says, per peer whose log it reads,
the cursor it had applied that peer's log to before its own log reached the
batch's ``last_seq``: every change those events made, or a newer one, is in
its log at or below that point (applying commits in the same write batch as
its log entry; an event that changed nothing found its state, or a newer one,
already logged). A sibling that has applied the batch therefore holds that
peer's log up to that cursor, and only then takes it as its own cursor for
the peer: it persists it, reports it to the peer (whose log and tombstones
wait for it: ``replicator.retention``) and resumes from it. So a lean zone
neither holds the peer's truncation back (its cursor follows the receiving
zone's, one intra-region hop behind) nor releases anything it does not hold;
and a tombstone the peer collects once every reader read past it, the lean
zone has, or reads from the receiving zone, whose own copy waits for it.

**Where "already logged" is not strictly true: a lean zone takes the
receiving zone's outcome.** Two kinds of event leave nothing in the
receiving zone's log, so nothing a lean zone reads: a manifest delete that
loses there (``Replica.apply_manifest_delete``: renewed since, or an index
there still needs it; the renewal or the index is logged, and a lean zone
reaching it converges to the same state), and an event that failed
permanently there (recorded as a replication failure at the receiving zone
and skipped, ``Subscription._apply_one``, so its cursor moves past it). A
lean zone is vouched past both; where the failure was local to the
receiving zone, only anti-entropy (or reading the peer whole) brings the
content to the lean zone.

**Fallback.** A lean subscription ends, and reads the peer whole, as soon as
its stream from the receiving zone is down, or when that zone's cursor for the
peer has not moved for ``RELAY_STALL_S`` while the peer's head is ahead of it
(stalled, cut off from the peer, catching up slower than it should). It goes
back to lean once the receiving zone is up again and vouches for at least as
much as it read itself. Going back and forth re-reads at most what was
between the two cursors; applying twice is a no-op.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from registry_node.records import Cursor

# How many advances of each peer's cursor are remembered: a sibling further
# behind this node's log than that learns nothing until it catches up.
HISTORY = 4096
# How often a lean subscription checks its relay, and how long the relay's
# cursor may stand still while the peer's head is ahead before the
# subscription reads the peer whole itself.
RELAY_CHECK_S = 0.5
RELAY_STALL_S = 5.0
# How long a subscription reads whole before it may go lean again.
RELAY_RETURN_S = 2.0


class RelayedCursors:
    """Per peer, the cursors this node applied its log to, each with this
    node's log head at the time (see the module docstring)."""

    def __init__(self, head: Callable[[], int]) -> None:
        self._head = head
        self._history: dict[str, deque[tuple[int, Cursor]]] = {}
        self._waiting: list[asyncio.Future[None]] = []

    def advanced(self, peer: str, cursor: Cursor) -> None:
        """This node has applied ``peer``'s log up to ``cursor`` (all of it)."""
        history = self._history.setdefault(peer, deque(maxlen=HISTORY))
        if history and history[-1][1] == cursor:
            return
        history.append((self._head(), cursor))
        waiting, self._waiting = self._waiting, []
        for future in waiting:
            if not future.done():
                future.set_result(None)

    def forget(self, peer: str) -> None:
        self._history.pop(peer, None)

    def at(self, seq: int) -> dict[str, Cursor]:
        """Per peer, the furthest cursor applied before this log reached ``seq``."""
        out = {}
        for peer, history in self._history.items():
            for head, cursor in reversed(history):
                if head <= seq:
                    out[peer] = cursor
                    break
        return out

    def next_change(self) -> asyncio.Future[None]:
        """A future done once a cursor advances after this call."""
        future = asyncio.get_running_loop().create_future()
        self._waiting = [f for f in self._waiting if not f.done()]
        self._waiting.append(future)
        return future


@dataclass(frozen=True, slots=True)
class Relay:
    """For a subscription to a remote peer: the sibling zone that reads that
    peer's log whole for the region, and whether this node's stream from that
    zone is up."""

    zone: str
    up: Callable[[], bool]
