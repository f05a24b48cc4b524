"""Replication of item changes: replay every stored change at start-up, then follow the item-event stream.

Every replica applies the same Redis-stored changes in version order, so all of them converge on the same live
catalogue within a second of a write. Redis down at start-up: the service starts unready and replays as soon as
Redis answers (then turns ready by itself: no restart loop).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.exceptions import RedisError

from service.catalogue import Catalogue
from service.metrics import Metrics
from service.serving_model import IncompatibleItem
from service.store import Store

log = logging.getLogger(__name__)

STREAM_BLOCK_MS = 200


class StartupRefused(RuntimeError):
    """The service must not start: an invalid bundle, or items stored in Redis that this bundle cannot serve."""


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


class Replicator:
    """Keeps one replica's catalogue equal to what Redis stores. ``ready`` once the first replay is done."""

    def __init__(self, store: Store, catalogue: Catalogue, metrics: Metrics, key_prefix: str) -> None:
        self.store, self.catalogue, self.metrics, self.key_prefix = store, catalogue, metrics, key_prefix
        self.ready = False
        self.stream_healthy = False
        self.error: str | None = None  # why this replica refuses to serve (found after start-up)
        self._last_event = "0-0"
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    async def replay(self) -> None:
        """Bring the catalogue up to date with Redis (every ingested item and deletion), then turn ready."""
        self._last_event = await self.store.last_event_id()
        records = await self.store.all_items()
        applied = await asyncio.to_thread(self.catalogue.apply, records)
        log.info("replayed %d item changes from Redis (%d applied)", len(records), applied)
        self.ready = True
        snap = self.catalogue.current
        self.metrics.live_items.set(snap.live_count)
        log.info("ready: bundle %s, %d live items", snap.model.version, snap.live_count)

    def incompatible(self, exc: IncompatibleItem) -> str:
        return (
            f"{exc}; bundle {self.catalogue.current.model.version} cannot serve the items stored under key prefix "
            f"{self.key_prefix!r} (serve the bundle that wrote them, use another key prefix, or delete that item's key)"
        )

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="item-stream")

    async def stop(self) -> None:
        self.ready, self._closing = False, True
        if self._task is not None:
            await stop_task(self._task)

    async def _run(self) -> None:
        """Replay first if start-up could not (retrying while Redis is down), then follow the item stream."""
        while not self.ready and not self._closing:
            try:
                await self.replay()
            except RedisError as exc:
                self.metrics.redis_errors.inc()
                log.debug("replay: %s", exc)
                await asyncio.sleep(0.2)
            except IncompatibleItem as exc:  # found only now because Redis was down at start-up: stay unready
                self.error = self.incompatible(exc)
                log.error("refusing to serve: %s", self.error)
                return
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
        if not self.catalogue.is_newer(item_id, version):
            return  # our own change, or already replayed
        record = await self.store.get_item(item_id)
        if record is not None and record.version >= version:
            applied = await asyncio.to_thread(self.catalogue.apply, [record])
            if applied:
                self.metrics.item_events.labels(fields.get("op", "upsert"), "stream").inc()
                self.metrics.live_items.set(self.catalogue.current.live_count)
