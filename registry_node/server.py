"""Running one node as a process: serve until SIGTERM or SIGINT, then stop cleanly.

On start it prints one line to stdout naming the URL it serves (the actual
port, when asked for port 0; ``https`` when it serves TLS), so scripts and
supervisors know where it is;
logs go to stderr. A node that cannot listen because its HTTP or replication
port is in use exits with ``EXIT_ADDRESS_IN_USE``, so that whoever started it
can tell that from any other failure (a supervisor then picks other ports).
"""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import Callable, Sequence

import structlog
from aiohttp import web

from . import broken_build
from .app import HANDOFF, Extension, init_app
from .config import NodeConfig

log = structlog.get_logger("georeg.node")

EXIT_ADDRESS_IN_USE = 3


async def serve(config: NodeConfig, *, extensions: Sequence[Extension] = (),
                announce: Callable[[str], None] | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve ``config`` until ``stop`` is set or the process receives SIGTERM/SIGINT."""
    app = init_app(config, extensions)
    tls = tls_context(config)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=config.shutdown_grace_s)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=1024, reuse_address=True,
                           ssl_context=tls)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # the real port when 0 was asked for
        if tls is None:
            # A handed-over socket would carry plaintext from a client that
            # speaks TLS: a node serving HTTPS takes none (endpoints relay).
            app[HANDOFF].start(config.host, port)
        url = f"{config.scheme}://{config.host}:{port}/v2/"
        where = config.region + (f"/{config.zone}" if config.zone else "")
        log.info("listening", url=url, region=config.region, zone=config.zone,
                 data_dir=str(config.data_dir))
        if config.unchecked_replication:
            log.warning(broken_build.LOG_EVENT, variable=broken_build.VARIABLE,
                        message="TEST ONLY: this node stores replicated bytes unchecked; "
                                "never run it outside tests")
        extra = "".join(f", {ext.describe()}" for ext in extensions if hasattr(ext, "describe"))
        (announce or _print)(f"georeg node {where} listening on {url} (data dir {config.data_dir}{extra})")
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()
    log.info("stopped")


def tls_context(config: NodeConfig) -> ssl.SSLContext | None:
    """The node's server-side TLS (None: plain HTTP); ``OSError`` or
    ``ssl.SSLError`` if its certificate or key cannot be loaded."""
    if config.tls_cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    return context


def _print(line: str) -> None:
    print(line, flush=True)


def run(config: NodeConfig, extensions: Sequence[Extension] = ()) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(config, extensions=extensions))
        return
    uvloop.run(serve(config, extensions=extensions))
