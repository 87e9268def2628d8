"""Prometheus metrics of one node's replication, served at the node's ``/metrics``.

Each node has its own ``CollectorRegistry`` so several nodes can share a
process (tests, the Python API) without mixing their numbers; while
replication runs, it is one collector of the node's metrics
(``registry_node.api.metrics``), refreshed (``refresh``) at every scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

# Of the retention counts, those that go up and down (the rest only grow).
_HELD = frozenset({"log_events", "log_floor", "tombstones_held"})
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30, 60,
               120, 300)


class ReplicationMetrics:
    def __init__(self, region: str) -> None:
        self.region = region
        self.registry = CollectorRegistry(auto_describe=True)
        self.lag = Histogram(
            "georeg_replication_lag_seconds",
            "From the origin's acknowledgement to this node applying the change",
            ["origin_region", "destination_region", "kind"], buckets=LAG_BUCKETS,
            registry=self.registry)
        self.applied = Counter(
            "georeg_replication_events_applied_total", "Replicated changes applied here",
            ["origin_region", "kind"], registry=self.registry)
        self.bytes = Counter(
            "georeg_replication_bytes_total", "Blob bytes moved by replication",
            ["peer", "direction"], registry=self.registry)
        self.failures = Counter(
            "georeg_replication_transfer_failures_total", "Failed replication attempts",
            ["peer", "outcome"], registry=self.registry)
        self.digest_mismatches = Counter(
            "georeg_replication_digest_mismatches_total",
            "Blobs and manifests from a peer whose bytes did not hash to their digest "
            "(damaged on the way): never stored, asked for again", ["peer", "what"],
            registry=self.registry)
        self.integrity_refused = Counter(
            "georeg_replication_integrity_refused_total",
            "Replication messages (requests served here, replies read here) refused because "
            "their CRC-32 seal did not match: damaged on the way (replicator.wire.integrity); "
            "the call or stream is retried", ["message"], registry=self.registry)
        self.queue_depth = Gauge(
            "georeg_replication_queue_depth",
            "Events in a peer's log not yet applied here", ["peer"], registry=self.registry)
        self.locks_overridden = Counter(
            "georeg_lock_overridden_total",
            "Replicated writes applied here to a tag, manifest or repository this node "
            "held locked against them (made where the lock had not arrived; docs/locks.md)",
            ["origin_region", "kind"], registry=self.registry)
        self.residency_refusals = Counter(
            "georeg_replication_residency_refusals_total",
            "Events or content refused because residency forbids them here",
            ["origin_region"], registry=self.registry)
        # Replication completion (replicator.completion): what it asks, of whom.
        self.completion_requests = Counter(
            "georeg_replication_completion_requests_total",
            "Status questions replication completion asked a node: one call for many images "
            "(batch), this node itself (local), or one call per image (single: a peer from "
            "before GetImageStatuses)", ["peer", "call"], registry=self.registry)
        self.completion_images = Counter(
            "georeg_replication_completion_images_asked_total",
            "Images replication completion asked a node about", ["peer"], registry=self.registry)
        self.completion_waiting = Gauge(
            "georeg_replication_completion_waiting",
            "Images replication completion waits on here now", registry=self.registry)
        # Clocks (registry_node.clock, replicator.clock_probe).
        self.clock_offset = Gauge(
            "georeg_clock_offset_seconds",
            "A peer's clock minus this node's, as last probed (half the probe's round trip "
            "uncertain)", ["peer"], registry=self.registry)
        self.clock_offset_exceeded = Counter(
            "georeg_clock_offset_exceeded_total",
            "Peers found more than the tolerated clock offset off this node: by a probe of "
            "their clock (seen_in=probe), or by an event they stamped that far ahead of this "
            "node's clock (seen_in=event; applied, but the HLC not moved past the bound)",
            ["peer", "seen_in"], registry=self.registry)
        self.clock_skewed = Gauge(
            "georeg_clock_skewed",
            "1 while this node refuses writes because of its clock (off its peers', or its "
            "HLC ahead of it)", registry=self.registry)
        self.log_seq = Gauge("georeg_log_last_seq", "Last sequence in this node's event log",
                             registry=self.registry)
        self.refresh: Callable[[], None] = lambda: None
        self._anti_entropy: Callable[[], dict[str, int]] = dict
        self._retention: Callable[[], dict[str, int]] = dict

    def collect(self) -> Iterator[Metric]:
        """Everything above, as one collector of the node's registry."""
        self.refresh()
        yield from self.registry.collect()
        counts = self._anti_entropy()
        if counts:
            # Kept by anti-entropy itself (plain counts); read at each scrape.
            family = CounterMetricFamily(
                "georeg_anti_entropy",
                "Anti-entropy here: rounds run, registers repaired, buckets found "
                "differing, repositories whose fingerprints were compared and "
                "whose state was fetched", labels=["what"])
            for what, count in counts.items():
                family.add_metric([what], count)
            yield family
        retention = self._retention()
        if retention:
            # Bounded metadata (replicator.retention): what is held now (gauges)
            # and what compaction has done since the node started (counters).
            held = GaugeMetricFamily(
                "georeg_metadata",
                "Bounded metadata held here: events in the log, the log floor, "
                "tombstones held", labels=["what"])
            done = CounterMetricFamily(
                "georeg_metadata_compaction",
                "Bounded metadata since start: log events truncated, tombstones "
                "collected, compaction passes, peers' stale deletions not stored",
                labels=["what"])
            for what, count in retention.items():
                (held if what in _HELD else done).add_metric([what], count)
            yield held
            yield done

    def track_anti_entropy(self, counters: Callable[[], dict[str, int]]) -> None:
        self._anti_entropy = counters

    def track_retention(self, counters: Callable[[], dict[str, int]]) -> None:
        self._retention = counters

    def observe_lag(self, origin_region: str, kind: str, seconds: float) -> None:
        self.lag.labels(origin_region, self.region, kind).observe(max(seconds, 0.0))

    def bytes_sent(self, peer: str, count: int) -> None:
        self.bytes.labels(peer, "out").inc(count)

    def bytes_received(self, peer: str, count: int) -> None:
        self.bytes.labels(peer, "in").inc(count)

    def track_completion(self, waiting: Callable[[], int]) -> None:
        self.completion_waiting.set_function(waiting)

    def track_log(self, last_seq: Callable[[], int]) -> None:
        self.log_seq.set_function(last_seq)
