"""Live streams: ``/v1/streams`` (create, list, read, change, delete), viewer tokens, WHEP
signalling for WebRTC viewers, recordings, and the viewer page.

Definitions and figures come from the store (:class:`gateway.stream_catalog.StreamCatalog`);
WHEP offers and hang-ups are forwarded to the worker running the stream (503 with
``Retry-After`` while none does)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from engines.errors import UnknownCategoryError
from gateway.auth import ServiceDep, current_key
from gateway.errors import ApiError
from gateway.jobs import iso
from gateway.store import ApiKey, StreamRow
from gateway.stream_catalog import RETRY_AFTER_S, StreamCatalog, StreamUnavailable
from gateway.streams import StreamError
from gateway.viewer import STREAMS_PAGE, viewer_page
from pipeline.record import NAME_RE
from pipeline.webrtc import WebRtcError

router = APIRouter(tags=["streams"])


def get_streams(request: Request) -> StreamCatalog:
    catalog: StreamCatalog = request.app.state.streams
    return catalog


StreamsDep = Annotated[StreamCatalog, Depends(get_streams)]
KeyDep = Annotated[ApiKey, Depends(current_key)]


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _bad(exc: Exception) -> ApiError:
    if isinstance(exc, UnknownCategoryError):
        return ApiError(400, "unknown_category", str(exc))
    return ApiError(400, "invalid_stream", str(exc))


def _stream(streams: StreamCatalog, stream_id: str, owner: str | None) -> StreamRow:
    r = streams.get(stream_id, owner)
    if r is None:
        raise ApiError(404, "not_found", f"no stream {stream_id!r}")
    return r


def _viewer(request: Request, service: ServiceDep, streams: StreamCatalog, stream_id: str,
            token: str | None) -> StreamRow:
    """A viewer is let in with a valid viewer token for this stream, or an API key."""
    if token and streams.check_token(stream_id, token):
        return _stream(streams, stream_id, None)
    if token and not request.headers.get("authorization"):
        raise ApiError(401, "unauthorized", "the viewer token is invalid or has expired")
    key = current_key(request, service)
    return _stream(streams, stream_id, key.id)


@router.post("/v1/streams", status_code=201, summary="Create a live stream")
def create_stream(request: Request, key: KeyDep, streams: StreamsDep,
                  body: Annotated[dict[str, Any], Body(examples=[{
                      "name": "gate-1", "source": "rtsp://user:pass@10.0.0.5/stream1",
                      "categories": ["faces", "license_plates"], "method": "blur",
                      "zones": [[[0, 0.8], [0.3, 0.8], [0.3, 1], [0, 1]]],
                      "outputs": ["rtsp", "webrtc"]}])]) -> dict[str, Any]:
    try:
        r = streams.create(body, key.id)
    except (StreamError, ValueError) as exc:
        raise _bad(exc) from None
    return streams.describe(r, _base(request))


@router.get("/v1/streams", summary="List your live streams")
def list_streams(request: Request, key: KeyDep, streams: StreamsDep) -> dict[str, Any]:
    return {"data": [streams.describe(r, _base(request)) for r in streams.list(key.id)]}


@router.get("/v1/streams/{stream_id}", summary="A live stream's status and statistics")
def get_stream(stream_id: str, request: Request, key: KeyDep,
               streams: StreamsDep) -> dict[str, Any]:
    return streams.describe(_stream(streams, stream_id, key.id), _base(request))


@router.patch("/v1/streams/{stream_id}", summary="Change categories, method or zones")
def patch_stream(stream_id: str, request: Request, key: KeyDep, streams: StreamsDep,
                 body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
    r = _stream(streams, stream_id, key.id)
    try:
        r = streams.update(r, body)
    except (StreamError, ValueError) as exc:
        raise _bad(exc) from None
    return streams.describe(r, _base(request))


@router.delete("/v1/streams/{stream_id}", status_code=204, response_class=Response,
               summary="Stop and delete a live stream")
async def delete_stream(stream_id: str, request: Request, streams: StreamsDep,
                        service: ServiceDep) -> Response:
    key = current_key(request, service)
    await streams.delete(_stream(streams, stream_id, key.id))
    return Response(status_code=204)


def _recorded(r: StreamRow) -> None:
    if "record" not in r.definition.get("outputs", []):
        raise ApiError(404, "not_found", "this stream is not recorded (outputs: \"record\")")


@router.get("/v1/streams/{stream_id}/recordings", summary="A stream's recorded MP4 segments")
def list_recordings(stream_id: str, request: Request, key: KeyDep,
                    streams: StreamsDep) -> dict[str, Any]:
    r = _stream(streams, stream_id, key.id)
    _recorded(r)
    base = f"{_base(request)}/v1/streams/{r.id}/recordings"
    _, stats, _ = streams.status(r)
    return {"data": [{"name": seg.path.name, "started_at": iso(seg.start),
                      "ended_at": iso(seg.end), "duration_s": round(seg.duration_s, 3),
                      "bytes": seg.bytes, "download_url": f"{base}/{seg.path.name}"}
                     for seg in streams.segments(r)],
            "recording": bool(stats.get("recording", {}).get("recording", False))}


@router.get("/v1/streams/{stream_id}/recordings/{name}", summary="Download one segment",
            response_class=FileResponse)
def get_recording(stream_id: str, name: str, key: KeyDep, streams: StreamsDep) -> FileResponse:
    r = _stream(streams, stream_id, key.id)
    _recorded(r)
    path = streams.recording_dir(r) / name
    if not NAME_RE.match(name) or not path.is_file():
        raise ApiError(404, "not_found", f"no finished segment {name!r}")
    return FileResponse(path, media_type="video/mp4", filename=name)


@router.post("/v1/streams/{stream_id}/viewer-token", summary="A short-lived viewer link")
def viewer_token(stream_id: str, request: Request, key: KeyDep, streams: StreamsDep,
                 ttl_s: Annotated[int | None, Query(ge=60, le=86400)] = None) -> dict[str, Any]:
    r = _stream(streams, stream_id, key.id)
    token, expires = streams.viewer_token(r.id, ttl_s)
    base = _base(request)
    return {"token": token, "expires_at": expires,
            "viewer_url": f"{base}/viewer/{r.id}?token={token}",
            "whep_url": f"{base}/v1/streams/{r.id}/whep?token={token}"}


@router.post("/v1/streams/{stream_id}/whep", status_code=201, response_class=Response,
             summary="WHEP: send an SDP offer, get the answer",
             openapi_extra={"requestBody": {"content": {"application/sdp": {}}}})
async def whep_offer(stream_id: str, request: Request, service: ServiceDep,
                     streams: StreamsDep, token: str | None = None) -> Response:
    r = _viewer(request, service, streams, stream_id, token)
    if "webrtc" not in r.definition.get("outputs", []):
        raise ApiError(404, "not_found", "this stream has no WebRTC output")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/sdp":
        raise ApiError(415, "unsupported_media_type", "send the offer as application/sdp")
    body = await request.body()
    if len(body) > 64 * 1024:
        raise ApiError(413, "too_large", "an SDP offer is at most 64 KiB")
    try:
        sid, answer = await streams.whep_offer(r, body.decode("utf-8", errors="replace"))
    except WebRtcError as exc:
        raise ApiError(400, "bad_offer", str(exc)) from None
    except StreamUnavailable as exc:
        raise ApiError(503, "stream_unavailable",
                       f"no worker runs this stream now ({exc}); try again shortly",
                       {"Retry-After": str(RETRY_AFTER_S)}) from None
    location = f"/v1/streams/{stream_id}/whep/{sid}"
    return Response(answer, status_code=201, media_type="application/sdp",
                    headers={"Location": location, "ETag": f'"{sid}"'})


@router.delete("/v1/streams/{stream_id}/whep/{session_id}", status_code=204,
               response_class=Response, summary="WHEP: hang up")
async def whep_hangup(stream_id: str, session_id: str, request: Request, service: ServiceDep,
                      streams: StreamsDep, token: str | None = None) -> Response:
    r = _viewer(request, service, streams, stream_id, token)
    if not await streams.whep_hangup(r, session_id):
        raise ApiError(404, "not_found", "no such viewer session")
    return Response(status_code=204)


@router.get("/streams", response_class=HTMLResponse, include_in_schema=False)
def streams_page() -> HTMLResponse:
    """Every stream of a key, with links to their viewers (the key is typed into the page)."""
    return HTMLResponse(STREAMS_PAGE)


@router.get("/viewer/{stream_id}", response_class=HTMLResponse, include_in_schema=False)
def viewer(stream_id: str, request: Request, service: ServiceDep, streams: StreamsDep,
           token: str | None = None) -> HTMLResponse:
    r = _viewer(request, service, streams, stream_id, token)
    return HTMLResponse(viewer_page(r.name, f"/v1/streams/{stream_id}/whep",
                                    f"/viewer/{stream_id}/stats", token or "",
                                    streams.stream_settings.ice_servers))


@router.get("/viewer/{stream_id}/stats", include_in_schema=False)
def viewer_stats(stream_id: str, request: Request, service: ServiceDep, streams: StreamsDep,
                 token: str | None = None) -> JSONResponse:
    r = _viewer(request, service, streams, stream_id, token)
    d = streams.describe(r, _base(request), with_token=False)
    return JSONResponse({"name": d["name"], "status": d["status"], "stats": d["stats"]})
