"""Wiring: everything one app instance holds, built in the lifespan (:meth:`ServiceState.start`) and closed there.

The bundle (a :class:`~service.serving_model.ServingModel`) inside the live :class:`~service.catalogue.Catalogue`,
Redis (external or embedded) behind the three stores of :mod:`service.store` (histories, items, announcements) on
one client, the :class:`~service.replication.Replicator` that follows the item stream, the micro-batcher of the
recommend path, the cold-start encoder, the bundle switcher and the shadow. The use cases (service.usecases) take
this object; they hold no state of their own.

Redis outages: every Redis call has a bounded timeout and at most one immediate retry (on a broken connection
only, never after a timeout), so a failure becomes 503 ``redis_unavailable`` within ``redis_timeout_seconds``.

Refusing to start (:class:`~service.replication.StartupRefused`, one clear line): a bundle that fails its checks
(checksums, format version, shapes, index size), an item stored in Redis that the bundle cannot serve, or a
``MISSREC_CLIP_ONNX`` directory that is damaged, of another feature width than the bundle's, or contradicted by an
explicit ``MISSREC_CLIP_MODEL`` / ``MISSREC_CLIP_PRETRAINED``.

Ingestion: with ``MISSREC_CLIP_ONNX`` the encoders are ONNX Runtime graphs (:mod:`clip_features.onnx_encoder`) and the
process imports neither torch nor open_clip; else open_clip (torch) is loaded from ``MISSREC_CLIP_PRETRAINED``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from service.bundle_root import inside_root
from service.catalogue import Catalogue
from service.embedded_redis import EmbeddedRedis, Supervisor
from service.experiments import Experiments
from service.gc_pauses import GcWatch, freeze
from service.metrics import Metrics
from service.micro_batch import MicroBatcher
from service.recommender import Query, Recommendation, recommend_batch, warmup
from service.replication import Replicator, StartupRefused, stop_task
from service.serving_model import IncompatibleItem, ServingModel
from service.settings import Settings
from service.shadow import Shadow
from service.store import Announcement, AnnouncementStore, HistoryStore, ItemStore
from service.swap import BundleSwitcher
from serving_core.bundle import BundleError

if TYPE_CHECKING:
    from clip_features.preprocess import ItemEncoder

log = logging.getLogger(__name__)

SUPERVISE_EVERY_S = 0.2  # how often the embedded Redis is checked (and restarted when it died)
ANNOUNCED_HINT = (
    " (announced to every replica with POST /v1/admin/bundle: announce a good bundle from a running replica, "
    "restore this one, or delete the Redis key <prefix>:{bundle}:current to serve MISSREC_BUNDLE again)"
)
EMBEDDED_DOWN_UNHEALTHY_S = 30.0  # /healthz fails when the embedded Redis stays down this long (restart the pod)


def connect_redis(url: str, settings: Settings) -> Any:
    """A client with bounded calls: fail fast, no hangs. redis-py's default retries 10 times with backoff; retry
    once, at once, and only on a broken connection (a stale pooled one after Redis restarted)."""
    timeout = settings.redis_timeout_seconds
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    common = dict(socket_timeout=timeout, socket_connect_timeout=timeout, retry=retry)
    return RedisCluster.from_url(url, **common) if settings.redis_cluster else aredis.Redis.from_url(url, **common)


class IngestGate:
    """At most ``slots`` encodes (open_clip + item tower) at once; 503 ``overloaded`` when ``queue`` already wait
    (each encode holds its decoded image in memory). A slot is freed when its encode ends, not when a client that
    went away cancels its request. The same gate bounds the item searches (``what="searches"``): a Python scan
    holds the GIL, and many at once starve the event loop the recommend path runs on."""

    def __init__(self, slots: int, queue: int, what: str = "ingests encoding") -> None:
        self.slots, self.queue, self.what = slots, queue, what
        self._sem: asyncio.Semaphore | None = None  # created on the event loop
        self.waiting = 0

    async def run(self, fn: Any, *args: Any, observe: Any = None) -> Any:
        """``fn(*args)`` in a worker thread once a slot is free; ``observe(seconds)`` gets the encode time."""
        from service.errors import Unavailable

        if self._sem is None:
            self._sem = asyncio.Semaphore(self.slots)
        if self._sem.locked() and self.waiting >= self.queue:
            raise Unavailable(f"{self.slots} {self.what} and {self.waiting} waiting; retry", code="overloaded")
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        started = time.perf_counter()
        work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        work.add_done_callback(lambda _: self._sem.release())
        try:
            return await asyncio.shield(work)
        finally:
            if observe is not None:
                observe(time.perf_counter() - started)


@dataclass
class ServiceState:
    settings: Settings
    catalogue: Catalogue
    histories: HistoryStore
    items: ItemStore
    announcements: AnnouncementStore
    redis: Any  # the one client the three stores share
    metrics: Metrics
    replicator: Replicator
    batcher: MicroBatcher[Query, Recommendation]
    switcher: BundleSwitcher
    shadow: Shadow
    experiments: Experiments
    embedded: EmbeddedRedis | None = None
    replica_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(2, "missrec-cpu"))
    encoder: ItemEncoder | None = None
    encoder_error: str | None = None
    ingest_gate: IngestGate = field(default_factory=lambda: IngestGate(1, 8))
    search_gate: IngestGate = field(default_factory=lambda: IngestGate(1, 4, "searches"))
    started_at: float = field(default_factory=time.time)
    supervisor: Supervisor | None = None
    gc_watch: GcWatch | None = None
    _supervising: asyncio.Task[None] | None = None
    _closing: bool = False

    @property
    def ready(self) -> bool:
        return self.replicator.ready and self.switcher.settled

    def encoder_dim(self) -> int | None:
        """The ingestion encoder's feature width (None: ingestion disabled)."""
        return self.encoder.dim if self.encoder is not None else None

    @classmethod
    async def start(cls, settings: Settings) -> ServiceState:
        metrics = Metrics()
        if settings.bundle is None:
            raise StartupRefused("no bundle configured: set MISSREC_BUNDLE (or use `missrec quickstart`)")
        if settings.bundle_root is not None and not settings.bundle_root.is_dir():
            raise StartupRefused(f"MISSREC_BUNDLE_ROOT={settings.bundle_root} is not a directory")
        embedded, url = None, settings.redis_url
        if not url:
            embedded = EmbeddedRedis(settings.data_dir / "redis", fsync=settings.embedded_redis_fsync)
            url = await asyncio.to_thread(embedded.start)
        client = connect_redis(url, settings)
        announcements = AnnouncementStore(client, settings.key_prefix)
        try:
            bundle, announcement, known = await cls._bundle_to_serve(settings, announcements)
            try:
                model = await asyncio.to_thread(ServingModel.load, bundle, settings)
            except BundleError as exc:  # checksum, format version, shapes, dimensions: never serve a bad bundle
                what = "the announced bundle" if announcement else "invalid bundle"
                raise StartupRefused(f"{what} {bundle}: {exc}" + (ANNOUNCED_HINT if announcement else "")) from exc
            if announcement is not None and model.version != announcement.version:
                raise StartupRefused(
                    f"the announced bundle {bundle} is {model.version}, announced as {announcement.version}"
                    + ANNOUNCED_HINT
                )
            encoder, encoder_error = None, None
            if settings.clip_onnx is not None:
                encoder = await asyncio.to_thread(load_onnx_encoder, settings, model.feature_dim_expected())
        except BaseException:
            await client.aclose()
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)
            raise
        histories = HistoryStore(client, settings.key_prefix, model.max_len, settings.history_ttl_seconds)
        items = ItemStore(client, settings.key_prefix, settings.stream_max_len)
        if encoder is None:
            encoder, encoder_error = await asyncio.to_thread(load_clip_encoder, settings, model.feature_dim_expected())
        encoder_dim = encoder.dim if encoder is not None else None
        catalogue = Catalogue(model)
        replica_id = uuid.uuid4().hex[:12]
        replicator = Replicator(items, catalogue, metrics, settings.key_prefix, replica_id)
        executor = ThreadPoolExecutor(2, "missrec-cpu")
        batcher: MicroBatcher[Query, Recommendation] = MicroBatcher(
            lambda queries: recommend_batch(catalogue.current, queries, metrics),
            settings.max_batch_size,
            settings.max_wait_ms / 1000.0,
            on_batch=metrics.batch_size.observe,
            on_wait=metrics.stage.labels("queue").observe,
            adaptive=settings.linger == "adaptive",
            max_queue_s=settings.max_queue_ms / 1000.0 if settings.max_queue_ms is not None else None,
        )
        state = cls(
            settings=settings,
            catalogue=catalogue,
            histories=histories,
            items=items,
            announcements=announcements,
            redis=client,
            metrics=metrics,
            replicator=replicator,
            batcher=batcher,
            embedded=embedded,
            replica_id=replica_id,
            executor=executor,
            ingest_gate=IngestGate(settings.ingest_concurrency, settings.ingest_queue),
            search_gate=IngestGate(settings.search_concurrency, settings.search_queue, "searches"),
            encoder=encoder,
            encoder_error=encoder_error,
            switcher=BundleSwitcher(
                settings, catalogue, announcements, histories, metrics, encoder_dim, bundle, announcement, known
            ),
            shadow=Shadow(settings, catalogue, encoder_dim, metrics),
            experiments=Experiments(client, settings, catalogue, metrics),
        )
        batcher.start()
        if settings.warmup:
            await asyncio.to_thread(warmup, catalogue.current, settings.max_batch_size, metrics)
        try:
            await replicator.replay()  # ready from here on
        except RedisError as exc:
            log.warning("Redis unreachable at start-up (%s): unready until it answers", type(exc).__name__)
        except IncompatibleItem as exc:
            await state.close()
            raise StartupRefused(replicator.incompatible(exc)) from exc
        metrics.live_items.set(catalogue.current.live_count)
        replicator.start()
        state.switcher.start()
        if embedded is not None:
            state.supervisor = Supervisor(embedded)
            state._supervising = asyncio.get_running_loop().create_task(state._supervise(), name="embedded-redis")
        state.gc_watch = GcWatch(metrics.gc_seconds)
        state.gc_watch.install()
        if settings.gc_freeze:  # the start-up heap leaves the collector's walks (service.gc_pauses)
            log.info("gc: %d start-up objects frozen", await asyncio.to_thread(freeze))
        log.info("replica %s started", state.replica_id)
        return state

    @staticmethod
    async def _bundle_to_serve(
        settings: Settings, announcements: AnnouncementStore
    ) -> tuple[Path, Announcement | None, bool]:
        """(bundle, announcement, whether Redis answered): the announced bundle when there is one, else
        MISSREC_BUNDLE (also when Redis is down: the replica stays unready until it has read the announcement)."""
        try:
            announcement = await announcements.announced_bundle()
        except RedisError as exc:
            log.warning("Redis unreachable at start-up (%s): the announced bundle is read later", type(exc).__name__)
            return settings.bundle, None, False
        if announcement is None:
            return settings.bundle, None, True
        root = settings.swap_root()
        if not inside_root(root, Path(announcement.bundle).resolve()):
            raise StartupRefused(
                f"the announced bundle {announcement.bundle} is outside this replica's bundle root {root} "
                "(MISSREC_BUNDLE_ROOT)" + ANNOUNCED_HINT
            )
        log.info("serving the announced bundle %s (generation %d)", announcement.bundle, announcement.generation)
        return Path(announcement.bundle), announcement, True

    async def _supervise(self) -> None:
        """Restart the embedded Redis when it dies (same AOF: nothing acknowledged is lost)."""
        while not self._closing:
            await asyncio.to_thread(self.supervisor.check)
            await asyncio.sleep(SUPERVISE_EVERY_S)

    def alive(self) -> tuple[bool, str]:
        """Liveness: False when the embedded Redis has stayed down too long for restarts to fix it."""
        down = self.supervisor.down_for() if self.supervisor else 0.0
        if down > EMBEDDED_DOWN_UNHEALTHY_S:
            return False, f"embedded Redis down for {down:.0f} s and not restartable"
        return True, "ok"

    async def close(self) -> None:
        self._closing = True
        if self.gc_watch is not None:
            self.gc_watch.remove()
            if self.settings.gc_freeze:
                gc.unfreeze()  # what this process keeps after the service is collectable again (tests, reloads)
        if self._supervising:
            await stop_task(self._supervising)
        await self.switcher.stop()
        await self.shadow.stop()
        self.experiments.close()
        await self.replicator.stop()
        await self.batcher.stop()
        self.executor.shutdown(wait=True, cancel_futures=True)
        await self.redis.aclose()
        if self.embedded:
            await asyncio.to_thread(self.embedded.stop)


def load_clip_encoder(settings: Settings, expected_dim: int) -> tuple[ItemEncoder | None, str | None]:
    """The open_clip (torch) encoder for ingestion when no ONNX one is configured (never on the recommend path),
    or (None, why ingestion is off): ingestion is optional, the service serves recommendations anyway."""
    s = settings
    if not s.clip_pretrained:
        return None, "ingestion disabled: MISSREC_CLIP_PRETRAINED is not set"
    try:
        from clip_features.torch_encoder import ClipEncoder

        encoder = ClipEncoder(s.clip_model, s.clip_pretrained)
        import torch

        torch.set_num_threads(s.ingest_threads)  # an encode must not take every core from the recommend path
        if encoder.dim != expected_dim:
            raise ValueError(f"CLIP {s.clip_model} gives {encoder.dim}-d features, the bundle expects {expected_dim}")
    except Exception as exc:  # say why in /readyz
        error = f"ingestion unavailable: {exc}"
        log.warning(error)
        return None, error
    return encoder, None


def load_onnx_encoder(settings: Settings, expected_dim: int) -> ItemEncoder:
    """The CLIP ONNX encoder of ``MISSREC_CLIP_ONNX``, or :class:`StartupRefused` saying why it cannot be used.

    ``clip_model`` and ``clip_pretrained`` have defaults (ViT-B-32, openai); only values set explicitly are checked,
    and they must name the exported model and weights (the tag, or a checkpoint file with the manifest's sha256)."""
    from clip_features.onnx_encoder import ClipOnnxError, OnnxClipEncoder

    s = settings
    try:
        encoder = OnnxClipEncoder(s.clip_onnx, threads=s.ingest_threads)
    except ClipOnnxError as exc:
        raise StartupRefused(f"MISSREC_CLIP_ONNX: {exc}") from exc
    m = encoder.manifest
    if m.dim != expected_dim:
        raise StartupRefused(
            f"MISSREC_CLIP_ONNX={s.clip_onnx}: {m.model_name} gives {m.dim}-d features, the bundle takes {expected_dim}"
        )
    explicit = s.model_fields_set
    if "clip_model" in explicit and s.clip_model != m.model_name:
        raise StartupRefused(f"MISSREC_CLIP_MODEL={s.clip_model} contradicts MISSREC_CLIP_ONNX ({m.model_name})")
    if "clip_pretrained" in explicit:
        weights = s.clip_pretrained
        if not weights:
            raise StartupRefused("MISSREC_CLIP_PRETRAINED is unset (ingestion off) but MISSREC_CLIP_ONNX is set")
        if not m.made_from(weights):
            raise StartupRefused(
                f"MISSREC_CLIP_PRETRAINED={weights} is not the weights MISSREC_CLIP_ONNX was exported from "
                f"({m.pretrained}{', sha256 ' + m.checkpoint_sha256[:12] if m.checkpoint_sha256 else ''}); "
                "unset one of them"
            )
    return encoder
