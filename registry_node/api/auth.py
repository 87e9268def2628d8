"""Authentication and authorization on the node's registry routes (an aiohttp
middleware over ``registry_node.auth.gate``).

Guarded: ``/v2`` and everything below it, ACR's ``/acr/`` routes, and the
node routes a registry client may ask about one repository, which that
repository names in the query (``REPOSITORY_QUERIES``: per-image replication
status, ``?repository=R``): they need ``pull`` on it, as a manifest read
does. Not here: the node's internal ``/georeg/v1`` routes and ``/metrics`` (they take
the cluster's internal credential, ``api.internal``, which also admits the
cluster's own requests to these routes without this gate), and ``/oauth2/``
(the token server authenticates its own requests).

What each route needs is the reference registry's rule, decided from the
method and the route before any handler runs (so no answer depends on whether
a repository exists): ``GET``/``HEAD`` pull; ``POST``/``PUT``/``PATCH`` pull and
push; ``DELETE`` delete; a cross-repository mount also pull on ``from``;
``/v2/_catalog`` ``registry:catalog:*``; ``/v2/`` (and any unknown path
below it) only a valid principal; a route of ``REPOSITORY_QUERIES`` pull on
the repository its query names (without one, or with a name that is no
repository's, only a valid principal: the handler then refuses the name). Deliberately not ACR's rule that tag
listing needs ``metadata_read``: skopeo asks for ``pull`` before listing
tags and treats a 403 as final, so that rule would break ``skopeo
list-tags`` with any credential.

A blob download may present, instead of credentials, the grant a node put in
the ``Location`` of a redirect (``api.redirects``, ``auth.grants``): with no
``Authorization`` header, a query that carries one admits a ``GET`` or
``HEAD`` of the blob it names on the node that signed it, until it expires.
Any other grant (tampered, expired, another blob, repository or node, another
method or route) is refused as a bad credential is, ``401`` with the
challenge; it is never passed over for anonymous access.

Refusals: ``401 UNAUTHORIZED`` or ``403 DENIED`` with the distribution spec's
body (``detail``: the access records needed, or lacking) and one
``WWW-Authenticate: Bearer`` challenge whose ``realm`` is the token endpoint
on the scheme and host the client used (a client that follows it stays on
the same endpoint: global, regional or node), ``service`` the login server,
``scope`` what the request needs, and ``error`` per RFC 6750 when a token was
sent (``invalid_token``) or lacked access (``insufficient_scope``). A known
principal lacking access gets 403, which is what lets oras-py widen a
pull-only token during a push.

Header lines over 8190 bytes (a 64 KiB ``Authorization``) never reach this
middleware: aiohttp's parser answers them ``400 Bad Request`` (plain text) and
closes the connection; ``registry_node.logs`` keeps the header's bytes out of
the log line aiohttp writes about it.
"""

from __future__ import annotations

import re

import structlog
from aiohttp import web

from ..auth.gate import Gate, Principal, Refusal
from ..auth.grants import GrantRefused, carries_grant
from ..auth.scopes import (
    DELETE,
    PULL,
    PUSH,
    Scope,
    catalog,
    format_scopes,
    parse_scopes,
    repository,
)
from ..errors import ErrorCode, RegistryError
from .internal import INTERNAL
from .redirects import BLOB_REDIRECTS, GRANTED

GATE: web.AppKey[Gate] = web.AppKey("gate", Gate)
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal", Principal)
log = structlog.get_logger("georeg.auth")

_ACTIONS_BY_METHOD = {"GET": (PULL,), "HEAD": (PULL,), "POST": (PULL, PUSH), "PUT": (PULL, PUSH),
                      "PATCH": (PULL, PUSH), "DELETE": (DELETE,)}
_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
UNAUTHORIZED_MESSAGE = "authentication required"
# Node routes (not OCI's) that read what one repository holds, named by their
# ``repository`` query parameter. They reveal content state, so they need
# what a pull needs; endpoints forward them (``cluster.routing.policy``).
REPOSITORY_QUERIES = frozenset({"/georeg/v1/replication/status"})
_BLOB = "/v2/{name}/blobs/{digest}"


def guarded(path: str) -> bool:
    return path == "/v2" or path.startswith(("/v2/", "/acr/")) or path in REPOSITORY_QUERIES


def needed_access(request: web.Request) -> list[Scope]:
    """What ``request`` needs (an empty list: only a valid principal)."""
    if request.path in REPOSITORY_QUERIES:
        named = request.query.get("repository", "")
        return parse_scopes([repository(named, PULL).format()]) if named else []
    name = request.match_info.get("name")
    if name is not None:
        actions = _ACTIONS_BY_METHOD.get(request.method, (PULL, PUSH))
        needed = [repository(name, *actions)]
        source = request.query.get("from")
        if request.method == "POST" and source and "mount" in request.query:
            needed.append(repository(source, PULL))
        return parse_scopes(s.format() for s in needed)      # one entry per repository
    resource = request.match_info.route.resource
    if resource is not None and resource.canonical == "/v2/_catalog":
        return [catalog()]
    return []


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def realm(request: web.Request) -> str:
    """The token endpoint on the address the client used."""
    host = request.host
    if not _HOST.fullmatch(host):
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        host = f"{sock[0]}:{sock[1]}" if sock else "localhost"
    return f"{request.scheme}://{host}/oauth2/token"


def challenge(request: web.Request, service: str, needed: list[Scope] | tuple[Scope, ...],
              error: str | None = None) -> str:
    params = [("realm", realm(request)), ("service", service)]
    scope = format_scopes(needed)
    if scope:
        params.append(("scope", scope))
    if error:
        params.append(("error", error))
    return "Bearer " + ",".join(f"{k}={_quoted(v)}" for k, v in params)


def refusal_error(request: web.Request, gate: Gate, refusal: Refusal) -> RegistryError:
    headers = {"WWW-Authenticate": challenge(request, gate.service, refusal.needed, refusal.error)}
    if refusal.status == 403:
        lacking = [record for s in refusal.lacking for record in s.record()]
        return RegistryError(ErrorCode.DENIED, lacking, headers=headers)
    records = [record for s in refusal.needed for record in s.record()]
    return RegistryError(ErrorCode.UNAUTHORIZED, records, message=UNAUTHORIZED_MESSAGE,
                         headers=headers)


def pull_check(gate: Gate):
    """Whether an ``Authorization`` header (None: none sent) may pull from a
    repository, as this middleware would decide a blob GET: for the node's
    hand-over path (``registry_node.handoff``), which serves blobs outside
    aiohttp and declines, to this chain, whatever it may not serve."""
    def admits(authorization: str | None, name: str) -> bool:
        try:
            gate.admit(authorization, [repository(name, PULL)])
        except Refusal:
            return False
        return True

    return admits


@web.middleware
async def authenticate(request: web.Request, handler) -> web.StreamResponse:
    if not guarded(request.path) or request.get(INTERNAL):
        return await handler(request)
    gate = request.app[GATE]
    needed = needed_access(request)
    authorization = request.headers.get("Authorization")
    if authorization is None and carries_grant(request.query):
        _admit_grant(request, gate, needed)
        return await handler(request)
    try:
        admitted = gate.admit(authorization, needed)
    except Refusal as refusal:
        # The reason names what was wrong, never a credential.
        log.info("access_refused", method=request.method, path=request.path,
                 status=refusal.status, reason=refusal.reason)
        raise refusal_error(request, gate, refusal) from None
    request[PRINCIPAL] = admitted.principal
    return await handler(request)


def _admit_grant(request: web.Request, gate: Gate, needed: list[Scope]) -> None:
    """Admit a request that presents a blob grant (``api.redirects``) instead of
    credentials, or raise the 401 a bad credential gets: a grant admits a
    ``GET`` or ``HEAD`` of the one blob it names, on the node that signed it,
    until it expires, and nothing else."""
    redirects = request.app.get(BLOB_REDIRECTS)
    resource = request.match_info.route.resource
    try:
        if redirects is None or resource is None or resource.canonical != _BLOB:
            raise GrantRefused("a blob grant admits only a download of its blob")
        redirects.grants.check(request.method, request.match_info["name"],
                               request.match_info["digest"], request.query)
    except GrantRefused as refused:
        log.info("access_refused", method=request.method, path=request.path, status=401,
                 reason=str(refused))
        raise refusal_error(request, gate, Refusal.unauthenticated(
            needed, str(refused), "invalid_token")) from None
    request[GRANTED] = True
