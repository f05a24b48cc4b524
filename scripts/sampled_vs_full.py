"""Sampled softmax against the full softmax on a real dataset: test NDCG@10 (history excluded, as served) of the same
model, seed and data trained both ways, with the paired bootstrap interval over users of the difference.

    python scripts/sampled_vs_full.py --data ../shared/data/scientific --models missrec,sasrec --seeds 0 1 2 \
        --negatives 256 --patience 5

Per model: mean ± std over the seeds of each, and the paired interval of (sampled - full) on per-user NDCG@10
averaged over the seeds (:func:`missrec.evaluation.stats.paired_bootstrap`).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from missrec.data.dataset import load_dataset
from missrec.evaluation.metrics import ndcg_per_row
from missrec.evaluation.stats import mean_std, paired_bootstrap
from missrec.families import family
from missrec.recipes import TrainRequest
from missrec.training.loop import TrainOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", default="missrec,sasrec")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--negatives", type=int, default=256)
    parser.add_argument("--sampler", default="mixed")
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=300)
    args = parser.parse_args()
    ds = load_dataset(args.data)
    print(f"{ds.name}: {ds.num_items - 1} items, {len(ds.train)} training rows; negatives {args.negatives}")
    rows = []
    for name in args.models.split(","):
        ndcg: dict[str, list[np.ndarray]] = {"full": [], "sampled": []}
        for seed in args.seeds:
            for softmax, negatives in (("full", 0), ("sampled", args.negatives)):
                opts = TrainOptions(
                    epochs=args.epochs, patience=args.patience, seed=seed, progress=False, negatives=negatives
                )
                opts = dataclasses.replace(opts, sampler=args.sampler)
                started = time.perf_counter()
                run = family(name).recipe().train(ds, opts, TrainRequest(mode="inductive"))
                per_user = ndcg_per_row(run.test_ranks["history_excluded"], 10)
                ndcg[softmax].append(per_user)
                print(
                    f"{name} seed {seed} {softmax}: test NDCG@10 {per_user.mean():.6f}, best epoch "
                    f"{run.info['best_epoch']}, {time.perf_counter() - started:.0f} s",
                    flush=True,
                )
        full, sampled = (np.mean(ndcg[k], axis=0) for k in ("full", "sampled"))
        interval = paired_bootstrap(sampled, full)
        stats = {k: mean_std([float(v.mean()) for v in ndcg[k]]) for k in ndcg}
        rows.append((name, stats, interval))
    print(
        f"| model | full NDCG@10 | sampled ({args.negatives}, {args.sampler}) | sampled - full, 95% paired | verdict |"
    )
    print("|---|---|---|---|---|")
    for name, stats, iv in rows:
        (fm, fs), (sm, ss) = stats["full"], stats["sampled"]
        print(
            f"| {name} | {fm:.4f} ± {fs:.4f} | {sm:.4f} ± {ss:.4f} "
            f"| {iv.mean_diff:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}] | {iv.verdict} |"
        )


if __name__ == "__main__":
    main()
