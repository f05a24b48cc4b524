"""The `missrec` command line on a tiny SYNTHETIC dataset: every training command end to end."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from missrec.cli import app
from missrec.compare import MODELS

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_training_commands_end_to_end(tmp_path):
    data = tmp_path / "data"
    _ok(["synth", "--out", str(data), "--users", "150", "--items", "60", "--topics", "4"])
    run = tmp_path / "run"
    _ok(["train", "--data", str(data), "--out", str(run), "--epochs", "1"])
    assert (run / "checkpoint.pt").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"valid", "test"} <= set(metrics) and set(metrics["test"]) == {
        "recall@10",
        "ndcg@10",
        "recall@50",
        "ndcg@50",
    }
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (
        ckpt["dataset"]["fingerprint"] and ckpt["config"]["mode"] == "inductive" and "centroids" in ckpt["state_dict"]
    )

    out = _ok(["evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(data)])
    assert "ndcg@10" in out
    evaluated = json.loads((run / "eval_metrics.json").read_text())
    assert evaluated["test"]["ndcg@10"] == metrics["test"]["ndcg@10"]  # the checkpoint reproduces its metrics

    cold = tmp_path / "cold"
    _ok(["train", "--data", str(data), "--out", str(cold), "--epochs", "1", "--cold-fraction", "0.2"])
    cold_metrics = json.loads((cold / "metrics.json").read_text())
    assert {"test_cold", "test_warm"} <= set(cold_metrics)
    evaluated = _ok(["evaluate", "--checkpoint", str(cold / "checkpoint.pt"), "--data", str(data)])
    assert "test_cold" in evaluated

    pre = tmp_path / "pre"
    _ok(["pretrain", "--data", str(data), "--data", str(data), "--out", str(pre), "--epochs", "1"])
    tuned = tmp_path / "tuned"
    _ok(
        ["train", "--data", str(data), "--out", str(tuned), "--epochs", "1", "--pretrained", str(pre / "checkpoint.pt")]
    )

    out_json = tmp_path / "cmp.json"
    _ok(["compare", "--data", str(data), "--out", str(out_json), "--epochs", "1", "--plot", str(tmp_path / "c.png")])
    compared = json.loads(out_json.read_text())
    assert set(compared) == set(MODELS)
    assert {"msm4sr_inductive", "mmsrec", "msm4sr_inductive_cold", "mmsrec_cold", "sasrec", "popularity"} <= set(MODELS)
    for cold_run in ("missrec_inductive_cold", "msm4sr_inductive_cold", "mmsrec_cold"):
        assert {"test_cold", "test_warm"} <= set(compared[cold_run])
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_cli_errors_are_clear(tmp_path):
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path)])
    assert result.exit_code == 2
    data = tmp_path / "d"
    _ok(["synth", "--out", str(data), "--users", "100", "--items", "40", "--topics", "4"])
    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--mode", "bogus"])
    assert result.exit_code == 2 and "inductive or transductive" in result.output
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "r"),
            "--mode",
            "transductive",
            "--cold-fraction",
            "0.1",
            "--epochs",
            "1",
        ],
    )
    assert result.exit_code == 2 and "inductive" in result.output
