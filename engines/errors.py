"""One exception root for the whole project, with narrow subclasses.

Each subclass also derives from the matching builtin, so callers that only know Python's
exceptions (``ValueError``, ``FileNotFoundError`` ...) still catch them. HTTP status codes are
chosen from these types in one place in the gateway, never here.
"""

from __future__ import annotations


class RedactionError(Exception):
    """Root of every error this project raises on purpose."""


class ModelNotFoundError(RedactionError, FileNotFoundError):
    """Model weights are neither in an installed package nor at the path the user gave."""


class DetectorError(RedactionError, RuntimeError):
    """A detector failed on a frame. The frame must not leave unredacted."""


class UnknownCategoryError(RedactionError, ValueError):
    """A category name that does not exist or has no detector in this install."""

    def __init__(self, message: str, available: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.available = available


class UnredactedFrameError(RedactionError, RuntimeError):
    """A frame reached the encoder without being marked redacted (a programming error)."""


class MediaError(RedactionError, ValueError):
    """An input that cannot be read or written as media (unsupported, corrupt, truncated)."""
