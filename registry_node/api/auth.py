"""Authentication and authorization on the node's registry routes (an aiohttp
middleware over ``registry_node.auth.gate``).

Guarded: ``/v2`` and everything below it, and ACR's ``/acr/`` routes. Not
by the gate: the node's internal ``/georeg/v1`` routes and ``/metrics`` (they
take the cluster's internal credential, ``api.internal``, which also admits the
cluster's own requests to registry routes without the gate; on a node with
auth this one middleware checks it, with ``api.internal``'s rules, before the
gate), and ``/oauth2/`` (the token server authenticates its own requests).

The gate remembers a bearer token's admissions (``Gate._recalled``), so a
client reusing its token pays for a dictionary lookup, not a check.

What each route needs is the reference registry's rule, decided from the
method and the route before any handler runs (so no answer depends on whether
a repository exists): ``GET``/``HEAD`` pull; ``POST``/``PUT``/``PATCH`` pull and
push; ``DELETE`` delete; a cross-repository mount also pull on ``from``;
``/v2/_catalog`` ``registry:catalog:*``; ``/v2/`` (and any unknown path
below it) only a valid principal. Deliberately not ACR's rule that tag
listing needs ``metadata_read``: skopeo asks for ``pull`` before listing
tags and treats a 403 as final, so that rule would break ``skopeo
list-tags`` with any credential.

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
from ..auth.scopes import (
    DELETE,
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
from .internal import carries_credential, internal_route, refusal

GATE: web.AppKey[Gate] = web.AppKey("gate", Gate)
log = structlog.get_logger("georeg.auth")

_PULL_PUSH = frozenset({PULL, PUSH})
_ACTIONS_BY_METHOD = {"GET": frozenset({PULL}), "HEAD": frozenset({PULL}), "POST": _PULL_PUSH,
                      "PUT": _PULL_PUSH, "PATCH": _PULL_PUSH, "DELETE": frozenset({DELETE})}
_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
UNAUTHORIZED_MESSAGE = "authentication required"


def guarded(path: str) -> bool:
    return path.startswith(("/v2/", "/acr/")) or path == "/v2"


def needed_access(request: web.Request) -> tuple[Scope, ...]:
    """What ``request`` needs (empty: only a valid principal), one entry per
    repository. Runs on every guarded request, so the common shape (one
    repository, a name with no whitespace) builds its one ``Scope`` directly;
    anything else goes the long way through the scope grammar
    (``parse_scopes``), which drops what is not a scope: a name with
    whitespace never reaches a challenge header."""
    name = request.match_info.get("name")
    if name is not None:
        method = request.method
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


def authenticate(internal: bytes | None) -> Middleware:
    """The access middleware of a node with auth on. With ``internal`` (the
    expected internal-credential header, ``api.internal``) it also does that
    middleware's work: a request carrying the credential skips the gate, an
    internal route without it is refused. One middleware for both, and the gate
    looked up once, because this runs on every request and each layer of the
    chain costs every request."""
    gate: Gate | None = None        # app[GATE] exists once the node's storage is open

    @web.middleware
    async def authenticate(request: web.Request, handler) -> web.StreamResponse:
        nonlocal gate
        authorization = request.headers.get("Authorization")
        if internal is not None and carries_credential(authorization, internal):
            return await handler(request)
        path = request.path
        if not guarded(path):
            if internal is not None and internal_route(path):
                raise refusal()
            return await handler(request)
        if gate is None:
            gate = request.app[GATE]
        needed = needed_access(request)
        try:
            gate.admit(authorization, needed)
        except Refusal as refused:
            # The reason names what was wrong, never a credential.
            log.info("access_refused", method=request.method, path=path,
                     status=refused.status, reason=refused.reason)
            raise refusal_error(request, gate, refused) from None
        return await handler(request)

    return authenticate
