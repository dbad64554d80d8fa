"""Per-key request rate limits (a fixed one-minute window, kept in the store: shared by every
API process on it and kept across restarts) and monthly quotas."""

from __future__ import annotations

import calendar
import math
import time
from dataclasses import dataclass

from gateway.store import Store

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
    """Counts requests per key in windows of one minute aligned to the key's first request
    (wall-clock time, so a window outlives the process that opened it)."""

    def __init__(self, store: Store, window_s: float = WINDOW_S) -> None:
        self.store = store
        self.window_s = window_s

    def hit(self, key_id: str, limit: int, now: float | None = None) -> RateState:
        now = time.time() if now is None else now
        allowed, count, start = self.store.rate_hit(key_id, limit, now, self.window_s)
        reset = math.ceil(start + self.window_s - now)
        return RateState(allowed, limit, max(0, limit - count), max(0, reset))


def seconds_to_next_month(now: float) -> int:
    """Seconds until the next UTC month begins (when monthly quotas start afresh)."""
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return max(1, math.ceil(calendar.timegm((year, month, 1, 0, 0, 0)) - now))
