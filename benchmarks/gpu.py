"""Every GPU-side check and timing in one run, for a machine with an NVIDIA GPU:
``python -m benchmarks.gpu``.

Prints a short table, then the figures as JSON (``--json PATH`` writes them too). Steps, each
bounded so the whole run stays within ``--budget-s`` (default 300 s; a step that would start
past it is skipped and says so):

1. kernels: the CUDA redaction kernels against the CPU kernels on a random 1080p frame with 20
   boxes, every method and shape (max abs difference, grey levels), and the time per frame of
   each (blur, ellipse; NV12 and BGR layouts) with the ratio to the CPU kernel here and to
   ``CPU_KERNEL_REFERENCE_MS``, the CPU kernel's time on the project's 2-core CI machine.
2. decode: NVDEC (PyAV's CUDA hwaccel) against the CPU decoder on a generated 1080p H.264 clip:
   frames, frames/s of each, mean abs difference of the pictures.
3. preprocess: the one-kernel NV12 -> letterboxed planar float pre-processing against OpenCV's
   (colour conversion, resize, pad): max/mean difference and time.
4. backend: the GPU detector backend (TensorRT or torch/CUDA) against onnxruntime on YuNet at
   batch 1, 8 and 32: max abs output difference and latency.
5. streams: aggregate end-to-end frames/s of 1, 4, 8, 16, 32 concurrent synthetic 1080p30
   streams (each a file job: decode, detection on schedule through the shared detection
   service, tracking, CUDA redaction, encode), with per-stage milliseconds per frame.

Without a GPU it prints why it skipped and exits 0. ``--simulator`` runs the same steps at toy
sizes on Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``): a check of this script, not a
measurement. On a GPU machine that has torch and numba-cuda but not PyAV, OpenCV or
onnxruntime, install those into a virtual environment that also sees the machine's own packages
(``python -m venv --system-site-packages``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The CPU kernel (blur, ellipse, 20 boxes of 40-160 px grown 1.3x) on a 1080p frame, median of
# 15 runs on the project's 2-core x86-64 CI machine: the figure GPU kernels are compared with.
CPU_KERNEL_REFERENCE_MS = 6.9


@dataclass(frozen=True)
class Sizes:
    width: int
    height: int
    boxes: int
    box_px: tuple[int, int]
    clip_frames: int
    streams: tuple[int, ...]
    repeats: int


FULL = Sizes(1920, 1080, 20, (40, 160), 90, (1, 4, 8, 16, 32), 30)
TOY = Sizes(64, 48, 3, (6, 14), 4, (1, 2), 2)


def sync() -> None:
    from numba import cuda

    cuda.synchronize()


def median_ms(fn: Callable[[], Any], repeats: int, gpu: bool = False) -> float:
    fn()  # warm-up (compilation, caches)
    if gpu:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if gpu:
            sync()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def random_boxes(rng: np.random.Generator, sz: Sizes) -> np.ndarray:
    """Non-overlapping boxes (their 1.3x grown rectangles do not touch)."""
    out: list[list[float]] = []
    taken = np.zeros((sz.height, sz.width), bool)
    while len(out) < sz.boxes:
        w = int(rng.integers(*sz.box_px))
        h = min(sz.height - 2, int(w * rng.uniform(1.0, 1.3)))
        x, y = int(rng.integers(0, sz.width - w)), int(rng.integers(0, sz.height - h))
        gx1, gy1 = max(0, x - w // 4 - 2), max(0, y - h // 4 - 2)
        gx2, gy2 = x + w + w // 4 + 2, y + h + h // 4 + 2
        if taken[gy1:gy2, gx1:gx2].any():
            continue
        taken[gy1:gy2, gx1:gx2] = True
        out.append([x, y, x + w, y + h])
    return np.array(out, np.float32)


# --- steps ------------------------------------------------------------------------------------

def step_kernels(sz: Sizes) -> dict[str, Any]:
    from engines.cuda_kernels import CudaKernels, DeviceImage
    from engines.detections import Detections
    from engines.redact import Method, Shape, Style, redact_boxes

    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (sz.height, sz.width, 3), np.uint8)
    xyxy = random_boxes(rng, sz)
    dets = Detections.from_boxes(xyxy, np.full(len(xyxy), 0.9, np.float32), "faces")
    kernels = CudaKernels()
    parity: dict[str, int] = {}
    for method in Method:
        for shape in Shape:
            style = Style(method, shape)
            want = img.copy()
            redact_boxes(want, xyxy, style)
            dev = DeviceImage.from_bgr(img, layout="bgr")
            kernels.redact_detections(dev, dets, style)
            got = dev.to_bgr()
            parity[f"{method.value}/{shape.value}"] = int(
                np.abs(got.astype(np.int16) - want.astype(np.int16)).max())
    style = Style(Method.BLUR, Shape.ELLIPSE)
    cpu_ms = median_ms(lambda: redact_boxes(img.copy(), xyxy, style), max(5, sz.repeats // 2))
    copy_ms = median_ms(img.copy, max(5, sz.repeats // 2))
    cpu_ms = max(1e-6, cpu_ms - copy_ms)
    times = {}
    for layout in ("nv12", "bgr"):
        dev = DeviceImage.from_bgr(img, layout=layout)

        def redact(d: Any = dev) -> Any:
            return kernels.redact_detections(d, dets, style)

        times[layout] = median_ms(redact, sz.repeats, gpu=True)
    return {"frame": f"{sz.width}x{sz.height}", "boxes": len(xyxy),
            "max_abs_diff": parity, "parity_ok": max(parity.values()) <= 1,
            "cpu_blur_ms_here": round(cpu_ms, 3),
            "gpu_blur_ms_nv12": round(times["nv12"], 4),
            "gpu_blur_ms_bgr": round(times["bgr"], 4),
            "speedup_vs_cpu_here": round(cpu_ms / times["nv12"], 1),
            "speedup_vs_ci_reference": round(CPU_KERNEL_REFERENCE_MS / times["nv12"], 1)}


def make_clip(path: Path, sz: Sizes, fps: int = 30, faces: bool = False) -> Path:
    """A 1080p-style H.264 clip: moving gradients and shapes (and, with ``faces``, nothing a
    detector is sure of: the streams step adds its own boxes)."""
    import av

    h, w = sz.height, sz.width
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.options = {"preset": "ultrafast", "crf": "18"}
        for i in range(sz.clip_frames):
            img = np.empty((h, w, 3), np.uint8)
            img[..., 0] = (xx + 4 * i) % 256
            img[..., 1] = (yy + 2 * i) % 256
            img[..., 2] = ((xx // 7 + yy // 5 + i) % 2) * 200
            out.mux(s.encode(av.VideoFrame.from_ndarray(img, format="bgr24")))
        out.mux(s.encode(None))
    return path


def step_decode(sz: Sizes, tmp: Path) -> dict[str, Any]:
    from pipeline.hw import open_input

    clip = make_clip(tmp / "decode.mp4", sz)
    out: dict[str, Any] = {}
    pictures: dict[str, list[np.ndarray]] = {}
    for device in ("cuda", "cpu"):
        t0 = time.perf_counter()
        container, label = open_input(clip, device)
        frames: list[np.ndarray | None] = []
        with container:
            for vf in container.decode(video=0):
                frames.append(vf.to_ndarray(format="bgr24") if len(frames) < 3 else None)
        wall = time.perf_counter() - t0
        pictures[device] = [f for f in frames if f is not None]
        out[device] = {"decoder": label, "frames": len(frames),
                       "fps": round(len(frames) / wall, 1)}
    diffs = [float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
             for a, b in zip(pictures["cuda"], pictures["cpu"], strict=False)]
    out["mean_abs_diff"] = round(max(diffs), 3) if diffs else None
    out["same_frames"] = out["cuda"]["frames"] == out["cpu"]["frames"]
    return out


def step_preprocess(sz: Sizes) -> dict[str, Any]:
    import cv2

    from engines.cuda_kernels import DeviceImage, letterbox_planar

    rng = np.random.default_rng(3)
    base = cv2.GaussianBlur(rng.integers(0, 256, (sz.height, sz.width, 3), np.uint8), (9, 9), 3)
    dev = DeviceImage.from_bgr(base, layout="nv12")
    host = dev.to_bgr()  # the picture as the GPU holds it (after the NV12 round trip)
    scale = min(1.0, (1280 * 720 / (sz.width * sz.height)) ** 0.5)
    nw, nh = max(1, round(sz.width * scale)), max(1, round(sz.height * scale))
    pw, ph = -(-nw // 32) * 32, -(-nh // 32) * 32

    def cpu() -> np.ndarray:
        bgr = cv2.cvtColor(dev.to_nv12_host(), cv2.COLOR_YUV2BGR_NV12)
        r = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_LINEAR)
        r = cv2.copyMakeBorder(r, 0, ph - nh, 0, pw - nw, cv2.BORDER_CONSTANT, value=0)
        return r.transpose(2, 0, 1)[None].astype(np.float32)

    def gpu() -> Any:
        return letterbox_planar(dev, pw, ph, nw / sz.width, nh / sz.height)

    want = cpu()
    got = np.asarray(gpu().copy_to_host())
    diff = np.abs(got - want)
    del host
    return {"input": f"{sz.width}x{sz.height}", "output": f"{pw}x{ph}",
            "max_abs_diff": round(float(diff.max()), 2),
            "mean_abs_diff": round(float(diff.mean()), 3),
            "cpu_ms_here": round(median_ms(cpu, max(3, sz.repeats // 3)), 3),
            "gpu_ms": round(median_ms(gpu, sz.repeats, gpu=True), 4)}


def step_backend(sz: Sizes) -> dict[str, Any]:
    from engines.backends import OnnxRuntimeCpu, backend_for
    from engines.faces import YuNet
    from engines.models import dynamic_onnx_bytes

    data = dynamic_onnx_bytes(YuNet.spec.resolve(None), {"input": ["B", 3, "H", "W"]})
    gpu_be = backend_for("cuda")
    if gpu_be.device != "cuda":
        return {"skipped": "no GPU detector backend here (torch with CUDA, or TensorRT)"}
    ref = OnnxRuntimeCpu().load(data, 0)
    sess = gpu_be.load(data, 0)
    h, w = (352, 640) if sz is FULL else (32, 32)
    rng = np.random.default_rng(1)
    out: dict[str, Any] = {"backend": gpu_be.name, "input": f"{w}x{h}"}
    for batch in ((1, 8, 32) if sz is FULL else (1, 2)):
        x = rng.uniform(0, 255, (batch, 3, h, w)).astype(np.float32)
        want = ref.run(None, {"input": x})
        got = sess.run(None, {"input": x})
        diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                   for a, b in zip(got, want, strict=True))
        def run(x: np.ndarray = x) -> Any:
            return sess.run(None, {"input": x})

        ms = median_ms(run, max(3, sz.repeats // 3))
        out[f"batch_{batch}"] = {"max_abs_diff": round(diff, 5), "ms": round(ms, 3),
                                 "ms_per_frame": round(ms / batch, 3)}
    return out


class _WithBoxes:
    """The real detector, plus ``n`` boxes moving across the frame (so the redaction kernels
    have a realistic load on synthetic pictures with no faces)."""

    def __init__(self, inner: Any, n: int, sz: Sizes) -> None:
        self.inner = inner
        self.categories = inner.categories
        self.device = getattr(inner, "device", "cuda")
        self.n, self.sz, self.calls = n, sz, 0

    @property
    def models(self) -> Any:
        return self.inner.models

    def detect(self, image: Any) -> Any:
        from engines.detections import Detections

        self.calls += 1
        found = self.inner.detect(image)
        k = np.arange(self.n)
        side = max(8, self.sz.width // 24)
        x = (k * self.sz.width / self.n + self.calls * 3) % (self.sz.width - side)
        y = (k * 37) % max(1, self.sz.height - side)
        boxes = np.stack([x, y, x + side, y + side], 1).astype(np.float32)
        extra = Detections.from_boxes(boxes, np.full(self.n, 0.9, np.float32), "faces")
        return Detections.concat([found, extra])


def step_streams(sz: Sizes, tmp: Path, deadline: float) -> dict[str, Any]:
    from engines.redact import Method, Style
    from pipeline.settings import RedactSettings
    from pipeline.video import VideoOptions, redact_video

    clip = make_clip(tmp / "stream.mp4", sz)
    settings = RedactSettings(("faces",), Style(Method.BLUR), device="cuda")
    options = VideoOptions(preset="superfast")
    out: dict[str, Any] = {}
    for n in sz.streams:
        if time.monotonic() > deadline:
            out[str(n)] = {"skipped": "time budget spent"}
            continue
        reports: list[Any] = []
        errors: list[str] = []

        def one(name: str, reports: list[Any], errors: list[str]) -> None:
            try:
                det = _WithBoxes(settings.detector("video"), sz.boxes, sz)
                reports.append(redact_video(clip, tmp / name, det, settings.style, options,
                                            record_frames=False, device="cuda"))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(f"out_{n}_{i}.mp4", reports, errors))
                   for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        frames = sum(r.frames for r in reports)
        stage = {k: round(sum(r.stage_ms.get(k, 0.0) for r in reports) / max(frames, 1), 3)
                 for k in ("decode", "detect", "track", "redact", "encode")}
        out[str(n)] = {"frames": frames, "aggregate_fps": round(frames / wall, 1),
                       "ms_per_frame_by_stage": stage, "errors": errors[:3],
                       "runtime": reports[0].runtime if reports else None}
    return out


# --- the run -----------------------------------------------------------------------------------

def skip_reason(simulator: bool) -> str:
    from engines.gpu import cuda_probe

    probe = cuda_probe()
    if not probe.available:
        return probe.reason
    if probe.simulator and not simulator:
        return "only Numba's CUDA simulator is here (run with --simulator to check this script)"
    if simulator and not probe.simulator:
        return "--simulator was given but a real GPU is in use (unset it)"
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="stop starting new steps after this many seconds (default 300)")
    ap.add_argument("--steps", default="kernels,decode,preprocess,backend,streams",
                    help="comma-separated steps to run (default: all)")
    ap.add_argument("--streams", default=None,
                    help="concurrent stream counts for the streams step (default 1,4,8,16,32)")
    ap.add_argument("--simulator", action="store_true",
                    help="toy sizes on Numba's CUDA simulator: checks the script, measures "
                         "nothing")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    reason = skip_reason(args.simulator)
    if reason:
        print(f"benchmarks.gpu: skipped: {reason}")
        print(json.dumps({"skipped": reason}))
        return 0
    from engines.gpu import describe, select_device

    select_device("cuda")
    sz = TOY if args.simulator else FULL
    if args.streams:
        sz = Sizes(**{**sz.__dict__, "streams": tuple(int(v) for v in args.streams.split(","))})
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    results: dict[str, Any] = {"device": describe("cuda")}
    with tempfile.TemporaryDirectory(prefix="redact-gpu-") as d:
        tmp = Path(d)
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "kernels": lambda: step_kernels(sz),
            "decode": lambda: step_decode(sz, tmp),
            "preprocess": lambda: step_preprocess(sz),
            "backend": lambda: step_backend(sz),
            "streams": lambda: step_streams(sz, tmp, deadline),
        }
        for name in args.steps.split(","):
            if name not in steps:
                print(f"unknown step {name!r}; steps: {', '.join(steps)}", file=sys.stderr)
                return 2
            if time.monotonic() > deadline:
                results[name] = {"skipped": "time budget spent"}
                continue
            t0 = time.monotonic()
            try:
                results[name] = steps[name]()
            except Exception as exc:  # one failing step must not hide the others' figures
                results[name] = {"error": f"{type(exc).__name__}: {exc}",
                                 "trace": traceback.format_exc(limit=3)}
            results[name]["seconds"] = round(time.monotonic() - t0, 1)
    print_table(results)
    text = json.dumps(results, indent=1, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)
    failed = any("error" in v for v in results.values() if isinstance(v, dict))
    kernels_ok = results.get("kernels", {}).get("parity_ok", True)
    return 1 if failed or not kernels_ok else 0


def print_table(results: dict[str, Any]) -> None:
    dev = results.get("device", {})
    print(f"device: {dev.get('gpu')} | detector backend: {dev.get('detector_backend')} | "
          f"kernels: {dev.get('kernels')}")
    k = results.get("kernels", {})
    if "max_abs_diff" in k:
        print(f"kernels  parity max diff {max(k['max_abs_diff'].values())} levels | blur "
              f"{k['frame']} {k['boxes']} boxes: GPU {k['gpu_blur_ms_nv12']} ms (NV12), "
              f"CPU {k['cpu_blur_ms_here']} ms here -> {k['speedup_vs_cpu_here']}x, "
              f"vs CI CPU {CPU_KERNEL_REFERENCE_MS} ms -> {k['speedup_vs_ci_reference']}x")
    dcd = results.get("decode", {})
    if "cuda" in dcd:
        print(f"decode   {dcd['cuda']['decoder']}: {dcd['cuda']['frames']} frames "
              f"{dcd['cuda']['fps']} fps | cpu {dcd['cpu']['fps']} fps | mean diff "
              f"{dcd['mean_abs_diff']}")
    p = results.get("preprocess", {})
    if "gpu_ms" in p:
        print(f"prepro   {p['input']} -> {p['output']}: max diff {p['max_abs_diff']}, mean "
              f"{p['mean_abs_diff']} | GPU {p['gpu_ms']} ms, OpenCV {p['cpu_ms_here']} ms")
    b = results.get("backend", {})
    for key, v in b.items():
        if key.startswith("batch_"):
            print(f"backend  {b['backend']} {key}: max diff {v['max_abs_diff']}, {v['ms']} ms "
                  f"({v['ms_per_frame']} ms/frame)")
    for n, v in results.get("streams", {}).items():
        if isinstance(v, dict) and "aggregate_fps" in v:
            print(f"streams  {n:>2}: {v['aggregate_fps']} frames/s aggregate, ms/frame by "
                  f"stage {v['ms_per_frame_by_stage']}")
    for name, v in results.items():
        if isinstance(v, dict) and ("error" in v or "skipped" in v):
            print(f"{name}: {v.get('error') or 'skipped: ' + str(v.get('skipped'))}")


if __name__ == "__main__":
    sys.exit(main())
