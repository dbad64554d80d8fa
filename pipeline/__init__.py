"""One stream or file, start to end: decode, detect, track, redact, encode."""
