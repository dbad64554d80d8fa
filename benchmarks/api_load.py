"""Load on the REST API: concurrent uploads of real photos (throughput against the CLI, 5xx and
lost jobs) and concurrent large uploads (the server's peak memory).

    python -m benchmarks.api_load --photos ../shared/eval/faces_kaggle_facemask --n 50
    python -m benchmarks.api_load --big 20 --big-mb 24
    python -m benchmarks.api_load --photos ../shared/eval/faces_kaggle_facemask --n 60 --cluster

``--cluster`` runs the same batch against one ``redact serve`` on SQLite and then against 2 API
replicas (``redact serve --no-worker``) and 3 ``redact worker`` processes sharing a PostgreSQL
server (started for the run, durable: fsync on) and one storage directory, uploads spread over
the replicas, and reports jobs/s of each, their ratio, jobs lost, outputs published more than
once (a job completed by two workers) and 5xx answers. All of it on this one machine: the ratio
is the cost of the many-machine path on the same cores, not a gain from more machines.

Starts ``redact serve`` in a subprocess on a temporary data directory, prints a table and one
JSON line. The photos are compared with the CLI two ways: ``cli_files_per_s`` is the engine
behind ``redact file`` in this process with its models loaded beforehand (redaction alone),
``cli_command_files_per_s`` the real ``redact file DIR -o OUT`` command run on the same photos,
timed end to end (start-up and model loading included). Each of the ``--repeat`` rounds runs
the API batch and both CLI figures in turn (the machine may be noisy); the figures reported are
the medians of the rounds, ``rounds`` lists them all.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
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

from benchmarks import free_port
from benchmarks.cluster import Cluster, wait_ready
from benchmarks.postgres_server import unavailable as postgres_unavailable
from gateway.store import Store
from pipeline.files import Redactor, RedactSettings

REPO = Path(__file__).resolve().parents[1]


class Server:
    """One ``redact serve`` (its own worker inside) on a SQLite file."""

    def __init__(self, data_dir: Path, port: int, workers: int) -> None:
        env = {**os.environ, "REDACT_DATA_DIR": str(data_dir), "REDACT_WORKERS": str(workers)}
        self.store_target: Path | str = data_dir / "redact.db"
        self.key = Store(self.store_target).create_key("bench", "scale")[1]
        self.url = f"http://127.0.0.1:{port}"
        self.urls = [self.url]
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--port",
                                      str(port)], cwd=REPO, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.peak_rss = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()
        wait_ready(self.url)

    def completions(self) -> dict[str, int]:
        """How many times each job was published (one process: from the store)."""
        with contextlib.closing(Store(self.store_target)) as db:
            return {j: 1 for j in (r["id"] for r in db._all(
                "SELECT id FROM jobs WHERE status = 'completed'"))}

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


def _run_batch(server: Server | Cluster, files: list[tuple[str, bytes]], concurrency: int,
               categories: list[str], key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key or server.key}"}
    fields = {"categories[]": categories}
    # one client (thread-safe, a connection per concurrent upload) for the whole batch: the
    # client shares the server's machine, and an httpx.Client per upload would spend ~30 ms
    # of CPU each building its TLS context (1.5 s for 50) that the server then lacks
    client = httpx.Client(headers=headers, timeout=300,
                          limits=httpx.Limits(max_connections=concurrency,
                                              max_keepalive_connections=concurrency))
    urls = server.urls
    poll_errors = 0
    t0 = time.perf_counter()

    def submit(numbered: tuple[int, tuple[str, bytes]]) -> tuple[int, str | None]:
        n, item = numbered
        for _ in range(50):  # uploads spread over the replicas
            r = client.post(f"{urls[n % len(urls)]}/v1/media", data=fields,
                            files={"file": (item[0], item[1], "application/octet-stream")})
            if r.status_code in (429, 503):
                time.sleep(float(r.headers.get("retry-after", "1")))
                continue
            return r.status_code, r.json().get("id") if r.status_code == 202 else None
        return 599, None

    with client, ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(submit, enumerate(files)))
        codes = [c for c, _ in results]
        ids = [i for _, i in results if i]
        done: dict[str, str] = {}
        wanted = set(ids)
        deadline = time.monotonic() + 1800
        while len(done) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.1)  # one listing request per poll: polling must not load the server
            cursor = None
            while True:
                got = client.get(f"{urls[-1]}/v1/media", params={"limit": 100, **(
                    {"cursor": cursor} if cursor else {})})
                if got.status_code >= 500:
                    poll_errors += 1
                    break
                page = got.json()
                for job in page["data"]:
                    if job["id"] in wanted and job["status"] in ("completed", "failed"):
                        done[job["id"]] = job["status"]
                cursor = page["next_cursor"]
                if not cursor:
                    break
    wall = time.perf_counter() - t0
    published = server.completions()
    return {"codes": sorted(set(codes)), "files": len(files),
            "server_errors": sum(c >= 500 for c in codes) + poll_errors,
            "duplicated": sum(published.get(i, 0) > 1 for i in ids),
            "accepted": len(ids), "completed": sum(s == "completed" for s in done.values()),
            "failed": sum(s == "failed" for s in done.values()),
            "lost": len(ids) - len(done), "wall_s": round(wall, 2),
            "files_per_s": round(len(done) / wall, 3),
            "peak_rss_mib": server.peak_rss >> 20 if isinstance(server, Server) else 0}


class _CliEngine:
    """The engine behind ``redact file``, its models loaded once."""

    def __init__(self, categories: list[str]) -> None:
        self.redactor = Redactor(RedactSettings(categories=tuple(categories)))

    def rate(self, paths: list[Path]) -> float:
        """Photos per second redacted one after another (after one untimed photo)."""
        with tempfile.TemporaryDirectory() as out:
            self.redactor.redact(paths[0], Path(out) / f"warm{paths[0].suffix}")
            t0 = time.perf_counter()
            for i, p in enumerate(paths):
                self.redactor.redact(p, Path(out) / f"{i}{p.suffix}")
            return len(paths) / (time.perf_counter() - t0)


def _redact_command() -> list[str]:
    """The installed ``redact`` command (beside this Python), else the same entry point."""
    script = Path(sys.executable).with_name("redact")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli"]


def _cli_command_rate(paths: list[Path], categories: list[str]) -> float:
    """Photos per second of ``redact file DIR -o OUT`` on ``paths``, process start to exit."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in", Path(tmp) / "out"
        src.mkdir()
        for i, p in enumerate(paths):  # numbered: names from different folders may clash
            shutil.copyfile(p, src / f"{i:04d}_{p.name}")
        cmd = [*_redact_command(), "file", str(src), "-o", str(out),
               "--categories", ",".join(categories)]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        done = sum(1 for _ in out.rglob("*") if _.is_file() and not _.name.endswith(".json"))
        if done < len(paths):
            raise RuntimeError(f"redact file wrote {done} of {len(paths)} photos")
        return len(paths) / wall


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


def _photo_report(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The last round's API figures, with every rate and ratio the median of the rounds."""
    out = dict(rounds[-1]["api"])
    api = [r["api"]["files_per_s"] for r in rounds]
    cli = [r["cli"] for r in rounds]
    command = [r["command"] for r in rounds]

    def med(xs: list[float]) -> float:
        return round(statistics.median(xs), 3)

    out.update(
        files=sum(r["api"]["files"] for r in rounds) // len(rounds),
        server_errors=sum(r["api"]["server_errors"] for r in rounds),
        lost=sum(r["api"]["lost"] for r in rounds),
        failed=sum(r["api"]["failed"] for r in rounds),
        files_per_s=med(api), cli_files_per_s=med(cli),
        api_vs_cli=med([a / c for a, c in zip(api, cli, strict=True)]),
        cli_command_files_per_s=med(command),
        api_vs_cli_command=med([a / c for a, c in zip(api, command, strict=True)]),
        repeat=len(rounds),
        rounds=[{"files_per_s": a, "cli_files_per_s": round(c, 3),
                 "cli_command_files_per_s": round(m, 3), "wall_s": r["api"]["wall_s"]}
                for a, c, m, r in zip(api, cli, command, rounds, strict=True)])
    return out


def _cluster_report(server: Server, root: Path, paths: list[Path], args: argparse.Namespace,
                    cats: list[str]) -> dict[str, Any]:
    """Rounds of the same batch on ``server`` (one process, SQLite) and on a cluster, in turn;
    medians of the rates and of their ratio, totals of what went wrong."""
    files = [(p.name, p.read_bytes()) for p in paths]
    cluster = Cluster(root / "cluster", args.replicas, args.cluster_workers,
                      {"REDACT_WORKERS": str(args.slots)})
    rounds: list[dict[str, Any]] = []
    try:
        for i in range(max(1, args.repeat)):
            one_key = Store(server.store_target).create_key(f"bench{i}", "scale")[1]
            many_key = Store(cluster.url).create_key(f"bench{i}", "scale")[1]
            one = _run_batch(server, files, args.concurrency, cats, one_key)
            many = _run_batch(cluster, files, args.concurrency, cats, many_key)
            rounds.append({"one": one, "many": many})
    finally:
        cluster.stop()

    def med(xs: list[float]) -> float:
        return round(statistics.median(xs), 3)

    one_rate = [r["one"]["files_per_s"] for r in rounds]
    many_rate = [r["many"]["files_per_s"] for r in rounds]
    out: dict[str, Any] = {
        "files": len(files), "repeat": len(rounds),
        "sqlite_one_process_files_per_s": med(one_rate),
        "postgres_cluster_files_per_s": med(many_rate),
        "cluster_vs_one": med([m / o for m, o in zip(many_rate, one_rate, strict=True)]),
        "cluster": f"{args.replicas} API replicas + {args.cluster_workers} workers x "
                   f"{args.slots} slot(s) on PostgreSQL; one process: {args.workers} slot(s)",
    }
    for what in ("lost", "duplicated", "server_errors", "failed"):
        out[f"{what}_one"] = sum(r["one"][what] for r in rounds)
        out[f"{what}_cluster"] = sum(r["many"][what] for r in rounds)
    out["rounds"] = [{"one": r["one"]["files_per_s"], "cluster": r["many"]["files_per_s"]}
                     for r in rounds]
    return out


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
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds of the photo comparison (medians are reported)")
    ap.add_argument("--port", type=int, default=0, help="0: a free one")
    ap.add_argument("--cluster", action="store_true",
                    help="compare one process on SQLite with API replicas and workers on "
                         "PostgreSQL (with --photos; the CLI comparison is skipped)")
    ap.add_argument("--replicas", type=int, default=2, help="API replicas of --cluster")
    ap.add_argument("--cluster-workers", type=int, default=3,
                    help="worker processes of --cluster")
    ap.add_argument("--slots", type=int, default=1,
                    help="REDACT_WORKERS of each --cluster worker")
    args = ap.parse_args(argv)
    if args.cluster:
        if not args.photos:
            ap.error("--cluster needs --photos")
        why = postgres_unavailable()
        if why:
            print(f"benchmarks.api_load --cluster: skipped: {why}")
            print(json.dumps({"skipped": why}))
            return 0
    if not args.port:
        args.port = free_port()
    cats = [c for c in args.categories.split(",") if c]
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp), args.port, args.workers)
        try:
            if args.cluster:
                paths = sorted(p for p in args.photos.rglob("*")
                               if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.n]
                report["cluster"] = _cluster_report(server, Path(tmp), paths, args, cats)
            elif args.photos:
                paths = sorted(p for p in args.photos.rglob("*")
                               if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.n]
                files = [(p.name, p.read_bytes()) for p in paths]
                engine = _CliEngine(cats)
                rounds = []
                for i in range(max(1, args.repeat)):
                    # a key per round: its listing (what the batch polls) holds only its jobs
                    store = Store(Path(tmp) / "redact.db")
                    key = store.create_key(f"bench{i}", "scale")[1]
                    store.close()
                    api = _run_batch(server, files, args.concurrency, cats, key)
                    cli = engine.rate(paths)
                    command = _cli_command_rate(paths, cats)
                    rounds.append({"api": api, "cli": cli, "command": command})
                report["photos"] = _photo_report(rounds)
            if args.big:
                data = _big_jpeg(args.big_mb)
                report["big"] = _run_batch(server, [(f"big{i}.jpg", data)
                                                    for i in range(args.big)], args.big, cats)
                report["big"]["upload_mib"] = round(len(data) / 2**20, 1)
        finally:
            server.stop()
    for name, r in report.items():
        print(f"{name:8s} " + "  ".join(f"{k}={v}" for k, v in r.items() if k != "rounds"))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
