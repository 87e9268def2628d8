"""The node's inventory, for ``georeg verify``: read-only, beside the OCI API.

    GET /georeg/v1/inventory        everything stored, with stamps and origins
                                    (shape: ``registry_node.inventory``)

Built in a worker thread: it walks the whole metadata database and the blob
directory, which the event loop must never wait on.
"""

from __future__ import annotations

from aiohttp import web

from .. import inventory
from .common import json_response, registry


async def get_inventory(request: web.Request) -> web.Response:
    reg = registry(request)
    meta = reg.meta
    found = await reg.run_blocking(
        lambda: inventory.build(meta.scan, reg.blobs.digests(), meta.last_seq))
    return json_response(found)
