"""Categories, the detectors behind them, and how a detector is built from settings.

A category is only offered when a detector that really finds it is installed; asking for any
other name is an :class:`UnknownCategoryError` that lists the available ones.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from engines.detections import Detections
from engines.errors import ModelNotFoundError, UnknownCategoryError
from engines.faces import CenterFace, ModelInfo, YuNet
from engines.models import CENTERFACE, TEXT_DET, YUNET, ZXING, ModelSpec, PackageSpec


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


# Photos are redacted once and can afford several passes: upscaling 2x and 3x finds faces down
# to a few pixels (the faces evaluation set has many under 10 px).
IMAGE_PROFILE = DetectorConfig(scales=(1.0, 2.0, 3.0), max_input_pixels=3840 * 2160)
# Video frames: one pass at up to 1280x720; the tracker carries boxes between detector calls.
# The threshold is lower than for photos: the detector sees only some frames, and a face that
# scores just under the threshold on those would stay uncovered on the frames between.
VIDEO_PROFILE = DetectorConfig(threshold=0.15, scales=(1.0,), max_input_pixels=1280 * 720)


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

    def unavailable_reason(self) -> str | None:
        """None when this category's detector and its models are installed, else why not."""
        if self.engine is None:
            return "no detector for this category ships; a custom model can serve it"
        module = _ENGINE_MODULES[self.engine]
        if importlib.util.find_spec(module) is None:
            return f"its detector ({module}) is not part of this install"
        reasons = []
        for spec in self.requires:
            try:
                spec.resolve()
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
             (YUNET, CENTERFACE), aliases=("heads", "face")),
    Category("license_plates", "licence plates: text regions that a second step tells from "
             "other text by shape, contrast and characters", "plates", (TEXT_DET,),
             aliases=("licence_plates", "license_plate", "plates", "number_plates")),
    Category("text", "any text: signs, documents, badges, screens", "text", (TEXT_DET,)),
    Category("qr_codes", "QR codes (also Micro QR, rMQR)", "codes", (ZXING,),
             aliases=("qr_code", "qr")),
    Category("barcodes", "1-D barcodes (EAN, UPC, Code 128 ...) and other 2-D codes",
             "codes", (ZXING,), aliases=("barcode",)),
    *(Category(name, f"{what}: covered as text regions (the text detector finds the writing; "
               f"there is no {name} detector)", "text", (TEXT_DET,), maps_to="text")
      for name, what in _TEXT_BEARING.items()),
    Category("tattoos", "tattoos", None),
)


def available_categories() -> tuple[str, ...]:
    return tuple(c.name for c in CATEGORIES if c.unavailable_reason() is None)


def resolve_categories(names: Iterable[str] | None) -> tuple[str, ...]:
    """Canonical category names for user input (aliases accepted, duplicates dropped).

    ``None`` or an empty list means every available category.
    """
    available = available_categories()
    wanted = [n.strip().lower() for n in (names or []) if n.strip()]
    if not wanted:
        if not available:
            raise UnknownCategoryError("no category is available in this install", available)
        return available
    lookup = {c.name: c for c in CATEGORIES}
    lookup.update({a: c for c in CATEGORIES for a in c.aliases})
    out: list[str] = []
    for name in wanted:
        cat = lookup.get(name)
        listing = ", ".join(available) or "none"
        if cat is None:
            raise UnknownCategoryError(
                f"unknown category {name!r}; available: {listing}", available)
        if cat.name not in available:
            raise UnknownCategoryError(
                f"category {cat.name!r} is not available in this install "
                f"({cat.unavailable_reason()}); available: {listing}", available)
        if cat.name not in out:
            out.append(cat.name)
    return tuple(out)


class CompositeDetector:
    """Runs one detector per category group and concatenates their boxes."""

    def __init__(self, parts: Sequence[Detector]) -> None:
        self.parts = list(parts)
        self.categories = tuple(c for p in parts for c in p.categories)

    def detect(self, image: np.ndarray) -> Detections:
        return Detections.concat(p.detect(image) for p in self.parts)

    @property
    def models(self) -> list[ModelInfo]:
        return [m for p in self.parts for m in p.models]


class _FaceDetector:
    categories: tuple[str, ...] = ("faces",)

    def __init__(self, config: DetectorConfig) -> None:
        cls = {"yunet": YuNet, "centerface": CenterFace}.get(config.face_model)
        if cls is None:
            raise ValueError(f"unknown face model {config.face_model!r}; use yunet or centerface")
        self._model = cls(threshold=config.threshold, scales=config.scales,
                          model_path=config.model_path, threads=config.threads,
                          max_input_pixels=config.max_input_pixels)

    def detect(self, image: np.ndarray) -> Detections:
        return self._model.detect(image)

    @property
    def models(self) -> list[ModelInfo]:
        return [self._model.info]


def category(name: str) -> Category:
    return next(c for c in CATEGORIES if c.name == name)


def build_detector(categories: Sequence[str], config: DetectorConfig) -> CompositeDetector:
    """A detector for the given canonical categories (see :func:`resolve_categories`).

    Each engine runs once, whatever the number of categories it serves; text-bearing categories
    come out as ``text`` boxes (see ``Category.maps_to``).
    """
    engines = {category(c).engine for c in categories}
    parts: list[Detector] = []
    if "faces" in engines:
        parts.append(_FaceDetector(config))
    if "plates" in engines:
        from engines.plates import PlateDetector

        parts.append(PlateDetector(threads=config.threads))
    if "text" in engines:
        from engines.text import TextDetector

        parts.append(TextDetector(threads=config.threads))
    if "codes" in engines:
        from engines.codes import CodeDetector

        parts.append(CodeDetector([c for c in categories if category(c).engine == "codes"]))
    return CompositeDetector(parts)
