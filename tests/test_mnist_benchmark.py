"""The MNIST benchmark of notebook 06 (JPMAP §3.4, Figs. 6-7): degradations, fairness between methods, tables."""

from __future__ import annotations

import csv
import math

import matplotlib
import pytest
import torch

from jpmap_core.experiments import mnist_benchmark as mb
from jpmap_core.metrics import psnr
from jpmap_core.operators import CompressedSensing, Inpainting
from jpmap_core.pretrained import load_pretrained
from jpmap_core.solvers import SOLVERS

TINY = mb.Budget(n1=2, n2=3, n_max=4, adam_max_iters=8, csgm_max_iters=10, k_max=2)


@pytest.fixture(scope="module")
def vae():
    return load_pretrained("mnist_mlp_dvae15")


@pytest.fixture(scope="module")
def digits(mnist_test):
    return mnist_test.images[:3]


@pytest.fixture(scope="module")
def small_run(vae, digits):
    """Every method at one level per problem (two for inpainting, merged into one batch), tiny caps."""
    levels = {"denoising": [110], "compressed_sensing": [140], "inpainting": [0.5, 0.8]}
    return mb.run_benchmark(digits, vae, levels, budget=TINY, seed=0)


# ---- degradations ----------------------------------------------------------------------------------------------
def test_level_seed_depends_on_seed_problem_and_level_only():
    s = mb.level_seed(0, "inpainting", 0.8)
    assert s == mb.level_seed(0, "inpainting", 0.80000)
    others = {
        mb.level_seed(1, "inpainting", 0.8),
        mb.level_seed(0, "inpainting", 0.7),
        mb.level_seed(0, "denoising", 0.8),
    }
    assert s not in others and len(others) == 3


def test_a_level_gets_the_same_degradation_whichever_levels_run_with_it(digits):
    alone = mb.degrade("compressed_sensing", 140, digits, seed=3)
    again = mb.degrade("compressed_sensing", 140, digits, seed=3)
    other_seed = mb.degrade("compressed_sensing", 140, digits, seed=4)
    torch.testing.assert_close(alone.y, again.y, rtol=0, atol=0)
    torch.testing.assert_close(alone.op.matrix, again.op.matrix, rtol=0, atol=0)
    assert not torch.equal(alone.y, other_seed.y)


@pytest.mark.parametrize(
    ("problem", "level", "sigma"),
    [("denoising", 75, 75.0), ("compressed_sensing", 80, 10.0), ("inpainting", 0.7, 10.0)],
)
def test_degradations_follow_the_paper_setup(problem, level, sigma):
    x = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    d = mb.degrade(problem, level, x, seed=0)
    assert d.sigma == sigma and d.levels == [float(level)] * 40
    residual = d.y - d.op.A(x)
    if problem == "inpainting":
        assert isinstance(d.op, Inpainting) and d.op.mask.shape[0] == 40  # one mask per image
        assert abs(1 - float(d.op.mask.mean()) - level) < 0.02
        torch.testing.assert_close(d.observation, d.op.mask * d.y)
    if problem == "compressed_sensing":
        assert isinstance(d.op, CompressedSensing) and d.y.shape == (40, level) and d.observation is None
        assert abs(float(d.op.matrix.var()) * level - 1) < 0.02  # entries N(0, 1/m)
    assert abs(float(residual.std()) * 255 / sigma - 1) < 0.03  # noise std sigma/255 on every entry


def test_bad_levels_and_methods_are_refused(vae, digits):
    with pytest.raises(ValueError, match="fractions of missing pixels"):
        mb.degrade("inpainting", 80, digits, seed=0)
    with pytest.raises(ValueError, match="unknown problem"):
        mb.degrade("deblurring", 1, digits, seed=0)
    with pytest.raises(ValueError, match="subset of"):
        mb.run_benchmark(digits, vae, {"denoising": [25]}, methods=["vble"], budget=TINY)
    with pytest.raises(ValueError, match="n1 <= n2 <= n_max"):
        mb.Budget(n1=25, n2=150, n_max=20)


# ---- methods -------------------------------------------------------------------------------------------------
def test_each_method_gets_the_paper_settings_and_the_shared_caps(monkeypatch, vae, digits):
    calls = []
    monkeypatch.setitem(SOLVERS, "csgm", lambda *a, **kw: calls.append(("csgm", kw)))  # solve() uses the registry
    monkeypatch.setitem(SOLVERS, "jpmap", lambda *a, **kw: calls.append(("jpmap", kw)))
    d = mb.degrade("inpainting", 0.8, digits, seed=0)
    budget = mb.Budget(n1=4, n2=5, n_max=6, adam_max_iters=7, csgm_max_iters=8, k_max=9, rho_d=100.0)
    for m in mb.METHODS:
        mb.solve(m, d.y, d.op, vae, d.sigma, budget)
    (name, kw), *jp = calls
    assert name == "csgm" and kw == {"sigma": 10.0, "max_iters": 8}  # lambda: the csgm default sigma^2
    for (name, kw), alpha in zip(jp, (None, 1.0, 5.0, 10.0), strict=True):
        assert name == "jpmap"
        assert (kw["n1"], kw["n2"], kw["n_max"], kw["adam_max_iters"]) == (4, 5, 6, 7)
        assert kw.get("alpha") == alpha
        assert "beta" not in kw  # Alg. 2.3: beta = 1/gamma^2 (the jpmap default)
        if alpha is not None:
            assert kw["k_max"] == 9 and kw["rho"] == pytest.approx(100 / 784)
            assert kw["beta0"] == pytest.approx(0.1 * vae.beta)


def test_metrics_are_computed_on_restorations_clamped_to_the_unit_range():
    ref = torch.full((2, 1, 28, 28), 0.5)
    x = ref.clone()
    x[0] += 2.0  # far above 1: clamped to 1, an error of 0.5
    x[1] -= 2.0  # below 0: clamped to 0
    s = mb.score(x, ref, with_lpips=False)
    torch.testing.assert_close(s["psnr"], psnr(x.clamp(0, 1), ref))
    assert float(s["psnr"][0]) == pytest.approx(10 * math.log10(1 / 0.25))
    assert bool(s["lpips"].isnan().all())


@pytest.mark.parametrize("merge", ["inpainting", "levels", "all"])
def test_merged_batches_give_each_level_its_own_restoration(vae, digits, merge):
    """Levels (and problems) merged into one batch -- per-image masks, one sigma per image, BatchBlocks of several
    m -- give the numbers of one call per level, for every method (the alphas merged too)."""
    levels = {"denoising": [50, 110], "compressed_sensing": [40, 140], "inpainting": [0.5, 0.8]}
    merged = mb.run_benchmark(digits, vae, levels, budget=TINY, seed=1, merge=merge)
    apart = mb.run_benchmark(digits, vae, levels, budget=TINY, seed=1, merge="none", merge_alphas=False)
    assert set(merged.records) == set(apart.records) and len(merged.records) == 6 * len(mb.METHODS)
    for key, rec in apart.records.items():
        torch.testing.assert_close(merged.records[key].x, rec.x, rtol=1e-4, atol=1e-4)
        assert torch.equal(merged.records[key].converged, rec.converged)
    calls = 3 * {"inpainting": 5, "levels": 3, "all": 1}[merge]  # (csgm, fixed beta, the alphas) per batch
    assert len(merged.calls) == calls and len(apart.calls) == 6 * len(mb.METHODS)
    assert sum(c["images"] for c in merged.calls) == sum(c["images"] for c in apart.calls) == 6 * 3 * 5
    assert all(c["batched_steps"] > 0 for c in merged.calls)
    for problem in levels:
        assert set(merged.seconds[problem]) == set(mb.METHODS)
        assert all(v > 0 for v in merged.seconds[problem].values())
    total = sum(c["seconds"] for c in merged.calls)
    assert sum(v for d in merged.seconds.values() for v in d.values()) == pytest.approx(total)
    assert not torch.equal(merged.record("inpainting", 0.5, "csgm").x, merged.record("inpainting", 0.8, "csgm").x)
    with pytest.raises(ValueError, match="unknown merge"):
        mb.run_benchmark(digits, vae, levels, budget=TINY, merge="problems")
    assert mb.resolve_merge("auto", "cpu") == "levels" and mb.resolve_merge("auto", "cuda") == "all"
    assert mb.resolve_merge("none", "cuda") == "none"


def test_cache_resumes_a_run_with_the_calls_it_lacks(vae, digits, tmp_path):
    """Every finished call is saved; a run started again loads those and computes only the missing or damaged ones;
    other caps (or measurements, prior, solver code) give other keys."""
    levels = {"denoising": [110], "compressed_sensing": [140]}
    methods = ["csgm", "jpmap_fixed_beta", "jpmap_alpha1", "jpmap_alpha10"]
    first = mb.run_benchmark(digits, vae, levels, methods=methods, budget=TINY, seed=0, cache=tmp_path)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == len(first.calls) == 2 * 3 and not any(c["cached"] for c in first.calls)
    files[0].unlink()  # as if the run had stopped before this call
    files[1].write_bytes(b"not a safetensors file")  # a damaged entry is recomputed, never trusted
    again = mb.run_benchmark(digits, vae, levels, methods=methods, budget=TINY, seed=0, cache=tmp_path)
    assert sum(not c["cached"] for c in again.calls) == 2
    for key, rec in first.records.items():
        torch.testing.assert_close(again.records[key].x, rec.x, rtol=0, atol=0)
        assert torch.equal(again.records[key].converged, rec.converged)
    assert [c["seconds"] for c in again.calls if c["cached"]] == [
        c["seconds"] for c, a in zip(first.calls, again.calls, strict=True) if a["cached"]
    ]
    other = mb.Budget(n1=2, n2=3, n_max=4, adam_max_iters=9, csgm_max_iters=10, k_max=2)
    third = mb.run_benchmark(digits, vae, levels, methods=methods, budget=other, seed=0, cache=tmp_path)
    assert not any(c["cached"] for c in third.calls) and len(list(tmp_path.glob("*.safetensors"))) == 12
    reseeded = mb.run_benchmark(digits, vae, levels, methods=["csgm"], budget=TINY, seed=1, cache=tmp_path)
    assert not any(c["cached"] for c in reseeded.calls)  # other noise and matrices: other measurements


def test_merged_alphas_give_each_alpha_its_own_restoration(vae, digits):
    """The Alg. 2.4 methods share one call (one block of images per alpha): same numbers as one call per alpha."""
    levels = {"denoising": [110], "inpainting": [0.5, 0.8]}
    methods = ["jpmap_alpha1", "jpmap_alpha10"]
    merged = mb.run_benchmark(digits, vae, levels, methods=methods, budget=TINY, seed=2)
    apart = mb.run_benchmark(digits, vae, levels, methods=methods, budget=TINY, seed=2, merge_alphas=False)
    for p, lvls in levels.items():
        for lv in lvls:
            for m in methods:
                a, b = merged.record(p, lv, m), apart.record(p, lv, m)
                torch.testing.assert_close(a.x, b.x, rtol=1e-4, atol=1e-4)
                assert torch.equal(a.outer_iterations, b.outer_iterations)
    assert not torch.equal(merged.record("denoising", 110, methods[0]).x, merged.record("denoising", 110, methods[1]).x)
    assert set(merged.seconds["inpainting"]) == set(methods)
    assert all(v > 0 for v in merged.seconds["inpainting"].values())


# ---- a run, its table and its claims ------------------------------------------------------------------------
def test_run_scores_every_method_on_the_same_images_and_reports_lpips_honestly(small_run, digits):
    b = small_run
    assert b.n_images == 3 and torch.equal(b.x_true, digits)
    rows = mb.results_table(b)
    assert len(rows) == 4 * len(mb.METHODS)
    keys = {"problem", "level", "method", "n_images", "psnr_mean", "psnr_se", "ssim_mean", "lpips_mean"}
    for r in rows:
        assert keys <= set(r) and r["n_images"] == 3
        assert math.isfinite(r["psnr_mean"]) and r["psnr_se"] > 0 and 0 < r["ssim_mean"] <= 1
        rec = b.record(r["problem"], r["level"], r["method"])
        assert float(rec.x.min()) >= 0 and float(rec.x.max()) <= 1
        assert r["psnr_mean"] == pytest.approx(float(psnr(rec.x, digits).double().mean()), abs=1e-6)
        if b.lpips_available:
            assert r["lpips_mean"] is not None and r["lpips_mean"] >= 0
        else:
            assert r["lpips_mean"] is None and b.lpips_reason.startswith("LPIPS unavailable")
    assert {r["level"] for r in rows if r["problem"] == "inpainting"} == {0.5, 0.8}
    assert {r["level"] for r in rows if r["problem"] == "compressed_sensing"} == {140}
    alg24 = [r for r in rows if r["method"] in mb.ALPHAS]
    assert all(r["outer_iterations_mean"] is not None for r in alg24)


def _fake_bench(psnr_by_method: dict[str, list[float]], problem="inpainting", levels=(0.5, 0.8)) -> mb.Benchmark:
    n = len(next(iter(psnr_by_method.values())))
    b = mb.Benchmark(torch.zeros(n, 1, 28, 28), {problem: list(levels)}, list(psnr_by_method), mb.Budget())
    for i, lv in enumerate(levels):
        for m, values in psnr_by_method.items():
            p = torch.tensor(values) + (0 if m == "csgm" else i)  # JPMAP's gain grows by 1 dB per level
            b.records[(problem, mb.level_key(lv), m)] = mb.Record(
                x=torch.zeros(n, 1, 28, 28), psnr=p, ssim=p / 100, lpips=torch.full((n,), math.nan),
                converged=torch.ones(n, dtype=torch.bool), outer_iterations=None,
            )  # fmt: skip
        b.x0_psnr[(problem, mb.level_key(lv))] = torch.full((n,), 10.0)
    return b


def test_table_mean_standard_error_and_win_fraction():
    b = _fake_bench({"csgm": [20.0, 22.0, 24.0, 26.0], "jpmap_fixed_beta": [21.0, 21.0, 25.0, 26.0]})
    rows = mb.results_table(b)
    csgm = rows[0]
    assert csgm["psnr_mean"] == pytest.approx(23.0)
    assert csgm["psnr_se"] == pytest.approx(math.sqrt(20 / 3) / 2)  # std (n - 1) / sqrt(n)
    assert csgm["lpips_mean"] is None
    wins = mb.win_fraction(b)
    assert wins == {"inpainting": {"0.5": 0.5, "0.8": 0.75}}  # ties (26 = 26, 22 = 22) are not wins
    assert mb.pooled_win_fraction(b) == {"inpainting": 0.625, "all": 0.625}
    gain = mb.psnr_gain(b)
    assert gain["inpainting"]["0.5"] == pytest.approx(0.25) and gain["inpainting"]["0.8"] == pytest.approx(1.25)
    assert mb.ill_posed_trend(gain) == {"inpainting": pytest.approx(1.0)}  # 80% missing is the harder level
    found = mb.claims(b)
    assert found["jpmap_win_fraction"] == wins
    assert found["min_psnr_gain_over_x0"] == pytest.approx(13.0)  # CSGM: 23 dB against x0 at 10 dB


def test_ill_posed_trend_orders_compressed_sensing_by_fewer_measurements():
    gain = {
        "compressed_sensing": {"40": 3.0, "300": 1.0},
        "denoising": {"25": 0.5, "150": 2.0},
        "inpainting": {"0.8": 1},
    }
    assert mb.ill_posed_trend(gain) == {"compressed_sensing": 2.0, "denoising": 1.5}


def test_csv_is_written_with_every_row_and_empty_cells_for_unavailable_values(tmp_path):
    b = _fake_bench({"csgm": [20.0, 22.0], "jpmap_fixed_beta": [21.0, 23.0]})
    rows = mb.results_table(b)
    path = mb.write_csv(rows, tmp_path / "results.csv", mb.win_fraction(b))
    back = list(csv.DictReader(path.open()))
    assert [r["method"] for r in back] == [r["method"] for r in rows]
    assert back[0]["lpips_mean"] == "" and float(back[0]["psnr_mean"]) == pytest.approx(21.0)
    assert float(back[0]["jpmap_fixed_beta_win_fraction"]) == 1.0 and back[1]["jpmap_fixed_beta_win_fraction"] == ""
    assert not [p for p in tmp_path.iterdir() if p.name != "results.csv"]  # no temporary file left behind
    md = mb.table_markdown(rows, mb.win_fraction(b))
    assert md.count("\n") == len(rows) + 1 and "unavailable" in md and "80%" in md


def test_fig6_says_why_lpips_is_missing_instead_of_plotting_it():
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = _fake_bench({"csgm": [20.0, 22.0], "jpmap_fixed_beta": [21.0, 23.0]})
    fig = mb.plot_sweeps(mb.results_table(b), lpips_reason="LPIPS unavailable: no AlexNet weights here")
    (ax_psnr, ax_lpips, ax_ssim) = fig.axes[:3]
    assert len(ax_psnr.lines) == 2 and len(ax_ssim.lines) == 2 and not ax_lpips.lines
    assert any("no AlexNet weights here" in t.get_text() for t in ax_lpips.texts)
    assert ax_psnr.get_title(loc="left").startswith("(e)") and ax_lpips.get_title(loc="left").startswith("(f)")
    plt.close(fig)


def test_fig6_lpips_line_is_short_and_names_no_machine_path():
    """The panel says why in one line; the long reason (cache path, URL, what to do) stays in metrics.json."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    home = "/home/someone/.cache/torch/hub/checkpoints/alexnet-owt-7be5be79.pth"
    long = (
        f"LPIPS unavailable: torchvision AlexNet weights not in torch hub cache ({home}); they cannot be downloaded "
        f"offline -- download https://download.pytorch.org/models/alexnet-owt-7be5be79.pth to {home}"
    )
    short = "LPIPS unavailable: AlexNet weights not found offline; see data/README.md"
    assert mb.lpips_panel_text(long) == short
    no_pkg = "LPIPS unavailable: the lpips package cannot be imported (No module named 'lpips'); pip install lpips"
    assert mb.lpips_panel_text(no_pkg) == "LPIPS unavailable: the lpips package cannot be imported"
    assert mb.lpips_panel_text(None) == "LPIPS unavailable"
    assert mb.lpips_panel_text("no weights") == "LPIPS unavailable: no weights"
    b = _fake_bench({"csgm": [20.0, 22.0], "jpmap_fixed_beta": [21.0, 23.0]})
    fig = mb.plot_sweeps(mb.results_table(b), lpips_reason=long)
    shown = [" ".join(t.get_text().split()) for t in fig.axes[1].texts]
    assert short in shown and not any(home in t or ".cache" in t for t in shown), shown
    plt.close(fig)


def test_fig7_rows_and_columns_follow_the_stated_rule(small_run):
    import matplotlib.pyplot as plt

    fig = mb.qualitative_grid(small_run, "inpainting", 0.8, n_show=2)
    assert len(fig.axes) == (2 + len(mb.FIG7_METHODS)) * 2  # x*, A^T y, five methods; the first 2 digits
    fig_cs = mb.qualitative_grid(small_run, "compressed_sensing", 140, n_show=2)
    assert len(fig_cs.axes) == (1 + len(mb.FIG7_METHODS)) * 2  # no observation row for compressed sensing
    assert mb.nearest_level([50, 110], 100) == 110 and mb.nearest_level([0.5, 0.8], 0.8) == 0.8
    plt.close("all")


def test_worker_processes_give_the_results_of_one_process(small_run, vae, digits):
    """workers = 2 runs the independent solver calls in two processes: same restorations, same metrics."""
    levels = {p: small_run.levels[p] for p in ("denoising", "inpainting")}
    methods = ["csgm", "jpmap_alpha1", "jpmap_alpha5", "jpmap_alpha10"]  # the alphas merged as in small_run
    pooled = mb.run_benchmark(digits, vae, levels, methods=methods, budget=TINY, seed=0, workers=2)
    for (problem, key, method), rec in pooled.records.items():
        ref = small_run.records[(problem, key, method)]
        torch.testing.assert_close(rec.x, ref.x, rtol=0, atol=0)
        torch.testing.assert_close(rec.psnr, ref.psnr, rtol=0, atol=0)
        assert torch.equal(rec.outer_iterations, ref.outer_iterations) if method != "csgm" else True
    assert len(pooled.records) == 3 * 4 and set(pooled.seconds) == {"denoising", "inpainting"}


def test_calls_run_batch_after_batch_and_each_method_gets_its_own_rows(monkeypatch, vae, digits):
    """The plan of a run: per batch (the merge mode's), CSGM, then JPMAP with fixed beta, then the Alg. 2.4 methods in
    one call; each (problem, level, method) record holds the rows its method restored. A fake solver writes a
    method's own value into its rows (the registry is what ``solve`` calls)."""
    from jpmap_core.solvers import Restoration

    def fake(value):
        def solver(y, op, prior, *, sigma, alpha=None, **options):
            b = y.shape[0]
            v = torch.as_tensor(value if alpha is None else alpha / 10, dtype=torch.float32).expand(b)
            x = v.reshape(b, 1, 1, 1).expand(b, 1, 28, 28).clone()
            outer = {} if alpha is None else {"outer_iterations": torch.full((b,), 2)}
            return Restoration(x, torch.zeros(b, 1), x, torch.ones(b, dtype=torch.bool), torch.zeros(b),
                               info={"batched_steps": 1}, per_image=outer)  # fmt: skip

        return solver

    monkeypatch.setitem(SOLVERS, "csgm", fake(0.0))
    monkeypatch.setitem(SOLVERS, "jpmap", fake(0.25))
    value = {"csgm": 0.0, "jpmap_fixed_beta": 0.25, "jpmap_alpha1": 0.1, "jpmap_alpha5": 0.5, "jpmap_alpha10": 1.0}
    levels = {"denoising": [50, 110], "compressed_sensing": [40], "inpainting": [0.5, 0.8]}
    batches = {
        "none": [["denoising"], ["denoising"], ["compressed_sensing"], ["inpainting"], ["inpainting"]],
        "inpainting": [["denoising"], ["denoising"], ["compressed_sensing"], ["inpainting"]],
        "levels": [["denoising"], ["compressed_sensing"], ["inpainting"]],
        "all": [["compressed_sensing", "denoising", "inpainting"]],
    }
    alphas = ["jpmap_alpha1", "jpmap_alpha5", "jpmap_alpha10"]
    for merge, problems in batches.items():
        b = mb.run_benchmark(digits, vae, levels, budget=TINY, merge=merge)
        plan = [(c["methods"], c["problems"]) for c in b.calls]
        assert plan == [(m, p) for p in problems for m in (["csgm"], ["jpmap_fixed_beta"], alphas)], merge
        assert sum(c["images"] for c in b.calls) == 5 * len(mb.METHODS) * digits.shape[0]
        assert len(b.records) == 5 * len(mb.METHODS)
        for (problem, key, method), rec in b.records.items():
            assert torch.equal(rec.x, torch.full_like(digits, value[method])), (merge, problem, key, method)
            assert (rec.outer_iterations is None) == (method not in mb.ALPHAS)
