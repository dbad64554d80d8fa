"""Checks that need a real NVIDIA GPU: they skip elsewhere, saying why (``make test`` lists the
reasons). On a GPU machine run them with ``NUMBA_ENABLE_CUDASIM=0 pytest tests/test_gpu.py``;
``python -m benchmarks.gpu`` measures the same paths."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines import gpu


def real_gpu() -> None:
    probe = gpu.cuda_probe()
    if not probe.available:
        pytest.skip(f"needs an NVIDIA GPU: {probe.reason}")
    if probe.simulator:
        pytest.skip("needs an NVIDIA GPU: only Numba's CUDA simulator is here "
                    "(run with NUMBA_ENABLE_CUDASIM=0 on a GPU machine)")


def gpu_backend(name: str) -> Any:
    """The backend's module, or a skip saying why it cannot run here."""
    real_gpu()
    mod = importlib.import_module({"torch-cuda": "engines.torch_backend",
                                   "tensorrt": "engines.tensorrt_backend"}[name])
    ok, why = mod.available()
    if not ok:
        pytest.skip(f"needs the {name} backend: {why}")
    return mod


@pytest.mark.parametrize("name", ["torch-cuda", "tensorrt"])
@pytest.mark.parametrize("batch", [1, 8])
def test_a_gpu_backend_matches_onnxruntime_on_the_face_model(name: str, batch: int) -> None:
    mod = gpu_backend(name)
    from engines.backends import OnnxRuntimeCpu
    from engines.faces import YuNet
    from engines.models import dynamic_onnx_bytes

    data = dynamic_onnx_bytes(YuNet.spec.resolve(None), {"input": ["B", 3, "H", "W"]})
    session = mod.Backend().load(data, 0)
    x = np.random.default_rng(2).uniform(0, 255, (batch, 3, 320, 640)).astype(np.float32)
    want = OnnxRuntimeCpu().load(data, 0).run(None, {"input": x})
    got = session.run(None, {"input": x})
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-2, rtol=1e-3)


def test_the_kernels_on_the_gpu_match_the_cpu_kernels() -> None:
    real_gpu()
    from engines.cuda_kernels import DeviceImage, redact_boxes
    from engines.redact import Method, Shape, Style
    from engines.redact import redact_boxes as cpu_redact_boxes

    img = np.random.default_rng(4).integers(0, 256, (1080, 1920, 3), np.uint8)
    xyxy = np.array([[100, 100, 260, 300], [900, 500, 1000, 640], [1800, 1000, 1920, 1080]],
                    np.float32)
    for method in Method:
        for shape in Shape:
            style = Style(method, shape)
            want = img.copy()
            cpu_redact_boxes(want, xyxy, style)
            dev = DeviceImage.from_bgr(img, layout="bgr")
            redact_boxes(dev, xyxy, style)
            diff = np.abs(dev.to_bgr().astype(int) - want.astype(int)).max()
            assert diff <= 1, (method, shape, diff)


def test_nvdec_decodes_what_the_cpu_decodes(tmp_path: Path) -> None:
    real_gpu()
    from pipeline.hw import open_input
    from tests.conftest import moving_face_clip, write_video

    src = write_video(tmp_path / "in.mp4", moving_face_clip(n=10).frames)
    frames = {}
    for device in ("cuda", "cpu"):
        container, label = open_input(src, device)
        with container:
            frames[device] = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
        if device == "cuda" and label != "nvdec":
            pytest.skip(f"this GPU's driver gives no NVDEC to PyAV: {label}")
    assert len(frames["cuda"]) == len(frames["cpu"]) == 10
    for a, b in zip(frames["cuda"], frames["cpu"], strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0
