"""User-supplied ONNX object detectors (YOLO-style) whose classes map to redaction categories.

A user who trained a detector for something we do not cover out of the box (tattoos, ID cards,
logos...) describes it with a :class:`CustomModelConfig` (one TOML table, see
:meth:`CustomModelConfig.from_dict`) and runs it with :class:`CustomDetector`.

Input: the model takes one image tensor, NCHW ``(1, 3, H, W)`` float32 (or float16) RGB in
``[0, 1]``. Frames are letterboxed into ``input_size`` (width, height): scaled to fit with the
aspect ratio kept (bilinear), centred, padded with grey 114.

Outputs: the layout is read from the shapes the model returns on one dummy inference at load
(a leading batch dimension of 1 is optional everywhere; ``N`` = number of candidate boxes,
``C`` = number of model classes; box coordinates are in model-input pixels):

``boxes_scores_classes`` (post-processed)
    three outputs: boxes ``(1, N, 4)`` as ``x1, y1, x2, y2``, scores ``(1, N)`` and class ids
    ``(1, N)`` of any numeric dtype. Roles are taken from the output names when their last word
    is ``boxes``/``bboxes``, ``scores``, ``classes``/``labels`` (``det_boxes`` counts);
    otherwise the boxes are the output whose last dimension is 4 and whose rank is one more
    than the other two, the class ids are the one with an integer dtype, and when both are
    floats the first of the two in output order holds the scores.
``end2end``
    one output ``(1, N, 6)``: ``x1, y1, x2, y2, score, class`` (NMS-free / end-to-end exports).
``yolov8``
    one output ``(1, 4 + C, N)`` (or ``(1, N, 4 + C)``): ``cx, cy, w, h``, then C class scores.
``yolov5``
    one output ``(1, N, 5 + C)``: ``cx, cy, w, h``, objectness, C class scores;
    score = objectness * class score.

Precedence (``layout = "auto"``), for a model output written ``(a, b)`` without its batch:

1. exactly three outputs that fit ``boxes_scores_classes`` -> that layout;
2. otherwise the model must have one output of rank 2 or 3 (other outputs of rank >= 4, such
   as the raw feature maps some YOLOv5 exports add, are ignored);
3. ``b == 6`` and ``a`` is not a YOLO grid size for the input (1 or 3 anchors per cell at
   strides 8/16/32, or 8/16/32/64) -> ``end2end``;
4. ``a < b`` -> ``yolov8`` with attributes first (``C = a - 4``);
5. else rows of ``b`` attributes: ``yolov5`` (``C = b - 5``) when the highest class id in
   ``classes`` fits in ``b - 5`` classes, else ``yolov8`` rows (``C = b - 4``) when it fits in
   ``b - 4``, else the model is rejected.

So a ``(1, N, 4 + C)`` YOLOv8 output is only recognised when the class mapping proves there is
no objectness column; set ``layout`` explicitly (``"yolov8"``, ``"yolov5"``, ``"end2end"``,
``"boxes_scores_classes"``) when auto-detection picks the wrong one.

Decoding: every mapped class of a dense (yolov5/yolov8) output is scored on its own (a box may
come out under two categories when two mapped classes both pass), classes missing from the
mapping are dropped, scores below ``threshold`` are dropped, then non-maximum suppression runs
per category (two model classes mapped to one category are merged with each other). Boxes are
mapped back to frame pixels, clipped to the frame, and dropped when left with no area; scores
are clipped into ``[0, 1]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

import cv2
import numpy as np

from engines.backends import load_model
from engines.detections import Detections, nms
from engines.errors import DetectorError, ModelNotFoundError, RedactionError
from engines.faces import ModelInfo

log = logging.getLogger(__name__)

DEFAULT_INPUT_SIZE = (640, 640)  # (width, height) when the model's input size is dynamic
PAD_VALUE = 114  # letterbox padding, as in YOLO training pipelines
MAX_CATEGORY_LEN = 16  # Detections stores categories as "<U16"
MAX_INPUT_SIDE = 8192
MAX_CANDIDATES = 10_000  # best-scored candidates kept before NMS (bounds its cost)
_CATEGORY_RE = re.compile(r"[a-z][a-z0-9_]*")
_CLASS_ID_RE = re.compile(r"[+-]?\d+")


class CustomConfigError(RedactionError, ValueError):
    """A custom model's configuration is invalid (the message names the key)."""


class CustomModelError(RedactionError, ValueError):
    """A custom model file cannot be loaded, or its inputs/outputs fit no supported layout."""


class Layout(StrEnum):
    AUTO = "auto"
    YOLOV5 = "yolov5"
    YOLOV8 = "yolov8"
    END2END = "end2end"
    BOXES_SCORES_CLASSES = "boxes_scores_classes"


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class CustomModelConfig:
    """One user-supplied detector.

    path:       the .onnx file.
    classes:    model class index -> category name (lowercase identifier, at most 16
                characters); classes not listed are ignored.
    name:       shown in reports; defaults to the file stem.
    threshold:  minimum score, in (0, 1].
    input_size: (width, height) of the model input; None = the model's own when static, else
                640x640.
    nms_iou:    IoU above which a same-category box with a lower score is suppressed, (0, 1].
    license:    reported with the model.
    layout:     output layout, ``"auto"`` or one of :class:`Layout` (see the module docstring).
    """

    path: str
    classes: Mapping[int, str] = field(hash=False)  # a read-only mapping, ascending class ids
    name: str = ""
    threshold: float = 0.25
    input_size: tuple[int, int] | None = None
    nms_iou: float = 0.45
    license: str = "user-supplied"
    layout: str = "auto"

    def __post_init__(self) -> None:
        path = os.fspath(self.path) if isinstance(self.path, os.PathLike) else self.path
        if not isinstance(path, str) or not path.strip():
            raise CustomConfigError(
                f"custom model: 'path' must be a non-empty string, got {path!r}")
        where = f"custom model {path!r}"
        object.__setattr__(self, "path", path)

        if not isinstance(self.classes, Mapping) or not self.classes:
            raise CustomConfigError(
                f"{where}: 'classes' must be a non-empty table of class id -> category name")
        classes: dict[int, str] = {}
        for k, v in self.classes.items():
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise CustomConfigError(
                    f"{where}: 'classes' key {k!r} is not a class id (a non-negative integer)")
            if not isinstance(v, str) or not _CATEGORY_RE.fullmatch(v):
                raise CustomConfigError(
                    f"{where}: 'classes' maps {k} to {v!r}, which is not a category name "
                    "(a lowercase identifier such as 'tattoos' or 'id_cards')")
            if len(v) > MAX_CATEGORY_LEN:
                raise CustomConfigError(
                    f"{where}: 'classes' maps {k} to {v!r}, longer than {MAX_CATEGORY_LEN} "
                    "characters")
            classes[k] = v
        object.__setattr__(self, "classes", MappingProxyType(dict(sorted(classes.items()))))

        if not isinstance(self.name, str):
            raise CustomConfigError(f"{where}: 'name' must be a string, got {self.name!r}")
        if not self.name.strip():
            object.__setattr__(self, "name", Path(path).stem)
        if not isinstance(self.license, str) or not self.license.strip():
            raise CustomConfigError(f"{where}: 'license' must be a non-empty string")
        for key in ("threshold", "nms_iou"):
            value = getattr(self, key)
            if not _is_number(value) or not 0.0 < value <= 1.0:
                raise CustomConfigError(
                    f"{where}: {key!r} must be a number in (0, 1], got {value!r}")
            object.__setattr__(self, key, float(value))
        size = self.input_size
        if size is not None:
            if (not isinstance(size, tuple | list) or len(size) != 2
                    or not all(isinstance(s, int) and not isinstance(s, bool)
                               and 0 < s <= MAX_INPUT_SIDE for s in size)):
                raise CustomConfigError(
                    f"{where}: 'input_size' must be [width, height], two integers in "
                    f"1..{MAX_INPUT_SIDE}, got {size!r}")
            object.__setattr__(self, "input_size", (int(size[0]), int(size[1])))
        try:
            object.__setattr__(self, "layout", Layout(self.layout))
        except ValueError:
            names = ", ".join(v.value for v in Layout)
            raise CustomConfigError(
                f"{where}: 'layout' must be one of {names}, got {self.layout!r}") from None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base_dir: Path | None = None) -> CustomModelConfig:
        """A config from one TOML table.

        ``{"path": "tattoo.onnx", "classes": {"0": "tattoos", "2": "id_cards"},
        "threshold": 0.4, "input_size": [640, 640], "name": "tattoo-yolo"}``: class ids may be
        strings of digits (TOML keys) or integers; a relative ``path`` resolves against
        ``base_dir`` (the config file's folder) when given. Unknown keys and bad values raise
        :class:`CustomConfigError` (a ``ValueError``) naming the key.
        """
        if not isinstance(d, Mapping):
            raise CustomConfigError(f"custom model: expected a table, got {type(d).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in d if k not in allowed)
        label = f"custom model {d.get('path', '')!r}" if "path" in d else "custom model"
        if unknown:
            raise CustomConfigError(
                f"{label}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(allowed)}")
        for key in ("path", "classes"):
            if key not in d:
                raise CustomConfigError(f"{label}: missing required key {key!r}")
        raw_path = d["path"]
        if not isinstance(raw_path, str) or not raw_path.strip():
            raise CustomConfigError(
                f"custom model: 'path' must be a non-empty string, got {raw_path!r}")
        path = Path(raw_path).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        raw_classes = d["classes"]
        if not isinstance(raw_classes, Mapping):
            raise CustomConfigError(
                f"{label}: 'classes' must be a table of class id -> category name, "
                f"got {raw_classes!r}")
        classes: dict[int, str] = {}
        for k, v in raw_classes.items():
            if isinstance(k, str) and _CLASS_ID_RE.fullmatch(k.strip()):
                cid: Any = int(k)
            elif isinstance(k, int) and not isinstance(k, bool):
                cid = k
            else:
                raise CustomConfigError(
                    f"{label}: 'classes' key {k!r} is not a class id (a non-negative integer)")
            if cid in classes:
                raise CustomConfigError(f"{label}: 'classes' lists class id {cid} twice")
            if cid < 0:
                raise CustomConfigError(
                    f"{label}: 'classes' key {k!r} is negative; class ids start at 0")
            classes[cid] = v
        kwargs: dict[str, Any] = {k: v for k, v in d.items() if k not in ("path", "classes")}
        if isinstance(kwargs.get("input_size"), list):
            kwargs["input_size"] = tuple(kwargs["input_size"])
        return cls(path=str(path), classes=classes, **kwargs)


@dataclass(frozen=True)
class _Plan:
    """How to read the model's outputs (chosen once, at load)."""

    layout: Layout
    outputs: tuple[int, ...]  # output indices: (dense,) / (end2end,) / (boxes, scores, classes)
    attrs_first: bool = False  # dense output stored (attributes, N) instead of (N, attributes)
    width: int = 0  # attributes per box for dense and end2end outputs


def _rows(arr: np.ndarray) -> np.ndarray | None:
    """``arr`` as a 2-D array without its batch dimension of 1, or None."""
    if arr.ndim == 3 and arr.shape[0] == 1:
        return arr[0]
    return arr if arr.ndim == 2 else None


def _vector(arr: np.ndarray) -> np.ndarray | None:
    if arr.ndim == 2 and arr.shape[0] == 1:
        return arr[0]
    return arr if arr.ndim == 1 else None


def _boxes(arr: np.ndarray) -> np.ndarray | None:
    rows = _rows(arr)
    return rows if rows is not None and rows.shape[1] == 4 else None


def _role(name: str) -> str | None:
    words = re.split(r"[^a-z0-9]+", name.lower())
    last = next((w for w in reversed(words) if w), "")
    return {"boxes": "boxes", "bboxes": "boxes", "scores": "scores", "classes": "classes",
            "labels": "classes"}.get(last)


def _grid_anchor_counts(width: int, height: int) -> set[int]:
    """Box counts of dense YOLO heads for a (width, height) input: 1 or 3 anchors per cell,
    strides 8/16/32 or 8/16/32/64."""
    counts: set[int] = set()
    for strides in ((8, 16, 32), (8, 16, 32, 64)):
        cells = sum(math.ceil(width / s) * math.ceil(height / s) for s in strides)
        counts.update((cells, 3 * cells))
    return counts


def _match_boxes_scores_classes(outs: list[np.ndarray], names: list[str]
                                ) -> tuple[int, int, int] | None:
    """Indices (boxes, scores, classes) when the three outputs fit the post-processed layout."""
    if len(outs) != 3:
        return None

    def fits(b: int, s: int, c: int) -> bool:
        boxes, scores, classes = _boxes(outs[b]), _vector(outs[s]), _vector(outs[c])
        return (boxes is not None and scores is not None and classes is not None
                and outs[b].ndim == outs[s].ndim + 1 == outs[c].ndim + 1
                and len(boxes) == len(scores) == len(classes))

    roles = [_role(n) for n in names]
    if sorted(r or "" for r in roles) == ["boxes", "classes", "scores"]:
        b, s, c = (roles.index(r) for r in ("boxes", "scores", "classes"))
        if fits(b, s, c):
            return b, s, c
    for b in range(3):
        s, c = (i for i in range(3) if i != b)
        if roles[s] == "classes" or roles[c] == "scores":
            s, c = c, s
        elif roles[s] != "scores" and roles[c] != "classes":
            s_int = np.issubdtype(outs[s].dtype, np.integer)
            c_int = np.issubdtype(outs[c].dtype, np.integer)
            if s_int and not c_int:
                s, c = c, s
        if fits(b, s, c):
            return b, s, c
    return None


def letterbox(image: np.ndarray, size: tuple[int, int]
              ) -> tuple[np.ndarray, float, float, int, int]:
    """``image`` (H, W, 3) uint8 fitted into ``size`` (width, height) keeping its aspect ratio.

    Returns the padded (height, width, 3) uint8 canvas (pad value 114, image centred), the
    horizontal and vertical scale factors, and the left and top padding in pixels: a frame
    point ``(x, y)`` lands at ``(x * sx + left, y * sy + top)``.
    """
    h, w = image.shape[:2]
    iw, ih = size
    r = min(iw / w, ih / h)
    nw, nh = min(iw, max(1, round(w * r))), min(ih, max(1, round(h * r)))
    left, top = (iw - nw) // 2, (ih - nh) // 2
    canvas = np.full((ih, iw, 3), PAD_VALUE, np.uint8)
    resized = image if (nw, nh) == (w, h) else cv2.resize(
        image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    canvas[top:top + nh, left:left + nw] = resized
    return canvas, nw / w, nh / h, left, top


class CustomDetector:
    """Runs one :class:`CustomModelConfig` on BGR uint8 frames (H, W, 3).

    Construction loads the model, checks its input and runs one dummy inference to pick the
    output layout: a missing file raises :class:`ModelNotFoundError`, a model onnxruntime
    cannot load or whose input/outputs fit no supported layout raises
    :class:`CustomModelError`.
    """

    categories: tuple[str, ...]

    def __init__(self, config: CustomModelConfig, threads: int = 0, device: str = "cpu",
                 shared: bool = True) -> None:
        self.config = config
        self.path = Path(config.path)
        where = f"custom model {config.name!r}"
        if not self.path.is_file():
            raise ModelNotFoundError(f"{where}: model file not found at {self.path}")
        data = self.path.read_bytes()
        self._sha256 = hashlib.sha256(data).hexdigest()
        try:
            self._session = load_model(data, device=device, threads=threads, shared=shared)
        except Exception as e:  # onnxruntime raises its own (non-public) exception types
            raise CustomModelError(
                f"{where}: onnxruntime cannot load {self.path} as an ONNX model: {e}") from e
        self._where = where
        self._input_name, self._input_dtype, self.input_size = self._read_input()
        self.categories = tuple(dict.fromkeys(config.classes.values()))
        self._class_ids = np.array(list(config.classes), np.int64)  # ascending
        self._class_cat = np.array([self.categories.index(config.classes[int(c)])
                                    for c in self._class_ids], np.int64)
        self._output_names = [o.name for o in self._session.get_outputs()]
        gray = np.full((self.input_size[1], self.input_size[0], 3), PAD_VALUE, np.uint8)
        try:
            outs = self._run(gray)
        except Exception as e:
            raise CustomModelError(
                f"{where}: a dummy inference at {self.input_size[0]}x{self.input_size[1]} "
                f"failed: {e}") from e
        self._plan = self._choose_plan(outs)
        log.info("%s: layout %s, input %dx%d, %d mapped classes -> %s", where,
                 self._plan.layout.value, *self.input_size, len(self._class_ids),
                 ", ".join(self.categories))

    # loading --------------------------------------------------------------------------------
    def _read_input(self) -> tuple[str, type[np.floating[Any]], tuple[int, int]]:
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise CustomModelError(
                f"{self._where}: the model has {len(inputs)} inputs "
                f"({', '.join(i.name for i in inputs)}); a custom detector takes one image "
                "input (1, 3, H, W)")
        inp = inputs[0]
        shape = list(inp.shape)
        dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
        if len(dims) != 4 or dims[0] not in (None, 1) or dims[1] not in (None, 3):
            raise CustomModelError(
                f"{self._where}: input {inp.name!r} has shape {shape}; expected NCHW "
                "(1, 3, H, W)")
        dtypes: dict[str, type[np.floating[Any]]] = {
            "tensor(float)": np.float32, "tensor(float16)": np.float16}
        if inp.type not in dtypes:
            raise CustomModelError(
                f"{self._where}: input {inp.name!r} is {inp.type}; expected float or float16")
        static_w, static_h = dims[3], dims[2]
        wanted = self.config.input_size
        if wanted is not None:
            for side, have, want in (("width", static_w, wanted[0]),
                                     ("height", static_h, wanted[1])):
                if have is not None and have != want:
                    raise CustomModelError(
                        f"{self._where}: 'input_size' asks for {side} {want} but the model's "
                        f"input {side} is fixed at {have}")
            size = wanted
        else:
            size = (static_w or DEFAULT_INPUT_SIZE[0], static_h or DEFAULT_INPUT_SIZE[1])
        return inp.name, dtypes[inp.type], size

    def _choose_plan(self, outs: list[np.ndarray]) -> _Plan:
        shapes = ", ".join(str(tuple(o.shape)) for o in outs)
        bad = f"{self._where}: outputs {shapes} fit no supported layout"
        forced = Layout(self.config.layout)
        if forced in (Layout.AUTO, Layout.BOXES_SCORES_CLASSES):
            bsc = _match_boxes_scores_classes(outs, self._output_names)
            if bsc is not None:
                return _Plan(Layout.BOXES_SCORES_CLASSES, bsc)
            if forced is Layout.BOXES_SCORES_CLASSES:
                raise CustomModelError(
                    f"{bad}: 'boxes_scores_classes' needs (1, N, 4), (1, N) and (1, N) outputs")
        low_rank = [i for i, o in enumerate(outs) if o.ndim <= 3]
        rows = _rows(outs[low_rank[0]]) if len(low_rank) == 1 else None
        if rows is None:
            raise CustomModelError(
                f"{bad} (expected one output (1, N, 5+C), (1, 4+C, N) or (1, N, 6), or three "
                "outputs boxes (1, N, 4), scores (1, N), classes (1, N))")
        index = low_rank[0]
        a, b = rows.shape
        need = int(self._class_ids.max()) + 1  # classes the mapping requires the model to have
        grid = _grid_anchor_counts(*self.input_size)
        if forced is Layout.END2END or (forced is Layout.AUTO and b == 6 and a not in grid):
            if b != 6:
                raise CustomModelError(f"{bad}: 'end2end' needs a (1, N, 6) output")
            return _Plan(Layout.END2END, (index,), width=6)
        if forced is Layout.YOLOV5:
            layout, attrs_first, width = Layout.YOLOV5, False, b
        elif a < b:
            layout, attrs_first, width = Layout.YOLOV8, True, a
        elif forced is Layout.YOLOV8 or b - 5 < need <= b - 4:
            layout, attrs_first, width = Layout.YOLOV8, False, b
        else:
            layout, attrs_first, width = Layout.YOLOV5, False, b
        n_classes = width - (5 if layout is Layout.YOLOV5 else 4)
        if n_classes < need:
            raise CustomModelError(
                f"{bad}: read as {layout.value} it has {max(n_classes, 0)} classes, but "
                f"'classes' maps class id {need - 1}")
        return _Plan(layout, (index,), attrs_first=attrs_first, width=width)

    # inference ------------------------------------------------------------------------------
    def _run(self, canvas: np.ndarray) -> list[np.ndarray]:
        """Model outputs for a letterboxed BGR uint8 canvas (height, width, 3)."""
        blob = canvas[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32)
        blob *= np.float32(1 / 255)
        return [np.asarray(o) for o in self._session.run(
            None, {self._input_name: blob.astype(self._input_dtype, copy=False)})]

    def _candidates(self, outs: list[np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes (n, 4) float32 xyxy in input pixels, scores (n,) float32 and indices into
        ``self._class_ids`` (n,) int64 of the mapped classes scoring at least the threshold."""
        plan, thr = self._plan, self.config.threshold
        if plan.layout in (Layout.YOLOV5, Layout.YOLOV8):
            rows = _rows(outs[plan.outputs[0]])
            if rows is not None and plan.attrs_first:
                rows = rows.T
            if rows is None or rows.shape[1] != plan.width:
                raise DetectorError(f"{self._where}: output shape changed to "
                                    f"{outs[plan.outputs[0]].shape}")
            rows = rows.astype(np.float32, copy=False)
            first = 5 if plan.layout is Layout.YOLOV5 else 4
            scores = rows[:, first + self._class_ids]
            if plan.layout is Layout.YOLOV5:
                scores = scores * rows[:, 4:5]
            i, j = np.nonzero(scores >= thr)
            cx, cy, w, h = rows[i, 0], rows[i, 1], rows[i, 2], rows[i, 3]
            xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
            return xyxy, scores[i, j], j.astype(np.int64)
        if plan.layout is Layout.END2END:
            rows = _rows(outs[plan.outputs[0]])
            if rows is None or rows.shape[1] != 6:
                raise DetectorError(f"{self._where}: output shape changed to "
                                    f"{outs[plan.outputs[0]].shape}")
            rows = rows.astype(np.float32, copy=False)
            boxes, score, cls = rows[:, :4], rows[:, 4], rows[:, 5]
        else:
            b, s, c = plan.outputs
            boxes_a, score_a, cls_a = _boxes(outs[b]), _vector(outs[s]), _vector(outs[c])
            if (boxes_a is None or score_a is None or cls_a is None
                    or not len(boxes_a) == len(score_a) == len(cls_a)):
                raise DetectorError(f"{self._where}: output shapes changed to "
                                    f"{[o.shape for o in outs]}")
            boxes = boxes_a.astype(np.float32, copy=False)
            score = score_a.astype(np.float32, copy=False)
            cls = cls_a
        cls_f = np.asarray(cls, np.float64)
        cls_f = np.clip(np.nan_to_num(cls_f, nan=-1.0), -1.0, 2.0**31)
        cls_id = np.rint(cls_f).astype(np.int64)
        j = np.minimum(np.searchsorted(self._class_ids, cls_id), len(self._class_ids) - 1)
        keep = (self._class_ids[j] == cls_id) & (score >= thr)
        return boxes[keep], score[keep], j[keep].astype(np.int64)

    def detect(self, image: np.ndarray) -> Detections:
        """Boxes of the mapped categories on a BGR uint8 image (H, W, 3): xyxy float32 in that
        image's pixels, clipped to it, scores float32 in [0, 1]."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a BGR uint8 image (H, W, 3), got {image.dtype} "
                             f"{image.shape}")
        h, w = image.shape[:2]
        if h == 0 or w == 0:
            return Detections.empty()
        canvas, sx, sy, left, top = letterbox(image, self.input_size)
        xyxy, score, j = self._candidates(self._run(canvas))
        ok = np.isfinite(xyxy).all(1) & np.isfinite(score)
        xyxy, score, j = xyxy[ok], score[ok], j[ok]
        if len(score) > MAX_CANDIDATES:
            log.debug("%s: %d candidates, keeping the best %d", self._where, len(score),
                      MAX_CANDIDATES)
            best = np.argpartition(-score, MAX_CANDIDATES)[:MAX_CANDIDATES]
            xyxy, score, j = xyxy[best], score[best], j[best]
        xyxy = (xyxy - np.array([left, top, left, top], np.float32)) / np.array(
            [sx, sy, sx, sy], np.float32)
        xyxy = np.clip(xyxy, 0, np.array([w, h, w, h], np.float32)).astype(np.float32)
        ok = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        xyxy, score, cat = xyxy[ok], np.clip(score[ok], 0, 1), self._class_cat[j[ok]]
        kept: list[np.ndarray] = []
        for c in np.unique(cat):
            idx = np.nonzero(cat == c)[0]
            kept.append(idx[nms(xyxy[idx], score[idx], self.config.nms_iou)])
        if not kept:
            return Detections.empty()
        keep = np.concatenate(kept)
        keep = keep[np.argsort(-score[keep], kind="stable")]
        names = np.array(self.categories, dtype=f"<U{MAX_CATEGORY_LEN}")
        return Detections(xyxy[keep], score[keep].astype(np.float32), names[cat[keep]])

    @property
    def layout(self) -> Layout:
        """The output layout chosen at load."""
        return self._plan.layout

    @property
    def models(self) -> list[ModelInfo]:
        """One entry: the config's name, the file name, the file's SHA-256 and license."""
        return [ModelInfo(self.config.name, self.path.name, self._sha256, self.config.license)]
