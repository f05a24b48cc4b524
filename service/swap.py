"""Zero-downtime swaps of the serving bundle, on every replica (POST /v1/admin/bundle, ``missrec swap``).

An announcement (``service.store``: the ``P:{bundle}:current`` key, a generation counter and a stream event, in one
script) names the bundle every replica serves. Each replica follows the key, never its own idea of it: the key
always holds the last announcement (the generation counter orders them), so concurrent swaps end with every
replica on the one announced last, and a replica that starts later loads the announced bundle, not MISSREC_BUNDLE.
Stream events only wake the replicas; the key is re-read every second anyway.

A replica loads the announced bundle in a worker thread (checksums, shapes, towers, index), checks that it can take
over (the ingestion encoder's width, the raw features of every live ingested item), warms it up, re-embeds the live
ingested items with its item tower from their stored raw features, then switches the catalogue in one publish
(:meth:`~service.catalogue.Catalogue.switch`, under the writers' lock, so an item ingested or deleted during the
load is carried over). Requests in flight finish on the snapshot they started with. A load that finishes after a
newer announcement is dropped. A bundle that fails any check is refused (``failed``, with the reason) and the old
one keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from redis.exceptions import RedisError

from service.bundle_root import inside_root
from service.catalogue import Catalogue
from service.metrics import Metrics
from service.recommender import warmup
from service.replication import stop_task
from service.serving_model import ServingModel
from service.settings import Settings
from service.store import Announcement, AnnouncementStore, HistoryStore

log = logging.getLogger(__name__)

WATCH_BLOCK_MS = 1000  # how long a replica waits on the announcement stream before re-reading the key anyway

Phase = Literal["active", "loading", "failed"]


class SwapRefused(ValueError):
    """A bundle this replica must not switch to (outside the bundle root, changed since it was announced, or
    unable to serve the stored items)."""


@dataclass(frozen=True)
class Active:
    """What a replica serves: the bundle directory, its version and the announcement it follows (None: the
    MISSREC_BUNDLE it started with, nothing announced)."""

    bundle: str
    version: str
    announcement: Announcement | None
    since: float


class BundleSwitcher:
    """Follows the announced bundle on one replica (a task), loading and switching in the background."""

    def __init__(
        self,
        settings: Settings,
        catalogue: Catalogue,
        announcements: AnnouncementStore,
        histories: HistoryStore,  # capped at the serving model's max_len: a switch updates it
        metrics: Metrics,
        encoder_dim: int | None,  # the ingestion encoder's feature width (None: ingestion disabled)
        bundle: Path,
        announcement: Announcement | None,
        known: bool,
    ) -> None:
        self.settings, self.catalogue, self.metrics = settings, catalogue, metrics
        self.announcements, self.histories = announcements, histories
        self.encoder_dim = encoder_dim
        version = catalogue.current.model.version
        self.active = Active(str(bundle), version, announcement, time.time())
        self.announced = announcement  # the latest announcement read from Redis
        self.loading: Announcement | None = None
        self.failed: Announcement | None = None
        self.error: str | None = None
        self.last_swap_seconds: float | None = None
        self.settled = known  # False until the announcement has been read once (Redis was down at start-up)
        self._handled = announcement  # the announcement the loader last acted on
        self.preloaded: ServingModel | None = None  # loaded (and checked) by this replica's POST: used once
        self._seen_at = time.monotonic()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._loader: asyncio.Task[None] | None = None
        metrics.bundle_info.labels(version).set(1)
        metrics.bundle_generation.set(announcement.generation if announcement else 0)

    @property
    def phase(self) -> Phase:
        if self.loading is not None:
            return "loading"
        return "failed" if self.failed is not None and self.failed == self.announced else "active"

    # ----- following the key -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="bundle-watch")

    async def stop(self) -> None:
        self._closing = True
        for task in (self._task, self._loader):
            if task is not None:
                await stop_task(task)

    async def _watch(self) -> None:
        position: str | None = None
        while not self._closing:
            try:
                if position is None:
                    position = await self.announcements.last_bundle_event()
                self.observe(await self.announcements.announced_bundle())
                position = await self.announcements.wait_bundle_event(position, WATCH_BLOCK_MS)
            except asyncio.CancelledError:
                raise
            except RedisError as exc:
                self.metrics.redis_errors.inc()
                log.debug("bundle watch: %s", exc)
                await asyncio.sleep(0.2)
            except Exception:
                log.exception("bundle watch failed")
                await asyncio.sleep(0.2)

    def observe(self, announcement: Announcement | None) -> None:
        """The announcement Redis holds now; a different one than last time starts (or redirects) the loader."""
        if announcement is None:  # nothing announced (or the key was lost): keep serving what we serve
            self.settled = True
            return
        if announcement == self.announced and self._handled == announcement:
            return
        if announcement != self.announced:
            self.announced, self._seen_at = announcement, time.monotonic()
            log.info("bundle announced: %s (generation %d)", announcement.bundle, announcement.generation)
        if self._loader is None or self._loader.done():
            self._loader = asyncio.get_running_loop().create_task(self._follow(), name="bundle-load")

    # ----- loading and switching ------------------------------------------------------------------------------
    async def _follow(self) -> None:
        """Load the announced bundle until what this replica serves is the latest announcement (or it failed)."""
        while self.announced is not None and self.announced != self._handled and not self._closing:
            target, seen_at = self.announced, self._seen_at
            self._handled = target
            if target.version == self.active.version:  # already served (e.g. announced again from elsewhere)
                self._serving(target, None, seen_at, "unchanged")
                continue
            self.loading = target
            self.metrics.bundle_loading.set(1)
            try:
                model, prepared = await asyncio.to_thread(self._prepare, target)
                if self.announced != target:  # a newer announcement came meanwhile: never switch to a stale one
                    self.metrics.bundle_swaps.labels("superseded").inc()
                    log.info(
                        "dropping bundle %s: superseded by generation %d", target.bundle, self.announced.generation
                    )
                    continue
                await asyncio.to_thread(self._switch, model, prepared)
                self._serving(target, model, seen_at, "switched")
            except Exception as exc:  # anything: the old bundle keeps serving, the reason is shown
                self.failed, self.error = target, f"bundle {target.bundle} (generation {target.generation}): {exc}"
                self.metrics.bundle_swaps.labels("failed").inc()
                log.error("refusing to swap: %s; still serving %s", self.error, self.active.version)
            finally:
                self.loading = None
                self.metrics.bundle_loading.set(0)

    def _prepare(self, target: Announcement) -> tuple[ServingModel, dict[tuple[str, int], dict[str, np.ndarray]]]:
        """Load, check and warm up the announced bundle, and re-embed the live ingested items (worker thread)."""
        root = self.settings.swap_root()
        path = Path(target.bundle).resolve()
        if not inside_root(root, path):
            raise SwapRefused(f"{path} is outside this replica's bundle root {root} (MISSREC_BUNDLE_ROOT)")
        model, self.preloaded = self.preloaded, None
        if model is None or model.bundle.root != path or model.version != target.version:
            model = ServingModel.load(path, self.settings)
        if model.version != target.version:
            raise SwapRefused(f"the bundle there is {model.version}, announced as {target.version} (changed since?)")
        records = list(self.catalogue.current.ingested.values())
        if problem := model.swap_problem(self.encoder_dim, records):
            raise SwapRefused(problem)
        if self.settings.warmup:
            warmup(Catalogue(model).current, self.settings.max_batch_size, self.metrics)
        vectors = model.vectors_of_many(records)
        return model, {(r.item_id, r.version): v for r, v in zip(records, vectors, strict=True)}

    def _switch(self, model: ServingModel, prepared: dict[tuple[str, int], dict[str, np.ndarray]]) -> None:
        snap = self.catalogue.switch(model, prepared)
        self.histories.max_len = model.max_len  # histories are capped at what the serving model reads
        self.metrics.bundle_reembedded.inc(sum(r.bundle_version != model.version for r in snap.ingested.values()))
        self.metrics.live_items.set(snap.live_count)

    def _serving(self, target: Announcement, model: ServingModel | None, seen_at: float, result: str) -> None:
        old = self.active.version
        self.active = Active(target.bundle, target.version, target, time.time())
        self.failed, self.error, self.settled = None, None, True
        self.metrics.bundle_swaps.labels(result).inc()
        self.metrics.bundle_generation.set(target.generation)
        if model is not None:
            self.last_swap_seconds = time.monotonic() - seen_at
            self.metrics.bundle_swap_seconds.observe(self.last_swap_seconds)
            self.metrics.bundle_info.labels(old).set(0)
            self.metrics.bundle_info.labels(target.version).set(1)
            log.info("serving bundle %s (%s, generation %d)", target.bundle, target.version, target.generation)

    # ----- status -------------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        def described(a: Announcement | None) -> dict[str, Any] | None:
            return None if a is None else {"generation": a.generation, "bundle": a.bundle, "version": a.version,
                                           "at": a.at, "by": a.by}  # fmt: skip

        active = self.active
        return {
            "state": self.phase,
            "active": {
                "bundle": active.bundle,
                "version": active.version,
                "generation": active.announcement.generation if active.announcement else 0,
                "since": active.since,
            },
            "announced": described(self.announced),
            "loading": described(self.loading),
            "error": self.error if self.phase == "failed" else None,
            "last_swap_seconds": self.last_swap_seconds,
        }
