"""QR-code and barcode detector on generated scenes.

Codes are made by zxing-cpp itself, turned with cv2.warpAffine (or seen at a slant with
cv2.warpPerspective) and pasted into real photos shipped with scikit-image (coffee, astronaut,
grass) with sensor-like noise.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import skimage.data
import zxingcpp

from engines.codes import CodeDetector
from engines.detections import Detections
from engines.faces import ModelInfo
from engines.registry import Detector

Box = tuple[int, int, int, int]

SECRET = "SECRET-TOKEN-4711"  # content of the pasted QR code
EAN = "4006381333931"  # content of the pasted EAN-13


def code_image(content: str, fmt: zxingcpp.BarcodeFormat) -> np.ndarray:
    """The symbol with its quiet zone, one pixel per module, grey uint8."""
    image = zxingcpp.write_barcode_to_image(zxingcpp.create_barcode(content, fmt), scale=1)
    return np.array(image, np.uint8)  # a writable copy


def paste(background: np.ndarray, code: np.ndarray, centre: tuple[int, int], angle: float,
          size: int) -> tuple[np.ndarray, Box]:
    """``code`` scaled so that its longer side is ``size`` px, turned by ``angle`` degrees and
    blended into a copy of ``background`` around ``centre``; returns the image and the box of
    the code's dark modules (the part that must be covered)."""
    k = int(np.ceil(size / max(code.shape)))
    big = cv2.resize(code, None, fx=k, fy=k, interpolation=cv2.INTER_NEAREST)
    f = size / max(big.shape)
    big = cv2.resize(big, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    h, w = big.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(np.ceil(h * sin + w * cos)), int(np.ceil(h * cos + w * sin))
    m[0, 2] += nw / 2 - w / 2
    m[1, 2] += nh / 2 - h / 2
    turned = cv2.warpAffine(big, m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=255)
    alpha = cv2.warpAffine(np.ones((h, w), np.float32), m, (nw, nh), flags=cv2.INTER_LINEAR)
    x0, y0 = centre[0] - nw // 2, centre[1] - nh // 2
    assert x0 >= 0 and y0 >= 0 and x0 + nw <= background.shape[1] and y0 + nh <= background.shape[0]
    out = background.copy()
    roi = out[y0:y0 + nh, x0:x0 + nw].astype(np.float32)
    a = alpha[..., None]
    out[y0:y0 + nh, x0:x0 + nw] = (roi * (1 - a) + turned[..., None] * a).astype(np.uint8)
    dark = cv2.warpAffine((big < 128).astype(np.uint8), m, (nw, nh), flags=cv2.INTER_NEAREST)
    ys, xs = np.nonzero(dark)
    return out, (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1,
                 y0 + int(ys.max()) + 1)


def photo() -> np.ndarray:
    """coffee.png (400x600) as BGR with a little Gaussian noise."""
    rgb = skimage.data.coffee()
    noise = np.random.default_rng(0).normal(0, 5, rgb.shape)
    return np.clip(rgb[:, :, ::-1].astype(np.float64) + noise, 0, 255).astype(np.uint8)


def covered(d: Detections, box: Box, category: str | None = None) -> float:
    """Share of ``box``'s pixels inside the union of the boxes (of one category)."""
    x1, y1, x2, y2 = box
    mask = np.zeros((y2 - y1, x2 - x1), bool)
    for (bx1, by1, bx2, by2), cat in zip(d.xyxy.tolist(), d.category.tolist(), strict=True):
        if category is not None and cat != category:
            continue
        cx1, cy1 = max(0, int(bx1) - x1), max(0, int(by1) - y1)
        cx2, cy2 = min(x2 - x1, int(np.ceil(bx2)) - x1), min(y2 - y1, int(np.ceil(by2)) - y1)
        if cx2 > cx1 and cy2 > cy1:
            mask[cy1:cy2, cx1:cx2] = True
    return float(mask.mean())


def assert_typed(d: Detections) -> None:
    assert d.xyxy.dtype == np.float32 and d.xyxy.ndim == 2 and d.xyxy.shape[1] == 4
    assert d.score.dtype == np.float32 and d.score.shape == (len(d),)
    assert d.category.dtype.kind == "U" and d.category.shape == (len(d),)


def assert_inside(d: Detections, shape: tuple[int, ...]) -> None:
    h, w = shape[:2]
    b = d.xyxy
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()


class Scene:
    """A 60 px QR code turned by 30 degrees 5 px from the top-right corner, and an EAN-13
    turned by 12 degrees, on a noisy photo."""

    def __init__(self) -> None:
        image, self.qr = paste(photo(), code_image(SECRET, zxingcpp.BarcodeFormat.QRCode),
                               (555, 50), 30.0, 60)
        self.image, self.ean = paste(image, code_image(EAN, zxingcpp.BarcodeFormat.EAN13),
                                     (200, 300), 12.0, 180)


@pytest.fixture(scope="module")
def scene() -> Scene:
    return Scene()


@pytest.fixture(scope="module")
def detector() -> CodeDetector:
    return CodeDetector()


@pytest.fixture(scope="module")
def found(scene: Scene, detector: CodeDetector) -> Detections:
    return detector.detect(scene.image)


def test_scene_is_as_described(scene: Scene) -> None:
    x1, y1, x2, y2 = scene.qr
    assert 50 <= max(x2 - x1, y2 - y1) <= 85  # the turned 60 px code
    assert scene.image.shape[1] - x2 <= 25 and y1 <= 25  # near the top-right corner


def test_small_turned_qr_code_near_the_edge_is_covered(found: Detections, scene: Scene) -> None:
    assert_typed(found)
    assert covered(found, scene.qr, "qr_codes") == 1.0


def test_ean13_is_covered_as_a_barcode(found: Detections, scene: Scene) -> None:
    assert covered(found, scene.ean, "barcodes") >= 0.95
    assert covered(found, scene.ean, "qr_codes") < 0.2  # not also reported as a QR code


def test_boxes_lie_inside_the_frame(found: Detections, scene: Scene) -> None:
    assert len(found) >= 2
    assert_inside(found, scene.image.shape)
    assert set(found.category.tolist()) <= {"qr_codes", "barcodes"}
    assert ((found.score > 0) & (found.score <= 1)).all()


def test_decoded_codes_score_one(found: Detections, scene: Scene) -> None:
    for box in (scene.qr, scene.ean):
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        inside = ((found.xyxy[:, 0] <= cx) & (cx <= found.xyxy[:, 2])
                  & (found.xyxy[:, 1] <= cy) & (cy <= found.xyxy[:, 3]))
        assert found.score[inside].max() == 1.0


def test_only_barcodes_gives_no_qr_box(scene: Scene) -> None:
    d = CodeDetector(categories=("barcodes",)).detect(scene.image)
    assert set(d.category.tolist()) == {"barcodes"}
    assert covered(d, scene.ean) >= 0.95
    assert covered(d, scene.qr) < 0.5


def test_only_qr_codes_gives_no_barcode_box(scene: Scene) -> None:
    det = CodeDetector(categories=("qr_codes",))
    assert det.categories == ("qr_codes",)
    d = det.detect(scene.image)
    assert set(d.category.tolist()) == {"qr_codes"}
    assert covered(d, scene.qr) == 1.0
    assert covered(d, scene.ean) < 0.2


def test_texture_locator_alone_finds_the_qr_code(scene: Scene) -> None:
    d = CodeDetector(categories=("qr_codes",), methods=("texture",)).detect(scene.image)
    assert covered(d, scene.qr) >= 0.95
    assert (d.score < 1.0).all()  # located, not read


def damaged_qr_code() -> np.ndarray:
    """A version-3 QR code with 30% of its modules flipped (outside the finder patterns): far
    beyond what its error correction can repair."""
    code = code_image("X" * 40, zxingcpp.BarcodeFormat.QRCode)
    ys, xs = np.nonzero(code < 128)
    symbol = code[ys.min():ys.max() + 1, xs.min():xs.max() + 1]  # a view: edits reach `code`
    flip = np.random.default_rng(1).random(symbol.shape) < 0.3
    flip[:9, :9] = flip[:9, -9:] = flip[-9:, :9] = False
    symbol[flip] = 255 - symbol[flip]
    return code


def test_unreadable_qr_code_is_still_located() -> None:
    image, box = paste(photo(), damaged_qr_code(), (300, 220), 8.0, 95)
    for scale in (1, 2):
        enlarged = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        assert not any(r.valid for r in zxingcpp.read_barcodes(enlarged))
    d = CodeDetector(categories=("qr_codes",)).detect(image)
    assert covered(d, box) == 1.0
    assert (d.score < 1.0).all()


def test_large_frames_are_scaled_and_boxes_mapped_back(scene: Scene) -> None:
    big = cv2.resize(scene.image, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    d = CodeDetector(max_side=600).detect(big)
    assert_inside(d, big.shape)
    qr = (2 * scene.qr[0], 2 * scene.qr[1], 2 * scene.qr[2], 2 * scene.qr[3])
    ean = (2 * scene.ean[0], 2 * scene.ean[1], 2 * scene.ean[2], 2 * scene.ean[3])
    assert covered(d, qr, "qr_codes") >= 0.95
    assert covered(d, ean, "barcodes") >= 0.95


@pytest.mark.parametrize("fill", [0, 128, 255])
@pytest.mark.parametrize("size", [(120, 160), (241, 321), (7, 5)])
def test_blank_frame_gives_empty_typed_detections(detector: CodeDetector, fill: int,
                                                 size: tuple[int, int]) -> None:
    d = detector.detect(np.full((*size, 3), fill, np.uint8))
    assert len(d) == 0
    assert_typed(d)
    assert d.xyxy.shape == (0, 4)


def test_photo_without_codes_gives_no_boxes(detector: CodeDetector) -> None:
    assert len(detector.detect(photo())) == 0


def test_decoded_contents_go_nowhere(scene: Scene, caplog: pytest.LogCaptureFixture,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    det = CodeDetector()
    with caplog.at_level(logging.DEBUG):
        d = det.detect(scene.image)
    assert len(d) >= 2
    returned = [repr(d), repr(d.to_records()), repr(det.models), repr(vars(det))]
    out = capsys.readouterr()
    for text in (SECRET, EAN):
        assert all(text not in r for r in returned)
        assert text not in caplog.text
        assert text not in out.out and text not in out.err


def test_models_names_zxing_cpp(detector: CodeDetector) -> None:
    (info,) = detector.models
    assert isinstance(info, ModelInfo)
    assert info.name.startswith("zxing-cpp 3.")
    assert (info.path, info.sha256, info.license) == ("", "", "Apache-2.0")


def test_threads_give_the_same_boxes(scene: Scene, found: Detections) -> None:
    d = CodeDetector(threads=2).detect(scene.image)
    np.testing.assert_array_equal(d.xyxy, found.xyxy)
    np.testing.assert_array_equal(d.category, found.category)


def test_is_a_registry_detector(detector: CodeDetector) -> None:
    as_detector: Detector = detector  # checked by mypy against the protocol
    assert as_detector.categories == ("qr_codes", "barcodes")


@pytest.mark.parametrize("bad", [
    np.zeros((50, 50), np.uint8),
    np.zeros((50, 50, 4), np.uint8),
    np.zeros((50, 50, 3), np.float32),
])
def test_rejects_images_that_are_not_bgr_uint8(detector: CodeDetector, bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        detector.detect(bad)


@pytest.mark.parametrize("kwargs", [
    {"categories": ("faces",)},
    {"categories": ()},
    {"max_side": 10},
    {"threads": -1},
    {"methods": ("magic",)},
])
def test_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CodeDetector(**kwargs)  # type: ignore[arg-type]


# --- codes seen at a slant, filling the frame, or a few pixels a module ----------------------


def qr_modules(content: str) -> np.ndarray:
    """The QR symbol's modules without its quiet zone, one pixel each (0 dark, 255 light)."""
    code = code_image(content, zxingcpp.BarcodeFormat.QRCode)
    ys, xs = np.nonzero(code < 128)
    return code[ys.min():ys.max() + 1, xs.min():xs.max() + 1].copy()


def tilted_quad(centre: tuple[float, float], side: float, tilt: float, turn: float,
                distance: float = 2.0) -> np.ndarray:
    """Corners (4, 2) of a square ``side`` px across, its top edge tipped away from the camera
    by ``tilt`` degrees (seen from ``distance`` sides away: the far edge is shorter), then
    turned by ``turn`` degrees in the image, centred on ``centre``."""
    t, a = np.radians(tilt), np.radians(turn)
    square = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    depth = -square[:, 1] * np.sin(t)
    shrink = distance / (distance + depth)
    pts = np.stack([square[:, 0] * shrink, square[:, 1] * np.cos(t) * shrink], 1) * side
    pts -= pts.mean(0)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return pts @ rot.T + np.asarray(centre)


def place(background: np.ndarray, modules: np.ndarray, quad: np.ndarray, quiet: int = 2,
          blur: float = 1.0, dark: int = 0, light: int = 255, seed: int = 0) -> np.ndarray:
    """``modules`` (with ``quiet`` light modules around) printed dark/light and mapped onto
    ``quad`` (the symbol's corners) in a copy of the BGR ``background``, then blurred, with
    sensor noise and stored as a JPEG of quality 80, as a phone would."""
    n, k = modules.shape[0], 8
    padded = cv2.copyMakeBorder(modules, quiet, quiet, quiet, quiet, cv2.BORDER_CONSTANT,
                                value=255)
    big = cv2.resize(np.where(padded < 128, dark, light).astype(np.uint8), None, fx=k, fy=k,
                     interpolation=cv2.INTER_NEAREST)
    src = (np.array([[0, 0], [n, 0], [n, n], [0, n]], np.float32) + quiet) * k
    m = cv2.getPerspectiveTransform(src, quad.astype(np.float32))
    h, w = background.shape[:2]
    code = cv2.warpPerspective(big, m, (w, h), flags=cv2.INTER_AREA,
                               borderValue=255).astype(np.float64)
    alpha = cv2.warpPerspective(np.ones(big.shape, np.float32), m, (w, h))[..., None]
    out = background.astype(np.float64) * (1 - alpha) + code[..., None] * alpha
    out = cv2.GaussianBlur(out, (0, 0), blur) + np.random.default_rng(seed).normal(0, 4, out.shape)
    ok, jpeg = cv2.imencode(".jpg", np.clip(out, 0, 255).astype(np.uint8),
                            [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return np.asarray(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), np.uint8)


def background(name: str, h: int, w: int) -> np.ndarray:
    """One of scikit-image's photos as BGR, resized to ``h`` x ``w``."""
    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    return cv2.resize(np.ascontiguousarray(image[:, :, 2::-1]), (w, h),
                      interpolation=cv2.INTER_AREA)


def quad_covered(d: Detections, quad: np.ndarray, shape: tuple[int, ...]) -> tuple[float, float]:
    """Share of the code's quadrilateral (as far as it lies in the frame) inside the union of
    the boxes, and the union's area outside the quadrilateral's bounding box over that box's
    area (how far past the code the redaction reaches)."""
    h, w = shape[:2]
    inside = np.zeros((h, w), np.uint8)
    cv2.fillPoly(inside, [np.round(quad).astype(np.int32)], 1)
    boxes = np.zeros((h, w), bool)
    for x1, y1, x2, y2 in d.xyxy.tolist():
        boxes[max(0, int(y1)):int(np.ceil(y2)), max(0, int(x1)):int(np.ceil(x2))] = True
    x1, y1 = np.clip(np.floor(quad.min(0)).astype(int), 0, None)
    x2, y2 = np.ceil(quad.max(0)).astype(int)
    around = boxes.copy()
    around[y1:y2, x1:x2] = False
    bbox_area = max(1, (min(x2, w) - x1) * (min(y2, h) - y1))
    return float(boxes[inside > 0].mean()), float(around.sum()) / bbox_area


def unreadable(image: np.ndarray) -> bool:
    """zxing-cpp reads no code in the image, at its size or enlarged twice."""
    big = cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    return not any(r.valid for img in (image, big) for r in zxingcpp.read_barcodes(img))


TICKET = "https://example.com/ticket/4711-SECRET"  # a version-3 code, 29 modules


@pytest.mark.parametrize("side", [180, 220])
def test_qr_code_seen_at_a_steep_slant_is_covered(side: int) -> None:
    # tipped back 75 degrees and turned 25: its height shrinks to about a quarter, the far edge
    # is shorter than the near one, and its finder patterns are thin slanted rhombi
    quad = tilted_quad((320, 240), side, tilt=75, turn=25)
    image = place(background("coffee", 480, 640), qr_modules(TICKET), quad)
    assert unreadable(image)
    covered, past = quad_covered(CodeDetector(categories=("qr_codes",)).detect(image), quad,
                                 image.shape)
    assert covered >= 0.95
    assert past < 0.5  # an upright box around a slanted code reaches a little past it


@pytest.mark.parametrize(("fill", "tilt", "turn"), [(0.85, 25, -30), (0.95, 35, 30)])
def test_qr_code_filling_the_photo_is_covered_whole(fill: float, tilt: float,
                                                     turn: float) -> None:
    # a close-up: the code, seen a little from below and turned, reaches past the frame on
    # two sides (finder patterns cut), grey on a pale label with a thin margin, on grass;
    # zxing locates part of it without reading it
    h, w = 640, 480
    quad = tilted_quad((w / 2, h / 2), fill * w, tilt=tilt, turn=turn)
    image = place(background("grass", h, w), qr_modules(TICKET), quad, quiet=1, dark=40,
                  light=200)
    assert unreadable(image)
    covered, past = quad_covered(CodeDetector(categories=("qr_codes",)).detect(image), quad,
                                 image.shape)
    assert covered >= 0.95
    assert past < 0.25


def test_tiny_qr_codes_on_a_busy_photo_are_covered() -> None:
    # 18 codes of 29 modules in 36 px (about 1.2 px a module), turned 53 degrees, each on its
    # own copy of the astronaut photo around the patterned suit; none can be read
    photo_bgr = background("astronaut", 480, 640)
    hits = 0
    for dx in (-6, 0, 6):
        for dy in (-6, 0, 6):
            for seed in (0, 1):
                quad = tilted_quad((185 + dx, 204 + dy), 36, tilt=0, turn=53)
                image = place(photo_bgr, qr_modules(TICKET), quad, quiet=3, blur=0.5, dark=70,
                              light=221, seed=seed)
                assert unreadable(image)
                covered, past = quad_covered(
                    CodeDetector(categories=("qr_codes",)).detect(image), quad, image.shape)
                hits += covered >= 0.95
                assert past < 4  # a box at most about twice the code's size across
    assert hits >= 15
