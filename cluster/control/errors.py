"""What the control plane refuses, and why: every refusal of a cluster
operation (a replica, a fault, a restore) is a ``ClusterError`` whose message
says what to do instead. Adapters map them to their own surface: the
management API to an HTTP status and code, the CLI to an exit code."""

from __future__ import annotations


class ClusterError(Exception):
    """A request the cluster cannot honour; the message says why and what to do."""

    status = 400
    code = "BadRequest"


class ControlPlaneUnavailable(ClusterError):
    """The home region, which holds the control plane, cannot be reached."""

    status = 503
    code = "ControlPlaneUnavailable"


class NodeRefusal(ClusterError):
    """A node refused a request the control plane passed on to it (a
    configuration write it found invalid, a quorum it could not reach): its
    status, and its message as the reason."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class RegionUnavailable(ClusterError):
    """A region that had to be asked (it may hold what was asked for) cannot be."""

    status = 503
    code = "RegionUnavailable"


class PortInUse(ClusterError):
    """A port the cluster's plan gives to a listener (a link, an endpoint, the
    management API, a node) is held by something else. ``Cluster.start`` tries
    another range when the spec leaves the ports to it (``port_base = 0``)."""

    status = 409
    code = "PortInUse"


class Unauthorized(ClusterError):
    """No credential, or not one this cluster knows."""

    status = 401
    code = "Unauthorized"


class Forbidden(ClusterError):
    """A known caller asking for something its role does not allow."""

    status = 403
    code = "Forbidden"


class TooManyRequests(ClusterError):
    """A bound reached (sessions, streams, tokens): try again later."""

    status = 429
    code = "TooManyRequests"


class TooLarge(ClusterError):
    """A request body past its bound (sent with a length or without: chunked)."""

    status = 413
    code = "PayloadTooLarge"


class NotFound(ClusterError):
    status = 404
    code = "NotFound"


class Conflict(ClusterError):
    """The object exists already, or something still uses it."""

    status = 409
    code = "Conflict"


class QuotaExceeded(ClusterError):
    """One more would pass a limit of the registry's tier (ACR-SEMANTICS.md, Tiers)."""

    status = 409
    code = "QuotaExceeded"


def quota_exceeded(resource_type: str, noun: str, tier: str, limits: dict[str, int],
                   count: int) -> QuotaExceeded:
    """The refusal of one more ``noun`` at the tier's limit: ACR's own message
    (``QuotaExceeded``, "Quota exceeded for resource type webhooks for the
    registry SKU Basic", seen for webhooks; the same shape is assumed for the
    other counted resources), then what georeg knows: the limit, the count,
    the way out. ``limits``: the resource's limit in every tier."""
    limit = limits[tier] if tier in limits else max(limits.values())
    larger = [f"{t} ({n:,})" for t, n in limits.items() if n > limit]
    return QuotaExceeded(f"Quota exceeded for resource type {resource_type} for the registry SKU "
                         f"{tier}: the {tier} tier allows {limit:,} {noun} and this registry has "
                         f"{count:,}: delete one" + (f", or move to {' or '.join(larger)}"
                                                     if larger else ""))
