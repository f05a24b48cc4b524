"""Locust traffic from real users: recommend by user id (most), events, recommend by explicit history, rare ingests.

    locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 30s --host http://127.0.0.1:8000 \\
        --traffic runs/lt/traffic.json --rate 200 --samples-out runs/lt/samples.csv

Pacing is OPEN LOOP: ``--rate`` is the total target in requests per second, split evenly over the ``-u`` users. Each
user fires on a fixed schedule (t0 + phase + i / per-user-rate) and sends every request from its own greenlet, so a
slow response never delays the next send (no coordinated omission): latency is measured against the service, not
shaped by the generator. The one limit is the generator's own CPU: when it cannot keep up, sends start late; the
lag (actual - scheduled send) of every request is recorded, and ``latency_sched_ms`` (response - scheduled send)
shows what a user would have seen. ``--rate 0`` is CLOSED LOOP instead (each user sends the next request when the
previous one returns, no think time): ``-u`` concurrent clients, used to find the maximum throughput.

Mix (``--mix``, relative weights): user = recommend by user id (history from Redis), history = recommend with an
explicit history (no Redis read), events = append one interaction, ingest = a new item from a real product photo
and its text (JSON, base64 image), explain = recommend by user id with ``explain: true`` (0 in the default mix;
``loadtest.bench --explain-cost`` prices it). Per-request samples go to ``--samples-out`` (CSV) for exact
percentiles; locust's own ``--csv`` files rounds latencies to whole milliseconds. Writes (events, ingest) carry
``X-API-Key`` when MISSREC_API_KEY is set in locust's environment.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import gevent
from gevent.pool import Pool
from locust import FastHttpUser, constant, events, task

from loadtest.traffic import DEFAULT_MIX, read_traffic

KINDS = ("user", "history", "events", "ingest", "explain")
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
WRITE_HEADERS = {"X-API-Key": os.environ["MISSREC_API_KEY"]} if os.environ.get("MISSREC_API_KEY") else {}

SAMPLES: list[tuple[str, float, float, float, float, int]] = []  # kind, sched (s since start), lag, lat, lat_sched, st
STATE: dict = {"t0": None, "stopped": None, "in_flight": 0, "503": 0, "503_without_retry_after": 0}
_user_ids = itertools.count()


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    group = parser.add_argument_group("missrec", "MISSRec load-test options")
    group.add_argument("--traffic", default="runs/traffic.json", help="traffic file (loadtest.traffic)")
    group.add_argument("--rate", type=float, default=0.0, help="total target req/s (open loop); 0 = closed loop")
    group.add_argument("--mix", default=DEFAULT_MIX, help=f"relative weights of {', '.join(KINDS)}")
    group.add_argument("--samples-out", default="", help="CSV of every request (written at test stop)")
    group.add_argument("--tag", default="", help="prefix of ingested item ids (default: random)")
    group.add_argument("--k", type=int, default=10, help="top-k asked for")
    group.add_argument("--seed", type=int, default=0)


def parse_mix(text: str) -> dict[str, float]:
    """'user=80,events=12' -> {"user": 80.0, "events": 12.0, ...} (missing kinds weigh 0)."""
    mix = dict.fromkeys(KINDS, 0.0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in mix:
            raise ValueError(f"unknown request kind {name!r} in --mix (kinds: {', '.join(KINDS)})")
        mix[name] = float(value)
    if sum(mix.values()) <= 0:
        raise ValueError("--mix gives every request kind weight 0")
    return mix


_TRAFFIC: dict = {}


def _traffic(path: str, k: int) -> dict:
    """The traffic file, read once per process, with request bodies prepared (less generator CPU per request)."""
    if not _TRAFFIC:
        t = read_traffic(path)
        t["user_bodies"] = [json.dumps({"user_id": u["id"], "k": k}) for u in t["users"]]
        t["explain_bodies"] = [json.dumps({"user_id": u["id"], "k": k, "explain": True}) for u in t["users"]]
        t["history_bodies"] = [json.dumps({"history": u["history"][-20:], "k": k}) for u in t["users"]]
        t["events_paths"] = [f"/v1/users/{quote(u['id'], safe='')}/events" for u in t["users"]]
        t["item_cum_weights"] = list(itertools.accumulate(t.get("item_weights") or [1.0] * len(t["items"])))
        _TRAFFIC.update(t)
    return _TRAFFIC


@events.test_start.add_listener
def _start(environment, **_kw) -> None:
    STATE["t0"] = time.time()


@events.test_stop.add_listener
def _stop(environment, **_kw) -> None:
    STATE["stopped"] = time.time()
    out = environment.parsed_options.samples_out
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["kind", "sched_s", "lag_ms", "latency_ms", "latency_sched_ms", "status"])
        for kind, sched, lag, lat, lat_sched, status in SAMPLES:
            w.writerow([kind, f"{sched:.6f}", f"{lag:.3f}", f"{lat:.3f}", f"{lat_sched:.3f}", status])
    meta = {
        "t0": STATE["t0"],
        "stopped": STATE["stopped"],
        "duration_s": STATE["stopped"] - STATE["t0"],
        "requests": len(SAMPLES),
        "in_flight_at_stop": STATE["in_flight"],
        "status_503": STATE["503"],
        "status_503_without_retry_after": STATE["503_without_retry_after"],
        "rate": environment.parsed_options.rate,
        "users": environment.parsed_options.num_users,
    }
    path.with_suffix(".json").write_text(json.dumps(meta), encoding="utf-8")


class MissRecUser(FastHttpUser):
    """One traffic source: its share of the target rate on a fixed schedule (or closed loop when --rate 0)."""

    wait_time = constant(0)
    concurrency = 256  # connections per user: more than the requests it can have in flight at the target rates
    network_timeout = 30.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.index = next(_user_ids)
        self.rng = random.Random(opts.seed * 1_000_003 + self.index)
        self.traffic = _traffic(opts.traffic, opts.k)
        mix = parse_mix(opts.mix)
        if not self.traffic["products"]:
            mix["ingest"] = 0.0
        self.kinds = [k for k in KINDS if mix[k] > 0]
        self.weights = list(itertools.accumulate(mix[k] for k in self.kinds))
        self.tag = opts.tag or uuid.uuid4().hex[:8]
        self.counter = itertools.count()
        self.pool = Pool()

    def on_stop(self) -> None:
        self.pool.kill(block=False)

    @task
    def drive(self) -> None:
        opts = self.environment.parsed_options
        if opts.rate <= 0:  # closed loop
            while True:
                self.fire(time.perf_counter())
        interval = max(1, opts.num_users or 1) / opts.rate
        next_at = time.perf_counter() + self.rng.random() * interval  # random phase: users do not fire together
        while True:
            delay = next_at - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            self.pool.spawn(self.fire, next_at)
            next_at += interval

    # ----- one request ----------------------------------------------------------------------------------------
    def fire(self, scheduled: float) -> None:
        kind = self.rng.choices(self.kinds, cum_weights=self.weights)[0]
        u = self.rng.randrange(len(self.traffic["users"]))
        wall = time.time() - (time.perf_counter() - scheduled)
        STATE["in_flight"] += 1
        sent = time.perf_counter()
        try:
            status = self._send(kind, u)
        except Exception:  # connection refused/reset, timeouts: a failed request, not a crash of the generator
            status = 0
        finally:
            STATE["in_flight"] -= 1
        done = time.perf_counter()
        t0 = STATE["t0"] or wall
        SAMPLES.append(
            (kind, wall - t0, (sent - scheduled) * 1e3, (done - sent) * 1e3, (done - scheduled) * 1e3, status)
        )

    def _send(self, kind: str, u: int) -> int:
        t = self.traffic
        if kind == "user":
            r = self.client.post("/v1/recommend", data=t["user_bodies"][u], headers=JSON_HEADERS, name="recommend:user")
        elif kind == "explain":
            r = self.client.post(
                "/v1/recommend", data=t["explain_bodies"][u], headers=JSON_HEADERS, name="recommend:explain"
            )
        elif kind == "history":
            r = self.client.post(
                "/v1/recommend", data=t["history_bodies"][u], headers=JSON_HEADERS, name="recommend:history"
            )
        elif kind == "events":
            item = self.rng.choices(t["items"], cum_weights=t["item_cum_weights"])[0]
            r = self.client.post(t["events_paths"][u], json={"item_ids": [item]}, headers=WRITE_HEADERS, name="events")
        else:
            p = t["products"][self.rng.randrange(len(t["products"]))]
            n = next(self.counter)
            item_id = f"{self.tag}-{self.index}-{n}"
            body = {"item_id": item_id, "text": f"{p['text']} #{n}", "image_base64": p["image_base64"]}
            r = self.client.post("/v1/items", json=body, headers=WRITE_HEADERS, name="ingest")
        if r.status_code == 503:  # shed load must say when to come back
            STATE["503"] += 1
            STATE["503_without_retry_after"] += not r.headers.get("Retry-After")
        return int(r.status_code or 0)
