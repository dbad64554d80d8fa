"""Live streams through the REST API, on loopback: a simulated RTSP camera, a real server,
a real HTTP client and a real RTSP player."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import pytest

from gateway.settings import Settings
from gateway.store import Store
from gateway.streams import StreamDef, load_stream_config
from tests.api_support import ApiKeyInfo, ThreadServer
from tests.conftest import fill_fraction, region
from tests.live_helpers import Camera, Publisher, read_stamp
from tests.test_live import Player, camera_frames

pytest.importorskip("gi", reason="GStreamer's Python bindings (make setup installs them)")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REDACT_RTSP_PORT", "0")  # any free port
        data = tmp_path_factory.mktemp("streams")
        srv = ThreadServer(Settings(data_dir=data, workers=1)).start()
    yield srv
    srv.stop()


@pytest.fixture
def key(server: ThreadServer) -> ApiKeyInfo:
    return server.key()


@pytest.fixture
def client(server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _wait_live(client: httpx.Client, key: ApiKeyInfo, sid: str) -> dict[str, object]:
    end = time.monotonic() + 20
    body: dict[str, object] = {}
    while time.monotonic() < end:
        body = client.get(f"/v1/streams/{sid}", headers=key.headers).json()
        if body["status"] == "live":
            return body
        time.sleep(0.2)
    raise AssertionError(body)


def _wait_stats(client: httpx.Client, key: ApiKeyInfo, sid: str,
                until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    end = time.monotonic() + 10
    while True:
        stats: dict[str, Any] = client.get(f"/v1/streams/{sid}",
                                           headers=key.headers).json()["stats"]
        if until(stats) or time.monotonic() > end:
            return stats
        time.sleep(0.1)


def assert_played_faces_black(rtsp_url: str, camera: Camera) -> None:
    """An RTSP player of ``rtsp_url`` sees the camera's face filled black on every frame."""
    player = Player(rtsp_url)
    player.wait_frames(30)
    player.stop()
    shown = camera_frames(player.frames)
    assert len(shown) >= 20
    for px in shown:
        assert fill_fraction(region(px, camera.face(read_stamp(px))), (0, 0, 0), tol=40) > 0.9


def test_stream_lifecycle(client: httpx.Client, key: ApiKeyInfo, camera: Camera,
                          server: ThreadServer) -> None:
    source = camera.url.replace("rtsp://", "rtsp://admin:hunter2@")
    r = client.post("/v1/streams", headers=key.headers, json={
        "name": "gate-1", "source": source, "categories": ["heads"], "method": "fill"})
    assert r.status_code == 201, r.text
    s = r.json()
    assert s["name"] == "gate-1" and s["status"] in ("connecting", "live")
    assert s["rtsp_url"].startswith("rtsp://127.0.0.1:") and s["rtsp_url"].endswith("/gate-1")
    assert s["whep_url"].endswith(f"/v1/streams/{s['id']}/whep")
    assert "token=" in s["viewer_url"] and s["categories"] == ["faces"]
    assert "hunter2" not in r.text and "admin" not in r.text

    live = _wait_live(client, key, s["id"])
    assert "hunter2" not in str(live)
    # filled black: the face region is black on every frame the player shows
    assert_played_faces_black(s["rtsp_url"], camera)
    stats = client.get(f"/v1/streams/{s['id']}", headers=key.headers).json()["stats"]
    assert stats["frames_redacted"] > 0 and stats["output_fps"] > 0
    assert set(stats) >= {"input_fps", "output_fps", "latency_ms_p50", "latency_ms_p95",
                          "frames_redacted", "detector_calls_per_frame", "reconnects", "viewers"}
    # what runs the stream (auto: the CPU on a machine without a GPU)
    assert stats["runtime"] == {"device": "cpu", "detector_backend": "onnxruntime (cpu)",
                                "kernels": "cpu (OpenCV)", "decode": "cpu", "encoder": "libx264"}
    assert s["device"] == "auto"
    metrics = client.get("/metrics").text
    assert 'redact_stream_status{status="live",stream="gate-1"} 1.0' in metrics
    redacted = [ln for ln in metrics.splitlines()
                if ln.startswith('redact_stream_frames_redacted_total{stream="gate-1"}')]
    assert redacted and float(redacted[0].split()[-1]) > 0
    assert "hunter2" not in metrics and "admin" not in metrics

    r = client.patch(f"/v1/streams/{s['id']}", headers=key.headers,
                     json={"zones": [[[0, 0.75], [1, 0.75], [1, 1], [0, 1]]]})
    assert r.status_code == 200 and r.json()["zones"]
    assert (s["version"], r.json()["version"]) == (1, 2)
    # the in-process worker applies the new version at its next pass
    runner = server.service.worker.streams if server.service.worker else None
    assert runner is not None and runner.poke()
    running = runner.running(s["id"])
    assert running is not None and running.spec.zones == r.json()["zones"]
    assert running.live.settings.zones
    assert [x["name"] for x in client.get("/v1/streams", headers=key.headers).json()["data"]] \
        == ["gate-1"]

    other = server.key(name="other")
    assert client.get(f"/v1/streams/{s['id']}", headers=other.headers).status_code == 404
    assert client.get("/v1/streams", headers=other.headers).json()["data"] == []

    # the viewer page and WHEP with a viewer token; the token only opens this stream
    token = client.post(f"/v1/streams/{s['id']}/viewer-token", headers=key.headers).json()
    page = client.get(token["viewer_url"].replace(server.url, ""))
    assert page.status_code == 200 and "RTCPeerConnection" in page.text
    assert f"/v1/streams/{s['id']}/whep" in page.text
    assert client.get(f"/viewer/{s['id']}?token=bad.1.x").status_code == 401
    assert client.get(f"/viewer/{s['id']}").status_code == 401
    whep = f"/v1/streams/{s['id']}/whep?token={token['token']}"
    assert client.post(whep, content="v=0", headers={"content-type": "text/plain"}) \
        .status_code == 415
    bad = client.post(whep, content="v=0\r\n", headers={"content-type": "application/sdp"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_offer"
    assert client.post(f"/v1/streams/{s['id']}/whep", content="v=0",
                       headers={"content-type": "application/sdp"}).status_code == 401

    assert client.delete(f"/v1/streams/{s['id']}", headers=key.headers).status_code == 204
    assert client.get(f"/v1/streams/{s['id']}", headers=key.headers).status_code == 404


def test_a_push_stream_takes_a_publishing_camera(client: httpx.Client, key: ApiKeyInfo,
                                                server: ThreadServer) -> None:
    r = client.post("/v1/streams", headers=key.headers, json={
        "name": "dash-7", "source": "push", "categories": ["faces"], "method": "fill"})
    assert r.status_code == 201, r.text
    s = r.json()
    assert s["source"] == "push" and s["status"] == "connecting"
    pub_url = s["publish_url"]
    assert pub_url.startswith("rtsp://dash-7:") and pub_url.endswith("/dash-7/publish")
    password = pub_url.split(":")[2].split("@")[0]
    assert len(password) >= 20
    # the publish password is for the owner only
    stats = client.get(f"/viewer/{s['id']}/stats?token=" + client.post(
        f"/v1/streams/{s['id']}/viewer-token", headers=key.headers).json()["token"])
    assert stats.status_code == 200 and password not in stats.text
    assert client.get(f"/v1/streams/{s['id']}", headers=server.key(name="o2").headers) \
        .status_code == 404

    wrong = Publisher().publish(pub_url.replace(password, "guess"))
    end = time.monotonic() + 10
    while not wrong.error and time.monotonic() < end:
        time.sleep(0.05)
    assert "401" in wrong.error
    wrong.stop()

    cam = Publisher().publish(pub_url)
    try:
        live = _wait_live(client, key, s["id"])
        pub_stats = live["stats"]
        assert isinstance(pub_stats, dict) and pub_stats["publisher_connected"] is True
        assert_played_faces_black(s["rtsp_url"], cam)
        # deleting the stream hangs up on the camera
        assert client.delete(f"/v1/streams/{s['id']}", headers=key.headers).status_code == 204
        end = time.monotonic() + 10
        while not cam.error and time.monotonic() < end:
            time.sleep(0.05)
        assert cam.error
    finally:
        cam.stop()


def test_a_recorded_stream_keeps_redacted_mp4_segments(
        client: httpx.Client, key: ApiKeyInfo, camera: Camera, server: ThreadServer,
        tmp_path: Path) -> None:
    r = client.post("/v1/streams", headers=key.headers, json={
        "name": "rec-1", "source": camera.url, "categories": ["faces"], "method": "fill",
        "outputs": {"rtsp": False, "record": {"segment_s": 1}}})
    assert r.status_code == 201, r.text
    s = r.json()
    assert s["outputs"] == ["record"] and s["rtsp_url"] is None
    _wait_live(client, key, s["id"])
    listing: dict[str, object] = {}
    end = time.monotonic() + 20
    while time.monotonic() < end:
        listing = client.get(s["recordings_url"].replace(server.url, ""),
                             headers=key.headers).json()
        if len(listing["data"]) >= 2:  # type: ignore[arg-type]
            break
        time.sleep(0.3)
    segments = listing["data"]
    assert isinstance(segments, list) and len(segments) >= 2 and listing["recording"] is True
    assert other_key_cannot(client, server, s["recordings_url"].replace(server.url, ""))
    for seg in segments[:2]:
        assert 0.5 < seg["duration_s"] < 3 and seg["bytes"] > 1000
        assert seg["name"].endswith("Z.mp4") and seg["started_at"].endswith("Z")
        got = client.get(seg["download_url"].replace(server.url, ""), headers=key.headers)
        assert got.status_code == 200 and got.headers["content-type"] == "video/mp4"
        path = tmp_path / seg["name"]
        path.write_bytes(got.content)
        with av.open(str(path)) as c:
            frames = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
        shown = camera_frames(frames)
        assert len(shown) >= 15  # about 25 frames a second of camera
        for px in shown:  # the recording holds the redacted picture only
            assert fill_fraction(region(px, camera.face(read_stamp(px))), (0, 0, 0),
                                 tol=40) > 0.9
    rec_url = s["recordings_url"].replace(server.url, "")
    assert client.get(f"{rec_url}/..%2Fstreams.json", headers=key.headers).status_code == 404
    assert client.get(f"{rec_url}/20990101T000000Z.mp4", headers=key.headers).status_code == 404
    # the figures come from the worker's last renewal (at most half a second old)
    stats = _wait_stats(client, key, s["id"],
                        lambda st: st["recording"]["segments_written"] >= 2)
    assert not stats["recording"]["last_error"]
    # deleting the stream deletes its recordings
    assert client.delete(f"/v1/streams/{s['id']}", headers=key.headers).status_code == 204
    assert not (server.settings.data_dir / "recordings" / s["id"]).exists()


def other_key_cannot(client: httpx.Client, server: ThreadServer, url: str) -> bool:
    return client.get(url, headers=server.key(name="o3").headers).status_code == 404


@pytest.mark.parametrize(("body", "code", "message"), [
    ({"name": "Bad Name!", "source": "rtsp://h/x"}, "invalid_stream", "name"),
    ({"name": "a", "source": "http://h/x"}, "invalid_stream", "rtsp://"),
    ({"name": "a", "source": "pull"}, "invalid_stream", "push"),
    ({"name": "a", "source": "rtsp://h/x", "outputs": ["hls"]}, "invalid_stream",
     "available: rtsp, webrtc, record"),
    ({"name": "a", "source": "rtsp://h/x", "outputs": {"record": {"segment_s": 0}}},
     "invalid_stream", "outputs.record.segment_s"),
    ({"name": "a", "source": "rtsp://h/x", "outputs": {"record": {"days": 3}}},
     "invalid_stream", "unknown days"),
    ({"name": "a", "source": "rtsp://h/x", "categories": ["tattoos"]}, "unknown_category",
     "available: faces"),
    ({"name": "a", "source": "rtsp://h/x", "method": "smudge"}, "invalid_stream", "method"),
    ({"name": "a", "source": "rtsp://h/x", "zones": [[[0, 0], [1, 1]]]}, "invalid_stream",
     "zones[0]"),
    ({"name": "a", "source": "rtsp://h/x", "colour": "red"}, "invalid_stream", "unknown"),
])
def test_bad_stream_definitions_are_400(client: httpx.Client, key: ApiKeyInfo,
                                        body: dict[str, object], code: str,
                                        message: str) -> None:
    r = client.post("/v1/streams", headers=key.headers, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code and message in r.json()["error"]["message"]


def test_the_streams_page_is_served(client: httpx.Client) -> None:
    page = client.get("/streams")
    assert page.status_code == 200 and "/v1/streams" in page.text and "Bearer" in page.text


def test_streams_need_a_key(client: httpx.Client) -> None:
    assert client.get("/v1/streams").status_code == 401
    assert client.post("/v1/streams", json={}).status_code == 401


def test_a_camera_that_is_down_reconnects_and_the_definitions_survive_a_restart(
        tmp_path: Path) -> None:
    """A camera of the cameras file that is down keeps being retried; the streams of an older
    release's ``streams.json`` move into the store once; the cameras file's, the migrated and
    the API's streams are all there after a restart."""
    cfg = tmp_path / "cameras.toml"
    cfg.write_text('[[stream]]\nname = "yard"\nsource = "rtsp://127.0.0.1:9/none"\n'
                   'categories = ["faces"]\n')
    data_dir = tmp_path / "data"
    with contextlib.closing(Store(data_dir / "redact.db")) as db:
        rec, secret = db.create_key("old", "pro")
    key = ApiKeyInfo(rec.id, secret, rec.webhook_secret, "pro")
    legacy = StreamDef.parse({"name": "legacy", "source": "rtsp://127.0.0.1:9/old"}, rec.id)
    (data_dir / "streams.json").write_text(json.dumps([dataclasses.asdict(legacy)]))
    names: list[set[str]] = []
    for _ in range(2):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("REDACT_RTSP_PORT", "0")
            srv = ThreadServer(Settings(data_dir=data_dir, workers=1), cfg).start()
        try:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                data = c.get("/v1/streams", headers=key.headers).json()["data"]
                names.append({s["name"] for s in data})
                if len(names) > 1:
                    break
                (yard,) = [s for s in data if s["name"] == "yard"]
                assert yard["id"] == load_stream_config(cfg)[0].id
                end = time.monotonic() + 10
                while time.monotonic() < end:
                    s = c.get(f"/v1/streams/{yard['id']}", headers=key.headers).json()
                    if s["stats"]["reconnects"] >= 1:
                        break
                    time.sleep(0.2)
                assert s["status"] in ("reconnecting", "connecting")
                assert s["stats"]["reconnects"] >= 1
                created = c.post("/v1/streams", headers=key.headers, json={
                    "name": "kept", "source": "rtsp://127.0.0.1:9/other"})
                assert created.status_code == 201
        finally:
            srv.stop()
    assert names == [{"yard", "legacy"}, {"yard", "legacy", "kept"}]
    assert not (data_dir / "streams.json").exists()
    assert "legacy" in (data_dir / "streams.json.migrated").read_text()
    with contextlib.closing(Store(data_dir / "redact.db")) as db:
        rows = {r.name: r for r in db.list_streams()}
    assert rows["legacy"].id == legacy.id and rows["legacy"].owner == rec.id
    assert rows["yard"].owner is None
    # a clean stop gave every stream back: the next worker takes them at once
    assert all(r.lease_owner is None and r.runtime is None for r in rows.values())


def test_the_viewer_page_hands_the_ice_servers_to_the_browser() -> None:
    from gateway.viewer import viewer_page

    turn = {"urls": ["turn:turn.example.org:3478"], "username": "u", "credential": "p"}
    page = viewer_page("cam", "/w", "/s", "tok", [turn])
    assert '"iceServers": [{"urls": ["turn:turn.example.org:3478"], "username": "u", ' \
           '"credential": "p"}]' in page
    assert "new RTCPeerConnection({ iceServers: CONFIG.iceServers })" in page


def test_a_push_camera_keeps_its_publish_url_across_restarts(tmp_path: Path) -> None:
    """A dashcam is configured once: the publish URL of a push stream, from the config file or
    the API, is the same after the service restarts."""
    cfg = tmp_path / "cameras.toml"
    cfg.write_text('[[stream]]\nname = "van-3"\nsource = "push"\n')
    urls: list[dict[str, str]] = []
    key: ApiKeyInfo | None = None
    for _ in range(2):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("REDACT_RTSP_PORT", "0")
            srv = ThreadServer(Settings(data_dir=tmp_path / "data", workers=1), cfg).start()
        try:
            key = key or srv.key()  # the key (kept in the data directory) outlives the restart
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                if not urls:
                    assert c.post("/v1/streams", headers=key.headers, json={
                        "name": "van-4", "source": "push"}).status_code == 201
                data = c.get("/v1/streams", headers=key.headers).json()["data"]
                # the RTSP port is picked afresh here (port 0); the credentials and path stay
                urls.append({s["name"]: s["publish_url"].rsplit(":", 1)[0] + "/" +
                             s["publish_url"].split("/", 3)[3] for s in data})
        finally:
            srv.stop()
    assert set(urls[0]) == {"van-3", "van-4"} and urls[0] == urls[1]


def test_a_recording_is_finished_when_the_service_stops(tmp_path: Path, camera: Camera) -> None:
    """Stopping the service finishes the open segment: a playable MP4, no leftover part."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REDACT_RTSP_PORT", "0")
        srv = ThreadServer(Settings(data_dir=tmp_path / "data", workers=1)).start()
    try:
        key = srv.key()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            s = c.post("/v1/streams", headers=key.headers, json={
                "name": "short", "source": camera.url, "outputs": ["record"]}).json()
            _wait_live(c, key, s["id"])
            time.sleep(1.5)  # well inside the first (60 s) segment
    finally:
        srv.stop()
    files = sorted((tmp_path / "data" / "recordings" / s["id"]).iterdir())
    assert [f.suffix for f in files] == [".mp4"], files
    with av.open(str(files[0])) as c:
        assert sum(1 for _ in c.decode(video=0)) >= 20
