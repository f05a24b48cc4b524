"""POST /v1/recommend and /v1/recommend/batch."""

from __future__ import annotations

import asyncio
from typing import Any

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


def recommended(rec: Recommendation) -> list[RecommendedItem]:
    return [
        RecommendedItem(
            item_id=item.item_id,
            score=item.score,
            explanation=Explanation(**item.explanation) if item.explanation else None,
        )
        for item in rec.items
    ]


def to_response(rec: Recommendation, history_length: int, skipped: list[str]) -> RecommendResponse:
    return RecommendResponse(
        items=recommended(rec),
        model_version=rec.model_version,
        fallback=rec.fallback,
        exact=rec.exact,
        history_length=history_length,
        skipped_item_ids=skipped,
    )


@router.post("/recommend", response_model=RecommendResponse, responses=ERRORS, dependencies=[JSONBody])
async def recommend(body: RecommendRequest, state: StateDep) -> RecommendResponse:
    """Top-k items for a user id (history from Redis) or an explicit history of item ids (oldest first)."""
    return to_response(*await usecases.recommend(state, body))


async def _invalid(sub: InvalidSubRequest) -> Any:
    raise InvalidInput("request does not match the schema", {"errors": sub.errors})


def _render_batch(outcomes: list[Any]) -> bytes:
    """Response models and JSON of a batch (up to max_batch_total_k items): run in a worker thread."""
    results: list[RecommendResponse | ErrorResponse] = []
    for outcome in outcomes:
        if isinstance(outcome, ServiceError):
            results.append(ErrorResponse.model_validate(error_body(outcome.code, outcome.message, outcome.details)))
        else:
            results.append(to_response(*outcome))
    return BatchRecommendResponse(results=results).model_dump_json().encode()


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
    return Response(await asyncio.to_thread(_render_batch, outcomes), media_type="application/json")
