"""The node's Prometheus metrics, served at ``GET /metrics``.

The node counts its own error answers here, by OCI code, HTTP status and
outcome (the wire contract in ``registry_node.errors``), and the requests
throttling refused (``georeg_throttled_requests_total{replica, kind,
identity, limit}``: ``identity`` is the principal's subject, ``anonymous``,
or ``-`` on a node without auth; ``limit`` the one that refused: replica,
identity or fault; a 429 is also one of the error answers); an extension
(replication: lag, transfers, queue depths, anti-entropy) registers its collector in the
same registry for as long as it runs, so one scrape shows both. Every node
counts the bit rot it found (``georeg_blob_quarantined_total``,
``georeg_blob_repairs_total``, ``georeg_blob_unrepairable_total``:
``registry_node.blob_repair``) and shows its blob bandwidth budgets (``registry_node.bandwidth``), which a tier
change may turn on or off while it runs:

    georeg_bandwidth_limit_bytes_per_second{direction}   the rate (0: unshaped)
    georeg_bandwidth_bytes_total{direction}              blob bytes the budget let pass
    georeg_bandwidth_wait_seconds_total{direction}       time transfers waited for it,
                                                         summed over transfers
    georeg_retention_manifests_deleted_total             untagged manifests its retention
                                                         sweeps deleted (``untagged``)

and its recycle bins (soft delete, ``registry_node.recycle_bin``):

    georeg_recycle_bin_purged_total{kind}                manifests / tags purged past their days
    georeg_recycle_bin_restored_total                    restores this node took from clients

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
from ..blob_repair import BlobRepair
from ..errors import RegistryError
from ..recycle_bin import RecycleBin
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

    def watch_repairs(self, repair: BlobRepair) -> None:
        self.registry.register(_Repairs(repair))

    def watch_recycle_bin(self, bin_: RecycleBin) -> None:
        self.registry.register(_Recycled(bin_))


class _RetentionDeletes:
    def __init__(self, retention: UntaggedRetention) -> None:
        self.retention = retention

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "georeg_retention_manifests_deleted",
            "Untagged manifests deleted by this node's retention sweeps",
            value=self.retention.deleted_total)


class _Repairs:
    """Bit rot found and what came of it (``registry_node.blob_repair``), read
    at scrape time."""

    def __init__(self, repair: BlobRepair) -> None:
        self.repair = repair

    def collect(self) -> Iterator[Metric]:
        for name, text, value in (
                ("georeg_blob_quarantined", "Blob files that failed authentication and were "
                 "moved into quarantine", self.repair.quarantined_total),
                ("georeg_blob_repairs", "Rotten blobs fetched again from a replica residency "
                 "allows", self.repair.repaired_total),
                ("georeg_blob_unrepairable", "Repairs that found no replica residency allows "
                 "holding the blob (a confined region with no other zone, a standalone node)",
                 self.repair.unrepairable_total)):
            family = CounterMetricFamily(name, text)
            family.add_metric([], value)
            yield family

    def describe(self):
        return []


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

class _Recycled:
    """Soft delete's counts, read at scrape time (``recycle_bin``)."""

    def __init__(self, bin_: RecycleBin) -> None:
        self.bin = bin_

    def collect(self) -> Iterator[Metric]:
        purged = CounterMetricFamily("georeg_recycle_bin_purged",
                                     "Soft-deleted manifests and tags purged from this node's "
                                     "recycle bins once past the policy's days, by kind",
                                     labels=["kind"])
        for kind, count in sorted(self.bin.purged_total.items()):
            purged.add_metric([kind], count)
        restored = CounterMetricFamily("georeg_recycle_bin_restored",
                                       "Restores from the recycle bin taken by this node (a "
                                       "replicated restore arrives as a push, not counted here)")
        restored.add_metric([], self.bin.restored_total)
        yield from (purged, restored)

    def describe(self):
        return []

METRICS: web.AppKey[NodeMetrics] = web.AppKey("metrics", NodeMetrics)

async def get_metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
