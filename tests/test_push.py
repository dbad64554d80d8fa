"""Push ingest on loopback: a simulated dashcam publishes (RTSP ANNOUNCE/RECORD, FFmpeg's RTSP
client) to the project's RTSP server; the live pipeline redacts what it sends and a player of
the output sees only covered faces. Wrong credentials and a second publisher are refused; a
publisher that hangs up and comes back does not break the output."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from pipeline.live import LiveOptions, LiveStream, Status
from pipeline.push import PublisherGone, PushFeed
from pipeline.rtsp_server import RtspServer, sdp_medias
from pipeline.settings import RedactSettings
from tests.live_helpers import Publisher, read_stamp, stamp
from tests.test_live import (
    FILL,
    Gateway,
    Player,
    assert_faces_covered,
    camera_frames,
    wait_resumed,
)

pytest.importorskip("gi", reason="GStreamer's Python bindings (make setup installs them)")


class PushGateway(Gateway):
    """A "push" live stream published on a fresh RTSP server at /dash, fed from /dash/publish."""

    def __init__(self) -> None:  # the pull Gateway's set-up does not apply here
        self.server = RtspServer(port=0)
        self.out = self.server.add_mount("dash")
        self.feed = PushFeed()
        self.pub = self.server.add_publish_mount("dash", "dash", "s3cret", self.feed)
        self.stream = LiveStream(
            "dash", "push", RedactSettings(("faces",), FILL),
            LiveOptions(read_timeout_s=2.0, width=320, height=240), sinks=[self.out.push],
            feed=self.feed)
        self.out.on_viewer = self.stream.request_keyframe
        self.stream.start()

    def url(self, password: str = "s3cret") -> str:
        return self.pub.url.replace("rtsp://", f"rtsp://dash:{password}@")


@pytest.fixture
def gw() -> Iterator[PushGateway]:
    g = PushGateway()
    yield g
    g.close()


def wait_error(pub: Publisher, timeout: float = 10.0) -> str:
    end = time.monotonic() + timeout
    while not pub.error and time.monotonic() < end:
        time.sleep(0.05)
    return pub.error


def test_a_published_camera_is_redacted_and_survives_hang_ups(gw: PushGateway) -> None:
    player = Player(gw.out.url)
    player.wait_frames(5)  # the placeholder plays while nobody publishes
    assert not camera_frames(player.frames) and gw.stream.stats.status is Status.CONNECTING
    cam = Publisher().publish(gw.url())
    try:
        gw.wait_status(Status.LIVE)
        n = len(player.frames)
        player.wait_frames(n + 40)
        assert_faces_covered(cam, player.frames[n:], 30)
        stamps = [read_stamp(px) for px in camera_frames(player.frames)]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
        # the dashcam hangs up: the output goes on with the placeholder, then resumes with the
        # next publisher, the player connected throughout
        cam.stop()
        gw.wait_status(Status.RECONNECTING, timeout=5)
        n = len(player.frames)
        player.wait_frames(n + 10)
        assert not camera_frames(player.frames[-5:])  # frames in flight aside: placeholders
        cam = Publisher().publish(gw.url())
        back = time.monotonic()
        wait_resumed(gw, cam, player)
        assert time.monotonic() - back < 10
        assert gw.feed.publishers == 2 and gw.stream.stats.reconnects >= 1
    finally:
        cam.stop()
        player.stop()


def test_wrong_credentials_and_a_second_publisher_are_refused(gw: PushGateway) -> None:
    for url in (gw.pub.url, gw.url("wrong")):
        intruder = Publisher().publish(url)
        assert "401" in wait_error(intruder)
        intruder.stop()
    assert gw.feed.units_in == 0 and gw.stream.stats.frames_in == 0
    cam = Publisher().publish(gw.url())
    try:
        gw.wait_status(Status.LIVE)
        second = Publisher().publish(gw.url())
        assert "5XX" in wait_error(second) or "503" in second.error
        second.stop()
        assert gw.pub.refused == 1
        frames = gw.stream.stats.frames_in
        time.sleep(0.5)
        assert gw.stream.stats.frames_in > frames  # the first one still publishes
    finally:
        cam.stop()


@pytest.mark.parametrize(("codec", "audio", "transport"), [
    ("libx264", True, "tcp"), ("libx265", False, "tcp"), ("libx264", False, "udp")],
    ids=["h264-after-an-audio-track", "h265", "rtp-over-udp"])
def test_phone_and_dashcam_publishers(gw: PushGateway, codec: str, audio: bool,
                                      transport: str) -> None:
    """A publisher with an audio track (listed first, as some phone apps do), one sending
    H.265, one sending RTP over UDP (FFmpeg's default): the video is redacted, audio dropped."""
    cam = Publisher(codec=codec, audio=audio, transport=transport).publish(gw.url())
    player = Player(gw.out.url)
    try:
        gw.wait_status(Status.LIVE)
        n = len(player.frames)
        player.wait_frames(n + 30)
        assert_faces_covered(cam, player.frames[n:], 20)
        assert gw.feed.codec == ("hevc" if codec == "libx265" else "h264")
    finally:
        cam.stop()
        player.stop()
    assert not cam.error


def test_a_publisher_without_video_is_refused(gw: PushGateway) -> None:
    sound_only = Publisher(codec=None).publish(gw.url())
    assert "4XX" in wait_error(sound_only)  # 415 Unsupported Media Type
    sound_only.stop()
    assert not gw.feed.publishing and gw.stream.stats.status is Status.CONNECTING


def test_sdp_medias() -> None:
    sdp = ("v=0\r\nm=audio 0 RTP/AVP 97\r\na=rtpmap:97 MPEG4-GENERIC/48000/1\r\n"
           "m=video 0 RTP/AVP 96 98\r\na=rtpmap:98 VP8/90000\r\na=rtpmap:96 H265/90000\r\n"
           "m=application 0 RTP/AVP 99\r\n")
    assert sdp_medias(sdp) == [("audio", "MPEG4-GENERIC"), ("video", "H265"),
                               ("application", "")]


def test_the_feed_resumes_at_a_keyframe_when_the_reader_is_behind() -> None:
    feed = PushFeed(max_units=4)
    session = feed.begin()
    assert session is not None and feed.begin() is None  # busy
    feed.put(session, b"P0", keyframe=False)  # before any keyframe: dropped
    feed.put(session, b"K1", keyframe=True)
    for i in range(3):
        feed.put(session, f"P{i}".encode(), keyframe=False)
    feed.put(session, b"P9", keyframe=False)  # full: everything dropped, wait for a keyframe
    feed.put(session, b"K2", keyframe=True)
    assert feed.get(session, 0.1).data == b"K2"
    assert feed.units_dropped == 1 + 4 + 1
    feed.end(session)
    with pytest.raises(PublisherGone):
        feed.get(session, 0.1)


def test_a_silent_publisher_is_replaced() -> None:
    feed = PushFeed(stale_s=0.2)
    first = feed.begin()
    assert first is not None
    time.sleep(0.3)  # a dashcam lost its network without hanging up
    second = feed.begin()
    assert second is not None and second != first
    feed.put(first, b"K-old", keyframe=True)  # the old one's late data is ignored
    feed.put(second, b"K-new", keyframe=True)
    feed.end(first)  # the old connection finally times out: the new one goes on
    assert feed.publishing and feed.get(second, 0.1).data == b"K-new"


def test_damaged_data_from_the_publisher_is_skipped() -> None:
    """Access units straight into the feed (no network): a garbage unit in the middle is
    skipped, the stream stays live and every frame out is still redacted."""
    import threading

    import av
    import numpy as np

    from pipeline.frame import Frame
    from pipeline.live_encode import EncodedPacket, LiveEncoder

    cam = Publisher()
    feed = PushFeed()
    out: list[EncodedPacket] = []
    stream = LiveStream("dash", "push", RedactSettings(("faces",), FILL),
                        LiveOptions(read_timeout_s=2.0, width=320, height=240, fps=25),
                        sinks=[out.append], feed=feed)
    stream.start()
    session = feed.begin()
    assert session is not None
    enc = LiveEncoder(320, 240, 25, gop_s=0.4)
    rng = np.random.default_rng(1)

    def publish() -> None:
        for i in range(75):
            px = cam.frames[i % len(cam.frames)].copy()
            stamp(px, i)
            f = Frame(i, px)
            f.redacted = True  # the camera's picture, going in
            for pkt in enc.encode(f, i / 25):
                feed.put(session, pkt.data, pkt.keyframe)
            if i == 30:  # a damaged unit, as a broken network path might deliver
                feed.put(session, b"\x00\x00\x00\x01\x65" + rng.bytes(3000), True)
            time.sleep(1 / 25)

    t = threading.Thread(target=publish)
    t.start()
    t.join()
    time.sleep(0.5)
    stream.stop()
    assert stream.stats.status is not Status.FAILED
    dec = av.CodecContext.create("h264", "r")
    frames = [vf.to_ndarray(format="bgr24") for p in out for vf in dec.decode(av.Packet(p.data))]
    shown = camera_frames(frames)
    stamps = [read_stamp(px) for px in shown]
    assert len(shown) >= 50 and max(stamps) >= 70  # frames after the damage came through
    assert_faces_covered(cam, frames, 50)
