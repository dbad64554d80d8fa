"""Redact one photo: JPEG, PNG or WebP in, the same format out.

EXIF orientation is applied to the pixels, then EXIF, XMP and text chunks are dropped unless
``keep_metadata`` (the colour profile is kept: it leaks nothing and keeps colours right).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from engines.detections import Detections
from engines.errors import DetectorError, MediaError
from engines.redact import Style, redact_detections
from engines.registry import Detector

IMAGE_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# Pillow names phone JPEGs that carry extra pictures (gain maps, depth) MPO; they are JPEG files
# and come out as a plain JPEG of the main picture.
_FORMAT_ALIASES = {"MPO": "JPEG"}
_EXTENSION_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}
MAX_IMAGE_PIXELS = 100_000_000  # larger images are refused before their pixels are decoded

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


@dataclass
class ImageReport:
    detections: Detections
    width: int
    height: int
    format: str
    wall_s: float


def probe_image_format(path: Path) -> str | None:
    """The PIL format name when ``path`` holds a supported image (judged by content)."""
    try:
        with Image.open(path) as im:
            fmt = _FORMAT_ALIASES.get(im.format or "", im.format)
            return fmt if fmt in IMAGE_FORMATS else None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None


def redact_image(src: Path, dst: Path, detector: Detector, style: Style,
                 keep_metadata: bool = False) -> ImageReport:
    t0 = time.perf_counter()
    try:
        with Image.open(src) as opened:
            fmt = _FORMAT_ALIASES.get(opened.format or "", opened.format)
            if fmt not in IMAGE_FORMATS:
                raise MediaError(f"{src.name}: unsupported image format {fmt}")
            w, h = opened.size
            if w * h > MAX_IMAGE_PIXELS:
                raise MediaError(f"{src.name}: {w}x{h} is larger than {MAX_IMAGE_PIXELS} pixels")
            exif = opened.getexif() if keep_metadata else None
            icc = opened.info.get("icc_profile")
            im = ImageOps.exif_transpose(opened)
            im.load()
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise MediaError(f"cannot read {src.name} as an image: {exc}") from exc
    alpha = im.getchannel("A") if "A" in im.getbands() else None
    rgb = np.asarray(im.convert("RGB"))
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    try:
        dets = detector.detect(bgr)
    except Exception as exc:
        raise DetectorError(f"detector failed on {src.name}: {exc}") from exc
    redact_detections(bgr, dets, style)
    out = Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
    fmt = _EXTENSION_FORMATS.get(dst.suffix.lower(), fmt)  # an output named .png is a PNG
    if alpha is not None and fmt != "JPEG":
        out.putalpha(alpha)
    save: dict[str, Any] = {}
    if icc:
        save["icc_profile"] = icc
    if exif is not None:
        exif[0x0112] = 1  # orientation already applied to the pixels
        save["exif"] = exif.tobytes()
    if fmt == "JPEG":
        save.update(quality=95, subsampling=0)
    elif fmt == "WEBP":
        save.update(quality=95, method=4)
    buf = io.BytesIO()
    out.save(buf, format=fmt, **save)
    write_atomic(dst, buf.getvalue())
    return ImageReport(dets, out.width, out.height, fmt or "", time.perf_counter() - t0)


def write_atomic(dst: Path, data: bytes) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
