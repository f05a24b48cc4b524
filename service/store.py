"""Redis persistence: user histories (capped lists), ingested/deleted items, and the item-event stream.

Keys (``P`` = key prefix). Every multi-key operation is one Lua script whose keys share a Redis Cluster slot
through a hash tag, so the service works unchanged against Redis Cluster:

    P:u:{<h>}:hist          list of "<timestamp>\\x1f<item id>" entries, oldest first, capped at max_len
    P:u:{<h>}:id            the user id itself (a snapshot of the deployment reads it; same TTL as the history)
    P:u:{<h>}:idem:<key>    idempotency marker of an events call (24 h)    (<h> = sha1(user id)[:20])
    P:{items}:item:<id>     hash: an ingested item (features, vectors, clusters, text, thumbnail) or a tombstone
    P:{items}:ids           sorted set: item id -> version of its latest change (for replay at start-up)
    P:{items}:version       counter giving every item change a version
    P:{items}:epoch         random id of the counter's lifetime: a Redis that lost the counter (FLUSHDB, a
                            restart without AOF) gets a new one with its next write or replay
    P:{items}:events        stream of item changes (op, item_id, version, epoch, origin) read by every replica
    P:{bundle}:current      JSON: the announced serving bundle (generation, resolved path, version, when, by whom)
    P:{bundle}:generation   counter giving every announcement a generation (the last announced wins)
    P:{bundle}:events       stream of announcements: wakes every replica (the key above is what they follow)

Replicas apply an item change only if its version is above the one they hold, so a counter that goes back
would make acknowledged writes silently not apply: every change carries the epoch, and a replica that sees
another epoch, or a version not above one it has seen in this epoch, rebuilds from Redis (runtime).

Item ids never contain control characters (the API rejects them), so \\x1f is a safe separator.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

SEP = "\x1f"
IDEMPOTENCY_TTL_SECONDS = 24 * 3600


class CoalescedLists:
    """Whole-list reads (LRANGE 0 -1) of concurrent requests sent as one pipeline: the reads issued in one event
    loop iteration (the requests of a burst) share one round trip and one pooled connection; a lone read is a
    plain LRANGE. Nothing waits for batch-mates, so no read is ever delayed. An error reaches the reads it hit."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._pending: list[tuple[str, asyncio.Future[list[bytes]]]] = []
        self._tasks: set[asyncio.Task[None]] = set()  # flushes in flight (a task needs a strong reference)
        self.flushes = 0  # pipelines (or lone reads) sent, and the reads they carried (tests)
        self.reads = 0

    async def read(self, key: str) -> list[bytes]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[bytes]] = loop.create_future()
        self._pending.append((key, fut))
        if len(self._pending) == 1:  # the first read of this iteration schedules the flush for the next one
            loop.call_soon(self._start_flush, loop)
        return await fut

    def _start_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        task = loop.create_task(self._flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self.flushes += 1
        self.reads += len(batch)
        try:
            if len(batch) == 1:
                results: list[Any] = [await self.redis.lrange(batch[0][0], 0, -1)]
            else:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key, _ in batch:
                        pipe.lrange(key, 0, -1)
                    results = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection failed: every read of the batch gets the error
            results = [exc] * len(batch)
        except BaseException:  # cancelled (shutdown): no read may wait forever
            for _, fut in batch:
                fut.cancel()
            raise
        for (_, fut), result in zip(batch, results, strict=True):
            if fut.done():  # the request went away meanwhile
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)


# KEYS: hist, idem, user id (one slot: the user's hash tag; without an idempotency key KEYS[2] is a placeholder of
# that slot, never written). ARGV: max_len, ttl (0 = none), idem ttl (0 = no idempotency key), payload hash, user
# id, entries... Returns {1: applied now | 0: applied before | -1: the key was used for another payload, history
# length}. (A marker of "1" was written before payload hashes were stored: it matches any payload.)
_APPEND = """
if tonumber(ARGV[3]) > 0 then
  if not redis.call('SET', KEYS[2], ARGV[4], 'NX', 'EX', ARGV[3]) then
    local stored = redis.call('GET', KEYS[2])
    local same = (stored == ARGV[4] or stored == '1') and 0 or -1
    return {same, redis.call('LLEN', KEYS[1])}
  end
end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 6))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
redis.call('SET', KEYS[3], ARGV[5])
if tonumber(ARGV[2]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
return {1, redis.call('LLEN', KEYS[1])}
"""

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


def user_tag(user_id: str) -> str:
    """The hash tag of a user's keys (P:u:{<tag>}:...): sha1 of the id, 20 hex digits."""
    return hashlib.sha1(user_id.encode("utf-8")).hexdigest()[:20]


def parse_history_entry(entry: bytes) -> tuple[float | None, str]:
    """One history list entry -> (timestamp, item id)."""
    ts, _, item = entry.decode("utf-8").partition(SEP)
    return (float(ts) if ts else None), item


# KEYS: current, generation, stream. ARGV: path, version, at, by, stream maxlen. Returns the announcement's JSON.
_ANNOUNCE = """
local generation = redis.call('INCR', KEYS[2])
local body = cjson.encode({generation = generation, bundle = ARGV[1], version = ARGV[2], at = tonumber(ARGV[3]),
                           by = ARGV[4]})
redis.call('SET', KEYS[1], body)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'generation', generation, 'version', ARGV[2])
return body
"""
BUNDLE_STREAM_MAX_LEN = 1000


@dataclass(frozen=True)
class Announcement:
    """The serving bundle every replica is told to serve (``P:{bundle}:current``)."""

    generation: int
    bundle: str  # resolved directory
    version: str  # the manifest's version when it was announced
    at: float
    by: str  # the replica that announced it

    @classmethod
    def from_json(cls, raw: bytes | str) -> Announcement:
        data = json.loads(raw)
        return cls(
            int(data["generation"]), str(data["bundle"]), str(data["version"]), float(data["at"]), str(data["by"])
        )


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
    """An ingested item (``deleted`` False) or a deletion tombstone, as stored in Redis."""

    item_id: str
    version: int = 0
    deleted: bool = False
    text: str = ""
    created_at: float = 0.0
    bundle_version: str = ""
    arrays: dict[str, bytes] = field(default_factory=dict)  # raw float32/int64 bytes by name
    ints: dict[str, int] = field(default_factory=dict)
    thumbnail: bytes = b""  # a small JPEG of the ingested image (b"": none), shown by the console

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
            elif key.startswith("a:"):
                rec.arrays[key[2:]] = value
            elif key.startswith("i:"):
                rec.ints[key[2:]] = int(value)
        return rec


class IdempotencyConflict(Exception):
    """An idempotency key already applied to another payload (other item ids or timestamps)."""


def payload_hash(item_ids: list[str], timestamps: list[float] | None) -> str:
    raw = SEP.join(item_ids) + "\x1e" + ("" if timestamps is None else ",".join(repr(float(t)) for t in timestamps))
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:32]


class Store:
    """Async access to everything the service keeps in Redis."""

    def __init__(
        self,
        redis: Redis,
        prefix: str = "missrec",
        max_len: int = 50,
        ttl_seconds: int | None = None,
        stream_max_len: int = 100_000,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.max_len = max_len
        self.ttl = ttl_seconds or 0
        self.stream_max_len = stream_max_len
        self._append = redis.register_script(_APPEND)
        self._change = redis.register_script(_CHANGE_ITEM)
        self._snapshot = redis.register_script(_SNAPSHOT)
        self._announce = redis.register_script(_ANNOUNCE)
        self._lists = CoalescedLists(redis)
        items = f"{prefix}:{{items}}"
        self.ids_key, self.version_key, self.stream_key = f"{items}:ids", f"{items}:version", f"{items}:events"
        self.epoch_key = f"{items}:epoch"
        self.item_prefix = f"{items}:item:"
        bundle = f"{prefix}:{{bundle}}"
        self.bundle_key, self.bundle_generation_key = f"{bundle}:current", f"{bundle}:generation"
        self.bundle_stream_key = f"{bundle}:events"

    # ----- users ------------------------------------------------------------------------------------------
    def _user(self, user_id: str) -> str:
        return f"{self.prefix}:u:{{{user_tag(user_id)}}}"

    async def append_events(
        self, user_id: str, item_ids: list[str], timestamps: list[float] | None, idempotency_key: str | None = None
    ) -> tuple[int, bool]:
        """Append interactions (oldest first) in one round trip. Returns (history length, applied now?); raises
        :class:`IdempotencyConflict` when the key was applied to another payload."""
        now = time.time()
        stamps = timestamps or [now] * len(item_ids)
        entries = [f"{float(ts)!r}{SEP}{item}" for ts, item in zip(stamps, item_ids, strict=True)]
        user = self._user(user_id)
        idem = self._idem(user, idempotency_key) if idempotency_key else f"{user}:idem"
        idem_ttl = IDEMPOTENCY_TTL_SECONDS if idempotency_key else 0
        digest = payload_hash(item_ids, timestamps)
        applied, length = await self._append(
            keys=[f"{user}:hist", idem, f"{user}:id"],
            args=[self.max_len, self.ttl, idem_ttl, digest, user_id, *entries],
        )
        if int(applied) < 0:
            raise IdempotencyConflict(idempotency_key)
        return int(length), bool(applied)

    @staticmethod
    def _idem(user: str, idempotency_key: str) -> str:
        return f"{user}:idem:{hashlib.sha1(idempotency_key.encode()).hexdigest()}"

    async def applied_length(
        self, user_id: str, idempotency_key: str, item_ids: list[str], timestamps: list[float] | None
    ) -> int | None:
        """The history length if an events call with this key and payload was applied already, else None;
        :class:`IdempotencyConflict` if the key was applied to another payload."""
        user = self._user(user_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self._idem(user, idempotency_key))
            pipe.llen(f"{user}:hist")
            stored, length = await pipe.execute()
        if stored is None:
            return None
        if stored not in (b"1", payload_hash(item_ids, timestamps).encode()):
            raise IdempotencyConflict(idempotency_key)
        return int(length)

    async def history(self, user_id: str) -> tuple[list[str], list[float | None]]:
        """(item ids, timestamps), oldest first."""
        raw = await self._lists.read(f"{self._user(user_id)}:hist")
        parsed = [parse_history_entry(entry) for entry in raw]
        return [item for _, item in parsed], [ts for ts, _ in parsed]

    # ----- items ------------------------------------------------------------------------------------------
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

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # ----- the announced serving bundle -------------------------------------------------------------------------
    async def announce_bundle(self, path: str, version: str, origin: str) -> Announcement:
        """Make ``path`` the bundle every replica serves: a new generation, the key and a stream event, atomically."""
        keys = [self.bundle_key, self.bundle_generation_key, self.bundle_stream_key]
        raw = await self._announce(keys=keys, args=[path, version, repr(time.time()), origin, BUNDLE_STREAM_MAX_LEN])
        return Announcement.from_json(raw)

    async def announced_bundle(self) -> Announcement | None:
        raw = await self.redis.get(self.bundle_key)
        return Announcement.from_json(raw) if raw is not None else None

    async def last_bundle_event(self) -> str:
        last = await self.redis.xrevrange(self.bundle_stream_key, count=1)
        return last[0][0].decode() if last else "0-0"

    async def wait_bundle_event(self, after: str, block_ms: int) -> str:
        """The id of the last announcement event after ``after`` (waits up to block_ms), or ``after``."""
        reply = await self.redis.xread({self.bundle_stream_key: after}, count=100, block=block_ms)
        for _, entries in reply or []:
            if entries:
                after = entries[-1][0].decode()
        return after
