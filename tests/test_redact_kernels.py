"""Redaction kernels: what is inside the (grown) box is destroyed, nothing outside is touched."""

from __future__ import annotations

import numpy as np
import pytest

from engines.redact import Method, Shape, Style, cover_all, redact_boxes
from tests.conftest import ASTRONAUT_FACE, ASTRONAUT_FACE_CORE, detail, region


def checkerboard(h: int, w: int, cell: int = 1) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    board = (((yy // cell) + (xx // cell)) % 2 * 255).astype(np.uint8)
    return np.repeat(board[:, :, None], 3, axis=2)


def outside(img: np.ndarray, rects: np.ndarray) -> np.ndarray:
    """Boolean mask of the pixels outside every rectangle."""
    mask = np.ones(img.shape[:2], bool)
    for x1, y1, x2, y2 in rects:
        mask[y1:y2, x1:x2] = False
    return mask


SMOOTHING = [Method.BLUR, Method.PIXELATE]
BOX = np.array([[60.0, 50.0, 140.0, 130.0]])  # 80x80; grown 1.3x -> [48, 38, 152, 142]


@pytest.mark.parametrize("shape", list(Shape))
@pytest.mark.parametrize("method", SMOOTHING)
@pytest.mark.parametrize("cell", [1, 2, 3])
def test_fine_pattern_inside_the_box_is_destroyed(method: Method, shape: Shape,
                                                  cell: int) -> None:
    img = checkerboard(180, 200, cell)
    before = img.copy()
    rects = redact_boxes(img, BOX, Style(method, shape))
    assert rects.tolist() == [[48, 38, 152, 142]]
    inner = (slice(60, 120), slice(70, 130))  # well inside the ellipse too
    assert before[inner].astype(float).var() > 10_000
    assert img[inner].astype(float).var() < 0.05 * before[inner].astype(float).var()
    # almost every inner pixel moved far from its black or white original
    moved = np.abs(img[inner].astype(int) - before[inner]).max(-1)
    assert (moved > 60).mean() > 0.95
    # the pixels outside the grown box are untouched, to the bit
    out = outside(img, rects)
    assert out.sum() == 180 * 200 - 104 * 104
    assert np.array_equal(img[out], before[out])


@pytest.mark.parametrize("shape", list(Shape))
def test_fill_paints_the_colour_and_nothing_else(shape: Shape) -> None:
    img = checkerboard(180, 200, 2)
    before = img.copy()
    rects = redact_boxes(img, BOX, Style(Method.FILL, shape, 1.3, (10, 200, 30)))
    inner = img[60:120, 70:130]
    assert (inner == [10, 200, 30]).all()
    out = outside(img, rects)
    assert np.array_equal(img[out], before[out])
    if shape is Shape.BOX:
        assert (img[38:142, 48:152] == [10, 200, 30]).all()
    else:  # the rectangle's corners keep the picture
        assert np.array_equal(img[38, 48], before[38, 48])


@pytest.mark.parametrize("method", SMOOTHING)
def test_real_face_loses_its_detail(astronaut_bgr: np.ndarray, method: Method) -> None:
    before = astronaut_bgr.copy()
    rects = redact_boxes(astronaut_bgr, np.array([ASTRONAUT_FACE]), Style(method))
    core_before = region(before, ASTRONAUT_FACE_CORE)
    core_after = region(astronaut_bgr, ASTRONAUT_FACE_CORE)
    if method is Method.BLUR:
        assert detail(core_after) < 0.25 * detail(core_before)
    else:  # a few flat cells: a handful of colours where there were thousands
        colours = len(np.unique(core_after.reshape(-1, 3), axis=0))
        assert len(np.unique(core_before.reshape(-1, 3), axis=0)) > 1000
        assert colours <= 64
    assert np.abs(core_after.astype(int) - core_before).mean() > 8
    out = outside(astronaut_bgr, rects)
    assert np.array_equal(astronaut_bgr[out], before[out])


@pytest.mark.parametrize("size", [(40, 40), (400, 30), (30, 400), (600, 600)])
def test_blur_strength_grows_with_the_box(size: tuple[int, int]) -> None:
    """Whatever the box size, a fine pattern does not survive the blur."""
    h, w = size
    img = checkerboard(h + 20, w + 20, 4)
    before = img.copy()
    redact_boxes(img, np.array([[10.0, 10.0, 10.0 + w, 10.0 + h]]),
                 Style(Method.BLUR, Shape.BOX, 1.0))
    inner = (slice(10 + h // 4, 10 + 3 * h // 4), slice(10 + w // 4, 10 + 3 * w // 4))
    assert img[inner].astype(float).std() < 0.25 * before[inner].astype(float).std()


def test_several_boxes_and_none() -> None:
    img = checkerboard(100, 100)
    before = img.copy()
    assert redact_boxes(img, np.zeros((0, 4), np.float32), Style()).shape == (0, 4)
    assert np.array_equal(img, before)
    rects = redact_boxes(img, np.array([[5.0, 5.0, 25.0, 25.0], [60.0, 60.0, 90.0, 90.0]]),
                         Style(Method.FILL, Shape.BOX, 1.0, (7, 7, 7)))
    assert len(rects) == 2
    assert (img[5:25, 5:25] == 7).all() and (img[60:90, 60:90] == 7).all()
    assert np.array_equal(img[30:55, :], before[30:55, :])


@pytest.mark.parametrize("method", list(Method))
def test_cover_all_covers_every_pixel(method: Method) -> None:
    img = checkerboard(90, 160, 1)
    before = img.copy()
    cover_all(img, Style(method, Shape.ELLIPSE, 1.3, (0, 0, 255)))
    if method is Method.FILL:
        assert (img == [0, 0, 255]).all()
    else:
        moved = np.abs(img.astype(int) - before).max(-1)
        assert (moved > 60).mean() > 0.95  # corners too: cover_all ignores the ellipse
        assert (moved[[0, 0, -1, -1], [0, -1, 0, -1]] > 60).all()


@pytest.mark.parametrize("scale", [0.49, 4.01, -1.0])
def test_style_rejects_silly_mask_scale(scale: float) -> None:
    with pytest.raises(ValueError, match="mask scale"):
        Style(mask_scale=scale)


@pytest.mark.parametrize(("text", "method"), [
    ("blur", Method.BLUR), (" Blur ", Method.BLUR), ("pixelate", Method.PIXELATE),
    ("pixelation", Method.PIXELATE), ("FILL", Method.FILL),
])
def test_method_parse(text: str, method: Method) -> None:
    assert Method.parse(text) is method


def test_method_parse_unknown_lists_the_methods() -> None:
    with pytest.raises(ValueError, match="blur, pixelate, fill"):
        Method.parse("smudge")


def test_box_reaching_the_border_is_covered_as_a_rectangle() -> None:
    """An object cut by the frame border fills the corners of its visible part: those corners
    are covered too, though the shape is an ellipse."""
    fill = Style(Method.FILL, Shape.ELLIPSE, fill_bgr=(0, 0, 255))
    at_border = np.zeros((100, 100, 3), np.uint8)
    redact_boxes(at_border, np.array([[60.0, 30.0, 100.0, 70.0]]), fill)
    assert (at_border[26, 99] == (0, 0, 255)).all()  # corner of the grown rectangle
    inside = np.zeros((100, 100, 3), np.uint8)
    redact_boxes(inside, np.array([[40.0, 30.0, 80.0, 70.0]]), fill)
    assert (inside[26, 84] == 0).all()  # the same corner of an ellipse away from the border


def test_uncertain_box_whose_grown_region_reaches_the_border_is_a_rectangle() -> None:
    fill = Style(Method.FILL, Shape.ELLIPSE, fill_bgr=(0, 0, 255))
    box = np.array([[62.0, 30.0, 98.0, 70.0]])  # grown 1.3x it passes the right border
    certain = np.zeros((100, 100, 3), np.uint8)
    redact_boxes(certain, box, fill)
    tracked = np.zeros((100, 100, 3), np.uint8)
    redact_boxes(tracked, box, fill, uncertain=np.array([True]))
    assert (certain[25, 99] == 0).all()
    assert (tracked[25, 99] == (0, 0, 255)).all()
