"""A zone node's reports of what it admitted, to the other zones of its
replica, so the replica's request limits hold across its zones
(``registry_node.throttle``, Zones).

Once this node admits a request, within ``REPORT_INTERVAL_S`` it posts the
counts of everything it admitted meanwhile (``Throttle.take_debits``) to
each sibling's ``POST /georeg/v1/throttle/debits`` (with the cluster's
internal credential), at once and each bounded by ``REPORT_TIMEOUT_S``. A
report a sibling does not take is dropped, not retried: the sibling is down
or cut off, and its buckets matter again only once it is back, by which time
the debt would mostly have refilled. While nothing is throttled (no limits,
no fault) nothing is counted, and it sleeps: an idle node sends nothing and
wakes for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import structlog

from .throttle import Debits, Throttle

log = structlog.get_logger("georeg.throttle")

REPORT_INTERVAL_S = 0.25
REPORT_TIMEOUT_S = 1.0
PATH = "/georeg/v1/throttle/debits"


class ZoneDebits:
    """The reporting task of one zone node: woken by ``Throttle.on_debits`` when
    the node admits something, it sends what was admitted meanwhile to every
    sibling (base URLs in ``siblings``) and counts the reports taken (``sent``)
    and not (``dropped``)."""

    def __init__(self, throttle: Throttle, siblings: Sequence[str], *,
                 headers: dict[str, str], ca_file: Path | None = None,
                 interval_s: float = REPORT_INTERVAL_S) -> None:
        self.throttle = throttle
        self.siblings = tuple(siblings)
        self.headers = headers
        self.ca_file = ca_file
        self.interval_s = interval_s
        self.sent = 0           # reports a sibling took
        self.dropped = 0        # reports a sibling did not take
        self._task: asyncio.Task | None = None
        self._owed = asyncio.Event()

    def start(self) -> None:
        self.throttle.on_debits = self._owed.set
        self._task = asyncio.create_task(self._run(), name="zone-debits")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        context = ssl.create_default_context(cafile=str(self.ca_file)) \
            if self.ca_file is not None else None
        async with aiohttp.ClientSession(
                headers=self.headers, timeout=aiohttp.ClientTimeout(total=REPORT_TIMEOUT_S),
                connector=aiohttp.TCPConnector(ssl=context if context is not None else True)
        ) as session:
            while True:
                await self._owed.wait()
                await asyncio.sleep(self.interval_s)     # what else is admitted meanwhile
                self._owed.clear()
                debits = self.throttle.take_debits()
                if debits is not None:
                    await asyncio.gather(*(self._send(session, sibling, debits)
                                           for sibling in self.siblings))

    async def _send(self, session: aiohttp.ClientSession, sibling: str, debits: Debits) -> None:
        try:
            async with session.post(sibling + PATH, json=debits) as r:
                if r.status == 204:
                    self.sent += 1
                    return
                reason = f"HTTP {r.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
        self.dropped += 1
        log.debug("debits_dropped", sibling=sibling, reason=reason)
