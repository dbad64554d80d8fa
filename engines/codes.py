"""QR codes and 1-D/2-D barcodes, found by decoding and by decode-free locators.

A code has to be covered whether or not it can be read, so decoding is only one of the passes,
all run on a copy of the frame scaled down to ``max_side``:

1. ``zxing``: zxing-cpp ``read_barcodes`` with ``return_errors=True``: codes it decodes
   (score 1.0, box from the exact corners) and QR-family symbols it locates but cannot decode
   (score 0.6);
2. ``zxing_2x``: the same on a 2x enlargement when the frame is small (``upscale_small``), for
   codes a couple of pixels per module wide;
3. ``texture`` (QR codes only): a pyramid of maps of dense, high-contrast texture; every blob is
   scored by a logistic model over its shape, texture, quiet-zone ring and the QR finder
   patterns found inside it (score = that probability, kept above ``texture_threshold``).
   Finder patterns are counted in the blob's box as it lies and, for a blob whose outline is
   far from a square (a code seen at a slant), with that outline mapped onto a square. A blob
   holding two finder patterns is a QR code whatever its other features (score at least 0.7),
   and so is a blob over much of the frame holding one: a code that fills the photo has no
   quiet zone to show, and the frame cuts its other patterns;
4. ``finder`` (QR codes only): finder patterns (a dark ring, a light ring, a dark core, as
   nested convex quadrilaterals) on a pyramid of halvings, grouped in threes by a QR code's
   geometry whatever the perspective (the lines from the corner pattern to the other two run
   along its edges, as many modules across as down, no fourth pattern inside); the homography
   that takes the three patterns' corners to the module grid gives the code's whole outline
   (score 0.9), kept where modules fill it;
5. ``cv_barcode`` (barcodes only): OpenCV's gradient locator for 1-D codes, each candidate
   confirmed by zxing-cpp on a rectified crop (score 1.0 when read, else 0.5) or by its bars.

Categories: QR Code, Micro QR and rMQR are ``qr_codes``; every other symbology (EAN/UPC,
Code 128/39/93, ITF, Codabar, DataBar, PDF417, Data Matrix, Aztec, MaxiCode...) is
``barcodes``. The texture locator cannot tell a QR code from other 2-D matrix codes, so an
unreadable Data Matrix or Aztec symbol may be reported as ``qr_codes``.

Boxes are merged per category: nested or overlapping QR boxes by non-maximum suppression in
tiers (a code's outline, read or fixed by its finder patterns, before texture blobs, ordered by
their probability without finder patterns, before symbols zxing located but could not read,
whose size is a guess and often too small), overlapping barcode boxes into their union. Decoded
contents are dropped at once: nothing the detector returns, keeps or logs holds them.
"""

from __future__ import annotations

import importlib.metadata
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np
import zxingcpp

from engines.detections import Detections
from engines.faces import ModelInfo

QR_CATEGORY = "qr_codes"
BARCODE_CATEGORY = "barcodes"
CATEGORIES: tuple[str, ...] = (QR_CATEGORY, BARCODE_CATEGORY)

_F = zxingcpp.BarcodeFormat
# QR family -> "qr_codes"; every other symbology (EAN/UPC, Code 128/39/93, ITF, Codabar,
# DataBar, PDF417, Data Matrix, Aztec, MaxiCode...) -> "barcodes".
_QR_FORMATS = frozenset({_F.QRCode, _F.QRCodeModel1, _F.QRCodeModel2, _F.MicroQRCode,
                         _F.RMQRCode})
# zxing-cpp's undecodable finds worth a box: a QR Code's finder patterns and outline. An
# unreadable rMQR "symbol" is mostly a QR code's finder pattern joined to nearby clutter.
_UNDECODED_KEPT = frozenset({_F.QRCode, _F.QRCodeModel1, _F.QRCodeModel2, _F.MicroQRCode})
_ALL_FORMATS: tuple[zxingcpp.BarcodeFormat, ...] = tuple(
    zxingcpp.barcode_formats_list(zxingcpp.BarcodeFormats(_F.AllReadable)))
_LINEAR_FORMATS = frozenset(zxingcpp.barcode_formats_list(zxingcpp.BarcodeFormats(_F.AllLinear)))
# what zxing-cpp looks for in a rectified candidate of OpenCV's 1-D locator
_BAR_FORMATS = zxingcpp.BarcodeFormats(
    sorted(_LINEAR_FORMATS | {_F.PDF417, _F.CompactPDF417, _F.MicroPDF417}))
_EAN_UPC_FORMATS = frozenset(zxingcpp.barcode_formats_list(zxingcpp.BarcodeFormats(_F.EANUPC)))

DECODED_SCORE = 1.0
UNDECODED_QR_SCORE = 0.6  # zxing located a QR-family symbol but could not read it
BARCODE_LOCATOR_SCORE = 0.5  # OpenCV's decode-free 1-D locator, candidate not read
# A zxing quadrilateral is the code's outline; the box grows by this share of its width and
# height on each side so that part of the quiet zone and a slightly misplaced corner are
# covered too (about one module of a 21-module QR code).
GROW = 0.05
# A decoded QR code's corners are exact (zxing fits them to the finder patterns and the sampled
# grid): half a module of a 21-module code covers rounding. A code that fills the frame gains
# little from a wider margin, and its surroundings lose much.
QR_DECODED_GROW = 0.025
# zxing reports a 1-D code read on few scan lines as a thin strip; its box is made at least this
# share of the code's length thick: EAN/UPC symbols have a fixed shape (bars about 0.6-0.7 as
# high as the code is long, with the digits), other 1-D codes are often flatter.
EAN_UPC_MIN_THICKNESS = 0.7
LINEAR_MIN_THICKNESS = 0.4
UPSCALE_MAX_SIDE = 1024  # the 2x pass runs when the scaled frame's longer side is at most this
_OUTLINE_RANK = 2.0  # merge order, see _Found.ranks
_TEXTURE_RANK = 1.0
NMS_IOU = 0.3
NMS_CONTAIN = 0.7  # share of the smaller box inside the other that makes two boxes one

# --- texture locator --------------------------------------------------------------------------
_RANGE_K = 5  # local max - local min window (pixels of a pyramid level)
_RANGE_ABS = 20  # a local range below this many grey levels is never texture
_RANGE_REL = 0.45  # ... nor one below this share of the largest range nearby
_RANGE_NEAR = 31  # "nearby" window for the relative threshold
_DENSITY_WIN = 9  # window of the texture-density map
_DENSITY_MIN = 0.6  # share of textured pixels in that window for the blob mask
_MIN_BLOB_SIDE = 24  # pixels of a pyramid level; a QR code is at least 21 modules wide
# A code whose blob is larger than this at some level has modules too coarse for that level's
# texture window; it is found whole at a coarser level, where such a blob is a code-sized one.
_MAX_BLOB_SIDE = 320
_LEVEL_STEP = 1 / math.sqrt(2)
_MIN_LEVEL_SIDE = 128  # coarsest level: its shorter side stays at least this
# Stripes (1-D barcodes, fences, striped cloth) have nearly all their gradient in one direction;
# a QR code's modules have edges both ways: a blob whose gradient structure tensor has a smaller
# / larger eigenvalue ratio below this is not a QR code (0.5% of the blobs on labelled codes in
# the annotated photos are below 0.26).
_MIN_ISOTROPY = 0.2
_FINDER_CROP = 160  # finder patterns are searched in a crop of the blob scaled to this side
_FINDER_BLOCKS = (8, 16, 32)  # local-threshold windows: the crop's shorter side over these
_FINDER_OFFSETS = (3, 8)  # grey levels below the local mean that count as dark
# Finder patterns are never found in texture that is not a QR code (none in some 4000 blobs of
# photos without codes, at one or more): a blob holding this many is a QR code whatever its other
# features, and scores at least FINDER_BLOB_SCORE.
_FINDER_EVIDENCE = 2
FINDER_BLOB_SCORE = 0.7
# A blob whose box covers this share of its level has its finders counted, and one of them is
# evidence enough: a code that fills the frame shows no quiet zone, and the frame often cuts
# its other finder patterns.
_BIG_BLOB_SHARE = 0.2
_BIG_BLOB_FINDERS = 1
_SLANT_SIDES = 1.3  # a blob's outline with sides this unequal is rectified to count finders
_SLANT_COS = math.cos(math.radians(75))  # ... or with a corner this far from a right angle
_RECTIFY_MARGIN = 0.08  # share of a blob's outline added on each side before it is rectified
_SAME_BLOB_IOU = 0.8  # a blob this close to one counted at another level takes its count
TEXTURE_THRESHOLD = 0.6  # keep blobs whose QR probability is above this

# --- finder-pattern locator ------------------------------------------------------------------
# A QR code's three finder patterns (7x7 modules: a dark ring, a light ring, a 3x3 dark core) fix
# its outline whatever the perspective: each is a convex quadrilateral with nested contours, the
# lines from the corner pattern to the other two run along its edges, and the code is as many
# modules across as down. Patterns are searched on a pyramid of halvings, each level for patterns
# up to ``_FP_MAX_SIDE`` pixels; larger ones are found whole at a coarser level.
_FP_BLOCK = 31  # adaptive-threshold window (pixels of a level)
_FP_OFFSET = 8  # grey levels below the local mean that count as dark
_FP_MIN_SIDE = 7  # a pattern narrower than this (pixels of a level) has modules under a pixel
_FP_MAX_SIDE = 60
_FP_MIN_LEVEL_SIDE = 48  # coarsest level: its shorter side stays at least this
# the ring and the core: areas 49 : 25 : 9 modules, blurred and thresholded
_FP_HOLE_SHARE = (0.2, 0.8)
_FP_CORE_RATIO = (2.5, 14.0)
_FP_CONCENTRIC = 0.15  # centres of ring, hole and core within this share of the pattern's side
_FP_MIN_EDGE = 0.15  # shortest / longest edge of the pattern's quadrilateral (foreshortening)
_FP_ALIGN = math.cos(math.radians(18))  # a line between two patterns runs along their edges
_FP_MIN_TURN = math.cos(math.radians(25))  # the two arms are at least this far from collinear
_FP_AREA_RATIO = 4.0  # the three patterns' areas (near and far under perspective) within this
# modules between two patterns' centres: N - 7 for an N-module code (21..177), with slack
_FP_SPAN = (11.0, 185.0)
_FP_SQUARE = 0.7  # the module counts along the two arms agree within this ratio
_FP_GRID_PX = 3  # pixels a module in the rectified code
_FP_EDGE = 0.3  # a 3x3 grey range over this share of the code's 5-95% range is a module edge
_FP_CELL_EDGES = 0.3  # share of edge pixels that makes a cell of a 4x4 grid textured
_FP_MIN_CELLS = 12  # textured cells of 16
_FP_FIT_TOL = 0.1  # the fitted outline passes this share of the code's size from the patterns
_FP_MAX_PATTERNS = 64
_FP_MAX_TRIPLES = 64
FINDER_SCORE = 0.9  # three finder patterns in a code's geometry

# --- OpenCV 1-D locator candidates -----------------------------------------------------------
_BAR_CROP = 480  # a candidate is rectified and enlarged towards this width before zxing reads it
_BAR_MIN_EDGES = 30  # bar edges across an unread candidate (an EAN-8 has 43, a fence a dozen)
_BAR_MIN_CORR = 0.6  # correlation of its upper and lower profiles (bars run through)

# Logistic model over blob features (see _blob_features), fitted on the xcerno30 QR photos
# (positives: blobs with IoU > 0.5 with a labelled code; negatives: blobs outside every code)
# plus a third of the face-mask and OpenALPR photos as negatives. Figures on xcerno30 are thus
# in-sample; fitted on half of its photos, the texture pass alone finds 0.91-0.92 of the codes
# of the other half at the 0.6 threshold (0.925 in-sample).
_TEXTURE_FEATURES = ("finders", "fill", "log_aspect", "density", "isotropy", "ring",
                     "log_side", "contrast", "at_edge", "bimodality")
_TEXTURE_WEIGHTS = np.array([1.53, 5.74, -0.15, 7.82, 3.31, -6.70, 1.89, 1.00, -1.00, -10.86],
                            np.float64)
_TEXTURE_BIAS = -12.29


def zxing_version() -> str:
    try:
        return importlib.metadata.version("zxing-cpp")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vendored builds
        return "unknown"


# --------------------------------------------------------------------------------------------
# geometry helpers


def _quad_box(quad: np.ndarray, grow: float, min_thickness: float = 0.0) -> np.ndarray:
    """Axis-aligned box of a quadrilateral (4, 2), grown by ``grow`` of its size per side.

    ``min_thickness`` > 0 first thickens a thin quadrilateral (a 1-D code read on one scan line)
    perpendicular to its long axis to that share of its length.
    """
    q = np.asarray(quad, np.float64).reshape(-1, 2)
    if min_thickness > 0:
        (cx, cy), (w, h), angle = cv2.minAreaRect(q.astype(np.float32))
        length, thick = max(w, h), min(w, h)
        if length > 0 and thick < min_thickness * length:
            if w >= h:
                h = min_thickness * length
            else:
                w = min_thickness * length
            q = cv2.boxPoints(((cx, cy), (w, h), angle)).astype(np.float64)
    x1, y1 = q.min(0)
    x2, y2 = q.max(0)
    gw, gh = (x2 - x1) * grow, (y2 - y1) * grow
    return np.array([x1 - gw, y1 - gh, x2 + gw, y2 + gh], np.float64)


def _merge(xyxy: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Indices kept by greedy NMS (highest ``priority`` first) that also treats nested boxes as
    duplicates.

    Of two boxes where one lies mostly inside the other, only the first in priority stays: the
    texture locator finds one code at several pyramid levels, and the coarser levels' boxes
    reach past the code into its surroundings.
    """
    order = np.argsort(-priority, kind="stable")
    keep: list[int] = []
    area = np.maximum((xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]), 1e-6)
    for i in order:
        ok = True
        for j in keep:
            iw = min(xyxy[i, 2], xyxy[j, 2]) - max(xyxy[i, 0], xyxy[j, 0])
            ih = min(xyxy[i, 3], xyxy[j, 3]) - max(xyxy[i, 1], xyxy[j, 1])
            if iw <= 0 or ih <= 0:
                continue
            inter = iw * ih
            if (inter / (area[i] + area[j] - inter) > NMS_IOU
                    or inter / min(area[i], area[j]) > NMS_CONTAIN):
                ok = False
                break
        if ok:
            keep.append(int(i))
    return np.asarray(keep, np.int64)


# --------------------------------------------------------------------------------------------
# texture locator


@dataclass(frozen=True)
class Blob:
    """One texture blob: its quadrilateral in work-image pixels, features and QR probability."""

    quad: np.ndarray  # (4, 2) float32
    outline: np.ndarray | None  # (4, 2) its convex outline as a quadrilateral, when it is one
    level: float  # pyramid scale it was found at
    features: np.ndarray  # (len(_TEXTURE_FEATURES),) float64
    probability: float
    finders: bool = False  # holds at least ``_FINDER_EVIDENCE`` finder patterns
    # the probability without the finder patterns, which are counted for some blobs only: it
    # orders the blobs of one code found at several levels
    shape_probability: float = 0.0


def _count_finders(gray: np.ndarray, inverse: bool = True) -> int:
    """Distinct QR finder patterns (a dark square ring around a dark square, or with ``inverse``
    also the inverse) in a crop of a blob, under several local thresholds; at most 3."""
    side = min(gray.shape)
    gray = cv2.GaussianBlur(gray, (0, 0), 1.0)
    centres: list[tuple[float, float, float]] = []
    for polarity in (cv2.THRESH_BINARY_INV, cv2.THRESH_BINARY) if inverse else (
            cv2.THRESH_BINARY_INV,):
        for block_div in _FINDER_BLOCKS:
            block = 2 * max(3, side // block_div) + 1
            for offset in _FINDER_OFFSETS:
                bw = cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, polarity, block,
                                           offset)
                _add_finders(cv2.copyMakeBorder(bw, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0),
                             side, centres)
                if len(centres) >= 3:
                    return 3
    return len(centres)


def _add_finders(bw: np.ndarray, side: int, centres: list[tuple[float, float, float]]) -> None:
    contours, hierarchy = cv2.findContours(bw, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return
    hier = hierarchy[0]
    for i, outer in enumerate(contours):
        child = hier[i][2]
        if child < 0 or hier[child][2] < 0:
            continue
        x, y, w, h = cv2.boundingRect(outer)
        size = (w + h) / 2
        if not side / 30 <= size <= side / 2.2 or max(w, h) > 3 * min(w, h):
            continue
        a_outer = cv2.contourArea(outer)
        if a_outer < 0.4 * w * h:
            continue
        a_hole = cv2.contourArea(contours[child])
        a_core = 0.0
        j = hier[child][2]
        while j >= 0:
            a_core = max(a_core, cv2.contourArea(contours[j]))
            j = hier[j][0]
        # ideal areas 49 : 25 : 9 modules
        if a_core <= 0 or not a_core < a_hole < a_outer or not 2.5 < a_outer / a_core < 14:
            continue
        cx, cy = x + w / 2, y + h / 2
        if all(math.hypot(cx - ux, cy - uy) > 0.5 * max(size, us) for ux, uy, us in centres):
            centres.append((cx, cy, size))


def _isotropy(gx: np.ndarray, gy: np.ndarray) -> float:
    """Smaller / larger eigenvalue of the gradient structure tensor: 0 for stripes, 1 when edges
    run every way (or along two perpendicular directions equally, as a QR code's do)."""
    sxx, syy, sxy = float((gx * gx).sum()), float((gy * gy).sum()), float((gx * gy).sum())
    half_tr = (sxx + syy) / 2
    root = math.sqrt(max(half_tr * half_tr - (sxx * syy - sxy * sxy), 0.0))
    return (half_tr - root) / (half_tr + root) if half_tr > 0 else 0.0


def _fine_isotropy(work_gray: np.ndarray, quad: np.ndarray) -> float:
    """Isotropy of the inner part of a blob's box at the work image's resolution, where the bars
    of a 1-D code are resolved (at a coarse level they blur, and the edges of the label they are
    printed on make the blob look isotropic)."""
    wh, ww = work_gray.shape
    x1, y1 = quad.min(0)
    x2, y2 = quad.max(0)
    mx, my = 0.1 * (x2 - x1), 0.1 * (y2 - y1)
    crop = work_gray[max(0, int(y1 + my)):min(wh, int(y2 - my)),
                     max(0, int(x1 + mx)):min(ww, int(x2 - mx))]
    if min(crop.shape) < 8:
        return 1.0
    f = _FINDER_CROP * 2 / max(crop.shape)
    if f < 1:
        crop = cv2.resize(crop, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    return _isotropy(cv2.Sobel(crop, cv2.CV_64F, 1, 0), cv2.Sobel(crop, cv2.CV_64F, 0, 1))


def _texture_mask(level_gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Strongly textured pixels (0/1) and their share around each pixel (float32 in [0, 1])."""
    k = np.ones((_RANGE_K, _RANGE_K), np.uint8)
    rng = cv2.subtract(cv2.dilate(level_gray, k), cv2.erode(level_gray, k))
    near = cv2.dilate(rng, np.ones((_RANGE_NEAR, _RANGE_NEAR), np.uint8))
    thr = np.maximum(_RANGE_ABS, _RANGE_REL * near.astype(np.float32))
    textured = (rng > thr).astype(np.float32)
    return textured, cv2.blur(textured, (_DENSITY_WIN, _DENSITY_WIN))


def _pyramid(shape: tuple[int, ...]) -> list[float]:
    """Scales of the texture pyramid: 1, then steps of 1/sqrt(2) while the shorter side stays
    at least ``_MIN_LEVEL_SIDE`` (a small frame gets scale 1 only)."""
    levels = [1.0]
    while min(shape[:2]) * levels[-1] * _LEVEL_STEP >= _MIN_LEVEL_SIDE:
        levels.append(levels[-1] * _LEVEL_STEP)
    return levels


def _finders_around(work_gray: np.ndarray, quad: np.ndarray) -> int:
    """QR finder patterns in the work image around a blob's quadrilateral (at most 3)."""
    wh, ww = work_gray.shape
    qx1, qy1 = np.floor(quad.min(0)).astype(int)
    qx2, qy2 = np.ceil(quad.max(0)).astype(int)
    m = max(2, int(0.08 * max(qx2 - qx1, qy2 - qy1)))
    crop = work_gray[max(0, qy1 - m):min(wh, qy2 + m), max(0, qx1 - m):min(ww, qx2 + m)]
    if min(crop.shape) < 8:
        return 0
    f = _FINDER_CROP / max(crop.shape)
    crop = cv2.resize(crop, None, fx=f, fy=f,
                      interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
    return min(_count_finders(crop), 3)


def _slanted(outline: np.ndarray) -> bool:
    """Whether a quadrilateral is far from a square: sides of unequal length or corners far from
    right angles (a code seen at a slant, whose finder patterns are squashed as it lies)."""
    edges = np.roll(outline, -1, 0) - outline
    lengths = np.maximum(np.hypot(edges[:, 0], edges[:, 1]), 1e-6)
    cosines = np.abs((edges * np.roll(edges, 1, 0)).sum(1)) / (lengths * np.roll(lengths, 1))
    return bool(lengths.max() > _SLANT_SIDES * lengths.min() or cosines.max() > _SLANT_COS)


def _finders_rectified(work_gray: np.ndarray, outline: np.ndarray) -> int:
    """QR finder patterns in a blob's outline mapped onto a square (with a margin): a code seen
    at a slant is square again there, and so are its finder patterns (at most 3)."""
    side = _FINDER_CROP
    centre = outline.mean(0)
    src = (centre + (outline - centre) * (1 + 2 * _RECTIFY_MARGIN)).astype(np.float32)
    dst = np.array([[0, 0], [side, 0], [side, side], [0, side]], np.float32)
    crop = cv2.warpPerspective(work_gray, cv2.getPerspectiveTransform(src, dst), (side, side),
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    # dark modules only: an inverted code's patterns are left to the count as the blob lies
    return min(_count_finders(crop, inverse=False), 3)


def _blob_features(level_gray: np.ndarray, textured: np.ndarray, density: np.ndarray,
                   labels: np.ndarray, index: int, stats: np.ndarray,
                   level: float) -> tuple[np.ndarray, np.ndarray | None, np.ndarray] | None:
    """Quadrilateral (its minimum-area rectangle), outline (its convex hull as a quadrilateral,
    or None), both in work-image pixels, and features of one blob; the finder count (feature 0)
    is left at 0 and filled in by the caller when it can change the verdict."""
    x, y, w, h, area = (int(v) for v in stats)
    blob = labels[y:y + h, x:x + w] == index
    contours, _ = cv2.findContours(blob.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=cv2.contourArea)
    rect = cv2.minAreaRect(contour)
    rw, rh = rect[1]
    short = min(rw, rh)
    if not _MIN_BLOB_SIDE <= short <= _MAX_BLOB_SIDE:
        return None
    fill = area / max(rw * rh, 1.0)
    aspect = max(rw, rh) / max(short, 1.0)
    patch = level_gray[y:y + h, x:x + w]
    values = patch[blob].astype(np.float64)
    # bimodality: Otsu's between-class share of the variance
    t, _ = cv2.threshold(patch[blob].reshape(-1, 1), 0, 255,
                         cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = values <= t
    p = float(dark.mean())
    var = float(values.var())
    bimodality = (p * (1 - p) * (values[dark].mean() - values[~dark].mean()) ** 2 / var
                  if 0 < p < 1 and var > 0 else 0.0)
    isotropy = _isotropy(cv2.Sobel(patch, cv2.CV_64F, 1, 0)[blob],
                         cv2.Sobel(patch, cv2.CV_64F, 0, 1)[blob])
    if isotropy < _MIN_ISOTROPY:
        return None
    # ring: texture in a band around the blob's box (a quiet zone keeps it low)
    lh, lw = level_gray.shape
    pad = max(3, int(0.15 * min(w, h)))
    rx1, ry1 = max(0, x - pad), max(0, y - pad)
    rx2, ry2 = min(lw, x + w + pad), min(lh, y + h + pad)
    band = np.ones((ry2 - ry1, rx2 - rx1), bool)
    band[y - ry1:y - ry1 + h, x - rx1:x - rx1 + w] = False
    ring = float(textured[ry1:ry2, rx1:rx2][band].mean()) if band.any() else 1.0
    at_edge = int(x <= 1) + int(y <= 1) + int(x + w >= lw - 1) + int(y + h >= lh - 1)
    quad = ((cv2.boxPoints(rect) + np.array([x, y], np.float32)) / level).astype(np.float32)
    fitted = _contour_quad(contour)
    outline = None if fitted is None else ((fitted[0] + [x, y]) / level).astype(np.float32)
    features = np.array([
        0.0, fill, math.log(aspect), float(density[y:y + h, x:x + w][blob].mean()),
        isotropy, ring, math.log(short), float(values.std()) / 50, at_edge, bimodality,
    ], np.float64)
    return quad, outline, features


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = float(iw * ih)
    return inter / float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))


def texture_blobs(work_gray: np.ndarray, threshold: float = TEXTURE_THRESHOLD,
                  all_finders: bool = False) -> list[Blob]:
    """Every texture blob of a grey image with its features and QR probability.

    Finder patterns are costly to look for, so they are only counted for blobs whose verdict
    (probability above ``threshold``) they can change, or for every blob with ``all_finders``.
    """
    out: list[Blob] = []
    counted: list[tuple[np.ndarray, int]] = []  # finder patterns counted in a box
    t = min(max(threshold, 1e-6), 1 - 1e-6)
    z_accept = math.log(t / (1 - t))
    z_hopeless = z_accept - 3 * _TEXTURE_WEIGHTS[0]
    for level in _pyramid(work_gray.shape):
        if level == 1.0:
            g = work_gray
        else:
            g = cv2.resize(work_gray, None, fx=level, fy=level,
                           interpolation=cv2.INTER_AREA if level < 1 else cv2.INTER_LINEAR)
        textured, density = _texture_mask(g)
        mask: np.ndarray = (density > _DENSITY_MIN).astype(np.uint8)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((7, 7), np.uint8))
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        for i in range(1, n):
            if min(stats[i, 2], stats[i, 3]) < _MIN_BLOB_SIDE:
                continue
            found = _blob_features(g, textured, density, labels, i, stats[i, :5], level)
            if found is None:
                continue
            quad, outline, features = found
            z = float(features @ _TEXTURE_WEIGHTS + _TEXTURE_BIAS)
            # a blob over much of the frame has no quiet zone around it to show: its finder
            # patterns decide
            big = stats[i, 2] * stats[i, 3] >= _BIG_BLOB_SHARE * g.shape[0] * g.shape[1]
            if all_finders or (z < z_accept and (z >= z_hopeless or big)):
                # in the blob's box as it lies, and with its outline mapped onto a square (a code
                # seen at a slant); the outline of a blob that runs past its code is no code's
                # outline, so the first is kept
                box = np.concatenate([quad.min(0), quad.max(0)])
                same = [n for b, n in counted if _iou(box, b) > _SAME_BLOB_IOU]
                if same:  # the same region at another level
                    features[0] = same[0]
                else:
                    features[0] = _finders_around(work_gray, quad)
                    if features[0] < 3 and outline is not None and _slanted(outline):
                        features[0] = max(features[0], _finders_rectified(work_gray, outline))
                    counted.append((box, int(features[0])))
                z += float(features[0] * _TEXTURE_WEIGHTS[0])
            located = features[0] >= (_BIG_BLOB_FINDERS if big else _FINDER_EVIDENCE)
            if ((all_finders or z >= z_accept or located)
                    and _fine_isotropy(work_gray, quad) < _MIN_ISOTROPY):
                continue  # the bars of a 1-D code
            out.append(Blob(quad, outline, level, features, _sigmoid(z), located,
                            _sigmoid(z - features[0] * _TEXTURE_WEIGHTS[0])))
    return out


# --------------------------------------------------------------------------------------------
# finder-pattern locator


@dataclass(frozen=True)
class FinderPattern:
    """One finder-pattern candidate in work-image pixels."""

    centre: np.ndarray  # (2,) centre of its core
    quad: np.ndarray  # (4, 2) its outer quadrilateral, corners in contour order
    area: float


def _contour_quad(contour: np.ndarray) -> tuple[np.ndarray, float] | None:
    """The convex hull of a contour as a quadrilateral (4, 2) and the hull's area, or None."""
    hull = cv2.convexHull(contour)
    perimeter = cv2.arcLength(hull, True)
    for eps in (0.03, 0.05, 0.08):
        q = cv2.approxPolyDP(hull, eps * perimeter, True)
        if len(q) == 4:
            return q.reshape(4, 2).astype(np.float64), float(cv2.contourArea(hull))
        if len(q) < 4:
            return None
    return None


def _centroid(contour: np.ndarray) -> np.ndarray | None:
    m = cv2.moments(contour)
    return None if m["m00"] <= 0 else np.array([m["m10"] / m["m00"], m["m01"] / m["m00"]])


def _largest_child(contours: Sequence[np.ndarray], hier: np.ndarray,
                   parent: int) -> tuple[int, float]:
    best, best_area = -1, 0.0
    j = int(hier[parent][2])
    while j >= 0:
        a = float(cv2.contourArea(contours[j]))
        if a > best_area:
            best, best_area = j, a
        j = int(hier[j][0])
    return best, best_area


def _finders_at_level(gray: np.ndarray, block: int) -> list[FinderPattern]:
    """Finder-pattern candidates of one pyramid level: a dark convex quadrilateral holding a light
    hole that holds a dark core, concentric, with the pattern's area ratios."""
    bw = cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV,
                               block, _FP_OFFSET)
    contours, hierarchy = cv2.findContours(bw, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hier = hierarchy[0]
    out: list[FinderPattern] = []
    # contours that hold a contour that holds another: parents of holes that have children
    nested = hier[(hier[:, 2] >= 0) & (hier[:, 3] >= 0), 3]
    for i in np.unique(nested).tolist():
        outer = contours[i]
        _, _, w, h = cv2.boundingRect(outer)
        if not _FP_MIN_SIDE <= max(w, h) <= _FP_MAX_SIDE:
            continue
        hole, a_hole = _largest_child(contours, hier, i)
        if hole < 0:
            continue
        core, a_core = _largest_child(contours, hier, hole)
        a_out = float(cv2.contourArea(outer))
        if (core < 0 or a_core <= 0 or a_out <= 0
                or not _FP_HOLE_SHARE[0] < a_hole / a_out < _FP_HOLE_SHARE[1]
                or not _FP_CORE_RATIO[0] < a_out / a_core < _FP_CORE_RATIO[1]):
            continue
        fitted = _contour_quad(outer)
        if fitted is None:
            continue
        quad, a_hull = fitted
        a_quad = float(cv2.contourArea(quad.astype(np.float32)))
        if a_out < 0.85 * a_hull or not 0.8 < a_out / max(a_quad, 1.0) < 1.25:
            continue
        edges = np.hypot(*(np.roll(quad, -1, 0) - quad).T)
        if edges.min() < _FP_MIN_EDGE * edges.max():
            continue
        c_out, c_hole, c_core = (_centroid(outer), _centroid(contours[hole]),
                                 _centroid(contours[core]))
        if c_out is None or c_hole is None or c_core is None:
            continue
        tol = _FP_CONCENTRIC * math.sqrt(a_out)
        if np.hypot(*(c_out - c_core)) > tol or np.hypot(*(c_out - c_hole)) > tol:
            continue
        out.append(FinderPattern(c_core, quad, a_out))
    return out


def finder_patterns(work_gray: np.ndarray) -> list[FinderPattern]:
    """Finder-pattern candidates of a grey image on a pyramid of halvings, in work-image pixels,
    duplicates across levels dropped."""
    levels: list[float] = []
    level = 1.0
    while min(work_gray.shape) * level >= _FP_MIN_LEVEL_SIDE:
        levels.append(level)
        level /= 2
    found: list[FinderPattern] = []
    for level in levels:
        if level == 1.0:
            g = work_gray
        else:
            g = cv2.resize(work_gray, None, fx=level, fy=level, interpolation=cv2.INTER_AREA)
        new = [FinderPattern(fp.centre / level, fp.quad / level, fp.area / level ** 2)
               for fp in _finders_at_level(g, _FP_BLOCK)]
        if found and new:  # drop what a finer level found already
            a = np.array([fp.centre for fp in new])
            b = np.array([fp.centre for fp in found])
            size = np.sqrt(np.minimum(np.array([fp.area for fp in new])[:, None],
                                      np.array([fp.area for fp in found])[None, :]))
            near = np.hypot(a[:, None, 0] - b[None, :, 0], a[:, None, 1] - b[None, :, 1])
            new = [fp for fp, dup in zip(new, (near <= 0.3 * size).any(1), strict=True)
                   if not dup]
        found.extend(new)
    return found


def _edge_axes(quad: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two edge directions of a quadrilateral (unit vectors, each from a pair of opposite
    edges) and the mean length of each pair."""
    e = np.roll(quad, -1, 0) - quad
    lengths = np.hypot(e[:, 0], e[:, 1])
    u, w = e[0] - e[2], e[1] - e[3]
    u = u / max(float(np.hypot(*u)), 1e-9)
    w = w / max(float(np.hypot(*w)), 1e-9)
    return u, w, np.array([(lengths[0] + lengths[2]) / 2, (lengths[1] + lengths[3]) / 2])


def _side_along(axes: tuple[np.ndarray, np.ndarray, np.ndarray], d: np.ndarray) -> float:
    """The pattern's side along unit direction ``d`` (the pair of edges nearest to it)."""
    u, w, sides = axes
    return float(sides[0] if abs(d @ u) >= abs(d @ w) else sides[1])


def _aligned(axes: tuple[np.ndarray, np.ndarray, np.ndarray], d: np.ndarray) -> int:
    """0 or 1: which edge direction of a pattern ``d`` runs along, -1 for neither."""
    cu, cw = abs(float(d @ axes[0])), abs(float(d @ axes[1]))
    if max(cu, cw) < _FP_ALIGN:
        return -1
    return 0 if cu >= cw else 1


def finder_codes(work_gray: np.ndarray, patterns: Sequence[FinderPattern]) -> list[np.ndarray]:
    """Codes made of three finder patterns, each as its four corners (4, 2) in order around it,
    kept where modules fill that outline. The ``_FP_MAX_PATTERNS`` largest patterns take part,
    and at most ``_FP_MAX_TRIPLES`` triples are tried (a page of square characters holds many
    pattern-like shapes)."""
    patterns = sorted(patterns, key=lambda p: -p.area)[:_FP_MAX_PATTERNS]
    axes = [_edge_axes(p.quad) for p in patterns]
    # arms: pattern b to pattern i, along b's edge direction ``along`` and one of i's, with
    # the span of a code between them; (i, along, unit vector, modules)
    arms: list[list[tuple[int, int, np.ndarray, float]]] = [[] for _ in patterns]
    for b, pb in enumerate(patterns):
        for i, pi in enumerate(patterns):
            if i == b or not 1 / _FP_AREA_RATIO < pi.area / pb.area < _FP_AREA_RATIO:
                continue
            arm = pi.centre - pb.centre
            d = float(np.hypot(*arm))
            if d == 0:
                continue
            v = arm / d
            along = _aligned(axes[b], v)
            if along < 0 or _aligned(axes[i], v) < 0:
                continue
            modules = 14 * d / (_side_along(axes[b], v) + _side_along(axes[i], v))
            if _FP_SPAN[0] <= modules <= _FP_SPAN[1]:
                arms[b].append((i, along, v, modules))
    triples: list[tuple[float, int, int, int, float]] = []
    for b, own in enumerate(arms):
        for x, (i, along1, v1, n1) in enumerate(own):
            for k, along2, v2, n2 in own[x + 1:]:
                if (along2 != 1 - along1 or abs(float(v1 @ v2)) > _FP_MIN_TURN
                        or not _FP_SQUARE < n1 / n2 < 1 / _FP_SQUARE):
                    continue
                err = (2 - abs(float(v1 @ axes[b][along1])) - abs(float(v2 @ axes[b][along2]))
                       + abs(math.log(n1 / n2)))
                triples.append((err, b, i, k, (n1 + n2) / 2 + 7))
    triples.sort()
    used: set[int] = set()
    codes: list[np.ndarray] = []
    centres = [p.centre for p in patterns]
    for _, b, i, k, modules in triples[:_FP_MAX_TRIPLES]:
        if {b, i, k} & used:
            continue
        quad = _code_outline(patterns[b], patterns[i], patterns[k], modules)
        # a QR code has three finder patterns, no more: a fourth inside the outline means a
        # grid of square marks (tiles, a page of square characters)
        others = [centres[j] for j in range(len(patterns)) if j not in (b, i, k)]
        if any(cv2.pointPolygonTest(quad.astype(np.float32), (float(x), float(y)), False) > 0
               for x, y in others) or not _fills_square(work_gray, quad, modules):
            continue
        used |= {b, i, k}
        codes.append(quad)
    return codes


def _fills_square(work_gray: np.ndarray, outline: np.ndarray, modules: float) -> bool:
    """Whether modules fill a code's outline (4, 2), corners in order around it: mapped onto a
    square of about ``_FP_GRID_PX`` pixels a module, nearly every cell of a 4x4 grid is mostly
    module edges (a QR code's modules spread over its whole square; a logo in the middle may
    blank a few cells). Three finder-like patterns of different objects enclose plain surfaces
    and a few straight edges."""
    cell = int(min(max(math.ceil(modules * _FP_GRID_PX / 4), 12), 60))
    side = 4 * cell
    dst = np.array([[0, 0], [side, 0], [side, side], [0, side]], np.float32)
    patch = cv2.warpPerspective(work_gray, cv2.getPerspectiveTransform(
        outline.astype(np.float32), dst), (side, side), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE)
    lo, hi = np.percentile(patch, (5, 95))
    if hi - lo < _RANGE_ABS:
        return False
    k = np.ones((3, 3), np.uint8)
    edges = cv2.subtract(cv2.dilate(patch, k), cv2.erode(patch, k)) > _FP_EDGE * (hi - lo)
    cells = edges.reshape(4, cell, 4, cell).mean(axis=(1, 3))
    return int((cells >= _FP_CELL_EDGES).sum()) >= _FP_MIN_CELLS


def _code_outline(corner: FinderPattern, p1: FinderPattern, p2: FinderPattern,
                  modules: float) -> np.ndarray:
    """A code's corners (4, 2), in order around it from the corner of ``corner`` (the pattern at
    the right angle), from its three finder patterns: the homography that takes the patterns'
    twelve corners to their places in an ``modules``-wide module grid maps the grid's corners
    into the image (under perspective the fourth corner is not a parallelogram's; that is the
    fallback where the fit fails)."""
    n = float(modules)
    ex = p1.centre - corner.centre
    ey = p2.centre - corner.centre
    basis = np.array([ex, ey]).T
    grid_pts: list[np.ndarray] = []
    image_pts: list[np.ndarray] = []
    for fp, (gx, gy) in ((corner, (3.5, 3.5)), (p1, (n - 3.5, 3.5)), (p2, (3.5, n - 3.5))):
        # which side of the pattern's centre each corner lies on, along the code's two axes
        side = np.sign(np.linalg.solve(basis, (fp.quad - fp.centre).T).T)
        grid_pts.append(np.array([gx, gy]) + 3.5 * side)
        image_pts.append(fp.quad)
    src = np.concatenate(grid_pts).astype(np.float32)
    dst = np.concatenate(image_pts).astype(np.float32)
    c0 = corner.quad[np.argmax(np.hypot(*(corner.quad - (p1.centre + p2.centre) / 2).T))]
    c1 = p1.quad[np.argmax(np.hypot(*(p1.quad - p2.centre).T))]
    c2 = p2.quad[np.argmax(np.hypot(*(p2.quad - p1.centre).T))]
    fallback = np.array([c0, c1, c1 + c2 - c0, c2], np.float64)
    if len({tuple(g) for g in src.tolist()}) < 12:
        return fallback  # a pattern's corners did not fall one in each quadrant
    h, _ = cv2.findHomography(src, dst, 0)
    if h is None:
        return fallback
    grid = np.array([[[0, 0]], [[n, 0]], [[n, n]], [[0, n]]], np.float32)
    quad = cv2.perspectiveTransform(grid, h).reshape(4, 2).astype(np.float64)
    size = float(np.hypot(*(c1 - c0)) + np.hypot(*(c2 - c0)))
    if (not np.isfinite(quad).all() or not cv2.isContourConvex(quad.astype(np.float32))
            or np.hypot(*(quad[[0, 1, 3]] - [c0, c1, c2]).T).max() > _FP_FIT_TOL * size):
        return fallback
    return quad


# --------------------------------------------------------------------------------------------
# 1-D barcode candidates of OpenCV's locator


def _rectify_bars(gray: np.ndarray, quad: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """The region of a barcode candidate turned so that its longer side is horizontal, with a
    margin, enlarged (up to 4x) towards ``_BAR_CROP`` pixels wide."""
    (cx, cy), (w, h), angle = cv2.minAreaRect(quad.astype(np.float32))
    if h > w:
        w, h, angle = h, w, angle + 90
    w2, h2 = w * (1 + 2 * margin), h * (1 + 2 * margin)
    f = min(4.0, max(1.0, _BAR_CROP / max(w2, 1.0)))
    m = cv2.getRotationMatrix2D((cx, cy), angle, f)
    m[0, 2] += w2 * f / 2 - cx
    m[1, 2] += h2 * f / 2 - cy
    size = (max(8, round(w2 * f)), max(8, round(h2 * f)))
    return cv2.warpAffine(gray, m, size, flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)


def _looks_like_bars(crop: np.ndarray) -> bool:
    """Many bars across the middle of a rectified crop, running through its height (fences,
    stripes and gratings have few, or only some of them reach across)."""
    h = crop.shape[0]
    profile = crop[int(h * 0.3):max(int(h * 0.7), int(h * 0.3) + 1)].mean(0)
    if profile.max() - profile.min() < 2 * _RANGE_ABS:
        return False
    t = (float(profile.max()) + float(profile.min())) / 2
    edges = int(np.count_nonzero(np.diff((profile > t).astype(np.int8))))
    top = crop[int(h * 0.2):max(int(h * 0.4), int(h * 0.2) + 1)].mean(0)
    bottom = crop[int(h * 0.6):max(int(h * 0.8), int(h * 0.6) + 1)].mean(0)
    if top.std() == 0 or bottom.std() == 0:
        return False
    return edges >= _BAR_MIN_EDGES and float(np.corrcoef(top, bottom)[0, 1]) >= _BAR_MIN_CORR


# --------------------------------------------------------------------------------------------
# the detector


@dataclass
class _Found:
    boxes: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    method: list[str] = field(default_factory=list)
    # order of the merge: a code's outline (read, or fixed by its three finder patterns) goes
    # first, then texture blobs, then QR symbols zxing located but could not read (their size is
    # guessed from a partly sampled grid, and often too small)
    ranks: list[float] = field(default_factory=list)

    def add(self, box: np.ndarray, score: float, category: str, method: str,
            rank: float) -> None:
        self.boxes.append(box)
        self.scores.append(score)
        self.categories.append(category)
        self.method.append(method)
        self.ranks.append(rank)


def _position_quad(barcode: zxingcpp.Barcode) -> np.ndarray:
    p = barcode.position
    return np.array([[p.top_left.x, p.top_left.y], [p.top_right.x, p.top_right.y],
                     [p.bottom_right.x, p.bottom_right.y], [p.bottom_left.x, p.bottom_left.y]],
                    np.float64)


def _overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a),) bool: box of ``a`` is a duplicate of some box of ``b`` (IoU or nesting)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros(len(a), bool)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    area_b = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :]
    iou = inter / np.maximum(area_a + area_b - inter, 1e-6)
    nested = inter / np.maximum(np.minimum(area_a, area_b), 1e-6)
    return ((iou > NMS_IOU) | (nested > NMS_CONTAIN)).any(1)


def _union_overlapping(xyxy: np.ndarray) -> np.ndarray:
    """Each box replaced by the union of the boxes it overlaps, directly or through others."""
    n = len(xyxy)
    group = np.arange(n)
    for i in range(n):
        for j in range(i + 1, n):
            if (min(xyxy[i, 2], xyxy[j, 2]) > max(xyxy[i, 0], xyxy[j, 0])
                    and min(xyxy[i, 3], xyxy[j, 3]) > max(xyxy[i, 1], xyxy[j, 1])):
                group[group == group[j]] = group[i]
    out = xyxy.copy()
    for g in np.unique(group):
        members = group == g
        out[members] = np.concatenate([xyxy[members, :2].min(0), xyxy[members, 2:].max(0)])
    return out


METHODS: tuple[str, ...] = ("zxing", "zxing_2x", "texture", "finder", "cv_barcode")


class CodeDetector:
    """QR codes and 1-D/2-D barcodes located by zxing-cpp (Apache-2.0, no model file).

    ``categories``: the subset of ``("qr_codes", "barcodes")`` to find. ``max_side``: frames are
    scaled down to this longer side first. ``upscale_small``: frames whose longer side is at most
    1024 px after that are also read at 2x. ``threads``: above 1, the passes run concurrently on
    up to that many threads (zxing-cpp and OpenCV release the GIL); 0 or 1 runs them in turn.
    ``grow``: share of a decoded code's width/height added on each side of its box (default:
    ``QR_DECODED_GROW`` for a decoded QR code, ``GROW`` for every other symbol and for QR codes
    located but not read).
    """

    def __init__(self, categories: Sequence[str] = CATEGORIES, max_side: int = 1920,
                 upscale_small: bool = True, threads: int = 0, grow: float | None = None,
                 texture_threshold: float = TEXTURE_THRESHOLD,
                 methods: Sequence[str] = METHODS) -> None:
        wanted = tuple(dict.fromkeys(categories))
        if not wanted or any(c not in CATEGORIES for c in wanted):
            raise ValueError(f"CodeDetector finds {', '.join(CATEGORIES)}; got {list(categories)}")
        if any(m not in METHODS for m in methods):
            raise ValueError(f"unknown methods {list(methods)}; known: {', '.join(METHODS)}")
        if max_side < 64:
            raise ValueError(f"max_side {max_side} is below 64 pixels")
        if threads < 0:
            raise ValueError(f"threads {threads} is negative")
        if grow is not None and not 0.0 <= grow <= 0.5:
            raise ValueError(f"grow {grow} is outside [0, 0.5]")
        if not 0.0 < texture_threshold < 1.0:
            raise ValueError(f"texture threshold {texture_threshold} is outside (0, 1)")
        self.categories: tuple[str, ...] = tuple(c for c in CATEGORIES if c in wanted)
        self.max_side = int(max_side)
        self.upscale_small = bool(upscale_small)
        self.threads = int(threads)
        self.grow = None if grow is None else float(grow)
        self.texture_threshold = float(texture_threshold)
        self.methods = tuple(methods)
        want_qr = QR_CATEGORY in self.categories
        want_bar = BARCODE_CATEGORY in self.categories
        self._formats = zxingcpp.BarcodeFormats(
            [f for f in _ALL_FORMATS if (want_qr if f in _QR_FORMATS else want_bar)])
        self._local = threading.local()  # one cv2.barcode.BarcodeDetector per thread

    @property
    def models(self) -> list[ModelInfo]:
        return [ModelInfo(f"zxing-cpp {zxing_version()}", "", "", "Apache-2.0")]

    # ---------------------------------------------------------------------------------------
    def detect(self, image: np.ndarray) -> Detections:
        return self.detect_with_methods(image)[0]

    def detect_with_methods(self, image: np.ndarray) -> tuple[Detections, list[str]]:
        """:meth:`detect`, plus the pass that produced each box (for evaluation)."""
        if (not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3
                or image.shape[2] != 3):
            raise ValueError("CodeDetector.detect takes a BGR uint8 image of shape (H, W, 3)")
        h, w = image.shape[:2]
        if h < 8 or w < 8:
            return Detections.empty(), []
        f = min(1.0, self.max_side / max(h, w))
        work = image if f == 1.0 else cv2.resize(
            image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
        gray = cv2.cvtColor(np.ascontiguousarray(work), cv2.COLOR_BGR2GRAY)
        upscale = self.upscale_small and max(gray.shape) <= UPSCALE_MAX_SIDE

        passes: list[Callable[[], _Found]] = []
        if "zxing" in self.methods:
            passes.append(lambda: self._zxing(gray, 1.0))
        if "zxing_2x" in self.methods and upscale:
            passes.append(lambda: self._zxing(gray, 2.0))
        if "texture" in self.methods and QR_CATEGORY in self.categories:
            passes.append(lambda: self._texture(gray))
        if "finder" in self.methods and QR_CATEGORY in self.categories:
            passes.append(lambda: self._finder(gray))
        if "cv_barcode" in self.methods and BARCODE_CATEGORY in self.categories:
            passes.append(lambda: self._cv_barcode(gray))
        if self.threads > 1 and len(passes) > 1:
            with ThreadPoolExecutor(min(self.threads, len(passes))) as pool:
                found = list(pool.map(lambda run: run(), passes))
        else:
            found = [run() for run in passes]

        boxes = [b for fd in found for b in fd.boxes]
        if not boxes:
            return Detections.empty(), []
        xyxy = np.clip(np.stack(boxes) / f, 0, [w, h, w, h])
        score = np.array([s for fd in found for s in fd.scores], np.float32)
        category = np.array([c for fd in found for c in fd.categories])
        method = np.array([m for fd in found for m in fd.method])
        ok = (xyxy[:, 2] - xyxy[:, 0] >= 1) & (xyxy[:, 3] - xyxy[:, 1] >= 1)
        priority = np.array([r for fd in found for r in fd.ranks])
        # a QR-category box on a code that was decoded as a barcode (Data Matrix, PDF417, a
        # dense 1-D code the texture locator took for a QR code) is that barcode
        decoded_bar = ok & (category == BARCODE_CATEGORY) & (score >= DECODED_SCORE)
        guess_qr = ok & (category == QR_CATEGORY) & (score < DECODED_SCORE)
        ok[guess_qr] = ~_overlaps(xyxy[guess_qr], xyxy[decoded_bar])
        keep_all: list[np.ndarray] = []
        for cat in self.categories:
            idx = np.flatnonzero(ok & (category == cat))
            if idx.size and cat == BARCODE_CATEGORY:
                # zxing's box of a 1-D code follows the lines it read, OpenCV's the bars it
                # saw: the union of the two covers the code
                xyxy[idx] = _union_overlapping(xyxy[idx])
            if idx.size:
                keep_all.append(idx[_merge(xyxy[idx], priority[idx])])
        keep = np.sort(np.concatenate(keep_all)) if keep_all else np.zeros(0, np.int64)
        return (Detections(xyxy[keep].astype(np.float32), score[keep],
                           category[keep].astype("<U16")),
                method[keep].tolist())

    # ---------------------------------------------------------------------------------------
    def _read(self, gray: np.ndarray, formats: zxingcpp.BarcodeFormats
              ) -> list[tuple[zxingcpp.BarcodeFormat, bool, np.ndarray]]:
        """zxing-cpp's findings as (format, decoded, corners); the contents are never kept."""
        out = []
        for code in zxingcpp.read_barcodes(gray, formats=formats, try_rotate=True,
                                           try_downscale=True, try_invert=True,
                                           return_errors=True):
            out.append((code.format, bool(code.valid), _position_quad(code)))
        return out

    def _zxing(self, gray: np.ndarray, scale: float) -> _Found:
        out = _Found()
        if len(self._formats) == 0:
            return out
        img = gray if scale == 1.0 else cv2.resize(gray, None, fx=scale, fy=scale,
                                                    interpolation=cv2.INTER_CUBIC)
        method = "zxing" if scale == 1.0 else "zxing_2x"
        for fmt, decoded, quad in self._read(img, self._formats):
            is_qr = fmt in _QR_FORMATS
            if not decoded and fmt not in _UNDECODED_KEPT:
                # undecodable "1-D codes", "Data Matrix" and "rMQR" symbols are mostly noise;
                # a real one is left to OpenCV's locator or the texture locator
                continue
            thick = (EAN_UPC_MIN_THICKNESS if fmt in _EAN_UPC_FORMATS
                     else LINEAR_MIN_THICKNESS if fmt in _LINEAR_FORMATS else 0.0)
            grow = (self.grow if self.grow is not None
                    else QR_DECODED_GROW if is_qr and decoded else GROW)
            score = DECODED_SCORE if decoded else UNDECODED_QR_SCORE
            out.add(_quad_box(quad / scale, grow, thick), score,
                    QR_CATEGORY if is_qr else BARCODE_CATEGORY, method,
                    _OUTLINE_RANK + score if decoded else score)
        return out

    def _texture(self, gray: np.ndarray) -> _Found:
        out = _Found()
        for blob in texture_blobs(gray, self.texture_threshold):
            if blob.probability > self.texture_threshold or blob.finders:
                # the blob mask already reaches past the code's edge: no growth
                score = max(blob.probability, FINDER_BLOB_SCORE if blob.finders else 0.0)
                out.add(_quad_box(blob.quad, 0.0), score, QR_CATEGORY, "texture",
                        _TEXTURE_RANK + blob.shape_probability)
        return out

    def _finder(self, gray: np.ndarray) -> _Found:
        out = _Found()
        for quad in finder_codes(gray, finder_patterns(gray)):
            out.add(_quad_box(quad, GROW if self.grow is None else self.grow), FINDER_SCORE,
                    QR_CATEGORY, "finder", _OUTLINE_RANK + FINDER_SCORE)
        return out

    def _cv_barcode(self, gray: np.ndarray) -> _Found:
        """OpenCV's gradient locator; each candidate is confirmed by zxing-cpp on a rectified,
        enlarged crop (any symbol found, read or not) or by the look of its bars."""
        out = _Found()
        detector = getattr(self._local, "barcode", None)
        if detector is None:
            detector = self._local.barcode = cv2.barcode.BarcodeDetector()
        try:
            ok, points = detector.detectMulti(gray)
        except cv2.error:
            return out
        if not ok or points is None:
            return out
        for quad in np.asarray(points, np.float64).reshape(-1, 4, 2):
            crop = _rectify_bars(gray, quad)
            found = self._read(crop, _BAR_FORMATS)
            if found:
                score = DECODED_SCORE if any(d for _, d, _ in found) else BARCODE_LOCATOR_SCORE
            elif _looks_like_bars(crop):
                score = BARCODE_LOCATOR_SCORE
            else:
                continue
            out.add(_quad_box(quad, GROW if self.grow is None else self.grow), score,
                    BARCODE_CATEGORY, "cv_barcode", score)
        return out
