"""ASGI middleware at the edge: body size (413), compressed bodies (415), HEAD, concurrency (fast 503), security
headers, metrics."""

from __future__ import annotations

import asyncio
import json

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body
from service.metrics import Metrics

UNLIMITED = ("/healthz", "/readyz", "/metrics")  # probes are never refused for load


async def _send_error(send: Send, status: int, code: str, message: str, close: bool = False) -> None:
    body = json.dumps(error_body(code, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    if close:  # the server closes the connection after this answer (the rest of a body is never read)
        headers.append((b"connection", b"close"))
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
                    raise _TooLarge(self.limit)
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


class _TooLarge(StarletteHTTPException):
    """Raised inside ``receive``: an HTTPException because FastAPI re-raises those from body parsing (any other
    exception there becomes 400 "error parsing the body"), and the error handlers map it to the error shape."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes")


class HeadAsGet:
    """HEAD on any route is its GET without the body (RFC 9110), as Starlette's own routes do; FastAPI's routes
    would answer 405. The OpenAPI schema stays as it is (HEAD is implied by GET)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class ContentEncoding:
    """415 for a compressed request body (``Content-Encoding`` other than identity): not decoded here, and
    parsing it as JSON would only give a misleading 400/422."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            encoding = dict(scope.get("headers", [])).get(b"content-encoding", b"").strip().lower()
            if encoding not in (b"", b"identity"):
                message = f"Content-Encoding {encoding.decode('latin-1')} is not supported: send the body uncompressed"
                await _send_error(send, 415, "unsupported_media_type", message)
                return
        await self.app(scope, receive, send)


class Load:
    """What :class:`ConcurrencyLimit` counts, shared with ``/readyz``: requests being processed (their body read)
    and requests whose body is still arriving."""

    def __init__(self, limit: int, max_reading: int) -> None:
        self.limit, self.max_reading = limit, max_reading
        self.in_flight = 0  # bodies read, being processed: the slots of MISSREC_MAX_CONCURRENCY
        self.reading = 0  # bodies still arriving (a slow client holds one of these, never a slot)

    def saturated(self) -> str | None:
        """Why this replica refuses new requests now (None: it takes them)."""
        if self.in_flight >= self.limit:
            return f"saturated: {self.in_flight} requests in flight (MISSREC_MAX_CONCURRENCY={self.limit})"
        if self.reading >= self.max_reading:
            return f"saturated: {self.reading} request bodies arriving (MISSREC_MAX_PENDING_BODIES={self.max_reading})"
        return None


class ConcurrencyLimit:
    """Fast 503 when ``load.limit`` requests are being processed (bounded queueing, fast failure).

    A request takes a slot only once its whole body has arrived: the body is read first, within ``body_timeout``
    seconds (408 ``body_timeout`` and the connection closed otherwise), so clients that send a body slowly, or
    never finish it, hold no slot. At most ``load.max_reading`` bodies arrive at once (503 beyond)."""

    def __init__(self, app: ASGIApp, load: Load, body_timeout: float) -> None:
        self.app, self.load, self.body_timeout = app, load, body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in UNLIMITED:
            await self.app(scope, receive, send)
            return
        load = self.load
        if load.reading >= load.max_reading:
            await _send_error(send, 503, "overloaded", f"more than {load.max_reading} request bodies arriving; retry")
            return
        load.reading += 1
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await _read_body(receive)
        except TimeoutError:
            message = f"the request body did not arrive within {self.body_timeout:g} s"
            await _send_error(send, 408, "body_timeout", message, close=True)
            return
        finally:
            load.reading -= 1
        if load.in_flight >= load.limit:
            await _send_error(send, 503, "overloaded", f"more than {load.limit} requests in flight; retry")
            return
        load.in_flight += 1
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            load.in_flight -= 1


async def _read_body(receive: Receive) -> list[Message]:
    """Every message of the request body (a disconnect ends it early)."""
    messages = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` that hands out ``messages`` first, then waits on the real one (for the disconnect)."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


API_CSP = b"default-src 'none'; frame-ancestors 'none'; sandbox"


class EdgeHeaders:
    """``X-Content-Type-Options: nosniff`` on every answer, and a CSP that runs nothing on every answer that is not
    an HTML page with its own (a thumbnail, JSON, /metrics): an uploaded polyglot served from the API origin can
    neither be sniffed into HTML nor run a script if opened."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower(): value for name, value in headers}
                if b"x-content-type-options" not in names:
                    headers.append((b"x-content-type-options", b"nosniff"))
                html = names.get(b"content-type", b"").lower().startswith(b"text/html")
                if not html and b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", API_CSP))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


class RequestMetrics:
    """``missrec_requests_total{route,status}`` for every HTTP request (route = the matched route's path
    template, so ids never become label values; ``unmatched`` when no route matched)."""

    def __init__(self, app: ASGIApp, metrics_of: object) -> None:
        self.app, self.metrics_of = app, metrics_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            metrics: Metrics | None = self.metrics_of()  # type: ignore[operator]
            if metrics is not None:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                metrics.requests.labels(route, str(status)).inc()
