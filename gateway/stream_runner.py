"""A worker's live streams: claimed in the store under leases, run with their outputs, and a
small control server for what the API forwards to a running stream.

Every :data:`TICK_S` seconds the runner's thread, in one pass:

1. renews the lease of every stream it runs (:meth:`Store.renew_streams`), writing each one's
   runtime figures (its RTSP URL, the host and port of this worker's RTSP server, this
   worker's control URL, the stream's statistics): the API answers ``GET /v1/streams`` and
   ``/metrics`` from them without asking the worker;
2. stops a stream whose renewal was refused (another worker took it over after this one
   stalled past its lease, or it was deleted: then its recordings go too), or whose lease it
   could not renew for a whole lease (fenced: another worker may run it by now), and applies a
   new version of a definition (:meth:`LiveStream.update`; a changed source or outputs restart
   the stream);
3. claims streams no live worker holds (:meth:`Store.claim_stream`: never claimed, released, or
   under a lease that ran out), up to ``max_streams``, and starts them.

A stream that cannot start (its settings file is gone, the RTSP port is taken) is held as
"failed" with the reason, and given back after :data:`FAILED_RETRY_S`. A clean stop gives
every stream back at once (:meth:`Store.release_stream`), so another worker takes them at its
next pass.

WebRTC viewers are answered on the runner's own event loop (one thread), where every stream's
:class:`WebRtcHub` lives. The control server (uvicorn on that loop, ``control_host`` and
``control_port``, 0: any free port) takes WHEP offers and hang-ups and the stop of a deleted
stream, each request signed with the data directory's secret (:class:`StreamSecrets`); the
API in the same process calls the runner directly instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import shutil
import socket
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from gateway.leases import claim_owner
from gateway.settings import Settings
from gateway.store import Store, StreamRow
from gateway.streams import (
    Running,
    StreamDef,
    StreamError,
    StreamManager,
    StreamSecrets,
    StreamSettings,
    idle_stats,
)
from pipeline.webrtc import WebRtcError

log = logging.getLogger(__name__)

TICK_S = 0.5  # renewals, changes and claims, this often
FAILED_RETRY_S = 30.0  # a stream that could not start is given back after this long
T = TypeVar("T")


class NotRunningHere(LookupError):
    """The stream is not running in this worker (not claimed here, or lost meanwhile)."""


@dataclass
class Held:
    """A stream this worker has claimed: ``owner`` is the claim's name in the store."""

    owner: str
    version: int
    spec: StreamDef
    running: Running | None
    renewed_at: float
    error: str = ""
    retry_at: float = 0.0


class StreamRunner:
    def __init__(self, settings: Settings, stream_settings: StreamSettings, store: Store,
                 worker_id: str, only: str | None = None, take_from: str | None = None) -> None:
        """``only``: run that one stream and no other (a stream's Ray actor); ``take_from``:
        claim it even under a lease of an owner whose name starts with this (the actor's
        earlier life; see :meth:`Store.claim_stream`)."""
        self.only = only
        self.take_from = take_from
        self.settings = settings
        self.stream_settings = stream_settings
        self.store = store
        self.worker_id = worker_id
        self.lease_s = settings.lease_s
        self.max_streams = stream_settings.max_streams
        self.manager = StreamManager(settings.storage_dir, settings.host, stream_settings,
                                     detector_threads=settings.detector_threads)
        self.secrets: StreamSecrets = self.manager.secrets
        self.control_url: str | None = None
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ticks = threading.Condition()
        self._started_ticks = 0
        self._done_ticks = 0
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever,
                                             name="stream-control", daemon=True)
        self._thread = threading.Thread(target=self._run, name="streams", daemon=True)
        self._server: Any = None
        self._serving: concurrent.futures.Future[None] | None = None

    # life -----------------------------------------------------------------------------------
    def start(self) -> None:
        import uvicorn

        self._loop_thread.start()
        host, port = self.stream_settings.control_host, self.stream_settings.control_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        port = sock.getsockname()[1]
        config = uvicorn.Config(control_app(self), log_config=None, log_level=None,
                                access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._serving = asyncio.run_coroutine_threadsafe(self._server.serve(sockets=[sock]),
                                                         self.loop)
        deadline = time.monotonic() + 10
        while not self._server.started:
            if self._serving.done():
                self._serving.result()  # raises why it stopped
                raise RuntimeError("the stream control server stopped at start-up")
            if time.monotonic() > deadline:
                raise RuntimeError("the stream control server did not start")
            time.sleep(0.01)
        shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
        self.control_url = f"http://[{shown}]:{port}" if ":" in shown \
            else f"http://{shown}:{port}"
        self._thread.start()
        log.info("worker %s: streams: control server on %s, lease %.0f s, at most %s",
                 self.worker_id, self.control_url, self.lease_s,
                 "any number of streams" if self.max_streams is None
                 else f"{self.max_streams} stream(s)")

    def stop(self) -> None:
        """Stop every stream and give it back, then the control server."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10)
        with self._lock:
            held = list(self._held)
        for sid in held:
            self._drop(sid, "the worker stops", release=True)
        if self._server is not None:
            self._server.should_exit = True
            if self._serving is not None:
                try:
                    self._serving.result(5)
                except Exception as exc:
                    log.warning("stream control server: %s", exc)
        self.manager.stop()
        if self._loop_thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._loop_thread.join(5)

    def alive(self) -> bool:
        return self._thread.is_alive() and self._loop_thread.is_alive()

    def poke(self, timeout_s: float = 3.0) -> bool:
        """Run a pass now (a stream was created or deleted) and wait until it is done."""
        if not self._thread.is_alive():
            return False
        with self._ticks:
            want = self._started_ticks + 1
            self._wake.set()
            return self._ticks.wait_for(lambda: self._done_ticks >= want, timeout_s)

    def running(self, stream_id: str) -> Running | None:
        with self._lock:
            h = self._held.get(stream_id)
            return h.running if h is not None else None

    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)

    # the pass -------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            with self._ticks:
                self._started_ticks += 1
                n = self._started_ticks
            try:
                self.tick()
            except Exception:
                log.exception("worker %s: streams pass failed", self.worker_id)
            finally:
                with self._ticks:
                    self._done_ticks = n
                    self._ticks.notify_all()
            self._wake.wait(self._next_wait())
            self._wake.clear()

    def _next_wait(self) -> float:
        """Until the next pass: :data:`TICK_S`, or sooner when another worker's lease on a
        stream runs out before then (a worker with room takes the stream over at once)."""
        if self.max_streams is not None and len(self._held) >= self.max_streams:
            return TICK_S
        now = time.time()
        try:
            due = self.store.next_stream_expiry(now)
        except Exception:
            return TICK_S
        if due is None:
            return TICK_S
        return min(TICK_S, max(0.01, due - now + 0.01))

    def tick(self) -> None:
        now = time.time()
        self._renew(now)
        if self._stop.is_set():
            return
        fresh: list[str] = []
        while self.max_streams is None or len(self._held) < self.max_streams:
            try:
                row = self.store.claim_stream(now, claim_owner(self.worker_id), self.lease_s,
                                              stream_id=self.only, take_from=self.take_from)
            except Exception as exc:
                log.warning("worker %s: claiming a stream failed (tried again): %s",
                            self.worker_id, exc)
                break
            if row is None:
                break
            self._start(row, now)
            fresh.append(row.id)
        if fresh:  # its runtime (where it is served) is in the store at once
            self._renew(time.time(), only=fresh)

    def _renew(self, now: float, only: list[str] | None = None) -> None:
        with self._lock:
            held = {sid: h for sid, h in self._held.items() if only is None or sid in only}
        if not held:
            return
        claims = {sid: (h.owner, self._runtime(h)) for sid, h in held.items()}
        try:
            rows = self.store.renew_streams(claims, now, now + self.lease_s)
        except Exception as exc:
            log.warning("worker %s: renewing stream leases failed (tried again): %s",
                        self.worker_id, exc)
            for sid, h in held.items():
                if now - h.renewed_at > self.lease_s:  # another worker may run it by now
                    self._drop(sid, "its lease could not be renewed", release=False)
            return
        for sid, row in rows.items():
            h = held[sid]
            if row is None:
                try:
                    deleted = self.store.stream(sid) is None
                except Exception:
                    deleted = False
                self._drop(sid, "deleted" if deleted else
                           "its lease was lost: another worker has taken it over",
                           release=False, deleted=deleted)
                continue
            h.renewed_at = now
            if row.version != h.version:
                self._change(h, row, now)
            elif h.running is None and now >= h.retry_at:
                self._drop(sid, "given back after failing to start", release=True)

    def _runtime(self, h: Held) -> dict[str, Any]:
        base = {"worker": self.worker_id, "control_url": self.control_url,
                "version": h.version}
        if h.running is None:
            return {**base, "status": "failed", "stats": {**idle_stats(), "last_error": h.error},
                    "rtsp_url": None, "publish": False}
        return {**base, **self.manager.runtime(h.running)}

    def _start(self, row: StreamRow, now: float) -> None:
        spec = StreamDef.stored(row.id, row.owner, row.created_at, row.definition)
        h = Held(row.lease_owner or "", row.version, spec, None, now)
        try:
            h.running = self.manager.launch(spec)
        except Exception as exc:  # anything that stops it from starting is reported
            h.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, StreamError) \
                else str(exc)
            h.retry_at = now + FAILED_RETRY_S
            log.error("worker %s: stream %s could not start: %s", self.worker_id, spec.name,
                      h.error)
        else:
            log.info("worker %s: stream %s claimed (version %d)", self.worker_id, spec.name,
                     row.version)
        with self._lock:
            self._held[row.id] = h

    def _change(self, h: Held, row: StreamRow, now: float) -> None:
        """A new version of the definition."""
        spec = StreamDef.stored(row.id, row.owner, row.created_at, row.definition)
        old = h.spec
        fixed = ("source", "outputs", "record", "config", "name", "device")
        if h.running is None or any(getattr(spec, k) != getattr(old, k) for k in fixed):
            # started again with the new definition, under the same claim
            self._drop(row.id, f"version {row.version} changes how it runs", release=False)
            self._start(row, now)
            return
        try:
            self.manager.apply(h.running, spec)
        except (StreamError, ValueError) as exc:
            log.error("worker %s: stream %s: version %d not applied: %s", self.worker_id,
                      spec.name, row.version, exc)
        else:
            log.info("worker %s: stream %s: version %d applied", self.worker_id, spec.name,
                     row.version)
        h.spec, h.version = spec, row.version

    def _drop(self, sid: str, why: str, release: bool, deleted: bool = False) -> None:
        """Stop a held stream; ``release``: give its claim back; ``deleted``: its recordings
        go with it."""
        with self._lock:
            h = self._held.pop(sid, None)
        if h is None:
            return
        if h.running is not None:
            try:
                self.call(h.running.hub.close()).result(5)
            except Exception as exc:
                log.warning("stream %s: closing its viewers: %s", h.spec.name, exc)
            self.manager.remove(h.running, delete_recordings=deleted)
        if deleted:
            shutil.rmtree(self.manager.record_dir / sid, ignore_errors=True)
        if release:
            try:
                self.store.release_stream(sid, h.owner)
            except Exception as exc:
                log.warning("stream %s: its claim was not given back (it runs out in %.0f s): "
                            "%s", h.spec.name, self.lease_s, exc)
        log.info("worker %s: stream %s stopped: %s", self.worker_id, h.spec.name, why)

    # what the API forwards ----------------------------------------------------------------------
    def call(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the runner's event loop (where the WebRTC hubs live)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def answer(self, stream_id: str, offer_sdp: str) -> tuple[str, str]:
        """A WHEP offer for a stream running here: (session id, answer SDP). On the runner's
        loop (see :meth:`call`)."""
        r = self.running(stream_id)
        if r is None:
            raise NotRunningHere(stream_id)
        if "webrtc" not in r.spec.outputs:
            raise NotRunningHere(stream_id)
        return await r.hub.answer(offer_sdp)

    async def hangup(self, stream_id: str, session_id: str) -> bool:
        r = self.running(stream_id)
        return bool(r is not None and await r.hub.hangup(session_id))

    def stop_deleted(self, stream_id: str) -> bool:
        """The API deleted a stream: stop it now (its next renewal would find it gone)
        instead of within a pass. Not on the runner's loop."""
        if self.store.stream(stream_id) is not None:
            return False  # not deleted: nothing to do
        with self._lock:
            here = stream_id in self._held
        if here:
            self._drop(stream_id, "deleted", release=False, deleted=True)
        return here


def control_app(runner: StreamRunner) -> FastAPI:
    """The worker's control server: what the API forwards to a stream running here."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    async def checked(request: Request) -> bytes | None:
        body = await request.body()
        header = request.headers.get(StreamSecrets.HEADER, "")
        ok = runner.secrets.verify(header, request.method, request.url.path, body)
        return body if ok else None

    def refused() -> JSONResponse:
        return JSONResponse({"error": "unsigned"}, status_code=401)

    def absent() -> JSONResponse:
        return JSONResponse({"error": "not_running"}, status_code=404)

    @app.post("/streams/{stream_id}/whep")
    async def whep(stream_id: str, request: Request) -> Response:
        body = await checked(request)
        if body is None:
            return refused()
        try:
            sid, answer = await runner.answer(stream_id, body.decode("utf-8", "replace"))
        except NotRunningHere:
            return absent()
        except WebRtcError as exc:
            return JSONResponse({"error": "bad_offer", "message": str(exc)}, status_code=400)
        return Response(answer, status_code=201, media_type="application/sdp",
                        headers={"X-Session-Id": sid})

    @app.delete("/streams/{stream_id}/whep/{session_id}")
    async def hangup(stream_id: str, session_id: str, request: Request) -> Response:
        if await checked(request) is None:
            return refused()
        if not await runner.hangup(stream_id, session_id):
            return absent()
        return Response(status_code=204)

    @app.post("/streams/{stream_id}/stop")
    async def stop(stream_id: str, request: Request) -> Response:
        if await checked(request) is None:
            return refused()
        await asyncio.get_running_loop().run_in_executor(None, runner.stop_deleted, stream_id)
        return Response(status_code=204)

    @app.get("/streams/{stream_id}")
    async def figures(stream_id: str, request: Request) -> Response:
        if await checked(request) is None:
            return refused()
        r = runner.running(stream_id)
        if r is None:
            return absent()
        return JSONResponse(runner.manager.runtime(r))

    return app
