"""Wakes log subscribers when the node commits: the push half of pull-based
subscriptions. Subscribers wait for "anything after sequence N"; the metadata
store's commit listener resolves them. Nothing is queued here: the log itself
is the queue, so a subscriber that falls behind simply reads more of it."""

from __future__ import annotations

import asyncio

from registry_node.metastore import MetadataStore


class LogFeed:
    def __init__(self, meta: MetadataStore) -> None:
        self._meta = meta
        self._changed = asyncio.Event()
        meta.on_commit(self._on_commit)

    def _on_commit(self, seq: int) -> None:
        self._changed.set()

    @property
    def last_seq(self) -> int:
        return self._meta.last_seq

    async def wait_beyond(self, seq: int, timeout: float) -> bool:
        """True once the log holds an event after ``seq``; False on timeout."""
        while self._meta.last_seq <= seq:
            self._changed.clear()
            if self._meta.last_seq > seq:
                break
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                return self._meta.last_seq > seq
        return True
