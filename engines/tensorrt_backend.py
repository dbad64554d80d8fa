"""The TensorRT detector backend: engines built from the project's ONNX files, cached on disk.

Registered by :func:`engines.gpu.enable_cuda` when ``tensorrt`` imports (TensorRT is not on
PyPI in a form that installs offline: it comes with NVIDIA's TensorRT container image, see
``Dockerfile.gpu``). An engine is tied to the GPU and the TensorRT version, so it is cached
under ``REDACT_TRT_CACHE`` (default ``~/.cache/redaction-gateway/tensorrt``) keyed by the model's
sha256, the TensorRT version, the GPU's name and compute capability and the shape profile; the
first load on a machine builds it (minutes), later ones read it.

Every dynamic input dimension gets a profile: the batch from 1 to ``MAX_BATCH`` (so frames of
many streams run as one), picture sides from 32 to 1920 (inputs above that are scaled down by
the detectors). FP16: TensorRT 11 has no FP16 builder flag; set ``REDACT_TRT_FP16=1`` to build
from an FP16 copy of the model (onnxconverter-common), which keeps YuNet's detections.
I/O buffers are torch tensors on the GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines import torch_backend
from engines.torch_backend import OnnxSignature, TensorInfo

log = logging.getLogger(__name__)

NAME = "tensorrt"
MAX_BATCH = 32
MAX_WAIT_S = 0.002
SIDE_MIN, SIDE_OPT, SIDE_MAX = 32, 736, 1920


def available() -> tuple[bool, str]:
    """TensorRT, with torch on CUDA for the I/O buffers (and the torch backend's helpers)."""
    return torch_backend.available("tensorrt")


def cache_dir() -> Path:
    given = os.environ.get("REDACT_TRT_CACHE")
    return Path(given) if given else Path.home() / ".cache" / "redaction-gateway" / "tensorrt"


def profile_for(info: TensorInfo) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of one input: batch 1..MAX_BATCH, free sides 32..1920."""
    lo, opt, hi = [], [], []
    for i, d in enumerate(info.shape):
        if isinstance(d, int) and d > 0:
            lo.append(d)
            opt.append(d)
            hi.append(d)
        elif i == 0:
            lo.append(1)
            opt.append(8)
            hi.append(MAX_BATCH)
        else:
            lo.append(SIDE_MIN)
            opt.append(SIDE_OPT)
            hi.append(SIDE_MAX)
    return tuple(lo), tuple(opt), tuple(hi)


def engine_key(model_bytes: bytes, trt_version: str, gpu: str, capability: tuple[int, int],
               profiles: Any, fp16: bool) -> str:
    """The cache key of an engine: everything an engine is tied to."""
    h = hashlib.sha256(model_bytes)
    h.update(json.dumps([trt_version, gpu, list(capability), profiles, fp16]).encode())
    return h.hexdigest()


class TensorRtSession(OnnxSignature):
    def __init__(self, model_bytes: bytes) -> None:
        import onnx
        import tensorrt as trt
        import torch

        proto = onnx.load_from_string(model_bytes)
        super().__init__(proto)
        self._torch = torch
        fp16 = os.environ.get("REDACT_TRT_FP16") == "1"
        if fp16:
            from onnxconverter_common import float16

            model_bytes = float16.convert_float_to_float16(
                proto, keep_io_types=True).SerializeToString()
        props = torch.cuda.get_device_properties(0)
        profiles = {i.name: profile_for(i) for i in self._inputs}
        key = engine_key(model_bytes, trt.__version__, props.name,
                         (props.major, props.minor), profiles, fp16)
        path = cache_dir() / f"{key}.engine"
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        if path.exists():
            plan = path.read_bytes()
        else:
            plan = self._build(trt, model_bytes, profiles)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".partial")
            tmp.write_bytes(plan)
            os.replace(tmp, path)
            log.info("TensorRT engine built and cached: %s", path.name)
        self._engine = runtime.deserialize_cuda_engine(plan)
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        self._lock = threading.Lock()

    def _build(self, trt: Any, model_bytes: bytes, profiles: dict[str, Any]) -> bytes:
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(model_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT cannot parse the model: {errors}")
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profiles.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError("TensorRT could not build an engine for the model")
        return bytes(plan)

    def run(self, output_names: Sequence[str] | None,
            input_feed: dict[str, Any]) -> list[np.ndarray]:
        torch = self._torch
        with self._lock, torch.cuda.stream(self._stream):
            keep = []
            for info in self._inputs:
                t = torch.as_tensor(input_feed[info.name], device="cuda").contiguous()
                keep.append(t)
                self._context.set_input_shape(info.name, tuple(t.shape))
                self._context.set_tensor_address(info.name, t.data_ptr())
            outs: dict[str, Any] = {}
            for info in self._outputs:
                shape = tuple(self._context.get_tensor_shape(info.name))
                dtype = torch.float16 if info.type == "tensor(float16)" else (
                    torch.int64 if info.type == "tensor(int64)" else torch.float32)
                t = torch.empty(shape, dtype=dtype, device="cuda")
                outs[info.name] = t
                self._context.set_tensor_address(info.name, t.data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            self._stream.synchronize()
        names = list(output_names) if output_names else [o.name for o in self._outputs]
        return [outs[n].cpu().numpy() for n in names]


@dataclass(frozen=True)
class Backend:
    name: str = NAME
    device: str = "cuda"
    max_batch: int = MAX_BATCH
    max_wait_s: float = MAX_WAIT_S

    def load(self, model_bytes: bytes, threads: int) -> TensorRtSession:
        return TensorRtSession(model_bytes)
