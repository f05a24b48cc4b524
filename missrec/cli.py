"""The ``missrec`` command line: train (missrec, msm4sr, mmsrec, sasrec), evaluate, compare, pretrain, synth,
prepare, quickstart."""

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
    patience: Annotated[int, typer.Option(help="Early-stopping patience in epochs.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Training rows per optimiser step.")] = 512,
    device: Device = "cpu",
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
    ds = _load(data)
    opts = TrainOptions(epochs=epochs, seed=seed, patience=patience, batch_size=batch_size, device=device)
    try:
        if model == "missrec":
            run = train_missrec(ds, opts, mode, pretrained=pretrained, cold_fraction=cold_fraction)  # type: ignore[arg-type]
        elif model == "msm4sr":
            pre = 20 if pretrain_epochs is None else pretrain_epochs
            run = train_msm4sr(ds, opts, mode, pre, cold_fraction)  # type: ignore[arg-type]
        elif model == "mmsrec":
            run = train_mmsrec(ds, opts, pretrain_epochs or 0, cold_fraction)
        else:
            run = train_sasrec(ds, opts)
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
        },
    )
    label = model if model in ("sasrec", "mmsrec") else f"{model}_{mode}"
    _print_metrics({label: run.metrics}, f"{ds.name}: best epoch {run.info['best_epoch']}")
    console.print(f"wrote {out / 'checkpoint.pt'} and {out / 'metrics.json'}")


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="checkpoint.pt from `missrec train`.")],
    data: DataDir,
    out: Annotated[Path | None, typer.Option(help="Where to write the metrics JSON.")] = None,
    device: Device = "cpu",
) -> None:
    """Evaluate a checkpoint on the valid and test splits (full ranking); cold/warm split if it was cold-trained."""
    import numpy as np

    from missrec.checkpoint import CheckpointError, attach_features, load_checkpoint
    from missrec.evaluate import evaluate as run_eval
    from missrec.runs import METRIC_KEYS

    ds = _load(data)
    try:
        ckpt = load_checkpoint(checkpoint)
        attach_features(ckpt.model, ds, ckpt.meta)
    except CheckpointError as exc:
        raise _fail(str(exc)) from None
    model = ckpt.model.to(device)
    metrics: dict[str, dict[str, float]] = {}
    cold_items = ckpt.meta.get("cold_items")
    for split in ("valid", "test"):
        rows = ds.split(split)
        groups = None
        if cold_items:
            cold = np.zeros(ds.num_items, dtype=bool)
            cold[cold_items] = True
            groups = {"cold": cold[rows.targets], "warm": ~cold[rows.targets]}
        result = run_eval(model, rows, device=device, groups=groups)
        metrics[split] = {k: result["all"][k] for k in METRIC_KEYS}
        if split == "test" and groups:
            metrics["test_cold"] = {k: result["cold"][k] for k in METRIC_KEYS}
            metrics["test_warm"] = {k: result["warm"][k] for k in METRIC_KEYS}
    _print_metrics({ckpt.model_type: metrics}, f"{checkpoint} on {ds.name}")
    target = out or checkpoint.parent / "eval_metrics.json"
    target.write_text(json.dumps(metrics, indent=2) + "\n")
    console.print(f"wrote {target}")


@app.command()
def compare(
    data: DataDir,
    out: Annotated[Path, typer.Option("--out", help="Metrics JSON; FILE.details.json gets curves and timings.")],
    epochs: Epochs = 300,
    seed: Seed = 0,
    plot: Annotated[Path | None, typer.Option(help="PNG of validation NDCG@10 per epoch, MISSRec vs SASRec.")] = None,
    device: Device = "cpu",
) -> None:
    """Train and evaluate MISSRec (inductive, transductive, cold protocol), SASRec and popularity side by side."""
    from missrec.compare import run_compare, write_outputs
    from missrec.train import TrainOptions

    ds = _load(data)
    metrics, details = run_compare(ds, TrainOptions(epochs=epochs, seed=seed, device=device))
    written = write_outputs(out, metrics, details, plot)
    _print_metrics(metrics, f"{ds.name}: full-ranking metrics (seed {seed})")
    for name, d in details.items():
        console.print(
            f"{name}: best epoch {d.get('best_epoch', '-')}, epochs run {d.get('epochs_run', '-')}, "
            f"{d['wall_seconds']} s"
        )
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
    clip_model: Annotated[str, typer.Option(help="open_clip architecture.")] = "ViT-B-32",
    clip_pretrained: Annotated[str, typer.Option(help="open_clip tag or local checkpoint path.")] = "openai",
    allow_bad_images: Annotated[bool, typer.Option(help="Zero image row instead of failing.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset in --out.")] = False,
) -> None:
    """Turn a raw catalog + interaction log into the atomic format (k-core, leave-one-out, CLIP features)."""
    from missrec.clip_encoder import ClipEncoder, ImageDecodeError
    from missrec.prepare import PrepareError, prepare_dataset

    try:
        encoder = ClipEncoder(clip_model, clip_pretrained)
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
    except (PrepareError, ImageDecodeError, FileNotFoundError, ValueError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
    console.print_json(data=summary.to_dict())


from service.cli import register  # noqa: E402  (serving commands live with the service)

register(app)


if __name__ == "__main__":
    app()
