"""POST /v1/recommend and /v1/recommend/batch."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from service import usecases
from service.deps import JSONBody, StateDep
from service.errors import ServiceError, error_body
from service.recommender import Recommendation
from service.schemas import (
    BatchRecommendRequest,
    BatchRecommendResponse,
    ErrorResponse,
    Explanation,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
)

router = APIRouter(prefix="/v1", tags=["recommend"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422, 503)}


def to_response(rec: Recommendation, history_length: int, skipped: list[str]) -> RecommendResponse:
    items = [
        RecommendedItem(
            item_id=item.item_id,
            score=item.score,
            explanation=Explanation(**item.explanation) if item.explanation else None,
        )
        for item in rec.items
    ]
    return RecommendResponse(
        items=items,
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


@router.post("/recommend/batch", response_model=BatchRecommendResponse, responses=ERRORS, dependencies=[JSONBody])
async def recommend_batch(body: BatchRecommendRequest, state: StateDep) -> BatchRecommendResponse:
    """Many recommendations in one call; each result is a response or an error of the usual shape."""
    if len(body.requests) > state.settings.max_batch_requests:
        raise ServiceError(
            f"at most {state.settings.max_batch_requests} requests per batch", code="too_many_requests_in_batch"
        )
    outcomes = await asyncio.gather(*(usecases.recommend(state, r) for r in body.requests), return_exceptions=True)
    results: list[RecommendResponse | ErrorResponse] = []
    for outcome in outcomes:
        if isinstance(outcome, ServiceError):
            results.append(ErrorResponse.model_validate(error_body(outcome.code, outcome.message, outcome.details)))
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            results.append(to_response(*outcome))
    return BatchRecommendResponse(results=results)
