"""The attacks of issue 22 at full size that load the machine: a snapshot of a 3M-event history and an open-loop
overload above capacity (the others, and the helpers shared, are scripts/attacks.py); figures in docs/reliability.md.

    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/attacks_load.py snapshot-memory [--events 3000000]
    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/attacks_load.py overload [--factor 1.75] [--seconds 20]
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Annotated

import typer
from attacks import _rss_mib, _statuses, _workdir  # scripts/attacks.py, beside this file

from harness.launch import SHARED, RedisServer, ServiceProcess, bundle_ids, script_artefacts, service_env

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The attacks of issue 22 that load the machine: snapshot-memory, overload.",
)


def _fill_histories(url: str, prefix: str, ids: list[str], events: int, users: int) -> dict:
    """One user with ``events`` history events and ``users`` users with 20 each, written as the service writes
    them (service.store.histories: RPUSH of '<timestamp repr>\\x1f<item id>' to P:u:{tag}:hist, the id in
    P:u:{tag}:id), pipelined."""
    import random

    import redis

    from service.store.histories import SEP, user_tag

    t0 = 1_700_000_000.0
    client = redis.Redis.from_url(url)
    heavy = f"{prefix}:u:{{{user_tag('heavy-user')}}}"
    client.set(f"{heavy}:id", "heavy-user")
    chunk = 10_000
    pipe = client.pipeline(transaction=False)
    for start in range(0, events, chunk):
        n = range(start, min(events, start + chunk))
        pipe.rpush(f"{heavy}:hist", *[f"{t0 + j!r}{SEP}{ids[j % len(ids)]}" for j in n])
        if len(pipe) >= 20:
            pipe.execute()
    rng = random.Random(0)
    for u in range(users):
        key = f"{prefix}:u:{{{user_tag(f'user-{u}')}}}"
        pipe.set(f"{key}:id", f"user-{u}")
        pipe.rpush(f"{key}:hist", *[f"{t0 + 60 * j!r}{SEP}{rng.choice(ids)}" for j in range(20)])
        if len(pipe) >= 200:
            pipe.execute()
    pipe.execute()
    info = {"heavy_events": client.llen(f"{heavy}:hist"), "used_memory": client.info("memory")["used_memory_human"]}
    client.close()
    return info


def _run_measured(args: list[str], log_path: Path, limit_mib: float) -> tuple[int, float, float, bool]:
    """Run ``args`` (output to ``log_path``); (exit status, wall seconds, peak RSS MiB from wait4's rusage, killed
    by the watchdog because its RSS passed ``limit_mib``)."""
    import os
    import signal
    import subprocess
    import threading

    from harness.launch import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    began = time.monotonic()
    with log_path.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    killed = threading.Event()

    def watch() -> None:
        while not killed.is_set():
            try:
                if _rss_mib(proc.pid) > limit_mib:
                    killed.set()
                    os.kill(proc.pid, signal.SIGKILL)
            except (OSError, StopIteration):
                return
            time.sleep(0.05)

    watchdog = threading.Thread(target=watch, daemon=True)
    watchdog.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    was_killed = killed.is_set()
    killed.set()
    return proc.returncode, seconds, usage.ru_maxrss / 1024, was_killed


@app.command("snapshot-memory")
def snapshot_memory(
    events: Annotated[int, typer.Option(help="History events of the one heavy user (the issue: 3,000,000).")] = (
        3_000_000
    ),
    users: Annotated[int, typer.Option(help="Normal users (20 events each).")] = 2_000,
    caps: Annotated[
        str, typer.Option(help="--max-user-events of each run (comma-separated); 0 = the default (10,000), unset.")
    ] = "0,100000,300000,3000000",
    limit_gb: Annotated[float, typer.Option(help="Kill a snapshot whose RSS passes this (GB).")] = 3.0,
) -> None:
    """`missrec snapshot` (the CLI, a subprocess) over a Redis holding one user with ``events`` events: wall time and
    peak RSS, with the default --max-user-events and with it raised (up to ``events``: every event read)."""
    import json
    import sys

    bundle, _ = script_artefacts()
    ids = bundle_ids(bundle)[1:]
    work = _workdir("snapshot-memory")
    redis_server = RedisServer(work / "redis", aof=False).start()
    prefix = f"snap-{uuid.uuid4().hex[:6]}"
    rows = []
    try:
        began = time.monotonic()
        info = _fill_histories(redis_server.url, prefix, ids, events, users)
        print(f"Redis filled in {time.monotonic() - began:.1f} s: {info}", flush=True)
        for cap in [int(c) or None for c in caps.split(",")]:
            out = work / f"snap-{cap or 'default'}"
            args = [sys.executable, "-m", "missrec_cli.main", "snapshot", "--redis", redis_server.url]
            args += ["--bundle", str(bundle), "--data", str(SHARED / "data" / "scientific"), "--out", str(out)]
            args += ["--prefix", prefix] + (["--max-user-events", str(cap)] if cap else [])
            code, seconds, peak, killed = _run_measured(args, work / f"snap-{cap or 'default'}.log", limit_gb * 1024)
            counts = {}
            if code == 0:
                counts = json.loads((out / "snapshot.json").read_text())["counts"]
            rows.append((cap, code, seconds, peak, killed, counts))
            print(f"cap {cap or 'default (10,000)'}: exit {code}, {seconds:.1f} s, peak RSS {peak:.0f} MiB", flush=True)
    finally:
        redis_server.stop()
    print("| --max-user-events | exit | wall s | peak RSS MiB | users written | events read | events beyond the cap |")
    print("|---|---|---|---|---|---|---|")
    for cap, code, seconds, peak, killed, counts in rows:
        status = f"{code} (killed above {limit_gb:g} GB)" if killed else str(code)
        label = f"{cap:,}" if cap else "default (10,000)"
        got = [f"{counts[k]:,}" if k in counts else "-" for k in ("users_written", "events_read", "events_beyond_cap")]
        print(f"| {label} | {status} | {seconds:.1f} | {peak:.0f} | " + " | ".join(got) + " |")
    if any(code != 0 for _, code, *_ in rows[:1]):
        raise typer.Exit(1)


@app.command()
def overload(
    factor: Annotated[float, typer.Option(help="Open-loop rate as a multiple of the measured capacity.")] = 1.5,
    seconds: Annotated[float, typer.Option(help="Seconds of the open-loop run (after a 3 s warm-up).")] = 20.0,
    probe: Annotated[float, typer.Option(help="Seconds of the closed-loop capacity run (after 2 s warm-up).")] = 8.0,
    users: Annotated[int, typer.Option(help="Closed-loop clients of the capacity run.")] = 32,
    max_queue_ms: Annotated[float, typer.Option(help="MISSREC_MAX_QUEUE_MS of the service (default 500).")] = 500.0,
    max_concurrency: Annotated[
        int, typer.Option(help="MISSREC_MAX_CONCURRENCY of the service (0: its default, 64).")
    ] = 0,
    mix: Annotated[str, typer.Option(help="The locustfile's request mix (the bench's; no ingests here).")] = (
        "user=80,history=7.5,events=12"
    ),
) -> None:
    """Above capacity, open loop: the service's capacity measured closed loop (locust, loadtest/locustfile.py), then
    ``factor`` times that rate for ``seconds``: admitted requests and their latency, the 503s, their latency and
    Retry-After. The real Scientific users' histories are seeded first through the events API (the bench's
    seed_histories). With 2+ cores the service runs on CPU 1, locust, Redis and this script on CPU 0 (as the
    bench)."""
    import asyncio
    import csv
    import json
    import os

    import httpx
    import numpy as np

    from loadtest import procs
    from loadtest.bench import seed_histories
    from loadtest.stats import read_samples, stage_deltas
    from loadtest.traffic import build_traffic, write_traffic

    bundle, clip = script_artefacts()
    work = _workdir("overload")
    real = build_traffic(SHARED / "data" / "scientific", bundle_ids(bundle), None)
    traffic = write_traffic(work / "traffic.json", real)
    service_cpus, client_cpus = ([1], [0]) if (os.cpu_count() or 1) >= 2 else (None, None)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    redis_server = RedisServer(work / "redis").start()
    procs.pin(redis_server.process.pid, client_cpus)
    env = service_env(bundle, redis_server.url, f"over-{uuid.uuid4().hex[:6]}", clip, work, max_queue_ms=max_queue_ms)
    env |= {"MISSREC_MAX_CONCURRENCY": str(max_concurrency)} if max_concurrency else {}
    service = ServiceProcess(env | procs.thread_env(service_cpus), log_path=work / "service.log")
    try:
        print(f"service ready in {service.start():.1f} s; MISSREC_MAX_QUEUE_MS={max_queue_ms:g}, "
              f"MISSREC_MAX_CONCURRENCY={max_concurrency or 'default'}, mix {mix}", flush=True)  # fmt: skip
        procs.pin(service.child.pid, service_cpus)
        print(f"seeded {asyncio.run(seed_histories(service.url, real['users']))} real users' histories", flush=True)
        with procs.CpuMeter({"service": service.child.pid}) as meter:
            runs = work / "runs"
            common = {"mix": mix, "cpus": client_cpus, "meter": meter}
            closed = procs.run_locust(
                service.url, traffic, runs / "capacity", rate=0, users=users, duration=probe + 2, tag="cap", **common
            )
            capacity = read_samples(closed, 2.0)
            print(f"capacity (closed loop, {users} clients): {capacity.achieved:.0f} req/s, p50 {capacity.p50:.1f} ms, "
                  f"p99 {capacity.p99:.1f} ms, {capacity.errors} errors", flush=True)  # fmt: skip
            rate = round(factor * capacity.achieved)
            before = httpx.get(f"{service.url}/metrics", timeout=30).text
            opened = procs.run_locust(
                service.url, traffic, runs / "overload", rate=rate, users=4, duration=seconds + 3, tag="over", **common
            )
            stats = read_samples(opened, 3.0)
            stages = stage_deltas(before, httpx.get(f"{service.url}/metrics", timeout=30).text)
            cpu = (
                meter.usage("service", stats.t_start, stats.t_stop),
                meter.usage("locust", stats.t_start, stats.t_stop),
            )
    finally:
        service.stop()
        redis_server.stop()
    with opened.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if float(r["sched_s"]) >= 3.0]
    meta = json.loads(opened.with_suffix(".json").read_text())

    def lat(status: int, column: str = "latency_ms") -> np.ndarray:
        return np.array([float(r[column]) for r in rows if int(r["status"]) == status])

    def pct(a: np.ndarray, q: float) -> str:
        return f"{np.percentile(a, q):.1f}" if a.size else "-"

    ok, shed = lat(200), lat(503)
    print(f"open loop at {rate} req/s ({factor:g} x capacity) for {stats.window_s:.0f} s: {len(rows)} requests, "
          f"statuses {_statuses([int(r['status']) for r in rows])}; generator lag p99 {stats.lag_p99:.1f} ms; "
          f"CPU service {cpu[0] or 0:.2f}, locust {cpu[1] or 0:.2f} cores")  # fmt: skip
    print("| answer | count | per s | p50 ms | p99 ms | max ms | p99 from the scheduled send ms |")
    print("|---|---|---|---|---|---|---|")
    for label, code, a in (("200 admitted", 200, ok), ("503 shed", 503, shed)):
        sched = lat(code, "latency_sched_ms")
        top = f"{a.max():.1f}" if a.size else "-"
        print(f"| {label} | {a.size} | {a.size / stats.window_s:.0f} | {pct(a, 50)} | {pct(a, 99)} | {top} | "
              f"{pct(sched, 99)} |")  # fmt: skip
    for stage in ("queue", "request"):  # inside the service, from its histograms (bucket estimates)
        h = stages.get(f"stage:{stage}")
        if h is not None:
            print(f"service-side {stage} stage of the open-loop run: {h.count:.0f} observed, "
                  f"p50 {1000 * h.quantile(0.5):.1f} ms, p99 {1000 * h.quantile(0.99):.1f} ms")  # fmt: skip
    print(f"503 answers in the whole run (warm-up included): {meta.get('status_503')}, without Retry-After: "
          f"{meta.get('status_503_without_retry_after')}")  # fmt: skip


if __name__ == "__main__":
    app()
