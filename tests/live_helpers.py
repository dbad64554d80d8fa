"""A camera simulator for live-stream tests: an RTSP server (the project's own, on loopback)
serving a clip made in code — the astronaut's head moving across a background — with the frame
number stamped into each picture as a row of black and white blocks; and a dashcam simulator
that publishes the same clip to a URL (RTSP ANNOUNCE/RECORD, FFmpeg's RTSP client)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import cast

import av
import numpy as np

from pipeline.frame import Frame
from pipeline.live_encode import LiveEncoder
from pipeline.rtsp_server import RtspServer
from tests.conftest import Box, moving_face_clip

STAMP_BITS = 16
STAMP_CELL = 8  # px per bit, in the top-left corner


def stamp(pixels: np.ndarray, number: int) -> None:
    for b in range(STAMP_BITS):
        v = 255 if (number >> b) & 1 else 0
        pixels[:STAMP_CELL, b * STAMP_CELL:(b + 1) * STAMP_CELL] = v


def read_stamp(pixels: np.ndarray) -> int:
    n = 0
    for b in range(STAMP_BITS):
        cell = pixels[2:STAMP_CELL - 2, b * STAMP_CELL + 2:(b + 1) * STAMP_CELL - 2]
        if cell.mean() > 128:
            n |= 1 << b
    return n


@dataclass
class Camera:
    """Serves ``rtsp://127.0.0.1:<port>/cam`` at ``fps``; ``faces[i]`` is the face box of the
    frame stamped ``i`` (the clip loops)."""

    fps: float = 25.0
    width: int = 320
    height: int = 240
    frames: list[np.ndarray] = field(default_factory=list)
    faces: list[Box] = field(default_factory=list)
    server: RtspServer | None = None
    sent: int = 0
    sent_at: dict[int, float] = field(default_factory=dict)  # frame number -> monotonic time

    def __post_init__(self) -> None:
        clip = moving_face_clip(n=40, width=self.width, height=self.height, step=4.0, y=40)
        self.frames, self.faces = clip.frames, clip.faces
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, port: int = 0, host: str = "127.0.0.1") -> Camera:
        self.server = RtspServer(host=host, port=port)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="camera")
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"rtsp://{self.server.host}:{self.server.port}/cam"

    def face(self, number: int) -> Box:
        return self.faces[number % len(self.faces)]

    def _run(self) -> None:
        assert self.server is not None
        mount = self.server.add_mount("cam")
        enc = LiveEncoder(self.width, self.height, self.fps, bitrate=2_000_000)
        enc.add_sink(mount.push)
        t0 = time.monotonic()
        i = 0
        while not self._stop.is_set():
            px = self.frames[i % len(self.frames)].copy()
            stamp(px, i)
            f = Frame(i, px)
            f.redacted = True  # the camera's own picture: it is the input, not an output
            self.sent_at[i] = time.monotonic()
            enc.encode(f, time.monotonic() - t0)
            self.sent = i = i + 1
            self._stop.wait(max(0.0, t0 + i / self.fps - time.monotonic()))
        enc.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.server is not None:
            self.server.close()
            self.server = None


@dataclass
class Publisher(Camera):
    """Publishes the clip to ``url`` (``rtsp://user:password@host:port/<name>/publish``) at
    ``fps`` until stopped, as ``codec`` (libx264, libx265) video, with a silent AAC track first
    when ``audio`` (the order some phone apps use), or audio only when ``codec`` is None; RTP
    over ``transport`` (tcp, udp).
    ``error`` holds why publishing ended, if it failed."""

    url_out: str = ""
    error: str = ""
    codec: str | None = "libx264"
    audio: bool = False
    transport: str = "tcp"  # RTP over the RTSP connection, or "udp" (FFmpeg's default)

    def publish(self, url: str) -> Publisher:
        self.url_out = url
        self.error = ""
        self._stop.clear()
        self._thread = threading.Thread(target=self._push, daemon=True, name="publisher")
        self._thread.start()
        return self

    def _push(self) -> None:
        fps = round(self.fps)
        try:
            with av.open(self.url_out, "w", format="rtsp",
                         options={"rtsp_transport": self.transport}, timeout=5.0) as out:
                sound: av.AudioStream | None = None
                if self.audio or self.codec is None:
                    sound = out.add_stream("aac", rate=48000)
                    sound.layout = "mono"
                st: av.VideoStream | None = None
                if self.codec is not None:
                    st = cast(av.VideoStream, out.add_stream(self.codec, rate=fps))
                    st.width, st.height, st.pix_fmt = self.width, self.height, "yuv420p"
                    st.codec_context.time_base = Fraction(1, fps)
                    params = f"keyint={fps}:bframes=0"
                    st.options = ({"preset": "ultrafast", "tune": "zerolatency",
                                   "x265-params": params + ":log-level=error"}
                                  if self.codec == "libx265" else
                                  {"preset": "ultrafast", "tune": "zerolatency",
                                   "x264-params": params})
                t0 = time.monotonic()
                i = 0
                while not self._stop.is_set():
                    if st is not None:
                        px = self.frames[i % len(self.frames)].copy()
                        stamp(px, i)
                        vf = av.VideoFrame.from_ndarray(px, format="bgr24")
                        vf.pts = i
                        self.sent_at[i] = time.monotonic()
                        for pkt in st.encode(vf):
                            out.mux(pkt)
                    if sound is not None:
                        n = 48000 // fps
                        af = av.AudioFrame.from_ndarray(np.zeros((1, n), np.float32),
                                                        format="fltp", layout="mono")
                        af.sample_rate, af.pts = 48000, i * n
                        for pkt in sound.encode(af):
                            out.mux(pkt)
                    self.sent = i = i + 1
                    self._stop.wait(max(0.0, t0 + i / self.fps - time.monotonic()))
        except (av.FFmpegError, OSError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None


# a camera in its own process: python -m tests.live_helpers PORT [WxH FPS]
if __name__ == "__main__":
    import sys

    size = sys.argv[2] if len(sys.argv) > 2 else "320x240"
    w, h = (int(v) for v in size.split("x"))
    cam = Camera(fps=float(sys.argv[3]) if len(sys.argv) > 3 else 25.0, width=w,
                 height=h).start(int(sys.argv[1]))
    print(cam.url, flush=True)
    try:
        threading.Event().wait()
    finally:
        cam.stop()
