"""Dependencies point one way (checked in fresh interpreters): the model package imports nothing of serving, the
serving core and the recommend path import no torch, and no package imports the tests."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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


def _modules(package: str) -> list[str]:
    return sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / package).rglob("*.py")
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
