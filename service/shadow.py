"""Shadow mode: a candidate bundle scored beside the serving one on a fraction of recommend requests.

``PUT /v1/admin/shadow {"bundle": DIR, "fraction": 0.1}`` (or ``missrec shadow``) loads DIR on this replica in the
background (inside MISSREC_BUNDLE_ROOT, the same checks as a swap), with its own catalogue that follows every item
change the serving catalogue applies (ingests are embedded by the candidate's item tower from their stored raw
features). From then on each recommend request is, with probability ``fraction``, scored again after its answer is
sent: the same history and exclusions through the candidate (user tower + top-k over its index and catalogue) and,
side by side in the same worker thread, through the serving model, so the two latencies are comparable. Clients
only ever see the serving bundle's answer; the shadow never delays one (at most one shadow scoring runs at a time,
others are dropped and counted).

Metrics: ``shadow_requests_total{result}`` (scored, dropped, failed), ``shadow_overlap`` (histogram of overlap@k:
|served top-k & candidate top-k| / k), ``shadow_seconds{model}`` (serving, candidate: user tower + search of one
request). ``GET /v1/admin/shadow`` shows the state and running means; ``DELETE`` stops it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from service.bundle_root import resolve_bundle
from service.catalogue import Catalogue, Snapshot
from service.metrics import Metrics
from service.recommender import Query, Recommendation, serve
from service.serving_model import ServingModel
from service.settings import Settings
from serving_core.bundle import BundleError

log = logging.getLogger(__name__)

State = Literal["off", "loading", "active", "failed"]


def search_one(snap: Snapshot, history: list[str], exclude: list[str], k: int) -> list[str]:
    """The top-k item ids ``snap`` serves for an external-id history (deleted ids skipped) and exclusions."""
    rows, _ = snap.rows_for(history)
    if not rows:
        return []
    banned, _ = snap.rows_for(exclude)
    (served,) = serve(snap, [np.asarray(rows, dtype=np.int64)], [k], [set(banned)])
    return [snap.ids[int(r)] for r in served.rows]


class Shadow:
    """This replica's shadow candidate (one at a time), beside the serving ``catalogue``."""

    def __init__(
        self,
        settings: Settings,
        catalogue: Catalogue,
        encoder_dim: int | None,  # the ingestion encoder's feature width (None: ingestion disabled)
        metrics: Metrics,
        rng: random.Random | None = None,
    ) -> None:
        self.settings, self.serving, self.encoder_dim, self.metrics = settings, catalogue, encoder_dim, metrics
        self.rng = rng or random.Random()
        self.state: State = "off"
        self.bundle: str | None = None
        self.version: str | None = None
        self.fraction = 0.0
        self.error: str | None = None
        self.catalogue: Catalogue | None = None
        self.scored = 0
        self.overlap_sum = 0.0
        self.seconds_sum = {"serving": 0.0, "candidate": 0.0}
        self._busy = threading.Lock()  # one shadow scoring at a time
        self._generation = 0  # bumps on every start/stop: a load that finishes late for an old one is dropped
        self._loader: asyncio.Task[None] | None = None

    # ----- control -------------------------------------------------------------------------------------------
    async def start(self, given: str, fraction: float) -> dict[str, Any]:
        """Check the path (4xx before anything is read), then load it in the background; returns the status."""
        path = resolve_bundle(self.settings.swap_root(), given)
        await self.stop()
        self._generation += 1
        self.state, self.bundle, self.version, self.fraction, self.error = "loading", str(path), None, fraction, None
        self.scored, self.overlap_sum, self.seconds_sum = 0, 0.0, {"serving": 0.0, "candidate": 0.0}
        generation = self._generation
        self._loader = asyncio.get_running_loop().create_task(self._load(path, generation), name="shadow-load")
        return self.status()

    async def _load(self, path: Path, generation: int) -> None:
        """Load ``path`` and follow the serving catalogue with it. Stopped or replaced meanwhile (``stop`` cancels
        this task): each step in a thread runs to its end, but nothing after it, and a candidate already
        following is unfollowed, so a cancelled load holds nothing and follows no item change."""
        try:
            model = await asyncio.to_thread(ServingModel.load, path, self.settings)
            records = list(self.serving.current.ingested.values())
            if problem := await asyncio.to_thread(model.swap_problem, self.encoder_dim, records):
                raise BundleError(f"cannot shadow the stored items: {problem}")
            candidate = Catalogue(model)
            # every item change from here on, too; shielded: a cancel must not leave a follower behind
            following = asyncio.ensure_future(asyncio.to_thread(self.serving.follow, candidate))
            try:
                await asyncio.shield(following)
            except asyncio.CancelledError:
                following.add_done_callback(lambda _: self.serving.unfollow(candidate))
                raise
        except Exception as exc:  # the serving bundle is untouched whatever happens here
            if generation == self._generation:
                self.state, self.error = "failed", f"shadow bundle {path}: {type(exc).__name__}: {exc}"
                log.error("%s", self.error)
            return
        if generation != self._generation:  # stopped or replaced while loading
            self.serving.unfollow(candidate)
            return
        self.catalogue, self.version, self.state = candidate, model.version, "active"
        self.metrics.shadow_active.set(1)
        log.info("shadowing %s (%s) on %.0f%% of recommendations", path, model.version, 100 * self.fraction)

    async def stop(self) -> None:
        self._generation += 1
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        if self.catalogue is not None:
            self.serving.unfollow(self.catalogue)
        self.catalogue, self.state, self.error = None, "off", None
        self.metrics.shadow_active.set(0)

    def status(self) -> dict[str, Any]:
        n = self.scored
        return {
            "state": self.state,
            "bundle": self.bundle if self.state != "off" else None,
            "version": self.version if self.state != "off" else None,
            "fraction": self.fraction if self.state != "off" else 0.0,
            "scored": n,
            "mean_overlap": self.overlap_sum / n if n else None,
            "mean_seconds": {m: s / n for m, s in self.seconds_sum.items()} if n else None,
            "error": self.error,
        }

    # ----- per request ---------------------------------------------------------------------------------------
    def observe(self, query: Query, served: Recommendation) -> None:
        """Maybe score ``query`` with the candidate too, after the answer is sent (never blocks the caller)."""
        candidate = self.catalogue
        if candidate is None or served.fallback or query.snapshot is None or self.rng.random() >= self.fraction:
            return
        if not self._busy.acquire(blocking=False):
            self.metrics.shadow_requests.labels("dropped").inc()
            return
        snap = query.snapshot
        history = [snap.ids[int(r)] for r in query.history]
        exclude = [snap.ids[int(r)] for r in query.exclude]
        task = asyncio.get_running_loop().run_in_executor(
            None, self._score, snap, candidate.current, history, exclude, query.k
        )
        task.add_done_callback(lambda _: self._busy.release())

    def _score(self, serving: Snapshot, candidate: Snapshot, history: list[str], exclude: list[str], k: int) -> None:
        """Both models on one request, one after the other in this worker thread (comparable latencies); the
        serving side is run again rather than taken from the answer, which was part of a micro-batch."""
        try:
            started = time.perf_counter()
            again = search_one(serving, history, exclude, k)
            middle = time.perf_counter()
            theirs = search_one(candidate, history, exclude, k)
            ended = time.perf_counter()
        except Exception:
            log.exception("shadow scoring failed")
            self.metrics.shadow_requests.labels("failed").inc()
            return
        overlap = len(set(again) & set(theirs)) / max(k, 1)
        self.metrics.shadow_overlap.observe(overlap)
        self.metrics.shadow_seconds.labels("serving").observe(middle - started)
        self.metrics.shadow_seconds.labels("candidate").observe(ended - middle)
        self.metrics.shadow_requests.labels("scored").inc()
        self.scored += 1
        self.overlap_sum += overlap
        self.seconds_sum["serving"] += middle - started
        self.seconds_sum["candidate"] += ended - middle
