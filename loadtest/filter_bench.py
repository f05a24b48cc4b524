"""Filtered top-k at scale: a selective (1 %) and a broad (50 %) filter against no filter, in one run.

    python -m loadtest.filter_bench [--items 1000000] [--dim 300] [--requests 200] [--out runs/filter-bench.json]

A SYNTHETIC catalogue (clustered two-modality unit vectors as in loadtest.topk_crossover, MISSRec fusion with
alpha 1.0, tau 0.07, an exact flat index over the static vectors, 1 % of rows deleted) with SYNTHETIC attributes:
``brand`` (100 values, uniform: one brand = 1 % of the items) and ``price`` (uniform in [0, 100): price < 50 = 50 %).
Each request is what the service's recommend path does after the user tower, one at a time: the filter checked and
combined from the roaring bitmaps (service.filters.matching_rows), then the exact top-10 (serving_core.topk.top_k
without a filter, serving_core.filtered.filtered_top_k with one) for a SYNTHETIC user vector. Prints p50/p99 ms
and requests/s (sequential: 1 / mean latency) per case side by side, and checks a few results against brute force.
Not an HTTP benchmark: the user tower, Redis and the network are not in these figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from index_builder.build import index_vectors
from loadtest.topk_crossover import _unit, synthetic
from service.filters import matching_rows
from service.schemas import RecommendRequest
from serving_core.attributes import AttributeIndex, bitmap_of
from serving_core.bundle import MISSREC_FUSION, Scorer, static_vectors
from serving_core.filtered import filtered_top_k
from serving_core.scoring import ItemScorer
from serving_core.topk import SearchOptions, top_k

CASES = {
    "no filter": None,
    "selective (1 %)": {"op": "eq", "field": "brand", "value": "b7"},
    "broad (50 %)": {"op": "lt", "field": "price", "value": 50},
}


def build(n: int, d: int, seed: int = 0):
    import faiss

    rng = np.random.default_rng(seed)
    vectors = synthetic(n, d, rng)
    scorer = Scorer(MISSREC_FUSION, ("text", "image"), 1.0, 0.07, False)
    static = static_vectors(scorer, vectors)
    index = faiss.IndexFlatIP(d)
    index.add(index_vectors(static))
    brand = rng.integers(0, 100, n)
    price = rng.uniform(0, 100, n)
    values = {"brand": {f"b{j}": bitmap_of(np.flatnonzero(brand == j)) for j in range(100)}}
    attrs = AttributeIndex({"brand": "string", "price": "number"}, n, [], {}, values, {"price": price},
                           bitmap_of(np.empty(0, np.int64)))  # fmt: skip
    hidden = rng.random(n) < 0.01
    hidden[0] = True
    picks = rng.integers(1, n, 64)
    users = _unit(static[picks] + 0.3 * rng.standard_normal((64, d)).astype(np.float32) / np.sqrt(d))
    return ItemScorer(scorer, vectors, None, 2.0), index, attrs, hidden, users


def one(items, index, attrs, hidden, user, f, opts) -> tuple[np.ndarray, bool]:
    if f is None:
        res = top_k(user, 10, index, items, deleted=hidden, options=opts)
    else:
        req = RecommendRequest.model_validate({"history": ["x"], "filter": f})
        allowed, _ = matching_rows(req.filter, attrs, hidden)
        res = filtered_top_k(user, 10, index, items, allowed=allowed, deleted=hidden, options=opts)
    return res.row(0)[0], res.exact


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=300)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("runs/filter-bench.json"))
    args = ap.parse_args()
    started = time.perf_counter()
    items, index, attrs, hidden, users = build(args.items, args.dim)
    print(f"SYNTHETIC catalogue of {args.items:,} items x {args.dim} built in {time.perf_counter() - started:.0f} s")
    opts = SearchOptions()
    price = attrs.numbers["price"]
    for name, f in CASES.items():  # exactness on a few users: brute force over the matching live rows
        for b in range(3):
            got, exact = one(items, index, attrs, hidden, users[b : b + 1], f, opts)
            ok = ~hidden
            if f is not None:
                ok &= (np.isin(np.arange(args.items), attrs.values["brand"]["b7"].to_array())
                       if "brand" in json.dumps(f) else price < 50)  # fmt: skip
            rows = np.flatnonzero(ok)
            sc = items.take(rows).exact(users[b : b + 1])[0]
            want = rows[np.lexsort((rows, -sc))[:10]]
            assert exact and got.tolist() == want.tolist(), (name, got, want)
    results = {}
    for name, f in CASES.items():
        one(items, index, attrs, hidden, users[:1], f, opts)  # warm
        lat = []
        for r in range(args.requests):
            t = time.perf_counter()
            one(items, index, attrs, hidden, users[r % 64 : r % 64 + 1], f, opts)
            lat.append(time.perf_counter() - t)
        ms = np.array(lat) * 1e3
        results[name] = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                         "req_per_s": float(1e3 / ms.mean()), "requests": args.requests}  # fmt: skip
    print(f"{'case':<18}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>10}")
    for name, r in results.items():
        print(f"{name:<18}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['req_per_s']:>10.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"items": args.items, "dim": args.dim, "results": results}, indent=2))
    print(f"results checked against brute force (3 users per case); wrote {args.out}")


if __name__ == "__main__":
    main()
