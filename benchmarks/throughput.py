"""Throughput benchmark: end-to-end frames per second of the video pipeline, optionally next to
deface 1.5.0 on the same clip.

Our pipeline runs in this process (decode -> detect -> track -> redact -> encode into a temporary
MP4) ``--repeat`` times with the detector built once beforehand; its frames/s is the input frame
count over the wall time of :func:`pipeline.video.redact_video` (open to close of the output). Each
output is checked against the input: same number of frames, same number of audio packets, and a
video duration within one frame.

With ``--vs-deface`` deface runs in the same repeats, alternating with ours (ours first on odd
repeats, deface first on even ones) so that machine noise hits both alike. Its frames/s is the
input frame count over the wall time of the whole ``deface CLIP -o OUT.mp4`` command, so it also
pays for starting Python and loading its model (``setup_s`` below is what loading our detector
costs, for comparison). deface runs from its own virtual environment, created on first use by
``python3.12 -m venv`` and ``pip install deface==1.5.0 onnxruntime onnx``.

Peak memory is this process's peak resident set (``getrusage`` ``ru_maxrss``); deface's is the
sum of the peaks of the processes of its tree (deface and its ffmpeg), sampled from /proc. The
``decode`` stage figure is the decode thread's time per frame from demuxing to the BGR
picture, without the time it waits for room in the queue to the detector; ``decode alone`` is one
decode-only pass over the clip, for comparison.

No figure here is asserted: the exit status is 1 only when an output fails the checks or deface
fails to run, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from engines.errors import RedactionError
from engines.redact import Method, Style
from engines.registry import resolve_categories
from pipeline.files import RedactSettings
from pipeline.settings import apply_sets
from pipeline.video import VideoOptions, VideoReport, redact_video

log = logging.getLogger(__name__)

DEFACE_VERSION = "1.5.0"
DEFACE_PACKAGES = (f"deface=={DEFACE_VERSION}", "onnxruntime", "onnx")
STAGES = ("decode", "detect", "track", "redact", "encode")


# --- media facts -----------------------------------------------------------------------------
@dataclass
class MediaFacts:
    frames: int = 0
    audio_packets: int = 0
    duration_s: float = 0.0  # video stream: first presented pts to end of the last frame
    frame_s: float = 0.0  # one frame's duration at the stream's average rate
    width: int = 0
    height: int = 0
    decode_s: float = 0.0  # wall time of decoding every frame to BGR (one pass)


def probe(path: Path) -> MediaFacts:
    """Decode every video frame (as the pipeline does, to BGR) and count audio packets as the
    pipeline copies them (those with a dts)."""
    facts = MediaFacts()
    t0 = time.perf_counter()
    with av.open(str(path)) as c:
        vin = c.streams.video[0]
        vin.thread_type = "AUTO"
        ain = c.streams.audio[0] if c.streams.audio else None
        facts.width, facts.height = vin.codec_context.width, vin.codec_context.height
        rate = vin.average_rate or vin.guessed_rate
        facts.frame_s = float(1 / rate) if rate else 0.0
        tb = vin.time_base or Fraction(1, 90000)
        start: int | None = None
        end: int | None = None
        for packet in c.demux([s for s in (vin, ain) if s is not None]):
            if packet.stream is ain:
                facts.audio_packets += packet.dts is not None
                continue
            if packet.pts is not None:
                stop = packet.pts + (packet.duration or 0)
                start = packet.pts if start is None else min(start, packet.pts)
                end = stop if end is None else max(end, stop)
            for vf in packet.decode():
                if isinstance(vf, av.VideoFrame):
                    vf.to_ndarray(format="bgr24")
                    facts.frames += 1
        if start is not None and end is not None:
            facts.duration_s = float((end - start) * tb)
    facts.decode_s = time.perf_counter() - t0
    return facts


def check_output(src: MediaFacts, out: MediaFacts, audio: bool = True) -> list[str]:
    """Problems of an output compared with its input (empty when it passes)."""
    problems = []
    if out.frames != src.frames:
        problems.append(f"{out.frames} frames, input has {src.frames}")
    if audio and out.audio_packets != src.audio_packets:
        problems.append(f"{out.audio_packets} audio packets, input has {src.audio_packets}")
    if abs(out.duration_s - src.duration_s) > src.frame_s + 1e-6:
        problems.append(f"duration {out.duration_s:.3f} s, input {src.duration_s:.3f} s "
                        f"(more than one frame, {src.frame_s:.3f} s, apart)")
    return problems


# --- memory ----------------------------------------------------------------------------------
def _rss_mib(ru_maxrss: int) -> float:
    """ru_maxrss is KiB on Linux, bytes on macOS."""
    return ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else ru_maxrss / 1024


def peak_rss_mib() -> float:
    return _rss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# --- deface ----------------------------------------------------------------------------------
def default_deface_venv() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "redaction-gateway" / "deface-venv"


def find_python312() -> str:
    base = getattr(sys, "_base_executable", None) or sys.executable
    if sys.version_info[:2] == (3, 12) and base and Path(base).exists():
        return str(base)
    found = shutil.which("python3.12")
    if not found:
        raise RuntimeError("python3.12 is needed to create deface's virtual environment")
    return found


def ensure_deface(venv: Path) -> Path:
    """The ``deface`` executable of ``venv``, creating the environment if needed."""
    exe = venv / "bin" / "deface"
    marker = venv / f".installed-deface-{DEFACE_VERSION}"
    if exe.exists() and marker.exists():
        return exe
    python = venv / "bin" / "python"
    if not python.exists():
        log.info("creating deface's virtual environment in %s", venv)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([find_python312(), "-m", "venv", str(venv)], check=True)
    log.info("installing %s into %s", " ".join(DEFACE_PACKAGES), venv)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *DEFACE_PACKAGES], check=True)
    if not exe.exists():
        raise RuntimeError(f"{exe} is missing after installing deface")
    marker.write_text(" ".join(DEFACE_PACKAGES) + "\n")
    return exe


def deface_versions(venv: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('deface', 'onnxruntime', 'opencv-python', 'imageio-ffmpeg')}))")
    try:
        out = subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True,
                             capture_output=True, text=True).stdout
        return dict(json.loads(out))
    except (subprocess.CalledProcessError, OSError, ValueError) as exc:
        log.warning("cannot read deface's package versions: %s", exc)
        return {}


def _vm_hwm_kib(pid: int) -> int:
    """Peak resident set of one live process (Linux /proc), 0 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    """``pid`` and its live descendants (Linux /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def run_timed(cmd: list[str], log_path: Path, interval: float = 0.1) -> tuple[float, int, float]:
    """Run ``cmd``; return (wall seconds, exit status, peak RSS MiB of its process tree).

    The peak is the sum over the processes of the tree (deface and its ffmpeg run side by
    side) of each one's VmHWM, sampled every ``interval`` seconds from /proc. (``wait4``'s
    ``ru_maxrss`` cannot be used: Linux carries the parent's peak into a child at fork/exec,
    so a child of this large process would report at least this process's peak.) Where /proc
    is missing, that ``ru_maxrss`` is returned: an upper bound.
    """
    peaks: dict[int, int] = {}
    use_proc = Path("/proc/self/status").exists()
    with log_path.open("wb") as log_file:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT)
        while True:
            done, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if done:
                break
            if use_proc:
                for pid in _descendants(proc.pid):
                    peaks[pid] = max(peaks.get(pid, 0), _vm_hwm_kib(pid))
            time.sleep(interval)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = sum(peaks.values()) / 1024 if use_proc else _rss_mib(usage.ru_maxrss)
    return wall, proc.returncode, rss


# --- results ---------------------------------------------------------------------------------
@dataclass
class OurRun:
    wall_s: float
    fps: float
    stage_ms_per_frame: dict[str, float]
    detector_calls_per_frame: float
    frames: int
    # per detector (engine): calls per frame and detector milliseconds per call and per frame
    engines: dict[str, dict[str, float]] = field(default_factory=dict)
    output: dict[str, float] = field(default_factory=dict)  # frames, audio packets, duration
    problems: list[str] = field(default_factory=list)


@dataclass
class DefaceRun:
    wall_s: float
    fps: float
    peak_rss_mib: float
    output_frames: int
    output_audio_packets: int


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def run_ours(clip: Path, out: Path, detector: Any, style: Style, options: VideoOptions,
             src: MediaFacts) -> OurRun:
    report: VideoReport = redact_video(clip, out, detector, style, options, record_frames=False)
    frames = max(report.frames, 1)
    run = OurRun(report.wall_s, src.frames / report.wall_s if report.wall_s else 0.0,
                 {k: report.stage_ms.get(k, 0.0) / frames for k in STAGES},
                 report.detector_calls_per_frame, report.frames)
    run.engines = {name: {"calls_per_frame": calls / frames,
                          "ms_per_call": report.detector_ms_by[name] / calls if calls else 0.0,
                          "ms_per_frame": report.detector_ms_by[name] / frames}
                   for name, calls in report.detector_calls_by.items()}
    facts = probe(out)
    run.output = {"frames": facts.frames, "audio_packets": facts.audio_packets,
                  "duration_s": facts.duration_s}
    run.problems = check_output(src, facts)
    if report.audio_packets != src.audio_packets:
        run.problems.append(f"the pipeline copied {report.audio_packets} audio packets, input "
                            f"has {src.audio_packets}")
    out.unlink(missing_ok=True)
    return run


def run_deface(exe: Path, clip: Path, out: Path, src: MediaFacts) -> DefaceRun:
    log_path = out.with_suffix(".log")
    wall, status, rss = run_timed([str(exe), str(clip), "-o", str(out)], log_path)
    if status != 0 or not out.exists():
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"deface exited with status {status}:\n{tail}")
    facts = probe(out)
    out.unlink(missing_ok=True)
    return DefaceRun(wall, src.frames / wall if wall else 0.0, rss, facts.frames,
                     facts.audio_packets)


def format_report(summary: dict[str, Any]) -> str:
    inp = summary["input"]
    ours: list[dict[str, Any]] = summary["ours"]["runs"]
    lines = [f"{summary['clip']}: {inp['width']}x{inp['height']}, {inp['frames']} frames, "
             f"{inp['duration_s']:.3f} s, {inp['audio_packets']} audio packets; "
             f"{len(ours)} repeats, method {summary['method']}"]
    runs_head = "".join(f"{'run ' + str(i + 1):>9}" for i in range(len(ours)))
    lines.append(f"{'':<28}{runs_head}{'median':>9}")
    lines.append(f"{'ours frames/s':<28}" + "".join(f"{r['fps']:>9.2f}" for r in ours)
                 + f"{summary['ours']['fps']:>9.2f}")
    deface = summary.get("deface")
    if deface:
        lines.append(f"{'deface frames/s':<28}"
                     + "".join(f"{r['fps']:>9.2f}" for r in deface["runs"])
                     + f"{deface['fps']:>9.2f}")
    lines.append(f"{'ours wall s':<28}" + "".join(f"{r['wall_s']:>9.2f}" for r in ours)
                 + f"{summary['ours']['wall_s']:>9.2f}")
    if deface:
        lines.append(f"{'deface wall s':<28}"
                     + "".join(f"{r['wall_s']:>9.2f}" for r in deface["runs"])
                     + f"{deface['wall_s']:>9.2f}")
    stage = summary["ours"]["stage_ms_per_frame"]
    lines.append("ours ms/frame (median): " + ", ".join(
        f"{k}{'*' if k == 'decode' else ''} {stage[k]:.2f}" for k in STAGES)
        + f"; decode alone {summary['input']['decode_only_ms_per_frame']:.2f}")
    lines.append("  * decode: decode thread time per frame (demux, decode, BGR), "
                 "queue waits excluded")
    lines.append(f"ours detector calls/frame: {summary['ours']['detector_calls_per_frame']:.3f};"
                 f" detector setup {summary['ours']['setup_s']:.2f} s (not in frames/s)")
    for name, e in summary["ours"]["engines"].items():
        lines.append(f"  {name:<26} {e['calls_per_frame']:.3f} calls/frame, "
                     f"{e['ms_per_call']:.1f} ms/call, {e['ms_per_frame']:.2f} ms/frame")
    mem = f"peak RSS: ours {summary['ours']['peak_rss_mib']:.0f} MiB (process, " \
          f"{summary['ours']['rss_before_runs_mib']:.0f} MiB before the first run)"
    if deface:
        mem += f", deface {deface['peak_rss_mib']:.0f} MiB (its process tree: deface + ffmpeg)"
    lines.append(mem)
    problems = summary["ours"]["problems"]
    lines.append("output checks (frames, audio packets, duration within one frame): "
                 + ("ok" if not problems else "FAILED: " + "; ".join(problems)))
    if deface:
        lines.append(f"deface output: {deface['output_frames']} frames, "
                     f"{deface['output_audio_packets']} audio packets (not checked)")
        lines.append(f"ours/deface frames/s: {summary['ratio_ours_to_deface']:.2f}x")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description="Measure end-to-end frames/s of the video pipeline on one clip (median of "
                    "repeats), per-stage ms/frame, detector calls/frame and peak memory; "
                    "optionally next to deface 1.5.0.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("clip", type=Path, metavar="CLIP", help="the video to redact")
    p.add_argument("--repeat", type=int, default=3, help="runs of each system (default: 3)")
    p.add_argument("--method", default="blur", choices=[m.value for m in Method],
                   help="how faces are covered (default: blur, as deface)")
    p.add_argument("--detect-every", type=int, default=VideoOptions.period, metavar="N",
                   help="the pipeline's detector period (default: %(default)s)")
    p.add_argument("--vs-deface", action="store_true",
                   help="also time deface 1.5.0 with its defaults on the same clip")
    p.add_argument("--deface-venv", type=Path, default=None, metavar="DIR",
                   help="deface's virtual environment, created if missing "
                        f"(default: {default_deface_venv()})")
    p.add_argument("--categories", default="faces",
                   help="comma-separated categories, as for `redact file` (default: faces)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="CAT.KEY=VALUE",
                   help="a per-category setting, as for `redact file --set`")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    p.add_argument("-q", "--quiet", action="store_true", help="log only warnings")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.repeat < 1 or args.detect_every < 1:
        print("throughput: --repeat and --detect-every must be at least 1", file=sys.stderr)
        return 2
    clip: Path = args.clip
    if not clip.is_file():
        print(f"throughput: no such file: {clip}", file=sys.stderr)
        return 2
    try:
        src = probe(clip)
    except (av.FFmpegError, OSError, IndexError) as exc:
        print(f"throughput: cannot read {clip} as video: {exc}", file=sys.stderr)
        return 2

    deface_exe: Path | None = None
    venv: Path = args.deface_venv or default_deface_venv()
    if args.vs_deface:
        try:
            deface_exe = ensure_deface(venv)
        except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
            print(f"throughput: cannot set up deface in {venv}: {exc}", file=sys.stderr)
            return 1

    style = Style(method=Method.parse(args.method))
    options = VideoOptions(period=args.detect_every)
    t0 = time.perf_counter()
    try:
        categories = resolve_categories(args.categories.split(","))
        per = apply_sets({}, args.sets)
        settings = RedactSettings(categories=categories, style=style, per_category=per)
    except ValueError as exc:
        print(f"throughput: {exc}", file=sys.stderr)
        return 2
    detector = settings.detector("video")
    style = settings.style  # with the per-category methods of --set
    setup_s = time.perf_counter() - t0
    rss_before = peak_rss_mib()

    ours: list[OurRun] = []
    deface: list[DefaceRun] = []
    with tempfile.TemporaryDirectory(prefix="rg-throughput-") as tmp:
        out_ours = Path(tmp) / "ours.mp4"
        out_deface = Path(tmp) / "deface.mp4"

        def one_ours() -> None:
            ours.append(run_ours(clip, out_ours, detector, style, options, src))
            log.info("ours: %.2f frames/s (%.2f s)", ours[-1].fps, ours[-1].wall_s)

        def one_deface() -> None:
            assert deface_exe is not None
            deface.append(run_deface(deface_exe, clip, out_deface, src))
            log.info("deface: %.2f frames/s (%.2f s)", deface[-1].fps, deface[-1].wall_s)

        for i in range(args.repeat):
            steps: list[Callable[[], None]] = [one_ours]
            if deface_exe is not None:
                steps = [one_ours, one_deface] if i % 2 == 0 else [one_deface, one_ours]
            for step in steps:
                try:
                    step()
                except RedactionError as exc:
                    print(f"throughput: our pipeline failed on {clip}: {exc}", file=sys.stderr)
                    return 1
                except RuntimeError as exc:
                    print(f"throughput: {exc}", file=sys.stderr)
                    return 1

    problems = sorted({p for r in ours for p in r.problems})
    summary: dict[str, Any] = {
        "benchmark": "throughput", "clip": clip.name, "method": style.method.value,
        "categories": list(settings.categories),
        "per_category": settings.to_dict()["per_category"],
        "detect_every": options.period,
        "input": {**{k: v for k, v in asdict(src).items() if k != "decode_s"},
                  "decode_only_ms_per_frame": 1000 * src.decode_s / max(src.frames, 1)},
        "ours": {
            "fps": _median([r.fps for r in ours]),
            "wall_s": _median([r.wall_s for r in ours]),
            "fps_with_setup": src.frames / (setup_s + _median([r.wall_s for r in ours])),
            "setup_s": setup_s,
            "stage_ms_per_frame": {k: _median([r.stage_ms_per_frame[k] for r in ours])
                                   for k in STAGES},
            "detector_calls_per_frame": _median([r.detector_calls_per_frame for r in ours]),
            "engines": {name: {k: _median([r.engines[name][k] for r in ours])
                               for k in ours[0].engines[name]} for name in ours[0].engines},
            "peak_rss_mib": peak_rss_mib(), "rss_before_runs_mib": rss_before,
            "problems": problems,
            "runs": [asdict(r) for r in ours],
        },
    }
    if deface:
        summary["deface"] = {
            "fps": _median([r.fps for r in deface]),
            "wall_s": _median([r.wall_s for r in deface]),
            "peak_rss_mib": max(r.peak_rss_mib for r in deface),
            "output_frames": deface[-1].output_frames,
            "output_audio_packets": deface[-1].output_audio_packets,
            "versions": deface_versions(venv), "venv": str(venv),
            "runs": [asdict(r) for r in deface],
        }
        summary["ratio_ours_to_deface"] = (summary["ours"]["fps"] / summary["deface"]["fps"]
                                           if summary["deface"]["fps"] else 0.0)
    summary = _rounded(summary)
    print(format_report(summary))
    print(json.dumps(summary, separators=(",", ":")))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))
    for p in problems:
        print(f"throughput: output check failed: {p}", file=sys.stderr)
    return 1 if problems else 0


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
