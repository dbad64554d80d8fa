"""The data plane: media-job workers, webhook deliveries, the sweeper, the models' warm-up and
live streams (with their RTSP, WebRTC and recording outputs), working from the store and files
of one data directory.

``redact worker`` runs one as its own process (:func:`run_worker`); ``redact serve`` runs one
inside the API process unless told ``--no-worker``. Any number of workers, in any number of
processes, share a data directory: each job and each webhook attempt is claimed in the store
under a lease that the worker renews while it works (:mod:`gateway.leases`), so work a dead or
stalled worker held is taken over by another once its lease runs out, and nothing is published
or sent twice. Live streams are claimed the same way and run for as long as their worker holds
them (:mod:`gateway.stream_runner`); each worker has its own RTSP server and a small control
server for the requests the API forwards to its streams (WHEP). Each worker records a heartbeat
in the store (with its control URL), which the API's ``/readyz`` reads when it runs no worker
of its own.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from types import FrameType

from engines.registry import available_categories
from gateway.jobs import Layout, RedactorCache, Sweeper, WorkerPool
from gateway.leases import LeaseKeeper
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.store import Store
from gateway.stream_runner import StreamRunner
from gateway.streams import StreamSettings, migrate_streams_file
from gateway.webhooks import Deliverer

log = logging.getLogger(__name__)


def heartbeat_interval(lease_s: float) -> float:
    """How often a worker records that it is alive."""
    return min(5.0, lease_s / 3)


def heartbeat_window(lease_s: float) -> float:
    """A worker whose last heartbeat is older than this is taken for gone."""
    return max(lease_s, 3 * heartbeat_interval(lease_s))


class Worker:
    """Job workers, webhook deliveries, the sweeper, the models' warm-up, live streams and the
    heartbeat of one process, on ``store`` (opened and closed by the caller)."""

    def __init__(self, settings: Settings, store: Store, layout: Layout,
                 metrics: Metrics, stream_settings: StreamSettings | None = None) -> None:
        self.settings = settings
        self.id = settings.worker_id
        self.store = store
        self.layout = layout
        self.metrics = metrics
        self.started_at = time.time()
        self.redactors = RedactorCache(settings.detector_threads)
        self.models_ready = threading.Event()
        self.warmup_error: str | None = None
        self.keeper = LeaseKeeper(settings.lease_s)
        self.deliverer = Deliverer(
            store, self._secret_of, timeout_s=settings.webhook_timeout_s,
            max_attempts=settings.webhook_max_attempts, backoff_s=settings.webhook_backoff_s,
            backoff_max_s=settings.webhook_backoff_max_s,
            allow_private=settings.webhook_allow_private,
            on_attempt=lambda outcome: metrics.webhook_attempts.labels(outcome).inc(),
            worker_id=self.id, lease_s=settings.lease_s, keeper=self.keeper)
        self.pool = WorkerPool(store, layout, settings, metrics, self.redactors,
                               self.deliverer.wake, keeper=self.keeper)
        self.sweeper = Sweeper(store, layout, settings.sweep_interval_s)
        stream_settings = stream_settings or StreamSettings()
        if settings.ray_address:  # streams run as Ray actors (gateway.ray_streams), not here
            stream_settings = stream_settings.model_copy(update={"max_streams": 0})
        self.streams = StreamRunner(settings, stream_settings, store, self.id)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)

    def start(self) -> None:
        threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()
        self.streams.start()  # its control URL goes into the heartbeat
        self._seen()
        self.keeper.start()
        self.pool.start()
        self.deliverer.start()
        self.sweeper.start()
        self._beat.start()
        log.info("worker %s started: %d job slot(s), lease %.0f s, %d job(s) waiting", self.id,
                 self.settings.workers, self.settings.lease_s, self.store.count_waiting())

    def stop(self) -> None:
        """Stop taking work; streams are given back at once, a job still running after a grace
        period too."""
        self._stop.set()
        self.streams.stop()
        for part in (self.pool, self.deliverer, self.sweeper):
            part.stop()
        self.keeper.stop()
        self._beat.join(5)
        try:
            self.store.remove_worker(self.id)
        except Exception as exc:
            log.warning("worker %s: heartbeat not removed: %s", self.id, exc)
        log.info("worker %s stopped", self.id)

    def notify(self) -> None:
        """A job was queued (workers in other processes find it by polling)."""
        self.pool.notify()

    def alive(self) -> bool:
        return (self.pool.alive() and self.deliverer.alive() and self.sweeper.alive()
                and self.streams.alive() and self._beat.is_alive())

    def readiness(self) -> dict[str, bool]:
        return {"models": self.models_ready.is_set() and self.warmup_error is None,
                "workers": self.pool.alive(), "webhooks": self.deliverer.alive(),
                "sweeper": self.sweeper.alive()}

    def _secret_of(self, key_id: str) -> str | None:
        key = self.store.key(key_id)
        return key.webhook_secret if key and key.revoked_at is None else None

    def _seen(self) -> None:
        self.store.worker_seen(
            self.id, host=socket.gethostname(), pid=os.getpid(), started_at=self.started_at,
            now=time.time(), ready=self.models_ready.is_set() and self.warmup_error is None,
            control_url=self.streams.control_url)

    def _heartbeat(self) -> None:
        while not self._stop.wait(heartbeat_interval(self.settings.lease_s)):
            try:
                self._seen()
            except Exception as exc:
                log.warning("worker %s: heartbeat failed: %s", self.id, exc)

    def _warm_up(self) -> None:
        """Load the models of the default choice (every available category), for both kinds."""
        t0 = time.perf_counter()
        try:
            redactor = self.redactors.get(list(available_categories()),
                                         {"method": "blur", "methods": {}})
            redactor.detector("image")
            redactor.detector("video")
            log.info("models loaded in %.1f s", time.perf_counter() - t0)
        except Exception as exc:
            self.warmup_error = f"{type(exc).__name__}: {exc}"
            log.error("loading models failed: %s", exc)
        finally:
            self.models_ready.set()
        try:
            self._seen()  # tell the API at once
        except Exception as exc:
            log.warning("worker %s: heartbeat failed: %s", self.id, exc)


def run_worker(settings: Settings, stream_settings: StreamSettings | None = None) -> int:
    """``redact worker``: run a :class:`Worker` until SIGTERM or SIGINT (a second one stops at
    once), then stop it cleanly. Returns the exit status."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("worker %s: %s received, stopping", settings.worker_id,
                 signal.Signals(signum).name)
        stop.set()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    layout = Layout(settings.storage_dir)
    layout.create(clean_uploads=False)  # uploads in tmp/ are the API's
    store = Store(settings.store_target)
    migrate_streams_file(store, settings.data_dir)  # a data directory of an older release
    worker = Worker(settings, store, layout, Metrics(lambda: store), stream_settings)
    try:
        worker.start()
        while not stop.wait(1.0):
            if not worker.alive():
                log.error("worker %s: a thread died; stopping", worker.id)
                return 1
    finally:
        worker.stop()
        store.close()
    return 0
