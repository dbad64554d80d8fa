"""Shared fixtures and media helpers.

Every piece of media the tests use is made here, in code: videos are encoded with PyAV into
``tmp_path``; photos come from scikit-image's bundled data (``astronaut.png``: one real face;
``lfw_subset.npy``: 25x25 grayscale faces, then 25x25 non-faces).
"""

from __future__ import annotations

import os

# The CUDA kernels run on Numba's CUDA simulator on machines without a GPU (the kernel tests and
# the cuda-device pipeline tests); on a GPU machine, NUMBA_ENABLE_CUDASIM=0 runs them on the GPU.
# `auto` never picks the simulator (engines.gpu), so every other test runs on the CPU path.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest
import skimage.data

from benchmarks.postgres_server import PostgresServer
from benchmarks.postgres_server import unavailable as postgres_unavailable
from engines.registry import (
    IMAGE_PROFILE,
    VIDEO_PROFILE,
    CompositeDetector,
    build_detector,
)

# The astronaut's face in skimage.data.astronaut() (512x512), brow to chin, checked by eye and by
# both detectors (test_detectors.py).
ASTRONAUT_FACE = (180.0, 72.0, 268.0, 178.0)
# Eyes, nose and mouth: the part that must be covered whatever the box shape.
ASTRONAUT_FACE_CORE = (195, 90, 255, 160)

Box = tuple[float, float, float, float]


# --------------------------------------------------------------------------------------------
# photos


@cache
def _astronaut_rgb() -> np.ndarray:
    img = skimage.data.astronaut()
    img.flags.writeable = False
    return img


def astronaut_bgr_image() -> np.ndarray:
    """A fresh, writable BGR uint8 copy of the astronaut photo (512x512)."""
    return np.ascontiguousarray(_astronaut_rgb()[:, :, ::-1])


@cache
def _lfw() -> np.ndarray:
    path = os.path.join(os.path.dirname(skimage.data.__file__), "lfw_subset.npy")
    arr = np.load(path)
    arr.flags.writeable = False
    return arr


def lfw_faces() -> np.ndarray:
    """(100, 25, 25) uint8 grayscale faces."""
    return (_lfw()[:100] * 255).round().astype(np.uint8)


def lfw_non_faces() -> np.ndarray:
    """(100, 25, 25) uint8 grayscale patches that hold no face."""
    return (_lfw()[100:] * 255).round().astype(np.uint8)


@pytest.fixture
def astronaut_bgr() -> np.ndarray:
    return astronaut_bgr_image()


# --------------------------------------------------------------------------------------------
# a camera


@pytest.fixture(scope="module")
def camera() -> Iterator[Any]:
    """An RTSP camera on loopback (:class:`tests.live_helpers.Camera`), shared by a module's
    live-stream tests (GStreamer is imported only by the tests that use it)."""
    from tests.live_helpers import Camera

    cam = Camera().start()
    yield cam
    cam.stop()


# --------------------------------------------------------------------------------------------
# databases: the SQLite file, and a PostgreSQL server started for the session


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server on loopback; skipped with the reason where none can start
    (REDACT_REQUIRE_POSTGRES=1, as CI sets: failed instead)."""
    why = postgres_unavailable()
    if why is not None:
        if os.environ.get("REDACT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required here: {why}")
        pytest.skip(f"needs a PostgreSQL server: {why}")
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """What a Store opens: a new SQLite file, or a new database on the PostgreSQL server."""
    if request.param == "sqlite":
        return tmp_path / "redact.db"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.database()


# --------------------------------------------------------------------------------------------
# detectors: loaded once per session


@pytest.fixture(scope="session")
def video_detector() -> CompositeDetector:
    return build_detector(("faces",), VIDEO_PROFILE)


@pytest.fixture(scope="session")
def image_detector() -> CompositeDetector:
    return build_detector(("faces",), IMAGE_PROFILE)


# --------------------------------------------------------------------------------------------
# pixel measures


def region(img: np.ndarray, box: Sequence[float]) -> np.ndarray:
    x1, y1, x2, y2 = (round(v) for v in box)
    return img[y1:y2, x1:x2]


def detail(img: np.ndarray) -> float:
    """Mean absolute Laplacian of the gray image: how much fine detail (edges, texture) it has."""
    gray = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    return float(np.abs(cv2.Laplacian(gray.astype(np.float32), cv2.CV_32F)).mean())


def fill_fraction(img: np.ndarray, bgr: Sequence[int], tol: int = 60) -> float:
    """Share of pixels of ``img`` within ``tol`` (per channel) of the colour ``bgr``."""
    if img.size == 0:
        return 0.0
    diff = np.abs(img.astype(np.int16) - np.asarray(bgr, np.int16)).max(-1)
    return float((diff <= tol).mean())


def core_of(box: Sequence[float], share: float = 0.35) -> Box:
    """The central part of ``box``: ``share`` of its size either side of the centre."""
    x1, y1, x2, y2 = box
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * share, (y2 - y1) * share
    return (cx - hw, cy - hh, cx + hw, cy + hh)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --------------------------------------------------------------------------------------------
# synthetic clips


def background(width: int, height: int) -> np.ndarray:
    """A smooth BGR gradient: no face, little fine detail."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([(xx * 0.5 + 40) % 256, (yy * 0.6 + 60) % 256,
                     np.full_like(xx, 120)], -1).astype(np.uint8)


@dataclass
class Clip:
    frames: list[np.ndarray]
    faces: list[Box]  # where the pasted face is on each frame


def moving_face_clip(n: int = 20, width: int = 320, height: int = 240, scale: float = 0.6,
                     step: float = 7.0, y: int = 50) -> Clip:
    """The astronaut's head pasted on a gradient, moving right by ``step`` px per frame."""
    crop_x, crop_y = 130, 20
    crop = astronaut_bgr_image()[crop_y:220, crop_x:310]
    head = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    hh, hw = head.shape[:2]
    fx1, fy1, fx2, fy2 = ASTRONAUT_FACE
    face = ((fx1 - crop_x) * scale, (fy1 - crop_y) * scale,
            (fx2 - crop_x) * scale, (fy2 - crop_y) * scale)
    bg = background(width, height)
    frames, faces = [], []
    for i in range(n):
        x = min(round(8 + i * step), width - hw)
        f = bg.copy()
        f[y:y + hh, x:x + hw] = head
        frames.append(f)
        faces.append((face[0] + x, face[1] + y, face[2] + x, face[3] + y))
    return Clip(frames, faces)


# --------------------------------------------------------------------------------------------
# writing and reading videos with PyAV


def _sine(n: int, rate: int) -> np.ndarray:
    t = np.arange(n) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def write_video(path: Path, frames: Sequence[np.ndarray], *, fps: int = 25,
                pts: Sequence[int] | None = None, time_base: Fraction | None = None,
                audio: str | None = None, rotation: int = 0,
                metadata: dict[str, str] | None = None,
                stream_metadata: dict[str, str] | None = None,
                codec: str = "libx264", pix_fmt: str = "yuv420p") -> Path:
    """Encode BGR ``frames`` into ``path`` (container from the suffix).

    pts/time_base: explicit (variable frame rate) timestamps, else ``fps``.
    audio: ``"aac"`` or ``"libopus"`` for a 440 Hz sine as long as the video.
    rotation: display rotation in degrees, stored as the stream's display matrix.
    """
    assert frames, "a video needs frames"
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        if metadata:
            out.metadata.update(metadata)
        v = out.add_stream(codec, rate=fps)
        assert isinstance(v, av.VideoStream)
        v.width, v.height, v.pix_fmt = w, h, pix_fmt
        if codec == "libx264":
            v.codec_context.options = {"preset": "ultrafast", "crf": "10"}
        if time_base is not None:
            v.codec_context.time_base = time_base
            v.time_base = time_base
        if rotation:
            v.set_display_rotation(rotation)
        if stream_metadata:
            v.metadata.update(stream_metadata)
        a: av.AudioStream | None = None
        if audio:
            stream = out.add_stream(audio, rate=48000)
            assert isinstance(stream, av.AudioStream)
            a = stream
            a.layout = "stereo"
            if stream_metadata:
                a.metadata.update(stream_metadata)
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="bgr24")
            if pts is not None:
                vf.pts = pts[i]
                vf.time_base = time_base or Fraction(1, fps)
            out.mux(v.encode(vf))
        out.mux(v.encode(None))
        if a is not None:
            last = (pts[-1] * (time_base or Fraction(1, fps)) if pts is not None
                    else Fraction(len(frames), fps))
            n = int(48000 * (last + Fraction(1, fps)))
            wave = _sine(n, 48000)
            fmt = a.format
            size = a.codec_context.frame_size or 1024  # 1024 for AAC, 960 for Opus
            for i in range(0, n, size):
                chunk = wave[i:i + size]
                if fmt.name.startswith("s16"):
                    chunk = (chunk * 32767).astype(np.int16)
                arr = (np.stack([chunk, chunk]) if fmt.is_planar
                       else np.repeat(chunk, 2)[None])
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(arr), format=fmt.name,
                                                layout="stereo")
                af.sample_rate = 48000
                af.pts = i
                out.mux(a.encode(af))
            out.mux(a.encode(None))
    return path


@dataclass
class VideoInfo:
    frames: list[np.ndarray]
    times: list[Fraction]  # presentation time of each frame, in seconds
    rotation: int
    width: int
    height: int
    video_codec: str
    audio_codec: str | None
    audio_packets: int  # non-empty audio packets
    metadata: dict[str, str]  # container
    stream_metadata: list[dict[str, str]] = field(default_factory=list)

    def all_metadata_values(self) -> str:
        parts = [*self.metadata.values()]
        for m in self.stream_metadata:
            parts.extend(m.values())
        return " | ".join(parts)


def read_video(path: Path) -> VideoInfo:
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        frames, times = [], []
        rotation = 0
        for i, f in enumerate(c.decode(vs)):
            if i == 0:
                rotation = round(f.rotation or 0)
            assert f.pts is not None
            frames.append(f.to_ndarray(format="bgr24"))
            times.append(Fraction(f.pts) * f.time_base)
        info = VideoInfo(
            frames=frames, times=times, rotation=rotation,
            width=vs.codec_context.width, height=vs.codec_context.height,
            video_codec=vs.codec_context.name,
            audio_codec=c.streams.audio[0].codec_context.name if c.streams.audio else None,
            audio_packets=0, metadata=dict(c.metadata),
            stream_metadata=[dict(s.metadata) for s in c.streams])
    if info.audio_codec is not None:
        with av.open(str(path)) as c:
            info.audio_packets = sum(1 for p in c.demux(c.streams.audio[0]) if p.size)
    return info
