"""Redact files of any supported kind with one set of settings: the engine behind the CLI
(and the API's workers). Models are loaded once per :class:`Redactor` and reused."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av

from engines.errors import MediaError
from engines.redact import Style
from engines.registry import (
    IMAGE_PROFILE,
    VIDEO_PROFILE,
    CategorySettings,
    CompositeDetector,
    DetectorConfig,
    build_detector,
    category,
    resolve_categories,
)
from pipeline.image import probe_image_format, redact_image
from pipeline.video import ProgressFn, VideoOptions, is_video_container, redact_video

if TYPE_CHECKING:
    from engines.custom import CustomModelConfig

__all__ = ["CategorySettings", "RedactSettings", "Redactor", "manifest", "probe_kind"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
VIDEO_EXTENSIONS = {".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".ts"}
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class RedactSettings:
    categories: tuple[str, ...] = ("faces",)
    style: Style = field(default_factory=Style)
    per_category: dict[str, CategorySettings] = field(default_factory=dict)
    custom_models: tuple[CustomModelConfig, ...] = ()
    image_detector: DetectorConfig = IMAGE_PROFILE
    video_detector: DetectorConfig = VIDEO_PROFILE
    video: VideoOptions = field(default_factory=VideoOptions)
    keep_metadata: bool = False

    def __post_init__(self) -> None:
        served = [c for m in self.custom_models for c in m.classes.values()]
        object.__setattr__(self, "categories", resolve_categories(self.categories, served))
        per: dict[str, CategorySettings] = {}
        for name, cs in self.per_category.items():
            canon = resolve_categories([name], served)[0]
            per[canon] = cs
        object.__setattr__(self, "per_category", per)
        for name in self.categories:
            # detectors whose boxes already fit (codes) or whose objects are writing come
            # with their own mask scale and shape unless the user set them for the category
            cat, cs = category(name), per.get(name, CategorySettings())
            fitted = {k: getattr(cat, k) for k in ("mask_scale", "shape")
                      if getattr(cat, k) is not None and getattr(cs, k) is None}
            if fitted:
                per[name] = dataclasses.replace(cs, **fitted)
        overrides: dict[str, Style] = {}
        for name, cs in per.items():
            if cs.method is None and cs.mask_scale is None and cs.shape is None:
                continue
            own = dataclasses.replace(
                self.style, method=cs.method or self.style.method,
                mask_scale=cs.mask_scale or self.style.mask_scale,
                shape=cs.shape or self.style.shape, overrides={})
            overrides[name] = own
            mapped = category(name).maps_to  # text-bearing categories come out as text boxes
            if mapped and mapped not in per:
                overrides.setdefault(mapped, own)
        object.__setattr__(self, "style", dataclasses.replace(self.style, overrides=overrides))

    def detector_config(self, kind: str) -> DetectorConfig:
        return self.image_detector if kind == "image" else self.video_detector

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready settings, as recorded in the audit manifest."""

        def plain(v: Any) -> Any:
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, Mapping):
                return {str(k): plain(x) for k, x in v.items()}
            if isinstance(v, list | tuple):
                return [plain(x) for x in v]
            return v.value if isinstance(v, Enum) else v

        d: dict[str, Any] = plain(self)
        d["style"].pop("overrides", None)
        d["per_category"] = {k: {a: b for a, b in v.items() if b is not None}
                             for k, v in d["per_category"].items()}
        return d


def probe_kind(path: Path) -> str:
    """``"image"`` or ``"video"``, judged by the content, not the name; else MediaError."""
    if probe_image_format(path):
        return "image"
    try:
        with av.open(str(path)) as c:
            if c.streams.video and is_video_container(c.format.name):
                return "video"
    except (av.FFmpegError, OSError, ValueError):
        pass
    raise MediaError(f"{path.name}: not a supported image (JPEG, PNG, WebP) or video")


class Redactor:
    """Redacts files with fixed settings; safe to share between threads."""

    def __init__(self, settings: RedactSettings) -> None:
        self.settings = settings
        self._detectors: dict[str, CompositeDetector] = {}
        self._lock = threading.Lock()

    def detector(self, kind: str) -> CompositeDetector:
        with self._lock:
            if kind not in self._detectors:
                cfg = (self.settings.image_detector if kind == "image"
                       else self.settings.video_detector)
                self._detectors[kind] = build_detector(
                    self.settings.categories, cfg, self.settings.per_category,
                    self.settings.custom_models)
            return self._detectors[kind]

    def redact(self, src: Path, dst: Path, progress: ProgressFn | None = None) -> dict[str, Any]:
        """Redact ``src`` into ``dst`` and return its audit manifest entry."""
        kind = probe_kind(src)
        det = self.detector(kind)
        entry: dict[str, Any] = {"input": src.name, "output": dst.name, "kind": kind,
                                 "models": [dataclasses.asdict(m) for m in det.models]}
        if kind == "image":
            r = redact_image(src, dst, det, self.settings.style, self.settings.keep_metadata)
            entry.update(width=r.width, height=r.height, format=r.format.lower(),
                         counts=r.detections.counts(), seconds=round(r.wall_s, 3),
                         boxes=r.detections.to_records())
            if progress:
                progress(1, 1)
        else:
            v = redact_video(src, dst, det, self.settings.style,
                             dataclasses.replace(self.settings.video,
                                                 keep_metadata=self.settings.keep_metadata),
                             progress=progress)
            entry.update(frames=v.frames, duration_s=round(v.duration_s, 3),
                         counts=v.counts, distinct_objects=v.distinct_tracks,
                         detector_calls=v.detector_calls,
                         detector_calls_per_frame=round(v.detector_calls_per_frame, 3),
                         detector_calls_by=v.detector_calls_by,
                         audio_packets=v.audio_packets, seconds=round(v.wall_s, 3),
                         fps=round(v.fps, 2), frames_detail=v.frames_detail)
        return entry


def manifest(settings: RedactSettings, files: list[dict[str, Any]]) -> dict[str, Any]:
    """The audit manifest: settings used, then one entry per file."""
    counts: dict[str, int] = {}
    for f in files:
        for k, v in f.get("counts", {}).items():
            counts[k] = counts.get(k, 0) + v
    mapped = {c: category(c).maps_to for c in settings.categories if category(c).maps_to}
    return {"manifest_version": MANIFEST_VERSION, "settings": settings.to_dict(),
            "category_mapping": mapped, "counts": counts, "files": files}
