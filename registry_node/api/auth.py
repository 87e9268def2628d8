"""Authentication and authorization on the node's registry routes (an aiohttp
middleware over ``registry_node.auth.gate``).

Guarded: ``/v2`` and everything below it, ACR's ``/acr/`` routes, and the
node routes a registry client may ask about one repository, which that
repository names in the query (``REPOSITORY_QUERIES``: per-image replication
status, ``?repository=R``): they need ``pull`` on it, as a manifest read
does. Not by the gate: the node's internal ``/georeg/v1`` routes and
``/metrics`` (they take the cluster's internal credential, ``api.internal``,
which also admits the cluster's own requests to registry routes without the
gate; on a node with auth this one middleware checks it, with
``api.internal``'s rules, before the gate), and ``/oauth2/`` (the token server
authenticates its own requests). A blob download may present a grant
(``api.redirects``) instead of credentials: the node's own redirect.

The gate remembers a bearer token's admissions (``Gate._recalled``), so a
client reusing its token pays for a dictionary lookup, not a check.

What each route needs is the reference registry's rule, decided from the
method and the route before any handler runs (so no answer depends on whether
a repository exists): ``GET``/``HEAD`` pull; ``POST``/``PUT``/``PATCH`` pull and
push; ``DELETE`` delete; a cross-repository mount also pull on ``from``; ACR's
``/acr/v1/<name>…`` metadata routes ``metadata_read`` to read, ``metadata_write``
to change attributes, ``delete`` to delete (ACR's scope-map actions);
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
from aiohttp.typedefs import Middleware

from ..auth.gate import Gate, Refusal
from ..auth.grants import GrantRefused, carries_grant
from ..auth.scopes import (
    DELETE,
    METADATA_READ,
    METADATA_WRITE,
    PULL,
    PUSH,
    REPOSITORY,
    Scope,
    catalog,
    format_scopes,
    parse_scopes,
    repository,
)
from ..errors import ErrorCode, RegistryError
from ..throttle import READ, Throttle, Throttled
from .internal import carries_credential, internal_route, refusal
from .redirects import BLOB_REDIRECTS, GRANTED
from .throttling import TOKEN_SERVER, UNAUTHENTICATED, throttle_request, too_many_requests

GATE: web.AppKey[Gate] = web.AppKey("gate", Gate)
log = structlog.get_logger("georeg.auth")

_PULL_PUSH = frozenset({PULL, PUSH})
_ACTIONS_BY_METHOD = {"GET": frozenset({PULL}), "HEAD": frozenset({PULL}), "POST": _PULL_PUSH,
                      "PUT": _PULL_PUSH, "PATCH": _PULL_PUSH, "DELETE": frozenset({DELETE})}
# ACR's metadata routes (``/acr/v1/<name>…``, ``api.metadata``): reading
# properties and listings is ``metadata/read``, changing attributes
# ``metadata/write``, deleting ``content/delete``.
_ACR_ACTIONS_BY_METHOD = {"GET": frozenset({METADATA_READ}), "HEAD": frozenset({METADATA_READ}),
                          "PATCH": frozenset({METADATA_WRITE}), "DELETE": frozenset({DELETE})}
# The recycle bin (soft delete, ``api.metadata``), by route: ACR keeps it behind
# permissions of its own (``deleted/read``, ``deleted/restore/action``) that its
# pull and push roles lack. Listing it needs ``delete`` (who may delete may see
# what was deleted); a restore is a push that undoes a delete: both.
_RECYCLE_BIN_ACTIONS = {"/acr/v1/{name}/_deleted": frozenset({DELETE}),
                        "/acr/v1/{name}/_deleted/{reference}": frozenset({PUSH, DELETE})}
_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
UNAUTHORIZED_MESSAGE = "authentication required"
# Node routes (not OCI's) that read what one repository holds, named by their
# ``repository`` query parameter. They reveal content state, so they need
# what a pull needs; endpoints forward them (``cluster.routing.policy``).
REPOSITORY_QUERIES = frozenset({"/georeg/v1/replication/status"})
_BLOB = "/v2/{name}/blobs/{digest}"


def guarded(path: str) -> bool:
    return path.startswith(("/v2/", "/acr/")) or path == "/v2" or path in REPOSITORY_QUERIES


def needed_access(request: web.Request) -> tuple[Scope, ...]:
    """What ``request`` needs (empty: only a valid principal), one entry per
    repository. Runs on every guarded request, so the common shape (one
    repository, a name with no whitespace) builds its one ``Scope`` directly;
    anything else goes the long way through the scope grammar
    (``parse_scopes``), which drops what is not a scope: a name with
    whitespace never reaches a challenge header."""
    if request.path in REPOSITORY_QUERIES:
        named = request.query.get("repository", "")
        return tuple(parse_scopes([repository(named, PULL).format()])) if named else ()
    name = request.match_info.get("name")
    if name is not None:
        method = request.method
        if request.path.startswith("/acr/"):
            resource = request.match_info.route.resource
            actions = _RECYCLE_BIN_ACTIONS.get(resource.canonical if resource else "") \
                or _ACR_ACTIONS_BY_METHOD.get(method, frozenset({METADATA_WRITE}))
        else:
            actions = _ACTIONS_BY_METHOD.get(method, _PULL_PUSH)
        mount = method == "POST" and "mount" in request.query and request.query.get("from")
        if not mount and name.isprintable() and " " not in name:
            return (Scope(REPOSITORY, name, actions),)
        needed = [Scope(REPOSITORY, name, actions)]
        if mount:
            needed.append(repository(mount, PULL))
        return tuple(parse_scopes(s.format() for s in needed))
    resource = request.match_info.route.resource
    if resource is not None and resource.canonical == "/v2/_catalog":
        return (catalog(),)
    return ()


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
    """Who an ``Authorization`` header (None: none sent) is, if it may pull from
    a repository, as this middleware would decide a blob GET (None: it may
    not): for the node's hand-over path (``registry_node.handoff``), which
    serves blobs outside aiohttp, throttles them on that identity, and
    declines, to this chain, whatever it may not serve."""
    def admits(authorization: str | None, name: str) -> str | None:
        try:
            admitted = gate.admit(authorization, (repository(name, PULL),))
        except Refusal:
            return None
        return admitted.principal.subject or UNAUTHENTICATED

    return admits


def authenticate(internal: bytes | None, throttle: Throttle) -> Middleware:
    """The access middleware of a node with auth on. It also does
    ``api.internal``'s work: a request carrying the internal credential
    (``internal``, the expected header) skips the gate, an internal route
    without it is refused — every internal route, when the node was given no
    internal credential; and throttling's (``api.throttling``), between the
    gate's authentication and its authorization: a known principal past its
    limits gets 429, whether or not it may do what it asks. One middleware
    for all three, and the gate looked up once, because this runs on every
    request and each layer of the chain costs every request."""
    gate: Gate | None = None        # app[GATE] exists once the node's storage is open

    @web.middleware
    async def authenticate(request: web.Request, handler) -> web.StreamResponse:
        nonlocal gate
        authorization = request.headers.get("Authorization")
        if internal is not None and carries_credential(authorization, internal):
            return await handler(request)
        path = request.path
        if not guarded(path):
            # Without an internal credential a node with auth has no caller for
            # its internal routes (the registry configuration among them): they
            # answer no one rather than anyone.
            if internal_route(path):
                raise refusal()
            if throttle.active and path.startswith(TOKEN_SERVER):
                _throttle_login(throttle)
            return await handler(request)
        if gate is None:
            gate = request.app[GATE]
        needed = needed_access(request)
        if authorization is None and carries_grant(request.query):
            _admit_grant(request, gate, needed)
            return await handler(request)
        try:
            admitted = gate.admit(authorization, needed)
        except Refusal as refused:
            if refused.principal is not None and throttle.active:
                throttle_request(request, throttle, refused.principal.subject or UNAUTHENTICATED)
            # The reason names what was wrong, never a credential.
            log.info("access_refused", method=request.method, path=path,
                     status=refused.status, reason=refused.reason)
            raise refusal_error(request, gate, refused) from None
        if throttle.active:
            throttle_request(request, throttle, admitted.principal.subject or UNAUTHENTICATED)
        return await handler(request)

    return authenticate


def _throttle_login(throttle: Throttle) -> None:
    """A token server request: a read by ``UNAUTHENTICATED`` (``api.throttling``),
    whoever it claims to be."""
    try:
        throttle.admit(READ, UNAUTHENTICATED)
    except Throttled as refused:
        raise too_many_requests(refused) from None


def _admit_grant(request: web.Request, gate: Gate, needed: tuple[Scope, ...]) -> None:
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
