"""The node's aiohttp application factory.

``init_app`` wires routes, middlewares and the lifetimes of the node's
resources (storage, garbage collector) as ``cleanup_ctx`` generators, so the
same factory serves the CLI, the cluster supervisor and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from .api.common import REGISTRY
from .api.middlewares import access, common_headers
from .api.routes import add_routes
from .config import NodeConfig
from .gc import GarbageCollector
from .manifest import MAX_MANIFEST_SIZE
from .node import Node

NODE: web.AppKey[Node] = web.AppKey("node", Node)


def init_app(config: NodeConfig) -> web.Application:
    app = web.Application(middlewares=[access], client_max_size=MAX_MANIFEST_SIZE + 1)
    app.on_response_prepare.append(common_headers)
    add_routes(app.router)
    app.cleanup_ctx.append(_storage(config))
    app.cleanup_ctx.append(_garbage_collector)
    return app


def _storage(config: NodeConfig):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        node = Node.open(config)
        app[NODE] = node
        app[REGISTRY] = node.registry
        yield
        node.close()

    return ctx


async def _garbage_collector(app: web.Application) -> AsyncIterator[None]:
    node = app[NODE]
    gc = GarbageCollector(node.registry, grace_s=node.config.gc_grace_s,
                          upload_ttl_s=node.config.upload_ttl_s,
                          interval_s=node.config.gc_interval_s)
    task = asyncio.create_task(gc.run(), name="gc")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
