"""Pieces shared by every pipeline: bounded hand-off between threads and the redaction stage."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from engines.detections import Origin
from engines.errors import DetectorError
from engines.redact import Style, redact_boxes
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


class RedactStage:
    """Detect on scheduled frames, track, hold ``lookahead`` frames so boxes can be carried
    backward, then redact. Frames come out in order, each marked ``redacted``.

    A detector error is raised as :class:`DetectorError`; no frame after it is released.
    """

    def __init__(self, detector: Detector, style: Style, period: int, lookahead: int,
                 scene_change: float = 24.0) -> None:
        self.detector = detector
        self.style = style
        self.scheduler = Scheduler(period, scene_change)
        self.tracker = Tracker(period=period, lookback=lookahead)
        self.lookahead = max(0, lookahead)
        self._buffer: deque[Frame] = deque()
        self.detector_calls = 0
        self.frames_in = 0

    def push(self, frame: Frame) -> list[Frame]:
        """Take one decoded frame; return the frames that are now final and redacted."""
        self.frames_in += 1
        if self.scheduler.should_detect(frame.index, frame.pixels, self.tracker.unsure()):
            self._detect(frame)
        t0 = time.perf_counter()
        frame.boxes.append(self.tracker.predict(frame.index))
        self._add_ms(frame, "track", t0)
        self._buffer.append(frame)
        out = []
        while len(self._buffer) > self.lookahead:
            out.append(self._finish(self._buffer.popleft()))
        return out

    def flush(self) -> list[Frame]:
        """Release every held frame (end of input). The last frame is detected too when the
        schedule skipped it, so the frames before it get boxes carried backward as well."""
        if self._buffer and not self._buffer[-1].detector_ran:
            self._detect(self._buffer[-1])
        out = [self._finish(f) for f in self._buffer]
        self._buffer.clear()
        return out

    def _detect(self, frame: Frame) -> None:
        t0 = time.perf_counter()
        try:
            found = self.detector.detect(frame.pixels)
        except Exception as exc:
            raise DetectorError(f"detector failed on frame {frame.index}: {exc}") from exc
        self.detector_calls += 1
        frame.detector_ran = True
        t1 = self._add_ms(frame, "detect", t0)
        found, carried = self.tracker.observe(frame.index, found)
        frame.boxes.append(found)
        by_index = {f.index: f for f in self._buffer}
        for g, dets in carried:
            if g in by_index:
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
        redact_boxes(frame.pixels, dets.xyxy, self.style, dets.origin == Origin.TRACKED)
        frame.redacted = True
        frame.timings_ms["redact"] = (time.perf_counter() - t0) * 1000
        return frame

