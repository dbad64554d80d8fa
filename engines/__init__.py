"""Compute without I/O policy: detectors, the models they load, redaction kernels."""
