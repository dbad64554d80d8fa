"""Push ingest: a camera (a dashcam, a phone app, ``ffmpeg -f rtsp``) publishes H.264 or H.265
video (audio, if any, is dropped) to the gateway with RTSP ANNOUNCE/RECORD instead of the gateway
pulling from it.

The RTSP server (:meth:`pipeline.rtsp_server.RtspServer.add_publish_mount`) depayloads what the
publisher sends into access units and hands each to a :class:`PushFeed`; the stream's
reader thread takes them from the feed, decodes them with PyAV and goes on exactly as for a
pulled camera (detection, redaction, one encode). One publisher at a time: a second one is
refused while the first is sending; one that went silent (a dashcam that lost its network
without hanging up) is replaced by the next that comes.

When the reader falls behind, the feed drops what waits and resumes at the next keyframe, so the
decoder never sees a broken group of pictures.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class PushedUnit:
    data: bytes  # one H.264/H.265 access unit, Annex B
    keyframe: bool
    arrived: float  # monotonic time it came off the network


class PublisherGone(EOFError):
    """The publisher hung up (or was silent for longer than the read timeout)."""


class PushFeed:
    """Access units from the publisher (GStreamer's threads) to the stream's reader (one
    thread). ``max_units`` bounds what waits: about 4 s at 30 frames/s."""

    def __init__(self, max_units: int = 120, stale_s: float = 3.0) -> None:
        self._units: collections.deque[PushedUnit] = collections.deque()
        self._max = max_units
        self._stale_s = stale_s
        self._last_unit = 0.0
        self._cv = threading.Condition()
        self._session = 0  # counts publishers; the reader notices a new one
        self._publishing = False
        self._waiting_for_key = True
        self.codec = "h264"  # of the current publisher's video
        self.units_in = 0
        self.units_dropped = 0
        self.publishers = 0

    @property
    def publishing(self) -> bool:
        with self._cv:
            return self._publishing

    def busy(self) -> bool:
        """A publisher is sending (it sent something in the last ``stale_s`` seconds)."""
        with self._cv:
            return self._busy()

    def _busy(self) -> bool:
        return self._publishing and time.monotonic() - self._last_unit < self._stale_s

    # from the RTSP server ------------------------------------------------------------------
    def begin(self, codec: str = "h264") -> int | None:
        """A publisher of ``codec`` video (FFmpeg's decoder name: h264, hevc) starts: its
        session number, or None when another one is sending."""
        with self._cv:
            if self._busy():
                return None
            self.codec = codec
            self._publishing = True
            self._last_unit = time.monotonic()
            self._session += 1
            self.publishers += 1
            self._units.clear()
            self._waiting_for_key = True
            self._cv.notify_all()
            return self._session

    def put(self, session: int, data: bytes, keyframe: bool) -> None:
        with self._cv:
            if not self._publishing or session != self._session:
                return  # a replaced publisher
            self._last_unit = time.monotonic()
            self.units_in += 1
            if len(self._units) >= self._max:
                # the reader is behind: drop what waits, resume at a keyframe
                self.units_dropped += len(self._units)
                self._units.clear()
                self._waiting_for_key = True
            if self._waiting_for_key and not keyframe:
                self.units_dropped += 1
                return
            self._waiting_for_key = False
            self._units.append(PushedUnit(data, keyframe, time.monotonic()))
            self._cv.notify_all()

    def end(self, session: int | None = None) -> None:
        """Publisher ``session`` hung up (None: whichever is publishing)."""
        with self._cv:
            if session is None or session == self._session:
                self._publishing = False
                self._cv.notify_all()

    # from the stream's reader -------------------------------------------------------------
    def wait_publisher(self, timeout: float) -> int | None:
        """The current publisher's session number, once one is publishing (None on time-out)."""
        with self._cv:
            self._cv.wait_for(lambda: self._publishing, timeout)
            return self._session if self._publishing else None

    def get(self, session: int, timeout: float) -> PushedUnit:
        """The next access unit of ``session``; raises :class:`PublisherGone` when that
        publisher hung up or sent nothing for ``timeout`` seconds."""
        with self._cv:
            self._cv.wait_for(lambda: self._units or self._session != session
                              or not self._publishing, timeout)
            if self._session == session and self._units:
                return self._units.popleft()
            if self._session != session or not self._publishing:
                raise PublisherGone("the publisher hung up")
            raise PublisherGone(f"the publisher sent nothing for {timeout:.0f} s")

    def wake(self) -> None:
        """Wake a reader waiting on the feed (the stream is stopping)."""
        with self._cv:
            self._session += 1
            self._cv.notify_all()
