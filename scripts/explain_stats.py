"""What the explanations say on real users, and what an explained request costs, through the serving path.

    python scripts/explain_stats.py --bundle BUNDLE --data DIR [--users 500] [--k 10] [--repeats 3]

Loads the bundle as the service does (ONNX Runtime towers, FAISS index) into a catalogue of the dataset's items
(``lifecycle.evaluate.catalogue_for``), takes the first ``--users`` test rows (their histories, oldest first, the
history excluded as served) and serves each as a micro-batch of one (``service.recommender.recommend_batch``),
with ``explain`` false and true in turn (``--repeats`` times each, order alternating). Prints:
- the share of recommended items whose top "because" item is not the most recent history item;
- the spread (min / median / max) of each part's share of the score, beside the spread of the fusion weights;
- p50 / p90 of one request with and without ``explain``, and their ratio (CPU, one thread of ONNX Runtime unless
  MISSREC_ONNX_THREADS says otherwise; the figure is per request of one user, as the recommend route runs it alone).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from lifecycle.evaluate import catalogue_for
from missrec.data.dataset import load_dataset
from service.metrics import Metrics
from service.recommender import Query, Recommendation, recommend_batch
from service.serving_model import ServingModel
from service.settings import Settings


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    a = np.asarray(values)
    return f"{a.min():.3f} / {np.median(a):.3f} / {a.max():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    threads = int(os.environ.get("MISSREC_ONNX_THREADS", "1"))
    model = ServingModel.load(args.bundle, Settings(onnx_provider="cpu", faiss_device="cpu", onnx_threads=threads))
    ds = load_dataset(args.data)
    snap, _, _ = catalogue_for(model, ds)
    rows = ds.split("test")
    histories = []
    for r in range(min(args.users, len(rows))):
        known, _ = snap.rows_for(ds.item_ids[i - 1] for i in rows.histories[r, : rows.lengths[r]])
        histories.append(np.asarray(known, dtype=np.int64))
    metrics = Metrics()

    def one(h: np.ndarray, explain: bool) -> tuple[float, Recommendation]:
        q = Query(history=h, k=args.k, exclude=set(h.tolist()), explain=explain)
        started = time.perf_counter()
        (rec,) = recommend_batch(snap, [q], metrics)
        return time.perf_counter() - started, rec  # type: ignore[return-value]

    for h in histories[:20]:  # warm-up
        one(h, False), one(h, True)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    explained: list[tuple[np.ndarray, Recommendation]] = []
    for rep in range(args.repeats):
        for u, h in enumerate(histories):
            for flag in (False, True) if (u + rep) % 2 == 0 else (True, False):
                took, rec = one(h, flag)
                seconds[flag].append(took)
                if flag and rep == 0:
                    explained.append((h, rec))

    items = differs = 0
    shares: dict[str, list[float]] = {}
    weights: list[float] = []
    lengths = []
    for h, rec in explained:
        lengths.append(h.size)
        recent = snap.ids[int(h[-1])]
        for item in rec.items:
            e = item.explanation or {}
            for part in e.get("score_split", []):
                shares.setdefault(part["part"], []).append(part["share"])
            weights.append(e.get("text_weight", float("nan")))
            because = e.get("because") or []
            if because:
                items += 1
                differs += because[0]["item_id"] != recent
    ms = {f: 1000 * np.asarray(v) for f, v in seconds.items()}
    print(f"bundle {model.version} ({model.manifest.model_kind}), data {args.data}, {len(histories)} test users, "
          f"k={args.k}, history length median {np.median(lengths):.0f}, ONNX threads {threads}")  # fmt: skip
    print(f"recommended items with a 'because' item: {items}")
    print(f"top 'because' item is not the most recent history item: {differs} ({differs / max(items, 1):.1%})")
    print("part      share of the score: min / median / max")
    for part, values in shares.items():
        print(f"{part:<9} {_spread(values)}")
    print(f"fusion text_weight (not a share): {_spread([w for w in weights if not np.isnan(w)])}")
    print("explain   requests   p50 ms   p90 ms")
    for flag in (False, True):
        print(f"{str(flag).lower():<9} {ms[flag].size:>8}   {np.percentile(ms[flag], 50):6.2f}   "
              f"{np.percentile(ms[flag], 90):6.2f}")  # fmt: skip
    print(f"p50 ratio true/false: {np.percentile(ms[True], 50) / np.percentile(ms[False], 50):.2f}x")


if __name__ == "__main__":
    main()
