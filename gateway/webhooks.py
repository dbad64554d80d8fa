"""Signed webhook deliveries, persisted and retried with exponential backoff.

Each event is stored (body and id fixed) before it is sent, so retries send the same bytes with
the same ``X-Redact-Event-Id`` and a restart carries on where the last process stopped. Each
attempt is claimed in the store under a lease before it is sent (:meth:`Store.claim_delivery`)
and recorded only by the claim's owner, so workers sharing a store never send the same attempt;
a claim whose worker died falls due again when its lease runs out. ``X-Redact-Attempt`` numbers
the attempts of an event from 1. The signature header is
``t=<unix seconds>,v1=<hex HMAC-SHA256(webhook_secret, "<t>.<body>")>``.

A webhook URL's host is resolved and checked (no private, loopback or link-local address unless
the operator allows them) when the job is submitted and again before every attempt, and the
attempt connects to the address that was checked, not to a second DNS answer: a host that
changes its answer between the check and the connection (DNS rebinding) cannot turn a delivery
into a request inside the operator's network. (With a proxy from the environment,
``HTTP(S)_PROXY``, the proxy connects instead.)
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from gateway.leases import Lease, LeaseKeeper, claim_owner
from gateway.store import Delivery, Store

log = logging.getLogger(__name__)

USER_AGENT = "redact-webhooks/1"


class WebhookUrlError(ValueError):
    """A webhook URL that is malformed or points somewhere it may not."""


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Redact-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, body: bytes, header: str, tolerance_s: float = 300.0,
           now: float | None = None) -> bool:
    """Whether ``header`` is a valid signature of ``body`` made within ``tolerance_s``."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
    except (ValueError, KeyError):
        return False
    now = time.time() if now is None else now
    if abs(now - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def _scrub(url: str) -> str:
    """``url`` without credentials, path or query: safe to log."""
    s = urlsplit(url)
    return f"{s.scheme}://{s.hostname}{':' + str(s.port) if s.port else ''}/..."


def check_url(url: str, allow_private: bool) -> list[str]:
    """Refuse URLs that are not http(s), or whose host resolves to a private, loopback,
    link-local, multicast or reserved address (unless ``allow_private``); returns the host's
    addresses (all of them checked)."""
    if len(url) > 2048:
        raise WebhookUrlError("webhook_url is longer than 2048 characters")
    try:
        s = urlsplit(url)
        port = s.port or (443 if s.scheme == "https" else 80)
    except ValueError as exc:
        raise WebhookUrlError(f"webhook_url is not a valid URL: {exc}") from None
    if s.scheme not in ("http", "https") or not s.hostname:
        raise WebhookUrlError("webhook_url must be an http:// or https:// URL with a host")
    try:
        infos = socket.getaddrinfo(s.hostname, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        raise WebhookUrlError(f"webhook_url host {s.hostname!r} does not resolve") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if allow_private:
        return addresses
    for found in addresses:
        addr = ipaddress.ip_address(found.split("%", 1)[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        if (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_multicast
                or addr.is_reserved or addr.is_unspecified):
            raise WebhookUrlError(
                f"webhook_url host {s.hostname!r} resolves to a private, loopback or link-local "
                "address; the operator can allow these with REDACT_WEBHOOK_ALLOW_PRIVATE=1")
    return addresses


class PinnedBackend(httpcore.SyncBackend):
    """Opens connections to the address pinned for a host (see :func:`pinned_client`), never to
    a fresh DNS answer; TLS still verifies the certificate against the host name."""

    def __init__(self) -> None:
        self.pins: dict[str, str] = {}

    def pin(self, url: str, address: str) -> None:
        if len(self.pins) >= 1024:
            self.pins.clear()  # bounded: a pin is set again before every attempt
        # the host as httpcore will name it (lower case, IDNA-encoded)
        self.pins[httpx.URL(url).raw_host.decode("ascii")] = address

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        return super().connect_tcp(self.pins.get(host, host), port, timeout, local_address,
                                   socket_options)


def pinned_client(backend: PinnedBackend, timeout_s: float) -> httpx.Client:
    """An httpx client whose direct connections go through ``backend``."""
    transport = httpx.HTTPTransport()
    transport._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(),
                                              network_backend=backend, max_connections=10,
                                              max_keepalive_connections=5,
                                              keepalive_expiry=5.0)
    return httpx.Client(transport=transport, timeout=timeout_s, follow_redirects=False,
                        headers={"User-Agent": USER_AGENT})


class Deliverer:
    """A thread that sends due deliveries, records each attempt and schedules retries.

    ``secret_of(key_id)`` gives the signing secret; ``on_attempt(outcome)`` is told
    ``delivered``, ``retry`` or ``failed`` (metrics). Each attempt is claimed for
    ``worker_id`` under a lease of ``lease_s``, renewed by ``keeper`` while it is sent.
    """

    def __init__(self, store: Store, secret_of: Callable[[str], str | None], *,
                 timeout_s: float, max_attempts: int, backoff_s: float, backoff_max_s: float,
                 allow_private: bool,
                 on_attempt: Callable[[str], None] | None = None, worker_id: str = "webhooks",
                 lease_s: float = 30.0, keeper: LeaseKeeper | None = None) -> None:
        self.store = store
        self.worker_id = worker_id
        self.lease_s = lease_s
        self._own_keeper = keeper is None
        self.keeper = keeper or LeaseKeeper(lease_s)
        self.secret_of = secret_of
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.allow_private = allow_private
        self.on_attempt = on_attempt or (lambda outcome: None)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._backend = PinnedBackend()
        self._client = pinned_client(self._backend, timeout_s)

    def start(self) -> None:
        if self._own_keeper:
            self.keeper.start()
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        self._client.close()
        if self._own_keeper:
            self.keeper.stop()

    def alive(self) -> bool:
        return self._thread.is_alive() and self.keeper.alive()

    def wake(self) -> None:
        """A new delivery is waiting."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                while not self._stop.is_set():
                    owner = claim_owner(self.worker_id)
                    d = self.store.claim_delivery(time.time(), owner, self.lease_s)
                    if d is None:
                        break
                    with self.keeper.held(f"webhook {d.id}",
                                          self._renewer(d.id, owner)) as lease:
                        self._attempt(d, owner, lease)
                nxt = self.store.next_delivery_time()
            except Exception:
                log.exception("webhook loop error")
                nxt = None
            wait = 1.0 if nxt is None else min(1.0, max(0.0, nxt - time.time()))
            self._wake.wait(wait)
            self._wake.clear()

    def backoff(self, attempts_made: int) -> float:
        """Delay before the next try after ``attempts_made`` failed ones (1, 2, 4 ... x base)."""
        return float(min(self.backoff_max_s, self.backoff_s * 2 ** (attempts_made - 1)))

    def _renewer(self, delivery_id: str, owner: str) -> Callable[[float], bool]:
        return lambda until: self.store.renew_delivery(delivery_id, owner, until)

    def _record(self, d: Delivery, owner: str, lease: Lease, *, status: str,
                code: int | None, error: str | None, next_attempt_at: float) -> bool:
        lease.closing()
        kept = self.store.record_attempt(d.id, owner=owner, status=status, status_code=code,
                                         error=error, next_attempt_at=next_attempt_at,
                                         now=time.time())
        if not kept:
            log.warning("webhook %s for job %s: attempt %d made after its claim was lost to "
                        "another worker; not recorded", d.id, d.job_id, d.attempts + 1)
        return kept

    def _attempt(self, d: Delivery, owner: str, lease: Lease) -> None:
        now = time.time()
        code: int | None = None
        error: str | None = None
        permanent = False
        secret = self.secret_of(d.key_id)
        made = d.attempts + 1
        try:
            if secret is None:
                raise WebhookUrlError("the key that asked for this webhook was revoked")
            # again: DNS may have changed since; the connection goes to what is checked now
            self._backend.pin(d.url, check_url(d.url, self.allow_private)[0])
            ts = int(now)
            r = self._client.post(d.url, content=d.body, headers={
                "Content-Type": "application/json", "X-Redact-Event-Id": d.id,
                "X-Redact-Event": d.event, "X-Redact-Attempt": str(made),
                "X-Redact-Signature": sign(secret, d.body, ts)})
            code = r.status_code
            if 200 <= code < 300:
                if self._record(d, owner, lease, status="delivered", code=code, error=None,
                                next_attempt_at=now):
                    log.info("webhook %s for job %s delivered (%d)", d.id, d.job_id, code)
                    self.on_attempt("delivered")
                return
            error = f"HTTP {code}"
        except WebhookUrlError as exc:
            error, permanent = str(exc), True
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        if permanent or made >= self.max_attempts:
            if self._record(d, owner, lease, status="failed", code=code, error=error,
                            next_attempt_at=now):
                log.warning("webhook %s for job %s to %s given up after %d attempt(s): %s",
                            d.id, d.job_id, _scrub(d.url), made, error)
                self.on_attempt("failed")
            return
        delay = self.backoff(made)
        if self._record(d, owner, lease, status="pending", code=code, error=error,
                        next_attempt_at=time.time() + delay):
            log.info("webhook %s for job %s failed (%s); retry %d in %.1f s", d.id, d.job_id,
                     error, made + 1, delay)
            self.on_attempt("retry")
