"""Redact one photo: JPEG, PNG or WebP in, the same format out.

EXIF orientation is applied to the pixels, then EXIF, XMP and text chunks are dropped unless
``keep_metadata`` (the colour profile is kept: it leaks nothing and keeps colours right).

Memory: a photo is held whole in one form at a time, apart from the hand-overs. The decoded
picture is copied to the BGR array the detector needs a band of rows at a time (converted,
turned upright and reordered on the way), then dropped; the redacted array is copied the same
way into the picture that is encoded, and dropped before encoding, which streams into the
output file. A 21-megapixel JPEG peaks at about 7 bytes a pixel outside the detector (3 when
the detector runs) where whole-image conversions took about 17.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np
from PIL import ExifTags, Image

from engines.detections import Detections
from engines.errors import DetectorError, MediaError
from engines.redact import Style, cover_zone, redact_detections
from engines.registry import Detector

IMAGE_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# Pillow names phone JPEGs that carry extra pictures (gain maps, depth) MPO; they are JPEG files
# and come out as a plain JPEG of the main picture.
_FORMAT_ALIASES = {"MPO": "JPEG"}
_EXTENSION_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}
MAX_IMAGE_PIXELS = 100_000_000  # larger images are refused before their pixels are decoded
STRIP_BYTES = 4 * 1024 * 1024  # pixels are handed between Pillow and numpy in bands this big

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


def _strip_rows(width: int) -> int:
    return max(1, STRIP_BYTES // (4 * max(width, 1)))


def _upright_view(upright: np.ndarray, orientation: int) -> np.ndarray:
    """A view of ``upright`` (the picture as shown) indexed like the stored picture, for
    EXIF ``orientation``: writing stored row y, column x to ``view[y, x]`` turns it upright
    (the transpositions of Pillow's ``ImageOps.exif_transpose``)."""
    return {2: upright[:, ::-1], 3: upright[::-1, ::-1], 4: upright[::-1],
            5: upright.transpose(1, 0, 2), 6: upright[:, ::-1].transpose(1, 0, 2),
            7: upright[::-1, ::-1].transpose(1, 0, 2), 8: upright[::-1].transpose(1, 0, 2),
            }.get(orientation, upright)


def _to_bgr(im: Image.Image, orientation: int) -> np.ndarray:
    """The upright BGR array of a loaded picture, filled a band of rows at a time, so that
    no whole-size intermediate (RGB conversion, transposed copy, reversed channels) exists."""
    w, h = im.size
    turned = orientation in (5, 6, 7, 8)
    bgr = np.empty((w, h, 3) if turned else (h, w, 3), np.uint8)
    stored = _upright_view(bgr, orientation)
    step = _strip_rows(w)
    for y in range(0, h, step):
        band = im.crop((0, y, w, min(h, y + step)))
        if band.mode != "RGB":
            band = band.convert("RGB")
        rgb = np.asarray(band)
        if orientation == 1:
            cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR, dst=bgr[y:y + rgb.shape[0]])
        else:
            stored[y:y + rgb.shape[0]] = rgb[:, :, ::-1]
    return bgr


def _to_picture(bgr: np.ndarray) -> Image.Image:
    """An RGB Pillow picture of ``bgr``, copied a band of rows at a time."""
    h, w = bgr.shape[:2]
    out = Image.new("RGB", (w, h))
    step = _strip_rows(w)
    for y in range(0, h, step):
        band = cv2.cvtColor(bgr[y:y + step], cv2.COLOR_BGR2RGB)
        out.paste(Image.fromarray(band, "RGB"), (0, y))
    return out


@dataclass
class _Source:
    """What an output keeps of its source besides the pixels."""

    format: str
    exif: Image.Exif
    icc: bytes | None
    alpha: Image.Image | None


def _decode(src: Path, out_fmt: str | None) -> tuple[np.ndarray, _Source]:
    """The upright BGR pixels of ``src`` and what its output keeps; the decoded Pillow
    picture is closed (its memory freed) before this returns."""
    try:
        with Image.open(src) as im:
            fmt = _FORMAT_ALIASES.get(im.format or "", im.format)
            if fmt not in IMAGE_FORMATS:
                raise MediaError(f"{src.name}: unsupported image format {fmt}")
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise MediaError(f"{src.name}: {w}x{h} is larger than {MAX_IMAGE_PIXELS} pixels")
            try:
                im.load()
                exif = im.getexif()
                orientation = exif.get(ExifTags.Base.Orientation, 1)
                if orientation not in (2, 3, 4, 5, 6, 7, 8):
                    orientation = 1
                alpha = None
                if "A" in im.getbands() and (out_fmt or fmt) != "JPEG":
                    alpha = _upright_alpha(im, orientation)
                bgr = _to_bgr(im, orientation)
            finally:
                im.close()  # frees the decoded picture now, not when ``im`` is collected
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise MediaError(f"cannot read {src.name} as an image: {exc}") from exc
    return bgr, _Source(fmt or "", exif, im.info.get("icc_profile"), alpha)


def redact_image(src: Path, dst: Path, detector: Detector, style: Style,
                 keep_metadata: bool = False, zones: Sequence[Sequence[Sequence[float]]] = ()
                 ) -> ImageReport:
    t0 = time.perf_counter()
    bgr, source = _decode(src, _EXTENSION_FORMATS.get(dst.suffix.lower()))
    height, width = bgr.shape[:2]
    try:
        # on this (the job's) thread, not the detection service's: a large photo's passes take
        # hundreds of MiB, which stay in the heap of the thread that ran them until trimmed
        # (through the service, 20 uploads of 24 MB peaked at 935-968 MiB instead of 850-861);
        # the models are the process's shared ones either way
        dets = detector.detect(bgr)
    except Exception as exc:
        raise DetectorError(f"detector failed on {src.name}: {exc}") from exc
    redact_detections(bgr, dets, style)
    for zone in zones:
        cover_zone(bgr, zone, style)
    out = _to_picture(bgr)
    del bgr  # the picture to encode holds the pixels from here on
    if source.alpha is not None:
        out.putalpha(source.alpha)
        source.alpha = None
    fmt = _EXTENSION_FORMATS.get(dst.suffix.lower(), source.format)  # .png out is a PNG
    save: dict[str, Any] = {}
    if source.icc:
        save["icc_profile"] = source.icc
    if keep_metadata:
        source.exif[ExifTags.Base.Orientation] = 1  # orientation already applied
        save["exif"] = source.exif.tobytes()
    if fmt == "JPEG":
        save.update(quality=95, subsampling=0)
    elif fmt == "WEBP":
        save.update(quality=95, method=4)
    write_atomic(dst, lambda f: out.save(f, format=fmt, **save))  # streamed, no bytes copy
    return ImageReport(dets, width, height, fmt, time.perf_counter() - t0)


def _upright_alpha(im: Image.Image, orientation: int) -> Image.Image:
    """The alpha channel of ``im``, turned upright like its pixels."""
    alpha = np.empty((im.width, im.height, 1) if orientation in (5, 6, 7, 8)
                     else (im.height, im.width, 1), np.uint8)
    stored = _upright_view(alpha, orientation)
    step = _strip_rows(im.width)
    for y in range(0, im.height, step):
        band = np.asarray(im.crop((0, y, im.width, min(im.height, y + step))).getchannel("A"))
        stored[y:y + band.shape[0], :, 0] = band
    return Image.fromarray(alpha[:, :, 0], "L")


def write_atomic(dst: Path, data: bytes | Callable[[IO[bytes]], object]) -> None:
    """Write ``data`` (bytes, or a function writing to the open file) to ``dst`` through a
    temporary name, flushed to disk before the rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial")
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, bytes | bytearray | memoryview):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
