"""docs/architecture.md draws the packages and their import arrows as the code has them: this test reads every
import statement (top-level, inside functions, under TYPE_CHECKING) and fails when an arrow appears that the
table does not show, when the table shows one the code no longer has, when a package imports one in its own
layer or above it, or when any modules import each other in a circle."""

import ast
from pathlib import Path

import pytest

from tests.paths import ROOT

DOC = ROOT / "docs" / "architecture.md"
PACKAGES = (
    "clip_features",
    "missrec",
    "missrec_cli",
    "model_export",
    "index_builder",
    "serving_core",
    "service",
    "lifecycle",
    "harness",
    "loadtest",
)

pytestmark = pytest.mark.oracle


def _modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
    }


def _imports(path: Path) -> set[str]:
    """Every module name an import statement in ``path`` names (``from a import b`` gives ``a`` and ``a.b``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def code_arrows() -> dict[str, set[str]]:
    arrows: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for module, path in _modules().items():
        package = module.split(".")[0]
        arrows[package] |= {n.split(".")[0] for n in _imports(path)} & set(PACKAGES) - {package}
    return arrows


def doc_table() -> dict[str, tuple[int, set[str]]]:
    """package -> (layer, imported packages) from the table between the import-arrows markers."""
    text = DOC.read_text()
    block = text.split("<!-- import-arrows:begin -->", 1)[1].split("<!-- import-arrows:end -->", 1)[0]
    rows = {}
    for line in block.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            deps = {c.strip().strip("`") for c in cells[2].split(",")} - {"–", ""}
            rows[cells[1]] = (int(cells[0]), deps)
    return rows


def _table_text(arrows: dict[str, set[str]], layers: dict[str, int]) -> str:
    lines = ["| layer | package | imports |", "|---|---|---|"]
    for package in sorted(arrows, key=lambda p: (-layers.get(p, 0), p)):
        deps = ", ".join(f"`{d}`" for d in sorted(arrows[package])) or "–"
        lines.append(f"| {layers.get(package, '?')} | `{package}` | {deps} |")
    return "\n".join(lines)


def test_the_architecture_table_is_the_code():
    arrows, table = code_arrows(), doc_table()
    layers = {p: layer for p, (layer, _) in table.items()}
    expected = _table_text(arrows, layers)
    assert set(table) == set(PACKAGES), f"docs/architecture.md should hold:\n{expected}"
    assert {p: deps for p, (_, deps) in table.items()} == arrows, f"docs/architecture.md should hold:\n{expected}"


def test_no_package_imports_its_own_layer_or_above():
    table = doc_table()
    offenders = [
        f"{p} (layer {layer}) -> {d} (layer {table[d][0]})"
        for p, (layer, deps) in table.items()
        for d in deps
        if table[d][0] >= layer
    ]
    assert not offenders, offenders


def test_no_import_circle_anywhere():
    """Strongly connected components of the module import graph (every import statement counts)."""
    modules = _modules()
    edges = {m: {n for n in _imports(p) if n in modules and n != m} for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in modules:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_no_module_is_over_420_lines():
    """A non-test module that passes ~400 lines is split (the packages and scripts/)."""
    paths = [p for package in (*PACKAGES, "scripts") for p in (ROOT / package).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in paths if (n := len(p.read_text().splitlines())) > 420}
    assert not long, long
