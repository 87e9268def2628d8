"""What a node does when a client names content it does not have yet, but a
peer does: the seam for bounded staleness.

Two of ACR's sharpest edges are "pull in one region right after a push in
another: 404" (Azure/acr #880) and "layers pushed through one replica,
manifest through another: MANIFEST_BLOB_UNKNOWN" (Azure/acr #588). A node with
a ``PeerContent`` asks its peers before answering either; a standalone node
has none and answers as the spec says. Fetched content arrives through the
same replication path as any other, with its original stamps.

The node asks before every 404 for a manifest, and most of those are for
manifests that exist nowhere (a client probes a tag before pushing it), so
a ``PeerContent`` must say "no" about as fast as its peers that answer do: a
peer that has stopped answering may not hold every 404 up
(``replicator.staleness`` says how, and what that may cost).
"""

from __future__ import annotations

from typing import Protocol


class PeerContent(Protocol):
    async def fetch_blobs(self, repository: str, digests: list[str]) -> set[str]:
        """Bring these blobs' bytes here from a peer where they are in
        ``repository``; returns the digests that arrived."""

    async def fetch_manifest(self, repository: str, reference: str) -> bool:
        """Bring a manifest (by digest, or a tag and what it points at) and
        everything it needs here from a peer; True if it arrived."""
