"""Zone quorum: a write to a zone-redundant region is acknowledged only once
it is durable in as many of its zones as the plan's write quorum says (two of
three), this node's included. Which zones there are and how many must confirm
come from the node's view (``topology.ZoneRedundancy``), never from which peers
happen to be connected or listed.

The other zones subscribe to this node's log like any peer and acknowledge
what they have applied (and synced). A write commits here, then waits until
one other zone has acknowledged its sequence number. With no other zone
connected, writes are refused before anything happens: a 503 whose outcome is
*definite* (``registry_node.errors``); reads go on. If no connected zone
confirms in time (or the last one goes away meanwhile), the client gets a 503
whose outcome is *indefinite*: the write is stored here and replicates when a
zone returns. A client resolves it by retrying, which is idempotent for every
registry write, or by reading it back.

A zone whose cursor fell below this node's log floor is repaired by a resync
(registers by anti-entropy, not the events' blobs) and reads on from the head:
its acknowledgements never count for a write in the range it skipped
(``truncated``).
"""

from __future__ import annotations

import asyncio

from registry_node.errors import ErrorCode, Outcome, RegistryError


class ZoneQuorum:
    def __init__(self, me: str, zone_peers: list[str], *, write_quorum: int,
                 timeout_s: float = 10.0) -> None:
        self.me = me
        self.zone_peers = set(zone_peers)        # the region's other zones (labels)
        self.needed = write_quorum - 1           # confirmations besides this node
        self.timeout_s = timeout_s
        self._connections: dict[str, int] = {}
        self._acked: dict[str, int] = {}
        # Per peer: up to here its log was not streamed to it but repaired by a
        # resync (registers only), so its acknowledgements do not vouch for it.
        self._unstreamed: dict[str, int] = {}
        self._changed = asyncio.Event()

    # -- fed by the replication service --------------------------------------------

    def connected(self, peer: str) -> None:
        if peer in self.zone_peers:
            self._connections[peer] = self._connections.get(peer, 0) + 1

    def disconnected(self, peer: str) -> None:
        if peer in self._connections:
            self._connections[peer] -= 1
            if self._connections[peer] <= 0:
                del self._connections[peer]
            self._changed.set()

    def acked(self, peer: str, seq: int) -> None:
        if peer in self.zone_peers and seq > self._acked.get(peer, 0):
            self._acked[peer] = seq
            self._changed.set()

    def truncated(self, peer: str, through: int) -> None:
        """``peer``'s cursor was below the log floor: it resyncs by anti-entropy
        up to ``through``, which does not bring those events' blobs."""
        if peer in self.zone_peers and through > self._unstreamed.get(peer, 0):
            self._unstreamed[peer] = through

    # -- WriteQuorum -------------------------------------------------------------

    @property
    def live_peers(self) -> set[str]:
        return set(self._connections)

    @property
    def writable(self) -> bool:
        return len(self._connections) >= self.needed

    def check_writable(self) -> None:
        if not self.writable:
            zones = len(self.zone_peers) + 1
            up = len(self._connections) + 1
            raise RegistryError(
                ErrorCode.UNAVAILABLE,
                {"reason": f"only {up} of {zones} zones of this region are reachable from "
                           f"{self.me}; writes need {self.needed + 1}. Reads keep working; retry "
                           "writes when a zone returns, or push through another region",
                 "zones": zones, "zones_reachable": up, "zones_needed": self.needed + 1},
                message="write quorum unavailable", headers={"Retry-After": "5"},
                outcome=Outcome.DEFINITE)

    def _confirmations(self, seq: int) -> int:
        return sum(1 for peer, acked in self._acked.items()
                   if acked >= seq and peer in self._connections
                   and seq > self._unstreamed.get(peer, 0))

    async def wait_durable(self, seq: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while self._confirmations(seq) < self.needed:
            remaining = deadline - loop.time()
            if remaining <= 0 or not self.writable:
                raise RegistryError(
                    ErrorCode.UNAVAILABLE,
                    {"reason": f"the write is stored in {self.me} but no other zone confirmed "
                               f"it within {self.timeout_s:g}s; it will replicate when a zone "
                               "returns — retrying is safe",
                     "stored_in": self.me, "zones_confirmed": 1 + self._confirmations(seq),
                     "zones_needed": self.needed + 1},
                    message="write not confirmed by a second zone", headers={"Retry-After": "5"},
                    outcome=Outcome.INDEFINITE)
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass
