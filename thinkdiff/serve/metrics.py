"""The server's Prometheus metrics (GET /metrics), in a registry of its own so several servers can share a
process (tests, notebooks)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ServerMetrics:
    def __init__(self, queue_depth):
        self.registry = CollectorRegistry()
        self.requests = Counter("thinkdiff_requests", "HTTP calls answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("thinkdiff_request_seconds", "Seconds from arrival to answer, by endpoint",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.tokens = Counter("thinkdiff_tokens", "Tokens processed by the engine, prompt and generated",
                              ["kind"], registry=self.registry)
        self.images = Counter("thinkdiff_images_generated", "Images drawn by /v1/images/generations",
                              registry=self.registry)
        self.queue = Gauge("thinkdiff_queue_depth", "Calls waiting for the engine", registry=self.registry)
        self.queue.set_function(queue_depth)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
