"""The node's Prometheus metrics, served at ``GET /metrics``.

The node counts its own error answers here, by OCI code, HTTP status and
outcome (the wire contract in ``registry_node.errors``); an extension
(replication: lag, transfers, queue depths, anti-entropy) registers its collector in the
same registry for as long as it runs, so one scrape shows both. Each app has
a registry of its own, so several nodes can share a process (tests, the
Python API) without mixing their numbers.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from ..errors import RegistryError


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.errors = Counter(
            "georeg_http_errors_total",
            "Error answers of the node's HTTP API, by OCI code, HTTP status and outcome "
            "(definite: the request did not take effect; indefinite: it may have)",
            ["code", "status", "outcome"], registry=self.registry)

    def error(self, error: RegistryError) -> None:
        self.errors.labels(error.code.name, str(error.status), error.outcome.value).inc()


METRICS: web.AppKey[NodeMetrics] = web.AppKey("metrics", NodeMetrics)


async def get_metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
