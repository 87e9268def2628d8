"""The OCI error codes a node can answer with, mapped once to their HTTP status.

Everything that refuses a client request raises :class:`RegistryError` with one of
these codes; the HTTP layer turns it into the spec's error body
(``{"errors": [{"code", "message", "detail"}]}``). A client mistake therefore
never surfaces as a 500: only a bug or a storage fault does.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


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
    oversized manifest)."""

    def __init__(
        self,
        code: ErrorCode,
        detail: Any = None,
        *,
        message: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.code = code
        self.detail = detail
        self.message = message or code.message
        self.status = status or code.status
        self.headers = headers or {}
        super().__init__(f"{code.name}: {self.message}" + (f" ({detail})" if detail else ""))

    def body(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"code": self.code.name, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return {"errors": [entry]}
