"""The service's state in one SQLite file (WAL): API keys (hashed), jobs, monthly usage and
webhook deliveries.

One connection, shared by the event loop and the worker threads behind a lock; every write is
its own transaction (or an explicit one), so a process killed at any moment leaves a consistent
file. Other processes (``redact keys create`` while the server runs) may use the file at the
same time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOB_STATES = ("queued", "processing", "completed", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    plan TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    key_prefix TEXT NOT NULL,
    webhook_secret TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    key_id TEXT NOT NULL,
    status TEXT NOT NULL,
    kind TEXT NOT NULL,
    filename TEXT NOT NULL,
    ext TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    media_seconds REAL NOT NULL DEFAULT 0,
    width INTEGER NOT NULL DEFAULT 0,
    height INTEGER NOT NULL DEFAULT 0,
    categories TEXT NOT NULL,
    options TEXT NOT NULL,
    webhook_url TEXT,
    base_url TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    result TEXT,
    error_code TEXT,
    error_message TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    expires_at REAL,
    expired INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_key ON jobs (key_id, seq);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL,
    month TEXT NOT NULL,
    images INTEGER NOT NULL DEFAULT 0,
    video_seconds REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, month)
);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    url TEXT NOT NULL,
    event TEXT NOT NULL,
    body BLOB NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_status_code INTEGER,
    last_error TEXT,
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_attempt_at);
"""


def hash_key(key: str) -> str:
    """SHA-256 hex of an API key: keys are random (256 bits), so no slow hash is needed."""
    return hashlib.sha256(key.encode()).hexdigest()


def month_of(ts: float) -> str:
    """``YYYY-MM`` (UTC) of a unix time: the quota period."""
    return time.strftime("%Y-%m", time.gmtime(ts))


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    plan: str
    key_prefix: str
    webhook_secret: str
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True)
class Job:
    """One media job as stored. ``options`` holds the redaction choices (method per category),
    ``result`` the counts and figures of a finished job."""

    seq: int
    id: str
    key_id: str
    status: str
    kind: str
    filename: str
    ext: str
    size_bytes: int
    media_seconds: float
    width: int
    height: int
    categories: list[str]
    options: dict[str, Any]
    webhook_url: str | None
    base_url: str
    progress: float
    result: dict[str, Any] | None
    error_code: str | None
    error_message: str | None
    attempts: int
    created_at: float
    started_at: float | None
    completed_at: float | None
    expires_at: float | None
    expired: bool
    deleted: bool


@dataclass(frozen=True)
class Delivery:
    id: str
    job_id: str
    key_id: str
    url: str
    event: str
    body: bytes
    status: str
    attempts: int
    next_attempt_at: float
    last_status_code: int | None
    last_error: str | None


def _job(row: sqlite3.Row) -> Job:
    d = dict(row)
    d["categories"] = json.loads(d["categories"])
    d["options"] = json.loads(d["options"])
    d["result"] = json.loads(d["result"]) if d["result"] else None
    d["expired"] = bool(d["expired"])
    d["deleted"] = bool(d["deleted"])
    return Job(**d)


class Store:
    """Thread-safe access to the SQLite file at ``path`` (created with its schema if new)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None,
                                   timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._db.executescript(_SCHEMA)  # idempotent; executescript commits by itself

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locking) transaction, committed on success."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._db.execute(sql, args).fetchone()
            return row

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    # ----------------------------------------------------------------------------------------
    # keys

    def create_key(self, name: str, plan: str) -> tuple[ApiKey, str]:
        """A new key: its record and the secret key itself (shown once, stored hashed)."""
        key = "rk_" + secrets.token_urlsafe(32)
        rec = ApiKey(id="key_" + secrets.token_hex(8), name=name, plan=plan,
                     key_prefix=key[:8], webhook_secret="whsec_" + secrets.token_urlsafe(32),
                     created_at=time.time(), revoked_at=None)
        self._exec("INSERT INTO keys (id, name, plan, key_hash, key_prefix, webhook_secret, "
                   "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (rec.id, name, plan, hash_key(key), rec.key_prefix, rec.webhook_secret,
                    rec.created_at))
        return rec, key

    def key_by_secret(self, key: str) -> ApiKey | None:
        """The live (not revoked) key whose secret is ``key``."""
        row = self._one("SELECT id, name, plan, key_prefix, webhook_secret, created_at, "
                        "revoked_at FROM keys WHERE key_hash = ? AND revoked_at IS NULL",
                        (hash_key(key),))
        return ApiKey(**dict(row)) if row else None

    def key(self, key_id: str) -> ApiKey | None:
        row = self._one("SELECT id, name, plan, key_prefix, webhook_secret, created_at, "
                        "revoked_at FROM keys WHERE id = ?", (key_id,))
        return ApiKey(**dict(row)) if row else None

    def list_keys(self) -> list[ApiKey]:
        rows = self._all("SELECT id, name, plan, key_prefix, webhook_secret, created_at, "
                         "revoked_at FROM keys ORDER BY created_at")
        return [ApiKey(**dict(r)) for r in rows]

    def revoke_key(self, key_id: str) -> bool:
        return self._exec("UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                          (time.time(), key_id)) > 0

    # ----------------------------------------------------------------------------------------
    # usage

    def usage(self, key_id: str, month: str) -> tuple[int, float]:
        """Images and video seconds charged to ``key_id`` in ``month``."""
        row = self._one("SELECT images, video_seconds FROM usage WHERE key_id = ? AND month = ?",
                        (key_id, month))
        return (int(row["images"]), float(row["video_seconds"])) if row else (0, 0.0)

    @staticmethod
    def _charge(db: sqlite3.Connection, key_id: str, month: str, images: int,
                seconds: float) -> None:
        db.execute("INSERT INTO usage (key_id, month, images, video_seconds) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT (key_id, month) DO UPDATE SET images = images + excluded.images,"
                   " video_seconds = video_seconds + excluded.video_seconds",
                   (key_id, month, images, seconds))

    # ----------------------------------------------------------------------------------------
    # jobs

    def count_waiting(self) -> int:
        row = self._one("SELECT count(*) AS n FROM jobs WHERE status = 'queued' AND deleted = 0")
        return int(row["n"]) if row else 0

    def counts_by_status(self) -> dict[str, int]:
        rows = self._all("SELECT status, count(*) AS n FROM jobs WHERE deleted = 0 "
                         "GROUP BY status")
        out = dict.fromkeys(JOB_STATES, 0)
        out.update({r["status"]: int(r["n"]) for r in rows})
        return out

    def insert_job(self, *, job_id: str, key_id: str, kind: str, filename: str, ext: str,
                   size_bytes: int, media_seconds: float, categories: list[str],
                   options: dict[str, Any], webhook_url: str | None, base_url: str,
                   created_at: float, width: int = 0, height: int = 0) -> None:
        """Store a new queued job and charge its usage, in one transaction."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, key_id, status, kind, filename, ext, size_bytes, "
                "media_seconds, width, height, categories, options, webhook_url, base_url, "
                "created_at) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, key_id, kind, filename, ext, size_bytes, media_seconds, width, height,
                 json.dumps(categories), json.dumps(options), webhook_url, base_url, created_at))
            self._charge(db, key_id, month_of(created_at), 1 if kind == "image" else 0,
                         media_seconds if kind == "video" else 0.0)

    def job(self, job_id: str, key_id: str | None = None) -> Job | None:
        """The job ``job_id`` (of ``key_id`` when given); deleted jobs are not found."""
        sql = "SELECT * FROM jobs WHERE id = ? AND deleted = 0"
        args: tuple[Any, ...] = (job_id,)
        if key_id is not None:
            sql += " AND key_id = ?"
            args += (key_id,)
        row = self._one(sql, args)
        return _job(row) if row else None

    def job_any(self, job_id: str) -> Job | None:
        """The job ``job_id`` whether deleted or not (workers)."""
        row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(row) if row else None

    def list_jobs(self, key_id: str, limit: int, before_seq: int | None,
                  status: str | None) -> list[Job]:
        """Newest first; ``before_seq`` pages on from a previous page's last job."""
        sql = "SELECT * FROM jobs WHERE key_id = ? AND deleted = 0"
        args: tuple[Any, ...] = (key_id,)
        if before_seq is not None:
            sql += " AND seq < ?"
            args += (before_seq,)
        if status is not None:
            sql += " AND status = ?"
            args += (status,)
        sql += " ORDER BY seq DESC LIMIT ?"
        return [_job(r) for r in self._all(sql, (*args, limit))]

    def claim_next(self, now: float) -> Job | None:
        """Mark the oldest queued job processing and return it (None when none waits)."""
        with self.transaction() as db:
            row = db.execute("SELECT seq FROM jobs WHERE status = 'queued' AND deleted = 0 "
                             "ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'processing', started_at = ?, progress = 0, "
                       "attempts = attempts + 1 WHERE seq = ?", (now, row["seq"]))
            got = db.execute("SELECT * FROM jobs WHERE seq = ?", (row["seq"],)).fetchone()
        return _job(got)

    def requeue_unfinished(self) -> list[str]:
        """At start-up: jobs left processing by a dead process wait again. Returns their ids."""
        with self.transaction() as db:
            rows = db.execute("SELECT id FROM jobs WHERE status = 'processing'").fetchall()
            db.execute("UPDATE jobs SET status = 'queued', progress = 0 "
                       "WHERE status = 'processing'")
        return [r["id"] for r in rows]

    def set_progress(self, job_id: str, progress: float) -> None:
        self._exec("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'processing'",
                   (progress, job_id))

    def finish_job(self, job_id: str, *, status: str, now: float, expires_at: float,
                   result: dict[str, Any] | None = None, error_code: str | None = None,
                   error_message: str | None = None, refund: bool = False,
                   webhook: Callable[[Job], tuple[str, str, bytes]] | None = None) -> Job | None:
        """Record a job's end (completed or failed); ``refund`` returns its usage charge.

        ``webhook(job)`` gives ``(event_id, event, body)`` of the webhook to send, stored in the
        same transaction (for jobs that asked for one and are not deleted): a process killed
        after this returns still sends it, and one killed before redoes the job.
        """
        with self.transaction() as db:
            db.execute("UPDATE jobs SET status = ?, progress = ?, result = ?, error_code = ?, "
                       "error_message = ?, completed_at = ?, expires_at = ? WHERE id = ?",
                       (status, 1.0 if status == "completed" else 0.0,
                        json.dumps(result) if result is not None else None, error_code,
                        error_message, now, expires_at, job_id))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            job = _job(row)
            if refund:
                self._charge(db, job.key_id, month_of(job.created_at),
                             -1 if job.kind == "image" else 0,
                             -job.media_seconds if job.kind == "video" else 0.0)
            if webhook is not None and job.webhook_url and not job.deleted:
                event_id, event, body = webhook(job)
                db.execute("INSERT INTO deliveries (id, job_id, key_id, url, event, body, "
                           "status, next_attempt_at, created_at) "
                           "VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                           (event_id, job.id, job.key_id, job.webhook_url, event, body, now,
                            now))
        return job

    def mark_deleted(self, job_id: str, key_id: str) -> bool:
        return self._exec("UPDATE jobs SET deleted = 1 WHERE id = ? AND key_id = ? "
                          "AND deleted = 0", (job_id, key_id)) > 0

    def due_for_expiry(self, now: float) -> list[str]:
        rows = self._all("SELECT id FROM jobs WHERE expired = 0 AND expires_at IS NOT NULL "
                         "AND expires_at <= ?", (now,))
        return [r["id"] for r in rows]

    def mark_expired(self, job_id: str) -> None:
        self._exec("UPDATE jobs SET expired = 1 WHERE id = ?", (job_id,))

    # ----------------------------------------------------------------------------------------
    # webhook deliveries

    def add_delivery(self, *, event_id: str, job_id: str, key_id: str, url: str, event: str,
                     body: bytes, now: float) -> None:
        self._exec("INSERT INTO deliveries (id, job_id, key_id, url, event, body, status, "
                   "next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                   (event_id, job_id, key_id, url, event, body, now, now))

    def due_deliveries(self, now: float, limit: int = 32) -> list[Delivery]:
        rows = self._all("SELECT id, job_id, key_id, url, event, body, status, attempts, "
                         "next_attempt_at, last_status_code, last_error FROM deliveries "
                         "WHERE status = 'pending' AND next_attempt_at <= ? "
                         "ORDER BY next_attempt_at LIMIT ?", (now, limit))
        return [Delivery(**dict(r)) for r in rows]

    def next_delivery_time(self) -> float | None:
        row = self._one("SELECT min(next_attempt_at) AS t FROM deliveries "
                        "WHERE status = 'pending'")
        return float(row["t"]) if row and row["t"] is not None else None

    def record_attempt(self, delivery_id: str, *, status: str, status_code: int | None,
                       error: str | None, next_attempt_at: float, now: float) -> None:
        """One delivery attempt: ``status`` pending (retry at ``next_attempt_at``), delivered
        or failed (given up)."""
        self._exec("UPDATE deliveries SET attempts = attempts + 1, status = ?, "
                   "last_status_code = ?, last_error = ?, next_attempt_at = ?, "
                   "finished_at = CASE WHEN ? = 'pending' THEN NULL ELSE ? END WHERE id = ?",
                   (status, status_code, error, next_attempt_at, status, now, delivery_id))

    def deliveries_for(self, job_id: str) -> list[Delivery]:
        rows = self._all("SELECT id, job_id, key_id, url, event, body, status, attempts, "
                         "next_attempt_at, last_status_code, last_error FROM deliveries "
                         "WHERE job_id = ? ORDER BY created_at", (job_id,))
        return [Delivery(**dict(r)) for r in rows]

    def delivery_counts(self) -> dict[str, int]:
        rows = self._all("SELECT status, count(*) AS n FROM deliveries GROUP BY status")
        return {r["status"]: int(r["n"]) for r in rows}
