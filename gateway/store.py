"""The service's state: API keys (hashed), jobs, monthly usage, webhook deliveries, per-minute
rate windows, live-stream definitions (with the lease and the runtime figures of the worker
running each) and the workers' heartbeats; in one SQLite file (WAL, the default) or a PostgreSQL
database shared by API replicas and workers on many machines (:mod:`gateway.database`: the same
queries on both).

Callers use only the methods of :class:`Store` (no SQL outside this module):

- keys: ``create_key``, ``key_by_secret``, ``key``, ``list_keys``, ``revoke_key``
- usage and limits: ``usage``, ``rate_hit``
- jobs: ``insert_job``, ``job``, ``job_any``, ``list_jobs``, ``count_waiting``,
  ``counts_by_status``, ``claim_next``, ``renew_lease``, ``release_lease``, ``set_progress``,
  ``finish_job``, ``mark_deleted``, ``due_for_expiry``, ``mark_expired``, ``reap_abandoned``
- webhook deliveries: ``add_delivery``, ``claim_delivery``, ``renew_delivery``,
  ``record_attempt``, ``next_delivery_time``, ``deliveries_for``, ``delivery_counts``
- live streams: ``insert_stream``, ``upsert_stream``, ``stream``, ``list_streams``,
  ``update_stream``, ``delete_stream``, ``remove_config_streams``, ``claim_stream``,
  ``renew_streams``, ``release_stream``, ``next_stream_expiry``
- workers: ``worker_seen``, ``remove_worker``, ``live_workers``
- leaders (one process among many doing a task): ``claim_leader``, ``release_leader``
- ``close``

Work is shared by leases: a worker claims a job (or a webhook delivery) under an owner name
until a time it keeps renewing; a claim whose lease ran out may be taken by another worker, and
whatever the first owner writes after that is refused (``finish_job``, ``record_attempt``,
``set_progress`` and ``renew_*`` are fenced by owner). A live stream is claimed the same way
(``claim_stream``) and held for as long as its worker runs it: each renewal
(``renew_streams``) also writes the stream's runtime figures (where it is served, its
statistics) and answers with the definition as it stands, so the worker sees a new version
(``update_stream`` bumps it) or a deleted stream at its next renewal. Lease times are unix
seconds, so the machines sharing a store need clocks that agree to well within a lease.

One connection per process, shared by the event loop and the worker threads behind a lock;
every write is its own transaction (or an explicit one), so a process killed at any moment
leaves a consistent database. Other processes (``redact worker``, ``redact keys create``, API
replicas) use it at the same time: on SQLite ``BEGIN IMMEDIATE`` holds the file's write lock
across all of them; on PostgreSQL a claim locks the rows it takes (``FOR UPDATE SKIP LOCKED``),
so workers on many machines claim different jobs at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.database import Database, Executor, display_name, open_database

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
    deleted INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires_at REAL
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
    finished_at REAL,
    lease_owner TEXT,
    lease_expires_at REAL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_attempt_at);
CREATE TABLE IF NOT EXISTS rate_windows (
    key_id TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    seen_at REAL NOT NULL,
    ready INTEGER NOT NULL DEFAULT 0,
    control_url TEXT
);
CREATE TABLE IF NOT EXISTS streams (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    owner TEXT,
    definition TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    lease_owner TEXT,
    lease_expires_at REAL,
    runtime TEXT,
    runtime_at REAL
);
CREATE INDEX IF NOT EXISTS streams_by_owner ON streams (owner, created_at);
CREATE TABLE IF NOT EXISTS leaders (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    lease_expires_at REAL NOT NULL
);
"""

# columns added since the first release: added to an older file when it is opened
_ADDED_COLUMNS = {"jobs": (("lease_owner", "TEXT"), ("lease_expires_at", "REAL")),
                  "deliveries": (("lease_owner", "TEXT"), ("lease_expires_at", "REAL")),
                  "workers": (("control_url", "TEXT"),)}
_DELIVERY_COLUMNS = ("id, job_id, key_id, url, event, body, status, attempts, next_attempt_at, "
                     "last_status_code, last_error")
# whether anything can be claimed (read without the write lock, before a claim takes it)
_CLAIMABLE_JOB = ("SELECT 1 FROM jobs WHERE deleted = 0 AND (status = 'queued' OR "
                  "(status = 'processing' AND coalesce(lease_expires_at, 0) <= ?)) LIMIT 1")
_CLAIMABLE_DELIVERY = ("SELECT 1 FROM deliveries WHERE (status = 'pending' AND "
                       "next_attempt_at <= ?) OR (status = 'sending' AND "
                       "coalesce(lease_expires_at, 0) <= ?) LIMIT 1")
RATE_SWEEP_EVERY = 1000  # rate_hit calls between two deletions of idle windows
WORKER_ROWS_KEPT_S = 24 * 3600  # heartbeats of workers gone this long are deleted"""


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
    lease_owner: str | None = None  # who holds the job while it is processing
    lease_expires_at: float | None = None  # when another worker may take it over


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


@dataclass(frozen=True)
class WorkerInfo:
    """A worker process as its heartbeat records it; ``ready``: its models are loaded."""

    id: str
    host: str
    pid: int
    started_at: float
    seen_at: float
    ready: bool
    control_url: str | None = None  # where its stream runner takes forwarded requests


@dataclass(frozen=True)
class StreamRow:
    """A live stream as stored: its ``definition`` (the user's fields, see
    :mod:`gateway.streams`), a ``version`` bumped by each change, and while a worker runs it,
    the claim (``lease_owner`` until ``lease_expires_at``) and the ``runtime`` figures that
    worker last wrote (at ``runtime_at``)."""

    id: str
    name: str
    owner: str | None
    definition: dict[str, Any]
    version: int
    created_at: float
    updated_at: float
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    runtime: dict[str, Any] | None = None
    runtime_at: float | None = None


def _stream(row: Mapping[str, Any]) -> StreamRow:
    d = dict(row)
    d["definition"] = json.loads(d["definition"])
    d["runtime"] = json.loads(d["runtime"]) if d["runtime"] else None
    return StreamRow(**d)


def _job(row: Mapping[str, Any]) -> Job:
    d = dict(row)
    d["categories"] = json.loads(d["categories"])
    d["options"] = json.loads(d["options"])
    d["result"] = json.loads(d["result"]) if d["result"] else None
    d["expired"] = bool(d["expired"])
    d["deleted"] = bool(d["deleted"])
    return Job(**d)


class Store:
    """Thread-safe access to the database at ``target``: a SQLite file's path (created with
    its schema if new) or a PostgreSQL URL (its tables created on first use)."""

    def __init__(self, target: Path | str, busy_timeout_s: float = 30.0) -> None:
        self.target = target
        self._db: Database = open_database(target, busy_timeout_s)
        self._rate_calls = 0
        self._db.create_schema(_SCHEMA, _ADDED_COLUMNS)

    def __repr__(self) -> str:
        return f"Store({display_name(self.target)!r})"

    def close(self) -> None:
        self._db.close()

    def transaction(self) -> contextlib.AbstractContextManager[Executor]:
        """A write transaction, committed on success (see :mod:`gateway.database`)."""
        return self._db.transaction()

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Mapping[str, Any] | None:
        with self._db.lock:
            row: Mapping[str, Any] | None = self._db.execute(sql, args).fetchone()
            return row

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[Mapping[str, Any]]:
        with self._db.lock:
            return list(self._db.execute(sql, args).fetchall())

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        with self._db.lock:
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
    def _charge(db: Executor, key_id: str, month: str, images: int,
                seconds: float) -> None:
        db.execute("INSERT INTO usage (key_id, month, images, video_seconds) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT (key_id, month) DO UPDATE SET images = usage.images + "
                   "excluded.images, video_seconds = usage.video_seconds + "
                   "excluded.video_seconds",
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

    def claim_next(self, now: float, owner: str, lease_s: float) -> Job | None:
        """Take the oldest job that is queued, or processing under a lease that ran out (its
        worker died or stalled), for ``owner`` until ``now + lease_s``; each claim counts as an
        attempt. None when there is nothing to take."""
        if self._one(_CLAIMABLE_JOB, (now,)) is None:  # idle pollers take no write lock
            return None
        with self.transaction() as db:
            seqs = [r["seq"] for r in (
                db.execute("SELECT seq FROM jobs WHERE status = 'queued' AND deleted = 0 "
                           f"ORDER BY seq LIMIT 1{self._db.skip_locked}").fetchone(),
                db.execute("SELECT seq FROM jobs WHERE status = 'processing' AND deleted = 0 "
                           "AND coalesce(lease_expires_at, 0) <= ? ORDER BY seq "
                           f"LIMIT 1{self._db.skip_locked}", (now,)).fetchone())
                if r is not None]
            if not seqs:
                return None
            seq = min(seqs)
            db.execute("UPDATE jobs SET status = 'processing', started_at = ?, progress = 0, "
                       "attempts = attempts + 1, lease_owner = ?, lease_expires_at = ? "
                       "WHERE seq = ?", (now, owner, now + lease_s, seq))
            got = db.execute("SELECT * FROM jobs WHERE seq = ?", (seq,)).fetchone()
        return _job(got)

    def renew_lease(self, job_id: str, owner: str, until: float) -> bool:
        """Extend ``owner``'s lease on a processing job; False when it is no longer theirs
        (taken over, finished, released)."""
        return self._exec("UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND "
                          "status = 'processing' AND lease_owner = ?",
                          (until, job_id, owner)) > 0

    def release_lease(self, job_id: str, owner: str) -> bool:
        """Give a job back unfinished (a worker stopping cleanly): queued again at once, and
        the attempt is not counted as an interruption."""
        return self._exec("UPDATE jobs SET status = 'queued', progress = 0, lease_owner = NULL, "
                          "lease_expires_at = NULL, "
                          "attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END "
                          "WHERE id = ? AND status = 'processing' AND lease_owner = ?",
                          (job_id, owner)) > 0

    def reap_abandoned(self, now: float) -> list[str]:
        """Jobs deleted while they were processing whose worker is gone (lease run out): they
        are closed as failed (and not charged) and their ids returned, for their files to go."""
        with self.transaction() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status = 'processing' AND deleted = 1 "
                              f"AND coalesce(lease_expires_at, 0) <= ?{self._db.skip_locked}",
                              (now,)).fetchall()
            for r in rows:
                job = _job(r)
                db.execute("UPDATE jobs SET status = 'failed', error_code = 'interrupted', "
                           "error_message = 'deleted while processing', completed_at = ?, "
                           "lease_owner = NULL, lease_expires_at = NULL WHERE id = ?",
                           (now, job.id))
                self._charge(db, job.key_id, month_of(job.created_at),
                             -1 if job.kind == "image" else 0,
                             -job.media_seconds if job.kind == "video" else 0.0)
        return [r["id"] for r in rows]

    def set_progress(self, job_id: str, progress: float, owner: str | None = None) -> None:
        """Record progress of a processing job (only ``owner``'s, when given)."""
        if owner is None:
            self._exec("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'processing'",
                       (progress, job_id))
        else:
            self._exec("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'processing' "
                       "AND lease_owner = ?", (progress, job_id, owner))

    def finish_job(self, job_id: str, *, owner: str, status: str, now: float,
                   expires_at: float, result: dict[str, Any] | None = None,
                   error_code: str | None = None, error_message: str | None = None,
                   refund: bool = False,
                   webhook: Callable[[Job], tuple[str, str, bytes]] | None = None,
                   publish: Callable[[], None] | None = None) -> Job | None:
        """Record a job's end (completed or failed); ``refund`` returns its usage charge.

        Fenced: only while the job is still processing under ``owner``'s lease; otherwise
        (the lease was lost: another worker took the job over, or it was released) nothing is
        written and None is returned. ``publish()`` (the renames that make the output visible)
        runs under the same write lock, before the status changes, so two workers can never
        both publish; it is skipped for a job deleted meanwhile, and an exception from it
        leaves the job as it was.

        ``webhook(job)`` gives ``(event_id, event, body)`` of the webhook to send, stored in the
        same transaction (for jobs that asked for one and are not deleted): a process killed
        after this returns still sends it, and one killed before redoes the job.
        """
        with self.transaction() as db:
            held = db.execute("SELECT deleted FROM jobs WHERE id = ? AND status = 'processing' "
                              f"AND lease_owner = ?{self._db.lock_rows}",
                              (job_id, owner)).fetchone()
            if held is None:
                return None
            if publish is not None and not held["deleted"]:
                publish()
            db.execute("UPDATE jobs SET status = ?, progress = ?, result = ?, error_code = ?, "
                       "error_message = ?, completed_at = ?, expires_at = ?, "
                       "lease_owner = NULL, lease_expires_at = NULL WHERE id = ?",
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

    def claim_delivery(self, now: float, owner: str, lease_s: float) -> Delivery | None:
        """Take the delivery due longest (pending and due, or being sent under a claim that ran
        out) for ``owner`` until ``now + lease_s``; None when none is due."""
        if self._one(_CLAIMABLE_DELIVERY, (now, now)) is None:  # no write lock when idle
            return None
        with self.transaction() as db:
            rows = [r for r in (
                db.execute("SELECT id, next_attempt_at AS t FROM deliveries WHERE "
                           "status = 'pending' AND next_attempt_at <= ? "
                           f"ORDER BY next_attempt_at LIMIT 1{self._db.skip_locked}",
                           (now,)).fetchone(),
                db.execute("SELECT id, lease_expires_at AS t FROM deliveries WHERE "
                           "status = 'sending' AND coalesce(lease_expires_at, 0) <= ? "
                           f"ORDER BY lease_expires_at LIMIT 1{self._db.skip_locked}",
                           (now,)).fetchone())
                if r is not None]
            if not rows:
                return None
            chosen = min(rows, key=lambda r: float(r["t"] or 0))["id"]
            db.execute("UPDATE deliveries SET status = 'sending', lease_owner = ?, "
                       "lease_expires_at = ? WHERE id = ?", (owner, now + lease_s, chosen))
            row = db.execute(f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE id = ?",
                             (chosen,)).fetchone()
        return Delivery(**dict(row))

    def renew_delivery(self, delivery_id: str, owner: str, until: float) -> bool:
        """Extend ``owner``'s claim on a delivery being sent; False when it is lost."""
        return self._exec("UPDATE deliveries SET lease_expires_at = ? WHERE id = ? AND "
                          "status = 'sending' AND lease_owner = ?",
                          (until, delivery_id, owner)) > 0

    def next_delivery_time(self) -> float | None:
        """When the next delivery falls due (a retry, or a claim running out)."""
        row = self._one("SELECT min(t) AS t FROM ("
                        "SELECT min(next_attempt_at) AS t FROM deliveries "
                        "WHERE status = 'pending' UNION ALL "
                        "SELECT min(coalesce(lease_expires_at, 0)) AS t FROM deliveries "
                        "WHERE status = 'sending') AS due")
        return float(row["t"]) if row and row["t"] is not None else None

    def record_attempt(self, delivery_id: str, *, owner: str, status: str,
                       status_code: int | None, error: str | None, next_attempt_at: float,
                       now: float) -> bool:
        """One delivery attempt by the claim's ``owner``: ``status`` pending (retry at
        ``next_attempt_at``), delivered or failed (given up). False (nothing written) when the
        claim was lost to another worker."""
        return self._exec(
            "UPDATE deliveries SET attempts = attempts + 1, status = ?, last_status_code = ?, "
            "last_error = ?, next_attempt_at = ?, lease_owner = NULL, lease_expires_at = NULL, "
            "finished_at = CASE WHEN ? = 'pending' THEN NULL ELSE ? END "
            "WHERE id = ? AND status = 'sending' AND lease_owner = ?",
            (status, status_code, error, next_attempt_at, status, now, delivery_id,
             owner)) > 0

    def deliveries_for(self, job_id: str) -> list[Delivery]:
        rows = self._all(f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE job_id = ? "
                         "ORDER BY created_at", (job_id,))
        return [Delivery(**dict(r)) for r in rows]

    def delivery_counts(self) -> dict[str, int]:
        """Deliveries by state: pending (one being sent counts as pending), delivered,
        failed."""
        rows = self._all("SELECT status, count(*) AS n FROM deliveries GROUP BY status")
        out: dict[str, int] = {}
        for r in rows:
            state = "pending" if r["status"] == "sending" else r["status"]
            out[state] = out.get(state, 0) + int(r["n"])
        return out

    # ----------------------------------------------------------------------------------------
    # per-minute rate windows

    def rate_hit(self, key_id: str, limit: int, now: float,
                 window_s: float) -> tuple[bool, int, float]:
        """Count one request of ``key_id`` against its window (``window_s`` long, from the
        first request after the last window ended): ``(allowed, count, window start)``; a
        request over ``limit`` is not counted. Shared by every process on the store, and kept
        across restarts."""
        with self.transaction() as db:
            # the key's row exists (an empty window if new) and is locked until the commit, so
            # API replicas counting the same key at once wait for each other
            db.execute("INSERT INTO rate_windows (key_id, started_at, count) VALUES (?, ?, 0) "
                       "ON CONFLICT (key_id) DO NOTHING", (key_id, now))
            row = db.execute("SELECT started_at, count FROM rate_windows WHERE key_id = ?"
                             f"{self._db.lock_rows}", (key_id,)).fetchone()
            start, count = float(row["started_at"]), int(row["count"])
            if not start <= now < start + window_s:  # ended (or the clock went back)
                start, count = now, 0
            allowed = count < limit
            if allowed:
                count += 1
                db.execute("UPDATE rate_windows SET started_at = ?, count = ? WHERE key_id = ?",
                           (start, count, key_id))
            self._rate_calls += 1
            if self._rate_calls % RATE_SWEEP_EVERY == 0:  # forget idle keys
                db.execute("DELETE FROM rate_windows WHERE started_at < ?", (now - window_s,))
        return allowed, count, start

    # ----------------------------------------------------------------------------------------
    # live streams

    def insert_stream(self, *, stream_id: str, name: str, owner: str | None,
                      definition: dict[str, Any], now: float) -> bool:
        """A new stream (version 1, run by no worker yet); False, and nothing written, when a
        stream with this id or name exists."""
        try:
            with self.transaction() as db:
                if db.execute("SELECT 1 FROM streams WHERE id = ? OR name = ?",
                              (stream_id, name)).fetchone():
                    return False
                db.execute("INSERT INTO streams (id, name, owner, definition, version, "
                           "created_at, updated_at) VALUES (?, ?, ?, ?, 1, ?, ?)",
                           (stream_id, name, owner, json.dumps(definition), now, now))
        except self._db.conflict_errors:  # another process inserted it meanwhile
            return False
        return True

    def upsert_stream(self, *, stream_id: str, name: str, owner: str | None,
                      definition: dict[str, Any], now: float) -> StreamRow | None:
        """Insert the stream ``stream_id``, or replace its definition (bumping the version
        when it changed); None when another stream has this name."""
        try:
            return self._upsert_stream(stream_id, name, owner, definition, now)
        except self._db.conflict_errors:  # inserted by another process meanwhile: once more
            return self._upsert_stream(stream_id, name, owner, definition, now)

    def _upsert_stream(self, stream_id: str, name: str, owner: str | None,
                       definition: dict[str, Any], now: float) -> StreamRow | None:
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM streams WHERE name = ? AND id != ?",
                          (name, stream_id)).fetchone():
                return None
            body = json.dumps(definition)
            row = db.execute("SELECT definition FROM streams WHERE id = ?",
                             (stream_id,)).fetchone()
            if row is None:
                db.execute("INSERT INTO streams (id, name, owner, definition, version, "
                           "created_at, updated_at) VALUES (?, ?, ?, ?, 1, ?, ?)",
                           (stream_id, name, owner, body, now, now))
            elif json.loads(row["definition"]) != definition:
                db.execute("UPDATE streams SET name = ?, owner = ?, definition = ?, "
                           "version = version + 1, updated_at = ? WHERE id = ?",
                           (name, owner, body, now, stream_id))
            got = db.execute("SELECT * FROM streams WHERE id = ?", (stream_id,)).fetchone()
        return _stream(got)

    def stream(self, stream_id: str) -> StreamRow | None:
        row = self._one("SELECT * FROM streams WHERE id = ?", (stream_id,))
        return _stream(row) if row else None

    def list_streams(self, visible_to: str | None = None) -> list[StreamRow]:
        """Every stream, oldest first; with ``visible_to`` (a key id), that key's streams and
        the ones without an owner (the cameras file's)."""
        if visible_to is None:
            rows = self._all("SELECT * FROM streams ORDER BY created_at, id")
        else:
            rows = self._all("SELECT * FROM streams WHERE owner IS NULL OR owner = ? "
                             "ORDER BY created_at, id", (visible_to,))
        return [_stream(r) for r in rows]

    def update_stream(self, stream_id: str, definition: dict[str, Any], now: float,
                      version: int | None = None) -> StreamRow | None:
        """A new definition, as the next version; with ``version``, only if the stream is
        still at that version (None: gone, or changed meanwhile)."""
        with self.transaction() as db:
            sql = "UPDATE streams SET definition = ?, version = version + 1, updated_at = ? " \
                "WHERE id = ?"
            args: tuple[Any, ...] = (json.dumps(definition), now, stream_id)
            if version is not None:
                sql += " AND version = ?"
                args += (version,)
            if db.execute(sql, args).rowcount == 0:
                return None
            got = db.execute("SELECT * FROM streams WHERE id = ?", (stream_id,)).fetchone()
        return _stream(got)

    def delete_stream(self, stream_id: str) -> bool:
        """Delete a stream; its worker stops it at its next renewal."""
        return self._exec("DELETE FROM streams WHERE id = ?", (stream_id,)) > 0

    def remove_config_streams(self, keep: set[str]) -> list[str]:
        """Delete the streams without an owner (a cameras file's) whose ids are not in
        ``keep``; returns their ids."""
        with self.transaction() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM streams WHERE owner IS NULL")
                   if r["id"] not in keep]
            for stream_id in ids:
                db.execute("DELETE FROM streams WHERE id = ?", (stream_id,))
        return ids

    def claim_stream(self, now: float, owner: str, lease_s: float,
                     stream_id: str | None = None,
                     take_from: str | None = None) -> StreamRow | None:
        """Take the oldest stream no worker holds (never claimed, released, or under a lease
        that ran out: its worker died or stalled) for ``owner`` until ``now + lease_s``; the
        runtime figures of an earlier holder are cleared. None when there is none.

        ``stream_id``: only that stream. ``take_from``: also while its lease is held by an
        owner whose name starts with this (an earlier life of the same Ray actor, restarted
        after its node died: at most one life runs at a time)."""
        where = "coalesce(lease_expires_at, 0) <= ?"
        args: tuple[Any, ...] = (now,)
        if take_from:
            where = f"({where} OR substr(coalesce(lease_owner, ''), 1, ?) = ?)"
            args += (len(take_from), take_from)
        if stream_id is not None:
            where += " AND id = ?"
            args += (stream_id,)
        if self._one(f"SELECT 1 FROM streams WHERE {where} LIMIT 1", args) is None:
            return None  # idle pollers take no write lock
        with self.transaction() as db:
            row = db.execute(f"SELECT id FROM streams WHERE {where} "
                             f"ORDER BY created_at, id LIMIT 1{self._db.skip_locked}",
                             args).fetchone()
            if row is None:
                return None
            db.execute("UPDATE streams SET lease_owner = ?, lease_expires_at = ?, "
                       "runtime = NULL, runtime_at = NULL WHERE id = ?",
                       (owner, now + lease_s, row["id"]))
            got = db.execute("SELECT * FROM streams WHERE id = ?", (row["id"],)).fetchone()
        return _stream(got)

    def renew_streams(self, claims: Mapping[str, tuple[str, dict[str, Any] | None]], now: float,
                      until: float) -> dict[str, StreamRow | None]:
        """For each ``stream id -> (owner, runtime)``: extend the owner's lease to ``until``
        and record ``runtime`` (when given) as of ``now``, in one transaction. Answers, per
        stream, the row as it now stands, or None where the claim is lost (another worker
        took the stream over, or it was released) or the stream was deleted."""
        out: dict[str, StreamRow | None] = {}
        if not claims:
            return out
        with self.transaction() as db:
            for stream_id, (owner, runtime) in claims.items():
                if runtime is None:
                    n = db.execute("UPDATE streams SET lease_expires_at = ? WHERE id = ? AND "
                                   "lease_owner = ?", (until, stream_id, owner)).rowcount
                else:
                    n = db.execute("UPDATE streams SET lease_expires_at = ?, runtime = ?, "
                                   "runtime_at = ? WHERE id = ? AND lease_owner = ?",
                                   (until, json.dumps(runtime), now, stream_id,
                                    owner)).rowcount
                row = db.execute("SELECT * FROM streams WHERE id = ?",
                                 (stream_id,)).fetchone() if n else None
                out[stream_id] = _stream(row) if row is not None else None
        return out

    def next_stream_expiry(self, now: float) -> float | None:
        """When the next lease on a stream runs out (after ``now``): a worker with room for
        more streams looks again then."""
        row = self._one("SELECT min(lease_expires_at) AS t FROM streams "
                        "WHERE lease_expires_at > ?", (now,))
        return float(row["t"]) if row and row["t"] is not None else None

    def release_stream(self, stream_id: str, owner: str) -> bool:
        """Give a stream back (its worker stops it cleanly): another worker may claim it at
        once. False when ``owner`` no longer held it."""
        return self._exec("UPDATE streams SET lease_owner = NULL, lease_expires_at = NULL, "
                          "runtime = NULL, runtime_at = NULL WHERE id = ? AND lease_owner = ?",
                          (stream_id, owner)) > 0

    # ----------------------------------------------------------------------------------------
    # workers

    def worker_seen(self, worker_id: str, *, host: str, pid: int, started_at: float,
                    now: float, ready: bool, control_url: str | None = None) -> None:
        """A worker's heartbeat (``ready``: its models are loaded; ``control_url``: where its
        stream runner takes the requests the API forwards)."""
        with self.transaction() as db:
            db.execute("INSERT INTO workers (id, host, pid, started_at, seen_at, ready, "
                       "control_url) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE "
                       "SET seen_at = excluded.seen_at, ready = excluded.ready, "
                       "control_url = excluded.control_url",
                       (worker_id, host, pid, started_at, now, int(ready), control_url))
            db.execute("DELETE FROM workers WHERE seen_at < ?", (now - WORKER_ROWS_KEPT_S,))

    def claim_leader(self, name: str, owner: str, now: float, lease_s: float) -> bool:
        """Become (or stay) the one process doing ``name``, until ``now + lease_s``: True
        while ``owner`` holds it (it renews by calling again), False while another owner's
        lease runs."""
        return self._exec(
            "INSERT INTO leaders (name, owner, lease_expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
            "lease_expires_at = excluded.lease_expires_at "
            "WHERE leaders.owner = excluded.owner OR leaders.lease_expires_at <= ?",
            (name, owner, now + lease_s, now)) > 0

    def release_leader(self, name: str, owner: str) -> None:
        """Stop being the leader of ``name`` (a clean stop: another takes over at once)."""
        self._exec("DELETE FROM leaders WHERE name = ? AND owner = ?", (name, owner))

    def remove_worker(self, worker_id: str) -> None:
        """A worker stopped cleanly."""
        self._exec("DELETE FROM workers WHERE id = ?", (worker_id,))

    def live_workers(self, since: float) -> list[WorkerInfo]:
        """Workers whose last heartbeat is at ``since`` or later."""
        rows = self._all("SELECT id, host, pid, started_at, seen_at, ready, control_url "
                         "FROM workers WHERE seen_at >= ? ORDER BY started_at", (since,))
        return [WorkerInfo(**{**dict(r), "ready": bool(r["ready"])}) for r in rows]
