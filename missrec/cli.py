"""The model commands of the ``missrec`` CLI: train (missrec, msm4sr, mmsrec, sasrec), evaluate, compare, pretrain,
synth, prepare.

The serving commands (export, build-index, serve, quickstart) are added by missrec_cli, which composes this
package with the serving ones: missrec itself imports nothing of serving.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="MISSRec: train, evaluate, export and serve a multi-modal sequential recommender.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console()

DataDir = Annotated[Path, typer.Option("--data", help="Dataset directory in the atomic format.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (training is deterministic for a seed).")]
Epochs = Annotated[int, typer.Option("--epochs", help="Maximum epochs (early stopping on valid NDCG@10).")]
Device = Annotated[str, typer.Option("--device", help="torch device: cpu, cuda, cuda:0 ...")]
RankedHistory = Annotated[
    bool,
    typer.Option(
        "--ranked-history",
        help="Rank the user's history items too (papers' protocol). Default: excluded, as the service serves.",
    ),
]
Patience = Annotated[int, typer.Option(help="Early-stopping patience in epochs.")]
TrainExcludeHistory = Annotated[
    bool,
    typer.Option(
        "--train-exclude-history",
        help="Lever: leave each row's history items out of the training softmax too (default: the paper's loss).",
    ),
]
LrScales = Annotated[
    list[str] | None,
    typer.Option("--lr-scale", help="Lever: PREFIX=MULT, lr x MULT for parameters named PREFIX* (e.g. alpha=100)."),
]
FeatureNorm = Annotated[
    str, typer.Option(help="Lever: none (the paper), center or standardize the frozen features while training.")
]
LogitAdjust = Annotated[
    float,
    typer.Option(
        "--logit-adjust",
        min=0.0,
        help="Lever: train on logits + T * log(training popularity), serve plain logits (0: the paper's loss).",
    ),
]
ConfigFiles = Annotated[
    list[Path] | None, typer.Option("--config", help="Config JSON from `missrec tune` (repeat: one per model).")
]


@app.callback()
def main(log_level: Annotated[str, typer.Option(help="Logging level.")] = "WARNING") -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=2)


def _load(data: Path):
    from missrec.data import DatasetError, load_dataset

    try:
        return load_dataset(data)
    except DatasetError as exc:
        raise _fail(str(exc)) from None


def _lr_scales(specs: list[str] | None) -> tuple[tuple[str, float], ...]:
    out = []
    for spec in specs or []:
        prefix, _, mult = spec.partition("=")
        try:
            out.append((prefix, float(mult)))
        except ValueError:
            raise _fail(f"--lr-scale wants PREFIX=MULTIPLIER, got {spec!r}") from None
    return tuple(out)


def _load_configs(paths: list[Path] | None) -> dict:
    """family -> TunedConfig from ``--config`` files (one per model family)."""
    from missrec.config import TunedConfig

    configs = {}
    for path in paths or []:
        try:
            cfg = TunedConfig.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise _fail(f"{path}: {exc}") from None
        if cfg.model in configs:
            raise _fail(f"two --config files for {cfg.model}")
        configs[cfg.model] = cfg
    return configs


def _print_metrics(metrics: dict, title: str) -> None:
    from missrec.compare import format_table
    from missrec.runs import METRIC_KEYS

    table = Table(title=title)
    for col in ("model", "split", *METRIC_KEYS):
        table.add_column(col, justify="left" if col in ("model", "split") else "right")
    for row in format_table(metrics):
        table.add_row(*row)
    console.print(table)


MODEL_CHOICES = ("missrec", "msm4sr", "mmsrec", "sasrec")


@app.command()
def train(
    data: DataDir,
    out: Annotated[Path, typer.Option("--out", help="Run directory: checkpoint.pt and metrics.json.")],
    model: Annotated[str, typer.Option(help="missrec, msm4sr, mmsrec or sasrec.")] = "missrec",
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
) -> None:
    """Train a model on a dataset (pre-training where it has it, then fine-tuning, early stopping on valid
    NDCG@10); write RUN_DIR/checkpoint.pt and RUN_DIR/metrics.json."""
    from missrec.runs import save_run, train_missrec, train_sasrec
    from missrec.seed_runs import train_mmsrec, train_msm4sr
    from missrec.train import TrainOptions

    if model not in MODEL_CHOICES:
        raise _fail(f"--model must be one of {', '.join(MODEL_CHOICES)}, not {model!r}")
    if mode not in ("inductive", "transductive"):
        raise _fail(f"--mode must be inductive or transductive, not {mode!r}")
    if mode != "inductive" and model not in ("missrec", "msm4sr"):
        raise _fail(f"--mode {mode} applies to missrec and msm4sr only")
    if pretrained and model != "missrec":
        raise _fail("--pretrained is a MISSRec checkpoint; msm4sr and mmsrec pre-train with --pretrain-epochs")
    if cold_fraction and model == "sasrec":
        raise _fail("the cold-item protocol needs a model that scores items from features (not sasrec)")
    configs = _load_configs(config)
    if set(configs) - {model}:
        raise _fail(f"`train --model {model}` takes a {model} config (`missrec tune --model {model}`)")
    tuned = configs.get(model)
    ds = _load(data)
    run_options = {
        "epochs": epochs,
        "seed": seed,
        "patience": patience,
        "batch_size": batch_size,
        "device": device,
        "exclude_history": not ranked_history,
        "train_exclude_history": train_exclude_history,
        "lr_scales": _lr_scales(lr_scale),
        "feature_norm": feature_norm,
        "logit_adjust": logit_adjust,
    }
    opts = TrainOptions(**(run_options | (tuned.training if tuned else {})))  # the config file wins
    architecture = tuned.architecture if tuned else None
    try:
        if model == "missrec":
            run = train_missrec(
                ds,
                opts,
                mode,  # type: ignore[arg-type]
                pretrained=pretrained,
                cold_fraction=cold_fraction,
                config=architecture,
            )
        elif model == "msm4sr":
            pre = 20 if pretrain_epochs is None else pretrain_epochs
            run = train_msm4sr(ds, opts, mode, pre, cold_fraction)  # type: ignore[arg-type]
        elif model == "mmsrec":
            run = train_mmsrec(ds, opts, pretrain_epochs or 0, cold_fraction)
        else:
            run = train_sasrec(ds, opts, config=architecture)
    except ValueError as exc:
        raise _fail(str(exc)) from None
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
            "lr_scales": [list(x) for x in _lr_scales(lr_scale)],
            "feature_norm": feature_norm,
            "logit_adjust": logit_adjust,
        },
    )
    label = model if model in ("sasrec", "mmsrec") else f"{model}_{mode}"
    _print_metrics({label: run.metrics}, f"{ds.name}: {run.info['protocol']}, best epoch {run.info['best_epoch']}")
    console.print(f"wrote {out / 'checkpoint.pt'} and {out / 'metrics.json'}")


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="checkpoint.pt from `missrec train`.")],
    data: DataDir,
    out: Annotated[Path | None, typer.Option(help="Where to write the metrics JSON.")] = None,
    device: Device = "cpu",
    ranked_history: RankedHistory = False,
) -> None:
    """Evaluate a checkpoint on the valid and test splits (full ranking, both protocols; cold/warm/few groups)."""
    import numpy as np

    from missrec.checkpoint import CheckpointError, attach_features, load_checkpoint
    from missrec.runs import TrainingData, evaluate_run, training_data
    from missrec.train import TrainOptions

    ds = _load(data)
    try:
        ckpt = load_checkpoint(checkpoint)
        attach_features(ckpt.model, ds, ckpt.meta)
    except CheckpointError as exc:
        raise _fail(str(exc)) from None
    model = ckpt.model.to(device)
    training = ckpt.meta.get("training", {})
    cold_items = ckpt.meta.get("cold_items")
    if cold_items:  # the rows it was trained and validated on (the split is seeded)
        split = training_data(ds, training.get("cold_fraction"), int(training.get("seed", 0)))
        withheld = np.zeros(ds.num_items, dtype=bool)
        withheld[cold_items] = True
        if not np.array_equal(withheld, split.withheld):
            raise _fail("the checkpoint's withheld items differ from the seeded cold split of this dataset")
        data_used = split
    else:
        data_used = TrainingData(ds.train, ds.valid)
    opts = TrainOptions(device=device, exclude_history=not ranked_history)
    metrics, info, _ = evaluate_run(model, ds, data_used, opts)
    _print_metrics({ckpt.model_type: metrics}, f"{checkpoint} on {ds.name} ({info['protocol']})")
    target = out or checkpoint.parent / "eval_metrics.json"
    target.write_text(json.dumps({**metrics, "info": info}, indent=2) + "\n")
    console.print(f"wrote {target}")


@app.command(context_settings={"allow_extra_args": True})
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
) -> None:
    """Train and evaluate MISSRec (inductive, transductive, cold protocol), SASRec and popularity side by side."""
    from missrec.compare import MODELS, run_compare, write_outputs
    from missrec.train import TrainOptions

    seed_list = list(seeds or [])
    for extra in ctx.args:  # `--seeds 0 1 2`: click hands the values after the first over as extra arguments
        if not seeds or not extra.lstrip("-").isdigit():
            raise _fail(f"unexpected argument {extra!r}")
        seed_list.append(int(extra))
    chosen = tuple(m.strip() for m in models.split(",")) if models else MODELS
    if set(chosen) - set(MODELS):
        raise _fail(f"unknown models {sorted(set(chosen) - set(MODELS))}; choose from {', '.join(MODELS)}")
    configs = _load_configs(config)
    ds = _load(data)
    opts = TrainOptions(
        epochs=epochs,
        seed=seed,
        patience=patience,
        device=device,
        exclude_history=not ranked_history,
        train_exclude_history=train_exclude_history,
        lr_scales=_lr_scales(lr_scale),
        feature_norm=feature_norm,
        logit_adjust=logit_adjust,
    )
    cmp = run_compare(ds, opts, seed_list or [seed], chosen, configs)
    written = write_outputs(out, cmp, plot)
    _print_comparison(cmp, ds.name)
    console.print("wrote " + ", ".join(str(p) for p in written))


@app.command()
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
    from missrec.runs import MissingFeatures
    from missrec.train import TrainOptions
    from missrec.tune import tune as run_tune

    if mode not in ("inductive", "transductive"):
        raise _fail(f"--mode must be inductive or transductive, not {mode!r}")
    if trials is None and time_budget is None:
        raise _fail("give --trials N or --time-budget SECONDS")
    ds = _load(data)
    opts = TrainOptions(
        epochs=epochs, seed=seed, patience=patience, device=device, exclude_history=not ranked_history, progress=False
    )
    try:
        result = run_tune(ds, model, opts, trials, time_budget, mode)  # type: ignore[arg-type]
    except (MissingFeatures, ValueError) as exc:
        raise _fail(str(exc)) from None
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


@app.command("merge-compare")
def merge_compare(
    parts: Annotated[list[Path], typer.Argument(help="compare outputs (FILE.json, next to FILE.details.json).")],
    out: Annotated[Path, typer.Option("--out", help="Merged metrics JSON (+ .details.json).")],
) -> None:
    """Merge `compare` runs of different seeds (e.g. run in parallel) into one table with paired intervals."""
    from missrec.compare import load_comparison, merge_comparisons, write_outputs

    try:
        cmp = merge_comparisons([load_comparison(p) for p in parts])
    except (OSError, KeyError, ValueError) as exc:
        raise _fail(str(exc)) from None
    written = write_outputs(out, cmp)
    _print_comparison(cmp, "merged")
    console.print("wrote " + ", ".join(str(p) for p in written))


@app.command()
def pretrain(
    data: Annotated[list[Path], typer.Option("--data", help="Dataset directories (repeat for several domains).")],
    out: Annotated[Path, typer.Option("--out", help="Run directory for checkpoint.pt.")],
    epochs: Epochs = 20,
    seed: Seed = 0,
    device: Device = "cpu",
) -> None:
    """Multi-domain contrastive pre-training; fine-tune the result with `missrec train --pretrained`."""
    from missrec.checkpoint import save_checkpoint
    from missrec.pretrain import PretrainOptions
    from missrec.pretrain import pretrain as run_pretrain

    datasets = [_load(d) for d in data]
    try:
        model, history = run_pretrain(datasets, PretrainOptions(epochs=epochs, seed=seed, device=device))
    except ValueError as exc:
        raise _fail(str(exc)) from None
    info = {"domains": [{"name": d.name, "fingerprint": d.fingerprint} for d in datasets]}
    path = save_checkpoint(out / "checkpoint.pt", model, dataset=info, training={"history": history, "seed": seed})
    console.print(
        f"pre-trained on {', '.join(d.name for d in datasets)}: final loss {history[-1]['loss']:.4f}; wrote {path}"
    )


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="Directory for the SYNTHETIC dataset.")],
    users: Annotated[int, typer.Option(help="Number of users.")] = 2000,
    items: Annotated[int, typer.Option(help="Number of items.")] = 1000,
    topics: Annotated[int, typer.Option(help="Latent topics.")] = 24,
    seed: Seed = 0,
) -> None:
    """Write a deterministic SYNTHETIC multi-modal dataset (latent topics drive features and behaviour)."""
    from missrec.synthetic import generate_synthetic

    path = generate_synthetic(out, num_users=users, num_items=items, num_topics=topics, seed=seed)
    console.print(f"wrote synthetic dataset to {path}")


@app.command()
def prepare(
    items: Annotated[Path, typer.Option("--items", help="Catalog: JSON lines {item_id, text, image}.")],
    interactions: Annotated[Path, typer.Option("--interactions", help="CSV with user_id,item_id,timestamp.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the atomic dataset.")],
    name: Annotated[str | None, typer.Option(help="Dataset name (default: the folder name).")] = None,
    min_core: Annotated[int, typer.Option(help="k-core filtering threshold.")] = 5,
    clip_model: Annotated[str | None, typer.Option(help="open_clip architecture [default: ViT-B-32].")] = None,
    clip_pretrained: Annotated[
        str | None, typer.Option(help="open_clip tag or local checkpoint path [default: openai].")
    ] = None,
    clip_onnx: Annotated[
        Path | None,
        typer.Option(help="CLIP ONNX directory (missrec export-clip): the graphs the service ingests with."),
    ] = None,
    allow_bad_images: Annotated[bool, typer.Option(help="Zero image row instead of failing.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset in --out.")] = False,
) -> None:
    """Turn a raw catalog + interaction log into the atomic format (k-core, leave-one-out, CLIP features)."""
    from missrec.clip_onnx import ClipOnnxError
    from missrec.clip_preprocess import ImageDecodeError, ItemEncoder
    from missrec.prepare import PrepareError, prepare_dataset

    if clip_onnx is not None and (clip_model or clip_pretrained):
        raise _fail("--clip-onnx names the model and weights: leave out --clip-model and --clip-pretrained")
    try:
        encoder: ItemEncoder
        if clip_onnx is not None:
            from missrec.clip_onnx import OnnxClipEncoder

            encoder = OnnxClipEncoder(clip_onnx, threads=0)
        else:
            from missrec.clip_encoder import ClipEncoder

            encoder = ClipEncoder(clip_model or "ViT-B-32", clip_pretrained or "openai")
        summary = prepare_dataset(
            items,
            interactions,
            out,
            encoder,
            name=name,
            min_core=min_core,
            allow_bad_images=allow_bad_images,
            overwrite=overwrite,
        )
    except (PrepareError, ImageDecodeError, ClipOnnxError, FileNotFoundError, ValueError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
    console.print_json(data=summary.to_dict())


if __name__ == "__main__":  # python -m missrec.cli: the model commands (all of them: python -m missrec_cli.main)
    app()
