"""Photos: JPEG, PNG and WebP in, the same format out, the face covered, metadata dropped."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin

from engines.detections import Detections
from engines.errors import DetectorError, MediaError
from engines.faces import ModelInfo
from engines.redact import Method, Style
from engines.registry import CompositeDetector
from pipeline.files import probe_kind
from pipeline.image import redact_image
from tests.conftest import (
    ASTRONAUT_FACE,
    ASTRONAUT_FACE_CORE,
    astronaut_bgr_image,
    detail,
    fill_fraction,
    iou,
    region,
    write_video,
)

FORMATS = [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp")]
ORIENTATION, MAKE, GPS_IFD = 0x0112, 0x010F, 0x8825
MAGENTA = (255, 0, 255)


def astronaut_rgb(width: int = 400) -> np.ndarray:
    """The astronaut, cropped to ``width`` x 512 so that a rotation changes the size."""
    return np.ascontiguousarray(astronaut_bgr_image()[:, :width, ::-1])


def exif_with_gps(orientation: int = 1) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    exif[MAKE] = "SpyCam"
    gps = exif.get_ifd(GPS_IFD)
    gps.update({1: "N", 2: (48.0, 51.0, 30.0), 3: "E", 4: (2.0, 17.0, 40.0)})
    return exif


def save(img: Image.Image, path: Path, fmt: str, **kw: object) -> Path:
    extra = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    img.save(path, format=fmt, **extra, **kw)
    return path


def load_bgr(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB"))[:, :, ::-1])


@pytest.mark.parametrize(("fmt", "ext"), FORMATS)
def test_same_format_out_and_face_covered(tmp_path: Path, fmt: str, ext: str,
                                          image_detector: CompositeDetector) -> None:
    src = save(Image.fromarray(astronaut_rgb()), tmp_path / f"in{ext}", fmt)
    dst = tmp_path / f"out{ext}"
    report = redact_image(src, dst, image_detector, Style())
    with Image.open(dst) as out:
        assert out.format == fmt
        assert out.size == (400, 512)
    assert report.format == fmt and (report.width, report.height) == (400, 512)
    assert max(iou(b, ASTRONAUT_FACE) for b in report.detections.xyxy.tolist()) > 0.6
    before, after = load_bgr(src), load_bgr(dst)
    core0, core1 = region(before, ASTRONAUT_FACE_CORE), region(after, ASTRONAUT_FACE_CORE)
    assert detail(core1) < 0.3 * detail(core0)
    assert np.abs(core0.astype(int) - core1).mean() > 8
    # the top-left background, far from every box, is as it was (up to re-encoding)
    assert np.abs(before[:50, :120].astype(int) - after[:50, :120]).mean() < 2


def test_png_is_untouched_outside_the_covered_boxes(tmp_path: Path,
                                                    image_detector: CompositeDetector) -> None:
    src = save(Image.fromarray(astronaut_rgb()), tmp_path / "in.png", "PNG")
    dst = tmp_path / "out.png"
    style = Style(Method.FILL, fill_bgr=MAGENTA)
    report = redact_image(src, dst, image_detector, style)
    before, after = load_bgr(src), load_bgr(dst)
    changed = (before != after).any(-1)
    inside = np.zeros(changed.shape, bool)
    from engines.redact import mask_rects

    for x1, y1, x2, y2 in mask_rects(report.detections.xyxy, 400, 512, style.mask_scale):
        inside[y1:y2, x1:x2] = True
    assert changed.any() and not (changed & ~inside).any()
    assert fill_fraction(region(after, ASTRONAUT_FACE_CORE), MAGENTA, tol=0) == 1.0


@pytest.mark.parametrize(("fmt", "ext"), FORMATS)
@pytest.mark.parametrize("keep", [False, True])
def test_exif_orientation_applied_and_exif_dropped(tmp_path: Path, fmt: str, ext: str,
                                                   keep: bool,
                                                   image_detector: CompositeDetector) -> None:
    # stored turned a quarter to the left, with orientation 6 ("rotate 90 CW to display")
    upright = astronaut_rgb()
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))
    src = save(stored, tmp_path / f"in{ext}", fmt, exif=exif_with_gps(6).tobytes())
    with Image.open(src) as im:
        assert im.size == (512, 400)
        assert im.getexif()[ORIENTATION] == 6 and im.getexif().get_ifd(GPS_IFD)
    dst = tmp_path / f"out{ext}"
    report = redact_image(src, dst, image_detector, Style(Method.FILL, fill_bgr=MAGENTA),
                          keep_metadata=keep)
    with Image.open(dst) as out:
        assert out.format == fmt
        assert out.size == (400, 512)  # upright: the rotation went into the pixels
        exif = out.getexif()
        if keep:
            assert exif.get(ORIENTATION) == 1  # must not be applied a second time
            assert exif.get(MAKE) == "SpyCam"
            assert exif.get_ifd(GPS_IFD).get(2) == (48.0, 51.0, 30.0)
        else:
            assert len(exif) == 0
            assert "exif" not in out.info
    # the face was found and covered where it stands upright
    assert max(iou(b, ASTRONAUT_FACE) for b in report.detections.xyxy.tolist()) > 0.6
    assert fill_fraction(region(load_bgr(dst), ASTRONAUT_FACE_CORE), MAGENTA) > 0.95
    assert b"SpyCam" not in dst.read_bytes() or keep


def test_png_text_chunks_and_jpeg_xmp_dropped(tmp_path: Path,
                                              image_detector: CompositeDetector) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Location", "48.8584 N, 2.2945 E")
    info.add_text("Author", "Jane Roe")
    src = tmp_path / "in.png"
    Image.fromarray(astronaut_rgb()).save(src, pnginfo=info)
    redact_image(src, tmp_path / "out.png", image_detector, Style())
    data = (tmp_path / "out.png").read_bytes()
    assert b"Jane Roe" not in data and b"48.8584" not in data

    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/'
           b'02/22-rdf-syntax-ns#"><rdf:Description exif:GPSLatitude="48,51.5N" '
           b'xmlns:exif="http://ns.adobe.com/exif/1.0/"/></rdf:RDF></x:xmpmeta>')
    jpg = save(Image.fromarray(astronaut_rgb()), tmp_path / "in.jpg", "JPEG", xmp=xmp)
    assert b"48,51.5N" in jpg.read_bytes()
    redact_image(jpg, tmp_path / "out.jpg", image_detector, Style())
    assert b"48,51.5N" not in (tmp_path / "out.jpg").read_bytes()


def test_colour_profile_and_alpha_are_kept(tmp_path: Path,
                                           image_detector: CompositeDetector) -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rgba = np.dstack([astronaut_rgb(), np.full((512, 400), 255, np.uint8)])
    rgba[:40, :40, 3] = 0
    src = tmp_path / "in.png"
    Image.fromarray(rgba, "RGBA").save(src, icc_profile=icc)
    redact_image(src, tmp_path / "out.png", image_detector, Style())
    with Image.open(tmp_path / "out.png") as out:
        assert out.mode == "RGBA"
        assert out.info.get("icc_profile") == icc
        assert np.array_equal(np.asarray(out)[:, :, 3], rgba[:, :, 3])


def test_unreadable_images_raise_media_error_and_write_nothing(
        tmp_path: Path, image_detector: CompositeDetector) -> None:
    buf = io.BytesIO()
    Image.fromarray(astronaut_rgb()).save(buf, format="JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    gif = tmp_path / "anim.gif"
    Image.fromarray(astronaut_rgb()).save(gif, format="GIF")
    out = tmp_path / "out"
    for src in (cut, gif):
        with pytest.raises(MediaError):
            redact_image(src, out / src.name, image_detector, Style())
    assert not out.exists()


class BrokenDetector:
    categories: tuple[str, ...] = ("faces",)

    def detect(self, image: np.ndarray) -> Detections:
        raise RuntimeError("out of memory")

    @property
    def models(self) -> list[ModelInfo]:
        return []


def test_detector_failure_writes_nothing(tmp_path: Path) -> None:
    src = save(Image.fromarray(astronaut_rgb()), tmp_path / "in.png", "PNG")
    with pytest.raises(DetectorError, match="out of memory"):
        redact_image(src, tmp_path / "out" / "out.png", BrokenDetector(), Style())
    assert not (tmp_path / "out").exists()


def test_kind_is_judged_by_content(tmp_path: Path) -> None:
    png_named_jpg = save(Image.fromarray(astronaut_rgb()), tmp_path / "photo.jpg", "PNG")
    assert probe_kind(png_named_jpg) == "image"
    video_named_png = tmp_path / "clip.png"
    video_named_png.write_bytes(write_video(tmp_path / "clip.mp4",
                                            [astronaut_bgr_image()[:96, :128]] * 3).read_bytes())
    assert probe_kind(video_named_png) == "video"
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00not a video" * 100)
    with pytest.raises(MediaError, match=r"junk\.mp4: not a supported"):
        probe_kind(junk)


@pytest.mark.parametrize("name", ["notes.png", "broken.jpg", "broken.webp"])
def test_junk_with_an_image_name_is_not_a_video(tmp_path: Path, name: str) -> None:
    junk = tmp_path / name
    junk.write_bytes(np.random.default_rng(3).integers(0, 256, 5000, np.uint8).tobytes())
    with pytest.raises(MediaError, match="not a supported"):
        probe_kind(junk)


def test_multi_picture_jpeg_from_a_phone_is_redacted(tmp_path: Path,
                                                     image_detector: CompositeDetector) -> None:
    main = Image.fromarray(astronaut_rgb())
    src = tmp_path / "phone.jpg"
    main.save(src, format="MPO", save_all=True, append_images=[main.resize((100, 128))],
              quality=95)
    assert src.read_bytes()[:2] == b"\xff\xd8"  # a JPEG
    assert probe_kind(src) == "image"
    dst = tmp_path / "out.jpg"
    redact_image(src, dst, image_detector, Style(Method.FILL, fill_bgr=MAGENTA))
    assert fill_fraction(region(load_bgr(dst), ASTRONAUT_FACE_CORE), MAGENTA) > 0.95
    assert os.path.getsize(dst) > 0


def test_output_named_with_another_image_extension_takes_that_format(
        tmp_path: Path, image_detector: CompositeDetector) -> None:
    src = tmp_path / "in.jpg"
    Image.fromarray(astronaut_rgb()).save(src, format="JPEG")
    dst = tmp_path / "out.png"
    redact_image(src, dst, image_detector, Style())
    with Image.open(dst) as im:
        assert im.format == "PNG"
