"""The baseline of loadtest.bench: a bare FastAPI app with the service's routes and request/response schemas that
does no work (no Redis, no model, no index). Served by uvicorn exactly like the service, it measures what the web
stack alone costs at the same rates:

    uvicorn loadtest.bare_app:app --port 8001 --workers 1
"""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Path
from fastapi.responses import JSONResponse

from service.schemas import (
    EventsRequest,
    EventsResponse,
    Health,
    Identifier,
    ItemCreated,
    ItemJSONRequest,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
)

CANNED = [RecommendedItem(item_id=f"B{i:09d}", score=1.0 - i / 2000.0) for i in range(1000)]

app = FastAPI(title="bare baseline (same shapes as the MISSRec service, no work)")


@app.post("/v1/recommend", response_model=RecommendResponse)
async def recommend(body: RecommendRequest) -> RecommendResponse:
    return RecommendResponse(
        items=CANNED[: body.k],
        model_version="bare",
        fallback=None,
        exact=True,
        history_length=len(body.history or ()),
    )


@app.post("/v1/users/{user_id}/events", response_model=EventsResponse)
async def append_events(user_id: Annotated[Identifier, Path()], body: EventsRequest) -> EventsResponse:
    return EventsResponse(user_id=user_id, history_length=len(body.item_ids), appended=len(body.item_ids))


@app.post("/v1/items", status_code=201, response_model=ItemCreated)
async def ingest(body: ItemJSONRequest) -> JSONResponse:
    created = ItemCreated(item_id=body.item_id, version=1, text_cluster=1, image_cluster=1, replaced=False)
    return JSONResponse(status_code=201, content=created.model_dump())


@app.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@app.get("/readyz", response_model=Health)
async def readyz() -> Health:
    return Health(status="ok")
