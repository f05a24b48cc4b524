"""Durability under SIGKILL: the service as a real process on a real redis-server (AOF, ``appendfsync always``),
writers streaming events (with idempotency keys), ingests of real ABO photos and deletes from threads, the
service SIGKILLed mid-stream and restarted, the unacknowledged calls retried as a client would (same idempotency
key, same item id), then every write checked in Redis, through the API, and in the restarted index.

Shared by tests/harness/test_durability.py (CI-sized) and ``scripts/reliability.py durability`` (longer, several kills).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis.asyncio as aredis

from harness.abo import abo_products
from harness.launch import RedisServer, ServiceProcess, bundle_ids, service_env
from service.store import HistoryStore, ItemStore

API_KEY = "durability-" + uuid.uuid4().hex


@dataclass
class Write:
    kind: str  # events, ingest, delete
    key: str  # events: the user (one per call); ingest/delete: the item id
    items: list[str] = field(default_factory=list)  # events: the item ids appended
    idempotency_key: str = ""
    text: str = ""  # ingest: the request, to be re-sent as it was
    image: bytes = b""
    status: int = 0  # of the first attempt; 0 = no answer (the service died)
    retried: int | None = None  # status of the retry after the restart (unacknowledged writes only)

    @property
    def acknowledged(self) -> bool:
        return self.status in (200, 201, 204)


@dataclass
class DurabilityReport:
    modes: list[str] = field(default_factory=list)  # per kill: "service" or "service+redis"
    recover_s: list[float] = field(default_factory=list)  # SIGKILL -> the new process answers /readyz 200
    acknowledged: dict[str, int] = field(default_factory=dict)  # by kind, first attempt 2xx
    unacknowledged: dict[str, int] = field(default_factory=dict)  # by kind: no answer (in flight at the kill)
    applied_before_retry: dict[str, int] = field(default_factory=dict)  # ... that Redis had applied anyway
    found_in_redis: dict[str, int] = field(default_factory=dict)  # acknowledged writes found (exactly once)
    found_via_api: dict[str, int] = field(default_factory=dict)
    retries_ok: int = 0  # unacknowledged writes retried after the restart and answered 2xx (or 404: already deleted)
    retries: int = 0
    duplicate_answers: int = 0  # acknowledged events re-sent with their key that answered duplicate=true
    resent: int = 0
    duplicated: list[str] = field(default_factory=list)  # users whose history holds an event twice
    live_items_index: float = 0.0  # the restarted service's missrec_live_items
    live_items_redis: int = 0  # bundle items - tombstoned bundle items + ingested items alive in Redis
    ingested_live: int = 0
    recommendable: int = 0  # live ingested items answered (200) as a history and in their own top 100
    deleted_checked: int = 0
    deleted_served: list[str] = field(default_factory=list)  # deleted items still in a recommendation or GET 200
    missing: list[str] = field(default_factory=list)  # acknowledged writes not found (should stay empty)
    log_leaks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        kinds = ("events", "ingest", "delete")

        def per(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {d.get(k, 0)}" for k in kinds)

        return [
            f"{len(self.modes)} SIGKILL(s) in {self.seconds:.1f} s; SIGKILL to ready again: "
            + ", ".join(f"{s:.1f} s ({m})" for m, s in zip(self.modes, self.recover_s, strict=True)),
            f"  acknowledged (2xx): {per(self.acknowledged)}",
            f"  found in Redis:     {per(self.found_in_redis)}",
            f"  found via the API:  {per(self.found_via_api)}",
            f"  unacknowledged (in flight at a kill): {per(self.unacknowledged)}; already applied by Redis: "
            f"{per(self.applied_before_retry)}; retried {self.retries}, answered {self.retries_ok}",
            f"  acknowledged events re-sent with their key: {self.resent}, answered duplicate "
            f"{self.duplicate_answers}; histories holding an event twice: {len(self.duplicated)}",
            f"  index after restart: {self.live_items_index:.0f} live items, Redis says {self.live_items_redis}; "
            f"ingested items alive {self.ingested_live}, recommendable {self.recommendable}; deleted items checked "
            f"{self.deleted_checked}, served {len(self.deleted_served)}",
            f"  acknowledged writes missing: {len(self.missing)}; API key or image bytes in the logs: "
            f"{len(self.log_leaks)}",
        ]


def _photos(abo_dir: Path) -> list[tuple[str, bytes]]:

    return [(p["text"], image.read_bytes()) for p in abo_products(abo_dir) for image in p["images"]]


class _Writers:
    """Threads streaming writes at ``url`` until the service stops answering (or ``stop`` is set)."""

    def __init__(self, url: str, round_: int, ids: list[str], photos: list[tuple[str, bytes]], events_threads: int):
        self.url, self.tag, self.photos = url, f"r{round_}", photos
        self.ids = ids[: len(ids) // 2]  # events use the first half of the catalogue ...
        self.victims = iter(ids[::-1][100 * round_ :])  # ... deletes of bundle items the other end
        self.writes: list[Write] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._events, args=(w,)) for w in range(events_threads)]
        self.threads.append(threading.Thread(target=self._items))

    def count(self, kind: str) -> int:
        return sum(1 for w in self.writes if w.kind == kind and w.acknowledged)

    def _call(self, client: httpx.Client, write: Write, method: str, path: str, **kw: object) -> bool:
        """Send; record the status (0 = no answer). False when the service is gone."""
        self.writes.append(write)
        try:
            write.status = client.request(method, path, **kw).status_code
        except httpx.HTTPError:
            write.status = 0
            return False
        return True

    def _events(self, w: int) -> None:
        headers = {"X-API-Key": API_KEY}
        with httpx.Client(base_url=self.url, timeout=30.0, headers=headers) as client:
            for n in itertools.count():
                if self.stop.is_set():
                    return
                start = (w * 7919 + n * 2) % (len(self.ids) - 2)  # one user per call: checkable exactly
                write = Write("events", f"{self.tag}-u{w}-{n}", self.ids[start : start + 2], f"{self.tag}-k{w}-{n}")
                body = {"item_ids": write.items, "idempotency_key": write.idempotency_key}
                if not self._call(client, write, "POST", f"/v1/users/{write.key}/events", json=body):
                    return

    def _items(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60.0, headers={"X-API-Key": API_KEY}) as client:
            for n in itertools.count():
                if self.stop.is_set():
                    return
                text, image = self.photos[n % len(self.photos)]
                write = Write("ingest", f"{self.tag}-i{n}", text=text, image=image)
                if not self._call(client, write, "POST", "/v1/items", **_ingest_request(write)):
                    return
                victim = write.key if n % 3 == 2 and write.acknowledged else None  # every third new item ...
                if n % 4 == 3:  # ... and a bundle item now and then
                    victim = next(self.victims)
                if victim and not self._call(client, Write("delete", victim), "DELETE", f"/v1/items/{victim}"):
                    return


def _ingest_request(write: Write) -> dict:
    return {
        "data": {"item_id": write.key, "text": write.text},
        "files": {"image": ("p.jpg", write.image, "image/jpeg")},
    }


async def _redis_state(url: str, prefix: str, users: list[str]) -> tuple[dict[str, list[str]], dict[str, bool]]:
    """(user -> history item ids, item id -> deleted?) as stored in Redis."""
    client = aredis.Redis.from_url(url)
    stored = HistoryStore(client, prefix=prefix)
    histories = {u: (await stored.history(u))[0] for u in users}
    items = {r.item_id: r.deleted for r in await ItemStore(client, prefix=prefix).all_items()}
    await client.aclose()
    return histories, items


def _live_items(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("missrec_live_items ")))


def run_durability(
    bundle: Path,
    clip: tuple[str, str],
    abo_dir: Path,
    work: Path,
    modes: tuple[str, ...] = ("service", "service+redis"),
    events_threads: int = 3,
    stream_s: float = 2.0,
    min_acks: int = 3,
) -> DurabilityReport:
    """One round per mode: stream writes, SIGKILL the service mid-stream (``service+redis``: the redis-server too,
    as when a pod with its embedded Redis dies; it restarts from its append-only file) once at least ``min_acks``
    ingests are acknowledged and ``stream_s`` passed, restart, retry what was in flight. Then verify everything."""
    report = DurabilityReport(modes=list(modes))
    started = time.monotonic()
    redis_server = RedisServer(work / "redis").start()
    prefix = f"durability-{uuid.uuid4().hex[:8]}"
    log = work / "service.log"
    env = service_env(bundle, redis_server.url, prefix, clip, work, api_key=API_KEY)
    env["UVICORN_LOG_LEVEL"] = "trace"  # the most verbose server log: it must still hold no key and no image
    ids = bundle_ids(bundle)[1:]
    photos = _photos(abo_dir)
    service = ServiceProcess(env, log_path=log)
    writes: list[Write] = []
    try:
        service.start()
        for round_, mode in enumerate(modes):
            writers = _Writers(service.url, round_, ids, photos, events_threads)
            for t in writers.threads:
                t.start()
            deadline = time.monotonic() + 120
            t0 = time.monotonic()
            while (
                time.monotonic() - t0 < stream_s or writers.count("ingest") < min_acks
            ) and time.monotonic() < deadline:
                time.sleep(0.05)
            killed = time.monotonic()
            service.kill()  # SIGKILL, mid-stream: writers are in the middle of calls
            if mode == "service+redis":
                redis_server.kill()
            for t in writers.threads:
                t.join(60)
            if mode == "service+redis":
                redis_server.start()  # same port, same append-only file
            service.start()
            report.recover_s.append(time.monotonic() - killed)
            _retry(service.url, redis_server.url, prefix, writers.writes, report)
            writes += writers.writes
        _verify(service.url, redis_server.url, prefix, ids, writes, report)
    finally:
        service.kill()
        redis_server.stop()
    _check_logs(log, photos, report)
    report.seconds = time.monotonic() - started
    return report


def _retry(url: str, redis_url: str, prefix: str, writes: list[Write], report: DurabilityReport) -> None:
    """Retry the writes that got no answer, as a client would: same idempotency key, same item id."""
    lost = [w for w in writes if not w.acknowledged]
    histories, items = asyncio.run(_redis_state(redis_url, prefix, [w.key for w in lost if w.kind == "events"]))
    for w in lost:
        report.unacknowledged[w.kind] = report.unacknowledged.get(w.kind, 0) + 1
        applied = {
            "events": bool(histories.get(w.key)),
            "ingest": items.get(w.key) is False,
            "delete": items.get(w.key) is True,
        }[w.kind]
        report.applied_before_retry[w.kind] = report.applied_before_retry.get(w.kind, 0) + int(applied)
    with httpx.Client(base_url=url, timeout=60.0, headers={"X-API-Key": API_KEY}) as client:
        for w in lost:
            report.retries += 1
            if w.kind == "events":
                body = {"item_ids": w.items, "idempotency_key": w.idempotency_key}
                w.retried = client.post(f"/v1/users/{w.key}/events", json=body).status_code
            elif w.kind == "ingest":
                w.retried = client.post("/v1/items", **_ingest_request(w)).status_code
            else:
                w.retried = client.delete(f"/v1/items/{w.key}").status_code
            report.retries_ok += int(w.retried in (200, 201, 204) or (w.kind == "delete" and w.retried == 404))


def _verify(
    url: str, redis_url: str, prefix: str, ids: list[str], writes: list[Write], report: DurabilityReport
) -> None:
    for w in writes:
        if w.acknowledged:
            report.acknowledged[w.kind] = report.acknowledged.get(w.kind, 0) + 1
    done = [w for w in writes if w.acknowledged or w.retried in (200, 201, 204)]
    users = [w.key for w in done if w.kind == "events"]
    histories, stored = asyncio.run(_redis_state(redis_url, prefix, users))
    # the expected end state of every item touched: its last successful write wins
    expected: dict[str, bool] = {}  # item -> deleted?
    for w in writes:
        if w.kind in ("ingest", "delete") and (w.acknowledged or w.retried in (200, 201, 204, 404)):
            expected[w.key] = w.kind == "delete"
    with httpx.Client(base_url=url, timeout=60.0, headers={"X-API-Key": API_KEY}) as client:
        for w in done:
            if w.kind == "events":
                in_redis = histories[w.key] == w.items  # one user per call: exactly these items, once, in order
                via_api = client.get(f"/v1/users/{w.key}/history").json()["item_ids"] == w.items
                if len(histories[w.key]) != len(set(histories[w.key])) or len(histories[w.key]) > len(w.items):
                    report.duplicated.append(w.key)
            else:  # ingest or delete: the item's final state (a later delete wins over an ingest)
                deleted = expected[w.key]
                in_redis = stored.get(w.key) is deleted  # None: no record at all
                via_api = client.get(f"/v1/items/{w.key}").status_code == (404 if deleted else 200)
            if w.acknowledged:
                report.found_in_redis[w.kind] = report.found_in_redis.get(w.kind, 0) + int(in_redis)
                report.found_via_api[w.kind] = report.found_via_api.get(w.kind, 0) + int(via_api)
            if not (in_redis and via_api):
                report.missing.append(f"{w.kind} {w.key} (acknowledged {w.acknowledged}, retried {w.retried})")
        # re-sending acknowledged events with their key changes nothing
        for w in [w for w in done if w.kind == "events"][:200]:
            body = {"item_ids": w.items, "idempotency_key": w.idempotency_key}
            report.resent += 1
            report.duplicate_answers += int(client.post(f"/v1/users/{w.key}/events", json=body).json()["duplicate"])
            if client.get(f"/v1/users/{w.key}/history").json()["item_ids"] != w.items:
                report.duplicated.append(w.key)
        # the restarted index against Redis
        bundle_set = set(ids)
        tombstoned = sum(1 for item, deleted in stored.items() if deleted and item in bundle_set)
        alive = [item for item, deleted in stored.items() if not deleted and item not in bundle_set]
        report.live_items_redis = len(ids) - tombstoned + len(alive)
        report.live_items_index = _live_items(client)
        report.ingested_live = len(alive)
        for item in alive:  # its own top 100 (the photos repeat: items with one photo have equal vectors)
            r = client.post("/v1/recommend", json={"history": [item], "k": 100, "exclude_seen": False})
            report.recommendable += int(r.status_code == 200 and item in [i["item_id"] for i in r.json()["items"]])
        gone = {item for item, deleted in stored.items() if deleted}
        report.deleted_checked = len(gone)
        for history in ([], ids[:3]):
            r = client.post("/v1/recommend", json={"history": history, "k": 1000})
            report.deleted_served += sorted(gone & {i["item_id"] for i in r.json()["items"]})
        for item in gone:
            if client.get(f"/v1/items/{item}").status_code != 404:
                report.deleted_served.append(item)
            r = client.post("/v1/recommend", json={"history": [item], "k": 1})  # a deleted item is skipped
            if r.status_code != 200 or r.json()["skipped_item_ids"] != [item] or r.json()["history_length"]:
                report.deleted_served.append(item)


def _check_logs(log: Path, photos: list[tuple[str, bytes]], report: DurabilityReport) -> None:
    text = log.read_text(encoding="utf-8", errors="replace")
    if API_KEY in text:
        report.log_leaks.append("the API key")
    for _, image in photos:
        middle = len(image) // 2
        chunk = image[middle : middle + 48]
        for needle in (base64.b64encode(chunk).decode()[8:56], repr(chunk)[2:-1], chunk.hex()):
            if needle in text:
                report.log_leaks.append(f"image bytes: {needle[:20]}…")
