"""Reliability scenarios at full size (the CI-sized versions are tests/test_fuzz.py, test_reliability.py and
test_durability.py); their figures are in docs/reliability.md.

    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/reliability.py fuzz [--examples 60] [--random]
    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/reliability.py outage [--mode kill|stop|both] [--outage 10]
    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/reliability.py durability [--rounds 4] [--threads 6]

Every scenario uses real components: a bundle trained on the real Scientific data (built once under
var/reliability/), a redis-server of its own (AOF, appendfsync always), the real ABO photos through open_clip
(random-init weights: none can be downloaded here), and the service as a real uvicorn process where it is killed.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated

import typer

from harness.launch import ROOT, SHARED, RedisServer, ServiceProcess, bundle_ids, script_artefacts, service_env
from harness.outage import run_outage

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Reliability scenarios at full size: fuzz, outage, durability."
)
WORK = ROOT / "var" / "reliability"


def _workdir(name: str) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=WORK))


@app.command()
def fuzz(
    examples: Annotated[int, typer.Option(help="Cases per operation and generation mode (17 of them).")] = 60,
    random: Annotated[bool, typer.Option("--random", help="A fresh random seed instead of the fixed one.")] = False,
    failures: Annotated[int, typer.Option(help="How many findings to print in full.")] = 10,
) -> None:
    """Schemathesis over every operation of the OpenAPI schema, positive and negative cases."""
    from harness.fuzz import run_fuzz
    from harness.launch import make_app

    bundle, clip = script_artefacts()
    work = _workdir("fuzz")
    redis_server = RedisServer(work / "redis").start()
    try:
        service = make_app(bundle, redis_server.url, "fuzz", clip, work)
        report = run_fuzz(service, bundle_ids(bundle)[1:], examples, derandomize=not random)
    finally:
        redis_server.stop()
    print(report.summary())
    for operation, n in sorted(report.by_operation.items()):
        print(f"  {operation}: {n}")
    for finding in report.failures[:failures]:
        print("----\n" + finding)
    if report.server_errors or report.schema_violations:
        raise typer.Exit(1)


@app.command()
def outage(
    mode: Annotated[
        str, typer.Option(help="kill (SIGKILL, restart on the same AOF), stop (SIGSTOP), or both.")
    ] = "both",
    workers: Annotated[int, typer.Option(help="Client threads.")] = 16,
    before: Annotated[float, typer.Option(help="Seconds of load before the outage.")] = 3.0,
    outage_s: Annotated[float, typer.Option("--outage", help="Seconds without Redis.")] = 10.0,
    after: Annotated[float, typer.Option(help="Seconds of load after Redis is back.")] = 5.0,
) -> None:
    """Take Redis away under load from the service running as a real process, then bring it back."""
    if mode not in ("kill", "stop", "both"):
        raise typer.BadParameter("kill, stop or both", param_hint="--mode")
    bundle, clip = script_artefacts()
    ids = bundle_ids(bundle)[1:50]
    bad = False
    for m in ("kill", "stop") if mode == "both" else (mode,):
        work = _workdir(f"outage-{m}")
        redis_server = RedisServer(work / "redis").start()
        service = ServiceProcess(
            service_env(bundle, redis_server.url, f"outage-{uuid.uuid4().hex[:6]}", clip, work),
            log_path=work / "service.log",
        )
        try:
            print(
                f"service ready in {service.start():.1f} s; {workers} workers, Redis away for {outage_s:g} s",
                flush=True,
            )
            report = run_outage(service.url, redis_server, ids, m, workers, before, outage_s, after)
        finally:
            service.stop()
            redis_server.stop()
        print("\n".join(report.lines()), flush=True)
        bad |= bool(report.unexpected or report.wrong_during_outage or report.failed_after_return)
        bad |= report.events_acknowledged != report.acknowledged_found or report.slowest_overall_s >= 1.0
    if bad:
        raise typer.Exit(1)


@app.command()
def durability(
    rounds: Annotated[int, typer.Option(help="SIGKILLs; every second one takes the redis-server down too.")] = 4,
    threads: Annotated[int, typer.Option(help="Threads streaming events (one more ingests and deletes).")] = 6,
    stream: Annotated[float, typer.Option(help="Seconds of writes before each SIGKILL (at least).")] = 5.0,
) -> None:
    """SIGKILL the service (and, every other round, Redis) during a stream of writes; restart; check every write."""
    from harness.durability import run_durability

    bundle, clip = script_artefacts()
    modes = tuple("service" if r % 2 == 0 else "service+redis" for r in range(rounds))
    started = time.monotonic()
    report = run_durability(
        bundle, clip, SHARED / "data" / "abo-samples", _workdir("durability"), modes, threads, stream, min_acks=5
    )
    print("\n".join(report.lines()))
    print(f"total {time.monotonic() - started:.1f} s")
    for line in report.missing[:20] + report.deleted_served[:20] + report.log_leaks[:5]:
        print("  !", line)
    if report.missing or report.duplicated or report.deleted_served or report.log_leaks:
        raise typer.Exit(1)
    if report.live_items_index != report.live_items_redis:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
