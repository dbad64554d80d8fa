"""The FastAPI application: ``create_app(settings)`` builds it; its lifespan opens the store,
brings the stream definitions up to date (``streams.json`` of an older release, the cameras
file) and, unless ``settings.embedded_worker`` is off, starts an in-process worker (job
workers, webhook deliveries, the sweeper, the models, live streams)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from gateway.api import account, health, media
from gateway.api import streams as streams_api
from gateway.auth import RateLimitHeaders
from gateway.errors import install_handlers
from gateway.service import Service
from gateway.settings import Settings
from gateway.stream_catalog import StreamCatalog
from gateway.streams import StreamSettings

log = logging.getLogger(__name__)

DESCRIPTION = """Self-hosted redaction of faces, licence plates, text and codes in photos and
videos. Submit with `POST /v1/media` (multipart), follow with `GET /v1/media/{id}` or a signed
webhook, fetch the result from `download_url`. Every /v1 route takes
`Authorization: Bearer KEY` (`redact keys create`)."""


def create_app(settings: Settings | None = None, streams_config: Path | None = None,
               stream_settings: StreamSettings | None = None) -> FastAPI:
    """The app for ``settings`` (default: from the environment, ``REDACT_*``);
    ``streams_config``: a TOML file of ``[[stream]]`` cameras started with the service."""
    settings = settings or Settings()
    stream_settings = stream_settings or StreamSettings()
    service = Service(settings, stream_settings)
    streams = StreamCatalog(settings, stream_settings, streams_config, service)
    service.metrics.watch_streams(streams.metric_rows)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start(before_worker=streams.start)
        try:
            yield
        finally:
            await streams.aclose()
            service.stop()

    app = FastAPI(title="Redaction gateway", version="1", description=DESCRIPTION,
                  lifespan=lifespan)
    app.state.service = service
    app.state.streams = streams
    install_handlers(app)
    app.add_middleware(RateLimitHeaders)
    app.include_router(media.router)
    app.include_router(account.router)
    app.include_router(health.router)
    app.include_router(streams_api.router)
    return app
