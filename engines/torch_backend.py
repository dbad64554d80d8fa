"""A GPU detector backend that runs wherever torch with CUDA does: the project's ONNX files are
converted to torch modules (onnx2torch) and run on the GPU, batched across streams.

Registered by :func:`engines.gpu.enable_cuda` when TensorRT is not installed; imports torch and
onnx2torch only when the cuda device is chosen (``pip install 'redaction-gateway[gpu]'``).
onnx2torch does not take ``auto_pad=SAME_UPPER`` convolutions (the PP-OCR models have them):
they are rewritten as explicit pads first, which is exact for inputs whose sides divide by the
layer's stride (the text detector's inputs are padded to multiples of 32).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NAME = "torch-cuda"
# frames from many streams meet in one run; a GPU run of 32 costs little more than one of 1
MAX_BATCH = 32
MAX_WAIT_S = 0.002


def available(*modules: str) -> tuple[bool, str]:
    """Whether this backend (or, with ``modules``, one that also needs them and runs its
    buffers through torch) can run here, and why not."""
    import importlib

    try:
        for name in (*modules, "onnx2torch", "torch"):
            importlib.import_module(name)
    except ImportError as exc:
        return False, f"{exc.name or exc} is not installed"
    import torch

    if not torch.cuda.is_available():
        return False, "torch sees no CUDA GPU"
    return True, ""


@dataclass(frozen=True)
class TensorInfo:
    """What onnxruntime's NodeArg tells the detectors: a name, a shape and a type."""

    name: str
    shape: list[int | str]
    type: str = "tensor(float)"


@dataclass(frozen=True)
class ModelMeta:
    custom_metadata_map: dict[str, str] = field(default_factory=dict)


_ONNX_TYPES = {1: "tensor(float)", 10: "tensor(float16)", 7: "tensor(int64)", 2: "tensor(uint8)"}


def _infos(values: Any) -> list[TensorInfo]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                 for d in t.shape.dim]
        out.append(TensorInfo(v.name, dims, _ONNX_TYPES.get(t.elem_type, "tensor(float)")))
    return out


def explicit_same_pads(model: Any) -> Any:
    """Rewrite ``auto_pad=SAME_UPPER/SAME_LOWER`` Conv and pooling nodes with explicit pads
    (total ``dilation * (kernel - 1) + 1 - stride``, the extra pixel at the end for SAME_UPPER),
    as for inputs that divide by the stride. Returns the model (changed in place)."""
    from onnx import helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        mode = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
        if mode not in ("SAME_UPPER", "SAME_LOWER"):
            continue
        if "kernel_shape" in attrs:
            kernel = list(attrs["kernel_shape"].ints)
        elif node.op_type == "Conv" and node.input[1] in inits:
            kernel = list(inits[node.input[1]].dims[2:])
        else:
            continue
        n = len(kernel)
        strides = list(attrs["strides"].ints) if "strides" in attrs else [1] * n
        dil = list(attrs["dilations"].ints) if "dilations" in attrs else [1] * n
        begins, ends = [], []
        for k, s, d in zip(kernel, strides, dil, strict=True):
            total = max(d * (k - 1) + 1 - s, 0)
            small, big = total // 2, total - total // 2
            begins.append(small if mode == "SAME_UPPER" else big)
            ends.append(big if mode == "SAME_UPPER" else small)
        node.attribute.remove(attrs["auto_pad"])
        if "pads" in attrs:
            node.attribute.remove(attrs["pads"])
        node.attribute.append(helper.make_attribute("pads", begins + ends))
    return model


class OnnxSignature:
    """What a GPU session tells the detectors of its model, as onnxruntime's session does:
    inputs, outputs and metadata, read from the ONNX graph."""

    def __init__(self, proto: Any) -> None:
        inits = {i.name for i in proto.graph.initializer}
        self._inputs = _infos(v for v in proto.graph.input if v.name not in inits)
        self._outputs = _infos(proto.graph.output)
        self._meta = ModelMeta({p.key: p.value for p in proto.metadata_props})

    def get_inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    def get_outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def get_modelmeta(self) -> ModelMeta:
        return self._meta


class TorchSession(OnnxSignature):
    """An onnxruntime-like session over a torch module on the GPU (thread-safe: runs are
    serialised, and the BatchedSession around it batches the callers)."""

    def __init__(self, model_bytes: bytes, device: str = "cuda") -> None:
        import onnx
        import torch
        from onnx2torch import convert

        proto = onnx.load_from_string(model_bytes)
        super().__init__(proto)
        self._torch = torch
        self._device = torch.device(device)
        self._module = convert(explicit_same_pads(proto)).eval().to(self._device)
        self._lock = threading.Lock()

    def run(self, output_names: Sequence[str] | None,
            input_feed: dict[str, Any]) -> list[np.ndarray]:
        torch = self._torch
        args = [torch.as_tensor(input_feed[i.name], device=self._device) for i in self._inputs]
        with self._lock, torch.inference_mode():
            outs = self._module(*args)
        if not isinstance(outs, list | tuple):
            outs = (outs,)
        by_name = {o.name: t for o, t in zip(self._outputs, outs, strict=False)}
        names = list(output_names) if output_names else [o.name for o in self._outputs]
        return [by_name[n].detach().cpu().numpy() for n in names]


@dataclass(frozen=True)
class Backend:
    name: str = NAME
    device: str = "cuda"
    max_batch: int = MAX_BATCH
    max_wait_s: float = MAX_WAIT_S

    def load(self, model_bytes: bytes, threads: int) -> TorchSession:
        return TorchSession(model_bytes)
