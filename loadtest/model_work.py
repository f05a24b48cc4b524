"""The model's own work per request, stage by stage, next to each stage's floor, at several batch sizes.

    flock /tmp/missrec-cpu.lock python -m loadtest.model_work --bundle runs/scientific-bundle \\
        --data ../shared/data/scientific [--batches 1 4 16] [--repeats 300]

The service's recommend path on the bundle, in this process (no HTTP, no Redis), one ONNX Runtime thread (as the
pinned service runs), over the real users' histories of --data (their test histories, as the load bench sends
them), k = --k. Per batch size, median microseconds PER USER of:

- ``feed``: ``UserTower.inputs`` (truncate, pad, gather tokens, interest ids and centroid rows);
- ``ort``: ``session.run`` on those prepared feeds (the tower's floor: the ONNX Runtime call alone);
- ``tower per user``: the same users through the tower one at a time (``inputs`` + ``run`` at batch 1);
- ``search``: the exact top-k of the user vectors (``service.recommender.rank``);
- ``argpartition``: the floor of the search: the fused scores of every item already computed, one numpy
  ``argpartition`` + sort of the k best per user (``scan floor`` adds computing the scores: a matrix product);
- ``response``: building the wire items (``recommendation``) and one ``orjson.dumps`` of the response dict;
- ``serve``: ``recommend_batch`` end to end (what one micro-batch of the service runs).

Prints one table per batch size plus the floor ratios; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import orjson

from service.catalogue import Catalogue
from service.metrics import Metrics
from service.recommender import Query, rank, recommend_batch, recommendation
from service.routers.recommend import response_dict
from service.serving_model import ServingModel
from service.settings import Settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.model_work", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="dataset whose real users' histories are served")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=300, help="timed calls per stage and batch size")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def median_us(call: Callable[[int], Any], repeats: int, per: int) -> float:
    """Median wall microseconds of call(i), divided by ``per`` (users per call), after a few warm-up calls."""
    for i in range(5):
        call(i)
    t = np.empty(repeats)
    for i in range(repeats):
        s = time.perf_counter()
        call(i)
        t[i] = time.perf_counter() - s
    return float(np.median(t)) * 1e6 / per


def histories(snap, data: Path) -> list[np.ndarray]:
    from loadtest.traffic import build_traffic

    users = build_traffic(data, list(snap.ids), None)["users"]
    out = [np.array(snap.rows_for(u["history"])[0], dtype=np.int64) for u in users]
    return [h for h in out if h.size]


def measure(snap, hs: list[np.ndarray], batch: int, k: int, repeats: int) -> dict[str, float]:
    tower = snap.model.towers.user
    arrays = snap.item_arrays()
    groups = [[hs[(g * batch + b) % len(hs)] for b in range(batch)] for g in range(64)]
    feeds = [tower.inputs(g, arrays) for g in groups]
    users = [tower.run(f) for f in feeds]
    excl = [[set(h.tolist()) for h in g] for g in groups]
    ks = [k] * batch
    metrics = Metrics()
    scorer = snap.scorer()
    # the scan floor: every item's fused score (static vectors: the index's own rows) and the argpartition alone
    static = (
        np.ascontiguousarray(snap.index.reconstruct_n(0, snap.index.ntotal))
        if hasattr(snap.index, "reconstruct_n")
        else None
    )
    scores = [u @ static.T for u in users] if static is not None else None
    served = [rank(snap, users[i], ks, excl[i]) for i in range(len(groups))]

    def argpart(i: int) -> None:
        s = scores[i % len(groups)]
        top = np.argpartition(-s, k, axis=1)[:, :k]
        np.take_along_axis(s, top, 1).argsort(axis=1)

    def response(i: int) -> None:
        for one in served[i % len(groups)]:
            orjson.dumps(response_dict(recommendation(snap, one, False), 50, []))

    queries = [[Query(history=h, k=k, exclude=e, snapshot=snap) for h, e in zip(g, x, strict=True)]
               for g, x in zip(groups, excl, strict=True)]  # fmt: skip
    row = {
        "feed": median_us(lambda i: tower.inputs(groups[i % 64], arrays), repeats, batch),
        "ort": median_us(lambda i: tower.run(feeds[i % 64]), repeats, batch),
        "tower per user": median_us(
            lambda i: [tower.run(tower.inputs([h], arrays)) for h in groups[i % 64]], repeats, batch
        ),
        "search": median_us(lambda i: rank(snap, users[i % 64], ks, excl[i % 64]), repeats, batch),
        "response": median_us(response, repeats, batch),
        "serve": median_us(lambda i: recommend_batch(snap, queries[i % 64], metrics), repeats, batch),
    }
    if scores is not None:
        row["argpartition"] = median_us(argpart, repeats, batch)
        row["scan floor"] = median_us(lambda i: (argpart(i), users[i % 64] @ static.T), repeats, batch)
    del scorer
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    settings = Settings(bundle=args.bundle, onnx_provider="cpu", onnx_threads=1, faiss_device="cpu")
    model = ServingModel.load(args.bundle, settings)
    snap = Catalogue(model).current
    hs = histories(snap, args.data)
    rows = {b: measure(snap, hs, b, args.k, args.repeats) for b in args.batches}
    stages = list(next(iter(rows.values())))
    print(f"model work per user, median us ({len(hs)} real users, {snap.n - 1} items, k={args.k}, 1 ORT thread, "
          f"load average {os.getloadavg()[0]:.2f})")  # fmt: skip
    print("| stage | " + " | ".join(f"batch {b}" for b in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for s in stages:
        print(f"| {s} | " + " | ".join(f"{rows[b][s]:.0f}" for b in rows) + " |")
    for b, r in rows.items():
        tower = r["feed"] + r["ort"]
        line = f"batch {b}: tower (feed + ort) {tower:.0f} us, ORT alone {r['ort'] / tower:.0%} of it"
        if "argpartition" in r:
            floor = r["scan floor"]
            line += f"; search {r['search']:.0f} us vs scan floor {floor:.0f} us (x{r['search'] / floor:.2f})"
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "users": len(hs), "items": snap.n - 1}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
