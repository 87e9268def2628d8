"""end-1: ``GET /v2/`` — the API version check every client starts with."""

from __future__ import annotations

from aiohttp import web

from .common import json_response


async def version_check(request: web.Request) -> web.Response:
    return json_response({})
