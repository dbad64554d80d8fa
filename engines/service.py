"""The detection service: one per device in a process, shared by every file job and live stream.

Callers submit a frame's pixels with the detector to run and get a future of its
:class:`Detections`. The service runs at most ``workers`` detections at a time on its device,
however many streams submit (a stream per thread each calling its own model would oversubscribe
the cores), and the models underneath are the process's shared sessions
(:func:`engines.backends.load_model`): face models take a dynamic batch, so on a backend that
batches, detections of several streams that reach the model together run as one batch
(:class:`engines.backends.BatchedSession`; the CPU backend does not batch, see
``CPU_MAX_BATCH``).

A detector error is set on the future (the caller fails closed); nothing here retries.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from engines.backends import BatchedSession, loaded_models, resolve_device
from engines.detections import Detections

log = logging.getLogger(__name__)


@dataclass
class ServiceStats:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    in_flight: int = 0
    busy_s: float = 0.0  # summed over detections (their run time, queueing not counted)


class DetectionService:
    """Runs detections for many callers on one device; see the module's docstring.

    ``workers``: detections run at the same time (default: the number of cores, at least 2, so
    that two streams' frames can meet in one batch where the backend batches).
    """

    def __init__(self, device: str = "cpu", workers: int | None = None) -> None:
        self.device = resolve_device(device)
        self.workers = workers or max(2, os.cpu_count() or 2)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"detect-{device}")
        self._lock = threading.Lock()
        self.stats = ServiceStats()

    def submit(self, detector: Any, pixels: Any) -> Future[Detections]:
        """Run ``detector.detect(pixels)`` here; the future holds its Detections or error."""
        with self._lock:
            self.stats.submitted += 1
            self.stats.in_flight += 1
        return self._pool.submit(self._run, detector, pixels)

    def detect(self, detector: Any, pixels: Any, timeout: float | None = None) -> Detections:
        """Submit and wait (a file job that needs this frame's boxes before the next)."""
        return self.submit(detector, pixels).result(timeout)

    def _run(self, detector: Any, pixels: Any) -> Detections:
        t0 = time.perf_counter()
        ok = False
        try:
            found: Detections = detector.detect(pixels)
            ok = True
            return found
        finally:
            with self._lock:
                self.stats.in_flight -= 1
                self.stats.busy_s += time.perf_counter() - t0
                if ok:
                    self.stats.completed += 1
                else:
                    self.stats.failed += 1

    def describe(self) -> dict[str, Any]:
        """Figures for metrics and benchmarks: detections, and the batched models' runs."""
        runs = frames = 0
        for m in loaded_models():
            if m.device == self.device and isinstance(m.session, BatchedSession):
                runs += m.session.runs
                frames += m.session.frames
        s = self.stats
        return {"device": self.device, "workers": self.workers, "submitted": s.submitted,
                "completed": s.completed, "failed": s.failed, "in_flight": s.in_flight,
                "batched_runs": runs, "batched_frames": frames,
                "mean_batch": round(frames / runs, 2) if runs else 0.0}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_SERVICES: dict[str, DetectionService] = {}
_SERVICES_LOCK = threading.Lock()


def detection_service(device: str = "cpu") -> DetectionService:
    """The process's service for ``device`` (made on first use)."""
    d = resolve_device(device)
    with _SERVICES_LOCK:
        found = _SERVICES.get(d)
        if found is None:
            found = _SERVICES[d] = DetectionService(d)
        return found
