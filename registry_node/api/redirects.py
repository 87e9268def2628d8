"""The node's side of ``blob_downloads = "redirect"`` on a cluster with auth:
a blob ``GET`` that a routing endpoint marked (``REDIRECT_HEADER``) is
answered, once the access chain has admitted it and when the blob is here,
with ``307`` to this node's own address for the same blob, the URL carrying a
grant (``registry_node.auth.grants``) in place of the credentials the client
will not send there.

Invariants:

* The redirect is decided after authentication and authorization
  (``api.auth``), so a marked request gets nothing its credentials would not
  already read; an anonymous one gets the usual 401 challenge.
* A request admitted by a grant is never redirected again: a grant cannot be
  renewed into a later one.
* The Location is this node: the scheme it serves (https with TLS), the host
  it listens on (for a node listening on every address, the host the client
  reached the endpoint at, as the endpoint's own redirects use), the port of
  the connection the request came in on. Only this node can check the grant.
* A blob this node does not hold is not redirected: the request is served as
  any GET (with what that answers), never a redirect to a 404.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlencode

from aiohttp import web

from ..auth.grants import REDIRECT_HEADER, BlobGrants
from ..config import listens_everywhere
from ..errors import RegistryError
from ..reference import Digest
from .common import empty, registry

# Set by the access chain on a request a blob grant admitted.
GRANTED: web.RequestKey[bool] = web.RequestKey("granted", bool)


class BlobRedirects:
    """What a node needs to redirect blob downloads to itself: its grants and
    the host it listens on."""

    def __init__(self, grants: BlobGrants, host: str, scheme: str) -> None:
        self.grants = grants
        self.host = host
        self.scheme = scheme

    def origin(self, request: web.Request) -> str:
        host = self.host
        if listens_everywhere(host):
            # The endpoint appends its mark after the client's headers: the last
            # one is the endpoint's, whatever a client sent of its own.
            marks = request.headers.getall(REDIRECT_HEADER, [])
            host = _ip_literal(marks[-1] if marks else "") or _local_ip(request)
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{_local_port(request)}"


BLOB_REDIRECTS: web.AppKey[BlobRedirects] = web.AppKey("blob_redirects", BlobRedirects)


def redirect(request: web.Request, repo: str, digest: Digest) -> web.Response | None:
    """The 307 for a marked blob GET, or None to serve it as any GET."""
    redirects = request.app.get(BLOB_REDIRECTS)
    if redirects is None or request.get(GRANTED) or REDIRECT_HEADER not in request.headers:
        return None
    reg = registry(request)
    try:
        reg.stat_blob(repo, digest)
    except RegistryError:           # not here: the GET answers it
        return None
    if not reg.blobs.exists(digest):
        return None
    query = urlencode(redirects.grants.issue(repo, str(digest)))
    location = f"{redirects.origin(request)}/v2/{repo}/blobs/{digest}?{query}"
    return empty(307, {"Location": location})


def _ip_literal(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return ""


def _local_ip(request: web.Request) -> str:
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    return sock[0] if sock else "127.0.0.1"


def _local_port(request: web.Request) -> int:
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    return sock[1] if sock else 0
