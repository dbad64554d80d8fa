"""Text and licence-plate detectors on text drawn in code and on a real photo of text.

The scene: a dark red "car" gradient with a white plate (black border, "AB 123 CD" in a bold
font), a shop sign holding a lowercase sentence and a poster with four lines of text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from engines.detections import Detections
from engines.errors import ModelNotFoundError
from engines.plates import PlateDetector, text_score
from engines.redact import Method, Style, redact_boxes
from engines.text import (
    TEXT_DET_SPEC,
    TEXT_REC_SPEC,
    Reading,
    TextDetector,
    TextRecognizer,
    crop_line,
)

FILL = Style(Method.FILL, fill_bgr=(255, 0, 255))  # as the product covers boxes (x1.3, ellipse)
Rect = tuple[int, int, int, int]


@dataclass(frozen=True)
class Line:
    text: str
    org: tuple[int, int]
    scale: float
    thickness: int


@dataclass
class Scene:
    image: np.ndarray
    plate: Rect  # the plate rectangle, border included
    sign: Rect
    poster: Rect
    plate_text: Line
    sign_text: Line
    poster_text: tuple[Line, ...]


def _put(img: np.ndarray, line: Line, colour: tuple[int, int, int],
         font: int = cv2.FONT_HERSHEY_SIMPLEX) -> None:
    cv2.putText(img, line.text, line.org, font, line.scale, colour, line.thickness, cv2.LINE_AA)


def ink(shape: tuple[int, ...], line: Line, font: int = cv2.FONT_HERSHEY_SIMPLEX) -> np.ndarray:
    """Boolean mask of the pixels ``line`` paints."""
    canvas = np.zeros((*shape[:2], 3), np.uint8)
    _put(canvas, line, (255, 255, 255), font)
    return canvas[:, :, 0] > 128


PLATE_FONT = cv2.FONT_HERSHEY_DUPLEX


def make_scene() -> Scene:
    h, w = 720, 1280
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([40 + 30 * yy / h, 30 + 20 * xx / w, 120 + 60 * yy / h], -1).astype(np.uint8)
    plate: Rect = (520, 470, 820, 540)
    cv2.rectangle(img, plate[:2], plate[2:], (255, 255, 255), -1)
    cv2.rectangle(img, plate[:2], plate[2:], (0, 0, 0), 3)
    plate_text = Line("AB 123 CD", (538, 522), 1.5, 4)
    _put(img, plate_text, (0, 0, 0), PLATE_FONT)
    sign: Rect = (60, 60, 700, 150)
    cv2.rectangle(img, sign[:2], sign[2:], (60, 160, 230), -1)
    sign_text = Line("welcome to the bakery", (80, 120), 1.4, 3)
    _put(img, sign_text, (40, 20, 20))
    poster: Rect = (900, 80, 1220, 400)
    cv2.rectangle(img, poster[:2], poster[2:], (235, 235, 235), -1)
    poster_text = tuple(Line(t, (915, 140 + 60 * i), 0.9, 2) for i, t in enumerate(
        ["Summer concert", "in the park", "Saturday at eight", "free entry for all"]))
    for line in poster_text:
        _put(img, line, (30, 30, 30))
    return Scene(img, plate, sign, poster, plate_text, sign_text, poster_text)


@pytest.fixture(scope="module")
def scene() -> Scene:
    return make_scene()


@pytest.fixture(scope="module")
def text_detector() -> TextDetector:
    return TextDetector()


@pytest.fixture(scope="module")
def plate_detector() -> PlateDetector:
    return PlateDetector()


@pytest.fixture(scope="module")
def scene_text(text_detector: TextDetector, scene: Scene) -> Detections:
    return text_detector.detect(scene.image)


@pytest.fixture(scope="module")
def scene_plates(plate_detector: PlateDetector, scene: Scene) -> Detections:
    return plate_detector.detect(scene.image)


def box_mask(shape: tuple[int, ...], xyxy: np.ndarray) -> np.ndarray:
    mask = np.zeros(shape[:2], bool)
    for x1, y1, x2, y2 in np.asarray(xyxy).reshape(-1, 4):
        mask[int(np.floor(y1)):int(np.ceil(y2)), int(np.floor(x1)):int(np.ceil(x2))] = True
    return mask


def assert_typed(d: Detections) -> None:
    assert d.xyxy.dtype == np.float32 and d.xyxy.shape == (len(d), 4)
    assert d.score.dtype == np.float32 and d.score.shape == (len(d),)
    assert d.category.dtype.kind == "U" and d.category.shape == (len(d),)


def assert_inside(d: Detections, shape: tuple[int, ...]) -> None:
    h, w = shape[:2]
    assert (d.xyxy[:, :2] >= 0).all() and (d.xyxy[:, 2] <= w).all() and (d.xyxy[:, 3] <= h).all()
    assert (d.xyxy[:, 2:] > d.xyxy[:, :2]).all()


def redacted(image: np.ndarray, d: Detections) -> tuple[np.ndarray, np.ndarray]:
    """The image covered as the product covers it, and the mask of changed pixels."""
    out = image.copy()
    redact_boxes(out, d.xyxy, FILL)
    changed = np.abs(out.astype(np.int16) - image.astype(np.int16)).max(2) > 24
    return out, changed


# --------------------------------------------------------------------------------------------
# text


def test_text_boxes_cover_every_line(scene: Scene, scene_text: Detections) -> None:
    assert_typed(scene_text)
    assert set(scene_text.category.tolist()) == {"text"}
    assert ((scene_text.score >= 0.5) & (scene_text.score <= 1)).all()
    covered = box_mask(scene.image.shape, scene_text.xyxy)
    lines = [(scene.sign_text, cv2.FONT_HERSHEY_SIMPLEX), (scene.plate_text, PLATE_FONT)]
    lines += [(line, cv2.FONT_HERSHEY_SIMPLEX) for line in scene.poster_text]
    for line, font in lines:
        painted = ink(scene.image.shape, line, font)
        assert covered[painted].mean() >= 0.97, line.text
    # one box per line, and nothing where there is no text
    assert len(scene_text) == len(lines)
    assert not covered[600:, :400].any() and not covered[200:420, 100:800].any()


def test_text_lines_give_rotated_rectangles(text_detector: TextDetector, scene: Scene) -> None:
    lines = text_detector.find_lines(scene.image)
    assert lines.quads.shape == (len(lines), 4, 2) and lines.rects.shape == (len(lines), 5)
    # the lines are flat and longer than tall; quads run clockwise from the top-left corner
    assert np.abs(lines.rects[:, 4]).max() < 3
    assert (lines.rects[:, 2] > lines.rects[:, 3]).all()
    q = lines.quads
    assert (q[:, 1, 0] > q[:, 0, 0]).all() and (q[:, 3, 1] > q[:, 0, 1]).all()


def test_recogniser_reads_the_plate(text_detector: TextDetector, scene: Scene) -> None:
    lines = text_detector.find_lines(scene.image)
    x1, y1, x2, y2 = scene.plate
    centres = lines.quads.mean(1)
    on_plate = (centres[:, 0] > x1) & (centres[:, 0] < x2) & (centres[:, 1] > y1) & (
        centres[:, 1] < y2)
    assert on_plate.sum() == 1
    recogniser = TextRecognizer()
    (reading,) = recogniser.read([crop_line(scene.image, lines.quads[on_plate][0])])
    assert reading.text.replace(" ", "") == "AB123CD"
    assert reading.confidence > 0.8
    assert len(reading.digit_mass) == len(reading.text)
    assert recogniser.read([]) == []


@pytest.mark.parametrize("fill", [0, 128, 255])
@pytest.mark.parametrize("size", [(720, 1280), (241, 321), (7, 5), (1, 1)])
def test_blank_frame_gives_empty_typed_detections(text_detector: TextDetector,
                                                 plate_detector: PlateDetector, fill: int,
                                                 size: tuple[int, int]) -> None:
    frame = np.full((*size, 3), fill, np.uint8)
    for d in (text_detector.detect(frame), plate_detector.detect(frame)):
        assert len(d) == 0
        assert_typed(d)


def test_text_cut_by_the_frame_border_stays_inside(text_detector: TextDetector,
                                                   plate_detector: PlateDetector) -> None:
    img = np.full((300, 500, 3), 230, np.uint8)
    cv2.putText(img, "EDGE 42 TEXT", (-30, 40), PLATE_FONT, 1.6, (0, 0, 0), 4)
    cv2.putText(img, "XY 987 Z", (330, 296), PLATE_FONT, 1.6, (0, 0, 0), 4)
    for d in (text_detector.detect(img), plate_detector.detect(img)):
        assert len(d) >= 1
        assert_inside(d, img.shape)


def test_real_photo_of_text(text_detector: TextDetector) -> None:
    gray = np.ascontiguousarray(skimage.data.text())  # handwriting on paper, 172 x 448
    d = text_detector.detect(gray)
    assert len(d) >= 2
    assert_inside(d, gray.shape)
    written = gray < 80
    assert box_mask(gray.shape, d.xyxy)[written].mean() > 0.6


def test_text_category_and_models(text_detector: TextDetector) -> None:
    assert text_detector.categories == ("text",)
    (info,) = text_detector.models
    assert info.name == TEXT_DET_SPEC.name and info.license == "Apache-2.0"
    assert len(info.sha256) == 64 and info.path.endswith(".onnx")


def test_missing_model_file_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TEXT_DET_SPEC.env_var, "/nonexistent/det.onnx")
    with pytest.raises(ModelNotFoundError):
        TextDetector()
    monkeypatch.delenv(TEXT_DET_SPEC.env_var)
    monkeypatch.setenv(TEXT_REC_SPEC.env_var, "/nonexistent/rec.onnx")
    with pytest.raises(ModelNotFoundError):
        TextRecognizer()


# --------------------------------------------------------------------------------------------
# plates


def test_plate_is_covered_and_the_signs_are_not(scene: Scene, scene_plates: Detections) -> None:
    assert_typed(scene_plates)
    assert len(scene_plates) == 1
    assert scene_plates.category.tolist() == ["license_plates"]
    assert_inside(scene_plates, scene.image.shape)
    out, changed = redacted(scene.image, scene_plates)
    painted = ink(scene.image.shape, scene.plate_text, PLATE_FONT)
    assert changed[painted].all()
    x1, y1, x2, y2 = scene.plate
    assert changed[y1:y2, x1:x2].mean() > 0.8
    for x1, y1, x2, y2 in (scene.sign, scene.poster):
        assert np.array_equal(out[y1:y2, x1:x2], scene.image[y1:y2, x1:x2])


def test_plate_candidates_are_read_once(plate_detector: PlateDetector, scene: Scene) -> None:
    cands = plate_detector.candidates(scene.image)
    best = cands[0]
    assert best.reading.text.replace(" ", "") == "AB123CD"
    assert best.score >= plate_detector.threshold
    assert all(c.score < plate_detector.threshold for c in cands[1:])
    assert [c.score for c in cands] == sorted((c.score for c in cands), reverse=True)


def test_tilted_and_two_row_plates(plate_detector: PlateDetector) -> None:
    img = np.zeros((480, 800, 3), np.uint8)
    img[:] = (90, 60, 40)
    # a yellow two-row plate
    cv2.rectangle(img, (60, 200), (240, 330), (0, 220, 255), -1)
    cv2.rectangle(img, (60, 200), (240, 330), (0, 0, 0), 3)
    rows = [Line("AB 12", (80, 255), 1.5, 4), Line("CDE 345", (72, 315), 1.2, 4)]
    for line in rows:
        _put(img, line, (0, 0, 0), PLATE_FONT)
    # a white plate tilted by 12 degrees
    plate = np.full((70, 300, 3), 255, np.uint8)
    cv2.rectangle(plate, (0, 0), (299, 69), (0, 0, 0), 3)
    cv2.putText(plate, "XY 987 Z", (20, 52), PLATE_FONT, 1.5, (0, 0, 0), 4, cv2.LINE_AA)
    m = cv2.getRotationMatrix2D((150, 35), 12, 1.0)
    m[:, 2] += (400, 250)
    on = cv2.warpAffine(np.full((70, 300), 255, np.uint8), m, (800, 480)) > 128
    img[on] = cv2.warpAffine(plate, m, (800, 480))[on]
    d = plate_detector.detect(img)
    _, changed = redacted(img, d)
    for line in rows:
        assert changed[ink(img.shape, line, PLATE_FONT)].mean() > 0.97
    assert changed[on].mean() > 0.85


def test_plate_category_and_models(plate_detector: PlateDetector) -> None:
    assert plate_detector.categories == ("license_plates",)
    names = [m.name for m in plate_detector.models]
    assert names == [TEXT_DET_SPEC.name, TEXT_REC_SPEC.name]
    assert {m.license for m in plate_detector.models} == {"Apache-2.0"}


@pytest.mark.parametrize(("text", "plate_like"), [
    ("AB 123 CD", True), ("AB-123-CD", True), ("7ABC123", True), ("RK:906AJ", True),
    ("OLA·1208", True), ("1366026", True),
    ("welcome to the bakery", False), ("bakery", False), ("Open 24h", False),
    ("2014-05-13", False), ("07:41:21", False), ("07:41821", False),
    ("626-257-2077", False), ("HOUSTON (213I B84-Y", False), ("12", False),
    ("TOYOTA", False), ("PHARMACY", False), ("东京123", False),
])
def test_text_score(text: str, plate_like: bool) -> None:
    score = text_score(Reading(text, 1.0, (0.0,) * len(text)))
    assert (score >= 0.6) is plate_like, score


def test_letters_read_where_digits_stand_still_count() -> None:
    mass = (0.0, 0.0, 0.5, 0.0, 0.0, 0.3, 0.0)  # the I and the O kept digit probability
    assert text_score(Reading("UHI-FOF", 0.95, mass)) >= 0.6
    assert text_score(Reading("UHI-FOF", 0.95, (0.0,) * 7)) < 0.3


def test_plates_from_shared_text_lines(text_detector: TextDetector, scene: Scene,
                                       scene_plates: Detections) -> None:
    shared = PlateDetector(text_detector=text_detector)
    lines = text_detector.find_lines(scene.image)
    d = shared.detect_lines(scene.image, lines)
    np.testing.assert_allclose(d.xyxy, scene_plates.xyxy, atol=1.0)
    assert d.category.tolist() == ["license_plates"]


SHOP_SIGNS = ("BAKERY", "OPEN 24 HOURS", "CALL 555 0199", "SALE 50% OFF", "PIZZA & PASTA",
              "Main St")


def test_license_plates_alone_leave_capital_shop_signs_untouched(tmp_path: Path) -> None:
    """A street frame with a plate and shop signs in capitals, digits and prices, redacted
    through ``redact file --categories license_plates``: only the plate changes."""
    from gateway.cli import main

    img = make_scene().image
    signs: list[Rect] = []
    for i, text in enumerate(SHOP_SIGNS):
        x, y = 40 + 430 * (i % 2), 170 + 95 * (i // 2)
        rect: Rect = (x, y, x + 410, y + 80)
        cv2.rectangle(img, rect[:2], rect[2:], (40 + 30 * i, 150, 220 - 25 * i), -1)
        cv2.putText(img, text, (x + 14, y + 55), cv2.FONT_HERSHEY_DUPLEX, 1.3, (25, 25, 25), 3,
                    cv2.LINE_AA)
        signs.append(rect)
    src, dst = tmp_path / "street.png", tmp_path / "out.png"
    cv2.imwrite(str(src), img)
    assert main(["file", str(src), "-o", str(dst), "--categories", "license_plates",
                 "--method", "fill", "--fill-color", "255,0,255", "--quiet"]) == 0
    out = cv2.imread(str(dst))
    assert out is not None
    x1, y1, x2, y2 = make_scene().plate
    magenta = (out == (255, 0, 255)).all(2)
    assert magenta[y1:y2, x1:x2].mean() > 0.8
    # covered as a box: every character, the first and last included
    assert magenta[ink(img.shape, make_scene().plate_text, PLATE_FONT)].all()
    for (x1, y1, x2, y2), text in zip(signs, SHOP_SIGNS, strict=True):
        assert np.array_equal(out[y1:y2, x1:x2], img[y1:y2, x1:x2]), f"sign {text!r} changed"
