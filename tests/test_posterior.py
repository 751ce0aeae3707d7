"""The posterior experiment of notebook 12 (VBLE, VBLE-xz against JPMAP): calibration statistics on cases whose
answer is known, and the task runner, tables and figures on a tiny prior."""

from __future__ import annotations

import math

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch

from jpmap_core.experiments import posterior as post
from jpmap_core.metrics import psnr
from jpmap_core.models import MLPVAE

matplotlib.use("Agg")

LEVELS = post.NOMINAL_LEVELS


def gaussian_case(B=2, S=1000, shape=(1, 48, 48), scale=1.0, seed=0):
    """x* and S samples, every pixel independent: x* ~ N(mu, s^2) and samples ~ N(mu, (scale s)^2)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(B, *shape, generator=g, dtype=torch.float64)
    s = 0.05 + 0.1 * torch.rand(B, *shape, generator=g, dtype=torch.float64)
    x_true = mu + s * torch.randn(B, *shape, generator=g, dtype=torch.float64)
    samples = mu.unsqueeze(1) + scale * s.unsqueeze(1) * torch.randn(B, S, *shape, generator=g, dtype=torch.float64)
    return x_true, samples, mu, s


# ---- statistics ----------------------------------------------------------------------------------------------------
def test_empirical_quantile_matches_torch_quantile():
    x = torch.randn(3, 17, 2, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = x.sort(1).values
    for q in (0.0, 0.005, 0.05, 0.25, 0.5, 0.9, 0.995, 1.0):
        torch.testing.assert_close(post.empirical_quantile(s, q), torch.quantile(x, q, dim=1))


def test_coverage_of_samples_from_the_true_posterior_is_nominal_within_binomial_error():
    x_true, samples, _, _ = gaussian_case()
    cov = post.coverage(samples, x_true, LEVELS)
    assert cov.shape == (2, len(LEVELS))
    n = x_true[0].numel()
    for j, p in enumerate(LEVELS):
        se = math.sqrt(p * (1 - p) / n)
        # the interval between empirical quantiles of S = 1000 draws covers p - O(1/S) of a new draw
        assert cov[:, j].sub(p).abs().max() <= 4 * se + 2 / samples.shape[1], (p, cov[:, j])


def test_a_perfectly_calibrated_case_gives_the_diagonal_and_an_overconfident_one_falls_below_it():
    x_true, samples, _, _ = gaussian_case(S=2000)
    cov = post.coverage(samples, x_true, LEVELS).mean(0)
    assert post.calibration_error(LEVELS, cov) < 0.01
    x_true, narrow, _, _ = gaussian_case(scale=0.3)  # the samples' std is a third of the truth's
    cov_narrow = post.coverage(narrow, x_true, LEVELS).mean(0)
    assert bool((cov_narrow < torch.tensor(LEVELS, dtype=cov_narrow.dtype) - 0.2).all())
    # std 0.3 s: coverage is P(|N(0,1)| <= 0.3 z_p), e.g. 2 Phi(0.3 * 1.645) - 1 = 0.377 at 90%
    assert cov_narrow[LEVELS.index(0.9)].item() == pytest.approx(math.erf(0.3 * 1.6449 / math.sqrt(2)), abs=0.02)
    assert post.calibration_error(LEVELS, cov_narrow) > 0.3


def test_coverage_is_monotone_in_the_nominal_level_because_the_intervals_nest():
    x_true, samples, _, _ = gaussian_case(S=30, scale=0.7, seed=3)
    cov = post.coverage(samples, x_true, LEVELS)
    assert bool((cov[:, 1:] >= cov[:, :-1]).all())


def test_coverage_with_a_mask_counts_only_those_values():
    x_true = torch.zeros(1, 1, 2, 2)
    x_true[0, 0, 0, 0] = 5.0  # far outside every interval
    samples = torch.randn(1, 50, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 0.01
    full = post.coverage(samples, x_true, (0.99,))
    assert full.item() <= 0.75
    inside = post.coverage(samples, x_true, (0.99,), mask=x_true < 1)
    assert inside.item() == 1.0
    assert math.isnan(post.coverage(samples, x_true, (0.5,), mask=torch.zeros_like(x_true, dtype=torch.bool)).item())


def test_error_quantile_of_gaussian_samples_is_1645_std():
    _, samples, mu, s = gaussian_case(S=4000, shape=(1, 8, 8))
    q = post.error_quantile(samples, mu, 0.9)
    torch.testing.assert_close(q / s, torch.full_like(q, 1.6449), rtol=0, atol=0.12)


def test_pearson_per_image_on_constructed_cases():
    g = torch.Generator().manual_seed(0)
    std = torch.rand(4, 3, 8, 8, generator=g)
    err = torch.stack([2 * std[0] + 1, -std[1], torch.rand(3, 8, 8, generator=g), torch.full((3, 8, 8), 0.5)])
    r = post.pearson_per_image(std, err)
    assert r[0].item() == pytest.approx(1.0) and r[1].item() == pytest.approx(-1.0)
    assert abs(r[2].item()) < 0.2  # independent values: about 0 (192 of them)
    assert math.isnan(r[3].item())  # a constant map has no correlation
    noisy = std + 0.1 * torch.randn(std.shape, generator=g)
    assert bool((post.pearson_per_image(std, noisy) > 0.8).all())


def test_calibration_error_and_levels_are_checked():
    assert post.calibration_error((0.5, 0.9), [0.5, 0.9]) == 0.0
    assert post.calibration_error((0.5, 0.9), [0.3, 1.0]) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="one coverage per level"):
        post.calibration_error((0.5, 0.9), [0.5])
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        post.coverage(torch.zeros(1, 3, 1, 2, 2), torch.zeros(1, 1, 2, 2), (0.5, 1.0))
    with pytest.raises(ValueError, match="samples must be"):
        post.coverage(torch.zeros(1, 3, 1, 2, 2), torch.zeros(2, 1, 2, 2))


# ---- the runner on a tiny prior ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prior():
    torch.manual_seed(0)
    return MLPVAE(image_shape=(1, 12, 12), latent_dim=3, hidden=(32,), gamma_init=0.1).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def x(prior):
    z = torch.randn(3, 3, generator=torch.Generator().manual_seed(2))
    noise = 0.05 * torch.randn(3, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return (prior.decode(z) + noise).clamp(0, 1)


TINY = dict(jpmap_options=dict(n1=1, n2=2, n_max=3, adam_max_iters=10), vble_options=dict(max_iters=8), n_samples=12)


@pytest.fixture(scope="module")
def runs(prior, x):
    tasks = [post.Task("toy", "inpainting", 10.0, 0.5), post.Task("toy", "compressed_sensing", 10.0, 30)]
    return [post.run_task(t, x, prior, seed=1, **TINY) for t in tasks]


def test_run_task_scores_every_method_on_the_same_measurements(runs, x):
    run = runs[0]
    assert set(run.results) == set(post.METHODS) and run.n_images == 3
    again = post.degrade(run.task, x, 1)
    assert torch.equal(again.y, run.problem.y)  # the measurements every method saw, from the task's seed
    assert not torch.equal(post.degrade(run.task, x, 2).y, run.problem.y)
    for m, res in run.results.items():
        assert res.x.shape == x.shape and float(res.x.min()) >= 0 and float(res.x.max()) <= 1
        torch.testing.assert_close(res.psnr, psnr(res.x, x))
        assert res.seconds > 0
        if m == "map":
            assert res.std is None and res.coverage is None and res.seconds_fit is None
            continue
        assert res.std.shape == x.shape and res.error_q90.shape == x.shape
        assert res.shown_samples.shape == (3, 2, 1, 12, 12)
        assert res.coverage.shape == (3, len(post.NOMINAL_LEVELS))
        assert bool((res.coverage[:, 1:] >= res.coverage[:, :-1]).all())
        assert 0 < res.seconds_fit <= res.seconds and res.seconds_sampling >= 0
        assert res.restoration.per_image["samples"].shape[1] == 2  # the full sample set is not kept
    assert run.results["vble_xz"].b_mean is not None and run.results["vble"].b_mean is None


def test_run_task_is_reproducible(runs, prior, x):
    again = post.run_task(runs[1].task, x, prior, seed=1, methods=("vble_xz",), **TINY)
    torch.testing.assert_close(again.results["vble_xz"].x, runs[1].results["vble_xz"].x)
    torch.testing.assert_close(again.results["vble_xz"].coverage, runs[1].results["vble_xz"].coverage)


def test_table_rows_have_exactly_the_keys_and_map_rows_no_posterior_columns(runs):
    rows = post.table_rows(runs)
    assert len(rows) == 2 * len(post.METHODS)
    for r in rows:
        assert tuple(r) == post.TABLE_KEYS
        posterior_columns = [r[k] for k in ("psnr_mmse", "ssim_mmse", "coverage_90", "std_error_corr")]
        if r["method"] == "map":
            assert posterior_columns == [None] * 4
        else:
            assert all(v is not None for v in posterior_columns)
        assert r["psnr_map"] is not None and r["seconds_per_image"] > 0 and r["n_images"] == 3
    vble = next(r for r in rows if r["task"] == "inpainting" and r["method"] == "vble")
    res = runs[0].results["vble"]
    assert vble["psnr_map"] == pytest.approx(float(res.psnr_decoded.mean()))  # the MAP-z decode D(zbar)
    assert vble["coverage_90"] == pytest.approx(float(res.coverage[:, post.NOMINAL_LEVELS.index(0.9)].mean()))
    nested = post.by_task(rows)
    assert nested["toy"]["compressed_sensing"]["map"]["method"] == "map"


def test_reliability_rows_timing_and_verdict(runs):
    rel = post.reliability_rows(runs)
    assert len(rel) == 2 * 2 * len(post.NOMINAL_LEVELS)
    assert all(tuple(r) == post.RELIABILITY_KEYS for r in rel)
    timing = post.timing_rows(runs)
    assert {r["method"] for r in timing} == set(post.METHODS)
    assert all(r["cpu_seconds_per_image"] > 0 for r in timing)
    v = post.calibration_verdict(runs)
    t = v["tasks"]["toy"]["inpainting"]
    err = t["calibration_error"]
    assert t["xz_better_calibrated"] == (err["vble_xz"] < err["vble"])
    assert v["datasets"]["toy"]["n_tasks"] == 2
    assert 0 <= v["datasets"]["toy"]["xz_better_on"] <= 2
    assert v["coverage_monotone"] is True
    gap = post.psnr_gap(runs)["toy"]["inpainting"]
    res = runs[0].results
    assert gap["vble"] == pytest.approx(float((res["vble"].psnr - res["map"].psnr).mean()), abs=1e-6)


def test_figures_draw(runs):
    fig = post.posterior_figure(runs, 1, title="toy")
    assert len(fig.axes) >= 2 * 2 * len(post.COLUMNS)
    plt.close(fig)
    fig = post.reliability_figure(runs)
    plt.close(fig)
    with pytest.raises(ValueError, match="index must be"):
        post.posterior_figure(runs, 3)


def test_run_task_rejects_bad_input(prior, x):
    task = post.Task("toy", "inpainting", 10.0, 0.5)
    with pytest.raises(ValueError, match="unknown methods"):
        post.run_task(task, x, prior, methods=("mcmc",))
    with pytest.raises(ValueError, match="n_samples"):
        post.run_task(task, x, prior, n_samples=1)
    with pytest.raises(ValueError, match="x_true must be"):
        post.run_task(task, x[:, :, :4], prior)


def test_markdown_table_and_the_reading_follow_the_numbers(runs):
    table = post.markdown_table(post.table_rows(runs))
    lines = table.splitlines()
    assert lines[0] == "| " + " | ".join(post.TABLE_KEYS) + " |" and len(lines) == 2 + 2 * len(post.METHODS)
    assert "| toy | inpainting | map | 3 | - |" in table  # no MMSE for the MAP
    v = post.calibration_verdict(runs)
    text = post.calibration_reading(v)
    n = v["datasets"]["toy"]["xz_better_on"]
    assert f"VBLE-xz is the better calibrated on {n} of 2 problems" in text
    flipped = {"tasks": {"toy": {"blur": {**v["tasks"]["toy"]["inpainting"], "xz_better_calibrated": False}}},
               "datasets": {"toy": {"n_tasks": 1, "xz_better_on": 0}}}  # fmt: skip
    assert "blur: VBLE is the better calibrated" in post.calibration_reading(flipped, claim_dataset="toy")
    assert "does not hold on every problem of this run (on 0 of 1)" in post.calibration_reading(
        flipped, claim_dataset="toy"
    )
    holds = "holds on every problem" in post.calibration_reading(v, claim_dataset="toy")
    assert holds == v["datasets"]["toy"]["xz_better_on_all"]
    assert "(autoencoder reconstruction 12.3 dB)" in post.calibration_reading(v, {"toy": 12.34})


def test_the_cae_prior_runs_with_the_latent_map_and_the_uniform_posterior():
    """The compressive autoencoder has no Gaussian encoder for JPMAP: its MAP row is the latent MAP (CSGM with the
    rate as -log p(z)) from the encoder's code of A_dagger y, and VBLE uses the uniform posterior."""
    from jpmap_core.models import CAEHyperprior
    from jpmap_core.solvers import csgm

    torch.manual_seed(0)
    cae = CAEHyperprior(N=2, M=3, lmbda=0.01).eval().requires_grad_(False)
    xb = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    task = post.Task("bsd", "blur", 7.65, None, torch.ones(3, 3) / 9, "box 3x3")
    opts = dict(jpmap_options=dict(max_iters=5), vble_options=dict(max_iters=4), n_samples=6)
    run = post.run_task(task, xb, cae, seed=0, map_method="csgm", **opts)
    assert run.map_method == "csgm" and set(run.results) == set(post.METHODS)
    assert run.results["vble"].restoration.info["posterior"] == "uniform"
    p = run.problem
    z0 = cae.encode(p.op.A_dagger(p.y).clamp(0, 1))[0]
    direct = csgm(p.y, p.op, cae, sigma=p.sigma, z0=z0, max_iters=5)
    torch.testing.assert_close(run.results["map"].x, direct.x.clamp(0, 1))
    fig = post.posterior_figure([run], 0)
    assert any("latent MAP" in t.get_text() for ax in fig.axes for t in ax.texts)
    plt.close(fig)
    with pytest.raises(ValueError, match="unknown map_method"):
        post.run_task(task, xb, cae, map_method="pnp", **opts)
