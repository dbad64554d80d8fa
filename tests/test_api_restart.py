"""Nothing accepted is lost: ``redact serve`` killed with SIGKILL in the middle of a job is
started again and finishes every job it had accepted (the killed process's job once its lease
has run out); a webhook whose delivery failed before the kill is retried after the restart with
the same event id."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.store import Store
from tests.api_support import (
    ApiKeyInfo,
    Receiver,
    SubprocessServer,
    face_clip_bytes,
    jpeg_bytes,
    verify_signature,
    wait_job,
)
from tests.conftest import detail, read_video, region

FACES = {"categories[]": "faces"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def _post(url: str, key: ApiKeyInfo, data: bytes, name: str,
          webhook: str | None = None) -> str:
    fields = dict(FACES, **({"webhook_url": webhook} if webhook else {}))
    r = httpx.post(f"{url}/v1/media", headers=key.headers, data=fields,
                   files={"file": (name, data, "application/octet-stream")}, timeout=60)
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def test_killed_mid_job_then_restarted_finishes_every_job(tmp_path: Path,
                                                          receiver: Receiver) -> None:
    data_dir = tmp_path / "data"
    srv = SubprocessServer(data_dir, env={
        "REDACT_WORKERS": "1", "REDACT_DETECTOR_THREADS": "1",
        "REDACT_WEBHOOK_ALLOW_PRIVATE": "1", "REDACT_WEBHOOK_BACKOFF_S": "2",
        # the restarted process takes over the killed one's job once its lease runs out
        "REDACT_LEASE_S": "3"})
    created = srv.cli("keys", "create", "--name", "restart", "--plan", "scale")
    key = ApiKeyInfo(created["id"], created["key"], created["webhook_secret"], "scale")
    try:
        srv.start()
        video, faces = face_clip_bytes(tmp_path, n=200)
        video_id = _post(srv.url, key, video, "long.mp4", webhook=receiver.url)
        photo_ids = [_post(srv.url, key, jpeg_bytes(), f"p{i}.jpg") for i in range(3)]
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            wait_job(c, key, video_id, states=("processing", "completed", "failed"))
        srv.kill()

        db = Store(data_dir / "redact.db")
        try:
            jobs = [db.job_any(j) for j in [video_id, *photo_ids]]
        finally:
            db.close()
        states = {j.id: j.status for j in jobs if j is not None}
        assert states[video_id] == "processing", states
        assert all(states[p] == "queued" for p in photo_ids), states

        srv.start()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            done = wait_job(c, key, video_id, timeout_s=120)
            assert done["status"] == "completed", done
            assert done["frames"] == 200 and done["distinct_objects"] == {"faces": 1}
            for p in photo_ids:
                assert wait_job(c, key, p)["detections"] == {"faces": 1}
            d = c.get(f"/v1/media/{video_id}/download", headers=key.headers)
            assert d.status_code == 200
        (tmp_path / "out.mp4").write_bytes(d.content)
        out = read_video(tmp_path / "out.mp4")
        original = read_video(tmp_path / "clip.mp4")
        assert len(out.frames) == 200
        for i in (0, 100, 199):
            x1, y1, x2, y2 = faces[i]
            core = ((x1 + x2) / 2 - 8, (y1 + y2) / 2 - 8, (x1 + x2) / 2 + 8, (y1 + y2) / 2 + 8)
            assert detail(region(out.frames[i], core)) < 0.5 * detail(
                region(original.frames[i], core))
        left = sorted(p.name for p in (data_dir / "jobs" / video_id).iterdir())
        assert left == ["manifest.json", "output.mp4"], "partial output left behind"
        (hook,) = receiver.wait_for(1)
        assert json.loads(hook.body)["id"] == video_id
        assert verify_signature(key.webhook_secret, hook.body,
                                hook.headers["x-redact-signature"])

        # a webhook that failed before a kill is retried after the restart, same event id
        receiver.codes = [500] * 1000
        photo = _post(srv.url, key, jpeg_bytes(), "hooked.jpg", webhook=receiver.url)
        first = receiver.wait_for(2)[-1]
        srv.kill()
        receiver.codes.clear()
        srv.start()
        again = receiver.wait_for(3, timeout_s=30)[-1]
        assert json.loads(again.body)["id"] == photo
        assert again.headers["x-redact-event-id"] == first.headers["x-redact-event-id"]
        assert again.body == first.body
        assert verify_signature(key.webhook_secret, again.body,
                                again.headers["x-redact-signature"])
    finally:
        srv.kill()
