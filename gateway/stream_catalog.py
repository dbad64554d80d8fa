"""The API's side of live streams: definitions in the store, answers read from the rows the
running workers keep up to date, and what needs the running stream forwarded to its worker.

- Definitions are rows of the store (:class:`gateway.store.Store`, ``*_stream`` methods):
  created, listed, changed (each change is a new version, which the running worker applies)
  and deleted here. At start-up, streams an older release kept in ``streams.json`` are moved
  into the store, and the cameras of ``redact serve --config FILE`` are upserted with their
  fixed ids (those no longer in the file are deleted).
- A stream's status, statistics and RTSP/publish URLs come from the runtime figures its
  worker writes with every lease renewal: "connecting" until a worker runs it, "reconnecting"
  when those figures are older than a lease (the worker is gone; another takes the stream over
  once its lease runs out).
- WHEP offers and hang-ups, and the stop of a deleted stream, go to the worker running the
  stream: directly when it is this process's own worker, else over HTTP to the worker's control
  URL, signed with the data directory's secret. A stream no worker runs answers 503.
- Recordings are files in the data directory: listed and served from here.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from gateway.settings import Settings
from gateway.store import Store, StreamRow
from gateway.streams import (
    RecordingIndex,
    StreamDef,
    StreamError,
    StreamSecrets,
    StreamSettings,
    describe_definition,
    idle_stats,
    load_stream_config,
    migrate_streams_file,
    record_dir,
    rtsp_publish_url,
)
from pipeline.record import Segment
from pipeline.webrtc import WebRtcError

if TYPE_CHECKING:
    from gateway.service import Service
    from gateway.stream_runner import StreamRunner

log = logging.getLogger(__name__)

CHANGEABLE = ("categories", "method", "zones", "settings", "device")
FORWARD_TIMEOUT_S = 15.0
RETRY_AFTER_S = 2


class StreamUnavailable(RuntimeError):
    """No worker runs the stream now (none has claimed it yet, or its worker is gone)."""


class StreamCatalog:
    def __init__(self, settings: Settings, stream_settings: StreamSettings,
                 config_file: Path | None, service: Service) -> None:
        self.settings = settings
        self.stream_settings = stream_settings
        self.config_file = config_file
        self.service = service
        self.secrets = StreamSecrets(settings.storage_dir)
        self.recordings = RecordingIndex()
        self.record_dir = record_dir(stream_settings, settings.storage_dir)
        self._http: httpx.AsyncClient | None = None

    @property
    def db(self) -> Store:
        return self.service.db

    @property
    def runner(self) -> StreamRunner | None:
        """This process's own worker's streams, if it runs one."""
        worker = self.service.worker
        return worker.streams if worker is not None else None

    def start(self) -> None:
        """Once the store is open: move ``streams.json`` in, upsert the cameras file's."""
        migrate_streams_file(self.db, self.settings.data_dir)
        if self.config_file is None:
            return
        specs = load_stream_config(self.config_file)
        for spec in specs:
            row = self.db.upsert_stream(stream_id=spec.id, name=spec.name, owner=None,
                                        definition=spec.definition(), now=time.time())
            if row is None:
                log.error("camera %s of %s not added: a stream of that name exists",
                          spec.name, self.config_file)
        gone = self.db.remove_config_streams({s.id for s in specs})
        if gone:
            log.info("%d camera(s) no longer in %s deleted", len(gone), self.config_file)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # definitions ----------------------------------------------------------------------------
    def create(self, data: dict[str, Any], owner: str) -> StreamRow:
        spec = StreamDef.parse(data, owner)
        if not self.db.insert_stream(stream_id=spec.id, name=spec.name, owner=owner,
                                     definition=spec.definition(), now=spec.created_at):
            raise StreamError(f"a stream named {spec.name!r} exists")
        if self.runner is not None:
            self.runner.poke()  # this process's worker takes it at once (if it may)
        row = self.db.stream(spec.id)
        if row is None:
            raise StreamError(f"the stream {spec.name!r} was deleted meanwhile")
        return row

    def get(self, stream_id: str, owner: str | None) -> StreamRow | None:
        row = self.db.stream(stream_id)
        if row is None or (row.owner is not None and owner is not None and row.owner != owner):
            return None
        return row

    def list(self, owner: str | None) -> builtins.list[StreamRow]:
        return self.db.list_streams(owner)

    def update(self, row: StreamRow, data: dict[str, Any]) -> StreamRow:
        """A new version with ``data``'s categories, method, zones or settings (validated
        before anything is stored); the worker running the stream applies it."""
        unknown = set(data) - set(CHANGEABLE)
        if unknown:
            raise StreamError(f"only {', '.join(CHANGEABLE)} can change; not "
                              f"{', '.join(sorted(unknown))}")
        for _ in range(5):  # a change made meanwhile by another request: merged again
            old = StreamDef.stored(row.id, row.owner, row.created_at, row.definition)
            merged = {"name": old.name, "source": old.source, "categories": old.categories,
                      "method": old.method, "zones": old.zones, "settings": old.settings,
                      "config": old.config, "device": old.device, **data}
            new = StreamDef.parse(merged, owner=None)  # validates every choice
            old.categories, old.method, old.zones, old.settings, old.device = (
                new.categories, new.method, new.zones, new.settings, new.device)
            got = self.db.update_stream(row.id, old.definition(), time.time(), row.version)
            if got is not None:
                return got
            fresh = self.db.stream(row.id)
            if fresh is None:
                raise StreamError("the stream was deleted meanwhile")
            row = fresh
        raise StreamError("the stream is being changed by other requests; try again")

    async def delete(self, row: StreamRow) -> None:
        """Delete the definition, stop the stream where it runs, delete its recordings."""
        self.db.delete_stream(row.id)
        runner = self.runner
        if runner is not None and runner.running(row.id) is not None:
            await asyncio.to_thread(runner.stop_deleted, row.id)
        else:
            url = self._control_url(row)
            if url is not None:
                try:
                    await self._forward("POST", url, f"/streams/{row.id}/stop")
                except (httpx.HTTPError, StreamUnavailable) as exc:
                    # its worker finds it gone at its next renewal and stops it then
                    log.warning("stream %s: the stop was not forwarded: %s", row.name, exc)
        shutil.rmtree(self.record_dir / row.id, ignore_errors=True)

    # answers --------------------------------------------------------------------------------
    def _fresh_runtime(self, row: StreamRow, now: float | None = None) -> dict[str, Any] | None:
        """The runtime figures of the worker running ``row``, if one does now."""
        now = time.time() if now is None else now
        if row.runtime is None or row.runtime_at is None or row.lease_owner is None:
            return None
        if now - row.runtime_at > self.settings.lease_s:
            return None
        return row.runtime

    def status(self, row: StreamRow) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
        """``(status, stats, runtime)`` of a stream as its row says (runtime: None when no
        worker runs it now)."""
        rt = self._fresh_runtime(row)
        if rt is not None:
            return str(rt.get("status", "connecting")), {**idle_stats(), **rt.get("stats", {})}, rt
        if row.runtime is not None:  # its worker stopped writing: gone, or stalled
            stats = {**idle_stats(), **row.runtime.get("stats", {}), "input_fps": 0.0,
                     "output_fps": 0.0, "viewers": 0}
            return "reconnecting", stats, None
        return "connecting", idle_stats(), None

    def describe(self, row: StreamRow, base_url: str, with_token: bool = True) -> dict[str, Any]:
        spec = StreamDef.stored(row.id, row.owner, row.created_at, row.definition)
        out = describe_definition(spec, base_url)
        status, stats, rt = self.status(row)
        out.update(status=status, stats=stats, version=row.version)
        if rt is not None:
            out["rtsp_url"] = rt.get("rtsp_url")
            if with_token and rt.get("publish") and rt.get("rtsp_port"):
                out["publish_url"] = rtsp_publish_url(
                    spec.name, self.secrets.publish_password(spec.id), str(rt["rtsp_host"]),
                    int(rt["rtsp_port"]))
        if with_token and "webrtc" in spec.outputs:
            token, _ = self.viewer_token(spec.id)
            out["viewer_url"] = f"{base_url}/viewer/{spec.id}?token={token}"
        return out

    def metric_rows(self) -> builtins.list[tuple[str, str, dict[str, Any]]]:
        """``(name, status, stats)`` of every stream, for /metrics."""
        out = []
        for row in self.db.list_streams():
            status, stats, _ = self.status(row)
            out.append((row.name, status, stats))
        return out

    def viewer_token(self, stream_id: str, ttl_s: int | None = None) -> tuple[str, float]:
        return self.secrets.viewer_token(stream_id,
                                         ttl_s or self.stream_settings.viewer_token_ttl_s)

    def check_token(self, stream_id: str, token: str) -> bool:
        return self.secrets.check_token(stream_id, token)

    def segments(self, row: StreamRow) -> builtins.list[Segment]:
        return self.recordings.segments(self.record_dir / row.id)

    def recording_dir(self, row: StreamRow) -> Path:
        return self.record_dir / row.id

    # forwarded to the running worker ----------------------------------------------------------
    def _control_url(self, row: StreamRow) -> str | None:
        rt = self._fresh_runtime(row)
        url = rt.get("control_url") if rt is not None else None
        return str(url) if url else None

    async def _forward(self, method: str, base: str, path: str,
                       body: bytes = b"") -> httpx.Response:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=FORWARD_TIMEOUT_S)
        headers = {StreamSecrets.HEADER: self.secrets.sign(method, path, body)}
        if body:
            headers["Content-Type"] = "application/sdp"
        try:
            return await self._http.request(method, base + path, content=body,
                                            headers=headers)
        except httpx.TransportError as exc:
            raise StreamUnavailable(f"its worker does not answer ({exc})") from None

    async def whep_offer(self, row: StreamRow, offer_sdp: str) -> tuple[str, str]:
        """(session id, answer SDP) from the worker running the stream. Raises
        StreamUnavailable when none runs it, WebRtcError for an offer it cannot answer."""
        from gateway.stream_runner import NotRunningHere

        runner = self.runner
        if runner is not None and runner.running(row.id) is not None:
            try:
                return await asyncio.wrap_future(runner.call(runner.answer(row.id, offer_sdp)))
            except NotRunningHere:
                raise StreamUnavailable("the stream stopped here meanwhile") from None
        url = self._control_url(row)
        if url is None:
            raise StreamUnavailable("no worker runs the stream yet")
        r = await self._forward("POST", url, f"/streams/{row.id}/whep", offer_sdp.encode())
        if r.status_code == 201:
            return r.headers.get("x-session-id", ""), r.text
        if r.status_code == 400:
            raise WebRtcError(r.json().get("message", "the offer cannot be answered"))
        raise StreamUnavailable(f"its worker answered {r.status_code}")

    async def whep_hangup(self, row: StreamRow, session_id: str) -> bool:
        runner = self.runner
        if runner is not None and runner.running(row.id) is not None:
            return await asyncio.wrap_future(runner.call(runner.hangup(row.id, session_id)))
        url = self._control_url(row)
        if url is None:
            return False
        try:
            r = await self._forward("DELETE", url, f"/streams/{row.id}/whep/{session_id}")
        except StreamUnavailable:
            return False
        return r.status_code == 204
