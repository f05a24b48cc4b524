"""ONNX Runtime session options for the user tower, side by side: threads, spinning, optimisation level, IO binding.

    python -m loadtest.ort_options --bundle runs/scientific-bundle --data ../shared/data/scientific [--repeats 200]

Times the bundle's user tower (``session.run`` on feeds built beforehand by ``UserTower.inputs``, so only the
session differs) over the real users' histories of --data (their test histories, the last 50 items, as the load
bench sends them) at batch 1 and batch 16, for every combination of:

- intra-op threads: 1, 2, 0 (ONNX Runtime's default: one per physical core);
- intra-op spinning on / off (session config entry ``session.intra_op.allow_spinning``; no pool with one thread);
- graph optimisation level: BASIC, EXTENDED, ALL;
- plain ``session.run`` vs IO binding (``session.io_binding()``, inputs bound per call, the output bound once to
  a preallocated buffer).

Per combination: p50 / p99 wall ms per call and CPU ms per call (process CPU time of all threads over the timed
calls / calls: what spinning threads burn shows here, not in the wall time), after --warmup discarded calls. Every
combination's user vectors are checked against the serving options' (``serving_core.towers.session_options``) to
within 1e-4. Prints the table, writes the rows to --out (JSON). Run it alone on the machine (``flock``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from serving_core.bundle import read_bundle
from serving_core.towers import SPINNING, USER_OUTPUT, UserTower, load_towers, session_options

LEVELS = {
    "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
TOLERANCE = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.ort_options", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="serving bundle (missrec export)")
    p.add_argument("--data", type=Path, required=True, help="dataset whose real users' histories are encoded")
    p.add_argument("--repeats", type=int, default=200, help="timed calls per combination and batch size")
    p.add_argument("--warmup", type=int, default=20, help="discarded calls before timing")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 0], help="intra-op threads (0 = ORT default)")
    p.add_argument("--spinning", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS))
    p.add_argument("--io-binding", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--out", type=Path, default=Path("runs/ort-options.json"), help="JSON of the rows")
    return p.parse_args(argv)


def real_feeds(tower: UserTower, bundle_ids: list[str], data: Path, batch: int, n: int) -> list[dict[str, Any]]:
    """n feeds of ``batch`` consecutive real users each (cycling over the users), built like the service builds them."""
    from loadtest.traffic import build_traffic

    rows = {item: r for r, item in enumerate(bundle_ids) if r > 0}
    users = build_traffic(data, bundle_ids, None)["users"]
    histories = [np.array([rows[i] for i in u["history"]], dtype=np.int64) for u in users]
    return [tower.inputs([histories[(k * batch + b) % len(histories)] for b in range(batch)]) for k in range(n)]


def open_with(path: Path, threads: int, spinning: bool, level: str) -> ort.InferenceSession:
    options = session_options(threads, spinning)
    options.graph_optimization_level = LEVELS[level]
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def runner(session: ort.InferenceSession, io_binding: bool, batch: int, dim: int):
    """A call feeds -> (batch, dim) user vectors: session.run, or IO binding with the output preallocated once."""
    if not io_binding:
        return lambda feeds: session.run([USER_OUTPUT], feeds)[0]
    out = np.empty((batch, dim), dtype=np.float32)
    binding = session.io_binding()
    binding.bind_output(USER_OUTPUT, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        session.run_with_iobinding(binding)
        return out

    return run


def measure(call, feeds: list[dict[str, Any]], repeats: int, warmup: int) -> dict[str, float]:
    """p50 / p99 wall ms per call and CPU ms per call (process CPU time, every thread) of ``repeats`` calls."""
    for k in range(warmup):
        call(feeds[k % len(feeds)])
    wall = np.empty(repeats)
    cpu0 = time.process_time()
    for k in range(repeats):
        start = time.perf_counter()
        call(feeds[k % len(feeds)])
        wall[k] = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    return {
        "p50_ms": float(np.percentile(wall, 50) * 1e3),
        "p99_ms": float(np.percentile(wall, 99) * 1e3),
        "mean_ms": float(wall.mean() * 1e3),
        "cpu_ms_per_call": cpu * 1e3 / repeats,
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (batch, threads, spinning, level, io binding), in that nesting order."""
    bundle = read_bundle(args.bundle)
    towers = load_towers(args.bundle, "cpu")  # the serving options: the reference vectors
    path = bundle.root / bundle.manifest.graphs["user"].file
    rows = []
    for batch in args.batches:
        feeds = real_feeds(towers.user, list(bundle.table.ids), args.data, batch, min(args.repeats, 256))
        reference = [towers.user.run(f) for f in feeds]
        dim = reference[0].shape[1]
        combos = itertools.product(args.threads, args.spinning, args.levels, args.io_binding)
        for threads, spinning, level, binding in combos:
            session = open_with(path, threads, spinning == "on", level)
            if session.get_session_options().get_session_config_entry(SPINNING) != ("1" if spinning == "on" else "0"):
                raise AssertionError(f"the session did not take {SPINNING}={spinning}")
            call = runner(session, binding == "on", batch, dim)
            diff = max(float(np.abs(call(f) - r).max()) for f, r in zip(feeds[:16], reference[:16], strict=False))
            if diff > TOLERANCE:
                raise AssertionError(f"threads {threads} spinning {spinning} {level} io {binding}: |diff| {diff:.2e}")
            row = {"batch": batch, "threads": threads, "spinning": spinning, "level": level, "io_binding": binding}
            rows.append(row | measure(call, feeds, args.repeats, args.warmup) | {"max_abs_diff": diff})
            del session, call
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = "| batch | threads | spinning | level | IO binding | p50 ms | p99 ms | CPU ms/call | CPU / wall |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['threads'] or 'default'} | {r['spinning']} | {r['level']} | {r['io_binding']} "
            f"| {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['cpu_ms_per_call']:.3f} "
            f"| {r['cpu_ms_per_call'] / max(r['mean_ms'], 1e-9):.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    rows = run(args)
    print(
        f"User tower session options ({args.repeats} calls each after {args.warmup} discarded; onnxruntime "
        f"{ort.__version__}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"load average at end {os.getloadavg()[0]:.2f})"
    )
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "bundle": str(args.bundle),
        "onnxruntime": ort.__version__, "cpus": os.cpu_count(), "repeats": args.repeats, "warmup": args.warmup,
    }  # fmt: skip
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
