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

Publish mounts (``rtsp://HOST:PORT/<name>/publish``, see :mod:`pipeline.push`) take H.264 or
H.265 video from a camera that pushes (ANNOUNCE/RECORD) with a user name and password (RTSP basic
authentication); its other streams (audio) are accepted and dropped. Play mounts stay open to any
player, as before. A second publisher on a busy mount is refused with 503, one without H.264 or
H.265 video with 415.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from engines.errors import RedactionError
from pipeline.live_encode import EncodedPacket
from pipeline.push import PushFeed

log = logging.getLogger(__name__)

_LAUNCH = ("( appsrc name=src is-live=true format=time do-timestamp=true block=false "
           "max-bytes=4000000 caps=video/x-h264,stream-format=byte-stream,alignment=au "
           "! rtph264pay name=pay0 pt=96 config-interval=-1 )")


# a publish mount's media starts empty: its streams are made from the publisher's SDP (one per
# m= line, as the server requires; the video is depayloaded and parsed into access units for the
# stream's decoder, anything else (audio, data) goes to a fakesink)
_RECORD_LAUNCH = "( bin name=publish )"
_PUBLISH_CODECS = {"H264": ("rtph264depay", "h264parse", "video/x-h264", "h264"),
                   "H265": ("rtph265depay", "h265parse", "video/x-h265", "hevc")}
_ANONYMOUS = "anonymous"


class RtspUnavailableError(RedactionError, RuntimeError):
    """GStreamer's RTSP server or PyGObject is not installed."""


def _gst() -> tuple[Any, Any, Any]:
    try:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstRtsp", "1.0")
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


class PublishMount:
    """A path cameras publish to (``/<name>/publish``); what they send goes to ``feed``."""

    def __init__(self, server: RtspServer, path: str, user: str, feed: PushFeed) -> None:
        self.server = server
        self.path = path
        self.user = user
        self.feed = feed
        self.refused = 0  # second publishers turned away
        self.client: Any = None  # the publishing RTSP connection
        self.basic: str = ""  # its credentials, as the server's authenticator keeps them

    @property
    def url(self) -> str:
        """The URL without credentials (the publisher adds ``user:password@``)."""
        return f"rtsp://{self.server.host}:{self.server.port}{self.path}"

    def _announce(self, client: Any, ctx: Any) -> Any:
        """An authenticated ANNOUNCE (its media built, its SDP not yet applied): the status to
        answer with. 415 without H.264/H.265 video, 503 while another publisher sends."""
        from gi.repository import GstRtsp

        Status = GstRtsp.RTSPStatusCode
        _, body = ctx.request.get_body()  # (GstRTSPResult, bytes): OK is 0
        medias = sdp_medias(bytes(body or b"").decode("utf-8", "replace"))
        video = next((i for i, (kind, codec) in enumerate(medias)
                      if kind == "video" and codec in _PUBLISH_CODECS), None)
        if video is None:
            log.warning("rtsp %s: a publisher without H.264/H.265 video is refused (%s)",
                        self.path, medias)
            return Status.UNSUPPORTED_MEDIA_TYPE
        codec = _PUBLISH_CODECS[medias[video][1]]
        session = self.feed.begin(codec[3])
        if session is None:
            self.refused += 1
            log.warning("rtsp %s: a second publisher is refused (busy)", self.path)
            return Status.SERVICE_UNAVAILABLE
        try:
            self._build(ctx.media, len(medias), video, codec, session)
        except Exception:
            self.feed.end(session)
            raise
        self.client = client
        log.info("rtsp %s: a publisher started (%s)", self.path, medias[video][1])
        return Status.OK

    def _build(self, media: Any, n: int, video: int, codec: tuple[str, str, str, str],
               session: int) -> None:
        Gst = self.server.Gst
        top = media.get_element()

        def make(factory: str, name: str | None = None, **props: Any) -> Any:
            el = Gst.ElementFactory.make(factory, name)
            if el is None:
                raise RtspUnavailableError(f"GStreamer has no {factory} element")
            for k, v in props.items():
                el.set_property(k, v)
            top.add(el)
            return el

        for i in range(n):
            if i != video:  # audio or data: taken and dropped
                sink = make("fakesink", f"depay{i}", sync=False, **{"async": False})
                media.create_stream(sink, sink.get_static_pad("sink"))
                continue
            depay_f, parse_f, caps, _ = codec
            depay = make(depay_f, f"depay{i}")
            parse = make(parse_f, None, **{"config-interval": -1})
            capsf = make("capsfilter", None, caps=Gst.Caps.from_string(
                f"{caps},stream-format=byte-stream,alignment=au"))
            sink = make("appsink", "sink", sync=False, **{"emit-signals": True,
                                                            "max-buffers": 120})
            depay.link(parse)
            parse.link(capsf)
            capsf.link(sink)

            def on_sample(appsink: Any) -> Any:
                sample = appsink.emit("pull-sample")
                if sample is None:
                    return Gst.FlowReturn.EOS
                buf = sample.get_buffer()
                ok, info = buf.map(Gst.MapFlags.READ)
                if ok:
                    try:
                        self.feed.put(session, bytes(info.data),
                                      not buf.has_flags(Gst.BufferFlags.DELTA_UNIT))
                    finally:
                        buf.unmap(info)
                return Gst.FlowReturn.OK

            sink.connect("new-sample", on_sample)
            media.create_stream(depay, depay.get_static_pad("sink"))

        def unprepared(media: Any) -> None:
            self.feed.end(session)
            log.info("rtsp %s: the publisher left", self.path)

        media.connect("unprepared", unprepared)


def sdp_medias(sdp: str) -> list[tuple[str, str]]:
    """(kind, codec) of each ``m=`` section of ``sdp``, the codec of its first payload type
    (upper case, e.g. ``("video", "H264")``; ``""`` when no rtpmap names it)."""
    out: list[tuple[str, str]] = []
    pt = ""
    for line in sdp.splitlines():
        if line.startswith("m="):
            parts = line[2:].split()
            out.append((parts[0] if parts else "", ""))
            pt = parts[3] if len(parts) > 3 else ""
        elif out and line.startswith(f"a=rtpmap:{pt} ") and not out[-1][1]:
            out[-1] = (out[-1][0], line.split()[1].split("/")[0].upper())
    return out


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
        self._publish: dict[str, PublishMount] = {}
        self._lock = threading.Lock()
        # players need no credentials; publishers do (basic authentication per publish mount)
        self._auth = GstRtspServer.RTSPAuth.new()
        anonymous = GstRtspServer.RTSPToken.new()
        anonymous.set_string("media.factory.role", _ANONYMOUS)
        self._auth.set_default_token(anonymous)
        self._server.set_auth(self._auth)
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
            self._allow(factory, _ANONYMOUS, construct=True)
            factory.connect("media-configure", mount._configure)
            self._server.get_mount_points().add_factory(path, factory)
            self._mounts[path] = mount
            return mount

    def add_publish_mount(self, name: str, user: str, password: str,
                          feed: PushFeed) -> PublishMount:
        """``/<name>/publish``: a camera publishes H.264 there (ANNOUNCE/RECORD) as ``user``
        with ``password``; the access units go to ``feed``."""
        path = "/" + name.strip("/") + "/publish"
        role = f"publisher:{path}"
        with self._lock:
            if path in self._publish:
                raise ValueError(f"{path} has a publisher mount already")
            mount = PublishMount(self, path, user, feed)
            factory = self._GstRtspServer.RTSPMediaFactory.new()
            factory.set_transport_mode(self._GstRtspServer.RTSPTransportMode.RECORD)
            factory.set_launch(_RECORD_LAUNCH)
            factory.set_latency(0)
            # anyone may see the path (so a publisher without credentials is asked for them,
            # 401, instead of a bare 404), only this mount's user may publish
            self._allow(factory, _ANONYMOUS, construct=False)
            self._allow(factory, role, construct=True)
            token = self._GstRtspServer.RTSPToken.new()
            token.set_string("media.factory.role", role)
            mount.basic = self._GstRtspServer.RTSPAuth.make_basic(user, password)
            self._auth.add_basic(mount.basic, token)
            self._server.get_mount_points().add_factory(path, factory)
            self._publish[path] = mount
            return mount

    def _allow(self, factory: Any, role: str, construct: bool) -> None:
        perms = self.Gst.Structure.new_empty(role)
        perms.set_value("media.factory.access", True)
        perms.set_value("media.factory.construct", construct)
        factory.add_role_from_structure(perms)

    def remove_mount(self, name: str) -> None:
        """Remove ``/<name>`` and ``/<name>/publish`` (publishers are disconnected)."""
        path = "/" + name.strip("/")
        with self._lock:
            if self._mounts.pop(path, None) is not None:
                self._server.get_mount_points().remove_factory(path)
            pub = self._publish.pop(path + "/publish", None)
            if pub is not None:
                self._server.get_mount_points().remove_factory(pub.path)
                self._auth.remove_basic(pub.basic)
        if pub is not None:
            client = pub.client
            if client is not None:
                self._server.client_filter(
                    lambda server, c, *_: self._GstRtspServer.RTSPFilterResult.REMOVE
                    if c == client else self._GstRtspServer.RTSPFilterResult.KEEP)
            pub.feed.end()

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
            for pub in self._publish.values():
                if pub.client == client:
                    pub.client = None
            for mount in state.values():
                mount._client_left()
            state.clear()

        def pre_announce(client: Any, ctx: Any) -> Any:
            from gi.repository import GstRtsp

            path = ctx.uri.abspath if ctx.uri is not None else ""
            pub = self._publish.get(path)
            if pub is None or ctx.media is None:
                return GstRtsp.RTSPStatusCode.OK
            return pub._announce(client, ctx)

        client.connect("play-request", on_play)
        client.connect("pre-announce-request", pre_announce)
        client.connect("closed", on_closed)

    def close(self) -> None:
        with self._lock:
            for path in [*self._mounts, *self._publish]:
                self._server.get_mount_points().remove_factory(path)
            for pub in self._publish.values():
                pub.feed.end()
            self._mounts.clear()
            self._publish.clear()
        # close client sessions, stop listening, end the loop
        self._server.client_filter(lambda server, client, *_: self._GstRtspServer.RTSPFilterResult
                                   .REMOVE)
        src = self._ctx.find_source_by_id(self._source_id)
        if src is not None:
            src.destroy()
        self._loop.quit()
        self._thread.join(timeout=5)
