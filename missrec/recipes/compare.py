"""Side-by-side comparison on one split over one or more seeds: MISSRec (inductive, transductive), MSM4SR, MMSRec,
SASRec, popularity, and each inductive model under the cold-item protocol; mean ± std per metric and a paired
bootstrap interval against SASRec."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from missrec.data.dataset import SeqDataset
from missrec.evaluation.metrics import ndcg_per_row, protocol_name
from missrec.evaluation.report import METRIC_KEYS
from missrec.evaluation.stats import mean_std, paired_bootstrap
from missrec.families import FAMILIES
from missrec.recipes import CompareRun
from missrec.recipes.tuned import TunedConfig
from missrec.training.loop import TrainOptions
from missrec.training.run import MissingFeatures

log = logging.getLogger(__name__)

REFERENCE = "sasrec"


def compare_runs() -> dict[str, CompareRun]:
    """Every run ``missrec compare`` knows, from the families' recipes: the warm runs in family order, then the
    cold-protocol runs."""
    runs = [run for f in FAMILIES.values() for run in f.recipe().COMPARE]
    return {run.name: run for run in sorted(runs, key=lambda run: run.cold)}  # sorted() is stable


MODELS: tuple[str, ...] = tuple(compare_runs())


@dataclass
class Comparison:
    """Everything one ``compare`` produced. per_seed[seed][model][split][metric]; skipped[model] = why."""

    protocol: str
    seeds: list[int]
    per_seed: dict[int, dict[str, dict[str, dict[str, float]]]] = field(default_factory=dict)
    details: dict[int, dict[str, Any]] = field(default_factory=dict)
    test_ndcg10: dict[str, list[np.ndarray]] = field(default_factory=dict)  # model -> per seed (U,) per-user
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
        """{model: {split: {metric: {"mean", "std", "values"}}}} over the seeds."""
        out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        for model in self.models:
            splits = self.per_seed[self.seeds[0]][model]
            out[model] = {}
            for split in splits:
                out[model][split] = {}
                for key in METRIC_KEYS:
                    values = [self.per_seed[s][model][split][key] for s in self.seeds]
                    mean, std = mean_std(values)
                    out[model][split][key] = {"mean": mean, "std": std, "values": values}
        return out

    @property
    def models(self) -> list[str]:
        return list(self.per_seed[self.seeds[0]]) if self.seeds and self.per_seed else []

    def versus_reference(self, resamples: int = 10_000) -> dict[str, dict[str, Any]]:
        """Per model (cold-protocol runs excluded: trained on other rows), test NDCG@10 against SASRec: means,
        ratio and a paired bootstrap 95% interval over users of the seed-averaged per-user difference."""
        if REFERENCE not in self.test_ndcg10:
            return {}
        reference = np.mean(self.test_ndcg10[REFERENCE], axis=0)
        out = {}
        for model, per_seed in self.test_ndcg10.items():
            if model == REFERENCE or model.endswith("_cold"):  # cold runs: trained on other rows
                continue
            ours = np.mean(per_seed, axis=0)
            interval = paired_bootstrap(ours, reference, resamples=resamples)
            out[model] = {
                "ndcg@10": float(ours.mean()),
                "reference_ndcg@10": float(reference.mean()),
                "ratio": float(ours.mean() / reference.mean()) if reference.mean() > 0 else float("nan"),
                **interval.to_dict(),
            }
        return out


def run_compare(
    ds: SeqDataset,
    opts: TrainOptions,
    seeds: list[int] | None = None,
    models: tuple[str, ...] = MODELS,
    configs: dict[str, TunedConfig] | None = None,
) -> Comparison:
    """Train and evaluate ``models`` once per seed. Models that cannot run on ``ds`` (no item features) are
    skipped with the reason; ``configs`` (family -> tuned config) replace the paper defaults."""
    runs = compare_runs()
    unknown = set(models) - set(runs)
    if unknown:
        raise ValueError(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    seeds = seeds if seeds else [opts.seed]
    result = Comparison(protocol=protocol_name(opts.exclude_history), seeds=list(seeds))
    for seed in seeds:
        result.per_seed[seed], result.details[seed] = {}, {}
        for name in models:
            if name in result.skipped:
                continue
            tuned = (configs or {}).get(runs[name].family)
            run_opts = replace(opts, seed=seed, **(tuned.training if tuned else {}))
            started = time.perf_counter()
            try:
                run = runs[name].recipe(ds, run_opts, tuned.architecture if tuned else None)
            except MissingFeatures as exc:
                result.skipped[name] = str(exc)
                log.warning("skipping %s: %s", name, exc)
                continue
            result.per_seed[seed][name] = run.metrics
            result.details[seed][name] = {
                **run.info,
                "wall_seconds": round(time.perf_counter() - started, 1),
                "history": run.fit.history if run.fit else [],
            }
            result.test_ndcg10.setdefault(name, []).append(ndcg_per_row(run.test_ranks[result.protocol], 10))
            log.info("seed %d %s: test ndcg@10 %.4f", seed, name, run.metrics["test"]["ndcg@10"])
    return result


def load_comparison(path: Path) -> Comparison:
    """Read back what :func:`write_outputs` wrote (FILE.json + FILE.details.json)."""
    payload = json.loads(path.read_text())
    details = json.loads(path.with_suffix(".details.json").read_text())
    seeds = [int(s) for s in payload["seeds"]]
    cmp = Comparison(protocol=payload["protocol"], seeds=seeds, skipped=dict(payload.get("skipped", {})))
    cmp.per_seed = {int(s): m for s, m in payload["per_seed"].items()}
    cmp.details = {int(s): d for s, d in details["per_seed"].items()}
    cmp.test_ndcg10 = {m: [np.asarray(v) for v in vs] for m, vs in details["per_user_test_ndcg@10"].items()}
    return cmp


def merge_comparisons(parts: list[Comparison]) -> Comparison:
    """One comparison from runs of different seeds and/or different models (run as separate processes).

    Parts with the same seeds but different models are joined first; then every seed must hold the same models.
    """
    first = parts[0]
    merged = Comparison(protocol=first.protocol, seeds=[])
    vectors: dict[str, dict[int, np.ndarray]] = {}
    for part in parts:
        if part.protocol != first.protocol:
            raise ValueError("only comparisons of the same protocol can be merged")
        for seed in part.seeds:
            have = merged.per_seed.setdefault(seed, {})
            twice = set(have) & set(part.per_seed[seed])
            if twice:
                raise ValueError(f"seed {seed}: model(s) {sorted(twice)} appear twice")
            have |= part.per_seed[seed]
            merged.details.setdefault(seed, {}).update(part.details[seed])
            for model in part.per_seed[seed]:
                if model in part.test_ndcg10:
                    vectors.setdefault(model, {})[seed] = part.test_ndcg10[model][part.seeds.index(seed)]
        merged.skipped |= part.skipped
    merged.seeds = sorted(merged.per_seed)
    models = [set(merged.per_seed[s]) for s in merged.seeds]
    if any(m != models[0] for m in models):
        raise ValueError(f"the seeds hold different models: {[sorted(m) for m in models]}")
    merged.per_seed = {s: merged.per_seed[s] for s in merged.seeds}
    merged.test_ndcg10 = {m: [per[s] for s in merged.seeds] for m, per in vectors.items()}
    return merged


def format_table(metrics: dict[str, Any]) -> list[list[str]]:
    """Rows [model, split, metric values...] for printing: plain values, or {"mean", "std"} as mean ± std."""
    rows = []
    for model, splits in metrics.items():
        for split, values in splits.items():
            cells = []
            for k in METRIC_KEYS:
                v = values[k]
                cells.append(f"{v['mean']:.4f} ± {v['std']:.4f}" if isinstance(v, dict) else f"{v:.4f}")
            rows.append([model, split, *cells])
    return rows


def write_outputs(out: Path, cmp: Comparison, plot: Path | None = None) -> list[Path]:
    """FILE.json (summary, per-seed metrics, intervals, skipped), FILE.details.json (epochs, timings, curves)
    and an optional PNG plot of the first seed's validation curves."""
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "protocol": cmp.protocol,
        "seeds": cmp.seeds,
        "summary": cmp.summary(),
        "versus_sasrec": cmp.versus_reference(),
        "per_seed": {str(s): m for s, m in cmp.per_seed.items()},
        "skipped": cmp.skipped,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    details_path = out.with_suffix(".details.json")
    details = {
        "per_seed": {str(s): d for s, d in cmp.details.items()},
        # what the paired intervals are computed from, so runs of separate seeds can be merged exactly
        "per_user_test_ndcg@10": {
            model: [np.round(v, 6).tolist() for v in per_seed] for model, per_seed in cmp.test_ndcg10.items()
        },
    }
    details_path.write_text(json.dumps(details) + "\n")
    written = [out, details_path]
    if plot is not None and cmp.seeds:
        written.append(plot_curves(cmp.details[cmp.seeds[0]], plot))
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
