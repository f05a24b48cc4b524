"""FastAPI dependencies as Annotated aliases: routes declare what they need and never build it."""

from __future__ import annotations

import hmac
from typing import Annotated
from urllib.parse import parse_qsl, unquote_to_bytes

from fastapi import Depends, Header, Request

from service.errors import Forbidden, InvalidInput, Unauthorized, Unavailable, UnsupportedMedia
from service.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    """The ready service state (async: FastAPI runs it on the event loop, no thread-pool hop)."""
    state: ServiceState | None = getattr(request.app.state, "service", None)
    if state is None or not state.ready:
        raise Unavailable("service is starting", code="not_ready")
    return state


async def require_api_key(
    request: Request, x_api_key: Annotated[str | None, Header(description="API key for write endpoints.")] = None
) -> None:
    """Write and admin endpoints need ``X-API-Key`` when MISSREC_API_KEY is set (constant-time comparison)."""
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    given = (x_api_key or "").encode()
    if not given.strip() or not hmac.compare_digest(given, expected.get_secret_value().encode()):
        raise Unauthorized("missing or wrong X-API-Key")


async def require_admin_key(
    request: Request, x_api_key: Annotated[str | None, Header(description="API key (MISSREC_API_KEY).")] = None
) -> None:
    """Admin endpoints exist only with MISSREC_API_KEY set (403 without it), then need it like writes (401)."""
    if request.app.state.settings.api_key is None:
        raise Forbidden("admin endpoints are disabled: set MISSREC_API_KEY to enable them", code="admin_disabled")
    await require_api_key(request, x_api_key)


def is_json_media(media: str) -> bool:
    """application/json or a structured-syntax JSON type (application/*+json)."""
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def require_json(request: Request) -> None:
    """415 for a JSON-body route called with another content type (else: a misleading 'not an object' 422)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not is_json_media(media):
        raise UnsupportedMedia(f"send the body as application/json, not {media or 'no content type'}")


async def require_utf8_path(request: Request) -> None:
    """422 for a path whose percent-escapes are not UTF-8 (``%FF``): the server decodes them to U+FFFD, so
    different ids would silently become one."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    try:
        unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("the id in the path is not valid UTF-8 after percent-decoding") from None


async def require_utf8_query(request: Request) -> None:
    """422 for a query string whose percent-escapes are not UTF-8 (``?id=%FF``): as in a path, the server would
    decode them to U+FFFD and different ids would become one."""
    try:
        parse_qsl(request.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise InvalidInput("the query string is not valid UTF-8 after percent-decoding") from None


StateDep = Annotated[ServiceState, Depends(get_state)]
WriteAccess = Depends(require_api_key)
AdminAccess = Depends(require_admin_key)
JSONBody = Depends(require_json)
PathUTF8 = Depends(require_utf8_path)
QueryUTF8 = Depends(require_utf8_query)
