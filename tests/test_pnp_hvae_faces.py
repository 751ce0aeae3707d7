"""The faces experiment of notebook 10 (PnP-HVAE §6.1, Table 1, Fig. 3): tasks, batched restoration with the call
cache, the data-fit ratio, table rows, claims and figures. Tiny untrained priors on 16x16 images."""

from __future__ import annotations

import matplotlib
import pytest
import torch

from jpmap_core.experiments import mnist_benchmark as mb
from jpmap_core.experiments import pnp_hvae_faces as pf
from jpmap_core.metrics import psnr
from jpmap_core.models import HVAE, ConvVAE
from jpmap_core.operators import Inpainting

matplotlib.use("Agg")

SHAPE = (3, 16, 16)
BUDGET = mb.Budget(n1=1, n2=2, n_max=2, adam_max_iters=5, csgm_max_iters=10)


def _kernels() -> list[torch.Tensor]:
    """12 small normalised kernels standing in for pnphvae_kernels12 (file i + 1 is a box of side 1 + 2 (i % 3))."""
    out = []
    for i in range(12):
        s = 1 + 2 * (i % 3)
        out.append(torch.ones(s, s) / s**2)
    return out


@pytest.fixture(scope="module")
def hvae() -> HVAE:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = HVAE(image_shape=SHAPE, widths=(4, 6), groups=(1, 2), latent_channels=(2, 3), enc_blocks=1, gamma_init=0.1)
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def vae() -> ConvVAE:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = ConvVAE(image_shape=SHAPE, latent_dim=4, widths=(4, 4, 4, 4), fc_dim=16, gamma_init=0.2)
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(1))


def _run(x, task, hvae, vae, **kw):
    opts = dict(hvae=hvae, vae=vae, dataset="toy", kernels=_kernels(), budget=BUDGET, max_iters=3, seed=0)
    opts.update(kw)
    return pf.restore_task(x, pf.PAPER_TASKS[task] if isinstance(task, str) else task, **opts)


@pytest.fixture(scope="module")
def runs(x, hvae, vae) -> list[pf.TaskRun]:
    return [_run(x, k, hvae, vae) for k in pf.PAPER_TASKS]


def test_every_task_restores_the_same_observation_with_every_method(runs, x):
    for run in runs:
        assert run.n_images == 3 and list(run.x) == list(pf.METHODS)
        assert run.observation.shape == x.shape and run.x0.shape == x.shape
        for m in pf.METHODS:
            xm = run.x[m]
            assert xm.shape == x.shape and float(xm.min()) >= 0 and float(xm.max()) <= 1
            torch.testing.assert_close(run.scores[m]["psnr"], psnr(xm, x))
            assert bool(torch.isnan(run.scores[m]["lpips"]).all())  # not asked: NaN, never a made-up value
            assert run.residual[m].shape == (3,) and bool(torch.isfinite(run.residual[m]).all())
            assert run.seconds[m] > 0 and run.cached_chunks[m] == 0
        assert int(run.iterations["pnp_hvae"].max()) <= 3 and int(run.iterations["adam_j1"].max()) <= 3
        assert run.reconstruction.shape == x.shape  # HVAE(x_n, tau), the official code's saved image
        torch.testing.assert_close(run.reconstruction_scores["psnr"], psnr(run.reconstruction, x))


def test_tasks_carry_the_official_face_configs():
    sr, motion, inp = pf.PAPER_TASKS["sr4"], pf.PAPER_TASKS["deblur_motion"], pf.PAPER_TASKS["inpainting"]
    assert (sr.kernel, sr.factor, sr.sigma, sr.tau, sr.decoder_std) == (4, 4, 3.0, (0.8, 0.5), 5.0)
    assert (motion.kernel, motion.sigma, motion.tau) == (9, 8.0, (0.99, 0.8))
    assert (inp.sigma, inp.tau, inp.decoder_std, inp.max_iters, inp.patience) == (3.0, (0.5, 0.5), 10.0, 100, 50)
    tau = sr.temperature(7)
    assert tau[0] == pytest.approx(0.8) and tau[-1] == pytest.approx(0.5) and len(tau) == 7
    opts = pf.hvae_options(inp, 7, max_iters=500)
    assert opts["max_iters"] == 100 and opts["gamma"] == pytest.approx(10 / 255)  # a cap never raises the count
    assert pf.hvae_options(inp, 7, max_iters=20)["max_iters"] == 20


def test_super_resolution_observes_a_quarter_size_image_shown_by_pixel_replication(x):
    op, y = pf.PAPER_TASKS["sr4"].degrade(x, kernels=_kernels(), seed=0, dataset="toy")
    assert y.shape == (3, 3, 4, 4)


def test_same_seed_same_numbers_and_the_seed_changes_the_draws(x, hvae, vae, runs):
    again = _run(x, "inpainting", hvae, vae)
    for m in pf.METHODS:
        torch.testing.assert_close(again.x[m], runs[3].x[m], rtol=0, atol=0)
    other = _run(x, "inpainting", hvae, vae, seed=1, methods=("pnp_hvae",))
    assert not torch.equal(other.observation, runs[3].observation)
    _, y1 = pf.PAPER_TASKS["deblur_motion"].degrade(x, kernels=_kernels(), seed=0, dataset="celeba")
    _, y2 = pf.PAPER_TASKS["deblur_motion"].degrade(x, kernels=_kernels(), seed=0, dataset="ffhq")
    assert not torch.equal(y1, y2)  # each data set gets its own noise


@pytest.mark.parametrize("task", ["inpainting", "deblur_gaussian"])
def test_chunked_calls_equal_one_batched_call(task, x, hvae, vae, runs):
    """Each face keeps its own state: restoring 1 face per call gives the batched result (float32 rounding aside)."""
    whole = runs[list(pf.PAPER_TASKS).index(task)]
    chunked = _run(x, task, hvae, vae, chunk=1, methods=pf.HVAE_METHODS)
    for m in pf.HVAE_METHODS:
        torch.testing.assert_close(chunked.x[m], whole.x[m], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(chunked.iterations[m], whole.iterations[m])


def test_the_cache_resumes_a_run_with_the_same_results(x, hvae, vae, tmp_path):
    first = _run(x, "deblur_gaussian", hvae, vae, cache=tmp_path, chunk=2)
    assert first.cached_chunks == dict.fromkeys(pf.METHODS, 0)
    second = _run(x, "deblur_gaussian", hvae, vae, cache=tmp_path, chunk=2)
    assert second.cached_chunks == dict.fromkeys(pf.METHODS, 2)
    for m in pf.METHODS:
        torch.testing.assert_close(second.x[m], first.x[m], rtol=0, atol=0)
        assert second.seconds[m] == pytest.approx(first.seconds[m])  # a cached call keeps the seconds it took
    other = _run(x, "deblur_gaussian", hvae, vae, cache=tmp_path, chunk=2, lr=0.001, methods=("adam_j1",))
    assert other.cached_chunks["adam_j1"] == 0  # another learning rate is another call


def test_the_data_fit_ratio_is_about_one_at_the_truth():
    xs = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for key in ("inpainting", "deblur_motion", "sr4"):
        task = pf.PAPER_TASKS[key]
        kernels = [torch.ones(5, 5) / 25] * 12
        op, y = task.degrade(xs, kernels=kernels, seed=0, dataset="toy")
        ratio = pf._residual_ratio(op, xs, y, task.sigma)
        assert float(ratio.mean()) == pytest.approx(1.0, abs=0.06), key
    op, y = pf.PAPER_TASKS["inpainting"].degrade(xs, kernels=None, seed=0, dataset="toy")
    assert isinstance(op, Inpainting)
    hidden = float(1 - op.mask[:, 0].mean())
    assert 0.25 <= hidden < 0.4  # the stated rule: blobs until 25% of the pixels are hidden


def test_table_rows_claims_and_wins(runs):
    rows = pf.table_rows(runs)
    assert len(rows) == 4 * 4 and all(tuple(r) == pf.TABLE_KEYS for r in rows)
    assert all(r["lpips_mean"] is None and r["n_images"] == 3 for r in rows)
    assert all((r["psnr_reconstruction_mean"] is None) == (r["method"] != "pnp_hvae") for r in rows)
    r0 = rows[0]
    assert r0["psnr_mean"] == pytest.approx(float(runs[0].scores["pnp_hvae"]["psnr"].double().mean()))
    c = pf.claims(runs, "toy")
    assert set(c["best_psnr_ssim"]) == set(pf.PAPER_TASKS)
    for run in runs:
        mean = {m: float(s["psnr"].double().mean()) for m, s in run.scores.items()}
        if c["best_psnr_ssim"][run.task.key]:
            assert mean["pnp_hvae"] == max(mean.values())
        faster = run.seconds["pnp_hvae"] < run.seconds["adam_j1"]
        assert c["faster_than_adam"][run.task.key] == faster
        wins = c["wins"][run.task.key]["psnr_wins"]
        assert wins["adam_j1"] == int((run.scores["pnp_hvae"]["psnr"] > run.scores["adam_j1"]["psnr"]).sum())
    assert c["best_psnr_ssim_all"] == all(c["best_psnr_ssim"].values())
    assert pf.claims(runs, "another")["best_psnr_ssim_all"] is False  # no task of that data set: nothing holds
    table = pf.markdown_table(rows, "toy", list(pf.PAPER_TASKS))
    assert table.count("not run: weights unavailable") == 2 * 4  # ILO and DPS rows say so, per task


def test_figures_and_the_median_face_rule(runs):
    import matplotlib.pyplot as plt

    i = pf.median_face(runs[0])
    v = runs[0].scores["pnp_hvae"]["psnr"]
    assert float(v[i]) == float(v.sort().values[1])
    fig = pf.figure3(runs)
    assert len(fig.axes) == 4 * 6
    plt.close(fig)
    fig = pf.task_grid(runs[1], [0, 2])
    assert len(fig.axes) == 6 * 2
    plt.close(fig)
    with pytest.raises(ValueError, match="face indices"):
        pf.task_grid(runs[1], [3])
    with pytest.raises(ValueError, match="entries for 4 tasks"):
        pf.figure3(runs, [0])


def test_bad_input_says_what_was_expected(x, hvae, vae):
    with pytest.raises(ValueError, match="unknown methods"):
        _run(x, "sr4", hvae, vae, methods=("ilo",))
    with pytest.raises(ValueError, match="Gaussian VAE prior"):
        _run(x, "sr4", hvae, None)
    with pytest.raises(ValueError, match="chunk"):
        _run(x, "sr4", hvae, vae, chunk=0)
    with pytest.raises(ValueError, match="names has 2 entries"):
        _run(x, "sr4", hvae, vae, names=["a", "b"])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        _run(x[0], "sr4", hvae, vae)
    with pytest.raises(ValueError, match="kernel file 9"):
        pf.PAPER_TASKS["deblur_motion"].degrade(x, kernels=_kernels()[:3], seed=0, dataset="toy")
    with pytest.raises(ValueError, match="need a kernel"):
        pf.Task("bad", "bad", "blur", 8.0)
    with pytest.raises(ValueError, match="temperatures"):
        pf.Task("bad", "bad", "blur", 8.0, kernel=1, tau=(1.2, 0.5))
    with pytest.raises(ValueError, match="coverage"):
        pf.Task("bad", "bad", "inpainting", 3.0)
