"""Workers apart from the API, with real processes: ``redact serve --no-worker`` and two
``redact worker`` processes on one data directory, with a short lease. A worker killed (SIGKILL)
in the middle of a video loses the job to the other, which finishes it once; webhook attempts
are claimed, so each reaches the receiver once; a worker paused (SIGSTOP) past its lease and
resumed after the other finished its job has its late result refused. Then the store's lease
fencing, its migration of an older file, and the rate limiter's windows across a new store,
unit by unit."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.limits import RateLimiter
from gateway.store import Job, Store
from tests.api_support import (
    TERMINAL,
    Plane,
    Received,
    Receiver,
    WorkerProcess,
    jpeg_bytes,
    start_plane,
    verify_signature,
    wait_job,
)
from tests.conftest import moving_face_clip, read_video, write_video

LEASE_S = 2
ENV = {"REDACT_LEASE_S": str(LEASE_S), "REDACT_WORKERS": "1", "REDACT_DETECTOR_THREADS": "1",
       "REDACT_WEBHOOK_ALLOW_PRIVATE": "1", "REDACT_WEBHOOK_BACKOFF_S": "0.3",
       "REDACT_WEBHOOK_TIMEOUT_S": "5"}
VIDEO_FRAMES = 400  # 640x480: a few seconds of work for one worker on two cores


class JobPlane(Plane):
    """An API without a worker and two worker processes on one data directory, for jobs."""

    def job(self, job_id: str) -> Job:
        with contextlib.closing(Store(self.store_target)) as db:
            job = db.job_any(job_id)
        assert job is not None
        return job

    def holder(self, job: Job) -> WorkerProcess:
        """The worker process whose claim ``job`` is under."""
        assert job.lease_owner is not None, job
        return self.worker_of(job.lease_owner)

    def other(self, worker: WorkerProcess) -> WorkerProcess:
        (other,) = [w for w in self.workers if w is not worker]
        return other

    def post(self, data: bytes, name: str, webhook: str) -> str:
        r = httpx.post(f"{self.api.url}/v1/media", headers=self.key.headers,
                       data={"categories[]": "faces", "webhook_url": webhook},
                       files={"file": (name, data, "application/octet-stream")}, timeout=60)
        assert r.status_code == 202, r.text
        job_id: str = r.json()["id"]
        return job_id

    def files_of(self, job_id: str) -> list[str]:
        return sorted(p.name for p in (self.data_dir / "jobs" / job_id).iterdir())


@pytest.fixture(params=["sqlite", "postgresql"])
def plane(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobPlane]:
    """On one SQLite file, or on a PostgreSQL database (as workers on many machines are)."""
    env = dict(ENV)
    if request.param == "postgresql":
        env["REDACT_DATABASE_URL"] = request.getfixturevalue("postgres_server").database()
    # /readyz answers 200 once a worker's heartbeat says its models are loaded
    p = start_plane(JobPlane, tmp_path / "data", env, workers=2)
    try:
        p.wait_ready_workers(2, LEASE_S, timeout_s=30)
        yield p
    finally:
        p.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def long_clip(tmp: Path) -> bytes:
    path = write_video(tmp / "long.mp4", moving_face_clip(n=VIDEO_FRAMES, width=640,
                                                         height=480).frames)
    return path.read_bytes()


def wait_mid_job(plane: JobPlane, job_id: str, min_progress: float = 0.1,
                 timeout_s: float = 30.0) -> Job:
    """The job once a worker has redacted part of it."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = plane.job(job_id)
        if job.status == "processing" and job.progress >= min_progress:
            return job
        assert job.status not in TERMINAL, f"{job_id} ended before it could be interrupted"
        assert time.monotonic() < deadline, f"{job_id} still {job.status} at {job.progress}"
        time.sleep(0.02)


def pause(worker: WorkerProcess, target: Path | str) -> None:
    """SIGSTOP ``worker`` at a moment it is not inside a transaction (a paused holder of
    SQLite's write lock, or of PostgreSQL row locks, would keep other processes waiting)."""
    if isinstance(target, str):
        _pause_outside_transactions(worker, target)
        return
    with contextlib.closing(Store(target, busy_timeout_s=0.2)) as probe:
        for _ in range(50):
            _stopped(worker)
            try:
                probe.renew_lease("probe", "probe", 0.0)  # takes the write lock, changes nothing
                return
            except sqlite3.OperationalError:
                worker.signal(signal.SIGCONT)
                time.sleep(0.02)
    raise AssertionError("the worker always held the write lock")


def _stopped(worker: WorkerProcess) -> None:
    worker.signal(signal.SIGSTOP)
    deadline = time.monotonic() + 2
    while Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, "SIGSTOP did not take"
        time.sleep(0.005)


def _pause_outside_transactions(worker: WorkerProcess, url: str) -> None:
    with contextlib.closing(Store(url)) as probe:
        for _ in range(50):
            _stopped(worker)
            open_tx = probe._one("SELECT count(*) AS n FROM pg_stat_activity WHERE "
                                 "datname = current_database() AND state IN ('idle in "
                                 "transaction', 'idle in transaction (aborted)')")
            if open_tx is not None and open_tx["n"] == 0:
                return
            worker.signal(signal.SIGCONT)
            time.sleep(0.02)
    raise AssertionError("the worker was always inside a transaction")


def wait_log(worker: WorkerProcess, pattern: str, timeout_s: float = 15.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        found = re.search(pattern, worker.text())
        if found:
            return found.group(0)
        assert time.monotonic() < deadline, f"{pattern!r} not logged:\n{worker.text()[-3000:]}"
        time.sleep(0.05)


def only_hook(receiver: Receiver, job_id: str, secret: str) -> Received:
    """The one webhook received, after waiting long enough for a second one to show."""
    receiver.wait_for(1)
    time.sleep(LEASE_S)  # a second delivery (an expired claim sent again) would be here by now
    (hook,) = receiver.got
    assert hook.headers["x-redact-event"] == "media.completed"
    assert hook.headers["x-redact-attempt"] == "1"
    assert json.loads(hook.body)["id"] == job_id
    assert verify_signature(secret, hook.body, hook.headers["x-redact-signature"])
    return hook


def test_a_worker_killed_mid_video_loses_it_to_the_other(
        plane: JobPlane, receiver: Receiver, tmp_path: Path) -> None:
    job_id = plane.post(long_clip(tmp_path), "long.mp4", receiver.url)
    killed = plane.holder(wait_mid_job(plane, job_id))
    other = plane.other(killed)
    killed.kill()
    with httpx.Client(base_url=plane.api.url, timeout=30) as c:
        done = wait_job(c, plane.key, job_id, timeout_s=60)
        assert done["status"] == "completed", done
        assert done["frames"] == VIDEO_FRAMES and done["distinct_objects"] == {"faces": 1}
        d = c.get(f"/v1/media/{job_id}/download", headers=plane.key.headers)
        assert d.status_code == 200
    job = plane.job(job_id)
    assert job.attempts == 2 and job.lease_owner is None, job
    assert f"job {job_id}: completed" in other.text()
    (tmp_path / "out.mp4").write_bytes(d.content)
    assert len(read_video(tmp_path / "out.mp4").frames) == VIDEO_FRAMES
    only_hook(receiver, job_id, plane.key.webhook_secret)
    assert plane.files_of(job_id) == ["manifest.json", "output.mp4"], "partial output left"


def test_two_workers_send_each_webhook_attempt_once(plane: JobPlane, receiver: Receiver) -> None:
    def first_attempt_fails(got: Received, earlier: list[Received]) -> int:
        event = got.headers["x-redact-event-id"]
        return 500 if all(e.headers["x-redact-event-id"] != event for e in earlier) else 200

    receiver.answer = first_attempt_fails
    receiver.delay_s = 0.2  # a slow receiver: both workers see each retry fall due meanwhile
    jobs = [plane.post(jpeg_bytes(), f"p{i}.jpg", receiver.url) for i in range(6)]
    receiver.wait_for(2 * len(jobs), timeout_s=40)
    time.sleep(LEASE_S + 0.5)  # a duplicate (a retry sent by both workers) would be here now
    got = list(receiver.got)
    sent = Counter((g.headers["x-redact-event-id"], g.headers["x-redact-attempt"]) for g in got)
    assert max(sent.values()) == 1, sent
    assert len(got) == 2 * len(jobs)
    attempts: dict[str, set[str]] = {}
    for g in got:
        assert verify_signature(plane.key.webhook_secret, g.body,
                                g.headers["x-redact-signature"])
        attempts.setdefault(json.loads(g.body)["id"], set()).add(g.headers["x-redact-attempt"])
    assert attempts == {job_id: {"1", "2"} for job_id in jobs}
    with contextlib.closing(Store(plane.store_target)) as db:
        for job_id in jobs:
            (d,) = db.deliveries_for(job_id)
            assert (d.status, d.attempts, d.last_status_code) == ("delivered", 2, 200)
    for w in plane.workers:  # both stop cleanly on SIGTERM and leave no heartbeat behind
        assert w.stop() == 0
    with contextlib.closing(Store(plane.store_target)) as db:
        assert db.live_workers(0) == []
    ready = httpx.get(f"{plane.api.url}/readyz", timeout=10)  # the API alone is not ready
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "no_worker"
    assert ready.json()["checks"]["workers"] is False


def test_a_worker_paused_past_its_lease_has_its_late_result_refused(
        plane: JobPlane, receiver: Receiver, tmp_path: Path) -> None:
    job_id = plane.post(long_clip(tmp_path), "long.mp4", receiver.url)
    paused = plane.holder(wait_mid_job(plane, job_id))
    pause(paused, plane.store_target)
    try:
        with httpx.Client(base_url=plane.api.url, timeout=30) as c:
            done = wait_job(c, plane.key, job_id, timeout_s=60)
        assert done["status"] == "completed", done
        before = plane.job(job_id)
        assert before.attempts == 2 and before.status == "completed"
        out = plane.data_dir / "jobs" / job_id / "output.mp4"
        published = out.stat()
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        manifest = (out.parent / "manifest.json").read_bytes()
    finally:
        paused.signal(signal.SIGCONT)
    # resumed, it finds its lease gone: it stops (or its finish is refused) and publishes nothing
    wait_log(paused, rf"job {job_id}(:| abandoned).*lease was lost")
    time.sleep(0.3)
    assert paused.proc is not None and paused.proc.poll() is None, "the late worker lives on"
    assert plane.job(job_id) == before, "the job's record was written again"
    now = out.stat()
    assert (now.st_ino, now.st_mtime_ns) == (published.st_ino, published.st_mtime_ns)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    assert (out.parent / "manifest.json").read_bytes() == manifest
    assert len(read_video(out).frames) == VIDEO_FRAMES
    only_hook(receiver, job_id, plane.key.webhook_secret)
    assert plane.files_of(job_id) == ["manifest.json", "output.mp4"], "partial output left"


# ------------------------------------------------------------------------------------------
# the store, unit by unit


def _job(db: Store, job_id: str, key_id: str, now: float, webhook: str | None = None) -> None:
    db.insert_job(job_id=job_id, key_id=key_id, kind="image", filename="p.jpg", ext=".jpg",
                  size_bytes=10, media_seconds=0, categories=["faces"],
                  options={"method": "blur", "methods": {}}, webhook_url=webhook,
                  base_url="http://127.0.0.1", created_at=now)


def _finish(db: Store, owner: str, now: float, faces: int, published: list[str]) -> Job | None:
    return db.finish_job("med_1", owner=owner, status="completed", now=now,
                         expires_at=now + 3600, result={"counts": {"faces": faces}},
                         webhook=lambda job: (f"evt_{owner}", "media.completed", b"{}"),
                         publish=lambda: published.append(owner))


def test_job_leases_fence_claims_renewals_and_finishes(store_target: Path | str) -> None:
    db = Store(store_target)
    key, _ = db.create_key("k", "pro")
    now = time.time()
    _job(db, "med_1", key.id, now, webhook="http://127.0.0.1/hook")
    a = db.claim_next(now, "A/1", 10)
    assert a is not None and (a.status, a.attempts, a.lease_owner) == ("processing", 1, "A/1")
    assert a.lease_expires_at == pytest.approx(now + 10)
    assert db.claim_next(now + 5, "B/1", 10) is None, "held"
    assert db.renew_lease("med_1", "A/1", now + 20)
    assert db.claim_next(now + 15, "B/1", 10) is None, "renewed"
    b = db.claim_next(now + 20.5, "B/1", 10)  # expired: taken over, a new attempt
    assert b is not None and (b.attempts, b.lease_owner) == (2, "B/1")
    assert not db.renew_lease("med_1", "A/1", now + 40), "lost"
    db.set_progress("med_1", 0.5, "A/1")
    published: list[str] = []
    assert _finish(db, "A/1", now + 21, 9, published) is None, "a late finish is refused"
    late = db.job_any("med_1")
    assert late is not None and published == []
    assert (late.status, late.result, late.progress, late.lease_owner) == (
        "processing", None, 0.0, "B/1")
    assert db.deliveries_for("med_1") == []
    done = _finish(db, "B/1", now + 22, 1, published)
    assert done is not None and published == ["B/1"]
    assert (done.status, done.result, done.lease_owner) == ("completed", {"counts": {"faces": 1}},
                                                            None)
    assert [d.id for d in db.deliveries_for("med_1")] == ["evt_B/1"]
    assert _finish(db, "B/1", now + 23, 1, published) is None, "finished once"
    assert not db.renew_lease("med_1", "B/1", now + 40)
    assert db.claim_next(now + 100, "C/1", 10) is None
    assert db.job_any("med_1") == done

    # a publish that fails leaves the job as it was; a stopping worker gives a job back
    _job(db, "med_2", key.id, now)
    assert db.claim_next(now, "A/2", 10) is not None

    def broken() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        db.finish_job("med_2", owner="A/2", status="completed", now=now, expires_at=now,
                      result={}, publish=broken)
    held = db.job_any("med_2")
    assert held is not None and (held.status, held.lease_owner) == ("processing", "A/2")
    assert db.release_lease("med_2", "A/2") and not db.release_lease("med_2", "A/2")
    back = db.job_any("med_2")
    assert back is not None and (back.status, back.attempts, back.lease_owner) == (
        "queued", 0, None)
    db.close()


def test_webhook_claims_are_fenced(store_target: Path | str) -> None:
    db = Store(store_target)
    now = time.time()
    db.add_delivery(event_id="evt_1", job_id="med_1", key_id="key_1", url="http://x/",
                    event="media.completed", body=b"{}", now=now)
    d = db.claim_delivery(now, "A/1", 10)
    assert d is not None and (d.id, d.status, d.attempts) == ("evt_1", "sending", 0)
    assert db.claim_delivery(now + 1, "B/1", 10) is None, "claimed"
    assert db.next_delivery_time() == pytest.approx(now + 10)
    assert db.renew_delivery("evt_1", "A/1", now + 20)
    assert db.claim_delivery(now + 15, "B/1", 10) is None
    again = db.claim_delivery(now + 21, "B/1", 10)  # A's claim ran out: the attempt is due again
    assert again is not None and again.attempts == 0
    assert not db.renew_delivery("evt_1", "A/1", now + 40)
    assert not db.record_attempt("evt_1", owner="A/1", status="delivered", status_code=200,
                                 error=None, next_attempt_at=now, now=now + 22)
    assert db.record_attempt("evt_1", owner="B/1", status="pending", status_code=500,
                             error="HTTP 500", next_attempt_at=now + 30, now=now + 22)
    assert db.delivery_counts() == {"pending": 1}
    assert db.claim_delivery(now + 25, "A/2", 10) is None, "not due yet"
    retry = db.claim_delivery(now + 30, "A/2", 10)
    assert retry is not None and retry.attempts == 1
    assert not db.record_attempt("evt_1", owner="B/1", status="delivered", status_code=200,
                                 error=None, next_attempt_at=now, now=now + 31)
    assert db.record_attempt("evt_1", owner="A/2", status="delivered", status_code=200,
                             error=None, next_attempt_at=now, now=now + 31)
    (done,) = db.deliveries_for("med_1")
    assert (done.status, done.attempts, done.last_status_code) == ("delivered", 2, 200)
    assert db.claim_delivery(now + 1000, "C/1", 10) is None
    db.close()


def test_rate_limit_windows_survive_a_new_store(store_target: Path | str) -> None:
    path = store_target
    now = time.time()
    first = Store(path)
    limiter = RateLimiter(first)
    assert [limiter.hit("key_1", 3, now + i).remaining for i in range(3)] == [2, 1, 0]
    first.close()
    second = Store(path)  # a restart, or another API process on the same store
    limiter = RateLimiter(second)
    over = limiter.hit("key_1", 3, now + 10)
    assert (over.allowed, over.remaining, over.reset_s) == (False, 0, 50)
    assert over.headers()["Retry-After"] == "50"
    assert limiter.hit("key_2", 3, now + 10).remaining == 2, "keys have their own windows"
    fresh = limiter.hit("key_1", 3, now + 60)  # the window has ended
    assert (fresh.allowed, fresh.remaining, fresh.reset_s) == (True, 2, 60)
    second.close()


def test_an_older_database_gains_leases_and_its_unfinished_job_is_taken(tmp_path: Path) -> None:
    path = tmp_path / "redact.db"
    old = sqlite3.connect(path)
    old.executescript(_FIRST_SCHEMA)
    old.execute("INSERT INTO jobs (id, key_id, status, kind, filename, ext, size_bytes, "
                "categories, options, base_url, attempts, created_at) VALUES ('med_old', "
                "'key_1', 'processing', 'image', 'p.jpg', '.jpg', 10, '[\"faces\"]', '{}', "
                "'http://127.0.0.1', 1, 1.0)")
    old.commit()
    old.close()
    db = Store(path)
    job = db.job_any("med_old")
    assert job is not None and (job.lease_owner, job.lease_expires_at) == (None, None)
    taken = db.claim_next(time.time(), "A/1", 10)  # no lease at all: taken at once
    assert taken is not None and (taken.id, taken.attempts) == ("med_old", 2)
    db.close()
    Store(path).close()  # opening it again changes nothing


# the tables of the first release, before leases
_FIRST_SCHEMA = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, key_id TEXT NOT NULL,
    status TEXT NOT NULL, kind TEXT NOT NULL, filename TEXT NOT NULL, ext TEXT NOT NULL,
    size_bytes INTEGER NOT NULL, media_seconds REAL NOT NULL DEFAULT 0,
    width INTEGER NOT NULL DEFAULT 0, height INTEGER NOT NULL DEFAULT 0,
    categories TEXT NOT NULL, options TEXT NOT NULL, webhook_url TEXT, base_url TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0, result TEXT, error_code TEXT, error_message TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, started_at REAL,
    completed_at REAL, expires_at REAL, expired INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE deliveries (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, key_id TEXT NOT NULL, url TEXT NOT NULL,
    event TEXT NOT NULL, body BLOB NOT NULL, status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL,
    last_status_code INTEGER, last_error TEXT, created_at REAL NOT NULL, finished_at REAL);
"""
