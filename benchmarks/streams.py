"""Streams benchmark: how many simulated cameras one gateway process sustains.

Each camera is a thread that publishes pre-encoded H.264 access units into its stream's
:class:`pipeline.push.PushFeed` at exactly ``--fps`` on a monotonic schedule, looping the clip at
a keyframe, so the camera side costs almost nothing. The units are made once: the clip (a real
one, with faces) is decoded, scaled to ``--size`` and encoded with libx264 (zero latency,
baseline, a keyframe every second, no B-frames) into Annex B units kept in memory, which are
checked to decode. The cameras' phases are spread over one frame interval (real cameras are
not in step); ``--aligned`` sends every camera's frame at the same instant instead.

Each stream is a :class:`pipeline.live.LiveStream` fed by its camera's PushFeed, redacting
``--categories`` with ``--method``, encoding once into a sink that counts packets. Over a
measured window of ``--seconds`` after ``--warmup`` seconds, per stream: output frames/s
(frames out minus placeholders), the lowest count in a one-second bin, the latency the gateway
adds (arrival of the unit to its encode) p50/p95, frames dropped by the gateway, camera frames
lost (units dropped by the feed plus frames dropped by the gateway), the units still waiting in
the feed at the end (a backlog that grows is a stream falling behind without loss yet), and
detector calls per frame; for the process: CPU cores used (CPU time over wall time) and how
they split between threads (decode, detection, redaction, encode, onnxruntime's pools ...),
and the cores the rest of the machine used meanwhile (other processes: noise to judge by).

A stream *sustains* the load when its output is at least ``fps - 0.5`` frames/s with no camera
frame lost in the window, and no frame covered whole because detection failed (such a frame
holds no camera picture); a run sustains it when every stream does.

Shapes: ``service`` (every stream submits to the device's shared detection service, whose
models are loaded once and batch frames of several streams) and ``direct`` (each stream runs a
detector of its own, with private models, on its redaction thread: one detector per stream).
``--compare`` runs both, alternating, in the same command and prints the ratios; ``--find-max``
searches each shape for the largest number of cameras it sustains (N = 1, 2, 3, ... up to
``--max-cameras``, stopping at the first N that fails; ``--search bisect`` doubles and then
bisects instead).

Example::

    python -m benchmarks.streams --cameras 4 --size 640x360 --fps 15 --compare
    python -m benchmarks.streams --find-max --compare --size 640x360 --fps 15 --seconds 15

A readable table is printed, then one JSON line with every figure. Exit status: 0, 1 when a
stream's thread failed or no stream went live, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import av

from engines.backends import BatchedSession, loaded_models
from engines.redact import Method, Style
from engines.registry import resolve_categories
from engines.service import detection_service
from pipeline.live import EncodedPacket, LiveOptions, LiveStream, Status
from pipeline.push import PushFeed
from pipeline.settings import RedactSettings

DEFAULT_CLIP = Path("../shared/eval/bench/people_720p.mp4")
SHAPES = ("service", "direct")
MAX_CLIP_FRAMES = 900  # units kept in memory (a minute at 15 frames/s)


# --- the cameras' access units --------------------------------------------------------------------
@dataclass
class Units:
    """The clip as H.264 Annex B access units, ready to publish in a loop."""

    data: list[bytes]
    keyframes: list[bool]
    width: int
    height: int
    gop: int
    source_frames: int
    prepare_s: float
    mean_bytes: float = 0.0
    faces_per_frame: float | None = None  # detector on sampled frames, before any run


def prepare_units(clip: Path, width: int, height: int, fps: float,
                  max_frames: int = MAX_CLIP_FRAMES) -> Units:
    """Decode ``clip``, scale it to ``width`` x ``height``, encode it as a camera would (libx264,
    zero latency, baseline, a keyframe every second, no B-frames, SPS/PPS before every
    keyframe) and keep whole GOPs, so that the loop restarts at a keyframe."""
    t0 = time.perf_counter()
    gop = max(1, round(fps))
    enc = av.CodecContext.create("libx264", "w")
    assert isinstance(enc, av.VideoCodecContext)
    enc.width, enc.height = width, height
    enc.pix_fmt = "yuv420p"
    enc.time_base = Fraction(1, gop)
    enc.framerate = Fraction(gop, 1)
    enc.gop_size = gop
    enc.bit_rate = max(300_000, int(width * height * fps * 0.1))
    enc.options = {"preset": "veryfast", "tune": "zerolatency", "profile": "baseline",
                   "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:"
                                  "repeat-headers=1:annexb=1"}
    enc.open()
    data: list[bytes] = []
    keys: list[bool] = []
    frames = 0
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for vf in container.decode(stream):
            if frames >= max_frames:
                break
            small = vf.reformat(width=width, height=height, format="yuv420p",
                                interpolation="AREA")
            small.pts, small.time_base = frames, enc.time_base
            frames += 1
            for p in enc.encode(small):
                data.append(bytes(p))
                keys.append(bool(p.is_keyframe))
    for p in enc.encode(None):
        data.append(bytes(p))
        keys.append(bool(p.is_keyframe))
    whole = (len(data) // gop) * gop or len(data)  # whole GOPs: the loop restarts at a key
    data, keys = data[:whole], keys[:whole]
    _check_units(data, keys, width, height)
    return Units(data, keys, width, height, gop, frames, time.perf_counter() - t0,
                 mean_bytes=sum(map(len, data)) / max(1, len(data)))


def _check_units(data: list[bytes], keys: list[bool], width: int, height: int) -> None:
    """Every unit is Annex B, the first is a keyframe with its SPS, and all of them decode
    (one picture each, of the right size) with a fresh decoder, as the gateway's."""
    if not data or not keys[0]:
        raise ValueError("the encoded clip does not start with a keyframe")
    if not all(d.startswith((b"\x00\x00\x00\x01", b"\x00\x00\x01")) for d in data):
        raise ValueError("the encoded units are not Annex B")
    nal_types = {b & 0x1F for b in _nal_header_bytes(data[0])}
    if 7 not in nal_types or 5 not in nal_types:
        raise ValueError(f"the first unit lacks SPS or IDR (NAL types {sorted(nal_types)})")
    dec = av.CodecContext.create("h264", "r")
    assert isinstance(dec, av.VideoCodecContext)
    pictures = 0
    for d in data:
        for f in dec.decode(av.Packet(d)):
            if (f.width, f.height) != (width, height):
                raise ValueError(f"a unit decodes to {f.width}x{f.height}")
            pictures += 1
    pictures += len(dec.decode(None))
    if pictures != len(data):
        raise ValueError(f"{len(data)} units decode to {pictures} pictures")


def _nal_header_bytes(unit: bytes) -> Iterator[int]:
    i = unit.find(b"\x00\x00\x01")
    while i >= 0 and i + 3 < len(unit):
        yield unit[i + 3]
        i = unit.find(b"\x00\x00\x01", i + 3)


def sample_faces(clip: Path, settings: RedactSettings, width: int, height: int,
                 every: int = 15, limit: int = 20) -> float:
    """Mean faces the video detector finds on sampled frames of the clip at the stream size."""
    detector = settings.detector("video")
    counts = []
    with av.open(str(clip)) as container:
        for i, vf in enumerate(container.decode(video=0)):
            if i % every:
                continue
            px = vf.reformat(width=width, height=height, format="bgr24",
                             interpolation="AREA").to_ndarray()
            counts.append(len(detector.detect(px)))
            if len(counts) >= limit:
                break
    return statistics.fmean(counts) if counts else 0.0


class Camera(threading.Thread):
    """Publishes ``units`` into ``feed`` at ``fps`` on a monotonic schedule, in a loop."""

    def __init__(self, name: str, feed: PushFeed, units: Units, fps: float,
                 phase_s: float) -> None:
        super().__init__(name=f"camera-{name}", daemon=True)
        self.feed, self.units, self.fps, self.phase_s = feed, units, fps, phase_s
        self.stop_event = threading.Event()
        self.sent = 0
        self.late = 0  # units sent more than one frame interval after their time
        self.max_late_ms = 0.0

    def run(self) -> None:
        session = self.feed.begin("h264")
        if session is None:
            return
        interval = 1.0 / self.fps
        start = time.monotonic() + self.phase_s
        n = len(self.units.data)
        k = 0
        try:
            while not self.stop_event.is_set():
                due = start + k * interval
                wait = due - time.monotonic()
                if wait > 0 and self.stop_event.wait(wait):
                    break
                late = time.monotonic() - due
                if late > interval:
                    self.late += 1
                self.max_late_ms = max(self.max_late_ms, late * 1000)
                i = k % n
                self.feed.put(session, self.units.data[i], self.units.keyframes[i])
                self.sent += 1
                k += 1
        finally:
            self.feed.end(session)


class CountingSink:
    """A packet sink: counts packets, bytes, keyframes, and when camera (not placeholder)
    frames came out."""

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.keyframes = 0
        self.frame_times: list[float] = []

    def __call__(self, pkt: EncodedPacket) -> None:
        self.packets += 1
        self.bytes += len(pkt.data)
        self.keyframes += pkt.keyframe
        if pkt.index >= 0:  # placeholders carry index -1
            self.frame_times.append(time.monotonic())


# --- CPU by thread --------------------------------------------------------------------------------
ROLES = ("decode", "redact", "encode", "detect_service", "native", "camera", "other")


def _thread_cpu() -> dict[int, float]:
    """CPU seconds of each of this process's threads, by native thread id (empty without
    psutil)."""
    try:
        import psutil
    except ImportError:
        return {}
    return {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}


def _role(name: str | None) -> str:
    if name is None:
        return "native"  # threads Python did not start: onnxruntime's pools, FFmpeg's
    if name.startswith("camera-"):
        return "camera"
    if name.startswith("detect-"):
        return "detect_service"
    for suffix, role in (("-reader", "decode"), ("-redact", "redact"), ("-output", "encode")):
        if name.endswith(suffix):
            return role
    return "other"


def cpu_by_role(before: dict[int, float], after: dict[int, float],
                names: dict[int, str]) -> dict[str, float]:
    """CPU seconds per role between two :func:`_thread_cpu` snapshots. Threads not named by
    Python are ``native``: onnxruntime's intra-op pools, FFmpeg's decoder threads."""
    out = dict.fromkeys(ROLES, 0.0)
    for tid, t in after.items():
        out[_role(names.get(tid))] += max(0.0, t - before.get(tid, 0.0))
    return out


def _machine_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy (every process), or None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def _python_thread_names() -> dict[int, str]:
    return {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}


# --- one run --------------------------------------------------------------------------------------
@dataclass
class StreamResult:
    name: str
    output_fps: float
    output_fps_min_1s: int
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    frames_out: int
    placeholders: int
    covered: int  # frames covered whole because detection failed (no camera picture left)
    gateway_dropped: int
    feed_dropped: int
    camera_lost: int
    units_sent: int
    backlog_end: int  # units the camera sent that the reader has not taken yet
    backlog_growth: int
    detector_calls_per_frame: float
    camera_late: int  # units the camera sent over a frame interval late, in the window
    camera_max_late_ms: float  # over the whole run
    status: str
    last_error: str
    sustained: bool


@dataclass
class RunResult:
    shape: str
    cameras: int
    seconds: float
    streams: list[StreamResult]
    cpu_cores: float
    cpu_by_role_cores: dict[str, float]
    service: dict[str, Any] = field(default_factory=dict)
    live: int = 0  # streams that went live before the window
    threads_left: int = 0  # stream or camera threads still alive after stopping
    other_processes_cores: float | None = None  # the rest of the machine (noise), in the window

    @property
    def sustained(self) -> bool:
        return bool(self.streams) and all(s.sustained for s in self.streams)

    @property
    def sustained_count(self) -> int:
        return sum(s.sustained for s in self.streams)

    @property
    def total_fps(self) -> float:
        return sum(s.output_fps for s in self.streams)

    def summary(self, latencies: Sequence[float]) -> dict[str, Any]:
        lat = sorted(latencies)
        fps = [s.output_fps for s in self.streams]
        return {
            "shape": self.shape, "cameras": self.cameras, "sustained": self.sustained,
            "streams_sustained": self.sustained_count, "streams_live": self.live,
            "output_fps_total": round(self.total_fps, 2),
            "output_fps_min": round(min(fps), 2) if fps else 0.0,
            "output_fps_mean": round(statistics.fmean(fps), 2) if fps else 0.0,
            "camera_lost_total": sum(s.camera_lost for s in self.streams),
            "gateway_dropped_total": sum(s.gateway_dropped for s in self.streams),
            "covered_total": sum(s.covered for s in self.streams),
            "latency_ms_p50": _pct(lat, 0.5), "latency_ms_p95": _pct(lat, 0.95),
            "latency_ms_p95_worst_stream": max((s.latency_ms_p95 or 0.0 for s in self.streams),
                                               default=None),
            "cpu_cores": round(self.cpu_cores, 3),
            "cpu_ms_per_output_frame": round(1000 * self.cpu_cores / self.total_fps, 2)
            if self.total_fps else None,
            "cpu_by_role_cores": {k: round(v, 3) for k, v in self.cpu_by_role_cores.items()},
            "other_processes_cores": None if self.other_processes_cores is None
            else round(self.other_processes_cores, 2),
            "service": self.service, "threads_left": self.threads_left,
        }


def _pct(values: Sequence[float], q: float) -> float | None:
    return round(values[min(len(values) - 1, int(q * len(values)))], 1) if values else None


class _Counts(NamedTuple):
    """One stream's counters at one instant (the window's figures are differences)."""

    camera_frames_out: int  # frames out that are not placeholders
    placeholders: int
    gateway_dropped: int
    feed_dropped: int
    sent: int  # units the camera sent
    backlog: int  # units in the feed the reader has not taken yet
    redacted: int
    detector_calls: int
    late: int
    covered: int


def cap_batches(max_batch: int | None) -> None:
    """For diagnosis only: cap the batch of every batched model session this process holds
    (None leaves them as they are)."""
    if max_batch is None:
        return
    for m in loaded_models():
        if isinstance(m.session, BatchedSession):
            m.session.max_batch = max_batch


def shape_settings(settings: RedactSettings, shape: str) -> RedactSettings:
    """``direct`` streams load models of their own (one detector per stream)."""
    if shape == "direct":
        return dataclasses.replace(settings, video_detector=dataclasses.replace(
            settings.video_detector, shared_models=False))
    return settings


def run_load(shape: str, cameras: int, units: Units, settings: RedactSettings, fps: float,
             seconds: float, warmup: float, options: LiveOptions, aligned: bool = False,
             max_batch: int | None = None) -> tuple[RunResult, list[float]]:
    """``cameras`` streams of ``shape`` for ``warmup`` + ``seconds``; the figures of the window
    and every latency sample of the window (all streams)."""
    settings = shape_settings(settings, shape)
    opts = dataclasses.replace(options, width=units.width, height=units.height, fps=fps,
                               detection=shape)
    feeds = [PushFeed() for _ in range(cameras)]
    sinks = [CountingSink() for _ in range(cameras)]
    streams = [LiveStream(f"{shape}{i}", "push", settings, opts, sinks=[sinks[i]],
                          feed=feeds[i]) for i in range(cameras)]
    cams = [Camera(f"{shape}{i}", feeds[i], units, fps,
                   0.0 if aligned else i / (cameras * fps)) for i in range(cameras)]
    service = detection_service("cpu")
    try:
        for s in streams:
            s.start()
        for c in cams:
            c.start()
        deadline = time.monotonic() + max(15.0, warmup)
        while (time.monotonic() < deadline
               and any(s.stats.status is not Status.LIVE for s in streams)):
            time.sleep(0.05)
        live = sum(s.stats.status is Status.LIVE for s in streams)
        cap_batches(max_batch)  # models the streams loaded, too
        time.sleep(warmup)

        def snap() -> list[_Counts]:
            return [_Counts(s.stats.frames_out - s.stats.placeholders, s.stats.placeholders,
                            s.stats.frames_dropped, f.units_dropped, c.sent,
                            f.units_in - f.units_dropped - s.stats.frames_in,
                            s.stats.frames_redacted, s.stats.detector_calls, c.late,
                            s.stats.frames_covered)
                    for s, f, c in zip(streams, feeds, cams, strict=True)]

        svc0 = service.describe()
        svc_busy0 = service.stats.busy_s
        th0 = _thread_cpu()
        busy0 = _machine_busy_s()
        cpu0, t0 = time.process_time(), time.monotonic()
        before = snap()
        time.sleep(seconds)
        after = snap()
        cpu1, t1 = time.process_time(), time.monotonic()
        busy1 = _machine_busy_s()
        th1 = _thread_cpu()
        svc1 = service.describe()
        svc_busy1 = service.stats.busy_s
        names = _python_thread_names()
        wall = t1 - t0
        results: list[StreamResult] = []
        window_latency: list[float] = []
        for s, sink, c, b, a in zip(streams, sinks, cams, before, after, strict=True):
            out = a.camera_frames_out - b.camera_frames_out
            # every camera frame encoded appends one latency sample (placeholders none)
            lat_all = list(s.stats.latency_ms)
            lat = sorted(lat_all[max(0, len(lat_all) - out):]) if out > 0 else []
            window_latency += lat
            times = [x for x in sink.frame_times if t0 <= x < t1]
            bins = [sum(1 for x in times if t0 + k <= x < t0 + k + 1)
                    for k in range(max(1, int(wall)))]
            gw_drop = a.gateway_dropped - b.gateway_dropped
            feed_drop = a.feed_dropped - b.feed_dropped
            out_fps = out / wall
            redacted = a.redacted - b.redacted
            lost = gw_drop + feed_drop
            covered = a.covered - b.covered
            results.append(StreamResult(
                name=s.name, output_fps=round(out_fps, 2), output_fps_min_1s=min(bins),
                latency_ms_p50=_pct(lat, 0.5), latency_ms_p95=_pct(lat, 0.95),
                frames_out=out, placeholders=a.placeholders - b.placeholders, covered=covered,
                gateway_dropped=gw_drop, feed_dropped=feed_drop, camera_lost=lost,
                units_sent=a.sent - b.sent, backlog_end=a.backlog,
                backlog_growth=a.backlog - b.backlog,
                detector_calls_per_frame=round((a.detector_calls - b.detector_calls) / redacted, 3)
                if redacted else 0.0,
                camera_late=a.late - b.late, camera_max_late_ms=round(c.max_late_ms, 1),
                status=s.stats.status.value, last_error=s.stats.last_error,
                sustained=out_fps >= fps - 0.5 and lost == 0 and covered == 0))
        svc: dict[str, Any] = {}
        if shape == "service":
            runs = svc1["batched_runs"] - svc0["batched_runs"]
            frames = svc1["batched_frames"] - svc0["batched_frames"]
            svc = {"submitted": svc1["submitted"] - svc0["submitted"],
                   "completed": svc1["completed"] - svc0["completed"],
                   "failed": svc1["failed"] - svc0["failed"],
                   "batched_runs": runs, "batched_frames": frames,
                   "mean_batch": round(frames / runs, 2) if runs else 0.0,
                   "detections_per_s": round((svc1["submitted"] - svc0["submitted"]) / wall, 1),
                   "busy_cores": round((svc_busy1 - svc_busy0) / wall, 3),
                   "workers": svc1["workers"], "process_totals": svc1}
        run = RunResult(shape, cameras, round(wall, 2), results, (cpu1 - cpu0) / wall,
                        {k: v / wall for k, v in cpu_by_role(th0, th1, names).items()},
                        svc, live)
        if busy0 is not None and busy1 is not None:
            run.other_processes_cores = max(0.0, (busy1 - busy0 - (cpu1 - cpu0)) / wall)
    finally:
        for s in streams:  # first: a camera that hung up first would be logged as lost
            s.stop()
        for c in cams:
            c.stop_event.set()
        for c in cams:
            c.join(5)
    left = [t for t in threading.enumerate()
            if t.is_alive() and t.name.startswith((f"{shape}", "camera-"))]
    run.threads_left = len(left)
    gc.collect()
    return run, window_latency


# --- searching ------------------------------------------------------------------------------------
Steps = Generator[int, bool, None]


def linear_search(start: int, largest: int) -> Steps:
    """N = start, start + 1, ...: the caller sends whether N sustained; stops at a failure."""
    n = start
    while n <= largest:
        ok = yield n
        if not ok:
            return
        n += 1


def bisect_search(start: int, largest: int) -> Steps:
    """N = start, doubling while it sustains, then bisecting between the largest that did and
    the smallest that did not."""
    good, bad = 0, largest + 1
    n = start
    while True:
        ok = yield n
        if ok:
            good = n
        else:
            bad = n
        if bad == largest + 1:
            if n >= largest:
                return
            n = min(largest, n * 2)
        elif bad - good <= 1:
            return
        else:
            n = (good + bad) // 2


@dataclass
class Search:
    shape: str
    steps: Steps
    next_n: int | None = None
    best: int = 0
    first_failed: int | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)

    def advance(self, ok: bool | None) -> None:
        try:
            self.next_n = next(self.steps) if ok is None else self.steps.send(ok)
        except StopIteration:
            self.next_n = None


# --- printing -------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], least: int = 0) -> str:
    """Right-aligned columns, each at least ``least`` wide (rows printed one by one line up)."""
    cells = [[_fmt(v) for v in r] for r in rows]
    widths = [max([least, len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


STREAM_HEADERS = ("stream", "out f/s", "min 1s", "p50 ms", "p95 ms", "gw drop", "feed drop",
                  "lost", "covered", "sent", "backlog", "det/frame", "cam late", "sustains")


def stream_rows(streams: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[x["name"], x["output_fps"], x["output_fps_min_1s"], x["latency_ms_p50"],
             x["latency_ms_p95"], x["gateway_dropped"], x["feed_dropped"], x["camera_lost"],
             x["covered"], x["units_sent"], f"{x['backlog_end']}({x['backlog_growth']:+d})",
             x["detector_calls_per_frame"], x["camera_late"],
             x["sustained"] if x["status"] == "live" else x["status"]] for x in streams]


SUMMARY_HEADERS = ("shape", "N", "sustained", "out f/s total", "min stream", "lost", "covered",
                   "p50 ms", "p95 ms", "cores", "CPU ms/frame", "batch", "others' cores")


def summary_row(s: dict[str, Any]) -> list[Any]:
    return [s["shape"], s["cameras"], f"{s['streams_sustained']}/{s['cameras']}",
            s["output_fps_total"], s["output_fps_min"], s["camera_lost_total"], s["covered_total"],
            s["latency_ms_p50"], s["latency_ms_p95"], s["cpu_cores"],
            s["cpu_ms_per_output_frame"], s["service"].get("mean_batch") if s["service"] else None,
            s["other_processes_cores"]]


def roles_line(s: dict[str, Any]) -> str:
    parts = [f"{k} {v:.2f}" for k, v in s["cpu_by_role_cores"].items() if v >= 0.005]
    return f"  CPU by thread (cores): {', '.join(parts) or 'psutil not installed'}"


def service_line(s: dict[str, Any]) -> str:
    v = s["service"]
    return (f"  detection service (window): {v['submitted']} submitted "
            f"({v['detections_per_s']}/s), {v['failed']} failed, {v['batched_runs']} batched "
            f"runs of {v['batched_frames']} frames, mean batch {v['mean_batch']}, busy "
            f"{v['busy_cores']} cores summed over {v['workers']} workers; process totals: "
            f"submitted {v['process_totals']['submitted']}, mean batch "
            f"{v['process_totals']['mean_batch']}")


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(service: dict[str, Any], direct: dict[str, Any]) -> dict[str, float | None]:
    """service / direct."""
    keys = ("output_fps_total", "cpu_cores", "cpu_ms_per_output_frame", "latency_ms_p50",
            "latency_ms_p95")
    return {k: _ratio(service[k], direct[k]) for k in keys}


# --- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.streams", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cameras", type=int, default=4, metavar="N",
                    help="simulated cameras (streams) of a single run (default: %(default)s)")
    ap.add_argument("--size", default="640x360", help="WxH of the cameras (default: %(default)s)")
    ap.add_argument("--fps", type=float, default=15.0,
                    help="frames/s each camera sends (default: %(default)s)")
    ap.add_argument("--seconds", type=float, default=15.0,
                    help="measured window of each run (default: %(default)s)")
    ap.add_argument("--warmup", type=float, default=4.0,
                    help="seconds after every stream is live before the window "
                         "(default: %(default)s)")
    ap.add_argument("--clip", type=Path, default=DEFAULT_CLIP,
                    help="a video with faces the cameras loop (default: %(default)s)")
    ap.add_argument("--categories", default="faces",
                    help="comma-separated categories redacted (default: %(default)s)")
    ap.add_argument("--method", default="blur", help="blur, pixelate or fill (default: blur)")
    ap.add_argument("--delay", type=int, default=LiveOptions.delay_frames,
                    help="look-ahead frames of each stream (default: %(default)s)")
    ap.add_argument("--period", type=int, default=LiveOptions.period,
                    help="frames between face detector calls (default: %(default)s)")
    ap.add_argument("--detection", choices=SHAPES, default="service",
                    help="the shape without --compare: the shared batched service, or one "
                         "detector with private models per stream (default: %(default)s)")
    ap.add_argument("--compare", action="store_true",
                    help="run both shapes, alternating, and print service/direct ratios")
    ap.add_argument("--find-max", action="store_true",
                    help="search the largest N every stream sustains (per shape)")
    ap.add_argument("--max-cameras", type=int, default=16,
                    help="largest N --find-max tries (default: %(default)s)")
    ap.add_argument("--start", type=int, default=1,
                    help="first N --find-max tries (default: %(default)s)")
    ap.add_argument("--search", choices=("linear", "bisect"), default="linear",
                    help="--find-max: N, N+1, ... until one fails, or double then bisect "
                         "(default: %(default)s)")
    ap.add_argument("--aligned", action="store_true",
                    help="all cameras send at the same instant (default: phases spread)")
    ap.add_argument("--service-max-batch", type=int, default=None, metavar="N",
                    help="diagnosis: cap the frames one batched model run takes (1: no "
                         "batching; default: the backend's own)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        print(f"streams: --size {args.size!r}: use WxH, e.g. 640x360", file=sys.stderr)
        return 2
    if w < 16 or h < 16 or w % 2 or h % 2:
        print("streams: --size must be even and at least 16x16", file=sys.stderr)
        return 2
    if args.service_max_batch is not None and args.service_max_batch < 1:
        print("streams: --service-max-batch must be at least 1", file=sys.stderr)
        return 2
    if args.cameras < 1 or args.fps <= 1 or args.seconds < 1 or args.warmup < 0 \
            or not 1 <= args.start <= args.max_cameras:
        print("streams: --cameras >= 1, --fps > 1, --seconds >= 1, --warmup >= 0 and "
              "1 <= --start <= --max-cameras", file=sys.stderr)
        return 2
    if not args.clip.is_file():
        print(f"streams: no such clip: {args.clip}", file=sys.stderr)
        return 2
    try:
        cats = tuple(resolve_categories([c.strip() for c in args.categories.split(",")
                                         if c.strip()]))
        settings = RedactSettings(cats, Style(method=Method.parse(args.method)))
        options = LiveOptions(delay_frames=args.delay, period=args.period)
    except ValueError as exc:
        print(f"streams: {exc}", file=sys.stderr)
        return 2
    try:
        units = prepare_units(args.clip, w, h, args.fps)
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        print(f"streams: cannot prepare the cameras' units from {args.clip}: {exc}",
              file=sys.stderr)
        return 2
    units.faces_per_frame = round(sample_faces(args.clip, settings, w, h), 2)
    cap_batches(args.service_max_batch)
    shapes = list(SHAPES) if args.compare else [args.detection]
    print(f"cameras: {args.clip.name} -> {len(units.data)} H.264 units of {w}x{h} "
          f"(keyframe every {units.gop}, {units.mean_bytes / 1024:.1f} KiB mean, loop "
          f"{len(units.data) / args.fps:.1f} s at {args.fps:g} frames/s), prepared in "
          f"{units.prepare_s:.1f} s; detector finds {units.faces_per_frame} faces per "
          f"sampled frame; categories {','.join(settings.categories)}, method "
          f"{settings.style.method.value}, period {args.period}, look-ahead {args.delay}; "
          f"sustained = >= {args.fps - 0.5:g} frames/s out and no camera frame lost in "
          f"{args.seconds:g} s after {args.warmup:g} s warm-up"
          + (f"; batched runs capped at {args.service_max_batch} frames (diagnosis)"
             if args.service_max_batch else ""), flush=True)

    def one(shape: str, n: int) -> tuple[RunResult, dict[str, Any]]:
        run, lat = run_load(shape, n, units, settings, args.fps, args.seconds, args.warmup,
                            options, args.aligned, args.service_max_batch)
        s = run.summary(lat)
        s["streams"] = [dataclasses.asdict(x) for x in run.streams]
        return run, s

    report: dict[str, Any] = {
        "benchmark": "streams", "clip": args.clip.name, "size": f"{w}x{h}", "fps": args.fps,
        "categories": list(settings.categories), "method": settings.style.method.value,
        "period": args.period, "delay_frames": args.delay, "seconds": args.seconds,
        "warmup": args.warmup, "aligned": args.aligned,
        "service_max_batch": args.service_max_batch,
        "units": {k: v for k, v in dataclasses.asdict(units).items()
                  if k not in ("data", "keyframes")},
    }
    failed = False
    if not args.find_max:
        summaries: dict[str, dict[str, Any]] = {}
        for shape in shapes:
            run, s = one(shape, args.cameras)
            summaries[shape] = s
            failed |= run.live == 0 or any(x.status == "failed" for x in run.streams)
            print(f"\n{shape}: {args.cameras} cameras, window {run.seconds} s")
            print(table(STREAM_HEADERS, stream_rows(s["streams"])))
            print(roles_line(s))
            if s["service"]:
                print(service_line(s))
        print()
        print(table(SUMMARY_HEADERS, [summary_row(s) for s in summaries.values()]))
        report["runs"] = summaries
        if len(summaries) == 2:
            rs = ratios(summaries["service"], summaries["direct"])
            report["ratio_service_to_direct"] = rs
            print("service / direct: " + ", ".join(f"{k} {_fmt(v)}" for k, v in rs.items()))
    else:
        make: Callable[[int, int], Steps] = (
            linear_search if args.search == "linear" else bisect_search)
        searches = [Search(shape, make(args.start, args.max_cameras)) for shape in shapes]
        for search in searches:
            search.advance(None)
        print()
        print(table(SUMMARY_HEADERS, [], 7) + "  (each run as it ends)", flush=True)
        while any(search.next_n is not None for search in searches):
            for search in searches:  # alternate the shapes, so machine noise hits both alike
                if search.next_n is None:
                    continue
                run, summary = one(search.shape, search.next_n)
                search.runs.append(summary)
                failed |= run.live == 0 or any(x.status == "failed" for x in run.streams)
                if run.sustained:
                    search.best = max(search.best, run.cameras)
                elif search.first_failed is None or run.cameras < search.first_failed:
                    search.first_failed = run.cameras
                print(table(SUMMARY_HEADERS, [summary_row(summary)], 7).splitlines()[1],
                      flush=True)
                search.advance(run.sustained)
        print()
        for search in searches:
            best = next((x for x in search.runs if x["cameras"] == search.best), None)
            fail = next((x for x in search.runs if x["cameras"] == search.first_failed), None)
            print(f"{search.shape}: largest N sustained {search.best} "
                  f"(first failing N: {_fmt(search.first_failed)})")
            for label, found in (("at largest N", best), ("at first failing N", fail)):
                if found is None:
                    continue
                print(f" {label} ({found['cameras']}):")
                print(table(STREAM_HEADERS, stream_rows(found["streams"])))
                print(roles_line(found))
                if found["service"]:
                    print(service_line(found))
        report["find_max"] = {x.shape: {"largest_sustained": x.best,
                                        "first_failed": x.first_failed, "runs": x.runs}
                              for x in searches}
        if len(searches) == 2:
            a, b = searches[0].best, searches[1].best
            report["ratio_largest_sustained"] = _ratio(a, b)
            print(f"\nlargest N sustained: service {a}, direct {b}, ratio "
                  f"{_fmt(_ratio(a, b))}")
            both = [next((x for x in search.runs if x["cameras"] == min(a, b)), None)
                    for search in searches]
            if min(a, b) > 0 and both[0] is not None and both[1] is not None:
                common = ratios(both[0], both[1])
                report["ratio_service_to_direct_at_common_n"] = {"cameras": min(a, b), **common}
                print(f"at N = {min(a, b)}, service / direct: "
                      + ", ".join(f"{k} {_fmt(v)}" for k, v in common.items()))
    line = json.dumps(report, separators=(",", ":"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(line + "\n")
    print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
