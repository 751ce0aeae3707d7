"""The package's shape (DESIGN.md, "Layout"): the core never depends on the experiment modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jpmap_core"
CORE_FILES = sorted(p for p in PACKAGE.rglob("*.py") if "experiments" not in p.relative_to(PACKAGE).parts)


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, as absolute dotted names (relative imports resolved)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def test_core_files_found():
    names = {p.relative_to(PACKAGE).as_posix() for p in CORE_FILES}
    assert {"operators.py", "energy.py", "solvers/__init__.py", "models/__init__.py", "widgets.py"} <= names


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_core_module_never_imports_experiments(path):
    bad = [f"line {n}: {m}" for n, m in _imported_modules(path) if m.startswith("jpmap_core.experiments")]
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports the experiment code: {bad}"


def test_import_resolution_sees_experiment_imports():
    """The checker itself: an experiment module that imports a sibling is seen as importing experiments."""
    faces = PACKAGE / "experiments" / "faces.py"
    assert any(m.startswith("jpmap_core.experiments.mnist_benchmark") for _, m in _imported_modules(faces))


def test_importing_the_core_loads_no_experiment_module():
    core = [
        "jpmap_core." + p.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
        for p in CORE_FILES
        if p.name != "__main__.py"
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {core!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.startswith('jpmap_core.experiments')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"importing the core loaded experiment modules: {out}"
