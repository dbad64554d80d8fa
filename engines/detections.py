"""The columnar detections type shared by every detector, tracker and redactor.

Coordinates are ``x1, y1, x2, y2`` in pixels of the frame the detections belong to, as float32,
with ``x2 > x1`` and ``y2 > y1`` (half-open: the box covers columns ``x1 <= x < x2``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import numpy.typing as npt


class Origin(IntEnum):
    """Where a box came from."""

    DETECTED = 0  # the detector found it on this frame
    TRACKED = 1  # carried from another frame by the tracker (forward or backward)


@dataclass(frozen=True)
class Detections:
    """Boxes found on one frame.

    xyxy:     (n, 4) float32, frame pixels.
    score:    (n,) float32 in [0, 1].
    category: (n,) unicode strings (``"faces"``, ...).
    track_id: (n,) int64, -1 when the box belongs to no track.
    origin:   (n,) uint8 holding :class:`Origin` values.
    """

    xyxy: np.ndarray
    score: np.ndarray
    category: np.ndarray
    track_id: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    origin: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))

    def __post_init__(self) -> None:
        xyxy = np.asarray(self.xyxy, dtype=np.float32).reshape(-1, 4)
        n = len(xyxy)
        score = np.asarray(self.score, dtype=np.float32).reshape(-1)
        category = np.asarray(self.category, dtype=np.str_).reshape(-1)
        if category.size == 0:
            category = np.zeros(0, dtype="<U16")
        track_id = np.asarray(self.track_id, dtype=np.int64).reshape(-1)
        origin = np.asarray(self.origin, dtype=np.uint8).reshape(-1)
        if track_id.size == 0 and n:
            track_id = np.full(n, -1, np.int64)
        if origin.size == 0 and n:
            origin = np.full(n, Origin.DETECTED, np.uint8)
        for name, arr in (("score", score), ("category", category), ("track_id", track_id),
                          ("origin", origin)):
            if len(arr) != n:
                raise ValueError(f"Detections.{name} has {len(arr)} rows, xyxy has {n}")
        if n and not np.isfinite(xyxy).all():
            raise ValueError("Detections.xyxy holds NaN or infinite coordinates")
        object.__setattr__(self, "xyxy", xyxy)
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "category", category)
        object.__setattr__(self, "track_id", track_id)
        object.__setattr__(self, "origin", origin)

    # construction -----------------------------------------------------------------------
    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                   np.zeros(0, "<U16"))

    @classmethod
    def from_boxes(cls, xyxy: npt.ArrayLike, score: npt.ArrayLike, category: str) -> Detections:
        boxes = np.asarray(xyxy, np.float32).reshape(-1, 4)
        return cls(boxes, np.asarray(score, np.float32),
                   np.full(len(boxes), category, dtype="<U16"))

    @classmethod
    def concat(cls, parts: Iterable[Detections]) -> Detections:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.xyxy for p in parts]),
            np.concatenate([p.score for p in parts]),
            np.concatenate([p.category.astype("<U16") for p in parts]),
            np.concatenate([p.track_id for p in parts]),
            np.concatenate([p.origin for p in parts]),
        )

    # queries ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.xyxy)

    def select(self, mask: npt.ArrayLike) -> Detections:
        m = np.asarray(mask)
        return Detections(self.xyxy[m], self.score[m], self.category[m], self.track_id[m],
                          self.origin[m])

    def with_category(self, categories: Sequence[str]) -> Detections:
        return self.select(np.isin(self.category, list(categories)))

    def scaled(self, sx: float, sy: float) -> Detections:
        """Boxes multiplied by ``sx`` horizontally and ``sy`` vertically."""
        xyxy = self.xyxy * np.array([sx, sy, sx, sy], np.float32)
        return Detections(xyxy, self.score, self.category, self.track_id, self.origin)

    def counts(self) -> dict[str, int]:
        names, counts = np.unique(self.category, return_counts=True)
        return {str(k): int(v) for k, v in zip(names, counts, strict=True)}

    def to_records(self) -> list[dict[str, object]]:
        """JSON-ready rows: box rounded to 0.1 px, score to 3 digits."""
        return [
            {
                "category": str(self.category[i]),
                "xyxy": [round(float(v), 1) for v in self.xyxy[i]],
                "score": round(float(self.score[i]), 3),
                "track_id": int(self.track_id[i]),
                "origin": Origin(int(self.origin[i])).name.lower(),
            }
            for i in range(len(self))
        ]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box in ``a`` (n,4) with every box in ``b`` (m,4)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float32)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return (inter / np.maximum(union, 1e-6)).astype(np.float32)


def nms(xyxy: np.ndarray, score: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first."""
    order = np.argsort(-score, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        if order.size == 1:
            break
        ious = iou_matrix(xyxy[i : i + 1], xyxy[order[1:]])[0]
        order = order[1:][ious <= iou_threshold]
    return np.asarray(keep, np.int64)
