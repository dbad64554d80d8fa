"""Redact one video file: decode (thread) -> detect/track/redact -> encode (thread).

Frame count, timestamps (variable frame rate included), rotation and audio survive; audio
packets are copied unchanged. Container and stream metadata (GPS, camera serials, ...) and data
streams are dropped unless ``keep_metadata``. The output is written to a temporary file next to
the destination and renamed only when complete, so a failure never leaves a partial file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from engines.errors import MediaError, RedactionError, UnredactedFrameError
from engines.gpu import describe
from engines.redact import Style
from engines.registry import Detector
from pipeline.frame import Frame
from pipeline.hw import NVENC, encoder_frame, frame_pixels, open_input, video_codec
from pipeline.stages import Channel, RedactStage, Zone, run_thread

log = logging.getLogger(__name__)

QUEUE_FRAMES = 8  # bounded hand-off between decode, redact and encode
# FFmpeg demuxers (by their first name) whose files we read and write back in kind. Image
# demuxers (image2, png_pipe, ...) are not among them: FFmpeg opens any file named .jpg as a
# one-frame "video", which must not turn junk or an unsupported picture into a video job.
VIDEO_CONTAINERS = {"mov": "mp4", "matroska": "matroska", "avi": "avi", "mpegts": "mpegts"}
# Containers whose format cannot hold H.264 get a codec they can hold.
_CODEC_FOR_FORMAT = {"webm": "libvpx-vp9", "ogg": "libtheora"}


@dataclass(frozen=True)
class VideoOptions:
    period: int = 3  # detector runs at least every `period` frames
    lookahead: int = 8  # frames held so boxes can be carried backward
    scene_change: float = 24.0  # run the detector early when the picture changes this much
    keep_metadata: bool = False
    preset: str = "veryfast"  # libx264 preset
    crf: int = 20  # libx264 constant quality (lower = better, larger)


@dataclass
class VideoReport:
    frames: int = 0
    detector_calls: int = 0  # summed over the detectors (see detector_calls_by)
    detector_calls_by: dict[str, int] = field(default_factory=dict)  # per detector
    detector_ms_by: dict[str, float] = field(default_factory=dict)  # per detector, summed
    duration_s: float = 0.0
    wall_s: float = 0.0
    stage_ms: dict[str, float] = field(default_factory=dict)  # summed over frames
    audio_packets: int = 0
    frames_detail: list[dict[str, Any]] = field(default_factory=list)
    distinct_tracks: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    # what ran: device, decode, detector backend, kernels, encoder (engines.gpu.describe)
    runtime: dict[str, str] = field(default_factory=dict)

    @property
    def detector_calls_per_frame(self) -> float:
        return self.detector_calls / self.frames if self.frames else 0.0

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s if self.wall_s else 0.0


ProgressFn = Callable[[int, int | None], None]


def is_video_container(format_name: str) -> bool:
    return format_name.split(",")[0] in VIDEO_CONTAINERS


def probe_rotation(path: Path) -> int:
    """Display rotation in degrees of the first video frame (0 when none)."""
    with contextlib.suppress(av.FFmpegError, StopIteration), av.open(str(path)) as c:
        frame = next(c.decode(video=0))
        return round(frame.rotation or 0)
    return 0


def estimate_frames(stream: Any) -> int | None:
    if stream.frames:
        return int(stream.frames)
    if stream.duration and stream.time_base and stream.average_rate:
        return round(float(stream.duration * stream.time_base * stream.average_rate))
    return None


def redact_video(src: Path, dst: Path, detector: Detector, style: Style,
                 options: VideoOptions = VideoOptions(), progress: ProgressFn | None = None,
                 record_frames: bool = True, zones: Sequence[Zone] = (),
                 device: str = "cpu") -> VideoReport:
    """Write a redacted copy of ``src`` to ``dst``. Raises MediaError or DetectorError.

    ``device`` (``cpu`` or ``cuda``, see :func:`engines.gpu.select_device`): where frames are
    decoded, redacted and encoded (:mod:`pipeline.hw`); the detector brings its own."""
    report = VideoReport()
    report.runtime = describe(device)
    t_start = time.perf_counter()
    try:
        inp, report.runtime["decode"] = open_input(src, device)
    except (av.FFmpegError, OSError) as exc:
        raise MediaError(f"cannot open {src.name} as video: {exc}") from exc
    tmp = dst.with_name(f".{dst.name}.partial{dst.suffix}")
    try:
        if not inp.streams.video or not is_video_container(inp.format.name):
            raise MediaError(f"{src.name} is not a supported video "
                             f"({inp.format.long_name or inp.format.name})")
        vin = inp.streams.video[0]
        vin.thread_type = "AUTO"
        ain = inp.streams.audio[0] if inp.streams.audio else None
        total = estimate_frames(vin)
        rotation = probe_rotation(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(tmp), "w", format=_format_for(dst, inp.format.name)) as out:
            vout = _add_video_stream(out, vin, options, rotation, device)
            report.runtime["encoder"] = vout.codec_context.name
            aout = out.add_stream_from_template(ain) if ain is not None else None
            if options.keep_metadata:
                out.metadata.update(inp.metadata)
                vout.metadata.update(vin.metadata)
                if ain is not None and aout is not None:
                    aout.metadata.update(ain.metadata)
            elif ain is not None and aout is not None and ain.language:
                aout.metadata["language"] = ain.language
            _run(inp, vin, ain, out, vout, aout, detector, style, options, report, progress,
                 total, record_frames, zones, device)
        os.replace(tmp, dst)
    except RedactionError:
        raise
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise MediaError(f"{src.name}: {exc}") from exc
    finally:
        inp.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    report.wall_s = time.perf_counter() - t_start
    return report


def _format_for(dst: Path, input_format: str) -> str:
    """Output muxer: from the destination's extension, else the input's own kind."""
    ext = dst.suffix.lower().lstrip(".")
    by_ext = {"mp4": "mp4", "m4v": "mp4", "mov": "mov", "mkv": "matroska", "webm": "webm",
              "avi": "avi", "ts": "mpegts"}
    return by_ext.get(ext) or VIDEO_CONTAINERS.get(input_format.split(",")[0], "mp4")


def _add_video_stream(out: Any, vin: Any, options: VideoOptions, rotation: int,
                      device: str = "cpu") -> Any:
    fmt = out.format.name.split(",")[0]
    codec = video_codec(device, _CODEC_FOR_FORMAT.get(fmt, "libx264"))
    rate = vin.average_rate or vin.guessed_rate or Fraction(30)
    vout = out.add_stream(codec, rate=rate)
    cc = vout.codec_context
    cc.width = vin.codec_context.width - vin.codec_context.width % 2
    cc.height = vin.codec_context.height - vin.codec_context.height % 2
    cc.pix_fmt = "yuv420p"
    cc.time_base = vin.time_base or Fraction(1, 90000)
    vout.time_base = cc.time_base
    if codec == "libx264":
        cc.options = {"preset": options.preset, "crf": str(options.crf)}
    elif codec == NVENC:
        cc.options = {"preset": "p4", "tune": "ll", "rc": "vbr", "cq": str(options.crf + 3)}
    elif codec == "libvpx-vp9":
        cc.options = {"deadline": "realtime", "cpu-used": "8", "row-mt": "1", "crf": "32",
                      "b": "0"}
    if vin.sample_aspect_ratio:
        cc.sample_aspect_ratio = vin.sample_aspect_ratio
    if rotation:
        vout.set_display_rotation(rotation)
    return vout


def _run(inp: Any, vin: Any, ain: Any, out: Any, vout: Any, aout: Any, detector: Detector,
         style: Style, options: VideoOptions, report: VideoReport, progress: ProgressFn | None,
         total: int | None, record_frames: bool, zones: Sequence[Zone], device: str) -> None:
    decoded = Channel(QUEUE_FRAMES)
    to_encode = Channel(QUEUE_FRAMES)
    stage_ms: dict[str, float] = {"decode": 0.0, "detect": 0.0, "track": 0.0, "redact": 0.0,
                                  "encode": 0.0}
    width, height = vout.codec_context.width, vout.codec_context.height

    def decode() -> None:
        streams = [s for s in (vin, ain) if s is not None]
        index = 0
        t0 = time.perf_counter()
        for packet in inp.demux(streams):
            if decoded.cancelled.is_set():
                return
            if packet.stream is ain:
                if packet.dts is not None and not decoded.put(packet):
                    return
                continue
            for vf in packet.decode():
                frame = Frame(index, frame_pixels(vf, device, width, height), vf.pts,
                              vf.time_base)
                frame.timings_ms["decode"] = (time.perf_counter() - t0) * 1000
                index += 1
                if not decoded.put(frame):
                    return
                t0 = time.perf_counter()  # time spent waiting for room is not decoding

    def encode() -> None:
        try:
            _encode()
        except BaseException:
            to_encode.cancel()
            raise

    def _encode() -> None:
        last_pts: int | None = None
        for item in to_encode:
            if not isinstance(item, Frame):
                item.stream = aout
                out.mux(item)
                report.audio_packets += 1
                continue
            if not item.redacted:
                raise UnredactedFrameError(f"frame {item.index} reached the encoder unredacted")
            t0 = time.perf_counter()
            vf = encoder_frame(item.pixels)
            pts = item.pts if item.pts is not None else (item.index if last_pts is None
                                                         else last_pts + 1)
            if last_pts is not None and pts <= last_pts:
                pts = last_pts + 1  # broken input timestamps: keep them strictly increasing
            vf.pts, vf.time_base, last_pts = pts, vout.codec_context.time_base, pts
            out.mux(vout.encode(vf))
            stage_ms["encode"] += (time.perf_counter() - t0) * 1000
        if not to_encode.cancelled.is_set():
            out.mux(vout.encode(None))

    stage = RedactStage(detector, style, options.period, options.lookahead, options.scene_change,
                        zones=zones)
    dec_thread = run_thread("decode", decode, decoded)
    enc_done = Channel(1)
    enc_thread = run_thread("encode", encode, enc_done)
    try:
        def emit(frames: list[Frame]) -> None:
            for f in frames:
                for k in ("decode", "detect", "track", "redact"):
                    stage_ms[k] += f.timings_ms.get(k, 0.0)
                dets = f.boxes[0] if f.boxes else None
                if dets is not None:
                    for k, v in dets.counts().items():
                        report.counts[k] = report.counts.get(k, 0) + v
                if record_frames:
                    report.frames_detail.append({
                        "index": f.index, "pts": f.pts, "time_s": f.time_s,
                        "detector_ran": f.detector_ran,
                        "detectors_ran": sorted(f.lanes_ran),
                        "boxes": dets.to_records() if dets is not None else []})
                report.frames += 1
                if not to_encode.put(f):
                    return
                if progress is not None:
                    progress(report.frames, total)

        for item in decoded:
            if isinstance(item, Frame):
                emit(stage.push(item))
            else:
                to_encode.put(item)
            if to_encode.cancelled.is_set():
                break  # the encoder failed: its error is raised below
        emit(stage.flush())
        to_encode.close()
        for _ in enc_done:  # re-raises an encoder failure
            pass
    except BaseException:
        decoded.cancel()
        to_encode.cancel()
        raise
    finally:
        dec_thread.join(timeout=10)
        enc_thread.join(timeout=30)
    report.detector_calls = stage.detector_calls
    report.detector_calls_by = stage.calls_by_lane
    report.detector_ms_by = stage.ms_by_lane
    report.distinct_tracks = stage.distinct
    report.stage_ms = stage_ms
    report.duration_s = float(vin.duration * vin.time_base) if vin.duration else 0.0
