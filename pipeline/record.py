"""Recording a live stream's single H.264 encode to a directory of MP4 segments.

A :class:`SegmentRecorder` is one more packet sink of :class:`pipeline.live_encode.LiveEncoder`:
it re-muxes the encoder's access units (no second encode) into files of about ``segment_s``
seconds, named after the UTC time of their first frame, ``20250102T030405Z.mp4`` (``-1``,
``-2``... on a collision).

Design:

* **Never stalls the live output.** :meth:`SegmentRecorder.push` only puts the packet on a
  bounded queue; the recorder's own writer thread does every disk and muxer operation. When the
  queue is full (the disk stalls) the packet is dropped and counted, and the writer skips what
  follows until the next keyframe, so no segment holds a GOP with a missing frame (the picture
  freezes over the hole instead of smearing). ``push`` never raises.
* **Segments start at keyframes.** A new segment starts at the first keyframe at or after
  ``segment_s`` of stream time since the open one started, or at a keyframe whose SPS/PPS differ
  from the open segment's (the camera changed resolution: one MP4 track holds one size), or when
  the stream clock goes back (a new encoder).
* **Crash-safe files.** Segments are fragmented MP4 (``frag_keyframe+empty_moov+
  default_base_moof``: a header up front, then one self-contained fragment per GOP, flushed as
  written), written as ``<name>.mp4.part`` and renamed to ``<name>.mp4`` once finished. A crash
  loses at most the GOP being written: a recorder started on a directory with leftover ``.part``
  files trims each to its last complete fragment and renames it to ``.mp4`` when it still plays
  (an empty or unplayable one is deleted).
* **The MP4 track is described from the stream itself.** The size comes from decoding the
  segment's first keyframe with FFmpeg's h264 decoder; the track's extradata is that keyframe's
  SPS and PPS in Annex B form, which the mov muxer turns into the ``avcC`` box (and, because the
  extradata is Annex B, it also converts every packet from start codes to length prefixes).
  The stream is added from a template so that no encoder is ever opened for it: an output stream
  made with ``add_stream("h264")`` opens libx264 when the header is written, and libx264's own
  headers (High profile, another level) then replace the extradata given.
  Timestamps are the stream clock relative to the segment's first frame, in 1/90000 s, each
  packet's duration being the gap to the next one (the writer holds one packet back).
* **Wall-clock names.** The stream clock is mapped to UTC through the wall time at which the
  first packet was pushed; the mapping is renewed when it drifts by more than 30 s (a clock
  step) or when the stream clock restarts.
* **Retention.** After each segment closes, the oldest finished segments are deleted while their
  total size exceeds ``max_bytes`` or while they ended more than ``keep_s`` seconds ago. The open
  segment is never deleted.
* **Errors** (directory missing or not writable, disk full, muxer errors) are logged once per
  distinct message, kept in ``stats["last_error"]``, and the writer tries again at a keyframe at
  most once a second. What a failed segment already holds is kept when it plays.
"""

from __future__ import annotations

import calendar
import contextlib
import io
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from pipeline.live_encode import EncodedPacket

log = logging.getLogger(__name__)

TIME_BASE = Fraction(1, 90000)
TICKS = 90000  # per second
MP4_OPTIONS = {"movflags": "frag_keyframe+empty_moov+default_base_moof",
               "flush_packets": "1"}
RETRY_S = 1.0  # at most one attempt to open a segment per this many seconds after a failure
REANCHOR_S = 30.0  # stream clock vs wall clock drift that renews the mapping
NAME_FORMAT = "%Y%m%dT%H%M%S"
NAME_RE = re.compile(r"^(\d{8}T\d{6})Z(?:-(\d+))?\.mp4$")
PART = ".part"

_STOP = object()


@dataclass(frozen=True)
class Segment:
    """A finished recording file.

    start: UTC epoch seconds of its first frame (whole seconds, from the name, for a file this
    recorder did not write). duration_s: from its first frame to the end of its last. bytes: file
    size. frames: frame count, None when unknown (a file found on disk).
    """

    path: Path
    start: float
    duration_s: float
    bytes: int
    frames: int | None

    @property
    def end(self) -> float:
        return self.start + self.duration_s


@dataclass
class _Open:
    """The segment being written."""

    container: Any  # av.container.OutputContainer
    stream: Any  # av.stream.Stream
    part: Path
    path: Path
    start: float  # UTC epoch seconds
    base: int  # stream clock of its first frame, ticks
    params: bytes  # the SPS and PPS it was opened with
    frames: int = 0
    end: int = 0  # stream clock at the end of the last muxed frame, ticks
    interval: int = 3000  # last frame interval, ticks: the held packet's duration at the end
    held: tuple[bytes, int, bool] | None = None  # (data, ticks, keyframe) not yet muxed


# --------------------------------------------------------------------------------------------
# H.264 Annex B


def nal_units(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B access unit, start codes and trailing zero bytes removed."""
    starts = []
    i = data.find(b"\x00\x00\x01")
    while i >= 0:
        starts.append(i + 3)
        i = data.find(b"\x00\x00\x01", i + 3)
    units = []
    for k, s in enumerate(starts):
        e = starts[k + 1] - 3 if k + 1 < len(starts) else len(data)
        unit = data[s:e].rstrip(b"\x00")
        if unit:
            units.append(unit)
    return units


def parameter_sets(data: bytes) -> bytes:
    """The SPS and PPS NAL units of an access unit as Annex B bytes (empty when it has none)."""
    return b"".join(b"\x00\x00\x00\x01" + u for u in nal_units(data) if u[0] & 0x1F in (7, 8))


def _has_sps_pps(params: bytes) -> bool:
    types = {u[0] & 0x1F for u in nal_units(params)}
    return {7, 8} <= types


# --------------------------------------------------------------------------------------------
# files


def _name_start(name: str) -> float | None:
    m = NAME_RE.match(name)
    if m is None:
        return None
    return float(calendar.timegm(time.strptime(m.group(1), NAME_FORMAT)))


def _name_order(path: Path) -> tuple[float, int, str]:
    m = NAME_RE.match(path.name)
    start = _name_start(path.name)
    return (start if start is not None else 0.0,
            int(m.group(2)) if m is not None and m.group(2) else 0, path.name)


def _complete_length(path: Path) -> int:
    """Bytes of ``path`` up to the end of its last complete top-level MP4 box that is not a
    ``moof`` left without its ``mdat`` (what a crash mid-fragment leaves is cut off)."""
    size = path.stat().st_size
    good = pos = 0
    with path.open("rb") as f:
        while pos + 8 <= size:
            f.seek(pos)
            head = f.read(16)
            box_size, kind = int.from_bytes(head[:4], "big"), head[4:8]
            if box_size == 1 and len(head) == 16:
                box_size = int.from_bytes(head[8:16], "big")
            elif box_size == 0:
                box_size = size - pos
            if box_size < 8 or pos + box_size > size:
                break
            pos += box_size
            if kind != b"moof":
                good = pos
    return good


def probe(path: Path) -> float | None:
    """Duration in seconds of an MP4 whose first frame decodes, else None."""
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                return None
            st = c.streams.video[0]
            next(c.decode(st))
            if c.duration is not None:
                return c.duration / 1_000_000
            if st.duration is not None:
                return float(st.duration * st.time_base)
            return 0.0
    except (av.FFmpegError, StopIteration, OSError, ValueError):
        return None


def salvage(part: Path) -> Path | None:
    """Finish a ``.part`` file left by a crash: cut it after its last complete fragment and
    rename it to ``.mp4`` if it plays (returns the new path), else delete it."""
    try:
        size = part.stat().st_size
        keep = _complete_length(part) if size else 0
        if 0 < keep < size:
            os.truncate(part, keep)
        if keep == 0 or probe(part) is None:
            log.warning("recording %s left by a crash does not play; deleted", part)
            part.unlink()
            return None
        target = part.with_name(part.name[: -len(PART)])
        if target.exists():
            target = _unique(part.parent, target.name)
        part.rename(target)
        log.info("recording %s left by a crash kept as %s", part.name, target.name)
        return target
    except OSError as e:
        log.error("cannot finish %s: %s", part, e)
        return None


def _unique(directory: Path, name: str) -> Path:
    """A free ``<stem>[-N].mp4`` in ``directory`` (neither it nor its ``.part`` exists)."""
    m = NAME_RE.match(name)
    stem = m.group(1) + "Z" if m else name.removesuffix(".mp4")
    n = 0
    while True:
        path = directory / (f"{stem}.mp4" if n == 0 else f"{stem}-{n}.mp4")
        if not path.exists() and not path.with_name(path.name + PART).exists():
            return path
        n += 1


# --------------------------------------------------------------------------------------------


class SegmentRecorder:
    """Records a live stream's encoded packets to MP4 segments in ``directory``.

    Register :meth:`push` as a sink of the stream's :class:`~pipeline.live_encode.LiveEncoder`;
    call :meth:`close` when the stream ends.

    directory: where segments go (created when needed). segment_s: stream seconds per segment
    (cut at the first keyframe at or after it). keep_s: delete finished segments that ended more
    than this many seconds ago (None: keep). max_bytes: delete the oldest finished segments while
    they hold more than this (None: no limit). queue_packets: packets that may wait for the disk
    before new ones are dropped.

    Leftover ``.part`` files of a crashed recorder in ``directory`` are finished on construction.
    """

    def __init__(self, directory: Path, segment_s: float = 60.0, keep_s: float | None = None,
                 max_bytes: int | None = None, queue_packets: int = 300) -> None:
        if segment_s <= 0:
            raise ValueError("segment_s must be positive")
        self.directory = Path(directory)
        self.segment_s = segment_s
        self.keep_s = keep_s
        self.max_bytes = max_bytes
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, queue_packets))
        self._lock = threading.Lock()
        self._known: dict[str, Segment] = {}  # by file name: what this recorder knows of it
        self._closed = False
        self._gap = False  # packets were dropped since the last one queued (producer side)
        # writer state
        self._seg: _Open | None = None
        self._need_key = True
        self._last_ticks: int | None = None
        self._anchor: float | None = None  # UTC epoch seconds at stream clock 0
        self._params = b""  # the last SPS/PPS seen
        self._retry_at = 0.0
        self._errors_logged: set[str] = set()
        # stats
        self._packets_written = 0
        self._frames_written = 0
        self._segments_written = 0
        self._packets_dropped = 0
        self._packets_skipped = 0
        self._last_error = ""
        self._recover()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"record-{self.directory.name}")
        self._thread.start()

    # public -------------------------------------------------------------------------------
    def push(self, pkt: EncodedPacket) -> None:
        """Queue one encoded packet for the writer. Never blocks and never raises: a packet
        that does not fit is dropped (``stats["packets_dropped"]``)."""
        if self._closed:
            return
        try:
            self._queue.put_nowait((pkt, time.time(), self._gap))
            self._gap = False
        except queue.Full:
            self._gap = True
            self._packets_dropped += 1
        except Exception:  # nothing may reach the encoder's output thread
            log.exception("recorder push failed")

    def close(self, timeout: float = 5.0) -> None:
        """Finish the open segment (everything queued is written first) and stop the writer.
        Waits at most ``timeout`` seconds; a writer stuck on the disk finishes in the
        background."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(_STOP, timeout=max(0.01, timeout))
        except queue.Full:
            log.warning("recorder of %s: the writer is stuck; stopping it anyway", self.directory)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("recorder of %s: the writer did not finish within %.1f s",
                        self.directory, timeout)

    def segments(self) -> list[Segment]:
        """Finished segments in the directory, oldest first (files this recorder did not write
        are probed once, for their duration)."""
        try:
            paths = [p for p in self.directory.iterdir() if NAME_RE.match(p.name)]
        except OSError:
            return []
        out = []
        with self._lock:
            for p in paths:
                try:
                    size = p.stat().st_size
                except OSError:
                    continue
                seg = self._known.get(p.name)
                if seg is None or seg.bytes != size:
                    start = _name_start(p.name)
                    assert start is not None
                    seg = Segment(p, start, probe(p) or 0.0, size, None)
                    self._known[p.name] = seg
                out.append(seg)
            names = {p.name for p in paths}
            for name in [n for n in self._known if n not in names]:
                del self._known[name]
        return sorted(out, key=lambda s: (s.start, _name_order(s.path)))

    @property
    def stats(self) -> dict[str, Any]:
        """packets_written: packets muxed (the open segment included); frames_written: frames in
        finished segments; segments_written; packets_dropped: lost to a full queue;
        packets_skipped: not recorded while waiting for a keyframe (start, after a drop or an
        error); recording: a segment is open; last_error: the last failure, '' if none."""
        return {"packets_written": self._packets_written,
                "frames_written": self._frames_written,
                "segments_written": self._segments_written,
                "packets_dropped": self._packets_dropped,
                "packets_skipped": self._packets_skipped,
                "recording": self._seg is not None,
                "last_error": self._last_error}

    # writer -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                try:
                    self._handle(*item)
                except Exception as e:  # keep recording whatever happened to one packet
                    self._fail(f"recording to {self.directory} failed", e)
                    self._abandon()
        finally:
            try:
                self._finish()
            except Exception as e:
                self._fail("finishing the last segment failed", e)
                self._abandon()

    def _handle(self, pkt: EncodedPacket, wall: float, gap: bool) -> None:
        ticks = round(pkt.pts_s * TICKS)
        if self._last_ticks is not None and ticks <= self._last_ticks:
            # the stream clock went back: a new timeline, a new segment
            self._finish()
            self._anchor = None
            self._need_key = True
        self._last_ticks = ticks
        if gap:
            self._need_key = True
        params = parameter_sets(pkt.data) if pkt.keyframe else b""
        if params:
            self._params = params
        if pkt.keyframe:
            seg = self._seg
            if seg is not None and (
                    (params and params != seg.params)
                    or ticks - seg.base >= round(self.segment_s * TICKS) - TICKS // 1000):
                self._finish(ticks)
            if self._seg is None:
                if time.monotonic() < self._retry_at:
                    self._packets_skipped += 1
                    self._need_key = True
                    return
                try:
                    self._open(pkt, ticks, wall)
                except Exception as e:
                    self._fail(f"cannot start a segment in {self.directory}", e)
                    self._retry_at = time.monotonic() + RETRY_S
                    self._packets_skipped += 1
                    self._need_key = True
                    return
            self._need_key = False
        if self._need_key or self._seg is None:
            self._packets_skipped += 1
            return
        self._write(pkt.data, ticks, pkt.keyframe)

    def _open(self, pkt: EncodedPacket, ticks: int, wall: float) -> None:
        params = self._params
        if not _has_sps_pps(params):
            raise ValueError("no SPS/PPS seen before the keyframe")
        data = pkt.data if parameter_sets(pkt.data) else params + pkt.data
        if self._anchor is None or abs(self._anchor + pkt.pts_s - wall) > REANCHOR_S:
            self._anchor = wall - pkt.pts_s
        start = self._anchor + pkt.pts_s
        self.directory.mkdir(parents=True, exist_ok=True)
        path = _unique(self.directory, time.strftime(NAME_FORMAT, time.gmtime(start)) + "Z.mp4")
        part = path.with_name(path.name + PART)
        with av.open(io.BytesIO(data), "r", format="h264") as probe_in:
            template = probe_in.streams.video[0]
            frame = next(probe_in.decode(template))  # the keyframe decodes: its true size
            out = av.open(str(part), "w", format="mp4", container_options=MP4_OPTIONS)
            try:
                stream = out.add_stream_from_template(template)
                stream.time_base = TIME_BASE
                ctx = stream.codec_context
                ctx.width, ctx.height = frame.width, frame.height
                ctx.extradata = params  # Annex B: the muxer writes avcC from it
                out.start_encoding()
            except BaseException:
                with contextlib.suppress(Exception):
                    out.close()
                with contextlib.suppress(OSError):
                    part.unlink()
                raise
        self._seg = _Open(out, stream, part, path, start, ticks, params, end=ticks)
        log.info("recording %s (%dx%d)", part, frame.width, frame.height)

    def _write(self, data: bytes, ticks: int, keyframe: bool) -> None:
        seg = self._seg
        assert seg is not None
        if seg.held is not None:
            self._mux(seg, ticks - seg.held[1])
        seg.held = (data, ticks, keyframe)

    def _mux(self, seg: _Open, duration: int) -> None:
        assert seg.held is not None
        data, ticks, keyframe = seg.held
        seg.held = None
        p = av.Packet(data)
        p.pts = p.dts = ticks - seg.base
        p.duration = max(1, duration)
        p.time_base = TIME_BASE
        p.stream = seg.stream
        p.is_keyframe = keyframe
        seg.container.mux(p)
        seg.interval = p.duration
        seg.end = ticks + p.duration
        seg.frames += 1
        self._packets_written += 1

    def _finish(self, next_ticks: int | None = None) -> None:
        """Close the open segment, ending its last frame at ``next_ticks`` when known."""
        seg = self._seg
        if seg is None:
            return
        if seg.held is not None:
            held_ticks = seg.held[1]
            self._mux(seg, next_ticks - held_ticks if next_ticks is not None
                      and next_ticks > held_ticks else seg.interval)
        seg.container.close()
        seg.part.rename(seg.path)
        self._seg = None
        done = Segment(seg.path, seg.start, (seg.end - seg.base) / TICKS,
                       seg.path.stat().st_size, seg.frames)
        with self._lock:
            self._known[seg.path.name] = done
        self._segments_written += 1
        self._frames_written += seg.frames
        log.info("recorded %s: %.2f s, %d frames, %d bytes", seg.path.name, done.duration_s,
                 done.frames, done.bytes)
        self._retain()

    def _abandon(self) -> None:
        """After an error: drop the open segment, keeping what of it still plays."""
        seg, self._seg = self._seg, None
        self._need_key = True
        self._retry_at = time.monotonic() + RETRY_S
        if seg is None:
            return
        with contextlib.suppress(Exception):
            seg.container.close()
        if seg.part.exists():
            salvage(seg.part)

    def _retain(self) -> None:
        if self.keep_s is None and self.max_bytes is None:
            return
        segs = self.segments()
        total = sum(s.bytes for s in segs)
        oldest_end = time.time() - self.keep_s if self.keep_s is not None else None
        for s in segs:
            too_big = self.max_bytes is not None and total > self.max_bytes
            too_old = oldest_end is not None and s.end < oldest_end
            if not (too_big or too_old):
                break
            try:
                s.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                self._fail(f"cannot delete {s.path}", e)
                break
            total -= s.bytes
            with self._lock:
                self._known.pop(s.path.name, None)
            log.info("deleted %s (%s)", s.path.name, "size limit" if too_big else "too old")

    def _recover(self) -> None:
        try:
            parts = sorted(p for p in self.directory.glob("*.mp4" + PART)
                           if NAME_RE.match(p.name[: -len(PART)]))
        except OSError as e:
            self._fail(f"cannot read {self.directory}", e)
            return
        for part in parts:
            salvage(part)

    def _fail(self, what: str, e: BaseException) -> None:
        msg = f"{what}: {e}"
        self._last_error = msg
        if msg not in self._errors_logged:
            if len(self._errors_logged) > 100:
                self._errors_logged.clear()
            self._errors_logged.add(msg)
            log.error("%s", msg)
        else:
            log.debug("%s", msg)
