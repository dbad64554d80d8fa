"""Licence plates: text lines that a second step tells from other text.

No permissively licensed plate detector exists, so plates are found in two steps:

1. the PP-OCRv6 text detector (:class:`engines.text.TextDetector`) finds text lines; fragments of
   one line (a plate found as "AB 12" and "CD 345") are joined into one candidate;
2. the candidates that could be plates by their shape (a short line, at least 8 px tall and
   under a third of the image) are read by the PP-OCRv6 recogniser, each once and all of an
   image in one call, and scored by

   - what they read (:func:`text_score`): 4 to 9 letters and digits in at most three groups,
     capitals, most plates mixing letters and digits; words (lowercase), long strings, dates,
     times, phone numbers and non-Latin text score 0, capitals only score low unless the
     recogniser saw a digit in one of the letters (O read for 0);
   - how sure the recogniser is;
   - their look (:func:`look_score`): two clearly separated tones, characters on a plain
     background that takes most of the line;

   two short lines stacked like the rows of a square plate, too short to pass alone, are
   scored once more on their two readings put together (no second read).

A candidate that passes is grown from its characters to the whole plate (a plate is a little
wider than its characters and about twice as tall) and returned as an axis-aligned box.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import cv2
import numpy as np

from engines.detections import Detections
from engines.faces import ModelInfo
from engines.text import (
    TEXT_DET_SPEC,
    TEXT_REC_SPEC,
    Reading,
    TextDetector,
    TextLines,
    TextRecognizer,
    crop_line,
    line_quad,
)

CATEGORY = "license_plates"

__all__ = ["CATEGORY", "TEXT_DET_SPEC", "TEXT_REC_SPEC", "PlateCandidate", "PlateDetector",
           "look_score", "text_score"]

# What a recogniser reads between the groups of a plate: spaces, hyphens, the dot of Brazilian
# plates, the colon-like EU separators, emblems and stickers read as symbols.
_SEPARATORS = re.compile(r"[\s\-·:=.+•*_/,'\"`|~°]")
# Characters no plate carries: a reading with one is a sign, a price or an address.
_NOT_ON_PLATES = re.compile(r"[%&$#@!?€£¥§()\[\]{}<>;]")
_MISREAD_DIGIT_MASS = 0.1  # digit probability that marks a letter as a possible misread digit
_LETTERS_ONLY_SCORE = 0.25  # capitals only, no sign of a digit: brand names, signs, states
_DIGITS_ONLY_SCORE = 0.7
_CONFIDENT = 0.6  # recogniser confidence above which a reading counts in full
_MIN_THICKNESS_PX = 8.0  # lines thinner than this cannot be read
_MAX_THICKNESS_SHARE = 1 / 3  # of the image height
_ASPECT_RANGE = (1.2, 7.5)  # length / thickness of an unclipped plate line (measured 1.8-5.8)
_ASPECT_TYPICAL = (1.6, 6.0)


def text_score(reading: Reading) -> float:
    """How much a reading looks like a plate, in [0, 1] (confidence not counted)."""
    raw = reading.text.strip()
    if _NOT_ON_PLATES.search(raw):
        return 0.0
    compact = _SEPARATORS.sub("", raw)
    chars = [c for c in compact if c.isascii() and c.isalnum()]
    n = len(chars)
    other = len(compact) - n
    if not 4 <= n <= 9 or other > 1 or len(raw.split()) > 3:
        return 0.0
    lower = sum(c.islower() for c in chars)
    if lower > 1:
        return 0.0
    digits = sum(c.isdigit() for c in chars)
    if digits == n:
        # a plate of digits only is rare; dates, times, phone numbers and counters are not
        separators = len(_SEPARATORS.findall(raw.replace(" ", "")))
        if separators >= 2 or n >= 8 or ":" in raw:
            return 0.0
        score = _DIGITS_ONLY_SCORE
    elif digits == 0:
        # letters only: a misread plate (O for 0, I for 1: the digit keeps some probability),
        # a vanity plate, or a word (brand, sign, state name); only the first is trusted
        mass = reading.digit_mass or (0.0,) * len(reading.text)
        misread = any(m >= _MISREAD_DIGIT_MASS
                      for c, m in zip(reading.text, mass, strict=False) if c.isalpha())
        score = 0.8 if misread else _LETTERS_ONLY_SCORE
    else:
        score = 1.0
    if lower:
        score *= 0.6  # plates are written in capitals; "No 12" and "Apt 4B" are not
    if other:
        score *= 0.8
    return score


def look_score(crop: np.ndarray) -> float:
    """How much a flattened line crop looks like plate characters, in [0, 1]: two clearly
    separated tones (characters and a plain background), the background the larger part."""
    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY) if crop.ndim == 3 else crop
    h = gray.shape[0]
    inner = gray[h // 6: h - h // 6]  # the unclipped line has a margin above and below
    if inner.size < 16:
        return 0.0
    _, binary = cv2.threshold(inner, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    bright = binary > 0
    share = float(bright.mean())
    if share in (0.0, 1.0):
        return 0.0
    hi, lo = float(inner[bright].mean()), float(inner[~bright].mean())
    background = inner[bright] if share >= 0.5 else inner[~bright]
    ink = min(share, 1 - share)  # the characters are the smaller part
    contrast = min(1.0, (hi - lo) / 255.0 * 2.5)
    plain = 1.0 - min(1.0, 2 * float(background.std()) / max(hi - lo, 1.0))
    ink_ok = 1.0 if 0.12 <= ink <= 0.48 else 0.5
    return contrast * (0.5 + 0.5 * plain) * ink_ok


@dataclass
class PlateCandidate:
    """One text line (or two stacked lines) that may be a plate, in image pixels.

    ``quad`` is the rotated rectangle of the characters (top-left, top-right, bottom-right,
    bottom-left as the text reads); ``length`` runs along the line, ``thickness`` across it.
    The scores are in [0, 1]; ``score`` is what :class:`PlateDetector` thresholds.
    """

    quad: np.ndarray
    length: float
    thickness: float
    angle: float
    det_score: float
    rows: int = 1
    reading: Reading = field(default_factory=lambda: Reading("", 0.0))
    text: float = 0.0
    look: float = 0.0
    shape: float = 0.0
    score: float = 0.0

    @property
    def aspect(self) -> float:
        return self.length / max(self.thickness, 1e-6)


def _candidate_of_points(points: np.ndarray, det_score: float, rows: int = 1) -> PlateCandidate:
    rect = cv2.minAreaRect(points.reshape(-1, 1, 2).astype(np.float32))
    quad, (_cx, _cy, length, thick, angle) = line_quad(rect)
    return PlateCandidate(quad, length, thick, angle, det_score, rows)


def _angle_gap(a: float, b: float) -> float:
    return abs((a - b + 90) % 180 - 90)


def _union_groups(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[find(j)] = find(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def join_fragments(lines: TextLines) -> list[PlateCandidate]:
    """Lines that continue one another on one row (similar height and direction, centres on one
    line, a gap under one character height) joined into one candidate each."""
    n = len(lines)
    if n == 0:
        return []
    r = lines.rects.astype(np.float64)
    cx, cy, length, thick, angle = r[:, 0], r[:, 1], r[:, 2], r[:, 3], r[:, 4]
    rad = np.radians(angle)
    ux, uy = np.cos(rad), np.sin(rad)
    pairs: list[tuple[int, int]] = []
    for i in range(n):
        for j in range(i + 1, n):
            t = min(thick[i], thick[j])
            if max(thick[i], thick[j]) > 1.5 * t or _angle_gap(angle[i], angle[j]) > 12:
                continue
            dx, dy = cx[j] - cx[i], cy[j] - cy[i]
            along = dx * ux[i] + dy * uy[i]
            across = -dx * uy[i] + dy * ux[i]
            gap = abs(along) - (length[i] + length[j]) / 2
            if abs(across) <= 0.35 * t and gap <= 0.9 * t:
                pairs.append((i, j))
    out = []
    for members in _union_groups(n, pairs):
        if len(members) == 1:
            i = members[0]
            out.append(PlateCandidate(lines.quads[i].copy(), float(length[i]), float(thick[i]),
                                      float(angle[i]), float(lines.score[i])))
        else:
            out.append(_candidate_of_points(lines.quads[members].reshape(-1, 2),
                                            float(lines.score[members].mean())))
    return out


def _stacked(a: PlateCandidate, b: PlateCandidate) -> bool:
    """``b`` sits right under ``a`` like the second row of a two-row plate."""
    if _angle_gap(a.angle, b.angle) > 12:
        return False
    t = max(a.thickness, b.thickness)
    if min(a.thickness, b.thickness) < 0.6 * t:
        return False
    if not 0.5 <= a.length / max(b.length, 1e-6) <= 2.0:
        return False
    ca, cb = a.quad.mean(0), b.quad.mean(0)
    u = (a.quad[1] - a.quad[0]) / max(a.length, 1e-6)
    v = np.array([-u[1], u[0]])
    d = cb - ca
    along, across = float(d @ u), float(d @ v)
    gap = across - (a.thickness + b.thickness) / 2
    return abs(along) <= 0.3 * max(a.length, b.length) and -0.3 * t <= gap <= 0.6 * t


class PlateDetector:
    """Licence plates from text lines, told from other text by reading, shape and look.

    threshold:       plate score (0..1) a candidate needs.
    text_threshold, box_threshold, max_side: the text detector's settings (see
                     :class:`engines.text.TextDetector`).
    grow:            how much the characters' rectangle is grown along and across the line to
                     cover the whole plate (plates are a little wider than their characters
                     and about twice as tall).
    max_candidates:  at most this many lines per image are read (the most plate-like by shape
                     first); bounds the time a frame full of text takes.
    text_detector:   an existing :class:`TextDetector` to share (its settings then apply and
                     the text_* arguments are ignored); with :meth:`detect_lines` a caller that
                     also wants ``text`` boxes runs the text model once per frame.
    """

    categories: tuple[str, ...] = (CATEGORY,)

    def __init__(self, threshold: float = 0.35, text_threshold: float = 0.3,
                 box_threshold: float = 0.5, max_side: int = 1280,
                 model_path: str | None = None, rec_model_path: str | None = None,
                 threads: int = 0, grow: tuple[float, float] = (1.1, 1.4),
                 max_candidates: int = 16, text_detector: TextDetector | None = None,
                 device: str = "cpu", shared: bool = True) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"plate threshold {threshold} is outside [0, 1]")
        if min(grow) < 1.0:
            raise ValueError(f"plate grow factors {grow} must be at least 1")
        self.threshold = float(threshold)
        self.grow = (float(grow[0]), float(grow[1]))
        self.max_candidates = int(max_candidates)
        self.text = text_detector or TextDetector(
            threshold=text_threshold, box_threshold=box_threshold, max_side=max_side,
            model_path=model_path, threads=threads, category=CATEGORY, device=device,
            shared=shared)
        self.recognizer = TextRecognizer(model_path=rec_model_path, threads=threads,
                                         device=device, shared=shared)

    @property
    def models(self) -> list[ModelInfo]:
        return [self.text.info, self.recognizer.info]

    def detect(self, image: np.ndarray) -> Detections:
        return self.detect_lines(image, None)

    def detect_lines(self, image: np.ndarray, lines: TextLines | None) -> Detections:
        """Plates among ``lines`` (found on ``image`` by :attr:`text`; found here when None)."""
        cands = [c for c in self.candidates(image, lines) if c.score >= self.threshold]
        if not cands:
            return Detections.empty()
        h, w = image.shape[:2]
        xyxy = np.stack([self.plate_box(c) for c in cands])
        xyxy = np.clip(xyxy, 0, [w, h, w, h]).astype(np.float32)
        ok = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        score = np.array([c.score for c in cands], np.float32)
        return Detections.from_boxes(xyxy[ok], score[ok], CATEGORY)

    def candidates(self, image: np.ndarray,
                   lines: TextLines | None = None) -> list[PlateCandidate]:
        """The candidates that were read, with their readings and scores, best first."""
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        h = image.shape[0]
        if lines is None:
            lines = self.text.find_lines(image)
        cands = join_fragments(lines)
        for c in cands:
            c.shape = self._shape_score(c, h)
        cands = sorted((c for c in cands if c.shape > 0), key=lambda c: -c.shape * c.det_score)
        cands = cands[:self.max_candidates]
        if not cands:
            return []
        crops = [crop_line(image, c.quad) for c in cands]
        for c, crop, reading in zip(cands, crops, self.recognizer.read(crops), strict=True):
            c.reading = reading
            c.look = look_score(crop)
            self._score(c)
        cands += self._stacks(cands)
        cands.sort(key=lambda c: -c.score)
        return cands

    def plate_box(self, c: PlateCandidate) -> np.ndarray:
        """The axis-aligned box (x1, y1, x2, y2) around the candidate's rectangle grown to the
        plate."""
        gx, gy = self.grow
        q = c.quad.astype(np.float64)
        centre = q.mean(0)
        u = (q[1] - q[0]) / max(float(np.hypot(*(q[1] - q[0]))), 1e-6)
        v = (q[3] - q[0]) / max(float(np.hypot(*(q[3] - q[0]))), 1e-6)
        rel = q - centre
        grown = centre + np.outer(rel @ u * gx, u) + np.outer(rel @ v * gy, v)
        return np.concatenate([grown.min(0), grown.max(0)]).astype(np.float32)

    # internals -------------------------------------------------------------------------
    @staticmethod
    def _shape_score(c: PlateCandidate, image_h: int) -> float:
        """1 for the shape of a plate line, 0.7 at the edges of the range, 0 outside."""
        a = c.aspect
        if not _ASPECT_RANGE[0] <= a <= _ASPECT_RANGE[1] or c.thickness < _MIN_THICKNESS_PX:
            return 0.0
        if c.thickness > image_h * _MAX_THICKNESS_SHARE:
            return 0.0
        return 1.0 if _ASPECT_TYPICAL[0] <= a <= _ASPECT_TYPICAL[1] else 0.7

    @staticmethod
    def _score(c: PlateCandidate) -> None:
        c.text = text_score(c.reading) * min(1.0, c.reading.confidence / _CONFIDENT)
        c.score = c.text * (0.4 + 0.6 * c.look) * c.shape

    def _stacks(self, cands: list[PlateCandidate]) -> list[PlateCandidate]:
        """Two short lines, one above the other, that read as a plate together (two-row
        plates: motorcycles, square rear plates); their own readings are too short."""
        short = [c for c in cands if c.text == 0 and c.reading.text.strip()
                 and len(_SEPARATORS.sub("", c.reading.text)) <= 6]
        out = []
        for a in short:
            for b in short:
                if a is b or not _stacked(a, b):
                    continue
                joined = _candidate_of_points(np.concatenate([a.quad, b.quad]),
                                              (a.det_score + b.det_score) / 2, rows=2)
                joined.reading = Reading(
                    f"{a.reading.text} {b.reading.text}",
                    (a.reading.confidence + b.reading.confidence) / 2,
                    (*a.reading.digit_mass, 0.0, *b.reading.digit_mass))
                joined.look = (a.look + b.look) / 2
                joined.shape = 1.0
                self._score(joined)
                if joined.score > 0:
                    out.append(joined)
        return out
