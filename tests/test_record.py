"""Recording a live stream's encode to MP4 segments (pipeline/record.py).

A real :class:`LiveEncoder` encodes frames made here (the astronaut's head moving across a
gradient, with the frame number stamped into each picture as a row of black and white blocks),
faster than real time, with :meth:`SegmentRecorder.push` as its sink; the segments are then read
back with PyAV: every frame is found by its stamp and compared with the picture that was encoded.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from itertools import pairwise
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.frame import Frame
from pipeline.live_encode import EncodedPacket, LiveEncoder
from pipeline.record import NAME_FORMAT, Segment, SegmentRecorder
from tests.conftest import moving_face_clip

FPS = 30.0
W, H = 320, 240
STAMP_BITS = 12
CELL = 8  # px per bit, top-left corner
MAX_DIFF = 3.5  # mean abs difference (0-255) of a decoded frame from its source; codec loss ~2
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# media made here


@cache
def _clip(width: int, height: int) -> tuple[np.ndarray, ...]:
    k = width / W
    return tuple(moving_face_clip(n=40, width=width, height=height, scale=0.6 * k, step=4.0 * k,
                                  y=round(20 * k)).frames)


def make_frame(i: int, width: int = W, height: int = H) -> np.ndarray:
    """Frame ``i`` of the source: the clip (looped) with ``i`` stamped in the top-left corner."""
    clip = _clip(width, height)
    px = clip[i % len(clip)].copy()
    for b in range(STAMP_BITS):
        px[:CELL, b * CELL:(b + 1) * CELL] = 255 if (i >> b) & 1 else 0
    return px


def read_stamp(px: np.ndarray) -> int:
    n = 0
    for b in range(STAMP_BITS):
        if px[2:CELL - 2, b * CELL + 2:(b + 1) * CELL - 2].mean() > 128:
            n |= 1 << b
    return n


def feed(sink: Callable[[EncodedPacket], None], first: int, count: int, width: int = W,
         height: int = H) -> list[EncodedPacket]:
    """Encode frames ``first .. first+count-1`` shown at i/FPS s through a fresh encoder whose
    packets go to ``sink``; returns the packets."""
    enc = LiveEncoder(width, height, FPS)
    out: list[EncodedPacket] = []
    enc.add_sink(out.append)
    enc.add_sink(sink)
    for i in range(first, first + count):
        f = Frame(i, make_frame(i, width, height))
        f.redacted = True
        enc.encode(f, i / FPS)
    enc.close()
    return out


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@dataclass
class Played:
    """A segment as a player sees it."""

    width: int = 0
    height: int = 0
    rate: float = 0.0
    duration_s: float = 0.0
    first_packet_key: bool = False
    stamps: list[int] = field(default_factory=list)
    keys: list[bool] = field(default_factory=list)  # per frame: decoded as a keyframe
    pts_s: list[float] = field(default_factory=list)
    diffs: list[float] = field(default_factory=list)  # mean abs diff with the source frame


def play(path: Path) -> Played:
    out = Played()
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        out.width, out.height = st.codec_context.width, st.codec_context.height
        out.rate = float(st.average_rate or 0)
        out.duration_s = (c.duration or 0) / 1e6
        first = True
        for pkt in c.demux(st):
            if pkt.size and first:
                out.first_packet_key, first = pkt.is_keyframe, False
            for fr in pkt.decode():
                px = fr.to_ndarray(format="bgr24")
                n = read_stamp(px)
                out.stamps.append(n)
                out.keys.append(fr.key_frame)
                out.pts_s.append(float(fr.time))
                src = make_frame(n, fr.width, fr.height).astype(np.int16)
                out.diffs.append(float(np.abs(px.astype(np.int16) - src).mean()))
    return out


def record(directory: Path, frames: int, **kw: float) -> tuple[SegmentRecorder, list[Segment]]:
    rec = SegmentRecorder(directory, **kw)  # type: ignore[arg-type]
    feed(rec.push, 0, frames)
    rec.close()
    return rec, rec.segments()


# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[
        SegmentRecorder, list[Segment], list[Played], float]:
    """3.5 s of stream at 1 s segments."""
    d = tmp_path_factory.mktemp("rec")
    t0 = time.time()
    rec, segs = record(d, 105, segment_s=1.0)
    return rec, segs, [play(s.path) for s in segs], t0


def test_segments_start_at_keyframes_and_hold_every_frame(recorded) -> None:
    rec, segs, played, t0 = recorded
    assert len(segs) >= 3
    assert not list(segs[0].path.parent.glob("*.part"))
    assert sorted(p.name for p in segs[0].path.parent.iterdir()) == [s.path.name for s in segs]
    # every frame encoded is in exactly one segment, in order
    assert [n for p in played for n in p.stamps] == list(range(105))
    assert rec.stats["frames_written"] == 105 and rec.stats["packets_dropped"] == 0
    assert rec.stats["segments_written"] == len(segs) and not rec.stats["recording"]
    for s, p in zip(segs, played, strict=True):
        assert p.first_packet_key and p.keys[0], s.path
        assert p.pts_s[0] == 0.0
        assert all(b > a for a, b in pairwise(p.pts_s))
        assert p.rate == pytest.approx(30.0, abs=0.5)
        assert (p.width, p.height) == (W, H)
        assert s.frames == len(p.stamps)
        assert s.duration_s == pytest.approx(len(p.stamps) / FPS, abs=1e-3)
        assert p.duration_s == pytest.approx(s.duration_s, abs=0.04)
        assert s.bytes == s.path.stat().st_size
    for p in played[:-1]:
        assert p.duration_s == pytest.approx(1.0, abs=0.04) and len(p.stamps) == 30
    # named after the UTC time of the first frame, one second apart as the stream clock says
    assert segs[0].start == pytest.approx(t0, abs=2.0)
    for a, b in pairwise(segs):
        assert b.start - a.start == pytest.approx(1.0, abs=1e-3)
    for s in segs:
        assert s.path.name == time.strftime(NAME_FORMAT, time.gmtime(s.start)) + "Z.mp4"


def test_recorded_pixels_match_the_source(recorded) -> None:
    _, _, played, _ = recorded
    diffs = [d for p in played for d in p.diffs]
    assert len(diffs) == 105
    assert max(diffs) < MAX_DIFF, max(diffs)
    # the check tells frames apart: the next frame of the source (the head 4 px on) is further
    a, b = make_frame(10).astype(np.int16), make_frame(11).astype(np.int16)
    assert np.abs(a - b).mean() > MAX_DIFF


def _first_stamps(segs: list[Segment]) -> list[int]:
    return [play(s.path).stamps[0] for s in segs]


def test_max_bytes_deletes_the_oldest_segments(tmp_path: Path) -> None:
    _, ref = record(tmp_path / "all", 135, segment_s=1.0)
    assert _first_stamps(ref) == [0, 30, 60, 90, 120]
    sizes = [s.bytes for s in ref]
    limit = sizes[3] + sizes[4] + sizes[2] // 2  # room for the newest two, not three
    rec, kept = record(tmp_path / "capped", 135, segment_s=1.0, max_bytes=limit)
    assert _first_stamps(kept) == [90, 120]
    assert sum(s.bytes for s in kept) <= limit
    assert rec.stats["segments_written"] == 5
    assert sorted(p.name for p in (tmp_path / "capped").iterdir()) == [s.path.name for s in kept]


def test_keep_s_deletes_segments_that_ended_too_long_ago(tmp_path: Path) -> None:
    d = tmp_path / "rec"
    _, old = record(d, 60, segment_s=1.0)
    assert len(old) == 2
    now = time.time()
    two_hours = d / (time.strftime(NAME_FORMAT, time.gmtime(now - 7200)) + "Z.mp4")
    ten_minutes = d / (time.strftime(NAME_FORMAT, time.gmtime(now - 600)) + "Z.mp4")
    old[0].path.rename(two_hours)
    old[1].path.rename(ten_minutes)
    rec = SegmentRecorder(d, segment_s=1.0, keep_s=3600)
    found = rec.segments()
    assert [s.path for s in found] == [two_hours, ten_minutes]
    assert found[0].frames is None and found[0].duration_s == pytest.approx(1.0, abs=0.04)
    feed(rec.push, 0, 75)
    rec.close()
    segs = rec.segments()
    assert not two_hours.exists()
    assert segs[0].path == ten_minutes
    assert len(segs) == 4 and all(s.start > now - 5 for s in segs[1:])


def test_segment_cut_short_by_a_crash_is_kept(tmp_path: Path) -> None:
    d = tmp_path / "rec"
    proc = subprocess.Popen([sys.executable, "-m", "tests.test_record", str(d)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready and proc.stdout.readline().strip() == "recording"
        # the open segment is marked unfinished while it is written
        parts = list(d.iterdir())
        assert len(parts) == 1 and parts[0].name.endswith(".mp4.part")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    part = parts[0]
    # a second crash victim whose last fragment did not reach the disk whole
    torn = d / part.name.replace("Z.mp4", "Z-7.mp4")
    shutil.copy(part, torn)
    os.truncate(torn, torn.stat().st_size - 500)
    empty = d / "20200101T000000Z.mp4.part"
    empty.touch()

    rec = SegmentRecorder(d)
    rec.close()
    assert not list(d.glob("*.part"))  # finished or (the empty one) deleted
    segs = rec.segments()
    assert [s.path.name for s in segs] == [part.name[:-5], torn.name[:-5]]
    whole, cut = play(segs[0].path), play(segs[1].path)
    # the child waited until frames 0..73 were written: two whole GOPs reached the disk
    assert whole.stamps == list(range(60))
    assert cut.stamps == list(range(30))  # the torn fragment is cut off, the rest plays
    for p in (whole, cut):
        assert p.first_packet_key and max(p.diffs) < MAX_DIFF
    assert segs[0].frames is None and segs[0].duration_s == pytest.approx(2.0, abs=0.04)


def test_unwritable_directory_is_reported_and_retried(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"a file, not a directory")
    d = blocker / "rec"
    rec = SegmentRecorder(d, segment_s=1.0)
    enc = LiveEncoder(W, H, FPS)
    for i in range(60):
        f = Frame(i, make_frame(i))
        f.redacted = True
        for pkt in enc.encode(f, i / FPS):
            rec.push(pkt)  # raises into the test if it raises at all
    assert enc.frames == 60
    wait_for(lambda: rec.stats["last_error"] != "")
    assert str(d) in rec.stats["last_error"]
    assert not rec.stats["recording"] and rec.segments() == []
    # the disk comes back: recording resumes at a keyframe after the retry pause
    blocker.unlink()
    time.sleep(1.1)
    for i in range(60, 150):
        f = Frame(i, make_frame(i))
        f.redacted = True
        for pkt in enc.encode(f, i / FPS):
            rec.push(pkt)
    enc.close()
    rec.close()
    segs = rec.segments()
    assert len(segs) >= 2
    stamps = [n for s in segs for n in play(s.path).stamps]
    assert stamps == list(range(stamps[0], 150)) and stamps[0] in (60, 90)


def test_full_queue_drops_whole_gops_only(tmp_path: Path) -> None:
    packets = feed(lambda p: None, 0, 240)  # 8 s, encoded ahead
    rec = SegmentRecorder(tmp_path / "rec", segment_s=1.0, queue_packets=2)
    for i, pkt in enumerate(packets):
        rec.push(pkt)
        # the first 1.5 s in one burst (the writer, starting its first segment, cannot keep
        # up: drops are certain), then in small bursts, so that the packets after a drop reach
        # the writer, which must skip them until the next keyframe
        if i >= 45 and i % 5 == 4:
            time.sleep(0.003)
    rec.close()
    st = rec.stats
    assert st["packets_dropped"] > 0 and st["packets_skipped"] > 0
    assert st["packets_written"] + st["packets_dropped"] + st["packets_skipped"] == len(packets)
    segs = rec.segments()
    assert segs and st["frames_written"] == st["packets_written"] == sum(
        s.frames or 0 for s in segs)
    keyframe_stamps = {p.index for p in packets if p.keyframe}
    for s in segs:
        p = play(s.path)
        assert p.first_packet_key and p.keys[0] and p.stamps[0] in keyframe_stamps
        assert max(p.diffs) < MAX_DIFF  # no frame decoded against a missing reference
        for a, b, key in zip(p.stamps, p.stamps[1:], p.keys[1:], strict=False):
            assert b > a
            assert b == a + 1 or key, f"{s.path.name}: frame {b} follows {a} mid-GOP"


def test_resolution_change_starts_a_new_segment(tmp_path: Path) -> None:
    rec = SegmentRecorder(tmp_path / "rec", segment_s=60.0)
    feed(rec.push, 0, 45, W, H)
    feed(rec.push, 45, 45, 160, 120)  # the camera came back smaller
    rec.close()
    segs = rec.segments()
    assert len(segs) == 2
    big, small = play(segs[0].path), play(segs[1].path)
    assert (big.width, big.height, big.stamps) == (W, H, list(range(45)))
    assert (small.width, small.height, small.stamps) == (160, 120, list(range(45, 90)))
    assert max(big.diffs + small.diffs) < MAX_DIFF
    assert segs[1].start - segs[0].start == pytest.approx(1.5, abs=1e-3)


# the crash test's recording process: python -m tests.test_record DIRECTORY
if __name__ == "__main__":
    rec = SegmentRecorder(Path(sys.argv[1]), segment_s=60.0)
    feed(rec.push, 0, 75)
    wait_for(lambda: rec.stats["packets_written"] >= 74)
    print("recording", flush=True)
    time.sleep(120)
