"""POST /v1/recommend and /v1/recommend/batch."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import APIRouter, Response

from service import usecases
from service.deps import JSONBody, StateDep
from service.errors import InvalidInput, ServiceError, error_body
from service.recommender import Recommendation
from service.schemas import (
    BatchRecommendRequest,
    BatchRecommendResponse,
    ErrorResponse,
    Explanation,
    InvalidSubRequest,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
)

router = APIRouter(prefix="/v1", tags=["recommend"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422, 503)}
# Batches of up to this many results are written on the event loop: one orjson pass over a few results is cheaper
# than the hop to a worker thread; bigger ones (up to max_batch_total_k items) go to a thread.
RENDER_INLINE_MAX = 8


def recommended(rec: Recommendation) -> list[RecommendedItem]:
    return [
        RecommendedItem(
            item_id=item.item_id,
            score=item.score,
            explanation=Explanation(**item.explanation) if item.explanation else None,
        )
        for item in rec.items
    ]


def response_dict(rec: Recommendation, history_length: int, skipped: list[str]) -> dict[str, Any]:
    """The RecommendResponse of ``rec`` as plain JSON types, field for field: the hot path serialises this once
    with orjson instead of building and dumping pydantic models (a test validates it against the model)."""
    return {
        "items": [{"item_id": i.item_id, "score": i.score, "explanation": i.explanation or None} for i in rec.items],
        "model_version": rec.model_version,
        "fallback": rec.fallback,
        "exact": rec.exact,
        "history_length": history_length,
        "matched": rec.matched,
        "skipped_item_ids": skipped,
    }


def json_response(content: Any) -> Response:
    """orjson bytes as an application/json response (non-finite floats become null, as pydantic writes them)."""
    return Response(orjson.dumps(content), media_type="application/json")


@router.post("/recommend", response_model=RecommendResponse, responses=ERRORS, dependencies=[JSONBody])
async def recommend(body: RecommendRequest, state: StateDep) -> Response:
    """Top-k items for a user id (history from Redis) or an explicit history of item ids (oldest first)."""
    return json_response(response_dict(*await usecases.recommend(state, body)))


async def _invalid(sub: InvalidSubRequest) -> Any:
    raise InvalidInput("request does not match the schema", {"errors": sub.errors})


def _render_batch(outcomes: list[Any]) -> bytes:
    """JSON of a batch (up to max_batch_total_k items), one orjson pass; errors in the usual shape."""
    results = [
        error_body(o.code, o.message, o.details) if isinstance(o, ServiceError) else response_dict(*o) for o in outcomes
    ]
    return orjson.dumps({"results": results})


@router.post("/recommend/batch", response_model=BatchRecommendResponse, responses=ERRORS, dependencies=[JSONBody])
async def recommend_batch(body: BatchRecommendRequest, state: StateDep) -> Response:
    """Many recommendations in one call; each result is a response or an error of the usual shape (a
    schema-invalid entry included). The sum of k is bounded by MISSREC_MAX_BATCH_TOTAL_K."""
    limits = state.settings
    if len(body.requests) > limits.max_batch_requests:
        raise ServiceError(f"at most {limits.max_batch_requests} requests per batch", code="too_many_requests_in_batch")
    total_k = sum(min(r.k, limits.max_k) for r in body.requests if isinstance(r, RecommendRequest))
    if total_k > limits.max_batch_total_k:
        raise InvalidInput(
            f"the batch asks for {total_k} items in all (sum of k), at most {limits.max_batch_total_k}",
            {"total_k": total_k, "max_batch_total_k": limits.max_batch_total_k},
            code="batch_too_large",
        )
    calls = [usecases.recommend(state, r) if isinstance(r, RecommendRequest) else _invalid(r) for r in body.requests]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, ServiceError):
            raise outcome
    small = len(outcomes) <= RENDER_INLINE_MAX
    rendered = _render_batch(outcomes) if small else await asyncio.to_thread(_render_batch, outcomes)
    return Response(rendered, media_type="application/json")
