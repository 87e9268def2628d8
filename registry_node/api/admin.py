"""Node administration beside the OCI API: the storage fault seam.

    GET /georeg/v1/faults/storage        {"full": false, "slow_ms": 0}
    PUT /georeg/v1/faults/storage        the same shape; what is absent is unchanged
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
