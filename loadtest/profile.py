"""Where the service's CPU goes under load: the service as loadtest.bench runs it, sampled by py-spy.

    python -m loadtest.profile --bundle runs/scientific-bundle --data ../shared/data/scientific \\
        --out runs/profile/scientific [--rate 100 | --clients 16] [--seconds 30]

Starts a redis-server and the service exactly as ``loadtest.bench`` does (``missrec serve``, one uvicorn worker,
pinned alone on --service-cpus with its thread pools sized to them; Redis, locust, py-spy and this script on
--client-cpus), seeds the real users' histories through the events API, drives recommend-heavy traffic with the
bench's locustfile (open loop at --rate req/s, or closed loop with --clients), and after --warmup seconds records
--seconds of the service with ``py-spy record --format raw`` (``--native`` where py-spy can unwind native frames
here). Writes under --out:

- ``profile.txt``: the raw collapsed stacks (``frame;frame;... count``, root first), for flame graphs;
- ``summary.md`` / ``summary.json``: % of samples per bucket (grouping rules: ``loadtest.stacks.RULES``), the top
  functions by self and by inclusive samples, requests served and CPU ms per request (CPU time of the service
  process from /proc, as bench measures it).

What the samples are: py-spy samples the service's Python threads (idle ones left out), so ONNX Runtime and FAISS
work is seen only when it runs on the calling thread (intra-op threads = 1, OMP_NUM_THREADS = 1, as the pinned
one-core service runs). py-spy pauses the process for each sample (~0.1-0.3 ms at 100 Hz): latencies measured
here are not the bench's; the shares are what to read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness.launch import Child, start, wait_ready
from harness.ports import free_port
from loadtest import procs
from loadtest.stacks import Profile, parse_collapsed, summarise
from loadtest.stats import read_samples

log = logging.getLogger("loadtest.profile")

PROFILE_MIX = "user=90,history=10"  # recommend only: by user id (history from Redis) and by explicit history
TOP_N = 25


class ProfilerMissing(RuntimeError):
    """py-spy is not installed (or cannot sample here)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.profile", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="serving bundle (missrec export + build-index)")
    p.add_argument("--data", type=Path, required=True, help="dataset whose real users drive the traffic")
    p.add_argument("--out", type=Path, required=True, help="output folder (profile.txt, summary.md, summary.json)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=None, help="open loop: total req/s (default 100)")
    load.add_argument("--clients", type=int, default=None, help="closed loop: concurrent clients, no think time")
    p.add_argument("--users", type=int, default=4, help="locust users sharing an open-loop rate")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds profiled (after the warm-up)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of traffic before sampling starts")
    p.add_argument("--sample-rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--native", action=argparse.BooleanOptionalAction, default=None,
                   help="py-spy --native (default: when py-spy can unwind native frames here)")  # fmt: skip
    p.add_argument("--mix", default=PROFILE_MIX, help="relative weights of user, history, events, ingest")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=(os.cpu_count() or 1) >= 2)
    p.add_argument("--service-cpus", default="0")
    p.add_argument("--client-cpus", default="1")
    p.add_argument("--env", action="append", default=[], help="extra service setting, e.g. MISSREC_MAX_WAIT_MS=1")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    if args.clients is None and args.rate is None:
        args.rate = 100.0
    if (args.clients is not None and args.clients < 1) or (args.rate is not None and args.rate <= 0):
        p.error("--rate must be > 0 and --clients >= 1")
    if not args.pin:
        args.service_cpus = args.client_cpus = ""
    return args


# ----- py-spy -----------------------------------------------------------------------------------------------------
def py_spy() -> str:
    """Path of the py-spy executable (next to this Python, else on PATH); ProfilerMissing when there is none."""
    here = Path(sys.executable).with_name("py-spy")
    found = str(here) if here.is_file() else shutil.which("py-spy")
    if not found:
        raise ProfilerMissing(
            "py-spy is not installed: `pip install py-spy` (it is in the dev extra: pip install -e '.[dev]'); "
            "it needs ptrace rights over the service (root, or kernel.yama.ptrace_scope = 0)"
        )
    return found


def native_works(exe: str) -> bool:
    """Whether ``py-spy record --native`` can sample a short Python child on this machine."""
    probe = [exe, "record", "--native", "--format", "raw", "-o", os.devnull, "-d", "1", "--"]
    probe += [sys.executable, "-c", "import time; t = time.time()\nwhile time.time() - t < 0.5: pass"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=60, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def record_args(exe: str, pid: int, out: Path, seconds: float, rate: int, native: bool) -> list[str]:
    args = [exe, "record", "--pid", str(pid), "--format", "raw", "-o", str(out), "-r", str(rate)]
    return args + ["-d", str(max(1, round(seconds)))] + (["--native"] if native else [])


# ----- the report -------------------------------------------------------------------------------------------------
def summary_markdown(s: dict[str, Any]) -> str:
    """summary.md: the run, the bucket table and the two top-function tables."""
    lines = [
        f"# Profile of the service: {s['load']}",
        "",
        f"{s['date']}, commit {s['git']}, bundle `{s['bundle']}`; py-spy {s['sample_rate']} Hz"
        f"{' --native' if s['native'] else ''}, {s['seconds']:.0f} s after {s['warmup']:.0f} s of warm-up.",
        "",
        f"- requests served in the window: {s['requests']} ({s['achieved_rps']} req/s, {s['errors']} errors), "
        f"client p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms (py-spy pauses the process for each sample)",
        f"- service CPU: {s['service_cpu']} of a core, **{s['cpu_ms_per_request']} CPU ms per request**",
        f"- samples: {s['samples']}, of which {s['working_samples']} working (py-spy errors: {s['py_spy_errors']})",
        "",
        "| bucket | samples | % of working samples |",
        "|---|---|---|",
        *(f"| {b['bucket']} | {b['samples']} | {b['pct']} |" for b in s["buckets"] if "pct" in b),
        *(f"| *{b['bucket']}* | {b['samples']} | ({b['pct_of_all']} % of all samples) |"
          for b in s["buckets"] if "pct_of_all" in b),
    ]  # fmt: skip
    for which, title in (("top_self", "self"), ("top_inclusive", "inclusive")):
        lines += ["", f"Top {len(s[which])} functions by {title} samples:", "", "| function | samples | % of working |"]
        lines += ["|---|---|---|", *(f"| `{r['function']}` | {r['samples']} | {r['pct']} |" for r in s[which])]
    return "\n".join(lines) + "\n"


def profile_summary(profile: Profile) -> dict[str, Any]:
    return {
        "samples": profile.samples,
        "working_samples": profile.working,
        "buckets": profile.bucket_table(),
        "top_self": profile.top("self", TOP_N),
        "top_inclusive": profile.top("inclusive", TOP_N),
    }


# ----- main -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    exe = py_spy()  # before anything starts: fail fast
    native = native_works(exe) if args.native is None else args.native
    out, run_id, service_cpus, client_cpus = procs.begin_run(args.out, "pf", args.service_cpus, args.client_cpus)

    from loadtest.bench import machine, seed_histories
    from loadtest.traffic import build_traffic, write_traffic

    info = machine()
    bundle_ids = json.loads((args.bundle / "items/ids.json").read_text(encoding="utf-8"))
    traffic = build_traffic(args.data, bundle_ids, None)
    traffic_path = write_traffic(out / "traffic.json", traffic)
    rate, users = (0.0, args.clients) if args.clients else (args.rate, args.users)
    load = f"closed loop, {users} clients" if rate <= 0 else f"open loop at {rate:g} req/s"
    log.info("profile %s: %s, %d real users, py-spy %s", run_id, load, len(traffic["users"]), exe)

    from service.embedded_redis import EmbeddedRedis

    redis_server = EmbeddedRedis(out / "redis", port=free_port(), fsync="always")
    children: list[Child] = []
    try:
        url_redis = redis_server.start()
        procs.pin(redis_server.process.pid, client_cpus)
        env = {
            "MISSREC_REDIS_URL": url_redis, "MISSREC_KEY_PREFIX": run_id, "MISSREC_DATA_DIR": str(out / "state"),
            "MISSREC_CLIP_PRETRAINED": "",  # ingestion off: no torch in the process, recommend traffic only
        }  # fmt: skip
        env |= dict(e.split("=", 1) for e in args.env)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        svc = procs.serve_service(args.bundle.resolve(), port, out / "logs", env, service_cpus)
        children.append(svc)
        load_s = wait_ready(url, svc, args.ready_timeout)
        log.info("service ready in %.1f s", load_s)
        with procs.CpuMeter({"service": svc.pid}) as meter:
            seeded = asyncio.run(seed_histories(url, traffic["users"]))
            log.info("seeded %d user histories; driving %s for %.0f s", seeded, load, args.warmup + args.seconds)
            samples = out / "runs" / "profile.csv"
            samples.parent.mkdir(parents=True, exist_ok=True)
            locust = start("locust", procs.locust_args(
                url, traffic_path, samples.with_suffix(""), rate=rate, users=users,
                duration=args.warmup + args.seconds, mix=args.mix, tag=run_id, k=args.k,
            ), out / "logs", {}, client_cpus)  # fmt: skip
            children.append(locust)
            time.sleep(args.warmup)
            spy_args = record_args(exe, svc.pid, out / "profile.txt", args.seconds, args.sample_rate, native)
            spy = start("py-spy", spy_args, out / "logs", {}, client_cpus)
            children.append(spy)
            if spy.proc.wait(args.seconds + 120) != 0 or not (out / "profile.txt").is_file():
                raise ProfilerMissing(f"py-spy failed ({spy.proc.returncode}):\n{spy.tail()}")
            locust.proc.wait(args.seconds + 120)
            stats = read_samples(samples, args.warmup)
            cpu = meter.usage("service", stats.t_start, stats.t_stop)
        spy_log = spy.tail(5)
        errors = next((ln.rsplit("Errors:", 1)[1].strip() for ln in spy_log.splitlines() if "Errors:" in ln), "?")
        profile = summarise(parse_collapsed((out / "profile.txt").read_text(encoding="utf-8").splitlines()))
        summary: dict[str, Any] = {
            "run_id": run_id, "command": "python -m loadtest.profile " + " ".join(sys.argv[1:]),
            "date": info["date"], "git": info["git"], "machine": info, "bundle": str(args.bundle), "load": load,
            "rate": rate, "clients": users, "mix": args.mix, "seconds": args.seconds, "warmup": args.warmup,
            "sample_rate": args.sample_rate, "native": native, "py_spy_errors": errors,
            "pinning": {"service": service_cpus, "clients": client_cpus},
            "settings": {k: v for k, v in env.items() if k != "MISSREC_REDIS_URL"},
            "requests": stats.requests - stats.errors, "errors": stats.errors,
            "achieved_rps": round(stats.achieved, 1), "p50_ms": round(stats.p50, 2), "p99_ms": round(stats.p99, 2),
            "service_cpu": round(cpu, 3) if cpu is not None else None,
            "cpu_ms_per_request": round(1e3 * cpu / stats.achieved, 2) if cpu and stats.achieved else None,
        }  # fmt: skip
        summary |= profile_summary(profile)
        (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        (out / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
        print(summary_markdown(summary))
        return summary
    finally:
        for child in reversed(children):
            child.stop()
        redis_server.stop()


if __name__ == "__main__":
    try:
        main()
    except ProfilerMissing as exc:
        sys.exit(f"loadtest.profile: {exc}")
