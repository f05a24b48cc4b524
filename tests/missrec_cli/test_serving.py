"""The serving commands of the ``missrec`` CLI (missrec_cli): export then build-index on a tiny SYNTHETIC model,
the errors they print, and that every command the README names exists."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from missrec.models.checkpoint import save_checkpoint
from missrec.recipes.mmsrec import build_mmsrec
from missrec.recipes.msm4sr import build_msm4sr
from missrec.training.loop import TrainOptions, fit
from missrec_cli.main import app
from serving_core.bundle import read_bundle
from tests.helpers import tiny_dataset, tiny_missrec
from tests.paths import ROOT


def test_export_then_build_index(tmp_path):
    ds = tiny_dataset(tmp_path / "data")
    model = tiny_missrec(ds)
    fit(model, ds.train, ds.valid, TrainOptions(epochs=1, batch_size=256, progress=False))
    model.discover_interests(generator=torch.Generator().manual_seed(0))
    checkpoint = save_checkpoint(tmp_path / "run" / "checkpoint.pt", model, dataset={"fingerprint": ds.fingerprint})
    runner = CliRunner()
    out = tmp_path / "bundle"
    r = runner.invoke(
        app, ["export", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "scorer missrec_fusion" in r.output
    r = runner.invoke(app, ["build-index", "--bundle", str(out), "--factory", "IVF4,Flat", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    printed = json.loads(r.output[: r.output.index("}\n{") + 1])  # the index description, then the recall report
    assert printed["factory"] == "IVF4,Flat" and printed["exact"] is False and "recall_report" not in printed["details"]
    assert read_bundle(out).manifest.index.factory == "IVF4,Flat"
    half = read_bundle(out)  # float16 copies of the vectors for the re-scoring, with their measured bounds
    assert set(half.manifest.rescore_vectors) == set(half.table.half) == {"text", "image"}
    r = runner.invoke(app, ["build-index", "--bundle", str(out), "--device", "cpu", "--no-float16"])
    assert r.exit_code == 0, r.output
    assert not read_bundle(out).manifest.rescore_vectors and not list((out / "items").glob("*.f16.npy"))
    again = runner.invoke(
        app, ["export", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--out", str(out)]
    )
    assert again.exit_code == 2 and "already exists" in again.output
    bad = runner.invoke(app, ["build-index", "--bundle", str(out), "--device", "tpu"])
    assert bad.exit_code == 2 and "--device must be" in bad.output


@pytest.mark.parametrize("build", [build_msm4sr, build_mmsrec])
def test_export_of_the_seed_towers(build, tmp_path):
    ds = tiny_dataset(tmp_path / "data")
    checkpoint = save_checkpoint(tmp_path / "run" / "checkpoint.pt", build(ds, hidden=16, n_heads=2))
    out = tmp_path / "bundle"
    r = CliRunner().invoke(
        app, ["export", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    kind = read_bundle(out).manifest.model_kind
    assert f"exported {kind}:" in r.output and "scorer inner_product" in r.output and "alpha" not in r.output


def test_every_command_the_readme_names_exists():
    """The README's command-line block lists the whole `missrec` command; each one is registered once."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"^missrec ([a-z-]+)", block, flags=re.M))
    names = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
    assert len(names) == len(set(names))
    assert named and named <= set(names), sorted(named - set(names))
