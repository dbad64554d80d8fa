"""Inside a network namespace (see tests/netns.py): camera simulator -> live stream -> WebRTC
hub -> aiortc viewers. Prints one JSON line: time to first frame, frames decoded per viewer,
face coverage, and the encoder's frame count (one encode however many watch).

``forwarded`` as the third argument: the gateway sits behind a port forward (a user-space UDP
forwarder, as a container runtime's proxy is) at an address it does not have, which it is told
to advertise; the viewer is given only the advertised candidates, so the picture can reach it
through the forward and nowhere else."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription

from engines.redact import Method, Style
from pipeline.live import LiveOptions, LiveStream, Status, no_signal_frame
from pipeline.settings import RedactSettings
from pipeline.webrtc import WebRtcHub
from tests.conftest import fill_fraction, region
from tests.live_helpers import Camera, read_stamp

MAGENTA = (255, 0, 255)


ADVERTISED = "10.99.0.9"  # the forward's public side: an address the gateway does not have


class _Forward(asyncio.DatagramProtocol):
    """One forwarded UDP port: viewer -> ``public`` -> ``inside``, and the answers back."""

    def __init__(self, inside: tuple[str, int], counts: dict[str, int]) -> None:
        self.inside, self.counts = inside, counts
        self.public: Any = None
        self.viewer: tuple[str, int] | None = None
        self.relay: Any = None

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.viewer = addr
        self.counts["in"] = self.counts.get("in", 0) + 1
        self.relay.sendto(data, self.inside)


class _Back(asyncio.DatagramProtocol):
    def __init__(self, fwd: _Forward) -> None:
        self.fwd = fwd

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.fwd.viewer is not None:
            self.fwd.counts["out"] = self.fwd.counts.get("out", 0) + 1
            self.fwd.public.sendto(data, self.fwd.viewer)


async def forward_advertised(answer: str, counts: dict[str, int]) -> str:
    """Forward every advertised candidate's port to its private twin (the next candidate line,
    same port); returns the answer holding the advertised candidates only."""
    subprocess.run(["ip", "addr", "add", f"{ADVERTISED}/32", "dev", "lo"], check=False)
    loop = asyncio.get_running_loop()
    lines = answer.split("\r\n")
    kept = []
    for i, line in enumerate(lines):
        parts = line.split()
        if not line.startswith("a=candidate:"):
            kept.append(line)
        elif parts[4] == ADVERTISED:
            twin = lines[i + 1].split()
            assert twin[5] == parts[5], "the advertised candidate keeps its twin's port"
            fwd = _Forward((twin[4], int(twin[5])), counts)
            fwd.public, _ = await loop.create_datagram_endpoint(
                lambda f=fwd: f, local_addr=(ADVERTISED, int(parts[5])))  # type: ignore[misc]
            fwd.relay, _ = await loop.create_datagram_endpoint(
                lambda f=fwd: _Back(f), local_addr=(twin[4], 0))  # type: ignore[misc]
            kept.append(line)
    return "\r\n".join(kept)


async def viewer(hub: WebRtcHub, frames: int, out: dict[str, Any]) -> None:
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    @pc.on("track")
    def on_track(track: Any) -> None:
        if not got.done():
            got.set_result(track)

    t0 = time.monotonic()
    await pc.setLocalDescription(await pc.createOffer())
    offer = pc.localDescription.sdp
    if "forwarded" in out:
        # the gateway learns the viewer only from the checks coming through the forward (as
        # behind a NAT): none of the viewer's own addresses are in the offer
        offer = "\r\n".join(ln for ln in offer.split("\r\n")
                             if not ln.startswith(("a=candidate:", "a=end-of-candidates")))
    sid, answer = await hub.answer(offer)
    if "forwarded" in out:
        answer = await forward_advertised(answer, out["forwarded"])
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    track = await asyncio.wait_for(got, 10)
    coverage: list[float] = []
    placeholder = no_signal_frame(320, 240).astype(np.int16)
    first = None
    for _ in range(frames):
        frame = await asyncio.wait_for(track.recv(), 10)
        if first is None:
            first = time.monotonic() - t0
        px = frame.to_ndarray(format="bgr24")
        if np.abs(px.astype(np.int16) - placeholder).mean() < 10:
            continue  # the no-signal picture
        coverage.append(fill_fraction(region(px, out["camera"].face(read_stamp(px))), MAGENTA,
                                      tol=40))
    out.setdefault("viewers", []).append({
        "first_frame_s": round(first or -1, 3), "frames": len(coverage),
        "min_face_covered": round(float(np.min(coverage)), 3) if coverage else None})
    await hub.hangup(sid)
    await pc.close()


async def main(n_viewers: int, frames: int, forwarded: bool = False) -> dict[str, Any]:
    cam = Camera().start()
    hub = WebRtcHub(advertised_host=ADVERTISED if forwarded else None)
    stream = LiveStream("probe", cam.url,
                        RedactSettings(("faces",), Style(Method.FILL, fill_bgr=MAGENTA)),
                        LiveOptions(width=320, height=240, fps=25), sinks=[hub.push])
    hub._request_keyframe = stream.request_keyframe
    stream.start()
    out: dict[str, Any] = {"camera": cam}
    if forwarded:
        out["forwarded"] = {}  # datagrams through the forward, each way
    try:
        end = time.monotonic() + 15
        while stream.stats.status is not Status.LIVE and time.monotonic() < end:
            await asyncio.sleep(0.05)
        await asyncio.gather(*(viewer(hub, frames, out) for _ in range(n_viewers)))
        out["encoded_frames"] = stream.encoder.frames if stream.encoder else 0
        out["frames_redacted"] = stream.stats.frames_redacted
        out["viewers_left"] = hub.viewers
    finally:
        stream.stop()
        cam.stop()
        await hub.close()
    out.pop("camera")
    return out


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    print(json.dumps(asyncio.run(main(n, k, "forwarded" in sys.argv[3:]))))
