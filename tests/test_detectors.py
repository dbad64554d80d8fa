"""Face detectors on real photos, and the category registry."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from engines.detections import Detections
from engines.errors import ModelNotFoundError, RedactionError, UnknownCategoryError
from engines.faces import CenterFace, YuNet, effective_scales
from engines.models import CENTERFACE, YUNET
from engines.redact import Method, Shape, Style, redact_boxes
from engines.registry import (
    IMAGE_PROFILE,
    VIDEO_PROFILE,
    CompositeDetector,
    DetectorConfig,
    available_categories,
    build_detector,
    resolve_categories,
)
from tests.conftest import ASTRONAUT_FACE, iou, lfw_faces, lfw_non_faces


@pytest.fixture(scope="session")
def yunet() -> YuNet:
    return YuNet()


@pytest.fixture(scope="session")
def centerface() -> CenterFace:
    return CenterFace()


@pytest.fixture(scope="session", params=["yunet", "centerface"])
def face_model(request: pytest.FixtureRequest, yunet: YuNet,
               centerface: CenterFace) -> YuNet | CenterFace:
    return yunet if request.param == "yunet" else centerface


def assert_typed(d: Detections) -> None:
    assert d.xyxy.dtype == np.float32 and d.xyxy.ndim == 2 and d.xyxy.shape[1] == 4
    assert d.score.dtype == np.float32 and d.score.shape == (len(d),)
    assert d.category.dtype.kind == "U" and d.category.shape == (len(d),)


def test_finds_the_astronaut_face(face_model: YuNet | CenterFace,
                                  astronaut_bgr: np.ndarray) -> None:
    d = face_model.detect(astronaut_bgr)
    assert_typed(d)
    assert len(d) == 1
    assert d.category.tolist() == ["faces"]
    assert 0.5 < float(d.score[0]) <= 1.0
    assert iou(d.xyxy[0].tolist(), ASTRONAUT_FACE) > 0.6


@pytest.mark.parametrize("profile", [IMAGE_PROFILE, VIDEO_PROFILE], ids=["image", "video"])
def test_profiles_find_the_astronaut_face(profile: DetectorConfig,
                                          astronaut_bgr: np.ndarray) -> None:
    d = build_detector(("faces",), profile).detect(astronaut_bgr)
    assert max(iou(b, ASTRONAUT_FACE) for b in d.xyxy.tolist()) > 0.6


@pytest.mark.parametrize("fill", [0, 128, 255])
@pytest.mark.parametrize("size", [(120, 160), (241, 321), (7, 5)])
def test_blank_frame_gives_empty_typed_detections(face_model: YuNet | CenterFace, fill: int,
                                                 size: tuple[int, int]) -> None:
    d = face_model.detect(np.full((*size, 3), fill, np.uint8))
    assert len(d) == 0
    assert_typed(d)
    assert d.xyxy.shape == (0, 4)


CROPS = {
    # the face cut by the border on each side, and in a corner
    "right": (slice(None), slice(0, 230)),
    "bottom": (slice(0, 150), slice(None)),
    "left": (slice(None), slice(215, None)),
    "top": (slice(100, None), slice(None)),
    "corner": (slice(0, 140), slice(0, 230)),
}


@pytest.mark.parametrize("crop", list(CROPS))
def test_face_cut_by_the_border_gives_boxes_inside_the_frame(
        face_model: YuNet | CenterFace, image_detector: CompositeDetector,
        astronaut_bgr: np.ndarray, crop: str) -> None:
    img = np.ascontiguousarray(astronaut_bgr[CROPS[crop]])
    h, w = img.shape[:2]
    for det in (face_model, image_detector):
        d = det.detect(img)
        assert len(d) >= 1
        assert (d.xyxy >= 0).all()
        assert (d.xyxy[:, [0, 2]] <= w).all() and (d.xyxy[:, [1, 3]] <= h).all()
        assert (d.xyxy[:, 2] > d.xyxy[:, 0]).all() and (d.xyxy[:, 3] > d.xyxy[:, 1]).all()
    # and, with the default 1.3 mask scale, the face is covered up to the border it touches
    d = face_model.detect(img)
    redact_boxes(img, d.xyxy, Style(Method.FILL, Shape.BOX, 1.3, (0, 255, 0)))
    x1, y1, x2, y2 = (round(v) for v in d.xyxy[0])
    if crop in ("right", "corner"):
        assert (img[y1 + 5:y2 - 5, w - 1] == [0, 255, 0]).all()
    if crop in ("bottom", "corner"):
        assert (img[h - 1, x1 + 5:x2 - 5] == [0, 255, 0]).all()
    if crop == "left":
        assert (img[y1 + 5:y2 - 5, 0] == [0, 255, 0]).all()
    if crop == "top":
        assert (img[0, x1 + 5:x2 - 5] == [0, 255, 0]).all()


def lfw_sheet(patches: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Eight 25x25 grayscale patches on a gray 260x130 canvas, well apart."""
    canvas = np.full((130, 260, 3), 128, np.uint8)
    where = []
    for k, p in enumerate(patches[:8]):
        r, c = divmod(k, 4)
        x, y = 15 + c * 62, 20 + r * 62
        canvas[y:y + 25, x:x + 25] = p[:, :, None]
        where.append((x, y, x + 25, y + 25))
    return canvas, where


def test_multi_scale_image_profile_finds_tiny_faces(image_detector: CompositeDetector) -> None:
    sheet, where = lfw_sheet(lfw_faces()[::12])
    d = image_detector.detect(sheet)
    hits = {i for i, w in enumerate(where) for b in d.xyxy.tolist() if iou(b, w) > 0.3}
    assert len(hits) >= 6, f"found {sorted(hits)} of 8 faces of 25 px"
    # every box lies on one of the faces
    for b in d.xyxy.tolist():
        assert max(iou(b, w) for w in where) > 0.3


def test_no_faces_in_lfw_non_face_patches(image_detector: CompositeDetector) -> None:
    sheet, _ = lfw_sheet(lfw_non_faces()[::12])
    assert len(image_detector.detect(sheet)) == 0


def test_effective_scales_are_capped_and_deduplicated() -> None:
    assert effective_scales((100, 100), (1.0, 2.0, 3.0), 10**8) == [1.0, 2.0, 3.0]
    # 720p capped at 1280x720 input: only scale 1 is run, once
    assert effective_scales((720, 1280), (1.0, 2.0, 3.0), 1280 * 720) == [1.0]
    s = effective_scales((1440, 2560), (1.0,), 1280 * 720)
    assert s == [pytest.approx(0.5)]


def test_model_info_and_sha256(video_detector: CompositeDetector) -> None:
    (info,) = video_detector.models
    digest = hashlib.sha256(YUNET.resolve().read_bytes()).hexdigest()
    assert info.sha256 == digest
    assert info.name == "yunet-2023mar" and info.license == "MIT"
    assert info.path == YUNET.resolve().name


def test_centerface_through_the_registry(astronaut_bgr: np.ndarray) -> None:
    det = build_detector(("faces",), DetectorConfig(face_model="centerface"))
    assert [m.name for m in det.models] == ["centerface"]
    assert det.models[0].sha256 == hashlib.sha256(CENTERFACE.resolve().read_bytes()).hexdigest()
    assert iou(det.detect(astronaut_bgr).xyxy[0].tolist(), ASTRONAUT_FACE) > 0.6


def test_bad_detector_settings_raise() -> None:
    with pytest.raises(ValueError, match="face model"):
        build_detector(("faces",), DetectorConfig(face_model="haar"))
    with pytest.raises(ValueError, match="threshold"):
        YuNet(threshold=1.5)
    with pytest.raises(ValueError, match="scales"):
        YuNet(scales=())
    with pytest.raises(ModelNotFoundError) as err:
        YuNet(model_path="/nonexistent/yunet.onnx")
    assert isinstance(err.value, FileNotFoundError)


# --------------------------------------------------------------------------------------------
# categories


ALL = ("faces", "license_plates", "text", "qr_codes", "barcodes", "documents", "street_signs",
       "name_badges", "screens", "id_cards", "credit_cards", "passports")


@pytest.mark.parametrize(("names", "expected"), [
    (None, ALL),
    ([], ALL),
    (["faces"], ("faces",)),
    (["heads"], ("faces",)),
    (["face"], ("faces",)),
    ([" HEADS ", "faces", ""], ("faces",)),
    (["plates", "licence_plates", "QR"], ("license_plates", "qr_codes")),
    (["documents", "text"], ("documents", "text")),
])
def test_resolve_categories(names: list[str] | None, expected: tuple[str, ...]) -> None:
    assert resolve_categories(names) == expected


@pytest.mark.parametrize("names", [["tattoos"], ["faces", "licence-plates"], ["fcaes"]])
def test_unknown_or_unavailable_category_lists_the_available_ones(names: list[str]) -> None:
    with pytest.raises(UnknownCategoryError) as err:
        resolve_categories(names)
    assert err.value.available == ALL
    assert "available: faces, license_plates, text" in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, RedactionError)


def test_tattoos_are_unavailable_and_say_why() -> None:
    with pytest.raises(UnknownCategoryError, match="custom model"):
        resolve_categories(["tattoos"])


def test_a_category_a_user_model_serves_becomes_available() -> None:
    assert resolve_categories(["tattoos", "faces"], custom=["tattoos"]) == ("tattoos", "faces")
    assert resolve_categories(["logos"], custom=["logos"]) == ("logos",)
    assert available_categories(["logos"])[-1] == "logos"


def test_available_categories() -> None:
    assert available_categories() == ALL


def test_build_detector_for_no_category_finds_nothing(astronaut_bgr: np.ndarray) -> None:
    det = build_detector((), VIDEO_PROFILE)
    assert det.categories == () and det.models == []
    assert len(det.detect(astronaut_bgr)) == 0


def test_enlarged_passes_do_not_add_large_false_faces(image_detector: CompositeDetector,
                                                      astronaut_bgr: np.ndarray) -> None:
    """The astronaut photo has one face; the 2x and 3x passes (for small faces) blow the
    mission patch and the shuttle up to face size, and must not cover them."""
    found = image_detector.detect(astronaut_bgr)
    assert len(found) == 1
    x1, y1, x2, y2 = found.xyxy[0]
    assert 150 < (x1 + x2) / 2 < 300 and 60 < (y1 + y2) / 2 < 200
