"""`missrec train --model msm4sr|mmsrec|sasrec` and `missrec evaluate` on their checkpoints, on tiny SYNTHETIC data."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from missrec_cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "data"
    result = runner.invoke(app, ["synth", "--out", str(path), "--users", "60", "--items", "40", "--topics", "4"])
    assert result.exit_code == 0, result.output
    return path


@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("msm4sr", ["--pretrain-epochs", "1"]),
        ("msm4sr", ["--mode", "transductive", "--pretrain-epochs", "0"]),
        ("msm4sr", ["--cold-fraction", "0.2", "--pretrain-epochs", "1"]),
        ("mmsrec", ["--pretrain-epochs", "1", "--cold-fraction", "0.2"]),  # d 512: the slowest case, run once
        ("sasrec", []),
    ],
)
def test_train_then_evaluate_reproduces_the_metrics(data, tmp_path, model, extra):
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--model", model, "--epochs", "1", *extra]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["model_type"] == model
    if "--pretrain-epochs" in extra and extra[extra.index("--pretrain-epochs") + 1] == "1":
        assert ckpt["training"]["pretraining"]["epochs_run"] == 1
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(data)])
    assert result.exit_code == 0, result.output
    evaluated = json.loads((run / "eval_metrics.json").read_text())
    assert evaluated["test"]["ndcg@10"] == metrics["test"]["ndcg@10"]  # the checkpoint reproduces its metrics
    if "--cold-fraction" in extra:
        assert evaluated["test_cold"] == metrics["test_cold"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "bert4rec"], "--model must be one of"),
        (["--model", "mmsrec", "--mode", "transductive"], "missrec and msm4sr only"),
        (["--model", "sasrec", "--cold-fraction", "0.1"], "cold-item protocol"),
        (["--model", "msm4sr", "--mode", "transductive", "--cold-fraction", "0.1"], "inductive"),
    ],
)
def test_bad_model_options_are_clear_errors(data, tmp_path, args, message):
    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--epochs", "1", *args])
    assert result.exit_code == 2 and message in result.output


def test_compare_selects_the_seed_towers(data, tmp_path):
    """`compare --models msm4sr_inductive,mmsrec` trains just those two (on tiny data, in seconds)."""
    out_json = tmp_path / "cmp.json"
    args = [
        "compare",
        "--data",
        str(data),
        "--out",
        str(out_json),
        "--epochs",
        "1",
        "--models",
        "msm4sr_inductive,mmsrec",
    ]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    compared = json.loads(out_json.read_text())
    assert set(compared["summary"]) == {"msm4sr_inductive", "mmsrec"}
    assert {"test", "valid", "test_history_ranked"} <= set(compared["summary"]["mmsrec"])
