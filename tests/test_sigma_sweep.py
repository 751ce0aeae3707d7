"""The sigma_DVAE sweep of JPMAP §3.2 (Figs. 1-2): prior names, shared measurements, initialisations, batching,
the metrics table, the claim summaries and the figures. Fast: a small random MLP VAE, no data files."""

from __future__ import annotations

import math

import pytest
import torch

from jpmap_core.experiments.sigma_sweep import (
    PROBLEMS,
    SweepResult,
    budget,
    claims,
    compare_families,
    describe_claims,
    describe_families,
    family_gains,
    make_problems,
    plot_family_gains,
    plot_figure1,
    plot_figure2,
    prior_name,
    restore,
    sweep_prior,
    table_rows,
)
from jpmap_core.models import build_model
from jpmap_core.solvers import SOLVERS, Restoration

TABLE_KEYS = {"figure", "problem", "sigma_dvae", "method", "n_images", "psnr_mean", "psnr_q25", "psnr_q75"}


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = build_model({"arch": "mlp", "image_shape": [1, 28, 28], "latent_dim": 8, "hidden": [32]})
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def digits():
    g = torch.Generator().manual_seed(1)
    return torch.rand(5, 1, 28, 28, generator=g)


def test_prior_names_follow_the_sweep_naming_of_both_families():
    assert prior_name(0) == "mnist_mlp_dvae0", "the default family is the paper's 200 epochs"
    assert prior_name(2.5, 200) == "mnist_mlp_dvae2p5"
    assert prior_name(0, 50) == "mnist_mlp_e50_dvae0"
    assert prior_name(2.5, 50) == "mnist_mlp_e50_dvae2p5"
    assert prior_name(15.0, 50) == "mnist_mlp_e50_dvae15"
    assert prior_name(50, epochs=50) == "mnist_mlp_e50_dvae50"
    with pytest.raises(ValueError, match="100 epochs.*50, 200"):
        prior_name(15, 100)
    with pytest.raises(ValueError, match=">= 0"):
        prior_name(-5)
    with pytest.raises(TypeError, match="number"):
        prior_name("fifteen")


def test_problems_are_the_papers_and_one_seed_gives_the_same_measurements(digits):
    a = make_problems(digits, seed=3)
    b = make_problems(digits, seed=3)
    c = make_problems(digits, seed=4)
    assert list(a) == list(PROBLEMS)
    for name in PROBLEMS:
        torch.testing.assert_close(a[name].y, b[name].y, rtol=0, atol=0)
        assert not torch.equal(a[name].y, c[name].y), f"{name}: another seed must give other draws"
    torch.testing.assert_close(a["compressed_sensing"].op.matrix, b["compressed_sensing"].op.matrix, rtol=0, atol=0)
    assert (a["denoising"].sigma, a["compressed_sensing"].sigma, a["inpainting"].sigma) == (150.0, 10.0, 10.0)
    assert a["compressed_sensing"].y.shape == (5, 80)
    noise_std = float((a["denoising"].y - digits).std())
    assert noise_std == pytest.approx(150 / 255, rel=0.05)
    mask = a["inpainting"].op.mask
    assert mask.shape == (5, 1, 28, 28), "one mask per digit"
    assert 1 - float(mask.mean()) == pytest.approx(0.8, abs=0.03)
    assert not torch.equal(mask[0], mask[1])


def test_figure1_starts_at_the_ground_truth_and_figure2_at_the_standard_initialisations(vae, digits):
    """With zero iterations the solvers return their starting points: this pins down the initialisations."""
    problems = make_problems(digits, seed=0)
    zero = {"n1": 0, "n2": 0, "n_max": 0, "csgm_max_iters": 1}  # CSGM: one Adam step of size lr = 0.01
    with torch.no_grad():
        z_true = vae.encode(digits)[0]
    assert float(z_true.abs().max()) > 0.1, "the test needs mu_phi(x*) away from 0"
    near = {"rtol": 0, "atol": 0.011}
    for problem in problems.values():
        j1 = restore(problem, vae, "jpmap", 1, digits, **zero)
        torch.testing.assert_close(j1.x, digits)
        torch.testing.assert_close(j1.z, z_true)
        c1 = restore(problem, vae, "csgm", 1, digits, **zero)
        torch.testing.assert_close(c1.z, z_true, **near)
        j2 = restore(problem, vae, "jpmap", 2, digits, **zero)
        torch.testing.assert_close(j2.x, problem.op.A_dagger(problem.y))
        c2 = restore(problem, vae, "csgm", 2, digits, **zero)
        torch.testing.assert_close(c2.z, torch.zeros_like(z_true), **near)
    with pytest.raises(ValueError, match="figure"):
        restore(problems["denoising"], vae, "jpmap", 3, digits)
    with pytest.raises(ValueError, match="method"):
        restore(problems["denoising"], vae, "pnp", 1, digits)


def _fake_solver(offset, calls, name):
    def solve(y, op, vae, *, sigma, **kwargs):
        calls.append((name, y.shape[0], kwargs))
        x = (_TRUE + offset).clone()
        steps = torch.tensor([[10, 20, 30, 40, 50], [5, -1, 5, -1, -1]])  # JPMAP: per alternation, -1 once stopped
        return Restoration(
            x=x, z=torch.zeros(x.shape[0], 8), x_decoded=x, converged=None, iterations=torch.full((5,), 7),
            history={"adam_steps": steps}, info={"method": name},
        )  # fmt: skip

    return solve


_TRUE = torch.full((5, 1, 28, 28), 0.95)


def test_sweep_prior_solves_each_batch_once_and_scores_both_methods_alike(vae, monkeypatch):
    calls: list = []
    monkeypatch.setitem(SOLVERS, "csgm", _fake_solver(0.1, calls, "csgm"))  # the sweep goes through the registry
    monkeypatch.setitem(SOLVERS, "jpmap", _fake_solver(-0.1, calls, "jpmap"))
    problems = make_problems(_TRUE, seed=0)
    res = sweep_prior(vae, 5, problems, _TRUE, clip=False)
    assert len(calls) == 12 and all(b == 5 for _, b, _ in calls), "one batched solve per (figure, problem, method)"
    assert set(res.psnr) == {(f, p, 5.0, m) for f in (1, 2) for p in PROBLEMS for m in ("csgm", "jpmap")}
    for key, values in res.psnr.items():  # an error of 0.1 everywhere: 20 dB for both
        torch.testing.assert_close(values, torch.full((5,), 20.0), rtol=0, atol=1e-4, msg=str(key))
    assert res.adam_steps[(2, "denoising", 5.0, "jpmap")].tolist() == [15, 20, 35, 40, 50]
    assert res.adam_steps[(2, "denoising", 5.0, "csgm")].tolist() == [7] * 5
    spent = budget(res)
    assert spent["fig1_jpmap"]["adam_steps_max"] == 50 and spent["fig2_csgm"]["adam_steps_median"] == 7
    clipped = sweep_prior(vae, 5, problems, _TRUE, clip=True)  # 1.05 -> 1: error 0.05, 26 dB; 0.85 stays 20 dB
    assert float(clipped.psnr[(1, "inpainting", 5.0, "csgm")].mean()) == pytest.approx(26.02, abs=0.01)
    assert float(clipped.psnr[(1, "inpainting", 5.0, "jpmap")].mean()) == pytest.approx(20.0, abs=1e-4)


def _synthetic(jpmap_fig2=None, csgm_fig2=18.0):
    """Per-image PSNRs for 4 digits: Fig. 1 JPMAP means 20, 19.5, 20.3, 15 at sigma 0, 5, 15, 30; CSGM flat 19."""
    res = SweepResult()
    spread = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    fig1 = {0.0: 20.0, 5.0: 19.5, 15.0: 20.3, 30.0: 15.0}
    jpmap_fig2 = jpmap_fig2 or {0.0: 17.0, 5.0: 19.0, 15.0: 20.0, 30.0: 19.5}
    for problem in PROBLEMS:
        for s, v in fig1.items():
            res.psnr[(1, problem, s, "jpmap")] = v + spread
            res.psnr[(1, problem, s, "csgm")] = 19.0 + spread
            res.psnr[(2, problem, s, "jpmap")] = jpmap_fig2[s] + spread
            res.psnr[(2, problem, s, "csgm")] = csgm_fig2 + spread.flip(0)
    return res


def test_table_rows_carry_the_metric_names_means_and_quartiles():
    res = SweepResult(psnr={(2, "inpainting", 5.0, "jpmap"): torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])})
    (row,) = table_rows(res)
    assert set(row) == TABLE_KEYS
    assert (row["figure"], row["problem"], row["sigma_dvae"], row["method"], row["n_images"]) == (
        2, "inpainting", 5.0, "jpmap", 5,
    )  # fmt: skip
    assert (row["psnr_mean"], row["psnr_q25"], row["psnr_q75"]) == pytest.approx((30.0, 20.0, 40.0))
    rows = table_rows(_synthetic())
    assert len(rows) == 2 * 3 * 4 * 2
    order = [(r["figure"], PROBLEMS.index(r["problem"]), r["sigma_dvae"], r["method"]) for r in rows]
    assert order == sorted(order), "rows sorted by figure, problem, sigma_dvae, method"


def test_claims_measure_the_fig1_drop_and_the_fig2_gaps():
    res = _synthetic()
    c = claims(table_rows(res), res, moderate_max=20.0)
    f1 = c["fig1"]["inpainting"]["jpmap"]
    assert f1["sigmas_moderate"] == [0.0, 5.0, 15.0], "sigma_DVAE = 30 is outside the moderate range"
    assert f1["max_drop_moderate"] == pytest.approx(0.5)
    assert f1["worst_sigma_moderate"] == 5.0
    assert f1["spread_moderate"] == pytest.approx(0.8)
    f2 = c["fig2"]["compressed_sensing"]
    assert f2["gap_at_0"] == pytest.approx(-1.0)
    assert f2["gap_min_ge5"] == pytest.approx(1.0)
    assert f2["worst_sigma_ge5"] == 5.0
    assert f2["gap_mean_ge5"] == pytest.approx((1.0 + 2.0 + 1.5) / 3)
    assert f2["advantage_ge5_minus_0"] == pytest.approx(1.5 + 1.0)
    assert f2["jpmap_ge5_minus_0"] == pytest.approx((19.0 + 20.0 + 19.5) / 3 - 17.0)
    assert f2["csgm_ge5_minus_0"] == pytest.approx(0.0)
    # per-digit gains JPMAP - CSGM (CSGM's spread reversed): [-4, -2, 0, 2] dB at sigma 0 -> 1 win of 4
    assert f2["win_frac_at_0"] == pytest.approx(0.25)
    assert f2["win_frac_ge5"] == pytest.approx((0.5 + 0.75 + 0.75) / 3)


def test_describe_claims_says_plainly_when_a_claim_does_not_hold():
    good = _synthetic()
    text = describe_claims(claims(table_rows(good), good))
    assert "DOES NOT HOLD" not in text
    assert text.count("holds") == 3 * 2 + 3 * 2  # Fig. 1 per problem and method, Fig. 2 two claims per problem
    bad = _synthetic(jpmap_fig2={0.0: 21.0, 5.0: 17.5, 15.0: 20.0, 30.0: 19.5})  # CSGM wins at 5 and at 0
    text = describe_claims(claims(table_rows(bad), bad))
    assert text.count("beats CSGM at every sigma_DVAE >= 5: DOES NOT HOLD") == 3
    assert text.count("smaller advantage at sigma_DVAE = 0: DOES NOT HOLD") == 3
    assert "from sigma_DVAE = 0 to >= 5: JPMAP -2.00 dB, CSGM +0.00 dB" in text
    assert "drop +5.00 dB" in describe_claims(claims(table_rows(bad), bad, moderate_max=30.0))


def test_claims_without_sigma_zero_are_nan_not_made_up():
    res = _synthetic()
    for key in [k for k in res.psnr if k[2] == 0.0]:
        del res.psnr[key]
    c = claims(table_rows(res), res)
    assert math.isnan(c["fig2"]["denoising"]["gap_at_0"])
    assert math.isnan(c["fig1"]["denoising"]["jpmap"]["max_drop_moderate"])
    assert "cannot tell" in describe_claims(c)


def test_figures_have_one_labelled_panel_per_problem(digits):
    import matplotlib.pyplot as plt

    res = _synthetic()
    rows = table_rows(res)
    problems = make_problems(digits, seed=0)
    fig1 = plot_figure1(rows, problems)
    titles = [ax.get_title(loc="left") for ax in fig1.axes]
    assert [t[:3] for t in titles] == ["(a)", "(b)", "(c)"]
    assert "Denoising" in titles[0] and "m = 80" in titles[1] and "80% missing" in titles[2]
    assert all(ax.get_ylabel() == "PSNR (dB)" and "DVAE" in ax.get_xlabel() for ax in fig1.axes)
    fig2 = plot_figure2(rows, problems, res)
    assert [ax.get_title(loc="left")[:3] for ax in fig2.axes] == ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)"]
    gain_line = fig2.axes[4].get_lines()[-1]  # compressed sensing: median gain over digits per sigma_DVAE
    assert list(gain_line.get_ydata()) == pytest.approx([-1.0, 1.0, 2.0, 1.5])
    plt.close("all")


def test_family_gains_compare_the_jpmap_minus_csgm_gain_of_two_training_lengths(digits):
    import matplotlib.pyplot as plt

    long = _synthetic()  # gaps -1, 1, 2, 1.5 dB at sigma_DVAE 0, 5, 15, 30 (compressed sensing)
    short = _synthetic(jpmap_fig2={0.0: 19.5, 5.0: 19.0, 15.0: 20.0, 30.0: 19.5})  # gap +1.5 dB at 0: not the worst
    for key in [k for k in short.psnr if k[0] == 1]:
        del short.psnr[key]  # the compared family runs Fig. 2 only
    rows = family_gains({200: long, 50: short})
    assert {r["epochs"] for r in rows} == {200, 50} and len(rows) == 2 * 3 * 4
    assert [r["epochs"] for r in rows] == sorted((r["epochs"] for r in rows), reverse=True)
    r0 = next(r for r in rows if (r["epochs"], r["problem"], r["sigma_dvae"]) == (200, "compressed_sensing", 0.0))
    assert r0["gain_mean"] == pytest.approx(-1.0) and r0["win_frac"] == pytest.approx(0.25) and r0["n_images"] == 4
    summary = compare_families(rows)
    cs = summary["problems"]["compressed_sensing"]
    assert cs["200"]["gain_at_0"] == pytest.approx(-1.0) and cs["200"]["zero_is_worst"]
    assert cs["200"]["advantage_ge5_minus_0"] == pytest.approx(1.5 + 1.0)
    assert cs["50"]["gain_at_0"] == pytest.approx(1.5) and not cs["50"]["zero_is_worst"]
    assert cs["50"]["advantage_ge5_minus_0"] == pytest.approx((1.0 + 2.0 + 1.5) / 3 - 1.5)
    text = describe_families(summary)
    assert "compressed_sensing  200 epochs: at 0 -1.00 dB (JPMAP better on 25%)" in text
    fig = plot_family_gains(rows, make_problems(digits, seed=0))
    assert [ax.get_title(loc="left")[:3] for ax in fig.axes] == ["(a)", "(b)", "(c)"]
    labels = [line.get_label() for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]
    assert labels == ["200 epochs", "50 epochs"]
    plt.close("all")
