"""Replication of item changes: replay every stored change at start-up, then follow the item-event stream.

Every replica applies the same Redis-stored changes in version order, so all of them converge on the same live
catalogue within a second of a write. Redis down at start-up: the service starts unready and replays as soon as
Redis answers (then turns ready by itself: no restart loop).

Redis losing item state (FLUSHDB, a restart without AOF, a failover to a lagging replica, a restored snapshot):
replicas apply an item change only if its version is above the one they hold, so the version counter going back
would silently drop acknowledged writes. Every change carries the counter's epoch (``service.store``); a replica
that sees another epoch (in a write's answer, an event, or a check every second) or an event version not above
the last one turns unready, resets its catalogue to the bundle and replays Redis, then turns ready again. A write
that detects it answers only after that rebuild, so what it acknowledged is served.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.exceptions import RedisError

from service.catalogue import Catalogue
from service.metrics import Metrics
from service.serving_model import IncompatibleItem
from service.store import ItemChange, ItemRecord, ItemStore

log = logging.getLogger(__name__)

STREAM_BLOCK_MS = 200
EPOCH_CHECK_S = 1.0  # how often a replica checks that Redis still holds its item state (FLUSHDB with no writes)


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

    def __init__(self, items: ItemStore, catalogue: Catalogue, metrics: Metrics, key_prefix: str, origin: str) -> None:
        self.items, self.catalogue, self.metrics, self.key_prefix = items, catalogue, metrics, key_prefix
        self.origin = origin  # this replica's id, written with its changes
        self.ready = False
        self.stream_healthy = False
        self.error: str | None = None  # why this replica refuses to serve (found after start-up)
        self.epoch = ""  # the item-version counter's epoch this replica's state comes from
        self._stream_version = 0  # version of the last item event read (or the counter at replay)
        self._replays = 0  # replays done: a stream position read before one is stale after it
        self._last_event = "0-0"
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._rebuild: asyncio.Task[None] | None = None

    async def replay(self) -> None:
        """Bring the catalogue up to date with Redis (every ingested item and deletion), then turn ready."""
        snap = await self.items.snapshot()
        self.epoch, self._stream_version, self._last_event = snap.epoch, snap.counter, snap.last_event
        self._replays += 1
        records = await self.items.all_items()
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
        checked = time.monotonic()
        while not self._closing:
            try:
                replays = self._replays
                events = await self.items.read_events(self._last_event, STREAM_BLOCK_MS)
                self.stream_healthy = True
                for event_id, fields in events:
                    if self._replays != replays:
                        break  # rebuilt from Redis meanwhile (by a write): these events are from before
                    self._last_event = event_id
                    if not await self._apply_event(fields):
                        break  # rebuilt from Redis: the stream position was reset
                if time.monotonic() - checked >= EPOCH_CHECK_S:
                    checked = time.monotonic()
                    if (epoch := await self.items.epoch()) != self.epoch:
                        await self.rebuild(f"item epoch is {epoch or 'missing'}, was {self.epoch}")
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

    async def _apply_event(self, fields: dict[str, str]) -> bool:
        """Apply one item event; False when it showed that Redis lost item state (and the replica was rebuilt)."""
        item_id, version = fields.get("item_id", ""), int(fields.get("version", 0))
        epoch = fields.get("epoch")  # absent in events written before epochs existed
        if (epoch is not None and epoch != self.epoch) or version <= self._stream_version:
            await self.rebuild(f"item event version {version} of epoch {epoch}, after {self._stream_version}")
            return False
        self._stream_version = version
        if not self.catalogue.is_newer(item_id, version):
            return True  # our own change, or already replayed
        record = await self.items.get_item(item_id)
        if record is not None and record.version >= version:
            applied = await asyncio.to_thread(self.catalogue.apply, [record])
            if applied:
                self.metrics.item_events.labels(fields.get("op", "upsert"), "stream").inc()
                self.metrics.live_items.set(self.catalogue.current.live_count)
        return True

    async def rebuild(self, reason: str) -> None:
        """Redis lost item state: unready, the catalogue back to the bundle, replay Redis, ready (one at a time)."""
        if self._rebuild is None or self._rebuild.done():
            log.warning("Redis lost item state (%s): unready until rebuilt from the bundle and Redis", reason)
            self.ready = False
            self._rebuild = asyncio.get_running_loop().create_task(self._rebuild_catalogue(), name="rebuild")
        await asyncio.shield(self._rebuild)

    async def _rebuild_catalogue(self) -> None:
        await asyncio.to_thread(self.catalogue.reset)
        while not self._closing:
            try:
                await self.replay()
                return
            except RedisError as exc:
                self.metrics.redis_errors.inc()
                log.debug("rebuild: %s", exc)
                await asyncio.sleep(0.2)
            except IncompatibleItem as exc:
                self.error = self.incompatible(exc)
                log.error("refusing to serve: %s", self.error)
                return

    async def store_change(self, record: ItemRecord, op: str) -> ItemChange:
        """Persist an item change, then apply it here; if Redis answered with another epoch or a version not
        above one already seen (its counter went back), rebuild first, so the acknowledged change is served.
        RedisError propagates (the caller answers 503)."""
        floor, epoch = self._stream_version, self.epoch  # every version issued from here on is above floor
        change = await self.items.put_item(record, origin=self.origin, op=op)
        if change.epoch != epoch or change.version <= floor:
            await self.rebuild(f"{op} of {record.item_id!r} got version {change.version} of epoch {change.epoch}")
        else:
            await asyncio.to_thread(self.catalogue.apply, [record])
        self.metrics.live_items.set(self.catalogue.current.live_count)
        return change
