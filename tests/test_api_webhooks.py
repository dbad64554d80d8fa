"""Webhooks: signed with the key's secret, the status JSON as body, retried with backoff after a
receiver failure, given up (and recorded) after the configured attempts; private targets refused
unless allowed."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.store import Delivery
from gateway.webhooks import (
    PinnedBackend,
    WebhookUrlError,
    check_url,
    pinned_client,
    sign,
    verify,
)
from tests.api_support import (
    ApiKeyInfo,
    Receiver,
    ThreadServer,
    api_settings,
    error_of,
    jpeg_bytes,
    started,
    submit,
    verify_signature,
    wait_job,
)

FACES = [("categories[]", "faces")]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    yield from started(api_settings(tmp_path_factory.mktemp("hooks")))


@pytest.fixture
def client(server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def _deliveries(server: ThreadServer, job_id: str, state: str,
                timeout_s: float = 20.0) -> list[Delivery]:
    deadline = time.monotonic() + timeout_s
    while True:
        got = server.service.db.deliveries_for(job_id)
        if got and all(d.status == state for d in got):
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"deliveries of {job_id}: {got}")
        time.sleep(0.05)


def test_webhook_is_signed_and_carries_the_status(server: ThreadServer, client: httpx.Client,
                                                  receiver: Receiver) -> None:
    key = server.key("pro")
    r = submit(client, key, jpeg_bytes(), "p.jpg", [*FACES, ("webhook_url", receiver.url)])
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    (hook,) = receiver.wait_for(1)
    assert hook.headers["content-type"] == "application/json"
    assert hook.headers["x-redact-event-id"].startswith("evt_")
    assert hook.headers["x-redact-event"] == "media.completed"
    signature = hook.headers["x-redact-signature"]
    assert verify_signature(key.webhook_secret, hook.body, signature)
    tampered = hook.body.replace(b'"completed"', b'"failed"', 1)
    assert tampered != hook.body
    assert not verify_signature(key.webhook_secret, tampered, signature)
    assert not verify_signature("whsec_someone_else", hook.body, signature)
    sent = json.loads(hook.body)
    assert sent == client.get(f"/v1/media/{job_id}", headers=key.headers).json()
    assert sent["status"] == "completed" and sent["detections"] == {"faces": 1}
    (d,) = _deliveries(server, job_id, "delivered")
    assert d.attempts == 1 and d.last_status_code == 200


def test_failed_job_sends_a_failed_event(server: ThreadServer, client: httpx.Client,
                                         receiver: Receiver) -> None:
    key = server.key("pro")
    # a job whose upload vanished from disk before a worker took it
    job_id = "med_vanished0001"
    server.service.db.insert_job(
        job_id=job_id, key_id=key.id, kind="image", filename="gone.jpg", ext=".jpg",
        size_bytes=10, media_seconds=0, categories=["faces"],
        options={"method": "blur", "methods": {}}, webhook_url=receiver.url,
        base_url=server.url, created_at=time.time())
    assert server.service.pool is not None
    server.service.pool.notify()
    (hook,) = receiver.wait_for(1)
    body = json.loads(hook.body)
    assert hook.headers["x-redact-event"] == "media.failed"
    assert body["status"] == "failed" and body["error"]["code"] == "input_missing"
    assert verify_signature(key.webhook_secret, hook.body, hook.headers["x-redact-signature"])
    usage = client.get("/v1/account", headers=key.headers).json()["usage"]
    assert usage["images"] == 0, "a failed job is not charged"


def test_receiver_failure_is_retried_with_the_same_event_id(
        server: ThreadServer, client: httpx.Client, receiver: Receiver) -> None:
    key = server.key("pro")
    receiver.codes = [500]
    r = submit(client, key, jpeg_bytes(), "p.jpg", [*FACES, ("webhook_url", receiver.url)])
    job_id = r.json()["id"]
    first, second = receiver.wait_for(2)
    assert first.headers["x-redact-event-id"] == second.headers["x-redact-event-id"]
    assert first.body == second.body
    assert second.at - first.at >= 0.15  # backoff (0.2 s in the test settings)
    for hook in (first, second):
        assert verify_signature(key.webhook_secret, hook.body,
                                hook.headers["x-redact-signature"])
    (d,) = _deliveries(server, job_id, "delivered")
    assert d.attempts == 2 and d.last_status_code == 200


def test_delivery_is_given_up_after_max_attempts_and_recorded(
        server: ThreadServer, client: httpx.Client, receiver: Receiver) -> None:
    key = server.key("pro")
    receiver.codes = [503] * 10
    r = submit(client, key, jpeg_bytes(), "p.jpg", [*FACES, ("webhook_url", receiver.url)])
    job_id = r.json()["id"]
    (d,) = _deliveries(server, job_id, "failed")
    assert d.attempts == 3 and d.last_status_code == 503 and d.last_error == "HTTP 503"
    time.sleep(0.8)
    assert len(receiver.got) == 3, "no attempt after giving up"
    gaps = [b.at - a.at for a, b in zip(receiver.got, receiver.got[1:], strict=False)]
    assert gaps[1] > gaps[0] * 1.4, f"backoff should grow: {gaps}"
    metrics = client.get("/metrics").text
    assert 'redact_webhook_attempts_total{outcome="failed"}' in metrics
    assert wait_job(client, key, job_id)["status"] == "completed"


def test_unreachable_receiver_is_retried(server: ThreadServer, client: httpx.Client,
                                         receiver: Receiver) -> None:
    key = server.key("pro")
    url = receiver.url
    receiver.stop()  # nothing listens there any more: connection refused
    r = submit(client, key, jpeg_bytes(), "p.jpg", [*FACES, ("webhook_url", url)])
    (d,) = _deliveries(server, r.json()["id"], "failed")
    assert d.attempts == 3 and d.last_status_code is None and d.last_error


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.1.2.3/x",
    "http://192.168.0.10/x", "http://172.16.5.4/x", "http://169.254.169.254/latest/meta-data",
    "http://[::1]:8080/x", "http://[fe80::1]/x", "http://0.0.0.0/x", "http://[::ffff:127.0.0.1]/",
])
def test_private_targets_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(WebhookUrlError, match="REDACT_WEBHOOK_ALLOW_PRIVATE"):
        check_url(url, allow_private=False)
    if "fe80" not in url:
        check_url(url, allow_private=True)


@pytest.mark.parametrize("url", ["ftp://example.com/x", "not a url", "http:///nohost",
                                 "javascript:alert(1)", "http://" + "a" * 3000 + ".com/"])
def test_malformed_webhook_urls_are_refused(url: str) -> None:
    with pytest.raises(WebhookUrlError):
        check_url(url, allow_private=True)


def test_public_address_is_accepted() -> None:
    check_url("https://93.184.216.34/hook", allow_private=False)


def test_api_refuses_a_private_webhook_by_default(tmp_path: Path) -> None:
    for server in started(api_settings(tmp_path / "strict", webhook_allow_private=False)):
        key: ApiKeyInfo = server.key("pro")
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = submit(c, key, jpeg_bytes(), "p.jpg",
                       [*FACES, ("webhook_url", "http://127.0.0.1:9/hook")])
            assert r.status_code == 400 and error_of(r) == "invalid_webhook_url"
            assert "REDACT_WEBHOOK_ALLOW_PRIVATE" in r.json()["error"]["message"]


def test_sign_and_verify_round_trip() -> None:
    body = b'{"id":"med_1","status":"completed"}'
    now = int(time.time())
    header = sign("whsec_x", body, now)
    assert header.startswith(f"t={now},v1=") and verify("whsec_x", body, header)
    assert not verify("whsec_x", body + b" ", header)
    assert not verify("whsec_y", body, header)
    assert not verify("whsec_x", body, sign("whsec_x", body, now - 3600))  # replayed late
    assert not verify("whsec_x", body, "garbage")


def test_a_delivery_connects_to_the_checked_address_not_a_new_dns_answer(
        receiver: Receiver) -> None:
    """The address checked is the address connected to: the host name is not resolved again
    (a .invalid name has no DNS answer at all, and none is asked for), while the request still
    names the host."""
    backend = PinnedBackend()
    port = receiver.url.split(":")[2].split("/")[0]
    url = f"http://Hooks.Example.invalid:{port}/hook"
    backend.pin(url, "127.0.0.1")
    with pinned_client(backend, 5.0) as client:
        assert client.post(url, content=b"{}").status_code == 200
    (got,) = receiver.wait_for(1)
    assert got.headers["host"].lower() == f"hooks.example.invalid:{port}"


def test_check_url_returns_the_addresses_it_checked() -> None:
    assert check_url("http://127.0.0.1:9/hook", allow_private=True) == ["127.0.0.1"]
    assert check_url("https://93.184.216.34/hook", allow_private=False) == ["93.184.216.34"]
