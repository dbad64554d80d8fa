"""Who is calling: ``Authorization: Bearer KEY`` on every /v1 route, and that key's per-minute
rate limit. The limit's headers are added to every answer by :class:`RateLimitHeaders`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import ApiError
from gateway.service import Service
from gateway.store import ApiKey

_STATE_KEY = "ratelimit_headers"


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def current_key(request: Request, service: ServiceDep) -> ApiKey:
    """The caller's key (401 without a valid one), counted against its rate limit (429)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "send your API key as 'Authorization: Bearer KEY'",
                       {"WWW-Authenticate": "Bearer"})
    key = service.db.key_by_secret(token) if len(token) <= 256 else None
    if key is None:
        raise ApiError(401, "unauthorized", "unknown or revoked API key",
                       {"WWW-Authenticate": 'Bearer error="invalid_token"'})
    plan = service.settings.plan(key.plan)
    state = service.limiter.hit(key.id, plan.requests_per_minute)
    headers = state.headers()
    request.scope.setdefault("state", {})[_STATE_KEY] = headers
    if not state.allowed:
        raise ApiError(429, "rate_limited",
                       f"more than {plan.requests_per_minute} requests per minute on the "
                       f"{key.plan} plan; retry in {headers['Retry-After']} s", headers)
    return key


KeyDep = Annotated[ApiKey, Depends(current_key)]


class RateLimitHeaders:
    """ASGI middleware: adds the X-RateLimit-* headers a request collected to its answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = scope.get("state", {}).get(_STATE_KEY)
                if extra:
                    have = {k.lower() for k, _ in message.get("headers", [])}
                    headers = list(message.get("headers", []))
                    headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()
                                if k.lower().encode() not in have]
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
