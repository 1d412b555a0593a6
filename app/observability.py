"""Prometheus metrics of one app instance (its own registry, so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Model-call seconds: fine enough between 0.1 and 1 s (batches of 8-32 on a CPU) for the
# benchmark to bound a queued request's latency by the longest call.
CALL_SECONDS_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.6,
    0.8,
    1,
    1.5,
    2.5,
    5,
    10,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "imgsim_requests_total",
            "HTTP requests by endpoint, model and status.",
            ["endpoint", "model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "imgsim_request_seconds",
            "Request latency by endpoint and model.",
            ["endpoint", "model"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "imgsim_batch_size",
            "Images per model call.",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "imgsim_batch_seconds",
            "Forward pass + search time per batch.",
            ["model"],
            buckets=CALL_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge("imgsim_queue_depth", "Images waiting per model.", ["model"], registry=self.registry)
        self.runtime = Gauge(
            "imgsim_model_runtime",
            "1 for the inference runtime each model runs on (tf, bf16, int8).",
            ["model", "runtime"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "imgsim_rejected_total",
            "Requests refused with 503 because a queue was full.",
            ["model"],
            registry=self.registry,
        )

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.batch_seconds.labels(model).observe(seconds)
