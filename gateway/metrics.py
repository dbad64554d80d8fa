"""Prometheus metrics of one service instance (its own registry, so several apps can live in
one process, as in tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.store import JOB_STATES, Store


class _StoreCollector(Collector):
    """Jobs by state, queue depth and webhook deliveries by state, read from the store at
    scrape time (so they survive restarts and agree with the API)."""

    def __init__(self, store: Callable[[], Store | None]) -> None:
        self._store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        store = self._store()
        if store is None:
            return
        jobs = GaugeMetricFamily("redact_jobs", "Jobs by state (not deleted)", labels=["state"])
        counts = store.counts_by_status()
        for state in JOB_STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        yield GaugeMetricFamily("redact_queue_depth", "Jobs waiting for a worker",
                                value=counts.get("queued", 0))
        deliveries = GaugeMetricFamily("redact_webhook_deliveries",
                                       "Webhook deliveries by state", labels=["state"])
        by = store.delivery_counts()
        for state in ("pending", "delivered", "failed"):
            deliveries.add_metric([state], by.get(state, 0))
        yield deliveries


class Metrics:
    """The counters and histograms the service updates as it works."""

    def __init__(self, store: Callable[[], Store | None]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(store))
        self.jobs_finished = Counter("redact_jobs_finished", "Jobs finished, by kind and outcome",
                                     ["kind", "outcome"], registry=self.registry)
        self.processing_seconds = Histogram(
            "redact_processing_seconds", "Wall time a worker spent on one job", ["kind"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600),
            registry=self.registry)
        self.video_frames = Counter("redact_video_frames", "Video frames redacted",
                                    registry=self.registry)
        self.video_seconds = Counter("redact_video_processing_seconds",
                                     "Worker seconds spent on video (frames/s = frames rate / "
                                     "this rate)", registry=self.registry)
        self.frames_per_second = Histogram(
            "redact_video_frames_per_second", "Frames per second of each finished video job",
            buckets=(1, 2.5, 5, 10, 15, 20, 30, 45, 60, 90, 120, 240), registry=self.registry)
        self.uploads = Counter("redact_uploads", "Upload requests by outcome", ["outcome"],
                               registry=self.registry)
        self.upload_bytes = Counter("redact_upload_bytes", "Bytes of accepted uploads",
                                    registry=self.registry)
        self.webhook_attempts = Counter("redact_webhook_attempts",
                                        "Webhook delivery attempts by outcome", ["outcome"],
                                        registry=self.registry)
