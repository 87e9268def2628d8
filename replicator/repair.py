"""Where a node's rotten blob is fetched again from
(``registry_node.blob_repair.BlobSources``).

A blob that failed authentication here, and was quarantined, is fetched again
through ``Transfer`` — the one transfer algorithm, which checks the bytes
against the digest before storing them — from a peer that residency allows,
and from no one else:

* a peer is asked for the blob once, as content of the first repository
  that holds it here whose content residency lets into the peer's region
  (from any region whose pushes put it there, ``Replica.content_regions``):
  a peer elsewhere cannot hold it, and would refuse to hand it out anyway
  (``ReplicationService.FetchBlob``). So content confined to this region is
  asked only of this region's other zones, never of another region;
* this region's other zones first (no WAN, and the copy the write quorum
  made), then the peers whose streams are up, then the rest; one peer at a
  time, so the report names the one the good copy came from.

Unrepairable (``Unrepairable``, said to the client and in ``georeg verify``)
when no peer residency allows exists, or every one that answered refused for
good (it lacks the blob, or its copy is rotten too: ``DATA_LOSS``). A peer
that could not be reached makes the attempt fail instead, to be tried again.
"""

from __future__ import annotations

import structlog

from registry_node.blob_repair import Unrepairable

from .errors import Outcome, ReplicationError
from .peers import PeerClient

log = structlog.get_logger("georeg.repair")


class PeerRefetch:
    def __init__(self, runtime) -> None:
        self.runtime = runtime       # replicator.runtime.Replication

    def _ordered(self) -> list[PeerClient]:
        region = self.runtime.replica.registry.identity.region
        connected = {s.peer.name for s in self.runtime.subscriptions if s.connected}
        return sorted(self.runtime.clients, key=lambda c: (c.peer.region != region,
                                                           c.name not in connected, c.name))

    async def refetch(self, digest: str) -> str:
        runtime = self.runtime
        replica, residency = runtime.replica, runtime.residency
        region = replica.registry.identity.region
        repositories = replica.blob_repositories(digest)
        if not repositories:
            raise Unrepairable("no repository here holds it, so no peer would hand it out")
        origins = {repository: replica.content_regions(repository, digest)
                   for repository in repositories}
        asked = 0
        transient: list[str] = []
        refused: list[str] = []
        for client in self._ordered():
            repository = next((r for r in repositories if any(
                residency.allows(o, r, client.peer.region) for o in origins[r])), None)
            if repository is None:
                continue
            asked += 1
            try:
                await runtime.transfer.ensure_blob(repository, digest, [client.hurried()])
            except ReplicationError as exc:
                (refused if exc.outcome is Outcome.PERMANENT else transient).append(
                    f"{client.name}: {exc.reason}")
                continue
            if replica.blob_in_place(digest):
                return client.name
        if transient:
            raise ReplicationError(Outcome.DEFINITE, "; ".join(transient + refused))
        if not asked:
            confined = sorted({o for r in repositories for o in origins[r]
                               if residency.confined(o, r)})
            if confined:
                raise Unrepairable(f"its content is confined to {', '.join(confined)} by "
                                   f"residency, and no other replica in {region} exists to "
                                   f"hold a copy; nothing was asked of other regions")
            raise Unrepairable("no replica residency allows exists to hold a copy")
        raise Unrepairable("no replica residency allows has a good copy (" +
                           "; ".join(refused) + ")")
