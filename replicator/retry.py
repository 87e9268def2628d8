"""The one retry helper: capped exponential backoff with jitter, an injected
random source and sleep, and a bounded number of attempts or a deadline.

Only ``ReplicationError`` is retried, and only when it is not permanent;
anything else is a bug and propagates at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import ReplicationError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Backoff:
    base_s: float = 0.05
    cap_s: float = 5.0
    multiplier: float = 2.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Equal jitter: half the exponential step is fixed, half is random, so
        retries spread out but never collapse to zero."""
        step = min(self.cap_s, self.base_s * self.multiplier ** min(attempt, 32))
        return step / 2 + rng.uniform(0, step / 2)


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff | None = None,
    attempts: int = 5,
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    on_retry: Callable[[ReplicationError, int, float], None] | None = None,
) -> T:
    """Run ``operation`` until it succeeds, fails permanently, or ``attempts`` run out."""
    rng = rng or random.Random()
    backoff = backoff or Backoff()
    attempt = 0
    while True:
        try:
            return await operation()
        except ReplicationError as exc:
            attempt += 1
            if not exc.retryable or attempt >= attempts:
                raise
            delay = backoff.delay(attempt - 1, rng)
            if on_retry is not None:
                on_retry(exc, attempt, delay)
            await sleep(delay)
