"""Blob grants: the short-lived, self-contained permission a node puts in the
``Location`` of a blob download it redirects (ACR answers a blob pull with a
307 to a storage URL carrying a SAS; this is georeg's SAS).

A client that followed a redirect to another address sends no credentials
there (it keeps them to the host it logged in to), so the redirect itself
must carry the permission. The node that authenticated the request signs, in
the query of the URL it sends the client to, the one thing that request may
do: read (``GET``/``HEAD``) one digest in one repository, until ``expires``
(Unix seconds). The Location is that same node, so only the node that signed
checks: the key is an HMAC-SHA256 key drawn at random per node process and
kept in memory only. A restart forgets it, which invalidates the redirects
outstanding (the client retries through the endpoint and gets a new one); no
key is ever written anywhere or shared.

Lifetime: ``GRANT_TTL_S`` (five minutes). A client follows a 307 at once, so
the grant only has to outlive the queue of downloads a client was handed at
one go, on one host, checked by the clock that signed it (no skew); a URL
that leaks (a shell history, a proxy's log) is worthless soon after. It is
checked when a request begins; a download longer than the lifetime finishes.

Invariants:

* A grant names its repository, digest and expiry inside the MAC, with the
  allowed methods and a domain label; nothing else in the URL is trusted.
* Checking never raises anything but ``GrantRefused`` on any input (a
  signature that is not base64, an expiry that is not a number, non-ASCII), so
  a bad grant is a 401, never a 500; the comparison is constant-time.
* No grant is logged: the node's access log records paths, never queries.
* Like a SAS URL, a grant is not revoked: one handed out before its token was
  deleted or its role removed reads its one blob until it expires (at most
  ``GRANT_TTL_S``). Any client that may pull a blob can get one, by marking its
  own request; it gets nothing its credentials do not already read.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping

# The request header by which a routing endpoint asks a node to answer a blob
# GET with a redirect carrying a grant instead of the bytes. Its value is the
# host the client reached the endpoint at (used for the Location only by a node
# listening on every address). Not a credential: the node authenticates the
# request first, so a client sending it itself gets a grant for what it may
# read anyway.
REDIRECT_HEADER = "X-Georeg-Redirect"
# The query parameters of a grant.
EXPIRES = "expires"
SIGNATURE = "signature"
GRANT_PARAMETERS = (EXPIRES, SIGNATURE)
GRANT_TTL_S = 300
# What a grant permits: reading the blob, nothing that changes anything.
READS = frozenset({"GET", "HEAD"})
_LABEL = "georeg blob grant v1: GET HEAD"
_EXPIRES = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[A-Za-z0-9_-]{43}")      # 32 bytes, base64url without padding


class GrantRefused(Exception):
    """A grant that does not admit the request; the message says why (never the grant)."""


class BlobGrants:
    """Signs and checks blob grants for one node process. ``now`` is the
    node's wall clock (Unix seconds), injected so a test moves past expiry."""

    def __init__(self, now: Callable[[], float] = time.time, ttl_s: int = GRANT_TTL_S,
                 key: bytes | None = None) -> None:
        self.now = now
        self.ttl_s = ttl_s
        self._key = key if key is not None else secrets.token_bytes(32)

    def issue(self, repository: str, digest: str) -> dict[str, str]:
        """The query parameters that let their bearer read ``digest`` in
        ``repository`` on this node until ``ttl_s`` from now."""
        expires = str(int(self.now()) + self.ttl_s)
        return {EXPIRES: expires, SIGNATURE: self._sign(repository, digest, expires)}

    def check(self, method: str, repository: str, digest: str,
              query: Mapping[str, str]) -> None:
        """Admit ``method`` on ``repository``'s ``digest`` with the grant in
        ``query``, or raise ``GrantRefused``."""
        if method not in READS:
            raise GrantRefused("a blob grant admits only GET and HEAD")
        expires = query.get(EXPIRES, "")
        signature = query.get(SIGNATURE, "")
        if not _EXPIRES.fullmatch(expires) or not _SIGNATURE.fullmatch(signature):
            raise GrantRefused("malformed blob grant")
        expected = self._sign(repository, digest, expires)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise GrantRefused("blob grant not valid for this blob on this node")
        if self.now() >= int(expires):
            raise GrantRefused("blob grant expired")

    def _sign(self, repository: str, digest: str, expires: str) -> str:
        # A JSON array: unambiguous whatever the fields hold.
        message = json.dumps([_LABEL, repository, digest, expires]).encode()
        mac = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def carries_grant(query: Mapping[str, str]) -> bool:
    """Whether a request's query presents a grant (well-formed or not)."""
    return EXPIRES in query or SIGNATURE in query
