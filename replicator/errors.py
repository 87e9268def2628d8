"""The one error taxonomy of replication (after Maelstrom): every failure is

* **definite** — the operation did not happen and will not; safe to retry;
* **indefinite** — it may have happened; a retry must be idempotent (all of
  replication's operations are: applying anything twice is a no-op);
* **permanent** — retrying cannot help (the content is gone at the source, a
  residency rule forbids it, it is invalid); record why and move on.

Everything that talks to a peer raises ``ReplicationError`` with one of these,
so the retry helper and the status reporting need no knowledge of gRPC. The
taxonomy itself (``Outcome``) is the node's, shared with its HTTP answers
(``registry_node.errors``): one vocabulary for "did it happen?".
"""

from __future__ import annotations

import grpc

from registry_node.errors import Outcome

__all__ = ["Outcome", "ReplicationError", "definite", "from_grpc", "indefinite", "permanent"]


class ReplicationError(Exception):
    def __init__(self, outcome: Outcome, reason: str) -> None:
        super().__init__(f"{outcome.value}: {reason}")
        self.outcome = outcome
        self.reason = reason

    @property
    def retryable(self) -> bool:
        return self.outcome is not Outcome.PERMANENT


def definite(reason: str) -> ReplicationError:
    return ReplicationError(Outcome.DEFINITE, reason)


def indefinite(reason: str) -> ReplicationError:
    return ReplicationError(Outcome.INDEFINITE, reason)


def permanent(reason: str) -> ReplicationError:
    return ReplicationError(Outcome.PERMANENT, reason)


# How a gRPC status maps onto the taxonomy. UNAVAILABLE is definite only for a
# call that never reached the peer; mid-stream it is indefinite, which is the
# safe reading, and what we use — every replication operation is idempotent.
_BY_CODE: dict[grpc.StatusCode, Outcome] = {
    grpc.StatusCode.NOT_FOUND: Outcome.PERMANENT,
    grpc.StatusCode.PERMISSION_DENIED: Outcome.PERMANENT,
    grpc.StatusCode.FAILED_PRECONDITION: Outcome.PERMANENT,
    grpc.StatusCode.INVALID_ARGUMENT: Outcome.PERMANENT,
    grpc.StatusCode.UNIMPLEMENTED: Outcome.PERMANENT,
    # The peer's copy does not authenticate (rot, tampering): asking it again
    # cannot help; another peer may have a good copy.
    grpc.StatusCode.DATA_LOSS: Outcome.PERMANENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Outcome.DEFINITE,
    grpc.StatusCode.ABORTED: Outcome.DEFINITE,
}


def from_grpc(exc: grpc.aio.AioRpcError, what: str) -> ReplicationError:
    outcome = _BY_CODE.get(exc.code(), Outcome.INDEFINITE)
    return ReplicationError(outcome, f"{what}: {exc.code().name}: {exc.details() or ''}".rstrip(": "))
