"""Inside a network namespace (see tests/netns.py): camera simulator -> live stream -> WebRTC
hub -> aiortc viewers. Prints one JSON line: time to first frame, frames decoded per viewer,
face coverage, and the encoder's frame count (one encode however many watch)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription

from engines.redact import Method, Style
from engines.registry import VIDEO_PROFILE, build_detector
from pipeline.live import LiveOptions, LiveStream, Status, no_signal_frame
from pipeline.webrtc import WebRtcHub
from tests.conftest import fill_fraction, region
from tests.live_helpers import Camera, read_stamp

MAGENTA = (255, 0, 255)


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
    sid, answer = await hub.answer(pc.localDescription.sdp)
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


async def main(n_viewers: int, frames: int) -> dict[str, Any]:
    cam = Camera().start()
    hub = WebRtcHub()
    stream = LiveStream("probe", cam.url, lambda: build_detector(("faces",), VIDEO_PROFILE),
                        Style(Method.FILL, fill_bgr=MAGENTA),
                        LiveOptions(width=320, height=240, fps=25), sinks=[hub.push])
    hub._request_keyframe = stream.request_keyframe
    stream.start()
    out: dict[str, Any] = {"camera": cam}
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
    print(json.dumps(asyncio.run(main(n, k))))
