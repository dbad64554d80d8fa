"""Everything one running service holds: store, workers, webhooks, sweeper, limits, metrics.

Built and started by the app's lifespan (models load then, never at import)."""

from __future__ import annotations

import logging
import shutil
import threading
import time

from engines.registry import available_categories
from gateway.jobs import Layout, RedactorCache, Sweeper, WorkerPool
from gateway.limits import RateLimiter
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.store import Store
from gateway.webhooks import Deliverer

log = logging.getLogger(__name__)

MIN_FREE_DISK_BYTES = 256 * 1024 * 1024  # /readyz fails below this much free space


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.layout = Layout(settings.data_dir)
        self.store: Store | None = None
        self.metrics = Metrics(lambda: self.store)
        self.limiter = RateLimiter()
        self.redactors = RedactorCache(settings.detector_threads)
        self.validate_slots = threading.BoundedSemaphore(settings.validate_concurrency)
        self.models_ready = threading.Event()
        self.warmup_error: str | None = None
        self.pool: WorkerPool | None = None
        self.deliverer: Deliverer | None = None
        self.sweeper: Sweeper | None = None

    @property
    def db(self) -> Store:
        assert self.store is not None, "service not started"
        return self.store

    def start(self) -> None:
        """Open the store, queue again what a dead process left, start the threads."""
        self.layout.create()
        self.store = Store(self.settings.db_path)
        again = self.store.requeue_unfinished()
        if again:
            log.warning("%d job(s) interrupted by a restart are queued again: %s",
                        len(again), ", ".join(again[:10]))
        waiting = self.store.count_waiting()
        self.deliverer = Deliverer(
            self.store, self._secret_of, timeout_s=self.settings.webhook_timeout_s,
            max_attempts=self.settings.webhook_max_attempts,
            backoff_s=self.settings.webhook_backoff_s,
            backoff_max_s=self.settings.webhook_backoff_max_s,
            allow_private=self.settings.webhook_allow_private,
            on_attempt=lambda outcome: self.metrics.webhook_attempts.labels(outcome).inc())
        self.pool = WorkerPool(self.store, self.layout, self.settings, self.metrics,
                               self.redactors, self.deliverer.wake)
        self.sweeper = Sweeper(self.store, self.layout, self.settings.sweep_interval_s)
        threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()
        self.pool.start()
        self.deliverer.start()
        self.sweeper.start()
        log.info("service started: data in %s, %d worker(s), %d job(s) waiting",
                 self.settings.data_dir, self.settings.workers, waiting)

    def stop(self) -> None:
        for part in (self.pool, self.deliverer, self.sweeper):
            if part is not None:
                part.stop()
        if self.store is not None:
            self.store.close()
        log.info("service stopped")

    def _secret_of(self, key_id: str) -> str | None:
        key = self.db.key(key_id)
        return key.webhook_secret if key and key.revoked_at is None else None

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

    def readiness(self) -> dict[str, bool]:
        """Each check /readyz makes."""
        checks = {"models": self.models_ready.is_set() and self.warmup_error is None,
                  "workers": bool(self.pool and self.pool.alive()),
                  "webhooks": bool(self.deliverer and self.deliverer.alive()),
                  "sweeper": bool(self.sweeper and self.sweeper.alive())}
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
