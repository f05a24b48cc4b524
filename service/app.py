"""Composition root: builds the FastAPI app, its lifespan (the service state) and the edge middleware."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service.errors import install_error_handlers
from service.middleware import (
    BodyLimit,
    ConcurrencyLimit,
    ContentEncoding,
    EdgeHeaders,
    HeadAsGet,
    Load,
    RequestMetrics,
)
from service.replication import StartupRefused
from service.routers import admin, health, items, recommend, users
from service.settings import Settings, get_settings
from service.state import ServiceState
from service.webconsole import ConsoleFiles

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, **overrides: Any) -> FastAPI:
    """The app for ``settings`` (default: environment). Heavy state is created in the lifespan, not here."""
    settings = settings or get_settings()
    if overrides:
        settings = settings.model_copy(update=overrides)
    settings.check_limits()
    # MISSREC_ACCESS_LOG, honoured however uvicorn was started (`missrec serve` or `uvicorn service.main:app`)
    logging.getLogger("uvicorn.access").disabled = not settings.access_log

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            state = await ServiceState.start(settings)
        except StartupRefused as exc:  # one clear line (and a short traceback), not the loader's call stack
            log.error("refusing to start: %s", exc)
            raise StartupRefused(f"refusing to start: {exc}") from None
        app.state.service = state
        try:
            yield
        finally:
            app.state.service = None
            await state.close()

    app = FastAPI(
        title="MISSRec recommendation service",
        version="1.0",
        description="Multi-modal sequential recommendations over REST: top-k by user or history, "
        "interaction events, cold-start items from image + text. A web console is served at /console.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = None
    app.state.load = Load(settings.max_concurrency, settings.max_pending_bodies)  # /readyz reads it
    install_error_handlers(app)
    for router in (recommend.router, users.router, items.router, items.by_query, health.router, admin.router):
        app.include_router(router)
    app.mount("/console", ConsoleFiles(), name="console")
    app.add_middleware(ConcurrencyLimit, load=app.state.load, body_timeout=settings.body_timeout_seconds)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(ContentEncoding)
    app.add_middleware(HeadAsGet)
    app.add_middleware(EdgeHeaders)  # every answer, the middleware's own errors included
    app.add_middleware(RequestMetrics, metrics_of=lambda: getattr(app.state.service, "metrics", None))
    return app
