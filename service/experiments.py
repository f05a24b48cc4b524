"""A/B experiments: bundles as variants, users split by a stable hash, online hit rate per variant, in Redis.

``PUT /v1/admin/experiments/{name}`` with two or more variants (``{"name", "bundle", "share"}``, bundles inside
MISSREC_BUNDLE_ROOT, shares summing to 1) starts one; one experiment runs at a time. A user is assigned by
sha256(name, user id), so every replica, before and after a restart, gives a user the same variant. Each replica
reads the running experiment from Redis (at most once a second, on the request path) and loads the variants' bundles
in the background, each with a catalogue that follows every item change of the serving one (as the shadow does);
the variant whose bundle is the serving one uses the serving catalogue. Until a variant is loaded on a replica its
users get the serving bundle there, uncounted.

A recommendation for a ``user_id`` while an experiment runs gets a ``recommendation_id`` and its ``variant``; one
Lua script stores it (its items, for the attribution window) and counts the impression. ``POST
/v1/users/{id}/events`` with a ``recommendation_id`` (or, without one, the user's most recent recommendation within
MISSREC_ATTRIBUTION_WINDOW_SECONDS) attributes each event item that the recommendation contained, in one script: an
attributed interaction is counted once per (recommendation, item) and a hit once per recommendation, whatever the
retries (SADD guards, so a retried events call counts nothing twice). Hit rate@k = hits / impressions; the 95 %
interval of the difference of two variants' rates is the normal (Wald) one.

Keys (``P`` = key prefix; one hash tag per experiment, so each script runs in one cluster slot):
``P:{x:<name>}:config`` (JSON), ``P:{x:<name>}:stats`` (hash: <variant>:impressions, :interactions, :hits),
``P:{x:<name>}:counted`` (set of counted "<rec>" and "<rec>|<item>"), ``P:{x:<name>}:rec:<id>`` (JSON, expires after
the window), ``P:{x:<name>}:last:<sha1(user)>`` (latest recommendation id, same expiry), ``P:experiment`` (the
running experiment's name).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from service.bundle_root import resolve_bundle
from service.catalogue import Catalogue, Snapshot
from service.metrics import Metrics
from service.serving_model import ServingModel
from service.settings import Settings

log = logging.getLogger(__name__)
REFRESH_S = 1.0

# KEYS: rec key, last key, stats. ARGV: rec JSON, variant, window seconds.
_IMPRESSION = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('SET', KEYS[2], cjson.decode(ARGV[1])['id'], 'EX', ARGV[3])
return redis.call('HINCRBY', KEYS[3], ARGV[2] .. ':impressions', 1)
"""
# KEYS: rec key, counted set, stats. ARGV: rec id, item ids... Returns {interactions counted, hit counted}.
_ATTRIBUTE = """
local raw = redis.call('GET', KEYS[1])
if not raw then return {0, 0} end
local rec = cjson.decode(raw)
local shown = {}
for _, item in ipairs(rec['items']) do shown[item] = true end
local counted, hit = 0, 0
for i = 2, #ARGV do
  if shown[ARGV[i]] and redis.call('SADD', KEYS[2], ARGV[1] .. '|' .. ARGV[i]) == 1 then
    counted = counted + 1
    redis.call('HINCRBY', KEYS[3], rec['variant'] .. ':interactions', 1)
  end
end
if counted > 0 and redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  hit = 1
  redis.call('HINCRBY', KEYS[3], rec['variant'] .. ':hits', 1)
end
return {counted, hit}
"""


def assign(name: str, user_id: str, variants: list[dict[str, Any]]) -> str:
    """The variant of ``user_id``: sha256(name NUL user id) as a number in [0, 1) against the cumulative shares."""
    digest = hashlib.sha256(f"{name}\0{user_id}".encode()).digest()
    x = int.from_bytes(digest[:8], "big") / 2**64
    total = 0.0
    for v in variants:
        total += v["share"]
        if x < total:
            return v["name"]
    return variants[-1]["name"]


def difference_interval(a: dict[str, float], b: dict[str, float], z: float = 1.959964) -> dict[str, float] | None:
    """rate(a) - rate(b) with its 95 % normal interval (None until both have impressions)."""
    na, nb = a["impressions"], b["impressions"]
    if not na or not nb:
        return None
    pa, pb = a["hits"] / na, b["hits"] / nb
    se = math.sqrt(pa * (1 - pa) / na + pb * (1 - pb) / nb)
    return {"difference": pa - pb, "low": pa - pb - z * se, "high": pa - pb + z * se}


@dataclass
class Assignment:
    experiment: str
    variant: str
    snapshot: Snapshot | None  # None: the variant is not loaded here yet (served by the serving bundle, uncounted)


class Experiments:
    """This replica's view of the running experiment, and the Redis side of every experiment."""

    def __init__(self, redis: Redis, settings: Settings, catalogue: Catalogue, metrics: Metrics) -> None:
        self.redis, self.settings, self.catalogue, self.metrics = redis, settings, catalogue, metrics
        self.prefix = settings.key_prefix
        self.window = int(settings.attribution_window_seconds)
        self._impression = redis.register_script(_IMPRESSION)
        self._attribute = redis.register_script(_ATTRIBUTE)
        self.config: dict[str, Any] | None = None
        self.catalogues: dict[str, Catalogue] = {}  # bundle path -> a catalogue following the serving one
        self._checked = 0.0
        self._loading: set[str] = set()

    def key(self, name: str, part: str) -> str:
        return f"{self.prefix}:{{x:{name}}}:{part}"

    # ----- control -------------------------------------------------------------------------------------------
    async def start(self, name: str, variants: list[dict[str, Any]]) -> dict[str, Any]:
        running = await self.redis.get(f"{self.prefix}:experiment")
        if running is not None and running.decode() != name:
            raise ValueError(f"experiment {running.decode()!r} is running: end it first")
        resolved = [{**v, "bundle": str(resolve_bundle(self.settings.swap_root(), v["bundle"]))} for v in variants]
        config = {"name": name, "variants": resolved, "started": time.time(), "state": "running"}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.key(name, "config"), json.dumps(config))
            pipe.set(f"{self.prefix}:experiment", name)
            await pipe.execute()
        self._checked = 0.0
        await self.refresh()
        return config

    async def end(self, name: str) -> dict[str, Any]:
        config = await self._config(name)
        config["state"], config["ended"] = "ended", time.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.key(name, "config"), json.dumps(config))
            pipe.delete(f"{self.prefix}:experiment")
            await pipe.execute()
        self._checked = 0.0
        await self.refresh()
        return config

    async def _config(self, name: str) -> dict[str, Any]:
        raw = await self.redis.get(self.key(name, "config"))
        if raw is None:
            raise KeyError(name)
        return json.loads(raw)

    async def stats(self, name: str) -> dict[str, Any]:
        config = await self._config(name)
        raw = await self.redis.hgetall(self.key(name, "stats"))
        counts = {k.decode(): int(v) for k, v in raw.items()}
        variants = []
        for v in config["variants"]:
            row = {f: counts.get(f"{v['name']}:{f}", 0) for f in ("impressions", "interactions", "hits")}
            row["hit_rate"] = row["hits"] / row["impressions"] if row["impressions"] else None
            variants.append({"name": v["name"], "bundle": v["bundle"], "share": v["share"], **row})
        first = variants[0]
        for v in variants[1:]:
            v["difference_vs_" + first["name"]] = difference_interval(v, first)
        return {"name": name, "state": config["state"], "started": config["started"], "variants": variants}

    # ----- per request ---------------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Re-read the running experiment (at most once a second) and start loading variants not loaded here."""
        if time.monotonic() - self._checked < REFRESH_S:
            return
        self._checked = time.monotonic()
        name = await self.redis.get(f"{self.prefix}:experiment")
        self.config = await self._config(name.decode()) if name is not None else None
        serving = str(self.catalogue.current.model.bundle.root.resolve())
        wanted = {v["bundle"] for v in (self.config or {}).get("variants", [])}
        for path in [p for p in self.catalogues if p not in wanted]:  # an ended experiment's variants: dropped
            self.catalogue.unfollow(self.catalogues.pop(path))
        for v in (self.config or {}).get("variants", []):
            path = v["bundle"]
            if path != serving and path not in self.catalogues and path not in self._loading:
                self._loading.add(path)
                asyncio.get_running_loop().create_task(self._load(path), name=f"experiment-load-{v['name']}")

    async def _load(self, path: str) -> None:
        try:
            from pathlib import Path

            model = await asyncio.to_thread(ServingModel.load, Path(path), self.settings)
            follower = Catalogue(model)
            await asyncio.to_thread(self.catalogue.follow, follower)
            self.catalogues[path] = follower
            log.info("experiment variant %s loaded", path)
        except Exception:
            log.exception("experiment variant %s could not be loaded", path)
        finally:
            self._loading.discard(path)

    async def assignment(self, user_id: str) -> Assignment | None:
        await self.refresh()
        config = self.config
        if config is None:
            return None
        variant = assign(config["name"], user_id, config["variants"])
        path = next(v["bundle"] for v in config["variants"] if v["name"] == variant)
        if path == str(self.catalogue.current.model.bundle.root.resolve()):
            return Assignment(config["name"], variant, self.catalogue.current)
        follower = self.catalogues.get(path)
        return Assignment(config["name"], variant, follower.current if follower is not None else None)

    async def impression(self, a: Assignment, user_id: str, item_ids: list[str]) -> str:
        rec_id = f"{a.experiment}.{uuid.uuid4().hex}"
        user = hashlib.sha1(user_id.encode()).hexdigest()[:20]
        rec = {"id": rec_id, "variant": a.variant, "items": item_ids, "at": time.time()}
        keys = [self.key(a.experiment, f"rec:{rec_id}"), self.key(a.experiment, f"last:{user}"),
                self.key(a.experiment, "stats")]  # fmt: skip
        await self._impression(keys=keys, args=[json.dumps(rec), a.variant, self.window])
        self.metrics.experiment.labels(a.experiment, a.variant, "impressions").inc()
        return rec_id

    async def attribute(self, user_id: str, item_ids: list[str], rec_id: str | None) -> int:
        """Attribute events to ``rec_id`` (or the user's latest recommendation in the running experiment within the
        window); returns the interactions counted now (0 for a retry)."""
        if rec_id is None:
            name = await self.redis.get(f"{self.prefix}:experiment")
            if name is None:
                return 0
            user = hashlib.sha1(user_id.encode()).hexdigest()[:20]
            last = await self.redis.get(self.key(name.decode(), f"last:{user}"))
            if last is None:
                return 0
            rec_id = last.decode()
        name = rec_id.split(".", 1)[0]
        keys = [self.key(name, f"rec:{rec_id}"), self.key(name, "counted"), self.key(name, "stats")]
        counted, hit = await self._attribute(keys=keys, args=[rec_id, *item_ids])
        if counted:
            raw = await self.redis.get(keys[0])
            variant = json.loads(raw)["variant"] if raw else "?"
            self.metrics.experiment.labels(name, variant, "interactions").inc(int(counted))
            self.metrics.experiment.labels(name, variant, "hits").inc(int(hit))
        return int(counted)

    def close(self) -> None:
        for follower in self.catalogues.values():
            self.catalogue.unfollow(follower)
