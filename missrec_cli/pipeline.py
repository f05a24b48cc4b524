"""The train -> export -> index pipeline, in one place (quick start, test fixtures and scripts use it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from index_builder.build import build_index
from serving_core.bundle import IndexInfo


def train_export_index(
    data: Path,
    out: Path,
    *,
    epochs: int,
    mode: str = "inductive",
    patience: int = 10,
    factory: str = "Flat",
    device: str = "cpu",
    seed: int = 0,
    progress: bool | None = None,
    meta: dict[str, Any] | None = None,
) -> tuple[Path, IndexInfo, dict[str, Any]]:
    """Train MISSRec on ``data`` (run in out/run), export the bundle to out/bundle and index it.

    Returns (bundle directory, index description, the run's metrics)."""
    from missrec.data.dataset import load_dataset
    from missrec.recipes.missrec import train_missrec
    from missrec.training.loop import TrainOptions
    from missrec.training.run import save_run
    from model_export.bundle import export_bundle

    ds = load_dataset(data)
    opts = TrainOptions(epochs=epochs, patience=patience, seed=seed, progress=progress is not False)
    run = train_missrec(ds, opts, mode)  # type: ignore[arg-type]
    save_run(run, ds, out / "run", {"mode": mode, "seed": seed, **(meta or {})})
    export_bundle(out / "run" / "checkpoint.pt", data, out / "bundle", overwrite=True)
    info = build_index(out / "bundle", factory=factory, device=device, progress=progress)
    return out / "bundle", info, run.metrics
