"""Response shapes, for the OpenAPI document at /docs (and to keep answers consistent)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

JobState = Literal["queued", "processing", "completed", "failed"]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class MediaCreated(BaseModel):
    id: str
    status: JobState
    kind: Literal["image", "video"]
    categories: list[str]
    method: str
    methods: dict[str, str]
    device: str
    created_at: str


class MediaStatus(BaseModel):
    id: str
    object: Literal["media"] = "media"
    status: JobState
    kind: Literal["image", "video"]
    filename: str
    categories: list[str]
    method: str | None
    methods: dict[str, str]
    device: str
    progress: float
    detections: dict[str, int] | None
    distinct_objects: dict[str, int] | None
    download_url: str | None
    manifest_url: str | None
    error: ErrorDetail | None
    expired: bool
    created_at: str
    started_at: str | None
    completed_at: str | None
    expires_at: str | None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    duration_s: float | None = None
    fps: float | None = None
    # what ran: device, gpu, decode, detector_backend, kernels, encoder
    runtime: dict[str, str] | None = None


class MediaList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MediaStatus]
    has_more: bool
    next_cursor: str | None


class Usage(BaseModel):
    month: str
    images: int
    video_seconds: float


class Limits(BaseModel):
    requests_per_minute: int
    monthly_images: int | None
    monthly_video_seconds: float | None
    max_upload_bytes: int


class Account(BaseModel):
    id: str
    name: str
    plan: str
    usage: Usage
    limits: Limits
