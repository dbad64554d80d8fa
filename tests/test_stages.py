"""The redaction stage's four steps, each alone (schedule, await detections, track and hold,
redact), and the detection service and model cache they run on."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from engines.backends import BatchedSession, load_model, loaded_models, split_batch
from engines.detections import Detections, Origin
from engines.errors import DetectorError
from engines.faces import ModelInfo
from engines.models import YUNET
from engines.redact import Method, Shape, Style
from engines.registry import VIDEO_PROFILE, build_detector
from engines.service import DetectionService, detection_service
from pipeline.frame import Frame
from pipeline.settings import RedactSettings
from pipeline.stages import (
    AwaitDetections,
    Redact,
    RedactStage,
    Schedule,
    TrackAndHold,
    direct,
    make_lanes,
)
from tests.conftest import astronaut_bgr_image

FILL = Style(Method.FILL, fill_bgr=(255, 0, 255))


class Square:
    """Finds the white square of a frame (its bounding box), counting calls."""

    categories: tuple[str, ...] = ("faces",)

    def __init__(self, fail: bool = False, wait: threading.Event | None = None) -> None:
        self.calls = 0
        self.fail = fail
        self.wait = wait

    @property
    def models(self) -> list[ModelInfo]:
        return []

    def detect(self, image: np.ndarray) -> Detections:
        self.calls += 1
        if self.wait is not None:
            self.wait.wait(10)
        if self.fail:
            raise RuntimeError("model crashed")
        ys, xs = np.nonzero((image == 255).all(-1))
        if not len(ys):
            return Detections.empty()
        return Detections.from_boxes([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], [0.9],
                                     "faces")


def square_frame(index: int, x: int | None = 40) -> Frame:
    px = np.full((96, 128, 3), 90, np.uint8)
    if x is not None:
        px[30:50, x:x + 20] = 255
    return Frame(index, px)


# ---------------------------------------------------------------------------------------------
# step 1: schedule
def test_schedule_runs_a_lane_every_period_and_sooner_while_unsure() -> None:
    lanes = make_lanes(Square(), period=3, lookahead=0, scene_change=0)
    schedule = Schedule(lanes)
    due = [bool(schedule.due(square_frame(i, x=None))) for i in range(7)]
    assert due == [True, False, False, True, False, False, True]  # nothing tracked: period 3
    lanes[0].tracker.observe(7, Square().detect(square_frame(7).pixels))  # a new track: unsure
    due = [bool(schedule.due(square_frame(i))) for i in range(8, 12)]
    assert due == [True, False, True, False]  # every period - 1 frames (after 6) while unsure


# step 2: await detections
def test_await_detections_submits_every_due_lane_and_counts_calls() -> None:
    lanes = make_lanes(Square(), period=1, lookahead=0, scene_change=0)
    frame = square_frame(0)
    found = AwaitDetections(direct)(frame, lanes)
    assert [(lane.name, len(d)) for lane, d in found] == [("faces", 1)]
    assert lanes[0].calls == 1 and frame.detector_ran and frame.lanes_ran == {"faces"}
    assert AwaitDetections(direct)(square_frame(1), []) == []  # nothing due: nothing submitted


def test_await_detections_turns_a_failure_into_a_detector_error_naming_the_frame() -> None:
    lanes = make_lanes(Square(fail=True), period=1, lookahead=0, scene_change=0)
    with pytest.raises(DetectorError, match="frame 5: model crashed"):
        AwaitDetections(direct)(square_frame(5), lanes)


def test_await_detections_gives_up_after_its_timeout() -> None:
    stuck = threading.Event()
    lanes = make_lanes(Square(wait=stuck), period=1, lookahead=0, scene_change=0)
    service = DetectionService(workers=1)
    try:
        t0 = time.monotonic()
        with pytest.raises(DetectorError, match=r"frame 3: no answer within 0\.2 s"):
            AwaitDetections(service.submit, timeout_s=0.2)(square_frame(3), lanes)
        assert time.monotonic() - t0 < 2
    finally:
        stuck.set()
        service.close()


# step 3: track and hold
def test_track_and_hold_carries_a_new_object_back_into_the_held_frames() -> None:
    lanes = make_lanes(Square(), period=3, lookahead=2, scene_change=0)
    hold = TrackAndHold(lanes, lookahead=2)
    frames = [square_frame(i, x=40 + 2 * i) for i in range(3)]
    for f in frames[:2]:  # the detector did not run on these
        hold.hold(f)
        hold.predict(f, lanes[0])
    assert hold.ready() == []
    hold.hold(frames[2])
    hold.observe(frames[2], lanes[0], Square().detect(frames[2].pixels))
    out = hold.ready()
    assert [f.index for f in out] == [0] and hold.held == 2
    boxes = out[0].detections()
    assert len(boxes) >= 1 and (boxes.origin == Origin.TRACKED).all()  # carried backward
    x1, y1, x2, y2 = boxes.xyxy.min(0)[0], 30, boxes.xyxy.max(0)[2], 50
    assert x1 <= 40 and x2 >= 60 and y1 <= 30 and y2 >= 50
    assert [f.index for f in hold.release()] == [1, 2] and hold.held == 0


# step 4: redact
def test_redact_covers_boxes_and_zones_and_marks_the_frame() -> None:
    frame = square_frame(0)
    frame.boxes.append(Detections.from_boxes([[40, 30, 60, 50]], [0.9], "faces"))
    zone = [(0.0, 0.75), (0.25, 0.75), (0.25, 1.0), (0.0, 1.0)]  # bottom-left, fractions
    out = Redact(Style(Method.FILL, Shape.BOX, 1.0, (255, 0, 255)), [zone])(frame)
    assert out.redacted
    assert (out.pixels[30:50, 40:60] == (255, 0, 255)).all()  # the box
    assert (out.pixels[72:, :32] == (255, 0, 255)).all()  # the zone
    assert (out.pixels[:20, 100:] == 90).all()  # elsewhere untouched


def test_the_stage_fails_closed_and_hands_back_what_it_held() -> None:
    det = Square()
    stage = RedactStage(det, FILL, period=1, lookahead=3, submit=direct)
    for i in range(3):
        assert stage.push(square_frame(i)) == []
    det.fail = True
    with pytest.raises(DetectorError, match="frame 3"):
        stage.push(square_frame(3))
    held = stage.release_unredacted()
    assert [f.index for f in held] == [0, 1, 2, 3] and not any(f.redacted for f in held)
    assert stage.held == 0


# ---------------------------------------------------------------------------------------------
# the detection service and the model cache
def test_the_stage_uses_the_shared_service_by_default() -> None:
    service = detection_service("cpu")
    before = service.stats.submitted
    stage = RedactStage(Square(), FILL, period=1, lookahead=0)
    out = stage.push(square_frame(0))
    assert out[0].redacted and (out[0].pixels[30:50, 40:60] == (255, 0, 255)).all()
    assert service.stats.submitted == before + 1


def test_one_model_session_however_many_streams_and_jobs() -> None:
    settings = [RedactSettings(("faces",)), RedactSettings(("faces",), per_category={}),
                RedactSettings(("faces", "qr_codes"))]
    detectors = [s.detector(kind) for s in settings for kind in ("video", "image")]
    detectors += [build_detector(("faces",), VIDEO_PROFILE) for _ in range(5)]
    yunet = YUNET.resolve()
    faces = [m for m in loaded_models() if m.sha256 == _sha_of_dynamic(yunet)]
    assert len(faces) == 1, [m.sha256[:8] for m in loaded_models()]
    assert faces[0].device == "cpu"
    img = astronaut_bgr_image()
    assert all(len(d.parts[0].detect(img)) >= 1 for d in detectors)  # all of them work


def _sha_of_dynamic(path: Any) -> str:
    import hashlib

    from engines.models import dynamic_onnx_bytes

    return hashlib.sha256(dynamic_onnx_bytes(path, {"input": ["B", 3, "H", "W"]})).hexdigest()


class _Recorder:
    """A session whose run takes 50 ms and records the batch sizes it was given."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def run(self, names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        x = feed["x"]
        self.batches.append(len(x))
        time.sleep(0.05)
        return [x * 2, x.sum(axis=(1, 2))]


def test_a_batched_session_runs_concurrent_callers_together_and_splits_their_rows() -> None:
    inner = _Recorder()
    session = BatchedSession(inner, max_batch=4)
    results: dict[int, list[np.ndarray]] = {}

    def call(i: int) -> None:
        x = np.full((1, 2, 3), i, np.float32)
        results[i] = session.run(["y", "s"], {"x": x})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == list(range(7))
    for i, (y, s) in results.items():  # each caller got its own rows back
        assert y.shape == (1, 2, 3) and (y == 2 * i).all() and s.tolist() == [6.0 * i]
    assert sum(inner.batches) == 7 and max(inner.batches) > 1  # shared runs
    assert max(inner.batches) <= 4 and session.runs == len(inner.batches)


def test_batched_outputs_are_cut_back_by_frame_on_either_axis() -> None:
    first = np.arange(2 * 3 * 2).reshape(2, 3, 2)  # (B, N, k)
    assert [p.tolist() for p in split_batch(first, [1, 1]) or []] == [
        first[:1].tolist(), first[1:].tolist()]
    flat = np.arange(1 * 6 * 2).reshape(1, 6, 2)  # (1, B * N, k), frame-major
    parts = split_batch(flat, [2, 1])
    assert parts is not None and [p.shape for p in parts] == [(1, 4, 2), (1, 2, 2)]
    assert split_batch(np.zeros((1, 5)), [1, 1]) is None  # neither: run one at a time


def test_a_batched_session_gives_a_failure_to_every_caller_of_that_run() -> None:
    class Failing:
        def run(self, names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            raise RuntimeError("bad input")

    session = BatchedSession(Failing(), max_batch=2)
    with pytest.raises(RuntimeError, match="bad input"):
        session.run(None, {"x": np.zeros((1, 2), np.float32)})
    with pytest.raises(RuntimeError):  # still usable: the next caller is not blocked
        session.run(None, {"x": np.zeros((1, 2), np.float32)})


def test_the_real_face_model_gives_the_same_boxes_batched_or_alone() -> None:
    from engines.models import dynamic_onnx_bytes

    data = dynamic_onnx_bytes(YUNET.resolve(), {"input": ["B", 3, "H", "W"]})
    alone = load_model(data, shared=False)
    # the wait bound makes the two callers meet in one run
    batched = BatchedSession(load_model(data, shared=False), max_batch=2, max_wait_s=5.0)
    img = astronaut_bgr_image()[:256, :256]
    blobs = [np.ascontiguousarray(img.transpose(2, 0, 1)[None].astype(np.float32)),
             np.ascontiguousarray(img[:, ::-1].transpose(2, 0, 1)[None].astype(np.float32))]
    names = ["cls_8", "obj_8", "bbox_8"]
    want = [alone.run(names, {"input": b}) for b in blobs]
    got: list[Any] = [None, None]

    def run(i: int) -> None:
        got[i] = batched.run(names, {"input": blobs[i]})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert batched.runs == 1 and batched.frames == 2  # one run for both
    for w, g in zip(want, got, strict=True):
        for a, b in zip(w, g, strict=True):  # (1, N, k) each, as alone
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-4)


def test_a_wait_bound_lets_a_later_caller_join_the_batch() -> None:
    inner = _Recorder()
    session = BatchedSession(inner, max_batch=2, max_wait_s=0.5)
    out: list[Any] = []

    def call(i: int) -> None:
        out.append(session.run(["y", "s"], {"x": np.full((1, 1, 1), i, np.float32)}))

    first = threading.Thread(target=call, args=(1,))
    first.start()
    time.sleep(0.1)  # the second caller comes later, within the wait bound
    call(2)
    first.join(5)
    assert inner.batches == [2] and len(out) == 2
    t0 = time.monotonic()
    call(3)  # alone: runs once the bound has passed
    assert inner.batches == [2, 1] and 0.4 < time.monotonic() - t0 < 2


def test_two_detectors_serving_the_same_category_each_get_their_own_boxes() -> None:
    from engines.registry import CompositeDetector

    class Colour(Square):
        def __init__(self, bgr: tuple[int, int, int]) -> None:
            super().__init__()
            self.bgr = bgr

        def detect(self, image: np.ndarray) -> Detections:
            ys, xs = np.nonzero((image == self.bgr).all(-1))
            if not len(ys):
                return Detections.empty()
            return Detections.from_boxes([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]],
                                         [0.9], "faces")

    px = np.full((96, 128, 3), 90, np.uint8)
    px[10:30, 10:30] = (0, 255, 0)
    px[60:80, 90:110] = (255, 255, 0)
    both = CompositeDetector([Colour((0, 255, 0)), Colour((255, 255, 0))])  # both lanes "faces"
    stage = RedactStage(both, Style(Method.FILL, Shape.BOX, 1.0, (255, 0, 255)), period=1,
                        lookahead=0, submit=direct)
    (out,) = stage.push(Frame(0, px))
    assert (out.pixels[10:30, 10:30] == (255, 0, 255)).all()
    assert (out.pixels[60:80, 90:110] == (255, 0, 255)).all()
