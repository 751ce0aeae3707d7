"""The z-landscape of J1 (JPMAP §2.2, §3.3, Figures 3-4): slice energies, exact vs encoder optimum, multistart."""

from __future__ import annotations

import math

import pytest
import torch

from jpmap_core.experiments.landscape import (
    exact_vs_encoder_optimum,
    global_optimum,
    iterations_to_converge,
    multistart_descent,
    multistart_summary,
    posterior_slice,
    random_plane,
    slice_summary,
    slice_through_optimum,
)
from jpmap_core.models import MLPVAE


@pytest.fixture(scope="module")
def tiny():
    """A small random MLP VAE (8x8 images, l=4) with gamma = 0.3 so that beta = 1/gamma^2 is not 1."""
    torch.manual_seed(0)
    vae = MLPVAE(image_shape=(1, 8, 8), latent_dim=4, hidden=(32,), gamma_init=0.3)
    return vae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _slice(vae, x, seed=0, n=7, span=2.0):
    return posterior_slice(vae, x, n_grid=n, span=span, generator=torch.Generator().manual_seed(seed))


def test_slice_K_is_minus_the_encoder_log_density(tiny, images):
    """K(z) = -log q_phi(z|x) with Sigma_phi = exp(logvar) (a log-VARIANCE: std = exp(logvar / 2))."""
    r = _slice(tiny, images)
    mu, logvar = tiny.encode(images)
    q = torch.distributions.Normal(mu[:, None, None, :], torch.exp(0.5 * logvar)[:, None, None, :])
    torch.testing.assert_close(r["K"], -q.log_prob(r["z"]).sum(-1))


def test_slice_H_is_gaussian_decoder_nll_plus_prior(tiny, images):
    """H(z) = ||x - mu_theta(z)||^2 / (2 gamma^2) + d log gamma + d/2 log 2pi + ||z||^2 / 2 (eq. 2.6 + prior)."""
    r = _slice(tiny, images)
    b, n = 1, r["s"].numel()
    z = r["z"][b].reshape(-1, tiny.latent_dim)
    gamma = float(tiny.gamma)
    sq = (images[b : b + 1] - tiny.decode(z)).flatten(1).pow(2).sum(1)
    d = 64
    hand = sq / (2 * gamma**2) + d * math.log(gamma) + 0.5 * d * math.log(2 * math.pi) + 0.5 * z.pow(2).sum(1)
    torch.testing.assert_close(r["H"][b], hand.view(n, n), rtol=1e-5, atol=1e-4)


def test_slice_grid_is_centred_on_mu_phi_and_spans_span_encoder_stds(tiny, images):
    r = _slice(tiny, images, n=9, span=2.0)
    mu, logvar = tiny.encode(images)
    c = 4  # centre of a 9-point grid
    torch.testing.assert_close(r["z"][:, c, c], mu)
    dirs = r["directions"]
    torch.testing.assert_close(dirs @ dirs.transpose(1, 2), torch.eye(2).expand(3, 2, 2), atol=1e-6, rtol=0)
    # back to standard-deviation units: coordinates along (u1, u2) are (s[j], s[i]); corners at +-2
    w = (r["z"] - mu[:, None, None, :]) * torch.exp(-0.5 * logvar)[:, None, None, :]
    coords = torch.einsum("bijl,bkl->bijk", w, dirs)
    s = r["s"]
    torch.testing.assert_close(coords[..., 0], s[None, None, :].expand(3, 9, 9), atol=1e-5, rtol=0)
    torch.testing.assert_close(coords[..., 1], s[None, :, None].expand(3, 9, 9), atol=1e-5, rtol=0)
    assert float(s[0]) == -2.0 and float(s[-1]) == 2.0
    # so K is exactly circular in these units, minimal at the centre
    circ = 0.5 * (s[None, :] ** 2 + s[:, None] ** 2)
    torch.testing.assert_close(r["K"] - r["K"][:, c : c + 1, c : c + 1], circ.expand(3, 9, 9), atol=1e-4, rtol=0)


def test_slice_reproducible_with_the_same_generator(tiny, images):
    a, b, c = _slice(tiny, images, seed=3), _slice(tiny, images, seed=3), _slice(tiny, images, seed=4)
    torch.testing.assert_close(a["H"], b["H"], rtol=0, atol=0)
    assert not torch.allclose(a["directions"], c["directions"])


def _fake_slice(h_fn, n=21, span=2.0):
    """A posterior_slice-like result whose H is h_fn(s_col, t_row) and K the exact circle (s^2 + t^2)/2."""
    s = torch.linspace(-span, span, n, dtype=torch.float64)
    t_row, s_col = torch.meshgrid(s, s, indexing="ij")  # [i, j] = (row = second direction, column = first)
    return {"s": s, "H": h_fn(s_col, t_row)[None], "K": (0.5 * (s_col**2 + t_row**2))[None]}


def test_slice_summary_convex_fraction_tells_bowls_from_saddles():
    bowl = slice_summary(_fake_slice(lambda s, t: 3 * s**2 + t**2 + 0.5 * s * t))
    saddle = slice_summary(_fake_slice(lambda s, t: s**2 - t**2))
    ridge = slice_summary(_fake_slice(lambda s, t: s**2 + t**2 - 0.5 * t**4))  # concave where |t| > 1/sqrt(3)
    assert float(bowl["convex_fraction"]) == 1.0 and float(saddle["convex_fraction"]) == 0.0
    assert 0.2 < float(ridge["convex_fraction"]) < 0.8


def test_slice_summary_tv_is_zero_when_H_is_K_up_to_a_constant():
    same = slice_summary(_fake_slice(lambda s, t: 0.5 * (s**2 + t**2) + 123.0))
    shifted = slice_summary(_fake_slice(lambda s, t: 0.5 * ((s - 1) ** 2 + t**2) + 123.0))
    far = slice_summary(_fake_slice(lambda s, t: 50 * ((s - 2) ** 2 + (t - 2) ** 2)))
    assert float(same["tv_distance"]) == pytest.approx(0.0, abs=1e-12)
    assert 0.2 < float(shifted["tv_distance"]) < float(far["tv_distance"]) <= 1.0


def test_slice_summary_finds_the_grid_minimum_of_H():
    r = slice_summary(_fake_slice(lambda s, t: (s - 1.0) ** 2 + (t + 0.6) ** 2))
    torch.testing.assert_close(r["H_argmin"], torch.tensor([[1.0, -0.6]], dtype=torch.float64))
    assert float(r["H_argmin_offset"]) == pytest.approx(math.hypot(1.0, 0.6))


def test_slice_summary_projects_a_grid_point_back_to_its_coordinates(tiny, images):
    r = _slice(tiny, images, n=9)
    i, j = 2, 7
    coords = slice_summary(r, r["z"][:, i, j])["z_coords"]
    s = r["s"].double()
    torch.testing.assert_close(coords, torch.tensor([[s[j], s[i]]] * 3, dtype=torch.float64), atol=1e-5, rtol=0)


def test_random_plane_rejects_one_dimensional_latents():
    with pytest.raises(ValueError, match="latent_dim >= 2"):
        random_plane(1, 1)


def test_slice_rejects_images_of_the_wrong_shape(tiny):
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        posterior_slice(tiny, torch.rand(2, 1, 28, 28), n_grid=3)


def test_exact_optimum_is_a_stationary_point_below_the_encoder_energy(tiny, images):
    r = exact_vs_encoder_optimum(tiny, images, tol=1e-5, max_iters=4000)
    assert bool((r["J_exact"] <= r["J_enc"] + 1e-6).all())
    torch.testing.assert_close(r["z_enc"], tiny.encode(images)[0])
    z = r["z_exact"].clone().requires_grad_(True)
    with torch.enable_grad():
        beta = tiny.beta
        e = 0.5 * beta * (images - tiny.decode(z)).flatten(1).pow(2).sum(1) + 0.5 * z.pow(2).sum(1)
        (g,) = torch.autograd.grad(e.sum(), z)
    assert float(g.norm(dim=1).max()) < 1e-2
    torch.testing.assert_close(r["latent_gap"], (r["z_exact"] - r["z_enc"]).norm(dim=1))
    rmse = 255 * (tiny.decode(r["z_exact"]) - tiny.decode(r["z_enc"])).flatten(1).pow(2).mean(1).sqrt()
    torch.testing.assert_close(r["image_gap_rmse"], rmse)
    torch.testing.assert_close(r["diff"], r["x_exact"] - r["x_enc"])


def test_exact_optimum_gap_in_laplace_units_uses_the_hessian_of_J1(tiny, images):
    r = exact_vs_encoder_optimum(tiny, images, max_iters=2000)
    for b in range(3):

        def j1(z, b=b):
            return 0.5 * tiny.beta * (images[b] - tiny.decode(z[None])[0]).pow(2).sum() + 0.5 * z.pow(2).sum()

        hess = torch.autograd.functional.hessian(j1, r["z_exact"][b])
        torch.testing.assert_close(r["hessian"][b], hess, rtol=1e-4, atol=1e-4)
        d = r["z_exact"][b] - r["z_enc"][b]
        torch.testing.assert_close(r["latent_gap_laplace"][b], (d @ hess @ d).sqrt(), rtol=1e-4, atol=1e-6)
        ratio = torch.exp((r["logvar"][b].sum() + torch.logdet(hess)) / (2 * 4))
        torch.testing.assert_close(r["encoder_std_ratio"][b], ratio, rtol=1e-4, atol=0)


def test_exact_optimum_batched_equals_per_image(tiny, images):
    # tol too small to stop within 300 steps: a borderline stop could differ by one step between batch sizes
    both = exact_vs_encoder_optimum(tiny, images, tol=1e-9, max_iters=300)
    one = exact_vs_encoder_optimum(tiny, images[1:2], tol=1e-9, max_iters=300)
    torch.testing.assert_close(both["z_exact"][1:2], one["z_exact"], rtol=1e-5, atol=1e-6)


def _multi(vae, x, seed=0, **kw):
    kw = {"n_starts": 6, "steps": 120, "record_every": 10, **kw}
    return multistart_descent(vae, x, generator=torch.Generator().manual_seed(seed), **kw)


def test_multistart_shapes_and_encoder_row_first(tiny, images):
    r = _multi(tiny, images[:2], steps=125)
    d, s1, ldim = 2, 7, 4
    assert r["energy"].shape == (126, d, s1)
    assert r["iters"].tolist() == list(range(0, 121, 10)) + [125]
    assert r["z"].shape == (14, d, s1, ldim) and r["distance"].shape == (14, d, s1)
    assert r["z_star"].shape == (d, ldim) and r["reached"].shape == (d, s1)
    torch.testing.assert_close(r["z"][0, :, 0], tiny.encode(images[:2])[0])  # row 0 = mu_phi(x0)
    torch.testing.assert_close(r["z"][0], r["z0"])
    expected_random = torch.randn(d, 6, ldim, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(r["z0"][:, 1:], expected_random)


def test_multistart_energy_decreases_and_matches_J1(tiny, images):
    r = _multi(tiny, images[:2])
    e = r["energy"]
    assert bool((e[-1] <= e[0]).all())
    z = r["z_final"].reshape(-1, 4)
    x = images[:2].repeat_interleave(7, dim=0)
    j1 = 0.5 * tiny.beta * (x - tiny.decode(z)).flatten(1).pow(2).sum(1) + 0.5 * z.pow(2).sum(1)
    torch.testing.assert_close(e[-1].reshape(-1), j1, rtol=1e-5, atol=1e-5)


def test_each_row_follows_its_own_adam_trajectory(tiny, images):
    """Summing independent per-row energies under one torch Adam = running Adam on each row alone."""
    r = _multi(tiny, images[:2], steps=60, record_every=60)
    row_img, row = 1, 3
    z = torch.nn.Parameter(r["z0"][row_img, row].clone()[None])
    opt = torch.optim.Adam([z], lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        with torch.enable_grad():
            e = 0.5 * tiny.beta * (images[1:2] - tiny.decode(z)).pow(2).sum() + 0.5 * z.pow(2).sum()
            e.backward()
        opt.step()
    torch.testing.assert_close(r["z_final"][row_img, row], z.detach()[0], rtol=1e-5, atol=1e-6)


def test_multistart_reached_means_ending_within_energy_tol_of_the_lowest_energy(tiny, images):
    r = _multi(tiny, images[:2], energy_tol=0.5)
    ef = r["energy_final"]
    torch.testing.assert_close(r["j_star"], ef.min(dim=1).values)
    assert torch.equal(r["reached"], ef < ef.min(dim=1, keepdim=True).values + 0.5)
    opt = global_optimum(r["z_final"], ef, 0.5)
    torch.testing.assert_close(r["z_star"], opt["z_star"])
    torch.testing.assert_close(r["distance"][-1], (r["z_final"] - opt["z_star"][:, None, :]).norm(dim=-1))
    torch.testing.assert_close(r["z_star_median"], torch.quantile(r["z_final"][:, 1:], 0.5, dim=1))
    z_med = r["z_star_median"]
    j_med = 0.5 * tiny.beta * (images[:2] - tiny.decode(z_med)).flatten(1).pow(2).sum(1) + 0.5 * z_med.pow(2).sum(1)
    torch.testing.assert_close(r["energy_at_median"], j_med)
    assert torch.equal(r["median_agrees"], j_med - r["j_star"] < 0.5)
    # iterations to converge: from there on the energy stays within energy_tol of J*
    e = r["energy"] - r["j_star"][None, :, None]
    for i, j in ((0, 0), (1, 3)):
        k = r["iters_to_converge"][i, j]
        if math.isfinite(float(k)):
            assert bool((e[int(k) :, i, j] < 0.5).all()) and (k == 0 or float(e[int(k) - 1, i, j]) >= 0.5)


def test_global_optimum_is_the_lowest_energy_basin_even_when_a_minority_reaches_it():
    """Paper §3.3 takes the median of all final iterates; that is no minimiser when most starts are stuck."""
    low, high = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 2.0])
    # encoder + 2 random starts end in the low basin (tiny spread), 3 random starts are stuck in the high one
    z_final = torch.stack([low, low + 1e-3, low - 1e-3, high, high + 2e-3, high])[None]
    energy = torch.tensor([[1.0, 1.0, 1.2, 5.0, 5.0, 5.0]])
    opt = global_optimum(z_final, energy, 1.0)
    assert opt["reached"].tolist() == [[True, True, True, False, False, False]]
    torch.testing.assert_close(opt["z_star"][0], low)
    torch.testing.assert_close(opt["j_star"], torch.tensor([1.0]))
    assert float((opt["z_star_median"][0] - high).norm()) < 0.05  # the paper's median follows the stuck majority
    # only the encoder found the low basin: z* is its end point
    alone = global_optimum(torch.stack([low, high, high, high])[None], torch.tensor([[1.0, 5.0, 5.0, 5.0]]), 1.0)
    torch.testing.assert_close(alone["z_star"][0], low)
    assert alone["reached"].tolist() == [[True, False, False, False]]


def test_multistart_reproducible_with_the_same_generator(tiny, images):
    a, b = _multi(tiny, images[:1], seed=5), _multi(tiny, images[:1], seed=5)
    torch.testing.assert_close(a["energy"], b["energy"], rtol=0, atol=0)
    c = _multi(tiny, images[:1], seed=6)
    assert not torch.equal(a["z0"], c["z0"])


def test_stopped_rows_keep_their_iterate_and_energy(tiny, images):
    r = _multi(tiny, images[:2], steps=400, record_every=1, stop_tol=1e-2)
    taken = r["steps_taken"]
    assert bool((taken < 400).any()), "no row met the stopping rule; the test exercises nothing"
    for i, j in (taken < 400).nonzero().tolist():
        k = int(taken[i, j])
        assert torch.equal(r["z"][k:, i, j], r["z"][k, i, j].expand_as(r["z"][k:, i, j]))
        assert torch.equal(r["energy"][k:, i, j], r["energy"][k, i, j].expand(401 - k))


def test_iterations_to_converge_is_first_iteration_staying_below_tol():
    dist = torch.tensor([[3.0, 1.0], [0.01, 1.0], [0.2, 1.0], [0.01, 0.5], [0.0, 0.5]])
    it = iterations_to_converge(dist, torch.tensor([0, 10, 20, 30, 40]), 0.05)
    assert it.tolist() == [30.0, math.inf]


def test_summary_counts_and_medians():
    reached = torch.tensor([[True, True, True, False], [True, True, False, False]])
    itc = torch.tensor([[5.0, 50.0, 70.0, math.inf], [10.0, 40.0, math.inf, math.inf]], dtype=torch.float64)
    energy = torch.tensor([[[1.0, 9.0, 0.5, 9.0], [2.0, 1.0, 9.0, 1.5]], [[0.1, 0.2, 0.3, 0.4], [0.1, 0.1, 0.7, 0.9]]])
    res = {
        "reached": reached,
        "iters_to_converge": itc,
        "energy": energy,
        "energy_final": energy[-1],
        "energy_tol": torch.tensor(1.0),
    }
    s = multistart_summary(res)
    assert s["n_random_starts"] == 3 and s["n_reached_per_digit"] == [2, 1]
    assert s["frac_random_reaching_optimum"] == pytest.approx(3 / 6)
    assert s["encoder_iters_to_converge"] == pytest.approx(7.5)
    # pooled random iterations {50, 70, inf, 40, inf, inf}: median of the sorted middle pair (70, inf) is inf
    assert s["median_random_iters_to_converge"] == math.inf
    assert s["median_random_iters_per_digit"] == [70.0, math.inf]
    # stuck gaps: image 0 start 3: 0.4 - 0.1; image 1 starts 2, 3: 0.7 - 0.1, 0.9 - 0.1
    assert s["stuck_energy_gap_median"] == pytest.approx(0.6)
    assert s["encoder_start_energy_rank"] == [pytest.approx(1 / 3), pytest.approx(2 / 3)]
    assert s["encoder_start_energy_rank_max"] == pytest.approx(2 / 3)
    assert s["n_reached_total"] == 3 and s["encoder_reaches_count"] == 2
    # stuck random starts: (image 0, start 3) 9 > 1, (image 1, start 2) 9 > 2, (image 1, start 3) 1.5 < 2
    assert s["stuck_start_above_encoder_frac"] == pytest.approx(2 / 3)


def test_summary_has_no_stuck_fraction_when_every_start_reaches():
    res = {
        "reached": torch.ones(1, 3, dtype=torch.bool),
        "iters_to_converge": torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64),
        "energy": torch.tensor([[[1.0, 2.0, 3.0]], [[0.1, 0.1, 0.1]]]),
        "energy_final": torch.tensor([[0.1, 0.1, 0.1]]),
        "energy_tol": torch.tensor(1.0),
    }
    s = multistart_summary(res)
    assert math.isnan(s["stuck_start_above_encoder_frac"]) and math.isnan(s["stuck_energy_gap_median"])
    assert s["frac_random_reaching_optimum"] == 1.0 and s["speedup_encoder_vs_random"] == pytest.approx(2.5)


def test_slice_through_optimum_holds_both_centres_and_finds_the_exact_optimum_as_the_minimum_of_H(tiny, images):
    """On the plane through mu_phi(x) and z*, mu_phi(x) sits at (0, 0) (where K is lowest) and z* at (d, 0) with d
    its distance in encoder stds; z* minimises H in all of z-space, so H's grid minimum is the grid point next to
    it."""
    opt = exact_vs_encoder_optimum(tiny, images, tol=1e-6, max_iters=20000)
    n = 81
    r = slice_through_optimum(tiny, images, opt["z_exact"], n_grid=n, margin=1.0,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    d = r["distance"]
    torch.testing.assert_close(d, opt["latent_gap_std"].to(d), rtol=1e-4, atol=1e-5)
    u = r["directions"]
    torch.testing.assert_close(torch.einsum("bkl,bml->bkm", u, u), torch.eye(2).expand(3, 2, 2), atol=1e-5, rtol=0)
    step1 = r["s1"][:, 1] - r["s1"][:, 0]
    step2 = r["s2"][:, 1] - r["s2"][:, 0]
    torch.testing.assert_close(step1, step2)  # a square window: K's contours stay circles
    assert bool((r["s1"][:, 0] <= 0).all() and (r["s1"][:, -1] >= d).all()), "both centres inside the window"
    k_arg = r["K"].flatten(1).argmin(1)
    assert bool((r["s1"].gather(1, (k_arg % n)[:, None]).squeeze(1).abs() <= step1).all())
    assert bool(((r["H_argmin"][:, 0] - d).abs() <= step1).all() and (r["H_argmin"][:, 1].abs() <= step2).all())
    with pytest.raises(ValueError, match="z_star must have shape"):
        slice_through_optimum(tiny, images, opt["z_exact"][:2])
