"""Webhook deliveries on one node (``registry_node.webhook_delivery``):
node-internal routes for the control plane (``georeg webhook ping``,
``list-events``, ``redeliver``), never forwarded by an endpoint.

    POST /georeg/v1/webhooks/{name}/ping                     202 {"id"}: a ping is queued
    GET  /georeg/v1/webhooks/{name}/events?limit=N           {"events": [...]}, newest first
    POST /georeg/v1/webhooks/{name}/events/{id}/redeliver    202 {"id"}: queued again

An unknown webhook or event is a 404. Events are this node's own: ask the
node that delivers for the webhook's region (``node.delivers`` in the answer
says whether this one does). Custom header values are shown as ``***``.
"""

from __future__ import annotations

from aiohttp import web

from ..errors import ErrorCode, RegistryError
from .common import WEBHOOKS, json_response

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000


async def ping(request: web.Request) -> web.Response:
    ident = request.app[WEBHOOKS].ping(request.match_info["name"])
    return json_response({"id": ident}, status=202)


async def list_events(request: web.Request) -> web.Response:
    raw = request.query.get("limit", "")
    limit = DEFAULT_LIMIT
    if raw:
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise RegistryError(ErrorCode.PAGINATION_NUMBER_INVALID,
                                f"limit is a number from 1 to {MAX_LIMIT}, not {raw[:20]!r}")
        limit = int(raw)
    delivery = request.app[WEBHOOKS]
    events = delivery.events(request.match_info["name"], limit)
    return json_response({"events": events,
                          "node": {"region": delivery.region,
                                   "delivers": delivery.settings.deliver}})


async def redeliver(request: web.Request) -> web.Response:
    ident = request.app[WEBHOOKS].redeliver(request.match_info["name"], request.match_info["id"])
    return json_response({"id": ident}, status=202)
