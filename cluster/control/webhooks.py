"""The registry's webhooks, as ``az acr webhook`` manages them: create,
update, delete, list, show, get-config, and — forwarded to the region that
delivers them — ping, list-events and redeliver. ``Cluster.webhooks`` is one
of these; the management API and ``georeg webhook`` are layers over it.

A webhook is registry configuration (``registry_node.webhooks``): each change
is checked here (the value as the node will check it, and in addition that
``location`` names a replica region of this cluster — the home region when
not given —, that ``receiver_location`` is a region georeg knows, the tier's
limit), then written through a node of the home region, which checks it again,
stamps it and logs it; replication takes it to every node. While the home
region cannot be reached every change fails with the control plane's message
(``ControlPlaneUnavailable``); list, show and get-config answer from any node.

Secrets: a webhook's custom headers (and often its URI) carry the receiver's
credential. ``list`` and ``show`` never return either, as in ACR; only
``get_config`` returns ``serviceUri`` and ``customHeaders``. Nothing here logs
a value. Header values leave this plane sealed with the cluster's
configuration key (``registry_node.configuration_key``), bound to their
webhook and header: the home node stores, and replication carries, only
ciphertext. ``get_config`` opens them; ``update`` opens the values it keeps
and seals every value again (so a plaintext value an older georeg stored is
sealed at the next update). A value that does not open (the key file was
replaced) is a ``Conflict`` that names the header and says to set it again.

Limits per tier (``registry_node.tiers``): 2 / 10 / 500 webhooks (Basic /
Standard / Premium); one more is ``QuotaExceeded`` (409) with ACR's message
("Quota exceeded for resource type webhooks for the registry SKU Basic"),
then the limit and the way out (``errors.quota_exceeded``).

Delivery, and the events it keeps, belong to the nodes of the webhook's
region. The region's delivering node is the node of its first zone in plan
order (``delivery_order``); ping, list-events and redeliver go to that node
when it answers, else to the next node of the region that does, on the
node-internal routes (the node side's contract)::

    POST /georeg/v1/webhooks/{name}/ping                    202 {"id"}
    GET  /georeg/v1/webhooks/{name}/events?limit=N          200 {"events": [event, ...]} newest first
    POST /georeg/v1/webhooks/{name}/events/{id}/redeliver   202 {"id"}; 404 if unknown

    event = {"id", "webhook", "action", "created", "state": pending|delivered|failed|gave_up,
             "attempts": [{"at", "duration_ms", "status", "error"}],
             "request": {"method", "uri", "headers", "body"},     # header values of the
             "response": {"status", "headers", "body"} | null}     # webhook's own: "***"

``event_view`` turns an event into the management API's answer, shaped after
ACR's (``eventRequestMessage``, ``eventResponseMessage``).
"""

from __future__ import annotations

import asyncio
import difflib
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence

import msgspec

from registry_node import tiers
from registry_node.configuration_key import ConfigurationKey
from registry_node.identities import InvalidValue
from registry_node.webhooks import (
    ACTIONS,
    WEBHOOK,
    WEBHOOK_NAME,
    Webhook,
    check_webhook,
    open_headers,
    seal_headers,
)

from .errors import ClusterError, Conflict, NodeRefusal, NotFound, RegionUnavailable, quota_exceeded
from .identities import one_at_a_time
from .plan import ClusterPlan
from .regions import REGIONS, unknown_region_message

# Webhooks a registry of each tier may have.
TIER_LIMITS = {tier: limits.webhooks for tier, limits in tiers.LIMITS.items()}
MAX_EVENTS = 1000          # the most list-events asks a node for at once
MASK = "***"               # what a header value shows as, outside get-config

NodeCall = Callable[..., Awaitable[dict]]


def _iso(seconds: float | None) -> str | None:
    if not seconds:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _close(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def delivery_order(plan: ClusterPlan, region: str) -> list[str]:
    """The serving nodes of ``region``, the delivering node (its first zone in
    plan order) first: where a webhook of that region is pinged and its events
    are read. Empty when the region has no replica."""
    return [n.name for n in plan.nodes_in(region)]


async def delivering_node(plan: ClusterPlan, region: str,
                          answers: Callable[[str], Awaitable[bool]]) -> str:
    """The node that delivers ``region``'s webhooks and keeps their events:
    the first of ``delivery_order`` that ``answers`` (over the network), so
    the node of the region's first zone while it is up."""
    order = delivery_order(plan, region)
    if not order:
        raise NotFound(f"{region} has no replica in this registry")
    for node in order:
        if await answers(node):
            return node
    raise RegionUnavailable(f"no node of {region} can be reached (down, or cut off from the "
                            "network); the webhook's deliveries are kept there: try again when "
                            "it is back")


def node_route(name: str, *rest: str) -> str:
    """A node-internal webhook route: ``/georeg/v1/webhooks/{name}[/rest...]``,
    every part quoted (an event id never becomes a path of its own)."""
    parts = [name, *rest]
    return "/georeg/v1/webhooks/" + "/".join(urllib.parse.quote(p, safe="") for p in parts)


def masked(value: dict) -> dict:
    """A stored webhook value with its header values replaced by ``***`` (what
    a read outside ``get-config`` may show)."""
    headers = value.get("headers")
    if not isinstance(headers, dict):
        return value
    return {**value, "headers": {k: MASK for k in headers}}


def event_view(event: dict) -> dict:
    """One delivery as the management API shows it: ACR's
    ``eventRequestMessage`` / ``eventResponseMessage``, with georeg's own
    state and attempts beside them."""
    request = event.get("request") or {}
    response = event.get("response")
    return {
        "id": event.get("id"), "webhook": event.get("webhook"), "action": event.get("action"),
        "created": event.get("created"), "state": event.get("state"),
        "attempts": [{"at": a.get("at"), "durationMs": a.get("duration_ms"),
                      "status": a.get("status"), "error": a.get("error")}
                     for a in event.get("attempts") or [] if isinstance(a, dict)],
        "eventRequestMessage": {"method": request.get("method"), "requestUri": request.get("uri"),
                                "headers": request.get("headers") or {},
                                "content": request.get("body")},
        "eventResponseMessage": None if not isinstance(response, dict) else {
            "statusCode": response.get("status"), "headers": response.get("headers") or {},
            "content": response.get("body")},
    }


class RegistryWebhooks:
    """The webhook commands of one registry. ``home`` returns the home node to
    write through (or raises ``ControlPlaneUnavailable``), ``reader`` a node to
    read from, ``call(node, method, path, body)`` one request to that node's
    configuration routes; ``deliverer(region)`` the node that delivers the
    region's webhooks (see the module docstring), ``forward(node, method,
    path, body)`` one request to a node's own route; ``key()`` the cluster's
    configuration key, which seals and opens header values."""

    def __init__(self, *, tier: Callable[[], str], home_region: Callable[[], str],
                 replica_regions: Callable[[], Sequence[str]],
                 home: Callable[[], Awaitable[str]], reader: Callable[[], Awaitable[str]],
                 call: NodeCall, deliverer: Callable[[str], Awaitable[str]], forward: NodeCall,
                 key: Callable[[], ConfigurationKey],
                 now: Callable[[], float] = time.time) -> None:
        self.tier = tier
        self.home_region = home_region
        self.replica_regions = replica_regions
        self._home = home
        self._reader = reader
        self._call = call
        self._deliverer = deliverer
        self._forward = forward
        self._key = key
        self.now = now
        self.lock = asyncio.Lock()

    # -- checks --------------------------------------------------------------------------

    @staticmethod
    def _check_name(name: object) -> str:
        if not isinstance(name, str) or not name:
            raise ClusterError("give the webhook's name (--name)")
        if not WEBHOOK_NAME.fullmatch(name):
            raise ClusterError(f"{name[:64]!r}: a webhook's name is 5 to 50 letters and digits "
                               "(as in ACR)")
        return name

    def _check_location(self, location: str) -> str:
        replicas = list(self.replica_regions())
        if location in replicas:
            return location
        if location not in REGIONS:
            raise ClusterError(f"location: {unknown_region_message(location)}")
        raise ClusterError(f"location {location!r} has no replica in this registry"
                           f"{_close(location, replicas)}; a webhook belongs to the region of "
                           f"a replica: {', '.join(replicas)}; `georeg replication create "
                           f"--location {location}` adds one")

    @staticmethod
    def _check_receiver_location(location: str) -> str:
        if location and location not in REGIONS:
            raise ClusterError(f"receiver location: {unknown_region_message(location)} "
                               "(empty: the webhook's own region)")
        return location

    @staticmethod
    def _check_actions(actions: object) -> None:
        if not isinstance(actions, (list, tuple)) or not all(isinstance(a, str) for a in actions):
            return          # the value's types are checked with the rest, below
        for action in actions:
            if action not in ACTIONS:
                raise ClusterError(f"unknown action {action[:40]!r}{_close(action, ACTIONS)}; "
                                   f"the actions are {', '.join(ACTIONS)}")

    def _checked(self, name: str, value: dict) -> dict:
        """``value`` (its header values in plaintext, as the owner gives them)
        as the home node will store it, header values sealed, after every check
        it will make (so that a bad value gets this plane's message, not the
        node's)."""
        self._check_actions(value.get("actions"))
        try:
            webhook = msgspec.convert(value, Webhook, strict=True)
            webhook = msgspec.structs.replace(
                webhook, headers=seal_headers(self._key(), name, webhook.headers))
            check_webhook(name, webhook)
        except msgspec.ValidationError as exc:
            raise ClusterError(f"invalid webhook: {exc}") from None
        except InvalidValue as exc:
            raise ClusterError(str(exc)) from None
        self._check_location(webhook.location)
        self._check_receiver_location(webhook.receiver_location)
        return msgspec.to_builtins(webhook)

    def _check_quota(self, count: int) -> None:
        tier = self.tier()
        if count >= TIER_LIMITS.get(tier, max(TIER_LIMITS.values())):
            raise quota_exceeded("webhooks", "webhooks", tier, TIER_LIMITS, count)

    # -- reading and writing objects ---------------------------------------------------

    async def _get(self, node: str, name: str) -> dict | None:
        try:
            return (await self._call(node, "GET", f"/{WEBHOOK}/{name}"))["value"]
        except NodeRefusal as exc:
            if exc.status == 404:
                return None
            raise

    async def _stored(self, node: str, name: str) -> dict:
        value = await self._get(node, self._check_name(name))
        if value is None:
            raise NotFound(f"no webhook {name!r}; `georeg webhook list` shows them")
        return value

    async def _list(self, node: str) -> list[tuple[str, dict]]:
        answer = await self._call(node, "GET", f"/{WEBHOOK}")
        return [(o["name"], o["value"]) for o in answer["objects"]
                if not o["deleted"] and o["value"] is not None]

    def _opened(self, name: str, value: dict) -> dict[str, str]:
        """The header values of stored webhook ``value``, in plaintext."""
        headers = value.get("headers") or {}
        try:
            return open_headers(self._key(), name, dict(headers))
        except InvalidValue as exc:
            raise Conflict(f"webhook {name!r}: {exc}") from None

    @staticmethod
    def view(name: str, value: dict) -> dict:
        """A webhook as ``list`` and ``show`` give it: never its URI or header values."""
        location = value.get("location", "")
        return {"name": name, "location": location,
                "receiverLocation": value.get("receiver_location") or location,
                "actions": list(value.get("actions", ())), "scope": value.get("scope", ""),
                "status": value.get("status", ""), "creationDate": _iso(value.get("created")),
                "provisioningState": "Succeeded"}

    # -- commands ----------------------------------------------------------------------

    @one_at_a_time
    async def create(self, name: str, *, uri: str, actions: Sequence[str], scope: str = "",
                     headers: dict[str, str] | None = None, status: str = "enabled",
                     location: str | None = None, receiver_location: str = "") -> dict:
        """``az acr webhook create``: the webhook's view (no URI, no header values)."""
        name = self._check_name(name)
        value = self._checked(name, {
            "uri": uri, "actions": list(actions) if isinstance(actions, (list, tuple)) else actions,
            "scope": scope, "headers": headers if headers is not None else {},
            "status": status, "location": location or self.home_region(),
            "receiver_location": receiver_location, "created": self.now()})
        home = await self._home()
        existing = await self._list(home)
        if any(n == name for n, _ in existing):
            raise Conflict(f"webhook {name!r} exists already; change it with "
                           "`georeg webhook update`")
        self._check_quota(len(existing))
        await self._call(home, "PUT", f"/{WEBHOOK}/{name}", value)
        return self.view(name, value)

    @one_at_a_time
    async def update(self, name: str, *, uri: str | None = None,
                     actions: Sequence[str] | None = None, scope: str | None = None,
                     headers: dict[str, str] | None = None, status: str | None = None,
                     location: str | None = None, receiver_location: str | None = None) -> dict:
        """``az acr webhook update``: what is given changes, the rest stays
        (``headers`` replaces every custom header; ``{}`` clears them)."""
        name = self._check_name(name)
        changes = {k: v for k, v in (("uri", uri), ("actions", actions), ("scope", scope),
                                     ("headers", headers), ("status", status),
                                     ("location", location),
                                     ("receiver_location", receiver_location)) if v is not None}
        if not changes:
            raise ClusterError("nothing to update: give --uri, --actions, --scope, --headers, "
                               "--status, --location or --receiver-location")
        if isinstance(changes.get("actions"), tuple):
            changes["actions"] = list(changes["actions"])
        home = await self._home()
        current = await self._stored(home, name)
        if "headers" not in changes:        # kept, and sealed again with the rest
            changes["headers"] = self._opened(name, current)
        value = self._checked(name, {**current, **changes})
        await self._call(home, "PUT", f"/{WEBHOOK}/{name}", value)
        return self.view(name, value)

    @one_at_a_time
    async def delete(self, name: str) -> None:
        home = await self._home()
        await self._stored(home, name)
        await self._call(home, "DELETE", f"/{WEBHOOK}/{name}")

    async def list(self) -> list[dict]:
        return [self.view(n, v) for n, v in await self._list(await self._reader())]

    async def show(self, name: str) -> dict:
        return self.view(name, await self._stored(await self._reader(), name))

    async def get_config(self, name: str) -> dict:
        """``az acr webhook get-config``: the service URI and the custom headers,
        values included (the one read that shows them)."""
        value = await self._stored(await self._reader(), name)
        return {"serviceUri": value["uri"], "customHeaders": self._opened(name, value)}

    # -- forwarded to the region that delivers ------------------------------------------

    async def _delivering(self, name: str) -> tuple[str, str]:
        """(webhook name, the node that delivers it): read from any node, so it
        works while the home region is down."""
        value = await self._stored(await self._reader(), name)
        return name, await self._deliverer(value["location"])

    async def _forwarded(self, node: str, method: str, path: str, what: str) -> dict:
        try:
            answer = await self._forward(node, method, path)
        except NodeRefusal as exc:
            if exc.status == 404:
                raise NotFound(f"{node}: {what}: {exc}") from None
            raise
        if not isinstance(answer, dict):
            raise NodeRefusal(f"{node} answered {what} with {type(answer).__name__}, not an "
                              "object", 502, "BadGateway")
        return answer

    @staticmethod
    def _id_of(answer: dict, node: str) -> dict:
        event_id = answer.get("id")
        if not isinstance(event_id, str) or not event_id:
            raise NodeRefusal(f"{node} answered without an event id", 502, "BadGateway")
        return {"id": event_id}

    async def ping(self, name: str) -> dict:
        """``az acr webhook ping``: a ping event queued for delivery; its id."""
        name, node = await self._delivering(name)
        answer = await self._forwarded(node, "POST", node_route(name, "ping"), "ping")
        return self._id_of(answer, node)

    async def events(self, name: str, limit: int | None = None) -> list[dict]:
        """``az acr webhook list-events``: the deliveries its region's delivering
        node keeps, newest first."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or not 1 <= limit <= MAX_EVENTS):
            raise ClusterError(f"the limit is a whole number from 1 to {MAX_EVENTS}")
        name, node = await self._delivering(name)
        path = node_route(name, "events") + (f"?limit={limit}" if limit is not None else "")
        answer = await self._forwarded(node, "GET", path, "list events")
        events = answer.get("events")
        if not isinstance(events, list):
            raise NodeRefusal(f"{node} answered list-events without a list of events", 502,
                              "BadGateway")
        return [event_view(e) for e in events if isinstance(e, dict)]

    async def redeliver(self, name: str, event_id: str) -> dict:
        """Queue one event for delivery again; the id its delivery is listed under."""
        if not isinstance(event_id, str) or not event_id or len(event_id) > 128:
            raise ClusterError("give the event's id, as `georeg webhook list-events` shows it")
        name, node = await self._delivering(name)
        answer = await self._forwarded(node, "POST", node_route(name, "events", event_id,
                                                                "redeliver"),
                                       f"event {event_id[:64]!r}")
        return self._id_of(answer, node)
