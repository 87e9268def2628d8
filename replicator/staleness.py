"""Bounded staleness through peers (``registry_node.staleness.PeerContent``).

When a client names content this node lacks — a manifest pulled right after
its push elsewhere, layers that went to another replica before this manifest
PUT — the node asks its connected peers and fetches it through ``Transfer``,
with the stamps the peer holds, instead of answering 404 or
MANIFEST_BLOB_UNKNOWN. Residency still holds: a peer never hands out content
its region must keep.
"""

from __future__ import annotations

import asyncio

import structlog

from registry_node.records import Event, EventKind
from registry_node.reference import is_digest

from .errors import ReplicationError
from .peers import PeerClient

log = structlog.get_logger("georeg.replication")


class PeerRescue:
    def __init__(self, runtime, *, blob_timeout_s: float = 60.0,
                 lookup_timeout_s: float = 2.0) -> None:
        self.runtime = runtime       # replicator.runtime.Replication
        self.blob_timeout_s = blob_timeout_s
        self.lookup_timeout_s = lookup_timeout_s
        self.rescued = 0

    def _sources(self) -> list[PeerClient]:
        """Peers whose subscription is up first: they are the ones answering now.
        All are asked hurried (``PeerClient.hurried``): a client waits on this,
        and a peer that has just gone down must cost a refused connect, not a
        wait for its channel. (A manifest PUT that needed a rescue right after a
        zone went down waited 40-60 s: four attempts of ten seconds each on that
        zone's channel.)"""
        connected = {s.peer.name for s in self.runtime.subscriptions if s.connected}
        clients = sorted(self.runtime.clients, key=lambda c: c.name not in connected)
        return [c.hurried() for c in clients]

    async def fetch_blobs(self, repository: str, digests: list[str]) -> set[str]:
        transfer = self.runtime.transfer
        sources = self._sources()
        if transfer is None or not sources:
            return set()

        async def one(digest: str) -> str | None:
            try:
                await asyncio.wait_for(transfer.ensure_blob(repository, digest, sources),
                                       self.blob_timeout_s)
                return digest
            except (ReplicationError, TimeoutError) as exc:
                log.info("rescue_failed", repository=repository, digest=digest, error=str(exc))
                return None

        found = {d for d in await asyncio.gather(*(one(d) for d in digests)) if d}
        self.rescued += len(found)
        return found

    async def fetch_manifest(self, repository: str, reference: str) -> bool:
        transfer = self.runtime.transfer
        sources = self._sources()
        if transfer is None or not sources:
            return False
        try:
            if is_digest(reference):
                await asyncio.wait_for(transfer.ensure_manifest(repository, reference, sources),
                                       self.blob_timeout_s)
                return self.runtime.replica.manifest_record(repository, reference) is not None
            return await self._fetch_tag(repository, reference, sources)
        except (ReplicationError, TimeoutError) as exc:
            log.info("rescue_failed", repository=repository, reference=reference, error=str(exc))
            return False

    async def _fetch_tag(self, repository: str, tag: str, sources: list[PeerClient]) -> bool:
        async def ask(client: PeerClient):
            try:
                return client, await client.image_status_ref(repository, "", tag,
                                                             self.lookup_timeout_s)
            except ReplicationError:
                return client, None

        answers = [(c, r) for c, r in await asyncio.gather(*(ask(c) for c in sources))
                   if r is not None and r.present and r.tag_hlc]
        if not answers:
            return False
        # The newest register wins, exactly as replication would decide.
        client, reply = max(answers, key=lambda a: (a[1].tag_hlc, a[1].tag_origin_region,
                                                    a[1].tag_origin_zone))
        event = Event(kind=EventKind.TAG_SET, repository=repository, tag=tag, digest=reply.digest,
                      media_type=reply.media_type, hlc=reply.tag_hlc,
                      origin_region=reply.tag_origin_region, origin_zone=reply.tag_origin_zone,
                      acked_ns=reply.tag_acked_ns)
        ordered = [client, *(c for c in sources if c is not client)]
        await asyncio.wait_for(self.runtime.transfer.apply(event, ordered), self.blob_timeout_s)
        found = self.runtime.replica.resolve_tag(repository, tag) is not None
        if found:
            self.rescued += 1
            log.info("rescued", repository=repository, tag=tag, source=client.name)
        return found
