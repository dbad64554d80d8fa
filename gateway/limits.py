"""Per-key request rate limits (a fixed one-minute window, in memory) and monthly quotas."""

from __future__ import annotations

import calendar
import math
import threading
import time
from dataclasses import dataclass

WINDOW_S = 60.0


@dataclass(frozen=True)
class RateState:
    """The outcome of one request against a key's window."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until the window starts afresh

    def headers(self) -> dict[str, str]:
        out = {"X-RateLimit-Limit": str(self.limit),
               "X-RateLimit-Remaining": str(self.remaining),
               "X-RateLimit-Reset": str(self.reset_s)}
        if not self.allowed:
            out["Retry-After"] = str(max(1, self.reset_s))
        return out


class RateLimiter:
    """Counts requests per key in windows of one minute aligned to the key's first request."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._windows: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def hit(self, key_id: str, limit: int, now: float | None = None) -> RateState:
        now = time.monotonic() if now is None else now
        with self._lock:
            start, count = self._windows.get(key_id, (now, 0))
            if now - start >= self.window_s:
                start, count = now, 0
            allowed = count < limit
            if allowed:
                count += 1
            self._windows[key_id] = (start, count)
            if len(self._windows) > 10_000:  # forget idle keys
                self._windows = {k: v for k, v in self._windows.items()
                                 if now - v[0] < self.window_s}
        reset = math.ceil(start + self.window_s - now)
        return RateState(allowed, limit, max(0, limit - count), max(0, reset))


def seconds_to_next_month(now: float) -> int:
    """Seconds until the next UTC month begins (when monthly quotas start afresh)."""
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return max(1, math.ceil(calendar.timegm((year, month, 1, 0, 0, 0)) - now))
