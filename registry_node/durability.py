"""When is a write durable enough to acknowledge? The registry asks this seam.

A standalone node answers "once it is committed here" (the commit is already
synced). A zone-redundant node (``replicator.quorum``) answers "once a second
zone has applied it", and refuses writes up front when no second zone is
reachable. The registry calls ``check_writable`` before any side effect and
``wait_durable`` after its commit, and knows nothing else about zones.
"""

from __future__ import annotations

from typing import Protocol


class WriteQuorum(Protocol):
    def check_writable(self) -> None:
        """Raise ``RegistryError(UNAVAILABLE)`` if a write cannot reach its quorum now;
        its outcome is definite (called before any side effect)."""

    async def wait_durable(self, seq: int) -> None:
        """Return once the commit with log sequence ``seq`` is durable on the quorum;
        raise ``RegistryError(UNAVAILABLE)`` if that does not happen in time, its
        outcome indefinite (the write is committed here and may yet replicate)."""


class LocalDurability:
    """A single node: the synced commit is the whole story."""

    def check_writable(self) -> None:
        return None

    async def wait_durable(self, seq: int) -> None:
        return None
