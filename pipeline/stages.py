"""Pieces shared by every pipeline: bounded hand-off between threads, and the redaction stage
in its four steps (schedule -> await detections -> track and hold the look-ahead -> redact)."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from engines.arrays import device_of, to_host
from engines.detections import Detections
from engines.errors import DetectorError
from engines.redact import Style, cover_zone, redact_detections
from engines.registry import Detector
from engines.service import detection_service
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


# How a stage gets detections: ``submit(detector, pixels)`` -> a future of its Detections.
# The default is the device's shared detection service (engines.service); ``direct`` runs the
# detector on the caller's thread.
Submit = Callable[[Detector, Any], "Future[Detections]"]
Zone = Sequence[Sequence[float]]  # polygon: frame pixels, or fractions when all are <= 1


def direct(detector: Detector, pixels: Any) -> Future[Detections]:
    """Run ``detector`` now, on this thread (a detector of one's own, no service)."""
    done: Future[Detections] = Future()
    try:
        done.set_result(detector.detect(pixels))
    except Exception as exc:
        done.set_exception(exc)
    return done


@dataclass
class Lane:
    """One detector with its own schedule and tracker (engines differ a lot in cost: the face
    detector can run every few frames, the text detector behind plates only now and then)."""

    name: str
    detector: Detector
    scheduler: Scheduler
    tracker: Tracker
    calls: int = 0
    detect_ms: float = 0.0  # summed over the calls (from submission to result)


def make_lanes(detector: Detector, period: int, lookahead: int,
               scene_change: float) -> list[Lane]:
    """One lane per part of ``detector`` (a composite's parts, else the detector itself), each
    on ``part.period`` frames (``period`` when the part sets none)."""
    parts = getattr(detector, "parts", None) or [detector]
    ids = itertools.count()  # track ids unique across lanes
    lanes = []
    for part in parts:
        p = getattr(part, "period", None) or period
        lanes.append(Lane("+".join(part.categories), part, Scheduler(p, scene_change),
                          Tracker(period=p, lookback=max(lookahead, p), ids=ids)))
    return lanes


class Schedule:
    """Step 1: which lanes detect on a frame (each lane's scheduler, told whether its tracker
    is unsure)."""

    def __init__(self, lanes: Sequence[Lane]) -> None:
        self.lanes = list(lanes)

    def due(self, frame: Frame) -> list[Lane]:
        return [lane for lane in self.lanes
                if lane.scheduler.should_detect(frame.index, frame.pixels,
                                                lane.tracker.unsure())]


class AwaitDetections:
    """Step 2: submit a frame to every due lane's detector at once, then wait for all of them.
    Any failure is a :class:`DetectorError` naming the frame; ``timeout_s`` bounds the wait
    (None: wait as long as it takes)."""

    def __init__(self, submit: Submit, timeout_s: float | None = None) -> None:
        self.submit = submit
        self.timeout_s = timeout_s

    def __call__(self, frame: Frame, lanes: Sequence[Lane]) -> list[tuple[Lane, Detections]]:
        t0 = time.perf_counter()
        try:
            # a frame in GPU memory goes as it is to the detectors that take one (the face
            # model's pre-processing runs on the GPU), and copied back once for the others
            host = frame.pixels if device_of(frame.pixels) == "cpu" else None
            futures = []
            for lane in lanes:
                pixels = frame.pixels
                if host is not frame.pixels and not getattr(lane.detector,
                                                            "takes_device_frames", False):
                    host = to_host(frame.pixels) if host is None else host
                    pixels = host
                futures.append((lane, self.submit(lane.detector, pixels)))
            found = [(lane, f.result(self.timeout_s)) for lane, f in futures]
        except Exception as exc:
            reason = str(exc) or f"no answer within {self.timeout_s} s"
            raise DetectorError(f"detector failed on frame {frame.index}: {reason}") from exc
        ms = (time.perf_counter() - t0) * 1000
        for lane, _ in found:
            lane.calls += 1
            lane.detect_ms += ms
            frame.lanes_ran.add(lane.name)
        if found:
            frame.detector_ran = True
            frame.timings_ms["detect"] = frame.timings_ms.get("detect", 0.0) + ms
        return found


class TrackAndHold:
    """Step 3: each lane's tracker, and the look-ahead buffer: a new object's box is carried
    back into the held frames, so it is covered from its first frame. Frames leave in order once
    ``lookahead`` newer ones are held."""

    def __init__(self, lanes: Sequence[Lane], lookahead: int) -> None:
        self.lanes = list(lanes)
        self.lookahead = max(0, lookahead)
        self._held: deque[Frame] = deque()

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def last(self) -> Frame | None:
        return self._held[-1] if self._held else None

    def hold(self, frame: Frame) -> None:
        self._held.append(frame)

    def observe(self, frame: Frame, lane: Lane, found: Detections) -> None:
        """``lane`` detected ``found`` on ``frame`` (a held frame)."""
        t0 = time.perf_counter()
        found, carried = lane.tracker.observe(frame.index, found)
        frame.boxes.append(found)
        by_index = {f.index: f for f in self._held}
        for g, dets in carried:
            if g in by_index and g != frame.index:
                by_index[g].boxes.append(dets)
        _add_ms(frame, "track", t0)

    def predict(self, frame: Frame, lane: Lane) -> None:
        """What ``lane``'s live tracks cover on ``frame``."""
        t0 = time.perf_counter()
        frame.boxes.append(lane.tracker.predict(frame.index))
        _add_ms(frame, "track", t0)

    def ready(self) -> list[Frame]:
        """Frames that have ``lookahead`` newer ones behind them, oldest first."""
        out = []
        while len(self._held) > self.lookahead:
            out.append(self._held.popleft())
        return out

    def release(self) -> list[Frame]:
        """Every held frame, oldest first (end of input, or to cover them whole)."""
        out = list(self._held)
        self._held.clear()
        return out


class Redact:
    """Step 4: cover every box a frame collected, in its category's style, then the privacy
    ``zones``, and mark it redacted (the only place that sets the mark on a camera frame)."""

    def __init__(self, style: Style, zones: Sequence[Zone] = ()) -> None:
        self.style = style
        self.zones = list(zones)

    def __call__(self, frame: Frame) -> Frame:
        t0 = time.perf_counter()
        dets = frame.detections()
        frame.boxes = [dets]
        redact_detections(frame.pixels, dets, self.style)
        for zone in self.zones:
            cover_zone(frame.pixels, zone, self.style)
        frame.redacted = True
        frame.timings_ms["redact"] = (time.perf_counter() - t0) * 1000
        return frame


def _add_ms(frame: Frame, stage: str, since: float) -> None:
    frame.timings_ms[stage] = frame.timings_ms.get(stage, 0.0) + (
        time.perf_counter() - since) * 1000


class RedactStage:
    """The four steps joined: schedule, await detections, track and hold ``lookahead`` frames
    so boxes can be carried backward, redact. Frames come out in order, each marked
    ``redacted``.

    ``detector`` may be a composite (see :class:`engines.registry.CompositeDetector`): each of
    its parts then runs on its own schedule, every ``part.period`` frames (``period`` when the
    part sets none). With ``cover_slow_periods`` (files) the look-ahead is at least the longest
    period, so an object that appears between two calls of a slow detector is still covered
    from its first frame; live streams keep the look-ahead they are given (it is latency).
    ``submit`` is how detections are made (default: the detector's device's shared service);
    ``zones`` are covered on every frame.

    A detector error is raised as :class:`DetectorError`; no frame after it is released by
    :meth:`push`, and :meth:`release_unredacted` hands the held frames to a caller that covers
    them whole (live streams).
    """

    def __init__(self, detector: Detector, style: Style, period: int, lookahead: int,
                 scene_change: float = 24.0, cover_slow_periods: bool = True,
                 submit: Submit | None = None, timeout_s: float | None = None,
                 zones: Sequence[Zone] = ()) -> None:
        self.detector = detector
        self.lanes = make_lanes(detector, period, lookahead, scene_change)
        if cover_slow_periods:  # files: latency is free, so hold as long as the slowest period
            lookahead = max([lookahead] + [lane.scheduler.period for lane in self.lanes
                                           if lane.scheduler.period > 1])
        if submit is None:
            submit = detection_service(getattr(detector, "device", "cpu")).submit
        self.schedule = Schedule(self.lanes)
        self.detect = AwaitDetections(submit, timeout_s)
        self.track = TrackAndHold(self.lanes, lookahead)
        self.redact = Redact(style, zones)
        self.frames_in = 0

    @property
    def style(self) -> Style:
        return self.redact.style

    @style.setter
    def style(self, style: Style) -> None:
        self.redact.style = style

    @property
    def lookahead(self) -> int:
        return self.track.lookahead

    @property
    def held(self) -> int:
        """Frames waiting in the look-ahead buffer."""
        return self.track.held

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
        self.track.hold(frame)
        found = {id(lane): dets for lane, dets in self.detect(frame, self.schedule.due(frame))}
        for lane in self.lanes:  # lanes in their order (two may carry the same name)
            if id(lane) in found:
                self.track.observe(frame, lane, found[id(lane)])
            self.track.predict(frame, lane)
        return [self.redact(f) for f in self.track.ready()]

    def flush(self) -> list[Frame]:
        """Release every held frame (end of input). The last frame is detected too by every
        detector whose schedule skipped it, so the frames before it get boxes carried backward
        as well."""
        last = self.track.last
        if last is not None:
            missing = [lane for lane in self.lanes if lane.name not in last.lanes_ran]
            for lane, dets in self.detect(last, missing):
                self.track.observe(last, lane, dets)
        return [self.redact(f) for f in self.track.release()]

    def release_unredacted(self) -> list[Frame]:
        """The held frames, not redacted, oldest first; the stage holds none after this (the
        caller covers them whole: detection cannot be trusted)."""
        return self.track.release()
