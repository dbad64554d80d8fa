"""Text detection (PP-OCRv6 small, DB head) and line recognition (PP-OCRv6 small, CTC) on
onnxruntime.

:class:`TextDetector` finds text lines on a BGR uint8 image and returns them as axis-aligned
:class:`Detections`; :meth:`TextDetector.find_lines` also gives the rotated rectangle of every
line, which :class:`TextRecognizer` reads (the plate detector uses both).

The pre- and post-processing follow PaddleOCR's DB post-process (as RapidOCR ships it) without
its pipeline classes: the probability map is thresholded, every connected region becomes its
minimum-area rectangle, kept when the mean probability inside the region reaches
``box_threshold``, then grown ("unclipped") by ``area * 1.6 / perimeter`` on every side. For a
rectangle, the polygon offset PaddleOCR runs through pyclipper has exactly that rectangle grown
by the offset as its minimum-area rectangle, so it is computed directly here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from engines.backends import load_model
from engines.detections import Detections
from engines.faces import ModelInfo
from engines.models import TEXT_DET, TEXT_REC, sha256_file

CATEGORY = "text"

TEXT_DET_SPEC = TEXT_DET
TEXT_REC_SPEC = TEXT_REC

_STRIDE = 32
_MIN_SIDE_PX = 3.0  # model-input pixels: thinner regions are noise (PaddleOCR's min_size)
_MAX_CANDIDATES = 1000
_UNCLIP_RATIO = 1.6

# an OpenCV rotated rectangle: centre, size, angle in degrees
RotatedRect = tuple[Sequence[float], Sequence[float], float]


@dataclass(frozen=True)
class TextLines:
    """Text lines found on one image, in that image's pixels.

    quads:  (n, 4, 2) float32, corners of each line's rotated rectangle, clockwise from the
            top-left one (as the text reads).
    rects:  (n, 5) float32, the same rectangles as ``cx, cy, w, h, angle`` where ``w`` runs
            along the line and ``h`` across it (``h <= w`` is not guaranteed for one-character
            lines), angle in degrees.
    xyxy:   (n, 4) float32, axis-aligned boxes around the quads, clipped to the image.
    score:  (n,) float32, mean text probability inside each line.
    """

    quads: np.ndarray
    rects: np.ndarray
    xyxy: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.score)

    @classmethod
    def empty(cls) -> TextLines:
        return cls(np.zeros((0, 4, 2), np.float32), np.zeros((0, 5), np.float32),
                   np.zeros((0, 4), np.float32), np.zeros(0, np.float32))

    def select(self, mask: np.ndarray) -> TextLines:
        return TextLines(self.quads[mask], self.rects[mask], self.xyxy[mask], self.score[mask])


def line_quad(rect: RotatedRect) -> tuple[np.ndarray, tuple[float, float, float, float, float]]:
    """Corners of an OpenCV rotated rectangle ordered top-left, top-right, bottom-right,
    bottom-left along the text direction (the long side), and the rectangle as
    ``cx, cy, length, thickness, angle``."""
    pts = cv2.boxPoints(rect).astype(np.float32)
    (cx, cy), _size, _angle = rect
    # the long side is the reading direction; of the two ways along it take the one that
    # runs left to right (or top to bottom for vertical text)
    e1, e2 = pts[1] - pts[0], pts[2] - pts[1]
    along = e1 if np.hypot(*e1) >= np.hypot(*e2) else e2
    if along[0] < 0 or (along[0] == 0 and along[1] < 0):
        along = -along
    length = float(np.hypot(*along))
    u = along / max(length, 1e-6)
    v = np.array([-u[1], u[0]], np.float32)  # across the line, pointing down for flat text
    centre = np.array([cx, cy], np.float32)
    rel = pts - centre
    a, b = rel @ u, rel @ v
    thickness = float(b.max() - b.min())
    quad = np.stack([
        centre + u * a.min() + v * b.min(),
        centre + u * a.max() + v * b.min(),
        centre + u * a.max() + v * b.max(),
        centre + u * a.min() + v * b.max(),
    ]).astype(np.float32)
    angle = float(np.degrees(np.arctan2(u[1], u[0])))
    return quad, (float(cx), float(cy), float(a.max() - a.min()), thickness, angle)


class TextDetector:
    """PP-OCRv6 small text detector; one pass with the long side at ``max_side`` pixels.

    threshold:      text probability a pixel needs to belong to a line.
    box_threshold:  mean probability a line needs inside its rectangle (the box score).
    max_side:       the model sees the image with its long side at this many pixels (larger
                    images are shrunk, smaller ones enlarged up to ``max_upscale`` times); small
                    text needs about 1280.
    category:       category name the boxes carry.
    """

    spec = TEXT_DET_SPEC

    def __init__(self, threshold: float = 0.3, box_threshold: float = 0.5, max_side: int = 1280,
                 model_path: str | None = None, threads: int = 0, category: str = CATEGORY,
                 max_upscale: float = 1.5, device: str = "cpu", shared: bool = True) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"text threshold {threshold} is outside (0, 1)")
        if not 0.0 < box_threshold < 1.0:
            raise ValueError(f"text box threshold {box_threshold} is outside (0, 1)")
        if max_side < _STRIDE:
            raise ValueError(f"max_side {max_side} is below {_STRIDE}")
        self.threshold = float(threshold)
        self.box_threshold = float(box_threshold)
        self.max_side = int(max_side)
        self.max_upscale = max(1.0, float(max_upscale))
        self.category = category
        self.categories: tuple[str, ...] = (category,)
        self.path: Path = self.spec.resolve(model_path)
        self._session = load_model(self.path.read_bytes(), device=device, threads=threads,
                                   shared=shared)
        self._input = self._session.get_inputs()[0].name
        self._kernel = np.ones((2, 2), np.uint8)

    # public ------------------------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.spec.name, self.path.name, sha256_file(self.path), self.spec.license)

    @property
    def models(self) -> list[ModelInfo]:
        return [self.info]

    def detect(self, image: np.ndarray) -> Detections:
        lines = self.find_lines(image)
        return Detections.from_boxes(lines.xyxy, lines.score, self.category)

    def scale_for(self, shape: tuple[int, ...], max_side: int | None = None) -> float:
        """The factor the image is resized by before the model sees it."""
        h, w = shape[:2]
        side = self.max_side if max_side is None else max_side
        return min(side / max(h, w, 1), self.max_upscale)

    def find_lines(self, image: np.ndarray, max_side: int | None = None) -> TextLines:
        """Text lines with their rotated rectangles; ``max_side`` overrides the input size."""
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        h, w = image.shape[:2]
        if h < 2 or w < 2:
            return TextLines.empty()
        scale = self.scale_for(image.shape, max_side)
        prob, sx, sy = self.probability_map(image, scale)
        return self._lines_from_map(prob, sx, sy, w, h)

    def probability_map(self, image: np.ndarray, scale: float) -> tuple[np.ndarray, float, float]:
        """The model's text probability map (H', W') float32 of ``image`` resized by about
        ``scale``, and the x and y factors from image to map pixels.

        Each side is rounded to a multiple of 32 (as PaddleOCR does: the aspect ratio changes
        by at most 16 px a side) rather than padded: the edge between an image and any
        padding reads as text to the model, on bright frames most of all.
        """
        h, w = image.shape[:2]
        nw = max(_STRIDE, round(w * scale / _STRIDE) * _STRIDE)
        nh = max(_STRIDE, round(h * scale / _STRIDE) * _STRIDE)
        shrink = nw * nh < w * h
        resized = image if (nw, nh) == (w, h) else cv2.resize(
            image, (nw, nh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        # (x / 255 - 0.5) / 0.5, BGR, NCHW
        blob = cv2.dnn.blobFromImage(resized, 1 / 127.5, (nw, nh), (127.5, 127.5, 127.5),
                                     swapRB=False, crop=False)
        out = self._session.run(None, {self._input: blob})[0]
        prob = np.asarray(out[0, 0], np.float32)
        return prob, nw / w, nh / h

    # internals -------------------------------------------------------------------------
    def _lines_from_map(self, prob: np.ndarray, sx: float, sy: float, width: int,
                        height: int) -> TextLines:
        mask = cv2.dilate((prob > self.threshold).astype(np.uint8), self._kernel)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        quads: list[np.ndarray] = []
        rects: list[tuple[float, float, float, float, float]] = []
        scores: list[float] = []
        mh, mw = prob.shape
        box_mask = np.zeros((mh, mw), np.uint8)
        for contour in contours[:_MAX_CANDIDATES]:
            if len(contour) < 2:
                continue
            rect = cv2.minAreaRect(contour)
            (cx, cy), (rw, rh), angle = rect
            if min(rw, rh) < _MIN_SIDE_PX:
                continue
            # the box score is the mean probability inside the region's own outline (PaddleOCR's
            # "slow" score): a slanted or curved line scores as high as a straight one
            x0, y0, bw, bh = cv2.boundingRect(contour)
            x1, y1 = x0 + bw - 1, y0 + bh - 1
            sub = box_mask[y0:y1 + 1, x0:x1 + 1]
            sub[:] = 0
            cv2.fillPoly(sub, [contour - np.array([x0, y0], np.int32)], 1)
            score = cv2.mean(prob[y0:y1 + 1, x0:x1 + 1], sub)[0]
            if score < self.box_threshold:
                continue
            grow = rw * rh * _UNCLIP_RATIO / (2 * (rw + rh))
            grown = ((cx, cy), (rw + 2 * grow, rh + 2 * grow), angle)
            if min(grown[1]) < _MIN_SIDE_PX + 2:
                continue
            quad, geometry = line_quad(grown)
            quads.append(quad)
            rects.append(geometry)
            scores.append(float(score))
        if not quads:
            return TextLines.empty()
        q = np.stack(quads).astype(np.float32)
        q[:, :, 0] /= sx
        q[:, :, 1] /= sy
        r = np.asarray(rects, np.float32)
        r[:, 0] /= sx
        r[:, 1] /= sy
        # lengths and thicknesses back in image pixels (sx and sy differ by under a pixel)
        s = (sx + sy) / 2
        r[:, 2:4] /= s
        xyxy = np.concatenate([q.min(1), q.max(1)], 1)
        xyxy = np.clip(xyxy, 0, [width, height, width, height]).astype(np.float32)
        ok = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        lines = TextLines(q, r, xyxy, np.asarray(scores, np.float32))
        return lines.select(ok)


def crop_line(image: np.ndarray, quad: np.ndarray, height: int = 48) -> np.ndarray:
    """The line inside ``quad`` (4, 2) (top-left, top-right, bottom-right, bottom-left), warped
    flat to ``height`` pixels tall, its width following the quad's aspect ratio."""
    q = np.asarray(quad, np.float32)
    length = float(max(np.hypot(*(q[1] - q[0])), np.hypot(*(q[2] - q[3])), 1.0))
    thick = float(max(np.hypot(*(q[3] - q[0])), np.hypot(*(q[2] - q[1])), 1.0))
    out_w = max(1, round(height * length / thick))
    dst = np.array([[0, 0], [out_w, 0], [out_w, height], [0, height]], np.float32)
    m = cv2.getPerspectiveTransform(q, dst)
    return cv2.warpPerspective(image, m, (out_w, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)


@dataclass(frozen=True)
class Reading:
    """What the recogniser read on one line: the text, the mean confidence of its characters
    (0 for an empty reading) and, per character of ``text``, the largest probability the
    recogniser gave the ten digits over that character's frames (a letter read where a digit
    stands, O for 0 or I for 1, keeps some digit probability)."""

    text: str
    confidence: float
    digit_mass: tuple[float, ...] = ()


class TextRecognizer:
    """PP-OCRv6 small line recogniser (CTC over 18 708 characters: Latin, CJK, symbols).

    Takes BGR line crops (any size; they are resized to 48 px tall) and returns what they read.
    The character list comes from the model file's ``character`` metadata.
    """

    spec = TEXT_REC_SPEC
    height = 48
    max_width = 480  # a line wider than 10:1 is squeezed: plates never are
    # narrower lines are padded to this width: the model reads short lines (plates) better
    # with some blank space after them, as it was trained (PaddleOCR pads to 320)
    min_width = 160

    def __init__(self, model_path: str | None = None, threads: int = 0, device: str = "cpu",
                 shared: bool = True) -> None:
        self.path: Path = self.spec.resolve(model_path)
        self._session = load_model(self.path.read_bytes(), device=device, threads=threads,
                                   shared=shared)
        self._input = self._session.get_inputs()[0].name
        meta = self._session.get_modelmeta().custom_metadata_map
        if "character" not in meta:
            raise ValueError(f"{self.path} holds no character list in its metadata")
        # CTC classes: 0 is the blank, then the listed characters, then a space
        self.characters: list[str] = ["", *meta["character"].splitlines(), " "]
        self._digit_ids = np.array([i for i, ch in enumerate(self.characters)
                                    if len(ch) == 1 and "0" <= ch <= "9"], np.int64)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.spec.name, self.path.name, sha256_file(self.path), self.spec.license)

    def read(self, crops: list[np.ndarray], batch: int = 16) -> list[Reading]:
        """The reading of every crop. Crops of similar width (within 25%) share a batch: the
        padding a narrow crop gets in a batch of wide ones changes what the model reads."""
        if not crops:
            return []
        widths = [min(self.max_width, max(8, round(self.height * c.shape[1] / max(c.shape[0], 1))))
                  for c in crops]
        order = [int(i) for i in np.argsort(widths, kind="stable")]
        batches: list[list[int]] = []
        for i in order:
            if batches and len(batches[-1]) < batch and widths[i] <= 1.25 * widths[batches[-1][0]]:
                batches[-1].append(i)
            else:
                batches.append([i])
        out: list[Reading] = [Reading("", 0.0)] * len(crops)
        for idx in batches:
            bw = max(self.min_width, *(widths[i] for i in idx))
            blob = np.zeros((len(idx), 3, self.height, bw), np.float32)
            for j, i in enumerate(idx):
                c = crops[i]
                if c.ndim == 2:
                    c = cv2.cvtColor(c, cv2.COLOR_GRAY2BGR)
                r = cv2.resize(c, (widths[i], self.height), interpolation=cv2.INTER_LINEAR)
                blob[j, :, :, :widths[i]] = r.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
            probs = self._session.run(None, {self._input: blob})[0]
            for j, i in enumerate(idx):
                out[i] = self._decode(probs[j])
        return out

    def _decode(self, probs: np.ndarray) -> Reading:
        """Greedy CTC decoding: the best class per frame, repeats merged, blanks dropped."""
        ids = probs.argmax(1)
        conf = probs.max(1)
        keep = ids != 0
        keep[1:] &= ids[1:] != ids[:-1]
        if not keep.any():
            return Reading("", 0.0)
        starts = np.nonzero(keep)[0]
        text = "".join(self.characters[int(i)] for i in ids[starts])
        digits = probs[:, self._digit_ids].sum(1)
        ends = [*starts[1:], len(ids)]
        mass = tuple(float(digits[a:b].max()) for a, b in zip(starts, ends, strict=True))
        return Reading(text, float(conf[keep].mean()), mass)
