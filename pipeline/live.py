"""Live streams: pull a camera, redact in real time, encode once, fan out.

Three threads per stream, joined by small bounded hand-offs:

``reader``  opens the source with PyAV (RTSP over TCP, low-delay options, read timeouts),
            decodes, and keeps only the newest frames: when redaction falls behind, the oldest
            waiting frame is dropped (counted), never passed on. A dead or stalled camera, or
            one that keeps sending the same picture, is reopened with exponential backoff
            (capped); a camera that is down when the stream is created is retried the same way.
``redact``  the redaction stage (:class:`pipeline.stages.RedactStage`: schedule, detections
            from the device's shared detection service, tracking, a short look-ahead
            (``delay_frames``) so new objects are covered from their first frame, then the
            kernels and the privacy zones), all from the stream's
            :class:`pipeline.settings.RedactSettings`, as for files. A detector that raises
            covers the whole frame instead (counted as ``frames_covered``).
``output``  paces the output at the stream's frame rate and encodes once (see
            :class:`pipeline.live_encode.LiveEncoder`); when no redacted frame is ready (camera
            down, or detection stalled) it sends a placeholder picture that holds no camera
            pixel, so players and viewers stay connected.

Only frames marked redacted, or placeholders, ever reach the encoder.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from fractions import Fraction
from typing import Any

import av
import cv2
import numpy as np

from engines.errors import DetectorError
from engines.gpu import describe
from engines.redact import cover_all, thumbnail
from engines.registry import Detector
from pipeline.frame import Frame
from pipeline.hw import frame_pixels, open_input, video_codec
from pipeline.live_encode import EncodedPacket, LiveEncoder, PacketSink
from pipeline.push import PushFeed
from pipeline.settings import RedactSettings
from pipeline.stages import RedactStage, direct

log = logging.getLogger(__name__)

_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]*@")


def scrub_url(url: str) -> str:
    """``url`` without the user name and password (for logs, API answers and metrics)."""
    return _CREDENTIALS.sub("***@", url)


class Status(StrEnum):
    CONNECTING = "connecting"
    LIVE = "live"
    RECONNECTING = "reconnecting"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class LiveOptions:
    """Settings of one live stream.

    fps:             output frames per second (None: the camera's, else 30).
    width, height:   output size (None: the first frame's; the encoder scales other sizes).
    delay_frames:    look-ahead: frames held so a new object is covered from its first frame
                     (each frame adds 1/fps of latency).
    period:          frames between face detector calls (adaptive, see the scheduler).
    open_timeout_s, read_timeout_s: give up on a camera that does not answer.
    backoff_s:       first and largest wait between reconnection attempts.
    frozen_s:        a camera sending the same picture this long is reopened (0: never).
    signal_lost_s:   no new frame for this long: the output shows the placeholder.
    detection:       "service": detections from the device's shared detection service (batched
                     with every other stream and job); "direct": the stream's own detector on
                     its redaction thread (the one-detector-per-stream shape, for comparison).
    """

    fps: float | None = None
    width: int | None = None
    height: int | None = None
    delay_frames: int = 2
    period: int = 3
    open_timeout_s: float = 5.0
    read_timeout_s: float = 3.0
    backoff_s: tuple[float, float] = (0.2, 0.5)
    frozen_s: float = 10.0
    signal_lost_s: float = 0.5
    bitrate: int = 4_000_000
    detection: str = "service"


@dataclass
class StreamStats:
    status: Status = Status.CONNECTING
    frames_in: int = 0
    frames_out: int = 0
    frames_redacted: int = 0
    frames_dropped: int = 0
    frames_covered: int = 0  # fully covered because detection failed
    placeholders: int = 0
    detector_calls: int = 0
    reconnects: int = 0
    last_error: str = ""
    # what runs: device, decode, detector backend, kernels, encoder (engines.gpu.describe)
    runtime: dict[str, str] = field(default_factory=dict)
    latency_ms: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=600))
    in_times: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=120))
    out_times: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=120))

    def as_dict(self) -> dict[str, Any]:
        lat = sorted(self.latency_ms)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None

        return {"status": self.status.value, "input_fps": _rate(self.in_times),
                "output_fps": _rate(self.out_times), "latency_ms_p50": pct(0.5),
                "latency_ms_p95": pct(0.95), "frames_in": self.frames_in,
                "frames_out": self.frames_out, "frames_redacted": self.frames_redacted,
                "frames_dropped": self.frames_dropped, "frames_covered": self.frames_covered,
                "placeholders": self.placeholders,
                "detector_calls_per_frame": round(self.detector_calls / self.frames_redacted, 3)
                if self.frames_redacted else 0.0,
                "reconnects": self.reconnects, "last_error": self.last_error,
                "runtime": dict(self.runtime)}


def _rate(times: collections.deque[float]) -> float:
    if len(times) < 2:
        return 0.0
    span = times[-1] - times[0]
    recent = time.monotonic() - times[-1]
    return round((len(times) - 1) / span, 2) if span > 0 and recent < 2.0 else 0.0


class LiveStream:
    """One camera in, one encode out, redacted as ``settings`` say (categories, per-category
    settings, user models, method, zones). ``detector_factory`` replaces the settings'
    detector (tests inject failing ones)."""

    def __init__(self, name: str, source: str, settings: RedactSettings,
                 options: LiveOptions | None = None, sinks: Sequence[PacketSink] = (),
                 feed: PushFeed | None = None,
                 detector_factory: Callable[[], Detector] | None = None) -> None:
        self.name = name
        self.source = source
        self.feed = feed  # a camera that publishes to the gateway, instead of ``source``
        self.options = options or LiveOptions()
        self.settings = settings
        self._factory = detector_factory
        self._sinks = list(sinks)
        self.stats = StreamStats()
        self._stop = threading.Event()
        self._frames: collections.deque[Frame] = collections.deque()  # reader -> redact
        self._frames_cv = threading.Condition()
        self._ready: collections.deque[Frame] = collections.deque(maxlen=4)  # redact -> output
        self._ready_cv = threading.Condition()
        self._last_input = 0.0  # monotonic time of the newest decoded frame
        self._size: tuple[int, int] | None = (
            (self.options.width, self.options.height)
            if self.options.width and self.options.height else None)
        self._fps: float | None = self.options.fps
        self._size_known = threading.Event()
        if self._size is not None:
            self._size_known.set()
        self._reconfigure = threading.Event()
        self._detector: Detector | None = None
        self._threads: list[threading.Thread] = []
        self.encoder: LiveEncoder | None = None
        self._t0 = time.monotonic()
        self._index = 0
        # where frames are decoded and redacted (DeviceError here when cuda cannot run)
        self._device = settings.run_device()

    # control ------------------------------------------------------------------------------
    @property
    def safe_source(self) -> str:
        return scrub_url(self.source)

    def start(self) -> None:
        for name, target in (("reader", self._read_loop), ("redact", self._redact_loop),
                             ("output", self._output_loop)):
            t = threading.Thread(target=self._guard(target), name=f"{self.name}-{name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._frames_cv:
            self._frames_cv.notify_all()
        if self.feed is not None:
            self.feed.wake()
        for t in self._threads:
            t.join(timeout)
        if self.encoder is not None:
            self.encoder.close()
        self.stats.status = Status.STOPPED

    def update(self, settings: RedactSettings) -> None:
        """Change how the stream is redacted, from the next frame on."""
        self.settings = settings
        self._reconfigure.set()

    def request_keyframe(self) -> None:
        """A viewer joined: the next frame out is a keyframe, so its picture starts at once."""
        if self.encoder is not None:
            self.encoder.request_keyframe()

    def add_sink(self, sink: PacketSink) -> None:
        self._sinks.append(sink)
        if self.encoder is not None:
            self.encoder.add_sink(sink)

    def remove_sink(self, sink: PacketSink) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)
        if self.encoder is not None:
            self.encoder.remove_sink(sink)

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception as exc:  # a thread's end is reported in the stream's status
                log.exception("stream %s: %s thread failed", self.name,
                              threading.current_thread().name)
                self.stats.status = Status.FAILED
                self.stats.last_error = f"{type(exc).__name__}: {scrub_url(str(exc))}"
                self._stop.set()
        return run

    # reader -------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        first, largest = self.options.backoff_s
        wait = first
        while not self._stop.is_set():
            before = self.stats.frames_in
            try:
                self._read_once()
            except (av.FFmpegError, OSError, ValueError, EOFError, _Frozen) as exc:
                if self._stop.is_set():
                    break
                self.stats.last_error = scrub_url(f"{type(exc).__name__}: {exc}")
                log.warning("stream %s: camera %s: %s", self.name, self.safe_source,
                            self.stats.last_error)
            if self._stop.is_set():
                break
            if self.stats.frames_in > before:
                wait = first  # it was live: start the backoff again
            self.stats.reconnects += 1
            self.stats.status = Status.RECONNECTING
            self._stop.wait(wait)
            wait = min(largest, wait * 2)

    def _read_once(self) -> None:
        if self.feed is not None:
            self._read_pushed(self.feed)
            return
        o = self.options
        # no "fflags=nobuffer": it drops the packets read while probing, the first keyframe
        # among them, and the picture would start one GOP later
        opts = {"flags": "low_delay", "probesize": "32768",
                "analyzeduration": "0"}
        if self.source.startswith(("rtsp://", "rtsps://")):
            opts.update(rtsp_transport="tcp", timeout=str(int(o.read_timeout_s * 1e6)))
        container, decode = open_input(self.source, self._device, options=opts,
                                       timeout=(o.open_timeout_s, o.read_timeout_s))
        self.stats.runtime["decode"] = decode
        with container:
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"  # frame threads would hold frames back (latency)
            if self._fps is None:
                rate = stream.average_rate or stream.guessed_rate
                self._fps = float(rate) if rate and 1 <= float(rate) <= 120 else 30.0
            freeze = _FreezeWatch(o.frozen_s)
            for vf in container.decode(stream):
                if self._stop.is_set():
                    break
                self._take(vf, freeze, time.monotonic())
        raise EOFError("the camera ended the stream")

    def _read_pushed(self, feed: PushFeed) -> None:
        """Frames from a camera publishing to the gateway (see :mod:`pipeline.push`)."""
        o = self.options
        session = None
        while session is None:
            if self._stop.is_set():
                return
            session = feed.wait_publisher(0.5)
        if self._fps is None:
            self._fps = 30.0  # raw H.264/H.265 has no reliable rate; output follows arrivals
        decoder = av.CodecContext.create(feed.codec, "r")
        assert isinstance(decoder, av.VideoCodecContext)
        decoder.thread_type = "SLICE"
        freeze = _FreezeWatch(o.frozen_s)
        need_key = True  # a new decoder (or one after a damaged unit) starts at a keyframe
        while not self._stop.is_set():
            unit = feed.get(session, o.read_timeout_s)
            if need_key and not unit.keyframe:
                continue
            need_key = False
            try:
                decoded = decoder.decode(av.Packet(unit.data))
            except av.InvalidDataError as exc:
                log.warning("stream %s: a damaged frame from the publisher skipped (%s)",
                            self.name, exc)
                need_key = True
                continue
            for vf in decoded:
                self._take(vf, freeze, unit.arrived)

    def _take(self, vf: av.VideoFrame, freeze: _FreezeWatch, arrived: float) -> None:
        """One decoded camera frame to the redaction thread."""
        if self._device == "cpu":
            pixels = vf.to_ndarray(format="bgr24")
        else:
            pixels = frame_pixels(vf, self._device, vf.width - vf.width % 2,
                                  vf.height - vf.height % 2)
        if self._size is None:
            h, w = pixels.shape[:2]
            self._size = (w, h)
            self._size_known.set()
        if self.stats.status is not Status.LIVE:
            self.stats.status = Status.LIVE
            log.info("stream %s: live from %s", self.name, self.safe_source)
        freeze.check(pixels, arrived)
        # indices keep growing across reconnections (the tracker's clock)
        tb = (Fraction(vf.time_base.numerator, vf.time_base.denominator)
              if vf.time_base is not None else None)
        frame = Frame(self._index, pixels, vf.pts, tb, stream_id=self.name)
        frame.timings_ms["arrived"] = arrived * 1000
        self._index += 1
        self.stats.frames_in += 1
        self.stats.in_times.append(arrived)
        self._last_input = arrived
        with self._frames_cv:
            # redaction takes the frames in order; when it falls behind, the oldest
            # waiting frame is dropped, never passed on
            while len(self._frames) >= max(2, self.options.delay_frames + 1):
                self._frames.popleft()
                self.stats.frames_dropped += 1
            self._frames.append(frame)
            self._frames_cv.notify()

    # redaction ----------------------------------------------------------------------------
    def _new_stage(self) -> RedactStage:
        s = self.settings
        self._device = s.run_device()
        self._detector = self._factory() if self._factory else s.detector("video")
        self.stats.runtime.update(describe(self._device))
        if self.encoder is not None:
            self.stats.runtime["encoder"] = self.encoder.codec
        if self.feed is not None:
            self.stats.runtime["decode"] = "cpu"
        return RedactStage(self._detector, s.style, self.options.period,
                           self.options.delay_frames, cover_slow_periods=False,
                           submit=direct if self.options.detection == "direct" else None,
                           zones=s.zones)

    def _redact_loop(self) -> None:
        stage = self._new_stage()
        calls_before = 0
        while not self._stop.is_set():
            with self._frames_cv:
                while not self._frames and not self._stop.is_set():
                    if not self._frames_cv.wait(timeout=0.2) and stage.held:
                        break  # input paused: release what the look-ahead holds
                if self._stop.is_set():
                    return
                frame = self._frames.popleft() if self._frames else None
            if self._reconfigure.is_set():
                self._reconfigure.clear()
                out = self._safe_flush(stage)
                stage = self._new_stage()
                calls_before = 0
            else:
                out = self._safe_push(stage, frame) if frame is not None else \
                    self._safe_flush(stage)
            self.stats.detector_calls += stage.detector_calls - calls_before
            calls_before = stage.detector_calls
            for f in out:
                self.stats.frames_redacted += 1
                with self._ready_cv:
                    if len(self._ready) == self._ready.maxlen:
                        self.stats.frames_dropped += 1
                    self._ready.append(f)
                    self._ready_cv.notify()

    def _safe_push(self, stage: RedactStage, frame: Frame) -> list[Frame]:
        try:
            return stage.push(frame)
        except DetectorError as exc:
            return self._fail_closed(stage, exc, [frame])

    def _safe_flush(self, stage: RedactStage) -> list[Frame]:
        try:
            return stage.flush()
        except DetectorError as exc:
            return self._fail_closed(stage, exc, [])

    def _fail_closed(self, stage: RedactStage, exc: Exception, extra: list[Frame]) -> list[Frame]:
        """The detector raised: every frame it held, and this one, is covered whole."""
        log.warning("stream %s: %s; frames are covered whole", self.name, exc)
        self.stats.last_error = str(exc)
        held = stage.release_unredacted()
        held += [f for f in extra if f not in held]
        for f in held:
            cover_all(f.pixels, self.settings.style)
            f.redacted = True
            self.stats.frames_covered += 1
        return held

    # output -------------------------------------------------------------------------------
    def _output_loop(self) -> None:
        while not self._size_known.wait(0.1):
            if self._stop.is_set():
                return
            if (time.monotonic() - self._t0 > max(5.0, self.options.open_timeout_s)
                    and self._size is None):
                self._size = (1280, 720)  # no camera yet: show the placeholder at 720p
                self._size_known.set()
        assert self._size is not None
        fps = self._fps or self.options.fps or 30.0
        w, h = self._size
        self.encoder = LiveEncoder(w, h, fps, bitrate=self.options.bitrate,
                                   codec=video_codec(self._device))
        self.stats.runtime["encoder"] = self.encoder.codec
        for s in self._sinks:
            self.encoder.add_sink(s)
        placeholder = no_signal_frame(self.encoder.width, self.encoder.height)
        interval = 1.0 / fps
        last_out = 0.0
        self._last_placeholder = 0.0
        while not self._stop.is_set():
            # a redacted frame is sent as soon as it is ready (no added pacing delay); the
            # placeholder is paced at the stream's rate while nothing comes
            with self._ready_cv:
                if not self._ready:
                    self._ready_cv.wait(timeout=interval)
                frame = self._ready.popleft() if self._ready else None
            now = time.monotonic()
            if frame is not None:
                self._emit(frame, now)
                last_out = now
            elif (now - last_out > self.options.signal_lost_s
                  and now - self._last_placeholder >= interval * 0.9):
                # nothing to show (camera down, or detection stalled): keep players connected
                # with the placeholder, never with an unredacted picture
                f = Frame(-1, placeholder.copy(), stream_id=self.name)
                f.redacted = True  # holds no camera pixel
                self.stats.placeholders += 1
                self._emit(f, now)
                self._last_placeholder = now

    def _emit(self, frame: Frame, now: float) -> None:
        assert self.encoder is not None
        self.encoder.encode(frame, now - self._t0)
        self.stats.frames_out += 1
        self.stats.out_times.append(now)
        arrived = frame.timings_ms.get("arrived")
        if arrived is not None:
            self.stats.latency_ms.append(time.monotonic() * 1000 - arrived)


class _Frozen(Exception):
    pass


class _FreezeWatch:
    """Raises :class:`_Frozen` when the picture has not changed for ``seconds`` (0: never)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._since: float | None = None
        self._thumb: np.ndarray | None = None

    def check(self, pixels: np.ndarray, now: float) -> None:
        if self.seconds <= 0:
            return
        thumb = thumbnail(pixels, 16, 9)
        if self._thumb is not None and np.array_equal(thumb, self._thumb):
            self._since = self._since or now
            if now - self._since > self.seconds:
                raise _Frozen(f"the picture has not changed for {self.seconds:.0f} s")
        else:
            self._since = None
        self._thumb = thumb


def no_signal_frame(width: int, height: int) -> np.ndarray:
    """A dark grey picture saying the camera is not sending (no camera pixel in it)."""
    img = np.full((height, width, 3), 40, np.uint8)
    scale = max(0.5, width / 900)
    text = "NO SIGNAL"
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
    cv2.putText(img, text, ((width - tw) // 2, (height + th) // 2), cv2.FONT_HERSHEY_SIMPLEX,
                scale, (200, 200, 200), 2, cv2.LINE_AA)
    return img


__all__ = ["EncodedPacket", "LiveOptions", "LiveStream", "Status", "StreamStats",
           "no_signal_frame", "scrub_url"]
