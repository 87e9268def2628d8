"""Webhooks: what a webhook is (configuration kind ``webhook``), which
actions it takes, and which repository and tag its scope selects.

A webhook belongs to one replica's region (``location``, as in ACR): the nodes
of that region fire it for what *they* receive — the push they took, and the
copy when it lands there — so "deploy in West Europe when West Europe has the
image" is one webhook. ``receiver_location`` is where the receiver sits in the
modelled WAN (empty: the webhook's own region).

Actions are ACR's (``push``, ``delete``, ``quarantine``, ``chart_push``,
``chart_delete``) and georeg's own: ``replicated`` (every replica residency
allows holds the image) and ``replication_failed`` (a replica gave up on it).

Scope, as in ACR: ``repo:tag`` one tag, ``repo:*`` every tag of a repository,
``repo`` the same as ``repo:latest``, empty for everything.

Custom ``headers`` often carry a receiver's credential: they are sent with
every delivery, shown only by ``get-config``, and never logged. Their values
are sealed (``configuration_key``) wherever they are stored or replicated:
the control plane seals each one under the cluster's configuration key with
the webhook's name and the header's name as its place (``seal_headers``), a
node seals a plaintext value written to its route and refuses a sealed one
that does not open there (``sealed_webhook``), and delivery and
``get-config`` open them (``open_headers``). A value stored before values
were sealed is plaintext, and reads as such.

No HTTP and no storage here: the configuration module stores webhooks like
any other kind; delivery lives elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import msgspec

from .configuration_key import ConfigurationKey, SealedValueError, check_form, is_sealed
from .identities import DISABLED, ENABLED, InvalidValue
from .reference import MAX_NAME_LENGTH, NAME_RE, TAG_RE

WEBHOOK = "webhook"

ACR_ACTIONS = ("push", "delete", "quarantine", "chart_push", "chart_delete")
GEOREG_ACTIONS = ("replicated", "replication_failed")
ACTIONS = ACR_ACTIONS + GEOREG_ACTIONS

WEBHOOK_NAME = re.compile(r"[A-Za-z0-9]{5,50}")
MAX_URI_LENGTH = 2048
MAX_HEADERS = 16
MAX_HEADER_VALUE = 1024
# RFC 9110 field names: a token.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
# Headers the delivery sets itself; a webhook may not replace them.
RESERVED_HEADERS = frozenset({"content-type", "content-length", "host", "transfer-encoding",
                              "connection"})


# The most bytes a header value's UTF-8 may take (MAX_HEADER_VALUE characters
# of up to 4 bytes each): what a sealed value may hold.
MAX_HEADER_VALUE_BYTES = 4 * MAX_HEADER_VALUE
# The way out, said in every error about a sealed value that does not open.
_SET_AGAIN = "set it again with `georeg webhook update --headers`"


class Webhook(msgspec.Struct, frozen=True):
    uri: str = ""
    actions: tuple[str, ...] = ()
    scope: str = ""
    headers: dict[str, str] = {}   # name -> value, sealed as stored (see the module docstring)
    status: str = ENABLED
    location: str = ""             # the replica region that fires it
    receiver_location: str = ""    # where the receiver sits in the WAN; "" = location
    created: float = 0.0


def parse_scope(scope: str) -> tuple[str, str] | None:
    """``(repository, tag)`` for a scope (tag ``*`` for every tag), None for
    the empty scope (everything); InvalidValue for anything else."""
    if scope == "":
        return None
    repository, sep, tag = scope.partition(":")
    if not sep:
        tag = "latest"
    if len(repository) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(repository):
        raise InvalidValue(f"scope {scope[:300]!r}: the repository part is not a repository "
                           "name (lowercase path components); a scope is 'repo:tag', "
                           "'repo:*', 'repo' (repo:latest) or empty for every repository")
    if tag != "*" and not TAG_RE.fullmatch(tag):
        raise InvalidValue(f"scope {scope[:300]!r}: {tag[:130]!r} is not a tag or '*'")
    return repository, tag


def in_scope(scope: str, repository: str, tag: str) -> bool:
    """Whether an event on ``repository`` (and ``tag``, "" for none) is in the
    webhook's scope. An event without a tag (a delete by digest) matches a
    scope naming its repository."""
    parsed = parse_scope(scope)
    if parsed is None:
        return True
    want_repository, want_tag = parsed
    if repository != want_repository:
        return False
    return want_tag == "*" or not tag or tag == want_tag


def check_webhook(name: str, webhook: Webhook) -> None:
    """Everything a webhook must satisfy beyond its types (the control plane
    checks in addition that ``location`` names a replica)."""
    if not WEBHOOK_NAME.fullmatch(name):
        raise InvalidValue(f"a webhook's name is 5 to 50 letters and digits (as in ACR), "
                           f"not {name[:64]!r}")
    uri = urlsplit(webhook.uri)
    if len(webhook.uri) > MAX_URI_LENGTH or uri.scheme not in ("http", "https") or not uri.hostname:
        raise InvalidValue(f"the service URI must be an absolute http:// or https:// URL "
                           f"with a host, at most {MAX_URI_LENGTH} characters; got "
                           f"{webhook.uri[:120]!r}")
    try:
        _ = uri.port
    except ValueError:
        raise InvalidValue(f"the service URI's port is not a number: {webhook.uri[:120]!r}") from None
    if not webhook.actions:
        raise InvalidValue(f"a webhook needs at least one action: {', '.join(ACTIONS)}")
    unknown = [a for a in webhook.actions if a not in ACTIONS]
    if unknown:
        raise InvalidValue(f"unknown actions {unknown[:5]}; the actions are {', '.join(ACTIONS)}")
    if len(set(webhook.actions)) != len(webhook.actions):
        raise InvalidValue("each action appears once")
    parse_scope(webhook.scope)
    if len(webhook.headers) > MAX_HEADERS:
        raise InvalidValue(f"a webhook has at most {MAX_HEADERS} custom headers")
    for header, value in webhook.headers.items():
        if not _HEADER_NAME.fullmatch(header):
            raise InvalidValue(f"{header[:130]!r} is not an HTTP header name")
        if header.lower() in RESERVED_HEADERS:
            raise InvalidValue(f"the {header} header is set by the delivery itself")
        if is_sealed(value):
            try:
                check_form(value, MAX_HEADER_VALUE_BYTES)
            except SealedValueError as exc:
                raise InvalidValue(f"header {header}: its sealed value {exc}") from None
        else:
            _check_plaintext(header, value)
    if webhook.status not in (ENABLED, DISABLED):
        raise InvalidValue(f"status is enabled or disabled, not {webhook.status[:20]!r}")
    if not webhook.location:
        raise InvalidValue("a webhook belongs to a replica's region: location is required")


def _check_plaintext(header: str, value: str) -> None:
    if len(value) > MAX_HEADER_VALUE or any(c in value for c in "\r\n\0"):
        # Never echo the value: custom headers carry credentials.
        raise InvalidValue(f"header {header}: a value is at most {MAX_HEADER_VALUE} "
                           "characters, without line breaks or NUL")


def _place(name: str, header: str) -> tuple[str, str, str]:
    """What a header value is sealed to: this webhook, this header (as written)."""
    return ("webhook-header", name, header)


def seal_headers(key: ConfigurationKey, name: str, headers: dict[str, str]) -> dict[str, str]:
    """Webhook ``name``'s header values as given by its owner (plaintext, each
    checked, whatever it looks like), sealed: what the control plane writes."""
    sealed = {}
    for header, value in headers.items():
        _check_plaintext(header, value)
        sealed[header] = key.seal(value, _place(name, header))
    return sealed


def open_headers(key: ConfigurationKey, name: str, headers: dict[str, str]) -> dict[str, str]:
    """Webhook ``name``'s header values as stored, opened (a plaintext one, from
    before values were sealed, as it is); ``InvalidValue`` naming the first
    header whose sealed value does not open."""
    opened = {}
    for header, value in headers.items():
        if not is_sealed(value):
            opened[header] = value
            continue
        try:
            opened[header] = key.open(value, _place(name, header), MAX_HEADER_VALUE_BYTES)
        except SealedValueError as exc:
            raise InvalidValue(f"header {header}: its sealed value {exc} (sealed for another "
                               f"webhook or header, or with another configuration key); "
                               f"{_SET_AGAIN}") from None
    return opened


def sealed_webhook(key: ConfigurationKey, name: str, webhook: Webhook) -> Webhook:
    """``webhook`` as a node stores it when written to its route: plaintext
    values sealed with the node's key, sealed ones kept if they open here
    (``InvalidValue`` if one does not: it belongs to another webhook or
    header, or to another key)."""
    headers = {}
    for header, value in webhook.headers.items():
        if is_sealed(value):
            open_headers(key, name, {header: value})
            headers[header] = value
        else:
            headers[header] = key.seal(value, _place(name, header))
    return msgspec.structs.replace(webhook, headers=headers)


@dataclass(frozen=True, slots=True)
class Completion:
    """Where one image stands across the replicas residency allows it in: the
    answer behind ``replicated`` (``complete``) and ``replication_failed``
    (``failures`` not empty). Times are ISO 8601 UTC with milliseconds."""

    complete: bool
    arrivals: dict[str, str] = field(default_factory=dict)    # region -> when the image landed there
    failures: dict[str, str] = field(default_factory=dict)    # region -> why it gave up
    pending: tuple[str, ...] = ()                              # regions still without it


class ReplicationCompletion(Protocol):
    """What delivery asks replication (a node without replication has no such
    thing, and fires neither ``replicated`` nor ``replication_failed``)."""

    async def wait(self, repository: str, digest: str, *, deadline_s: float) -> Completion:
        """Returns as soon as every allowed replica holds ``digest`` in
        ``repository`` (``complete``) or one of them has given up on it
        (``failures``), or when ``deadline_s`` has passed (neither)."""
        ...
