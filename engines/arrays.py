"""Where a frame's pixels live, and the kernels that work on them there.

A frame's pixels are a CPU array (numpy, H x W x 3 uint8 BGR) or, on the ``cuda`` device, a
frame in GPU memory (:class:`engines.cuda_kernels.DeviceImage`: the decoder's NV12 planes, or
BGR; anything with ``device_kind``, or an array exposing ``__cuda_array_interface__``).
Redaction kernels, the scene-change thumbnail and the encoder hand-off ask :func:`device_of`
and dispatch: the CPU kernels live in :mod:`engines.redact`; the CUDA ones register themselves
with :func:`register_kernels` when imported (lazily, only when that device is chosen).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from engines.errors import RedactionError


def device_of(pixels: Any) -> str:
    """``"cuda"`` for a frame or array in GPU memory, ``"cpu"`` for a numpy array."""
    kind = getattr(pixels, "device_kind", None)
    if isinstance(kind, str):
        return kind
    return "cuda" if hasattr(pixels, "__cuda_array_interface__") else "cpu"


def to_host(pixels: Any) -> np.ndarray:
    """The pixels as a numpy array (copied from the device when they are elsewhere)."""
    if isinstance(pixels, np.ndarray):
        return pixels
    to_bgr = getattr(pixels, "to_bgr", None)  # a frame in GPU memory (engines.cuda_kernels)
    if callable(to_bgr):
        return np.asarray(to_bgr())
    get = getattr(pixels, "get", None)  # CuPy
    if callable(get):
        return np.asarray(get())
    cpu = getattr(pixels, "cpu", None)  # torch
    if callable(cpu):
        return np.asarray(cpu().numpy())
    return np.asarray(pixels)


class Kernels(Protocol):
    """Redaction kernels of one device; every method works in place on ``image``."""

    def redact_detections(self, image: Any, dets: Any, style: Any) -> np.ndarray: ...

    def cover_all(self, image: Any, style: Any) -> None: ...

    def cover_zone(self, image: Any, polygon: np.ndarray, style: Any) -> None: ...

    def thumbnail(self, image: Any, width: int, height: int) -> np.ndarray: ...


_KERNELS: dict[str, Kernels] = {}


def register_kernels(device: str, kernels: Kernels) -> None:
    _KERNELS[device] = kernels


def kernels_for(pixels: Any) -> Kernels:
    """The kernels for the device ``pixels`` live on."""
    device = device_of(pixels)
    found = _KERNELS.get(device)
    if found is None:
        raise RedactionError(f"no redaction kernels for {device} frames in this install")
    return found
