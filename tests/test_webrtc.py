"""WebRTC viewers of a live stream: real aiortc peers in a private network namespace (the test
makes it; nothing crosses the machine's own interfaces), fed by the stream's single encode."""

from __future__ import annotations

import asyncio
import json

import pytest

from pipeline.webrtc import WebRtcError, WebRtcHub, _first_video_codec, _resolve, advertise
from tests import netns

pytest.importorskip("aiortc")
pytest.importorskip("gi", reason="GStreamer's Python bindings (make setup installs them)")


@pytest.fixture(scope="module")
def three_viewers() -> dict[str, object]:
    why = netns.available()
    if why:
        pytest.skip(why)
    r = netns.run_python("tests.webrtc_probe", "3", "40")
    assert r.returncode == 0, r.stderr[-3000:]
    result: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def test_each_viewer_sees_the_redacted_stream_quickly(three_viewers: dict[str, object]) -> None:
    viewers = three_viewers["viewers"]
    assert isinstance(viewers, list) and len(viewers) == 3
    for v in viewers:
        # 40 frames received; the first may be the placeholder shown while the detector loads
        assert v["frames"] >= 30
        assert v["first_frame_s"] < 1.5
        assert v["min_face_covered"] is not None and v["min_face_covered"] > 0.9
    assert three_viewers["viewers_left"] == 0  # hung up


def test_one_encode_serves_every_viewer(three_viewers: dict[str, object]) -> None:
    encoded = three_viewers["encoded_frames"]
    assert isinstance(encoded, int)
    # 3 viewers x 40 frames were delivered from fewer encoded frames than one viewer's share x2
    assert encoded < 2 * 40 + 60  # stream start-up placeholders included


def test_a_viewer_reaches_a_gateway_behind_a_port_forward() -> None:
    """The gateway advertises an address it does not have (a UDP port forward's public side);
    the viewer is told only that address and the gateway only sees the viewer through the
    forward: the redacted picture comes through it."""
    why = netns.available()
    if why:
        pytest.skip(why)
    r = netns.run_python("tests.webrtc_probe", "1", "30", "forwarded")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    (v,) = result["viewers"]
    assert v["frames"] >= 25 and v["min_face_covered"] > 0.9
    assert result["forwarded"]["out"] > 25  # the media came through the forward


def test_an_offer_without_video_is_refused() -> None:
    offer = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
    with pytest.raises(WebRtcError, match="no video"):
        asyncio.run(WebRtcHub().answer(offer))


def test_first_video_codec() -> None:
    sdp = ("v=0\r\nm=audio 9 X 111\r\na=rtpmap:111 opus/48000/2\r\n"
           "m=video 9 X 99 97\r\na=rtpmap:97 VP8/90000\r\na=rtpmap:99 H264/90000\r\n")
    assert _first_video_codec(sdp) == "H264"
    assert _first_video_codec("v=0\r\n") is None


ANSWER = ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
          "m=video 40000 UDP/TLS/RTP/SAVPF 102\r\nc=IN IP4 10.0.0.7\r\n"
          "a=candidate:1a2b 1 udp 2130706431 10.0.0.7 40000 typ host\r\n"
          "a=candidate:3c4d 1 udp 1694498815 198.51.100.1 40000 typ srflx raddr 10.0.0.7 "
          "rport 40000\r\n"
          "a=candidate:5e6f 1 udp 2130706430 172.17.0.2 40001 typ host\r\n")


def test_the_advertised_host_is_offered_first_at_the_same_ports() -> None:
    sdp = advertise(ANSWER, "203.0.113.5")
    cands = [ln.split() for ln in sdp.split("\r\n") if ln.startswith("a=candidate:")]
    hosts = {(c[4], c[5]) for c in cands if c[7] == "host"}
    assert hosts == {("10.0.0.7", "40000"), ("203.0.113.5", "40000"),
                     ("172.17.0.2", "40001"), ("203.0.113.5", "40001")}
    # each added candidate sits before its private twin and outranks it
    for i, c in enumerate(cands):
        if c[4] == "203.0.113.5":
            twin = cands[i + 1]
            assert twin[5] == c[5] and int(c[3]) > int(twin[3])
    assert len({c[0] for c in cands}) == len(cands)  # foundations stay distinct
    assert "c=IN IP4 203.0.113.5" in sdp
    assert sum(1 for c in cands if c[7] == "srflx") == 1  # other candidates kept as they were
    assert "c=IN IP6 2001:db8::5" in advertise(ANSWER, "2001:db8::5")


def test_a_host_name_is_resolved_for_the_answer() -> None:
    assert asyncio.run(_resolve("localhost")) in ("127.0.0.1", "::1")
    assert asyncio.run(_resolve("203.0.113.5")) == "203.0.113.5"
