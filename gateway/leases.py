"""Keeping leases alive: work a worker claimed in the store (a job, a webhook delivery) is
renewed from one small thread every third of the lease, for as long as the worker holds it.

A renewal the store refuses means another worker has taken the work over (this one stalled
past its lease, e.g. paused or starved): the lease is marked lost, and whoever runs the work
stops it and records nothing. A renewal that fails for another reason (the database busy) is
tried again at the next tick; if the lease runs out meanwhile, the store's fence refuses the
late result anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

_PROCESS_ID: tuple[int, str] | None = None


def process_worker_id() -> str:
    """This process's worker id, ``host:pid:random``: the same for the life of the process
    (a new one after a fork), never reused by a later process."""
    global _PROCESS_ID
    pid = os.getpid()
    if _PROCESS_ID is None or _PROCESS_ID[0] != pid:
        _PROCESS_ID = (pid, f"{socket.gethostname()}:{pid}:{secrets.token_hex(3)}")
    return _PROCESS_ID[1]


def claim_owner(worker_id: str) -> str:
    """The owner name of one claim: the worker's id and a fresh token, so that two claims of
    the same work, even by one process, never pass each other's fence."""
    return f"{worker_id}/{secrets.token_hex(4)}"


class Lease:
    """One claim being kept alive; ``lost`` is set when a renewal is refused. The holder calls
    :meth:`closing` just before it records the work's end (which ends the lease in the store),
    so that a renewal refused from then on is not taken for a loss: the store's fence on the
    record says whether the lease still held."""

    def __init__(self, name: str, renew: Callable[[float], bool]) -> None:
        self.name = name
        self.renew = renew
        self.lost = threading.Event()
        self.ending = False

    def closing(self) -> None:
        self.ending = True


class LeaseKeeper:
    """Renews every lease it holds every ``lease_s / 3`` seconds, to ``now + lease_s``."""

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self.interval_s = lease_s / 3
        self._leases: dict[int, Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leases", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def alive(self) -> bool:
        return self._thread.is_alive()

    @contextlib.contextmanager
    def held(self, name: str, renew: Callable[[float], bool]) -> Iterator[Lease]:
        """Keep ``renew(until)`` called while the block runs."""
        lease = Lease(name, renew)
        with self._lock:
            self._leases[id(lease)] = lease
        try:
            yield lease
        finally:
            with self._lock:
                self._leases.pop(id(lease), None)

    def renew_all(self) -> None:
        """One round of renewals (the thread's tick)."""
        with self._lock:
            leases = list(self._leases.values())
        for lease in leases:
            if lease.lost.is_set():
                continue
            try:
                kept = lease.renew(time.time() + self.lease_s)
            except Exception as exc:
                log.warning("renewing the lease of %s failed (tried again): %s", lease.name, exc)
                continue
            if not kept and not lease.ending:
                lease.lost.set()
                log.warning("lease of %s lost: another worker has taken it over", lease.name)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.renew_all()
