"""Node administration beside the OCI API: the storage and clock fault seams.

    GET /georeg/v1/faults/storage        {"full": false, "slow_ms": 0}
    PUT /georeg/v1/faults/storage        the same shape; what is absent is unchanged
    GET /georeg/v1/faults/clock          the node's clock: skew, peers' offsets, verdict
    PUT /georeg/v1/faults/clock          {"offset_s": 300, "drift": 1, "since_ns": N}: the
                                         whole skew ({} resets it; ``registry_node.clock``)
"""

from __future__ import annotations

import json

from aiohttp import web

from ..errors import ErrorCode, RegistryError
from .common import json_response, registry


async def get_storage_faults(request: web.Request) -> web.Response:
    return json_response(registry(request).meta.faults.as_dict())


async def put_storage_faults(request: web.Request) -> web.Response:
    try:
        body = json.loads(await request.read() or b"{}")
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise RegistryError(ErrorCode.UNSUPPORTED, 'send {"full": bool, "slow_ms": number}',
                            message="bad fault", status=400)
    faults = registry(request).meta.faults
    if "full" in body:
        faults.full = bool(body["full"])
    if "slow_ms" in body:
        try:
            faults.slow_ms = max(0.0, float(body["slow_ms"]))
        except (TypeError, ValueError):
            raise RegistryError(ErrorCode.UNSUPPORTED, "slow_ms must be a number",
                                message="bad fault", status=400) from None
    return json_response(faults.as_dict())


async def get_clock(request: web.Request) -> web.Response:
    node = registry(request)
    return json_response(node.clock.describe(node.hlc.last))


async def put_clock_fault(request: web.Request) -> web.Response:
    try:
        body = json.loads(await request.read() or b"{}")
        if not isinstance(body, dict):
            raise ValueError
        offset_s = float(body.get("offset_s", 0.0))
        drift = float(body.get("drift", 1.0))
        since = body.get("since_ns")
        since_ns = None if since is None else int(since)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise RegistryError(ErrorCode.UNSUPPORTED, 'send {"offset_s": number, "drift": number, '
                            '"since_ns": integer}', message="bad fault", status=400) from None
    node = registry(request)
    try:
        node.clock.clock.skew(offset_s, drift, since_ns)
    except ValueError as exc:
        raise RegistryError(ErrorCode.UNSUPPORTED, str(exc), message="bad fault",
                            status=400) from None
    return json_response(node.clock.describe(node.hlc.last))
