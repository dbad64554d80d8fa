"""Redaction kernels: blur, pixelate and fill, as boxes or ellipses, and privacy zones.

The public functions (:func:`redact_detections`, :func:`cover_all`, :func:`cover_zone`,
:func:`thumbnail`) dispatch on where the pixels live (:mod:`engines.arrays`); the CPU kernels
(OpenCV) are here. All work in place on a BGR uint8 image (H, W, 3) and take boxes as ``xyxy``
float pixels. Boxes are grown by the mask scale about their centre, rounded outward and clipped
to the frame, so a face touching the last row or column is covered up to that row or column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import lru_cache

import cv2
import numpy as np

from engines.arrays import kernels_for, register_kernels
from engines.detections import Detections, Origin

# A blurred face keeps about this many independent samples across its short side: few enough
# that it cannot be recognised, whatever its size (the kernel grows with the box).
BLUR_SAMPLES_ACROSS = 5
PIXELATE_CELLS_ACROSS = 8  # pixelation cells across the short side of the box
TINY_BOX_PX = 6  # below this, an ellipse would leave corners: cover the whole rectangle
BORDER_PX = 0.5  # a box this close to the frame border is taken as cut by it


class Method(StrEnum):
    BLUR = "blur"
    PIXELATE = "pixelate"
    FILL = "fill"

    @classmethod
    def parse(cls, value: str) -> Method:
        value = value.strip().lower()
        if value == "pixelation":
            return cls.PIXELATE
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown redaction method {value!r}; use one of: {names}") from None


class Shape(StrEnum):
    ELLIPSE = "ellipse"
    BOX = "box"


@dataclass(frozen=True)
class Style:
    """How boxes are covered; ``overrides`` gives some categories a style of their own."""

    method: Method = Method.BLUR
    shape: Shape = Shape.ELLIPSE
    mask_scale: float = 1.3  # box side multiplier about its centre
    fill_bgr: tuple[int, int, int] = (0, 0, 0)
    overrides: Mapping[str, Style] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not 0.5 <= self.mask_scale <= 4.0:
            raise ValueError(f"mask scale {self.mask_scale} is outside 0.5..4.0")

    def for_category(self, category: str) -> Style:
        return self.overrides.get(category, self)


def mask_rects(xyxy: np.ndarray, width: int, height: int, mask_scale: float) -> np.ndarray:
    """Integer rectangles (n, 4) int32 ``x1, y1, x2, y2`` (half-open) to cover.

    Each box is scaled by ``mask_scale`` about its centre, rounded outward (floor for the
    start, ceil for the end) and clipped to ``[0, width] x [0, height]``; empty ones are dropped.
    """
    return _scaled_rects(xyxy, width, height, mask_scale)[0]


def _scaled_rects(xyxy: np.ndarray, width: int, height: int, mask_scale: float,
                  uncertain: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mask_rects`, and for each rectangle whether the object may be cut by the frame
    border: the box itself reaches the border, or, for a box whose position is ``uncertain``
    (carried by the tracker), its grown rectangle does."""
    boxes = np.asarray(xyxy, np.float64).reshape(-1, 4)
    if not len(boxes):
        return np.zeros((0, 4), np.int32), np.zeros(0, bool)
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (mask_scale / 2)
    rects = np.concatenate([np.floor(c - half), np.ceil(c + half)], 1)
    clipped = np.clip(rects, 0, [width, height, width, height])
    cut = ((boxes[:, :2] <= BORDER_PX).any(1) | (boxes[:, 2] >= width - BORDER_PX)
           | (boxes[:, 3] >= height - BORDER_PX))
    if uncertain is not None:
        cut |= np.asarray(uncertain, bool).reshape(-1) & (clipped != rects).any(1)
    out = clipped.astype(np.int32)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep], cut[keep]


@lru_cache(maxsize=512)
def _ellipse_mask(w: int, h: int) -> np.ndarray:
    """Boolean (h, w, 1) mask of the ellipse inscribed in a w x h rectangle, generous by half a
    pixel so the pixels the outline crosses are covered too."""
    yy = (np.arange(h, dtype=np.float32) + 0.5 - h / 2) / (h / 2 + 0.5)
    xx = (np.arange(w, dtype=np.float32) + 0.5 - w / 2) / (w / 2 + 0.5)
    mask = (yy[:, None] ** 2 + xx[None, :] ** 2) <= 1.0
    mask.flags.writeable = False
    return mask[:, :, None]


def _blurred(roi: np.ndarray) -> np.ndarray:
    """Keep about BLUR_SAMPLES_ACROSS samples across the short side, smoothed back to size:
    the kernel grows with the box, so no face keeps recognisable detail."""
    h, w = roi.shape[:2]
    cell = max(1.0, min(w, h) / BLUR_SAMPLES_ACROSS)
    sw, sh = max(1, round(w / cell)), max(1, round(h / cell))
    small = cv2.resize(roi, (sw, sh), interpolation=cv2.INTER_AREA)
    if sw >= 3 and sh >= 3:
        small = cv2.GaussianBlur(small, (3, 3), 0, borderType=cv2.BORDER_REPLICATE)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _pixelated(roi: np.ndarray) -> np.ndarray:
    h, w = roi.shape[:2]
    cell = max(2.0, min(w, h) / PIXELATE_CELLS_ACROSS)
    sw, sh = max(1, math.ceil(w / cell)), max(1, math.ceil(h / cell))
    small = cv2.resize(roi, (sw, sh), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def redact_rect(image: np.ndarray, rect: np.ndarray | tuple[int, int, int, int],
                style: Style) -> None:
    """Cover one integer rectangle of ``image`` in place."""
    x1, y1, x2, y2 = (int(v) for v in rect)
    roi = image[y1:y2, x1:x2]
    h, w = roi.shape[:2]
    if not h or not w:
        return
    if style.method is Method.FILL:
        covered = np.empty_like(roi)
        covered[:] = style.fill_bgr
    elif style.method is Method.PIXELATE:
        covered = _pixelated(roi)
    else:
        covered = _blurred(roi)
    if style.shape is Shape.ELLIPSE and min(w, h) >= TINY_BOX_PX:
        np.copyto(roi, covered, where=_ellipse_mask(w, h))
    else:
        roi[:] = covered


def redact_boxes(image: np.ndarray, xyxy: np.ndarray, style: Style,
                 uncertain: np.ndarray | None = None) -> np.ndarray:
    """Cover every box in ``xyxy`` (n, 4) float pixels; returns the rectangles covered.

    A box that reaches the frame border is covered as a full rectangle even with the ellipse
    shape: the object goes on past the border, so the corners of its visible part are filled.
    ``uncertain`` (n,) bool marks boxes carried by the tracker: for those it is enough that the
    grown rectangle reaches the border.
    """
    h, w = image.shape[:2]
    rects, cut = _scaled_rects(xyxy, w, h, style.mask_scale, uncertain)
    box_style = replace(style, shape=Shape.BOX) if style.shape is not Shape.BOX else style
    for r, at_border in zip(rects, cut, strict=True):
        redact_rect(image, r, box_style if at_border else style)
    return rects


def _cpu_redact_detections(image: np.ndarray, dets: Detections, style: Style) -> np.ndarray:
    """Cover every box of ``dets`` in place, each category in its own style (see
    :meth:`Style.for_category`); tracked boxes count as uncertain. Returns the rectangles."""
    uncertain = dets.origin == Origin.TRACKED
    if not style.overrides or not len(dets):
        return redact_boxes(image, dets.xyxy, style, uncertain)
    out = []
    for cat in np.unique(dets.category):
        sel = dets.category == cat
        out.append(redact_boxes(image, dets.xyxy[sel], style.for_category(str(cat)),
                                uncertain[sel]))
    return np.concatenate(out)


def _cpu_cover_all(image: np.ndarray, style: Style) -> None:
    """Cover the whole frame: the fail-closed answer when detection cannot be trusted."""
    h, w = image.shape[:2]
    if style.method is Method.FILL:
        image[:] = style.fill_bgr
    else:
        redact_rect(image, (0, 0, w, h), Style(style.method, Shape.BOX, 1.0, style.fill_bgr))


def _cpu_cover_zone(image: np.ndarray, polygon: np.ndarray, style: Style) -> None:
    """Cover the inside of ``polygon`` (k, 2) float frame pixels, in ``style``'s method."""
    h, w = image.shape[:2]
    poly = np.round(polygon).astype(np.int32)
    x1, y1 = np.clip(poly.min(0), 0, [w, h])
    x2, y2 = np.clip(poly.max(0) + 1, 0, [w, h])
    if x2 <= x1 or y2 <= y1:
        return
    mask = np.zeros((y2 - y1, x2 - x1), np.uint8)
    cv2.fillPoly(mask, [poly - [x1, y1]], 255)
    covered = image[y1:y2, x1:x2].copy()
    redact_rect(covered, (0, 0, x2 - x1, y2 - y1), replace(style, shape=Shape.BOX, overrides={}))
    np.copyto(image[y1:y2, x1:x2], covered, where=mask[:, :, None] > 0)


def _cpu_thumbnail(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


class CpuKernels:
    redact_detections = staticmethod(_cpu_redact_detections)
    cover_all = staticmethod(_cpu_cover_all)
    cover_zone = staticmethod(_cpu_cover_zone)
    thumbnail = staticmethod(_cpu_thumbnail)


register_kernels("cpu", CpuKernels())


def redact_detections(image: np.ndarray, dets: Detections, style: Style) -> np.ndarray:
    """Cover every box of ``dets`` in place, each category in its own style (see
    :meth:`Style.for_category`); tracked boxes count as uncertain. Returns the rectangles
    covered, (n, 4) int frame pixels."""
    return kernels_for(image).redact_detections(image, dets, style)


def cover_all(image: np.ndarray, style: Style) -> None:
    """Cover the whole frame: the fail-closed answer when detection cannot be trusted."""
    kernels_for(image).cover_all(image, style)


def zone_polygon(zone: object, width: int, height: int) -> np.ndarray | None:
    """A zone's points as (k, 2) float frame pixels: given in pixels, or as fractions of the
    frame when every coordinate is at most 1. None for fewer than three points."""
    pts = np.array(zone, np.float64).reshape(-1, 2)
    if len(pts) < 3:
        return None
    if (pts <= 1.0).all():
        pts = pts * [width, height]
    return pts


def cover_zone(image: np.ndarray, zone: object, style: Style) -> None:
    """Cover a privacy zone (a polygon, see :func:`zone_polygon`) in place, whatever the
    detectors found, in ``style``'s method as a filled polygon."""
    h, w = image.shape[:2]
    poly = zone_polygon(zone, w, h)
    if poly is not None:
        kernels_for(image).cover_zone(image, poly, style)


def thumbnail(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """A small CPU copy of the picture (area average), for scene-change and freeze checks."""
    return kernels_for(image).thumbnail(image, width, height)
