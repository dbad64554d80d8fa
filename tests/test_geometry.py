"""Box geometry: mask rectangles, the Detections type, IoU and non-maximum suppression."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from engines.detections import Detections, Origin, iou_matrix, nms
from engines.redact import Method, Shape, Style, mask_rects, redact_boxes

# --------------------------------------------------------------------------------------------
# mask_rects: grow about the centre, round outward, clip to the frame

MASK_CASES = [
    # box, width, height, scale, expected rectangles
    pytest.param([10, 10, 20, 20], 100, 100, 1.0, [[10, 10, 20, 20]], id="integer box unchanged"),
    pytest.param([10.2, 10.7, 19.1, 19.9], 100, 100, 1.0, [[10, 10, 20, 20]],
                 id="fractions round outward"),
    pytest.param([40, 40, 60, 60], 100, 100, 2.0, [[30, 30, 70, 70]], id="grown about centre"),
    pytest.param([40, 40, 60, 80], 100, 100, 0.5, [[45, 50, 55, 70]], id="shrunk about centre"),
    pytest.param([90, 90, 100, 100], 100, 100, 1.3, [[88, 88, 100, 100]],
                 id="touching last row and column: clipped to the frame edge"),
    pytest.param([95.5, 70.5, 99.5, 79.5], 100, 80, 1.0, [[95, 70, 100, 80]],
                 id="ends inside the last pixel: that pixel is covered"),
    pytest.param([-10, -5, 10, 5], 100, 100, 1.0, [[0, 0, 10, 5]], id="negative start clipped"),
    pytest.param([0, 0, 100, 100], 100, 100, 3.0, [[0, 0, 100, 100]], id="larger than frame"),
    pytest.param([120, 10, 140, 20], 100, 100, 1.0, [], id="right of the frame: dropped"),
    pytest.param([10, -40, 20, -20], 100, 100, 1.3, [], id="above the frame: dropped"),
    pytest.param([5, 5, 5, 5], 100, 100, 1.0, [], id="empty box dropped"),
]


@pytest.mark.parametrize(("box", "width", "height", "scale", "expected"), MASK_CASES)
def test_mask_rects(box: list[float], width: int, height: int, scale: float,
                    expected: list[list[int]]) -> None:
    rects = mask_rects(np.array([box], np.float32), width, height, scale)
    assert rects.dtype == np.int32
    assert rects.shape == (len(expected), 4)
    assert rects.tolist() == expected


def test_mask_rects_empty_and_many() -> None:
    empty = mask_rects(np.zeros((0, 4), np.float32), 64, 48, 1.3)
    assert empty.shape == (0, 4) and empty.dtype == np.int32
    boxes = np.array([[0, 0, 8, 8], [200, 200, 210, 210], [56, 40, 64, 48]], np.float32)
    assert mask_rects(boxes, 64, 48, 1.0).tolist() == [[0, 0, 8, 8], [56, 40, 64, 48]]


@pytest.mark.parametrize("shape", list(Shape))
def test_box_touching_the_corner_covers_the_last_row_and_column(shape: Shape) -> None:
    img = np.full((60, 80, 3), 200, np.uint8)
    style = Style(Method.FILL, shape, 1.0, (0, 0, 255))
    rects = redact_boxes(img, np.array([[70.0, 50.0, 80.0, 60.0]]), style)
    assert rects.tolist() == [[70, 50, 80, 60]]
    # the last row and the last column, at the middle of the box, are covered
    assert img[59, 75].tolist() == [0, 0, 255]
    assert img[55, 79].tolist() == [0, 0, 255]
    # nothing left of or above the box changed
    assert (img[:50] == 200).all() and (img[:, :70] == 200).all()


def test_half_open_box_covers_columns_x1_to_x2_minus_1() -> None:
    img = np.zeros((20, 20, 3), np.uint8)
    redact_boxes(img, np.array([[5.0, 5.0, 10.0, 10.0]]),
                 Style(Method.FILL, Shape.BOX, 1.0, (255, 255, 255)))
    covered = img[:, :, 0] == 255
    assert covered[5:10, 5:10].all()
    assert covered.sum() == 25  # column 10 and row 10 are not covered


def test_ellipse_leaves_corners_box_covers_them() -> None:
    box = np.array([[20.0, 20.0, 60.0, 50.0]])
    ell = np.zeros((80, 80, 3), np.uint8)
    rect = np.zeros((80, 80, 3), np.uint8)
    redact_boxes(ell, box, Style(Method.FILL, Shape.ELLIPSE, 1.0, (255, 255, 255)))
    redact_boxes(rect, box, Style(Method.FILL, Shape.BOX, 1.0, (255, 255, 255)))
    e, r = ell[:, :, 0] == 255, rect[:, :, 0] == 255
    assert r[20:50, 20:60].all() and r.sum() == 40 * 30
    # the ellipse stays inside the rectangle, covers its middle row and column end to end ...
    assert not (e & ~r).any()
    assert e[35, 20:60].all() and e[20:50, 40].all()
    # ... and leaves the four corners
    for y, x in ((20, 20), (20, 59), (49, 20), (49, 59)):
        assert not e[y, x]
    assert 0.7 < e.sum() / r.sum() < 0.9  # about pi/4 of the rectangle


def test_tiny_box_is_covered_whole_even_as_ellipse() -> None:
    img = np.zeros((20, 20, 3), np.uint8)
    redact_boxes(img, np.array([[5.0, 5.0, 9.0, 9.0]]),
                 Style(Method.FILL, Shape.ELLIPSE, 1.0, (255, 255, 255)))
    assert (img[5:9, 5:9] == 255).all()


# --------------------------------------------------------------------------------------------
# Detections

GOOD: dict[str, Any] = {
    "xyxy": [[0, 0, 10, 10], [5, 5, 20, 30]],
    "score": [0.9, 0.5],
    "category": ["faces", "faces"],
}


@pytest.mark.parametrize(("field", "value"), [
    ("score", [0.9]),
    ("score", [0.9, 0.5, 0.1]),
    ("category", ["faces"]),
    ("track_id", [1, 2, 3]),
    ("origin", [0]),
])
def test_detections_mismatched_lengths_raise(field: str, value: list[Any]) -> None:
    with pytest.raises(ValueError, match=field):
        Detections(**{**GOOD, field: value})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_detections_non_finite_coordinates_raise(bad: float) -> None:
    with pytest.raises(ValueError, match="NaN or infinite"):
        Detections(**{**GOOD, "xyxy": [[0, 0, 10, 10], [5, bad, 20, 30]]})


def test_detections_defaults_and_dtypes() -> None:
    d = Detections(**GOOD)
    assert len(d) == 2
    assert d.xyxy.dtype == np.float32 and d.xyxy.shape == (2, 4)
    assert d.score.dtype == np.float32
    assert d.category.dtype.kind == "U"
    assert d.track_id.tolist() == [-1, -1]
    assert d.origin.tolist() == [Origin.DETECTED] * 2


@pytest.mark.parametrize("empty", [
    Detections.empty(),
    Detections.from_boxes(np.zeros((0, 4)), [], "faces"),
    Detections.concat([]),
    Detections.concat([Detections.empty(), Detections.empty()]),
    Detections(**GOOD).with_category(["plates"]),
], ids=["empty", "from_boxes", "concat-none", "concat-empties", "filtered"])
def test_empty_detections_are_typed(empty: Detections) -> None:
    assert len(empty) == 0
    assert empty.xyxy.shape == (0, 4) and empty.xyxy.dtype == np.float32
    assert empty.score.shape == (0,) and empty.score.dtype == np.float32
    assert empty.category.shape == (0,) and empty.category.dtype.kind == "U"
    assert empty.track_id.dtype == np.int64 and empty.origin.dtype == np.uint8
    assert empty.counts() == {} and empty.to_records() == []


def test_concat_counts_and_records() -> None:
    a = Detections.from_boxes([[0, 0, 10, 10]], [0.91234], "faces")
    b = Detections(np.array([[1.26, 2.34, 3.45, 4.56]]), np.array([0.5]), np.array(["plates"]),
                   np.array([7]), np.array([Origin.TRACKED]))
    both = Detections.concat([a, Detections.empty(), b])
    assert len(both) == 2
    assert both.counts() == {"faces": 1, "plates": 1}
    assert both.to_records() == [
        {"category": "faces", "xyxy": [0.0, 0.0, 10.0, 10.0], "score": 0.912, "track_id": -1,
         "origin": "detected"},
        {"category": "plates", "xyxy": [1.3, 2.3, 3.5, 4.6], "score": 0.5, "track_id": 7,
         "origin": "tracked"},
    ]
    assert both.with_category(["plates"]).track_id.tolist() == [7]
    assert both.scaled(2, 0.5).xyxy[0].tolist() == [0.0, 0.0, 20.0, 5.0]


# --------------------------------------------------------------------------------------------
# IoU and NMS

IOU_CASES = [
    pytest.param([0, 0, 10, 10], [0, 0, 10, 10], 1.0, id="identical"),
    pytest.param([0, 0, 10, 10], [20, 20, 30, 30], 0.0, id="disjoint"),
    pytest.param([0, 0, 10, 10], [10, 0, 20, 10], 0.0, id="touching"),
    pytest.param([0, 0, 10, 10], [5, 0, 15, 10], 1 / 3, id="half overlap"),
    pytest.param([0, 0, 10, 10], [2, 2, 7, 7], 0.25, id="contained"),
]


@pytest.mark.parametrize(("a", "b", "expected"), IOU_CASES)
def test_iou(a: list[float], b: list[float], expected: float) -> None:
    m = iou_matrix(np.array([a], np.float32), np.array([b], np.float32))
    assert m.shape == (1, 1)
    assert m[0, 0] == pytest.approx(expected, abs=1e-6)
    assert iou_matrix(np.array([b], np.float32), np.array([a], np.float32))[0, 0] == \
        pytest.approx(expected, abs=1e-6)


def test_iou_matrix_shapes() -> None:
    a = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], np.float32)
    b = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [5, 0, 15, 10]], np.float32)
    m = iou_matrix(a, b)
    assert m.shape == (2, 3)
    np.testing.assert_allclose(m, [[1, 0, 1 / 3], [1 / 3, 0, 1]], atol=1e-6)
    assert iou_matrix(a, np.zeros((0, 4), np.float32)).shape == (2, 0)
    assert iou_matrix(np.zeros((0, 4), np.float32), b).shape == (0, 3)


NMS_CASES = [
    pytest.param([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], [0.8, 0.9, 0.7], 0.3,
                 [1, 2], id="overlapping pair keeps the best, disjoint kept"),
    pytest.param([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], [0.2, 0.9, 0.5], 0.3,
                 [1, 2, 0], id="all disjoint: all kept, best first"),
    pytest.param([[0, 0, 10, 10], [5, 0, 15, 10]], [0.9, 0.8], 1 / 3 + 1e-6, [0, 1],
                 id="IoU at the threshold: kept"),
    pytest.param([[0, 0, 10, 10], [5, 0, 15, 10]], [0.9, 0.8], 0.3, [0],
                 id="IoU above the threshold: suppressed"),
    pytest.param([[0, 0, 10, 10]], [0.1], 0.3, [0], id="one box"),
]


@pytest.mark.parametrize(("boxes", "scores", "thr", "expected"), NMS_CASES)
def test_nms(boxes: list[list[float]], scores: list[float], thr: float,
             expected: list[int]) -> None:
    keep = nms(np.array(boxes, np.float32), np.array(scores, np.float32), thr)
    assert keep.dtype == np.int64
    assert keep.tolist() == expected


def test_nms_empty() -> None:
    keep = nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.3)
    assert keep.tolist() == []
