"""Benchmark: the user tower in ONNX Runtime vs PyTorch eager, same weights, same inputs, same run.

    python -m model_export.bench_tower --checkpoint RUN/checkpoint.pt --data DIR --bundle BUNDLE

For each history length (5, 20, 50) and batch size (1, 16) it times (after discarded warm-up calls):
  tower:  the tower alone on identical pre-built inputs (tokens, interest vectors): torch ``model.user_tower`` vs
          ``onnxruntime`` ``session.run``;
  encode: from item-id histories to user vectors, as each side would serve it: torch ``model.encode`` with the
          item tables computed once and cached (tensor gathers, interest ids, tower) vs
          ``serving_core.towers.UserTower.encode`` (numpy gathers, interest ids, ONNX Runtime).
Histories are real item ids of the dataset, sampled uniformly (lengths are exact). Prints a table with ms per
call, ms per user and the eager / ORT ratio; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

from missrec.data.dataset import load_dataset
from missrec.models.checkpoint import attach_features, load_checkpoint
from serving_core.towers import load_towers


def _time(fn, repeats: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - start
    return out * 1000.0  # ms


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    ds = load_dataset(args.data)
    ckpt = load_checkpoint(args.checkpoint)
    attach_features(ckpt.model, ds, ckpt.meta)
    model = ckpt.model.eval()
    with torch.inference_mode():
        tables = model.item_tables()  # a torch server would precompute these once, like the bundle does
    towers = load_towers(args.bundle, "cpu")
    rng = np.random.default_rng(0)
    rows = []
    for length in args.lengths:
        for batch in args.batches:
            histories = rng.integers(1, ds.num_items, size=(batch, length))
            feeds = towers.user.inputs(list(histories))
            t_feeds = {k: torch.from_numpy(v) for k, v in feeds.items()}
            items, lengths = torch.from_numpy(histories), torch.full((batch,), length)
            repeats = args.repeats if batch == 1 else max(20, args.repeats // 4)
            with torch.inference_mode():
                eager_tower = _time(lambda tf=t_feeds: model.user_tower(**tf), repeats, args.warmup)
                eager_encode = _time(lambda i=items, n=lengths: model.encode(i, n, tables), repeats, args.warmup)
            ort_tower = _time(lambda f=feeds: towers.user.run(f), repeats, args.warmup)
            ort_encode = _time(lambda h=list(histories): towers.user.encode(h), repeats, args.warmup)
            for what, eager, onnx in (("tower", eager_tower, ort_tower), ("encode", eager_encode, ort_encode)):
                rows.append({
                    "what": what, "length": length, "batch": batch, "repeats": repeats,
                    "eager_ms": float(np.median(eager)), "ort_ms": float(np.median(onnx)),
                    "eager_p99_ms": float(np.percentile(eager, 99)), "ort_p99_ms": float(np.percentile(onnx, 99)),
                    "eager_ms_per_user": float(np.median(eager)) / batch,
                    "ort_ms_per_user": float(np.median(onnx)) / batch,
                    "ratio": float(np.median(eager) / np.median(onnx)),
                })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = run(args)
    table = Table(
        title=f"User tower: PyTorch eager vs ONNX Runtime (median ms; torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()})"
    )
    for col in ("what", "length", "batch", "eager ms", "ORT ms", "eager ms/user", "ORT ms/user", "eager/ORT"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["what"],
            str(r["length"]),
            str(r["batch"]),
            f"{r['eager_ms']:.3f}",
            f"{r['ort_ms']:.3f}",
            f"{r['eager_ms_per_user']:.3f}",
            f"{r['ort_ms_per_user']:.3f}",
            f"{r['ratio']:.2f}x",
        )
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
