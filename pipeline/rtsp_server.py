"""An RTSP server for redacted streams, on GStreamer's RTSP server (gst-rtsp-server).

Each mount (``rtsp://HOST:PORT/<name>``) is fed H.264 access units from the stream's single
encode (see :mod:`pipeline.live_encode`) through an ``appsrc``; the media is shared, so every
player of a mount receives the same packets and the encode runs once however many watch.

Lessons built in (from running it): the server gets a thread pool, or a DESCRIBE waiting for data
blocks the thread that would deliver it; a mount outlives its publisher (the stream keeps feeding
placeholder frames while a camera is down) because players already connected stall when the
media behind a mount is rebuilt; a newly prepared media starts at the next keyframe; every
access unit is one slice (players split multi-slice frames sent this way into partial pictures).

GStreamer and PyGObject come from Debian packages (``gir1.2-gst-rtsp-server-1.0``,
``gstreamer1.0-plugins-{base,good,bad}``) and ``pip install 'pygobject<3.51'``; they are imported
when a server is created, with an error that says how to install them when missing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from engines.errors import RedactionError
from pipeline.live_encode import EncodedPacket

log = logging.getLogger(__name__)

_LAUNCH = ("( appsrc name=src is-live=true format=time do-timestamp=true block=false "
           "max-bytes=4000000 caps=video/x-h264,stream-format=byte-stream,alignment=au "
           "! rtph264pay name=pay0 pt=96 config-interval=-1 )")


class RtspUnavailableError(RedactionError, RuntimeError):
    """GStreamer's RTSP server or PyGObject is not installed."""


def _gst() -> tuple[Any, Any, Any]:
    try:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstRtspServer", "1.0")
        from gi.repository import GLib, Gst, GstRtspServer
    except (ImportError, ValueError) as exc:
        raise RtspUnavailableError(
            "the RTSP server needs GStreamer: apt-get install gir1.2-gst-rtsp-server-1.0 "
            "gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad "
            "libgirepository1.0-dev libcairo2-dev pkg-config, then pip install "
            f"'pygobject<3.51' ({exc})") from exc
    Gst.init(None)
    return GLib, Gst, GstRtspServer


class Mount:
    """One path of the server. :meth:`push` is safe from any thread."""

    def __init__(self, server: RtspServer, path: str) -> None:
        self.server = server
        self.path = path
        self._lock = threading.Lock()
        self._appsrc: Any = None
        self._t0: float | None = None  # stream time of the first buffer of the current media
        self._clients = 0
        self.packets_out = 0
        self.on_viewer: Callable[[], None] | None = None  # e.g. the encoder's request_keyframe

    @property
    def url(self) -> str:
        return f"rtsp://{self.server.host}:{self.server.port}{self.path}"

    @property
    def clients(self) -> int:
        with self._lock:
            return self._clients

    def push(self, pkt: EncodedPacket) -> None:
        """Hand one access unit to the players of this mount (dropped when none is playing,
        and until the first keyframe of a newly prepared media)."""
        Gst = self.server.Gst
        with self._lock:
            appsrc = self._appsrc
            if appsrc is None:
                return
            if self._t0 is None:
                if not pkt.keyframe:
                    return
                self._t0 = pkt.pts_s
        buf = Gst.Buffer.new_allocate(None, len(pkt.data), None)
        buf.fill(0, pkt.data)  # a copy: GStreamer keeps the buffer after this call returns
        # appsrc stamps each buffer with the pipeline's running time as it is pushed
        if not pkt.keyframe:
            buf.set_flags(Gst.BufferFlags.DELTA_UNIT)
        appsrc.emit("push-buffer", buf)
        self.packets_out += 1

    # GStreamer callbacks (its main loop thread) ---------------------------------------------
    def _configure(self, factory: Any, media: Any) -> None:
        appsrc = media.get_element().get_child_by_name("src")
        with self._lock:
            self._appsrc, self._t0 = appsrc, None
        if self.on_viewer is not None:
            self.on_viewer()  # the new media starts at a keyframe: ask for one now
        media.connect("unprepared", self._unprepared)
        log.info("rtsp %s: media prepared", self.path)

    def _unprepared(self, media: Any) -> None:
        with self._lock:
            self._appsrc, self._t0 = None, None
        log.info("rtsp %s: media released", self.path)

    def _client_joined(self) -> None:
        with self._lock:
            self._clients += 1
        if self.on_viewer is not None:
            self.on_viewer()

    def _client_left(self) -> None:
        with self._lock:
            self._clients = max(0, self._clients - 1)


class RtspServer:
    """GStreamer RTSP server on ``host:port`` with its own main loop thread.

    ``port=0`` picks a free port (read it from :attr:`port` after start-up).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8554, threads: int = 4) -> None:
        GLib, Gst, GstRtspServer = _gst()
        self.Gst, self._GstRtspServer = Gst, GstRtspServer
        self.host = host
        self._ctx = GLib.MainContext.new()
        self._loop = GLib.MainLoop.new(self._ctx, False)
        self._server = GstRtspServer.RTSPServer.new()
        self._server.set_address(host)
        self._server.set_service(str(port))
        self._server.get_thread_pool().set_max_threads(threads)
        self._mounts: dict[str, Mount] = {}
        self._lock = threading.Lock()
        self._source_id = self._server.attach(self._ctx)
        if not self._source_id:
            raise OSError(f"the RTSP server cannot listen on {host}:{port}")
        self.port = int(self._server.get_bound_port())
        self._server.connect("client-connected", self._client_connected)
        self._thread = threading.Thread(target=self._run, name="rtsp-server", daemon=True)
        self._thread.start()
        log.info("RTSP server on rtsp://%s:%d", host, self.port)

    def _run(self) -> None:
        self._ctx.push_thread_default()
        try:
            self._loop.run()
        finally:
            self._ctx.pop_thread_default()

    def add_mount(self, name: str) -> Mount:
        path = "/" + name.strip("/")
        with self._lock:
            if path in self._mounts:
                return self._mounts[path]
            mount = Mount(self, path)
            factory = self._GstRtspServer.RTSPMediaFactory.new()
            factory.set_launch(_LAUNCH)
            factory.set_shared(True)
            factory.set_latency(0)
            factory.connect("media-configure", mount._configure)
            self._server.get_mount_points().add_factory(path, factory)
            self._mounts[path] = mount
            return mount

    def remove_mount(self, name: str) -> None:
        path = "/" + name.strip("/")
        with self._lock:
            if self._mounts.pop(path, None) is not None:
                self._server.get_mount_points().remove_factory(path)

    def mount(self, name: str) -> Mount | None:
        return self._mounts.get("/" + name.strip("/"))

    def _client_connected(self, server: Any, client: Any) -> None:
        state: dict[str, Mount] = {}

        def on_play(client: Any, ctx: Any) -> None:
            path = ctx.uri.abspath if ctx.uri is not None else ""
            mount = self._mounts.get(path)
            if mount is not None and path not in state:
                state[path] = mount
                mount._client_joined()

        def on_closed(client: Any) -> None:
            for mount in state.values():
                mount._client_left()
            state.clear()

        client.connect("play-request", on_play)
        client.connect("closed", on_closed)

    def close(self) -> None:
        with self._lock:
            for path in list(self._mounts):
                self._server.get_mount_points().remove_factory(path)
            self._mounts.clear()
        # close client sessions, stop listening, end the loop
        self._server.client_filter(lambda server, client, *_: self._GstRtspServer.RTSPFilterResult
                                   .REMOVE)
        src = self._ctx.find_source_by_id(self._source_id)
        if src is not None:
            src.destroy()
        self._loop.quit()
        self._thread.join(timeout=5)
