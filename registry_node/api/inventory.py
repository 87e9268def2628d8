"""What the node stores, read-only, beside the OCI API: its inventory for
``georeg verify``, and its storage usage for ``georeg registry show-usage``.

    GET /georeg/v1/inventory        everything stored, with stamps and origins
                                    (shape: ``registry_node.inventory``)
    GET /georeg/v1/usage            {"bytes", "blob_bytes", "blobs", "manifest_bytes",
                                     "manifests", "recycled_bytes", "recycled",
                                     "limit_bytes", "limit", "tier"}

The inventory is built in a worker thread: it walks the whole metadata
database and the blob directory, which the event loop must never wait on.
The usage is one value kept on write (``registry_node.usage``): no walk.
"""

from __future__ import annotations

from aiohttp import web

from .. import inventory
from .common import CONFIGURATION, json_response, registry


async def get_inventory(request: web.Request) -> web.Response:
    reg = registry(request)
    meta = reg.meta
    found = await reg.run_blocking(
        lambda: inventory.build(meta.scan, reg.blobs.digests(), meta.last_seq))
    return json_response(found)


async def get_usage(request: web.Request) -> web.Response:
    reg = registry(request)
    limit, source = reg.storage_limit()
    return json_response({**reg.meta.usage.as_dict(), "limit_bytes": limit, "limit": source,
                          "tier": request.app[CONFIGURATION].tier()})
