"""The benchmark scripts: RESULTS.md shows what their JSON files hold, and bad options are refused up front."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_faces  # noqa: E402
import bench_merge  # noqa: E402
import bench_solvers  # noqa: E402
import make_results  # noqa: E402


@pytest.mark.parametrize(
    "name",
    [
        "results_cpu.json",
        "results_lm_cpu.json",
        "results_lm_zstep_cpu.json",
        "results_faces_cpu.json",
        "results_faces_lm_cpu.json",
        "results_merge_cpu.json",
        "results_pnp_hvae_cpu.json",
    ],
)
def test_results_md_shows_what_the_json_says(name):
    """Every number in RESULTS.md's tables comes from a committed results file (make_results.py), none by hand."""
    table = make_results.render(str(BENCH / name)).strip()
    assert table.count("\n") >= 3, "a table has a header and rows"
    assert table in (BENCH / "RESULTS.md").read_text(), f"RESULTS.md does not hold make_results.py's table of {name}"


@pytest.mark.parametrize(
    "main, argv",
    [
        (bench_solvers.main, ["--problems", "deblurring"]),
        (bench_solvers.main, ["--methods", "vble"]),
        (bench_solvers.main, ["--n-images", "0"]),
        (bench_solvers.main, ["--z-optimizer", "adam,newton"]),
        (bench_faces.main, ["--z-optimizer", "sgd"]),
        (bench_merge.main, ["--modes", "problems"]),
        (bench_merge.main, ["--k-max", "-1"]),
        (bench_faces.main, ["--methods", "nope"]),
        (bench_faces.main, ["--n-images", "4", "--loop-images", "5"]),
        (bench_faces.main, ["--repeats", "0"]),
    ],
)
def test_bad_options_are_refused_before_any_work(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "must be among" in capsys.readouterr().err


def test_run_options_are_shared():
    import argparse

    p = argparse.ArgumentParser()
    bench_solvers.add_run_options(p, repeats=4)
    a = p.parse_args(["--threads", "1", "--device", "cpu", "--seed", "3", "--json", "out.json"])
    assert (a.repeats, a.threads, a.device, a.seed, a.json) == (4, 1, "cpu", 3, "out.json")
    info = bench_solvers.machine_info(bench_solvers.torch.device("cpu"))
    assert {"platform", "processor", "cpu_count", "torch_threads", "torch", "device", "python"} <= set(info)


def test_aipo_paper_budget_writes_rows_and_claims_and_resumes(tmp_path, monkeypatch):
    """benchmarks/aipo_paper_budget.py: one part file per (prior, task), the rows and claims of every finished part, a
    rerun reads the parts back instead of solving again, and --finished-only leaves out the parts not run yet."""
    import json
    from types import SimpleNamespace

    import aipo_paper_budget as apb
    import torch

    from jpmap_core.models import RealNVP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        flow = RealNVP((1, 8, 8), levels=2, steps=1, width=4, blocks=0).double().eval().requires_grad_(False)
    faces = 0.1 + 0.8 * torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    monkeypatch.setattr(apb, "N_MLE", 3)
    monkeypatch.setattr(apb, "K", 2)
    monkeypatch.setattr(apb, "load_pretrained", lambda name: flow)
    monkeypatch.setattr(apb, "weights_sha256", lambda name: "0" * 64)
    monkeypatch.setattr(apb, "load_celeba32", lambda split, limit: SimpleNamespace(images=faces[:limit], source="toy"))
    argv = ["--n-images", "2", "--lambdas", "0.5,2.0", "--priors", "tiny", "--work", str(tmp_path / "parts")]
    assert apb.main([*argv, "--tasks", "denoising", "--json", str(tmp_path / "a.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert len(a["rows"]) == 2 * 4 and {r["method"] for r in a["rows"]} == {
        "aipo",
        "mle_init",
        "random_init",
        "zero_init",
    }
    assert a["budgets_equal"] and a["claims"]["settings"] == 2 and a["settings"]["n_mle"] == 3
    assert all(r["gradient_evaluations"] > 3 for r in a["rows"])

    def no_solving(*args, **kwargs):
        raise AssertionError("a finished part was solved again")

    monkeypatch.setattr(apb, "run_one", no_solving)
    assert apb.main([*argv, "--tasks", "denoising,cs500", "--finished-only", "--json", str(tmp_path / "b.json")]) == 0
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["settings"]["parts"] == ["tiny/denoising"] and b["rows"] == a["rows"]
