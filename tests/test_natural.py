"""PnP-HVAE Table 2 runner (BSD deblurring, every method on the same images and noise), on tiny sizes."""

from __future__ import annotations

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
