"""Media jobs: where their files live, how their status reads, and the workers that run them.

The store is the queue: a worker claims the oldest queued job in a transaction, under a lease
it renews while it works (:mod:`gateway.leases`), so a job accepted (202) is never only in
memory, and one whose worker died (or stalled past its lease) is taken over by another worker,
in this process or another. Outputs and manifests are written to temporary names of their own
claim, flushed to disk, and renamed only while the claim still holds
(:meth:`Store.finish_job`): a worker that lost its job discards what it made, so a result is
published once.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as dt
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from engines.faces import effective_scales
from engines.registry import (
    IMAGE_PROFILE,
    VIDEO_PROFILE,
    DetectorConfig,
    category,
)
from gateway.errors import classify
from gateway.leases import Lease, LeaseKeeper, claim_owner
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.store import Job, Store
from pipeline.files import Redactor, RedactSettings, manifest
from pipeline.settings import settings_from_choices

log = logging.getLogger(__name__)

CONTENT_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
                 ".mp4": "video/mp4", ".m4v": "video/x-m4v", ".mov": "video/quicktime",
                 ".mkv": "video/x-matroska", ".webm": "video/webm", ".avi": "video/x-msvideo",
                 ".ts": "video/mp2t"}
PROGRESS_EVERY_S = 0.5  # progress is written to the store at most this often per job
REDACTOR_CACHE = 8  # redactors (built detectors) kept for different category/method choices
IDLE_POLL_S = 0.5  # an idle worker looks at the store this often even without a wake-up
STALE_UPLOAD_S = 3600.0  # an upload in tmp/ untouched this long was cut off: the sweeper deletes it
MIB = 1024 * 1024
# Working memory of one job, estimated before it runs from its declared size and categories
# (measured with psutil on 21-megapixel photos). A photo holds its BGR array (3 bytes a pixel)
# and, while it is decoded or encoded, a Pillow picture (4). Each detector needs memory in
# proportion to its model input, which its profile caps (faces: 3840x2160 at most, so a
# 1-megapixel photo enlarged 3x for small faces costs as much as a 20-megapixel one); the
# figures include what onnxruntime's memory arena holds beyond a run's tensors (it grows by
# powers of two and keeps what it took). A video holds its look-ahead and queues of frames.
JOB_BASE_BYTES = 32 * MIB
IMAGE_BYTES_PER_PIXEL = 5
VIDEO_BYTES_PER_FRAME_PIXEL = 3 * 64
FACE_BYTES_PER_INPUT_PIXEL = 84  # YuNet: ~700 MiB at 3840x2160 (~480 without the arena)
TEXT_BYTES_PER_INPUT_PIXEL = 320  # PP-OCR detector (text and plates): ~500 MiB at 1280x1280
CODE_BYTES_PER_INPUT_PIXEL = 25  # QR/barcodes: ~90 MiB at 1920x1920
TEXT_MAX_UPSCALE = 1.5  # engines.text.TextDetector enlarges small images up to this much
CODE_MAX_SIDE = 1920  # engines.registry gives the code detector frames scaled to this side
# a job estimated at this much or more gives its freed heap back to the system when it ends;
# smaller ones leave it for the next job (trimming after each small photo costs ~20% of their
# throughput in page faults); an idle pool trims in any case
TRIM_AFTER_BYTES = 128 * MIB


def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def release_free_memory() -> None:
    """Return freed heap memory to the system (glibc only; a no-op elsewhere)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def detector_bytes(width: int, height: int, categories: list[str],
                   profile: DetectorConfig) -> int:
    """Working memory of the detectors ``categories`` need on a ``width`` x ``height``
    picture under ``profile`` (they run one after another, but each keeps its arena)."""
    pixels = width * height
    long_side = max(width, height, 1)
    families = set()
    for name in categories:
        with contextlib.suppress(Exception):
            families.add(category(name).engine)
    total = 0.0
    if "faces" in families:
        scale = max(effective_scales((height, width), profile.scales, profile.max_input_pixels))
        total += FACE_BYTES_PER_INPUT_PIXEL * pixels * scale * scale
    if families & {"text", "plates"}:
        scale = min(profile.text_max_side / long_side, TEXT_MAX_UPSCALE)
        total += TEXT_BYTES_PER_INPUT_PIXEL * pixels * scale * scale
    if "codes" in families:
        scale = min(1.0, CODE_MAX_SIDE / long_side)
        total += CODE_BYTES_PER_INPUT_PIXEL * pixels * scale * scale
    return int(total)


def estimated_bytes(job: Job) -> int:
    """Working memory ``job`` is expected to need while it is redacted, from its declared
    size (read from the file's header at upload, before any pixel was decoded)."""
    pixels = max(job.width, 1) * max(job.height, 1)
    if job.kind == "image":
        return (JOB_BASE_BYTES + pixels * IMAGE_BYTES_PER_PIXEL
                + detector_bytes(job.width, job.height, job.categories, IMAGE_PROFILE))
    return (JOB_BASE_BYTES + pixels * VIDEO_BYTES_PER_FRAME_PIXEL
            + detector_bytes(job.width, job.height, job.categories, VIDEO_PROFILE))


class MemoryBudget:
    """Admits jobs while their estimated memory fits in ``limit`` bytes; one job always runs,
    however large, so nothing waits forever."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.running = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, need: int) -> Iterator[None]:
        with self._cond:
            while self.running and self.used + need > self.limit:
                self._cond.wait()
            self.used += need
            self.running += 1
        try:
            yield
        finally:
            with self._cond:
                self.used -= need
                self.running -= 1
                self._cond.notify_all()


def iso(ts: float | None) -> str | None:
    """RFC 3339 UTC time of a unix time, to the millisecond."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def write_synced(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new temporary file beside ``path``, flushed to disk; returns its
    name, for the caller to rename (and flush the directory) when it is due."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file, flushed, then renamed."""
    os.replace(write_synced(path, data), path)
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Layout:
    """Files under the data directory: ``tmp/`` (uploads being received) and
    ``jobs/<id>/`` with ``input<ext>``, ``output<ext>`` and ``manifest.json``."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir
        self.tmp = data_dir / "tmp"
        self.jobs = data_dir / "jobs"

    def create(self, clean_uploads: bool = True) -> None:
        """Make the directories; ``clean_uploads``: delete uploads a restart cut off (the
        start of the only API process on these files; a worker, or an API replica sharing
        them with others that may be receiving uploads now, leaves ``tmp/`` to the sweeper)."""
        for d in (self.root, self.tmp, self.jobs):
            d.mkdir(parents=True, exist_ok=True)
        if not clean_uploads:
            return
        for stale in self.tmp.iterdir():  # uploads cut off by a restart were never accepted
            with contextlib.suppress(OSError):
                stale.unlink()

    def job_dir(self, job_id: str) -> Path:
        return self.jobs / job_id

    def input(self, job: Job) -> Path:
        return self.job_dir(job.id) / f"input{job.ext}"

    def output(self, job: Job) -> Path:
        return self.job_dir(job.id) / f"output{job.ext}"

    def manifest(self, job: Job) -> Path:
        return self.job_dir(job.id) / "manifest.json"

    def partial(self, job: Job, claim: str) -> Path:
        """Where the claim ``claim`` writes its output before it is published: a name of its
        own, so a stalled worker that wakes up never writes into another's file."""
        return self.job_dir(job.id) / f"output.partial-{claim}{job.ext}"

    def remove_partials(self, job_id: str) -> int:
        """Delete unpublished outputs and manifests left by earlier claims of a job (their
        workers died or lost the job); returns how many were found."""
        n = 0
        with contextlib.suppress(OSError):
            for p in self.job_dir(job_id).iterdir():
                if p.name.startswith(("output.partial", ".output.partial", ".manifest.json.")):
                    with contextlib.suppress(OSError):
                        p.unlink()
                        n += 1
        return n

    def remove_stale_uploads(self, now: float, older_than_s: float = STALE_UPLOAD_S) -> int:
        """Delete uploads in ``tmp/`` untouched for ``older_than_s`` (cut off by an API
        replica that died; one being received is written to all the time); how many."""
        n = 0
        with contextlib.suppress(OSError):
            for p in self.tmp.iterdir():
                with contextlib.suppress(OSError):
                    if p.stat().st_mtime < now - older_than_s:
                        p.unlink()
                        n += 1
        return n

    def remove_files(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)


def status_json(job: Job, public_url: str | None = None) -> dict[str, Any]:
    """What ``GET /v1/media/{id}`` answers (and what webhooks carry)."""
    base = (public_url or job.base_url).rstrip("/")
    result = job.result or {}
    done = job.status == "completed" and not job.expired
    out: dict[str, Any] = {
        "id": job.id, "object": "media", "status": job.status, "kind": job.kind,
        "filename": job.filename, "categories": job.categories,
        "method": job.options.get("method"), "methods": job.options.get("methods") or {},
        "device": job.options.get("device") or "auto",
        "progress": round(job.progress, 4),
        "detections": result.get("counts") if job.status == "completed" else None,
        "distinct_objects": result.get("distinct_objects"),
        "download_url": f"{base}/v1/media/{job.id}/download" if done else None,
        "manifest_url": f"{base}/v1/media/{job.id}/manifest" if done else None,
        "error": ({"code": job.error_code, "message": job.error_message}
                  if job.status == "failed" else None),
        "expired": job.expired,
        "created_at": iso(job.created_at), "started_at": iso(job.started_at),
        "completed_at": iso(job.completed_at), "expires_at": iso(job.expires_at),
    }
    for k in ("width", "height", "frames", "duration_s", "fps", "runtime"):
        out[k] = result.get(k)
    return out


def redact_settings(categories: list[str], options: dict[str, Any],
                    detector_threads: int = 0) -> RedactSettings:
    """The pipeline settings of a job's choices (raises ValueError/UnknownCategoryError),
    through the same route as a live stream's (:func:`pipeline.settings.settings_from_choices`)."""
    return settings_from_choices(categories, method=options.get("method"),
                                 methods=options.get("methods"), threads=detector_threads,
                                 device=options.get("device"))


class RedactorCache:
    """Redactors (their detectors built) by category and method choice, least recently used
    dropped first. The models under them are the process's one copy
    (:func:`engines.backends.load_model`), whatever the number of redactors."""

    def __init__(self, detector_threads: int, size: int = REDACTOR_CACHE) -> None:
        self.detector_threads = detector_threads
        self.size = size
        self._items: OrderedDict[str, Redactor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, categories: list[str], options: dict[str, Any]) -> Redactor:
        key = json.dumps([categories, options], sort_keys=True)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        redactor = Redactor(redact_settings(categories, options, self.detector_threads))
        with self._lock:
            self._items[key] = redactor
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return redactor


def webhook_event(public_url: str | None) -> Callable[[Job], tuple[str, str, bytes]]:
    """The webhook of a finished job: a new event id, the event name and the status JSON."""

    def make(job: Job) -> tuple[str, str, bytes]:
        body = json.dumps(status_json(job, public_url), separators=(",", ":")).encode()
        return "evt_" + secrets.token_hex(12), f"media.{job.status}", body

    return make


class JobAbandoned(Exception):
    """Raised inside a job's redaction to stop it: its lease was lost, or the pool stops."""


class WorkerPool:
    """``settings.workers`` threads taking jobs from the store, one at a time each, each job
    under a lease the pool renews (``keeper``) while it runs."""

    def __init__(self, store: Store, layout: Layout, settings: Settings, metrics: Metrics,
                 redactors: RedactorCache, on_webhook: Callable[[], None],
                 keeper: LeaseKeeper | None = None) -> None:
        self.store = store
        self.layout = layout
        self.settings = settings
        self.metrics = metrics
        self.redactors = redactors
        self.on_webhook = on_webhook
        self._own_keeper = keeper is None
        self.keeper = keeper or LeaseKeeper(settings.lease_s)
        self._cond = threading.Condition()
        self._wakeups = 0  # counts notify() calls, so that none is missed between two waits
        self._stop = threading.Event()
        self._abandon = threading.Event()  # running jobs give their leases back
        self._running: dict[str, str] = {}  # job id -> claim owner, while a thread runs it
        self._running_lock = threading.Lock()
        self.budget = MemoryBudget(settings.work_memory_mb * 1024 * 1024)
        self._threads = [threading.Thread(target=self._run, name=f"worker-{i}", daemon=True)
                         for i in range(settings.workers)]

    def start(self) -> None:
        if self._own_keeper:
            self.keeper.start()
        for t in self._threads:
            t.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop taking jobs. A job that does not end within ``timeout_s`` is stopped and given
        back (queued again at once, for another worker or the next start)."""
        self._stop.set()
        self.notify(all_=True)
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            self._abandon.set()
            deadline = time.monotonic() + 2.0
            for t in self._threads:
                t.join(max(0.0, deadline - time.monotonic()))
        with self._running_lock:
            left = dict(self._running)
        for job_id, owner in left.items():  # still running (a photo, or stuck): given back
            with contextlib.suppress(Exception):
                if self.store.release_lease(job_id, owner):
                    log.info("job %s given back unfinished", job_id)
        if self._own_keeper:
            self.keeper.stop()

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads) and self.keeper.alive()

    def notify(self, all_: bool = False) -> None:
        """A job was queued."""
        with self._cond:
            self._wakeups += 1
            if all_:
                self._cond.notify_all()
            else:
                self._cond.notify()

    def _run(self) -> None:
        trimmed = True
        while not self._stop.is_set():
            with self._cond:
                seen = self._wakeups
            try:
                job = self.store.claim_next(time.time(), claim_owner(self.settings.worker_id),
                                            self.settings.lease_s)
            except Exception:
                log.exception("cannot claim a job")
                job = None
            if job is None:
                if not trimmed and self.budget.running == 0:
                    release_free_memory()  # idle: what the last jobs freed goes back
                    trimmed = True
                with self._cond:
                    # a job queued since ``seen`` (while the store was being asked) is claimed
                    # at once: the wake-up is counted, not lost
                    if self._wakeups == seen and not self._stop.is_set():
                        self._cond.wait(IDLE_POLL_S)
                continue
            need = estimated_bytes(job)
            trimmed = False
            assert job.lease_owner is not None
            with self._running_lock:
                self._running[job.id] = job.lease_owner
            try:
                # the lease is renewed from the claim on, while the job waits for memory too
                with self._hold(job) as lease, self.budget.hold(need):
                    self.process(job, lease)
                    if need >= TRIM_AFTER_BYTES:
                        release_free_memory()
                        trimmed = True
            except Exception:  # never let a worker die: the job is recorded as failed
                log.exception("job %s: unexpected error", job.id)
                self._fail(job, "internal_error", "internal error while redacting")
            finally:
                with self._running_lock:
                    self._running.pop(job.id, None)

    def _hold(self, job: Job) -> contextlib.AbstractContextManager[Lease]:
        owner = job.lease_owner
        assert owner is not None, "a claimed job has an owner"
        return self.keeper.held(f"job {job.id}",
                                lambda until: self.store.renew_lease(job.id, owner, until))

    def process(self, job: Job, lease: Lease | None = None) -> None:
        """Redact one claimed job and record its outcome (if the claim still holds)."""
        if lease is None:
            with self._hold(job) as held:
                self.process(job, held)
            return
        owner = job.lease_owner
        assert owner is not None, "a claimed job has an owner"
        src, dst = self.layout.input(job), self.layout.output(job)
        if self.layout.remove_partials(job.id):
            log.info("job %s: attempt %d; what an earlier attempt left is deleted", job.id,
                     job.attempts)
        if job.attempts > self.settings.max_job_attempts:
            self._fail(job, "interrupted", f"processing was interrupted {job.attempts - 1} "
                       "times (the worker redacting this file died or stalled each time)", lease)
            return
        if not src.exists():
            self._fail(job, "input_missing", "the uploaded file is no longer on the server",
                       lease)
            return
        partial = self.layout.partial(job, owner.rsplit("/", 1)[-1])
        last = [0.0]

        def check() -> None:
            if lease.lost.is_set():
                raise JobAbandoned("the job's lease was lost to another worker")
            if self._abandon.is_set():
                raise JobAbandoned("the worker is stopping")

        def progress(done: int, total: int | None) -> None:
            check()
            now = time.monotonic()
            if total and now - last[0] >= PROGRESS_EVERY_S:
                last[0] = now
                self.store.set_progress(job.id, min(0.99, done / total), owner)

        log.info("job %s: redacting %s (%s, %d bytes), attempt %d", job.id, job.kind, job.ext,
                 job.size_bytes, job.attempts)
        t0 = time.perf_counter()
        manifest_path = self.layout.manifest(job)
        manifest_tmp: Path | None = None

        def discard() -> None:
            for leftover in (partial, manifest_tmp):
                if leftover is not None:
                    with contextlib.suppress(OSError):
                        leftover.unlink()

        def publish() -> None:
            # both files are on disk under temporary names: rename them, then make the renames
            # durable with one flush of the directory, before the store says "completed"
            assert manifest_tmp is not None
            os.replace(partial, dst)
            os.replace(manifest_tmp, manifest_path)
            fsync_dir(dst.parent)

        done: Job | None = None
        try:
            redactor = self.redactors.get(job.categories, job.options)
            entry = redactor.redact(src, partial, progress)
            check()
            if job.kind != "image":  # photos are written flushed (pipeline.image.write_atomic)
                fsync_file(partial)
            entry["input"], entry["output"] = job.filename, job.filename
            doc = manifest(redactor.settings, [entry])
            doc["job_id"] = job.id
            manifest_tmp = write_synced(manifest_path, json.dumps(doc).encode())
            wall = time.perf_counter() - t0
            result: dict[str, Any] = {"counts": entry.get("counts", {}),
                                      "seconds": round(wall, 3)}
            for k in ("distinct_objects", "width", "height", "frames", "duration_s", "fps",
                      "runtime"):
                if k in entry:
                    result[k] = entry[k]
            now = time.time()
            lease.closing()
            done = self.store.finish_job(
                job.id, owner=owner, status="completed", now=now,
                expires_at=now + self.settings.retention_hours * 3600, result=result,
                webhook=webhook_event(self.settings.public_url), publish=publish)
        except JobAbandoned as exc:
            discard()
            if self._abandon.is_set() and self.store.release_lease(job.id, owner):
                log.info("job %s stopped and given back: %s", job.id, exc)
            else:
                log.warning("job %s abandoned: %s", job.id, exc)
            return
        except Exception as exc:
            discard()
            status, code = classify(exc)
            if status >= 500:
                log.error("job %s failed: %s", job.id, exc, exc_info=code == "internal_error")
            else:
                log.info("job %s failed: %s", job.id, exc)
            message = str(exc) if code != "internal_error" else "internal error while redacting"
            self._fail(job, code, message, lease)
            self.metrics.processing_seconds.labels(job.kind).observe(time.perf_counter() - t0)
            return
        if done is None:  # the lease was lost: another worker has the job; nothing published
            discard()
            log.warning("job %s: finished after its lease was lost; the result is discarded "
                        "(another worker has the job)", job.id)
            return
        self.metrics.jobs_finished.labels(job.kind, "completed").inc()
        self.metrics.processing_seconds.labels(job.kind).observe(wall)
        if job.kind == "video" and entry.get("frames"):
            self.metrics.video_frames.inc(entry["frames"])
            self.metrics.video_seconds.inc(wall)
            self.metrics.frames_per_second.observe(entry["frames"] / max(wall, 1e-6))
        log.info("job %s: completed in %.2f s, counts %s", job.id, wall, result["counts"])
        self._after_finish(job, done)

    def _fail(self, job: Job, code: str, message: str, lease: Lease | None = None) -> None:
        now = time.time()
        assert job.lease_owner is not None, "a claimed job has an owner"
        if lease is not None:
            lease.closing()
        done = self.store.finish_job(
            job.id, owner=job.lease_owner, status="failed", now=now,
            expires_at=now + self.settings.retention_hours * 3600, error_code=code,
            error_message=message[:1000], refund=True,
            webhook=webhook_event(self.settings.public_url))
        if done is None:
            log.warning("job %s: failure (%s) not recorded: its lease was lost", job.id, code)
            return
        self.metrics.jobs_finished.labels(job.kind, "failed").inc()
        with contextlib.suppress(OSError):
            self.layout.output(job).unlink()
        self._after_finish(job, done)

    def _after_finish(self, job: Job, done: Job) -> None:
        if done.deleted:  # deleted while it ran: nothing of it stays
            self.layout.remove_files(job.id)
            return
        if not self.settings.keep_input:
            with contextlib.suppress(OSError):
                self.layout.input(job).unlink()
        if done.webhook_url:
            self.on_webhook()


class Sweeper:
    """Deletes the files of jobs past their retention window (downloads then answer 410)."""

    def __init__(self, store: Store, layout: Layout, interval_s: float) -> None:
        self.store = store
        self.layout = layout
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def sweep(self, now: float | None = None) -> int:
        """Expire what is due now; returns how many jobs were expired. Also closes jobs
        deleted while a worker that has since died was redacting them, and removes their
        files."""
        for job_id in self.store.reap_abandoned(time.time()):
            self.layout.remove_files(job_id)
            log.info("job %s: deleted while processing, its worker gone: files removed", job_id)
        if self.layout.remove_stale_uploads(time.time()):
            log.info("removed uploads cut off by an API process that died")
        ids = self.store.due_for_expiry(time.time() if now is None else now)
        for job_id in ids:
            self.layout.remove_files(job_id)
            self.store.mark_expired(job_id)
        if ids:
            log.info("expired %d job(s)", len(ids))
        return len(ids)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:
                log.exception("sweep failed")
            self._stop.wait(self.interval_s)
