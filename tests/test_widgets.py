"""The explorers of notebooks 00 and 12: their callbacks run headless, render, and reject bad settings clearly."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from jpmap_core.pretrained import load_pretrained
from jpmap_core.solvers import solve
from jpmap_core.widgets import build_explorer, explore, posterior_explorer_frame, render, render_posterior_frame

TINY = {"adam_max_iters": 60, "k_max": 3}  # small budgets: the properties below hold for any budget


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny batches: one thread is fastest, and far faster than two on a shared, busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vae():
    return load_pretrained("mnist_mlp_dvae15")


@pytest.fixture(scope="module")
def images(mnist_test):
    return mnist_test.images[:4]


def test_explore_alg23_inpainting_gives_images_psnr_and_a_nonincreasing_J1(vae, images):
    r = explore("inpainting", 10, 0.8, "2.3", 2, 4, 8, None, 1, vae=vae, images=images, **TINY)
    assert list(r.images) == ["x*", "A^T y", "x_hat", "mu_theta(z_hat)"]
    assert all(v.shape == (1, 1, 28, 28) for v in r.images.values())
    torch.testing.assert_close(r.images["x*"], images[1:2])
    assert set(r.psnr) == {"A^T y", "x_hat", "mu_theta(z_hat)"}
    assert all(math.isfinite(v) for v in r.psnr.values())
    # the restoration beats the degraded observation (80% of the pixels are zero in A^T y)
    assert r.psnr["x_hat"] > r.psnr["A^T y"] + 1
    assert 1 <= r.j1.numel() <= 8 and r.iterations == r.j1.numel()
    assert float((r.j1[1:] - r.j1[:-1]).max()) <= 1e-3 * float(r.j1.abs().max())  # Prop. 2.1(1)
    assert r.energy == pytest.approx(float(r.j1[-1]))
    assert "inpainting" in r.summary() and "80% missing" in r.summary()


def test_explore_csgm_compressed_sensing_has_no_J1_trace(vae, images):
    r = explore("compressed_sensing", 10, 140, "csgm", 0, 0, 1, None, 0, vae=vae, images=images, **TINY)
    assert list(r.images) == ["x*", "A^dagger y", "x_hat"]
    assert r.j1.numel() == 0 and math.isfinite(r.energy)
    assert r.iterations == TINY["adam_max_iters"]  # stopped at the Adam cap
    assert r.settings["level"] == 140 and r.settings["alpha"] is None


def test_explore_alg24_increases_beta_between_outer_iterations(vae, images):
    r = explore("denoising", 110, None, "2.4", 1, 2, 4, 30.0, 2, vae=vae, images=images, **TINY)
    assert r.beta.numel() == r.j1.numel() == r.outer.numel()
    assert float(r.beta[0]) == pytest.approx(0.1 * vae.beta, rel=1e-5)  # beta0 = 0.1 / gamma^2
    assert bool((r.beta[1:] >= r.beta[:-1]).all())
    assert int(r.outer.max()) >= 1  # at least one outer iteration of Alg. 2.4 ran
    assert r.settings["level"] is None  # level means nothing for denoising


def test_explore_same_seed_same_result_other_seed_other_mask(vae, images):
    args = ("inpainting", 10, 0.8, "csgm", 0, 0, 1, None, 0)
    a = explore(*args, vae=vae, images=images, seed=3, adam_max_iters=20)
    b = explore(*args, vae=vae, images=images, seed=3, adam_max_iters=20)
    c = explore(*args, vae=vae, images=images, seed=4, adam_max_iters=20)
    torch.testing.assert_close(a.images["x_hat"], b.images["x_hat"], rtol=0, atol=0)
    assert not torch.equal(a.images["A^T y"], c.images["A^T y"])


def test_render_draws_the_images_with_psnr_and_the_J1_panel(vae, images):
    import matplotlib.pyplot as plt

    r = explore("inpainting", 10, 0.8, "2.3", 1, 2, 3, None, 0, vae=vae, images=images, **TINY)
    fig = render(r)
    try:
        titles = [ax.get_title() for ax in fig.axes]
        assert sum("dB" in t for t in titles) == 3  # A^T y, x_hat, mu_theta(z_hat)
        texts = {t.get_text() for ax in fig.axes for t in ax.texts}
        assert {"(a)", "(b)"} <= texts
        curve = fig.axes[-1].get_lines()[0].get_ydata()
        assert len(curve) == r.j1.numel()
    finally:
        plt.close(fig)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("blur", 10, 0.8, "2.3", 1, 2, 3, None, 0), "problem must be one of"),
        (("inpainting", 0, 0.8, "2.3", 1, 2, 3, None, 0), "sigma .* must be > 0"),
        (("inpainting", 10, 80, "2.3", 1, 2, 3, None, 0), r"in \[0, 1\), got 80 \(a percentage"),
        (("compressed_sensing", 10, 0.2, "2.3", 1, 2, 3, None, 0), "number of measurements m"),
        (("compressed_sensing", 10, 5000, "2.3", 1, 2, 3, None, 0), r"in \[1, 784\]"),
        (("inpainting", 10, 0.8, "2.3", 5, 2, 3, None, 0), "n1 <= n2 <= n_max"),
        (("inpainting", 10, 0.8, "2.4", 1, 2, 3, 0.0, 0), "alpha > 0"),
        (("inpainting", 10, 0.8, "2.2", 1, 2, 3, None, 0), "algorithm must be one of"),
        (("inpainting", 10, 0.8, "2.3", 1, 2, 3, None, 4), r"index must be an integer in \[0, 3\]"),
    ],
)
def test_bad_settings_say_what_is_wrong(vae, images, args, message):
    with pytest.raises(ValueError, match=message):
        explore(*args, vae=vae, images=images, **TINY)


def test_build_explorer_shows_a_picture_and_turns_errors_into_text(vae, images):
    import ipywidgets

    box = build_explorer(vae, images, defaults={"n1": 1, "n2": 2, "n_max": 3, "adam_max_iters": 30})
    assert isinstance(box, ipywidgets.Widget)
    ex = box.explorer
    assert ex.error is None and ex.result is not None
    assert ex.picture.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert ex.controls["m"].layout.display == "none"  # inpainting: the m slider is hidden

    ex.controls["n1"].value = 3  # n1 > n2: invalid
    assert ex.result is None and "n1 <= n2 <= n_max" in ex.error
    assert "Invalid setting" in ex.status.value

    ex.controls["n1"].value = 0
    ex.controls["problem"].value = "compressed_sensing"
    assert ex.error is None and ex.result.settings["level"] == ex.controls["m"].value
    assert ex.controls["m"].layout.display is None and ex.controls["missing"].layout.display == "none"


def test_build_explorer_rejects_unknown_defaults(vae, images):
    with pytest.raises(ValueError, match="unknown explorer defaults"):
        build_explorer(vae, images, defaults={"iterations": 5}, run=False)


# ---- the posterior explorer of notebook 12 -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def posterior(vae):
    """A VBLE-xz fit of 3 digits the prior generated (no data set needed), on an inpainting problem."""
    from jpmap_core.operators import make_problem

    with torch.no_grad():
        x = vae.decode(torch.randn(3, vae.latent_dim, generator=torch.Generator().manual_seed(0)))
    p = make_problem("inpainting", x, sigma=10, level=0.8, seed=0)
    return solve("vble_xz", p.y, p.op, vae, sigma=10, max_iters=20, n_posterior_samples=10)


def test_posterior_explorer_frame_draws_new_samples_of_one_image(vae, posterior):
    f = posterior_explorer_frame(vae, posterior, 1, n=6, seed=3)
    assert f["samples"].shape == (6, 28, 28) and f["mmse"].shape == f["sample_std"].shape == (28, 28)
    np.testing.assert_allclose(f["mmse"], posterior.x[1, 0].numpy())
    np.testing.assert_allclose(f["fitted_std"], posterior.per_image["std"][1, 0].numpy())
    np.testing.assert_allclose(f["sample_mean"], f["samples"].mean(0), atol=1e-6)
    np.testing.assert_allclose(f["sample_std"], f["samples"].std(0, ddof=1), atol=1e-6)
    assert int(f["index"]) == 1 and int(f["n"]) == 6 and int(f["seed"]) == 3
    # the new samples spread like the fitted posterior: their mean std is that of the fit's samples (within noise)
    assert 0.5 < float(f["sample_std"].mean() / f["fitted_std"].mean()) < 1.5
    same = posterior_explorer_frame(vae, posterior, 1, n=6, seed=3)
    np.testing.assert_array_equal(same["samples"], f["samples"])  # same seed, same draws
    other = posterior_explorer_frame(vae, posterior, 1, n=6, seed=4)
    assert not np.array_equal(other["samples"], f["samples"])  # the button's next seed: new draws
    fig = render_posterior_frame(f, title="image 1")
    assert len(fig.axes) == 1 + 6 + 2
    plt.close(fig)


def test_posterior_explorer_frame_rejects_bad_input(vae, posterior):
    with pytest.raises(ValueError, match=r"index must be an integer in \[0, 2\]"):
        posterior_explorer_frame(vae, posterior, 3)
    with pytest.raises(ValueError, match="a std needs 2"):
        posterior_explorer_frame(vae, posterior, 0, n=1)
    from jpmap_core.operators import Denoising

    y = torch.full((1, 1, 28, 28), 0.5)
    jp = solve("jpmap", y, Denoising((1, 28, 28)), vae, sigma=10, n1=1, n2=1, n_max=1, adam_max_iters=5)
    with pytest.raises(ValueError, match="needs a vble or vble_xz Restoration"):
        posterior_explorer_frame(vae, jp, 0)
