"""Live streams on a Ray cluster of several nodes (``ray.cluster_utils``, every node on loopback),
with the definitions in a PostgreSQL database (started for the tests): ``redact serve
--no-worker`` keeps the definitions, ``redact ray-streams`` keeps one detached actor per stream.

- The stream runs as an actor on a node with CPUs and is served from there (``rtsp_url``); the
  API forwards WHEP offers to the actor's control server.
- That node killed: Ray restarts the actor on another node, the stream is back for a new
  player, and no player ever decodes a camera frame with the face showing.
- The Ray head killed (the whole cluster lost): once a head is back at the same address, the
  stream is running again, created from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from benchmarks.postgres_server import PostgresServer
from gateway.store import Store
from tests.api_support import REPO, ApiKeyInfo, SubprocessServer
from tests.live_helpers import Camera, read_stamp
from tests.test_live import Player
from tests.test_stream_workers import (
    QuickPlayer,
    _offer,
    camera_frames,
    uncovered,
    wait_stream,
)

pytest.importorskip("gi", reason="GStreamer's Python bindings (make setup installs them)")
pytest.importorskip("aiortc")
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray]')")
cluster_utils = pytest.importorskip("ray.cluster_utils")

LEASE_S = 3
ENV = {"REDACT_LEASE_S": str(LEASE_S), "REDACT_DETECTOR_THREADS": "1",
       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
STREAM = {"name": "gate", "categories": ["faces"], "method": "fill"}
# every node on loopback (Ray otherwise binds the machine's address)
NODE = {"num_cpus": 2, "include_dashboard": False, "node_ip_address": "127.0.0.1"}


@dataclass
class RayPlane:
    cluster: Any
    port: int
    api: SubprocessServer
    reconciler: subprocess.Popen[bytes]
    log: Path
    key: ApiKeyInfo
    url: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api.url, headers=self.key.headers, timeout=30)

    def node_of(self, stream_id: str) -> Any:
        """The Ray node whose raylet runs the stream's actor process."""
        with contextlib.closing(Store(self.url)) as db:
            row = db.stream(stream_id)
        assert row is not None and row.lease_owner, row
        pid = int(row.lease_owner.split("/")[0].split(":")[-2])
        ancestors = {p.pid for p in psutil.Process(pid).parents()}
        for node in self.cluster.list_all_nodes():
            raylet = node.all_processes["raylet"][0].process.pid
            if raylet in ancestors:
                return node
        raise AssertionError(f"no node runs process {pid}")

    def close(self) -> None:
        self.reconciler.terminate()  # its reconciler child goes with it
        try:
            self.reconciler.wait(15)
        except subprocess.TimeoutExpired:
            self.reconciler.kill()
        self.api.kill()
        with contextlib.suppress(Exception):
            self.cluster.shutdown()


def _cluster(port: int | None = None) -> Any:
    """A head without CPUs (actors go to the worker nodes) and two nodes with two CPUs each."""
    head: dict[str, Any] = {"num_cpus": 0, "include_dashboard": False,
                            "node_ip_address": "127.0.0.1"}
    if port is not None:
        head["gcs_server_port"] = port
    c = cluster_utils.Cluster(initialize_head=True, connect=False, head_node_args=head)
    for _ in range(2):
        c.add_node(**NODE)
    return c


@pytest.fixture
def plane(postgres_server: PostgresServer, tmp_path: Path) -> Iterator[RayPlane]:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cluster = _cluster()
    port = int(cluster.address.rsplit(":", 1)[1])
    url = postgres_server.database()
    env = {**ENV, "REDACT_DATABASE_URL": url, "REDACT_STORAGE": str(tmp_path / "shared"),
           "REDACT_RAY_ADDRESS": cluster.address}
    api = SubprocessServer(tmp_path / "api", env=env, args=("--no-worker",))
    created = api.cli("keys", "create", "--name", "ray", "--plan", "pro")
    key = ApiKeyInfo(created["id"], created["key"], created["webhook_secret"], "pro")
    log = tmp_path / "ray-streams.log"
    with open(log, "wb") as out:
        reconciler = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "ray-streams"], cwd=REPO,
            env={**os.environ, **env, "REDACT_DATA_DIR": str(tmp_path / "rs")}, stdout=out,
            stderr=subprocess.STDOUT)
    p = RayPlane(cluster, port, api, reconciler, log, key, url)
    try:
        api.start(ready=False)
        yield p
    finally:
        p.close()


def _back(p: RayPlane, c: httpx.Client, sid: str, old_url: str | None, t0: float,
          cam: Camera) -> tuple[float, Player]:
    """Wait for the stream to be served at a new URL and a new player to decode camera frames;
    the seconds from ``t0`` to the first camera frame, and the player."""
    back = wait_stream(c, sid, lambda b: b["status"] == "live" and b["rtsp_url"] not in (
        None, old_url), timeout_s=120, every_s=0.1)
    player = QuickPlayer(back["rtsp_url"])
    deadline = time.monotonic() + 45
    while not (player.frames and camera_frames(list(player.frames))):
        assert time.monotonic() < deadline, player.error or "no camera frame"
        if player.error:  # as a player does: connect again
            player = QuickPlayer(back["rtsp_url"])
        time.sleep(0.02)
    first = next(t for px, t in zip(list(player.frames), list(player.times), strict=False)
                 if camera_frames([px]))
    return first - t0, player


def test_a_stream_survives_its_node_and_the_head(plane: RayPlane, camera: Camera) -> None:
    players: list[Player] = []
    try:
        with plane.client() as c:
            r = c.post("/v1/streams", json={**STREAM, "source": camera.url})
            assert r.status_code == 201, r.text
            sid = r.json()["id"]
            first = wait_stream(c, sid, lambda b: b["status"] == "live" and b["rtsp_url"],
                                timeout_s=120)
            players.append(Player(first["rtsp_url"]))
            players[0].wait_frames(30)
            assert len(camera_frames(players[0].frames)) >= 20
            with contextlib.closing(Store(plane.url)) as db:
                row = db.stream(sid)
            assert row is not None and (row.lease_owner or "").startswith(f"ray:{sid}:"), row
            # a WHEP offer to the API is forwarded to the actor's control server
            token = c.post(f"/v1/streams/{sid}/viewer-token").json()["token"]
            answered = c.post(f"/v1/streams/{sid}/whep?token={token}",
                              content=asyncio.run(_offer()),
                              headers={"content-type": "application/sdp", "authorization": ""})
            assert answered.status_code == 201, answered.text

            # the node running the stream dies: Ray restarts the actor on the other node
            node = plane.node_of(sid)
            t_kill = time.monotonic()
            plane.cluster.remove_node(node, allow_graceful=False)
            node_s, player = _back(plane, c, sid, first["rtsp_url"], t_kill, camera)
            players.append(player)
            print(f"node killed: camera frames on a new player {node_s:.1f} s after the kill")
            player.wait_frames(len(player.frames) + 20)
            assert plane.node_of(sid) is not node

            # the head dies, and the nodes with it: a new cluster at the same address
            before = wait_stream(c, sid, lambda b: b["status"] == "live")["rtsp_url"]
            t_head = time.monotonic()
            plane.cluster.shutdown()
            plane.cluster = _cluster(plane.port)
            head_s, player = _back(plane, c, sid, before, t_head, camera)
            players.append(player)
            print(f"head killed: camera frames on a new player {head_s:.1f} s after the kill")
            player.wait_frames(len(player.frames) + 20)
    finally:
        for p in players:
            p._stop.set()
    for p in players:
        # a player cut off by a kill may decode a broken last picture: one whose stamp the
        # camera never sent is not a camera frame (a frame the camera sent carries its stamp)
        frames = [px for px in camera_frames(list(p.frames)) if read_stamp(px) < camera.sent]
        assert len(camera_frames(list(p.frames))) - len(frames) <= 5, "many broken pictures"
        assert uncovered(camera, frames) == [], "a face was shown"
    log = plane.log.read_text(errors="replace")
    assert "leading" in log and "actor created" in log, log[-3000:]
    assert node_s < 45 and head_s < 90
