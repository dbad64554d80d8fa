"""The gateway as on many machines, on this one, for the benchmarks that measure it
(:mod:`benchmarks.api_load` ``--cluster``, :mod:`benchmarks.failover`): a PostgreSQL server
(durable: fsync on), API replicas (``redact serve --no-worker``) and ``redact worker``
processes, each with a data directory of its own and its log beside it, all sharing the
database and one storage directory."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks import free_port
from benchmarks.postgres_server import PostgresServer
from gateway.store import Store

REPO = Path(__file__).resolve().parents[1]


def wait_ready(url: str, timeout_s: float = 120) -> None:
    """Until ``url``'s ``/readyz`` answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready")


class Cluster:
    """``apis`` API replicas (``urls``) and ``workers`` workers (named ``worker<i>``, the
    replicas ``api<i>``) under ``root``, with ``env`` added to their environment; ``key`` is an
    API key on the scale plan. Returns once every worker's models are loaded and every
    replica is ready."""

    def __init__(self, root: Path, apis: int, workers: int,
                 env: dict[str, str] | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.pg = PostgresServer(durable=True).start()
        self.url = self.pg.database()
        self.env = {**os.environ, "REDACT_DATABASE_URL": self.url,
                    "REDACT_STORAGE": str(root / "storage"), **(env or {})}
        self.key = Store(self.url).create_key("bench", "scale")[1]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.urls: list[str] = []
        for i in range(workers):
            self.start(f"worker{i}", ["worker", "--rtsp-port", "0"])
        for i in range(apis):
            port = free_port()
            self.start(f"api{i}", ["serve", "--no-worker", "--port", str(port)])
            self.urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 180
        with contextlib.closing(Store(self.url)) as db:
            while len([w for w in db.live_workers(time.time() - 30) if w.ready]) < workers:
                if time.monotonic() > deadline:
                    raise TimeoutError("workers not ready")
                time.sleep(0.1)
        for url in self.urls:
            wait_ready(url)

    def start(self, name: str, args: list[str]) -> None:
        """Start (or start again) the process ``name``: ``redact ARGS``."""
        with open(self.root / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", *args], cwd=REPO,
                env={**self.env, "REDACT_DATA_DIR": str(self.root / name)}, stdout=out,
                stderr=subprocess.STDOUT)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def worker_of(self, owner: str) -> str:
        """The name of the process a claim's owner (``host:pid:random/claim``) names."""
        pid = int(owner.split("/")[0].split(":")[-2])
        return next(n for n, p in self.procs.items() if p.pid == pid)

    def completions(self) -> dict[str, int]:
        """How many times each job was published, from every worker's log."""
        counts: dict[str, int] = {}
        for name in self.procs:
            if name.startswith("worker"):
                for m in re.finditer(r"job (med_\w+): completed", self.log(name)):
                    counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        return counts

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.pg.stop()
