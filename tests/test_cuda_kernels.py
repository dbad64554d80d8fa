"""GPU redaction kernels (engines.cuda_kernels) against the CPU kernels, run on a GPU or in
numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set by conftest before numba is imported).

The simulator runs every GPU thread as Python, so frames are small (at most 96x64) and boxes few.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

numba_cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
if not numba_cuda.is_available():
    pytest.skip("no CUDA GPU and NUMBA_ENABLE_CUDASIM is not set", allow_module_level=True)

import av  # noqa: E402
import cv2  # noqa: E402

from engines import cuda_kernels as ck  # noqa: E402
from engines.arrays import _KERNELS  # noqa: E402
from engines.detections import Detections, Origin  # noqa: E402
from engines.faces import _letterbox  # noqa: E402
from engines.redact import (  # noqa: E402
    BLUR_SAMPLES_ACROSS,
    PIXELATE_CELLS_ACROSS,
    Method,
    Shape,
    Style,
    _cpu_cover_all,
    _cpu_cover_zone,
    _cpu_redact_detections,
    _ellipse_mask,
    mask_rects,
    redact_boxes,
)

FILL = (10, 200, 30)


def noise(h: int, w: int, seed: int) -> np.ndarray:
    """Random BGR with some smooth parts (so both detail and near-ties reach the kernels)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[:, : w // 2] = cv2.GaussianBlur(img[:, : w // 2], (5, 5), 0)
    return img


def smooth(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth colourful picture (what chroma subsampling keeps)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    planes = [128 + 90 * np.sin(xx / 9 + s) * np.cos(yy / 11 - s) for s in rng.uniform(0, 6, 3)]
    return np.clip(np.stack(planes, -1), 0, 255).astype(np.uint8)


def outside(shape: tuple[int, ...], rects: np.ndarray) -> np.ndarray:
    """Boolean mask of the pixels outside every rectangle."""
    mask = np.ones(shape[:2], bool)
    for x1, y1, x2, y2 in rects:
        mask[y1:y2, x1:x2] = False
    return mask


def separate(rects: np.ndarray) -> bool:
    """No two rectangles overlap."""
    for i in range(len(rects)):
        for j in range(i):
            a, b = rects[i], rects[j]
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                return False
    return True


def random_boxes(seed: int, w: int, h: int, n: int, scale: float) -> np.ndarray:
    """n boxes of 3..20 px whose grown rectangles do not overlap, the first at the border."""
    rng = np.random.default_rng(seed)
    boxes = [np.array([0.0, 2.0, 9.5, 13.0])]
    while len(boxes) < n:
        bw, bh = rng.uniform(3, 20, 2)
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        cand = np.array([*boxes, np.array([x, y, x + bw, y + bh])])
        if separate(mask_rects(cand, w, h, scale)) and len(mask_rects(cand, w, h, scale)) == \
                len(cand):
            boxes = list(cand)
    return np.array(boxes)


# Boxes chosen to reach every path of the kernels, at mask scale 1.0 on a 96x64 frame: tiny
# (< 6 px: box even as ellipse), 16x16 (pixelate: OpenCV's 2x2 area shortcut), 20x20 (blur: 4x4
# integer area), 17x13 and 24x24 (fractional area weights / 3x3 integer), cut by the left and the
# bottom border, elongated, fractional coordinates.
SIZES = np.array([
    [3, 3, 7, 8], [10, 2, 26, 18], [30, 2, 50, 22], [55, 3, 72, 16], [70, 30, 94, 54],
    [0, 30, 12, 50], [20, 50, 40, 64], [45, 24, 55, 62], [58.3, 40.6, 66.8, 49.2],
], np.float64)
CASES = {
    "sizes": (96, 64, SIZES, 1.0),
    "grown": (64, 48, random_boxes(5, 64, 48, 4, 1.3), 1.3),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", list(Shape))
@pytest.mark.parametrize("method", list(Method))
def test_bgr_matches_the_cpu_kernel(method: Method, shape: Shape, case: str) -> None:
    w, h, boxes, scale = CASES[case]
    style = Style(method, shape, scale, FILL)
    src = noise(h, w, 11)
    cpu = src.copy()
    cpu_rects = redact_boxes(cpu, boxes, style)
    assert separate(cpu_rects)
    image = ck.DeviceImage.from_bgr(src, layout="bgr")
    rects = ck.redact_boxes(image, boxes, style)
    gpu = image.to_bgr()
    assert rects.tolist() == cpu_rects.tolist()
    diff = np.abs(gpu.astype(int) - cpu)
    assert diff.max() <= (0 if method is Method.FILL else 1), f"max diff {diff.max()}"
    # every rectangle really covered (the CPU changed it), nothing else touched
    inside = ~outside(src.shape, rects)
    assert (gpu[inside] != src[inside]).any(-1).mean() > 0.5
    out = outside(src.shape, rects)
    assert np.array_equal(gpu[out], src[out])


def test_every_area_path_is_reached() -> None:
    """The SIZES table drives OpenCV's three INTER_AREA paths in the downscale kernel."""
    image = ck.DeviceImage.from_bgr(noise(64, 96, 1), layout="bgr")
    seen = set()
    for method in (Method.BLUR, Method.PIXELATE):
        rects, ellipse = ck._style_rects(image, SIZES, Style(method, Shape.BOX, 1.0), None)
        plan = ck._rects_plan(image, rects, ellipse,
                              np.full(len(rects), ck._METHOD_CODE[method]), [FILL] * len(rects))
        assert plan is not None
        seen |= set(plan.rt[:, ck._AREA].tolist())
    assert seen == {ck._AREA_GENERAL, ck._AREA_INT, ck._AREA_2X2}


def yuv_of(bgr: tuple[int, int, int]) -> tuple[int, int, int]:
    i420 = cv2.cvtColor(np.full((2, 2, 3), bgr, np.uint8), cv2.COLOR_BGR2YUV_I420).ravel()
    return int(i420[0]), int(i420[4]), int(i420[5])


def planes(image: ck.DeviceImage) -> tuple[np.ndarray, np.ndarray]:
    return image.planes[0][0].copy_to_host()[:, :, 0], image.planes[1][0].copy_to_host()


NV12_BOXES = np.array([[3, 5, 9, 12], [14, 2, 34, 20], [36, 8, 48, 30], [2, 18, 12, 32]],
                      np.float64)


@pytest.mark.parametrize("shape", list(Shape))
@pytest.mark.parametrize("method", list(Method))
def test_nv12_luma_is_the_cpu_kernel_on_the_y_plane(method: Method, shape: Shape) -> None:
    src = noise(32, 48, 3)
    image = ck.DeviceImage.from_bgr(src)
    y0, uv0 = planes(image)
    style = Style(method, shape, 1.0, FILL)
    rects = ck.redact_boxes(image, NV12_BOXES, style)
    y1, uv1 = planes(image)
    # the CPU kernel on the Y plane as a grey image (channels are independent)
    yf = yuv_of(FILL)[0]
    cpu = np.repeat(y0[:, :, None], 3, -1)
    cpu_rects = redact_boxes(cpu, NV12_BOXES, Style(method, shape, 1.0, (yf, yf, yf)))
    assert rects.tolist() == cpu_rects.tolist()
    diff = np.abs(y1.astype(int) - cpu[:, :, 0])
    assert diff.max() <= (0 if method is Method.FILL else 1), f"max diff {diff.max()}"
    out = outside(y0.shape, rects)
    assert np.array_equal(y1[out], y0[out])
    # chroma: only the luma rectangles halved and rounded outward
    chroma_rects = np.array([[x1 // 2, y1_ // 2, -(-x2 // 2), -(-y2 // 2)]
                             for x1, y1_, x2, y2 in rects])
    cout = outside(uv0.shape, chroma_rects)
    assert np.array_equal(uv1[cout], uv0[cout])
    assert (uv1[~cout] != uv0[~cout]).any(-1).mean() > 0.3


@pytest.mark.parametrize("x2", [8, 9])
def test_nv12_chroma_rectangle_is_rounded_outward(x2: int) -> None:
    src = noise(32, 48, 4)
    image = ck.DeviceImage.from_bgr(src)
    y0, uv0 = planes(image)
    ck.redact_boxes(image, np.array([[3.0, 5.0, x2, 12.0]]), Style(Method.FILL, Shape.BOX, 1.0))
    y1, uv1 = planes(image)
    luma = np.zeros(y0.shape, bool)
    luma[5:12, 3:x2] = True
    assert (y1[luma] == 16).all()
    assert np.array_equal(y1[~luma], y0[~luma])
    chroma = np.zeros(uv0.shape[:2], bool)
    chroma[2:6, 1 : -(-x2 // 2)] = True  # x 3 -> 1, 8 -> 4, 9 -> 5; y 5 -> 2, 12 -> 6
    assert (uv1[chroma] == 128).all()
    assert np.array_equal(uv1[~chroma], uv0[~chroma])
    assert (uv0[chroma] != 128).any()


def test_nv12_ellipse_chroma_follows_the_luma_ellipse() -> None:
    """A chroma pixel is covered exactly when one of its four luma pixels is."""
    src = noise(32, 48, 5)
    image = ck.DeviceImage.from_bgr(src)
    y0, uv0 = planes(image)
    boxes = np.array([[5.0, 3.0, 22.0, 28.0], [25.0, 7.0, 46.0, 20.0]])
    rects = ck.redact_boxes(image, boxes, Style(Method.FILL, Shape.ELLIPSE, 1.0))
    y1, uv1 = planes(image)
    luma = np.zeros(y0.shape, bool)
    for x1, y1_, x2, y2 in rects:
        luma[y1_:y2, x1:x2] = _ellipse_mask(int(x2 - x1), int(y2 - y1_))[:, :, 0]
    assert (y1[luma] == 16).all()
    assert np.array_equal(y1[~luma], y0[~luma])
    chroma = luma.reshape(16, 2, 24, 2).any((1, 3))
    assert (uv1[chroma] == 128).all()
    assert np.array_equal(uv1[~chroma], uv0[~chroma])


def count_launches(fn: Callable[..., Any], *args: Any) -> int:
    before = ck.LAUNCHES
    fn(*args)
    return ck.LAUNCHES - before


@pytest.mark.parametrize("layout", ["bgr", "nv12"])
def test_one_launch_set_whatever_the_number_of_boxes(layout: str) -> None:
    src = noise(48, 64, 6)
    boxes = random_boxes(7, 64, 48, 6, 1.0)
    for method, launches in ((Method.BLUR, 3), (Method.PIXELATE, 3), (Method.FILL, 1)):
        style = Style(method, Shape.ELLIPSE, 1.0)
        for n in (1, 6):
            image = ck.DeviceImage.from_bgr(src, layout)
            assert count_launches(ck.redact_boxes, image, boxes[:n], style) == launches
    image = ck.DeviceImage.from_bgr(src, layout)
    assert count_launches(ck.redact_boxes, image, boxes[:0], Style()) == 0


def test_redact_detections_mirrors_the_cpu() -> None:
    """Per-category styles and tracked (uncertain) boxes, every category in one launch set."""
    w, h = 64, 48
    src = noise(h, w, 8)
    # the tracked face's grown box leaves the frame: it is covered as a box, not an ellipse
    faces = Detections(np.array([[20, 6, 34, 20], [50, 30, 63, 44]], np.float32),
                       np.ones(2, np.float32), np.array(["faces"] * 2),
                       origin=np.array([Origin.DETECTED, Origin.TRACKED], np.uint8))
    plates = Detections.from_boxes(np.array([[36, 2, 56, 12]], np.float32), [0.9], "plates")
    text = Detections.from_boxes(np.array([[4, 30, 24, 44]], np.float32), [0.9], "text")
    dets = Detections.concat([faces, plates, text])
    style = Style(Method.BLUR, Shape.ELLIPSE, 1.2,
                  overrides={"plates": Style(Method.PIXELATE, Shape.BOX, 1.0),
                             "text": Style(Method.FILL, Shape.ELLIPSE, 1.2, FILL)})
    cpu = src.copy()
    cpu_rects = _cpu_redact_detections(cpu, dets, style)
    assert separate(cpu_rects)
    image = ck.DeviceImage.from_bgr(src, layout="bgr")
    kernels = ck.CudaKernels()
    before = ck.LAUNCHES
    rects = kernels.redact_detections(image, dets, style)
    assert ck.LAUNCHES - before == 3
    assert rects.dtype == np.int32
    assert rects.tolist() == cpu_rects.tolist()
    gpu = image.to_bgr()
    assert np.abs(gpu.astype(int) - cpu).max() <= 1
    # the tracked face's corners are covered too (box shape, like the CPU)
    x1, y1, x2, y2 = rects[1]
    assert x2 == w
    corners = gpu[[y1, y1, y2 - 1, y2 - 1], [x1, x2 - 1, x1, x2 - 1]]
    assert (corners != src[[y1, y1, y2 - 1, y2 - 1], [x1, x2 - 1, x1, x2 - 1]]).any(-1).all()
    empty = kernels.redact_detections(image, Detections.empty(), style)
    assert empty.shape == (0, 4)


@pytest.mark.parametrize("layout", ["bgr", "nv12"])
def test_cover_all_fill(layout: str) -> None:
    image = ck.DeviceImage.from_bgr(noise(32, 48, 9), layout)
    ck.CudaKernels().cover_all(image, Style(Method.FILL, fill_bgr=(0, 0, 0)))
    if layout == "bgr":
        assert (image.to_bgr() == 0).all()
    else:
        y, uv = planes(image)
        assert (y == 16).all() and (uv == 128).all()


@pytest.mark.parametrize("method", [Method.BLUR, Method.PIXELATE])
def test_cover_all_smooths_the_whole_frame_like_the_cpu(method: Method) -> None:
    src = noise(32, 48, 10)
    cpu = src.copy()
    _cpu_cover_all(cpu, Style(method))
    image = ck.DeviceImage.from_bgr(src, layout="bgr")
    ck.CudaKernels().cover_all(image, Style(method))
    gpu = image.to_bgr()
    assert np.abs(gpu.astype(int) - cpu).max() <= 1
    assert (gpu != src).any(-1).mean() > 0.9


TRIANGLE = np.array([[6.2, 4.0], [40.0, 9.6], [15.0, 27.0]])


def triangle_mask(h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(TRIANGLE).astype(np.int32)], 255)
    return mask > 0


def test_cover_zone_bgr_is_the_cpu_zone() -> None:
    src = noise(32, 48, 12)
    cpu = src.copy()
    _cpu_cover_zone(cpu, TRIANGLE, Style(Method.PIXELATE))
    image = ck.DeviceImage.from_bgr(src, layout="bgr")
    ck.CudaKernels().cover_zone(image, TRIANGLE, Style(Method.PIXELATE))
    gpu = image.to_bgr()
    assert np.array_equal(gpu, cpu)
    inside = triangle_mask(32, 48)
    assert (gpu[inside] != src[inside]).any(-1).mean() > 0.8
    assert np.array_equal(gpu[~inside], src[~inside])


@pytest.mark.parametrize("method", [Method.FILL, Method.PIXELATE])
def test_cover_zone_nv12_covers_the_triangle_only(method: Method) -> None:
    image = ck.DeviceImage.from_bgr(noise(32, 48, 13))
    y0, uv0 = planes(image)
    ck.CudaKernels().cover_zone(image, TRIANGLE, Style(method, fill_bgr=(0, 0, 0)))
    y1, uv1 = planes(image)
    inside = triangle_mask(32, 48)
    chroma = inside.reshape(16, 2, 24, 2).any((1, 3))
    assert np.array_equal(y1[~inside], y0[~inside])
    assert np.array_equal(uv1[~chroma], uv0[~chroma])
    if method is Method.FILL:
        assert (y1[inside] == 16).all()
        assert (uv1[chroma] == 128).all()
    else:
        assert (y1[inside] != y0[inside]).mean() > 0.8
        assert (uv1[chroma] != uv0[chroma]).any(-1).mean() > 0.8


@pytest.mark.parametrize("size", [(12, 8), (7, 5)])
def test_thumbnail(size: tuple[int, int]) -> None:
    tw, th = size
    src = smooth(32, 48, 14)
    bgr = ck.DeviceImage.from_bgr(src, layout="bgr")
    thumb = ck.CudaKernels().thumbnail(bgr, tw, th)
    assert np.array_equal(thumb, cv2.resize(src, (tw, th), interpolation=cv2.INTER_AREA))
    nv12 = ck.DeviceImage.from_bgr(src)
    thumb = ck.CudaKernels().thumbnail(nv12, tw, th)
    assert thumb.shape == (th, tw, 3) and thumb.dtype == np.uint8
    ref = cv2.resize(nv12.to_bgr(), (tw, th), interpolation=cv2.INTER_AREA)
    diff = np.abs(thumb.astype(int) - ref)
    assert diff.max() <= 3 and diff.mean() < 1.0, (diff.max(), diff.mean())


def test_device_image_round_trip() -> None:
    src = smooth(32, 48, 15)
    image = ck.DeviceImage.from_bgr(src)
    assert image.layout == "nv12" and image.shape == (32, 48, 3)
    assert image.device_kind == "cuda"
    assert [(*a.shape, s) for a, s in image.planes] == [(32, 48, 1, 1), (16, 24, 2, 2)]
    back = image.to_bgr()
    # exactly OpenCV's own 4:2:0 round trip, close to the source on a smooth picture
    i420 = cv2.cvtColor(cv2.cvtColor(src, cv2.COLOR_BGR2YUV_I420), cv2.COLOR_YUV2BGR_I420)
    assert np.array_equal(back, i420)
    diff = np.abs(back.astype(int) - src)
    assert diff.max() <= 10 and diff.mean() < 2.5, (diff.max(), diff.mean())
    dup = image.copy()
    ck.CudaKernels().cover_all(dup, Style(Method.FILL))
    assert np.array_equal(image.to_bgr(), back)
    assert not np.array_equal(dup.to_bgr(), back)
    # odd sizes cannot be NV12: kept as BGR
    odd = ck.DeviceImage.from_bgr(src[:31, :47])
    assert odd.layout == "bgr" and np.array_equal(odd.to_bgr(), src[:31, :47])


def test_to_nv12_host_is_what_pyav_takes() -> None:
    src = smooth(32, 48, 16)
    for layout in ("nv12", "bgr"):
        arr = ck.DeviceImage.from_bgr(src, layout).to_nv12_host()
        assert arr.shape == (48, 48) and arr.dtype == np.uint8
        decoded = av.VideoFrame.from_ndarray(arr, format="nv12").to_ndarray(format="bgr24")
        diff = np.abs(decoded.astype(int) - src)
        assert diff.max() <= 10 and diff.mean() < 3.0, (diff.max(), diff.mean())


def test_nv12_planes_from_pitched_device_memory() -> None:
    """A decoder's planes have rows longer than the picture; they are used in place."""
    src = noise(32, 48, 17)
    i420 = cv2.cvtColor(src, cv2.COLOR_BGR2YUV_I420)
    y = np.zeros((32, 64), np.uint8)
    y[:, :48] = i420[:32]
    uv = np.zeros((16, 64), np.uint8)
    u, v = i420[32:40].reshape(16, 24), i420[40:].reshape(16, 24)
    uv[:, :48] = np.stack([u, v], -1).reshape(16, 48)
    dy, duv = numba_cuda.to_device(y), numba_cuda.to_device(uv)
    image = ck.DeviceImage.from_nv12_planes(dy[:, :48], duv[:, :48])
    assert image.shape == (32, 48, 3)
    assert np.array_equal(image.to_bgr(), cv2.cvtColor(i420, cv2.COLOR_YUV2BGR_I420))
    ck.redact_boxes(image, np.array([[4.0, 4.0, 20.0, 20.0]]), Style(Method.FILL, Shape.BOX, 1.0))
    y_after, uv_after = dy.copy_to_host(), duv.copy_to_host()
    assert (y_after[4:20, 4:20] == 16).all() and (uv_after[2:10, 4:20] == 128).all()
    assert (y_after[:, 48:] == 0).all() and (uv_after[:, 48:] == 0).all()
    assert np.array_equal(y_after[20:, :48], y[20:, :48])


@pytest.mark.parametrize("scale", [1.0, 1.5, 0.75])
@pytest.mark.parametrize("layout", ["nv12", "bgr"])
def test_letterbox_planar_matches_the_faces_preprocessing(layout: str, scale: float) -> None:
    """engines.faces' CPU input (cv2 resize, pad to 32, planar float) on the same picture.

    The CPU rounds its resized picture to uint8 (and its INTER_LINEAR weights to 1/2048); the
    kernel converts NV12 exactly as OpenCV does and interpolates without rounding, so the two
    differ by at most about half a grey level (measured: max 0.75 at 1.5x, 0.5 at 0.75x, 0
    at 1x)."""
    image = ck.DeviceImage.from_bgr(smooth(32, 48, 18) // 2 + noise(32, 48, 18) // 2, layout)
    padded, _sx, _sy = _letterbox(image.to_bgr(), scale)
    ref = padded.transpose(2, 0, 1)[None].astype(np.float32)
    ph, pw = padded.shape[:2]
    out = ck.letterbox_planar(image, pw, ph, scale, scale).copy_to_host()
    assert out.shape == (1, 3, ph, pw) and out.dtype == np.float32
    diff = np.abs(out - ref)
    print(f"letterbox {layout} x{scale}: max {diff.max():.3f} mean {diff.mean():.4f}")
    assert diff.max() <= 1.0 and diff.mean() < 0.3, (diff.max(), diff.mean())
    # the padding value, and only outside the scaled picture
    nh, nw = round(32 * scale), round(48 * scale)
    padded_out = ck.letterbox_planar(image, pw, ph, scale, scale, pad=114.0).copy_to_host()
    assert (padded_out[:, :, nh:, :] == 114.0).all() and (padded_out[:, :, :, nw:] == 114.0).all()
    assert np.array_equal(padded_out[:, :, :nh, :nw], out[:, :, :nh, :nw])


def test_cuda_kernels_are_registered() -> None:
    assert isinstance(_KERNELS["cuda"], ck.CudaKernels)


# --------------------------------------------------------------------------------------------
# the host-side planner against the straightforward one it replaced (one rectangle at a time)


def reference_ellipse_spans(w: int, h: int) -> np.ndarray:
    mask = _ellipse_mask(w, h)[:, :, 0]
    any_ = mask.any(1)
    start = np.where(any_, mask.argmax(1), 0)
    end = np.where(any_, w - mask[:, ::-1].argmax(1), 0)
    return np.stack([start, end], 1).astype(np.int32)


def reference_small_size(method: int, w: int, h: int) -> tuple[int, int]:
    if method == ck._BLUR:
        cell = max(1.0, min(w, h) / BLUR_SAMPLES_ACROSS)
        return max(1, round(w / cell)), max(1, round(h / cell))
    if method == ck._PIXELATE:
        cell = max(2.0, min(w, h) / PIXELATE_CELLS_ACROSS)
        return max(1, math.ceil(w / cell)), max(1, math.ceil(h / cell))
    return 0, 0


def reference_plan(image: ck.DeviceImage, rects: np.ndarray, ellipse: np.ndarray,
                   methods: list[int], fills: list[tuple[int, int, int]]) -> dict[str, Any]:
    """The tables of every plane's rectangle for every frame rectangle, built one rectangle and
    one plane at a time (the planner's first version)."""
    jobs = []
    for k, (x1, y1, x2, y2) in enumerate(np.asarray(rects, np.int64).reshape(-1, 4).tolist()):
        w, h = x2 - x1, y2 - y1
        if w <= 0 or h <= 0:
            continue
        if ellipse[k]:
            luma = reference_ellipse_spans(w, h) + np.int32(x1)
        else:
            luma = np.tile(np.array([[x1, x2]], np.int32), (h, 1))
        if image.layout == "bgr":
            plane_fills: list[tuple[int, ...]] = [tuple(fills[k])]
        else:
            y, u, v = yuv_of(fills[k])
            plane_fills = [(y,), (u, v)]
        for p, ((arr, sub), fill) in enumerate(zip(image.planes, plane_fills, strict=True)):
            ph, pw, ch = (int(s) for s in arr.shape)
            if sub == 1:
                px1, py1, px2, py2 = x1, y1, x2, y2
                spans = luma
            else:
                px1, py1 = x1 // sub, y1 // sub
                px2, py2 = min(-(-x2 // sub), pw), min(-(-y2 // sub), ph)
                rows = np.arange(py1, py2)
                lo = np.full(len(rows), x2, np.int64)
                hi = np.full(len(rows), x1, np.int64)
                for dy in range(sub):
                    ly = np.clip(rows * sub + dy, y1, y2 - 1) - y1
                    run = luma[ly].astype(np.int64)
                    full = run[:, 1] > run[:, 0]
                    lo = np.where(full, np.minimum(lo, run[:, 0]), lo)
                    hi = np.where(full, np.maximum(hi, run[:, 1]), hi)
                spans = np.stack([lo // sub, -(-hi // sub)], 1).astype(np.int32)
                spans[hi <= lo] = 0
            pwid, phei = px2 - px1, py2 - py1
            if pwid <= 0 or phei <= 0:
                continue
            sw, sh = reference_small_size(methods[k], pwid, phei)
            jobs.append((p, px1, py1, pwid, phei, ch, methods[k], sw, sh,
                         methods[k] == ck._BLUR and sw >= 3 and sh >= 3, spans, fill))
    n = len(jobs)
    rt = np.zeros((n, ck._NCOL), np.int32)
    rf = np.zeros((n, 2), np.float64)
    starts, srcs, alphas = [], [], []
    n_start = n_entries = soff = span_rows = 0
    for i, (p, x1, y1, w, h, ch, method, sw, sh, gauss, _spans, fill) in enumerate(jobs):
        row = rt[i]
        row[[ck._PLANE, ck._X1, ck._Y1, ck._W, ck._H, ck._CH, ck._METHOD]] = (
            p, x1, y1, w, h, ch, method)
        row[ck._SPAN] = span_rows
        span_rows += h
        row[ck._FILL0 : ck._FILL0 + len(fill)] = fill
        if method == ck._FILL:
            continue
        row[[ck._SW, ck._SH, ck._GAUSS, ck._SOFF]] = sw, sh, int(gauss), soff
        soff += sw * sh * ch
        rf[i] = 1.0 / (w / sw), 1.0 / (h / sh)
        scale_x, scale_y = 1.0 / (sw / w), 1.0 / (sh / h)
        ix, iy = round(scale_x), round(scale_y)
        if abs(scale_x - ix) < ck._DBL_EPSILON and abs(scale_y - iy) < ck._DBL_EPSILON:
            two = ix == 2 and iy == 2 and ch in (1, 3, 4)
            row[[ck._AREA, ck._IX, ck._IY]] = ck._AREA_2X2 if two else ck._AREA_INT, ix, iy
            continue
        row[ck._AREA] = ck._AREA_GENERAL
        for col, (ss, ds) in ((ck._AX, (w, sw)), (ck._AY, (h, sh))):
            st, src, alpha = ck._area_tab(ss, ds)
            row[col] = n_start
            starts.append(st + n_entries)
            srcs.append(src)
            alphas.append(alpha)
            n_start += len(st)
            n_entries += len(src)
    small = np.where(rt[:, ck._METHOD] == ck._FILL, 0,
                     rt[:, ck._SW].astype(np.int64) * rt[:, ck._SH])
    big = rt[:, ck._W].astype(np.int64) * rt[:, ck._H]
    return {
        "rt": rt, "rf": rf,
        "cum_small": np.concatenate([[0], np.cumsum(small)]).astype(np.int64),
        "cum_big": np.concatenate([[0], np.cumsum(big)]).astype(np.int64),
        "spans": (np.concatenate([j[10] for j in jobs]).astype(np.int32) if jobs
                  else np.zeros((0, 2), np.int32)),
        "tab_start": np.concatenate(starts) if starts else np.zeros(0, np.int32),
        "tab_src": np.concatenate(srcs) if srcs else np.zeros(0, np.int32),
        "tab_alpha": np.concatenate(alphas) if alphas else np.zeros(0, np.float32),
        "small_size": soff,
    }


def test_ellipse_runs_are_the_mask_rows() -> None:
    """Counting the covered columns of each row's left half gives every row of
    ``_ellipse_mask`` exactly."""
    rng = np.random.default_rng(21)
    sizes = [(w, h) for w in range(1, 80) for h in range(1, 80)]
    sizes += [(int(a), int(b)) for a, b in rng.integers(80, 700, (60, 2))]
    sizes += [(1920, 1080), (1080, 1920), (1000, 3), (3, 1000), (2, 999), (999, 2)]
    for w, h in sizes:
        ck._starts.cache_clear()
        runs = ck._luma_runs.__wrapped__(w, h, True)
        assert np.array_equal(runs[:, :2], reference_ellipse_spans(w, h)), (w, h)
        assert (runs[:, 2] == 1).all()


def plan_case(seed: int, layout: str, width: int, height: int,
              n: int) -> tuple[ck.DeviceImage, np.ndarray, np.ndarray, np.ndarray, list[Any]]:
    rng = np.random.default_rng(seed)
    image = ck.DeviceImage.from_bgr(np.zeros((height, width, 3), np.uint8), layout)
    side = rng.integers(1, max(2, min(width, height) // 3), (n, 2))
    x1 = rng.integers(-side[:, 0] // 2, width)
    y1 = rng.integers(-side[:, 1] // 2, height)
    rects = np.stack([x1, y1, x1 + side[:, 0], y1 + side[:, 1]], 1)
    rects = np.clip(rects, 0, [width, height, width, height])
    empty = rng.random(n) < 0.1
    rects[empty, 2] = rects[empty, 0]
    ellipse = rng.random(n) < 0.7
    methods = rng.integers(0, 3, n)
    palette = [(0, 0, 0), FILL, (255, 255, 255)]
    fills = [palette[i] for i in rng.integers(0, 3, n)]
    return image, rects.astype(np.int32), ellipse, methods, fills


def same_plan(plan: ck._Plan | None, want: dict[str, Any]) -> None:
    if plan is None:
        assert len(want["rt"]) == 0
        return
    for name, ref in want.items():
        got = getattr(plan, name)
        if name == "small_size":
            assert got == ref
            continue
        assert got.dtype == ref.dtype, (name, got.dtype, ref.dtype)
        assert np.array_equal(got, ref), name


@pytest.mark.parametrize(("layout", "width", "height"),
                         [("nv12", 1920, 1080), ("nv12", 96, 64), ("bgr", 97, 63),
                          ("bgr", 640, 480)])
def test_planned_tables_are_the_one_rectangle_at_a_time_ones(layout: str, width: int,
                                                             height: int) -> None:
    """Tables made of per-shape blocks (new ones, then the same shapes elsewhere in the frame)
    are the tables the one-rectangle-at-a-time planner gave."""
    ck._BLOCKS.clear()
    for cached in (ck._squares, ck._starts, ck._luma_runs, ck._part):
        cached.cache_clear()
    rng = np.random.default_rng(5)
    for seed in range(12):
        image, rects, ellipse, methods, fills = plan_case(seed, layout, width, height,
                                                          1 + seed * 3)
        want = reference_plan(image, rects, ellipse, methods.tolist(), fills)
        same_plan(ck._rects_plan(image, rects, ellipse, methods, fills), want)
        same_plan(ck._rects_plan(image, rects, ellipse, methods, fills), want)
        # the same shapes moved by whole chroma pixels where they stay in the frame, and moved
        # by one pixel (another parity); order reversed
        for move in (2, 1):
            shift = rng.integers(-2, 3, (len(rects), 2)) * move
            moved = rects + np.tile(shift, 2)
            inside = ((moved[:, :2] >= 0) & (moved[:, 2:] <= [width, height])).all(1)
            moved = np.where(inside[:, None], moved, rects)[::-1].astype(np.int32)
            args = (ellipse[::-1], methods[::-1], fills[::-1])
            want = reference_plan(image, moved, args[0], args[1].tolist(), args[2])
            same_plan(ck._rects_plan(image, moved, *args), want)
    # rectangles come clipped to the frame (engines.redact._scaled_rects)
    image, rects, ellipse, methods, fills = plan_case(1, layout, width, height, 4)
    rects[0] = [width - 5, height - 7, width + 3, height + 1]
    with pytest.raises(ValueError, match="past the"):
        ck._rects_plan(image, rects, ellipse, methods, fills)


def test_block_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ck, "_BLOCKS_MAX", 10)
    ck._BLOCKS.clear()
    for seed in range(4):
        image, rects, ellipse, methods, fills = plan_case(seed, "nv12", 96, 64, 8)
        same_plan(ck._rects_plan(image, rects, ellipse, methods, fills),
                  reference_plan(image, rects, ellipse, methods.tolist(), fills))
        assert all(len(c) <= 10 for c in ck._BLOCKS.values())
    ck._BLOCKS.clear()


def test_uploaded_tables_are_the_plan() -> None:
    """The one-copy upload puts every table where the kernels read it, in a buffer grown for a
    larger call and whatever an earlier, larger call left in it."""
    image, rects, ellipse, methods, fills = plan_case(3, "nv12", 640, 480, 30)
    big = ck._rects_plan(image, rects, ellipse, methods, fills)
    small = ck._rects_plan(image, rects[:4], ellipse[:4], methods[:4], fills[:4])
    assert big is not None and small is not None
    scratch = ck._Scratch()
    for plan in (small, big, small):
        tabs = scratch.upload(plan)
        n = len(plan.rt)
        assert tabs["rt"].shape == (n, ck._NCOL)
        assert np.array_equal(tabs["rt"].copy_to_host(), plan.rt)
        for name in ("cum_small", "cum_big"):
            assert np.array_equal(tabs[name].copy_to_host()[: n + 1], getattr(plan, name))
        assert np.array_equal(tabs["rf"].copy_to_host()[:n], plan.rf)
        for name in ("spans", "tab_start", "tab_src", "tab_alpha"):
            ref = getattr(plan, name)
            assert np.array_equal(tabs[name].copy_to_host()[: len(ref)], ref), name


def test_threads_at_once_each_get_their_own_tables() -> None:
    """Calls from several threads at once (a server's streams) plan, upload and launch into
    their own reused device buffers: each frame comes out as it does alone."""
    src = noise(48, 64, 20)
    styles = [Style(Method.BLUR, Shape.ELLIPSE, 1.0), Style(Method.PIXELATE, Shape.BOX, 1.0),
              Style(Method.FILL, Shape.ELLIPSE, 1.0, FILL)]
    jobs = [(random_boxes(30 + i, 64, 48, 1 + i % 4, 1.0), styles[i % 3],
             "nv12" if i % 2 else "bgr") for i in range(6)]

    def run(i: int) -> np.ndarray:
        boxes, style, layout = jobs[i]
        image = ck.DeviceImage.from_bgr(src, layout)
        for _ in range(2):
            ck.redact_boxes(image, boxes, style)
        return image.to_bgr()

    alone = [run(i) for i in range(len(jobs))]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, range(len(jobs))))
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert np.array_equal(a, b), i
