"""The whole pipeline at a large SYNTHETIC catalogue, step by step, with wall time and peak memory per step.

    flock /tmp/missrec-cpu.lock .venv/bin/python scripts/pipeline_scale.py --items 1000000 --work /tmp/pipe-1m
    .venv/bin/python scripts/pipeline_scale.py --items 1000000 --work /tmp/pipe-1m --steps serve,recommend

Steps (each the project's own command in a child process of its own, so that its peak resident memory is its own:
``os.wait4`` gives each child's ``ru_maxrss``):
1. ``generate``: a SYNTHETIC dataset in the atomic format (``missrec.data.synthetic``; no ``missrec prepare``):
   ``--items`` items, ``--users`` users, ``--dim``-wide text and image features. Nothing in it is real.
2. ``train``: ``missrec train`` (sampled softmax: its default above 20,000 items, or ``--negatives``), ``--epochs``
   epochs, early stopping on ``--valid-rows`` validation rows, test metrics on ``--test-rows`` test rows (ranking all
   20,000 test rows against 1M items alone takes ~15 min on 2 cores).
3. ``export``: ``missrec export`` (the ONNX towers, the item vectors of every item, the parity checks).
4. ``index``: ``missrec build-index --factory`` (IVF at this size; the service re-scores exactly).
5. ``serve``: ``missrec serve`` with an embedded Redis, timed to a 200 from /readyz; its peak RSS (VmHWM) is read
   from /proc after the recommend step.
6. ``recommend``: ``--requests`` recommendations by explicit history of test users (status, p50/p99 latency,
   ``exact``), sequential.
Steps already done in ``--work`` are skipped unless named in ``--steps``; the table (and ``--work``/pipeline.json)
collects every step's record.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STEPS = ("generate", "train", "export", "index", "serve", "recommend")


def run_child(args: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    """Run ``args`` to completion; wall seconds and the child's own peak RSS (MiB). RuntimeError on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(args[:4])} failed ({proc.returncode}); log {log}:\n{tail}")
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "missrec_cli.main", *args]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=20_000, help="SYNTHETIC users (~5-6 training rows each)")
    p.add_argument("--dim", type=int, default=512, help="width of each SYNTHETIC modality's features")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--steps", default="", help=f"comma-separated subset of {','.join(STEPS)} to (re)run")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--negatives", type=int, default=None, help="sampled negatives (default: the CLI's default)")
    p.add_argument("--valid-rows", type=int, default=2000)
    p.add_argument("--test-rows", type=int, default=2000, help="final test metrics on this many rows (0 = all)")
    p.add_argument("--factory", default="IVF4096,Flat")
    p.add_argument("--nprobe", type=int, default=128)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--ready-timeout", type=float, default=900.0)
    args = p.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    record_path = work / "pipeline.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    wanted = {s.strip() for s in args.steps.split(",") if s.strip()}
    if wanted - set(STEPS):
        p.error(f"unknown steps {sorted(wanted - set(STEPS))}; steps are {', '.join(STEPS)}")
    data, run, bundle, logs = work / "data", work / "run", work / "bundle", work / "logs"

    def todo(step: str) -> bool:
        return step in wanted or (not wanted and step not in record)

    def save() -> None:
        record_path.write_text(json.dumps(record, indent=1))

    if todo("generate"):
        code = (
            "import sys; from missrec.data.synthetic import generate_synthetic; "
            f"generate_synthetic(sys.argv[1], num_users={args.users}, num_items={args.items}, "
            f"text_dim={args.dim}, image_dim={args.dim}, seed=0, progress=False)"
        )
        record["generate"] = run_child([sys.executable, "-c", code, str(data)], logs / "generate.log")
        save()
    if todo("train"):
        cmd = _cli("train", "--data", str(data), "--out", str(run), "--epochs", str(args.epochs), "--seed", "0")
        cmd += ["--valid-rows", str(args.valid_rows), "--test-rows", str(args.test_rows)]
        cmd += ["--negatives", str(args.negatives)] if args.negatives is not None else []
        record["train"] = run_child(cmd, logs / "train.log")
        metrics = json.loads((run / "metrics.json").read_text())
        record["train"]["test_ndcg10"] = metrics.get("test", {}).get("ndcg@10")
        save()
    if todo("export"):
        cmd = _cli("export", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(data), "--out", str(bundle))
        record["export"] = run_child([*cmd, "--overwrite"] if bundle.exists() else cmd, logs / "export.log")
        save()
    if todo("index"):
        cmd = _cli("build-index", "--bundle", str(bundle), "--factory", args.factory)
        record["index"] = run_child(cmd, logs / "index.log")
        save()
    if todo("serve") or todo("recommend"):
        record |= serve_and_recommend(args, bundle, data, work, logs)
        save()
    print_table(record, args)
    return record


def serve_and_recommend(args, bundle: Path, data: Path, work: Path, logs: Path) -> dict:
    import httpx

    from harness.launch import start, wait_ready
    from harness.ports import free_port
    from loadtest.memory import status_mib
    from missrec.data.dataset import load_dataset

    port = free_port()
    # no ingestion encoder (MISSREC_CLIP_PRETRAINED empty: nothing is ingested here); an embedded Redis
    env = {"MISSREC_DATA_DIR": str(work / "state"), "MISSREC_CLIP_PRETRAINED": "", "MISSREC_KEY_PREFIX": f"p{port}"}
    if "IVF" in args.factory:
        env["MISSREC_INDEX_PARAMS"] = json.dumps({"nprobe": args.nprobe})
    os.environ.pop("MISSREC_REDIS_URL", None)
    cmd = _cli("serve", "--bundle", str(bundle), "--port", str(port))
    began = time.perf_counter()
    child = start("service", cmd, logs, env)
    out: dict = {}
    try:
        wait_ready(f"http://127.0.0.1:{port}", child, args.ready_timeout)
        out["serve"] = {"ready_s": round(time.perf_counter() - began, 1), **status_mib(child.pid)}
        ds = load_dataset(data)
        test = ds.split("test")
        n = min(args.requests, len(test.lengths))
        latencies, statuses, exact = [], [], 0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            for r in range(n):
                history = [ds.item_ids[i - 1] for i in test.histories[r, : test.lengths[r]]]
                t = time.perf_counter()
                resp = c.post("/v1/recommend", json={"history": history, "k": 10})
                latencies.append(1e3 * (time.perf_counter() - t))
                statuses.append(resp.status_code)
                exact += resp.status_code == 200 and resp.json()["exact"] is True
        lat = np.asarray(latencies)
        out["recommend"] = {
            "requests": n, "ok": statuses.count(200), "exact": exact,
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
        }  # fmt: skip
        out["serve"] |= {f"after_{k}": v for k, v in status_mib(child.pid).items()}
    finally:
        child.stop()
    return out


def print_table(record: dict, args) -> None:
    print(f"pipeline at {args.items:,} SYNTHETIC items, {args.users:,} users, {args.dim}-d features per modality")
    print(f"{'step':<10} {'wall s':>8} {'peak RSS MiB':>13}  notes")
    for step in STEPS:
        r = record.get(step)
        if r is None:
            print(f"{step:<10} {'-':>8} {'-':>13}  not run")
            continue
        if step == "serve":
            note = f"RSS {r.get('after_VmRSS')} MiB after the requests (anon {r.get('after_RssAnon')})"
            print(f"{step:<10} {r['ready_s']:>8} {r.get('after_VmHWM', r.get('VmHWM')):>13}  ready; {note}")
        elif step == "recommend":
            print(
                f"{step:<10} {'':>8} {'':>13}  {r['ok']}/{r['requests']} ok, {r['exact']} exact, "
                f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms"
            )
        else:
            note = f"test NDCG@10 {r['test_ndcg10']}" if r.get("test_ndcg10") is not None else ""
            print(f"{step:<10} {r['wall_s']:>8} {r['peak_rss_mib']:>13}  {note}")


if __name__ == "__main__":
    main()
