"""Tracking and scheduling: every frame gets the union of its own detections, live tracks and
boxes carried back from later detections. Checked through RedactStage with fake detectors on
drawn frames, so the result is in the pixels."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import pytest

from engines.detections import Detections, Origin
from engines.errors import DetectorError
from engines.faces import ModelInfo
from engines.redact import Method, Style
from pipeline.frame import Frame
from pipeline.stages import RedactStage
from pipeline.tracker import Scheduler, Tracker

W, H = 240, 160
RED = (0, 0, 255)
FILL = Style(Method.FILL, fill_bgr=RED)  # default ellipse, mask scale 1.3


class BlobDetector:
    """Finds the white blob (pure 255 pixels) of a frame; blind on the calls listed."""

    categories: tuple[str, ...] = ("faces",)

    def __init__(self, blind_calls: Sequence[int] = (), only_calls: Sequence[int] | None = None,
                 fail_on_call: int | None = None) -> None:
        self.calls = 0
        self.blind_calls = set(blind_calls)
        self.only_calls = None if only_calls is None else set(only_calls)
        self.fail_on_call = fail_on_call

    @property
    def models(self) -> list[ModelInfo]:
        return []

    def detect(self, image: np.ndarray) -> Detections:
        call = self.calls
        self.calls += 1
        if call == self.fail_on_call:
            raise RuntimeError("model crashed")
        if call in self.blind_calls or (self.only_calls is not None
                                        and call not in self.only_calls):
            return Detections.empty()
        ys, xs = np.nonzero((image == 255).all(-1))
        if not len(ys):
            return Detections.empty()
        return Detections.from_boxes([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], [0.9],
                                     "faces")


def disc_frame(cx: float, cy: float, r: int = 12) -> np.ndarray:
    f = np.full((H, W, 3), 90, np.uint8)
    cv2.circle(f, (round(cx), round(cy)), r, (255, 255, 255), -1)
    return f


def visible(frame: Frame) -> int:
    """How many pixels of the white disc are still visible."""
    return int((frame.pixels == 255).all(-1).sum())


def run_stage(frames: Sequence[np.ndarray], detector: BlobDetector, period: int,
              lookahead: int, style: Style = FILL, scene_change: float = 0.0,
              on_push: Callable[[int, list[Frame]], None] | None = None) -> list[Frame]:
    stage = RedactStage(detector, style, period, lookahead, scene_change)
    out: list[Frame] = []
    for i, px in enumerate(frames):
        released = stage.push(Frame(i, px.copy()))
        if on_push:
            on_push(i, released)
        out += released
    out += stage.flush()
    return out


def static_disc(n: int) -> list[np.ndarray]:
    return [disc_frame(120, 80) for _ in range(n)]


def test_frames_come_out_in_order_all_redacted() -> None:
    out = run_stage(static_disc(17), BlobDetector(), period=3, lookahead=5)
    assert [f.index for f in out] == list(range(17))
    assert all(f.redacted for f in out)


def test_face_detected_on_frame_0_is_covered_on_frame_0() -> None:
    out = run_stage(static_disc(6), BlobDetector(), period=3, lookahead=0)
    assert out[0].detector_ran
    assert visible(out[0]) == 0
    assert (out[0].pixels[80, 120] == RED).all()
    assert [visible(f) for f in out] == [0] * 6


def test_track_missed_for_a_few_frames_stays_covered() -> None:
    det = BlobDetector(blind_calls=[4, 5, 6, 7])
    out = run_stage(static_disc(14), det, period=1, lookahead=0)
    assert det.calls == 14
    assert [visible(f) for f in out] == [0] * 14
    for i in (4, 5, 6, 7):  # covered by the track, not by a detection
        assert out[i].boxes[0].origin.tolist() == [Origin.TRACKED]


def test_box_found_on_a_later_scheduled_frame_is_carried_back() -> None:
    """The detector only finds the face on its 3rd call (frame 6): frames 0-5, still in the
    look-ahead buffer, are covered too."""
    det = BlobDetector(only_calls=range(2, 100))
    out = run_stage(static_disc(12), det, period=3, lookahead=8)
    # every 3rd frame until the face shows up; then sooner while its track is new; and the
    # last frame
    assert [f.index for f in out if f.detector_ran] == [0, 3, 6, 8, 10, 11]
    assert [visible(f) for f in out] == [0] * 12
    for f in out[:6]:  # carried back: at birth, and again along the motion at frame 8
        assert set(f.boxes[0].origin.tolist()) == {Origin.TRACKED}
        assert (f.pixels[80, 120] == RED).all()


def test_carried_back_only_as_far_as_the_lookahead() -> None:
    det = BlobDetector(only_calls=range(2, 100))
    released_before: list[int] = []

    def note(i: int, frames: list[Frame]) -> None:
        if i < 6:
            released_before.extend(f.index for f in frames)

    out = run_stage(static_disc(12), det, period=3, lookahead=3, on_push=note)
    # frames 0-2 had left before frame 6 was seen; 3-5 were held and get the box
    assert released_before == [0, 1, 2]
    assert [visible(f) == 0 for f in out] == [False] * 3 + [True] * 9


def test_moving_face_is_covered_between_detector_calls() -> None:
    """A disc moving 3 px a frame, the detector every 4th frame: forward prediction and
    interpolation back from the next detection cover every frame in between."""
    frames = [disc_frame(20 + 3 * i, 60 + i) for i in range(40)]
    det = BlobDetector()
    out = run_stage(frames, det, period=4, lookahead=8)
    # every 4th frame, every 3rd while the track is new, and the last frame
    assert det.calls == 12
    assert [visible(f) for f in out] == [0] * 40


def test_new_face_appearing_between_detector_calls_is_covered_from_its_first_frame() -> None:
    frames = [np.full((H, W, 3), 90, np.uint8) for _ in range(5)]
    frames += [disc_frame(60 + 2 * i, 70) for i in range(10)]
    out = run_stage(frames, BlobDetector(), period=3, lookahead=8)
    assert not out[5].detector_ran  # appears on frame 5, first detected on frame 6
    assert [visible(f) for f in out] == [0] * 15


def test_fast_face_is_covered_up_to_the_last_frame() -> None:
    """A disc moving 8 px a frame (more than its own size between detector calls) that leaves
    through the right border: it stays matched to its track, the last frame is detected, and
    the part cut by the border is covered as a rectangle."""
    frames = [disc_frame(20 + 8 * i, 80, r=12) for i in range(30)]
    out = run_stage(frames, BlobDetector(), period=3, lookahead=8)
    assert [visible(f) for f in out] == [0] * 30


def test_detector_error_releases_nothing_more() -> None:
    det = BlobDetector(fail_on_call=2)
    stage = RedactStage(det, FILL, period=1, lookahead=3)
    released: list[Frame] = []
    for i in range(2):
        released += stage.push(Frame(i, disc_frame(120, 80)))
    with pytest.raises(DetectorError, match="frame 2"):
        stage.push(Frame(2, disc_frame(120, 80)))
    assert released == []  # still in the look-ahead buffer: nothing unredacted got out


# --------------------------------------------------------------------------------------------
# Tracker on its own

def dets(*boxes: tuple[float, float, float, float]) -> Detections:
    return Detections.from_boxes(np.array(boxes, np.float32).reshape(-1, 4),
                                 [0.9] * len(boxes), "faces")


def test_tracker_ids_predictions_and_backward_boxes() -> None:
    t = Tracker(period=3, lookback=4)
    out, back = t.observe(10, dets((100, 100, 140, 140)))
    assert out.track_id.tolist() == [0]
    # a new track is copied back, grown, into the look-back frames
    assert [g for g, _ in back] == [6, 7, 8, 9]
    for _, d in back:
        x1, y1, x2, y2 = d.xyxy[0]
        assert x1 < 100 and y1 < 100 and x2 > 140 and y2 > 140
        assert d.origin.tolist() == [Origin.TRACKED]
    # the same object 6 px further: same track, frames in between interpolated
    out, back = t.observe(13, dets((106, 100, 146, 140)))
    assert out.track_id.tolist() == [0]
    # frames in between are interpolated; now that the motion is known (2 px a frame), the
    # first box is also carried back along it into the look-back frames before frame 10
    assert sorted({g for g, _ in back}) == [6, 7, 8, 9, 11, 12]
    between = dict(back)[11]
    assert between.xyxy[0][0] == pytest.approx(102 - 0.1 * 40 / 2, abs=0.01)
    x1_before = {g: d.xyxy[0][0] for g, d in back if g < 10 and d.xyxy[0][0] > 90}
    assert x1_before and all(x1_before[g] < x1_before.get(g + 1, 1e9) for g in x1_before)
    # forward prediction moves with the velocity and grows
    pred = t.predict(15)
    assert pred.track_id.tolist() == [0]
    x1, _, x2, _ = pred.xyxy[0]
    assert x1 < 110 and x2 > 150
    # a far object of another category is a new track
    out, _ = t.observe(16, Detections.from_boxes([[0, 0, 10, 10]], [0.8], "plates"))
    assert out.track_id.tolist() == [1]
    assert t.distinct == {"faces": 1, "plates": 1}


def test_tracker_forgets_a_track_after_max_coast() -> None:
    t = Tracker(period=1, max_coast=5)
    t.observe(0, dets((10, 10, 30, 30)))
    assert len(t.predict(5)) == 1
    t.observe(6, Detections.empty())
    assert len(t.predict(6)) == 0


# --------------------------------------------------------------------------------------------
# Scheduler

def schedule(s: Scheduler, frames: Sequence[np.ndarray]) -> list[int]:
    return [i for i, f in enumerate(frames) if s.should_detect(i, f)]


@pytest.mark.parametrize(("period", "expected"), [
    (1, list(range(10))),
    (2, [0, 2, 4, 6, 8]),
    (3, [0, 3, 6, 9]),
    (4, [0, 4, 8]),
    (20, [0]),
])
def test_scheduler_period(period: int, expected: list[int]) -> None:
    frames = [np.full((72, 128, 3), 100, np.uint8)] * 10
    assert schedule(Scheduler(period), frames) == expected


def test_scheduler_runs_at_once_on_a_scene_change() -> None:
    frames = [np.zeros((72, 128, 3), np.uint8)] * 5 + [np.full((72, 128, 3), 200, np.uint8)] * 7
    assert schedule(Scheduler(3), frames) == [0, 3, 5, 8, 11]
    # a small change (noise, lighting) does not count as a cut
    rng = np.random.default_rng(1)
    noisy = [np.clip(100 + rng.normal(0, 5, (72, 128, 3)), 0, 255).astype(np.uint8)
             for _ in range(10)]
    assert schedule(Scheduler(3), noisy) == [0, 3, 6, 9]
    # scene_change=0 turns cut detection off
    assert schedule(Scheduler(3, scene_change=0), frames) == [0, 3, 6, 9]


def test_scheduler_rejects_period_0() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Scheduler(0)


def test_scheduler_looks_sooner_while_the_tracker_is_unsure() -> None:
    blank = np.full((H, W, 3), 90, np.uint8)
    calm, busy = Scheduler(period=4), Scheduler(period=4)
    calm_runs = [i for i in range(12) if calm.should_detect(i, blank)]
    busy_runs = [i for i in range(12) if busy.should_detect(i, blank, busy=True)]
    assert calm_runs == [0, 4, 8]
    assert busy_runs == [0, 3, 6, 9]


def test_tracker_is_unsure_about_new_lost_and_low_score_tracks() -> None:
    t = Tracker(period=3)
    assert not t.unsure()
    t.observe(0, dets((10, 10, 40, 40)))
    assert t.unsure()  # new
    t.observe(3, dets((10, 10, 40, 40)))
    t.observe(6, dets((10, 10, 40, 40)))
    assert not t.unsure()  # seen three times at a high score
    t.observe(9, Detections.empty())
    assert t.unsure()  # missed by the last detection


def _covers(d: Detections, box: tuple[float, float, float, float]) -> bool:
    return any(b[0] <= box[0] and b[1] <= box[1] and b[2] >= box[2] and b[3] >= box[3]
               for b in d.xyxy)


def test_a_new_track_is_carried_back_into_every_frame_the_detector_did_not_see() -> None:
    """A live stream that dropped frames calls the detector further apart than its period:
    a face found now is carried back into every frame since the previous call."""
    t = Tracker(period=3, lookback=3)
    t.observe(100, Detections.empty())
    _, back = t.observe(112, dets((100, 100, 140, 140)))  # 11 frames unseen
    assert [g for g, _ in back] == list(range(101, 112))
    assert all(_covers(d, (100, 100, 140, 140)) for _, d in back)


def test_a_track_that_jumped_is_covered_where_it_landed_in_the_frames_between() -> None:
    """A matched face that moved far between two calls may have got there at any frame in
    between: those frames get its new box, not only the interpolated one."""
    t = Tracker(period=3, lookback=3)
    t.observe(10, dets((200, 100, 240, 140)))
    _, back = t.observe(13, dets((140, 100, 180, 140)))  # 60 px left: 1.5 box sizes
    between = {g: d for g, d in back if 10 < g < 13}
    assert set(between) == {11, 12}
    assert all(_covers(d, (140, 100, 180, 140)) for d in between.values())
    # a small step is interpolated only
    t2 = Tracker(period=3, lookback=3)
    t2.observe(10, dets((200, 100, 240, 140)))
    _, back2 = t2.observe(13, dets((206, 100, 246, 140)))
    assert not any(_covers(d, (206, 100, 246, 140)) for g, d in back2 if g == 11)
