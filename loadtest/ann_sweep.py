"""Recall and single-query latency of the service's ANN retrieval path on a bundle, for REAL users, per IVF nprobe
and candidate cap (what the service does per query: serving_core.topk.top_k, widening until its stop rule).

    OMP_NUM_THREADS=1 flock /tmp/missrec-cpu.lock .venv/bin/python -m loadtest.ann_sweep --bundle runs/bundle-1m \\
        --data ../shared/data/scientific --nprobe 16 32 64 --max-candidates 0 256 1024

recall@10 = |fused top-10 via the index ∩ fused top-10 by brute force over every item| / 10 (the same measure as
the index report of `missrec build-index`); latency = one user per call (batch 1), after discarded warm-up calls.
Cap 0 = no cap (the service today: widen x4 from max(2k, 32) candidates until the stop rule holds).
--rescore-dtype float16 float32: each run with the bundle's float16 copies (serving_core.compact; the same top-k,
"f32 rows" = candidates re-checked in float32 per query) and with the float32 vectors only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from serving_core.index import apply_search_params, load_index
from serving_core.scoring import ItemScorer
from serving_core.topk import SearchOptions, top_k
from serving_core.towers import load_towers


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.ann_sweep", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="dataset of the real users (test histories)")
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--max-candidates", type=int, nargs="+", default=[0, 256, 1024])
    p.add_argument(
        "--one-search", action="store_true", help="also: a single search of cap candidates (initial width = cap)"
    )
    p.add_argument("--rescore-dtype", nargs="+", default=["float32"], choices=["float16", "float32"])
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from missrec.data.dataset import load_dataset

    towers = load_towers(args.bundle, "cpu", 1)
    index, info = load_index(args.bundle, towers.manifest, "cpu")
    ds = load_dataset(args.data)
    rng = np.random.default_rng(0)
    rows = rng.choice(len(ds.test), size=min(args.users, len(ds.test)), replace=False)
    users = towers.user.encode([ds.test.histories[r, : ds.test.lengths[r]] for r in rows])
    table = towers.table
    items = ItemScorer(towers.manifest.scorer, table.vectors, table.id_vectors, info.max_gap)
    if "float16" in args.rescore_dtype and not table.half:
        raise SystemExit(f"{args.bundle} has no float16 copies: `missrec build-index` writes them")
    scorers = {
        "float32": items,
        "float16": dataclasses.replace(items, half=table.half, half_stats=towers.manifest.rescore_vectors),
    }
    t0 = time.perf_counter()
    exact = top_k(users, args.k, None, items)
    exact_s = (time.perf_counter() - t0) / users.shape[0]
    print(f"{info.factory} over {index.ntotal} items, {users.shape[0]} real users; brute force {1e3 * exact_s:.1f} ms")
    head = ("dtype", 7), ("nprobe", 6), ("cap", 6), ("start", 5), ("recall@10", 9), ("mean cand", 9), ("f32 rows", 8)
    head += ("p50 ms", 7), ("p99 ms", 7)
    print(" ".join(f"{h:>{w}}" for h, w in head), f"{'mean ms':>7}")
    results = []
    for nprobe in args.nprobe:
        apply_search_params(index, {"nprobe": nprobe})
        runs = [(cap, None) for cap in args.max_candidates]
        runs += [(cap, cap) for cap in args.max_candidates if cap and args.one_search]
        for dtype, cap, start in ((d, c, s) for c, s in runs for d in args.rescore_dtype):
            items = scorers[dtype]
            opts = SearchOptions(exact_index=False, max_candidates=cap or None, initial_width=start)
            for b in range(5):  # warm-up
                top_k(users[b : b + 1], args.k, index, items, options=opts)
            times, hits, cands, f32 = [], [], [], []
            for b in range(users.shape[0]):
                s = time.perf_counter()
                got = top_k(users[b : b + 1], args.k, index, items, options=opts)
                times.append(time.perf_counter() - s)
                hits.append(np.intersect1d(got.row(0)[0], exact.row(b)[0]).shape[0] / args.k)
                cands.append(int(got.candidates[0]))
                f32.append(int(got.rows_float32[0]))
            t = 1e3 * np.asarray(times)
            row = {
                "dtype": dtype, "nprobe": nprobe, "max_candidates": cap or None, "initial_width": start,
                "recall@10": round(float(np.mean(hits)), 4),
                "mean_candidates": round(float(np.mean(cands)), 1), "mean_float32_rows": round(float(np.mean(f32)), 1),
                "p50_ms": round(float(np.percentile(t, 50)), 2),
                "p99_ms": round(float(np.percentile(t, 99)), 2), "mean_ms": round(float(t.mean()), 2),
            }  # fmt: skip
            results.append(row)
            print(
                f"{dtype:>7} {nprobe:>6} {cap or 'none':>6} {start or '-':>5} {row['recall@10']:>9.4f} "
                f"{row['mean_candidates']:>9.0f} {row['mean_float32_rows']:>8.1f} {row['p50_ms']:>7.2f} "
                f"{row['p99_ms']:>7.2f} {row['mean_ms']:>7.2f}"
            )
    if args.json:
        args.json.write_text(json.dumps({"index": info.factory, "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
