"""Notebook 13's experiment code (AIPO Tables 1-3): batched runs over Lambda, equal budgets, rows, claims, figures."""

from __future__ import annotations

import math

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch

from jpmap_core.experiments import aipo as ex
from jpmap_core.models import MLPVAE, RealNVP
from jpmap_core.solvers import aipo
from jpmap_core.solvers.aipo import latent_energy, map_loss

matplotlib.use("Agg")

SHAPE = (1, 8, 8)
FAST = {"K": 2, "n_mle": 4}
INPAINT = ex.Task("inpainting", 5.1, 0.25, 4)


@pytest.fixture(scope="module")
def flow():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        f = RealNVP(SHAPE, levels=2, steps=1, width=4, blocks=0).double()
        with torch.no_grad():
            for p in f.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return f.eval().requires_grad_(False)


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 0.8 * torch.rand(n, *SHAPE, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def run(flow):
    images = {"test": _images(2, 0), "ood": _images(1, 1)}
    return ex.run_flow_task(flow, "tiny", INPAINT, images, (0.3, 1.0), seed=0, aipo_options=FAST, n_rounds=3)


def test_every_method_gets_aipos_budget_per_image(run):
    assert ex.budgets_equal([run])
    assert set(run.grad_evals) == set(ex.METHODS)
    assert bool((run.grad_evals["aipo"] > FAST["n_mle"]).all())


def test_rows_hold_the_map_loss_of_each_images_own_lambda(run, flow):
    rows = ex.table_rows([run])
    assert len(rows) == 2 * 2 * 4 and all(set(ex.TABLE_KEYS) == set(r) for r in rows)
    assert {(r["set"], r["n_images"]) for r in rows} == {("test", 2), ("ood", 1)}
    assert all(math.isfinite(r["map_loss_mean"]) and math.isfinite(r["psnr_mean"]) for r in rows)
    assert all(r["map_loss_se"] is not None for r in rows)
    for lam in run.lambdas:
        idx = run.rows_of("test", lam)
        y = run.problem.y[idx % run.n_images]
        op = run.problem.op.rows(idx % run.n_images)
        for m in ex.METHODS:
            torch.testing.assert_close(run.loss[m][idx], map_loss(run.x[m][idx], y, op, flow, lam).double())
        row = next(r for r in rows if r["set"] == "test" and r["lambda"] == lam and r["method"] == "aipo")
        assert row["map_loss_mean"] == pytest.approx(float(run.loss["aipo"][idx].mean()))
        assert row["map_loss_se"] == pytest.approx(float(run.loss["aipo"][idx].std() / math.sqrt(2)))


def test_one_batched_call_over_lambdas_equals_a_call_per_lambda(run, flow):
    """Every image's schedule is its own: the row of image i at Lambda = 1.0 is what AIPO gives it alone."""
    alone = ex.run_flow_task(flow, "tiny", INPAINT, {"test": _images(2, 0), "ood": _images(1, 1)}, (1.0,), seed=0,
                             aipo_options=FAST, n_rounds=3, methods=("aipo", "mle_init"))  # fmt: skip
    idx = run.rows_of("test", 1.0)
    torch.testing.assert_close(run.x["aipo"][idx], alone.x["aipo"][alone.rows_of("test", 1.0)], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(run.x["mle_init"][idx], alone.x["mle_init"][alone.rows_of("test", 1.0)], rtol=1e-9,
                               atol=1e-9)  # fmt: skip


def test_the_measurements_are_drawn_once_per_task_and_seed():
    x = _images(2, 0)
    a, b = INPAINT.degrade(x, 0), INPAINT.degrade(x, 0)
    assert torch.equal(a.y, b.y) and torch.equal(a.op.mask, b.op.mask)
    assert not torch.equal(INPAINT.degrade(x, 1).op.mask, a.op.mask)
    assert ex.task_seed(0, "cs500") == ex.task_seed(0, "cs500") != ex.task_seed(0, "cs1000")


def test_mle_start_keeps_the_observed_pixels(run):
    check = ex.mle_start_check(run)
    assert check["relative_residual"] == pytest.approx(check["clipped_y_relative_residual"], abs=1e-9)
    assert check["relative_residual"] < check["truth_relative_residual"]


def test_n_rounds_bounds_the_schedule(flow):
    p = INPAINT.degrade(_images(2, 0), 0)
    lam = torch.tensor([0.5, 2.0], dtype=torch.float64)
    r = aipo(p.y, p.op, flow, sigma=p.sigma, lam=lam, **FAST, **ex.schedule_options(lam, 3))
    assert bool(r.converged.all()) and int(r.per_image["rounds"].max()) <= 4
    torch.testing.assert_close(r.per_image["lambda"], lam)
    assert ex.schedule_options(lam, None) == {}
    with pytest.raises(ValueError, match="n_rounds"):
        ex.schedule_options(lam, 0)


def _rows(values: dict[float, dict[str, float]], task: str = "denoising") -> list[dict]:
    base = {"prior": "p", "set": "test", "task": task, "map_loss_se": 1.0}
    return [
        {**base, "lambda": lam, "method": m, "map_loss_mean": v, "psnr_mean": 20.0 - v / 100}
        for lam, by in values.items()
        for m, v in by.items()
    ]


def test_claims_count_the_papers_three_claims():
    good = _rows({0.3: {"aipo": -10, "mle_init": -9, "random_init": -9.5, "zero_init": -8},
                  1.0: {"aipo": -5, "mle_init": -2, "random_init": -3, "zero_init": -1}})  # fmt: skip
    c = ex.claims(good)
    assert c["settings"] == 2 and c["aipo_lowest"] == 2 and c["aipo_lowest_every_setting"]
    assert c["curves"] == 1 and c["margin_nondecreasing"] == 1 and c["margin_grows_every_curve"]
    assert c["aipo_below_mle_init"] == 2 and c["mle_init_best_baseline"] == 0
    assert ex.margins(good)[("p", "denoising")] == {0.3: 0.5, 1.0: 2.0}
    bad = _rows({0.3: {"aipo": -10, "mle_init": -11, "random_init": -9, "zero_init": -8},
                 1.0: {"aipo": -5, "mle_init": -4.9, "random_init": -3, "zero_init": -1}})  # fmt: skip
    c = ex.claims(bad)
    assert c["aipo_lowest"] == 1 and not c["aipo_lowest_every_setting"]
    assert c["mle_init_best_baseline"] == 2 and c["aipo_below_mle_init"] == 1
    assert c["margin_grows_every_curve"]  # -1 at 0.3, 0.1 at 1.0
    assert ex.claims([], "test")["aipo_lowest_every_setting"] is False


def test_paper_table_bolds_the_lowest_loss_and_the_highest_psnr():
    rows = _rows({0.5: {"aipo": -10, "mle_init": -9, "random_init": -9.5, "zero_init": -8}})
    text = ex.paper_table(rows, "denoising")
    assert "**-10 ± 1**" in text and "| p | test | 0.5 |" in text
    assert "**20.10**" in ex.paper_table(rows, "denoising", value="psnr")


def test_figures_draw(run):
    fig = ex.margin_figure(ex.table_rows([run]))
    assert len(fig.axes) == 1
    plt.close(fig)
    fig = ex.reconstruction_grid(run, 1.0, "test", n_show=2)
    assert len(fig.axes) == 6 * 2  # clean, observed, 4 methods
    plt.close(fig)


def test_bad_inputs_raise_clear_errors(flow):
    x = {"test": _images(2, 0)}
    with pytest.raises(ValueError, match="lambdas must be distinct finite numbers > 0"):
        ex.run_flow_task(flow, "tiny", INPAINT, x, (0.5, 0.5))
    with pytest.raises(ValueError, match="methods must include 'aipo'"):
        ex.run_flow_task(flow, "tiny", INPAINT, x, (0.5,), methods=("mle_init",))
    with pytest.raises(ValueError, match=r"images\['test'\] must be \(n, \*\(1, 8, 8\)\)"):
        ex.run_flow_task(flow, "tiny", INPAINT, {"test": torch.rand(2, 3, 8, 8)}, (0.5,))
    with pytest.raises(ValueError, match="at least one set"):
        ex.run_flow_task(flow, "tiny", INPAINT, {}, (0.5,))


def test_latent_comparison_scores_the_three_methods_on_csgms_energy():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = MLPVAE(image_shape=SHAPE, latent_dim=3, hidden=(16,), gamma_init=0.1).double().eval()
    task = ex.Task("compressed_sensing", 10.0, 20)
    x = _images(2, 0)
    lr = ex.run_latent_task(vae, "tiny_vae", task, x, seed=0, latent_options={"K": 2, "n_mle": 5},
                            jpmap_options={"n1": 1, "n2": 1, "n_max": 2, "adam_max_iters": 10})  # fmt: skip
    rows = ex.latent_rows([lr])
    assert [r["method"] for r in rows] == list(ex.LATENT_METHODS)
    assert lr.lam == pytest.approx((10 / 255) ** 2)
    p = task.degrade(x, 0)
    for m in ex.LATENT_METHODS:
        torch.testing.assert_close(lr.energy[m], latent_energy(lr.results[m].z, p.y, p.op, vae, lr.lam).double())
    budget = int(lr.evals["aipo_latent"].max())
    assert bool((lr.evals["csgm"] <= budget).all()) and bool((lr.evals["csgm"] > 0).all())
    assert all(math.isfinite(r["energy_mean"]) and math.isfinite(r["psnr_mean"]) for r in rows)
    text = ex.latent_markdown(rows)
    assert text.count("| cs20 |") == 3 and text.count("**") == 2


def test_paper_tasks_are_the_papers_scaled_to_32x32():
    """§4.2-4.4: noise std 0.1 (25.5 on the 0-255 scale), m about 16% and 33% of n = 3072 (the paper's 2000 and
    4000 of 12,288), 25% missing 4x4 blocks with noise std 0.02 (5.1)."""
    t = ex.PAPER_TASKS
    assert t["denoising"].sigma == t["cs500"].sigma == t["cs1000"].sigma == 25.5 and t["inpainting"].sigma == 5.1
    assert abs(t["cs500"].level / 3072 - 2000 / 12288) < 0.01 and abs(t["cs1000"].level / 3072 - 4000 / 12288) < 0.01
    assert (t["inpainting"].level, t["inpainting"].block) == (0.25, 4)
    assert [k for k in t] == [v.key for v in t.values()]
