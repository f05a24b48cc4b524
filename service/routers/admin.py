"""Admin: GET and POST /v1/admin/bundle, the serving bundle of every replica (zero-downtime swaps, rollbacks);
PUT, GET and DELETE /v1/admin/shadow, a candidate bundle scored beside it on this replica.

Only with MISSREC_API_KEY set (403 otherwise), then with the key as for writes (401)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service import usecases
from service.deps import AdminAccess, JSONBody, StateDep
from service.schemas import BundleAnnouncement, BundleStatus, ErrorResponse, ShadowRequest, ShadowStatus, SwapRequest

router = APIRouter(prefix="/v1/admin", tags=["admin"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 413, 415, 422, 503)}


@router.post(
    "/bundle",
    status_code=202,
    response_model=BundleAnnouncement,
    responses=ERRORS,
    dependencies=[AdminAccess, JSONBody],
)
async def swap_bundle(body: SwapRequest, state: StateDep) -> JSONResponse:
    """Point every replica at another bundle (a rollback is the same call with the previous one). The bundle is
    checked here first (inside MISSREC_BUNDLE_ROOT, checksums, shapes, towers, the stored items' raw features):
    422 with the reason, nothing announced. 202: announced; each replica loads, warms up and re-embeds the
    ingested items in the background, then switches at once (GET shows loading, active or failed)."""
    announcement = await usecases.announce(state, body.bundle)
    return JSONResponse(status_code=202, content=BundleAnnouncement(**vars(announcement)).model_dump())


@router.get("/bundle", response_model=BundleStatus, responses=ERRORS, dependencies=[AdminAccess])
async def bundle_status(state: StateDep) -> BundleStatus:
    """This replica's bundle: the one it serves, the one announced, and a swap in progress or refused."""
    return BundleStatus(replica=state.replica_id, **state.switcher.status())


@router.put(
    "/shadow", status_code=202, response_model=ShadowStatus, responses=ERRORS, dependencies=[AdminAccess, JSONBody]
)
async def set_shadow(body: ShadowRequest, state: StateDep) -> JSONResponse:
    """Score ``fraction`` of this replica's recommend requests with the candidate bundle too, after answering
    them from the serving one (clients never see the candidate). 202: loading in the background (GET shows
    loading, active or failed, with overlap@k and latency per model); it replaces any earlier candidate."""
    status = await state.shadow.start(body.bundle, body.fraction)
    return JSONResponse(status_code=202, content=ShadowStatus(**status).model_dump())


@router.get("/shadow", response_model=ShadowStatus, responses=ERRORS, dependencies=[AdminAccess])
async def shadow_status(state: StateDep) -> ShadowStatus:
    """This replica's shadow candidate and what it measured so far."""
    return ShadowStatus(**state.shadow.status())


@router.delete("/shadow", status_code=204, responses=ERRORS, dependencies=[AdminAccess])
async def stop_shadow(state: StateDep) -> Response:
    """Stop scoring with the candidate (no-op when none is set)."""
    await state.shadow.stop()
    return Response(status_code=204)
