"""Choosing the device: ``cpu``, ``cuda`` or ``auto``, resolved here and nowhere else.

Nothing GPU-side is imported until a GPU is asked for: :func:`select_device` probes CUDA once
per process (numba-cuda, which the redaction kernels use, and the driver behind it), and
:func:`enable_cuda` then registers what runs there:

- the CUDA redaction kernels (:mod:`engines.cuda_kernels`, numba-cuda) for frames in GPU
  memory;
- a detector backend: TensorRT when ``tensorrt`` imports (:mod:`engines.tensorrt_backend`),
  else torch on CUDA from the same ONNX files (:mod:`engines.torch_backend`); with neither, the
  detectors of a ``cuda`` device run on onnxruntime's CPU backend and say so.

``auto`` picks ``cuda`` only for a real GPU: Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``,
how the kernels are tested on machines without a GPU) counts for an explicit ``cuda`` and never
for ``auto``. :func:`describe` is what manifests and stream stats report.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from functools import cache

from engines.errors import RedactionError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
GPU_EXTRA = "pip install 'redaction-gateway[gpu]'"


class DeviceError(RedactionError, ValueError):
    """A device that is not known, or not usable here (the message says why)."""


@dataclass(frozen=True)
class CudaProbe:
    available: bool
    simulator: bool = False  # Numba's CUDA simulator (kernels run on the CPU)
    name: str = ""  # the GPU's name
    reason: str = ""  # why CUDA is not available


@cache
def cuda_probe() -> CudaProbe:
    """Whether CUDA kernels can run in this process (probed once). Cheap where there is no
    NVIDIA driver: numba is not imported then."""
    simulated = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
    if not simulated and not _driver_present():
        return CudaProbe(False, reason="no NVIDIA driver found (no CUDA GPU here)")
    try:
        from numba import config, cuda
    except ImportError:
        return CudaProbe(False, reason=f"numba-cuda is not installed ({GPU_EXTRA})")
    if getattr(config, "ENABLE_CUDASIM", 0):
        return CudaProbe(True, simulator=True, name="CUDA simulator")
    try:
        if not cuda.is_available():
            return CudaProbe(False, reason="no CUDA GPU or driver found")
        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        return CudaProbe(True, name=name)
    except Exception as exc:  # the driver's errors are of its own kinds
        return CudaProbe(False, reason=f"CUDA is not usable: {str(exc).strip().splitlines()[0]}")


def _driver_present() -> bool:
    import ctypes.util

    return os.path.exists("/proc/driver/nvidia/version") or bool(ctypes.util.find_library("cuda"))


def parse_device(value: str | None) -> str:
    """A device name as given by a user (None: auto); DeviceError for an unknown one."""
    d = (value or "auto").strip().lower()
    if d not in DEVICES:
        raise DeviceError(f"unknown device {value!r}; use one of: {', '.join(DEVICES)}")
    return d


def select_device(requested: str | None) -> str:
    """``cpu`` or ``cuda`` for what the user asked; DeviceError when ``cuda`` cannot run here.

    ``auto`` is ``cuda`` on a machine with a usable GPU (and the GPU extra installed), else
    ``cpu``.
    """
    d = parse_device(requested)
    if d == "cpu":
        return "cpu"
    probe = cuda_probe()
    if d == "auto":
        if probe.available and not probe.simulator:
            enable_cuda()
            return "cuda"
        return "cpu"
    if not probe.available:
        raise DeviceError(f"device cuda is not available here: {probe.reason}")
    enable_cuda()
    return "cuda"


def auto_reason() -> str:
    """Why ``auto`` runs on the CPU here ("" when it picks the GPU)."""
    probe = cuda_probe()
    if probe.available and not probe.simulator:
        return ""
    return probe.reason or "only Numba's CUDA simulator is present"


_enable_lock = threading.Lock()
_detector_backend: dict[str, str] = {}


@cache
def _enabled() -> bool:
    import engines.cuda_kernels  # noqa: F401  (registers the "cuda" kernels)
    from engines.backends import OnnxRuntimeCpu, register_backend

    probe = cuda_probe()
    chosen = ""
    why = ""
    if not probe.simulator:
        for module in ("engines.tensorrt_backend", "engines.torch_backend"):
            try:
                mod = __import__(module, fromlist=["available"])
                ok, why_not = mod.available()
            except ImportError as exc:
                ok, why_not = False, str(exc)
            if ok:
                register_backend(mod.NAME, mod.Backend, "cuda")
                chosen = mod.NAME
                break
            why = why + ("; " if why else "") + f"{module.rsplit('.', 1)[1]}: {why_not}"
    else:
        why = "the CUDA simulator has no detector backend"
    if not chosen:
        register_backend("onnxruntime", OnnxRuntimeCpu, "cuda")
        log.warning("no GPU detector backend (%s): detectors of the cuda device run on the CPU",
                    why)
        _detector_backend["note"] = why
    _detector_backend["name"] = chosen or "onnxruntime"
    return True


def enable_cuda() -> None:
    """Register the CUDA kernels and the best GPU detector backend (once)."""
    with _enable_lock:
        _enabled()


def describe(device: str) -> dict[str, str]:
    """What runs on ``device`` (``cpu`` or ``cuda``): detector backend and kernels."""
    if device != "cuda":
        return {"device": "cpu", "detector_backend": "onnxruntime (cpu)",
                "kernels": "cpu (OpenCV)"}
    enable_cuda()
    probe = cuda_probe()
    backend = _detector_backend.get("name", "onnxruntime")
    if backend == "onnxruntime":
        backend = f"onnxruntime (cpu: {_detector_backend.get('note', 'no GPU backend')})"
    return {"device": "cuda", "gpu": probe.name, "detector_backend": backend,
            "kernels": "cuda (numba" + (", simulator)" if probe.simulator else ")")}


def env_device_default() -> str:
    """The default device: REDACT_DEVICE, else auto."""
    return parse_device(os.environ.get("REDACT_DEVICE") or "auto")
