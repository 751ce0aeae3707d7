"""The experiment module of notebooks 08-09 (PnP-HVAE Figs. 1, 2 and 7): Lipschitz ratios and power iteration on
linear maps with known norms, the pairs of patches, the tables' keys, the verdicts' logic, the deblurring problems."""

from __future__ import annotations

import math

import pytest
import torch

from jpmap_core.experiments import pnp_hvae_analysis as pa
from jpmap_core.models import HVAE
from jpmap_core.operators import BlurFFT
from jpmap_core.solvers import Restoration

KERNEL = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16


@pytest.fixture(scope="module")
def hvae() -> HVAE:
    """A tiny HVAE (stride 2) whose reconstruction depends on its input (prior nets and output scaled up)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = HVAE(
            image_shape=(3, 8, 8), widths=(4, 6), groups=(1, 2), latent_channels=(2, 3), enc_blocks=1, gamma_init=0.1
        ).eval()
        with torch.no_grad():
            for g in m.decoder:
                if g.prior is not None:
                    g.prior.c4.weight.normal_(0, 0.3)
                g.z_proj.weight.mul_(10)
            m.out_conv.weight.mul_(10)
    return m.requires_grad_(False)


def _linear_map(matrix: torch.Tensor, scales: torch.Tensor | None = None):
    """``x_b -> s_b M vec(x_b)`` per image (a linear map with Jacobian ``s_b M`` at every point)."""

    def f(x):
        out = (x.flatten(1) @ matrix.T).view_as(x)
        return out if scales is None else out * scales.view(-1, 1, 1, 1)

    return f


def _images(b: int, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---- Fig. 1: ratios and power iteration ------------------------------------------------------------
def test_ratio_of_a_scaled_orthogonal_map_is_its_norm():
    d = 3 * 4 * 4
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    f = _linear_map(2.5 * q)
    u, v = _images(6, 4, 4, seed=2).double(), _images(6, 4, 4, seed=3).double()
    r = pa.lipschitz_ratios(f, u, v)
    assert r.shape == (6,)
    torch.testing.assert_close(r, torch.full((6,), 2.5, dtype=torch.float64))


def test_ratios_of_a_linear_map_lie_between_its_extreme_singular_values():
    d = 3 * 4 * 4
    m = torch.randn(d, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    s = torch.linalg.svdvals(m)
    r = pa.lipschitz_ratios(_linear_map(m), _images(20, 4, 4, 5).double(), _images(20, 4, 4, 6).double())
    assert bool((r <= s[0] + 1e-9).all()) and bool((r >= s[-1] - 1e-9).all())
    assert float(r.max()) < float(s[0])  # a secant ratio is only a lower bound of the norm


def test_ratio_of_identical_points_is_refused():
    u = _images(2, 4, 4)
    with pytest.raises(ValueError, match="u == v"):
        pa.lipschitz_ratios(lambda x: x, u, u.clone())


def test_power_iteration_recovers_the_spectral_norm_of_a_linear_map_per_image():
    d = 3 * 4 * 4
    g = torch.Generator().manual_seed(7)
    q1, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    m = q1 @ torch.diag(torch.linspace(2.0, 0.1, d, dtype=torch.float64).index_fill(0, torch.tensor([0]), 3.0)) @ q2.T
    scales = torch.tensor([1.0, 0.25, 3.0], dtype=torch.float64)
    x = _images(3, 4, 4, 8).double()
    est, hist = pa.jacobian_norm(_linear_map(m, scales), x, n_iter=60, generator=torch.Generator().manual_seed(0))
    expected = scales * 3.0  # the largest singular value of M, times each image's scale
    torch.testing.assert_close(est, expected, rtol=1e-8, atol=0)
    assert hist.shape == (60, 3)
    assert bool((hist[1:] >= hist[:-1] - 1e-9 * expected).all()), "power iteration on J^T J never decreases"
    assert bool((hist <= expected + 1e-9).all()), "every estimate is a lower bound of the norm"


def test_power_iteration_on_the_hvae_bounds_its_secant_ratios_near_the_point(hvae):
    x = _images(2, seed=9)
    f = pa.reconstruction_map(hvae, 0.8)
    est, _ = pa.jacobian_norm(f, x, n_iter=30, generator=torch.Generator().manual_seed(1))
    dx = 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    r = pa.lipschitz_ratios(f, x + dx, x)
    assert bool((r <= est * 1.01).all()), (r, est)


def test_reconstruction_map_is_the_z_step_decoding_and_clamps_like_algorithm_2(hvae):
    x = _images(2, seed=3)
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(pa.reconstruction_map(hvae, 0.7)(x), hvae.reconstruct(x, 0.7))
        torch.testing.assert_close(pa.reconstruction_map(hvae, 0.7)(noisy), hvae.reconstruct(noisy.clamp(0, 1), 0.7))
        unclamped = pa.reconstruction_map(hvae, 0.7, clamp=False)(noisy)
        torch.testing.assert_close(unclamped, hvae.reconstruct(noisy, 0.7, allow_out_of_range=True))


def test_patch_pairs_come_from_two_different_images_where_recorded_and_repeat_with_the_seed():
    images = [_images(1, 20, 30, seed=i) for i in range(3)]
    u, v, where = pa.sample_patch_pairs(images, 10, 8, generator=torch.Generator().manual_seed(0))
    assert u.shape == v.shape == (10, 3, 8, 8)
    for b, w in enumerate(where):
        assert w["u_image"] != w["v_image"]
        src = images[w["u_image"]][0]
        torch.testing.assert_close(u[b], src[:, w["u_top"] : w["u_top"] + 8, w["u_left"] : w["u_left"] + 8])
        src = images[w["v_image"]][0]
        torch.testing.assert_close(v[b], src[:, w["v_top"] : w["v_top"] + 8, w["v_left"] : w["v_left"] + 8])
    u2, v2, _ = pa.sample_patch_pairs(images, 10, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(u, u2) and torch.equal(v, v2)
    with pytest.raises(ValueError, match="at least 2 images"):
        pa.sample_patch_pairs(images[:1], 3, 8)
    with pytest.raises(ValueError, match="smaller than"):
        pa.sample_patch_pairs(images, 3, 24)


def test_lipschitz_rows_have_exactly_the_keys_one_per_tau_and_sigma(hvae):
    images = [_images(1, 16, 16, seed=i) for i in range(3)]
    u, v, _ = pa.sample_patch_pairs(images, 5, 8, generator=torch.Generator().manual_seed(0))
    study = pa.lipschitz_study(hvae, u, v, taus=[0.6, 0.99], sigmas=[0, 25], n_jacobian=2, power_iters=3, seed=1)
    rows = pa.lipschitz_rows(study)
    assert [(r["tau"], r["sigma"]) for r in rows] == [(0.6, 0.0), (0.99, 0.0), (0.6, 25.0), (0.99, 25.0)]
    assert all(tuple(r) == pa.LIPSCHITZ_KEYS for r in rows)
    assert all(r["n_pairs"] == 5 and 0 <= r["frac_below_1"] <= 1 for r in rows)
    assert all(r["ratio_median"] <= r["ratio_q99"] <= r["ratio_max"] for r in rows)
    again = pa.lipschitz_study(hvae, u, v, taus=[0.6, 0.99], sigmas=[0, 25], n_jacobian=2, power_iters=3, seed=1)
    assert pa.lipschitz_rows(again) == rows  # same seed, same numbers
    chunked = pa.lipschitz_study(
        hvae, u, v, taus=[0.6, 0.99], sigmas=[0, 25], n_jacobian=2, power_iters=3, seed=1, batch_size=1
    )
    for key, value in study["ratios"].items():  # the patches of a batch are independent: chunks change nothing
        torch.testing.assert_close(chunked["ratios"][key], value)
        torch.testing.assert_close(chunked["jacobian"][key], study["jacobian"][key])
    claims = pa.lipschitz_claims(study)
    assert {"noisy_all_below_1", "lower_tau_contracts_more", "clean_near_1", "noisy_jacobian_max"} <= set(claims)


def _study(ratios: dict, jac: dict, taus, sigmas) -> dict:
    return {
        "ratios": {k: torch.tensor(v) for k, v in ratios.items()},
        "jacobian": {k: torch.tensor(v) for k, v in jac.items()},
        "taus": taus,
        "sigmas": sigmas,
        "n_jacobian": 2,
    }


def test_lipschitz_claims_are_computed_from_the_ratios():
    taus, sigmas = [0.6, 0.99], [0.0, 25.0]
    ratios = {(0.6, 0.0): [0.9, 1.0, 0.95], (0.99, 0.0): [0.97, 1.02, 0.99],
              (0.6, 25.0): [0.5, 0.6, 0.4], (0.99, 25.0): [0.7, 0.8, 0.6]}  # fmt: skip
    jac = {k: [0.9, 0.95] for k in ratios}
    c = pa.lipschitz_claims(_study(ratios, jac, taus, sigmas))
    assert c["noisy_all_below_1"] and c["lower_tau_contracts_more"] and c["clean_near_1"]
    assert c["clean_any_above_1"] and c["clean_frac_at_or_above_1"] == pytest.approx(2 / 6)
    assert not c["clean_above_1_rare"]
    assert c["jacobian_above_ratio_fraction"] == 1.0 and c["noisy_jacobian_below_1"]
    ratios[(0.99, 25.0)] = [0.45, 1.1, 0.3]  # a noisy ratio above 1, and tau no longer orders the medians
    c = pa.lipschitz_claims(_study(ratios, jac, taus, sigmas))
    assert not c["noisy_all_below_1"] and c["noisy_ratio_max"] == pytest.approx(1.1)
    assert not c["lower_tau_contracts_more"]
    assert "does not hold" in pa.describe_lipschitz(c)


# ---- Fig. 2: convergence ------------------------------------------------------------------------------
def test_iterations_to_tol_is_where_j1_settles_for_good():
    # J1_3 = 40 is already within 1e-3 of every later value: settled at iteration 3
    assert pa.iterations_to_tol(torch.tensor([100.0, 50.0, 40.0, 39.99, 39.99, 39.99]), 1e-3) == 3
    assert pa.iterations_to_tol(torch.tensor([100.0, 100.0, 50.0, 50.0]), 1e-3) == 3  # a pause is not settling
    assert pa.iterations_to_tol(torch.tensor([100.0, 90.0, 80.0]), 1e-3) is None  # still moving at the end
    assert pa.iterations_to_tol(torch.tensor([5.0, 5.0, 5.0, math.nan]), 1e-3) == 1  # padding after a stop


def test_resolved_lipschitz_leaves_out_steps_at_rounding_level():
    d = 3 * 8 * 8
    res = torch.tensor([[1.0], [0.5], [0.25], [1e-9], [1e-9]])
    lk = torch.tensor([[0.5], [0.5], [4e-9], [1.0], [0.9]])
    run = Restoration(x=torch.zeros(1, 3, 8, 8), z=torch.zeros(1, 1), x_decoded=torch.zeros(1, 3, 8, 8),
                      converged=torch.ones(1, dtype=torch.bool), iterations=torch.tensor([5]),
                      history={"residual": res, "lipschitz": lk})  # fmt: skip
    out = pa.resolved_lipschitz(run)
    assert out[:2].tolist() == [0.5, 0.5] and bool(torch.isnan(out[2:]).all())
    assert 1e-9 < pa.RESOLVED_STEP * math.sqrt(d)


def test_convergence_rows_have_exactly_the_keys_and_name_each_method(hvae):
    x = _images(1, seed=11)
    (pb,), _, _ = pa.deblurring_problems([x], KERNEL, 7.65, seed=0)
    runs = pa.convergence_runs(pb.y, pb.op, hvae, sigma=7.65, tau=0.8, n_iters=4, lrs=(0.01, 0.001))
    assert list(runs) == ["pnp_hvae", "adam_lr0.01", "adam_lr0.001"]
    assert all(int(r.iterations[0]) == 4 for r in runs.values()), "every run goes the full n_iters"
    rows = pa.convergence_rows(runs, x)
    assert all(tuple(r) == pa.CONVERGENCE_KEYS for r in rows)
    assert [(r["method"], r["lr"]) for r in rows] == [("pnp_hvae", None), ("adam", 0.01), ("adam", 0.001)]
    for r in rows:
        assert math.isfinite(r["j1_final"]) and math.isfinite(r["psnr_final"])
    claims = pa.convergence_claims(rows, runs)
    assert set(claims["lk_std_late"]) == set(claims["lk_oscillation_late"]) == set(runs)
    assert isinstance(pa.describe_convergence(claims, rows), str)
    table = pa.convergence_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[2].startswith("| pnp_hvae | - |")


def test_convergence_claims_follow_the_rows():
    def run(lks):
        lk = torch.tensor(lks, dtype=torch.float64).view(-1, 1)
        return Restoration(x=torch.zeros(1, 3, 8, 8), z=torch.zeros(1, 1), x_decoded=torch.zeros(1, 3, 8, 8),
                           converged=torch.ones(1, dtype=torch.bool), iterations=torch.tensor([len(lks)]),
                           history={"lipschitz": lk, "residual": torch.ones_like(lk)})  # fmt: skip

    runs = {"pnp_hvae": run([0.5, 0.6, 0.6, 0.6]), "adam_lr0.01": run([0.5, 1.5, 0.3, 1.4])}
    runs["adam_lr0.001"] = run([0.5, 0.7, 0.5, 0.7])
    runs["adam_lr0.001"].info["lr"] = 0.001
    runs["adam_lr0.01"].info["lr"] = 0.01
    for name in ("adam_lr0.01", "adam_lr0.001"):
        runs[name].info["method"] = "adam_j1"
    rows = [
        {"method": "pnp_hvae", "lr": None, "iterations_to_tol": 5, "j1_final": 10.0, "psnr_final": 25.0,
         "lk_max_late": 0.6},
        {"method": "adam", "lr": 0.01, "iterations_to_tol": None, "j1_final": 8.0, "psnr_final": 24.0,
         "lk_max_late": 1.4},
        {"method": "adam", "lr": 0.001, "iterations_to_tol": 40, "j1_final": 9.0, "psnr_final": 23.0,
         "lk_max_late": 0.7},
    ]  # fmt: skip
    c = pa.convergence_claims(rows, runs, late_fraction=1.0)
    assert c["pnp_fewer_iterations"] and c["adam_lower_j1"] and c["adam_worse_image"]
    assert c["pnp_stable"] and c["adam_lk_oscillates"] and c["adam_oscillation_grows_with_lr"]
    assert c["lk_oscillation_late"]["adam_lr0.01"] == pytest.approx((1.0 + 1.2 + 1.1 - 0.9) / 3)
    assert c["lk_oscillation_late"]["pnp_hvae"] == pytest.approx(0.0)  # monotone: no oscillation
    assert c["psnr_gain_over_best_adam"] == pytest.approx(1.0)
    rows[0]["iterations_to_tol"] = None  # PnP-HVAE not settled: it no longer needs fewer iterations
    runs["adam_lr0.01"] = run([0.5, 0.6, 0.5, 0.6])  # now less variable than lr 0.001
    runs["adam_lr0.01"].info.update(lr=0.01, method="adam_j1")
    c = pa.convergence_claims(rows, runs, late_fraction=1.0)
    assert not c["pnp_fewer_iterations"] and not c["adam_oscillation_grows_with_lr"]


# ---- Fig. 7: temperature ------------------------------------------------------------------------------
def test_temperature_sweep_returns_one_row_per_tau_with_the_keys(hvae):
    images = [_images(1, 12, 12, seed=i) for i in range(2)] + [_images(1, 12, 16, seed=5)]  # SSIM needs >= 11x11
    problems, batches, index = pa.deblurring_problems(images, KERNEL, 7.65, seed=0)
    assert index == [[0, 1], [2]]
    rows, restored, iterations = pa.temperature_sweep(problems, batches, hvae, taus=[0.5, 0.8, 0.99], max_iters=3)
    assert [r["tau"] for r in rows] == [0.5, 0.8, 0.99]
    assert all(tuple(r) == pa.TEMPERATURE_KEYS for r in rows)
    assert [tuple(t.shape) for t in restored[0.8]] == [(2, 3, 12, 12), (1, 3, 12, 16)]
    assert all(len(n) == 3 and all(1 <= k <= 3 for k in n) for n in iterations.values())
    c = pa.temperature_claims(rows)
    assert c["best_tau"] in (0.5, 0.8, 0.99)
    assert c["intermediate_best"] == (c["best_tau"] == 0.8)


def test_temperature_claims_find_an_intermediate_optimum():
    rows = [{"tau": t, "psnr_mean": p, "ssim_mean": s} for t, p, s in [(0.5, 20, 0.6), (0.7, 22, 0.7), (0.9, 21, 0.8)]]
    c = pa.temperature_claims(rows)
    assert c["best_tau"] == 0.7 and c["intermediate_best"] and c["best_tau_ssim"] == 0.9
    assert c["psnr_range"] == pytest.approx(2.0)


# ---- the deblurring problems and Proposition 2 ------------------------------------------------------
def test_each_image_gets_the_same_observation_whichever_images_come_with_it():
    images = [_images(1, seed=i) for i in range(3)]
    (alone,), _, _ = pa.deblurring_problems(images[:1], KERNEL, 7.65, seed=4)
    (together,), (batch,), _ = pa.deblurring_problems(images, KERNEL, 7.65, seed=4)
    torch.testing.assert_close(together.y[:1], alone.y)
    assert batch.shape == (3, 3, 8, 8) and together.y.shape == (3, 3, 8, 8)
    clean = together.op.A(batch)
    assert 0.02 < float((together.y - clean).std()) < 0.04  # sigma 7.65 / 255 = 0.03


def test_blur_eigenvalues_are_those_of_the_dense_normal_matrix():
    h, w = 5, 6
    op = BlurFFT(KERNEL.double(), (1, h, w))
    basis = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w)
    A = op.A(basis).flatten(1).T  # columns: A e_i
    dense = torch.linalg.eigvalsh(A.T @ A)
    torch.testing.assert_close(pa.blur_eigenvalues(KERNEL, h, w).sort().values, dense, atol=1e-10, rtol=0)


def test_proposition2_factor():
    assert pa.proposition2_factor(0.0, 7.65, 0.05) == 1.0  # a singular A^T A: no contraction from the data term
    s2 = (7.65 / 255) ** 2
    assert pa.proposition2_factor(1.0, 7.65, 0.05) == pytest.approx(s2 / (0.05**2 + s2))
