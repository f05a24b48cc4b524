"""Admin: GET and POST /v1/admin/bundle, the serving bundle of every replica (zero-downtime swaps, rollbacks);
PUT, GET and DELETE /v1/admin/shadow, a candidate bundle scored beside it on this replica; PUT and GET
/v1/admin/experiments/{name} and POST .../end, A/B experiments between bundles (service.experiments).

Only with MISSREC_API_KEY set (403 otherwise), then with the key as for writes (401)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service import usecases
from service.deps import AdminAccess, JSONBody, StateDep
from service.errors import Conflict, NotFound
from service.schemas import (
    BundleAnnouncement,
    BundleStatus,
    ErrorResponse,
    ExperimentEnd,
    ExperimentName,
    ExperimentRequest,
    ShadowRequest,
    ShadowStatus,
    SwapRequest,
)

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


@router.put("/experiments/{name}", responses=ERRORS, dependencies=[AdminAccess, JSONBody])
async def start_experiment(name: ExperimentName, body: ExperimentRequest, state: StateDep) -> JSONResponse:
    """Start an experiment: users split between the variants' bundles by a stable hash of (name, user id), every
    replica; recommendations carry a recommendation_id and the variant; events are attributed (see GET)."""
    variants = [v.model_dump() for v in body.variants]
    for v in variants:  # checked like a swap: inside the bundle root, a loadable bundle (422 otherwise)
        await usecases.check_bundle(state, v["bundle"])
    try:
        config = await usecases._redis(state, state.experiments.start(name, variants))
    except ValueError as exc:
        raise Conflict(str(exc), code="experiment_running") from None
    return JSONResponse(status_code=201, content=config)


@router.get("/experiments/{name}", responses=ERRORS, dependencies=[AdminAccess])
async def experiment_status(name: ExperimentName, state: StateDep) -> JSONResponse:
    """Per variant: impressions, attributed interactions, hits (recommendations followed by an interaction with
    one of their items), hit rate@k, and the 95 % interval of each variant's difference from the first."""
    try:
        return JSONResponse(await usecases._redis(state, state.experiments.stats(name)))
    except KeyError:
        raise NotFound(f"no experiment {name!r}", {"name": name}) from None


@router.post("/experiments/{name}/end", responses=ERRORS, dependencies=[AdminAccess, JSONBody])
async def end_experiment(name: ExperimentName, body: ExperimentEnd, state: StateDep) -> JSONResponse:
    """End it (recommendations stop carrying variants); with promote, announce the variant with the highest hit
    rate to every replica through the swap (POST /v1/admin/bundle)."""
    try:
        await usecases._redis(state, state.experiments.end(name))
        stats = await usecases._redis(state, state.experiments.stats(name))
    except KeyError:
        raise NotFound(f"no experiment {name!r}", {"name": name}) from None
    if body.promote:
        rated = [v for v in stats["variants"] if v["hit_rate"] is not None]
        if rated:
            winner = max(rated, key=lambda v: v["hit_rate"])
            announcement = await usecases.announce(state, winner["bundle"])
            stats["promoted"] = {"variant": winner["name"], "generation": announcement.generation}
    return JSONResponse(stats)
