"""Carry boxes between detector calls, erring toward covering more.

The detector runs on a subset of frames (see :class:`Scheduler`). Between calls the tracker
predicts every live track forward with its velocity; the box grows with the time since the track
was last seen. When a later detection arrives, boxes are also carried backward into frames that
are still buffered (look-ahead): matched tracks are interpolated between their two detections (and,
when they moved far, also get their new box: they may have jumped), and a new track's box is
copied back, grown, into every frame since the detector's previous call, so an object is covered
from the first frame it appears in even though the detector skipped that frame.

What a frame gets covered is the union of its own detections, every confirmed, tentative and
recently lost track, and the boxes carried back to it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from engines.detections import Detections, Origin, iou_matrix
from engines.redact import thumbnail

# a predicted box also grows by this share of the distance moved since last seen (speed changes)
MOTION_SLACK = 0.75
MATCH_GATE = 2.0  # largest centre distance, in box sizes, at which a detection joins a track
UNSURE_SCORE = 0.5  # a track scoring under this makes the detector look again sooner
# a new track's box, carried back before its motion is known, grows by this share of its size
BIRTH_SLACK = 0.3
# a track whose centre moved more than this share of its size between two detections may have
# jumped (a person stepping out from behind something, a fast turn): the frames between get
# its new box too, not only the interpolated one
JUMP = 0.25
MAX_CARRY = 120  # frames a box is carried back at most (live streams that dropped frames)


@dataclass
class Track:
    id: int
    category: str
    box: np.ndarray  # (4,) float64 xyxy at ``frame``
    frame: int  # last frame the detector saw it on
    velocity: np.ndarray  # (4,) px per frame of x1, y1, x2, y2
    score: float
    hits: int = 1

    def predict(self, frame: int, margin: float) -> np.ndarray:
        """Box at ``frame``, moved by the velocity and grown by the uncertainty."""
        dt = frame - self.frame
        box = self.box + self.velocity * dt
        w, h = box[2] - box[0], box[3] - box[1]
        # uncertainty: a share of the box size per frame apart, plus half the motion so far
        motion = MOTION_SLACK * abs(dt)
        gx = margin * w * min(abs(dt), 10) / 4 + abs(self.velocity[[0, 2]]).max() * motion
        gy = margin * h * min(abs(dt), 10) / 4 + abs(self.velocity[[1, 3]]).max() * motion
        return box + np.array([-gx, -gy, gx, gy])


class Tracker:
    """IoU / centre-distance tracker with constant velocity, made for a detector run every
    ``period`` frames.

    max_coast:  frames a track that the detector stopped finding is still covered.
    margin:     box growth per 4 frames of uncertainty, as a share of the box size.
    lookback:   how many earlier frames a new track's box is carried back into.
    """

    def __init__(self, period: int = 1, max_coast: int | None = None, margin: float = 0.2,
                 lookback: int | None = None, match_iou: float = 0.05,
                 ids: Iterator[int] | None = None) -> None:
        self.period = max(1, period)
        self.max_coast = max_coast if max_coast is not None else 2 * self.period + 6
        self.margin = margin
        self.lookback = lookback if lookback is not None else 2 * self.period
        self.match_iou = match_iou
        self.tracks: list[Track] = []
        self._last_frame = -1  # the latest frame the detector ran on
        self._ids = ids if ids is not None else itertools.count()  # shared by several trackers
        self.distinct: dict[str, int] = {}

    def observe(self, frame: int, dets: Detections) -> tuple[Detections,
                                                              list[tuple[int, Detections]]]:
        """Take the detector's boxes for ``frame``.

        Returns the detections with their track ids, and boxes carried backward as
        ``(earlier_frame, Detections)`` pairs.
        """
        # frames since the previous call were never seen by the detector (more than a period
        # when a live stream dropped frames): a new track is carried back into all of them
        prev = self._last_frame
        unseen = min(MAX_CARRY, frame - prev - 1) if 0 <= prev < frame else 0
        self._last_frame = frame
        track_ids = np.full(len(dets), -1, np.int64)
        back: dict[int, list[tuple[np.ndarray, Track]]] = {}
        unmatched = list(range(len(dets)))
        if self.tracks and len(dets):
            pred = np.array([t.predict(frame, 0.0) for t in self.tracks])
            sim = iou_matrix(pred.astype(np.float32), dets.xyxy)
            # centre distance relative to size, to keep fast small objects matched
            pc = (pred[:, :2] + pred[:, 2:]) / 2
            dc = (dets.xyxy[:, :2] + dets.xyxy[:, 2:]) / 2
            size = np.maximum(pred[:, 2:] - pred[:, :2], 1).max(1)
            dist = np.linalg.norm(pc[:, None] - dc[None], axis=2) / size[:, None]
            # a face may move more than its own size between detector calls: accept centres
            # up to MATCH_GATE sizes apart, preferring overlap, then the nearer centre
            score = np.where(dist < MATCH_GATE, np.maximum(sim, 0.5 * (1 - dist / MATCH_GATE)),
                             sim)
            same_cat = np.array([t.category for t in self.tracks])[:, None] == dets.category[None]
            score = np.where(same_cat, score, 0)
            used_t: set[int] = set()
            for ti, di in zip(*np.unravel_index(np.argsort(-score, axis=None), score.shape),
                              strict=True):
                if score[ti, di] < self.match_iou:
                    break
                if ti in used_t or track_ids[di] >= 0:
                    continue
                used_t.add(int(ti))
                t = self.tracks[ti]
                new_box = dets.xyxy[di].astype(np.float64)
                dt = frame - t.frame
                if dt > 0:
                    v = (new_box - t.box) / dt
                    if t.hits == 1:
                        # second sighting: now the motion is known, carry the first box
                        # backward along it (it was carried back unmoved at birth)
                        for k in range(1, self.lookback + 1):
                            back.setdefault(t.frame - k, []).append(
                                (self._grow(t.box - v * k, self.margin * min(k, 10) / 4 + 0.1),
                                 t))
                    t.velocity = v if t.hits == 1 else 0.5 * t.velocity + 0.5 * v
                    size = max(new_box[2] - new_box[0], new_box[3] - new_box[1], 1.0)
                    moved = float(np.linalg.norm((new_box[:2] + new_box[2:]) / 2
                                                 - (t.box[:2] + t.box[2:]) / 2))
                    jumped = moved > JUMP * size
                    for g in range(max(t.frame + 1, frame - MAX_CARRY), frame):
                        a = (g - t.frame) / dt
                        interp = (1 - a) * t.box + a * new_box
                        back.setdefault(g, []).append((self._grow(interp, 0.1), t))
                        if jumped:  # it may have got there at any frame in between
                            grow = BIRTH_SLACK + self.margin * min(frame - g, 10) / 4
                            back.setdefault(g, []).append((self._grow(new_box, grow), t))
                t.box, t.frame, t.score = new_box, frame, float(dets.score[di])
                t.hits += 1
                track_ids[di] = t.id
                unmatched.remove(int(di))
        for di in unmatched:
            t = Track(next(self._ids), str(dets.category[di]), dets.xyxy[di].astype(np.float64),
                      frame, np.zeros(4), float(dets.score[di]))
            self.distinct[t.category] = self.distinct.get(t.category, 0) + 1
            self.tracks.append(t)
            track_ids[di] = t.id
            for k in range(1, max(self.lookback, unseen) + 1):
                back.setdefault(frame - k, []).append(
                    (self._grow(t.box, BIRTH_SLACK + self.margin * min(k, 10) / 4), t))
        self.tracks = [t for t in self.tracks if frame - t.frame <= self.max_coast]
        out = Detections(dets.xyxy, dets.score, dets.category, track_ids,
                         np.full(len(dets), Origin.DETECTED, np.uint8))
        carried = [(g, self._to_dets(items)) for g, items in sorted(back.items()) if g >= 0]
        return out, carried

    def unsure(self) -> bool:
        """Whether a live track is new, was missed by the last detection, or scores low: the
        detector should look again sooner."""
        return any(t.hits < 3 or t.frame < self._last_frame or t.score < UNSURE_SCORE
                   for t in self.tracks)

    def predict(self, frame: int) -> Detections:
        """Boxes for every live track not detected on ``frame`` itself."""
        items = [(t.predict(frame, self.margin), t) for t in self.tracks if t.frame != frame
                 and frame - t.frame <= self.max_coast]
        return self._to_dets(items)

    @staticmethod
    def _grow(box: np.ndarray, share: float) -> np.ndarray:
        w, h = box[2] - box[0], box[3] - box[1]
        return box + np.array([-w, -h, w, h]) * share / 2

    @staticmethod
    def _to_dets(items: list[tuple[np.ndarray, Track]]) -> Detections:
        if not items:
            return Detections.empty()
        return Detections(
            np.array([b for b, _ in items], np.float32),
            np.array([t.score for _, t in items], np.float32),
            np.array([t.category for _, t in items], "<U16"),
            np.array([t.id for _, t in items], np.int64),
            np.full(len(items), Origin.TRACKED, np.uint8),
        )


class Scheduler:
    """Decides which frames the detector runs on: every ``period`` frames, every
    ``period - 1`` while the tracker is unsure (``busy``: a new, lost or low-score track), and at
    once when the picture changes a lot (a scene cut or fast camera motion), judged on a 32x18
    thumbnail."""

    def __init__(self, period: int = 3, scene_change: float = 24.0) -> None:
        if period < 1:
            raise ValueError("the detector period must be at least 1 frame")
        self.period = period
        self.scene_change = scene_change  # mean absolute difference, 0..255
        self._last_index: int | None = None
        self._last_thumb: np.ndarray | None = None

    def should_detect(self, index: int, pixels: np.ndarray, busy: bool = False) -> bool:
        if self.period == 1:
            return True
        thumb = thumbnail(pixels, 32, 18).astype(np.int16)
        period = max(1, self.period - 1) if busy else self.period
        due = self._last_index is None or index - self._last_index >= period
        if not due and self._last_thumb is not None and self.scene_change > 0:
            due = float(np.abs(thumb - self._last_thumb).mean()) > self.scene_change
        if due:
            self._last_index, self._last_thumb = index, thumb
        return due
