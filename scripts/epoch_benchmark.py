"""Epoch time and peak memory per model family against catalogue size, split into phases; full vs sampled softmax.

    python scripts/epoch_benchmark.py --sizes 10000,100000 --families missrec,sasrec --softmax full,sampled
    python scripts/epoch_benchmark.py --real ../shared/data/scientific --sizes real

Each (family, catalogue, softmax) runs in a fresh process (so that its peak resident memory is its own) on a
SYNTHETIC dataset of ``--users`` users (~100k training rows at the default 20,000 users; generated once per size
under ``--cache``) or on the real dataset. A run times ``--steps`` optimiser steps of 512 rows (each step: the item
tower alone, then forward = item tower + user tower + logits + loss, then backward + Adam step) and
EXTRAPOLATES them to the whole epoch (steps x batches per epoch); k-means (MISSRec's interest discovery) runs once,
as in every epoch; validation ranks ``--valid-rows`` rows against the whole catalogue (item side once + rows,
extrapolated to all validation rows). Columns are seconds per epoch; "epoch" = k-means + steps (training cost);
validation is listed apart (it is bounded per row by the catalogue, see ``TrainOptions.valid_rows``). Peak memory
is the process's peak RSS (CPU) or torch's peak allocation (GPU). A run above ``--mem-cap`` GiB fails as "OOM".
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

KMEANS_PROBE = 8  # timed mini-batches when the exact k-means is only estimated


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def build(family: str, ds):
    if family == "missrec":
        from missrec.recipes.missrec import build_missrec

        return build_missrec(ds, "inductive", 0)
    if family == "msm4sr":
        from missrec.recipes.msm4sr import build_msm4sr

        return build_msm4sr(ds, "inductive", 0)
    if family == "mmsrec":
        from missrec.recipes.mmsrec import build_mmsrec

        return build_mmsrec(ds, 0)
    from missrec.models.sasrec import SASRec, SASRecConfig

    torch.manual_seed(0)
    return SASRec(SASRecConfig(num_items=ds.num_items, max_len=ds.max_len))


def item_side(model, ids: torch.Tensor | None):
    """The item tower of one step: over the catalogue (full softmax) or the step's candidates."""
    name = type(model).__name__
    if name == "MISSRec":
        return model.item_tables(ids)
    if name == "MSM4SR":
        if ids is None:
            return model.item_table()
        return model.item_tokens({m: f[ids] for m, f in model.features().items()}, ids)
    if name == "MMSRec":
        return model.candidate_table(ids)
    return model.item_emb.weight if ids is None else model.item_emb(ids)


class CachedTable:
    """The model with its scoring table computed once (validation timing without recomputing it)."""

    def __init__(self, model, table) -> None:
        self._model, self._table = model, table

    def scoring_table(self):
        return self._table

    def __getattr__(self, name):
        return getattr(self._model, name)


def kmeans_or_estimate(model, gen: torch.Generator, device: str, budget: float, row: dict) -> float:
    """Seconds of the epoch's interest discovery (MISSRec; 0 for the others). Where the exact mini-batch k-means
    would compare more than ``budget`` (vector, centroid) pairs per pass, it is not run: its time is extrapolated
    from KMEANS_PROBE timed mini-batches (``passes`` passes + the final assignment), and the timed steps use a
    random item -> cluster assignment with the same K (row["kmeans_note"] says so)."""
    if type(model).__name__ != "MISSRec":
        return _timed(lambda: model.on_epoch_start(None, gen), device)
    from missrec.nn.interests import assign_nearest, is_large, num_interests

    n, mods = model.cfg.num_items - 1, model.cfg.modalities
    m = n * len(mods)
    k = num_interests(m, model.cfg.interest_ratio)
    if is_large(m, k) or m * k <= budget:
        return _timed(lambda: model.on_epoch_start(None, gen), device)
    passes, batch = 5, 2048  # MISSRec.discover_interests' defaults
    with torch.no_grad():
        started = time.perf_counter()
        adapted = model.adapted()
        x = torch.cat([adapted[mod][1:] for mod in mods])
        t_adapt = time.perf_counter() - started
        centroids = x[torch.randperm(m, generator=gen)[:k]].clone()
        probe = []
        for _ in range(KMEANS_PROBE):
            rows = x[torch.randint(0, m, (batch,), generator=gen)]
            started = time.perf_counter()
            nearest = assign_nearest(rows, centroids)
            torch.zeros_like(centroids).index_add_(0, nearest, rows)
            _sync(device)
            probe.append(time.perf_counter() - started)
        model.centroids = torch.cat([torch.zeros_like(centroids[:1]), centroids])
        for mod in mods:
            clusters = torch.randint(1, k + 1, (n,), generator=gen)
            setattr(model, f"{mod}_cluster", torch.cat([torch.zeros(1, dtype=torch.long), clusters]).to(device))
    batches = math.ceil(m / batch) * (passes + 1)  # + the final assignment of every vector
    row["kmeans_note"] = (
        f"extrapolated: exact k-means of {m:,} vectors into K={k:,} not run ({KMEANS_PROBE} mini-batches timed, "
        f"x {batches:,}); steps timed with a random assignment to K clusters"
    )
    return t_adapt + float(np.median(probe)) * batches


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def one_run(args: argparse.Namespace) -> dict:
    from missrec.data.batching import chunks_of, epoch_order, row_costs
    from missrec.data.dataset import load_dataset
    from missrec.evaluation.metrics import compute_ranks
    from missrec.training.loop import TrainOptions, forward_precision, training_loss
    from missrec.training.optim import make_optimizer, sparse_gradients, sparse_tables
    from missrec.training.sampled import DEFAULT_NEGATIVES, in_batch_items, make_sampler

    cap = int(args.mem_cap * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    device, batch_size = args.device, 512
    ds = load_dataset(args.one_data)
    model = build(args.one_family, ds).to(device)
    negatives = 0 if args.one_softmax == "full" else (args.negatives or DEFAULT_NEGATIVES)
    train = ds.train
    row: dict = {"family": args.one_family, "items": ds.num_items - 1, "rows": len(train), "softmax": args.one_softmax}
    model.train()
    gen = torch.Generator().manual_seed(0)
    row["kmeans"] = kmeans_or_estimate(model, gen, device, args.kmeans_budget, row)
    sampler = make_sampler(model, train.targets, None, negatives, "mixed", 0)
    row["negatives"] = 0 if sampler is None else sampler.negatives
    keys = row_costs(model, train)
    order = epoch_order(keys, batch_size, np.random.default_rng(0), True)
    opts = TrainOptions(progress=False, autocast=args.autocast, sparse_ids=not args.dense_ids)  # the loop's optimiser
    tables = sparse_tables(model, opts, sampler is not None, False)
    params = list(model.parameters())
    optimizer = make_optimizer(params, [{"params": params}], opts, tables)
    row["sparse_ids"], row["autocast"] = bool(tables), args.autocast
    tower = forward = backward = 0.0
    steps = min(args.steps, math.ceil(len(order) / batch_size))
    candidates = 0
    with sparse_gradients(tables):
        for step in range(steps + 1):  # step 0: warm-up, discarded
            batch = order[step * batch_size : (step + 1) * batch_size]
            cands = (
                None
                if sampler is None
                else sampler.draw(in_batch_items(model, train.histories[batch], train.targets[batch]))
            )
            ids = None if cands is None else cands.ids.to(device)
            t_tower = _timed(lambda ids=ids: item_side(model, ids), device)
            optimizer.zero_grad(set_to_none=True)
            t_fwd = t_bwd = 0.0
            for _, items, lengths, targets in chunks_of(train, batch, keys, 8192):
                started = time.perf_counter()
                with forward_precision(opts, torch.device(device)):
                    loss = training_loss(
                        model,
                        items.to(device),
                        lengths.to(device),
                        targets.to(device),
                        len(batch),
                        None,
                        False,
                        None,
                        cands,
                    )
                _sync(device)
                t_fwd += time.perf_counter() - started
                t_bwd += _timed(loss.backward, device)
            t_bwd += _timed(optimizer.step, device)
            if step:
                tower, forward, backward = tower + t_tower, forward + t_fwd, backward + t_bwd
                candidates += len(train.targets) if cands is None else len(cands.ids)
    scale = math.ceil(len(train) / batch_size) / steps
    row.update(
        steps=steps,
        tower=tower * scale,
        logits=(forward - tower) * scale,  # user tower + logits + loss (forward minus the item tower)
        backward=backward * scale,
        candidates=candidates // steps if sampler is not None else ds.num_items,
    )
    row["epoch"] = row["kmeans"] + row["tower"] + row["logits"] + row["backward"]
    row["peak_gib"] = peak_memory_gib(device)
    print("ROW " + json.dumps(row), flush=True)  # the training phases, kept if validation runs past --run-timeout
    model.eval()
    with torch.no_grad():
        table = None
        t_table = 0.0
        if hasattr(model, "scoring_table"):
            started = time.perf_counter()
            table = model.scoring_table()
            _sync(device)
            t_table = time.perf_counter() - started
        n = min(args.valid_rows, len(ds.valid))
        sample = ds.valid.subset(np.arange(n))
        scorer = model if table is None else CachedTable(model, table)
        t_rows = _timed(lambda: compute_ranks(scorer, sample, 1024, device), device)
    row["validation"] = t_table + t_rows * len(ds.valid) / n
    row.update(valid_table=t_table, valid_rows_timed=n, valid_rows_seconds=t_rows, valid_rows_all=len(ds.valid))
    row["peak_gib"] = peak_memory_gib(device)
    return row


def dataset_dir(args: argparse.Namespace, size: str) -> Path:
    if size == "real":
        return Path(args.real)
    from missrec.data.synthetic import generate_synthetic

    root = Path(args.cache) / f"synthetic-{int(size)}-{args.users}"
    if not (root / "Synthetic.train.inter").is_file():
        started = time.perf_counter()
        generate_synthetic(root, num_users=args.users, num_items=int(size), seed=0, min_seq_len=5, max_seq_len=11)
        print(f"generated {root} in {time.perf_counter() - started:.0f} s", flush=True)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="real,10000,100000,1000000", help="'real' and/or SYNTHETIC item counts")
    parser.add_argument("--real", default="../shared/data/scientific")
    parser.add_argument("--families", default="missrec,msm4sr,mmsrec,sasrec")
    parser.add_argument("--softmax", default="full,sampled")
    parser.add_argument("--negatives", type=int, default=None, help="sampled negatives (default: the training default)")
    parser.add_argument("--users", type=int, default=20000, help="SYNTHETIC users (20,000: ~100k training rows)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (extrapolated to the epoch)")
    parser.add_argument("--valid-rows", type=int, default=1000, help="validation rows timed (extrapolated)")
    parser.add_argument("--cache", default="/tmp/epoch-bench", help="where SYNTHETIC datasets are generated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", default="none", help="none or bf16: the training forward passes' precision")
    parser.add_argument("--dense-ids", action="store_true", help="dense Adam on ID tables (before the sparse updates)")
    parser.add_argument("--mem-cap", type=float, default=14.0, help="GiB of address space per run")
    parser.add_argument(
        "--kmeans-budget",
        type=float,
        default=2e9,
        help="exact k-means above this many vector x centroid pairs is extrapolated, not run (MISSRec)",
    )
    parser.add_argument("--run-timeout", type=float, default=None, help="seconds per run (a slower one: 'too slow')")
    parser.add_argument("--json", type=Path, default=None, help="append each row as a JSON line here")
    parser.add_argument("--table", type=Path, nargs="+", default=None, help="only print the table of --json files")
    parser.add_argument("--one-data", help=argparse.SUPPRESS)
    parser.add_argument("--one-family", help=argparse.SUPPRESS)
    parser.add_argument("--one-softmax", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_data:
        print("ROW " + json.dumps(one_run(args)), flush=True)
        return
    if args.table:
        print_table([json.loads(ln) for path in args.table for ln in path.read_text().splitlines() if ln.strip()])
        return
    print(f"torch threads {torch.get_num_threads()}, device {args.device}, {args.steps} timed steps per run")
    rows = []
    for size in args.sizes.split(","):
        data = dataset_dir(args, size)
        for family in args.families.split(","):
            for softmax in args.softmax.split(","):
                cmd = [sys.executable, __file__, "--one-data", str(data), "--one-family", family]
                cmd += ["--one-softmax", softmax, "--steps", str(args.steps), "--valid-rows", str(args.valid_rows)]
                cmd += [
                    "--device",
                    args.device,
                    "--mem-cap",
                    str(args.mem_cap),
                    "--kmeans-budget",
                    str(args.kmeans_budget),
                    "--autocast",
                    args.autocast,
                ] + (["--dense-ids"] if args.dense_ids else [])
                if args.negatives is not None:
                    cmd += ["--negatives", str(args.negatives)]
                row = {"family": family, "items": size, "softmax": softmax}
                try:
                    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.run_timeout)
                except subprocess.TimeoutExpired as exc:
                    out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
                    found = [ln for ln in out.splitlines() if ln.startswith("ROW ")]
                    if found:  # the training phases were timed; validation was not done in time
                        row = json.loads(found[-1][4:]) | {"validation_note": f"not done in {args.run_timeout:.0f} s"}
                    else:
                        row["error"] = f"too slow: not done in {args.run_timeout:.0f} s ({args.steps} steps + k-means)"
                else:
                    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
                    oom = "MemoryError" in proc.stderr or "alloc" in proc.stderr.lower() or proc.returncode < 0
                    failure = f"OOM (> {args.mem_cap:g} GiB address space)" if oom else tail
                    if found:
                        row = json.loads(found[-1][4:])
                        if "validation" not in row:  # failed after the training phases
                            row.update(
                                validation_note=f"validation: {failure}", returncode=proc.returncode, detail=tail
                            )
                    else:
                        row.update(error=failure, returncode=proc.returncode, detail=tail)
                rows.append(row)
                if args.json:
                    with args.json.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    print_table(rows)


def _variant(r: dict) -> str:
    """What a row ran beyond the defaults: sparse ID updates (sampled SASRec), bf16 autocast."""
    tags = [t for t, on in (("sparse IDs", r.get("sparse_ids")), ("bf16", r.get("autocast") == "bf16")) if on]
    return f" ({', '.join(tags)})" if tags else ""


def print_table(rows: list[dict]) -> None:
    print(
        "| family | items | softmax | negatives | candidates/step | k-means s | item tower s | user tower + logits s "
        "| backward + step s | epoch s (extrapolated) | validation s (extrapolated) | peak GiB |"
    )
    print("|" + "---|" * 12)
    for r in rows:
        if "error" in r:
            print(f"| {r['family']} | {r['items']} | {r['softmax']} | {r['error']} |" + " |" * 8)
            continue
        approx = "~" if "kmeans_note" in r else ""  # k-means (so the epoch) extrapolated, not run
        valid = (
            f"| {r['validation']:.1f} | {r['peak_gib']:.1f} |"
            if "validation" in r
            else f"| {r['validation_note']} | {r['peak_gib']:.1f} (training) |"
        )
        print(
            f"| {r['family']}{_variant(r)} | {r['items']:,} | {r['softmax']} | {r['negatives']} | {r['candidates']:,} "
            f"| {approx}{r['kmeans']:.1f} | {r['tower']:.1f} | {r['logits']:.1f} | {r['backward']:.1f} "
            f"| {approx}{r['epoch']:.1f} {valid}"
        )


if __name__ == "__main__":
    main()
