"""Prometheus metrics of one service instance (its own registry, so several apps can live in
one process, as in tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.store import JOB_STATES, Store

# (name, status, stats) of every live stream, as the store's rows say
StreamRows = Callable[[], list[tuple[str, str, dict[str, Any]]]]
STREAM_STATES = ("connecting", "live", "reconnecting", "stopped", "failed")


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


class _StreamCollector(Collector):
    """Live streams at scrape time, from the figures their workers keep in the store, labelled
    by stream name (never by source: camera URLs may hold credentials)."""

    GAUGES = (("input_fps", "redact_stream_input_fps", "Frames per second from the camera"),
              ("output_fps", "redact_stream_output_fps", "Frames per second sent out"),
              ("latency_ms_p50", "redact_stream_latency_p50_ms",
               "Median time from a frame's arrival to its encode, ms"),
              ("latency_ms_p95", "redact_stream_latency_p95_ms",
               "95th percentile time from a frame's arrival to its encode, ms"),
              ("viewers", "redact_stream_viewers", "RTSP players and WebRTC viewers"))
    COUNTERS = (("frames_in", "redact_stream_frames_in", "Frames decoded from the camera"),
                ("frames_out", "redact_stream_frames_out", "Frames encoded and sent out"),
                ("frames_redacted", "redact_stream_frames_redacted", "Frames redacted"),
                ("frames_dropped", "redact_stream_frames_dropped",
                 "Frames dropped because redaction fell behind (never sent)"),
                ("frames_covered", "redact_stream_frames_covered",
                 "Frames covered whole because detection failed"),
                ("placeholders", "redact_stream_placeholders",
                 "'No signal' frames sent while nothing redacted was ready"),
                ("reconnects", "redact_stream_reconnects", "Camera reconnection attempts"))

    def __init__(self, streams: Callable[[], StreamRows | None]) -> None:
        self._streams = streams

    def collect(self) -> Iterator[Any]:
        source = self._streams()
        if source is None:
            return
        try:
            rows = source()
        except Exception:  # the store is not open (yet, or any more)
            return
        status = GaugeMetricFamily("redact_stream_status", "1 for the stream's current status",
                                   labels=["stream", "status"])
        for name, state_now, _ in rows:
            for state in STREAM_STATES:
                status.add_metric([name, state], 1.0 if state_now == state else 0.0)
        yield status
        for key, metric, doc in self.GAUGES:
            g = GaugeMetricFamily(metric, doc, labels=["stream"])
            for name, _, stats in rows:
                if stats.get(key) is not None:
                    g.add_metric([name], float(stats[key]))
            yield g
        for key, metric, doc in self.COUNTERS:
            c = CounterMetricFamily(metric, doc, labels=["stream"])
            for name, _, stats in rows:
                c.add_metric([name], float(stats.get(key) or 0))
            yield c


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
        self._streams: StreamRows | None = None
        self.registry.register(_StreamCollector(lambda: self._streams))
        self.webhook_attempts = Counter("redact_webhook_attempts",
                                        "Webhook delivery attempts by outcome", ["outcome"],
                                        registry=self.registry)

    def watch_streams(self, rows: StreamRows) -> None:
        """Expose the live streams' figures (``rows()``: name, status, stats of each) at
        scrape time."""
        self._streams = rows
