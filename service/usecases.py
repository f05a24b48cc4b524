"""The service's use cases: what each route does, between parsing (routers) and the wire (errors).

Each function takes the :class:`~service.state.ServiceState` and plain values, reads the current catalogue
snapshot (never a lock), talks to Redis through the stores (service.store) and raises domain errors (service.errors).
Recommendations from an explicit history need no Redis and keep working during an outage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from redis.exceptions import RedisError

from service.bundle_root import resolve_bundle
from service.catalogue import Snapshot
from service.errors import Conflict, Disabled, InvalidInput, NotFound, PayloadTooLarge, Unavailable, UnknownItems
from service.filters import check_max_per, matching_rows
from service.recommender import Query, Recommendation, similar
from service.schemas import RecommendRequest, Shaping
from service.serving_model import ServingModel
from service.state import ServiceState
from service.store import Announcement, IdempotencyConflict, ItemRecord
from serving_core.attribute_schema import InvalidAttributes, normalise
from serving_core.bundle import BundleError

if TYPE_CHECKING:
    from clip_features.preprocess import ItemEncoder

log = logging.getLogger(__name__)

# A write that timed out may still run when Redis resumes (measured: a few per outage of a paused Redis).
EVENTS_RETRY_HINT = "; the events may have been stored: retry with the same idempotency key (applied once)"


def redis_unavailable(exc: Exception, retry_hint: str = "") -> Unavailable:
    return Unavailable(f"Redis is unavailable: {type(exc).__name__}{retry_hint}", code="redis_unavailable")


async def _redis(state: ServiceState, call: Any, hint: str = "") -> Any:
    try:
        return await call
    except RedisError as exc:
        state.metrics.redis_errors.inc()
        raise redis_unavailable(exc, hint) from exc


# ----- recommendations --------------------------------------------------------------------------------------
async def recommend(state: ServiceState, req: RecommendRequest) -> tuple[Recommendation, int, list[str]]:
    """(recommendation, history items used, history ids skipped because they are deleted)."""
    started = time.perf_counter()
    limits = state.settings
    if req.k > limits.max_k:
        if "k" in req.model_fields_set:
            raise InvalidInput(f"k is {req.k}, at most {limits.max_k}", {"k": req.k, "max_k": limits.max_k})
        req = req.model_copy(update={"k": limits.max_k})  # the default k never exceeds the configured cap
    if req.history is not None and len(req.history) > limits.max_history:
        raise InvalidInput(
            f"history has {len(req.history)} items, at most {limits.max_history}",
            {"history_length": len(req.history), "max_history": limits.max_history},
        )
    if req.user_id is not None:
        with state.metrics.timed("history_read"):
            history, _ = await _redis(state, state.histories.history(req.user_id))
        snap = state.catalogue.current
        rows, skipped = snap.rows_for(history)  # items deleted since they were seen are skipped
    else:
        # Deleted items are skipped as in a stored history (a client keeping its own history cannot know of the
        # delete); ids that never existed are an error: a typo must not silently change the results.
        snap = state.catalogue.current
        rows, skipped = snap.rows_for(req.history or [])
        unknown = [i for i in skipped if not snap.was_deleted(i)]
        if unknown:
            raise UnknownItems(f"{len(unknown)} unknown item id(s) in history", {"item_ids": unknown[:50]})
    exclude, _ = snap.rows_for(req.exclude)  # deleted or unknown ids are never recommended anyway
    allowed, matched = shaping(snap, req)
    query = Query(
        history=np.asarray(rows, dtype=np.int64),  # the user tower reads its last max_len items
        k=req.k,
        exclude=set(exclude) | (set(rows) if req.exclude_seen else set()),
        explain=req.explain,
        snapshot=snap,
        allowed=allowed,
        max_per=req.max_per,
    )
    result = await state.batcher.submit(query)
    result.matched = matched
    state.metrics.stage.labels("request").observe(time.perf_counter() - started)
    state.shadow.observe(query, result)
    if result.fallback:
        state.metrics.fallback.inc()
    return result, len(rows), list(dict.fromkeys(skipped))


def shaping(snap: Snapshot, req: Shaping) -> tuple[np.ndarray | None, int | None]:
    """The rows a request's filter allows (None: no filter) and how many live available items match; the filter
    and the caps checked against the snapshot's attribute schema (422 otherwise)."""
    check_max_per(req.max_per, snap.attrs)
    if req.filter is None:
        return None, None
    return matching_rows(req.filter, snap.attrs, snap.hidden)


# ----- users ----------------------------------------------------------------------------------------------------
async def append_events(
    state: ServiceState, user_id: str, item_ids: list[str], timestamps: list[float] | None, key: str | None
) -> tuple[int, bool]:
    histories = state.histories
    try:
        if key and (length := await histories.applied_length(user_id, key, item_ids, timestamps)) is not None:
            return length, False  # a retry of an applied call: its items may have been deleted since
        _, unknown = state.catalogue.current.rows_for(item_ids)
        if unknown:
            raise UnknownItems(f"{len(unknown)} unknown item id(s)", {"item_ids": unknown[:50]})
        return await histories.append_events(user_id, item_ids, timestamps, key)
    except IdempotencyConflict:
        raise Conflict(
            "this idempotency key was already used for other item ids or timestamps; use a new key",
            {"idempotency_key": key},
            code="idempotency_key_reused",
        ) from None
    except RedisError as exc:
        state.metrics.redis_errors.inc()
        raise redis_unavailable(exc, EVENTS_RETRY_HINT) from exc


async def history(state: ServiceState, user_id: str) -> tuple[list[str], list[float | None]]:
    return await _redis(state, state.histories.history(user_id))


# ----- items ------------------------------------------------------------------------------------------------------
def checked_attributes(state: ServiceState, attributes: Any) -> dict[str, Any]:
    try:
        return normalise(state.catalogue.current.attrs.schema, attributes)
    except InvalidAttributes as exc:
        raise InvalidInput(str(exc), code="invalid_attributes") from None


async def ingest(
    state: ServiceState, item_id: str, text: str, image: bytes | None, attributes: Any = None, available: bool = True
) -> tuple[ItemRecord, bool]:
    """Embed a new item (CLIP + item tower), persist it (durable before we answer), serve it at once. ``image``: the
    upload's bytes, within MISSREC_MAX_IMAGE_BYTES (the routers' one reader checks that)."""
    limits = state.settings
    attrs = checked_attributes(state, attributes)
    if state.encoder is None:  # permanent until restarted with other settings: 501, no Retry-After
        raise Disabled(state.encoder_error or "ingestion unavailable", code="ingestion_disabled")
    if len(text) > limits.max_text_chars:
        raise PayloadTooLarge(f"text is longer than {limits.max_text_chars} characters")
    if not any(ch.isprintable() and not ch.isspace() for ch in text):
        text = ""  # only NUL, controls or blanks: no text (it would be encoded as one)
    if not text and image is None:
        raise InvalidInput("an item needs a text, an image, or both")
    from clip_features.preprocess import ImageDecodeError

    model = state.catalogue.current.model
    try:
        observe = state.metrics.stage.labels("ingest_encode").observe
        record = await state.ingest_gate.run(_embed, model, state.encoder, item_id, text, image, observe=observe)
    except ImageDecodeError as exc:
        state.metrics.ingest.labels("failed").inc()
        raise InvalidInput(f"image rejected: {exc}", code="invalid_image") from None
    record.attributes, record.available = attrs, available
    try:
        change = await state.replicator.store_change(record, "upsert")
    except RedisError as exc:
        state.metrics.redis_errors.inc()
        state.metrics.ingest.labels("failed").inc()
        raise redis_unavailable(exc) from exc
    # Redis says whether this write found a live record: exact under concurrent writes of one id
    replaced = change.had_live_record if change.had_live_record is not None else item_id in model.bundle_rows
    state.metrics.item_events.labels("upsert", "local").inc()
    state.metrics.ingest.labels("replaced" if replaced else "created").inc()
    return record, replaced


def _embed(model: ServingModel, encoder: ItemEncoder, item_id: str, text: str, image: bytes | None) -> ItemRecord:
    """The item record (CLIP + item tower) with a thumbnail of its image (in an ingest worker thread).

    The upload is decoded once, here, as the encoders decode it (:func:`~clip_features.preprocess.decode_image`: the
    format allow-list and the encoder's pixel limit, checked on the header, :class:`ImageDecodeError` otherwise;
    long images cropped, huge ones shrunk while decoding); the encoder and the thumbnail both take that picture."""
    from clip_features.preprocess import MAX_UNCROPPED_ASPECT, decode_image
    from service.thumbnail import thumbnail

    picture = None
    if image is not None:
        picture = decode_image(image, max_pixels=encoder.max_image_pixels, max_aspect=MAX_UNCROPPED_ASPECT)
    record = model.embed(encoder, item_id, text, picture)
    if picture is not None:
        record.thumbnail = thumbnail(picture)
    return record


async def delete_item(state: ServiceState, item_id: str) -> None:
    snap = state.catalogue.current
    if snap.row(item_id) is None:
        raise NotFound(f"item {item_id!r} does not exist", {"item_id": item_id})
    record = ItemRecord(item_id=item_id, deleted=True, created_at=time.time(), bundle_version=snap.model.version)
    await _redis(state, state.replicator.store_change(record, "delete"))
    state.metrics.item_events.labels("delete", "local").inc()


async def patch_item(state: ServiceState, item_id: str, attributes: Any, available: bool | None) -> dict[str, Any]:
    """Set an item's attributes (all of them) and/or availability: stored in Redis (durable before the answer),
    replicated through the item stream like an ingest, nothing re-embedded (an ingested item's record is stored
    again with its vectors; a bundle item gets a patch record)."""
    snap = state.catalogue.current
    row = snap.row(item_id)
    if row is None:
        raise NotFound(f"item {item_id!r} does not exist", {"item_id": item_id})
    attrs = checked_attributes(state, attributes) if attributes is not None else dict(snap.attrs.of(row))
    avail = available if available is not None else snap.attrs.is_available(row)
    current = snap.ingested.get(item_id)
    if current is not None:
        record = replace(current, attributes=attrs, available=avail, patch=True)
    else:
        version = snap.model.version
        record = ItemRecord(item_id, created_at=time.time(), bundle_version=version, attributes=attrs,
                            available=avail, patch=True)  # fmt: skip
    await _redis(state, state.replicator.store_change(record, "patch"))
    state.metrics.item_events.labels("patch", "local").inc()
    return item_info(state, item_id)


def item_info(state: ServiceState, item_id: str) -> dict[str, Any]:
    info = state.catalogue.current.item_info(item_id)
    if info is None:
        raise NotFound(f"item {item_id!r} does not exist", {"item_id": item_id})
    return info


def item_thumbnail(state: ServiceState, item_id: str) -> bytes:
    snap = state.catalogue.current
    if snap.row(item_id) is None:
        raise NotFound(f"item {item_id!r} does not exist", {"item_id": item_id})
    record = snap.ingested.get(item_id)
    if record is None or not record.thumbnail:
        raise NotFound(f"item {item_id!r} has no stored image", {"item_id": item_id}, code="no_image")
    return record.thumbnail


async def similar_items(
    state: ServiceState, item_id: str, k: int | None, explain: bool, shape: Shaping | None = None
) -> Recommendation:
    """The k items nearest to one item by the model's scorer (see recommender.item_query); never itself.
    k None: 10, or MISSREC_MAX_K if lower. ``shape``: a filter and caps, as in recommend."""
    max_k = state.settings.max_k
    if k is not None and k > max_k:
        raise InvalidInput(f"k is {k}, at most {max_k}", {"k": k, "max_k": max_k})
    k = k if k is not None else min(10, max_k)
    snap = state.catalogue.current
    row = snap.row(item_id)
    if row is None:
        raise NotFound(f"item {item_id!r} does not exist", {"item_id": item_id})
    allowed, matched = shaping(snap, shape) if shape is not None else (None, None)
    cap = shape.max_per if shape is not None else None
    loop = asyncio.get_running_loop()
    rec = await loop.run_in_executor(state.executor, similar, snap, row, k, explain, state.metrics, allowed, cap)
    rec.matched = matched
    return rec


async def search_items(state: ServiceState, query: str, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Live items whose id or text holds every word of ``query``: (summaries, how many match in all)."""
    if not query.split():
        raise InvalidInput("q must contain a word, not only blanks", {"q": query})
    snap = state.catalogue.current
    # a Python scan: the default thread pool, not the two threads the micro-batches and /similar run on
    rows, total = await asyncio.to_thread(snap.search_text, query, limit)
    return [snap.item_info(snap.ids[r]) for r in rows], total


async def status(state: ServiceState) -> dict[str, Any]:
    """The console's overview: model, catalogue, the /readyz checks and the metrics summary."""
    snap = state.catalogue.current
    manifest = snap.model.manifest
    return {
        "model": {
            "kind": snap.model.kind,
            "version": snap.model.version,
            "scorer": manifest.scorer.kind,
            "modalities": list(manifest.modalities),
            "max_history_used": snap.model.max_len,
        },
        "catalogue": {
            "bundle_items": snap.model.bundle.table.num_items - 1,  # row 0 is padding
            "ingested": snap.num_ingested,
            "deleted": snap.deleted_ids,
            "live": snap.live_count,
            "seq": snap.seq,
        },
        "checks": await readiness(state),
        "uptime_seconds": time.time() - state.started_at,
        **state.metrics.summary(),
    }


# ----- admin ----------------------------------------------------------------------------------------------------
async def announce(state: ServiceState, given: str) -> Announcement:
    """Check the bundle ``given`` names (inside the root, loads, can take over), then announce it to every replica.

    Every refusal is a 4xx before anything is announced: outside the root or missing (nothing read from it), or a
    bundle that fails its checks or cannot serve the stored items (422, with the reason)."""
    path = resolve_bundle(state.settings.swap_root(), given)
    try:
        model = await asyncio.to_thread(ServingModel.load, path, state.settings)
    except BundleError as exc:
        raise InvalidInput(f"invalid bundle {path}: {exc}", {"bundle": str(path)}, code="invalid_bundle") from None
    except Exception as exc:  # e.g. ONNX Runtime refusing a graph whose checksum was re-recorded
        message = f"invalid bundle {path}: {type(exc).__name__}: {exc}"
        raise InvalidInput(message, {"bundle": str(path)}, code="invalid_bundle") from None
    records = list(state.catalogue.current.ingested.values())
    if problem := await asyncio.to_thread(model.swap_problem, state.encoder_dim(), records):
        raise InvalidInput(
            f"bundle {path} cannot take over: {problem}", {"bundle": str(path)}, code="incompatible_bundle"
        )
    state.switcher.preloaded = model  # this replica's switch need not load it again
    try:
        call = state.announcements.announce_bundle(str(path), model.version, state.replica_id)
        announcement = await _redis(state, call)
    except Exception:
        state.switcher.preloaded = None
        raise
    log.info("announced bundle %s (%s, generation %d)", path, model.version, announcement.generation)
    return announcement


# ----- health ---------------------------------------------------------------------------------------------------
async def readiness(state: ServiceState) -> dict[str, str]:
    snap = state.catalogue.current
    rep = state.replicator
    bundle = f"loaded {snap.model.version} ({snap.model.kind}, {snap.model.manifest.scorer.kind})"
    swap = state.switcher
    if not swap.settled:
        bundle += f"; {swap.error or 'waiting for Redis to say which bundle is announced'}"
    elif swap.phase != "active":
        bundle += f"; swap {swap.phase}" + (f": {swap.error}" if swap.error else "")
    checks = {
        "bundle": bundle,
        "items": "replayed from Redis" if rep.ready else (rep.error or "waiting for Redis to replay the stored items"),
    }
    try:
        await asyncio.wait_for(state.redis.ping(), state.settings.redis_timeout_seconds)
        checks["redis"] = "ok"
    except (RedisError, TimeoutError, OSError) as exc:
        checks["redis"] = f"unavailable: {type(exc).__name__}"
    checks["ingestion"] = "ok" if state.encoder is not None else (state.encoder_error or "unavailable")
    return checks
