"""The node's sweep of untagged manifests (``registry_node.untagged``): a
node-internal route, never forwarded by an endpoint.

    POST /georeg/v1/retention/sweep   {"origins": [REGION, ...], "limit"?: N,
                                       "settleSeconds"?: S}: one sweep of the manifests
                                       first pushed in those regions; answers its report

The control process asks one node of each region, naming that region (and,
for the home region, the regions that are no longer replicas): which node
decides for which manifests is its decision, made once (``untagged``).
"""

from __future__ import annotations

import json

from aiohttp import web

from ..errors import ErrorCode, RegistryError
from ..untagged import SETTLE_S, SWEEP_LIMIT
from .common import RETENTION, json_response


def _invalid(reason: str) -> RegistryError:
    return RegistryError(ErrorCode.UNSUPPORTED, reason, message="invalid sweep request",
                         status=400)


async def sweep(request: web.Request) -> web.Response:
    try:
        body = json.loads(await request.content.read(64 * 1024) or b"{}")
    except ValueError:
        raise _invalid("the body is JSON") from None
    if not isinstance(body, dict) or set(body) - {"origins", "limit", "settleSeconds"}:
        raise _invalid('send {"origins": [region, ...], "limit"?, "settleSeconds"?}')
    origins = body.get("origins")
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise _invalid("origins is a list of region names")
    limit = body.get("limit", SWEEP_LIMIT)
    settle = body.get("settleSeconds", SETTLE_S)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
        raise _invalid("limit is a whole number from 1 to 10000")
    if isinstance(settle, bool) or not isinstance(settle, int | float) or not 0 <= settle <= 86_400:
        raise _invalid("settleSeconds is a number from 0 to 86400")
    report = await request.app[RETENTION].sweep(origins, limit=limit, settle_s=float(settle))
    return json_response(report.as_dict())
