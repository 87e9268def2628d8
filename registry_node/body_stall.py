"""The seam where a grey failure stalls a node's blob downloads on purpose
(``georeg fault pause NODE --stall-bodies``).

While ``BodyStall`` is set, every blob ``GET`` this node answers — relayed
through an endpoint, handed over by one (``registry_node.handoff``) or asked
of the node directly — sends its status line and headers and then holds its
body until the fault heals: the connection stays open, no byte follows, as
from a node whose storage hangs under the read. Everything else answers as
usual (``/v2/``, the node's health route, manifests, ``HEAD`` of a blob,
uploads, replication), so health checks keep passing and routing keeps
sending clients here: that is the fault. A download already past its head
when the fault is set finishes; one held when it heals carries on with its
body, whole and in order.

Set at run time through ``PUT /georeg/v1/faults/stall`` (``api.grey``); it
lives in the node's memory, so the fault controller sends it again to a node
it restarts.
"""

from __future__ import annotations

import asyncio


class BodyStall:
    def __init__(self) -> None:
        self._released = asyncio.Event()
        self._released.set()

    @property
    def stalled(self) -> bool:
        return not self._released.is_set()

    def set(self, stalled: bool) -> None:
        if stalled:
            self._released.clear()
        else:
            self._released.set()

    async def held(self) -> None:
        """Return once bodies may flow (at once unless stalled)."""
        await self._released.wait()

    def as_dict(self) -> dict:
        return {"bodies": self.stalled}
