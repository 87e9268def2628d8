"""Request throttling in the node's request chain (``registry_node.throttle``):
which requests are throttled, as what, and how a refusal reads.

The chain is network rules → authentication → throttling → authorization:
on a node with auth, ``api.auth.authenticate`` calls ``throttle_request``
once the gate knows the principal (so each identity has its own buckets) and
before it decides what the principal may do (a request refused ``403`` has
taken its token); a node without auth has no identities, and
``open_access`` throttles on the replica's buckets alone.

What is throttled, by kind:

* ``/v2/…`` and ``/acr/…`` (the registry API, ``/v2/`` included), and the
  client-facing node route ``/georeg/v1/replication/status``: by method —
  ``GET``/``HEAD``/``OPTIONS`` read, ``PUT``/``PATCH``/``POST`` write,
  ``DELETE`` delete — except a referrers listing, which is ``referrers``;
* the token server (``/oauth2/token``, ``/oauth2/exchange``): a read,
  whatever the method (a login changes nothing in the registry), charged
  before the login is checked to ``UNAUTHENTICATED``, the pseudo-identity
  of every request whose identity is not known — anonymous pulls are it
  too. Before the check no identity is known, and trusting the username
  sent would let anyone empty someone else's bucket; charging the replica
  alone would let an unauthenticated flood empty everyone's. As one
  identity it has one identity's share (``per_identity_fraction``) of the
  replica's reads, and the rest stays with those who logged in.

Never throttled: a request carrying the cluster's internal credential (the
cluster itself: management, verify, replication's HTTP calls), the node's
internal routes and ``/metrics``, a request refused by authentication
(``401``, counted nowhere), and a blob download presenting a redirect's
grant (``api.redirects``: the request that earned the redirect was counted,
as ACR counts no download from its data endpoints).

A refusal is ``429 TOOMANYREQUESTS`` with ``Retry-After`` in whole seconds
(the time until a token is there, so it counts down across retries) and a
``detail`` naming the kind, the limit (``replica``, ``identity`` or
``fault``) and its rate.

Node-internal routes (the internal credential's, ``api.internal``):

    PUT  /georeg/v1/faults/throttle    {"write": 60, …}: a throttling fault, per
                                       minute by kind, replacing the last ({}: healed)
    GET  /georeg/v1/faults/throttle    the same shape, as set now
    GET  /georeg/v1/throttle           limits, fault and refusals so far
    POST /georeg/v1/throttle/debits    a zone sibling's report of what it admitted
"""

from __future__ import annotations

import json

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware

from ..auth.gate import ANONYMOUS
from ..errors import ErrorCode, RegistryError
from ..throttle import DELETE, READ, REFERRERS, WRITE, DebitReport, Throttle, Throttled
from .common import json_response
from .internal import cluster_request, internal_route

THROTTLE: web.AppKey[Throttle] = web.AppKey("throttle", Throttle)

_KIND_BY_METHOD = {"GET": READ, "HEAD": READ, "OPTIONS": READ, "PUT": WRITE, "PATCH": WRITE,
                   "POST": WRITE, "DELETE": DELETE}
_REFERRERS = "/v2/{name}/referrers/{digest}"
TOKEN_SERVER = "/oauth2/"
# The identity of requests whose identity is not known: the token server's
# before it checks the login, and anonymous pulls (``auth.gate.ANONYMOUS``).
UNAUTHENTICATED = ANONYMOUS


def request_kind(request: web.Request) -> str:
    kind = _KIND_BY_METHOD.get(request.method, READ)
    if kind == READ and "/referrers/" in request.path:
        resource = request.match_info.route.resource
        if resource is not None and resource.canonical == _REFERRERS:
            return REFERRERS
    return kind


def too_many_requests(refused: Throttled) -> RegistryError:
    whose = {"identity": "this identity's share of the replica's limit",
             "replica": "the replica's limit", "fault": "an injected throttling fault"}
    return RegistryError(
        ErrorCode.TOOMANYREQUESTS,
        {"kind": refused.kind, "limit": refused.limit,
         "per_minute": round(refused.per_minute, 3), "retry_after_s": refused.retry_after,
         "reason": f"{refused.kind} requests are past {whose[refused.limit]} "
                   f"({refused.per_minute:g} per minute); retry after {refused.retry_after} s"},
        headers={"Retry-After": str(refused.retry_after)})


def throttle_request(request: web.Request, throttle: Throttle, identity: str | None) -> None:
    """Take ``request``'s token for ``identity`` (None: no identity), or raise its 429."""
    try:
        throttle.admit(request_kind(request), identity)
    except Throttled as refused:
        raise too_many_requests(refused) from None


def throttled_route(path: str) -> bool:
    """Whether a request to ``path`` that no internal credential admitted is throttled."""
    return not internal_route(path)


def open_access(internal: bytes | None, throttle: Throttle) -> Middleware:
    """The access middleware of a node without auth: ``api.internal``'s rule
    (``cluster_request``: an internal route answers only the internal
    credential, when the node has one) and throttling, in one layer, as
    ``api.auth.authenticate`` does both on a node with auth. (Here, not in
    ``api.internal``: throttling's request chain depends on ``api.internal``,
    not the other way.)"""

    @web.middleware
    async def open_access(request: web.Request, handler) -> web.StreamResponse:
        if cluster_request(request.headers.get("Authorization"), request.path, internal):
            return await handler(request)
        if throttle.active and throttled_route(request.path):
            throttle_request(request, throttle, None)
        return await handler(request)

    return open_access


# -- node-internal routes ---------------------------------------------------------------


async def _json_object(request: web.Request, shape: str) -> dict:
    try:
        body = json.loads(await request.read() or b"{}")
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise RegistryError(ErrorCode.UNSUPPORTED, f"send {shape}", message="bad request",
                            status=400)
    return body


async def get_throttle_fault(request: web.Request) -> web.Response:
    return json_response(request.app[THROTTLE].fault_rates)


async def put_throttle_fault(request: web.Request) -> web.Response:
    body = await _json_object(request, '{"read"|"write"|"delete"|"referrers": per minute, …}')
    throttle = request.app[THROTTLE]
    try:
        throttle.set_fault(body)        # checks each kind and rate before any is set
    except ValueError as exc:
        raise RegistryError(ErrorCode.UNSUPPORTED, str(exc), message="bad fault",
                            status=400) from None
    return json_response(throttle.fault_rates)


async def get_throttle(request: web.Request) -> web.Response:
    return json_response(request.app[THROTTLE].describe())


async def post_debits(request: web.Request) -> web.Response:
    """A sibling's report, checked whole (``DebitReport``) before any of it is taken."""
    try:
        report = msgspec.json.decode(await request.read() or b"{}", type=DebitReport)
    except msgspec.DecodeError as exc:
        raise RegistryError(ErrorCode.UNSUPPORTED,
                            f'send {{"replica": {{kind: n}}, "fault": {{…}}, '
                            f'"identities": {{identity: {{kind: n}}}}}}: {exc}',
                            message="bad debits", status=400) from None
    request.app[THROTTLE].debit(report)
    return web.Response(status=204)
