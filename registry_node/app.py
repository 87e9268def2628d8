"""The node's aiohttp application factory.

``init_app`` wires routes, middlewares and the lifetimes of the node's
resources (storage, garbage collector) as ``cleanup_ctx`` generators, so the
same factory serves the CLI, the cluster supervisor and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc as python_gc
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from aiohttp import web

from . import allocator
from .api.common import REGISTRY
from .api.middlewares import access, common_headers
from .api.routes import add_routes
from .config import NodeConfig
from .gc import GarbageCollector
from .manifest import MAX_MANIFEST_SIZE
from .node import Node

NODE: web.AppKey[Node] = web.AppKey("node", Node)


class Extension(Protocol):
    """Something that runs inside a node beside its OCI API (replication does):
    it may add routes, and lives as long as the node's storage is open."""

    def add_routes(self, router: web.UrlDispatcher) -> None: ...

    def lifetime(self, app: web.Application) -> AsyncIterator[None]: ...


def init_app(config: NodeConfig, extensions: Sequence[Extension] = ()) -> web.Application:
    app = web.Application(middlewares=[access], client_max_size=MAX_MANIFEST_SIZE + 1)
    app.on_response_prepare.append(common_headers)
    add_routes(app.router)
    app.cleanup_ctx.append(_storage(config))
    for extension in extensions:
        extension.add_routes(app.router)
        app.cleanup_ctx.append(extension.lifetime)
    app.cleanup_ctx.append(_garbage_collector)
    app.cleanup_ctx.append(_memory_trim)
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


MEMORY_TRIM_INTERVAL_S = 15.0


async def _memory_trim(app: web.Application) -> AsyncIterator[None]:
    """Give freed heap memory back to the kernel now and then (glibc's
    ``malloc_trim``): an idle node should not keep what its busiest moment
    needed. A no-op where glibc is not the allocator."""
    trim = allocator.trimmer()
    task = asyncio.create_task(_trim_forever(trim, app[NODE].meta), name="memory-trim") \
        if trim else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _trim_forever(trim, meta) -> None:
    commits = meta.commits
    while True:
        await asyncio.sleep(MEMORY_TRIM_INTERVAL_S)
        if meta.commits != commits:
            # After writes, a full collection first: reference cycles (aiohttp
            # and grpc leave some per request) hold buffers the trim could not
            # return. A few tens of ms, and only after activity: an idle node
            # skips it.
            commits = meta.commits
            python_gc.collect()
        trim(0)
