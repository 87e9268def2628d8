"""The node's internal routes, kept for the cluster around it.

``/georeg/...`` (fault injection's seams, the inventory, registry
configuration, the node's own description) and ``/metrics`` serve the
supervisor, the management plane, ``georeg verify`` and fault injection, never
a registry client; endpoints do not forward them (``cluster.routing.policy``).
With an internal credential configured (``georeg node
--internal-credential-file``; a cluster with ``auth = "token"`` gives every
node the same one), they answer only a request that carries it, as
``Authorization: Bearer <credential>``; any other gets ``401 UNAUTHORIZED``
before a handler runs (checked by the node's one access middleware:
``api.auth.authenticate`` with auth, ``api.throttling.open_access`` without).

The one exception is ``GET /georeg/v1/replication/status``, which endpoints
forward: a question a registry client asks about an image it can pull. It
needs no internal credential; on a node with auth on it needs ``pull`` on the
repository it asks about, as a manifest read does (``api.auth``), or the
internal credential.

The same credential on a registry route admits the request without the
data-plane gate (``api.auth``): it is the cluster itself asking (the
management plane listing or deleting a repository in every region,
``georeg verify`` reading what every node holds), not a client.

Invariants: the credential is compared in constant time and never logged; a
refusal says what is needed, never what was sent.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from ..errors import ErrorCode, RegistryError

INTERNAL_CREDENTIAL: web.AppKey[bytes] = web.AppKey("internal_credential", bytes)
PUBLIC_PATHS = frozenset({"/georeg/v1/replication/status"})


def internal_route(path: str) -> bool:
    return (path.startswith("/georeg/") or path == "/metrics") and path not in PUBLIC_PATHS


def expected_header(credential: str) -> bytes:
    return f"Bearer {credential}".encode()


def internal_headers(expected: bytes | None) -> dict[str, str]:
    """The headers of the node's own requests to other nodes' internal routes."""
    return {} if expected is None else {"Authorization": expected.decode()}


def carries_credential(sent: str | None, expected: bytes) -> bool:
    """Whether ``sent`` (an ``Authorization`` value) is the internal credential,
    compared in constant time."""
    return sent is not None and hmac.compare_digest(sent.encode(errors="replace"), expected)


def refusal() -> RegistryError:
    return RegistryError(
        ErrorCode.UNAUTHORIZED, "this route serves the cluster itself (supervisor, management "
        "API, georeg verify) and needs the cluster's internal credential",
        message="authentication required")



def cluster_request(authorization: str | None, path: str, expected: bytes | None) -> bool:
    """The rule of a node without auth, given the internal credential it expects
    (``expected``; None: none, and then every route is open): True for a request
    that carries it (the cluster itself: it skips everything after), False for
    any other request to a registry route; any other to an internal route is
    refused (``refusal``). A node with auth applies the same rule in
    ``api.auth.authenticate``, where internal routes answer no one when it has
    no credential."""
    if expected is None:
        return False
    if carries_credential(authorization, expected):
        return True
    if internal_route(path):
        raise refusal()
    return False
