"""The OCI error codes a node can answer with, mapped once to their HTTP status,
and the outcome every failure reports: did the request take effect?

Everything that refuses a client request raises :class:`RegistryError` with one of
these codes; the HTTP layer turns it into the spec's error body. A client
mistake therefore never surfaces as a 500: only a bug or a storage fault does.

Wire contract of an error answer (part of the node's API, and of the routing
endpoints', which answer their own errors in the same shape)::

    {"errors": [{"code": "UNAVAILABLE", "message": "write not confirmed by a second zone",
                 "detail": {"outcome": "indefinite", "reason": "the write is stored in …", …}}]}

* ``code`` is an ``ErrorCode`` name: the distribution spec's codes, plus
  ``UNAVAILABLE`` and ``UNKNOWN`` for the server's own trouble. ``message``
  and ``detail.reason`` are for people; nothing should parse them.
* A **4xx** refuses the request as sent: nothing changed (definite). Its
  ``detail`` is whatever its code carries (``{"digest": …}``, a text, or none)
  — but for an operation of several commits cut short (below), whose 4xx is
  indefinite and has an object ``detail`` as a 5xx does.
* Every **5xx** has an object ``detail`` with ``"outcome"`` (an ``Outcome``
  value), ``"reason"`` when there is more to say than the message, and fields
  particular to the cause:

  ``"definite"``
      The request did not take effect and will not. Retrying is safe, and
      succeeds once the cause is gone.
  ``"indefinite"``
      It may have taken effect, or may yet: stored on this node but not
      confirmed by a second zone (it replicates when one returns), or cut
      short after part of it was done. Read it back to learn which. Retrying
      is safe because every registry write is idempotent by digest — a blob
      is stored under its digest, a manifest under its digest or a tag that
      then names that digest — but retry the *push* (``HEAD`` the blob, then
      upload it if missing), not the upload session: a session whose
      completion failed may be gone (``404 BLOB_UPLOAD_UNKNOWN``).

  The 5xx a node answers, and their outcome:

  ===  ===================================  =========================================
  503  ``write quorum unavailable``         definite: refused before any change (zone
                                            quorum out of reach, ``replicator.quorum``)
  503  ``write not confirmed by a second    indefinite: committed here, no second zone
       zone``                               confirmed it in time
  507  ``disk full``                        definite: refused before any change
                                            (``storage_faults``)
  503  ``disk I/O error``                   definite for a read, and for a write the
                                            disk failed before it began (an injected
                                            EIO); indefinite for a real EIO on a write
  503  ``blob being repaired``              definite: the replica's copy failed its
                                            integrity check and is being fetched again
                                            (``blob_repair``); ``Retry-After`` says when
  500  ``unknown error`` (a bug, an I/O     definite for ``GET``/``HEAD`` (reads change
       error such as a failed WAL sync)     nothing), indefinite for every write
  ===  ===================================  =========================================

  A blob whose copy here failed its integrity check and that no replica
  residency allows could replace is not served: ``404 BLOB_UNKNOWN``, as its
  ``HEAD`` answers, with ``detail.repair: "unrepairable"`` and the reason
  (``blob_repair``) — a 4xx, since retrying cannot change it; pushing the
  blob again does.

  Any of them is indefinite for an operation of several commits that had
  made some before it failed (``DELETE /acr/v1/<name>``: one delete per
  manifest and blob); ``detail.done`` says what was done. So is a 4xx that
  refused such an operation midway (a lock or an index that replication
  brought in between: ``405 REGISTRY_DISALLOWED_OPERATION``, ``403 DENIED``),
  with ``"outcome": "indefinite"`` and ``done`` in its ``detail`` too.

* The same outcome labels the node's metric of error answers,
  ``georeg_http_errors_total{code, status, outcome}`` (``api.metrics``); a 4xx
  counts as ``definite``, but for one cut short midway (``indefinite``).

``Outcome`` is the project's one failure taxonomy (after Maelstrom):
replication between nodes uses it too, with a third value, ``permanent``,
for failures no retry can mend (``replicator.errors``). HTTP answers use
only the first two.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from .storage_faults import InjectedIOError, is_disk_full, is_io_error
from .tiers import format_size


class Outcome(Enum):
    """Whether a failed operation took effect."""

    DEFINITE = "definite"        # it did not happen and will not; safe to retry
    INDEFINITE = "indefinite"    # it may have happened; a retry must be idempotent
    PERMANENT = "permanent"      # replication only: retrying cannot help; record why


class ErrorCode(Enum):
    """OCI distribution-spec error codes, with the status and message each one carries."""

    BLOB_UNKNOWN = (404, "blob unknown to registry")
    BLOB_UPLOAD_INVALID = (400, "blob upload invalid")
    BLOB_UPLOAD_UNKNOWN = (404, "blob upload unknown to registry")
    DIGEST_INVALID = (400, "provided digest did not match uploaded content")
    MANIFEST_BLOB_UNKNOWN = (400, "manifest references a manifest or blob unknown to registry")
    MANIFEST_INVALID = (400, "manifest invalid")
    MANIFEST_UNKNOWN = (404, "manifest unknown to registry")
    NAME_INVALID = (400, "invalid repository name")
    NAME_UNKNOWN = (404, "repository name not known to registry")
    SIZE_INVALID = (400, "provided length did not match content length")
    UNAUTHORIZED = (401, "authentication required")
    DENIED = (403, "requested access to the resource is denied")
    UNSUPPORTED = (405, "the operation is unsupported")
    TOOMANYREQUESTS = (429, "too many requests")
    # ACR's answer to an operation its changeable attributes forbid (a push to a
    # write-locked tag, a delete of a delete-locked image, …): ``locks``.
    REGISTRY_DISALLOWED_OPERATION = (
        405, "The operation is disallowed on this registry, repository or image.")
    # Beyond the OCI list, as CNCF distribution registers them: a byte range that
    # cannot be satisfied (blob reads, out-of-order upload chunks) and a bad `n`.
    RANGE_INVALID = (416, "invalid content range")
    PAGINATION_NUMBER_INVALID = (400, "invalid number of results requested")
    # Not in the OCI list, but used by every registry for server-side trouble, so a
    # client sees a spec-shaped body even then.
    UNAVAILABLE = (503, "service unavailable")
    UNKNOWN = (500, "unknown error")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def message(self) -> str:
        return self.value[1]


class RegistryError(Exception):
    """A refusal with an OCI code. ``status`` overrides the code's default status
    where the spec asks for a different one (416 for a bad range, 413 for an
    oversized manifest). ``outcome`` says whether a 5xx took effect; left out,
    a 4xx is definite and a 5xx indefinite — the safe reading, as for a gRPC
    failure mid-stream (``replicator.errors``)."""

    def __init__(
        self,
        code: ErrorCode,
        detail: Any = None,
        *,
        message: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        outcome: Outcome | None = None,
    ) -> None:
        self.code = code
        self.detail = detail
        self.message = message or code.message
        self.status = status or code.status
        self.headers = headers or {}
        if outcome is None:
            outcome = Outcome.DEFINITE if self.status < 500 else Outcome.INDEFINITE
        self.outcome = outcome
        super().__init__(f"{code.name}: {self.message}" + (f" ({detail})" if detail else ""))

    def indefinite(self, done: dict[str, Any]) -> RegistryError:
        """The same failure, for an operation of several commits that had already
        made some of them (``done`` says which)."""
        return RegistryError(self.code, {**self._fields(), "done": done}, message=self.message,
                             status=self.status, headers=self.headers,
                             outcome=Outcome.INDEFINITE)

    def _fields(self) -> dict[str, Any]:
        if isinstance(self.detail, dict):
            return self.detail
        return {} if self.detail is None else {"reason": self.detail}

    def body(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"code": self.code.name, "message": self.message}
        if self.status >= 500 or self.outcome is Outcome.INDEFINITE:
            entry["detail"] = {"outcome": self.outcome.value, **self._fields()}
        elif self.detail is not None:
            entry["detail"] = self.detail
        return {"errors": [entry]}


def disk_full() -> RegistryError:
    """The answer to a write the disk had no room for (ENOSPC, real or injected):
    refused before anything changed."""
    return RegistryError(ErrorCode.UNAVAILABLE, "the node's disk is full; writes are refused "
                         "until space is freed, reads keep working", message="disk full",
                         status=507, outcome=Outcome.DEFINITE)


def disk_io_error(outcome: Outcome) -> RegistryError:
    """The answer to a request the disk failed with EIO (real or injected)."""
    return RegistryError(ErrorCode.UNAVAILABLE, "the node's disk failed an I/O operation; "
                         "retry (another replica, through an endpoint, may answer)",
                         message="disk I/O error", headers={"Retry-After": "1"},
                         outcome=outcome)


def storage_failure(exc: BaseException, *, read: bool) -> RegistryError | None:
    """The answer to a request the disk failed (``exc``), or None if ``exc`` is
    not a disk's failure: a full disk refused before any change; an EIO
    changed nothing on a read, nor when it struck before its write began."""
    if is_disk_full(exc):
        return disk_full()
    if is_io_error(exc):
        definite = read or isinstance(exc, InjectedIOError)
        return disk_io_error(Outcome.DEFINITE if definite else Outcome.INDEFINITE)
    return None


def storage_limit_reached(limit: int, source: str, used: int, adding: int) -> RegistryError:
    """The answer to a client's upload or manifest that would take the
    registry past its storage limit: refused before anything changed, as
    ``403 DENIED`` — ACR documents no answer for its registry maximum, so the
    spec's code for a refused operation, with a message that says what to do.
    ``detail`` gives the numbers (bytes)."""
    return RegistryError(
        ErrorCode.DENIED,
        {"reason": f"the registry stores {format_size(used)} and this upload would add "
                   f"{format_size(adding)}, past {source} of {format_size(limit)}; delete images (their "
                   f"layers are reclaimed by garbage collection) or raise the limit. Reads "
                   f"and deletes keep working",
         "limit_bytes": limit, "used_bytes": used, "upload_bytes": adding},
        message=f"registry storage limit reached ({format_size(used)} of {format_size(limit)} used)")
