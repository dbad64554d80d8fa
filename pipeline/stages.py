"""Pieces shared by every pipeline: bounded hand-off between threads and the redaction stage."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from engines.errors import DetectorError
from engines.redact import Style, redact_detections
from engines.registry import Detector
from pipeline.frame import Frame
from pipeline.tracker import Scheduler, Tracker

_END = object()


class Channel:
    """A bounded queue between two threads that also carries the producer's failure."""

    def __init__(self, maxsize: int) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize)
        self.cancelled = threading.Event()

    def put(self, item: Any) -> bool:
        """Blocks while full; returns False once the consumer has cancelled."""
        while not self.cancelled.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self, error: BaseException | None = None) -> None:
        self.put(_END if error is None else _Failure(error))

    def __iter__(self) -> Iterator[Any]:
        """Items until the producer closes (re-raising its failure) or the channel is
        cancelled."""
        while True:
            try:
                item = self._q.get(timeout=0.1)
            except queue.Empty:
                if self.cancelled.is_set():
                    return
                continue
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def cancel(self) -> None:
        self.cancelled.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._q.get_nowait()
            except queue.Empty:
                return


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def run_thread(name: str, target: Callable[[], None], out: Channel) -> threading.Thread:
    """Start ``target`` in a daemon thread; its end (or exception) always reaches ``out``."""

    def body() -> None:
        try:
            target()
        except BaseException as exc:  # handed to the consumer, which re-raises it
            out.close(exc)
        else:
            out.close()

    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    return t


@dataclass
class Lane:
    """One detector with its own schedule and tracker (engines differ a lot in cost: the face
    detector can run every few frames, the text detector behind plates only now and then)."""

    name: str
    detector: Detector
    scheduler: Scheduler
    tracker: Tracker
    calls: int = 0
    detect_ms: float = 0.0  # summed over the calls


class RedactStage:
    """Detect on scheduled frames, track, hold ``lookahead`` frames so boxes can be carried
    backward, then redact. Frames come out in order, each marked ``redacted``.

    ``detector`` may be a composite (see :class:`engines.registry.CompositeDetector`): each of
    its parts then runs on its own schedule, every ``part.period`` frames (``period`` when the
    part sets none). With ``cover_slow_periods`` (files) the look-ahead is at least the longest
    period, so an object that appears between two calls of a slow detector is still covered
    from its first frame; live streams keep the look-ahead they are given (it is latency).

    A detector error is raised as :class:`DetectorError`; no frame after it is released.
    """

    def __init__(self, detector: Detector, style: Style, period: int, lookahead: int,
                 scene_change: float = 24.0, cover_slow_periods: bool = True) -> None:
        self.detector = detector
        self.style = style
        parts = getattr(detector, "parts", None) or [detector]
        ids = itertools.count()
        self.lanes: list[Lane] = []
        for part in parts:
            p = getattr(part, "period", None) or period
            self.lanes.append(Lane("+".join(part.categories), part, Scheduler(p, scene_change),
                                   Tracker(period=p, lookback=max(lookahead, p), ids=ids)))
        self.lookahead = max(0, lookahead)
        if cover_slow_periods:  # files: latency is free, so hold as long as the slowest period
            self.lookahead = max([self.lookahead] + [
                lane.scheduler.period for lane in self.lanes if lane.scheduler.period > 1])
        self._buffer: deque[Frame] = deque()
        self.frames_in = 0

    @property
    def detector_calls(self) -> int:
        return sum(lane.calls for lane in self.lanes)

    @property
    def calls_by_lane(self) -> dict[str, int]:
        return {lane.name: lane.calls for lane in self.lanes}

    @property
    def ms_by_lane(self) -> dict[str, float]:
        """Detector time per lane, summed over its calls (milliseconds)."""
        return {lane.name: lane.detect_ms for lane in self.lanes}

    @property
    def distinct(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for lane in self.lanes:
            for k, v in lane.tracker.distinct.items():
                out[k] = out.get(k, 0) + v
        return out

    def push(self, frame: Frame) -> list[Frame]:
        """Take one decoded frame; return the frames that are now final and redacted."""
        self.frames_in += 1
        self._buffer.append(frame)
        for lane in self.lanes:
            if lane.scheduler.should_detect(frame.index, frame.pixels, lane.tracker.unsure()):
                self._detect(lane, frame)
            t0 = time.perf_counter()
            frame.boxes.append(lane.tracker.predict(frame.index))
            self._add_ms(frame, "track", t0)
        out = []
        while len(self._buffer) > self.lookahead:
            out.append(self._finish(self._buffer.popleft()))
        return out

    def flush(self) -> list[Frame]:
        """Release every held frame (end of input). The last frame is detected too by every
        detector whose schedule skipped it, so the frames before it get boxes carried backward
        as well."""
        if self._buffer:
            last = self._buffer[-1]
            for lane in self.lanes:
                if lane.name not in last.lanes_ran:
                    self._detect(lane, last)
        out = [self._finish(f) for f in self._buffer]
        self._buffer.clear()
        return out

    def _detect(self, lane: Lane, frame: Frame) -> None:
        t0 = time.perf_counter()
        try:
            found = lane.detector.detect(frame.pixels)
        except Exception as exc:
            raise DetectorError(f"detector failed on frame {frame.index}: {exc}") from exc
        lane.calls += 1
        frame.detector_ran = True
        frame.lanes_ran.add(lane.name)
        t1 = self._add_ms(frame, "detect", t0)
        lane.detect_ms += (t1 - t0) * 1000
        found, carried = lane.tracker.observe(frame.index, found)
        frame.boxes.append(found)
        by_index = {f.index: f for f in self._buffer}
        for g, dets in carried:
            if g in by_index and g != frame.index:
                by_index[g].boxes.append(dets)
        self._add_ms(frame, "track", t1)

    @staticmethod
    def _add_ms(frame: Frame, stage: str, since: float) -> float:
        now = time.perf_counter()
        frame.timings_ms[stage] = frame.timings_ms.get(stage, 0.0) + (now - since) * 1000
        return now

    def _finish(self, frame: Frame) -> Frame:
        t0 = time.perf_counter()
        dets = frame.detections()
        frame.boxes = [dets]
        redact_detections(frame.pixels, dets, self.style)
        frame.redacted = True
        frame.timings_ms["redact"] = (time.perf_counter() - t0) * 1000
        return frame
