"""The gateway on several hosts, where addresses matter: two worker "nodes", each in a network
namespace with an address of its own (10.201.<k>.2), an API on this host, one PostgreSQL server
and one storage directory shared by all. A photo job uploaded to the API is redacted on a node;
a live stream is served from the node that runs it (its ``rtsp_url`` and control URL carry that
node's address, WHEP offers are forwarded there); that node killed, the stream is served from
the other node's address, and no player decodes a face."""

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

import httpx
import pytest

from benchmarks.postgres_server import PostgresServer
from benchmarks.postgres_server import unavailable as postgres_unavailable
from gateway.store import Store
from tests.api_support import REPO, ApiKeyInfo, SubprocessServer, jpeg_bytes, wait_job
from tests.live_helpers import Camera
from tests.netns import Node
from tests.test_live import Player
from tests.test_stream_workers import (
    STREAM,
    QuickPlayer,
    _offer,
    camera_frames,
    uncovered,
    wait_stream,
)

pytest.importorskip("gi", reason="GStreamer's Python bindings (make setup installs them)")

LEASE_S = 3
ENV = {"REDACT_LEASE_S": str(LEASE_S), "REDACT_WORKERS": "1", "REDACT_DETECTOR_THREADS": "1"}


@dataclass
class Cluster:
    nodes: list[Node]
    pg: PostgresServer
    database: str
    api: SubprocessServer
    workers: dict[int, subprocess.Popen[bytes]]
    key: ApiKeyInfo

    def node_url(self, node: Node) -> str:
        """The database as a node reaches it (the host's side of its veth pair)."""
        return self.database.replace("127.0.0.1", self.nodes[0].gateway)

    def node_of(self, stream_id: str) -> Node:
        with contextlib.closing(Store(self.database)) as db:
            row = db.stream(stream_id)
        assert row is not None and row.lease_owner is not None, row
        pid = int(row.lease_owner.split("/")[0].split(":")[-2])
        (k,) = [k for k, p in self.workers.items() if _descends(pid, p.pid)]
        return self.nodes[k]


def _descends(pid: int, ancestor: int) -> bool:
    """Whether ``pid`` is ``ancestor`` or runs under it (``ip netns exec`` may exec or fork)."""
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    why = Node.unavailable() or postgres_unavailable()
    if why:
        pytest.skip(f"needs test hosts and PostgreSQL: {why}")
    nodes: list[Node] = []
    pg: PostgresServer | None = None
    api: SubprocessServer | None = None
    workers: dict[int, subprocess.Popen[bytes]] = {}
    try:
        nodes = [Node(k).up() for k in (1, 2)]
        pg = PostgresServer(listen=("127.0.0.1", nodes[0].gateway),
                            trust=("10.201.0.0/16",)).start()
        database = pg.database()
        shared = tmp_path / "shared"
        env = {**ENV, "REDACT_DATABASE_URL": database, "REDACT_STORAGE": str(shared)}
        api = SubprocessServer(tmp_path / "api", env=env, args=("--no-worker",))
        created = api.cli("keys", "create", "--name", "nodes", "--plan", "pro")
        key = ApiKeyInfo(created["id"], created["key"], created["webhook_secret"], "pro")
        c = Cluster(nodes, pg, database, api, workers, key)
        for k, node in enumerate(nodes):
            node_env = {**os.environ, **env, "REDACT_DATABASE_URL": c.node_url(node),
                        "REDACT_DATA_DIR": str(tmp_path / f"node{k}"),
                        "REDACT_RTSP_HOST": node.address}
            with open(tmp_path / f"node{k}.log", "wb") as log:
                workers[k] = node.popen(
                    [sys.executable, "-m", "gateway.cli", "worker", "--rtsp-port", "0",
                     "--control-host", node.address], cwd=REPO, env=node_env, stdout=log,
                    stderr=subprocess.STDOUT)
        api.start()
        yield c
    finally:
        for p in workers.values():
            p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        if api is not None:
            api.kill()
        if pg is not None:
            pg.stop()
        for node in nodes:
            node.down()


@pytest.fixture
def camera(cluster: Cluster) -> Iterator[Camera]:
    cam = Camera().start(host=cluster.nodes[0].gateway)  # reached by both nodes
    yield cam
    cam.stop()


def test_nodes_serve_from_their_own_addresses(cluster: Cluster, camera: Camera) -> None:
    pytest.importorskip("aiortc")
    addresses = {n.address for n in cluster.nodes}
    players: list[Player] = []
    with httpx.Client(base_url=cluster.api.url, headers=cluster.key.headers, timeout=30) as c:
        r = c.post("/v1/media", data={"categories[]": "faces"},
                   files={"file": ("p.jpg", jpeg_bytes(), "image/jpeg")})
        assert r.status_code == 202, r.text
        done = wait_job(c, cluster.key, r.json()["id"], timeout_s=120)
        assert done["status"] == "completed" and done["detections"]["faces"] >= 1, done

        r = c.post("/v1/streams", json={**STREAM, "source": camera.url})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        try:
            first = wait_stream(c, sid, lambda b: b["status"] == "live" and b["rtsp_url"],
                                timeout_s=60)
            serving = cluster.node_of(sid)
            assert first["rtsp_url"].startswith(f"rtsp://{serving.address}:"), first
            with contextlib.closing(Store(cluster.database)) as db:
                row = db.stream(sid)
            assert row is not None and row.runtime is not None
            assert row.runtime["control_url"].startswith(f"http://{serving.address}:")
            players.append(Player(first["rtsp_url"]))
            players[0].wait_frames(30)
            # a WHEP offer to the API is answered by the node running the stream
            token = c.post(f"/v1/streams/{sid}/viewer-token").json()["token"]
            answered = c.post(f"/v1/streams/{sid}/whep?token={token}",
                              content=asyncio.run(_offer()),
                              headers={"content-type": "application/sdp", "authorization": ""})
            assert answered.status_code == 201, answered.text
            assert "m=video" in answered.text

            # that node dies: the stream is served from the other node's address
            (k,) = [k for k, n in enumerate(cluster.nodes) if n is serving]
            cluster.workers[k].kill()
            back = wait_stream(c, sid, lambda b: b["status"] == "live" and b["rtsp_url"] not in
                               (None, first["rtsp_url"]), timeout_s=60, every_s=0.05)
            other = (addresses - {serving.address}).pop()
            assert back["rtsp_url"].startswith(f"rtsp://{other}:"), back
            player = QuickPlayer(back["rtsp_url"])
            players.append(player)
            deadline = time.monotonic() + 30
            while len(camera_frames(list(player.frames)) if player.frames else []) < 20:
                assert time.monotonic() < deadline, player.error or "no camera frame"
                if player.error:
                    player = QuickPlayer(back["rtsp_url"])
                    players.append(player)
                time.sleep(0.05)
        finally:
            for p in players:
                p._stop.set()
    for p in players:
        assert uncovered(camera, list(p.frames)) == [], "a face was shown"
