"""Continuation on beta (JPMAP Alg. 2.4, Fig. 5) and the Alg. 2.2 diagnostic (§2.4, §3.4): the paths along the outer
iterations, the run summaries, the i* reading of §3.4 and the figures. Synthetic results pin down the arithmetic;
the shipped MNIST prior with tiny iteration caps (digits decoded from random codes: no data files) ties it to the
solver."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from jpmap_core.experiments.continuation import (
    Diagnostics,
    alg22_summary,
    along_k,
    candidate_energies,
    compare_with_splitting,
    constraint_level,
    continuation,
    describe_run,
    diagnostics,
    istar_pattern,
    last_value,
    plot_beta_and_constraint,
    plot_continuation,
    plot_diagnostic,
    plot_splitting_comparison,
    positive_mode,
    splitting_on_alg24_schedule,
    summarize_run,
)
from jpmap_core.metrics import psnr
from jpmap_core.operators import make_problem
from jpmap_core.pretrained import load_pretrained
from jpmap_core.solvers import Restoration

ALPHA, SIGMA = 3.0, 10.0
TINY = {"n1": 2, "n2": 3, "n_max": 4, "adam_max_iters": 20}  # Alg. 2.3 inside Alg. 2.4, capped for speed


@pytest.fixture(scope="module")
def vae():
    return load_pretrained("mnist_mlp_dvae15")


@pytest.fixture(scope="module")
def problem(vae):
    """Inpainting (80% missing, sigma = 10) of 3 digit-like images decoded from random codes."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = vae.decode(torch.randn(3, *vae.latent_shape, generator=g))
    return x, make_problem("inpainting", x, sigma=SIGMA, level=0.8, generator=g)


@pytest.fixture(scope="module")
def runs(vae, problem):
    """Alg. 2.4 at the official rate (3 outer iterations) and a fast one (3000/d), as the notebook's two runs; in the
    fast one, digits 1 and 2 meet the constraint after a few outer iterations, digit 0 approaches it from above."""
    _, p = problem
    kw = {"sigma": SIGMA, "alpha": ALPHA, **TINY}
    return {
        "official": continuation(p.y, p.op, vae, rho_d=100.0, k_max=3, **kw),
        "fast": continuation(p.y, p.op, vae, rho_d=3000.0, k_max=8, **kw),
    }


@pytest.fixture(scope="module")
def diag(vae, problem):
    _, p = problem
    return diagnostics(p.y, p.op, vae, sigma=SIGMA, alg22_n_max=6, auto_n_max=6, adam_max_iters=20)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _ydata(line) -> torch.Tensor:
    return torch.as_tensor(np.asarray(line.get_ydata(), dtype=np.float64))


def _synthetic_alg24() -> Restoration:
    """Two digits, snapshots at k = 0, 1, 2: digit 0 runs to k = 2, digit 1 stops after k = 0 (later snapshots
    repeat its final iterate with running = False, as the solver does)."""
    x = torch.full((2, 1, 2, 2), 0.5)
    x_decoded = x.clone()
    x_decoded[0] += 0.1  # ||G(z) - x||^2 = 4 * 0.01 = 0.04 for digit 0, 0 for digit 1
    snaps = {
        k: {
            "x": x.clone(),
            "x_decoded": x_decoded.clone(),
            "beta": torch.tensor([1.0 * 2**k, 7.0]),
            "coupling": torch.tensor([0.5 / (k + 1), 0.25]),
            "running": torch.tensor([True, k == 0]),
        }
        for k in range(3)
    }
    return Restoration(
        x=x,
        z=torch.zeros(2, 1),
        x_decoded=x_decoded,
        converged=torch.tensor([False, True]),
        iterations=torch.tensor([9, 3]),
        info={"snapshots": snaps, "rho": 100 / 4, "seconds": 0.0},
        per_image={"outer_iterations": torch.tensor([2, 0])},
    )


def test_constraint_level_is_an_rmse_of_alpha_grey_levels_property():
    eps = constraint_level(ALPHA, 784)
    assert math.sqrt(eps / 784) * 255 == pytest.approx(ALPHA)
    assert constraint_level(2 * ALPHA, 784) == pytest.approx(4 * eps)
    for bad in (0.0, -3.0, math.inf):
        with pytest.raises(ValueError, match="alpha"):
            constraint_level(bad, 784)


def test_along_k_is_nan_once_a_digit_stopped_and_last_value_its_final_entry_property():
    r = _synthetic_alg24()
    beta = along_k(r, "beta")
    assert beta.shape == (3, 2) and beta.dtype == torch.float64
    torch.testing.assert_close(beta[:, 0], torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    assert float(beta[0, 1]) == 7.0 and bool(beta[1:, 1].isnan().all())
    torch.testing.assert_close(last_value(beta), torch.tensor([4.0, 7.0], dtype=torch.float64))
    torch.testing.assert_close(last_value(along_k(r, "coupling")), torch.tensor([0.5 / 3, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="every entry is NaN"):
        last_value(torch.tensor([[1.0, math.nan]]))
    with pytest.raises(ValueError, match="per-digit scalar"):
        along_k(r, "x")
    r.info.pop("snapshots")
    with pytest.raises(ValueError, match="no Alg. 2.4 snapshots"):
        along_k(r, "beta")


def test_summarize_run_gap_is_coupling_over_eps_and_flags_the_constraint_property():
    r = _synthetic_alg24()
    x_true = torch.full_like(r.x, 0.4)
    for eps, met in ((0.05, True), (0.03, False)):  # digit 0's final ||G(z) - x||^2 is 0.04
        s = summarize_run(r, x_true, eps, beta_gamma=2.0)
        torch.testing.assert_close(s["gap_over_eps_final"], torch.tensor([0.04, 0.0]) / eps)
        assert s["constraint_satisfied"] is met
        assert s["gap_over_eps_final_min"] == 0.0
    torch.testing.assert_close(s["gap_over_eps_initial"], torch.tensor([0.5, 0.25], dtype=torch.float64) / 0.03)
    torch.testing.assert_close(s["beta_final_over_beta_gamma"], torch.tensor([2.0, 3.5], dtype=torch.float64))
    assert s["beta_final_over_beta_gamma_min"] == 2.0
    assert s["n_iterations"] == 2
    torch.testing.assert_close(s["psnr_x"], psnr(r.x, x_true))
    torch.testing.assert_close(s["psnr_Gz"], psnr(r.x_decoded, x_true))


def test_continuation_keeps_every_outer_iterate_and_applies_rho_over_d_property(runs, vae):
    """Alg. 2.4: beta_1 = beta_0 = 0.1/gamma^2 (line 2 has no update), then beta_{k+1} = beta_k exp(rho C_k),
    C_k = ||G(z_k) - x_k||^2 - eps, rho = rho_d / d, for every digit still running."""
    eps = constraint_level(ALPHA, 784)
    for name, rho_d in (("official", 100.0), ("fast", 3000.0)):
        r = runs[name]
        outer = r.per_image["outer_iterations"]
        assert sorted(r.info["snapshots"]) == list(range(int(outer.max()) + 1))
        assert r.info["rho"] == pytest.approx(rho_d / 784)
        beta, c = along_k(r, "beta"), along_k(r, "coupling")
        torch.testing.assert_close(beta[0], torch.full((3,), 0.1 * vae.beta, dtype=torch.float64), rtol=1e-6, atol=0)
        if beta.shape[0] > 1:
            torch.testing.assert_close(beta[1], beta[0])
        for k in range(1, beta.shape[0] - 1):
            both = ~beta[k + 1].isnan()
            expected = beta[k] * torch.exp((rho_d / 784 * (c[k] - eps)).clamp(-50, 50))
            torch.testing.assert_close(beta[k + 1][both], expected[both], rtol=1e-5, atol=0)
        for b in range(3):  # each digit runs up to its own last outer iteration, then NaN
            assert int((~beta[:, b].isnan()).sum()) == int(outer[b]) + 1
    assert int(runs["official"].per_image["outer_iterations"].max()) == 3, "k_max caps the official run"


def test_summary_agrees_with_the_solvers_stopping_state_property(runs, problem):
    x, _ = problem
    eps = constraint_level(ALPHA, 784)
    for r in runs.values():
        s = summarize_run(r, x, eps, beta_gamma=1.0)
        assert s["constraint_satisfied"] == bool(r.converged.all())
        torch.testing.assert_close(s["gap_over_eps_final"], last_value(along_k(r, "coupling")).float() / eps)
        torch.testing.assert_close(s["outer_iterations"], r.per_image["outer_iterations"])
    fast = runs["fast"]
    met, outer = fast.converged, fast.per_image["outer_iterations"]
    assert bool(met.any()) and not bool(met.all()), "the test needs digits on both sides of the constraint"
    assert not summarize_run(fast, x, eps, 1.0)["constraint_satisfied"], "one digit off the constraint is enough"
    line = describe_run(fast, eps)
    assert line.startswith(f"rho = 3000/d: constraint met by {int(met.sum())}/3 digits after {outer.tolist()} outer")


def test_plot_continuation_shows_the_iterate_of_each_k_and_marks_the_final_one_property(runs, problem):
    x, p = problem
    eps, show = constraint_level(ALPHA, 784), [0, 1, 50]
    fig = plot_continuation(runs, 1, show, x_true=x, y=p.y, op=p.op, eps=eps, beta_gamma=1.0)
    assert len(fig.axes) == (3 * len(runs) + 1) * len(show)
    r = runs["fast"]
    stop = int(r.per_image["outer_iterations"][1])
    row = 3  # the fast run's x_k row (after the official run's three rows)
    for j, k in enumerate(show):
        kk = min(k, stop)
        ax = fig.axes[row * len(show) + j]
        shown = torch.as_tensor(np.asarray(ax.images[0].get_array()))
        torch.testing.assert_close(shown, r.info["snapshots"][kk]["x"][1, 0].clamp(0, 1), check_dtype=False)
        assert ax.get_title().startswith(f"({chr(97 + j)}) k = {kk}")
        assert ("(final)" in ax.get_title()) == (kk == stop)
        assert ("(met)" in ax.get_title()) == (float(r.info["snapshots"][kk]["coupling"][1]) / eps <= 1)
    assert "(met)" in fig.axes[row * len(show) + 2].get_title(), "digit 1 meets eps in the fast run"
    with pytest.raises(ValueError, match="b must index"):
        plot_continuation(runs, 3, show, x_true=x, y=p.y, op=p.op, eps=eps, beta_gamma=1.0)


def test_plot_beta_and_constraint_draws_each_digits_path_property(runs):
    eps = constraint_level(ALPHA, 784)
    fig = plot_beta_and_constraint(runs, eps, beta_gamma=2.0)
    ax_a, ax_b = fig.axes
    assert ax_a.get_yscale() == ax_b.get_yscale() == "log"
    assert len(ax_a.lines) == 3 * len(runs)
    r = runs["fast"]
    for i in range(3):  # the fast run's lines come after the official run's
        line = ax_a.lines[3 + i]
        assert line.get_linestyle() == "-"
        torch.testing.assert_close(_ydata(line), along_k(r, "beta")[:, i] / 2.0, equal_nan=True)
        torch.testing.assert_close(_ydata(ax_b.lines[3 + i]), along_k(r, "coupling")[:, i] / eps, equal_nan=True)
    with pytest.raises(ValueError, match="one line style per run"):
        plot_beta_and_constraint(runs, eps, 1.0, linestyles=("-",))


def _synthetic_alg22() -> Diagnostics:
    """T = 6 iterations, 2 digits (digit 1 stops after 4): z1 lowers J1 for n <= 2, not after."""
    obj = torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0, 5.0])[:, None].repeat(1, 2)
    prev = torch.cat([torch.tensor([[math.inf, math.inf]]), obj[:-1]])
    cand = torch.stack([prev - 1, prev - 0.5, prev - 0.25], -1)
    cand[3:, :, 0] = prev[3:] + 1  # z1 no longer lowers J1 from n = 3 on
    cand[0] = torch.tensor([9.0, 9.5, 9.75])
    istar = torch.tensor([[1, 1], [1, 1], [1, 1], [2, 2], [2, -1], [2, -1]])
    obj[4:, 1], cand[4:, 1] = math.nan, math.nan
    r22 = Restoration(
        x=torch.zeros(2, 1, 2, 2),
        z=torch.zeros(2, 1),
        x_decoded=torch.zeros(2, 1, 2, 2),
        converged=torch.tensor([True, True]),
        iterations=torch.tensor([6, 4]),
        history={"objective": obj, "J1_candidates": cand, "istar": istar},
    )
    c, rel = candidate_energies(r22)
    return Diagnostics(alg22=r22, auto=r22, candidates=c, relative=rel)


def test_candidate_energies_are_relative_to_the_energy_before_the_step_property():
    d = _synthetic_alg22()
    obj, cand, rel = d.alg22.history["objective"].double(), d.candidates, d.relative
    assert rel.shape == (6, 2, 3) and rel.dtype == torch.float64
    assert bool(rel[0].isnan().all()), "J1(x_0, z_0) = +inf: no relative change at n = 0"
    torch.testing.assert_close(rel[1:4, 0], (cand[1:4, 0] - obj[:3, 0, None]) / obj[:3, 0, None])
    assert bool((rel[1:3, :, 0] < 0).all()) and bool((rel[3:4, :, 0] > 0).all())
    with pytest.raises(ValueError, match="algorithm='2.2'"):
        candidate_energies(Restoration(**{**d.alg22.__dict__, "history": {}}))


def test_alg22_summary_shares_winners_and_descent_gap_property():
    s = alg22_summary(_synthetic_alg22(), early=2)
    assert s["z1_lowers_share_early"] == 1.0  # n = 1, 2 for both digits
    # late: digit 0's n = 4, 5 (z1 does not lower), digit 1's n = 2 (lowers), 3 (does not); its n = 4, 5 are padding
    assert s["z1_lowers_share_late"] == pytest.approx(1 / 4)
    assert s["winner_counts"] == {1: 6, 2: 4, 3: 0}
    # |J1(z2) - J1(z3)| / min_i J1(z^i): 0.25 / (J_prev - 0.5) for n >= 3 (z1 no longer lowest), 0.25 / (J_prev - 1)
    # before; late: digit 0's n = 4, 5 (J_prev = 7, 6), digit 1's n = 2, 3 (J_prev = 9, 8)
    late = torch.tensor([0.25 / 6.5, 0.25 / 5.5, 0.25 / 8, 0.25 / 7.5])
    assert s["gap_z2_z3_rel_median_late"] == pytest.approx(float(late.median()))
    torch.testing.assert_close(s["iterations"], torch.tensor([6, 4]))
    with pytest.raises(ValueError, match="early"):
        alg22_summary(_synthetic_alg22(), early=0)


def test_istar_pattern_reads_the_auto_regulation_of_section_3_4_property():
    istar = torch.tensor(
        [
            [1, 1, 1],
            [1, 1, 1],
            [1, 2, 1],
            [2, 3, 2],
            [2, -1, 2],
            [3, -1, -1],
            [3, -1, -1],
        ]
    )  # digit 1 stops after n = 3, digit 2 never reaches i* = 3
    p = istar_pattern(istar, early=2)
    assert p["istar_first"] == 1  # rows n = 1, 2: five 1s, one 2
    torch.testing.assert_close(p["istar_at_end"], torch.tensor([3, 3, 2]))
    assert p["istar_last"] == 3
    assert p["last_istar1"] == [2, 1, 2] and p["last_istar1_max"] == 2
    assert p["first_istar3"] == [5, 3, None] and p["first_istar3_max"] is None
    assert positive_mode(torch.tensor([-1, -1, -1, 2])) == 2, "padding (-1) is not a candidate"
    assert positive_mode(torch.tensor([-1, -1])) is None


def test_diagnostics_record_alg22_winner_as_argmin_and_auto_accepts_z1_first_property(diag):
    """Alg. 2.2 keeps the candidate of lowest J1 (§2.4); Alg. 2.3 accepts z1 at n = 0 (J1(x_0, z_0) = +inf)."""
    ist, cand = diag.istar22, diag.candidates
    valid = ist > 0
    assert bool(valid[0].all())
    torch.testing.assert_close(ist[valid], cand.argmin(-1)[valid] + 1, check_dtype=False)
    assert bool((diag.istar_auto[0] == 1).all())
    assert diag.auto.info["n1"] == diag.auto.info["n2"] == diag.auto.info["n_max"] == 6
    assert diag.alg22.info["algorithm"] == "2.2" and diag.alg22.info["tol"] == pytest.approx(1 / 25500)
    s = alg22_summary(diag, early=2)
    assert sum(s["winner_counts"].values()) == int(valid.sum())


def test_plot_diagnostic_shows_both_istar_maps_and_the_n1_n2_marks_property(diag):
    fig = plot_diagnostic(diag, n1=2, n2=4)
    ax_a, ax_b, ax_c = fig.axes
    for ax, ist in ((ax_b, diag.istar22), (ax_c, diag.istar_auto)):
        shown = torch.as_tensor(np.asarray(ax.images[0].get_array()))
        torch.testing.assert_close(shown, ist.clamp(min=0).T, check_dtype=False)
    marks = sorted(float(line.get_xdata()[0]) for line in ax_b.lines if line.get_linestyle() == ":")
    assert marks == [2.0, 4.0]
    assert len(ax_a.lines) == 3 * (diag.relative.shape[1] + 1) + 1 + 2  # thin + median per candidate, 0, n1, n2


def test_splitting_on_alg24_schedule_follows_each_digits_beta_path_and_compares_at_its_final_beta_property(
    runs, problem, vae
):
    """Map-z splitting beside Alg. 2.4: each digit walks through the beta_k that Alg. 2.4 visited on it (one beta per
    outer iteration, no more), and both final iterates are scored by J1 at that digit's final beta."""
    x, p = problem
    r24 = runs["fast"]
    path = along_k(r24, "beta")
    r = splitting_on_alg24_schedule(r24, p.y, p.op, vae, sigma=SIGMA, n_max=4, adam_max_iters=20)
    assert r.info["method"] == "mapz_splitting"
    outer = r.history["outer"]
    for b in range(len(r)):
        visited = int((~path[:, b].isnan()).sum())
        assert int(outer[:, b].max()) == visited - 1, f"digit {b}: one run of Alg. 2.3 per beta of its path"
    final_beta = r.history["beta"].clone()
    last_rows = (r.history["outer"] >= 0).sum(0) - 1
    torch.testing.assert_close(final_beta[last_rows, torch.arange(len(r))].double(), last_value(path))
    cmp = compare_with_splitting(r24, r, x, p.y, p.op, vae, sigma=SIGMA)
    from jpmap_core.energy import J1

    beta = last_value(path).float()
    torch.testing.assert_close(cmp["mapz"]["j1_final"], J1(r.x, r.z, p.y, p.op, vae, SIGMA, beta))
    torch.testing.assert_close(cmp["jpmap"]["psnr_Gz"], psnr(r24.x_decoded, x))
    share = float((cmp["jpmap"]["j1_final"] < cmp["mapz"]["j1_final"]).double().mean())
    assert cmp["jpmap_lower_j1_share"] == pytest.approx(share)
    assert int(cmp["mapz"]["adam_steps"].min()) > 0, "map-z splitting descends at every alternation"
    fig = plot_splitting_comparison(cmp, r24, r, x, show=[0, 2])
    titles = [a.get_title(loc="left") for a in fig.axes]
    assert any(t.startswith("(a)") for t in titles) and any(t.startswith("(b)") for t in titles)
    plt.close(fig)
