"""ONNX Runtime session options: MISSREC_ONNX_SPINNING reaches both tower sessions the service opens (off by
default)."""

from __future__ import annotations

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
