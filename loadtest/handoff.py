"""What the hop from the event loop to the batch worker and back costs, per lone request.

    flock /tmp/missrec-cpu.lock taskset -c 0 python -m loadtest.handoff [--requests 5000]
    flock /tmp/missrec-cpu.lock taskset -c 0 env PYTHONPATH=<another checkout> python -m loadtest.handoff  # before

One client awaits ``MicroBatcher.submit`` back to back with a batch function that does nothing, so the time is the
hand-off alone (queue, thread wake-up, result back to the loop), next to the floor of a plain ``await`` of a done
coroutine and of ``loop.run_in_executor`` (one thread hop each way). Prints p50 / p99 microseconds per request and
the CPU microseconds per request of this process. Works with either batcher signature (with or without an
executor argument), so the same script measures the checkout it runs in.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service.micro_batch import MicroBatcher


def _noop(xs: list[int]) -> list[int]:
    return xs


async def _timed(call, n: int) -> tuple[float, float, float]:
    for _ in range(200):
        await call()
    t = np.empty(n)
    cpu = time.process_time()
    for i in range(n):
        s = time.perf_counter()
        await call()
        t[i] = time.perf_counter() - s
    cpu = time.process_time() - cpu
    return float(np.percentile(t, 50) * 1e6), float(np.percentile(t, 99) * 1e6), cpu * 1e6 / n


async def run(n: int) -> dict[str, tuple[float, float, float]]:
    pool = ThreadPoolExecutor(1)
    loop = asyncio.get_running_loop()
    params = inspect.signature(MicroBatcher).parameters
    extra = {"executor": pool} if "executor" in params else {}
    batcher = MicroBatcher(_noop, 64, 0.002, **extra)  # the service's defaults: 2 ms, adaptive linger
    batcher.start()

    async def nothing() -> None:
        return None

    try:
        return {
            "plain await (floor)": await _timed(nothing, n),
            "run_in_executor (one thread hop each way)": await _timed(
                lambda: loop.run_in_executor(pool, _noop, [1]), n
            ),
            "MicroBatcher.submit (lone, back to back)": await _timed(lambda: batcher.submit(1), n),
        }
    finally:
        await batcher.stop()
        pool.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.handoff", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=5000)
    args = p.parse_args(argv)
    rows = asyncio.run(run(args.requests))
    print(f"| hand-off ({args.requests} lone requests) | p50 us | p99 us | CPU us/request |")
    print("|---|---|---|---|")
    for name, (p50, p99, cpu) in rows.items():
        print(f"| {name} | {p50:.1f} | {p99:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
