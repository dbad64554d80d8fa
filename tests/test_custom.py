"""User-supplied ONNX detectors (engines/custom.py), on tiny ONNX graphs built here.

Each graph takes ``images`` (1, 3, H, W) and returns constants (plus 0 * the mean of the input,
so the input is used), so the detections are known in advance. One set of ground-truth boxes in
model-input pixels is encoded in every supported output layout; the frame is 640x320 and the
model input 320x320, so the letterbox scales by 0.5 and pads 80 rows above and below.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.custom import (
    CustomConfigError,
    CustomDetector,
    CustomModelConfig,
    CustomModelError,
    Layout,
    letterbox,
)
from engines.detections import Detections, Origin
from engines.errors import ModelNotFoundError
from engines.redact import Method, Style, redact_boxes

INPUT = 320  # model input side
FRAME_H, FRAME_W = 320, 640  # letterbox: scale 0.5, top/bottom padding 80
CLASSES = {"0": "tattoos", "2": "id_cards"}  # model class 1 is not mapped
N_CLASSES = 3

# (x1, y1, x2, y2) in model-input pixels, class, score
TRUTH: list[tuple[tuple[float, float, float, float], int, float]] = [
    ((110, 130, 210, 190), 0, 0.9),  # A: kept
    ((112, 132, 212, 192), 0, 0.6),  # B: overlaps A, same class -> suppressed
    ((112, 132, 212, 192), 2, 0.7),  # C: same place as B, other class -> kept
    ((20, 90, 60, 120), 1, 0.95),  # D: unmapped class -> gone
    ((250, 200, 300, 230), 0, 0.1),  # E: below the threshold -> gone
    ((290, 220, 340, 260), 2, 0.5),  # F: runs past the frame -> clipped
    ((100, 10, 150, 60), 2, 0.8),  # G: inside the top padding -> no area -> gone
]
# (category, frame xyxy, score), best score first
EXPECTED = [
    ("tattoos", (220, 100, 420, 220), 0.9),
    ("id_cards", (224, 104, 424, 224), 0.7),
    ("id_cards", (580, 280, 640, 320), 0.5),
]

Output = tuple[str, np.ndarray, int]  # name, value, ONNX element type


# --------------------------------------------------------------------------------------------
# graph building
def _save_model(path: Path, outputs: Sequence[Output],
                input_shape: Sequence[int | str] = (1, 3, INPUT, INPUT),
                input_type: int = TensorProto.FLOAT) -> Path:
    """A graph ``images -> outputs``: each output is its constant + 0 * mean(images)."""
    nodes = [
        helper.make_node("Cast", ["images"], ["images_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["images_f"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero_c"], ["zero"]),
    ]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero_c")]
    infos = []
    for name, value, elem in outputs:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), f"{name}_c"))
        nodes.append(helper.make_node("Add", [f"{name}_c", "zero"], [f"{name}_f"]))
        nodes.append(helper.make_node("Cast", [f"{name}_f"], [name], to=elem))
        infos.append(helper.make_tensor_value_info(name, elem, list(np.shape(value))))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("images", input_type, list(input_shape))],
        infos, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _cxcywh(xyxy: tuple[float, float, float, float]) -> list[float]:
    x1, y1, x2, y2 = xyxy
    return [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]


def _dense(objectness: bool, rows: int = 40) -> np.ndarray:
    """(rows, 4 [+1] + C) YOLO head rows holding TRUTH; unused rows score 0."""
    first = 5 if objectness else 4
    out = np.zeros((rows, first + N_CLASSES), np.float32)
    for r, (xyxy, cls, score) in enumerate(TRUTH):
        out[r, :4] = _cxcywh(xyxy)
        if objectness:  # score = objectness * class score
            out[r, 4] = out[r, first + cls] = np.sqrt(score)
        else:
            out[r, first + cls] = score
    return out


def _post_processed() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = np.array([t[0] for t in TRUTH], np.float32)[None]
    scores = np.array([t[2] for t in TRUTH], np.float32)[None]
    classes = np.array([t[1] for t in TRUTH], np.float32)[None]
    return boxes, scores, classes


def _layout_outputs(layout: str) -> list[Output]:
    f = TensorProto.FLOAT
    boxes, scores, classes = _post_processed()
    if layout == "yolov5":
        return [("output0", _dense(True)[None], f)]
    if layout == "yolov8":
        return [("output0", _dense(False).T[None], f)]
    if layout == "yolov8_rows":
        return [("output0", _dense(False)[None], f)]
    if layout == "yolov5_extra_outputs":  # old YOLOv5 exports also return their raw maps
        return [("output", _dense(True)[None], f),
                ("p3", np.zeros((1, 3, 2, 2, 8), np.float32), f)]
    if layout == "end2end":
        rows = np.concatenate([boxes[0], scores[0][:, None], classes[0][:, None]], 1)
        return [("output0", rows[None], f)]
    if layout == "bsc_named":  # shuffled, found by name
        return [("labels", classes, TensorProto.INT64), ("det_boxes", boxes, f),
                ("scores", scores, f)]
    if layout == "bsc_by_dtype":  # unnamed: the integer output holds the classes
        return [("out0", classes, TensorProto.INT32), ("out1", scores, f), ("out2", boxes, f)]
    if layout == "bsc_by_order":  # unnamed, all float: scores come first
        return [("out0", boxes, f), ("out1", scores, f), ("out2", classes, f)]
    raise AssertionError(layout)


EXPECTED_LAYOUT = {
    "yolov5": Layout.YOLOV5,
    "yolov8": Layout.YOLOV8,
    "yolov8_rows": Layout.YOLOV8,
    "yolov5_extra_outputs": Layout.YOLOV5,
    "end2end": Layout.END2END,
    "bsc_named": Layout.BOXES_SCORES_CLASSES,
    "bsc_by_dtype": Layout.BOXES_SCORES_CLASSES,
    "bsc_by_order": Layout.BOXES_SCORES_CLASSES,
}


def _config(path: Path, **kw: Any) -> CustomModelConfig:
    d: dict[str, Any] = {"path": path.name, "classes": CLASSES, **kw}
    return CustomModelConfig.from_dict(d, base_dir=path.parent)


def _frame(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (FRAME_H, FRAME_W, 3), np.uint8)


def _check_contract(dets: Detections, shape: tuple[int, ...]) -> None:
    h, w = shape[:2]
    assert dets.xyxy.dtype == np.float32 and dets.xyxy.shape == (len(dets), 4)
    assert dets.score.dtype == np.float32 and dets.track_id.dtype == np.int64
    assert ((dets.score >= 0) & (dets.score <= 1)).all()
    assert (dets.origin == Origin.DETECTED).all() and (dets.track_id == -1).all()
    assert (dets.xyxy[:, :2] >= 0).all()
    assert (dets.xyxy[:, 2] <= w).all() and (dets.xyxy[:, 3] <= h).all()
    assert (dets.xyxy[:, 2:] > dets.xyxy[:, :2]).all()


# --------------------------------------------------------------------------------------------
# layouts, geometry, mapping, threshold, NMS, clipping
@pytest.mark.parametrize("layout", list(EXPECTED_LAYOUT))
def test_every_layout_gives_the_expected_boxes_in_frame_pixels(tmp_path: Path,
                                                               layout: str) -> None:
    path = _save_model(tmp_path / f"{layout}.onnx", _layout_outputs(layout))
    det = CustomDetector(_config(path))
    assert det.layout is EXPECTED_LAYOUT[layout]
    assert det.categories == ("tattoos", "id_cards")
    assert det.input_size == (INPUT, INPUT)
    dets = det.detect(_frame())
    _check_contract(dets, (FRAME_H, FRAME_W))
    assert dets.category.tolist() == [e[0] for e in EXPECTED]
    np.testing.assert_allclose(dets.xyxy, [e[1] for e in EXPECTED], atol=1.0)
    np.testing.assert_allclose(dets.score, [e[2] for e in EXPECTED], atol=1e-4)


def test_letterbox_pads_centred_with_114_and_reports_the_mapping() -> None:
    canvas, sx, sy, left, top = letterbox(np.zeros((FRAME_H, FRAME_W, 3), np.uint8),
                                          (INPUT, INPUT))
    assert canvas.shape == (INPUT, INPUT, 3) and (sx, sy, left, top) == (0.5, 0.5, 0, 80)
    assert (canvas[:80] == 114).all() and (canvas[240:] == 114).all()
    assert (canvas[80:240] == 0).all()
    tall, sx, sy, left, top = letterbox(np.zeros((100, 50, 3), np.uint8), (INPUT, 256))
    assert (sx, sy, left, top) == (2.56, 2.56, 96, 0) and (tall[:, :96] == 114).all()


def test_threshold_keeps_only_higher_scores(tmp_path: Path) -> None:
    path = _save_model(tmp_path / "m.onnx", _layout_outputs("yolov8"))
    dets = CustomDetector(_config(path, threshold=0.75)).detect(_frame())
    assert dets.category.tolist() == ["tattoos"] and dets.score[0] == pytest.approx(0.9)
    low = CustomDetector(_config(path, threshold=0.05)).detect(_frame())
    assert "tattoos" in low.category.tolist() and len(low) == len(EXPECTED) + 1  # E is back


def test_nms_merges_same_category_only(tmp_path: Path) -> None:
    path = _save_model(tmp_path / "m.onnx", _layout_outputs("yolov8"))
    strict = CustomDetector(_config(path)).detect(_frame())
    assert strict.counts() == {"tattoos": 1, "id_cards": 2}  # B merged into A, C stays
    loose = CustomDetector(_config(path, nms_iou=0.99)).detect(_frame())
    assert loose.counts() == {"tattoos": 2, "id_cards": 2}
    # two model classes mapped to one category are merged with each other
    merged = CustomDetector(_config(path, classes={"0": "marks", "2": "marks"})).detect(_frame())
    assert merged.counts() == {"marks": 2} and merged.score.tolist()[0] == pytest.approx(0.9)


def test_unmapped_classes_vanish(tmp_path: Path) -> None:
    path = _save_model(tmp_path / "m.onnx", _layout_outputs("bsc_named"))
    det = CustomDetector(_config(path, classes={"1": "logos"}))
    dets = det.detect(_frame())
    assert det.categories == ("logos",) and dets.category.tolist() == ["logos"]
    np.testing.assert_allclose(dets.xyxy, [(40, 20, 120, 80)], atol=1.0)  # D


def test_empty_result_is_typed(tmp_path: Path) -> None:
    path = _save_model(tmp_path / "m.onnx", _layout_outputs("yolov5"))
    det = CustomDetector(_config(path, classes={"1": "logos"}, threshold=0.99))
    empty = Detections.empty()
    for frame in (_frame(), np.zeros((0, 10, 3), np.uint8)):
        dets = det.detect(frame)
        assert len(dets) == 0
        for name in ("xyxy", "score", "category", "track_id", "origin"):
            got, want = getattr(dets, name), getattr(empty, name)
            assert got.dtype.kind == want.dtype.kind and got.shape == want.shape, name
        assert dets.xyxy.dtype == np.float32 and dets.score.dtype == np.float32


def test_detect_rejects_a_non_bgr_image(tmp_path: Path) -> None:
    det = CustomDetector(_config(_save_model(tmp_path / "m.onnx", _layout_outputs("yolov8"))))
    with pytest.raises(ValueError, match="BGR uint8"):
        det.detect(np.zeros((10, 10), np.uint8))


def test_six_wide_rows_are_yolov5_when_n_is_a_grid_size(tmp_path: Path) -> None:
    cells = 40 * 40 + 20 * 20 + 10 * 10  # strides 8/16/32 at 320x320
    rows = np.zeros((cells, 6), np.float32)
    rows[0] = [*_cxcywh(TRUTH[0][0]), 0.5, 0.8]
    path = _save_model(tmp_path / "m.onnx", [("output0", rows[None], TensorProto.FLOAT)])
    det = CustomDetector(_config(path, classes={0: "logos"}))
    assert det.layout is Layout.YOLOV5
    dets = det.detect(_frame())
    assert dets.score.tolist() == [pytest.approx(0.4)]
    np.testing.assert_allclose(dets.xyxy, [EXPECTED[0][1]], atol=1.0)


def test_ambiguous_rows_default_to_yolov5_and_layout_overrides(tmp_path: Path) -> None:
    path = _save_model(tmp_path / "m.onnx", _layout_outputs("yolov8_rows"))
    auto = CustomDetector(_config(path, classes={"0": "tattoos"}))  # 7 = 5 + 2 or 4 + 3
    assert auto.layout is Layout.YOLOV5
    forced = CustomDetector(_config(path, classes={"0": "tattoos"}, layout="yolov8"))
    assert forced.layout is Layout.YOLOV8
    assert forced.detect(_frame()).score.tolist() == [pytest.approx(0.9)]


def test_dynamic_input_uses_the_configured_size(tmp_path: Path) -> None:
    path = _save_model(tmp_path / "m.onnx", _layout_outputs("end2end"),
                       input_shape=("batch", 3, "height", "width"))
    assert CustomDetector(_config(path)).input_size == (640, 640)
    det = CustomDetector(_config(path, input_size=[INPUT, 256]))
    assert det.input_size == (INPUT, 256)
    # a 320x128 frame letterboxed into 320x256: scale 1, 64 rows of padding on top
    dets = det.detect(np.zeros((128, INPUT, 3), np.uint8))
    np.testing.assert_allclose(dets.xyxy[dets.category == "tattoos"], [(110, 66, 210, 126)],
                               atol=1.0)


def test_float16_models_run(tmp_path: Path) -> None:
    path = _save_model(tmp_path / "m.onnx",
                       [("output0", _dense(False).T[None], TensorProto.FLOAT16)],
                       input_type=TensorProto.FLOAT16)
    dets = CustomDetector(_config(path)).detect(_frame())
    np.testing.assert_allclose(dets.xyxy, [e[1] for e in EXPECTED], atol=1.0)


def test_redaction_covers_the_mapped_box(tmp_path: Path) -> None:
    path = _save_model(tmp_path / "m.onnx", _layout_outputs("yolov5"))
    image = _frame(1)
    before = image.copy()
    dets = CustomDetector(_config(path)).detect(image)
    redact_boxes(image, dets.xyxy, Style(method=Method.FILL, fill_bgr=(255, 0, 255)))
    x1, y1, x2, y2 = (int(v) for v in EXPECTED[0][1])
    core = image[y1 + 20:y2 - 20, x1 + 40:x2 - 40].reshape(-1, 3)
    assert (core == (255, 0, 255)).all()
    np.testing.assert_array_equal(image[:, :150], before[:, :150])
    np.testing.assert_array_equal(image[:60, :], before[:60, :])


# --------------------------------------------------------------------------------------------
# loading errors and model info
def test_missing_file_is_model_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nope.onnx"
    with pytest.raises(ModelNotFoundError, match=re.escape(str(path))):
        CustomDetector(_config(path))


def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"this is not an onnx model" * 10)
    with pytest.raises(CustomModelError, match="cannot load") as info:
        CustomDetector(_config(path))
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("outputs", "match"), [
    ([("out", np.zeros((1, 2, 3, 4), np.float32), TensorProto.FLOAT)], "no supported layout"),
    ([("a", np.zeros((1, 40, 8), np.float32), TensorProto.FLOAT),
      ("b", np.zeros((1, 40, 8), np.float32), TensorProto.FLOAT)], "no supported layout"),
    ([("out", np.zeros((1, 5, 40), np.float32), TensorProto.FLOAT)], "class id 2"),
])
def test_unsupported_outputs_are_a_clear_error(tmp_path: Path, outputs: list[Output],
                                               match: str) -> None:
    path = _save_model(tmp_path / "m.onnx", outputs)
    with pytest.raises(CustomModelError, match=match):
        CustomDetector(_config(path))


def test_forced_layout_that_does_not_fit_is_an_error(tmp_path: Path) -> None:
    path = _save_model(tmp_path / "m.onnx", _layout_outputs("yolov8"))
    with pytest.raises(CustomModelError, match="end2end"):
        CustomDetector(_config(path, layout="end2end"))
    with pytest.raises(CustomModelError, match="boxes_scores_classes"):
        CustomDetector(_config(path, layout="boxes_scores_classes"))


def test_bad_inputs_are_a_clear_error(tmp_path: Path) -> None:
    path = _save_model(tmp_path / "m.onnx", _layout_outputs("yolov8"), input_shape=(1, 320, 320))
    with pytest.raises(CustomModelError, match="NCHW"):
        CustomDetector(_config(path))
    path = _save_model(tmp_path / "s.onnx", _layout_outputs("yolov8"))
    with pytest.raises(CustomModelError, match="input_size"):
        CustomDetector(_config(path, input_size=[640, 640]))


def test_models_carry_the_file_hash(tmp_path: Path) -> None:
    path = _save_model(tmp_path / "tattoo.onnx", _layout_outputs("yolov8"))
    det = CustomDetector(_config(path, license="CC-BY-4.0"))
    (info,) = det.models
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (info.name, info.path, info.license) == ("tattoo", "tattoo.onnx", "CC-BY-4.0")


# --------------------------------------------------------------------------------------------
# configuration
def test_from_dict_accepts_toml_tables(tmp_path: Path) -> None:
    cfg = CustomModelConfig.from_dict(
        {"path": "tattoo.onnx", "classes": {"2": "id_cards", "0": "tattoos"},
         "threshold": 0.4, "input_size": [640, 480], "name": "tattoo-yolo"}, base_dir=tmp_path)
    assert cfg.path == str(tmp_path / "tattoo.onnx")
    assert dict(cfg.classes) == {0: "tattoos", 2: "id_cards"}
    assert list(cfg.classes) == [0, 2]
    assert (cfg.name, cfg.threshold, cfg.input_size) == ("tattoo-yolo", 0.4, (640, 480))
    assert (cfg.nms_iou, cfg.license, cfg.layout) == (0.45, "user-supplied", "auto")
    assert hash(cfg) == hash(CustomModelConfig.from_dict(
        {"path": "tattoo.onnx", "classes": {"0": "tattoos", "2": "id_cards"}, "threshold": 0.4,
         "input_size": [640, 480], "name": "tattoo-yolo"}, base_dir=tmp_path))
    other = CustomModelConfig.from_dict(
        {"path": "/models/x.onnx", "classes": {0: "logos", 1: "logos"}}, base_dir=tmp_path)
    assert other.path == "/models/x.onnx" and other.name == "x" and other.input_size is None
    assert CustomModelConfig.from_dict({"path": "a/b.onnx", "classes": {"0": "x"}}).path == \
        "a/b.onnx"


_OK: dict[str, Any] = {"path": "m.onnx", "classes": {"0": "tattoos"}}


@pytest.mark.parametrize(("changes", "match"), [
    ({"colour": "red"}, "'colour'"),
    ({"path": None}, "'path'"),
    ({"path": ""}, "'path'"),
    ({"path": 3}, "'path'"),
    ({"classes": None}, "missing required key 'classes'"),
    ({"classes": {}}, "'classes'"),
    ({"classes": "tattoos"}, "'classes'"),
    ({"classes": {"-1": "tattoos"}}, "negative"),
    ({"classes": {"a": "tattoos"}}, "'a'"),
    ({"classes": {"1.5": "tattoos"}}, "'1.5'"),
    ({"classes": {True: "tattoos"}}, "True"),
    ({"classes": {"0": "Tattoos"}}, "'Tattoos'"),
    ({"classes": {"0": "id-cards"}}, "'id-cards'"),
    ({"classes": {"0": "0tattoos"}}, "'0tattoos'"),
    ({"classes": {"0": "a_very_long_category"}}, "16 characters"),
    ({"classes": {"0": 7}}, "'classes'"),
    ({"classes": {"0": "a", 0: "b"}}, "twice"),
    ({"threshold": 0}, "'threshold'"),
    ({"threshold": 1.5}, "'threshold'"),
    ({"threshold": "0.5"}, "'threshold'"),
    ({"threshold": True}, "'threshold'"),
    ({"nms_iou": 0.0}, "'nms_iou'"),
    ({"input_size": [640]}, "'input_size'"),
    ({"input_size": [0, 640]}, "'input_size'"),
    ({"input_size": [640.0, 640]}, "'input_size'"),
    ({"input_size": "640x640"}, "'input_size'"),
    ({"name": 3}, "'name'"),
    ({"license": ""}, "'license'"),
    ({"layout": "yolov3"}, "'layout'"),
])
def test_from_dict_rejects_bad_config(changes: Mapping[str, Any], match: str) -> None:
    d = {**_OK, **changes}
    for key in [k for k, v in changes.items() if v is None]:
        del d[key]
    with pytest.raises(CustomConfigError, match=match) as info:
        CustomModelConfig.from_dict(d)
    assert isinstance(info.value, ValueError)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(CustomConfigError, match="'threshold'"):
        CustomModelConfig("m.onnx", {0: "tattoos"}, threshold=2.0)
    with pytest.raises(CustomConfigError, match="'classes'"):
        CustomModelConfig("m.onnx", {-1: "tattoos"})


# --------------------------------------------------------------------------------------------
# end to end: `redact file --config` with a model the user trained


def _cli_setup(tmp_path: Path) -> Path:
    _save_model(tmp_path / "tattoo.onnx", _layout_outputs("yolov8"))
    cfg = tmp_path / "redact.toml"
    cfg.write_text('[[model]]\npath = "tattoo.onnx"\nname = "tattoo-yolo"\n'
                   'classes = { 0 = "tattoos", 2 = "id_cards" }\n'
                   '[category.tattoos]\nmethod = "fill"\nmask_scale = 1.0\nshape = "box"\n')
    return cfg


def test_cli_redacts_what_a_user_model_finds(tmp_path: Path) -> None:
    import json

    import cv2

    from gateway.cli import main

    cfg = _cli_setup(tmp_path)
    src, dst, js = tmp_path / "in.png", tmp_path / "out.png", tmp_path / "audit.json"
    img = _frame(3)
    cv2.imwrite(str(src), img)
    assert main(["file", str(src), "-o", str(dst), "--categories", "tattoos", "--config",
                 str(cfg), "--json", str(js), "--quiet"]) == 0
    out = cv2.imread(str(dst))
    assert out is not None
    x1, y1, x2, y2 = EXPECTED[0][1]
    assert (out[y1:y2, x1:x2] == 0).all()  # the tattoo box, filled black as a box
    outside = np.ones(out.shape[:2], bool)
    outside[y1 - 1:y2 + 1, x1 - 1:x2 + 1] = False
    assert np.array_equal(out[outside], img[outside])  # id_cards were not asked for
    m = json.loads(js.read_text())
    assert m["counts"] == {"tattoos": 1}
    assert m["files"][0]["models"][0]["name"] == "tattoo-yolo"
    assert len(m["files"][0]["models"][0]["sha256"]) == 64


def test_cli_without_the_model_says_tattoos_are_unavailable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    src = tmp_path / "in.png"
    import cv2

    cv2.imwrite(str(src), _frame(4))
    assert main(["file", str(src), "-o", str(tmp_path / "o.png"), "--categories",
                 "tattoos"]) == 2
    assert "tattoos" in capsys.readouterr().err


def test_video_with_a_user_model_is_covered_on_every_frame(tmp_path: Path) -> None:
    from pipeline.files import Redactor, RedactSettings
    from pipeline.settings import load_config
    from tests.conftest import read_video, write_video

    cfg = load_config(_cli_setup(tmp_path))
    frames = [_frame(i) for i in range(12)]
    src, dst = tmp_path / "in.mp4", tmp_path / "out.mp4"
    write_video(src, frames, fps=10)
    settings = RedactSettings(categories=("tattoos", "id_cards"),
                              per_category=cfg.per_category,
                              custom_models=tuple(cfg.custom_models))
    entry = Redactor(settings).redact(src, dst)
    assert entry["frames"] == 12 and entry["detector_calls_by"]["tattoos+id_cards"] >= 4
    info = read_video(dst)
    x1, y1, x2, y2 = EXPECTED[0][1]
    for px in info.frames:
        assert px[y1 + 4:y2 - 4, x1 + 4:x2 - 4].max() < 40  # filled black (codec noise aside)
