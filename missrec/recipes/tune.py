"""Hyper-parameter search with Optuna: TPE sampling, median pruning on validation NDCG@10 after every epoch.

The search space of each tunable family is declared in its recipe (``missrec.recipes.<family>.SEARCH_SPACE``).
The first trial is always the paper's defaults, so the table shows whether the search beat them on the same
validation rows. Only validation is looked at (served protocol by default); the test split is never touched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from missrec.data.dataset import SeqDataset
from missrec.families import family as family_of_name
from missrec.families import tunable
from missrec.models.config import Mode
from missrec.recipes.tuned import Param, TunedConfig
from missrec.training.loop import TrainOptions, fit
from missrec.training.run import require_features

log = logging.getLogger(__name__)


def search_space(family: str) -> tuple[Param, ...]:
    """The search space of a tunable family (ValueError for the others)."""
    if family not in tunable():
        raise ValueError(f"--model must be one of {tunable()}, got {family!r}")
    return family_of_name(family).recipe().SEARCH_SPACE


def defaults(family: str) -> dict[str, Any]:
    """The paper's values of every tunable parameter of ``family``: the first trial."""
    search_space(family)
    return family_of_name(family).recipe().DEFAULTS


@dataclass
class TrialRow:
    number: int
    state: str
    value: float | None
    epochs: int
    seconds: float
    params: dict[str, Any]


@dataclass
class TuneResult:
    config: TunedConfig
    best_value: float
    default_value: float | None
    trials: list[TrialRow] = field(default_factory=list)
    seconds: float = 0.0


class _OutOfTime(Exception):
    """The time budget ran out during a trial: it ends with the best validation value it reached."""


def suggest(trial: Any, space: tuple[Param, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(architecture overrides, training overrides) drawn for ``trial`` from ``space``."""
    arch: dict[str, Any] = {}
    training: dict[str, Any] = {}
    for p in space:
        if p.choices:
            value = trial.suggest_categorical(p.name, list(p.choices))
        else:
            value = trial.suggest_float(p.name, p.low, p.high, log=p.log)
        (arch if p.where == "architecture" else training)[p.name] = value
    return arch, training


def tune(
    ds: SeqDataset,
    family: str,
    opts: TrainOptions,
    trials: int | None = None,
    time_budget: float | None = None,
    mode: Mode = "inductive",
) -> TuneResult:
    """Search ``family``'s space on ``ds``: at most ``trials`` trials and/or ``time_budget`` seconds (a trial
    running when the budget ends stops at that epoch and keeps its best validation value)."""
    import optuna

    space = search_space(family)
    recipe = family_of_name(family).recipe()
    if trials is None and time_budget is None:
        raise ValueError("give --trials or --time-budget (or both)")
    if family_of_name(family).features:
        require_features(ds, f"{family_of_name(family).model} ({mode})")
    started = time.perf_counter()
    deadline = started + time_budget if time_budget else float("inf")
    sampler = optuna.samplers.TPESampler(seed=opts.seed, n_startup_trials=4)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=3)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    study.enqueue_trial(recipe.DEFAULTS)

    def objective(trial: optuna.Trial) -> float:
        arch, training = suggest(trial, space)
        model = recipe.build(ds, arch, opts.seed, mode)
        best = {"value": 0.0, "epochs": 0}

        def report(epoch: int, metrics: dict[str, float]) -> None:
            best["value"], best["epochs"] = max(best["value"], metrics["ndcg@10"]), epoch + 1
            trial.report(metrics["ndcg@10"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
            if time.perf_counter() > deadline:
                raise _OutOfTime()

        t0 = time.perf_counter()
        try:
            fit(model, ds.train, ds.valid, replace(opts, **training), name=f"trial {trial.number}", on_epoch_end=report)
        except _OutOfTime:
            trial.set_user_attr("cut_by_budget", True)
        finally:
            trial.set_user_attr("epochs", best["epochs"])
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 1))
        return best["value"]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=trials, timeout=time_budget, catch=())
    rows = [
        TrialRow(
            number=t.number,
            state=t.state.name.lower() + (" (budget)" if t.user_attrs.get("cut_by_budget") else ""),
            value=t.value if t.value is not None else (max(t.intermediate_values.values(), default=None)),
            epochs=int(t.user_attrs.get("epochs", 0)),
            seconds=float(t.user_attrs.get("seconds", 0.0)),
            params=dict(t.params),
        )
        for t in study.trials
    ]
    best = study.best_trial
    arch = {p.name: best.params[p.name] for p in space if p.where == "architecture"}
    training = {p.name: best.params[p.name] for p in space if p.where == "training"}
    first = study.trials[0]
    default_value = first.value if first.state == optuna.trial.TrialState.COMPLETE else None
    seconds = round(time.perf_counter() - started, 1)
    notes = {
        "dataset": ds.name,
        "fingerprint": ds.fingerprint,
        "mode": mode if family_of_name(family).features else None,
        "protocol": "history_excluded" if opts.exclude_history else "history_ranked",
        "valid_ndcg@10": best.value,
        "paper_defaults_valid_ndcg@10": default_value,
        "trials": len(study.trials),
        "seconds": seconds,
        "max_epochs": opts.epochs,
        "patience": opts.patience,
        "seed": opts.seed,
    }
    config = TunedConfig(model=family, architecture=arch, training=training, notes=notes)
    return TuneResult(config, float(best.value), default_value, rows, seconds)
