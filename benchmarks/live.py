"""Live benchmark: a simulated RTSP camera -> the live pipeline -> the RTSP server -> a player,
all on this machine, for ``--seconds``.

The camera (the test suite's simulator: a real face moving across a background, frame number
stamped in the corner) sends at ``--fps``; the player decodes every frame it gets. Reported:
frames/s at the player, sustained (per-second minimum after a warm-up) and mean; the latency the
gateway adds, from the camera handing a frame to its encoder to the player having decoded the
redacted frame (both clocks are this machine's monotonic clock), p50/p95; the share of sampled
output frames whose face is covered; CPU use of this process. Camera and player run in this
process too, so their cost is included in the CPU figure and competes for the same cores.

``--max-latency-p50``, ``--min-fps`` turn figures into an exit status (a gate).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from typing import Any

import av
import numpy as np

from engines.redact import Method, Style
from engines.registry import VIDEO_PROFILE, build_detector
from pipeline.live import LiveOptions, LiveStream, Status, no_signal_frame
from pipeline.rtsp_server import RtspServer
from tests.conftest import fill_fraction, region
from tests.live_helpers import Camera, read_stamp

MAGENTA = (255, 0, 255)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(seconds: float, width: int, height: int, fps: float, delay: int,
        warmup: float = 3.0) -> dict[str, Any]:
    cam = Camera(fps=fps, width=width, height=height).start()
    server = RtspServer(port=0)
    mount = server.add_mount("out")
    stream = LiveStream("bench", cam.url, lambda: build_detector(("faces",), VIDEO_PROFILE),
                        Style(Method.FILL, fill_bgr=MAGENTA),
                        LiveOptions(width=width, height=height, fps=fps, delay_frames=delay),
                        sinks=[mount.push])
    mount.on_viewer = stream.request_keyframe
    stream.start()
    arrivals: list[float] = []
    latencies: list[float] = []
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
                    if n in cam.sent_at:
                        latencies.append((now - cam.sent_at[n]) * 1000)
                    if i % 15 == 0:
                        coverage.append(fill_fraction(region(px, cam.face(n)), MAGENTA, tol=40))
                    if stop.is_set():
                        return
        except (av.FFmpegError, OSError) as exc:
            error.append(str(exc))

    end = time.monotonic() + 15
    while stream.stats.status is not Status.LIVE and time.monotonic() < end:
        time.sleep(0.05)
    player = threading.Thread(target=play, daemon=True)
    player.start()
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
    cam.stop()
    player.join(5)
    window = [a for a in arrivals if t0 <= a < t1]
    per_second = [sum(1 for a in window if t0 + k <= a < t0 + k + 1)
                  for k in range(int(seconds))]
    lat = sorted(latencies[n0:n1]) or [float("nan")]
    return {
        "benchmark": "live", "size": f"{width}x{height}", "camera_fps": fps,
        "seconds": seconds, "delay_frames": delay,
        "player_fps_mean": round((n1 - n0) / (t1 - t0), 2),
        "player_fps_min_1s": min(per_second) if per_second else 0,
        "latency_ms_p50": round(lat[len(lat) // 2], 1),
        "latency_ms_p95": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 1),
        "faces_covered_min": round(min(coverage), 3) if coverage else None,
        "sampled_frames": len(coverage),
        "cpu_cores_used": round((cpu1 - cpu0) / (t1 - t0), 2),
        "gateway": stats, "player_error": error[0] if error else "",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.live", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--delay", type=int, default=LiveOptions.delay_frames,
                    help="look-ahead frames (default: %(default)s)")
    ap.add_argument("--min-fps", type=float, default=None, help="fail below this mean")
    ap.add_argument("--max-latency-p50", type=float, default=None)
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    r = run(args.seconds, w, h, args.fps, args.delay)
    print(f"{r['size']} at {r['camera_fps']} frames/s for {r['seconds']:.0f} s: player "
          f"{r['player_fps_mean']} frames/s (worst second {r['player_fps_min_1s']}), latency "
          f"p50 {r['latency_ms_p50']} ms, p95 {r['latency_ms_p95']} ms, faces covered min "
          f"{r['faces_covered_min']} over {r['sampled_frames']} sampled frames, "
          f"{r['cpu_cores_used']} cores")
    print(json.dumps(r))
    failed = []
    if args.min_fps is not None and r["player_fps_mean"] < args.min_fps:
        failed.append(f"player fps {r['player_fps_mean']} < {args.min_fps}")
    if args.max_latency_p50 is not None and r["latency_ms_p50"] > args.max_latency_p50:
        failed.append(f"latency p50 {r['latency_ms_p50']} > {args.max_latency_p50}")
    for f in failed:
        print(f"live: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
