"""Live streams in the store: claims under leases, renewals that carry the runtime figures and
answer with the definition as it stands, fencing, versions, and the cameras file's rows."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.store import Store


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
