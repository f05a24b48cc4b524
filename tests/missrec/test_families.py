"""The model-family registry is the one list of families: every family has its files where the registry says,
named after it, and no other module spells the list out."""

import ast
import dataclasses

import pytest

from missrec.families import FAMILIES, family, family_of, trainable, tunable
from missrec.models.config import FrozenConfig
from tests.paths import ROOT

PACKAGES = ("clip_features", "missrec", "missrec_cli", "model_export", "lifecycle", "service", "serving_core")

pytestmark = pytest.mark.oracle


def test_each_family_has_its_files_named_after_it():
    for name, f in FAMILIES.items():
        named = {p.relative_to(ROOT).as_posix() for p in ROOT.glob(f"*/**/*{name}*.py")}
        assert f"missrec/recipes/{name}.py" in named
        if f.trainable:
            assert f"missrec/models/{name}.py" in named
        if f.exporter:
            assert f.exporter.replace(".", "/") + ".py" in named
        if f.pretraining:
            assert f.pretraining.replace(".", "/") + ".py" in named


def test_the_registry_resolves_to_real_classes_recipes_and_exporters():
    from importlib import import_module

    for name, f in FAMILIES.items():
        recipe = f.recipe()
        assert callable(getattr(recipe, "train", None)) or not f.trainable, name
        assert all(run.family == name for run in recipe.COMPARE)
        assert f.tunable == hasattr(recipe, "SEARCH_SPACE") == hasattr(recipe, "DEFAULTS"), name
        if not f.trainable:
            continue
        config_cls = f.config_class()
        assert issubclass(config_cls, FrozenConfig) and dataclasses.is_dataclass(config_cls)
        with pytest.raises(ValueError, match=f"unknown {config_cls.__name__} fields"):
            config_cls.from_dict({"num_items": 10, "not_a_field": 1})
        assert f.model_class().__name__ == f.model
        if f.exporter:
            assert callable(import_module(f.exporter).write_bundle)
    assert trainable() == ("missrec", "msm4sr", "mmsrec", "sasrec")
    assert tunable() == ("missrec", "sasrec")


def test_family_lookups():
    from missrec.models.sasrec import SASRec, SASRecConfig

    assert family_of(SASRec(SASRecConfig(num_items=5, hidden=8, n_heads=2, ff_dim=8))).name == "sasrec"
    with pytest.raises(TypeError):
        family_of(object())
    with pytest.raises(ValueError, match="choose from missrec, msm4sr"):
        family("bert4rec")


def test_no_other_module_spells_out_the_list_of_families():
    """A literal holding three or more family names (a tuple, list, set or dict keys) anywhere but the registry is
    a second list of families."""
    names = set(FAMILIES)
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "missrec" / "families.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
                if not isinstance(node, ast.Tuple | ast.List | ast.Set | ast.Dict) or items is None:
                    continue
                found = {e.value for e in items if isinstance(e, ast.Constant) and e.value in names}
                if len(found) >= 3:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {sorted(found)}")
    assert not offenders, offenders
