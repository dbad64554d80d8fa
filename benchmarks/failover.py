"""Failures of the many-machine deployment, measured: what each kill costs in time and in work.

    python -m benchmarks.failover [--lease-s 12] [--frames 600]

Starts a PostgreSQL server (durable) and, on it, 2 API replicas (``redact serve --no-worker``)
and 2 ``redact worker`` processes, each process with a data directory of its own and one shared
storage directory, all on this machine, and measures:

- ``worker_killed``: a video job with a webhook is uploaded; once a worker has redacted part of
  it, that worker is SIGKILLed. Recovery is the time from the kill until the other worker has
  claimed the job (its lease ran out); then whether the job completed, how many times it was
  published and how many webhooks arrived (goal: once each).
- ``api_replica_killed``: photos are uploaded, alternating between the replicas, and one
  replica is SIGKILLed in the middle; a client whose request fails sends it to the other one.
  Recovery is the time from the kill until the next upload is accepted; lost counts uploads that
  were answered 202 but never completed.

Prints a table and one JSON line. Every process stays on loopback.
"""

from __future__ import annotations

import argparse
import http.server
import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import httpx

from benchmarks.cluster import Cluster
from benchmarks.postgres_server import unavailable as postgres_unavailable
from gateway.store import Store


class _Hooks(http.server.BaseHTTPRequestHandler):
    got: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).got.append(body)
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


def _clip(path: Path, frames: int) -> bytes:
    """A 640x480 video of a moving face (the astronaut's), ``frames`` long."""
    import av
    import cv2
    import numpy as np
    import skimage.data

    face = cv2.resize(np.ascontiguousarray(skimage.data.astronaut()[60:200, 160:290, ::-1]),
                      (130, 140))
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 640, 480, "yuv420p"
        for i in range(frames):
            img = np.full((480, 640, 3), 90, np.uint8)
            x = 40 + (i * 3) % 440
            img[150:290, x:x + 130] = face
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    return path.read_bytes()


def worker_killed(d: Cluster, frames: int) -> dict[str, Any]:
    hooks = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    _Hooks.got = []
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{hooks.server_address[1]}/hook"
    data = _clip(d.root / "clip.mp4", frames)
    r = httpx.post(f"{d.urls[0]}/v1/media", headers={"Authorization": f"Bearer {d.key}"},
                   data={"categories[]": "faces", "webhook_url": hook_url},
                   files={"file": ("clip.mp4", data, "video/mp4")}, timeout=120)
    r.raise_for_status()
    job_id = r.json()["id"]
    db = Store(d.url)
    try:
        while True:
            job = db.job_any(job_id)
            assert job is not None
            if job.status == "processing" and job.progress >= 0.2 and job.lease_owner:
                break
            if job.status in ("completed", "failed"):
                raise RuntimeError("the job ended before a worker could be killed")
            time.sleep(0.02)
        victim = d.worker_of(job.lease_owner)
        killed_at = time.time()
        d.procs[victim].kill()
        claimed_s = completed_s = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            job = db.job_any(job_id)
            assert job is not None
            if claimed_s is None and job.attempts >= 2:
                claimed_s = (job.started_at or time.time()) - killed_at
            if job.status in ("completed", "failed"):
                completed_s = (job.completed_at or time.time()) - killed_at
                break
            time.sleep(0.05)
        time.sleep(2)  # a second webhook (a duplicate) would be here by now
        published = sum(len(re.findall(rf"job {job_id}: completed", d.log(n)))
                        for n in d.procs if n.startswith("worker"))
        return {"recovery_s": round(claimed_s, 2) if claimed_s is not None else None,
                "completed_after_s": round(completed_s, 2) if completed_s else None,
                "status": job.status, "attempts": job.attempts, "published": published,
                "webhooks": len(_Hooks.got), "lost": int(job.status != "completed")}
    finally:
        db.close()
        hooks.shutdown()
        d.start(victim, ["worker", "--rtsp-port", "0"])  # back to full strength


def api_replica_killed(d: Cluster, photos: int) -> dict[str, Any]:
    import cv2
    import skimage.data

    ok, buf = cv2.imencode(".jpg", skimage.data.astronaut()[:, :, ::-1])
    assert ok
    data = buf.tobytes()
    headers = {"Authorization": f"Bearer {d.key}"}
    accepted: list[str] = []
    failed_requests = 0
    killed_at = recovered_at = None
    with httpx.Client(headers=headers, timeout=30) as c:
        for i in range(photos):
            if i == photos // 2:
                d.procs["api0"].kill()
                killed_at = time.time()
            for attempt in range(2):  # the request fails on the dead replica: the other one
                api = d.urls[(i + attempt) % 2]
                try:
                    r = c.post(f"{api}/v1/media", data={"categories[]": "faces"},
                               files={"file": (f"p{i}.jpg", data, "image/jpeg")})
                except httpx.HTTPError:
                    failed_requests += 1
                    continue
                if r.status_code == 202:
                    accepted.append(r.json()["id"])
                    if killed_at is not None and recovered_at is None:
                        recovered_at = time.time()
                    break
        deadline = time.monotonic() + 300
        done: dict[str, str] = {}
        while len(done) < len(accepted) and time.monotonic() < deadline:
            for job_id in accepted:
                if job_id not in done:
                    status = c.get(f"{d.urls[1]}/v1/media/{job_id}").json()["status"]
                    if status in ("completed", "failed"):
                        done[job_id] = status
            time.sleep(0.2)
    return {"recovery_s": round(recovered_at - killed_at, 2)
            if killed_at and recovered_at else None,
            "uploads": photos, "accepted": len(accepted),
            "completed": sum(s == "completed" for s in done.values()),
            "lost": len(accepted) - sum(s == "completed" for s in done.values()),
            "failed_requests_retried": failed_requests}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lease-s", type=float, default=None,
                    help="REDACT_LEASE_S of the processes (default: the service's default)")
    ap.add_argument("--frames", type=int, default=600, help="length of the video job")
    ap.add_argument("--photos", type=int, default=12, help="uploads across the replica kill")
    args = ap.parse_args(argv)
    why = postgres_unavailable()
    if why:
        print(f"benchmarks.failover: skipped: {why}")
        print(json.dumps({"skipped": why}))
        return 0
    from gateway.settings import Settings

    lease_s = args.lease_s or Settings.model_fields["lease_s"].default
    report: dict[str, Any] = {"lease_s": lease_s}
    with tempfile.TemporaryDirectory() as tmp:
        d = Cluster(Path(tmp), apis=2, workers=2,
                    env={"REDACT_LEASE_S": str(lease_s), "REDACT_WORKERS": "1",
                         "REDACT_WEBHOOK_ALLOW_PRIVATE": "1"})
        try:
            report["worker_killed"] = worker_killed(d, args.frames)
            report["api_replica_killed"] = api_replica_killed(d, args.photos)
        finally:
            d.stop()
    for name, r in report.items():
        if isinstance(r, dict):
            print(f"{name:20s} " + "  ".join(f"{k}={v}" for k, v in r.items()))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
