"""Per-image replication status — what ACR's users ask for and ACR lacks.

``GET /georeg/v1/replication/status?repository=R&reference=TAG_OR_DIGEST`` on
any node answers, for every replica in the cluster: present (with when it
arrived and its lag behind the origin's acknowledgement), pending, excluded
by residency, failed (with the reason), or unreachable — and, for a tag, what
the tag points at on each replica while a re-push converges.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from registry_node.errors import ErrorCode, RegistryError
from registry_node.reference import is_digest, validate_name, validate_tag

from .completion import iso_time
from .errors import ReplicationError
from .wire.v1 import replication_pb2 as pb

STATUS_TIMEOUT_S = 2.0


def _iso(ns: int) -> str | None:
    return iso_time(ns) if ns else None


class ImageStatus:
    def __init__(self, runtime) -> None:  # runtime: replicator.runtime.Replication
        self.runtime = runtime

    async def handle(self, request: web.Request) -> web.Response:
        repository = request.query.get("repository", "")
        reference = request.query.get("reference", "")
        validate_name(repository)
        if not reference:
            raise RegistryError(ErrorCode.MANIFEST_INVALID, "the reference parameter is required",
                                message="reference missing")
        if not is_digest(reference):
            validate_tag(reference)
        return web.json_response(await self.status(repository, reference))

    async def _failures_by_digest(self, repository: str, digest: str, replies: list) -> None:
        """A replica without the tag may have tried to fetch the image and failed
        for good; such failures are recorded by digest, so ask for them by digest."""
        rt = self.runtime
        clients = {c.peer.name: c for c in rt.clients}

        async def recheck(reply: pb.ImageStatusReply, name: str) -> None:
            request = pb.ImageStatusRequest(repository=repository, digest=digest)
            try:
                again = await (rt.service.GetImageStatus(request, None) if name == rt.view.name
                               else clients[name].image_status_ref(repository, digest, "",
                                                                   STATUS_TIMEOUT_S))
            except ReplicationError:
                return
            reply.failure = again.failure

        await asyncio.gather(*(recheck(r, name) for name, _, _, r in replies
                               if isinstance(r, pb.ImageStatusReply) and not r.present
                               and not r.failure and r.digest != digest))

    async def status(self, repository: str, reference: str) -> dict:
        rt = self.runtime
        digest_query = reference if is_digest(reference) else ""
        tag_query = "" if digest_query else reference
        local = rt.service
        me = await local.GetImageStatus(pb.ImageStatusRequest(
            repository=repository, digest=digest_query, tag=tag_query,
            requester=pb.NodeRef(region=rt.view.region, zone=rt.view.zone)), None)

        async def ask(client):
            try:
                return client, await client.image_status_ref(repository, digest_query, tag_query,
                                                             STATUS_TIMEOUT_S)
            except ReplicationError as exc:
                return client, exc

        answers = await asyncio.gather(*(ask(c) for c in rt.clients))
        replies = [(rt.view.name, rt.view.region, rt.view.zone, me)]
        replies += [(c.peer.name, c.peer.region, c.peer.zone, r) for c, r in answers]
        # The image in question: what the origin (or, failing that, anyone) has.
        present = [r for *_, r in replies if isinstance(r, pb.ImageStatusReply) and r.present]
        if tag_query:
            # The tag's newest value is the one last-writer-wins keeps everywhere:
            # a replica still on an older push is stale, not the other way round.
            origin = max(present, key=lambda r: (r.tag_hlc, r.tag_origin_region,
                                                 r.tag_origin_zone)) if present else None
        else:
            origin = min(present, key=lambda r: r.origin_acked_ns or 1 << 62) if present else None
        digest = digest_query or (origin.digest if origin else "")
        if tag_query and digest:
            await self._failures_by_digest(repository, digest, replies)
        origin_region = origin.origin_region if origin else ""
        replicas = []
        for name, region, zone, reply in replies:
            entry: dict = {"name": name, "region": region, "zone": zone}
            if isinstance(reply, ReplicationError):
                entry.update(state="unreachable", reason=reply.reason)
            elif origin_region and not rt.residency.allows(origin_region, repository, region):
                entry.update(state="excluded", reason=f"residency: content from {origin_region} "
                                                      f"stays in {origin_region}")
            elif reply.present and reply.digest == digest:
                # Pullable by tag once both the manifest and the tag are here.
                arrived = max(reply.arrived_ns, reply.tag_arrived_ns if tag_query else 0)
                acked = reply.tag_acked_ns if tag_query and reply.tag_acked_ns else reply.origin_acked_ns
                lag = (arrived - acked) / 1e6 if acked else None
                entry.update(state="present", arrived_at=_iso(arrived),
                             lag_ms=round(max(lag, 0.0), 2) if lag is not None else None)
            elif reply.failure:
                entry.update(state="failed", reason=reply.failure)
            elif reply.digest and reply.digest != digest:
                entry.update(state="stale", digest=reply.digest,
                             reason="the tag points elsewhere here until the newer push arrives")
            else:
                entry.update(state="pending")
            replicas.append(entry)
        allowed = [r for r in replicas if r["state"] != "excluded"]
        return {
            "repository": repository, "reference": reference, "digest": digest or None,
            "origin": {"region": origin_region or None,
                       "acked_at": _iso(origin.origin_acked_ns) if origin else None},
            "replicas": replicas,
            "complete": bool(digest) and all(r["state"] == "present" for r in allowed),
        }
