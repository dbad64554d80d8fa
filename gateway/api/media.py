"""``/v1/media``: submit a photo or video, follow it, download the redacted file."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from engines.errors import UnknownCategoryError
from engines.gpu import parse_device
from engines.redact import Method
from engines.registry import resolve_categories
from gateway.api.models import ErrorBody, JobState, MediaCreated, MediaList, MediaStatus
from gateway.auth import KeyDep, ServiceDep
from gateway.errors import ApiError
from gateway.jobs import CONTENT_TYPES, fsync_dir, iso, redact_settings, status_json
from gateway.limits import seconds_to_next_month
from gateway.service import Service
from gateway.settings import Plan
from gateway.store import ApiKey, Job, month_of
from gateway.uploads import Inspected, Upload, inspect_upload, receive_upload
from gateway.webhooks import WebhookUrlError, check_url

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/media", tags=["media"])

QUEUE_FULL_RETRY_S = 30
_METHOD_FIELD = re.compile(r"(?:method|obfuscation_type)\[([^\]]{1,64})\]")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 410, 413, 415, 429, 503)}

_UPLOAD_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "a JPEG, PNG or WebP photo, or a video (MP4, MOV, MKV, WebM, "
                                "AVI, TS); the kind is judged by content"},
        "categories[]": {"type": "array", "items": {"type": "string"},
                         "description": "categories to redact (repeat the field; also "
                                        "`categories`, `pii_categories[]`, comma-separated "
                                        "allowed); omitted: every available category"},
        "method": {"type": "string", "enum": ["blur", "pixelate", "pixelation", "fill"],
                   "description": "how regions are covered (also `obfuscation_type`); "
                                  "per category: `method[faces]=pixelate`"},
        "device": {"type": "string", "enum": ["auto", "cpu", "cuda"],
                   "description": "where the job runs: cuda (a GPU), cpu, or auto (default: "
                                  "the server's REDACT_DEVICE, else auto); the status and "
                                  "manifest's `runtime` say what ran"},
        "webhook_url": {"type": "string", "format": "uri",
                        "description": "POSTed the status JSON when the job ends, signed"},
    }}}}}}


def _job_or_404(service: Service, key: ApiKey, job_id: str) -> Job:
    job = service.db.job(job_id, key.id) if len(job_id) <= 64 else None
    if job is None:
        raise ApiError(404, "not_found", f"no media job {job_id[:64]!r}")
    return job


def _quota_error(message: str, now: float) -> ApiError:
    return ApiError(429, "quota_exceeded", message,
                    {"Retry-After": str(seconds_to_next_month(now))})


def _queue_full(service: Service) -> None:
    if service.db.count_waiting() >= service.settings.queue_size:
        raise ApiError(503, "queue_full", "too many jobs are waiting; retry later",
                       {"Retry-After": str(QUEUE_FULL_RETRY_S)})


def _choices(upload: Upload, embedded_worker: bool = False) -> tuple[list[str], dict[str, Any]]:
    """Categories and methods asked for (400 on unknown ones)."""
    names = upload.values("categories[]", "categories", "pii_categories[]", "pii_categories")
    categories = list(resolve_categories(names or None))
    raw = upload.first("method", "obfuscation_type") or "blur"
    try:
        method = Method.parse(raw).value
    except ValueError as exc:
        raise ApiError(400, "invalid_method", str(exc)) from None
    methods: dict[str, str] = {}
    for field, values in upload.fields.items():
        m = _METHOD_FIELD.fullmatch(field)
        if m and values:
            cat = resolve_categories([m.group(1)])[0]  # unknown: 400 unknown_category
            try:
                methods[cat] = Method.parse(values[-1]).value
            except ValueError as exc:
                raise ApiError(400, "invalid_method", f"{field}: {exc}") from None
    options: dict[str, Any] = {"method": method, "methods": methods}
    device = upload.first("device")
    if device:
        try:
            options["device"] = parse_device(device)
        except ValueError as exc:
            raise ApiError(400, "invalid_device", str(exc)) from None
    try:
        settings = redact_settings(categories, options)
    except UnknownCategoryError:
        raise
    except ValueError as exc:
        raise ApiError(400, "invalid_options", str(exc)) from None
    if embedded_worker:
        try:  # this process's worker runs the job: a GPU asked for must be here
            settings.run_device()
        except ValueError as exc:
            raise ApiError(400, "device_unavailable", str(exc)) from None
    return categories, options


def _check_quota(plan: Plan, key: ApiKey, service: Service, inspected: Inspected,
                 now: float) -> None:
    images, seconds = service.db.usage(key.id, month_of(now))
    if inspected.kind == "image" and plan.monthly_images is not None \
            and images + 1 > plan.monthly_images:
        raise _quota_error(f"the {key.plan} plan's {plan.monthly_images} images this month "
                           "are used up", now)
    if inspected.kind == "video" and plan.monthly_video_seconds is not None \
            and seconds + inspected.seconds > plan.monthly_video_seconds:
        left = max(0.0, plan.monthly_video_seconds - seconds)
        raise _quota_error(f"this {inspected.seconds:.1f} s video exceeds the {key.plan} plan's "
                           f"video left this month ({left:.1f} of "
                           f"{plan.monthly_video_seconds:.0f} s)", now)


def _inspect(service: Service, upload: Upload) -> Inspected:
    assert upload.path is not None
    with service.validate_slots:
        return inspect_upload(upload.path, upload.filename, service.settings.max_image_pixels,
                              service.settings.max_video_pixels)


@router.post("", status_code=202, response_model=MediaCreated, responses=_ERRORS,
             openapi_extra=_UPLOAD_FORM, summary="Submit a photo or video for redaction")
async def create_media(request: Request, key: KeyDep, service: ServiceDep) -> JSONResponse:
    """Stream the upload to disk, check it, and queue a job (202). The body is multipart:
    ``file``, optional ``categories[]``, ``method`` or ``method[CATEGORY]``, ``webhook_url``."""
    settings = service.settings
    plan = settings.plan(key.plan)
    now = time.time()
    _queue_full(service)
    images, seconds = service.db.usage(key.id, month_of(now))
    if (plan.monthly_images is not None and images >= plan.monthly_images
            and plan.monthly_video_seconds is not None
            and seconds >= plan.monthly_video_seconds):
        raise _quota_error(f"the {key.plan} plan's monthly quota is used up", now)
    try:
        upload = await receive_upload(request, service.layout.tmp, plan.max_upload_bytes,
                                      settings.max_form_fields, settings.max_field_bytes)
    except ApiError as exc:
        service.metrics.uploads.labels(exc.code).inc()
        raise
    try:
        if upload.path is None:
            raise ApiError(400, "missing_file", "the form has no 'file' part")
        categories, options = _choices(upload, service.settings.embedded_worker)
        webhook_url = upload.first("webhook_url")
        if webhook_url:
            try:
                await run_in_threadpool(check_url, webhook_url, settings.webhook_allow_private)
            except WebhookUrlError as exc:
                raise ApiError(400, "invalid_webhook_url", str(exc)) from None
        inspected = await run_in_threadpool(_inspect, service, upload)
        # no await from here on: the checks and the insert see the same state
        now = time.time()
        _check_quota(plan, key, service, inspected, now)
        _queue_full(service)
        job_id = "med_" + secrets.token_hex(12)
        job_dir = service.layout.job_dir(job_id)
        job_dir.mkdir(parents=True)
        os.replace(upload.path, job_dir / f"input{inspected.ext}")
        upload.path = None
        fsync_dir(job_dir)
        filename = Path(upload.filename).stem[:180] + inspected.ext
        service.db.insert_job(
            job_id=job_id, key_id=key.id, kind=inspected.kind, filename=filename,
            ext=inspected.ext, size_bytes=upload.size, media_seconds=inspected.seconds,
            width=inspected.width, height=inspected.height,
            categories=categories, options=options, webhook_url=webhook_url,
            base_url=str(request.base_url), created_at=now)
    except ApiError as exc:
        upload.discard()
        service.metrics.uploads.labels(exc.code).inc()
        raise
    except BaseException:
        upload.discard()
        service.metrics.uploads.labels("error").inc()
        raise
    service.notify_workers()
    service.metrics.uploads.labels("accepted").inc()
    service.metrics.upload_bytes.inc(upload.size)
    log.info("job %s queued: %s, %d bytes, key %s", job_id, inspected.kind, upload.size, key.id)
    body = {"id": job_id, "status": "queued", "kind": inspected.kind, "categories": categories,
            "method": options["method"], "methods": options["methods"],
            "device": options.get("device") or "auto", "created_at": iso(now)}
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/media/{job_id}"})


@router.get("", response_model=MediaList, responses=_ERRORS, summary="List your jobs")
def list_media(key: KeyDep, service: ServiceDep,
               limit: Annotated[int, Query(ge=1, le=100, description="jobs per page")] = 20,
               cursor: Annotated[str | None, Query(
                   max_length=32, description="next_cursor of the previous page")] = None,
               status: Annotated[JobState | None, Query(
                   description="only jobs in this state")] = None) -> dict[str, Any]:
    """The caller's jobs, newest first."""
    before: int | None = None
    if cursor:
        if not cursor.isdigit():
            raise ApiError(400, "invalid_cursor", "cursor must be a next_cursor value")
        before = int(cursor)
    jobs = service.db.list_jobs(key.id, limit + 1, before, status)
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return {"object": "list",
            "data": [status_json(j, service.settings.public_url) for j in jobs],
            "has_more": more, "next_cursor": str(jobs[-1].seq) if more and jobs else None}


@router.get("/{job_id}", response_model=MediaStatus, responses=_ERRORS,
            summary="A job's status, detections and download link")
def get_media(job_id: str, key: KeyDep, service: ServiceDep) -> dict[str, Any]:
    return status_json(_job_or_404(service, key, job_id), service.settings.public_url)


def _finished_file(service: Service, job: Job, path: Path, what: str) -> Path:
    if job.expired:
        raise ApiError(410, "expired", f"the {what} was deleted after the retention window")
    if job.status == "failed":
        raise ApiError(409, "job_failed", f"the job failed ({job.error_code}); no {what}")
    if job.status != "completed":
        raise ApiError(409, "not_ready", f"the job is {job.status}; no {what} yet")
    if not path.exists():
        raise ApiError(410, "expired", f"the {what} is no longer on the server")
    return path


@router.get("/{job_id}/download", responses={200: {"content": {
    "image/jpeg": {}, "video/mp4": {}}}, **_ERRORS}, response_class=Response,
    summary="The redacted file")
def download_media(job_id: str, key: KeyDep, service: ServiceDep) -> FileResponse:
    job = _job_or_404(service, key, job_id)
    path = _finished_file(service, job, service.layout.output(job), "redacted file")
    return FileResponse(path, media_type=CONTENT_TYPES.get(job.ext, "application/octet-stream"),
                        filename=job.filename)


@router.get("/{job_id}/manifest", responses=_ERRORS, response_class=Response,
            summary="The audit manifest: settings, models, every box")
def media_manifest(job_id: str, key: KeyDep, service: ServiceDep) -> FileResponse:
    job = _job_or_404(service, key, job_id)
    path = _finished_file(service, job, service.layout.manifest(job), "manifest")
    return FileResponse(path, media_type="application/json")


@router.delete("/{job_id}", status_code=204, response_class=Response, responses=_ERRORS,
               summary="Delete a job's input and output")
def delete_media(job_id: str, key: KeyDep, service: ServiceDep) -> Response:
    job = _job_or_404(service, key, job_id)
    service.db.mark_deleted(job.id, key.id)
    if job.status == "processing":  # the worker removes the rest when it ends
        for path in (service.layout.input(job), service.layout.output(job)):
            with contextlib.suppress(OSError):
                path.unlink()
    else:
        service.layout.remove_files(job.id)
    log.info("job %s deleted by key %s", job.id, key.id)
    return Response(status_code=204)
