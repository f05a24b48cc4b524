"""The serving bundle every replica is told to serve (:mod:`service.swap` follows it; ``POST /v1/admin/bundle``
announces one).

Keys (``P`` = key prefix, one hash tag): ``P:{bundle}:current``, ``P:{bundle}:generation`` and
``P:{bundle}:events`` (see :mod:`service.store`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from redis.asyncio import Redis

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


class AnnouncementStore:
    """Announcements in Redis: the key every replica follows, its generation counter and the stream that wakes them."""

    def __init__(self, redis: Redis, prefix: str = "missrec") -> None:
        self.redis = redis
        self._announce = redis.register_script(_ANNOUNCE)
        bundle = f"{prefix}:{{bundle}}"
        self.bundle_key, self.bundle_generation_key = f"{bundle}:current", f"{bundle}:generation"
        self.bundle_stream_key = f"{bundle}:events"

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
