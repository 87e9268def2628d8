"""Active health checks for the routing layer: a probe that asks every node
``GET /v2/`` on a period and reports the verdict to ``NodeHealth``.

Passive detection (the proxy marking a node down when a connect is refused)
only sees a node that is gone; a node that accepts connections but never
answers (stopped, or isolated behind a stalled link) is noticed here, within
``interval_s + timeout_s``. The probe owns only its loop and its verdicts;
what a verdict does to routing is ``cluster.routing.policy``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

from .policy import NodeEndpoint, NodeHealth, Replicas

log = structlog.get_logger("georeg.routing")


class HealthProbe:
    """Asks every node ``GET /v2/`` every ``interval_s`` and reports the verdict
    to ``health``: any answer below 500 (401 and 429 included) is up; a
    5xx, a refused connection or no answer within ``timeout_s`` is down.

    Passive detection only sees refused connections; this is what notices a
    node that accepts but never answers (stopped, isolated behind a stalled
    link) within ``interval_s + timeout_s``.
    """

    def __init__(self, nodes: Callable[[], list[NodeEndpoint]] | Replicas, health: NodeHealth,
                 *, interval_s: float = 0.5, timeout_s: float = 1.0) -> None:
        if isinstance(nodes, Replicas):
            replicas = nodes
            nodes = lambda: [n for g in replicas for n in g.nodes]  # noqa: E731
        self._nodes = nodes
        self.health = health
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def probe_all(self) -> None:
        nodes = self._nodes()
        verdicts = await asyncio.gather(*(self.probe(n) for n in nodes))
        for node, (up, reason) in zip(nodes, verdicts, strict=True):
            was = self.health.healthy(node.name)
            self.health.report(node.name, up, reason)
            if was != up:
                log.info("node_health", node=node.name, up=up, reason=reason)

    async def probe(self, node: NodeEndpoint) -> tuple[bool, str]:
        writer = None
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await asyncio.open_connection(node.host, node.port)
                writer.write(b"GET /v2/ HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n"
                             b"User-Agent: georeg-health-probe\r\n\r\n"
                             % (node.host.encode(), node.port))
                line = await reader.readline()
        except TimeoutError:
            return False, f"no answer to GET /v2/ within {self.timeout_s}s"
        except OSError as exc:
            return False, f"GET /v2/ failed: {exc.strerror or exc}"
        finally:
            if writer is not None:
                writer.transport.abort()
        fields = line.split()
        if len(fields) < 2 or not fields[1].isdigit():
            return False, f"GET /v2/ answered {line[:80]!r}"
        status = int(fields[1])
        if status >= 500:
            return False, f"GET /v2/ answered {status}"
        return True, ""

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            await self.probe_all()
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))
