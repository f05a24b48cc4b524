"""The `missrec` command line on a tiny SYNTHETIC dataset: every training command end to end."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from missrec.recipes.compare import MODELS
from missrec_cli.main import app

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

    _ok(["evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(data)])
    evaluated = json.loads((run / "eval_metrics.json").read_text())
    assert evaluated["test"]["ndcg@10"] == metrics["test"]["ndcg@10"]  # the checkpoint reproduces its metrics

    cold = tmp_path / "cold"
    _ok(["train", "--data", str(data), "--out", str(cold), "--epochs", "1", "--cold-fraction", "0.2"])
    cold_metrics = json.loads((cold / "metrics.json").read_text())
    assert {"test_cold", "test_warm"} <= set(cold_metrics)
    _ok(["evaluate", "--checkpoint", str(cold / "checkpoint.pt"), "--data", str(data)])
    evaluated = json.loads((cold / "eval_metrics.json").read_text())
    assert evaluated["test_cold"] == cold_metrics["test_cold"]

    pre = tmp_path / "pre"
    _ok(["pretrain", "--data", str(data), "--data", str(data), "--out", str(pre), "--epochs", "1"])
    tuned = tmp_path / "tuned"
    _ok(
        ["train", "--data", str(data), "--out", str(tuned), "--epochs", "1", "--pretrained", str(pre / "checkpoint.pt")]
    )

    out_json = tmp_path / "cmp.json"
    models = "missrec_inductive,sasrec,popularity,missrec_inductive_cold"
    args = ["--data", str(data), "--out", str(out_json), "--epochs", "1", "--plot", str(tmp_path / "c.png")]
    _ok(["compare", *args, "--seeds", "0", "1", "--models", models])
    compared = json.loads(out_json.read_text())
    assert set(compared["versus_sasrec"]) == {"missrec_inductive", "popularity"}  # cold runs: not paired
    assert compared["summary"]["sasrec"]["test"]["ndcg@10"].keys() >= {"mean", "std", "values"}
    assert compared["seeds"] == [0, 1] and compared["protocol"] == "history_excluded"
    assert set(compared["summary"]) == {"missrec_inductive", "sasrec", "popularity", "missrec_inductive_cold"}
    assert {"test_cold", "test_warm", "test_few", "test_history_ranked"} <= set(
        compared["summary"]["missrec_inductive_cold"]
    )
    ndcg = compared["summary"]["sasrec"]["test"]["ndcg@10"]
    assert len(ndcg["values"]) == 2 and ndcg["mean"] == sum(ndcg["values"]) / 2
    assert set(compared["versus_sasrec"]) == {"missrec_inductive", "popularity"}
    assert compared["versus_sasrec"]["popularity"]["verdict"] in ("ahead", "behind", "not distinguishable")
    # every model is in the table; the seed towers' compare runs in tests/missrec_cli/test_model_families.py
    assert {"msm4sr_inductive", "mmsrec", "msm4sr_inductive_cold", "mmsrec_cold"} <= set(MODELS)
    assert (tmp_path / "c.png").stat().st_size > 1000

    # seeds run separately (e.g. in parallel) merge into the same table and intervals
    from missrec.recipes.compare import Comparison, load_comparison, write_outputs

    whole = load_comparison(out_json)
    for s in whole.seeds:
        part = Comparison(whole.protocol, [s], {s: whole.per_seed[s]}, {s: whole.details[s]})
        part.test_ndcg10 = {m: [v[whole.seeds.index(s)]] for m, v in whole.test_ndcg10.items()}
        write_outputs(tmp_path / f"seed{s}.json", part)
    merged = tmp_path / "merged.json"
    _ok(["merge-compare", str(tmp_path / "seed0.json"), str(tmp_path / "seed1.json"), "--out", str(merged)])
    again = json.loads(merged.read_text())
    assert again["summary"] == compared["summary"] and again["seeds"] == [0, 1]
    for model, v in compared["versus_sasrec"].items():  # per-user values are stored to 6 decimals
        assert again["versus_sasrec"][model]["verdict"] == v["verdict"]
        assert again["versus_sasrec"][model]["mean_diff"] == pytest.approx(v["mean_diff"], abs=1e-5)


def test_cli_errors_are_clear(tmp_path):
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path)])
    assert result.exit_code == 2
    data = tmp_path / "d"
    _ok(["synth", "--out", str(data), "--users", "100", "--items", "40", "--topics", "4"])
    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--mode", "bogus"])
    assert result.exit_code == 2 and "inductive or transductive" in result.output
    for flag in ("--negatives", "--valid-rows", "--test-rows", "--autocast"):  # refused before any work
        result = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "neg"), flag, "-1"])
        assert result.exit_code == 2 and not (tmp_path / "neg").exists(), (flag, result.output)
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


@pytest.mark.slow  # the process tier: the CLI as a subprocess
def test_errors_stay_on_one_line_in_a_narrow_terminal(tmp_path):
    """A path in an error is never broken over lines (it could not be copied), whatever COLUMNS says; errors go
    to standard error with exit code 2, and a [bracketed] part is printed as it is, not read as markup."""
    import os
    import subprocess
    import sys

    missing = tmp_path / ("a-rather-long-folder-name-" * 4) / "[not-markup]" / "dataset"
    env = {**os.environ, "COLUMNS": "40", "TERM": "dumb"}
    out = subprocess.run(
        [sys.executable, "-m", "missrec_cli.main", "train", "--data", str(missing), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        check=False,
    )
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], out.stderr
