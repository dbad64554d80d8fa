"""The store on a real PostgreSQL server (started for the session): many processes' worth of
connections claiming at once take each job once, rate windows count exactly under concurrent
API replicas, the schema is created once by stores opening together, a stream name is taken
once, and a store outlives a restart of the server."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from benchmarks.postgres_server import PostgresServer
from gateway.database import DatabaseUnavailable, display_name
from gateway.store import Store

CONNECTIONS = 6


def _stores(url: str, n: int = CONNECTIONS) -> list[Store]:
    """``n`` stores, each with its own connection (as ``n`` processes would have)."""
    return [Store(url) for _ in range(n)]


def test_concurrent_workers_take_each_job_once(postgres_server: PostgresServer) -> None:
    url = postgres_server.database()
    stores = _stores(url)
    key, _ = stores[0].create_key("k", "scale")
    now = time.time()
    for i in range(60):
        stores[0].insert_job(job_id=f"med_{i}", key_id=key.id, kind="image", filename="p.jpg",
                             ext=".jpg", size_bytes=1, media_seconds=0, categories=["faces"],
                             options={}, webhook_url=None, base_url="http://127.0.0.1",
                             created_at=now + i * 1e-3)
    start = threading.Barrier(len(stores))

    def drain(i: int) -> list[str]:
        start.wait()
        got = []
        while (job := stores[i].claim_next(time.time(), f"W{i}", 30)) is not None:
            got.append(job.id)
        return got

    with ThreadPoolExecutor(len(stores)) as pool:
        taken = [j for got in pool.map(drain, range(len(stores))) for j in got]
    counts = Counter(taken)
    assert len(counts) == 60 and max(counts.values()) == 1, counts.most_common(3)
    assert stores[0].counts_by_status()["processing"] == 60
    for s in stores:
        s.close()


def test_rate_windows_count_exactly_across_replicas(postgres_server: PostgresServer) -> None:
    stores = _stores(postgres_server.database())
    now = time.time()
    start = threading.Barrier(len(stores))

    def hit(i: int) -> int:
        start.wait()
        return sum(stores[i].rate_hit("key_1", 50, now, 60)[0] for _ in range(20))

    with ThreadPoolExecutor(len(stores)) as pool:
        allowed = sum(pool.map(hit, range(len(stores))))
    assert allowed == 50, "120 requests at once against a limit of 50"
    assert stores[0].rate_hit("key_1", 50, now + 1, 60)[:2] == (False, 50)
    for s in stores:
        s.close()


def test_stores_opening_together_create_the_schema_once(postgres_server: PostgresServer) -> None:
    url = postgres_server.database()
    start = threading.Barrier(CONNECTIONS)

    def open_store(_: int) -> Store:
        start.wait()
        return Store(url)

    with ThreadPoolExecutor(CONNECTIONS) as pool:
        stores = list(pool.map(open_store, range(CONNECTIONS)))
    versions = stores[0]._all("SELECT version FROM schema_version")
    assert [r["version"] for r in versions] == [2]
    start2 = threading.Barrier(CONNECTIONS)

    def add(i: int) -> bool:
        start2.wait()
        return stores[i].insert_stream(stream_id=f"str_{i}", name="gate", owner=None,
                                       definition={"source": "push"}, now=time.time())

    with ThreadPoolExecutor(CONNECTIONS) as pool:
        added = list(pool.map(add, range(CONNECTIONS)))
    assert added.count(True) == 1, added
    assert [r.name for r in stores[0].list_streams()] == ["gate"]
    for s in stores:
        s.close()


def test_a_store_outlives_a_restart_of_the_server() -> None:
    with PostgresServer() as server:
        store = Store(server.database())
        key, secret = store.create_key("k", "pro")
        server.restart()
        deadline = time.monotonic() + 20
        while True:  # the call that finds the connection gone raises; a later one reconnects
            try:
                found = store.key_by_secret(secret)
                break
            except Exception:
                assert time.monotonic() < deadline, "never reconnected"
                time.sleep(0.2)
        assert found is not None and found.id == key.id
        store.close()


def test_an_unreachable_database_is_refused_clearly(postgres_server: PostgresServer) -> None:
    url = f"postgresql://redact:hunter2@127.0.0.1:{postgres_server.port}/no_such_db"
    with pytest.raises(DatabaseUnavailable) as err:
        Store(url)
    assert "no_such_db" in str(err.value) and "hunter2" not in str(err.value)
    assert display_name(url) == f"postgresql://redact:***@127.0.0.1:{postgres_server.port}" \
                                "/no_such_db"


def test_one_leader_at_a_time_and_a_restarted_actor_takes_its_stream(
        store_target: Path | str) -> None:
    db = Store(store_target)
    now = time.time()
    assert db.claim_leader("ray-streams", "A", now, 5)
    assert not db.claim_leader("ray-streams", "B", now + 1, 5), "A's lease runs"
    assert db.claim_leader("ray-streams", "A", now + 4, 5), "A renews"
    assert not db.claim_leader("ray-streams", "B", now + 8, 5)
    assert db.claim_leader("ray-streams", "B", now + 9.5, 5), "A's lease ran out"
    db.release_leader("ray-streams", "B")
    assert db.claim_leader("ray-streams", "C", now + 10, 5), "given back"
    for sid in ("str_a", "str_b"):
        assert db.insert_stream(stream_id=sid, name=sid, owner=None,
                                definition={"source": "push"}, now=now)
    first = db.claim_stream(now, "ray:str_b:h:1:x/1", 30, stream_id="str_b")
    assert first is not None and first.id == "str_b", "only the stream asked for"
    assert db.claim_stream(now + 1, "ray:str_b:h:2:y/1", 30, stream_id="str_b") is None
    again = db.claim_stream(now + 1, "ray:str_b:h:2:y/1", 30, stream_id="str_b",
                            take_from="ray:str_b:")
    assert again is not None and again.lease_owner == "ray:str_b:h:2:y/1"
    assert db.claim_stream(now + 2, "ray:str_a:h:3:z/1", 30, stream_id="str_b",
                           take_from="ray:str_a:") is None, "not another actor's stream"
    db.close()
