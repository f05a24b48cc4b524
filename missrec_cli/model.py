"""The model commands of ``missrec``: train, evaluate, compare, merge-compare, tune and pretrain, for every
model family of :mod:`missrec.families` (their recipes: :mod:`missrec.recipes`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from missrec.families import FAMILIES, family, trainable
from missrec_cli.common import (
    ConfigFiles,
    DataDir,
    Device,
    Epochs,
    FeatureNorm,
    LogitAdjust,
    LrScales,
    Patience,
    RankedHistory,
    Seed,
    TrainExcludeHistory,
    console,
    fail,
    load_configs,
    load_data,
    lr_scales,
)
from missrec_cli.scale import (
    Autocast,
    Distributed,
    Negatives,
    Sampler,
    SparseIds,
    TestRows,
    ValidRows,
    sampling_options,
)


def _print_metrics(metrics: dict, title: str) -> None:
    from missrec.evaluation.report import METRIC_KEYS
    from missrec.recipes.compare import format_table

    table = Table(title=title)
    for col in ("model", "split", *METRIC_KEYS):
        table.add_column(col, justify="left" if col in ("model", "split") else "right")
    for row in format_table(metrics):
        table.add_row(*row)
    console.print(table)


def train(
    data: DataDir,
    out: Annotated[Path, typer.Option("--out", help="Run directory: checkpoint.pt and metrics.json.")],
    model: Annotated[str, typer.Option(help=f"{', '.join(trainable())}.")] = "missrec",
    mode: Annotated[
        str, typer.Option(help="inductive (no IDs) or transductive (IDs); missrec and msm4sr only.")
    ] = "inductive",
    epochs: Epochs = 300,
    pretrain_epochs: Annotated[
        int | None,
        typer.Option(help="msm4sr / mmsrec pre-training epochs before fine-tuning (0: none; default 20 / 0)."),
    ] = None,
    seed: Seed = 0,
    pretrained: Annotated[Path | None, typer.Option(help="Pre-trained MISSRec checkpoint to fine-tune from.")] = None,
    cold_fraction: Annotated[
        float | None, typer.Option(help="Withhold this fraction of items (cold protocol).")
    ] = None,
    patience: Patience = 10,
    batch_size: Annotated[int, typer.Option(help="Training rows per optimiser step.")] = 512,
    device: Device = "cpu",
    ranked_history: RankedHistory = False,
    config: ConfigFiles = None,
    train_exclude_history: TrainExcludeHistory = False,
    lr_scale: LrScales = None,
    feature_norm: FeatureNorm = "none",
    logit_adjust: LogitAdjust = 0.0,
    id_dropout: Annotated[
        float,
        typer.Option(
            help="Hybrid (missrec and msm4sr, --mode transductive): drop each item's ID embedding with this "
            "probability per training step, so that an item without an ID (ingested later) scores on its content. "
            "0: off (the papers' transductive models)."
        ),
    ] = 0.0,
    negatives: Negatives = None,
    sampler: Sampler = "mixed",
    valid_rows: ValidRows = 0,
    test_rows: TestRows = 0,
    autocast: Autocast = "none",
    sparse_ids: SparseIds = True,
    distributed: Distributed = False,
) -> None:
    """Train a model on a dataset (pre-training where it has it, then fine-tuning, early stopping on valid
    NDCG@10); write RUN_DIR/checkpoint.pt and RUN_DIR/metrics.json. Several processes:
    ``torchrun --nproc-per-node N -m missrec_cli.main train --distributed ...``."""
    from missrec.models.config import MODES
    from missrec.recipes import TrainRequest
    from missrec.training.loop import TrainOptions
    from missrec.training.run import save_run

    if model not in trainable():
        raise fail(f"--model must be one of {', '.join(trainable())}, not {model!r}")
    if mode not in MODES:
        raise fail(f"--mode must be inductive or transductive, not {mode!r}")
    fam = family(model)
    if mode not in fam.modes:
        takes = " and ".join(name for name, f in FAMILIES.items() if mode in f.modes)
        raise fail(f"--mode {mode} applies to {takes} only")
    if pretrained and model != "missrec":
        raise fail("--pretrained is a MISSRec checkpoint; msm4sr and mmsrec pre-train with --pretrain-epochs")
    if cold_fraction and not fam.features:
        raise fail(f"the cold-item protocol needs a model that scores items from features (not {model})")
    sampling = sampling_options(negatives, sampler, valid_rows, test_rows, autocast, sparse_ids)
    if distributed:
        from missrec.training.distributed import init_from_env

        try:
            device = init_from_env(device)
        except RuntimeError as exc:
            raise fail(str(exc)) from None
    configs = load_configs(config)
    if set(configs) - {model}:
        raise fail(f"`train --model {model}` takes a {model} config (`missrec tune --model {model}`)")
    tuned = configs.get(model)
    ds = load_data(data)
    run_options = {
        "epochs": epochs,
        "seed": seed,
        "patience": patience,
        "batch_size": batch_size,
        "device": device,
        "exclude_history": not ranked_history,
        "train_exclude_history": train_exclude_history,
        "lr_scales": lr_scales(lr_scale),
        "feature_norm": feature_norm,
        "logit_adjust": logit_adjust,
        **sampling,
    }
    opts = TrainOptions(**(run_options | (tuned.training if tuned else {})))  # the config file wins
    architecture = dict(tuned.architecture) if tuned and tuned.architecture else {}
    if id_dropout:
        if model not in ("missrec", "msm4sr"):
            raise fail(f"--id-dropout applies to missrec and msm4sr only, not {model}")
        architecture["id_dropout"] = id_dropout
    request = TrainRequest(
        mode=mode,
        pretrained=pretrained,
        pretrain_epochs=pretrain_epochs,
        cold_fraction=cold_fraction,
        architecture=architecture or None,
    )
    try:
        run = fam.recipe().train(ds, opts, request)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if distributed:
        from missrec.training.distributed import rank, shutdown

        writer = rank() == 0
        shutdown()
        if not writer:
            return
    save_run(
        run,
        ds,
        out,
        {
            "model": model,
            "mode": mode,
            "seed": seed,
            "pretrained": str(pretrained) if pretrained else None,
            "pretrain_epochs": pretrain_epochs,
            "cold_fraction": cold_fraction,
            "batch_size": batch_size,
            "config": tuned.to_dict() if tuned else None,
            "protocol": "history_ranked" if ranked_history else "history_excluded",
            "train_exclude_history": train_exclude_history,
            "lr_scales": [list(x) for x in lr_scales(lr_scale)],
            "feature_norm": feature_norm,
            "logit_adjust": logit_adjust,
            "id_dropout": id_dropout,
            **sampling,
            "distributed": distributed,
        },
    )
    label = f"{model}_{mode}" if len(fam.modes) > 1 else model
    _print_metrics({label: run.metrics}, f"{ds.name}: {run.info['protocol']}, best epoch {run.info['best_epoch']}")
    console.print(f"wrote {out / 'checkpoint.pt'} and {out / 'metrics.json'}")


def evaluate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="checkpoint.pt from `missrec train`.")],
    data: DataDir,
    out: Annotated[Path | None, typer.Option(help="Where to write the metrics JSON.")] = None,
    device: Device = "cpu",
    ranked_history: RankedHistory = False,
) -> None:
    """Evaluate a checkpoint on the valid and test splits (full ranking, both protocols; cold/warm/few groups)."""
    import numpy as np

    from missrec.evaluation.cold import TrainingData, training_data
    from missrec.evaluation.report import evaluate_run
    from missrec.models.checkpoint import CheckpointError, attach_features, load_checkpoint
    from missrec.training.loop import TrainOptions

    ds = load_data(data)
    try:
        ckpt = load_checkpoint(checkpoint)
        attach_features(ckpt.model, ds, ckpt.meta)
    except CheckpointError as exc:
        raise fail(str(exc)) from None
    model = ckpt.model.to(device)
    training = ckpt.meta.get("training", {})
    cold_items = ckpt.meta.get("cold_items")
    if cold_items:  # the rows it was trained and validated on (the split is seeded)
        split = training_data(ds, training.get("cold_fraction"), int(training.get("seed", 0)))
        withheld = np.zeros(ds.num_items, dtype=bool)
        withheld[cold_items] = True
        if not np.array_equal(withheld, split.withheld):
            raise fail("the checkpoint's withheld items differ from the seeded cold split of this dataset")
        data_used = split
    else:
        data_used = TrainingData(ds.train, ds.valid)
    opts = TrainOptions(device=device, exclude_history=not ranked_history)
    metrics, info, _ = evaluate_run(model, ds, data_used, opts)
    _print_metrics({ckpt.model_type: metrics}, f"{checkpoint} on {ds.name} ({info['protocol']})")
    target = out or checkpoint.parent / "eval_metrics.json"
    target.write_text(json.dumps({**metrics, "info": info}, indent=2) + "\n")
    console.print(f"wrote {target}")


def compare(
    ctx: typer.Context,
    data: DataDir,
    out: Annotated[Path, typer.Option("--out", help="Metrics JSON; FILE.details.json gets curves and timings.")],
    epochs: Epochs = 300,
    seed: Seed = 0,
    seeds: Annotated[
        list[int] | None, typer.Option("--seeds", help="Several seeds: --seeds 0 1 2 (mean ± std, paired intervals).")
    ] = None,
    models: Annotated[
        str | None, typer.Option(help="Comma-separated subset of the models (default: all that can run).")
    ] = None,
    patience: Patience = 10,
    plot: Annotated[Path | None, typer.Option(help="PNG of validation NDCG@10 per epoch, MISSRec vs SASRec.")] = None,
    device: Device = "cpu",
    ranked_history: RankedHistory = False,
    config: ConfigFiles = None,
    train_exclude_history: TrainExcludeHistory = False,
    lr_scale: LrScales = None,
    feature_norm: FeatureNorm = "none",
    logit_adjust: LogitAdjust = 0.0,
    negatives: Negatives = None,
    sampler: Sampler = "mixed",
    valid_rows: ValidRows = 0,
    test_rows: TestRows = 0,
    autocast: Autocast = "none",
    sparse_ids: SparseIds = True,
) -> None:
    """Train and evaluate MISSRec (inductive, transductive, cold protocol), SASRec and popularity side by side."""
    from missrec.recipes.compare import MODELS, run_compare, write_outputs
    from missrec.training.loop import TrainOptions

    seed_list = list(seeds or [])
    for extra in ctx.args:  # `--seeds 0 1 2`: click hands the values after the first over as extra arguments
        if not seeds or not extra.lstrip("-").isdigit():
            raise fail(f"unexpected argument {extra!r}")
        seed_list.append(int(extra))
    chosen = tuple(m.strip() for m in models.split(",")) if models else MODELS
    if set(chosen) - set(MODELS):
        raise fail(f"unknown models {sorted(set(chosen) - set(MODELS))}; choose from {', '.join(MODELS)}")
    configs = load_configs(config)
    ds = load_data(data)
    opts = TrainOptions(
        epochs=epochs,
        seed=seed,
        patience=patience,
        device=device,
        exclude_history=not ranked_history,
        train_exclude_history=train_exclude_history,
        lr_scales=lr_scales(lr_scale),
        feature_norm=feature_norm,
        logit_adjust=logit_adjust,
        **sampling_options(negatives, sampler, valid_rows, test_rows, autocast, sparse_ids),
    )
    cmp = run_compare(ds, opts, seed_list or [seed], chosen, configs)
    written = write_outputs(out, cmp, plot)
    _print_comparison(cmp, ds.name)
    console.print("wrote " + ", ".join(str(p) for p in written))


def tune(
    model: Annotated[str, typer.Option("--model", help="missrec or sasrec.")],
    data: DataDir,
    out: Annotated[Path, typer.Option("--out", help="Config JSON to write (for `train` / `compare --config`).")],
    trials: Annotated[int | None, typer.Option(help="Number of trials.")] = None,
    time_budget: Annotated[float | None, typer.Option(help="Wall-clock budget in seconds.")] = None,
    mode: Annotated[str, typer.Option(help="MISSRec mode: inductive or transductive.")] = "inductive",
    epochs: Epochs = 300,
    patience: Patience = 10,
    seed: Seed = 0,
    device: Device = "cpu",
    ranked_history: RankedHistory = False,
) -> None:
    """Search hyper-parameters with Optuna (TPE, pruning on validation NDCG@10 per epoch); write a config JSON."""
    from missrec.recipes.tune import tune as run_tune
    from missrec.training.loop import TrainOptions
    from missrec.training.run import MissingFeatures

    if mode not in ("inductive", "transductive"):
        raise fail(f"--mode must be inductive or transductive, not {mode!r}")
    if trials is None and time_budget is None:
        raise fail("give --trials N or --time-budget SECONDS")
    ds = load_data(data)
    opts = TrainOptions(
        epochs=epochs, seed=seed, patience=patience, device=device, exclude_history=not ranked_history, progress=False
    )
    try:
        result = run_tune(ds, model, opts, trials, time_budget, mode)  # type: ignore[arg-type]
    except (MissingFeatures, ValueError) as exc:
        raise fail(str(exc)) from None
    table = Table(title=f"{model} on {ds.name}: validation NDCG@10 ({result.config.notes['protocol']})")
    for col in ("trial", "state", "valid ndcg@10", "epochs", "s"):
        table.add_column(col, no_wrap=True)
    table.add_column("params", overflow="fold")  # every value whole, however narrow the terminal (or a log file)
    for row in result.trials:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.params.items())
        value = f"{row.value:.4f}" if row.value is not None else "-"
        table.add_row(str(row.number), row.state, value, str(row.epochs), f"{row.seconds:.0f}", params)
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result.config.to_dict(), indent=2) + "\n")
    default = f"{result.default_value:.4f}" if result.default_value is not None else "pruned/cut"
    console.print(
        f"best valid ndcg@10 {result.best_value:.4f} (paper defaults, trial 0: {default}); "
        f"{len(result.trials)} trials in {result.seconds:.0f} s; wrote {out}"
    )


def _print_comparison(cmp, name: str) -> None:
    title = f"{name}: full ranking, {cmp.protocol}, seeds {' '.join(map(str, cmp.seeds))} (mean ± std)"
    _print_metrics(cmp.summary(), title)
    versus = cmp.versus_reference()
    if versus:
        table = Table(title="test NDCG@10 vs SASRec: paired bootstrap over users (seed-averaged), 95%")
        for col in ("model", "ndcg@10", "sasrec", "ratio", "mean diff", "95% interval", "verdict"):
            table.add_column(col)
        for model, v in versus.items():
            table.add_row(
                model,
                f"{v['ndcg@10']:.4f}",
                f"{v['reference_ndcg@10']:.4f}",
                f"{v['ratio']:.3f}x",
                f"{v['mean_diff']:+.4f}",
                f"[{v['low']:+.4f}, {v['high']:+.4f}]",
                v["verdict"],
            )
        console.print(table)
    for s, per_model in cmp.details.items():
        for model, d in per_model.items():
            console.print(
                f"seed {s} {model}: best epoch {d.get('best_epoch', '-')}, epochs run {d.get('epochs_run', '-')}, "
                f"{d['wall_seconds']} s"
            )
    for model, reason in cmp.skipped.items():
        console.print(f"[yellow]skipped {model}:[/] {reason}")


def merge_compare(
    parts: Annotated[list[Path], typer.Argument(help="compare outputs (FILE.json, next to FILE.details.json).")],
    out: Annotated[Path, typer.Option("--out", help="Merged metrics JSON (+ .details.json).")],
) -> None:
    """Merge `compare` runs of different seeds (e.g. run in parallel) into one table with paired intervals."""
    from missrec.recipes.compare import load_comparison, merge_comparisons, write_outputs

    try:
        cmp = merge_comparisons([load_comparison(p) for p in parts])
    except (OSError, KeyError, ValueError) as exc:
        raise fail(str(exc)) from None
    written = write_outputs(out, cmp)
    _print_comparison(cmp, "merged")
    console.print("wrote " + ", ".join(str(p) for p in written))


def pretrain(
    data: Annotated[list[Path], typer.Option("--data", help="Dataset directories (repeat for several domains).")],
    out: Annotated[Path, typer.Option("--out", help="Run directory for checkpoint.pt.")],
    epochs: Epochs = 20,
    seed: Seed = 0,
    device: Device = "cpu",
) -> None:
    """Multi-domain contrastive pre-training; fine-tune the result with `missrec train --pretrained`."""
    from missrec.models.checkpoint import save_checkpoint
    from missrec.training.pretrain_missrec import PretrainOptions
    from missrec.training.pretrain_missrec import pretrain as run_pretrain

    datasets = [load_data(d) for d in data]
    try:
        model, history = run_pretrain(datasets, PretrainOptions(epochs=epochs, seed=seed, device=device))
    except ValueError as exc:
        raise fail(str(exc)) from None
    info = {"domains": [{"name": d.name, "fingerprint": d.fingerprint} for d in datasets]}
    path = save_checkpoint(out / "checkpoint.pt", model, dataset=info, training={"history": history, "seed": seed})
    console.print(
        f"pre-trained on {', '.join(d.name for d in datasets)}: final loss {history[-1]['loss']:.4f}; wrote {path}"
    )


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command()(evaluate)
    app.command(context_settings={"allow_extra_args": True})(compare)
    app.command("merge-compare")(merge_compare)
    app.command()(tune)
    app.command()(pretrain)
