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

A held download costs its socket, the blob's open file and a look at its
connection every ``GONE_CHECK_S``: it reads no byte of the body until released
(``Download.pieces`` is not started), and it lets go as soon as its client
hangs up, so a client that gives up and retries does not pile up downloads
here. One sweeper task per node, running only while something is held, makes
those looks for every held download at once (a task per download per look cost
0.24 ms of CPU per held download per second; docs/faults.md has the figure
now). A node told to stop releases every held body and takes no new stall
(``close``, from the app's ``on_shutdown``), so a graceful stop sends them and
exits instead of waiting out its grace.

Set at run time through ``PUT /georeg/v1/faults/stall`` (``api.grey``); it
lives in the node's memory, so the fault controller sends it again to a node
it restarts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# How often the sweeper looks whether each held download's client is still there.
GONE_CHECK_S = 0.25


class BodyStall:
    def __init__(self) -> None:
        self._stalled = False
        self._closed = False                # stopping: no new stall
        # Each held download's future (True: go on; False: its client is gone)
        # and how to tell that its client hung up.
        self._held: dict[asyncio.Future[bool], Callable[[], bool]] = {}
        self._sweeper: asyncio.Task | None = None

    @property
    def stalled(self) -> bool:
        return self._stalled

    def set(self, stalled: bool) -> None:
        if stalled and self._closed:
            return
        self._stalled = stalled
        if not stalled:
            for future in self._held:
                if not future.done():
                    future.set_result(True)
            self._held.clear()
            if self._sweeper is not None:
                self._sweeper.cancel()
                self._sweeper = None

    def close(self) -> None:
        """The node stops: every held body goes, and a stall asked for during
        the shutdown grace (a flapping fault's on phase) is ignored."""
        self.set(False)
        self._closed = True

    async def held(self, gone: Callable[[], bool]) -> bool:
        """Wait until bodies may flow (True, at once unless stalled), or until
        ``gone()`` says the client has hung up (False: send it nothing)."""
        if not self._stalled:
            return True
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._held[future] = gone
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="body-stall-sweeper")
        try:
            return await future
        finally:
            self._held.pop(future, None)

    async def _sweep(self) -> None:
        """Every ``GONE_CHECK_S`` while anything is held (the loop's bound: it
        ends when nothing is), let go of the downloads whose clients are gone."""
        try:
            while self._held:
                await asyncio.sleep(GONE_CHECK_S)
                for future, gone in list(self._held.items()):
                    if not future.done() and gone():
                        future.set_result(False)
                        del self._held[future]
        finally:
            if self._sweeper is asyncio.current_task():
                self._sweeper = None

    def as_dict(self) -> dict:
        return {"bodies": self.stalled}
