"""The Frame that flows through decode -> detect -> track -> redact -> encode."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from engines.detections import Detections


@dataclass
class Frame:
    """One decoded picture and what was decided about it.

    pixels:    (H, W, 3) uint8 BGR: a numpy array, or an array in GPU memory (see
               :mod:`engines.arrays`; kernels and encoders dispatch on where it lives).
    pts:       presentation timestamp in ``time_base`` units, copied from the decoded frame and
               given back to the encoder unchanged (variable frame rate survives).
    boxes:     every set of boxes that must be covered on this frame: this frame's detections,
               tracks carried forward, and boxes carried backward from later frames.
    redacted:  set only by the redaction stage; the encoder refuses a frame without it.
    """

    index: int
    pixels: np.ndarray  # or a device array with the same shape (engines.arrays)
    pts: int | None = None
    time_base: Fraction | None = None
    stream_id: str = ""
    boxes: list[Detections] = field(default_factory=list)
    detector_ran: bool = False
    lanes_ran: set[str] = field(default_factory=set)  # detectors that ran on this frame
    redacted: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def time_s(self) -> float | None:
        if self.pts is None or self.time_base is None:
            return None
        return float(self.pts * self.time_base)

    def detections(self) -> Detections:
        """All boxes to cover on this frame, as one Detections."""
        return Detections.concat(self.boxes)
