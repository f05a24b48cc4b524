"""Dependencies point one way (checked in fresh interpreters): the model package imports nothing of serving, the
serving core and the recommend path import no torch, and no package imports the tests."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import ROOT

PACKAGES = (
    "missrec",
    "missrec_cli",
    "model_export",
    "index_builder",
    "serving_core",
    "service",
    "loadtest",
    "harness",
    "lifecycle",
)
SERVING = ("service", "serving_core", "index_builder", "model_export", "missrec_cli", "lifecycle")

pytestmark = pytest.mark.oracle


def _modules(package: str, root: Path = ROOT) -> list[str]:
    return sorted(
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for p in (root / package).rglob("*.py")
    )


def _imported_after(modules: list[str]) -> set[str]:
    """Top-level names in sys.modules after importing ``modules`` in a fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}:\n    importlib.import_module(m)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_model_package_imports_nothing_of_serving():
    loaded = _imported_after(_modules("missrec"))
    assert "torch" in loaded  # the check imported the real modules
    assert not loaded & set(SERVING), sorted(loaded & set(SERVING))


def test_serving_core_and_recommend_path_import_no_torch():
    path = [*_modules("serving_core"), "service.app", "service.recommender", "service.usecases", "service.main"]
    loaded = _imported_after(path)
    assert {"onnxruntime", "faiss", "fastapi"} <= loaded
    assert "torch" not in loaded and "open_clip" not in loaded and "missrec" not in loaded


def test_the_service_imports_nothing_of_the_model_package():
    """Every module of service/ (CLIP comes from clip_features), imported together: no missrec, no torch."""
    loaded = _imported_after(_modules("service"))
    assert {"fastapi", "redis", "onnxruntime"} <= loaded  # the real modules were imported
    assert not loaded & {"missrec", "torch", "open_clip"}, sorted(loaded & {"missrec", "torch", "open_clip"})


def test_the_clip_onnx_path_imports_no_torch():
    """Ingestion through the exported CLIP graphs (MISSREC_CLIP_ONNX) and its preprocessing need no torch."""
    loaded = _imported_after(["clip_features.preprocess", "clip_features.onnx_encoder", "service.state"])
    assert "onnxruntime" in loaded and "PIL" in loaded
    assert not loaded & {"torch", "open_clip", "torchvision"}, sorted(loaded & {"torch", "open_clip", "torchvision"})


def test_no_package_imports_the_tests():
    offenders = []
    for package in (*PACKAGES, "scripts"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "tests"]
    assert not offenders, offenders


def _internal_imports(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the modules of ``package`` it imports anywhere in its text: top level, inside functions and under
    ``TYPE_CHECKING`` alike (``from P import m`` names the submodule ``P.m`` when there is one)."""
    modules = set(_modules(package, root))
    edges: dict[str, set[str]] = {}
    for module in modules:
        parts = module.split(".")
        path = root.joinpath(*parts)
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        is_package = path.name == "__init__.py"
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = parts if is_package else parts[:-1]
                prefix = base[: len(base) - node.level + 1] if node.level else []
                source = ".".join([*prefix, node.module] if node.module else prefix)
                names = [source, *(f"{source}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                target = name
                while target and target not in modules:  # the innermost module of the package it names
                    target = target.rpartition(".")[0]
                if target and target != module:
                    found.add(target)
        edges[module] = found
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import circle (its modules in order, the first repeated at the end), or [] when there is none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str]:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return []
        path.append(module)
        for target in sorted(edges[module]):
            if circle := visit(target):
                return circle
        path.pop()
        done.add(module)
        return []

    for module in sorted(edges):
        if circle := visit(module):
            return circle
    return []


def test_the_cycle_finder_sees_imports_inside_functions_and_under_type_checking(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("import os\nimport pkg.a\n")
    edges = _internal_imports("pkg", tmp_path)
    assert edges["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and edges["pkg.sub.b"] == {"pkg.c"}
    assert _cycle(edges) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("import os\n")
    assert _cycle(_internal_imports("pkg", tmp_path)) == []


def test_no_import_circle_inside_the_service():
    """Counting imports under TYPE_CHECKING and inside functions: a circle there is still a circle to a reader."""
    assert _cycle(_internal_imports("service")) == []
