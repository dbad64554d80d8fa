"""Choosing where work runs: ``--device cpu|cuda|auto``, what the manifest says ran, the
hardware decode and encode fallbacks, and the GPU detector backends' pure parts.

On a machine without a GPU ``auto`` is the CPU path, ``cuda`` is refused with the reason, NVDEC
and NVENC fall back to the CPU. Numba's CUDA simulator (set by conftest) stands in for a GPU
where a test asks for ``cuda`` explicitly; ``auto`` never picks it.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines import gpu
from engines.backends import BackendError, backend_for, resolve_device
from engines.detections import Detections
from engines.faces import ModelInfo
from gateway.cli import main
from pipeline import hw
from pipeline.settings import RedactSettings, settings_from_choices
from tests.conftest import moving_face_clip, read_video, write_video

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process as on a machine without a GPU or the simulator."""
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "0")
    gpu.cuda_probe.cache_clear()
    yield
    monkeypatch.undo()
    gpu.cuda_probe.cache_clear()


def test_auto_runs_the_cpu_path_here() -> None:
    assert gpu.select_device("auto") == "cpu"  # the simulator never counts for auto
    assert gpu.select_device(None) == "cpu"
    assert gpu.select_device("CPU ") == "cpu"
    assert resolve_device("auto") == "cpu"
    assert backend_for("auto").name == "onnxruntime"
    assert RedactSettings().run_device() == "cpu"
    assert gpu.auto_reason()  # says why


def test_an_unknown_device_is_refused_with_the_choices() -> None:
    with pytest.raises(gpu.DeviceError, match="auto, cpu, cuda"):
        gpu.parse_device("tpu")
    with pytest.raises(ValueError, match="unknown device"):
        settings_from_choices(["faces"], device="gpu0")


def test_cuda_without_a_gpu_is_refused_with_the_reason(no_gpu: None) -> None:
    probe = gpu.cuda_probe()
    assert not probe.available and "no NVIDIA driver" in probe.reason
    with pytest.raises(gpu.DeviceError, match="cuda is not available here: no NVIDIA driver"):
        gpu.select_device("cuda")
    with pytest.raises(BackendError, match="not available"):
        resolve_device("cuda")
    assert gpu.select_device("auto") == "cpu"


def test_the_cli_refuses_cuda_without_a_gpu_and_exits_2(tmp_path: Path) -> None:
    src = write_video(tmp_path / "in.mp4", moving_face_clip(n=3).frames)
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "file", str(src), "-o",
                        str(tmp_path / "out.mp4"), "--device", "cuda"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "device cuda is not available here" in r.stderr
    assert not (tmp_path / "out.mp4").exists()


def test_the_manifest_says_what_ran_on_auto(tmp_path: Path) -> None:
    clip = moving_face_clip(n=6)
    src = write_video(tmp_path / "in.mp4", clip.frames)
    out, man = tmp_path / "out.mp4", tmp_path / "m.json"
    assert main(["file", str(src), "-o", str(out), "--json", str(man), "-q",
                 "--device", "auto"]) == 0
    doc = json.loads(man.read_text())
    assert doc["settings"]["device"] == "auto"
    runtime = doc["files"][0]["runtime"]
    assert runtime == {"device": "cpu", "detector_backend": "onnxruntime (cpu)",
                       "kernels": "cpu (OpenCV)", "decode": "cpu", "encoder": "libx264"}
    assert len(read_video(out).frames) == 6


def test_nvdec_falls_back_to_the_cpu_decoder_and_says_why(tmp_path: Path) -> None:
    frames = moving_face_clip(n=4).frames
    src = write_video(tmp_path / "in.mp4", frames)
    container, decode = hw.open_input(src, "cuda")
    with container:
        got = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    assert decode.startswith("cpu (NVDEC unavailable:")
    assert len(got) == 4
    container, decode = hw.open_input(src, "cpu")
    container.close()
    assert decode == "cpu"


def test_nvenc_is_probed_and_libx264_used_without_it() -> None:
    assert hw.nvenc_available() is False  # no NVIDIA driver on this machine
    assert hw.video_codec("cuda") == "libx264"
    assert hw.video_codec("cpu") == "libx264"
    assert hw.video_codec("cuda", "libvpx-vp9") == "libvpx-vp9"


# --- the GPU backends' pure parts ---------------------------------------------------------

def _same_upper_model() -> bytes:
    """Conv 3x3 stride 2 then MaxPool 2x2 stride 2, both auto_pad=SAME_UPPER, dynamic H, W."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], auto_pad="SAME_UPPER",
                              strides=[2, 2], kernel_shape=[3, 3]),
             helper.make_node("MaxPool", ["c"], ["y"], auto_pad="SAME_UPPER",
                              strides=[1, 1], kernel_shape=[2, 2])]
    graph = helper.make_graph(
        nodes, "same", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                      ["B", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    buf = io.BytesIO()
    onnx.save(model, buf)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(32, 32), (64, 96)])
def test_same_upper_pads_rewritten_explicitly_give_the_same_outputs(
        size: tuple[int, int]) -> None:
    from engines.torch_backend import explicit_same_pads

    data = _same_upper_model()
    x = np.random.default_rng(5).normal(size=(2, 3, *size)).astype(np.float32)
    want = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    rewritten = explicit_same_pads(onnx.load_from_string(data))
    attrs = [{a.name for a in n.attribute} for n in rewritten.graph.node]
    assert all("auto_pad" not in a and "pads" in a for a in attrs)
    got = ort.InferenceSession(rewritten.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_tensorrt_engines_are_keyed_by_everything_they_are_tied_to() -> None:
    from engines.tensorrt_backend import engine_key, profile_for
    from engines.torch_backend import TensorInfo

    lo, opt, hi = profile_for(TensorInfo("input", ["B", 3, "H", "W"]))
    assert lo == (1, 3, 32, 32) and opt[0] == 8 and hi == (32, 3, 1920, 1920)
    assert profile_for(TensorInfo("x", [1, 3, 640, 640]))[2] == (1, 3, 640, 640)
    base = engine_key(b"model", "11.4", "H100", (9, 0), {"input": (lo, opt, hi)}, False)
    assert base == engine_key(b"model", "11.4", "H100", (9, 0), {"input": (lo, opt, hi)}, False)
    others = [engine_key(b"model2", "11.4", "H100", (9, 0), {"input": (lo, opt, hi)}, False),
              engine_key(b"model", "11.5", "H100", (9, 0), {"input": (lo, opt, hi)}, False),
              engine_key(b"model", "11.4", "H200", (9, 0), {"input": (lo, opt, hi)}, False),
              engine_key(b"model", "11.4", "H100", (8, 9), {"input": (lo, opt, hi)}, False),
              engine_key(b"model", "11.4", "H100", (9, 0), {"input": (lo, lo, hi)}, False),
              engine_key(b"model", "11.4", "H100", (9, 0), {"input": (lo, opt, hi)}, True)]
    assert len({base, *others}) == 7


def test_gpu_backends_say_why_they_cannot_run_here() -> None:
    from engines import tensorrt_backend, torch_backend

    for mod in (torch_backend, tensorrt_backend):
        ok, why = mod.available()
        assert not ok and why


# --- the cuda path end to end, on Numba's CUDA simulator -------------------------------------

class WhiteSquare:
    """Finds the white square of a frame (host pixels, as the detectors are given)."""

    categories: tuple[str, ...] = ("faces",)
    def __init__(self) -> None:
        self.kinds: set[str] = set()
        self.models: list[ModelInfo] = []

    def detect(self, image: np.ndarray) -> Detections:
        self.kinds.add(type(image).__name__)
        ys, xs = np.nonzero((image > 235).all(-1))
        if not len(ys):
            return Detections.empty()
        return Detections.from_boxes([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]],
                                     [0.9], "faces")


def square_clip(n: int = 4, w: int = 64, h: int = 48) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for i in range(n):
        # smooth colours (4:2:0 chroma of per-pixel noise would differ between converters)
        f = np.stack([40 + xx * 2, 60 + yy * 2, 120 + (xx + yy + i)], -1).astype(np.uint8)
        f[14:30, 10 + 4 * i:26 + 4 * i] = 255
        frames.append(f)
    return frames


@pytest.fixture
def simulated_gpu() -> Iterator[None]:
    if not gpu.cuda_probe().simulator:
        pytest.skip("needs Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set by conftest)")
    yield


def test_a_video_on_the_cuda_path_is_redacted_like_on_the_cpu(tmp_path: Path,
                                                             simulated_gpu: None) -> None:
    from engines.redact import Method, Style
    from pipeline.video import redact_video

    frames = square_clip()
    src = write_video(tmp_path / "in.mp4", frames, fps=10, audio="aac")
    style = Style(Method.FILL, fill_bgr=(255, 0, 255))
    outs = {}
    for device in ("cuda", "cpu"):
        det = WhiteSquare()
        report = redact_video(src, tmp_path / f"{device}.mp4", det, style, device=device)
        outs[device] = (report, read_video(tmp_path / f"{device}.mp4"), det)
    report, video, det = outs["cuda"]
    assert report.runtime["device"] == "cuda"
    assert report.runtime["kernels"] == "cuda (numba, simulator)"
    assert report.runtime["decode"].startswith("cpu (NVDEC unavailable")
    assert report.runtime["encoder"] == "libx264"
    assert det.kinds == {"ndarray"}  # detectors are given host pixels
    assert len(video.frames) == 4 and video.audio_packets == outs["cpu"][1].audio_packets
    assert video.times == outs["cpu"][1].times
    source = read_video(src).frames
    for i, (got, cpu) in enumerate(zip(video.frames, outs["cpu"][1].frames, strict=True)):
        x = 10 + 4 * i
        square = got[16:28, x + 2:x + 14].reshape(-1, 3).astype(int)
        assert (np.abs(square - [255, 0, 255]) < 40).all(), f"frame {i}: square not filled"
        # elsewhere the picture is as faithful to the source as the CPU path's (both differ
        # from it by the codec and the colour conversions)
        away = np.ones(got.shape[:2], bool)
        away[8:36, x - 6:x + 24] = False
        gpu_err = np.abs(got.astype(int) - source[i])[away].mean()
        cpu_err = np.abs(cpu.astype(int) - source[i])[away].mean()
        assert gpu_err <= cpu_err + 3.0, (i, gpu_err, cpu_err)


def test_a_device_frame_goes_back_to_the_encoder_as_nv12(simulated_gpu: None) -> None:
    from engines.cuda_kernels import DeviceImage

    yy, xx = np.mgrid[0:48, 0:64]
    bgr = np.stack([xx * 3, yy * 4, (xx + yy) * 2], -1).astype(np.uint8)  # smooth colours
    dev = hw.frame_pixels(__import__("av").VideoFrame.from_ndarray(bgr, format="bgr24")
                          .reformat(format="nv12"), "cuda", 64, 48)
    assert isinstance(dev, DeviceImage) and dev.layout == "nv12"
    vf = hw.encoder_frame(dev)
    assert vf.format.name == "nv12" and (vf.width, vf.height) == (64, 48)
    back = vf.to_ndarray(format="bgr24")
    assert np.abs(back.astype(int) - bgr.astype(int)).mean() < 4.0


def test_the_face_model_makes_its_input_on_the_gpu_from_a_device_frame(
        simulated_gpu: None) -> None:
    import cv2

    from engines.cuda_kernels import DeviceImage
    from engines.faces import YuNet
    from tests.conftest import ASTRONAUT_FACE, astronaut_bgr_image, iou

    # the astronaut at 1/4 size (128x128): her face is about 22x26 px
    small = cv2.resize(astronaut_bgr_image(), (128, 128), interpolation=cv2.INTER_AREA)
    dev = DeviceImage.from_bgr(small)
    model = YuNet(threshold=0.5, device="cuda")
    assert model.takes_device_frames
    on_gpu = model.detect(dev)  # type: ignore[arg-type]
    on_host = model.detect(dev.to_bgr())
    face = [v / 4 for v in ASTRONAUT_FACE]
    assert len(on_gpu) == len(on_host) == 1
    assert iou(on_gpu.xyxy[0], on_host.xyxy[0]) > 0.9
    assert iou(on_gpu.xyxy[0], face) > 0.5
    assert abs(float(on_gpu.score[0]) - float(on_host.score[0])) < 0.05


def _gpu_benchmark(tmp_path: Path, simulator: bool, *args: str) -> tuple[int, str, dict[str, Any]]:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1" if simulator else "0"}
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--json", str(out), *args],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    doc = json.loads(out.read_text()) if out.exists() else json.loads(r.stdout.splitlines()[-1])
    return r.returncode, r.stdout, doc


def test_the_gpu_benchmark_exits_0_saying_why_without_a_gpu(tmp_path: Path) -> None:
    rc, stdout, doc = _gpu_benchmark(tmp_path, False)
    assert rc == 0
    assert "skipped: no NVIDIA driver found" in stdout
    assert doc == {"skipped": "no NVIDIA driver found (no CUDA GPU here)"}


def test_the_gpu_benchmark_runs_every_step_on_the_simulator(tmp_path: Path) -> None:
    """The device check's own logic, at toy sizes (a check of the script, not a measurement)."""
    rc, stdout, doc = _gpu_benchmark(tmp_path, True, "--simulator")
    assert rc == 0, stdout
    assert doc["kernels"]["parity_ok"] and max(doc["kernels"]["max_abs_diff"].values()) <= 1
    assert doc["decode"]["same_frames"] and doc["decode"]["mean_abs_diff"] == 0.0
    assert doc["preprocess"]["max_abs_diff"] <= 1.0
    assert "skipped" in doc["backend"]  # the simulator has no GPU detector backend
    for n in ("1", "2"):
        run = doc["streams"][n]
        assert run["frames"] == 4 * int(n) and not run["errors"]
        assert run["runtime"]["kernels"] == "cuda (numba, simulator)"
        assert run["ms_per_frame_by_stage"]["redact"] > 0
    assert "streams   2:" in stdout
