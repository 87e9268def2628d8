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

A held download costs its socket and the blob's open file, and nothing more:
it reads no byte of the body until released (``Download.pieces`` is not
started), it lets go as soon as its client hangs up (``held`` checks the
connection every ``GONE_CHECK_S``: a client that gives up and retries does not
pile up downloads here), and a node told to stop releases every held body
(the app's ``on_shutdown``), so a graceful stop sends them and exits instead
of waiting out its grace.

Set at run time through ``PUT /georeg/v1/faults/stall`` (``api.grey``); it
lives in the node's memory, so the fault controller sends it again to a node
it restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

# How often a held download looks whether its client is still there.
GONE_CHECK_S = 0.25


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

    async def held(self, gone: Callable[[], bool]) -> bool:
        """Wait until bodies may flow (True, at once unless stalled), or until
        ``gone()`` says the client has hung up (False: send it nothing)."""
        while not self._released.is_set():     # ends at heal, at a stop, or when gone
            if gone():
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), GONE_CHECK_S)
        return True

    def as_dict(self) -> dict:
        return {"bodies": self.stalled}
