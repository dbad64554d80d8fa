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

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines import gpu
from engines.backends import BackendError, backend_for, resolve_device
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
