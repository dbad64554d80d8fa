"""Live streams end to end on loopback: a camera simulator (RTSP) -> the live pipeline -> the
project's RTSP server -> a PyAV player. Faces must be covered in what the player decodes, a
camera that is down or restarts must not break the output, and a failing detector must not let
a face through."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import av
import numpy as np
import pytest

from engines.detections import Detections
from engines.errors import UnredactedFrameError
from engines.faces import ModelInfo
from engines.redact import Method, Style
from engines.registry import Detector
from pipeline.frame import Frame
from pipeline.live import LiveOptions, LiveStream, Status, no_signal_frame, scrub_url
from pipeline.live_encode import LiveEncoder
from pipeline.rtsp_server import RtspServer
from pipeline.settings import RedactSettings
from tests.conftest import fill_fraction, region
from tests.live_helpers import Camera, read_stamp

pytest.importorskip("gi", reason="GStreamer's Python bindings (make setup installs them)")

MAGENTA = (255, 0, 255)
FILL = Style(Method.FILL, fill_bgr=MAGENTA)
PLAYER_OPTIONS = {"rtsp_transport": "tcp", "timeout": "5000000", "fflags": "nobuffer",
                  "flags": "low_delay"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Player:
    """Plays an RTSP URL in a thread and keeps what it decodes."""

    url: str
    frames: list[np.ndarray] = field(default_factory=list)
    options: ClassVar[dict[str, str]] = PLAYER_OPTIONS
    times: list[float] = field(default_factory=list)
    error: str = ""

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with av.open(self.url, options=self.options, timeout=(5.0, 5.0)) as c:
                for fr in c.decode(video=0):
                    self.frames.append(fr.to_ndarray(format="bgr24"))
                    self.times.append(time.monotonic())
                    if self._stop.is_set():
                        return
        except (av.FFmpegError, OSError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def wait_frames(self, n: int, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while len(self.frames) < n and time.monotonic() < end:
            if not self._thread.is_alive():
                if self.frames or "Immediate exit requested" not in self.error:
                    break
                # opening timed out before the first picture (a loaded machine): connect
                # again, as a player does
                self.error = ""
                self._thread = threading.Thread(target=self._run, daemon=True)
                self._thread.start()
            time.sleep(0.05)
        assert len(self.frames) >= n, f"{len(self.frames)} frames, {self.error or 'no error'}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class Gateway:
    """A live stream of ``source`` published on a fresh RTSP server."""

    def __init__(self, source: str, factory: Callable[[], Detector] | None = None,
                 options: LiveOptions | None = None, zones: list[list[tuple[float, float]]]
                 | None = None, device: str = "auto") -> None:
        self.server = RtspServer(port=0)
        self.mount = self.server.add_mount("out")
        self.stream = LiveStream(
            "test", source, RedactSettings(("faces",), FILL, zones=tuple(zones or ()),
                                           device=device),
            options or LiveOptions(open_timeout_s=2.0, read_timeout_s=2.0, width=320,
                                   height=240),
            sinks=[self.mount.push], detector_factory=factory)
        self.mount.on_viewer = self.stream.request_keyframe
        self.stream.start()

    def wait_status(self, status: Status, timeout: float = 15.0) -> None:
        end = time.monotonic() + timeout
        while self.stream.stats.status is not status and time.monotonic() < end:
            time.sleep(0.05)
        assert self.stream.stats.status is status, self.stream.stats.as_dict()

    def close(self) -> None:
        self.stream.stop()
        self.server.close()


@pytest.fixture
def camera() -> Iterator[Camera]:
    cam = Camera().start()
    yield cam
    cam.stop()


def camera_frames(frames: list[np.ndarray]) -> list[np.ndarray]:
    """Frames that carry a camera picture (not the placeholder)."""
    grey = no_signal_frame(frames[0].shape[1], frames[0].shape[0])
    return [f for f in frames if np.abs(f.astype(np.int16) - grey).mean() > 10]


def assert_faces_covered(cam: Camera, frames: list[np.ndarray], min_frames: int) -> None:
    real = camera_frames(frames)
    assert len(real) >= min_frames
    for px in real:
        face = region(px, cam.face(read_stamp(px)))
        assert fill_fraction(face, MAGENTA, tol=40) > 0.9


def wait_resumed(gw: Gateway, cam: Camera, player: Player) -> int:
    """The stream goes live again and the player, connected throughout, shows the camera with
    its faces covered; returns how many frames the player had when the stream went live."""
    gw.wait_status(Status.LIVE)
    n = len(player.frames)
    player.wait_frames(n + 30)
    assert not player.error
    assert_faces_covered(cam, player.frames[n:], 20)
    return n


# --------------------------------------------------------------------------------------------


def test_rtsp_in_rtsp_out_covers_the_face_and_hides_credentials(
        camera: Camera, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    secret_url = camera.url.replace("rtsp://", "rtsp://admin:hunter2@")
    gw = Gateway(secret_url)
    try:
        gw.wait_status(Status.LIVE)
        player = Player(gw.mount.url)
        player.wait_frames(40)
        player.stop()
        assert_faces_covered(camera, player.frames, 30)
        stamps = [read_stamp(px) for px in camera_frames(player.frames)]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)  # in order, no repeats
        stats = gw.stream.stats.as_dict()
        assert stats["output_fps"] > 20 and stats["frames_redacted"] >= 40
        assert stats["latency_ms_p50"] is not None and stats["latency_ms_p50"] < 400
        assert gw.stream.safe_source == camera.url.replace("rtsp://", "rtsp://***@")
    finally:
        gw.close()
    assert "hunter2" not in caplog.text and "admin" not in caplog.text
    assert "hunter2" not in str(gw.stream.stats.as_dict())


def test_camera_down_at_start_then_up_and_restarting(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    gw = Gateway(f"rtsp://127.0.0.1:{port}/cam",
                 options=LiveOptions(open_timeout_s=1.0, read_timeout_s=1.0,
                                     backoff_s=(0.2, 0.5), width=320, height=240, fps=25))
    player: Player | None = None
    cam = Camera()
    try:
        gw.wait_status(Status.RECONNECTING)
        player = Player(gw.mount.url)
        player.wait_frames(10)  # the placeholder keeps the player fed
        assert not camera_frames(player.frames)
        cam.start(port)
        gw.wait_status(Status.LIVE)
        n = len(player.frames)
        player.wait_frames(n + 30)
        assert_faces_covered(cam, player.frames, 20)
        # the camera dies and comes back: the player stays connected throughout
        cam.stop()
        gw.wait_status(Status.RECONNECTING)
        n = len(player.frames)
        player.wait_frames(n + 10)
        cam = Camera()
        cam.start(port)
        back = time.monotonic()
        n = wait_resumed(gw, cam, player)
        first_real = next(t for px, t in zip(player.frames[n:], player.times[n:], strict=True)
                          if camera_frames([px]))
        assert first_real - back < 5.0
        assert gw.stream.stats.reconnects >= 2 and gw.stream.stats.placeholders > 0
    finally:
        if player is not None:
            player.stop()
        cam.stop()
        gw.close()


class Raising:
    """Finds nothing; after ``ok_calls`` calls it raises, or with ``stall`` hangs until
    released."""

    categories: tuple[str, ...] = ("faces",)

    def __init__(self, ok_calls: int = 0, stall: bool = False) -> None:
        self.calls, self.ok_calls, self.stall = 0, ok_calls, stall
        self.release = threading.Event()

    @property
    def models(self) -> list[ModelInfo]:
        return []

    def detect(self, image: np.ndarray) -> Detections:
        self.calls += 1
        if self.calls > self.ok_calls:
            if not self.stall:
                raise RuntimeError("model crashed")
            self.release.wait(60)
        return Detections.empty()


def test_a_failing_detector_covers_whole_frames(camera: Camera) -> None:
    det = Raising()
    gw = Gateway(camera.url, factory=lambda: det)
    try:
        gw.wait_status(Status.LIVE)
        player = Player(gw.mount.url)
        player.wait_frames(30)
        player.stop()
        assert gw.stream.stats.frames_covered >= 30
        for px in player.frames:
            assert fill_fraction(px, MAGENTA, tol=40) > 0.95  # covered whole
    finally:
        gw.close()


def test_a_stalled_detector_lets_no_camera_picture_through(camera: Camera) -> None:
    det = Raising(stall=True)
    gw = Gateway(camera.url, factory=lambda: det)
    try:
        gw.wait_status(Status.LIVE)
        player = Player(gw.mount.url)
        player.wait_frames(15)  # the placeholder keeps the player going
        player.stop()
        assert camera_frames(player.frames) == []
        stats = gw.stream.stats
        assert stats.frames_dropped > 0 and stats.placeholders >= 15
        assert stats.frames_redacted == 0
    finally:
        det.release.set()
        gw.close()


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_zones_are_always_covered(camera: Camera, device: str) -> None:
    """Also with the stream on the cuda device (Numba's CUDA simulator here): frames uploaded
    as NV12, the zone covered there, the encoder given the frames back."""
    from engines.gpu import cuda_probe

    if device == "cuda" and not cuda_probe().available:
        pytest.skip(f"no CUDA device or simulator: {cuda_probe().reason}")
    zone = [(0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (0.0, 1.0)]  # bottom-left quarter, as fractions
    # a detector that finds nothing: what is covered is the zone alone (face boxes, which the
    # tracker grows where the camera's clip loops and the face jumps, would blur the check)
    finds_nothing = Raising(ok_calls=10**9)
    gw = Gateway(camera.url, factory=lambda: finds_nothing, zones=[zone], device=device)
    try:
        gw.wait_status(Status.LIVE)
        player = Player(gw.mount.url)
        player.wait_frames(20)
        player.stop()
        runtime = gw.stream.stats.as_dict()["runtime"]
        assert runtime["device"] == ("cuda" if device == "cuda" else "cpu")
        assert runtime["kernels"].startswith("cuda (numba" if device == "cuda" else "cpu")
        for px in camera_frames(player.frames):
            h, w = px.shape[:2]
            assert fill_fraction(px[h // 2 + 4:, :w // 2 - 4], MAGENTA, tol=40) > 0.97
            # outside the zone: untouched
            assert fill_fraction(px[:h // 2 - 4], MAGENTA, tol=40) < 0.01
            assert fill_fraction(px[h // 2 + 4:, w // 2 + 4:], MAGENTA, tol=40) < 0.01
    finally:
        gw.close()


def test_encoder_refuses_an_unredacted_frame() -> None:
    enc = LiveEncoder(64, 48)
    with pytest.raises(UnredactedFrameError):
        enc.encode(Frame(0, np.zeros((48, 64, 3), np.uint8)), 0.0)


@pytest.mark.parametrize(("url", "safe"), [
    ("rtsp://admin:pw@10.0.0.5:554/s1", "rtsp://***@10.0.0.5:554/s1"),
    ("rtsp://user@cam/x", "rtsp://***@cam/x"),
    ("rtsp://cam.local/live?token=1", "rtsp://cam.local/live?token=1"),
    ("rtsp://a:b%40c@h/p", "rtsp://***@h/p"),
])
def test_scrub_url(url: str, safe: str) -> None:
    assert scrub_url(url) == safe


def test_a_camera_honours_its_per_category_settings_and_a_user_model(
        camera: Camera, tmp_path: Path) -> None:
    """A camera of the cameras file (``redact serve --config``) with a per-category threshold
    that no face reaches, and a settings file whose user model (a tiny ONNX graph) finds a
    "tattoo" in the bottom right: the tattoo is covered on every frame, the face is not."""
    from gateway.streams import StreamManager, StreamSettings
    from tests.test_custom import _save_model

    # end-to-end output rows: x1, y1, x2, y2, score, class in the 320x320 model input (the
    # 320x240 frame is letterboxed with 40 rows above it): frame box (200, 175)-(300, 230)
    rows = np.array([[[200, 215, 300, 270, 0.9, 0]]], np.float32)
    _save_model(tmp_path / "tattoo.onnx", [("output0", rows, 1)])
    (tmp_path / "redact.toml").write_text(
        '[[model]]\npath = "tattoo.onnx"\nclasses = { 0 = "tattoos" }\n')
    cameras = tmp_path / "cameras.toml"
    cameras.write_text(f'[[stream]]\nname = "gate"\nsource = "{camera.url}"\n'
                       'categories = ["faces", "tattoos"]\nmethod = "fill"\n'
                       'config = "redact.toml"\n'
                       '[stream.settings.faces]\nthreshold = 1.0\n')
    manager = StreamManager(tmp_path / "data", "127.0.0.1", StreamSettings(rtsp_port=0),
                            cameras)
    manager.start()
    try:
        (r,) = manager.list(None)
        assert r.spec.categories == ["faces", "tattoos"]
        assert manager.describe(r, "http://x")["settings"] == {"faces": {"threshold": 1.0}}
        url = manager.rtsp_url(r)
        assert url is not None
        player = Player(url)
        player.wait_frames(20)
        player.stop()
        real = camera_frames(player.frames)
        assert len(real) >= 10
        for px in real:
            assert fill_fraction(px[179:226, 204:296], (0, 0, 0), tol=40) > 0.97  # the tattoo
            face = region(px, camera.face(read_stamp(px)))
            assert fill_fraction(face, (0, 0, 0), tol=40) < 0.5  # threshold 1.0: not a face
    finally:
        manager.stop()


def test_stream_settings_are_validated_and_user_models_come_only_from_the_cameras_file(
        ) -> None:
    from gateway.streams import StreamDef, StreamError

    body = {"name": "a", "source": "rtsp://cam/x", "categories": ["faces"]}
    spec = StreamDef.parse({**body, "settings": {"faces": {"threshold": 0.6,
                                                           "method": "pixelate"}}}, "key_1")
    s = spec.redact_settings()
    assert s.per_category["faces"].threshold == 0.6
    assert s.style.for_category("faces").method is Method.PIXELATE
    with pytest.raises(StreamError, match="unknown setting"):
        StreamDef.parse({**body, "settings": {"faces": {"colour": 1}}}, "key_1")
    with pytest.raises(StreamError, match="threshold 7"):
        StreamDef.parse({**body, "settings": {"faces": {"threshold": 7}}}, "key_1")
    with pytest.raises(StreamError, match="cameras file"):
        StreamDef.parse({**body, "config": "/etc/redact.toml"}, "key_1")
    # a stream's device: validated, kept, and auto when not given
    assert spec.device is None and spec.redact_settings().device == "auto"
    on_cpu = StreamDef.parse({**body, "device": "CPU"}, "key_1")
    assert on_cpu.device == "cpu" and on_cpu.definition()["device"] == "cpu"
    assert on_cpu.redact_settings().run_device() == "cpu"
    with pytest.raises(StreamError, match="device: unknown device 'gpu'"):
        StreamDef.parse({**body, "device": "gpu"}, "key_1")
