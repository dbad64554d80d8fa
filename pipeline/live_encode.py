"""One H.264 encode per live stream, whose packets fan out to every output (RTSP, WebRTC,
recording).

The encoder is libx264 with zero latency, baseline profile and a short GOP: a viewer that joins
mid-stream waits at most one GOP for a keyframe, and WebRTC viewers (whose keyframe requests a
shared encode cannot honour) recover as quickly. Output is Annex B with SPS/PPS repeated before
every keyframe, so any packet stream starting at a keyframe decodes on its own.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.video.frame import PictureType

from engines.arrays import to_host
from engines.errors import UnredactedFrameError
from pipeline.frame import Frame

log = logging.getLogger(__name__)

TIME_BASE = Fraction(1, 90000)  # RTP's video clock


@dataclass(frozen=True)
class EncodedPacket:
    """One access unit: Annex B bytes, presentation time in seconds, keyframe flag."""

    data: bytes
    pts_s: float
    keyframe: bool
    index: int  # the frame's index in the stream


PacketSink = Callable[[EncodedPacket], None]


class LiveEncoder:
    """Encodes redacted frames into H.264 access units and hands each to every sink.

    width, height: the output size (frames of another size are scaled to it, so a camera that
    changes resolution does not break players). fps: nominal rate, for the GOP length and rate
    control. gop_s: seconds between keyframes. bitrate: bits per second.
    """

    def __init__(self, width: int, height: int, fps: float = 30.0, gop_s: float = 1.0,
                 bitrate: int = 4_000_000, preset: str = "ultrafast",
                 codec: str = "libx264") -> None:
        self.width, self.height = width - width % 2, height - height % 2
        self.fps = fps
        self._sinks: list[PacketSink] = []
        self._lock = threading.Lock()
        ctx = av.CodecContext.create(codec, "w")
        assert isinstance(ctx, av.VideoCodecContext)
        ctx.width, ctx.height = self.width, self.height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = TIME_BASE
        ctx.framerate = Fraction(round(fps * 1000), 1000)
        ctx.bit_rate = bitrate
        gop = max(1, round(fps * gop_s))
        ctx.gop_size = gop
        level = "4.0" if self.width * self.height > 1280 * 720 else "3.1"
        if codec == "libx264":
            ctx.options = {"preset": preset, "tune": "zerolatency", "profile": "baseline",
                           "forced-idr": "1", "level": level,
                           "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:"
                                          "repeat-headers=1:sliced-threads=0:threads=1:"
                                          "annexb=1:bframes=0"}
        else:  # NVENC (pipeline.hw.video_codec): the same stream shape from the GPU's encoder
            ctx.options = {"preset": "p1", "tune": "ull", "zerolatency": "1",
                           "profile": "baseline", "level": level, "forced-idr": "1",
                           "bf": "0", "rc": "cbr"}
        self.codec = codec
        ctx.open()
        self._ctx = ctx
        self._last_pts = -1
        self.gop_s = gop_s
        self._last_key_s: float | None = None
        self._key_wanted = threading.Event()
        self.frames = 0
        self.bytes = 0

    def add_sink(self, sink: PacketSink) -> None:
        with self._lock:
            self._sinks.append(sink)

    def remove_sink(self, sink: PacketSink) -> None:
        with self._lock:
            if sink in self._sinks:
                self._sinks.remove(sink)

    def request_keyframe(self) -> None:
        """The next frame is encoded as a keyframe (a viewer joined and waits for one)."""
        self._key_wanted.set()

    def encode(self, frame: Frame, time_s: float) -> list[EncodedPacket]:
        """Encode one redacted frame shown at ``time_s`` (stream clock, seconds).

        Raises :class:`UnredactedFrameError` for a frame not marked redacted: nothing leaves
        unredacted, even through a programming error."""
        if not frame.redacted:
            raise UnredactedFrameError(f"live frame {frame.index} reached the encoder unredacted")
        pixels = to_host(frame.pixels)  # the encoder hand-off: CPU memory for libx264
        if pixels.shape[0] != self.height or pixels.shape[1] != self.width:
            import cv2

            pixels = cv2.resize(pixels, (self.width, self.height), interpolation=cv2.INTER_AREA)
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="bgr24")
        pts = max(round(time_s / TIME_BASE), self._last_pts + 1)
        self._last_pts = pts
        vf.pts, vf.time_base = pts, TIME_BASE
        # keyframes at least every gop_s seconds of stream time, even when frames come slowly
        if (self._key_wanted.is_set() or self._last_key_s is None
                or time_s - self._last_key_s >= self.gop_s):
            vf.pict_type = PictureType.I
            self._key_wanted.clear()
        out = []
        for p in self._ctx.encode(vf):
            pkt = EncodedPacket(bytes(p), float((p.pts or pts) * TIME_BASE), bool(p.is_keyframe),
                                frame.index)
            out.append(pkt)
            if pkt.keyframe:
                self._last_key_s = time_s
        self.frames += 1
        with self._lock:
            sinks = list(self._sinks)
        for pkt in out:
            self.bytes += len(pkt.data)
            for sink in sinks:
                try:
                    sink(pkt)
                except Exception:  # one broken output must not stop the others
                    log.exception("a packet sink failed; it is removed")
                    self.remove_sink(sink)
        return out

    def close(self) -> None:
        with contextlib.suppress(av.FFmpegError, ValueError):
            self._ctx.encode(None)
