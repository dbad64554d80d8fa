"""Redaction kernels for frames that live in GPU memory (``--device cuda``).

Written with numba-cuda: the same kernel source is compiled for the GPU by NVVM and, with
``NUMBA_ENABLE_CUDASIM=1`` set before :mod:`numba.cuda` is first imported, runs on the CPU in
numba's CUDA simulator, so CI checks the very code the GPU runs on machines without one. CuPy can
only run kernels on a GPU (its ``RawKernel`` needs the driver) and PyCUDA ships no wheels, so
neither can be tested here. Only what both targets support is used: ``cuda.jit`` kernels and
device functions, ``cuda.grid``, ``cuda.to_device``, ``device_array`` and ``copy_to_host``.
This module imports :mod:`numba.cuda` at import time; it is itself imported lazily, only when the
cuda device is chosen, and registers :class:`CudaKernels` for ``"cuda"`` frames
(:mod:`engines.arrays`).

A frame on the GPU is a :class:`DeviceImage`: NV12 planes (the hardware decoder's layout) or one
BGR plane. The redaction kernels work in place on the planes and take every box of a call in one
launch per step, whatever the number of boxes:

1. downscale: every smoothed rectangle of every plane to its small image (OpenCV's INTER_AREA),
2. smooth: the 3x3 Gaussian of the blurred small images (a copy for the others),
3. write back: every pixel of every rectangle, inside its ellipse or box: the fill colour, the
   small image sampled back (pixelate: OpenCV's INTER_NEAREST; blur: INTER_LINEAR).

What each rectangle gets is decided on the host, by the CPU code's own rules
(:func:`engines.redact._scaled_rects` for the grown rectangles and the border cut, the same small
sizes as ``_blurred`` and ``_pixelated``, :func:`engines.redact._ellipse_mask` for the ellipse),
and passed to the kernels as small tables, uploaded in one copy into device memory each thread
reuses. The ellipse goes as one run of columns per row, worked out on the host with
``_ellipse_mask``'s own float32 arithmetic rather than per pixel on the device (where NVVM may
fuse its multiply-adds and move an edge pixel). The host's share is kept small: what a rectangle
gets is planned once per size, corner parity, shape and method and kept, so a call only looks
its rectangles up and adds their offsets, a few dozen numpy calls whatever their number.

On a BGR frame the result is within one grey level of :func:`engines.redact.redact_boxes`
(pixelate and fill came out equal in every test), pixels outside every rectangle untouched to the
bit. On NV12 the luma plane gets what the CPU kernel gives it as a 1-channel image (within one
grey level); the chroma plane gets the luma rectangle halved and rounded outward, a chroma pixel
being inside the ellipse when one of its four luma pixels is.

Parity with OpenCV, step by step: the area downscale repeats OpenCV's arithmetic (its fractional
weight tables and float32 sums, and its integer paths for whole scale factors), so the small
images are the CPU's; the Gaussian is the exact integer [1,2,1] x [1,2,1] / 16; the linear upscale
uses exact integer coordinates and 11-bit weights like OpenCV's fixed point (OpenCV's SIMD paths
truncate a little differently: at most one grey level apart); nearest uses OpenCV's float64 ratio.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple, cast

import cv2
import numpy as np
from numba import config as numba_config
from numba import cuda

from engines.arrays import register_kernels
from engines.detections import Detections, Origin
from engines.redact import (
    BLUR_SAMPLES_ACROSS,
    PIXELATE_CELLS_ACROSS,
    TINY_BOX_PX,
    Method,
    Shape,
    Style,
    _cpu_cover_zone,
    _scaled_rects,
)

SIMULATOR = bool(getattr(numba_config, "ENABLE_CUDASIM", 0))
if not hasattr(np, "row_stack"):  # numba-cuda 0.30 still refers to it; NumPy 2.5 removed it
    np.row_stack = np.vstack  # type: ignore[attr-defined]
# The simulator runs every thread as Python, whatever the block size; on a GPU 128 threads per
# block keep the multiprocessors busy with these small, branchy kernels.
THREADS_PER_BLOCK = 64 if SIMULATOR else 128
LAUNCHES = 0  # kernel launches made by this module (the tests count them)

_DBL_EPSILON = 2.220446049250313e-16

# methods in the rectangle table
_FILL, _BLUR, _PIXELATE = 0, 1, 2
_METHOD_CODE = {Method.FILL: _FILL, Method.BLUR: _BLUR, Method.PIXELATE: _PIXELATE}
# area downscale: OpenCV's general path (fractional weights, float32 sums), its integer path for
# whole scale factors (sum * (1/area) in float32, rounded half to even) and its 2x2 shortcut for
# 1, 3 and 4 channels ((sum + 2) >> 2)
_AREA_GENERAL, _AREA_INT, _AREA_2X2 = 0, 1, 2

# columns of the rectangle table (int32, one row per rectangle of one plane)
_PLANE = 0  # 0: planes[0], 1: planes[1]
_X1 = 1  # rectangle in plane pixels
_Y1 = 2
_W = 3
_H = 4
_CH = 5  # channels of the plane
_METHOD = 6
_SW = 7  # small image size (blur and pixelate)
_SH = 8
_GAUSS = 9  # 1: smooth the small image
_SOFF = 10  # offset of the small image in the scratch buffers
_SPAN = 11  # first row of this rectangle in the span table
_AREA = 12  # area mode
_IX = 13  # whole scale factors (integer area modes)
_IY = 14
_AX = 15  # area weight table offsets (general mode): x, y
_AY = 16
_FILL0 = 17  # fill value, one column per channel
_NCOL = _FILL0 + 3


class _Host:
    """numba.cuda's host calls, reached through this object rather than the module: while a
    kernel runs, Numba's CUDA simulator swaps every global of the kernel's module that is
    ``numba.cuda`` for its fake module, and host calls made meanwhile on another thread (a
    decoder's upload, a detector's pre-processing) would find the fake one."""

    to_device = staticmethod(cuda.to_device)
    device_array = staticmethod(cuda.device_array)
    as_cuda_array = staticmethod(getattr(cuda, "as_cuda_array", cuda.to_device))


# The simulator's swap is not thread-safe either (two kernels at once can leave the fake module
# in place): there, launches take turns. A GPU runs them as they come.
_SIM_LAUNCH_LOCK = threading.Lock() if SIMULATOR else None


def _launch(kernel: Any, threads: int, *args: Any) -> None:
    global LAUNCHES
    LAUNCHES += 1
    blocks = (threads + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    if _SIM_LAUNCH_LOCK is None:
        kernel[blocks, THREADS_PER_BLOCK](*args)
        return
    with _SIM_LAUNCH_LOCK:
        kernel[blocks, THREADS_PER_BLOCK](*args)


def _upload(arr: np.ndarray) -> Any:
    """A small host table on the device (never empty: CUDA allocations of 0 bytes are not
    portable)."""
    if arr.size == 0:
        arr = np.zeros((1, *arr.shape[1:]), arr.dtype)
    return _Host.to_device(np.ascontiguousarray(arr))


# --------------------------------------------------------------------------------------------
# frames on the device


def _as_device(obj: Any) -> Any:
    """A numba device array for ``obj``: a numba device array as is, anything that exposes
    ``__cuda_array_interface__`` (CuPy, torch, a decoder's surface) as a view of the same memory,
    a numpy array uploaded."""
    if hasattr(obj, "copy_to_host"):
        return obj
    if hasattr(obj, "__cuda_array_interface__"):
        return _Host.as_cuda_array(obj)
    if isinstance(obj, np.ndarray):
        return _Host.to_device(np.ascontiguousarray(obj))
    raise TypeError(f"not a device array: {type(obj).__name__}")


def _strided_view(arr: Any, shape: tuple[int, ...], strides: tuple[int, ...]) -> Any:
    """A view of ``arr``'s memory with another shape (no copy, so edits reach the original)."""
    if arr.is_c_contiguous():
        return arr.reshape(shape)  # the contiguous strides are the ones asked for
    if SIMULATOR:  # the simulator's device array wraps a numpy array
        host = arr._ary
        return type(arr)(np.lib.stride_tricks.as_strided(host, shape, strides))
    return type(arr)(shape=shape, strides=strides, dtype=arr.dtype, gpu_data=arr.gpu_data)


def _plane(obj: Any, height: int, width: int, channels: int) -> Any:
    """``obj`` as a (height, width, channels) uint8 device array: (h, w) for one channel and
    (h, w * channels) interleaved rows are viewed as (h, w, channels)."""
    arr = _as_device(obj)
    if np.dtype(arr.dtype) != np.uint8:
        raise TypeError(f"a plane must be uint8, got {arr.dtype}")
    shape = tuple(int(s) for s in arr.shape)
    if shape == (height, width, channels):
        return arr
    if shape == (height, width * channels):
        s0, s1 = (int(s) for s in arr.strides)
        return _strided_view(arr, (height, width, channels), (s0, s1 * channels, s1))
    raise ValueError(f"plane of shape {shape}, expected ({height}, {width}, {channels})")


def _bgr_fill_to_yuv(bgr: tuple[int, int, int]) -> tuple[int, int, int]:
    """Y, U, V of a BGR colour, BT.601 limited range: OpenCV's own BGR -> I420 conversion
    (black -> 16, 128, 128)."""
    yuv = cv2.cvtColor(np.full((2, 2, 3), bgr, np.uint8), cv2.COLOR_BGR2YUV_I420).ravel()
    return int(yuv[0]), int(yuv[4]), int(yuv[5])


def _nv12_host_to_bgr(y: np.ndarray, uv: np.ndarray) -> np.ndarray:
    h, w = y.shape[:2]
    nv12 = np.concatenate([y.reshape(h, w), uv.reshape(h // 2, w)])
    return cv2.cvtColor(nv12, cv2.COLOR_YUV2BGR_NV12)


def _bgr_to_nv12_host(bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Y (h, w, 1) and interleaved UV (h/2, w/2, 2) of an even-sized BGR image."""
    h, w = bgr.shape[:2]
    i420 = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2YUV_I420)
    y = i420[:h].reshape(h, w, 1)
    u = i420[h : h + h // 4].reshape(h // 2, w // 2)
    v = i420[h + h // 4 :].reshape(h // 2, w // 2)
    return np.ascontiguousarray(y), np.ascontiguousarray(np.stack([u, v], -1))


def _yuv444_to_bgr(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """BGR of full-resolution Y, U, V with OpenCV's NV12 -> BGR integer formula."""
    yy = np.maximum(0, y.astype(np.int64) - 16) * _CY
    uu = u.astype(np.int64) - 128
    vv = v.astype(np.int64) - 128
    half = 1 << (_SHIFT - 1)
    b = (yy + half + _CUB * uu) >> _SHIFT
    g = (yy + half + _CVG * vv + _CUG * uu) >> _SHIFT
    r = (yy + half + _CVR * vv) >> _SHIFT
    return np.clip(np.stack([b, g, r], -1), 0, 255).astype(np.uint8)


class DeviceImage:
    """A frame in GPU memory: NV12 (the decoder's layout) or BGR.

    ``planes`` holds ``(array, subsampling)`` pairs of (rows, columns, channels) uint8 device
    arrays: NV12 is ``[(y (H, W, 1), 1), (uv (H/2, W/2, 2), 2)]``, BGR ``[(bgr (H, W, 3), 1)]``.
    The redaction kernels change the planes in place.
    """

    device_kind = "cuda"

    def __init__(self, planes: list[tuple[Any, int]], width: int, height: int,
                 layout: str) -> None:
        if layout not in ("nv12", "bgr"):
            raise ValueError(f"unknown layout {layout!r}; use nv12 or bgr")
        want = [(height, width, 1, 1), (height // 2, width // 2, 2, 2)] if layout == "nv12" \
            else [(height, width, 3, 1)]
        if layout == "nv12" and (width % 2 or height % 2):
            raise ValueError(f"NV12 needs an even width and height, got {width}x{height}")
        if len(planes) != len(want):
            raise ValueError(f"{layout} takes {len(want)} planes, got {len(planes)}")
        for (arr, sub), (h, w, c, s) in zip(planes, want, strict=True):
            if tuple(arr.shape) != (h, w, c) or sub != s:
                raise ValueError(f"{layout} plane {tuple(arr.shape)}/{sub}, expected "
                                 f"{(h, w, c)}/{s}")
        self.planes = planes
        self.width = int(width)
        self.height = int(height)
        self.layout = layout

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, 3

    def __repr__(self) -> str:
        return f"DeviceImage({self.width}x{self.height}, {self.layout})"

    @classmethod
    def from_bgr(cls, bgr: np.ndarray, layout: str = "nv12") -> DeviceImage:
        """Upload a host BGR uint8 image (H, W, 3), converted to NV12 on the host (OpenCV's
        BGR -> I420, U and V interleaved). NV12 needs an even size: an image of odd width or
        height is kept as BGR instead."""
        bgr = np.asarray(bgr)
        if bgr.dtype != np.uint8 or bgr.ndim != 3 or bgr.shape[2] != 3:
            raise ValueError(f"expected a BGR uint8 image (H, W, 3), got {bgr.dtype} "
                             f"{bgr.shape}")
        h, w = bgr.shape[:2]
        if layout == "nv12" and not (w % 2 or h % 2):
            y, uv = _bgr_to_nv12_host(bgr)
            return cls([(_Host.to_device(y), 1), (_Host.to_device(uv), 2)], w, h, "nv12")
        if layout not in ("nv12", "bgr"):
            raise ValueError(f"unknown layout {layout!r}; use nv12 or bgr")
        return cls([(_Host.to_device(np.ascontiguousarray(bgr)), 1)], w, h, "bgr")

    @classmethod
    def from_nv12_planes(cls, y: Any, uv: Any) -> DeviceImage:
        """Wrap NV12 planes already on the GPU (no copy): ``y`` (H, W) or (H, W, 1), ``uv``
        (H/2, W/2, 2) or interleaved rows (H/2, W). Numba device arrays and anything
        :func:`numba.cuda.as_cuda_array` takes (pitched rows included); numpy arrays are
        uploaded."""
        dy = _as_device(y)
        h, w = (int(s) for s in dy.shape[:2])
        return cls([(_plane(dy, h, w, 1), 1), (_plane(uv, h // 2, w // 2, 2), 2)], w, h,
                   "nv12")

    def to_bgr(self) -> np.ndarray:
        """The picture as a host BGR uint8 array (H, W, 3) (NV12: OpenCV's NV12 -> BGR)."""
        if self.layout == "bgr":
            return np.ascontiguousarray(self.planes[0][0].copy_to_host())
        y = self.planes[0][0].copy_to_host()
        uv = self.planes[1][0].copy_to_host()
        return _nv12_host_to_bgr(np.ascontiguousarray(y), np.ascontiguousarray(uv))

    get = to_bgr  # so engines.arrays.to_host, which calls ``get()`` (CuPy's name), works

    def to_nv12_host(self) -> np.ndarray:
        """The picture as host NV12, (H * 3/2, W) uint8: Y rows then interleaved U, V rows,
        the layout ``av.VideoFrame.from_ndarray(arr, format="nv12")`` takes."""
        if self.layout == "bgr":
            if self.width % 2 or self.height % 2:
                raise ValueError(f"NV12 needs an even size, this frame is "
                                 f"{self.width}x{self.height}")
            y, uv = _bgr_to_nv12_host(self.to_bgr())
        else:
            y = np.ascontiguousarray(self.planes[0][0].copy_to_host())
            uv = np.ascontiguousarray(self.planes[1][0].copy_to_host())
        h, w = self.height, self.width
        return np.concatenate([y.reshape(h, w), uv.reshape(h // 2, w)])

    def copy(self) -> DeviceImage:
        planes = []
        for arr, sub in self.planes:
            if arr.is_c_contiguous():
                dup = _Host.device_array(tuple(arr.shape), np.uint8)
                dup.copy_to_device(arr)
            else:
                dup = _Host.to_device(np.ascontiguousarray(arr.copy_to_host()))
            planes.append((dup, sub))
        return DeviceImage(planes, self.width, self.height, self.layout)


# --------------------------------------------------------------------------------------------
# device functions


def _float32_ops() -> tuple[Any, Any]:
    """float32 multiply and add rounded one by one, as OpenCV's CPU code computes them. NVVM
    fuses a multiply feeding an add into one FMA (rounded once) unless told otherwise, which
    ``cuda.jit`` cannot say; libdevice's ``fmul_rn`` / ``fadd_rn`` are never fused. The
    simulator has no libdevice: numpy float32 arithmetic is already rounded per operation."""
    if SIMULATOR:
        @cuda.jit(device=True)
        def mul(a, b):
            return np.float32(a) * np.float32(b)

        @cuda.jit(device=True)
        def add(a, b):
            return np.float32(a) + np.float32(b)

        return mul, add
    from numba.cuda import libdevice

    return libdevice.fmul_rn, libdevice.fadd_rn


_mul_rn, _add_rn = _float32_ops()


@cuda.jit(device=True)
def _find(cum, n, i):
    """The index r of the item that holds element i: cum[r] <= i < cum[r + 1]."""
    lo = 0
    hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cum[mid] <= i:
            lo = mid
        else:
            hi = mid
    return lo


@cuda.jit(device=True)
def _round_u8(v):
    """OpenCV's float -> uint8: nearest, ties to even, saturated."""
    f = int(math.floor(v))  # noqa: RUF046 (numba-cuda's floor of a float is a float)
    d = v - f
    if d > 0.5 or (d == 0.5 and (f & 1) == 1):
        f += 1
    return min(max(f, 0), 255)


@cuda.jit(device=True)
def _lin_coef(d, ss, ds):
    """OpenCV's INTER_LINEAR source for destination index d (size ds <- ss): the two source
    indices and their weights out of 2048. The position (d + 0.5) * ss / ds - 0.5 is exact in
    integers; outside the source it is clamped to the edge."""
    num = (2 * d + 1) * ss - ds
    den = 2 * ds
    s0 = num // den
    rem = num - s0 * den
    if s0 < 0:
        s0 = 0
        rem = 0
    if s0 >= ss - 1:
        s0 = ss - 1
        rem = 0
    a1 = (rem * 4096 + den) // (2 * den)
    return s0, min(s0 + 1, ss - 1), 2048 - a1, a1


@cuda.jit(device=True)
def _down_pixel(plane, rt, r, dy, dx, tab_start, tab_src, tab_alpha, small):
    """One pixel (all channels) of a rectangle's small image: OpenCV's INTER_AREA."""
    x1 = int(rt[r, _X1])
    y1 = int(rt[r, _Y1])
    ch = int(rt[r, _CH])
    sw = int(rt[r, _SW])
    mode = int(rt[r, _AREA])
    base = int(rt[r, _SOFF]) + (dy * sw + dx) * ch
    if mode == _AREA_GENERAL:
        # the fractional weights of each source row and column, summed in float32 in the order
        # OpenCV sums them (row sums first, then rows)
        ax = int(rt[r, _AX])
        ay = int(rt[r, _AY])
        xs = int(tab_start[ax + dx])
        xe = int(tab_start[ax + dx + 1])
        ys = int(tab_start[ay + dy])
        ye = int(tab_start[ay + dy + 1])
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        for ky in range(ys, ye):
            sy = y1 + int(tab_src[ky])
            beta = tab_alpha[ky]
            b0 = np.float32(0.0)
            b1 = np.float32(0.0)
            b2 = np.float32(0.0)
            for kx in range(xs, xe):
                sx = x1 + int(tab_src[kx])
                alpha = tab_alpha[kx]
                b0 = _add_rn(b0, _mul_rn(np.float32(plane[sy, sx, 0]), alpha))
                if ch > 1:
                    b1 = _add_rn(b1, _mul_rn(np.float32(plane[sy, sx, 1]), alpha))
                if ch > 2:
                    b2 = _add_rn(b2, _mul_rn(np.float32(plane[sy, sx, 2]), alpha))
            a0 = _add_rn(a0, _mul_rn(beta, b0))
            a1 = _add_rn(a1, _mul_rn(beta, b1))
            a2 = _add_rn(a2, _mul_rn(beta, b2))
        small[base] = _round_u8(a0)
        if ch > 1:
            small[base + 1] = _round_u8(a1)
        if ch > 2:
            small[base + 2] = _round_u8(a2)
        return
    ix = int(rt[r, _IX])
    iy = int(rt[r, _IY])
    s0 = 0
    s1 = 0
    s2 = 0
    for sy in range(y1 + dy * iy, y1 + dy * iy + iy):
        for sx in range(x1 + dx * ix, x1 + dx * ix + ix):
            s0 += int(plane[sy, sx, 0])
            if ch > 1:
                s1 += int(plane[sy, sx, 1])
            if ch > 2:
                s2 += int(plane[sy, sx, 2])
    if mode == _AREA_2X2:
        small[base] = (s0 + 2) >> 2
        if ch > 1:
            small[base + 1] = (s1 + 2) >> 2
        if ch > 2:
            small[base + 2] = (s2 + 2) >> 2
        return
    inv = np.float32(1.0) / np.float32(ix * iy)
    small[base] = _round_u8(np.float32(s0) * inv)
    if ch > 1:
        small[base + 1] = _round_u8(np.float32(s1) * inv)
    if ch > 2:
        small[base + 2] = _round_u8(np.float32(s2) * inv)


@cuda.jit(device=True)
def _write_pixel(plane, rt, rf, r, py, px, spans, smooth):
    """One pixel (all channels) of a rectangle, if it lies inside the rectangle's shape."""
    x1 = int(rt[r, _X1])
    row = int(rt[r, _SPAN]) + py
    x = x1 + px
    if x < spans[row, 0] or x >= spans[row, 1]:
        return
    y = int(rt[r, _Y1]) + py
    ch = int(rt[r, _CH])
    method = int(rt[r, _METHOD])
    if method == _FILL:
        for c in range(ch):
            plane[y, x, c] = rt[r, _FILL0 + c]
        return
    sw = int(rt[r, _SW])
    sh = int(rt[r, _SH])
    off = int(rt[r, _SOFF])
    if method == _PIXELATE:
        # OpenCV's INTER_NEAREST: floor(d * (1 / (dsize / ssize))) in float64
        sx = min(int(math.floor(px * rf[r, 0])), sw - 1)  # noqa: RUF046 (a float in numba)
        sy = min(int(math.floor(py * rf[r, 1])), sh - 1)  # noqa: RUF046
        base = off + (sy * sw + sx) * ch
        for c in range(ch):
            plane[y, x, c] = smooth[base + c]
        return
    w = int(rt[r, _W])
    h = int(rt[r, _H])
    x0, xn, a0, a1 = _lin_coef(px, sw, w)
    y0, yn, b0, b1 = _lin_coef(py, sh, h)
    for c in range(ch):
        top = (int(smooth[off + (y0 * sw + x0) * ch + c]) * a0
               + int(smooth[off + (y0 * sw + xn) * ch + c]) * a1)
        bottom = (int(smooth[off + (yn * sw + x0) * ch + c]) * a0
                  + int(smooth[off + (yn * sw + xn) * ch + c]) * a1)
        plane[y, x, c] = (top * b0 + bottom * b1 + (1 << 21)) >> 22


# OpenCV's NV12 -> BGR (BT.601 limited range, 20-bit fixed point)
_SHIFT = 20
_CY = 1220542
_CUB = 2116026
_CUG = -409993
_CVG = -852492
_CVR = 1673527


@cuda.jit(device=True)
def _sample_bgr(p0, p1, nv12, x, y):
    """The BGR value of picture pixel (x, y), converted from NV12 as OpenCV does (the chroma
    sample of its 2x2 block)."""
    if nv12 == 0:
        return int(p0[y, x, 0]), int(p0[y, x, 1]), int(p0[y, x, 2])
    yy = max(0, int(p0[y, x, 0]) - 16) * _CY
    u = int(p1[y // 2, x // 2, 0]) - 128
    v = int(p1[y // 2, x // 2, 1]) - 128
    half = 1 << (_SHIFT - 1)
    b = min(max((yy + half + _CUB * u) >> _SHIFT, 0), 255)
    g = min(max((yy + half + _CVG * v + _CUG * u) >> _SHIFT, 0), 255)
    r = min(max((yy + half + _CVR * v) >> _SHIFT, 0), 255)
    return b, g, r


# --------------------------------------------------------------------------------------------
# kernels: one thread per output pixel, the item it belongs to found by binary search in a
# prefix sum of the items' pixel counts (no idle threads whatever the mix of box sizes)


@cuda.jit
def _downscale_kernel(p0, p1, rt, cum, tab_start, tab_src, tab_alpha, small):
    i = cuda.grid(1)  # type: ignore[call-arg,var-annotated]
    n = rt.shape[0]
    if i >= cum[n]:
        return
    r = _find(cum, n, i)
    k = i - cum[r]
    sw = rt[r, _SW]
    dy = k // sw
    dx = k - dy * sw
    if rt[r, _PLANE] == 0:
        _down_pixel(p0, rt, r, dy, dx, tab_start, tab_src, tab_alpha, small)
    else:
        _down_pixel(p1, rt, r, dy, dx, tab_start, tab_src, tab_alpha, small)


@cuda.jit
def _gauss_kernel(rt, cum, small, smooth):
    """The 3x3 Gaussian [1, 2, 1] x [1, 2, 1] / 16 with replicated borders (OpenCV's exact
    integer result for uint8), or a copy where the rectangle takes none."""
    i = cuda.grid(1)  # type: ignore[call-arg,var-annotated]
    n = rt.shape[0]
    if i >= cum[n]:
        return
    r = _find(cum, n, i)
    k = i - cum[r]
    sw = int(rt[r, _SW])
    sh = int(rt[r, _SH])
    ch = int(rt[r, _CH])
    off = int(rt[r, _SOFF])
    dy = k // sw
    dx = k - dy * sw
    base = off + k * ch
    if rt[r, _GAUSS] == 0:
        for c in range(ch):
            smooth[base + c] = small[base + c]
        return
    for c in range(ch):
        acc = 0
        for ky in range(-1, 2):
            yy = min(max(dy + ky, 0), sh - 1)
            wy = 2 if ky == 0 else 1
            for kx in range(-1, 2):
                xx = min(max(dx + kx, 0), sw - 1)
                wx = 2 if kx == 0 else 1
                acc += wy * wx * int(small[off + (yy * sw + xx) * ch + c])
        smooth[base + c] = (acc + 8) >> 4


@cuda.jit
def _write_kernel(p0, p1, rt, rf, cum, spans, smooth):
    i = cuda.grid(1)  # type: ignore[call-arg,var-annotated]
    n = rt.shape[0]
    if i >= cum[n]:
        return
    r = _find(cum, n, i)
    k = i - cum[r]
    w = rt[r, _W]
    py = k // w
    px = k - py * w
    if rt[r, _PLANE] == 0:
        _write_pixel(p0, rt, rf, r, py, px, spans, smooth)
    else:
        _write_pixel(p1, rt, rf, r, py, px, spans, smooth)


@cuda.jit
def _letterbox_kernel(p0, p1, nv12, width, height, nw, nh, mode, tabs, tab_src, tab_alpha,
                      pad, out):
    """Planar float B, G, R of the picture scaled to nw x nh at the top left of ``out``
    (1, 3, out_h, out_w); ``pad`` elsewhere. mode 0: same size, 1: bilinear (OpenCV's
    half-pixel centres, clamped at the edges), 2: area average (OpenCV's INTER_AREA weights).
    """
    i = cuda.grid(1)  # type: ignore[call-arg,var-annotated]
    ow = out.shape[3]
    oh = out.shape[2]
    if i >= ow * oh:
        return
    y = i // ow
    x = i - y * ow
    if x >= nw or y >= nh:
        out[0, 0, y, x] = pad
        out[0, 1, y, x] = pad
        out[0, 2, y, x] = pad
        return
    if mode == 0:
        b, g, r = _sample_bgr(p0, p1, nv12, x, y)
        out[0, 0, y, x] = b
        out[0, 1, y, x] = g
        out[0, 2, y, x] = r
        return
    if mode == 1:
        fx = (x + 0.5) * (width / nw) - 0.5
        fy = (y + 0.5) * (height / nh) - 0.5
        sx = int(math.floor(fx))  # noqa: RUF046 (numba-cuda's floor of a float is a float)
        sy = int(math.floor(fy))  # noqa: RUF046
        fx -= sx
        fy -= sy
        if sx < 0:
            sx = 0
            fx = 0.0
        if sx >= width - 1:
            sx = width - 1
            fx = 0.0
        if sy < 0:
            sy = 0
            fy = 0.0
        if sy >= height - 1:
            sy = height - 1
            fy = 0.0
        sx1 = min(sx + 1, width - 1)
        sy1 = min(sy + 1, height - 1)
        b00, g00, r00 = _sample_bgr(p0, p1, nv12, sx, sy)
        b01, g01, r01 = _sample_bgr(p0, p1, nv12, sx1, sy)
        b10, g10, r10 = _sample_bgr(p0, p1, nv12, sx, sy1)
        b11, g11, r11 = _sample_bgr(p0, p1, nv12, sx1, sy1)
        wx0 = 1.0 - fx
        wy0 = 1.0 - fy
        out[0, 0, y, x] = (b00 * wx0 + b01 * fx) * wy0 + (b10 * wx0 + b11 * fx) * fy
        out[0, 1, y, x] = (g00 * wx0 + g01 * fx) * wy0 + (g10 * wx0 + g11 * fx) * fy
        out[0, 2, y, x] = (r00 * wx0 + r01 * fx) * wy0 + (r10 * wx0 + r11 * fx) * fy
        return
    xs = int(tabs[x])
    xe = int(tabs[x + 1])
    ys = int(tabs[nw + 1 + y])
    ye = int(tabs[nw + 1 + y + 1])
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    for ky in range(ys, ye):
        sy = int(tab_src[ky])
        beta = tab_alpha[ky]
        for kx in range(xs, xe):
            sx = int(tab_src[kx])
            wgt = beta * tab_alpha[kx]
            b, g, r = _sample_bgr(p0, p1, nv12, sx, sy)
            a0 = a0 + np.float32(b) * wgt
            a1 = a1 + np.float32(g) * wgt
            a2 = a2 + np.float32(r) * wgt
    out[0, 0, y, x] = a0
    out[0, 1, y, x] = a1
    out[0, 2, y, x] = a2


# --------------------------------------------------------------------------------------------
# host side: what each rectangle gets


@lru_cache(maxsize=1024)
def _area_tab(ssize: int, dsize: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_AREA weights along one axis (``computeResizeAreaTab``): for destination
    index d, entries ``start[d]:start[d + 1]`` of ``src`` and ``alpha`` (float32)."""
    scale = 1.0 / (dsize / ssize)
    d = np.arange(dsize, dtype=np.float64)
    f1 = d * scale
    f2 = f1 + scale
    cell = np.minimum(scale, ssize - f1)
    s2 = np.minimum(np.floor(f2), ssize - 1).astype(np.int64)
    s1 = np.minimum(np.ceil(f1).astype(np.int64), s2)
    starts = [0]
    src: list[int] = []
    alpha: list[float] = []
    for i in range(dsize):
        a, b, lo, hi, cw = int(s1[i]), int(s2[i]), float(f1[i]), float(f2[i]), float(cell[i])
        if a - lo > 1e-3:
            src.append(a - 1)
            alpha.append((a - lo) / cw)
        src.extend(range(a, b))
        alpha.extend([1.0 / cw] * (b - a))
        if hi - b > 1e-3:
            src.append(b)
            alpha.append(min(min(hi - b, 1.0), cw) / cw)
        starts.append(len(src))
    out = (np.array(starts, np.int32), np.array(src, np.int32), np.array(alpha, np.float32))
    for arr in out:
        arr.flags.writeable = False
    return out


def _small_size(method: int, w: int, h: int) -> tuple[int, int]:
    """The small image of ``_blurred`` / ``_pixelated`` (Python's own round and ceil)."""
    if method == _BLUR:
        cell = max(1.0, min(w, h) / BLUR_SAMPLES_ACROSS)
        return max(1, round(w / cell)), max(1, round(h / cell))
    if method == _PIXELATE:
        cell = max(2.0, min(w, h) / PIXELATE_CELLS_ACROSS)
        return max(1, math.ceil(w / cell)), max(1, math.ceil(h / cell))
    return 0, 0


# What each rectangle gets is planned once per shape and kept: the runs of its rows (per size
# and shape), each plane's row of the rectangle table with its area-weight tables (per plane
# size and method), and the rectangle's block, every plane's part together (per size, parity,
# shape and method). A call looks its rectangles' blocks up and adds their offsets, a few
# numpy calls for all of them; a face whose box grows or moves by a pixel mostly finds its
# pieces made already.


@lru_cache(maxsize=1024)
def _squares(n: int, count: int) -> np.ndarray:
    """:func:`engines.redact._ellipse_mask`'s squared float32 coordinates of the first
    ``count`` of ``n`` pixels."""
    v = (np.arange(count, dtype=np.float32) + 0.5 - n / 2) / (n / 2 + 0.5)
    out = v**2
    out.flags.writeable = False
    return out


@lru_cache(maxsize=2048)
def _starts(w: int, h: int, ellipse: bool) -> np.ndarray:
    """(h,) int32, per row of a w x h rectangle: the first column it covers, ``(w + 1) // 2``
    where it covers none; the row covers ``[start, w - start)``.

    The ellipse is :func:`engines.redact._ellipse_mask`'s, with its float32 arithmetic on the
    left half of the columns: column x and column w - 1 - x get the same float32 value
    (x + 0.5 - w/2 is exact and only changes sign) and the test is monotonic in
    |x + 0.5 - w/2| (so is each float32 rounding), so each row is one symmetric run, and the
    rows nearer the middle hold the runs of the rows farther out."""
    if not ellipse:
        out = np.zeros(h, np.int32)
    else:
        half = (w + 1) // 2
        inside = (_squares(h, h)[:, None] + _squares(w, half)[None, :]) <= 1.0
        out = (half - np.count_nonzero(inside, axis=1)).astype(np.int32)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=2048)
def _luma_runs(w: int, h: int, ellipse: bool) -> np.ndarray:
    """(h, 3) int32, per row of a w x h rectangle: the columns ``[start, end)`` it covers,
    from the rectangle's left (an ellipse's empty row: 0, 0), and 1 (the row moves with the
    rectangle)."""
    start = _starts(w, h, ellipse)
    out = np.ones((h, 3), np.int32)
    out[:, 0] = start
    np.subtract(w, start, out=out[:, 1])
    empty = start >= (w + 1) // 2
    if empty.any():
        out[empty, :2] = 0
    out.flags.writeable = False
    return out


def _chroma_runs(w: int, h: int, xp: int, yp: int, ellipse: bool) -> np.ndarray:
    """The rows of a plane subsampled by 2 for a w x h frame rectangle whose corner has
    parity (xp, yp): (rows, 3) int32, per row the columns ``[start, end)`` from the halved
    rectangle's left (x1 // 2), 0, 0 where the row covers nothing, and 1 where it covers
    something (the row moves with the rectangle).

    The rectangle halved and rounded outward; a chroma row covers, from the first to the last
    column, the runs of the luma rows it covers (a run may be empty in a very elongated
    ellipse's end rows), halved and rounded outward: the run of the luma row nearer the
    middle."""
    n = (yp + h + 1) // 2
    out = np.ones((n, 3), np.int32)
    if not ellipse:
        out[:, 0] = 0
        out[:, 1] = (xp + w + 1) // 2
        return out
    start = _starts(w, h, True)
    # chroma row r: luma rows 2r - yp and 2r - yp + 1, inside the rectangle
    rows = np.concatenate([start[:1], start, start[-1:]])
    first = np.minimum(rows[1 - yp : 1 - yp + 2 * n : 2], rows[2 - yp : 2 - yp + 2 * n : 2])
    np.right_shift(first + xp, 1, out=out[:, 0])
    np.right_shift((w + xp + 1) - first, 1, out=out[:, 1])
    empty = first >= (w + 1) // 2
    if empty.any():
        out[empty] = 0
    return out


_NO_INT32 = np.zeros(0, np.int32)
_NO_INT32.flags.writeable = False
_NO_FLOAT32 = np.zeros(0, np.float32)
_NO_FLOAT32.flags.writeable = False

# columns of a part's counts (int64): summed over the parts before it, they give its offsets
_N_SMALL = 0  # small-image pixels
_N_BIG = 1  # rectangle pixels
_N_ROWS = 2  # span rows
_N_BYTES = 3  # small-image bytes
_N_STARTS = 4  # weight-table starts
_N_ENTRIES = 5  # weight-table entries
_HAS_SMALL = 6  # 1: _SOFF is the small-image bytes before it (not a fill)
_HAS_TABS = 7  # 1: _AX and _AY count from the weight-table starts before it


class _Part(NamedTuple):
    """One plane's rectangle: its row of the rectangle table, with ``_X1``, ``_Y1``,
    ``_SPAN``, ``_SOFF`` at 0 and ``_AX``, ``_AY`` counted from its own weight tables."""

    rt: np.ndarray  # (1, _NCOL) int32
    counts: np.ndarray  # (1, 8) int64: the _N_* and _HAS_* columns
    rf: np.ndarray  # (1, 2) float64
    tab_start: np.ndarray  # int32, counted from its own first entry
    tab_src: np.ndarray  # int32
    tab_alpha: np.ndarray  # float32


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for arr in arrays:
        arr.flags.writeable = False
    return arrays


@lru_cache(maxsize=4096)
def _part(plane: int, w: int, h: int, ch: int, method: int, sw: int, sh: int,
          gauss: bool) -> _Part:
    """The plane rectangle's row: small image ``sw`` x ``sh`` and OpenCV's area path for it."""
    row = [0] * _NCOL
    row[_PLANE], row[_W], row[_H], row[_CH], row[_METHOD] = plane, w, h, ch, method
    counts = [0, w * h, h, 0, 0, 0, 0, 0]
    rf = (0.0, 0.0)
    tabs: tuple[np.ndarray, ...] = (_NO_INT32, _NO_INT32, _NO_FLOAT32)
    if method != _FILL:
        row[_SW], row[_SH], row[_GAUSS] = sw, sh, int(gauss)
        counts[_N_SMALL], counts[_N_BYTES], counts[_HAS_SMALL] = sw * sh, sw * sh * ch, 1
        rf = (1.0 / (w / sw), 1.0 / (h / sh))
        # OpenCV's choice of area path (cv::resize: is_area_fast, and the 2x2 shortcut)
        scale_x, scale_y = 1.0 / (sw / w), 1.0 / (sh / h)
        ix, iy = round(scale_x), round(scale_y)
        if abs(scale_x - ix) < _DBL_EPSILON and abs(scale_y - iy) < _DBL_EPSILON:
            two = ix == 2 and iy == 2 and ch in (1, 3, 4)
            row[_AREA], row[_IX], row[_IY] = _AREA_2X2 if two else _AREA_INT, ix, iy
        else:
            xs, xsrc, xalpha = _area_tab(w, sw)
            ys, ysrc, yalpha = _area_tab(h, sh)
            row[_AREA], row[_AX], row[_AY] = _AREA_GENERAL, 0, len(xs)
            tabs = _frozen(np.concatenate([xs, ys + np.int32(len(xsrc))]),
                           np.concatenate([xsrc, ysrc]), np.concatenate([xalpha, yalpha]))
            counts[_N_STARTS], counts[_N_ENTRIES] = len(tabs[0]), len(tabs[1])
            counts[_HAS_TABS] = 1
    rt, cnt, rfa = _frozen(np.array([row], np.int32), np.array([counts], np.int64),
                           np.array([rf], np.float64))
    return _Part(rt, cnt, rfa, *tabs)


class _Block(NamedTuple):
    """Every plane's part of one rectangle, and the runs of their rows."""

    rt: np.ndarray  # (planes, _NCOL) int32
    counts: np.ndarray  # (planes, 8) int64
    rf: np.ndarray  # (planes, 2) float64
    spans: np.ndarray  # (rows, 3) int32, as _luma_runs gives them
    tab_start: np.ndarray  # int32, each part's counted from its own first entry
    tab_src: np.ndarray
    tab_alpha: np.ndarray


def _block(parts: list[_Part], runs: list[np.ndarray]) -> _Block:
    if len(parts) == 1:
        return _Block(*parts[0][:3], runs[0], *parts[0][3:])
    with_tabs = [p for p in parts if len(p.tab_start)]
    if not with_tabs:
        tabs: tuple[np.ndarray, ...] = (_NO_INT32, _NO_INT32, _NO_FLOAT32)
    elif len(with_tabs) == 1:
        tabs = with_tabs[0][3:]
    else:
        tabs = _frozen(*(np.concatenate([p[i] for p in with_tabs]) for i in (3, 4, 5)))
    rt, counts, rf, spans = _frozen(*(np.concatenate([p[i] for p in parts]) for i in (0, 1, 2)),
                                    np.concatenate(runs))
    return _Block(rt, counts, rf, spans, *tabs)


def _rect_block(kinds: tuple[tuple[int, int], ...], w: int, h: int, xp: int, yp: int,
                ellipse: bool, method: int) -> _Block:
    """The block of a w x h rectangle whose corner has parity (xp, yp), on planes of
    ``kinds`` (channels, subsampling 1 or 2)."""
    parts, runs = [], []
    for plane, (ch, sub) in enumerate(kinds):
        if sub == 1:
            pw, ph = w, h
            runs.append(_luma_runs(w, h, ellipse))
        else:
            pw, ph = (xp + w + 1) // 2, (yp + h + 1) // 2
            runs.append(_chroma_runs(w, h, xp, yp, ellipse))
        sw, sh = _small_size(method, pw, ph)
        parts.append(_part(plane, pw, ph, ch, method, sw, sh,
                           method == _BLUR and sw >= 3 and sh >= 3))
    return _block(parts, runs)


@dataclass(frozen=True)
class _Plan:
    rt: np.ndarray  # (n, _NCOL) int32
    rf: np.ndarray  # (n, 2) float64: nearest ratios
    cum_small: np.ndarray  # (n + 1,) int64 prefix sums of small-image pixels
    cum_big: np.ndarray  # (n + 1,) int64 prefix sums of rectangle pixels
    spans: np.ndarray  # (rows, 2) int32: per row of each rectangle, plane columns [start, end)
    tab_start: np.ndarray  # int32
    tab_src: np.ndarray  # int32
    tab_alpha: np.ndarray  # float32
    small_size: int


def _assemble(blocks: list[_Block], shifts: np.ndarray, x1: np.ndarray, y1: np.ndarray,
              fills: np.ndarray) -> _Plan:
    """The tables of rectangles made of their blocks, in order: each block's planes at its
    frame corner (x1, y1) shifted right by the planes' ``shifts`` (log2 of the subsampling),
    each part after the parts before it (rows, small images, weight tables)."""
    n, n_planes = len(blocks), len(shifts)
    rt = np.concatenate([b.rt for b in blocks])
    counts = np.concatenate([b.counts for b in blocks])
    cum = np.zeros((len(rt) + 1, 6), np.int64)
    np.cumsum(counts[:, :6], 0, out=cum[1:])
    before = cum[:-1]
    rt3 = rt.reshape(n, n_planes, _NCOL)
    px = x1[:, None] >> shifts
    rt3[:, :, _X1] = px
    rt3[:, :, _Y1] = y1[:, None] >> shifts
    rt3[:, :, _FILL0 : _FILL0 + 3] = fills
    rt[:, _SPAN] = before[:, _N_ROWS]
    rt[:, _SOFF] = before[:, _N_BYTES] * counts[:, _HAS_SMALL]
    spans3 = np.concatenate([b.spans for b in blocks])
    move = np.repeat(px.ravel(), counts[:, _N_ROWS]) * spans3[:, 2]
    spans = np.empty((len(spans3), 2), np.int32)
    np.add(spans3[:, 0], move, out=spans[:, 0], casting="unsafe")  # column by column: numpy
    np.add(spans3[:, 1], move, out=spans[:, 1], casting="unsafe")  # is slow on rows of two
    tab_start, tab_src, tab_alpha = _NO_INT32, _NO_INT32, _NO_FLOAT32
    if cum[-1, _N_STARTS]:
        first = before[:, _N_STARTS] * counts[:, _HAS_TABS]
        rt[:, _AX] += first
        rt[:, _AY] += first
        tab_start = np.concatenate([b.tab_start for b in blocks])
        tab_start += np.repeat(before[:, _N_ENTRIES], counts[:, _N_STARTS]).astype(np.int32)
        tab_src = np.concatenate([b.tab_src for b in blocks])
        tab_alpha = np.concatenate([b.tab_alpha for b in blocks])
    return _Plan(rt, np.concatenate([b.rf for b in blocks]), cum[:, _N_SMALL],
                 cum[:, _N_BIG], spans, tab_start, tab_src, tab_alpha,
                 int(cum[-1, _N_BYTES]))


@lru_cache(maxsize=256)
def _plane_fills(layout: str, bgr: tuple[int, int, int]) -> np.ndarray:
    """(planes, 3) int64: each plane's fill value, channel by channel (zeros past its
    channels)."""
    if layout == "bgr":
        out = np.array([[int(v) for v in bgr]], np.int64)
    else:
        y, u, v = _bgr_fill_to_yuv(bgr)
        out = np.array([[y, 0, 0], [u, v, 0]], np.int64)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=16)
def _shifts(kinds: tuple[tuple[int, int], ...]) -> np.ndarray:
    """log2 of each plane's subsampling."""
    out = np.array([sub.bit_length() - 1 for _, sub in kinds], np.int64)
    out.flags.writeable = False
    return out


# the blocks of each plane layout ((channels, subsampling) of each plane), by
# (w, h, x-parity, y-parity, ellipse, method); read without the lock (dict reads are atomic)
_BLOCKS: dict[tuple[tuple[int, int], ...], dict[tuple[int, ...], _Block]] = {}
_BLOCKS_LOCK = threading.Lock()
_BLOCKS_MAX = 2048  # per plane layout (a block is a few kB)


def _plan(dims: list[tuple[int, int, int, int]], rects: np.ndarray, ellipse: np.ndarray,
          methods: np.ndarray, fills: np.ndarray) -> _Plan | None:
    """The tables for every plane's rectangle of every frame rectangle (x1, y1, x2, y2 luma
    pixels, inside the frame), rectangle by rectangle, plane by plane; None when there is
    none. ``dims``: (rows, columns, channels, subsampling 1 or 2) of each plane; ``ellipse``
    and ``methods`` one entry per rectangle; ``fills`` (n, planes, 3) each plane's fill value
    (or what broadcasts to it).

    A plane subsampled by 2 gets the rectangle halved and rounded outward; its pixel is in the
    ellipse when one of the luma pixels it covers is (so no colour is left around the covered
    luma)."""
    r = np.asarray(rects, np.int64).reshape(-1, 4)
    x1, y1 = r[:, 0], r[:, 1]
    w, h = r[:, 2] - x1, r[:, 3] - y1
    keep = (w > 0) & (h > 0)
    if not keep.all():
        r, x1, y1, w, h = r[keep], x1[keep], y1[keep], w[keep], h[keep]
        ellipse, methods = np.asarray(ellipse)[keep], np.asarray(methods)[keep]
        fills = np.broadcast_to(fills, (len(keep), len(dims), 3))[keep]
    if not len(r):
        return None
    if r.min() < 0 or r[:, 2].max() > dims[0][1] or r[:, 3].max() > dims[0][0]:
        raise ValueError(f"rectangles past the {dims[0][1]}x{dims[0][0]} frame")
    kinds = tuple((ch, sub) for _, _, ch, sub in dims)
    if len(kinds) > 1:
        xp, yp = (x1 & 1).tolist(), (y1 & 1).tolist()
    else:
        xp = yp = [0] * len(r)
    keys = list(zip(w.tolist(), h.tolist(), xp, yp, np.asarray(ellipse, bool).tolist(),
                    np.asarray(methods).tolist(), strict=True))
    cache = _BLOCKS.get(kinds)
    if cache is None:
        cache = _BLOCKS.setdefault(kinds, {})
    found = [cache.get(key) for key in keys]
    if None in found:
        new = {key: _rect_block(kinds, *key)
               for key, b in zip(keys, found, strict=True) if b is None}
        with _BLOCKS_LOCK:
            while cache and len(cache) + len(new) > _BLOCKS_MAX:
                cache.pop(next(iter(cache)), None)  # the oldest first
            cache.update(new)
        found = [new[key] if b is None else b for key, b in zip(keys, found, strict=True)]
    return _assemble(cast(list[_Block], found), _shifts(kinds), x1, y1, fills)


# --------------------------------------------------------------------------------------------
# host side: device memory reused from call to call


_ALIGN = 256  # bytes between the starts of the tables in the upload buffer
_TABLES = ("cum_small", "cum_big", "rf", "rt", "spans", "tab_start", "tab_src", "tab_alpha")


class _Scratch(threading.local):
    """The device memory a thread's calls reuse: one buffer for the tables of a call, filled
    by ONE copy from a host buffer of the same layout, and the two small-image buffers; each
    grown (never shrunk) when a call needs more.

    One per thread, so two threads never share one. Within a thread, the copy of a call and its
    launches go to the thread's stream in order (a pageable host-to-device copy also waits for
    the work before it), so a call's copy only overwrites the tables once the previous call's
    kernels are done with them. The kernels read only the rows the tables point to, so what a
    larger earlier call left past them does not matter."""

    def __init__(self) -> None:
        self.caps = (0, 0, 0, 0)  # jobs, span rows, weight-table starts, weight-table entries
        self.host = np.zeros(0, np.uint8)
        self.dev: Any = None
        self.offsets: dict[str, int] = {}
        self.host_views: dict[str, np.ndarray] = {}
        self.dev_views: dict[str, Any] = {}
        self.rt_views: dict[int, Any] = {}
        self.small_cap = 0
        self.small: Any = None
        self.smooth: Any = None
        self.constants: dict[tuple[int, ...], tuple[Any, ...]] = {}

    def _grow(self, need: tuple[int, int, int, int]) -> None:
        jobs, rows, starts, entries = (max(c, n + n // 2, low) for c, n, low in
                                       zip(self.caps, need, (64, 4096, 512, 4096),
                                           strict=True))
        # in _TABLES' order: the weight tables (none for fills) last
        segments = (("cum_small", np.int64, (jobs + 1,)), ("cum_big", np.int64, (jobs + 1,)),
                    ("rf", np.float64, (jobs, 2)), ("rt", np.int32, (jobs, _NCOL)),
                    ("spans", np.int32, (rows, 2)), ("tab_start", np.int32, (starts,)),
                    ("tab_src", np.int32, (entries,)), ("tab_alpha", np.float32, (entries,)))
        offset = 0
        spots = []
        for name, dtype, shape in segments:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            spots.append((name, dtype, shape, offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self.host = np.zeros(offset, np.uint8)
        self.dev = _Host.device_array(offset, np.uint8)
        self.offsets = {}
        self.host_views = {}
        self.dev_views = {}
        self.rt_views = {}
        for name, dtype, shape, start, nbytes in spots:
            self.offsets[name] = start
            self.host_views[name] = self.host[start : start + nbytes].view(dtype).reshape(shape)
            self.dev_views[name] = self.dev[start : start + nbytes].view(dtype).reshape(shape)
        self.caps = (jobs, rows, starts, entries)

    def upload(self, plan: _Plan) -> dict[str, Any]:
        """The plan's tables on the device (one copy); ``rt`` has exactly the plan's rows."""
        n = len(plan.rt)
        need = (n, len(plan.spans), len(plan.tab_start), len(plan.tab_src))
        if any(a > c for a, c in zip(need, self.caps, strict=True)):
            self._grow(need)
        end = 0
        for name in _TABLES:
            arr = getattr(plan, name)
            if len(arr):
                self.host_views[name][: len(arr)] = arr
                end = self.offsets[name] + arr.nbytes
        self.dev[:end].copy_to_device(self.host[:end])  # up to the last table used
        rt = self.rt_views.get(n)
        if rt is None:
            rt = self.rt_views[n] = self.dev_views["rt"][:n]
        return {**self.dev_views, "rt": rt}

    def small_images(self, size: int) -> tuple[Any, Any]:
        """The small images and their smoothed copies, at least ``size`` bytes each."""
        if size > self.small_cap:
            self.small_cap = max(size + size // 2, 1 << 16)
            self.small = _Host.device_array(self.small_cap, np.uint8)
            self.smooth = _Host.device_array(self.small_cap, np.uint8)
        return self.small, self.smooth

    def constant(self, key: tuple[int, ...],
                 make: Callable[[], tuple[np.ndarray, ...]]) -> tuple[Any, ...]:
        """Device copies of small tables no kernel writes, kept for the last few keys."""
        got = self.constants.get(key)
        if got is None:
            if len(self.constants) >= 8:
                self.constants.pop(next(iter(self.constants)))
            got = self.constants[key] = tuple(_upload(arr) for arr in make())
        return got


_SCRATCH = _Scratch()


def _run_plan(image: DeviceImage, plan: _Plan | None) -> None:
    """Three launches at most, whatever the number of rectangles: downscale every smoothed
    rectangle, smooth every small image, write every rectangle back.

    The downscale reads every rectangle from the frame before anything is written, so where
    rectangles overlap a pixel gets the value of one of the rectangles that cover it (each pixel
    of each rectangle is covered), where the CPU covers them one after another and a later box
    smooths what an earlier one left."""
    if plan is None:
        return
    scratch = _SCRATCH
    tabs = scratch.upload(plan)
    p0 = image.planes[0][0]
    p1 = image.planes[1][0] if len(image.planes) > 1 else p0
    small, smooth = scratch.small_images(max(plan.small_size, 1))
    if plan.small_size:
        n_small = int(plan.cum_small[-1])
        _launch(_downscale_kernel, n_small, p0, p1, tabs["rt"], tabs["cum_small"],
                tabs["tab_start"], tabs["tab_src"], tabs["tab_alpha"], small)
        _launch(_gauss_kernel, n_small, tabs["rt"], tabs["cum_small"], small, smooth)
    _launch(_write_kernel, int(plan.cum_big[-1]), p0, p1, tabs["rt"], tabs["rf"],
            tabs["cum_big"], tabs["spans"], smooth)


def _plane_dims(image: DeviceImage) -> list[tuple[int, int, int, int]]:
    return [(int(arr.shape[0]), int(arr.shape[1]), int(arr.shape[2]), int(sub))
            for arr, sub in image.planes]


def _rects_plan(image: DeviceImage, rects: np.ndarray, ellipse: np.ndarray,
                methods: np.ndarray, fills_bgr: list[tuple[int, int, int]]) -> _Plan | None:
    """:func:`_plan` for a frame: ``fills_bgr`` one BGR colour per rectangle."""
    fills = (np.stack([_plane_fills(image.layout, tuple(int(v) for v in f)) for f in fills_bgr])
             if len(fills_bgr) else np.zeros((0, len(image.planes), 3), np.int64))
    return _plan(_plane_dims(image), rects, ellipse, methods, fills)


def _style_rects(image: DeviceImage, xyxy: np.ndarray, style: Style,
                 uncertain: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The rectangles :func:`engines.redact.redact_boxes` covers, and which are ellipses."""
    rects, cut = _scaled_rects(xyxy, image.width, image.height, style.mask_scale, uncertain)
    small_side = np.minimum(rects[:, 2] - rects[:, 0], rects[:, 3] - rects[:, 1])
    ellipse = (style.shape is Shape.ELLIPSE) & ~cut & (small_side >= TINY_BOX_PX)
    return rects, ellipse


def _redact_groups(image: DeviceImage,
                   groups: list[tuple[np.ndarray, Style, np.ndarray | None]]) -> np.ndarray:
    """Cover the boxes of every (xyxy, style, uncertain) group in one launch set."""
    all_rects, ellipses, methods, fills = [], [], [], []
    for xyxy, style, uncertain in groups:
        rects, ellipse = _style_rects(image, xyxy, style, uncertain)
        all_rects.append(rects)
        ellipses.append(ellipse)
        methods.append(np.full(len(rects), _METHOD_CODE[style.method], np.int64))
        fills.append(_plane_fills(image.layout, tuple(int(v) for v in style.fill_bgr)))
    if not all_rects:
        return np.zeros((0, 4), np.int32)
    if len(all_rects) == 1:
        rects = np.asarray(all_rects[0], np.int32)
        plan = _plan(_plane_dims(image), rects, ellipses[0], methods[0], fills[0])
    else:
        rects = np.concatenate(all_rects).astype(np.int32)
        plan = _plan(_plane_dims(image), rects, np.concatenate(ellipses),
                     np.concatenate(methods),
                     np.concatenate([np.broadcast_to(f, (len(r), *f.shape))
                                     for f, r in zip(fills, all_rects, strict=True)]))
    _run_plan(image, plan)
    return rects


def redact_boxes(image: DeviceImage, xyxy: np.ndarray, style: Style,
                 uncertain: np.ndarray | None = None) -> np.ndarray:
    """:func:`engines.redact.redact_boxes` for a frame on the GPU: every box in one launch set;
    returns the rectangles covered, (n, 4) int32 frame pixels."""
    return _redact_groups(image, [(xyxy, style, uncertain)])


# --------------------------------------------------------------------------------------------
# the Kernels protocol


class CudaKernels:
    """:class:`engines.arrays.Kernels` for :class:`DeviceImage` frames."""

    @staticmethod
    def redact_detections(image: DeviceImage, dets: Detections, style: Style) -> np.ndarray:
        """Like ``engines.redact._cpu_redact_detections``: each category in its own style,
        tracked boxes uncertain, the rectangles returned in the same order; every category in
        the same three launches."""
        uncertain = dets.origin == Origin.TRACKED
        if not style.overrides or not len(dets):
            return _redact_groups(image, [(dets.xyxy, style, uncertain)])
        groups: list[tuple[np.ndarray, Style, np.ndarray | None]] = []
        for cat in np.unique(dets.category):
            sel = dets.category == cat
            groups.append((dets.xyxy[sel], style.for_category(str(cat)), uncertain[sel]))
        return _redact_groups(image, groups)

    @staticmethod
    def cover_all(image: DeviceImage, style: Style) -> None:
        """The whole frame: the fill colour on every plane, or the frame as one box-shaped
        rectangle blurred or pixelated (``engines.redact._cpu_cover_all``)."""
        whole = np.array([[0, 0, image.width, image.height]], np.int32)
        method = _METHOD_CODE[style.method]
        _run_plan(image, _rects_plan(image, whole, np.zeros(1, bool),
                                     np.array([method]), [style.fill_bgr]))

    @staticmethod
    def cover_zone(image: DeviceImage, polygon: np.ndarray, style: Style) -> None:
        """A privacy zone, on the host: zones are rare and their pixels few.

        The polygon's bounding region (for NV12 widened to even coordinates, so the chroma
        region is the luma one halved) is downloaded as BGR, covered by
        ``engines.redact._cpu_cover_zone`` and written back. For NV12 it is converted back with
        OpenCV's BGR -> I420: the luma pixels inside the polygon take their new value, a chroma
        pixel one of whose four luma pixels is inside takes the chroma of the covered pixels of
        its block; every other pixel of the region is written back as it was read.
        """
        w, h = image.width, image.height
        poly = np.round(np.asarray(polygon, np.float64)).astype(np.int64)
        x1, y1 = (int(v) for v in np.clip(poly.min(0), 0, [w, h]))
        x2, y2 = (int(v) for v in np.clip(poly.max(0) + 1, 0, [w, h]))
        if x2 <= x1 or y2 <= y1:
            return
        if image.layout == "bgr":
            plane = image.planes[0][0]
            region = np.ascontiguousarray(plane[y1:y2, x1:x2].copy_to_host())
            _cpu_cover_zone(region, np.asarray(polygon, np.float64) - [x1, y1], style)
            plane[y1:y2, x1:x2] = region
            return
        x1, y1 = x1 & ~1, y1 & ~1
        x2, y2 = x2 + (x2 & 1), y2 + (y2 & 1)
        yp, uvp = image.planes[0][0], image.planes[1][0]
        y_old = np.ascontiguousarray(yp[y1:y2, x1:x2].copy_to_host())
        uv_old = np.ascontiguousarray(uvp[y1 // 2 : y2 // 2, x1 // 2 : x2 // 2].copy_to_host())
        before = _nv12_host_to_bgr(y_old, uv_old)
        after = before.copy()
        shifted = np.asarray(polygon, np.float64) - [x1, y1]
        _cpu_cover_zone(after, shifted, style)
        # the pixels _cpu_cover_zone covers (its own mask, in region pixels)
        hh, ww = after.shape[:2]
        mask = np.zeros((hh, ww), np.uint8)
        cv2.fillPoly(mask, [np.round(shifted).astype(np.int32)], 255)
        inside = mask > 0
        if not inside.any():
            return
        # a chroma pixel one of whose luma pixels is covered takes the chroma of the covered
        # ones: the block's uncovered pixels borrow a covered pixel's colour before the I420
        # conversion averages the block
        blocks = inside.reshape(hh // 2, 2, ww // 2, 2).transpose(0, 2, 1, 3).reshape(
            hh // 2, ww // 2, 4)
        touched = blocks.any(-1)
        donor_idx = blocks.argmax(-1)
        quads = after.reshape(hh // 2, 2, ww // 2, 2, 3).transpose(0, 2, 1, 3, 4).reshape(
            hh // 2, ww // 2, 4, 3)
        donor = np.take_along_axis(quads, donor_idx[:, :, None, None], 2)
        quads = np.where(blocks[..., None], quads, donor)
        borrowed = quads.reshape(hh // 2, ww // 2, 2, 2, 3).transpose(0, 2, 1, 3, 4).reshape(
            hh, ww, 3)
        y_new, _ = _bgr_to_nv12_host(after)
        _, uv_new = _bgr_to_nv12_host(borrowed)
        yp[y1:y2, x1:x2] = np.where(inside[:, :, None], y_new, y_old)
        uvp[y1 // 2 : y2 // 2, x1 // 2 : x2 // 2] = np.where(touched[:, :, None], uv_new, uv_old)

    @staticmethod
    def thumbnail(image: DeviceImage, width: int, height: int) -> np.ndarray:
        """A small host BGR copy (area average) made on the device: one launch shrinks every
        plane to width x height with the INTER_AREA kernel, and only the small planes are
        downloaded. A BGR frame gives exactly ``cv2.resize(..., INTER_AREA)``; NV12 averages
        Y, U and V, then converts (within a grey level or two of averaging the converted
        picture). A thumbnail larger than a plane is made on the host from :meth:`to_bgr`."""
        width, height = int(width), int(height)
        if any(width > arr.shape[1] or height > arr.shape[0] for arr, _ in image.planes):
            return cv2.resize(image.to_bgr(), (width, height), interpolation=cv2.INTER_AREA)
        dims = _plane_dims(image)
        parts = [_part(p, pw, ph, ch, _BLUR, width, height, False)
                 for p, (ph, pw, ch, _sub) in enumerate(dims)]
        runs = [np.tile(np.array([[0, pw, 1]], np.int32), (ph, 1)) for ph, pw, _ch, _sub in dims]
        zero = np.zeros(1, np.int64)
        plan = _assemble([_block(parts, runs)], np.zeros(len(dims), np.int64), zero, zero,
                         np.zeros(3, np.int64))
        p0 = image.planes[0][0]
        p1 = image.planes[1][0] if len(image.planes) > 1 else p0
        tabs = _SCRATCH.upload(plan)
        small = _SCRATCH.small_images(plan.small_size)[0]
        _launch(_downscale_kernel, int(plan.cum_small[-1]), p0, p1, tabs["rt"],
                tabs["cum_small"], tabs["tab_start"], tabs["tab_src"], tabs["tab_alpha"], small)
        host = small[: plan.small_size].copy_to_host()
        if image.layout == "bgr":
            return host.reshape(height, width, 3)
        n = width * height
        uv = host[n:].reshape(height, width, 2)
        return _yuv444_to_bgr(host[:n].reshape(height, width), uv[..., 0], uv[..., 1])


register_kernels("cuda", CudaKernels())


# --------------------------------------------------------------------------------------------
# detector input


@lru_cache(maxsize=64)
def _letterbox_tabs(width: int, height: int, nw: int,
                    nh: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area weights of both axes in one table: starts of x then of y (absolute entries)."""
    xs, xsrc, xa = _area_tab(width, nw)
    ys, ysrc, ya = _area_tab(height, nh)
    starts = np.concatenate([xs, ys + len(xsrc)]).astype(np.int32)
    return starts, np.concatenate([xsrc, ysrc]), np.concatenate([xa, ya])


def letterbox_planar(image: DeviceImage, out_w: int, out_h: int, scale_w: float,
                     scale_h: float, pad: float = 0.0) -> Any:
    """A detector's input made on the GPU in one launch: device float32 (1, 3, out_h, out_w),
    planar B, G, R in 0..255.

    The picture is scaled to ``max(1, round(width * scale_w))`` x
    ``max(1, round(height * scale_h))`` like ``engines.faces._letterbox`` (linear interpolation
    when a scale is above 1, area average otherwise, a copy at the same size) and put at the top
    left; the rest is ``pad``; a scaled picture larger than the output is cut at its right and
    bottom. NV12 samples are converted with OpenCV's own NV12 -> BGR arithmetic (the chroma of
    each 2x2 block, as OpenCV upsamples it), before interpolation, without rounding after it.
    """
    w, h = image.width, image.height
    nw, nh = max(1, round(w * scale_w)), max(1, round(h * scale_h))
    if (nw, nh) == (w, h):
        mode = 0
    elif scale_w > 1 or scale_h > 1:
        mode = 1
    else:
        mode = 2
    tabs = _SCRATCH.constant((w, h, nw, nh) if mode == 2 else (),
                             lambda: _letterbox_tabs(w, h, nw, nh) if mode == 2 else (
                                 np.zeros(1, np.int32), np.zeros(1, np.int32),
                                 np.zeros(1, np.float32)))
    out = _Host.device_array((1, 3, int(out_h), int(out_w)), np.float32)
    p0 = image.planes[0][0]
    p1 = image.planes[1][0] if len(image.planes) > 1 else p0
    _launch(_letterbox_kernel, int(out_w) * int(out_h), p0, p1, int(image.layout == "nv12"),
            w, h, nw, nh, mode, *tabs, np.float32(pad), out)
    return out
