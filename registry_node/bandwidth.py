"""Bandwidth: a node's blob uploads and downloads shaped to the rate it was
given, one budget per direction shared by every transfer; delayed, never refused.

ACR's older docs gave each tier a download and an upload bandwidth per
replica; ``cluster.control`` turns the spec's ``[limits]`` into each node's
share (``BandwidthSettings``: a zone-redundant replica's budget split evenly
across its zones, since zones are separate processes) and this module only
spends it. What passes through a budget is the bytes of blobs a client sends
or fetches: the HTTP handlers' (``api.blobs``, ``api.uploads``) and the
hand-overs' (``registry_node.handoff``). Replication moves blobs over gRPC and
never meets a budget (the WAN links model its bandwidth); manifests,
listings and errors do not either.

``ByteBudget`` is a token bucket on bytes kept as one number, the time by
which every byte granted so far is paid for (the "virtual finish time" of
GCRA). Invariants:

* from idle, in any span of T seconds at most ``burst + rate * T`` bytes are
  granted, however many transfers ask;
* grants are made in the order they were asked for, each reserved when
  asked: transfers that ask for one ``quantum`` at a time (``shaped``) take
  turns and share the rate evenly;
* nothing is refused: a request waits for its turn;
* a wait cancelled (the node stopping, a hand-over closed) gives its
  reservation back unless another was made behind it. A client gone
  mid-transfer is found at the next write, which fails; its transfer then
  asks for nothing more.

Shaping off costs nothing here: a direction without a rate has no budget
(``Bandwidth.download`` is None) and its callers keep their unshaped path.
The clock and the sleep are injected, so the arithmetic is tested without
waiting.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from .config import BandwidthSettings

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# A transfer asks for this much of the rate at a time: small enough that
# transfers sharing a budget take turns many times a second, large enough that
# a fast budget does not cost a wake-up per few kilobytes.
QUANTUM_S = 0.02
MIN_QUANTUM = 16 * 1024
MAX_QUANTUM = 1 << 20


def bytes_per_s(mbps: float) -> float:
    """Megabits per second (the spec's unit, as the WAN links') in bytes per second."""
    return mbps * 1e6 / 8


class ByteBudget:
    """One direction's rate, shared by every transfer in it."""

    __slots__ = ("rate", "quantum", "burst", "granted", "waited_s", "_paid_until", "_clock",
                 "_sleep")

    def __init__(self, mbps: float, *, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep) -> None:
        if not (mbps > 0 and math.isfinite(mbps)):
            raise ValueError(f"a bandwidth budget needs a positive rate, got {mbps} Mbit/s")
        self.rate = bytes_per_s(mbps)
        self.quantum = int(min(MAX_QUANTUM, max(MIN_QUANTUM, self.rate * QUANTUM_S)))
        self.burst = self.quantum          # what an idle budget lets through at once
        self.granted = 0                   # bytes, for the node's metrics
        self.waited_s = 0.0                # summed over transfers, for the node's metrics
        self._paid_until = -math.inf
        self._clock = clock
        self._sleep = sleep

    async def take(self, n: int) -> None:
        """Return once ``n`` more bytes may pass (at once if the budget has them)."""
        now = self._clock()
        start = max(self._paid_until, now - self.burst / self.rate)
        due = start + n / self.rate
        self._paid_until = due
        if due > now:
            try:
                await self._sleep(due - now)
            except BaseException:
                if self._paid_until == due:      # nobody reserved behind this one
                    self._paid_until = start
                raise
            self.waited_s += due - now
        self.granted += n

    async def shaped(self, pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes | memoryview]:
        """``pieces`` cut into quanta, each yielded once granted (for bytes this
        node writes: a download)."""
        quantum = self.quantum
        async for piece in pieces:
            if len(piece) <= quantum:
                await self.take(len(piece))
                yield piece
                continue
            view = memoryview(piece)
            for start in range(0, len(view), quantum):
                chunk = view[start:start + quantum]
                await self.take(len(chunk))
                yield chunk

    async def paced(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """``chunks`` as they were read, each passed on once granted (for bytes
        this node reads: an upload). The next chunk is not read before, so the
        sender is held back by its connection's flow control."""
        async for chunk in chunks:
            await self.take(len(chunk))
            yield chunk


class Bandwidth:
    """A node's budgets: ``download`` (blob bytes it sends to clients) and
    ``upload`` (blob bytes clients send it), each None where unshaped.

    ``configure`` replaces them while the node runs (the registry's tier
    changed, ``replicator.runtime``): a transfer under way finishes on the
    budget it started with, the next one spends the new. Callers read
    ``download``/``upload`` at the start of each transfer, never keep them."""

    __slots__ = ("download", "upload", "settings", "_clock", "_sleep")

    def __init__(self, settings: BandwidthSettings, *,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self._clock, self._sleep = clock, sleep
        self.download: ByteBudget | None = None
        self.upload: ByteBudget | None = None
        self.settings = BandwidthSettings()
        self.configure(settings)

    @classmethod
    def of(cls, settings: BandwidthSettings, *, clock: Clock = time.monotonic,
           sleep: Sleep = asyncio.sleep) -> Bandwidth:
        return cls(settings, clock=clock, sleep=sleep)

    def configure(self, settings: BandwidthSettings) -> None:
        """Budgets at ``settings``' rates; a direction whose rate is unchanged
        keeps its budget (and what it has granted, for the metrics)."""
        if settings.download_mbps != self.settings.download_mbps:
            self.download = self._budget(settings.download_mbps)
        if settings.upload_mbps != self.settings.upload_mbps:
            self.upload = self._budget(settings.upload_mbps)
        self.settings = settings

    def _budget(self, mbps: float) -> ByteBudget | None:
        return ByteBudget(mbps, clock=self._clock, sleep=self._sleep) if mbps > 0 else None


async def following(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``first``, then ``rest``: a body whose first piece was read ahead."""
    yield first
    async for piece in rest:
        yield piece
