"""PnP-HVAE Table 2 runner (BSD deblurring, every method on the same images and noise), on tiny sizes."""

from __future__ import annotations

import math

import pytest
import torch

from jpmap_core.experiments.natural import (
    TABLE2_KERNELS,
    DeblurMethod,
    deblurring_table,
    default_methods,
    tau_for,
)
from jpmap_core.models import HVAE, PatchGMM


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sizes = [(16, 16), (16, 24), (16, 16)]
    return [
        torch.nn.functional.interpolate(torch.rand(1, 3, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
        for h, w in sizes
    ]


@pytest.fixture(scope="module")
def methods():
    torch.manual_seed(0)
    hvae = HVAE(image_shape=(3, 8, 8), widths=(4, 6), groups=(1, 1), latent_channels=(2, 2), enc_blocks=1).eval()
    gmm = PatchGMM(n_components=2, patch_size=3, channels=3)
    out = default_methods(hvae.requires_grad_(False), gmm, max_iters=2)
    out["tv"] = DeblurMethod("tv", options={"max_iters": 3, "prox_iters": 10})
    return out


def test_table_has_one_row_per_cell_and_the_per_image_scores_do_not_depend_on_the_other_images(methods):
    k = torch.ones(3, 3) / 9
    kernels = {"box": k, "line": torch.tensor([[0.0, 0, 0], [1 / 3, 1 / 3, 1 / 3], [0, 0, 0]])}
    rows, per_image = deblurring_table(_images(), kernels, [7.65, 12.75], methods, seed=3)
    assert len(rows) == 2 * 2 * 4 and {r["method"] for r in rows} == {"pnp_hvae", "epll", "tv", "wiener"}
    for r in rows:
        assert r["n_images"] == 3 and (r["lpips_mean"] is None or isinstance(r["lpips_mean"], float))
        assert r["psnr_mean"] > 0 and 0 < r["ssim_mean"] <= 1 and r["seconds_per_image"] >= 0
    # image 0 restored alone: same noise (seeded per image) and the same scores as in the batch of three
    some = {m: methods[m] for m in ("wiener", "tv", "pnp_hvae")}
    _, alone = deblurring_table(_images()[:1], {"box": k}, [7.65], some, seed=3)
    for m in some:
        for metric in ("psnr", "ssim"):
            a, b = alone[("box", 7.65, m)][metric][0], per_image[("box", 7.65, m)][metric][0]
            assert float(a) == pytest.approx(float(b), abs=1e-4), (m, metric)


def test_table2_temperatures_and_kernels_are_the_papers():
    assert [tau_for(s) for s in (2.55, 7.65, 12.75)] == [0.95, 0.8, 0.6]
    with pytest.raises(ValueError, match="no Table 2 temperature"):
        tau_for(5.0)
    assert sorted(TABLE2_KERNELS.values()) == [4, 7, 9, 11]


def test_test_images_are_the_twenty_held_out_bsd_images():
    from jpmap_core.data import DataNotFoundError, bsd_split
    from jpmap_core.experiments.natural import table2_kernels, test_images

    try:
        images, names = test_images()
        kernels = table2_kernels()
    except DataNotFoundError as e:
        pytest.skip("needs the BSD images and kernels: " + " ".join(str(e).split()))
    train, test = bsd_split()
    assert names == test and len(names) == 20 and not set(names) & set(train)
    assert all(x.shape[:2] == (1, 3) for x in images)
    for name, k in kernels.items():
        symmetric = torch.allclose(k, k.flip(0).flip(1))
        assert symmetric == name.startswith("gaussian"), name


# ------------------------------------------------------------------------------------------------
# Table 3 (inpainting), the call cache, Table 4 (latent groups), the claims and the figures
# ------------------------------------------------------------------------------------------------
def _tiny_hvae(groups: tuple[int, ...] = (1, 1), seed: int = 0) -> HVAE:
    torch.manual_seed(seed)
    n = len(groups)
    hvae = HVAE(image_shape=(3, 8, 8), widths=(4, 6)[:n] if n <= 2 else (4,) * n, groups=groups,
                latent_channels=(2,) * n, enc_blocks=1)  # fmt: skip
    return hvae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def inpainting():
    from jpmap_core.experiments.natural import inpainting_methods

    out = inpainting_methods(_tiny_hvae(), PatchGMM(n_components=2, patch_size=3, channels=3), max_iters=3)
    out["tv"] = DeblurMethod("tv", options={"max_iters": 3, "prox_iters": 10})
    return out


def test_inpainting_methods_are_table3s_and_leave_out_wiener(inpainting):
    assert list(inpainting) == ["pnp_hvae", "epll", "tv"]
    assert inpainting["pnp_hvae"].options_at(3.0)["tau"] == 0.6
    from jpmap_core.experiments.natural import TABLE3, inpainting_methods

    assert inpainting_methods(_tiny_hvae(), None)["pnp_hvae"].options["max_iters"] == TABLE3["max_iters"] == 200


def test_inpainting_masks_are_seeded_per_image_and_hide_at_least_the_coverage():
    from jpmap_core.experiments.natural import inpainting_problems

    images = _images()
    p1, _, idx = inpainting_problems(images, coverage=0.1, seed=5)
    p2, _, _ = inpainting_problems(images, coverage=0.1, seed=5)
    p3, _, _ = inpainting_problems(images, coverage=0.1, seed=6)
    assert idx == [[0, 2], [1]]
    for a, b in zip(p1, p2, strict=True):
        assert torch.equal(a.op.mask, b.op.mask) and torch.equal(a.y, b.y)
    assert not torch.equal(p1[0].op.mask, p3[0].op.mask)
    for p in p1:
        hidden = 1 - p.op.mask[:, 0].flatten(1).mean(1)
        assert bool((hidden >= 0.1).all()) and bool((hidden < 0.5).all())
    alone, _, _ = inpainting_problems(images[2:], coverage=0.1, seed=5 + 2)  # image 2 seeded with seed + 2
    assert torch.equal(alone[0].op.mask[0], p1[0].op.mask[1]) and torch.equal(alone[0].y[0], p1[0].y[1])
    with pytest.raises(ValueError, match="coverage"):
        inpainting_problems(images, coverage=1.5, seed=0)
    with pytest.raises(ValueError, match=r"\(1, C, H, W\)"):
        inpainting_problems([torch.rand(2, 3, 16, 16)], seed=0)


def test_inpainting_table_scores_y_first_and_an_image_alone_scores_as_in_the_batch(inpainting):
    from jpmap_core.experiments.natural import OBSERVATION, Restorations, inpainting_claims, inpainting_table

    kept = Restorations()
    rows, per_image, hidden = inpainting_table(_images(), inpainting, seed=1, restorations=kept)
    assert [r["method"] for r in rows] == [OBSERVATION, "pnp_hvae", "epll", "tv"]
    assert all(r["n_images"] == 3 and math.isfinite(r["psnr_mean"]) for r in rows)
    assert len(hidden) == 3 and min(hidden) >= 0.1
    assert len(kept.restored[("inpainting", 3.0, "tv")]) == 3 and len(kept.observed[("inpainting", 3.0)]) == 3
    assert kept.restored[("inpainting", 3.0, "tv")][1].shape == _images()[1].shape
    # filling the holes beats leaving them at 0: EPLL (from the conjugate-gradient Wiener start) and PnP-HVAE (whose
    # x-step fills them with mu_theta(z)) are above y's PSNR; TV, 3 MFISTA steps from A^T y here, has barely moved
    psnrs = {r["method"]: r["psnr_mean"] for r in rows}
    assert psnrs["epll"] > psnrs[OBSERVATION] + 5 and psnrs["pnp_hvae"] > psnrs[OBSERVATION]
    some = {m: inpainting[m] for m in ("tv", "pnp_hvae")}
    _, alone, _ = inpainting_table(_images()[1:2], some, seed=2)  # image 1 of the table: seed 1 + 1
    for m in some:
        assert float(alone[m]["psnr"][0]) == pytest.approx(float(per_image[m]["psnr"][1]), abs=1e-4), m
    c = inpainting_claims(per_image)
    assert c["n_images"] == 3 and 0 <= c["image_wins"] <= 3
    assert c["a_beats_b"] == (c["pnp_hvae_psnr"] > c["epll_psnr"])
    with pytest.raises(ValueError, match="name"):
        inpainting_table(_images(), {OBSERVATION: inpainting["tv"]})


def test_a_cached_table_is_read_back_without_solving_again(methods, tmp_path, monkeypatch):
    import jpmap_core.experiments.natural as nat

    k = {"box": torch.ones(3, 3) / 9}
    some = {m: methods[m] for m in ("wiener", "pnp_hvae")}
    rows, first = deblurring_table(_images(), k, [7.65], some, seed=3, cache=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 * 2  # two methods x two batches (sizes)

    def no_solving(*args, **kwargs):
        raise AssertionError("solved again although the cache holds the call")

    monkeypatch.setattr(nat, "solve", no_solving)
    rows2, second = deblurring_table(_images(), k, [7.65], some, seed=3, cache=tmp_path)
    for key in first:
        assert torch.equal(first[key]["psnr"], second[key]["psnr"])
    assert [r["seconds_per_image"] for r in rows] == pytest.approx([r["seconds_per_image"] for r in rows2])
    with pytest.raises(AssertionError, match="solved again"):  # another noise draw is another call
        deblurring_table(_images(), k, [7.65], some, seed=4, cache=tmp_path)


def test_deblurring_table_keeps_the_cells_it_is_asked_for_and_scores_y(methods):
    from jpmap_core.experiments.natural import OBSERVATION, Restorations

    k = {"box": torch.ones(3, 3) / 9}
    kept = Restorations()
    some = {"wiener": methods["wiener"]}
    rows, _ = deblurring_table(_images(), k, [7.65, 12.75], some, keep=[("box", 12.75)], restorations=kept,
                               observation=True)  # fmt: skip
    assert [r["method"] for r in rows] == [OBSERVATION, "wiener"] * 2
    assert set(kept.restored) == {("box", 12.75, "wiener")} and set(kept.observed) == {("box", 12.75)}
    assert rows[2]["psnr_mean"] < rows[0]["psnr_mean"]  # more noise, lower observation PSNR
    with pytest.raises(ValueError, match="not run"):
        deblurring_table(_images(), k, [7.65], some, keep=[("box", 2.55)], restorations=Restorations())
    with pytest.raises(ValueError, match="restorations"):
        deblurring_table(_images(), k, [7.65], some, keep=[("box", 7.65)])


def test_latent_group_table_has_one_row_per_prior_with_its_L_and_size():
    from jpmap_core.experiments.natural import latent_group_table, plot_latent_groups

    priors = {"two": _tiny_hvae((1, 1)), "three": _tiny_hvae((1, 2), seed=1)}
    k = {"box": torch.ones(3, 3) / 9}
    rows, per_image = latent_group_table(priors, _images(), k, [7.65, 12.75], max_iters=2, seed=0)
    assert [r["name"] for r in rows] == ["two", "three"] and [r["L"] for r in rows] == [2, 3]
    for r, prior in zip(rows, priors.values(), strict=True):
        assert r["n_params"] == sum(p.numel() for p in prior.parameters()) and r["n_images"] == 3
        every = torch.cat([per_image[("box", s, r["name"])]["psnr"] for s in (7.65, 12.75)])
        assert r["psnr_mean"] == pytest.approx(float(every.mean()))
        assert len(r["psnr_by_sigma"]) == 2
    plot_latent_groups(rows)
    with pytest.raises(TypeError, match="not a hierarchical VAE"):
        latent_group_table({"gmm": PatchGMM(n_components=2, patch_size=3, channels=3)}, _images(), k, [7.65])


def test_a_missing_table4_prior_fails_with_the_loaders_error(tmp_path):
    from jpmap_core.pretrained import PretrainedError, load_pretrained

    with pytest.raises(PretrainedError, match="bsd_patch_hvae_l99"):
        load_pretrained("bsd_patch_hvae_l99")


def test_deblurring_claims_compare_means_over_kernels_and_count_image_wins():
    from jpmap_core.experiments.natural import deblurring_claims

    t = torch.tensor
    per_image = {
        ("k1", 2.55, "pnp_hvae"): {"psnr": t([30.0, 20.0])}, ("k1", 2.55, "epll"): {"psnr": t([29.0, 22.0])},
        ("k2", 2.55, "pnp_hvae"): {"psnr": t([26.0, 26.0])}, ("k2", 2.55, "epll"): {"psnr": t([25.0, 25.0])},
        ("k1", 7.65, "pnp_hvae"): {"psnr": t([20.0, 20.0])}, ("k1", 7.65, "epll"): {"psnr": t([21.0, 21.0])},
    }  # fmt: skip
    c = deblurring_claims(per_image)
    low, high = c["per_sigma"]
    assert low["sigma"] == 2.55 and low["pnp_hvae_psnr"] == pytest.approx(25.5) and low["epll_psnr"] == 25.25
    assert low["a_beats_b"] and low["image_wins"] == 3 and low["pairs"] == 4
    assert not high["a_beats_b"] and high["image_wins"] == 0
    assert c["holds_every_sigma"] is False and c["sigmas_where_it_holds"] == 1
    with pytest.raises(ValueError, match="both"):
        deblurring_claims({k: v for k, v in per_image.items() if k[2] != "epll"})


def test_markdown_tables_list_the_unavailable_baselines_and_the_papers_values(methods):
    from jpmap_core.experiments.natural import PAPER_TABLE2, markdown_table, plot_restorations, sensitivity_methods

    rows, _ = deblurring_table(_images()[:1], {"box": torch.ones(3, 3) / 9}, [7.65], {"wiener": methods["wiener"]})
    text = markdown_table(rows, by_sigma=True, paper=PAPER_TABLE2)
    assert "GS-PnP | not run" in text and "PnP-MMO | not run" in text and "24.04 / 0.66 / 0.45" not in text
    assert "| 7.65 | Wiener |" in text and "n/a" in text  # LPIPS offline
    x = _images()[0]
    plot_restorations([("a", x, x, {"tv": x}), ("b", _images()[1], _images()[1], {"tv": _images()[1]})])
    grid = sensitivity_methods(_tiny_hvae(), gammas=[None, 10 / 255], taus=[0.6, 0.8], max_iters=[50])
    assert len(grid) == 4 and "gamma=10/255,tau=0.6,iters=50" in grid and "gamma=learned,tau=0.8,iters=50" in grid


def test_images_of_any_size_are_restored_whole_and_batched_by_size():
    """The patch prior restores whole images whose sides are not multiples of its stride (padded for the HVAE, cropped
    back), and images of the same size go through one batch: the scores equal those of each image alone."""
    from jpmap_core.experiments.natural import Restorations

    hvae = _tiny_hvae()
    assert hvae.stride == 2
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(1, 3, h, w, generator=g) for h, w in [(17, 21), (16, 16), (17, 21)]]
    some = {"pnp_hvae": DeblurMethod("pnp_hvae", hvae, {"max_iters": 3, "tau": 0.8})}
    k = {"box": torch.ones(3, 3) / 9}
    kept = Restorations()
    _, together = deblurring_table(images, k, [7.65], some, seed=0, keep=[("box", 7.65)], restorations=kept)
    shapes = [tuple(x.shape) for x in kept.restored[("box", 7.65, "pnp_hvae")]]
    assert shapes == [(1, 3, 17, 21), (1, 3, 16, 16), (1, 3, 17, 21)]
    _, alone = deblurring_table(images[2:], k, [7.65], some, seed=2)  # image 2 alone: its noise seeded with 0 + 2
    assert float(alone[("box", 7.65, "pnp_hvae")]["psnr"][0]) == pytest.approx(
        float(together[("box", 7.65, "pnp_hvae")]["psnr"][2]), abs=1e-4
    )
