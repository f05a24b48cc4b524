"""Sampled softmax against the full softmax on a real dataset: test NDCG@10 (history excluded, as served) of the same
model, seed and data trained both ways, with the paired bootstrap interval over users of the difference.

    python scripts/sampled_vs_full.py --data ../shared/data/scientific --models missrec,sasrec --seeds 0 1 2 \
        --negatives 256 --patience 5

Per model: mean ± std over the seeds of each, and the paired interval of (sampled - full) on per-user NDCG@10
averaged over the seeds (:func:`missrec.evaluation.stats.paired_bootstrap`). Longer studies in pieces (each
seed, or each softmax, its own invocation) append to ``--json FILE`` and are combined by ``--combine FILE...``:

    python scripts/sampled_vs_full.py --data ../shared/data/scientific --models missrec --seeds 0 --json s0.jsonl
    python scripts/sampled_vs_full.py --combine s0.jsonl s1.jsonl s2.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
    parser.add_argument("--data", type=Path)
    parser.add_argument("--models", default="missrec,sasrec")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--softmax", default="full,sampled", help="which trainings to run (split a seed in two)")
    parser.add_argument("--negatives", type=int, default=256)
    parser.add_argument("--sampler", default="mixed")
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--json", type=Path, default=None, help="append each training (per-user NDCG@10) here")
    parser.add_argument("--combine", type=Path, nargs="+", default=None, help="only print the table of --json files")
    args = parser.parse_args()
    if args.combine:
        records = [json.loads(ln) for path in args.combine for ln in path.read_text().splitlines() if ln.strip()]
        print_table(records)
        return
    if args.data is None:
        parser.error("--data is required (or --combine)")
    ds = load_dataset(args.data)
    print(f"{ds.name}: {ds.num_items - 1} items, {len(ds.train)} training rows; negatives {args.negatives}")
    records = []
    for name in args.models.split(","):
        for seed in args.seeds:
            for softmax in args.softmax.split(","):
                negatives = 0 if softmax == "full" else args.negatives
                opts = TrainOptions(
                    epochs=args.epochs, patience=args.patience, seed=seed, progress=False, negatives=negatives
                )
                opts = dataclasses.replace(opts, sampler=args.sampler)
                started = time.perf_counter()
                run = family(name).recipe().train(ds, opts, TrainRequest(mode="inductive"))
                per_user = ndcg_per_row(run.test_ranks["history_excluded"], 10)
                seconds = time.perf_counter() - started
                record = {
                    "dataset": ds.name,
                    "model": name,
                    "seed": seed,
                    "softmax": softmax,
                    "negatives": negatives,
                    "sampler": args.sampler,
                    "patience": args.patience,
                    "best_epoch": run.info["best_epoch"],
                    "seconds": seconds,
                    "ndcg10": float(per_user.mean()),
                    "per_user": per_user.tolist(),
                }
                records.append(record)
                if args.json:
                    with args.json.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                print(
                    f"{name} seed {seed} {softmax}: test NDCG@10 {per_user.mean():.6f}, best epoch "
                    f"{run.info['best_epoch']}, {seconds:.0f} s",
                    flush=True,
                )
    print_table(records)


def print_table(records: list[dict]) -> None:
    """Per (dataset, model): mean ± std over seeds of each softmax, and the paired interval over the seeds
    present in both (per-user NDCG@10 averaged over those seeds)."""
    groups: dict[tuple[str, str], dict[str, dict[int, dict]]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["model"]), {}).setdefault(r["softmax"], {})[r["seed"]] = r
    print(
        "| dataset | model | seeds | full NDCG@10 | sampled (negatives, sampler) | sampled - full, 95% paired "
        "| verdict | s per training full / sampled |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (dataset, name), by_softmax in groups.items():
        full, sampled = by_softmax.get("full", {}), by_softmax.get("sampled", {})
        seeds = sorted(set(full) & set(sampled))
        if not seeds:
            print(f"| {dataset} | {name} | none paired | | | | | |")
            continue
        fm, fs = mean_std([full[s]["ndcg10"] for s in seeds])
        sm, ss = mean_std([sampled[s]["ndcg10"] for s in seeds])
        per_full = np.mean([full[s]["per_user"] for s in seeds], axis=0)
        per_sampled = np.mean([sampled[s]["per_user"] for s in seeds], axis=0)
        iv = paired_bootstrap(per_sampled, per_full)
        first = sampled[seeds[0]]
        secs = [np.mean([by[s]["seconds"] for s in seeds]) for by in (full, sampled)]
        print(
            f"| {dataset} | {name} | {' '.join(map(str, seeds))} | {fm:.4f} ± {fs:.4f} "
            f"| {sm:.4f} ± {ss:.4f} ({first['negatives']}, {first['sampler']}) "
            f"| {iv.mean_diff:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}] | {iv.verdict} "
            f"| {secs[0]:.0f} / {secs[1]:.0f} |"
        )


if __name__ == "__main__":
    main()
