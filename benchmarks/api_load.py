"""Load on the REST API: concurrent uploads of real photos (throughput against the CLI's engine,
5xx and lost jobs) and concurrent large uploads (the server's peak memory).

    python -m benchmarks.api_load --photos ../shared/eval/faces_kaggle_facemask/images --n 50
    python -m benchmarks.api_load --big 20 --big-mb 24

Starts ``redact serve`` in a subprocess on a temporary data directory, prints a table and one
JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from PIL import Image

from gateway.store import Store
from pipeline.files import Redactor, RedactSettings

REPO = Path(__file__).resolve().parents[1]


class Server:
    def __init__(self, data_dir: Path, port: int, workers: int) -> None:
        env = {**os.environ, "REDACT_DATA_DIR": str(data_dir), "REDACT_WORKERS": str(workers)}
        self.key = Store(data_dir / "redact.db").create_key("bench", "scale")[1]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--port",
                                      str(port)], cwd=REPO, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.peak_rss = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server not ready")

    def _sample(self) -> None:
        p = psutil.Process(self.proc.pid)
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        self.proc.wait(30)


def _run_batch(server: Server, files: list[tuple[str, bytes]], concurrency: int,
               categories: list[str]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {server.key}"}
    fields = {"categories[]": categories}
    t0 = time.perf_counter()

    def submit(item: tuple[str, bytes]) -> tuple[int, str | None]:
        with httpx.Client(timeout=300) as c:
            for _ in range(50):
                r = c.post(f"{server.url}/v1/media", headers=headers, data=fields,
                           files={"file": (item[0], item[1], "application/octet-stream")})
                if r.status_code in (429, 503):
                    time.sleep(float(r.headers.get("retry-after", "1")))
                    continue
                return r.status_code, r.json().get("id") if r.status_code == 202 else None
        return 599, None

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(submit, files))
    codes = [c for c, _ in results]
    ids = [i for _, i in results if i]
    done: dict[str, str] = {}
    wanted = set(ids)
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
        deadline = time.monotonic() + 1800
        while len(done) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.1)  # one listing request per poll: polling must not load the server
            cursor = None
            while True:
                page = c.get("/v1/media", params={"limit": 100, **(
                    {"cursor": cursor} if cursor else {})}).json()
                for job in page["data"]:
                    if job["id"] in wanted and job["status"] in ("completed", "failed"):
                        done[job["id"]] = job["status"]
                cursor = page["next_cursor"]
                if not cursor:
                    break
    wall = time.perf_counter() - t0
    return {"codes": sorted(set(codes)), "files": len(files),
            "server_errors": sum(c >= 500 for c in codes),
            "accepted": len(ids), "completed": sum(s == "completed" for s in done.values()),
            "failed": sum(s == "failed" for s in done.values()),
            "lost": len(ids) - len(done), "wall_s": round(wall, 2),
            "files_per_s": round(len(done) / wall, 3), "peak_rss_mib": server.peak_rss >> 20}


def _cli_rate(paths: list[Path], categories: list[str]) -> float:
    """Photos per second of the engine behind ``redact file`` (models loaded beforehand)."""
    redactor = Redactor(RedactSettings(categories=tuple(categories)))
    with tempfile.TemporaryDirectory() as out:
        redactor.redact(paths[0], Path(out) / f"warm{paths[0].suffix}")
        t0 = time.perf_counter()
        for i, p in enumerate(paths):
            redactor.redact(p, Path(out) / f"{i}{p.suffix}")
        return len(paths) / (time.perf_counter() - t0)


def _big_jpeg(mb: float) -> bytes:
    """A JPEG of noise of about ``mb`` MiB (noise barely compresses)."""
    side = int((mb * 1024 * 1024 / 2.6) ** 0.5)
    for _ in range(6):
        img = np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        size = buf.tell()
        if abs(size / (mb * 1024 * 1024) - 1) < 0.04:
            break
        side = int(side * (mb * 1024 * 1024 / size) ** 0.5)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=Path, help="a folder of photos")
    ap.add_argument("--n", type=int, default=50, help="photos to send")
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--categories", default="faces")
    ap.add_argument("--workers", type=int, default=2, help="REDACT_WORKERS of the server")
    ap.add_argument("--big", type=int, default=0, help="large uploads to send at once")
    ap.add_argument("--big-mb", type=float, default=24.0)
    ap.add_argument("--port", type=int, default=0, help="0: a free one")
    args = ap.parse_args(argv)
    if not args.port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    cats = [c for c in args.categories.split(",") if c]
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp), args.port, args.workers)
        try:
            if args.photos:
                paths = sorted(p for p in args.photos.rglob("*")
                               if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.n]
                files = [(p.name, p.read_bytes()) for p in paths]
                report["photos"] = _run_batch(server, files, args.concurrency, cats)
            if args.big:
                data = _big_jpeg(args.big_mb)
                report["big"] = _run_batch(server, [(f"big{i}.jpg", data)
                                                    for i in range(args.big)], args.big, cats)
                report["big"]["upload_mib"] = round(len(data) / 2**20, 1)
        finally:
            server.stop()
    if args.photos:
        cli = _cli_rate(paths, cats)
        report["photos"]["cli_files_per_s"] = round(cli, 3)
        report["photos"]["api_vs_cli"] = round(report["photos"]["files_per_s"] / cli, 3)
    for name, r in report.items():
        print(f"{name:8s} " + "  ".join(f"{k}={v}" for k, v in r.items()))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
