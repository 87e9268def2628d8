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


class RegionUnavailable(ClusterError):
    """A region that had to be asked (it may hold what was asked for) cannot be."""

    status = 503
    code = "RegionUnavailable"


class NotFound(ClusterError):
    status = 404
    code = "NotFound"
