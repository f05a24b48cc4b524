"""Composition root: builds the FastAPI app, its lifespan (bundle, Redis, engine) and the edge middleware."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body, install_error_handlers
from service.routers import health, items, recommend, users
from service.runtime import Runtime, StartupRefused
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)


async def _send_error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps(error_body(code, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for bodies above ``limit`` bytes, by Content-Length or while streaming (chunked uploads)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_error(send, 413, "payload_too_large", f"request body is larger than {self.limit} bytes")
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_error(send, 413, "payload_too_large", f"request body is larger than {self.limit} bytes")


class _TooLarge(Exception):
    pass


class ConcurrencyLimit:
    """503 at once when more than ``limit`` requests are in flight (bounded queueing, fast failure)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit, self.in_flight = app, limit, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in ("/healthz", "/readyz", "/metrics"):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            await _send_error(send, 503, "overloaded", f"more than {self.limit} requests in flight; retry")
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def create_app(settings: Settings | None = None, **overrides: Any) -> FastAPI:
    """The app for ``settings`` (default: environment). Heavy state is created in the lifespan, not here."""
    settings = settings or get_settings()
    if overrides:
        settings = settings.model_copy(update=overrides)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            runtime = await Runtime.start(settings)
        except StartupRefused as exc:  # one clear line (and a short traceback), not the loader's call stack
            log.error("refusing to start: %s", exc)
            raise StartupRefused(f"refusing to start: {exc}") from None
        app.state.runtime = runtime
        try:
            yield
        finally:
            app.state.runtime = None
            await runtime.close()

    app = FastAPI(
        title="MISSRec recommendation service",
        version="1.0",
        description="Multi-modal sequential recommendations (MISSRec) over REST: top-k by user or history, "
        "interaction events, cold-start items from image + text.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.runtime = None
    install_error_handlers(app)
    for router in (recommend.router, users.router, items.router, health.router):
        app.include_router(router)
    app.add_middleware(ConcurrencyLimit, limit=settings.max_concurrency)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
