"""Webhook delivery's Prometheus metrics, in the node's registry (``GET /metrics``).

    georeg_webhook_deliveries_total{webhook, outcome, attempt}
        attempts by their outcome: delivered, retried, failed (refused, not
        retried), gave_up (past the horizon); ``attempt`` is the attempt's
        number (1, 2, … 5, then "6+")
    georeg_webhook_delivery_latency_seconds{webhook}
        from the event (a push's acknowledgement here, a copy's landing) to
        its delivery
    georeg_webhook_pending{webhook}
        events in the outbox
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   300.0, 1800.0, 3600.0)


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry, pending: Callable[[], dict[str, int]]) -> None:
        self.deliveries = Counter(
            "georeg_webhook_deliveries_total",
            "Webhook delivery attempts by webhook, outcome (delivered, retried, failed, gave_up) "
            "and attempt number", ["webhook", "outcome", "attempt"], registry=registry)
        self.latency = Histogram(
            "georeg_webhook_delivery_latency_seconds",
            "From a webhook event (a push acknowledged here, a copy landed here) to its delivery",
            ["webhook"], buckets=LATENCY_BUCKETS, registry=registry)
        registry.register(_Pending(pending))

    def attempted(self, webhook: str, outcome: str, attempt: int) -> None:
        self.deliveries.labels(webhook, outcome, str(attempt) if attempt <= 5 else "6+").inc()

    def delivered(self, webhook: str, latency_s: float) -> None:
        self.latency.labels(webhook).observe(latency_s)


class _Pending:
    def __init__(self, pending: Callable[[], dict[str, int]]) -> None:
        self._pending = pending

    def collect(self):
        family = GaugeMetricFamily("georeg_webhook_pending", "Webhook events in the outbox",
                                   labels=["webhook"])
        for webhook, count in sorted(self._pending().items()):
            family.add_metric([webhook], count)
        yield family

    def describe(self):
        return []
