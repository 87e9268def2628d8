"""The node's Prometheus metrics, served at ``GET /metrics``.

The node counts its own error answers here, by OCI code, HTTP status and
outcome (the wire contract in ``registry_node.errors``), and the requests
throttling refused (``georeg_throttled_requests_total{replica, kind,
identity, limit}``: ``identity`` is the principal's subject, ``anonymous``,
or ``-`` on a node without auth; ``limit`` the one that refused: replica,
identity or fault; a 429 is also one of the error answers); an extension
(replication: lag, transfers, queue depths, anti-entropy) registers its collector in the
same registry for as long as it runs, so one scrape shows both. Every node
shows its blob bandwidth budgets (``registry_node.bandwidth``), which a tier
change may turn on or off while it runs:

    georeg_bandwidth_limit_bytes_per_second{direction}   the rate (0: unshaped)
    georeg_bandwidth_bytes_total{direction}              blob bytes the budget let pass
    georeg_bandwidth_wait_seconds_total{direction}       time transfers waited for it,
                                                         summed over transfers
    georeg_retention_manifests_deleted_total             untagged manifests its retention
                                                         sweeps deleted (``untagged``)

Each app has
a registry of its own, so several nodes can share a process (tests, the
Python API) without mixing their numbers.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..bandwidth import Bandwidth
from ..errors import RegistryError
from ..throttle import Throttle
from ..untagged import UntaggedRetention


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

    def watch_bandwidth(self, bandwidth: Bandwidth) -> None:
        self.registry.register(_Budgets(bandwidth))

    def watch_retention(self, retention: UntaggedRetention) -> None:
        """``georeg_retention_manifests_deleted_total``: untagged manifests this
        node's retention sweeps deleted (``registry_node.untagged``)."""
        self.registry.register(_RetentionDeletes(retention))


class _RetentionDeletes:
    def __init__(self, retention: UntaggedRetention) -> None:
        self.retention = retention

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "georeg_retention_manifests_deleted",
            "Untagged manifests deleted by this node's retention sweeps",
            value=self.retention.deleted_total)


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


class _Budgets:
    """Read at scrape time: the budgets count for themselves, so a transfer
    pays nothing for its metrics."""

    def __init__(self, bandwidth: Bandwidth) -> None:
        self.bandwidth = bandwidth      # its budgets read at each scrape: a tier change replaces them

    def collect(self) -> Iterator[Metric]:
        limit = GaugeMetricFamily("georeg_bandwidth_limit_bytes_per_second",
                                  "Blob bandwidth this node may use, by direction (0: unshaped)",
                                  labels=["direction"])
        passed = CounterMetricFamily("georeg_bandwidth_bytes",
                                     "Blob bytes the node's bandwidth budget let pass",
                                     labels=["direction"])
        waited = CounterMetricFamily("georeg_bandwidth_wait_seconds",
                                     "Time blob transfers waited for the bandwidth budget, "
                                     "summed over transfers", labels=["direction"])
        for direction, budget in (("download", self.bandwidth.download),
                                  ("upload", self.bandwidth.upload)):
            limit.add_metric([direction], budget.rate if budget else 0.0)
            passed.add_metric([direction], budget.granted if budget else 0)
            waited.add_metric([direction], budget.waited_s if budget else 0.0)
        yield from (limit, passed, waited)

    def describe(self):
        return []


METRICS: web.AppKey[NodeMetrics] = web.AppKey("metrics", NodeMetrics)


async def get_metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
