"""Time one training epoch on a SYNTHETIC dataset of ~100k training rows, per phase, for MISSRec and SASRec.

    python scripts/epoch_benchmark.py --users 20000 --items 5000 [--long] [--device cuda]

Phases: interest discovery (k-means, MISSRec only), training steps (forward + backward + Adam over all rows),
validation (full ranking of every user, both protocols). ``--warmup`` epochs are run first and discarded.
Prints a table; "training rows/s" counts the training steps only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from missrec.data.dataset import load_dataset
from missrec.data.synthetic import generate_synthetic
from missrec.evaluation.metrics import compute_ranks
from missrec.models.sasrec import SASRec, SASRecConfig
from missrec.recipes.missrec import build_missrec
from missrec.training.loop import TrainOptions, fit


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--long", action="store_true", help="sequences of 50-56 items (histories at the 50 cap)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=None, help="reuse a dataset directory")
    parser.add_argument("--models", default="missrec_inductive,sasrec", help="comma-separated")
    parser.add_argument("--warmup", type=int, default=1, help="discarded warm-up epochs per model")
    args = parser.parse_args()
    root = args.data or Path(tempfile.mkdtemp(prefix="epoch-bench-"))
    if not (root / "Synthetic.train.inter").is_file():
        lengths = dict(min_seq_len=50, max_seq_len=56) if args.long else dict(min_seq_len=5, max_seq_len=11)
        t = _timed(lambda: generate_synthetic(root, num_users=args.users, num_items=args.items, seed=0, **lengths))
        print(f"generated SYNTHETIC data in {root} ({t:.0f} s)")
    ds = load_dataset(root)
    print(
        f"SYNTHETIC: {len(ds.user_ids)} users, {ds.num_items - 1} items, {len(ds.train)} training rows, "
        f"mean history {ds.train.lengths.mean():.1f}, device {args.device}, torch threads {torch.get_num_threads()}"
    )
    opts = TrainOptions(epochs=1, progress=False, device=args.device, patience=1)
    rows = []
    for name in args.models.split(","):
        if name == "sasrec":
            torch.manual_seed(0)
            model = SASRec(SASRecConfig(num_items=ds.num_items, max_len=ds.max_len))
        else:
            model = build_missrec(ds, "inductive", 0)
        model.to(args.device)
        for _ in range(args.warmup):  # discarded
            fit(model, ds.train, ds.valid, opts)
        gen = torch.Generator().manual_seed(1)
        kmeans = _timed(lambda m=model, g=gen: m.on_epoch_start(None, g)) if name != "sasrec" else 0.0
        epoch = fit(model, ds.train, ds.valid, opts).seconds  # k-means + steps + validation
        valid = _timed(lambda m=model: compute_ranks(m, ds.valid, opts.eval_batch_size, args.device))
        steps = epoch - kmeans - valid
        rows.append((name, kmeans, steps, valid, epoch, len(ds.train) / steps))
    print("| model | k-means s | train steps s | validation s | epoch s | training rows/s |")
    print("|---|---|---|---|---|---|")
    for name, kmeans, steps, valid, epoch, rate in rows:
        print(f"| {name} | {kmeans:.1f} | {steps:.1f} | {valid:.1f} | {epoch:.1f} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
