"""``/healthz`` (the process answers), ``/readyz`` (it can take jobs) and ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.auth import ServiceDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: models loaded, workers (in this process or a live "
                                "`redact worker`), database and disk")
def readyz(service: ServiceDep) -> JSONResponse:
    checks = service.readiness()
    ready = all(checks.values())
    body: dict[str, object] = {"status": "ready" if ready else "not_ready", "checks": checks}
    error = None if ready else service.readiness_error(checks)
    if error:
        body["error"] = error
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(service: ServiceDep) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
