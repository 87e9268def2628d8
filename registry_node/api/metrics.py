"""The node's Prometheus metrics, served at ``GET /metrics``.

The node counts its own error answers here, by OCI code, HTTP status and
outcome (the wire contract in ``registry_node.errors``), and the requests
throttling refused (``georeg_throttled_requests_total{replica, kind,
identity, limit}``: ``identity`` is the principal's subject, ``anonymous``,
or ``-`` on a node without auth; ``limit`` the one that refused: replica,
identity or fault; a 429 is also one of the error answers); an extension
(replication: lag, transfers, queue depths, anti-entropy) registers its collector in the
same registry for as long as it runs, so one scrape shows both. Each app has
a registry of its own, so several nodes can share a process (tests, the
Python API) without mixing their numbers.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily

from ..errors import RegistryError
from ..throttle import Throttle


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

    def track_throttle(self, throttle: Throttle, replica: str) -> None:
        """Throttling's refusals, read from its own counts at each scrape (nothing
        on the request path)."""
        self.registry.register(_Throttled(throttle, replica))


class _Throttled:
    def __init__(self, throttle: Throttle, replica: str) -> None:
        self.throttle = throttle
        self.replica = replica

    def collect(self):
        family = CounterMetricFamily(
            "georeg_throttled_requests",
            "Requests refused 429 by throttling, by replica, kind (read, write, delete, "
            "referrers), identity and the limit that refused (replica, identity, fault)",
            labels=["replica", "kind", "identity", "limit"])
        for (kind, identity, limit), count in sorted(self.throttle.refusals.items()):
            family.add_metric([self.replica, kind, identity or "-", limit], count)
        yield family

    def describe(self):
        return []


METRICS: web.AppKey[NodeMetrics] = web.AppKey("metrics", NodeMetrics)


async def get_metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
