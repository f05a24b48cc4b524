"""Side-by-side comparison on one split: MISSRec (inductive, transductive), MSM4SR, MMSRec, SASRec, popularity, and
each inductive model under the cold-item protocol."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from missrec.data import SeqDataset
from missrec.runs import METRIC_KEYS, RunResult, popularity, train_missrec, train_sasrec
from missrec.train import TrainOptions

log = logging.getLogger(__name__)

COLD_FRACTION = 0.15
MODELS = (
    "missrec_inductive",
    "missrec_transductive",
    "msm4sr_inductive",
    "mmsrec",
    "sasrec",
    "popularity",
    "missrec_inductive_cold",
    "msm4sr_inductive_cold",
    "mmsrec_cold",
)
MSM4SR_PRETRAIN_EPOCHS = 20  # at most; early stopping on validation NDCG@10 as in fine-tuning
# MMSRec (d 512, its item tower over the whole catalogue every step) costs ~1-3 min per epoch on the 2-core machine:
# cap its epochs so the whole compare stays within 45 minutes.
MMSREC_MAX_EPOCHS = 8


def run_compare(ds: SeqDataset, opts: TrainOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train and evaluate every model. Returns (metrics shaped {model: {split: {metric: value}}}, details)."""
    from missrec.seed_runs import train_mmsrec, train_msm4sr

    pre = min(MSM4SR_PRETRAIN_EPOCHS, opts.epochs)
    mm_opts = replace(opts, epochs=min(opts.epochs, MMSREC_MAX_EPOCHS))
    recipes = {
        "missrec_inductive": lambda: train_missrec(ds, opts, "inductive", name="missrec_inductive"),
        "missrec_transductive": lambda: train_missrec(ds, opts, "transductive", name="missrec_transductive"),
        "msm4sr_inductive": lambda: train_msm4sr(ds, opts, "inductive", pre, name="msm4sr_inductive"),
        "mmsrec": lambda: train_mmsrec(ds, mm_opts, name="mmsrec"),
        "sasrec": lambda: train_sasrec(ds, opts),
        "popularity": lambda: popularity(ds),
        "missrec_inductive_cold": lambda: train_missrec(
            ds, replace(opts), "inductive", cold_fraction=COLD_FRACTION, name="missrec_inductive_cold"
        ),
        "msm4sr_inductive_cold": lambda: train_msm4sr(
            ds, opts, "inductive", pre, cold_fraction=COLD_FRACTION, name="msm4sr_inductive_cold"
        ),
        "mmsrec_cold": lambda: train_mmsrec(ds, mm_opts, cold_fraction=COLD_FRACTION, name="mmsrec_cold"),
    }
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for name, recipe in recipes.items():
        started = time.perf_counter()
        run: RunResult = recipe()
        metrics[name] = run.metrics
        details[name] = {
            **run.info,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "history": run.fit.history if run.fit else [],
        }
        log.info("%s: test ndcg@10 %.4f (%s)", name, run.metrics["test"]["ndcg@10"], details[name]["wall_seconds"])
    return metrics, details


def format_table(metrics: dict[str, Any]) -> list[list[str]]:
    """Rows [model, split, metric values...] for printing."""
    rows = []
    for model, splits in metrics.items():
        for split, values in splits.items():
            rows.append([model, split, *(f"{values[k]:.4f}" for k in METRIC_KEYS)])
    return rows


def write_outputs(out: Path, metrics: dict[str, Any], details: dict[str, Any], plot: Path | None = None) -> list[Path]:
    """FILE.json (metrics only), FILE.details.json (epochs, timings, curves) and an optional PNG plot."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    details_path = out.with_suffix(".details.json")
    details_path.write_text(json.dumps(details, indent=2) + "\n")
    written = [out, details_path]
    if plot is not None:
        written.append(plot_curves(details, plot))
    return written


def plot_curves(details: dict[str, Any], path: Path, models: tuple[str, ...] = ("missrec_inductive", "sasrec")) -> Path:
    """Validation NDCG@10 per epoch for the given models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for model in models:
        history = details.get(model, {}).get("history", [])
        if history:
            ax.plot([h["epoch"] + 1 for h in history], [h["ndcg@10"] for h in history], label=model)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10")
    ax.set_title("Validation NDCG@10 per epoch (full ranking)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
