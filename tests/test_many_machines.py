"""The gateway as on many machines: API replicas and workers, each process with a data directory
of its own, sharing only a PostgreSQL database (started for the tests) and one storage directory.
Jobs accepted by either replica are redacted once by whichever worker takes them; a replica
killed right after accepting uploads loses none of them (the other serves their status and
results); rate limits hold across replicas; a replica starting never deletes uploads another
is receiving."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.postgres_server import PostgresServer
from gateway.store import Store
from tests.api_support import (
    ApiKeyInfo,
    SubprocessServer,
    WorkerProcess,
    decode_image,
    jpeg_bytes,
    wait_job,
)
from tests.conftest import ASTRONAUT_FACE_CORE, astronaut_bgr_image

ENV = {"REDACT_LEASE_S": "2", "REDACT_WORKERS": "1", "REDACT_DETECTOR_THREADS": "1",
       "REDACT_PLANS": '{"starter": {"requests_per_minute": 5}}'}


@dataclass
class Cluster:
    url: str
    storage: Path
    apis: list[SubprocessServer]
    workers: list[WorkerProcess]
    key: ApiKeyInfo

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        for a in self.apis:
            a.kill()


@pytest.fixture
def cluster(postgres_server: PostgresServer, tmp_path: Path) -> Iterator[Cluster]:
    url = postgres_server.database()
    storage = tmp_path / "shared"
    env = {**ENV, "REDACT_DATABASE_URL": url, "REDACT_STORAGE": str(storage)}
    apis = [SubprocessServer(tmp_path / f"api{i}", env=env, args=("--no-worker",))
            for i in range(2)]
    created = apis[0].cli("keys", "create", "--name", "fleet", "--plan", "pro")
    key = ApiKeyInfo(created["id"], created["key"], created["webhook_secret"], "pro")
    (storage / "tmp").mkdir(parents=True)
    # an upload another replica is receiving now: no replica's start may delete it
    (storage / "tmp" / "upload-in-progress").write_bytes(b"partial")
    c = Cluster(url, storage, apis, [WorkerProcess(tmp_path / f"node{i}", env, f"node{i}")
                                     .start() for i in range(2)], key)
    try:
        for a in apis:
            a.start()
        with contextlib.closing(Store(url)) as db:  # both nodes' models loaded
            deadline = time.monotonic() + 60
            while len([w for w in db.live_workers(time.time() - 5) if w.ready]) < 2:
                assert time.monotonic() < deadline, [w.text()[-2000:] for w in c.workers]
                time.sleep(0.05)
        yield c
    finally:
        c.close()


def _post(api: SubprocessServer, key: ApiKeyInfo, n: int) -> str:
    r = httpx.post(f"{api.url}/v1/media", headers=key.headers, data={"categories[]": "faces"},
                   files={"file": (f"p{n}.jpg", jpeg_bytes(), "image/jpeg")}, timeout=60)
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def test_replicas_and_workers_share_one_database_and_storage(cluster: Cluster,
                                                             tmp_path: Path) -> None:
    first, second = cluster.apis
    accepted = [_post(api, cluster.key, i) for i in range(4) for api in (first, second)]
    first.kill()  # SIGKILL right after its 202s: what it accepted is in the database and storage
    original = astronaut_bgr_image()
    with httpx.Client(base_url=second.url, timeout=30) as c:
        for job_id in accepted:
            done = wait_job(c, cluster.key, job_id, timeout_s=120)
            assert done["status"] == "completed", done
            assert done["detections"]["faces"] >= 1
            d = c.get(f"/v1/media/{job_id}/download", headers=cluster.key.headers)
            assert d.status_code == 200
            out = decode_image(d.content)
            y0, x0, y1, x1 = ASTRONAUT_FACE_CORE[1], ASTRONAUT_FACE_CORE[0], \
                ASTRONAUT_FACE_CORE[3], ASTRONAUT_FACE_CORE[2]
            changed = np.abs(out[y0:y1, x0:x1].astype(int) - original[y0:y1, x0:x1]).mean()
            assert changed > 10, f"{job_id}: the face was not covered"
        usage = c.get("/v1/account", headers=cluster.key.headers).json()["usage"]
        assert usage["images"] == len(accepted)
    with contextlib.closing(Store(cluster.url)) as db:
        jobs = [db.job_any(j) for j in accepted]
        assert all(j is not None and j.attempts == 1 for j in jobs), "a job ran twice"
    # every file is in the shared storage; the processes' own data directories hold none
    for job_id in accepted:
        assert sorted(p.name for p in (cluster.storage / "jobs" / job_id).iterdir()) == [
            "manifest.json", "output.jpg"]
    for own in (tmp_path / "api0", tmp_path / "api1", tmp_path / "node0", tmp_path / "node1"):
        assert not (own / "jobs").exists() and not (own / "redact.db").exists()
    assert (cluster.storage / "tmp" / "upload-in-progress").read_bytes() == b"partial"
    # both workers did some of the work
    logs = [w.text() for w in cluster.workers]
    assert all(": completed" in text for text in logs), [t[-1500:] for t in logs]


def test_rate_limits_hold_across_replicas(cluster: Cluster) -> None:
    created = cluster.apis[0].cli("keys", "create", "--name", "small", "--plan", "starter")
    key = ApiKeyInfo(created["id"], created["key"], created["webhook_secret"], "starter")
    limit = 5  # the starter plan's requests per minute, as REDACT_PLANS sets it here
    with httpx.Client(timeout=30) as c:
        got = [c.get(f"{cluster.apis[i % 2].url}/v1/account", headers=key.headers).status_code
               for i in range(limit + 6)]
    assert got == [200] * limit + [429] * 6, got


def test_the_load_benchmark_compares_a_cluster_with_one_process(
        postgres_server: PostgresServer, tmp_path: Path) -> None:
    from benchmarks import api_load

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        (photos / f"p{i}.jpg").write_bytes(jpeg_bytes())
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert api_load.main(["--photos", str(photos), "--n", "4", "--cluster", "--repeat", "1",
                              "--concurrency", "4", "--cluster-workers", "2"]) == 0
    report = json.loads(buf.getvalue().splitlines()[-1])["cluster"]
    assert report["files"] == 4 and report["postgres_cluster_files_per_s"] > 0
    for what in ("lost", "duplicated", "server_errors", "failed"):
        assert report[f"{what}_one"] == 0 and report[f"{what}_cluster"] == 0, report


def test_the_sweeper_deletes_only_uploads_cut_off_long_ago(tmp_path: Path) -> None:
    from gateway.jobs import STALE_UPLOAD_S, Layout, Sweeper

    layout = Layout(tmp_path / "shared")
    layout.create(clean_uploads=False)
    old, fresh = layout.tmp / "upload-old", layout.tmp / "upload-being-received"
    old.write_bytes(b"cut off")
    fresh.write_bytes(b"arriving")
    long_ago = time.time() - STALE_UPLOAD_S - 60
    os.utime(old, (long_ago, long_ago))
    with contextlib.closing(Store(tmp_path / "redact.db")) as db:
        Sweeper(db, layout, 60).sweep()
    assert not old.exists() and fresh.read_bytes() == b"arriving"
    layout.create(clean_uploads=False)  # a replica's start leaves tmp/ alone
    assert fresh.exists()
    layout.create(clean_uploads=True)  # the only API process on these files cleans it
    assert not fresh.exists()
