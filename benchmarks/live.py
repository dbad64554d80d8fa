"""Live benchmark: a simulated RTSP camera -> the live pipeline -> the RTSP server -> a player,
all on this machine, for ``--seconds``.

The camera (the test suite's simulator: a real face moving across a background, frame number
stamped in the corner) sends at ``--fps``; the player decodes every frame it gets. Reported:
frames/s at the player, sustained (per-second minimum after a warm-up) and mean; the latency the
gateway adds, from the camera handing a frame to its encoder to the player having decoded the
redacted frame (both clocks are this machine's monotonic clock), p50/p95; the share of sampled
output frames whose face is covered; CPU use of this process. Camera and player run in this
process, so their decoding is included in the CPU figure; the camera runs in its own process.

``--max-latency-p50``, ``--min-fps`` turn figures into an exit status (a gate).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import av
import numpy as np

from engines.redact import Method, Style
from engines.registry import resolve_categories
from pipeline.live import LiveOptions, LiveStream, Status, no_signal_frame
from pipeline.rtsp_server import RtspServer
from pipeline.settings import RedactSettings
from tests.conftest import fill_fraction, region
from tests.live_helpers import Camera, read_stamp

MAGENTA = (255, 0, 255)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(seconds: float, width: int, height: int, fps: float, delay: int,
        warmup: float = 3.0, with_direct: bool = True,
        categories: tuple[str, ...] = ("faces",)) -> dict[str, Any]:
    # the camera runs in its own process, as a real one would (its encoder does not compete
    # for this process's interpreter); ``cam`` here only knows where the face is on each frame
    port = _free_port()
    cam_proc = subprocess.Popen([sys.executable, "-m", "tests.live_helpers", str(port),
                                 f"{width}x{height}", str(fps)], stdout=subprocess.PIPE,
                                text=True)
    assert cam_proc.stdout is not None
    cam_url = cam_proc.stdout.readline().strip()
    cam = Camera(fps=fps, width=width, height=height)
    server = RtspServer(port=0)
    mount = server.add_mount("out")
    stream = LiveStream("bench", cam_url,
                        RedactSettings(categories, Style(Method.FILL, fill_bgr=MAGENTA)),
                        LiveOptions(width=width, height=height, fps=fps, delay_frames=delay),
                        sinks=[mount.push])
    mount.on_viewer = stream.request_keyframe
    stream.start()
    arrivals: list[float] = []
    out_at: dict[int, float] = {}  # stamp -> when the player behind the gateway decoded it
    direct_at: dict[int, float] = {}  # stamp -> when a player of the camera itself decoded it
    coverage: list[float] = []
    placeholder = no_signal_frame(width, height).astype(np.int16)
    stop = threading.Event()
    error: list[str] = []

    def play() -> None:
        opts = {"rtsp_transport": "tcp", "timeout": "5000000", "fflags": "nobuffer",
                "flags": "low_delay"}
        try:
            with av.open(mount.url, options=opts, timeout=(5.0, 5.0)) as c:
                for i, fr in enumerate(c.decode(video=0)):
                    now = time.monotonic()
                    px = fr.to_ndarray(format="bgr24")
                    if np.abs(px[::8, ::8].astype(np.int16) - placeholder[::8, ::8]).mean() < 10:
                        continue
                    n = read_stamp(px)
                    arrivals.append(now)
                    out_at.setdefault(n, now)
                    if i % 15 == 0:
                        coverage.append(fill_fraction(region(px, cam.face(n)), MAGENTA, tol=40))
                    if stop.is_set():
                        return
        except (av.FFmpegError, OSError) as exc:
            error.append(str(exc))

    def play_direct() -> None:
        """The camera played directly: what the gateway adds is the difference."""
        opts = {"rtsp_transport": "tcp", "timeout": "5000000", "fflags": "nobuffer",
                "flags": "low_delay"}
        try:
            with av.open(cam_url, options=opts, timeout=(5.0, 5.0)) as c:
                for fr in c.decode(video=0):
                    now = time.monotonic()
                    gray = fr.to_ndarray(format="gray")
                    direct_at.setdefault(read_stamp(np.dstack([gray] * 3)), now)
                    if stop.is_set():
                        return
        except (av.FFmpegError, OSError):
            pass

    end = time.monotonic() + 15
    while stream.stats.status is not Status.LIVE and time.monotonic() < end:
        time.sleep(0.05)
    player = threading.Thread(target=play, daemon=True)
    player.start()
    direct = threading.Thread(target=play_direct, daemon=True)
    if with_direct:
        direct.start()
    time.sleep(warmup)
    cpu0, t0 = _cpu_s(), time.monotonic()
    n0 = len(arrivals)
    time.sleep(seconds)
    cpu1, t1 = _cpu_s(), time.monotonic()
    n1 = len(arrivals)
    stop.set()
    stats = stream.stats.as_dict()
    stream.stop()
    server.close()
    cam_proc.terminate()
    cam_proc.wait(10)
    player.join(5)
    added = sorted(out_at[n] - direct_at[n] for n in out_at
                   if n in direct_at and t0 <= out_at[n] < t1)
    window = [a for a in arrivals if t0 <= a < t1]
    # frames of the camera that never reached the player (by their stamps): a bin of the
    # per-second count can read 28 or 32 from delivery jitter alone; a missing stamp is a loss
    stamps = sorted(n for n, a in out_at.items() if t0 <= a < t1)
    missing = (stamps[-1] - stamps[0] + 1 - len(stamps)) if stamps else None
    gaps = sorted(b - a for a, b in itertools.pairwise(window))
    per_second = [sum(1 for a in window if t0 + k <= a < t0 + k + 1)
                  for k in range(int(seconds))]
    return {
        "benchmark": "live", "size": f"{width}x{height}", "camera_fps": fps,
        "categories": list(categories),
        "seconds": seconds, "delay_frames": delay,
        "player_fps_mean": round((n1 - n0) / (t1 - t0), 2),
        "player_fps_min_1s": min(per_second) if per_second else 0,
        "player_fps_max_1s": max(per_second) if per_second else 0,
        "camera_frames_missing": missing,
        "player_gap_ms_p99": round(1000 * gaps[int(0.99 * (len(gaps) - 1))], 1) if gaps else None,
        "player_gap_ms_max": round(1000 * gaps[-1], 1) if gaps else None,
        "gateway_added_ms_p50": round(1000 * added[len(added) // 2], 1) if added else None,
        "gateway_added_ms_p95": round(1000 * added[min(len(added) - 1,
                                                       int(0.95 * len(added)))], 1)
        if added else None,
        "faces_covered_min": round(min(coverage), 3) if coverage else None,
        "sampled_frames": len(coverage),
        "cpu_cores_used": round((cpu1 - cpu0) / (t1 - t0), 2),
        "gateway": stats, "player_error": error[0] if error else "",
    }


def _resources() -> dict[str, float]:
    import psutil

    proc = psutil.Process()
    return {"threads": proc.num_threads(), "fds": proc.num_fds(),
            "rss_mib": round(proc.memory_info().rss / 2**20, 1)}


def run_restarts(cycles: int, down_s: float, width: int, height: int,
                 fps: float) -> dict[str, Any]:
    """Kill the camera and bring it back ``cycles`` times while a player stays connected to
    the gateway's output: recovery time per cycle (from the camera serving again to the player
    showing a camera frame; it includes the wait for the camera's next keyframe, up to its
    one-second GOP), and this process's threads, file descriptors and memory after each
    cycle."""
    port = _free_port()
    url = f"rtsp://127.0.0.1:{port}/cam"

    def camera() -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "tests.live_helpers", str(port),
                                 f"{width}x{height}", str(fps)], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout is not None
        proc.stdout.readline()
        return proc

    cam = camera()
    server = RtspServer(port=0)
    mount = server.add_mount("out")
    stream = LiveStream("restarts", url,
                        RedactSettings(("faces",), Style(Method.FILL, fill_bgr=MAGENTA)),
                        LiveOptions(width=width, height=height, fps=fps), sinks=[mount.push])
    mount.on_viewer = stream.request_keyframe
    stream.start()
    placeholder = no_signal_frame(width, height).astype(np.int16)
    real_at: list[float] = []  # when the player decoded each camera (not placeholder) frame
    frames = [0]
    error: list[str] = []
    stop = threading.Event()

    def play() -> None:
        opts = {"rtsp_transport": "tcp", "timeout": "10000000", "fflags": "nobuffer",
                "flags": "low_delay"}
        try:
            with av.open(mount.url, options=opts, timeout=(10.0, 10.0)) as c:
                for fr in c.decode(video=0):
                    frames[0] += 1
                    px = fr.to_ndarray(format="bgr24")
                    if np.abs(px[::8, ::8].astype(np.int16) - placeholder[::8, ::8]).mean() > 10:
                        real_at.append(time.monotonic())
                    if stop.is_set():
                        return
        except (av.FFmpegError, OSError) as exc:
            error.append(str(exc))

    end = time.monotonic() + 15
    while stream.stats.status is not Status.LIVE and time.monotonic() < end:
        time.sleep(0.05)
    player = threading.Thread(target=play, daemon=True)
    player.start()
    time.sleep(3.0)
    recoveries: list[float] = []
    gateway_part: list[float] = []  # from the camera's first frame in to the player showing it
    samples: list[dict[str, float]] = [_resources()]
    for _ in range(cycles):
        cam.terminate()
        cam.wait(10)
        time.sleep(down_s)
        cam = camera()  # returns once the camera serves again
        back = time.monotonic()
        deadline = back + 15
        first_in: float | None = None
        while time.monotonic() < deadline and not any(t > back for t in real_at[-5:]):
            if first_in is None and stream.stats.status is Status.LIVE:
                first_in = time.monotonic()  # the gateway decoded the camera's first frame
            time.sleep(0.005)
        after = [t for t in real_at[-50:] if t > back]
        recoveries.append(round(after[0] - back, 3) if after else float("inf"))
        if after and first_in is not None:
            gateway_part.append(round(after[0] - first_in, 3))
        time.sleep(1.5)
        samples.append(_resources())
    stop.set()
    alive = player.is_alive() and not error
    stats = stream.stats.as_dict()
    stream.stop()
    server.close()
    cam.terminate()
    cam.wait(10)
    player.join(5)
    rec = sorted(recoveries)
    return {"benchmark": "live-restarts", "cycles": cycles, "down_s": down_s,
            "recovery_s_median": rec[len(rec) // 2] if rec else None,
            "recovery_s_max": rec[-1] if rec else None, "recoveries_s": recoveries,
            "after_first_frame_in_s_max": max(gateway_part) if gateway_part else None,
            "player_stayed_connected": alive, "player_frames": frames[0],
            "resources_first": samples[1] if len(samples) > 1 else samples[0],
            "resources_last": samples[-1], "resources_before": samples[0],
            "rss_mib_by_cycle": [x["rss_mib"] for x in samples],
            "reconnects": stats["reconnects"], "placeholders": stats["placeholders"],
            "player_error": error[0] if error else ""}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.live", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--delay", type=int, default=LiveOptions.delay_frames,
                    help="look-ahead frames (default: %(default)s)")
    ap.add_argument("--categories", default="faces",
                    help="comma-separated categories redacted (default: faces)")
    ap.add_argument("--restarts", type=int, default=0, metavar="N",
                    help="instead: kill and restart the camera N times (recovery, resources)")
    ap.add_argument("--down-s", type=float, default=2.0, help="camera down time per restart")
    ap.add_argument("--min-fps", type=float, default=None, help="fail below this mean")
    ap.add_argument("--max-latency-p50", type=float, default=None)
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    if args.restarts:
        rr = run_restarts(args.restarts, args.down_s, w, h, args.fps)
        print(f"{rr['cycles']} camera restarts ({rr['down_s']} s down): recovery median "
              f"{rr['recovery_s_median']} s, max {rr['recovery_s_max']} s (from the camera's first "
              f"frame in: max {rr['after_first_frame_in_s_max']} s); player stayed "
              f"connected: {rr['player_stayed_connected']}; threads/fds/RSS after the first "
              f"cycle {rr['resources_first']}, after the last {rr['resources_last']}")
        print(json.dumps(rr))
        return 0 if rr["player_stayed_connected"] else 1
    cats = tuple(resolve_categories([c.strip() for c in args.categories.split(",") if c.strip()]))
    r = run(args.seconds, w, h, args.fps, args.delay, categories=cats)
    print(f"{r['size']} at {r['camera_fps']} frames/s for {r['seconds']:.0f} s: player "
          f"{r['player_fps_mean']} frames/s (seconds between {r['player_fps_min_1s']} and "
          f"{r['player_fps_max_1s']}, {r['camera_frames_missing']} camera frames missing); "
          "latency added "
          f"by the gateway (vs playing the camera directly) p50 {r['gateway_added_ms_p50']} ms, "
          f"p95 {r['gateway_added_ms_p95']} ms; faces covered min "
          f"{r['faces_covered_min']} over {r['sampled_frames']} sampled frames, "
          f"{r['cpu_cores_used']} cores")
    print(json.dumps(r))
    failed = []
    if args.min_fps is not None and r["player_fps_mean"] < args.min_fps:
        failed.append(f"player fps {r['player_fps_mean']} < {args.min_fps}")
    added = r["gateway_added_ms_p50"]
    if args.max_latency_p50 is not None and (added is None or added > args.max_latency_p50):
        failed.append(f"gateway-added latency p50 {added} > {args.max_latency_p50}")
    for f in failed:
        print(f"live: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
