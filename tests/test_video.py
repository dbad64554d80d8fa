"""Video end to end: generated clips in, redacted clips out, checked frame by frame."""

from __future__ import annotations

import os
import threading
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from engines.detections import Detections
from engines.errors import DetectorError, MediaError, UnredactedFrameError
from engines.faces import ModelInfo
from engines.redact import Method, Style
from engines.registry import CompositeDetector
from gateway.cli import main
from pipeline.frame import Frame
from pipeline.stages import Redact
from pipeline.video import VideoOptions, redact_video
from tests.conftest import (
    background,
    core_of,
    detail,
    fill_fraction,
    moving_face_clip,
    read_video,
    region,
    write_video,
)

MAGENTA = (255, 0, 255)
FILL = Style(Method.FILL, fill_bgr=MAGENTA)


def assert_faces_filled(frames: list[np.ndarray], faces: list[tuple[float, float, float, float]],
                        min_share: float = 0.9) -> None:
    assert len(frames) == len(faces)
    shares = [fill_fraction(region(f, core_of(b)), MAGENTA) for f, b in zip(frames, faces,
                                                                          strict=True)]
    bad = [(i, round(s, 2)) for i, s in enumerate(shares) if s < min_share]
    assert not bad, f"face not covered on (frame, share): {bad}"


@pytest.mark.parametrize("period", [1, 3])
def test_moving_face_is_covered_on_every_frame(tmp_path: Path, period: int,
                                               video_detector: CompositeDetector) -> None:
    clip = moving_face_clip(n=24)
    src = write_video(tmp_path / "in.mp4", clip.frames)
    dst = tmp_path / "out.mp4"
    report = redact_video(src, dst, video_detector, FILL, VideoOptions(period=period))
    before, after = read_video(src), read_video(dst)
    assert len(after.frames) == len(before.frames) == 24
    assert after.times == before.times
    assert (after.width, after.height) == (320, 240)
    assert after.video_codec == "h264"
    assert_faces_filled(after.frames, clip.faces)
    # far from the face the picture is untouched (but for compression)
    for a, b in zip(before.frames, after.frames, strict=True):
        assert np.abs(a[190:].astype(int) - b[190:]).mean() < 3
    assert report.frames == 24
    # every `period` frames (sooner while a track is new), and the last frame
    assert report.detector_calls == 24 if period == 1 else 8 <= report.detector_calls <= 12
    assert len(report.frames_detail) == 24
    assert all(d["boxes"] for d in report.frames_detail)
    assert report.counts.get("faces", 0) >= 24


def test_default_blur_removes_the_face_detail(tmp_path: Path,
                                              video_detector: CompositeDetector) -> None:
    clip = moving_face_clip(n=12, scale=0.8, step=5)
    src = write_video(tmp_path / "in.mp4", clip.frames)
    dst = tmp_path / "out.mp4"
    redact_video(src, dst, video_detector, Style())
    before, after = read_video(src), read_video(dst)
    for i, face in enumerate(clip.faces):
        core = core_of(face)
        d0, d1 = detail(region(before.frames[i], core)), detail(region(after.frames[i], core))
        assert d1 < 0.35 * d0, f"frame {i}: detail {d0:.1f} -> {d1:.1f}"
        assert np.abs(region(before.frames[i], core).astype(int)
                      - region(after.frames[i], core)).mean() > 5


def test_variable_frame_rate_timestamps_survive(tmp_path: Path,
                                                video_detector: CompositeDetector) -> None:
    clip = moving_face_clip(n=14)
    pts = [0, 40, 80, 200, 210, 220, 500, 540, 580, 1000, 1033, 1066, 1500, 1517]
    src = write_video(tmp_path / "vfr.mp4", clip.frames, pts=pts,
                      time_base=Fraction(1, 1000), audio="aac")
    dst = tmp_path / "out.mp4"
    report = redact_video(src, dst, video_detector, FILL)
    before, after = read_video(src), read_video(dst)
    assert before.times == [Fraction(p, 1000) for p in pts]
    assert after.times == before.times
    assert [d["time_s"] for d in report.frames_detail] == [p / 1000 for p in pts]
    assert_faces_filled(after.frames, clip.faces)
    assert after.audio_packets == before.audio_packets > 0


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_is_kept(tmp_path: Path, rotation: int,
                          video_detector: CompositeDetector) -> None:
    frames = [background(160, 96)] * 8
    src = write_video(tmp_path / "rot.mp4", frames, rotation=rotation)
    dst = tmp_path / "out.mp4"
    redact_video(src, dst, video_detector, FILL)
    before, after = read_video(src), read_video(dst)
    assert before.rotation % 360 == rotation  # PyAV may read 270 back as -90
    assert after.rotation % 360 == before.rotation % 360
    # the pixels are stored as they were: the player rotates them
    assert (after.width, after.height) == (160, 96)
    assert len(after.frames) == 8


@pytest.mark.parametrize(("codec", "name"), [("aac", "aac"), ("libopus", "opus")])
def test_audio_packets_are_copied(tmp_path: Path, codec: str, name: str,
                                  video_detector: CompositeDetector) -> None:
    clip = moving_face_clip(n=20, width=240, height=200, step=4)
    src = write_video(tmp_path / "a.mp4", clip.frames, audio=codec)
    dst = tmp_path / "out.mp4"
    report = redact_video(src, dst, video_detector, FILL)
    before, after = read_video(src), read_video(dst)
    assert before.audio_codec == after.audio_codec == name
    assert after.audio_packets == before.audio_packets > 20
    assert report.audio_packets == before.audio_packets
    assert len(after.frames) == 20
    assert_faces_filled(after.frames, clip.faces)


def test_no_audio_in_no_audio_out(tmp_path: Path, video_detector: CompositeDetector) -> None:
    src = write_video(tmp_path / "mute.mp4", [background(128, 96)] * 5)
    dst = tmp_path / "out.mp4"
    assert redact_video(src, dst, video_detector, FILL).audio_packets == 0
    assert read_video(dst).audio_codec is None


GPS = "+48.8584+002.2945/"


@pytest.mark.parametrize("keep", [False, True])
def test_metadata_dropped_unless_keep_metadata(tmp_path: Path, keep: bool,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    clip = moving_face_clip(n=10)
    src = write_video(tmp_path / "meta.mp4", clip.frames, audio="aac",
                      metadata={"location": GPS, "title": "holiday at home",
                                "comment": "camera serial SN-4711"},
                      stream_metadata={"title": "lens serial LN-0815", "language": "fra"})
    before = read_video(src)
    assert GPS in before.all_metadata_values()
    assert "LN-0815" in before.all_metadata_values()
    dst = tmp_path / "out.mp4"
    args = ["file", str(src), "-o", str(dst), "-q"] + (["--keep-metadata"] if keep else [])
    assert main(args) == 0
    after = read_video(dst)
    values = after.all_metadata_values()
    if keep:
        assert after.metadata.get("location") == GPS
        assert after.metadata.get("title") == "holiday at home"
    else:
        for secret in (GPS, "holiday", "SN-4711", "LN-0815"):
            assert secret not in values
        assert not any("location" in k for k in after.metadata)
    # the audio language is not a secret and stays either way
    assert after.stream_metadata[1].get("language") == "fra"
    assert after.audio_packets == before.audio_packets
    assert len(after.frames) == 10


@pytest.mark.parametrize(("name", "codec"), [("odd.mp4", "libx264"), ("odd.mkv", "ffv1")])
def test_odd_frame_size(tmp_path: Path, name: str, codec: str,
                        video_detector: CompositeDetector) -> None:
    clip = moving_face_clip(n=10, width=321, height=241)
    src = write_video(tmp_path / name, clip.frames, codec=codec, pix_fmt="yuv444p")
    assert (read_video(src).width, read_video(src).height) == (321, 241)
    dst = tmp_path / f"out-{name}"
    redact_video(src, dst, video_detector, FILL)
    after = read_video(dst)
    # H.264 4:2:0 needs even sizes: the last column and row are dropped, nothing is stretched
    assert (after.width, after.height) == (320, 240)
    assert len(after.frames) == 10
    assert_faces_filled(after.frames, clip.faces)


def test_webm_output_gets_vp9(tmp_path: Path, video_detector: CompositeDetector) -> None:
    clip = moving_face_clip(n=8, width=240, height=200, step=4)
    src = write_video(tmp_path / "in.mp4", clip.frames)
    dst = tmp_path / "out.webm"
    redact_video(src, dst, video_detector, FILL)
    after = read_video(dst)
    assert after.video_codec == "vp9"
    assert len(after.frames) == 8
    assert_faces_filled(after.frames, clip.faces, min_share=0.8)


# --------------------------------------------------------------------------------------------
# failures leave nothing behind


class FailingDetector:
    """The real detector, until call number ``fail_on`` (1-based) raises."""

    def __init__(self, inner: CompositeDetector, fail_on: int) -> None:
        self.inner = inner
        self.fail_on = fail_on
        self.calls = 0
        self.categories = inner.categories

    def detect(self, image: np.ndarray) -> Detections:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("onnxruntime exploded")
        return self.inner.detect(image)

    @property
    def models(self) -> list[ModelInfo]:
        return self.inner.models


def pipeline_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name in ("decode", "encode") and t.is_alive()}


@pytest.mark.parametrize("fail_on", [1, 4, 9])
def test_detector_failure_raises_and_leaves_no_file(tmp_path: Path, fail_on: int,
                                                    video_detector: CompositeDetector) -> None:
    clip = moving_face_clip(n=30)
    src = write_video(tmp_path / "in.mp4", clip.frames, audio="aac")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    threads_before = pipeline_threads()
    det = FailingDetector(video_detector, fail_on)
    with pytest.raises(DetectorError, match="onnxruntime exploded"):
        redact_video(src, out_dir / "out.mp4", det, FILL)
    assert det.calls == fail_on
    assert os.listdir(out_dir) == []  # not even a hidden partial file
    assert pipeline_threads() <= threads_before  # no thread left behind


def test_failure_keeps_an_existing_output_intact(tmp_path: Path,
                                                 video_detector: CompositeDetector) -> None:
    src = write_video(tmp_path / "in.mp4", moving_face_clip(n=12).frames)
    dst = tmp_path / "out.mp4"
    dst.write_bytes(b"previous result")
    with pytest.raises(DetectorError):
        redact_video(src, dst, FailingDetector(video_detector, 2), FILL)
    assert dst.read_bytes() == b"previous result"
    assert sorted(os.listdir(tmp_path)) == ["in.mp4", "out.mp4"]


def test_encoder_refuses_an_unredacted_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             video_detector: CompositeDetector) -> None:
    def skip_redaction(self: Redact, frame: Frame) -> Frame:
        return frame  # a broken redaction step that forgets to redact

    monkeypatch.setattr(Redact, "__call__", skip_redaction)
    src = write_video(tmp_path / "in.mp4", moving_face_clip(n=12).frames, audio="aac")
    out_dir = tmp_path / "out"
    with pytest.raises(UnredactedFrameError, match="frame 0"):
        redact_video(src, out_dir / "out.mp4", video_detector, FILL)
    assert not out_dir.exists() or os.listdir(out_dir) == []


def test_corrupt_and_truncated_inputs_raise_media_error(tmp_path: Path,
                                                        video_detector: CompositeDetector
                                                        ) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(7).integers(0, 256, 50_000, np.uint8).tobytes())
    good = write_video(tmp_path / "good.mp4", moving_face_clip(n=10).frames)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out_dir = tmp_path / "out"
    for src in (junk, cut):
        with pytest.raises(MediaError):
            redact_video(src, out_dir / src.name, video_detector, FILL)
    assert not out_dir.exists() or os.listdir(out_dir) == []
