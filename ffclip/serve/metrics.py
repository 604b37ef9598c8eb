"""What the service counts, in the Prometheus text format: requests, latency, batch sizes and queue depth."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

__all__ = ["CONTENT_TYPE", "Metrics"]


class Metrics:
    """The counters of one gateway, in a registry of their own."""

    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        self.requests = Counter("ffclip_requests", "HTTP requests answered, by endpoint and status code.",
                                ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram("ffclip_request_seconds", "Time from receiving a request to answering it.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("ffclip_batch_size", "Size of the batch each edit ran in.",
                                    buckets=[float(b) for b in range(1, max_batch + 1)], registry=self.registry)
        self.queue_depth = Gauge("ffclip_queue_depth", "Edits accepted and not yet answered.", registry=self.registry)
        self.rejected = Counter("ffclip_rejected", "Edits refused because the queue was full.", registry=self.registry)

    def observe(self, endpoint: str, code: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(endpoint, str(code)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def text(self) -> bytes:
        """Every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)
