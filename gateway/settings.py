"""Service settings: embedded defaults, each overridable by an environment variable ``REDACT_*``.

``REDACT_DATA_DIR=/var/lib/redact``, ``REDACT_DATABASE_URL=postgresql://...``,
``REDACT_STORAGE=/mnt/redact``, ``REDACT_WORKERS=4``, ``REDACT_RETENTION_HOURS=1``,
``REDACT_WEBHOOK_ALLOW_PRIVATE=1``, and plans as JSON, merged over the defaults:
``REDACT_PLANS='{"free": {"requests_per_minute": 30}}'``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.database import is_postgres
from gateway.leases import process_worker_id

MB = 1024 * 1024


class Plan(BaseModel):
    """Limits of one plan; ``None`` means unlimited."""

    requests_per_minute: int = Field(ge=1)
    monthly_images: int | None = Field(default=None, ge=0)
    monthly_video_seconds: float | None = Field(default=None, ge=0)
    max_upload_bytes: int = Field(ge=1)


DEFAULT_PLANS: dict[str, dict[str, Any]] = {
    "free": {"requests_per_minute": 60, "monthly_images": 100, "monthly_video_seconds": 300,
             "max_upload_bytes": 25 * MB},
    "starter": {"requests_per_minute": 120, "monthly_images": 2_000,
                "monthly_video_seconds": 3_600, "max_upload_bytes": 100 * MB},
    "pro": {"requests_per_minute": 300, "monthly_images": 20_000,
            "monthly_video_seconds": 36_000, "max_upload_bytes": 500 * MB},
    "scale": {"requests_per_minute": 1_000, "monthly_images": None,
              "monthly_video_seconds": None, "max_upload_bytes": 2_048 * MB},
}


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "redact"


class Settings(BaseSettings):
    """Everything ``redact serve`` needs; see the README's "REST API" section."""

    model_config = SettingsConfigDict(env_prefix="REDACT_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    data_dir: Path = Field(default_factory=_default_data_dir)
    # the database: None = the SQLite file redact.db in the data directory (one machine); a
    # postgresql://user:password@host:port/name URL for API replicas and workers on many machines
    database_url: str | None = None
    # where job files (uploads, outputs, manifests), recordings and the viewer-token key live:
    # a directory every API replica and worker reaches (default: the data directory)
    storage: Path | None = None
    # absolute base of download links (e.g. https://redact.example.com); default: the request's
    public_url: str | None = None

    workers: int = Field(default=2, ge=1, le=64)  # jobs redacted at the same time
    queue_size: int = Field(default=200, ge=1)  # jobs waiting; more answer 503 + Retry-After
    # memory the jobs being redacted may use together, estimated before they start from their
    # declared size and categories (gateway.jobs.estimated_bytes); a job larger than this runs
    # alone. With the ~320 MiB of an idle service this keeps jobs that share the machine under
    # 1 GB. Faces in a photo of 1 megapixel or more are estimated at ~700-800 MiB (the face
    # pass is capped at 3840x2160), so such photos run one at a time; small ones side by side
    work_memory_mb: int = Field(default=640, ge=1)
    detector_threads: int = Field(default=0, ge=0)  # onnxruntime threads per detector; 0 = all
    max_job_attempts: int = Field(default=3, ge=1)  # a job that kills the process this often fails
    retention_hours: float = Field(default=24.0, gt=0)  # outputs kept this long after finishing
    keep_input: bool = False  # keep the unredacted upload until expiry (default: deleted at end)
    sweep_interval_s: float = Field(default=60.0, gt=0)
    # work a worker claims (a job, a webhook delivery) is its for this long, renewed every
    # third of it while it runs; a worker that dies or stalls loses it to another after this
    # (12 s: a killed worker's job is running again elsewhere within about 12 s)
    lease_s: float = Field(default=12.0, gt=0)
    # a Ray cluster that runs the live streams (each as an actor; `redact ray-streams` places
    # them): workers then run media jobs and webhooks only. "auto": this node's cluster
    ray_address: str | None = None
    ray_stream_cpus: float = Field(default=1.0, ge=0)  # CPUs Ray reserves for each stream
    ray_stream_gpus: float = Field(default=0.25, ge=0, le=1)  # GPU share of a cuda stream
    # this process's name in leases and heartbeats (host:pid:random)
    worker_id: str = Field(default_factory=process_worker_id, min_length=1, max_length=200)
    # `redact serve` runs the workers in its own process too (`--no-worker`: the API alone)
    embedded_worker: bool = True

    max_image_pixels: int = Field(default=64_000_000, ge=1)  # declared width x height
    max_video_pixels: int = Field(default=4096 * 2304, ge=1)  # per frame
    max_form_fields: int = Field(default=64, ge=1)
    max_field_bytes: int = Field(default=8192, ge=1)
    validate_concurrency: int = Field(default=2, ge=1)  # uploads decoded for checks at once

    webhook_allow_private: bool = False  # allow private, loopback and link-local targets
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(default=8, ge=1)
    webhook_backoff_s: float = Field(default=5.0, gt=0)  # first retry delay; doubles each time
    webhook_backoff_max_s: float = Field(default=3600.0, gt=0)

    plans: dict[str, Plan] = Field(default_factory=lambda: {
        k: Plan(**v) for k, v in DEFAULT_PLANS.items()})
    log_level: str = "info"

    @field_validator("plans", mode="before")
    @classmethod
    def _merge_plans(cls, value: Any) -> Any:
        """Plans given (env JSON or keyword) override the defaults field by field."""
        if not isinstance(value, dict):
            return value
        merged: dict[str, Any] = {k: dict(v) for k, v in DEFAULT_PLANS.items()}
        for name, given in value.items():
            base = merged.get(name, {})
            if isinstance(given, Plan):
                given = given.model_dump()
            if not isinstance(given, dict):
                raise ValueError(f"plan {name!r} must be an object")
            merged[name] = {**base, **given}
        return merged

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not is_postgres(value):
            raise ValueError("the database must be a postgresql://user:password@host:port/name "
                             "URL (leave it unset for the SQLite file in the data directory)")
        return value

    @field_validator("storage", mode="before")
    @classmethod
    def _shared_directory(cls, value: Any) -> Any:
        if value is None or value == "":
            return None
        text = str(value)
        if "://" in text:
            if text.startswith("file://"):
                return text.removeprefix("file://")
            raise ValueError(f"storage {text!r}: only a directory (a path, or file:///path) is "
                             "supported; mount a shared file system (NFS, CephFS, an S3 bucket "
                             "through a FUSE mount) at the same path on every node")
        return value

    @property
    def db_path(self) -> Path:
        """The SQLite file (used when no ``database_url`` is set)."""
        return self.data_dir / "redact.db"

    @property
    def store_target(self) -> Path | str:
        """What :class:`gateway.store.Store` opens: the PostgreSQL URL, else the SQLite file."""
        return self.database_url or self.db_path

    @property
    def shared(self) -> bool:
        """Whether other machines may share this process's database and files (API replicas,
        workers elsewhere): set by a PostgreSQL database or a storage directory."""
        return self.database_url is not None or self.storage is not None

    @property
    def storage_dir(self) -> Path:
        """Where job files, recordings and the viewer-token key live."""
        return self.storage or self.data_dir

    def plan(self, name: str) -> Plan:
        """The limits of ``name``; an unknown plan name (removed from config) gets free's."""
        return self.plans.get(name) or self.plans["free"]
