"""GET /healthz (process up and able to recover), /readyz (bundle loaded, Redis reachable), /metrics (Prometheus),
/v1/status (the console's overview as JSON)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service import usecases
from service.deps import StateDep
from service.schemas import ErrorResponse, Health, StatusResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
async def healthz(request: Request) -> Health | JSONResponse:
    """Process up; 503 only when it cannot recover by itself (its embedded Redis stays down): restart it."""
    state = getattr(request.app.state, "service", None)
    alive, why = state.alive() if state is not None else (True, "ok")
    if not alive:
        return JSONResponse(status_code=503, content=Health(status="unready", checks={"redis": why}).model_dump())
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(request: Request) -> JSONResponse:
    state = getattr(request.app.state, "service", None)
    if state is None:
        return JSONResponse(
            status_code=503, content=Health(status="unready", checks={"bundle": "loading"}).model_dump()
        )
    checks = await usecases.readiness(state)
    ok = state.ready and checks.get("redis") == "ok"
    if (saturated := request.app.state.load.saturated()) is not None:  # a balancer should route elsewhere
        checks["load"], ok = saturated, False
    return JSONResponse(
        status_code=200 if ok else 503, content=Health(status="ok" if ok else "unready", checks=checks).model_dump()
    )


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    state = getattr(request.app.state, "service", None)
    body = state.metrics.render() if state is not None else b""
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/status", response_model=StatusResponse, responses={503: {"model": ErrorResponse}})
async def status(state: StateDep) -> StatusResponse:
    """Model, catalogue sizes, the /readyz checks and the service's metrics (the numbers of /metrics as JSON,
    histograms with cumulative bucket counts): what the console's overview charts."""
    return StatusResponse(**await usecases.status(state))
