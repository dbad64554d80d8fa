"""The API's side of a running service: store, file layout, rate limiter, upload checks and
metrics; and, unless ``settings.embedded_worker`` is off (``redact serve --no-worker``), one
in-process :class:`~gateway.worker.Worker` (job workers, webhook deliveries, sweeper, models,
live streams).

Built and started by the app's lifespan (models load then, never at import). Workers in other
processes (``redact worker``) share the store and the files; the API learns whether any is
alive from their heartbeats."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable

from gateway.jobs import Layout, Sweeper, WorkerPool
from gateway.limits import RateLimiter
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.store import Store
from gateway.streams import StreamSettings
from gateway.worker import Worker, heartbeat_window

log = logging.getLogger(__name__)

MIN_FREE_DISK_BYTES = 256 * 1024 * 1024  # /readyz fails below this much free space


class Service:
    def __init__(self, settings: Settings, stream_settings: StreamSettings | None = None) -> None:
        self.settings = settings
        self.stream_settings = stream_settings or StreamSettings()
        self.layout = Layout(settings.storage_dir)
        self.store: Store | None = None
        self.metrics = Metrics(lambda: self.store)
        self._limiter: RateLimiter | None = None
        self.validate_slots = threading.BoundedSemaphore(settings.validate_concurrency)
        self.worker: Worker | None = None

    @property
    def db(self) -> Store:
        assert self.store is not None, "service not started"
        return self.store

    @property
    def limiter(self) -> RateLimiter:
        assert self._limiter is not None, "service not started"
        return self._limiter

    @property
    def pool(self) -> WorkerPool | None:
        """The in-process job workers (None with ``--no-worker``)."""
        return self.worker.pool if self.worker else None

    @property
    def sweeper(self) -> Sweeper | None:
        return self.worker.sweeper if self.worker else None

    @property
    def warmup_error(self) -> str | None:
        return self.worker.warmup_error if self.worker else None

    def start(self, before_worker: Callable[[], None] | None = None) -> None:
        """Open the store, run ``before_worker()`` and start the in-process worker (if any).
        Jobs and streams a dead process left are not touched here: a worker takes each over
        once its lease has run out."""
        self.layout.create(clean_uploads=not self.settings.shared)
        self.store = Store(self.settings.store_target)
        self._limiter = RateLimiter(self.store)
        if before_worker is not None:
            before_worker()
        if self.settings.embedded_worker:
            self.worker = Worker(self.settings, self.store, self.layout, self.metrics,
                                 self.stream_settings)
            self.worker.start()
        log.info("service started: data in %s, %s, %d job(s) waiting", self.settings.data_dir,
                 f"{self.settings.workers} in-process job worker(s)" if self.worker
                 else "no in-process worker (jobs run in `redact worker` processes)",
                 self.store.count_waiting())

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.store is not None:
            self.store.close()
        log.info("service stopped")

    def notify_workers(self) -> None:
        """A job was queued: the in-process worker takes it at once (others poll)."""
        if self.worker is not None:
            self.worker.notify()

    def readiness(self) -> dict[str, bool]:
        """Each check /readyz makes. Without an in-process worker: whether a live worker
        (a recent heartbeat) exists, and whether one has its models loaded."""
        if self.worker is not None:
            checks = self.worker.readiness()
        else:
            try:
                live = self.db.live_workers(
                    time.time() - heartbeat_window(self.settings.lease_s))
            except Exception:
                live = []
            checks = {"workers": bool(live), "models": any(w.ready for w in live)}
        try:
            self.db.count_waiting()
            checks["database"] = True
        except Exception:
            checks["database"] = False
        try:
            checks["disk"] = shutil.disk_usage(self.layout.root).free >= MIN_FREE_DISK_BYTES
        except OSError:
            checks["disk"] = False
        return checks

    def readiness_error(self, checks: dict[str, bool]) -> dict[str, str] | None:
        """Why /readyz says not ready, where one reason explains it."""
        if self.warmup_error:
            return {"code": "model_missing", "message": self.warmup_error}
        if self.worker is None and not checks.get("workers", True):
            return {"code": "no_worker",
                    "message": "no `redact worker` has been seen on this data directory in the "
                               f"last {heartbeat_window(self.settings.lease_s):.0f} s"}
        return None
