"""Accuracy, flash-through and throughput measurements, runnable as modules."""

import socket


def free_port() -> int:
    """A TCP port free on loopback now (for a server a benchmark starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
