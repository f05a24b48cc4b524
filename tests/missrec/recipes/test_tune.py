"""`missrec tune` on tiny SYNTHETIC data: trials table, config JSON accepted by `train` and `compare`."""

import json

import pytest
from typer.testing import CliRunner

from missrec.families import tunable
from missrec.models.missrec import MISSRecConfig
from missrec.models.sasrec import SASRecConfig
from missrec.recipes.tune import defaults, search_space
from missrec.recipes.tuned import TunedConfig
from missrec_cli.main import app

runner = CliRunner()


def _ok(args):
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_search_spaces_hold_the_paper_defaults():
    assert tunable() == ("missrec", "sasrec")
    for family in tunable():
        space = search_space(family)
        assert {p.name for p in space} == set(defaults(family))
        for p in space:
            value = defaults(family)[p.name]
            assert value in p.choices if p.choices else p.low <= value <= p.high
    assert MISSRecConfig(num_items=10).tau == defaults("missrec")["tau"]
    assert SASRecConfig(num_items=10).n_layers == defaults("sasrec")["n_layers"]


def test_tuned_config_refuses_unknown_and_dataset_sized_keys():
    with pytest.raises(ValueError, match="architecture keys"):
        TunedConfig("missrec", {"num_items": 5}, {})
    with pytest.raises(ValueError, match="training keys"):
        TunedConfig("sasrec", {}, {"epochs": 3})
    with pytest.raises(ValueError, match="model must be"):
        TunedConfig("bert4rec", {}, {})


def test_tune_writes_a_config_that_train_and_compare_accept(tmp_path):
    data = tmp_path / "data"
    _ok(["synth", "--out", str(data), "--users", "80", "--items", "40", "--topics", "4"])
    cfg = tmp_path / "missrec.json"
    _ok(["tune", "--model", "missrec", "--data", str(data), "--out", str(cfg), "--trials", "3", "--epochs", "1"])
    written = json.loads(cfg.read_text())
    assert written["model"] == "missrec" and written["notes"]["trials"] == 3
    assert written["notes"]["valid_ndcg@10"] >= (written["notes"]["paper_defaults_valid_ndcg@10"] or 0.0)
    assert set(written["architecture"]) == {"dropout", "tau", "interest_ratio", "hidden"}
    run = tmp_path / "run"
    _ok(["train", "--data", str(data), "--out", str(run), "--epochs", "1", "--config", str(cfg)])
    assert json.loads((run / "metrics.json").read_text())["test"]["ndcg@10"] >= 0
    sas = tmp_path / "sasrec.json"
    _ok(["tune", "--model", "sasrec", "--data", str(data), "--out", str(sas), "--time-budget", "3", "--epochs", "1"])
    cmp = tmp_path / "cmp.json"
    args = ["--config", str(cfg), "--config", str(sas), "--models", "missrec_inductive,sasrec"]
    _ok(["compare", "--data", str(data), "--out", str(cmp), "--epochs", "1", *args])
    assert set(json.loads(cmp.read_text())["summary"]) == {"missrec_inductive", "sasrec"}
    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(run), "--config", str(sas)])
    assert result.exit_code == 2 and "missrec config" in result.output
