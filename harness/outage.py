"""A Redis outage under load against a real service: the scenario behind tests/harness/test_outage.py and
``scripts/reliability.py outage`` (kill or pause the redis-server mid-traffic, measure what clients saw)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx

from harness.launch import RedisServer


# ----- Redis outage under load ------------------------------------------------------------------------------------
@dataclass
class Call:
    kind: str
    start: float
    end: float
    status: int  # 0: the client got no HTTP answer (connection error or its own timeout)
    code: str | None = None
    user: str = ""  # events: the user (one per call) and the item written
    item: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start


KINDS = ("recommend_user", "events", "recommend_history")


def _load_worker(url: str, ids: list[str], worker: int, stop: threading.Event, calls: list[Call]) -> None:
    user = f"outage-user-{worker}"
    with httpx.Client(base_url=url, timeout=10.0) as client:
        n = 0
        while not stop.is_set():
            kind = KINDS[n % len(KINDS)]
            n += 1
            started = time.monotonic()
            writer, item = (f"{user}-{n}", ids[n % len(ids)]) if kind == "events" else ("", "")
            try:
                if kind == "recommend_user":
                    r = client.post("/v1/recommend", json={"user_id": user, "k": 10})
                elif kind == "events":  # one user per call, so each write can be checked afterwards
                    r = client.post(f"/v1/users/{writer}/events", json={"item_ids": [item]})
                else:
                    r = client.post("/v1/recommend", json={"history": ids[:5], "k": 10})
                code = r.json().get("error", {}).get("code") if r.status_code >= 400 else None
                calls.append(Call(kind, started, time.monotonic(), r.status_code, code, writer, item))
            except httpx.HTTPError as exc:
                calls.append(Call(kind, started, time.monotonic(), 0, type(exc).__name__, writer, item))


def _poll_ready(url: str, stop: threading.Event, samples: list[tuple[float, int]]) -> None:
    with httpx.Client(base_url=url, timeout=5.0) as client:
        while not stop.is_set():
            try:
                samples.append((time.monotonic(), client.get("/readyz").status_code))
            except httpx.HTTPError:
                samples.append((time.monotonic(), 0))
            time.sleep(0.02)


@dataclass
class OutageReport:
    mode: str
    requests: int
    during_outage: int
    slowest_during_outage_s: float
    slowest_overall_s: float
    unexpected: list[Call]  # anything but 200 or 503 redis_unavailable (and 503 for by-history recommends)
    wrong_during_outage: list[Call]  # by-user recommends / events that did not get 503 redis_unavailable
    history_recommends_failed: int  # explicit-history recommends that failed at any time (decision: served)
    unready_after_s: float | None  # Redis down -> /readyz 503
    ready_after_s: float | None  # Redis back -> /readyz 200
    failed_after_return: int  # requests started after Redis was back that did not succeed
    recovered_after_s: float  # Redis back -> the last request (started after that) that failed ended
    events_acknowledged: int  # events answered 200
    acknowledged_found: int  # ... whose item is in the user's history exactly once afterwards
    events_refused: int  # events answered 503 (outcome unknown to the client)
    refused_applied: int  # ... whose write Redis applied anyway (sent before a pause, executed on resume)

    def lines(self) -> list[str]:
        fmt = lambda x: "never" if x is None else f"{x:.3f} s"  # noqa: E731
        return [
            f"mode {self.mode}: {self.requests} requests, {self.during_outage} during the outage",
            f"  slowest request during the outage {self.slowest_during_outage_s:.3f} s, overall "
            f"{self.slowest_overall_s:.3f} s",
            f"  unexpected answers {len(self.unexpected)}; by-user/events not 503 redis_unavailable during the "
            f"outage {len(self.wrong_during_outage)}; explicit-history recommends failed "
            f"{self.history_recommends_failed}",
            f"  /readyz unready {fmt(self.unready_after_s)} after Redis went down, ready {fmt(self.ready_after_s)} "
            f"after it came back; {self.failed_after_return} requests failed after it came back (all succeed again "
            f"{self.recovered_after_s:.3f} s after it came back)",
            f"  events acknowledged {self.events_acknowledged}, found exactly once {self.acknowledged_found}; "
            f"answered 503 {self.events_refused}, of which applied anyway {self.refused_applied}",
        ]


def run_outage(
    url: str,
    redis_server: RedisServer,
    ids: list[str],
    mode: str = "kill",
    workers: int = 6,
    before_s: float = 1.0,
    outage_s: float = 2.0,
    after_s: float = 2.0,
) -> OutageReport:
    """Load ``url`` from ``workers`` threads, take ``redis_server`` away for ``outage_s``
    (``kill``: SIGKILL then restart on the same port and data; ``stop``: SIGSTOP then SIGCONT, so calls time out
    instead of being refused), and measure failing fast, readiness and recovery."""
    stop = threading.Event()
    calls: list[Call] = []
    ready: list[tuple[float, int]] = []
    threads = [threading.Thread(target=_load_worker, args=(url, ids, w, stop, calls)) for w in range(workers)]
    threads.append(threading.Thread(target=_poll_ready, args=(url, stop, ready)))
    for t in threads:
        t.start()
    time.sleep(before_s)
    if mode == "kill":
        redis_server.kill()
    else:
        redis_server.pause()
    down = time.monotonic()
    time.sleep(outage_s)
    # From here Redis may answer before `up` is stamped (start() polls PING every 20 ms), so calls ending after
    # this are not "during the outage". With `up` as the boundary, one 10 s script run counted 8 by-user/events
    # calls "during" it that got a 200, which needs a live Redis: they ended in that gap.
    restarting = time.monotonic()
    if mode == "kill":
        redis_server.start()  # same port, same AOF: the data comes back
    else:
        redis_server.resume()
    up = time.monotonic()
    time.sleep(after_s)
    stop.set()
    for t in threads:
        t.join(30)

    def ok(c: Call) -> bool:
        return c.status == 200

    def outage_answer(c: Call) -> bool:
        return c.status == 503 and c.code == "redis_unavailable" and c.kind != "recommend_history"

    during = [c for c in calls if c.start >= down and c.end <= restarting]
    failed_after = [c for c in calls if c.start >= up and not ok(c)]
    acked = [c for c in calls if c.kind == "events" and c.status == 200]
    refused = [c for c in calls if c.kind == "events" and c.status == 503]
    with httpx.Client(base_url=url, timeout=10.0) as client:
        stored = {c.user: client.get(f"/v1/users/{c.user}/history").json()["item_ids"] for c in acked + refused}
    return OutageReport(
        mode=mode,
        requests=len(calls),
        during_outage=len(during),
        slowest_during_outage_s=max((c.seconds for c in during), default=0.0),
        slowest_overall_s=max((c.seconds for c in calls), default=0.0),
        unexpected=[c for c in calls if not (ok(c) or outage_answer(c))],
        wrong_during_outage=[c for c in during if c.kind != "recommend_history" and not outage_answer(c)],
        history_recommends_failed=sum(1 for c in calls if c.kind == "recommend_history" and not ok(c)),
        unready_after_s=next((t - down for t, s in ready if t >= down and s == 503), None),
        ready_after_s=next((t - up for t, s in ready if t >= up and s == 200), None),
        failed_after_return=len(failed_after),
        recovered_after_s=max((c.end - up for c in failed_after), default=0.0),
        events_acknowledged=len(acked),
        acknowledged_found=sum(1 for c in acked if stored[c.user] == [c.item]),
        events_refused=len(refused),
        refused_applied=sum(1 for c in refused if stored[c.user]),
    )
