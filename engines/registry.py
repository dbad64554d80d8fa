"""Categories, the detectors behind them, and how a detector is built from settings.

A category is only offered when a detector that really finds it is installed; asking for any
other name is an :class:`UnknownCategoryError` that lists the available ones.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

import numpy as np

from engines.detections import Detections
from engines.errors import ModelNotFoundError, UnknownCategoryError
from engines.faces import CenterFace, ModelInfo, YuNet, YuNetPhoto
from engines.models import CENTERFACE, TEXT_DET, TEXT_REC, YUNET, ZXING, ModelSpec, PackageSpec
from engines.redact import Method, Shape


class Detector(Protocol):
    """Finds boxes of some categories on a BGR uint8 image (H, W, 3)."""

    categories: tuple[str, ...]

    def detect(self, image: np.ndarray) -> Detections: ...

    @property
    def models(self) -> list[ModelInfo]: ...


@dataclass(frozen=True)
class DetectorConfig:
    """Settings of one detector run (see ``redact file --help``)."""

    face_model: str = "yunet"  # "yunet" (fast) or "centerface" (high recall, slower)
    threshold: float = 0.3  # low on purpose: a missed face is worse than a blurred shoulder
    scales: tuple[float, ...] = (1.0,)  # input scales relative to the frame
    max_input_pixels: int = 1280 * 720  # cap on the model input of any one pass
    model_path: str | None = None  # a user-given .onnx file for the face model
    threads: int = 0  # onnxruntime intra-op threads; 0 = its default
    # faces: YuNetPhoto (enlarged passes at 2/3 of the threshold, boxes fitted to annotated
    # faces) instead of YuNet; tuned on multi-pass photos
    photo_fit: bool = False
    text_max_side: int = 1280  # text and plates: the text detector's input long side
    # video frames between calls per engine (faces: the video options' period, adaptive)
    engine_periods: tuple[tuple[str, int], ...] = ()
    device: str = "cpu"  # where the models run (see engines.backends): cpu, or auto
    # False: this detector loads models of its own instead of the process's shared ones (only
    # to measure the one-model-per-stream shape against the shared, batched one)
    shared_models: bool = True


# Photos are redacted once and can afford several passes: upscaling 2x and 3x finds faces down
# to a few pixels (the faces evaluation set has many under 10 px).
IMAGE_PROFILE = DetectorConfig(scales=(1.0, 2.0, 3.0), max_input_pixels=3840 * 2160,
                               photo_fit=True)
# Video frames: one pass at up to 1280x720; the tracker carries boxes between detector calls.
# The threshold is lower than for photos: the detector sees only some frames, and a face that
# scores just under the threshold on those would stay uncovered on the frames between.
# The text detector behind text and plates costs ~10 face passes: it runs every 10th frame
# (the tracker and the look-ahead carry its boxes between), QR and barcodes every 5th.
VIDEO_PROFILE = DetectorConfig(threshold=0.15, scales=(1.0,), max_input_pixels=1280 * 720,
                               engine_periods=(("plates", 10), ("text", 10), ("codes", 5),
                                               ("custom", 3)))


@dataclass(frozen=True)
class Category:
    """A name users can ask for, and what finds it.

    ``engine`` names the detector family ("faces", "plates", "text", "codes"), ``None`` when no
    detector ships; ``requires`` lists the model files or packages it needs; ``maps_to`` is set
    when the category is served by another category's detector (text-bearing objects are covered
    as text regions) and says so in listings and manifests.
    """

    name: str
    description: str
    engine: str | None
    requires: tuple[ModelSpec | PackageSpec, ...] = ()
    aliases: tuple[str, ...] = field(default=())
    maps_to: str | None = None
    any_of: bool = False  # one of ``requires`` is enough (alternative models), else all
    # the boxes of some detectors already fit the object with a margin: no further growth
    # unless the user sets this category's mask_scale (the global --mask-scale is for faces)
    mask_scale: float | None = None
    # writing and codes are covered as rectangles: an ellipse would leave their corner
    # characters or modules visible
    shape: Shape | None = None

    def unavailable_reason(self) -> str | None:
        """None when this category's detector and its models are installed, else why not."""
        if self.engine is None:
            return "no detector for this category ships; a custom model can serve it"
        if self.engine == "custom":
            return None
        module = _ENGINE_MODULES[self.engine]
        if importlib.util.find_spec(module) is None:
            return f"its detector ({module}) is not part of this install"
        reasons = []
        for spec in self.requires:
            try:
                spec.resolve()
                if self.any_of:
                    return None
            except ModelNotFoundError as exc:
                reasons.append(str(exc))
        return "; ".join(reasons) or None


_ENGINE_MODULES = {"faces": "engines.faces", "plates": "engines.plates", "text": "engines.text",
                   "codes": "engines.codes"}

_TEXT_BEARING = {
    "documents": "documents and papers",
    "street_signs": "street and shop signs",
    "name_badges": "name badges",
    "screens": "text on screens and monitors",
    "id_cards": "identity cards",
    "credit_cards": "payment cards",
    "passports": "passports",
}

CATEGORIES: tuple[Category, ...] = (
    Category("faces", "human faces, frontal to profile, down to a few pixels", "faces",
             (YUNET, CENTERFACE), aliases=("heads", "face"), any_of=True),
    Category("license_plates", "licence plates: text regions that a second step tells from "
             "other text by shape, contrast and characters", "plates", (TEXT_DET, TEXT_REC),
             aliases=("licence_plates", "license_plate", "plates", "number_plates")),
    Category("text", "any text: signs, documents, badges, screens", "text", (TEXT_DET,)),
    Category("qr_codes", "QR codes (also Micro QR, rMQR)", "codes", (ZXING,),
             aliases=("qr_code", "qr"), mask_scale=1.0, shape=Shape.BOX),
    Category("barcodes", "1-D barcodes (EAN, UPC, Code 128 ...) and other 2-D codes",
             "codes", (ZXING,), aliases=("barcode",), mask_scale=1.0, shape=Shape.BOX),
    *(Category(name, f"{what}: covered as text regions (the text detector finds the writing; "
               f"there is no {name} detector)", "text", (TEXT_DET,), maps_to="text",
               shape=Shape.BOX)
      for name, what in _TEXT_BEARING.items()),
    Category("tattoos", "tattoos", None),
)


def available_categories(custom: Iterable[str] = ()) -> tuple[str, ...]:
    """Category names this install can serve; ``custom`` adds those user models serve."""
    extra = [c for c in dict.fromkeys(custom)]
    builtin = tuple(c.name for c in CATEGORIES
                    if c.name in extra or c.unavailable_reason() is None)
    return builtin + tuple(c for c in extra if c not in builtin)


def resolve_categories(names: Iterable[str] | None,
                       custom: Iterable[str] = ()) -> tuple[str, ...]:
    """Canonical category names for user input (aliases accepted, duplicates dropped).

    ``None`` or an empty list means every available category. ``custom`` names the
    categories user-supplied models serve (see :mod:`engines.custom`).
    """
    available = available_categories(custom)
    wanted = [n.strip().lower() for n in (names or []) if n.strip()]
    if not wanted:
        if not available:
            raise UnknownCategoryError("no category is available in this install", available)
        return available
    lookup = {c.name: c.name for c in CATEGORIES}
    lookup.update({a: c.name for c in CATEGORIES for a in c.aliases})
    lookup.update({c: c for c in available})
    out: list[str] = []
    for name in wanted:
        canon = lookup.get(name)
        listing = ", ".join(available) or "none"
        if canon is None:
            raise UnknownCategoryError(
                f"unknown category {name!r}; available: {listing}", available)
        if canon not in available:
            raise UnknownCategoryError(
                f"category {canon!r} is not available in this install "
                f"({category(canon).unavailable_reason()}); available: {listing}", available)
        if canon not in out:
            out.append(canon)
    return tuple(out)


@dataclass(frozen=True)
class CategorySettings:
    """Per-category overrides; ``None`` keeps the default of the profile or the global style.

    threshold:  detection score a box needs.
    scale:      multiplies the detector's input size (0.5 = half the pixels across: faster,
                misses objects half as large; 2 = finds smaller ones, four times the work).
    period:     video frames between detector calls for this category.
    method:     how this category's boxes are covered.
    mask_scale: how much this category's boxes are grown about their centre.
    shape:      ellipse or box.
    """

    threshold: float | None = None
    scale: float | None = None
    period: int | None = None
    method: Method | None = None
    mask_scale: float | None = None
    shape: Shape | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("threshold", "scale", "period", "method", "mask_scale",
                                       "shape")

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold {self.threshold} is outside (0, 1]")
        if self.scale is not None and not 0.1 <= self.scale <= 4.0:
            raise ValueError(f"scale {self.scale} is outside 0.1..4")
        if self.period is not None and not 1 <= self.period <= 300:
            raise ValueError(f"period {self.period} is outside 1..300 frames")
        if self.mask_scale is not None and not 0.5 <= self.mask_scale <= 4.0:
            raise ValueError(f"mask scale {self.mask_scale} is outside 0.5..4.0")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "") -> CategorySettings:
        """From a config table such as ``{"threshold": 0.5, "method": "pixelate"}``."""
        unknown = sorted(set(d) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"{where}unknown setting(s) {', '.join(unknown)}; "
                             f"known: {', '.join(cls.KEYS)}")
        try:
            return cls(
                threshold=None if d.get("threshold") is None else float(d["threshold"]),
                scale=None if d.get("scale") is None else float(d["scale"]),
                period=None if d.get("period") is None else _int(d["period"]),
                method=None if d.get("method") is None else Method.parse(str(d["method"])),
                mask_scale=None if d.get("mask_scale") is None else float(d["mask_scale"]),
                shape=None if d.get("shape") is None else _shape(str(d["shape"])))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}{exc}") from None


def _shape(value: str) -> Shape:
    try:
        return Shape(value.strip().lower())
    except ValueError:
        raise ValueError(f"unknown shape {value!r}; use ellipse or box") from None


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _int(v: Any) -> int:
    if isinstance(v, bool) or float(v) != int(float(v)):
        raise ValueError(f"{v!r} is not a whole number")
    return int(float(v))


class CompositeDetector:
    """Runs one detector per engine and concatenates their boxes.

    ``parts`` may carry a ``period`` attribute (video frames between calls, see
    :class:`pipeline.stages.RedactStage`); ``min_scores`` drops boxes of a category scoring
    under its threshold (for engines that take no threshold of their own).
    """

    def __init__(self, parts: Sequence[Detector],
                 min_scores: Mapping[str, float] | None = None, device: str = "cpu") -> None:
        self.parts = list(parts)
        self.categories = tuple(c for p in parts for c in p.categories)
        self.min_scores = dict(min_scores or {})
        self.device = device  # where its models run: its detections go to that device's service

    def detect(self, image: np.ndarray) -> Detections:
        return Detections.concat(self.filter(p.detect(image)) for p in self.parts)

    def filter(self, dets: Detections) -> Detections:
        if not self.min_scores or not len(dets):
            return dets
        need = np.array([self.min_scores.get(str(c), 0.0) for c in dets.category], np.float32)
        return dets.select(dets.score >= need)

    @property
    def models(self) -> list[ModelInfo]:
        return [m for p in self.parts for m in p.models]


class _Part:
    """A detector with the period it runs at on video; its boxes filtered by threshold and,
    with ``only``, to the categories asked for (a user model may find more)."""

    def __init__(self, inner: Detector, period: int | None,
                 min_scores: Mapping[str, float], only: Sequence[str] | None = None) -> None:
        self.inner = inner
        self.categories = tuple(only) if only is not None else inner.categories
        self.period = period
        self._only = None if only is None else np.array(list(only), dtype="<U16")
        self._filter = CompositeDetector([], min_scores).filter
        # given frames in GPU memory as they are (else a host copy, see pipeline.stages)
        self.takes_device_frames = bool(getattr(inner, "takes_device_frames", False))

    def detect(self, image: np.ndarray) -> Detections:
        found = self.inner.detect(image)
        if self._only is not None and len(found):
            found = found.select(np.isin(found.category, self._only))
        return self._filter(found)

    @property
    def models(self) -> list[ModelInfo]:
        return self.inner.models


class _FaceDetector:
    categories: tuple[str, ...] = ("faces",)

    def __init__(self, config: DetectorConfig) -> None:
        cls = {"yunet": YuNetPhoto if config.photo_fit else YuNet,
               "centerface": CenterFace}.get(config.face_model)
        if cls is None:
            raise ValueError(f"unknown face model {config.face_model!r}; use yunet or centerface")
        self._model = cls(threshold=config.threshold, scales=config.scales,
                          model_path=config.model_path, threads=config.threads,
                          max_input_pixels=config.max_input_pixels, device=config.device,
                          shared=config.shared_models)
        self.takes_device_frames = bool(getattr(self._model, "takes_device_frames", False))

    def detect(self, image: np.ndarray) -> Detections:
        return self._model.detect(image)

    @property
    def models(self) -> list[ModelInfo]:
        return [self._model.info]


class _TextAndPlates:
    """Text and licence plates from one pass of the text detector: the plate step reads only
    the lines that look like plates."""

    categories: tuple[str, ...] = ("license_plates", "text")

    def __init__(self, plates: Any, text: Any) -> None:
        self.plates, self.text = plates, text

    def detect(self, image: np.ndarray) -> Detections:
        lines = self.text.find_lines(image)
        text = Detections.from_boxes(lines.xyxy, lines.score, "text")
        return Detections.concat([self.plates.detect_lines(image, lines), text])

    @property
    def models(self) -> list[ModelInfo]:
        return [*self.text.models, self.plates.recognizer.info]


def category(name: str) -> Category:
    """The table entry of ``name``; a name only a user-supplied model serves gets one made up."""
    for c in CATEGORIES:
        if c.name == name:
            return c
    return Category(name, "served by a user-supplied model", "custom")


def build_detector(categories: Sequence[str], config: DetectorConfig,
                   per_category: Mapping[str, CategorySettings] | None = None,
                   custom_models: Sequence[Any] = ()) -> CompositeDetector:
    """A detector for the given canonical categories (see :func:`resolve_categories`).

    Each engine runs once, whatever the number of categories it serves; text-bearing categories
    come out as ``text`` boxes (see ``Category.maps_to``). ``per_category`` adjusts threshold,
    input scale and video period per category; ``custom_models`` are
    :class:`engines.custom.CustomModelConfig` entries whose categories they serve (taking
    precedence over a built-in engine for the same name).
    """
    per = dict(per_category or {})
    custom_served = {c for m in custom_models for c in m.classes.values()}
    builtin = [c for c in categories if c not in custom_served]
    engines = {category(c).engine for c in builtin}

    def opt(cats: Iterable[str], key: str) -> Any:
        values = [getattr(per[c], key) for c in cats if c in per
                  and getattr(per[c], key) is not None]
        if not values:
            return None
        return min(values) if key in ("threshold", "period") else max(values)

    def cats_of(engine: str) -> list[str]:
        return [c for c in builtin if category(c).engine == engine]

    def period(engine: str, cats: Iterable[str]) -> int | None:
        given = opt(cats, "period")
        return given if given is not None else dict(config.engine_periods).get(engine)

    parts: list[Detector] = []
    # models load once per process and device (engines.backends.load_model): detectors built
    # for many jobs and streams share them
    models: dict[str, Any] = {"threads": config.threads, "device": config.device,
                              "shared": config.shared_models}
    min_scores = {c: s.threshold for c, s in per.items() if s.threshold is not None}
    if "faces" in engines:
        fc = ["faces"]
        face_cfg = config
        if opt(fc, "threshold") is not None:
            face_cfg = replace(face_cfg, threshold=min(opt(fc, "threshold"), 0.99))
        if opt(fc, "scale") is not None:
            face_cfg = replace(face_cfg, scales=tuple(s * opt(fc, "scale")
                                                      for s in face_cfg.scales))
        parts.append(_Part(_FaceDetector(face_cfg), period("faces", fc), min_scores))
    text_cats = cats_of("text")
    plate_cats = cats_of("plates")
    text_det = plate_det = None
    if text_cats or plate_cats:
        from engines.text import TextDetector

        scale = opt(text_cats + plate_cats, "scale") or 1.0
        text_det = TextDetector(max_side=max(64, round(config.text_max_side * scale)),
                                box_threshold=min(_or(opt(text_cats, "threshold"), 0.5), 0.99),
                                **models)
    if plate_cats:
        from engines.plates import PlateDetector

        plate_det = PlateDetector(text_detector=text_det,
                                  threshold=_or(opt(plate_cats, "threshold"), 0.35), **models)
    if plate_det is not None and text_det is not None and text_cats:
        both = text_cats + plate_cats
        parts.append(_Part(_TextAndPlates(plate_det, text_det),
                           period("text", both), min_scores))
    elif plate_det is not None:
        parts.append(_Part(plate_det, period("plates", plate_cats), min_scores))
    elif text_det is not None:
        parts.append(_Part(text_det, period("text", text_cats), min_scores))
    code_cats = cats_of("codes")
    if code_cats:
        from engines.codes import CodeDetector

        scale = opt(code_cats, "scale") or 1.0
        parts.append(_Part(CodeDetector(tuple(code_cats), max_side=max(64, round(1920 * scale)),
                                        threads=config.threads),
                           period("codes", code_cats), min_scores))
    for m in custom_models:
        served = [c for c in categories if c in m.classes.values()]
        if not served:
            continue
        from engines.custom import CustomDetector

        parts.append(_Part(CustomDetector(m, **models),
                           period("custom", served), min_scores, only=served))
    return CompositeDetector(parts, device=config.device)
