"""The data plane's middleware chain: request ids, the access log, and the
translation of every refusal into an OCI error body — with its outcome, and
counted in the node's metrics (the wire contract is in ``registry_node.errors``).

Later layers (authentication, throttling, network rules) join this chain;
handlers never need to know about them.
"""

from __future__ import annotations

import os
import re
import time

import structlog
from aiohttp import web

from ..errors import ErrorCode, Outcome, RegistryError, storage_failure
from .metrics import METRICS

log = structlog.get_logger("georeg.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Methods that ask for no change: whatever fails under them, nothing happened.
_READS = frozenset({"GET", "HEAD"})
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
HEALTH_PATH = "/georeg/v1/node"


def request_id(asked: str | None) -> str:
    """The client's ``X-Request-Id`` when it is a sane token, else a fresh one."""
    if asked and _REQUEST_ID.fullmatch(asked):
        return asked
    return os.urandom(8).hex()


def error_response(error: RegistryError, request: web.Request) -> web.Response:
    """The OCI error body of ``error``, counted in the node's metrics."""
    import msgspec

    request.app[METRICS].error(error)
    headers = {"Content-Type": "application/json", **error.headers}
    return web.Response(status=error.status, body=msgspec.json.encode(error.body()), headers=headers)


def _from_http(exc: web.HTTPException, request: web.Request) -> RegistryError:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return RegistryError(ErrorCode.UNSUPPORTED, f"{request.method} is not allowed on {request.path}",
                             message="method not allowed", headers={"Allow": ",".join(sorted(exc.allowed_methods))})
    if isinstance(exc, web.HTTPNotFound):
        return RegistryError(ErrorCode.UNSUPPORTED, f"no endpoint at {request.path}",
                             message="not found", status=404)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return RegistryError(ErrorCode.SIZE_INVALID, exc.text, message="request too large", status=413)
    return RegistryError(ErrorCode.UNSUPPORTED, exc.text, message=exc.reason, status=exc.status)


@web.middleware
async def access(request: web.Request, handler) -> web.StreamResponse:
    request[REQUEST_ID] = rid = request_id(request.headers.get("X-Request-Id"))
    started = time.perf_counter()
    status = 500
    try:
        try:
            response = await handler(request)
        except RegistryError as exc:
            response = error_response(exc, request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = error_response(_from_http(exc, request), request)
        status = response.status
        return response
    except (ConnectionResetError, ConnectionError) as exc:
        status = 499  # the client went away; nothing to answer
        log.info("client_gone", rid=rid, error=str(exc) or type(exc).__name__)
        raise
    except Exception as exc:
        refusal = storage_failure(exc, read=request.method in _READS)
        if refusal is not None:
            # A full disk refuses before anything changed: what is stored stays
            # intact. An EIO says whether it took effect (``errors``).
            log.warning("storage_failure", rid=rid, method=request.method, path=request.path,
                        error=str(exc))
            status = refusal.status
            return error_response(refusal, request)
        log.exception("unhandled", rid=rid, method=request.method, path=request.path)
        status = 500
        # A bug or an I/O error (a failed WAL sync) may strike after a commit:
        # a write that fails this way may have happened; a read changed nothing.
        outcome = Outcome.DEFINITE if request.method in _READS else Outcome.INDEFINITE
        return error_response(RegistryError(ErrorCode.UNKNOWN, {"request_id": rid},
                                            outcome=outcome), request)
    finally:
        # The supervisor's health checks (once a second) are not worth a line each.
        quiet = status == 200 and request.path == HEALTH_PATH
        (log.debug if quiet else log.info)(
            "request", rid=rid, method=request.method, path=request.path, status=status,
            ms=round((time.perf_counter() - started) * 1000, 2), remote=request.remote)


async def common_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Docker-Distribution-API-Version"] = "registry/2.0"
    rid = request.get(REQUEST_ID)
    if rid:
        response.headers["X-Request-Id"] = rid
