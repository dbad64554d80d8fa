"""One contract for every engine in this install: whatever the category, a detector takes a BGR
uint8 frame and returns valid Detections in that frame's pixels."""

from __future__ import annotations

import numpy as np
import pytest

from engines.detections import Detections, Origin
from engines.registry import (
    IMAGE_PROFILE,
    VIDEO_PROFILE,
    CompositeDetector,
    available_categories,
    build_detector,
    category,
)
from tests.conftest import astronaut_bgr_image

ENGINES = sorted({category(c).engine or "" for c in available_categories()} - {""})


def _detector(engine: str) -> CompositeDetector:
    names = [c for c in available_categories() if category(c).engine == engine]
    return build_detector(names, VIDEO_PROFILE)


@pytest.fixture(scope="module", params=ENGINES)
def engine(request: pytest.FixtureRequest) -> tuple[str, CompositeDetector]:
    return request.param, _detector(request.param)


def _check(dets: Detections, shape: tuple[int, ...], categories: tuple[str, ...]) -> None:
    h, w = shape[:2]
    assert dets.xyxy.dtype == np.float32 and dets.xyxy.shape == (len(dets), 4)
    assert dets.score.dtype == np.float32 and dets.track_id.dtype == np.int64
    assert ((dets.score >= 0) & (dets.score <= 1)).all()
    assert (dets.origin == Origin.DETECTED).all() and (dets.track_id == -1).all()
    assert (dets.xyxy[:, 0] >= 0).all() and (dets.xyxy[:, 1] >= 0).all()
    assert (dets.xyxy[:, 2] <= w).all() and (dets.xyxy[:, 3] <= h).all()
    assert (dets.xyxy[:, 2] > dets.xyxy[:, 0]).all() and (dets.xyxy[:, 3] > dets.xyxy[:, 1]).all()
    mapped = {category(c).maps_to or c for c in categories}
    assert set(dets.category.tolist()) <= mapped


@pytest.mark.parametrize("shape", [(240, 320, 3), (97, 131, 3), (720, 1280, 3)])
def test_empty_frame_gives_empty_typed_detections(
        engine: tuple[str, CompositeDetector], shape: tuple[int, int, int]) -> None:
    _, det = engine
    for value in (0, 128, 255):
        dets = det.detect(np.full(shape, value, np.uint8))
        assert len(dets) == 0
        _check(dets, shape, det.categories)


def test_boxes_are_in_frame_pixels_at_any_size(engine: tuple[str, CompositeDetector]) -> None:
    _, det = engine
    photo = astronaut_bgr_image()
    for crop in (photo, photo[60:, 150:], np.ascontiguousarray(photo[::2, ::2])):
        _check(det.detect(np.ascontiguousarray(crop)), crop.shape, det.categories)


def test_every_engine_names_its_models(engine: tuple[str, CompositeDetector]) -> None:
    _, det = engine
    assert det.models and all(m.name and m.license for m in det.models)


def test_photo_profile_finds_the_face_the_video_profile_finds() -> None:
    photo = astronaut_bgr_image()
    video = build_detector(["faces"], VIDEO_PROFILE).detect(photo)
    image = build_detector(["faces"], IMAGE_PROFILE).detect(photo)
    assert len(video) >= 1 and len(image) >= 1
