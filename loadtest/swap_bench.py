"""Bundle swap under load: open-loop locust traffic (ingests included) while the service swaps to a second bundle
and back (docs/lifecycle.md).

    flock /tmp/missrec-cpu.lock .venv/bin/python -m loadtest.swap_bench --bundle-a ROOT/a --bundle-b ROOT/b \\
        --data ../shared/data/scientific --abo ../shared/data/abo-samples --out runs/swapbench

Starts Redis and the service (`missrec serve`, 1 worker, MISSREC_BUNDLE_ROOT = the bundles' common parent) on
bundle A, seeds the real users' histories, then runs locust open loop at --rate for --duration seconds. A probe
thread sends one recommend every --probe-ms and records the model_version of each answer. After a third of the
run, `POST /v1/admin/bundle` swaps to B; after two thirds, back to A. Prints: requests and failures (any non-2xx
or no answer), p50/p99 before the first swap and during each swap (from the call until the replica reports the
new bundle active), the time from each call to the first probe answer carrying the new version, the swap's own
duration (missrec_bundle_swap_seconds), and the service's resident memory before and its peak (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from harness.launch import Child, wait_ready
from harness.ports import free_port
from loadtest import procs
from loadtest.bench import clip_checkpoint, machine, memory_mib, seed_histories

log = logging.getLogger("loadtest.swap_bench")
KEY = "swap-bench-key"
AUTH = {"X-API-Key": KEY}
MIX = "user=75,history=8,events=12,ingest=5"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.swap_bench", description=__doc__.split("\n")[0])
    p.add_argument("--bundle-a", type=Path, required=True, help="the bundle served first (and rolled back to)")
    p.add_argument("--bundle-b", type=Path, required=True, help="the bundle swapped to (same parent folder as A)")
    p.add_argument("--data", type=Path, required=True, help="dataset whose real users drive the traffic")
    p.add_argument("--abo", type=Path, required=True, help="ABO photos for the ingests")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rate", type=float, default=40.0, help="open-loop target, req/s")
    p.add_argument("--duration", type=float, default=45.0, help="seconds of traffic (swaps at 1/3 and 2/3)")
    p.add_argument("--users", type=int, default=4, help="locust users sharing the rate")
    p.add_argument("--mix", default=MIX, help="relative weights of user, history, events, ingest")
    p.add_argument("--probe-ms", type=float, default=20.0, help="interval of the model_version probe")
    p.add_argument("--clip-model", default="missrec-tiny-512")
    return p.parse_args(argv)


class Probe(threading.Thread):
    """Sequential recommends; (wall time at the answer, model_version or None)."""

    def __init__(self, url: str, history: list[str], every_s: float) -> None:
        super().__init__(daemon=True)
        self.url, self.history, self.every_s = url, history, every_s
        self.seen: list[tuple[float, str | None]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.stop.is_set():
                try:
                    r = client.post("/v1/recommend", json={"history": self.history, "k": 10})
                    version = r.json().get("model_version") if r.status_code == 200 else None
                except httpx.HTTPError:
                    version = None
                self.seen.append((time.time(), version))
                time.sleep(self.every_s)

    def first(self, version: str, after: float) -> float | None:
        return next((t for t, v in self.seen if t >= after and v == version), None)


def swap(url: str, bundle: Path, probe: Probe) -> dict[str, Any]:
    """POST the swap, wait until the replica reports it active; the call's timings (wall clock)."""
    called = time.time()
    r = httpx.post(f"{url}/v1/admin/bundle", json={"bundle": str(bundle)}, headers=AUTH, timeout=120)
    if r.status_code != 202:
        raise RuntimeError(f"swap to {bundle}: {r.status_code} {r.text}")
    version, answered = r.json()["version"], time.time()
    while True:
        status = httpx.get(f"{url}/v1/admin/bundle", headers=AUTH, timeout=10).json()
        if status["state"] == "active" and status["active"]["version"] == version:
            break
        if status["state"] == "failed" or time.time() - called > 120:
            raise RuntimeError(f"swap to {bundle} did not complete: {status}")
        time.sleep(0.02)
    active = time.time()
    first = None
    while first is None and time.time() - active < 5:
        first = probe.first(version, called)
        time.sleep(0.01)
    return {
        "bundle": str(bundle), "version": version, "called": called, "active": active,
        "call_s": round(answered - called, 3), "to_active_s": round(active - called, 3),
        "to_first_response_s": round(first - called, 3) if first else None,
        "swap_seconds_in_replica": status["last_swap_seconds"],
    }  # fmt: skip


def window_stats(rows: list[dict], t0: float, start: float, stop: float) -> dict[str, Any]:
    """Requests scheduled in [start, stop) (wall clock): count, failures, p50/p99 of the answered ones."""
    mine = [r for r in rows if start <= t0 + float(r["sched_s"]) < stop]
    ok = np.array([float(r["latency_ms"]) for r in mine if 200 <= int(r["status"]) < 300])
    return {
        "requests": len(mine),
        "failed": len(mine) - ok.size,
        "p50_ms": round(float(np.percentile(ok, 50)), 2) if ok.size else None,
        "p99_ms": round(float(np.percentile(ok, 99)), 2) if ok.size else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    a, b = args.bundle_a.resolve(), args.bundle_b.resolve()
    root = Path(os.path.commonpath([a, b]))
    run_id = f"sw{uuid.uuid4().hex[:8]}"
    info = machine()
    from loadtest.traffic import build_traffic, write_traffic
    from service.embedded_redis import EmbeddedRedis

    ids = json.loads((a / "items/ids.json").read_text(encoding="utf-8"))
    traffic = build_traffic(args.data, ids, args.abo)
    traffic_path = write_traffic(out / "traffic.json", traffic)
    redis_server = EmbeddedRedis(out / "redis", port=free_port())
    children: list[Child] = []
    try:
        redis_url = redis_server.start()
        env = {
            "MISSREC_REDIS_URL": redis_url, "MISSREC_KEY_PREFIX": run_id, "MISSREC_DATA_DIR": str(out / "state"),
            "MISSREC_CLIP_MODEL": args.clip_model, "MISSREC_CLIP_PRETRAINED": clip_checkpoint(args.clip_model, out),
            "MISSREC_API_KEY": KEY, "MISSREC_BUNDLE_ROOT": str(root),
        }  # fmt: skip
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        svc = procs.serve_service(a, port, out / "logs", env, None)
        children.append(svc)
        log.info("service ready in %.1f s", wait_ready(url, svc))
        asyncio.run(seed_histories(url, traffic["users"], headers=AUTH))
        os.environ["MISSREC_API_KEY"] = KEY  # locust's writes carry it (loadtest/locustfile.py)
        rss_before = memory_mib(svc.pid)
        probe = Probe(url, traffic["users"][0]["history"][-10:], args.probe_ms / 1000)
        result: dict[str, Any] = {}
        with procs.CpuMeter({"service": svc.pid, "redis": redis_server.process.pid}) as meter:

            def drive() -> None:
                result["samples"] = procs.run_locust(
                    url, traffic_path, out / "run", rate=args.rate, users=args.users, duration=args.duration,
                    mix=args.mix, tag=run_id, cpus=None, meter=meter,
                )  # fmt: skip

            runner = threading.Thread(target=drive)
            runner.start()
            probe.start()
            began = time.time()
            swaps = []
            for at, bundle in ((1 / 3, b), (2 / 3, a)):
                time.sleep(max(0.0, began + at * args.duration - time.time()))
                swaps.append(swap(url, bundle, probe))
            runner.join(args.duration + 180)
            probe.stop.set()
            probe.join(10)
        rss_after = memory_mib(svc.pid)
        samples = result["samples"]
        t0 = json.loads(samples.with_suffix(".json").read_text())["t0"]
        with samples.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        summary = {
            "machine": info,
            "rate": args.rate,
            "duration_s": args.duration,
            "mix": args.mix,
            "all": window_stats(rows, t0, 0, float("inf")),
            "before_first_swap": window_stats(rows, t0, 0, swaps[0]["called"]),
            "during_swap_to_b": window_stats(rows, t0, swaps[0]["called"], swaps[0]["active"]),
            "between": window_stats(rows, t0, swaps[0]["active"], swaps[1]["called"]),
            "during_swap_back": window_stats(rows, t0, swaps[1]["called"], swaps[1]["active"]),
            "after": window_stats(rows, t0, swaps[1]["active"], float("inf")),
            "ingests": window_stats([r for r in rows if r["kind"] == "ingest"], t0, 0, float("inf")),
            "swaps": [{k: v for k, v in s.items() if k not in ("called", "active")} for s in swaps],
            "probe_answers": len(probe.seen),
            "probe_failures": sum(v is None for _, v in probe.seen),
            "service_memory_before": rss_before,
            "service_memory_after": rss_after,
            "swap_metrics": [ln for ln in metrics.splitlines() if ln.startswith("missrec_bundle_swaps_total")],
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(summary, indent=2), flush=True)
        return summary
    finally:
        for child in children:
            child.stop()
        redis_server.stop()


if __name__ == "__main__":
    main()
