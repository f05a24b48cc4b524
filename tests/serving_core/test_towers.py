"""ONNX Runtime session options: MISSREC_ONNX_SPINNING reaches both tower sessions the service opens (off by
default), and loadtest.ort_options runs every combination it is asked for on a real bundle, with agreeing vectors."""

from __future__ import annotations

import json

import pytest

from serving_core.towers import SPINNING, session_options


def _entries(model) -> tuple[str, str]:
    return tuple(
        t.session.get_session_options().get_session_config_entry(SPINNING)
        for t in (model.towers.user, model.towers.item)
    )


def test_session_options_carry_the_spinning_choice():
    assert session_options().get_session_config_entry(SPINNING) == "0"  # off unless asked for
    assert session_options(2, spinning=True).get_session_config_entry(SPINNING) == "1"
    assert session_options(2, spinning=True).intra_op_num_threads == 2


@pytest.mark.parametrize(("env", "expected"), [(None, "0"), ("true", "1"), ("0", "0")])
def test_the_setting_reaches_the_service_sessions(scientific_bundle, monkeypatch, env, expected):
    from service.serving_model import ServingModel
    from service.settings import Settings

    monkeypatch.delenv("MISSREC_ONNX_SPINNING", raising=False)
    if env is not None:
        monkeypatch.setenv("MISSREC_ONNX_SPINNING", env)
    settings = Settings(onnx_provider="cpu", onnx_threads=2)
    assert settings.onnx_spinning is (expected == "1")
    assert _entries(ServingModel.load(scientific_bundle, settings)) == (expected, expected)


def test_a_bad_spinning_value_is_refused(monkeypatch):
    from pydantic import ValidationError

    from service.settings import Settings

    monkeypatch.setenv("MISSREC_ONNX_SPINNING", "sometimes")
    with pytest.raises(ValidationError, match="onnx_spinning"):
        Settings()


def test_the_benchmark_times_every_combination(scientific_bundle, scientific_dir, tmp_path):
    from loadtest.ort_options import main

    out = tmp_path / "ort.json"
    argv = ["--bundle", str(scientific_bundle), "--data", str(scientific_dir), "--out", str(out)]
    rows = main([*argv, "--repeats", "5", "--warmup", "1", "--batches", "1", "4", "--threads", "1", "2",
                 "--levels", "BASIC", "ALL"])  # fmt: skip
    assert len(rows) == 2 * 2 * 2 * 2 * 2  # batches x threads x spinning x levels x IO binding
    assert json.loads(out.read_text())["rows"] == rows
    assert {(r["batch"], r["threads"], r["spinning"], r["level"], r["io_binding"]) for r in rows} == {
        (b, t, s, lv, io) for b in (1, 4) for t in (1, 2) for s in ("off", "on") for lv in ("BASIC", "ALL")
        for io in ("off", "on")
    }  # fmt: skip
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["cpu_ms_per_call"] > 0 and r["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("level", ["basic", "extended", "all"])
def test_the_optimisation_level_reaches_the_service_sessions(scientific_bundle, level):
    import onnxruntime as ort

    from service.serving_model import ServingModel
    from service.settings import Settings
    from serving_core.towers import OPTIMISATION_LEVELS

    model = ServingModel.load(scientific_bundle, Settings(onnx_provider="cpu", onnx_optimisation=level))
    for tower in (model.towers.user, model.towers.item):
        assert tower.session.get_session_options().graph_optimization_level == OPTIMISATION_LEVELS[level]
    assert session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # the default
    with pytest.raises(ValueError, match="optimisation level"):
        session_options(level="max")
