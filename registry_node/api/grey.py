"""The node's grey-failure seam (``registry_node.body_stall``), an internal route:

    GET /georeg/v1/faults/stall     {"bodies": false}
    PUT /georeg/v1/faults/stall     {"bodies": true}: blob bodies stall until
                                    {"bodies": false}
"""

from __future__ import annotations

import json

from aiohttp import web

from ..body_stall import BodyStall
from ..errors import ErrorCode, RegistryError
from .common import json_response

BODY_STALL: web.AppKey[BodyStall] = web.AppKey("body_stall", BodyStall)


async def get_stall(request: web.Request) -> web.Response:
    return json_response(request.app[BODY_STALL].as_dict())


async def put_stall(request: web.Request) -> web.Response:
    try:
        body = json.loads(await request.read() or b"{}")
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("bodies"), bool):
        raise RegistryError(ErrorCode.UNSUPPORTED, 'send {"bodies": true|false}',
                            message="bad fault", status=400)
    stall = request.app[BODY_STALL]
    stall.set(body["bodies"])
    return json_response(stall.as_dict())
