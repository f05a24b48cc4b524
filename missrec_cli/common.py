"""What every ``missrec`` command shares: the console, one-line errors, the dataset loader and the options the
model commands have in common.

Output is never wrapped to the terminal's width (``soft_wrap``): a path or an error stays on one line whatever
``COLUMNS`` says, so it can be copied, and errors go to standard error with exit code 2. Messages are printed
as text, not as console markup (a ``[...]`` in a path or a list is shown as it is).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)

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


def fail(message: str) -> typer.Exit:
    """Print ``error: MESSAGE`` on one line to standard error; ``raise fail(...)`` exits with code 2."""
    errors.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code=2)


def load_data(data: Path):  # -> SeqDataset (torch-free import, lazily)
    from missrec.data.dataset import DatasetError, load_dataset

    try:
        return load_dataset(data)
    except DatasetError as exc:
        raise fail(str(exc)) from None


def lr_scales(specs: list[str] | None) -> tuple[tuple[str, float], ...]:
    out = []
    for spec in specs or []:
        prefix, _, mult = spec.partition("=")
        try:
            out.append((prefix, float(mult)))
        except ValueError:
            raise fail(f"--lr-scale wants PREFIX=MULTIPLIER, got {spec!r}") from None
    return tuple(out)


def load_configs(paths: list[Path] | None) -> dict:
    """family -> TunedConfig from ``--config`` files (one per model family)."""
    from missrec.recipes.tuned import TunedConfig

    configs = {}
    for path in paths or []:
        try:
            cfg = TunedConfig.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise fail(f"{path}: {exc}") from None
        if cfg.model in configs:
            raise fail(f"two --config files for {cfg.model}")
        configs[cfg.model] = cfg
    return configs
