"""Ingested and deleted items, and the item-event stream every replica follows (:mod:`service.replication`).

Keys (``P`` = key prefix; one hash tag, so every script runs in one cluster slot): ``P:{items}:item:<id>``,
``P:{items}:ids``, ``P:{items}:version``, ``P:{items}:epoch`` and ``P:{items}:events`` (see :mod:`service.store`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

# KEYS: item hash, ids zset, version counter, stream, epoch.
# ARGV: item_id, op, origin, stream maxlen, a fresh epoch (used if none is stored), field/value pairs...
# Returns {version, epoch, the item's previous 'deleted' field ('' when it had no record)}.
_CHANGE_ITEM = """
redis.call('SET', KEYS[5], ARGV[5], 'NX')
local epoch = redis.call('GET', KEYS[5])
local version = redis.call('INCR', KEYS[3])
local previous = redis.call('HGET', KEYS[1], 'deleted') or ''
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'version', version, unpack(ARGV, 6))
redis.call('ZADD', KEYS[2], version, ARGV[1])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*',
           'op', ARGV[2], 'item_id', ARGV[1], 'version', version, 'epoch', epoch, 'origin', ARGV[3])
return {version, epoch, previous}
"""


# KEYS: epoch, version counter, stream. ARGV: a fresh epoch. Returns {epoch, counter, last event id or ''}:
# read together, so every event after that id has a version above that counter, in that epoch.
_SNAPSHOT = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
return {redis.call('GET', KEYS[1]), tonumber(redis.call('GET', KEYS[2]) or '0'), last[1] and last[1][1] or ''}
"""


def new_epoch() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class ItemChange:
    """What Redis answered to an item change: its version, the counter's epoch, and whether the item had a
    live record before (``None``: no record at all, e.g. a bundle item never changed)."""

    version: int
    epoch: str
    had_live_record: bool | None


@dataclass(frozen=True)
class ItemsSnapshot:
    """Where the item state in Redis stands: epoch, version counter, and the last event id of the stream."""

    epoch: str
    counter: int
    last_event: str


@dataclass
class ItemRecord:
    """An ingested item (``deleted`` False), a deletion tombstone, or (``patch``) the attributes and availability
    of a bundle item (no vectors: the bundle has them), as stored in Redis. Attributes are checked at the edge."""

    item_id: str
    version: int = 0
    deleted: bool = False
    text: str = ""
    created_at: float = 0.0
    bundle_version: str = ""
    arrays: dict[str, bytes] = field(default_factory=dict)  # raw float32/int64 bytes by name
    ints: dict[str, int] = field(default_factory=dict)
    thumbnail: bytes = b""  # a small JPEG of the ingested image (b"": none), shown by the console
    attributes: dict[str, Any] = field(default_factory=dict)
    available: bool = True
    patch: bool = False  # written by an attribute/availability change (PATCH): an ingested item's vectors kept

    @property
    def bundle_patch(self) -> bool:
        """The attributes and availability of a bundle item (no vectors: the bundle row keeps serving)."""
        return self.patch and not self.arrays

    def same_embedding(self, other: ItemRecord) -> bool:
        """True when ``other`` carries the vectors of this record (an attribute or availability change)."""
        return (self.arrays, self.ints, self.text, self.bundle_version) == (
            other.arrays,
            other.ints,
            other.text,
            other.bundle_version,
        )

    def to_fields(self) -> list[Any]:
        out: list[Any] = [
            "deleted",
            int(self.deleted),
            "text",
            self.text,
            "created_at",
            repr(self.created_at),
            "bundle_version",
            self.bundle_version,
        ]
        if self.attributes:
            out += ["attributes", json.dumps(self.attributes, sort_keys=True)]
        if not self.available:
            out += ["available", 0]
        if self.patch:
            out += ["patch", 1]
        if self.thumbnail:
            out += ["thumbnail", self.thumbnail]
        for name, raw in self.arrays.items():
            out += [f"a:{name}", raw]
        for name, value in self.ints.items():
            out += [f"i:{name}", value]
        return out

    @classmethod
    def from_hash(cls, item_id: str, data: dict[bytes, bytes]) -> ItemRecord:
        rec = cls(item_id=item_id)
        for raw_key, value in data.items():
            key = raw_key.decode()
            if key == "version":
                rec.version = int(value)
            elif key == "deleted":
                rec.deleted = value == b"1"
            elif key == "text":
                rec.text = value.decode()
            elif key == "created_at":
                rec.created_at = float(value)
            elif key == "bundle_version":
                rec.bundle_version = value.decode()
            elif key == "thumbnail":
                rec.thumbnail = value
            elif key == "attributes":
                rec.attributes = json.loads(value)
            elif key == "available":
                rec.available = value != b"0"
            elif key == "patch":
                rec.patch = value == b"1"
            elif key.startswith("a:"):
                rec.arrays[key[2:]] = value
            elif key.startswith("i:"):
                rec.ints[key[2:]] = int(value)
        return rec


class ItemStore:
    """Item changes in Redis: each one a hash, its version in the id index and an event on the stream, atomically."""

    def __init__(self, redis: Redis, prefix: str = "missrec", stream_max_len: int = 100_000) -> None:
        self.redis = redis
        self.stream_max_len = stream_max_len
        self._change = redis.register_script(_CHANGE_ITEM)
        self._snapshot = redis.register_script(_SNAPSHOT)
        items = f"{prefix}:{{items}}"
        self.ids_key, self.version_key, self.stream_key = f"{items}:ids", f"{items}:version", f"{items}:events"
        self.epoch_key = f"{items}:epoch"
        self.item_prefix = f"{items}:item:"

    async def put_item(self, record: ItemRecord, origin: str, op: str = "upsert") -> ItemChange:
        """Store an item change atomically (hash + id index + stream event); sets ``record.version``."""
        version, epoch, previous = await self._change(
            keys=[self.item_prefix + record.item_id, self.ids_key, self.version_key, self.stream_key, self.epoch_key],
            args=[record.item_id, op, origin, self.stream_max_len, new_epoch(), *record.to_fields()],
        )
        record.version = int(version)
        had = None if previous in (b"", "") else previous in (b"0", "0")
        return ItemChange(record.version, epoch.decode() if isinstance(epoch, bytes) else str(epoch), had)

    async def snapshot(self) -> ItemsSnapshot:
        """The epoch (created if Redis has none), the version counter and the last event id, atomically."""
        epoch, counter, last = await self._snapshot(
            keys=[self.epoch_key, self.version_key, self.stream_key], args=[new_epoch()]
        )
        text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
        return ItemsSnapshot(text(epoch), int(counter), text(last) or "0-0")

    async def epoch(self) -> str | None:
        raw = await self.redis.get(self.epoch_key)
        return raw.decode() if raw is not None else None

    async def get_item(self, item_id: str) -> ItemRecord | None:
        data = await self.redis.hgetall(self.item_prefix + item_id)
        return ItemRecord.from_hash(item_id, data) if data else None

    async def all_items(self, batch: int = 500) -> list[ItemRecord]:
        """Every stored item change (latest per id), in version order."""
        ids = [i.decode() for i in await self.redis.zrange(self.ids_key, 0, -1)]
        records = []
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            async with self.redis.pipeline(transaction=False) as pipe:
                for item_id in chunk:
                    pipe.hgetall(self.item_prefix + item_id)
                results = await pipe.execute()
            records += [ItemRecord.from_hash(i, d) for i, d in zip(chunk, results, strict=True) if d]
        return records

    async def last_event_id(self) -> str:
        last = await self.redis.xrevrange(self.stream_key, count=1)
        return last[0][0].decode() if last else "0-0"

    async def read_events(self, after: str, block_ms: int, count: int = 500) -> list[tuple[str, dict[str, str]]]:
        """Item events after ``after`` (waits up to block_ms for the first one)."""
        reply = await self.redis.xread({self.stream_key: after}, count=count, block=block_ms)
        events = []
        for _, entries in reply or []:
            for event_id, fields in entries:
                events.append((event_id.decode(), {k.decode(): v.decode() for k, v in fields.items()}))
        return events
