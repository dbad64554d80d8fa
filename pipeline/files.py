"""Redact files of any supported kind with one set of settings: the engine behind the CLI
(and the API's workers). The settings are :class:`pipeline.settings.RedactSettings`; models are
the process's shared ones (:func:`engines.backends.load_model`)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

import av

from engines.errors import MediaError
from engines.gpu import describe
from engines.registry import CategorySettings, CompositeDetector, category
from pipeline.image import probe_image_format, redact_image
from pipeline.settings import RedactSettings
from pipeline.video import ProgressFn, is_video_container, redact_video

__all__ = ["CategorySettings", "RedactSettings", "Redactor", "manifest", "probe_kind"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
VIDEO_EXTENSIONS = {".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".ts"}
MANIFEST_VERSION = 1


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
                self._detectors[kind] = self.settings.detector(kind)
            return self._detectors[kind]

    def redact(self, src: Path, dst: Path, progress: ProgressFn | None = None) -> dict[str, Any]:
        """Redact ``src`` into ``dst`` and return its audit manifest entry."""
        kind = probe_kind(src)
        det = self.detector(kind)
        device = self.settings.run_device()
        entry: dict[str, Any] = {"input": src.name, "output": dst.name, "kind": kind,
                                 "models": [dataclasses.asdict(m) for m in det.models]}
        if kind == "image":
            r = redact_image(src, dst, det, self.settings.style, self.settings.keep_metadata,
                             self.settings.zones)
            # photos are decoded and redacted on the CPU (Pillow in bands); their detector
            # runs on the device
            runtime = describe(device)
            runtime.update(decode="cpu (Pillow)", kernels="cpu (OpenCV)", encoder="Pillow")
            entry.update(width=r.width, height=r.height, format=r.format.lower(),
                         runtime=runtime,
                         counts=r.detections.counts(), seconds=round(r.wall_s, 3),
                         boxes=r.detections.to_records())
            if progress:
                progress(1, 1)
        else:
            v = redact_video(src, dst, det, self.settings.style,
                             dataclasses.replace(self.settings.video,
                                                 keep_metadata=self.settings.keep_metadata),
                             progress=progress, zones=self.settings.zones, device=device)
            entry.update(frames=v.frames, duration_s=round(v.duration_s, 3),
                         counts=v.counts, distinct_objects=v.distinct_tracks,
                         detector_calls=v.detector_calls,
                         detector_calls_per_frame=round(v.detector_calls_per_frame, 3),
                         detector_calls_by=v.detector_calls_by,
                         audio_packets=v.audio_packets, seconds=round(v.wall_s, 3),
                         fps=round(v.fps, 2), runtime=v.runtime,
                         frames_detail=v.frames_detail)
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
