"""User interactions: POST /v1/users/{user_id}/events, GET /v1/users/{user_id}/history."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path
from starlette.convertors import PathConvertor, register_url_convertor

from service import usecases
from service.deps import JSONBody, PathUTF8, StateDep, WriteAccess
from service.schemas import ErrorResponse, EventsRequest, EventsResponse, HistoryResponse, Identifier


class _AnyId(PathConvertor):
    """Any characters, "/" and newlines included (or none), so every user id reaches validation (422 for an
    empty id or control characters) instead of missing the route (``path``'s ``.*`` stops at a newline: 404)."""

    regex = "(?s:.*)"


register_url_convertor("anyid", _AnyId())
router = APIRouter(prefix="/v1/users", tags=["users"])
UserId = Annotated[Identifier, Path(description="External user id.")]
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 409, 413, 415, 422, 503)}


@router.post(
    "/{user_id:anyid}/events",
    response_model=EventsResponse,
    responses=ERRORS,
    dependencies=[WriteAccess, JSONBody, PathUTF8],
)
async def append_events(
    user_id: UserId,
    body: EventsRequest,
    state: StateDep,
    idempotency_key: Annotated[Identifier | None, Header(description="Apply retries of this call once.")] = None,
) -> EventsResponse:
    """Append interactions to the user's history (capped at the model's max length). 200 means durable."""
    if len(body.item_ids) > state.settings.max_events:
        from service.errors import PayloadTooLarge

        raise PayloadTooLarge(f"at most {state.settings.max_events} item ids per call")
    key = body.idempotency_key or idempotency_key
    length, applied = await usecases.append_events(
        state, user_id, body.item_ids, body.timestamps, key, body.recommendation_id
    )
    return EventsResponse(
        user_id=user_id, history_length=length, appended=len(body.item_ids) if applied else 0, duplicate=not applied
    )


@router.get("/{user_id:anyid}/history", response_model=HistoryResponse, responses=ERRORS, dependencies=[PathUTF8])
async def get_history(user_id: UserId, state: StateDep) -> HistoryResponse:
    items, stamps = await usecases.history(state, user_id)
    return HistoryResponse(user_id=user_id, item_ids=items, timestamps=stamps)
