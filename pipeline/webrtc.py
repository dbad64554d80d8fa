"""WebRTC viewers of a live stream (aiortc), fed by the stream's single H.264 encode.

Each viewer gets a :class:`PacketTrack` whose ``recv()`` returns the already encoded access
units as ``av.Packet``: aiortc only packetizes them, so ten viewers cost about what one costs.
A viewer's keyframe request (PLI) is passed to the shared encoder (at most twice a second), and
a viewer that falls behind skips to the next keyframe rather than decoding a broken picture.

Signalling is WHEP-shaped (see :class:`WebRtcHub`): an SDP offer in, an SDP answer out with its
ICE candidates gathered (no trickle), a session id to hang up with.

Behind a one-to-one NAT (a cloud machine with a public address, a container whose ports are
forwarded one to one) the gateway's own addresses are private: ``advertised_host`` adds, for
every host candidate, the same port at that address (first, so viewers try it first), the way
media servers' "NAT 1:1 mapping" settings do. STUN and TURN servers are passed to aiortc.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av

from engines.errors import RedactionError
from pipeline.live_encode import TIME_BASE, EncodedPacket

log = logging.getLogger(__name__)

QUEUE_PACKETS = 90  # about 3 s at 30 frames/s; a viewer further behind skips to a keyframe
KEYFRAME_REQUEST_GAP_S = 0.5


class WebRtcError(RedactionError, ValueError):
    """A viewer's offer that cannot be answered (no H.264 video in it, malformed SDP)."""


@dataclass(frozen=True)
class IceServer:
    urls: Sequence[str]
    username: str | None = None
    credential: str | None = None


def _aiortc() -> Any:
    import aiortc

    return aiortc


class PacketTrack:
    """A video track of pre-encoded packets (built lazily: aiortc is imported on first use)."""

    def __new__(cls, loop: asyncio.AbstractEventLoop) -> Any:
        aiortc = _aiortc()

        class _Track(aiortc.MediaStreamTrack):  # type: ignore[name-defined]
            kind = "video"

            def __init__(self) -> None:
                super().__init__()
                self.queue: asyncio.Queue[EncodedPacket] = asyncio.Queue(QUEUE_PACKETS)
                self.waiting_for_key = True
                self.dropped = 0
                self.sent = 0

            def offer(self, pkt: EncodedPacket) -> None:
                """From the encoder's thread."""
                loop.call_soon_threadsafe(self._put, pkt)

            def _put(self, pkt: EncodedPacket) -> None:
                if self.waiting_for_key and not pkt.keyframe:
                    self.dropped += 1
                    return
                if self.queue.full():
                    # behind: drop what waits and resume at the next keyframe
                    while not self.queue.empty():
                        self.queue.get_nowait()
                        self.dropped += 1
                    self.waiting_for_key = not pkt.keyframe
                    if self.waiting_for_key:
                        self.dropped += 1
                        return
                self.waiting_for_key = False
                self.queue.put_nowait(pkt)

            async def recv(self) -> av.Packet:
                pkt = await self.queue.get()
                out = av.Packet(pkt.data)
                out.pts = round(pkt.pts_s / TIME_BASE)
                out.time_base = Fraction(TIME_BASE)
                self.sent += 1
                return out

        return _Track()


@dataclass
class _Session:
    pc: Any
    track: Any
    created: float = field(default_factory=time.monotonic)


def _first_video_codec(sdp: str) -> str | None:
    """The codec the answer's video section puts first (the one media is sent with)."""
    lines = sdp.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("m=video"):
            fmts = line.split()[3:]
            if not fmts:
                return None
            for rest in lines[i + 1:]:
                if rest.startswith("m="):
                    break
                if rest.startswith(f"a=rtpmap:{fmts[0]} "):
                    return rest.split()[1].split("/")[0].upper()
    return None


async def _resolve(host: str) -> str:
    """``host`` as an IPv4/IPv6 address (SDP candidates carry addresses, not names)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    if not infos:
        raise WebRtcError(f"the advertised host {host!r} does not resolve")
    return str(infos[0][4][0])


def advertise(sdp: str, address: str) -> str:
    """``sdp`` with, before each host candidate, a copy at ``address`` (same port, a higher
    priority, its own foundation); the media's connection line names ``address`` too."""
    out: list[str] = []
    for line in sdp.split("\r\n"):
        parts = line.split()
        if (line.startswith("a=candidate:") and len(parts) >= 8 and parts[7] == "host"
                and parts[4] != address):
            foundation = parts[0].split(":", 1)[1]
            priority = min(int(parts[3]) + 1, 2**31 - 1)
            out.append(" ".join([f"a=candidate:{foundation}n", parts[1], parts[2],
                                 str(priority), address, *parts[5:]]))
        elif line.startswith("c=IN IP"):
            family = "IP6" if ":" in address else "IP4"
            line = f"c=IN {family} {address}"
        out.append(line)
    return "\r\n".join(out)


class WebRtcHub:
    """The WebRTC viewers of one stream. Use from one asyncio event loop; :meth:`push` (the
    encoder's packet sink) may be called from any thread."""

    def __init__(self, request_keyframe: Callable[[], None] | None = None,
                 ice_servers: Sequence[IceServer] = (),
                 advertised_host: str | None = None) -> None:
        self._request_keyframe = request_keyframe
        self._advertised_host = advertised_host
        self._last_key_request = 0.0
        self._ice_servers = list(ice_servers)
        self._sessions: dict[str, _Session] = {}

    @property
    def viewers(self) -> int:
        return len(self._sessions)

    def push(self, pkt: EncodedPacket) -> None:
        for s in list(self._sessions.values()):
            s.track.offer(pkt)

    def keyframe(self) -> None:
        now = time.monotonic()
        if self._request_keyframe is not None and now - self._last_key_request \
                >= KEYFRAME_REQUEST_GAP_S:
            self._last_key_request = now
            self._request_keyframe()

    async def answer(self, offer_sdp: str) -> tuple[str, str]:
        """Answer a viewer's offer; returns (session id, answer SDP)."""
        aiortc = _aiortc()
        if "m=video" not in offer_sdp:
            raise WebRtcError("the offer has no video section")
        config = aiortc.RTCConfiguration(iceServers=[
            aiortc.RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
            for s in self._ice_servers])
        pc = aiortc.RTCPeerConnection(configuration=config)
        track = PacketTrack(asyncio.get_running_loop())
        # the transceiver exists before the offer is applied, so that the offer's video section
        # binds to it and its codec preference (H.264 constrained baseline: what the shared
        # encode produces) decides the answer
        transceiver = pc.addTransceiver(track, direction="sendonly")
        codecs = aiortc.RTCRtpSender.getCapabilities("video").codecs
        h264 = [c for c in codecs if c.mimeType.lower() == "video/h264"
                and str(c.parameters.get("packetization-mode")) == "1"
                and str(c.parameters.get("profile-level-id", "")).lower().startswith("42")]
        rtx = [c for c in codecs if c.mimeType.lower() == "video/rtx"]
        transceiver.setCodecPreferences(h264 + rtx)
        try:
            await pc.setRemoteDescription(aiortc.RTCSessionDescription(offer_sdp, "offer"))
        except (ValueError, TypeError, aiortc.exceptions.InternalError,
                aiortc.exceptions.InvalidAccessError, aiortc.exceptions.OperationError) as exc:
            await pc.close()
            raise WebRtcError(f"the offer cannot be answered: {exc}") from exc
        # the shared encode answers keyframe requests (PLI) for every viewer at once
        transceiver.sender._send_keyframe = self.keyframe
        answer = await pc.createAnswer()
        if answer is None or _first_video_codec(answer.sdp) != "H264":
            await pc.close()
            raise WebRtcError("the viewer does not accept H.264 video")
        await pc.setLocalDescription(answer)
        sid = uuid.uuid4().hex
        self._sessions[sid] = _Session(pc, track)

        @pc.on("connectionstatechange")
        async def _state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self.hangup(sid)

        self.keyframe()
        log.info("webrtc viewer %s joined (%d watching)", sid[:8], len(self._sessions))
        sdp = pc.localDescription.sdp
        if self._advertised_host:
            sdp = advertise(sdp, await _resolve(self._advertised_host))
        return sid, sdp

    async def hangup(self, sid: str) -> bool:
        s = self._sessions.pop(sid, None)
        if s is None:
            return False
        await s.pc.close()
        log.info("webrtc viewer %s left (%d watching)", sid[:8], len(self._sessions))
        return True

    async def close(self) -> None:
        for sid in list(self._sessions):
            await self.hangup(sid)
