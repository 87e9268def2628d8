"""Which webhook events an event of this node's log makes, and their payloads,
in ACR's shape. Pure: no storage, no network, no clock (lookups and times are
passed in).

What fires (a webhook fires for what its region *received*: the push a node
of the region took, and each copy as it lands there; see ``webhook_delivery``
for which node of the region delivers):

* ``push`` (``chart_push`` for a Helm chart: a manifest whose artifact type,
  its config's media type, is ``HELM_CONFIG``) when a manifest lands: at the
  ``TAG_SET`` of a put by tag (one push per put, with its tag), at the
  ``MANIFEST_PUT`` of a put by digest (no tag). A put by tag logs both events
  with one stamp; the ``MANIFEST_PUT`` names the tag it came with
  (``Event.tag``), and makes nothing. A ``TAG_SET`` re-pointing a tag at a
  manifest already held is a push too, as a push of an image under a new tag is.
  A copy whose manifest is not held here by the time it is fed (its tag set
  was ended by a newer delete on arrival) makes nothing.
* ``delete`` (``chart_delete``) at a ``MANIFEST_DELETE``, whether the client
  deleted the manifest or its repository (which deletes each manifest); never
  at a ``TAG_DELETE`` (untag), as in ACR.
* ``quarantine``: never; georeg has no quarantine yet.
* ``ping``: on request (``ping_payload``); ``replicated`` and
  ``replication_failed``: when replication answers for a push
  (``replication_payload``; ``webhook_delivery`` asks).

Known limit: content that anti-entropy repaired (rather than the log carried)
is logged as a ``MANIFEST_PUT`` without its tag and a ``TAG_SET``: a put by tag
repaired that way makes two pushes at that replica (by digest, then by tag).

The event id is a UUID derived from the event's stamp (HLC, origin region,
origin zone), the webhook and the action (and what it names): the same event
has the same id at every attempt and redelivery, so a receiver de-duplicates
on it. ``request`` is the client's request where a node of this region took
the client's push (``Event.request``, which replication carries, so that the
zone that delivers reports the push another zone of its region took); a copy
from another region names the registry's host, the method, and the user agent
``REPLICATION_AGENT``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec

from .records import ClientRequest, Event, EventKind, Stamp, stamp_of
from .webhooks import Webhook, in_scope

HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
REPLICATION_AGENT = "georeg-replication"
COMPLETION_ACTIONS = frozenset({"replicated", "replication_failed"})
# The namespace of event ids (a fixed UUID: ids must not change between releases).
_IDS = uuid.UUID("8f4c2d1e-5b7a-4e09-9a3c-6d2f1b0e7c55")


@dataclass(frozen=True, slots=True)
class ManifestFacts:
    """What a webhook needs to know of a manifest this node holds."""

    media_type: str
    size: int
    artifact_type: str


@dataclass(frozen=True, slots=True)
class Occurrence:
    """Something that happened to an image here, as webhooks see it: a push
    (it landed) or a delete."""

    kind: str                      # "push" | "delete"
    chart: bool
    repository: str
    digest: str
    tag: str
    media_type: str
    size: int
    stamp: Stamp
    at_ns: int                     # the payload's timestamp
    request: ClientRequest

    def action(self) -> str:
        return f"chart_{self.kind}" if self.chart else self.kind


@dataclass(frozen=True, slots=True)
class Made:
    """One webhook event to deliver."""

    webhook: str
    webhook_created: float
    action: str
    id: str
    body: bytes
    event_ns: int


def occurrence(event: Event, *, lookup: Callable[[str, str], ManifestFacts | None],
               region: str, now_ns: int, host: str) -> Occurrence | None:
    """What ``event`` (logged here) amounts to for webhooks, if anything.
    ``lookup`` reads a manifest this node holds; ``region`` is this node's;
    ``now_ns`` is when the event is fed (the timestamp of a copy from another
    region: when it landed here, near enough); ``host`` names the registry in
    the request of a copy."""
    if event.kind is EventKind.MANIFEST_PUT:
        if event.tag:
            return None                     # its TAG_SET fires the push, with the tag
        facts = lookup(event.repository, event.digest) or ManifestFacts(
            event.media_type, event.size, event.artifact_type)
        return _made(event, "push", facts, region, now_ns, host)
    if event.kind is EventKind.TAG_SET:
        facts = lookup(event.repository, event.digest)
        if facts is None:
            if _client(event, region) is None:
                return None                 # a copy that did not land: nothing arrived
            facts = ManifestFacts(event.media_type, event.size, event.artifact_type)
        return _made(event, "push", facts, region, now_ns, host)
    if event.kind is EventKind.MANIFEST_DELETE:
        facts = ManifestFacts(event.media_type, 0, event.artifact_type)
        return _made(event, "delete", facts, region, now_ns, host)
    return None


def _made(event: Event, kind: str, facts: ManifestFacts, region: str, now_ns: int,
          host: str) -> Occurrence:
    # The origin's acknowledgement is when this region received the write when
    # a node of this region took it; a copy from elsewhere arrived just now.
    at = event.acked_ns if event.origin_region == region and event.acked_ns else now_ns
    request = _client(event, region) or ClientRequest(
        id=event_id(stamp_of(event), "", "request", event.repository, event.digest, event.tag),
        host=host, method="PUT" if kind == "push" else "DELETE", useragent=REPLICATION_AGENT)
    return Occurrence(kind, facts.artifact_type == HELM_CONFIG, event.repository, event.digest,
                      event.tag if kind == "push" else "", facts.media_type, facts.size,
                      stamp_of(event), at, request)


def _client(event: Event, region: str) -> ClientRequest | None:
    """The client's request of an event a node of ``region`` took (whichever
    zone it was: the event carries it to the zone that delivers); None for a
    copy from another region, which names the registry's request."""
    return event.request if event.origin_region == region else None


def for_webhooks(occ: Occurrence, hooks: Iterable[tuple[str, Webhook]]) -> list[Made]:
    """The events ``occ`` makes for ``hooks`` (the enabled webhooks of this
    node's region): one per webhook that takes its action and whose scope
    holds it."""
    action = occ.action()
    out = []
    for name, hook in hooks:
        if action in hook.actions and in_scope(hook.scope, occ.repository, occ.tag):
            ident = event_id(occ.stamp, name, action, occ.repository, occ.digest, occ.tag)
            out.append(Made(name, hook.created, action, ident,
                            _json.encode(_payload(ident, action, occ)), occ.at_ns))
    return out


def awaiting_completion(occ: Occurrence, hooks: Iterable[tuple[str, Webhook]]) -> dict[str, float]:
    """The webhooks (name → its ``created``) that wait to hear whether the
    image of a push reaches every replica: those that take ``replicated`` or
    ``replication_failed`` and whose scope holds it."""
    if occ.kind != "push":
        return {}
    return {name: hook.created for name, hook in hooks
            if COMPLETION_ACTIONS & set(hook.actions)
            and in_scope(hook.scope, occ.repository, occ.tag)}


def replication_payload(occ: Occurrence, webhook: str, action: str, arrivals: dict[str, str],
                        failures: dict[str, str]) -> tuple[str, bytes]:
    """``replicated`` / ``replication_failed`` for the push ``occ``: ACR's push
    payload with ``replication: {arrivals: {region: time}, failures: {region:
    why}}``. Returns (id, body)."""
    ident = event_id(occ.stamp, webhook, action, occ.repository, occ.digest, occ.tag)
    payload = _payload(ident, action, occ)
    payload["replication"] = {"arrivals": dict(arrivals), "failures": dict(failures)}
    return ident, _json.encode(payload)


def ping_payload(ident: str, at_ns: int) -> bytes:
    return _json.encode({"id": ident, "timestamp": timestamp(at_ns), "action": "ping"})


def event_id(stamp: Stamp, webhook: str, action: str, repository: str, digest: str,
             tag: str) -> str:
    hlc, region, zone = stamp
    return str(uuid.uuid5(_IDS, f"{hlc}|{region}|{zone}|{webhook}|{action}|{repository}|"
                                f"{digest}|{tag}"))


def timestamp(ns: int) -> str:
    """RFC 3339 UTC with nanoseconds, as ACR writes it."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:09d}Z"


def _payload(ident: str, action: str, occ: Occurrence) -> dict:
    if occ.kind == "push":
        target: dict = {"mediaType": occ.media_type, "size": occ.size, "digest": occ.digest,
                        "length": occ.size, "repository": occ.repository}
        if occ.tag:           # a push by digest names none (``omitempty``, as ACR's)
            target["tag"] = occ.tag
    else:
        # ACR's delete names the manifest, not a tag or a size.
        target = {"mediaType": occ.media_type, "digest": occ.digest,
                  "repository": occ.repository}
    if occ.chart:
        # ACR's chart events also name the chart and (pushed by tag) its version.
        target["name"] = occ.repository.rpartition("/")[2]
        if occ.tag:
            target["version"] = occ.tag
    request = occ.request
    return {"id": ident, "timestamp": timestamp(occ.at_ns), "action": action, "target": target,
            "request": {"id": request.id, "host": request.host, "method": request.method,
                        "useragent": request.useragent}}


_json = msgspec.json.Encoder()
