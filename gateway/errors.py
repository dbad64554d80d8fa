"""Errors as the API shows them: ``{"error": {"code", "message"}}`` with an HTTP status.

This module is the one place where exception types become HTTP statuses and error codes:
the pipeline's :mod:`engines.errors` types (for uploads and for failed jobs), the gateway's own
:class:`ApiError`, and FastAPI's and Starlette's (404, 405, 422).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engines.errors import (
    DetectorError,
    MediaError,
    ModelNotFoundError,
    RedactionError,
    UnknownCategoryError,
)

log = logging.getLogger(__name__)

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 410: "gone",
               413: "payload_too_large", 415: "unsupported_media_type", 422: "validation_error",
               429: "rate_limited", 500: "internal_error", 503: "unavailable"}


class ApiError(Exception):
    """An error answered to the client as is."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def classify(exc: BaseException) -> tuple[int, str]:
    """HTTP status and error code for a pipeline exception (also used for failed jobs)."""
    if isinstance(exc, UnknownCategoryError):
        return 400, "unknown_category"
    if isinstance(exc, MediaError):
        return 400, "unsupported_media"
    if isinstance(exc, DetectorError):
        return 500, "detector_failed"
    if isinstance(exc, ModelNotFoundError):
        return 503, "model_missing"
    if isinstance(exc, RedactionError):
        return 500, "redaction_failed"
    return 500, "internal_error"


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=dict(headers or {}))


def install_handlers(app: FastAPI) -> None:
    """Make every error the app can answer use the JSON error shape."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        headers = exc.headers
        if exc.status == 413:
            # the rest of a body too large is not read: the connection ends with the answer
            headers = {**headers, "Connection": "close"}
        return error_response(exc.status, exc.code, exc.message, headers)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, code, message, exc.headers)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return error_response(422, "validation_error", "; ".join(parts) or "invalid request")

    async def on_redaction(request: Request, exc: Exception) -> JSONResponse:
        status, code = classify(exc)
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc)
        return error_response(status, code, str(exc))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(RedactionError, on_redaction)
    app.add_exception_handler(Exception, on_unexpected)
