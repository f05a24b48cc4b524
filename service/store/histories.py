"""User histories (capped lists of "<timestamp>\\x1f<item id>", oldest first) and the idempotency of event calls.

Keys (``P`` = key prefix; ``<h>`` = sha1(user id)[:20], the hash tag that puts a user's keys in one cluster slot):
``P:u:{<h>}:hist``, ``P:u:{<h>}:id`` and ``P:u:{<h>}:idem:<key>`` (see :mod:`service.store`).
Item ids never contain control characters (the API rejects them), so \\x1f is a safe separator.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
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


def user_tag(user_id: str) -> str:
    """The hash tag of a user's keys (P:u:{<tag>}:...): sha1 of the id, 20 hex digits."""
    return hashlib.sha1(user_id.encode("utf-8")).hexdigest()[:20]


def parse_history_entry(entry: bytes) -> tuple[float | None, str]:
    """One history list entry -> (timestamp, item id)."""
    ts, _, item = entry.decode("utf-8").partition(SEP)
    return (float(ts) if ts else None), item


class IdempotencyConflict(Exception):
    """An idempotency key already applied to another payload (other item ids or timestamps)."""


def payload_hash(item_ids: list[str], timestamps: list[float] | None) -> str:
    raw = SEP.join(item_ids) + "\x1e" + ("" if timestamps is None else ",".join(repr(float(t)) for t in timestamps))
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:32]


class HistoryStore:
    """Users' histories in Redis: appends (idempotent with a key) and whole-history reads, coalesced per loop turn."""

    def __init__(
        self, redis: Redis, prefix: str = "missrec", max_len: int = 50, ttl_seconds: int | None = None
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.max_len = max_len  # histories are capped at what the serving model reads (a swap updates it)
        self.ttl = ttl_seconds or 0
        self._append = redis.register_script(_APPEND)
        self._lists = CoalescedLists(redis)

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
