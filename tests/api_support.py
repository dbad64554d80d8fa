"""Helpers of the REST API tests: a real server on a loopback port (in a thread or a
subprocess), a real webhook receiver, and media made in code."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI

from gateway.app import create_app
from gateway.service import Service
from gateway.settings import Settings
from tests.conftest import astronaut_bgr_image, moving_face_clip, write_video

REPO = Path(__file__).resolve().parents[1]
TERMINAL = ("completed", "failed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ThreadServer:
    """``create_app(settings)`` served by uvicorn in a thread of the test process."""

    def __init__(self, settings: Settings, streams_config: Path | None = None) -> None:
        self.settings = settings
        self.app: FastAPI = create_app(settings, streams_config)
        self.port = free_port()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def service(self) -> Service:
        service: Service = self.app.state.service
        return service

    def start(self, ready_timeout_s: float = 60.0) -> ThreadServer:
        self.thread.start()
        wait_ready(self.url, ready_timeout_s)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def key(self, plan: str = "pro", name: str = "test") -> ApiKeyInfo:
        rec, key = self.service.db.create_key(name, plan)
        return ApiKeyInfo(rec.id, key, rec.webhook_secret, plan)


@dataclass(frozen=True)
class ApiKeyInfo:
    id: str
    key: str
    webhook_secret: str
    plan: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def wait_ready(url: str, timeout_s: float = 60.0, path: str = "/readyz") -> None:
    """Until ``url`` answers 200 at ``path`` (``/healthz``: it answers at all)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}{path}", timeout=2)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready: {last}")


class SubprocessServer:
    """``redact serve`` as a child process (so it can be killed like a crashed service);
    ``args``: more options, e.g. ``("--no-worker",)``."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.env = {**os.environ, "REDACT_DATA_DIR": str(data_dir), **(env or {})}
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"serve-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready: bool = True) -> SubprocessServer:
        """Start it and wait until /readyz says ready (``ready=False``: until it answers, e.g.
        an API without a worker yet)."""
        self.port = free_port()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--port", str(self.port),
                 *self.args],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(self.url, path="/readyz" if ready else "/healthz")
        except TimeoutError:
            self.kill()
            raise TimeoutError(self.log.read_text()[-3000:]) from None
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as when the machine loses power."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def cli(self, *args: str) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=REPO,
                             env=self.env, check=True, capture_output=True, timeout=60)
        result: dict[str, Any] = json.loads(out.stdout.decode().splitlines()[-1])
        return result


class WorkerProcess:
    """``redact worker`` as a child process, to be killed, paused and resumed."""

    def __init__(self, data_dir: Path, env: dict[str, str], name: str) -> None:
        self.data_dir = data_dir
        self.env = {**os.environ, "REDACT_DATA_DIR": str(data_dir), **env}
        self.log = data_dir.parent / f"worker-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> WorkerProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "worker", *args], cwd=REPO, env=self.env,
                stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL (after a SIGCONT, in case it was paused)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, and the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        return self.proc.wait(timeout_s)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


# ------------------------------------------------------------------------------------------
# webhook receiver


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """An HTTP server on loopback recording POSTs; answers ``codes`` in turn, then 200 (or
    what ``answer(request, earlier requests)`` says), each after ``delay_s``."""

    codes: list[int] = field(default_factory=list)
    got: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    answer: Callable[[Received, list[Received]], int] | None = None
    delay_s: float = 0.0

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                got = Received({k.lower(): v for k, v in self.headers.items()}, body,
                               time.time())
                with receiver.lock:
                    earlier = list(receiver.got)
                    receiver.got.append(got)
                    code = (receiver.codes.pop(0) if receiver.codes
                            else receiver.answer(got, earlier) if receiver.answer else 200)
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def wait_for(self, n: int, timeout_s: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.got) >= n:
                    return list(self.got)
            time.sleep(0.05)
        raise TimeoutError(f"{len(self.got)} of {n} webhooks received")


def verify_signature(secret: str, body: bytes, header: str, tolerance_s: float = 300) -> bool:
    """The receiver's side of the signature, written from the README (independent of the
    server's code)."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    t = int(fields["t"])
    if abs(time.time() - t) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"])


# ------------------------------------------------------------------------------------------
# media and client calls


def jpeg_bytes(img: np.ndarray | None = None, quality: int = 95) -> bytes:
    img = astronaut_bgr_image() if img is None else img
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (and whose data is a stub)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def png_bytes(img: np.ndarray | None = None) -> bytes:
    img = astronaut_bgr_image() if img is None else img
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def decode_image(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "not an image"
    return img


def face_clip_bytes(tmp: Path, n: int = 20, name: str = "clip.mp4") -> tuple[bytes, list[Any]]:
    clip = moving_face_clip(n=n)
    path = write_video(tmp / name, clip.frames)
    return path.read_bytes(), clip.faces


def submit(client: httpx.Client, key: ApiKeyInfo, data: bytes, filename: str = "photo.jpg",
           fields: list[tuple[str, str]] | None = None,
           content_type: str = "application/octet-stream") -> httpx.Response:
    return client.post("/v1/media", headers=key.headers,
                       files={"file": (filename, data, content_type)},
                       data=_form(fields or []))


def _form(fields: list[tuple[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in fields:
        out.setdefault(k, []).append(v)
    return out


def wait_job(client: httpx.Client, key: ApiKeyInfo, job_id: str,
             timeout_s: float = 60.0, states: tuple[str, ...] = TERMINAL) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        r = client.get(f"/v1/media/{job_id}", headers=key.headers)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        if body["status"] in states:
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {body['status']}")
        time.sleep(0.05)


def error_of(r: httpx.Response) -> str:
    """The error code of a JSON error answer (asserting its shape)."""
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"], body
    code: str = body["error"]["code"]
    return code


def api_settings(data_dir: Path, **more: Any) -> Settings:
    """Settings of a test server: loopback webhooks allowed, fast retries and sweeps, small
    free-plan quotas (the defaults are checked on their own)."""
    base: dict[str, Any] = {
        "data_dir": data_dir, "workers": 1, "webhook_allow_private": True,
        "webhook_backoff_s": 0.2, "webhook_max_attempts": 3, "webhook_timeout_s": 5.0,
        "plans": {"free": {"requests_per_minute": 1000, "monthly_images": 3,
                           "monthly_video_seconds": 2.0, "max_upload_bytes": 2 * 1024 * 1024},
                  "starter": {"requests_per_minute": 5}}}
    base.update(more)
    return Settings(**base)


def started(settings: Settings) -> Iterator[ThreadServer]:
    server = ThreadServer(settings).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Plane:
    """``redact serve --no-worker`` and ``redact worker`` processes on one data directory."""

    data_dir: Path
    api: SubprocessServer
    workers: list[WorkerProcess]
    key: ApiKeyInfo

    @property
    def db_path(self) -> Path:
        return self.data_dir / "redact.db"

    @property
    def store_target(self) -> Path | str:
        """The plane's database: its PostgreSQL URL when the processes were given one."""
        return self.api.env.get("REDACT_DATABASE_URL") or self.db_path

    def worker_of(self, owner: str | None) -> WorkerProcess:
        """The worker process a claim's owner (``host:pid:random/claim``) names."""
        assert owner is not None
        pid = int(owner.split("/")[0].split(":")[-2])
        (worker,) = [w for w in self.workers if w.pid == pid]
        return worker

    def wait_ready_workers(self, n: int, lease_s: float, timeout_s: float = 60.0) -> None:
        """Until ``n`` workers' heartbeats say their models are loaded."""
        from gateway.store import Store

        deadline = time.monotonic() + timeout_s
        with contextlib.closing(Store(self.store_target)) as db:
            while len([w for w in db.live_workers(time.time() - lease_s) if w.ready]) < n:
                assert time.monotonic() < deadline, [w.text()[-2000:] for w in self.workers]
                time.sleep(0.05)

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        self.api.kill()


def start_plane[P: Plane](cls: type[P], data_dir: Path, env: dict[str, str], workers: int,
                wait_api_ready: bool = True) -> P:
    """An API without a worker, with a key on the scale plan, and ``workers`` worker processes
    (``wait_api_ready``: until ``/readyz`` answers 200, i.e. a worker's models are loaded)."""
    api = SubprocessServer(data_dir, env=env, args=("--no-worker",))
    created = api.cli("keys", "create", "--name", "plane", "--plan", "scale")
    key = ApiKeyInfo(created["id"], created["key"], created["webhook_secret"], "scale")
    plane = cls(data_dir, api, [WorkerProcess(data_dir, env, f"w{i}").start()
                                for i in range(workers)], key)
    try:
        api.start(ready=wait_api_ready)
    except BaseException:
        plane.close()
        raise
    return plane
