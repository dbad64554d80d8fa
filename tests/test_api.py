"""The REST API end to end: a real server on loopback, a real HTTP client, media made in code.

Covers upload, poll and download of photos and videos (pixels checked), per-category methods,
listing, deleting, manifests, the account, every error code, keys and plan limits, retention
and the health endpoints.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from engines.redact import Method
from engines.registry import CategorySettings, available_categories
from gateway import cli
from gateway.settings import MB, Settings
from pipeline.files import Redactor, RedactSettings
from tests.api_support import (
    ApiKeyInfo,
    ThreadServer,
    api_settings,
    decode_image,
    error_of,
    face_clip_bytes,
    jpeg_bytes,
    png_bytes,
    png_declaring,
    started,
    submit,
    wait_job,
)
from tests.conftest import (
    ASTRONAUT_FACE_CORE,
    astronaut_bgr_image,
    detail,
    read_video,
    region,
    write_video,
)

FACES = [("categories[]", "faces")]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    yield from started(api_settings(tmp_path_factory.mktemp("api")))


@pytest.fixture
def client(server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture
def key(server: ThreadServer) -> ApiKeyInfo:
    return server.key("pro")


def _job_of(client: httpx.Client, key: ApiKeyInfo, data: bytes, filename: str = "photo.jpg",
            fields: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    r = submit(client, key, data, filename, FACES if fields is None else fields)
    assert r.status_code == 202, r.text
    return wait_job(client, key, r.json()["id"])


# ------------------------------------------------------------------------------------------
# the happy paths


def test_photo_upload_poll_download_covers_the_face(server: ThreadServer, client: httpx.Client,
                                                    key: ApiKeyInfo) -> None:
    original = astronaut_bgr_image()
    r = submit(client, key, jpeg_bytes(original), "astronaut.jpg", FACES)
    assert r.status_code == 202, r.text
    created = r.json()
    assert created["status"] == "queued"
    assert created["categories"] == ["faces"]
    assert created["id"].startswith("med_") and created["created_at"].endswith("Z")
    assert r.headers["location"] == f"/v1/media/{created['id']}"

    done = wait_job(client, key, created["id"])
    assert done["status"] == "completed", done
    assert done["kind"] == "image" and done["progress"] == 1.0
    assert done["detections"] == {"faces": 1}
    assert done["error"] is None and done["completed_at"] and done["expires_at"]
    assert done["filename"] == "astronaut.jpg" and (done["width"], done["height"]) == (512, 512)

    d = client.get(done["download_url"], headers=key.headers)
    assert d.status_code == 200
    assert d.headers["content-type"] == "image/jpeg"
    assert "astronaut.jpg" in d.headers["content-disposition"]
    out = decode_image(d.content)
    assert out.shape == original.shape
    face_before = region(original, ASTRONAUT_FACE_CORE).astype(np.int16)
    face_after = region(out, ASTRONAUT_FACE_CORE).astype(np.int16)
    assert np.abs(face_after - face_before).mean() > 10, "the face was not changed"
    assert detail(region(out, ASTRONAUT_FACE_CORE)) < 0.4 * detail(
        region(original, ASTRONAUT_FACE_CORE))
    corner = (0, 300, 150, 512)  # bottom left: no face, only JPEG re-encoding differences
    assert np.abs(region(out, corner).astype(np.int16)
                  - region(original, corner).astype(np.int16)).mean() < 4


def test_omitted_categories_mean_every_available_one_and_aliases_work(
        client: httpx.Client, key: ApiKeyInfo) -> None:
    r = submit(client, key, jpeg_bytes(), "a.jpg", [])
    assert r.status_code == 202, r.text
    assert r.json()["categories"] == list(available_categories())
    r2 = submit(client, key, jpeg_bytes(), "a.jpg", [("pii_categories[]", "heads")])
    assert r2.status_code == 202, r2.text
    assert r2.json()["categories"] == ["faces"]
    for job in (r.json(), r2.json()):
        assert wait_job(client, key, job["id"])["status"] == "completed"


def _redact_locally(tmp_path: Path, method: Method) -> np.ndarray:
    src = tmp_path / "in.jpg"
    src.write_bytes(jpeg_bytes())
    settings = RedactSettings(categories=("faces",),
                              per_category={"faces": CategorySettings(method=method)})
    Redactor(settings).redact(src, tmp_path / f"{method.value}.jpg")
    img = cv2.imread(str(tmp_path / f"{method.value}.jpg"))
    assert img is not None
    return img


@pytest.mark.parametrize("fields", [
    [("method", "blur"), ("method[faces]", "pixelate")],
    [("obfuscation_type", "pixelation")],
], ids=["per-category", "obfuscation_type"])
def test_pixelation_gives_the_pipelines_pixelated_output(
        client: httpx.Client, key: ApiKeyInfo, tmp_path: Path,
        fields: list[tuple[str, str]]) -> None:
    done = _job_of(client, key, jpeg_bytes(), fields=[*FACES, *fields])
    assert done["status"] == "completed"
    assert done["methods"] == {"faces": "pixelate"} or done["method"] == "pixelate"
    got = decode_image(client.get(str(done["download_url"]), headers=key.headers).content)
    pixelated = _redact_locally(tmp_path, Method.PIXELATE)
    blurred = _redact_locally(tmp_path, Method.BLUR)
    face = ASTRONAUT_FACE_CORE
    to_pix = np.abs(region(got, face).astype(np.int16) - region(pixelated, face)).mean()
    to_blur = np.abs(region(got, face).astype(np.int16) - region(blurred, face)).mean()
    assert to_pix < 2.0 < to_blur, (to_pix, to_blur)


def test_video_upload_gives_counts_tracks_and_a_redacted_video(
        client: httpx.Client, key: ApiKeyInfo, tmp_path: Path) -> None:
    data, faces = face_clip_bytes(tmp_path, n=20)
    done = _job_of(client, key, data, "clip.mp4")
    assert done["status"] == "completed", done
    assert done["kind"] == "video" and done["frames"] == 20
    assert done["detections"]["faces"] >= 10
    assert done["distinct_objects"] == {"faces": 1}
    d = client.get(str(done["download_url"]), headers=key.headers)
    assert d.status_code == 200 and d.headers["content-type"] == "video/mp4"
    (tmp_path / "out.mp4").write_bytes(d.content)
    out = read_video(tmp_path / "out.mp4")
    assert len(out.frames) == 20
    original = read_video(tmp_path / "clip.mp4")
    for i in (0, 10, 19):
        x1, y1, x2, y2 = faces[i]
        core = ((x1 + x2) / 2 - 8, (y1 + y2) / 2 - 8, (x1 + x2) / 2 + 8, (y1 + y2) / 2 + 8)
        assert detail(region(out.frames[i], core)) < 0.5 * detail(
            region(original.frames[i], core)), f"frame {i}: face not covered"


def test_manifest_lists_settings_models_and_boxes(client: httpx.Client,
                                                  key: ApiKeyInfo) -> None:
    done = _job_of(client, key, png_bytes(), "photo.png")
    assert done["filename"] == "photo.png"
    r = client.get(f"/v1/media/{done['id']}/manifest", headers=key.headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    m = r.json()
    assert m["job_id"] == done["id"] and m["settings"]["categories"] == ["faces"]
    assert m["counts"] == {"faces": 1}
    (entry,) = m["files"]
    assert entry["input"] == "photo.png" and entry["kind"] == "image"
    assert entry["models"] and entry["boxes"][0]["category"] == "faces"
    d = client.get(str(done["download_url"]), headers=key.headers)
    assert d.headers["content-type"] == "image/png"


def test_list_is_paginated_and_holds_only_the_callers_jobs(
        server: ThreadServer, client: httpx.Client) -> None:
    mine, other = server.key("pro"), server.key("pro")
    ids = [submit(client, mine, jpeg_bytes(), "p.jpg", FACES).json()["id"] for _ in range(3)]
    theirs = submit(client, other, jpeg_bytes(), "p.jpg", FACES).json()["id"]
    page = client.get("/v1/media", params={"limit": 2}, headers=mine.headers).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2]
    assert page["has_more"] and page["next_cursor"]
    rest = client.get("/v1/media", params={"limit": 2, "cursor": page["next_cursor"]},
                      headers=mine.headers).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]]
    assert not rest["has_more"] and rest["next_cursor"] is None
    everything = client.get("/v1/media", headers=other.headers).json()["data"]
    assert [j["id"] for j in everything] == [theirs]
    for job_id in ids:
        wait_job(client, mine, job_id)
    done = client.get("/v1/media", params={"status": "completed"}, headers=mine.headers)
    assert len(done.json()["data"]) == 3


def test_another_keys_job_is_not_found(server: ThreadServer, client: httpx.Client,
                                       key: ApiKeyInfo) -> None:
    done = _job_of(client, key, jpeg_bytes())
    stranger = server.key("scale")
    for method, path in (("GET", ""), ("GET", "/download"), ("GET", "/manifest"),
                         ("DELETE", "")):
        r = client.request(method, f"/v1/media/{done['id']}{path}", headers=stranger.headers)
        assert r.status_code == 404 and error_of(r) == "not_found", (method, path)
    assert client.get(f"/v1/media/{done['id']}", headers=key.headers).status_code == 200


def test_delete_removes_input_and_output(server: ThreadServer, client: httpx.Client,
                                         key: ApiKeyInfo) -> None:
    done = _job_of(client, key, jpeg_bytes())
    job_dir = server.settings.data_dir / "jobs" / str(done["id"])
    assert (job_dir / "output.jpg").exists()
    r = client.delete(f"/v1/media/{done['id']}", headers=key.headers)
    assert r.status_code == 204
    assert not job_dir.exists()
    assert client.get(f"/v1/media/{done['id']}", headers=key.headers).status_code == 404
    assert client.delete(f"/v1/media/{done['id']}", headers=key.headers).status_code == 404


def test_unredacted_input_is_deleted_when_the_job_ends(server: ThreadServer,
                                                       client: httpx.Client,
                                                       key: ApiKeyInfo) -> None:
    done = _job_of(client, key, jpeg_bytes())
    job_dir = server.settings.data_dir / "jobs" / str(done["id"])
    assert sorted(p.name for p in job_dir.iterdir()) == ["manifest.json", "output.jpg"]


def test_account_reports_plan_usage_and_limits(server: ThreadServer,
                                               client: httpx.Client) -> None:
    k = server.key("free", name="back office")
    _job_of(client, k, jpeg_bytes())
    a = client.get("/v1/account", headers=k.headers)
    assert a.status_code == 200
    body = a.json()
    assert body["name"] == "back office" and body["plan"] == "free"
    assert body["usage"]["images"] == 1 and body["usage"]["video_seconds"] == 0
    assert body["limits"]["monthly_images"] == 3
    assert body["limits"]["max_upload_bytes"] == 2 * MB


# ------------------------------------------------------------------------------------------
# errors


def test_missing_or_wrong_credentials_are_401(server: ThreadServer,
                                              client: httpx.Client) -> None:
    for headers in ({}, {"Authorization": "Bearer rk_nope"}, {"Authorization": "Basic abc"},
                    {"Authorization": "Bearer"}):
        for path in ("/v1/media", "/v1/account", "/v1/media/med_x"):
            r = client.get(path, headers=headers)
            assert r.status_code == 401 and error_of(r) == "unauthorized", (headers, path)
            assert r.headers["www-authenticate"].startswith("Bearer")
    k = server.key("pro")
    assert client.get("/v1/account", headers=k.headers).status_code == 200
    server.service.db.revoke_key(k.id)
    assert client.get("/v1/account", headers=k.headers).status_code == 401


def test_framework_errors_use_the_json_error_shape(client: httpx.Client,
                                                   key: ApiKeyInfo) -> None:
    r = client.get("/v1/nothing-here", headers=key.headers)
    assert r.status_code == 404 and error_of(r) == "not_found"
    r = client.put("/v1/media", headers=key.headers)
    assert r.status_code == 405 and error_of(r) == "method_not_allowed"
    r = client.get("/v1/media", params={"limit": 0}, headers=key.headers)
    assert r.status_code == 422 and error_of(r) == "validation_error"
    r = client.get("/v1/media", params={"cursor": "abc"}, headers=key.headers)
    assert r.status_code == 400 and error_of(r) == "invalid_cursor"


@pytest.mark.parametrize(("fields", "data", "code"), [
    ([("categories[]", "tattoos")], "jpeg", "unknown_category"),
    ([("categories[]", "no_such_thing")], "jpeg", "unknown_category"),
    ([("categories[]", "faces"), ("method", "smudge")], "jpeg", "invalid_method"),
    ([("categories[]", "faces"), ("method[faces]", "smudge")], "jpeg", "invalid_method"),
    ([("method[unicorns]", "blur")], "jpeg", "unknown_category"),
    ([("categories[]", "faces"), ("webhook_url", "ftp://example.com/x")], "jpeg",
     "invalid_webhook_url"),
    (FACES, "empty", "empty_file"),
    (FACES, "text", "unsupported_media"),
    (FACES, "huge", "image_too_large"),
])
def test_bad_uploads_are_400_with_a_reason(client: httpx.Client, key: ApiKeyInfo,
                                           fields: list[tuple[str, str]], data: str,
                                           code: str) -> None:
    payload = {"jpeg": jpeg_bytes(), "empty": b"", "text": b"hello, not a photo",
               "huge": png_declaring(30_000, 30_000)}[data]
    r = submit(client, key, payload, "x.jpg", fields)
    assert r.status_code == 400, r.text
    assert error_of(r) == code
    if code == "unknown_category":
        assert "available: faces" in r.json()["error"]["message"]


def test_missing_file_part_is_400(client: httpx.Client, key: ApiKeyInfo) -> None:
    r = client.post("/v1/media", headers=key.headers, data={"categories[]": "faces"},
                    files={"other": ("a.txt", b"x")})
    assert r.status_code == 400 and error_of(r) == "missing_file"


def test_not_multipart_is_415(client: httpx.Client, key: ApiKeyInfo) -> None:
    r = client.post("/v1/media", headers=key.headers, json={"file": "abc"})
    assert r.status_code == 415 and error_of(r) == "unsupported_media_type"


def test_too_large_is_413_decided_from_the_stream(server: ThreadServer, client: httpx.Client,
                                                  ) -> None:
    k = server.key("free")  # 2 MB cap in the test settings
    r = submit(client, k, b"\0" * (3 * MB), "big.mp4")
    assert r.status_code == 413 and error_of(r) == "file_too_large"
    # no Content-Length (chunked): the server has to count; it must answer while the client
    # is still sending, having received only a few MB of the 200 MB announced by nothing
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"POST /v1/media HTTP/1.1\r\nHost: x\r\n"
                     + f"Authorization: Bearer {k.key}\r\n".encode()
                     + b"Content-Type: multipart/form-data; boundary=BB\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        head = (b'--BB\r\nContent-Disposition: form-data; name="file"; filename="b.mp4"'
                b"\r\n\r\n")
        sock.sendall(f"{len(head):x}\r\n".encode() + head + b"\r\n")
        chunk = b"\0" * (256 * 1024)
        for _ in range(12):  # 3 MB, then wait for the answer without sending more
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        answer = b""
        while b"}}" not in answer:
            got = sock.recv(4096)
            if not got:
                break
            answer += got
        # the server does not read the rest: the connection ends with the answer, so a client
        # that keeps sending is cut off instead of uploading the rest for nothing
        sent_after, closed = 0, False
        try:
            for _ in range(800):  # up to 200 MB more
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent_after += len(chunk)
        except OSError:  # reset or broken pipe
            closed = True
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"file_too_large" in answer and b"connection: close" in answer.lower()
    assert closed and sent_after < 50 * MB, sent_after
    assert list((server.settings.data_dir / "tmp").iterdir()) == []


def test_rate_limit_is_429_with_headers(server: ThreadServer, client: httpx.Client) -> None:
    k = server.key("starter")  # 5 requests a minute in the test settings
    remaining = []
    for _ in range(5):
        r = client.get("/v1/account", headers=k.headers)
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit"] == "5"
        remaining.append(int(r.headers["x-ratelimit-remaining"]))
        assert 0 < int(r.headers["x-ratelimit-reset"]) <= 60
    assert remaining == [4, 3, 2, 1, 0]
    r = client.get("/v1/media", headers=k.headers)
    assert r.status_code == 429 and error_of(r) == "rate_limited"
    assert 0 < int(r.headers["retry-after"]) <= 60
    assert r.headers["x-ratelimit-remaining"] == "0"
    assert r.headers["x-ratelimit-limit"] == "5" and "x-ratelimit-reset" in r.headers


def test_monthly_quotas_are_429_until_next_month(server: ThreadServer, client: httpx.Client,
                                                 tmp_path: Path) -> None:
    k = server.key("free")  # 3 images and 2 s of video a month in the test settings
    ids = [submit(client, k, jpeg_bytes(), "p.jpg", FACES) for _ in range(3)]
    assert [r.status_code for r in ids] == [202, 202, 202]
    r = submit(client, k, jpeg_bytes(), "p.jpg", FACES)
    assert r.status_code == 429 and error_of(r) == "quota_exceeded"
    assert int(r.headers["retry-after"]) > 0
    frames = [np.full((48, 64, 3), i * 8, np.uint8) for i in range(30)]
    clip = write_video(tmp_path / "3s.mp4", frames, fps=10)  # 3 s > the 2 s left
    r = submit(client, k, clip.read_bytes(), "3s.mp4", FACES)
    assert r.status_code == 429 and error_of(r) == "quota_exceeded"
    assert "video" in r.json()["error"]["message"]
    short = write_video(tmp_path / "1s.mp4", frames[:10], fps=10)
    assert submit(client, k, short.read_bytes(), "1s.mp4", FACES).status_code == 202
    usage = client.get("/v1/account", headers=k.headers).json()["usage"]
    assert usage["images"] == 3 and 0.9 <= usage["video_seconds"] <= 1.2
    for job in ids:
        wait_job(client, k, job.json()["id"])


def test_download_after_retention_is_410_and_files_are_gone(
        server: ThreadServer, client: httpx.Client, key: ApiKeyInfo) -> None:
    done = _job_of(client, key, jpeg_bytes())
    job_dir = server.settings.data_dir / "jobs" / str(done["id"])
    assert job_dir.exists()
    assert server.service.sweeper is not None
    assert server.service.sweeper.sweep(now=time.time() + 24 * 3600 + 60) >= 1
    assert not job_dir.exists()
    r = client.get(f"/v1/media/{done['id']}/download", headers=key.headers)
    assert r.status_code == 410 and error_of(r) == "expired"
    r = client.get(f"/v1/media/{done['id']}/manifest", headers=key.headers)
    assert r.status_code == 410
    status = client.get(f"/v1/media/{done['id']}", headers=key.headers).json()
    assert status["expired"] is True and status["download_url"] is None


def test_health_readiness_and_metrics(client: httpx.Client, key: ApiKeyInfo) -> None:
    _job_of(client, key, jpeg_bytes())
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and all(ready.json()["checks"].values())
    text = client.get("/metrics").text
    for name in ('redact_jobs{state="completed"}', "redact_queue_depth",
                 'redact_processing_seconds_count{kind="image"}',
                 'redact_webhook_deliveries{state="pending"}',
                 'redact_uploads_total{outcome="accepted"}', "redact_video_frames_total"):
        assert name in text, name
    assert client.get("/docs").status_code == 200
    assert "/v1/media" in client.get("/openapi.json").json()["paths"]


# ------------------------------------------------------------------------------------------
# settings, plans and keys


def test_default_plans_and_env_settings(monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    assert {n: p.requests_per_minute for n, p in s.plans.items()} == {
        "free": 60, "starter": 120, "pro": 300, "scale": 1000}
    free = s.plan("free")
    assert (free.monthly_images, free.monthly_video_seconds, free.max_upload_bytes) == (
        100, 300, 25 * MB)
    assert s.retention_hours == 24 and not s.webhook_allow_private
    monkeypatch.setenv("REDACT_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("REDACT_WEBHOOK_ALLOW_PRIVATE", "1")
    monkeypatch.setenv("REDACT_PLANS", json.dumps({"free": {"requests_per_minute": 7}}))
    e = Settings()
    assert e.data_dir == tmp_path / "d" and e.webhook_allow_private
    assert e.plan("free").requests_per_minute == 7
    assert e.plan("free").monthly_images == 100  # merged over the defaults
    assert e.plan("scale").requests_per_minute == 1000


def test_keys_cli_create_list_revoke(tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keys", "create", "--name", "ops", "--plan", "scale",
                     "--data-dir", str(tmp_path)]) == 0
    created = json.loads(capsys.readouterr().out)
    assert set(created) >= {"id", "key", "webhook_secret", "plan"}
    assert created["plan"] == "scale" and created["key"].startswith("rk_")
    db = (tmp_path / "redact.db").read_bytes()
    assert created["key"].encode() not in db, "keys must be stored hashed"
    assert cli.main(["keys", "list", "--data-dir", str(tmp_path)]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]
    assert cli.main(["keys", "revoke", created["id"], "--data-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert cli.main(["keys", "list", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""
    assert cli.main(["keys", "revoke", created["id"], "--data-dir", str(tmp_path)]) == 1


# ------------------------------------------------------------------------------------------
# a full queue


def test_full_queue_is_503_with_retry_after(tmp_path: Path) -> None:
    settings = api_settings(tmp_path / "q", workers=1, queue_size=1)
    for server in started(settings):
        k = server.key("scale")
        with httpx.Client(base_url=server.url, timeout=30) as c:
            data, _ = face_clip_bytes(tmp_path, n=150)
            long = submit(c, k, data, "long.mp4", FACES).json()["id"]
            wait_job(c, k, long, states=("processing", "completed", "failed"))
            waiting = submit(c, k, jpeg_bytes(), "p.jpg", FACES)
            assert waiting.status_code == 202
            if c.get(f"/v1/media/{long}", headers=k.headers).json()["status"] != "processing":
                pytest.skip("the video finished before the queue could fill")
            r = c.get(f"/v1/media/{waiting.json()['id']}/download", headers=k.headers)
            assert r.status_code == 409 and error_of(r) == "not_ready"
            full = submit(c, k, jpeg_bytes(), "p.jpg", FACES)
            assert full.status_code == 503 and error_of(full) == "queue_full"
            assert int(full.headers["retry-after"]) > 0
            assert wait_job(c, k, waiting.json()["id"])["status"] == "completed"
            assert wait_job(c, k, long)["status"] == "completed"


def test_a_job_chooses_its_device_and_reports_what_ran(client: httpx.Client, key: ApiKeyInfo,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from engines import gpu

    photo = jpeg_bytes(astronaut_bgr_image())
    for device in ("cpu", "auto"):
        r = submit(client, key, photo, "a.jpg", [*FACES, ("device", device)])
        assert r.status_code == 202, r.text
        assert r.json()["device"] == device
        done = wait_job(client, key, r.json()["id"])
        assert done["status"] == "completed" and done["detections"] == {"faces": 1}
        assert done["device"] == device
        assert done["runtime"]["device"] == "cpu"  # no GPU here: auto is the CPU path
        assert done["runtime"]["detector_backend"] == "onnxruntime (cpu)"
    r = submit(client, key, photo, "a.jpg", [*FACES, ("device", "tpu")])
    assert r.status_code == 400 and error_of(r) == "invalid_device"
    assert "auto, cpu, cuda" in r.json()["error"]["message"]
    # as on a machine without a GPU (the tests' CUDA simulator switched off)
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "0")
    gpu.cuda_probe.cache_clear()
    try:
        r = submit(client, key, photo, "a.jpg", [*FACES, ("device", "cuda")])
    finally:
        monkeypatch.undo()
        gpu.cuda_probe.cache_clear()
    assert r.status_code == 400 and error_of(r) == "device_unavailable"
    assert "no NVIDIA driver" in r.json()["error"]["message"]
