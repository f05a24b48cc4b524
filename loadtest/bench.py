"""One-command load benchmark: the service vs a bare FastAPI endpoint of the same shapes, at the same fixed rates.

    flock /tmp/missrec-cpu.lock .venv/bin/python -m loadtest.bench --bundle runs/scientific-bundle \\
        --data ../shared/data/scientific --abo ../shared/data/abo-samples --out runs/loadtest/scientific

In one run on one machine: start Redis and the service (`missrec serve`, 1 uvicorn worker) on the bundle, seed the
real users' histories through the events API, find the service's maximum throughput (closed loop, --sat-users
clients without think time), drive it open loop at fixed rates (default: fractions of that maximum), measure
ingest -> visible latency on the same replica and on a second one, then serve the bare app (loadtest/bare_app.py)
the same way and drive it at the same rates. Prints the table (achieved req/s, p50/p95/p99 of both, the ratio of
maximum throughputs), the service's own per-stage timings (/metrics) and CPU per request; flags runs whose load
generator used more than 80 % of a core; writes CSVs, summary.json and latency.png under --out. ``--explain-cost N``
also prices ``explain: true`` for a lone client (N interleaved rounds without and with it, p50 and ratio).

CPU placement (default on machines with >= 2 cores): the service (or bare app) alone on --service-cpus with its
thread pools sized to them; locust, Redis, the second replica and this script on --client-cpus. GPU paths:
--onnx-provider cuda --faiss-device gpu (then usually --no-pin on a larger machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from harness.launch import Child, wait_ready
from harness.ports import free_port
from loadtest import procs
from loadtest.report import GEN_CPU_LIMIT, main_table, print_report, write_outputs
from loadtest.stats import read_samples, stage_deltas
from loadtest.traffic import DEFAULT_MIX

log = logging.getLogger("loadtest.bench")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="serving bundle (missrec export + build-index)")
    p.add_argument("--data", type=Path, required=True, help="dataset whose real users drive the traffic")
    p.add_argument("--abo", type=Path, default=None, help="ABO photos for ingests (default: none, no ingests)")
    p.add_argument("--out", type=Path, required=True, help="output folder (CSVs, summary.json, latency.png)")
    p.add_argument("--rates", type=float, nargs="+", help="fixed target rates in req/s (default: fractions)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 0.9, 1.1])
    p.add_argument(
        "--lone-rate",
        type=float,
        default=5.0,
        help="a fixed rate low enough that requests never overlap (the lone-request latency; 0 = skip)",
    )
    p.add_argument(
        "--lone-closed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run one closed-loop client (back to back: a lone client that never waits between requests)",
    )
    p.add_argument("--duration", type=float, default=20.0, help="seconds per fixed-rate run (after warm-up)")
    p.add_argument("--sat-duration", type=float, default=15.0, help="seconds of the closed-loop maximum run")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds discarded at the start of every run")
    p.add_argument("--users", type=int, default=4, help="locust users sharing an open-loop rate")
    p.add_argument("--sat-users", type=int, default=32, help="concurrent closed-loop clients for the maximum")
    p.add_argument("--mix", default=DEFAULT_MIX, help="relative weights of user, history, events, ingest")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--redis-url", default=None, help="use this Redis (default: start a redis-server)")
    p.add_argument("--redis-fsync", default="always", choices=["always", "everysec"])
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=(os.cpu_count() or 1) >= 2)
    p.add_argument("--service-cpus", default="0")
    p.add_argument("--client-cpus", default="1")
    p.add_argument("--onnx-provider", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--faiss-device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--clip-model", default="missrec-tiny-512", help="open_clip architecture for ingestion")
    p.add_argument("--clip-pretrained", default=None, help="tag or checkpoint (default: random-init, saved once)")
    p.add_argument("--ingest-probes", type=int, default=100, help="ingest -> visible measurements (0 = skip)")
    p.add_argument("--other-replica", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--bare", action=argparse.BooleanOptionalAction, default=True, help="run the bare baseline")
    p.add_argument("--max", action=argparse.BooleanOptionalAction, default=True, help="run the closed-loop maximum")
    p.add_argument("--env", action="append", default=[], help="extra service setting, e.g. MISSREC_MAX_WAIT_MS=1")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of the service (missrec serve)")
    p.add_argument(
        "--model-work",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the model's own work alone (loadtest.model_work, on --service-cpus, batch 1 and 16)",
    )
    p.add_argument(
        "--explain-cost",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="price explain: true: ROUNDS x (one closed-loop client by user id, the same with explain), interleaved",
    )
    p.add_argument("--ready-timeout", type=float, default=900.0)
    args = p.parse_args(argv)
    if not args.pin:
        args.service_cpus = args.client_cpus = ""
    return args


# ----- set-up -----------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    import psutil

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "git": commit.stdout.strip(),
    }


def memory_mib(pid: int) -> dict[str, Any]:
    """Resident and peak resident memory (VmRSS, VmHWM) of a live process, MiB; with worker processes (uvicorn
    --workers) also each worker's RSS and PSS (proportional set size: pages shared with the others, e.g. the
    memory-mapped bundle in the page cache, counted once across them)."""
    import psutil

    fields = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in ln)
    out: dict[str, Any] = {
        k: round(int(fields[f].split()[0]) / 1024, 1) for k, f in (("rss_mib", "VmRSS"), ("peak_rss_mib", "VmHWM"))
    }
    workers = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            info = child.memory_full_info()
            workers.append(
                {"pid": child.pid, "rss_mib": round(info.rss / 2**20, 1), "pss_mib": round(info.pss / 2**20, 1)}
            )
        except psutil.Error:
            continue
    if workers:
        out["workers"] = workers
    return out


def clip_checkpoint(model: str, cache: Path) -> str:
    """A RANDOM-INIT open_clip checkpoint of ``model``, saved once under cache (no weights can be downloaded)."""
    path = cache / f"clip-random-{model}.pt"
    if not path.is_file():
        from clip_features.torch_encoder import save_random_init_checkpoint

        save_random_init_checkpoint(model, path, seed=0)
    return str(path.resolve())


async def seed_histories(url: str, users: list[dict], concurrency: int = 8, headers: dict | None = None) -> int:
    """Every user's history through POST /v1/users/{id}/events (what a production backfill would do)."""
    from urllib.parse import quote

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30.0, headers=headers) as client:

        async def one(u: dict) -> int:
            async with sem:
                r = await client.post(f"/v1/users/{quote(u['id'], safe='')}/events", json={"item_ids": u["history"]})
                return r.status_code

        codes = await asyncio.gather(*(one(u) for u in users))
    bad = [c for c in codes if c != 200]
    if bad:
        raise RuntimeError(f"seeding histories: {len(bad)} calls failed (status {bad[0]})")
    return len(codes)


# ----- runs -------------------------------------------------------------------------------------------------------
def one_run(
    name: str, url: str, rate: float, args, ctx: dict, scrape: bool, users: int | None = None, mix: str | None = None
) -> dict[str, Any]:
    """A locust run against url; RunStats + CPU of every metered process + (service) per-stage deltas."""
    before = httpx.get(f"{url}/metrics", timeout=10).text if scrape else ""
    users = users or (args.sat_users if rate <= 0 else args.users)
    duration = (args.sat_duration if rate <= 0 else args.duration) + args.warmup
    samples = procs.run_locust(
        url, ctx["traffic"], ctx["runs"] / name, rate=rate, users=users, duration=duration, mix=mix or args.mix,
        tag=f"{ctx['run_id']}-{name}", cpus=ctx["client_cpus"], meter=ctx["meter"], k=args.k,
    )  # fmt: skip
    stats = read_samples(samples, args.warmup)
    after = httpx.get(f"{url}/metrics", timeout=10).text if scrape else ""
    meter: procs.CpuMeter = ctx["meter"]
    cpu = {p: meter.usage(p, stats.t_start, stats.t_stop) for p in meter.samples}
    result = {"name": name, "stats": stats, "cpu": cpu, "stages": stage_deltas(before, after) if scrape else {}}
    gen = cpu.get("locust") or 0.0
    log.info(
        "%-16s target %6.0f achieved %7.1f req/s  p50 %6.2f p95 %6.2f p99 %7.2f ms  errors %d  gen CPU %.0f%%%s",
        name, rate, stats.achieved, stats.p50, stats.p95, stats.p99, stats.errors, 100 * gen,
        "  GENERATOR-BOUND" if gen > GEN_CPU_LIMIT else "",
    )  # fmt: skip
    return result


def drive(label: str, url: str, rates: list[float] | None, args, ctx: dict, scrape: bool) -> list[dict]:
    """Closed-loop maximum, then the fixed rates (given, or fractions of this target's maximum)."""
    results = [one_run(f"{label}-max", url, 0.0, args, ctx, scrape)] if args.max or rates is None else []
    if rates is None:
        top = results[0]["stats"].achieved
        rates = sorted({max(1.0, round(f * top)) for f in args.fractions} | ({args.lone_rate} - {0.0}))
    for r in rates:
        results.append(one_run(f"{label}-r{r:g}", url, r, args, ctx, scrape))
    if args.lone_closed:  # one client, the next request sent as soon as the answer arrives
        results.append(one_run(f"{label}-c1", url, -1.0, args, ctx, scrape, users=1))
    return results


def explain_cost(url: str, args, ctx: dict) -> dict[str, Any]:
    """What ``explain: true`` costs a lone client: one closed-loop client recommending by user id, without and with
    explain, ``args.explain_cost`` rounds interleaved (plain, explained, plain, ...) so that drift hits both."""
    rounds = []
    for r in range(args.explain_cost):
        pair = {}
        for kind in ("user", "explain"):
            run = one_run(f"service-c1-{kind}-{r}", url, -1.0, args, ctx, scrape=False, users=1, mix=f"{kind}=1")
            pair[kind] = run["stats"]
        rounds.append(pair)
    plain = [p["user"].p50 for p in rounds]
    explained = [p["explain"].p50 for p in rounds]
    errors = sum(p[k].errors for p in rounds for k in p)
    out = {
        "rounds": [{"plain_p50_ms": a, "explain_p50_ms": b} for a, b in zip(plain, explained, strict=True)],
        "plain_p50_ms": float(statistics.median(plain)), "explain_p50_ms": float(statistics.median(explained)),
        "errors": errors,
        "plain_p99_ms": float(statistics.median([p["user"].p99 for p in rounds])),
        "explain_p99_ms": float(statistics.median([p["explain"].p99 for p in rounds])),
    }  # fmt: skip
    out["ratio_p50"] = out["explain_p50_ms"] / out["plain_p50_ms"]
    log.info(
        "explain cost (one closed-loop client, median of %d rounds): p50 %.2f -> %.2f ms (x%.2f), p99 %.2f -> %.2f"
        " ms, errors %d",
        len(rounds), out["plain_p50_ms"], out["explain_p50_ms"], out["ratio_p50"], out["plain_p99_ms"],
        out["explain_p99_ms"], errors,
    )  # fmt: skip
    return out


def model_work(args, env: dict[str, str], cpus: list[int] | None, out: Path) -> dict | None:
    """The model's own work per user alone (loadtest.model_work at batch 1 and 16, on the service's CPUs, with the
    service's code: its PYTHONPATH), microseconds per stage."""
    path = out / "model_work.json"
    script = str(Path(__file__).with_name("model_work.py"))  # a file: the service's own modules come from its path
    cmd = [sys.executable, script, "--bundle", str(args.bundle), "--data", str(args.data),
           "--batches", "1", "16", "--repeats", "200", "--k", str(args.k), "--json", str(path)]  # fmt: skip
    if cpus:
        cmd = ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
    run_env = os.environ | procs.thread_env(cpus) | {"PYTHONPATH": env.get("PYTHONPATH", os.getcwd())}
    done = subprocess.run(cmd, env=run_env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        log.warning("model work not measured: %s", done.stderr.strip().splitlines()[-1:] or done.returncode)
        return None
    log.info("model work alone:\n%s", done.stdout.strip())
    return json.loads(path.read_text(encoding="utf-8"))["rows"]


# ----- main -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    began = time.monotonic()
    out, run_id, service_cpus, client_cpus = procs.begin_run(args.out, "lt", args.service_cpus, args.client_cpus)
    info = machine()
    log.info("run %s on %s (%s cores), load average %s", run_id, info["cpu"], info["cores"], info["load_avg_at_start"])

    from loadtest.traffic import build_traffic, write_traffic

    bundle_ids = json.loads((args.bundle / "items/ids.json").read_text(encoding="utf-8"))
    manifest = json.loads((args.bundle / "manifest.json").read_text(encoding="utf-8"))
    traffic = build_traffic(args.data, bundle_ids, args.abo)
    ctx: dict[str, Any] = {
        "run_id": run_id, "traffic": write_traffic(out / "traffic.json", traffic), "runs": out / "runs",
        "client_cpus": client_cpus,
    }  # fmt: skip
    log.info("traffic: %d real users, %d items, %d product photos", len(traffic["users"]), len(traffic["items"]),
             len(traffic["products"]))  # fmt: skip
    pretrained = args.clip_pretrained or clip_checkpoint(args.clip_model, out.parent)

    children: list[Child] = []
    redis_server = None
    try:
        url_redis = args.redis_url
        if not url_redis:
            from service.embedded_redis import EmbeddedRedis

            redis_server = EmbeddedRedis(out / "redis", port=free_port(), fsync=args.redis_fsync)
            url_redis = redis_server.start()
            procs.pin(redis_server.process.pid, client_cpus)
        env = {
            "MISSREC_REDIS_URL": url_redis, "MISSREC_KEY_PREFIX": run_id, "MISSREC_DATA_DIR": str(out / "state"),
            "MISSREC_CLIP_MODEL": args.clip_model, "MISSREC_CLIP_PRETRAINED": pretrained,
            "MISSREC_ONNX_PROVIDER": args.onnx_provider, "MISSREC_FAISS_DEVICE": args.faiss_device,
        }  # fmt: skip
        env |= dict(e.split("=", 1) for e in args.env)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        svc = procs.serve_service(args.bundle.resolve(), port, out / "logs", env, service_cpus, workers=args.workers)
        children.append(svc)
        load_s = wait_ready(url, svc, args.ready_timeout)
        checks = httpx.get(f"{url}/readyz").json()["checks"]
        log.info("service ready in %.1f s: %s", load_s, checks)
        pids = {"service": svc.pid} | ({"redis": redis_server.process.pid} if redis_server else {})
        with procs.CpuMeter(pids) as meter:
            ctx["meter"] = meter
            seeded = asyncio.run(seed_histories(url, traffic["users"]))
            log.info("seeded %d user histories through the events API", seeded)
            service_runs = drive("service", url, args.rates, args, ctx, scrape=True)
            explained = explain_cost(url, args, ctx) if args.explain_cost else None
            memory = memory_mib(svc.pid)
            log.info("service memory: %s", memory)
            rates = [r["stats"].target for r in service_runs if r["stats"].target > 0]
            ingest = None
            if args.ingest_probes and traffic["products"]:
                from loadtest.ingest_latency import measure

                others = []
                if args.other_replica:
                    port_b = free_port()
                    b = procs.serve_service(args.bundle.resolve(), port_b, out / "logs", env, client_cpus, "replica-b")
                    children.append(b)
                    wait_ready(f"http://127.0.0.1:{port_b}", b, args.ready_timeout)
                    others.append(f"http://127.0.0.1:{port_b}")
                ingest = measure(url, others, traffic["products"], n=args.ingest_probes, tag=f"{run_id}-probe")
                log.info("ingest -> visible: %s", json.dumps(ingest))
                for child in children[1:]:
                    child.stop()
            svc.stop()
            work = model_work(args, env, service_cpus, out) if args.model_work else None
            bare_runs: list[dict] = []
            if args.bare:
                port = free_port()
                bare = procs.serve_bare(port, out / "logs", service_cpus)
                children.append(bare)
                wait_ready(f"http://127.0.0.1:{port}", bare, 60)
                meter.add("service", bare.pid)
                bare_runs = drive("bare", f"http://127.0.0.1:{port}", rates, args, ctx, scrape=False)
                bare.stop()
        rows = main_table(service_runs, bare_runs)
        summary = {
            "run_id": run_id, "command": "python -m loadtest.bench " + " ".join(sys.argv[1:]), "machine": info,
            "bundle": str(args.bundle),
            "items": manifest["num_items"] - 1, "index": (manifest.get("index") or {}).get("factory"),
            "index_params": (manifest.get("index") or {}).get("params"), "service_load_s": round(load_s, 1),
            "service_memory": memory,
            "readyz": checks, "pinning": {"service": service_cpus, "clients": client_cpus},
            "settings": {k: v for k, v in env.items() if k not in ("MISSREC_REDIS_URL",)}, "mix": args.mix,
            "rates": rates, "ingest": ingest, "table": rows, "model_work": work, "explain_cost": explained,
        }  # fmt: skip
        args.model_work_rows = work
        summary |= print_report(rows, service_runs, bare_runs, ingest, args)
        summary["elapsed_s"] = round(time.monotonic() - began, 1)
        write_outputs(out, rows, service_runs, bare_runs, summary)
        log.info("done in %.0f s; outputs in %s", summary["elapsed_s"], out)
        return summary
    finally:
        for child in children:
            child.stop()
        if redis_server is not None:
            redis_server.stop()


if __name__ == "__main__":
    main()
