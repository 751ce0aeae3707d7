"""CSGM, JPMAP (Alg. 2.1-2.4) and map-z splitting (Alg. 1.1): properties from the paper, batching, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from jpmap_core.energy import J1, coupling
from jpmap_core.metrics import psnr
from jpmap_core.operators import BatchBlocks, CompressedSensing, Denoising, Inpainting
from jpmap_core.pretrained import load_pretrained
from jpmap_core.solvers import csgm, jpmap, mapz_splitting

FAST = {"adam_max_iters": 150}  # bounded inner Adam for the property tests (the properties hold for any cap)


@pytest.fixture(scope="module")
def vae():
    return load_pretrained("mnist_mlp_dvae15")


@pytest.fixture(scope="module")
def digits(mnist_test):
    return mnist_test.images[:20]


def _inpainting(x, missing=0.8, sigma=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    op = Inpainting(image_shape=(1, 28, 28), missing=missing, batch_size=x.shape[0], generator=g)
    return op, op.degrade(x, sigma, generator=g)


def test_alg23_energy_never_increases_for_any_image(vae, digits):
    """Proposition 2.1(1): J1(x_n, z_n) is non-increasing along Alg. 2.3, image by image."""
    op, y = _inpainting(digits[:6])
    r = jpmap(y, op, vae, sigma=10, n1=3, n2=6, n_max=12, **FAST)
    J = r.history["objective"]
    istar = r.history["istar"]
    assert set(istar[istar > 0].unique().tolist()) >= {1, 3}  # the run exercised several candidates
    for b in range(J.shape[1]):
        traj = J[:, b][~torch.isnan(J[:, b])]
        inc = traj[1:] - traj[:-1]
        assert float(inc.max()) <= 1e-4 * float(traj.abs().max()), f"J1 increased for image {b}: {inc.max()}"


def test_alg23_returned_energy_is_J1_of_the_returned_pair(vae, digits):
    op, y = _inpainting(digits[:3])
    r = jpmap(y, op, vae, sigma=10, n1=3, n2=6, n_max=10, **FAST)
    last = torch.stack([col[~torch.isnan(col)][-1] for col in r.history["objective"].T])
    torch.testing.assert_close(last, J1(r.x, r.z, y, op, vae, 10), rtol=1e-4, atol=1e-3)


def test_alg24_stops_with_the_constraint_satisfied(vae, digits):
    op, y = _inpainting(digits[:4])
    alpha = 10.0
    r = jpmap(y, op, vae, sigma=10, alpha=alpha, rho=1000 / 784, n1=5, n2=10, n_max=30, **FAST)
    eps = (alpha / 255) ** 2 * 784
    assert bool(r.converged.all()), f"not converged after {r.per_image['outer_iterations']} outer iterations"
    assert bool((coupling(r.x, vae.decode(r.z)) <= eps + 1e-6).all())
    betas = r.history["beta"]
    assert float(torch.nanquantile(betas[-1:], 0.5)) > 0.1 * vae.beta  # beta was increased from beta0


def test_alg24_snapshots_are_the_outer_iterates(vae, digits):
    """Snapshot k is (x_k, G(z_k), beta_k) of outer iteration k of Alg. 2.4 (Fig. 5): k = 0 is Alg. 2.3 run with
    beta0 (line 2), the last one is the result, and their beta and coupling are those the history records.

    float64: images that finish outer iteration 0 early share Adam steps with images still in it, and in float32
    the BLAS rounding of a different batch composition would hide the comparison with the plain Alg. 2.3 run.
    """
    vae = copy.deepcopy(vae).double()
    op, y = _inpainting(digits[:3].double())
    kw = dict(sigma=10, n1=1, n2=2, n_max=4, **FAST)
    r = jpmap(y, op, vae, alpha=10, rho=1000 / 784, snapshots=range(10_000), **kw)
    snaps, outer_iters = r.info["snapshots"], r.per_image["outer_iterations"]
    last = int(outer_iters.max())
    assert last >= 2 and len(set(outer_iters.tolist())) > 1, "the test needs images that stop at different k"
    assert sorted(snaps) == list(range(last + 1))  # k never reached are left out
    r0 = jpmap(y, op, vae, beta=0.1 * vae.beta, **kw)
    torch.testing.assert_close(snaps[0]["x"], r0.x)
    torch.testing.assert_close(snaps[0]["x_decoded"], r0.x_decoded)
    torch.testing.assert_close(snaps[last]["x"], r.x)
    torch.testing.assert_close(snaps[last]["z"], r.z)
    outer, beta_h, coupling_h = r.history["outer"], r.history["beta"], r.history["coupling"]
    for k, s in snaps.items():
        torch.testing.assert_close(s["coupling"], coupling(s["x"], vae.decode(s["z"])), rtol=1e-4, atol=1e-6)
        for b in range(3):
            rows = (outer[:, b] == k).nonzero().squeeze(1)
            assert bool(s["running"][b]) == (rows.numel() > 0)
            if rows.numel():  # running at k: the beta it used and its coupling after the last alternation
                assert float(s["beta"][b]) == pytest.approx(float(beta_h[rows[0], b]), rel=1e-6)
                assert float(s["coupling"][b]) == pytest.approx(float(coupling_h[rows[-1], b]), rel=1e-5)
            else:  # stopped before k: its final iterate
                torch.testing.assert_close(s["x"][b], r.x[b])
    with pytest.raises(ValueError, match="need Alg. 2.4"):
        jpmap(y, op, vae, snapshots=[0, 1], **kw)


def test_alg22_diagnostic_records_the_winner_of_three_candidates(vae, digits):
    op, y = _inpainting(digits[:3])
    r = jpmap(y, op, vae, sigma=10, algorithm="2.2", n1=0, n2=0, n_max=4, **FAST)
    cand, istar = r.history["J1_candidates"], r.history["istar"]
    assert cand.shape[-1] == 3
    for t in range(cand.shape[0]):
        for b in range(cand.shape[1]):
            if istar[t, b] > 0:
                assert int(istar[t, b]) == int(cand[t, b].argmin()) + 1
                assert torch.isfinite(cand[t, b]).all()


def test_alg21_always_keeps_the_encoder_guess(vae, digits):
    op, y = _inpainting(digits[:3])
    r = jpmap(y, op, vae, sigma=10, algorithm="2.1", n1=0, n2=0, n_max=20)
    istar = r.history["istar"]
    assert bool((istar[istar >= 0] == 1).all())


@pytest.mark.parametrize("variant", ["alg23", "alg24", "csgm"])
def test_batched_equals_per_image(vae, digits, variant):
    """B images at once give the same x, z and histories as each image alone, though they stop at different times.

    Run in float64: in float32 the BLAS kernels round differently for different batch sizes and Adam amplifies
    those 1e-7 differences to ~1e-4 over hundreds of steps, which would hide the property under test (that no
    image's state leaks into another's). In float64 any real coupling shows up far above 1e-5.
    """
    vae64 = copy.deepcopy(vae).double()
    x = digits[:4].double()
    g = torch.Generator().manual_seed(5)
    masks = (torch.rand(4, 1, 28, 28, generator=g) > 0.7).double()
    y = Inpainting(masks).degrade(x, 10, generator=g)

    def solve(yb, mb):
        op = Inpainting(mb)
        if variant == "alg23":
            return jpmap(yb, op, vae64, sigma=10, n1=3, n2=6, n_max=30, **FAST)
        if variant == "alg24":
            return jpmap(yb, op, vae64, sigma=10, alpha=10, rho=1000 / 784, n1=2, n2=4, n_max=6, k_max=4, **FAST)
        return csgm(yb, op, vae64, sigma=10, max_iters=300)

    batch = solve(y, masks)
    iters = batch.iterations.tolist()
    for b in range(4):
        single = solve(y[b : b + 1], masks[b : b + 1])
        torch.testing.assert_close(batch.x[b : b + 1], single.x, atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.z[b : b + 1], single.z, atol=1e-5, rtol=0)
        assert batch.iterations[b] == single.iterations[0]
        assert batch.converged[b] == single.converged[0]
        if variant != "csgm":
            # column b of the batch's history is the image's own history, row for row, then padding
            T = single.history["istar"].shape[0]
            for key in ("istar", "outer", "adam_steps"):
                assert torch.equal(batch.history[key][:T, b], single.history[key][:, 0]), key
                assert bool((batch.history[key][T:, b] == -1).all()), key
            torch.testing.assert_close(
                batch.history["objective"][:T, b], single.history["objective"][:, 0], rtol=1e-7, atol=1e-5
            )
            assert bool(batch.history["objective"][T:, b].isnan().all())
    if variant == "alg23":
        assert len(set(iters)) > 1, "the test should include images that stop at different iterations"


def test_alg24_with_one_alpha_per_image_equals_one_call_per_alpha(vae, digits):
    """Alg. 2.4 with a (B,) alpha: each image meets its own eps = (alpha_b/255)^2 d, as if solved alone with it."""
    vae64 = copy.deepcopy(vae).double()
    x = digits[:2].double().repeat(2, 1, 1, 1)  # the same two digits, once per alpha
    g = torch.Generator().manual_seed(9)
    masks = (torch.rand(2, 1, 28, 28, generator=g) > 0.7).double().repeat(2, 1, 1, 1)
    y = Inpainting(masks).degrade(x, 10, generator=g)
    alphas = torch.tensor([3.0, 3.0, 10.0, 10.0])
    kw = dict(sigma=10, rho=1000 / 784, n1=2, n2=4, n_max=6, k_max=6, **FAST)
    both = jpmap(y, Inpainting(masks), vae64, alpha=alphas, **kw)
    assert torch.equal(both.info["alpha"], alphas.double())
    for rows, a in ((slice(0, 2), 3.0), (slice(2, 4), 10.0)):
        one = jpmap(y[rows], Inpainting(masks[rows]), vae64, alpha=a, **kw)
        torch.testing.assert_close(both.x[rows], one.x, rtol=0, atol=1e-10)
        assert torch.equal(both.per_image["outer_iterations"][rows], one.per_image["outer_iterations"])
        assert torch.equal(both.converged[rows], one.converged)
        assert one.info["eps"] == pytest.approx((a / 255) ** 2 * 784)
    assert not torch.allclose(both.x[:2], both.x[2:])  # the two alphas do give different restorations


@pytest.mark.parametrize("method", ["csgm", "alg23", "alg24", "splitting"])
def test_one_sigma_per_image_equals_one_call_per_sigma(vae, digits, method):
    """A (B,) sigma: images degraded at different noise levels share one batch, each restored as if alone with its
    own sigma (float64; x-step, J1, CSGM's lambda = sigma^2 and the row-subset path all take the image's value)."""
    vae64 = copy.deepcopy(vae).double()
    x = digits[:2].double().repeat(2, 1, 1, 1)
    g = torch.Generator().manual_seed(5)
    sig = torch.tensor([25.0, 25.0, 110.0, 110.0], dtype=torch.float64)
    y = x + sig.reshape(-1, 1, 1, 1) / 255 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    masks = (torch.rand(4, 1, 28, 28, generator=g) > 0.3).double()  # per-image data: the row-subset x-step runs
    y = y * masks

    def run(rows, sigma):
        op = Inpainting(masks[rows])
        if method == "csgm":
            return csgm(y[rows], op, vae64, sigma=sigma, max_iters=200)
        if method == "splitting":
            return mapz_splitting(y[rows], op, vae64, betas=[0.1 * vae.beta, vae.beta], sigma=sigma, maxiter=5, **FAST)
        kw = dict(n1=2, n2=4, n_max=6, **FAST)
        if method == "alg24":
            kw.update(alpha=5, rho=1000 / 784, k_max=3)
        return jpmap(y[rows], op, vae64, sigma=sigma, **kw)

    both = run(slice(0, 4), sig)
    assert torch.equal(both.info["sigma"], sig)
    for rows, s in ((slice(0, 2), 25.0), (slice(2, 4), 110.0)):
        one = run(rows, s)
        torch.testing.assert_close(both.x[rows], one.x, rtol=0, atol=1e-10)
        torch.testing.assert_close(both.z[rows], one.z, rtol=0, atol=1e-10)
        assert torch.equal(both.iterations[rows], one.iterations)
    assert not torch.allclose(both.x[:2], both.x[2:], atol=1e-3)  # the two noise levels do restore differently


@pytest.mark.parametrize("method", ["csgm", "alg23", "alg24"])
def test_several_problems_in_one_batch_equal_one_call_per_problem(vae, digits, method):
    """BatchBlocks + a (B,) sigma: compressed sensing at two m, inpainting and denoising in one call, each image
    restored as by a call on its own problem (float64): how the benchmark merges its levels and problems."""
    vae64 = copy.deepcopy(vae).double()
    x = digits[:6].double()
    g = torch.Generator().manual_seed(3)
    ops = [
        CompressedSensing(40, (1, 28, 28), generator=g),
        CompressedSensing(140, (1, 28, 28), generator=g),
        Inpainting(image_shape=(1, 28, 28), missing=0.8, batch_size=2, generator=g),
        Denoising(),
    ]
    sizes, sigmas = [1, 1, 2, 2], [10.0, 10.0, 10.0, 110.0]
    blocks = [slice(0, 1), slice(1, 2), slice(2, 4), slice(4, 6)]
    ys = [o.degrade(x[b], s_, generator=g) for o, b, s_ in zip(ops, blocks, sigmas, strict=True)]
    op = BatchBlocks(ops, sizes)
    sigma = torch.tensor([s_ for s_, n in zip(sigmas, sizes, strict=True) for _ in range(n)], dtype=torch.float64)

    def run(y, o, sg):
        if method == "csgm":
            return csgm(y, o, vae64, sigma=sg, max_iters=200)
        kw = dict(n1=2, n2=4, n_max=6, **FAST)
        if method == "alg24":
            kw.update(alpha=5, rho=1000 / 784, k_max=3)
        return jpmap(y, o, vae64, sigma=sg, **kw)

    both = run(op.pack(ys), op, sigma)
    for o, b, y_, s_ in zip(ops, blocks, ys, sigmas, strict=True):
        one = run(y_, o, s_)
        torch.testing.assert_close(both.x[b], one.x, rtol=0, atol=1e-9)
        assert torch.equal(both.iterations[b], one.iterations)


def test_per_image_sigma_is_checked(vae, digits):
    op, y = _inpainting(digits[:2])
    for bad, match in (
        (torch.tensor([10.0, 20.0, 30.0]), "3 values but the batch has B = 2"),
        (torch.tensor([10.0, 0.0]), "finite and > 0"),
        (torch.tensor([10.0, float("nan")]), "finite and > 0"),
        (torch.tensor([[10.0, 20.0]]), r"\(B,\) tensor"),
        (torch.tensor([10, 20]), r"\(B,\) tensor"),
    ):
        with pytest.raises(ValueError, match=match):
            jpmap(y, op, vae, sigma=bad, n1=0, n2=0, n_max=1)
        with pytest.raises(ValueError, match=match):
            csgm(y, op, vae, sigma=bad, max_iters=1)
    with pytest.raises(ValueError, match="lam"):
        csgm(y, op, vae, sigma=10, lam=torch.tensor([1.0, -1.0]), max_iters=1)
    r = csgm(y, op, vae, sigma=torch.tensor([10.0]).expand(2).clone(), max_iters=3)
    assert r.info["lam"].shape == (2,)


@pytest.mark.parametrize("alpha", [None, 10])
def test_operator_without_rows_gives_the_same_result(vae, digits, alpha):
    """Per-image masks: the row-subset x-step (native operator) and the whole-batch fallback (an operator that
    cannot be restricted to rows, like a wrapped deepinv physics) give the same restoration, in float64."""
    vae64 = copy.deepcopy(vae).double()
    x = digits[:3].double()
    g = torch.Generator().manual_seed(7)
    masks = (torch.rand(3, 1, 28, 28, generator=g) > 0.7).double()
    y = Inpainting(masks).degrade(x, 10, generator=g)

    class WholeBatchOnly(Inpainting):
        def rows(self, idx):
            return None

    kw = dict(sigma=10, n1=2, n2=4, n_max=12, **FAST)
    if alpha is not None:
        kw.update(alpha=alpha, rho=1000 / 784, n_max=6, k_max=3)
    a = jpmap(y, Inpainting(masks), vae64, **kw)
    b = jpmap(y, WholeBatchOnly(masks), vae64, **kw)
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=1e-10)
    torch.testing.assert_close(a.z, b.z, rtol=0, atol=1e-10)
    assert torch.equal(a.history["istar"], b.history["istar"])
    torch.testing.assert_close(a.history["objective"], b.history["objective"], rtol=1e-12, atol=1e-8, equal_nan=True)


def test_jpmap_beats_csgm_on_80_percent_missing_pixels(vae, digits):
    """The paper's claim (Figs. 6-7): inpainting 80% missing, sigma = 10, 20 test images."""
    op, y = _inpainting(digits)
    r_j = jpmap(y, op, vae, sigma=10)
    r_c = csgm(y, op, vae, sigma=10)
    p_j, p_c = psnr(r_j.x.clamp(0, 1), digits), psnr(r_c.x, digits)
    assert float(p_j.mean()) > float(p_c.mean()), f"JPMAP {p_j.mean():.2f} dB vs CSGM {p_c.mean():.2f} dB"


@pytest.mark.parametrize("problem", ["denoising110", "cs140"])
def test_other_paper_problems_run_end_to_end(vae, digits, problem):
    x = digits[:2]
    g = torch.Generator().manual_seed(1)
    if problem == "denoising110":
        op, sigma = Denoising(), 110
    else:
        op, sigma = CompressedSensing(140, (1, 28, 28), generator=g), 10
    y = op.degrade(x, sigma, generator=g)
    for r in (jpmap(y, op, vae, sigma=sigma), csgm(y, op, vae, sigma=sigma)):
        assert r.x.shape == x.shape and torch.isfinite(r.x).all()
        assert float(psnr(r.x.clamp(0, 1), x).mean()) > 10


def test_mapz_splitting_closes_the_gap_as_beta_grows(vae, digits):
    op, y = _inpainting(digits[:3])
    r = mapz_splitting(y, op, vae, betas=[0.1 * vae.beta, vae.beta, 10 * vae.beta], sigma=10, maxiter=8, **FAST)
    gap, outer = r.history["coupling"], r.history["outer"]
    first = torch.nanmean(gap[outer[:, 0] == 0][-1])
    last = torch.nanmean(gap[-1])
    assert float(last) < float(first)


def test_mapz_splitting_per_image_schedules_equal_one_call_per_schedule(vae, digits):
    """A (K, B) betas tensor gives each image its own schedule (NaN after its last beta), as Alg. 2.4's per-image
    beta_k paths do: each image is restored as by a call with its own list (float64)."""
    vae64 = copy.deepcopy(vae).double()
    op, y = _inpainting(digits[:2].double())
    y = y.double()
    b = vae.beta
    long, short = [0.1 * b, 0.5 * b, b], [0.2 * b, b]
    sched = torch.tensor([[long[0], short[0]], [long[1], short[1]], [long[2], math.nan]], dtype=torch.float64)
    both = mapz_splitting(y, op, vae64, betas=sched, sigma=10, maxiter=4, **FAST)
    for i, betas in enumerate((long, short)):
        one = mapz_splitting(y[i : i + 1], Inpainting(op.mask[i : i + 1]), vae64, betas=betas, sigma=10, maxiter=4,
                             **FAST)  # fmt: skip
        torch.testing.assert_close(both.x[i : i + 1], one.x, rtol=0, atol=1e-10)
        assert torch.equal(both.iterations[i : i + 1], one.iterations)
        outer = both.history["outer"][:, i]
        assert int(outer[outer >= 0].max()) == len(betas) - 1, "each image runs its own number of betas"
    for bad, match in (
        (sched[:, :1], "shape"),
        (torch.tensor([[math.nan, b], [b, b]]), "first beta"),
        (torch.tensor([[b, b], [math.nan, b], [b, b]]), "only end with NaN"),
        (torch.tensor([[b, b], [0.5 * b, b]]), "non-decreasing"),
    ):
        with pytest.raises(ValueError, match=match):
            mapz_splitting(y, op, vae64, betas=bad, sigma=10, maxiter=1)


def test_csgm_restarts_keep_the_lowest_energy(vae, digits):
    op, y = _inpainting(digits[:3])
    r = csgm(y, op, vae, sigma=10, restarts=3, generator=torch.Generator().manual_seed(0), max_iters=300)
    E = r.history["objective_final"]
    assert E.shape == (3, 3)
    trace = r.history["objective"]
    assert trace.shape[1] == 3
    for b in range(3):  # the kept restart's trace ends at its final (best) energy or above it
        col = trace[:, b][~torch.isnan(trace[:, b])]
        assert float(col.min()) == pytest.approx(float(E[r.per_image["best_restart"][b], b]), rel=1e-5)
    torch.testing.assert_close(E.min(0).values, E[r.per_image["best_restart"], torch.arange(3)])


def test_csgm_initialised_at_the_ground_truth_code(vae, digits):
    op, y = _inpainting(digits[:3])
    z_true = vae.encode(digits[:3])[0]
    r = csgm(y, op, vae, sigma=10, z0=z_true, max_iters=300)
    assert float((r.z - z_true).norm(dim=1).mean()) < float(r.z.norm(dim=1).mean()) + 1  # stays near its start


def test_bad_input_is_rejected_with_the_argument_named(vae, digits):
    op, y = _inpainting(digits[:2])
    with pytest.raises(ValueError, match="sigma"):
        jpmap(y, op, vae, sigma=0)
    with pytest.raises(ValueError, match="sigma"):
        csgm(y, op, vae, sigma=-1)
    bad = y.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        jpmap(bad, op, vae, sigma=10)
    with pytest.raises(ValueError, match="n1 <= n2"):
        jpmap(y, op, vae, sigma=10, n1=30, n2=10)
    with pytest.raises(ValueError, match="unknown algorithm"):
        jpmap(y, op, vae, sigma=10, algorithm="2.5")
    with pytest.raises(ValueError, match="unknown init"):
        jpmap(y, op, vae, sigma=10, init="random")
    with pytest.raises(ValueError, match="prior expects"):  # colour operator, MNIST prior
        jpmap(torch.rand(2, 3, 28, 28), Denoising(), vae, sigma=10)
    cs = CompressedSensing(50, (1, 28, 28), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="y has shape"):
        jpmap(torch.rand(2, 60), cs, vae, sigma=10)
    with pytest.raises(ValueError, match="z0"):
        jpmap(y, op, vae, sigma=10, z0=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="beta0"):
        jpmap(y, op, vae, sigma=10, alpha=5, beta=3.0)
    with pytest.raises(ValueError, match="alpha"):
        jpmap(y, op, vae, sigma=10, alpha=torch.tensor([1.0, 5.0, 10.0]), n1=0, n2=0, n_max=1)
    with pytest.raises(ValueError, match="alpha"):
        jpmap(y, op, vae, sigma=10, alpha="ten")
    with pytest.raises(ValueError, match="alpha"):
        jpmap(y, op, vae, sigma=10, alpha=-1)
    with pytest.raises(ValueError, match="betas"):
        mapz_splitting(y, op, vae, betas=[10.0, 1.0], sigma=10)
    with pytest.raises(ValueError, match="max_iters"):
        csgm(y, op, vae, sigma=10, max_iters=0)
    with pytest.raises(TypeError, match="op must provide"):
        jpmap(y, object(), vae, sigma=10)
