"""Live streams run by workers apart from the API, with real processes on loopback: ``redact
serve --no-worker`` keeps the definitions, ``redact worker`` processes claim the streams under
leases (short here) and serve them on their own RTSP servers.

- A worker killed (SIGKILL) while it streams loses the stream to the other worker, which serves
  it again within the lease time + 2 s; no player ever decodes a camera frame with the face
  showing; stopped cleanly (SIGTERM), a worker gives its streams back.
- The API killed while a worker streams: the RTSP player keeps getting frames.
- WHEP through the API to a worker in another process (signed, forwarded to its control
  server), and 503 with Retry-After while no worker runs the stream.
- The store's stream claims, renewals, fencing and versions, unit by unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest

from gateway.store import Store, StreamRow
from tests.api_support import Plane, WorkerProcess, start_plane
from tests.conftest import fill_fraction, region
from tests.live_helpers import Camera, read_stamp
from tests.test_live import PLAYER_OPTIONS, Player, camera_frames

pytest.importorskip("gi", reason="GStreamer's Python bindings (make setup installs them)")

LEASE_S = 3
ENV = {"REDACT_LEASE_S": str(LEASE_S), "REDACT_WORKERS": "1", "REDACT_DETECTOR_THREADS": "1",
       "REDACT_RTSP_PORT": "0"}
STREAM = {"name": "gate", "categories": ["faces"], "method": "fill"}


class QuickPlayer(Player):
    """A player that starts with the first keyframe it gets: it probes only a few bytes (as
    the gateway's own camera reader does), where FFmpeg's default probe reads about a second of
    stream before the first frame."""

    options: ClassVar[dict[str, str]] = {**PLAYER_OPTIONS, "probesize": "4096",
                                         "analyzeduration": "100000"}


class StreamPlane(Plane):
    """An API without a worker and worker processes on one data directory, for streams."""

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api.url, headers=self.key.headers, timeout=30)

    def row(self, stream_id: str) -> StreamRow:
        with contextlib.closing(Store(self.db_path)) as db:
            row = db.stream(stream_id)
        assert row is not None
        return row

    def holder(self, stream_id: str) -> WorkerProcess:
        """The worker process whose claim the stream is under."""
        return self.worker_of(self.row(stream_id).lease_owner)


def plane(tmp_path: Path, workers: int) -> StreamPlane:
    return start_plane(StreamPlane, tmp_path / "data", ENV, workers,
                       wait_api_ready=False)  # a worker may not be ready yet


def wait_stream(c: httpx.Client, stream_id: str, until: Any, timeout_s: float = 30.0,
                every_s: float = 0.1) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = c.get(f"/v1/streams/{stream_id}").json()
        if until(body):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(every_s)


def uncovered(cam: Camera, frames: list[np.ndarray]) -> list[int]:
    """Stamps of the camera frames whose face is not filled black."""
    return [read_stamp(px) for px in (camera_frames(frames) if frames else [])
            if fill_fraction(region(px, cam.face(read_stamp(px))), (0, 0, 0), tol=40) <= 0.9]


def test_a_worker_killed_mid_stream_loses_it_to_the_other(tmp_path: Path,
                                                          camera: Camera) -> None:
    p = plane(tmp_path, workers=2)
    players: list[Player] = []
    try:
        p.wait_ready_workers(2, LEASE_S)
        with p.client() as c:
            r = c.post("/v1/streams", json={**STREAM, "source": camera.url})
            assert r.status_code == 201, r.text
            sid = r.json()["id"]
            first = wait_stream(c, sid, lambda b: b["status"] == "live" and b["rtsp_url"])
            assert first["rtsp_url"].startswith("rtsp://127.0.0.1:")
            players.append(Player(first["rtsp_url"]))
            players[0].wait_frames(30)
            assert len(camera_frames(players[0].frames)) >= 20
            killed = p.holder(sid)
            killed.kill()
            t_kill = time.monotonic()
            # the stream shows as reconnecting once its worker's figures are older than a lease
            back = wait_stream(c, sid, lambda b: b["rtsp_url"] not in (None, first["rtsp_url"]),
                               every_s=0.05)
            players.append(QuickPlayer(back["rtsp_url"]))
            new = players[1]
            deadline = time.monotonic() + 15
            while not (new.frames and camera_frames(list(new.frames))):
                assert time.monotonic() < deadline, new.error or "no camera frame"
                time.sleep(0.02)
            first_real = next(t for px, t in zip(list(new.frames), list(new.times), strict=False)
                              if camera_frames([px]))
            takeover_s = first_real - t_kill
            print(f"takeover: camera frames back on a new player {takeover_s:.2f} s after "
                  f"the kill (lease {LEASE_S} s)")
            assert takeover_s < LEASE_S + 2
            new.wait_frames(len(new.frames) + 30)
            live = wait_stream(c, sid, lambda b: b["status"] == "live")
            assert live["stats"]["frames_redacted"] > 0
            survivor = p.holder(sid)
            assert survivor is not killed
            metrics = c.get("/metrics").text
            assert 'redact_stream_status{status="live",stream="gate"} 1.0' in metrics
            # a clean stop (SIGTERM) gives the stream back at once
            assert survivor.stop() == 0
            row = p.row(sid)
            assert row.lease_owner is None and row.runtime is None
            assert c.get(f"/v1/streams/{sid}").json()["status"] == "connecting"
    finally:
        for pl in players:
            pl.stop()
        p.close()
    assert not uncovered(camera, players[0].frames + players[1].frames)
    assert len(camera_frames(players[1].frames)) >= 20


async def _offer() -> str:
    """An aiortc viewer's offer, without its candidates: the answer is only read, nothing is
    sent anywhere."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp: str = pc.localDescription.sdp
    await pc.close()
    return "\r\n".join(ln for ln in sdp.split("\r\n")
                       if not ln.startswith(("a=candidate:", "a=end-of-candidates")))


def test_the_api_forwards_whep_to_the_worker_and_its_death_stops_no_player(
        tmp_path: Path, camera: Camera) -> None:
    pytest.importorskip("aiortc")
    p = plane(tmp_path, workers=0)
    player: Player | None = None
    offer = asyncio.run(_offer())
    try:
        with p.client() as c:
            r = c.post("/v1/streams", json={**STREAM, "source": camera.url})
            assert r.status_code == 201, r.text
            s = r.json()
            assert s["status"] == "connecting" and s["rtsp_url"] is None
            token = c.post(f"/v1/streams/{s['id']}/viewer-token").json()["token"]
            whep = f"/v1/streams/{s['id']}/whep?token={token}"
            sdp = {"content-type": "application/sdp", "authorization": ""}
            # no worker runs it yet
            early = c.post(whep, content=offer, headers=sdp)
            assert early.status_code == 503, early.text
            assert early.headers["retry-after"] == "2"
            assert early.json()["error"]["code"] == "stream_unavailable"

            p.workers.append(WorkerProcess(p.data_dir, ENV, "solo").start())
            live = wait_stream(c, s["id"], lambda b: b["status"] == "live" and b["rtsp_url"])
            row = p.row(s["id"])
            assert row.runtime is not None and row.lease_owner is not None
            control = row.runtime["control_url"]
            assert control.startswith("http://127.0.0.1:")
            # the worker's control server takes signed requests only
            assert httpx.post(f"{control}/streams/{s['id']}/whep", content=offer,
                              timeout=10).status_code == 401
            assert httpx.post(f"{control}/streams/{s['id']}/stop", timeout=10).status_code == 401

            answered = c.post(whep, content=offer, headers=sdp)
            assert answered.status_code == 201, answered.text
            assert answered.headers["content-type"].startswith("application/sdp")
            answer = answered.text
            assert "m=video" in answer and "H264/90000" in answer
            assert "a=candidate:" in answer and "a=setup:" in answer
            location = answered.headers["location"]
            assert location.startswith(f"/v1/streams/{s['id']}/whep/")
            viewers = wait_stream(c, s["id"], lambda b: b["stats"]["viewers"] >= 1)
            assert viewers["stats"]["viewers"] == 1
            bad = c.post(whep, content="v=0\r\n", headers=sdp)
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_offer"
            hang = f"{location}?token={token}"
            assert c.delete(hang, headers={"authorization": ""}).status_code == 204
            assert c.delete(hang, headers={"authorization": ""}).status_code == 404

            # the API dies; the worker goes on streaming to the player
            player = Player(live["rtsp_url"])
            player.wait_frames(20)
        p.api.kill()
        n = len(player.frames)
        time.sleep(3.0)
        assert not player.error
        assert len(player.frames) - n >= 50, len(player.frames) - n  # 25 frames/s camera
        assert len(camera_frames(player.frames[n:])) >= 50
        row = p.row(s["id"])
        assert row.runtime_at is not None and time.time() - row.runtime_at < 1.5
    finally:
        if player is not None:
            player.stop()
        p.close()
    assert not uncovered(camera, player.frames)


# ------------------------------------------------------------------------------------------
# the store, unit by unit


def _insert(db: Store, sid: str, name: str, now: float, owner: str | None = "key_1") -> None:
    assert db.insert_stream(stream_id=sid, name=name, owner=owner,
                            definition={"name": name, "source": "push"}, now=now)


def test_stream_claims_are_fenced_and_versions_reach_the_holder(tmp_path: Path) -> None:
    db = Store(tmp_path / "redact.db")
    now = time.time()
    _insert(db, "str_1", "one", now)
    assert not db.insert_stream(stream_id="str_2", name="one", owner=None, definition={},
                                now=now), "names are unique"
    a = db.claim_stream(now, "A/1", 10)
    assert a is not None and (a.id, a.lease_owner, a.version) == ("str_1", "A/1", 1)
    assert a.lease_expires_at == pytest.approx(now + 10)
    assert db.claim_stream(now + 5, "B/1", 10) is None, "held"
    runtime = {"status": "live", "control_url": "http://127.0.0.1:1"}
    got = db.renew_streams({"str_1": ("A/1", runtime)}, now + 5, now + 15)
    row = got["str_1"]
    assert row is not None and row.runtime == runtime and row.runtime_at == now + 5
    assert db.claim_stream(now + 12, "B/1", 10) is None, "renewed"
    # a change is a new version, seen by the holder at its next renewal
    changed = db.update_stream("str_1", {"name": "one", "source": "push", "zones": [1]},
                               now + 6, version=1)
    assert changed is not None and changed.version == 2
    assert db.update_stream("str_1", {}, now + 6, version=1) is None, "stale version"
    row = db.renew_streams({"str_1": ("A/1", None)}, now + 7, now + 17)["str_1"]
    assert row is not None and row.version == 2 and row.definition["zones"] == [1]
    assert row.runtime == runtime, "no runtime given: the last one stays"
    # A stalls past its lease: B takes the stream over, and A's renewals are refused
    b = db.claim_stream(now + 17.5, "B/1", 10)
    assert b is not None and b.lease_owner == "B/1" and b.runtime is None
    assert db.renew_streams({"str_1": ("A/1", runtime)}, now + 18, now + 28) == {"str_1": None}
    assert not db.release_stream("str_1", "A/1")
    still = db.stream("str_1")
    assert still is not None and still.lease_owner == "B/1" and still.runtime is None
    # a clean stop gives it back: claimable at once
    assert db.release_stream("str_1", "B/1")
    c = db.claim_stream(now + 18, "C/1", 10)
    assert c is not None and c.lease_owner == "C/1"
    # deleted: the holder's renewal finds nothing
    assert db.delete_stream("str_1") and not db.delete_stream("str_1")
    assert db.renew_streams({"str_1": ("C/1", runtime)}, now + 19, now + 29) == {"str_1": None}
    assert db.claim_stream(now + 100, "D/1", 10) is None
    db.close()


def test_streams_are_listed_per_key_and_config_cameras_upserted(tmp_path: Path) -> None:
    db = Store(tmp_path / "redact.db")
    now = time.time()
    _insert(db, "str_a", "a", now, owner="key_1")
    _insert(db, "str_b", "b", now + 1, owner="key_2")
    cam = db.upsert_stream(stream_id="str_cam", name="cam", owner=None,
                           definition={"name": "cam", "source": "rtsp://x/1"}, now=now + 2)
    assert cam is not None and cam.version == 1
    assert [r.name for r in db.list_streams("key_1")] == ["a", "cam"]
    assert [r.name for r in db.list_streams()] == ["a", "b", "cam"]
    same = db.upsert_stream(stream_id="str_cam", name="cam", owner=None,
                            definition={"name": "cam", "source": "rtsp://x/1"}, now=now + 3)
    assert same is not None and same.version == 1, "unchanged: same version"
    moved = db.upsert_stream(stream_id="str_cam", name="cam", owner=None,
                             definition={"name": "cam", "source": "rtsp://x/2"}, now=now + 3)
    assert moved is not None and moved.version == 2
    assert db.upsert_stream(stream_id="str_other", name="a", owner=None, definition={},
                            now=now) is None, "the name is another stream's"
    assert db.remove_config_streams({"str_x"}) == ["str_cam"]
    assert [r.name for r in db.list_streams()] == ["a", "b"], "only ownerless rows go"
    db.close()
