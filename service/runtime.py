"""The service's live state and its use cases (routes call these; they parse, call, and map).

One :class:`Runtime` per app: Redis (external or embedded), the :class:`~service.store.Store`, the
:class:`~service.engine.Engine` (bundle, item table, index, towers), the micro-batcher, the cold-start encoder,
and the task that follows the item-event stream so every replica sees new and deleted items within a second.

Redis outages: every Redis call has a bounded timeout and at most one immediate retry (on a broken connection
only, never after a timeout), so a failure becomes 503 ``redis_unavailable`` within ``redis_timeout_seconds``.
Recommendations from an explicit history need no Redis and keep working; by-user-id ones and writes do not.
Redis down at start-up: the service starts unready (503 ``not_ready``; /readyz says why) and replays the stored
items as soon as Redis answers, then turns ready by itself: no restart loop.

Refusing to start (:class:`StartupRefused`, one clear line): a bundle that fails its checks (checksums, format
version, shapes and dimensions, index size), or an item stored in Redis that the bundle cannot serve (CLIP
features of another width): serving without it would silently drop a write that was acknowledged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from index_builder.bundle import BundleError
from service.batching import MicroBatcher
from service.embedded_redis import EmbeddedRedis
from service.engine import Engine, IncompatibleItem, Query, Recommendation
from service.errors import InvalidInput, NotFound, PayloadTooLarge, Unavailable, UnknownItems
from service.metrics import Metrics
from service.schemas import RecommendRequest
from service.settings import Settings
from service.store import ItemRecord, Store

log = logging.getLogger(__name__)

STREAM_BLOCK_MS = 200


class StartupRefused(RuntimeError):
    """The service must not start: an invalid bundle, or items stored in Redis that this bundle cannot serve."""


def redis_unavailable(exc: Exception, retry_hint: str = "") -> Unavailable:
    return Unavailable(f"Redis is unavailable: {type(exc).__name__}{retry_hint}", code="redis_unavailable")


# A write that timed out may still run when Redis resumes (measured: a few per outage of a paused Redis).
EVENTS_RETRY_HINT = "; the events may have been stored: retry with the same idempotency key (applied once)"


async def stop_task(task: asyncio.Task[Any], every_s: float = 0.5) -> None:
    """Cancel ``task`` and wait for it to end, cancelling again while it runs on.

    redis-py (8.1, Python 3.11) sometimes swallows a cancellation that lands inside a command: the item-stream
    task then stays in its XREAD loop (measured: 1 to 6 lost in 100 to 150 cancels of such a loop), and a single
    cancel-and-await waits for good (the likely cause of a shutdown that hung once in the fuzz test until
    pytest-timeout, with the event loop idle)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every_s)
    if not task.cancelled() and task.exception() is not None:
        log.warning("%s ended with %r", task.get_name(), task.exception())


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    store: Store
    redis: Any
    metrics: Metrics
    embedded: EmbeddedRedis | None = None
    replica_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(2, "missrec-cpu"))
    encoder: Any = None
    encoder_error: str | None = None
    ready: bool = False
    startup_error: str | None = None
    stream_healthy: bool = False
    _batcher: MicroBatcher[Query, Recommendation] | None = None
    _consumer: asyncio.Task[None] | None = None
    _last_event: str = "0-0"
    _closing: bool = False

    # ----- lifecycle ----------------------------------------------------------------------------------------
    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        metrics = Metrics()
        if settings.bundle is None:
            raise StartupRefused("no bundle configured: set MISSREC_BUNDLE (or use `missrec quickstart`)")
        try:
            engine = await asyncio.to_thread(Engine.load, settings.bundle, settings, metrics)
        except BundleError as exc:  # checksum, format version, shapes, dimensions: never serve a bad bundle
            raise StartupRefused(f"invalid bundle {settings.bundle}: {exc}") from exc
        embedded = None
        url = settings.redis_url
        if not url:
            embedded = EmbeddedRedis(settings.data_dir / "redis", fsync=settings.embedded_redis_fsync)
            url = await asyncio.to_thread(embedded.start)
        timeout = settings.redis_timeout_seconds
        # Bounded: fail fast, no hangs. redis-py's default retries 10 times with backoff; retry once, at once, and
        # only on a broken connection (a stale pooled one after Redis restarted, which a fresh one fixes).
        retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        common = dict(socket_timeout=timeout, socket_connect_timeout=timeout, retry=retry)
        client = (
            RedisCluster.from_url(url, **common) if settings.redis_cluster else aredis.Redis.from_url(url, **common)
        )
        store = Store(
            client,
            prefix=settings.key_prefix,
            max_len=engine.max_len,
            ttl_seconds=settings.history_ttl_seconds,
            stream_max_len=settings.stream_max_len,
        )
        rt = cls(settings=settings, engine=engine, store=store, redis=client, metrics=metrics, embedded=embedded)
        rt._batcher = MicroBatcher(
            engine.recommend,
            settings.max_batch_size,
            settings.max_wait_ms / 1000.0,
            rt.executor,
            on_batch=metrics.batch_size.observe,
        )
        rt._batcher.start()
        await asyncio.to_thread(rt._load_encoder)
        if settings.warmup:
            await asyncio.to_thread(engine.warmup)
        try:
            await rt._replay_items()  # ready from here on
        except RedisError as exc:
            log.warning("Redis unreachable at start-up (%s): unready until it answers", type(exc).__name__)
        except IncompatibleItem as exc:
            await rt.close()
            raise StartupRefused(rt._incompatible(exc)) from exc
        rt._consumer = asyncio.get_running_loop().create_task(rt._sync_items(), name="item-stream")
        return rt

    async def close(self) -> None:
        self.ready, self._closing = False, True
        if self._consumer:
            await stop_task(self._consumer)
        if self._batcher:
            await self._batcher.stop()
        self.executor.shutdown(wait=True, cancel_futures=True)
        await self.redis.aclose()
        if self.embedded:
            await asyncio.to_thread(self.embedded.stop)

    def _load_encoder(self) -> None:
        """The open_clip encoder for ingestion (imports torch; never used on the recommend path)."""
        s = self.settings
        if not s.clip_pretrained:
            self.encoder_error = "ingestion disabled: MISSREC_CLIP_PRETRAINED is not set"
            return
        try:
            from missrec.clip_encoder import ClipEncoder

            self.encoder = ClipEncoder(s.clip_model, s.clip_pretrained)
            if self.encoder.dim != self.engine.feature_dim_expected():
                raise ValueError(
                    f"CLIP {s.clip_model} gives {self.encoder.dim}-d features, "
                    f"the bundle expects {self.engine.feature_dim_expected()}"
                )
        except Exception as exc:  # ingestion is optional: serve recommendations anyway, say why in /readyz
            self.encoder, self.encoder_error = None, f"ingestion unavailable: {exc}"
            log.warning(self.encoder_error)

    # ----- item replay and replication ---------------------------------------------------------------------------
    async def _replay_items(self) -> None:
        """Bring the index up to date with Redis (every ingested item and deletion), then turn ready."""
        self._last_event = await self.store.last_event_id()
        records = await self.store.all_items()
        applied = await asyncio.to_thread(self.engine.apply_records, records)
        log.info("replayed %d item changes from Redis (%d applied)", len(records), applied)
        self.ready = True
        e = self.engine
        log.info("ready: bundle %s, %d live items, replica %s", e.version, e.live_count(), self.replica_id)

    async def _sync_items(self) -> None:
        """Replay first if start-up could not (retrying while Redis is down), then follow the item stream."""
        while not self.ready and not self._closing:
            try:
                await self._replay_items()
            except RedisError as exc:
                self.metrics.redis_errors.inc()
                log.debug("replay: %s", exc)
                await asyncio.sleep(0.2)
            except IncompatibleItem as exc:  # found only now because Redis was down at start-up: stay unready
                self.startup_error = self._incompatible(exc)
                log.error("refusing to serve: %s", self.startup_error)
                return
        if not self._closing:
            await self._follow_stream()

    def _incompatible(self, exc: IncompatibleItem) -> str:
        return (
            f"{exc}; bundle {self.engine.version} cannot serve the items stored under key prefix "
            f"{self.settings.key_prefix!r} (serve the bundle that wrote them, use another key prefix, or delete "
            "that item's key)"
        )

    async def _follow_stream(self) -> None:
        while not self._closing:
            try:
                events = await self.store.read_events(self._last_event, STREAM_BLOCK_MS)
                self.stream_healthy = True
                for event_id, fields in events:
                    self._last_event = event_id
                    await self._apply_event(fields)
            except asyncio.CancelledError:
                raise
            except RedisError as exc:
                self.stream_healthy = False
                self.metrics.redis_errors.inc()
                log.debug("item stream: %s", exc)
                await asyncio.sleep(0.2)
            except Exception:
                log.exception("item stream: failed to apply an event")
                await asyncio.sleep(0.2)

    async def _apply_event(self, fields: dict[str, str]) -> None:
        item_id, version = fields.get("item_id", ""), int(fields.get("version", 0))
        if not self.engine.is_newer(item_id, version):
            return  # our own change, or already replayed
        record = await self.store.get_item(item_id)
        if record is not None and record.version >= version:
            applied = await asyncio.to_thread(self.engine.apply_records, [record])
            if applied:
                self.metrics.item_events.labels(fields.get("op", "upsert"), "stream").inc()

    # ----- recommendations -----------------------------------------------------------------------------------
    async def recommend(self, req: RecommendRequest) -> tuple[Recommendation, int]:
        started = time.perf_counter()
        limits = self.settings
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
            with self.metrics.timed("history_read"):
                try:
                    history, _ = await self.store.history(req.user_id)
                except RedisError as exc:
                    self.metrics.redis_errors.inc()
                    raise redis_unavailable(exc) from exc
            rows = self.engine.known_rows(history)  # items deleted since they were seen are skipped
        else:
            rows, unknown = self.engine.rows_for(req.history or [])
            if unknown:
                raise UnknownItems(f"{len(unknown)} unknown item id(s) in history", {"item_ids": unknown[:50]})
        exclude, unknown = self.engine.rows_for(req.exclude)
        if unknown:
            raise UnknownItems(f"{len(unknown)} unknown item id(s) in exclude", {"item_ids": unknown[:50]})
        query = Query(
            history=np.asarray(rows[-self.engine.max_len :], dtype=np.int64),
            k=req.k,
            exclude=set(exclude) | (set(rows) if req.exclude_seen else set()),
            explain=req.explain,
        )
        if self._batcher is None:
            raise Unavailable("service is starting")
        result = await self._batcher.submit(query)
        self.metrics.stage.labels("request").observe(time.perf_counter() - started)
        if result.fallback:
            self.metrics.fallback.inc()
        return result, len(rows)

    # ----- users --------------------------------------------------------------------------------------------------
    async def append_events(
        self, user_id: str, item_ids: list[str], timestamps: list[float] | None, idempotency_key: str | None
    ) -> tuple[int, bool]:
        _, unknown = self.engine.rows_for(item_ids)
        if unknown:
            raise UnknownItems(f"{len(unknown)} unknown item id(s)", {"item_ids": unknown[:50]})
        try:
            return await self.store.append_events(user_id, item_ids, timestamps, idempotency_key)
        except RedisError as exc:
            self.metrics.redis_errors.inc()
            raise redis_unavailable(exc, EVENTS_RETRY_HINT) from exc

    async def history(self, user_id: str) -> tuple[list[str], list[float | None]]:
        try:
            return await self.store.history(user_id)
        except RedisError as exc:
            self.metrics.redis_errors.inc()
            raise redis_unavailable(exc) from exc

    # ----- items ---------------------------------------------------------------------------------------------------
    def decode_base64_image(self, data: str) -> bytes:
        if len(data) > (self.settings.max_image_bytes * 4) // 3 + 8:
            raise PayloadTooLarge(f"image is larger than {self.settings.max_image_bytes} bytes")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput("image_base64 is not valid base64") from None

    async def ingest(self, item_id: str, text: str, image: bytes | None) -> tuple[ItemRecord, bool]:
        """Embed a new item (open_clip + item tower), persist it (durable before we answer), serve it at once."""
        if self.encoder is None:
            raise Unavailable(self.encoder_error or "ingestion unavailable", code="ingestion_unavailable")
        if image is not None and len(image) > self.settings.max_image_bytes:
            raise PayloadTooLarge(f"image is larger than {self.settings.max_image_bytes} bytes")
        if len(text) > self.settings.max_text_chars:
            raise PayloadTooLarge(f"text is longer than {self.settings.max_text_chars} characters")
        if not text.strip() and image is None:
            raise InvalidInput("an item needs a text, an image, or both")
        from missrec.clip_encoder import ImageDecodeError

        with self.metrics.timed("ingest_encode"):
            try:
                record = await asyncio.to_thread(self.engine.embed_item, self.encoder, item_id, text, image)
            except ImageDecodeError as exc:
                self.metrics.ingest.labels("failed").inc()
                raise InvalidInput(f"image rejected: {exc}", code="invalid_image") from None
        replaced = self.engine.has_item(item_id)
        try:
            await self.store.put_item(record, origin=self.replica_id)
        except RedisError as exc:
            self.metrics.redis_errors.inc()
            self.metrics.ingest.labels("failed").inc()
            raise redis_unavailable(exc) from exc
        await asyncio.to_thread(self.engine.apply_records, [record])
        self.metrics.item_events.labels("upsert", "local").inc()
        self.metrics.ingest.labels("replaced" if replaced else "created").inc()
        return record, replaced

    async def delete_item(self, item_id: str) -> None:
        if not self.engine.has_item(item_id):
            raise NotFound(f"item {item_id!r} does not exist", {"item_id": item_id})
        record = ItemRecord(item_id=item_id, deleted=True, created_at=time.time(), bundle_version=self.engine.version)
        try:
            await self.store.put_item(record, origin=self.replica_id, op="delete")
        except RedisError as exc:
            self.metrics.redis_errors.inc()
            raise redis_unavailable(exc) from exc
        await asyncio.to_thread(self.engine.apply_records, [record])
        self.metrics.item_events.labels("delete", "local").inc()

    def item_info(self, item_id: str) -> dict[str, Any]:
        info = self.engine.item_info(item_id)
        if info is None:
            raise NotFound(f"item {item_id!r} does not exist", {"item_id": item_id})
        return info

    # ----- health ---------------------------------------------------------------------------------------------------
    async def readiness(self) -> dict[str, str]:
        checks = {
            "bundle": f"loaded {self.engine.version}",
            "items": "replayed from Redis"
            if self.ready
            else (self.startup_error or "waiting for Redis to replay the stored items"),
        }
        try:
            await asyncio.wait_for(self.store.ping(), self.settings.redis_timeout_seconds)
            checks["redis"] = "ok"
        except (RedisError, TimeoutError, OSError) as exc:
            checks["redis"] = f"unavailable: {type(exc).__name__}"
        checks["ingestion"] = "ok" if self.encoder is not None else (self.encoder_error or "unavailable")
        return checks
