"""Degradation operators: adjointness, closed-form prox against dense solves, noise, deepinv agreement, errors."""

from __future__ import annotations

import math

import deepinv as dinv
import numpy as np
import pytest
import torch

from jpmap_core.operators import (
    BatchBlocks,
    BlurFFT,
    CompressedSensing,
    Denoising,
    Inpainting,
    LinearOperator,
    SuperResolution,
    as_operator,
)

B = 3
F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kernel(kh: int, kw: int, seed: int = 0) -> torch.Tensor:
    k = torch.rand(kh, kw, generator=gen(seed)) + 0.1
    return k / k.sum()


class DenseOperator(LinearOperator):
    """Test-only operator given by a dense matrix; it defines no ``_prox``, so it exercises the CG fallback."""

    cg_tol = 1e-13

    def __init__(self, matrix: torch.Tensor, image_shape: tuple[int, int, int]):
        super().__init__(image_shape)
        self.matrix = matrix

    def _A(self, x):
        return x.flatten(1) @ self.matrix.to(x).T

    def _A_adjoint(self, y):
        return (y @ self.matrix.to(y)).reshape(y.shape[0], *self.image_shape)


CASES = {
    "denoising": (lambda: Denoising(), (B, 2, 5, 6)),
    "inpainting_shared_mask": (
        lambda: Inpainting(image_shape=(3, 6, 6), missing=0.5, generator=gen(1)),
        (B, 3, 6, 6),
    ),
    "inpainting_mask_per_image": (
        lambda: Inpainting(image_shape=(1, 8, 8), missing=0.3, batch_size=B, generator=gen(2)),
        (B, 1, 8, 8),
    ),
    "cs_woodbury": (lambda: CompressedSensing(20, (1, 8, 8), generator=gen(3), method="woodbury"), (B, 1, 8, 8)),
    "cs_cholesky": (lambda: CompressedSensing(20, (1, 8, 8), generator=gen(3), method="cholesky"), (B, 1, 8, 8)),
    "cs_auto_more_measurements_than_pixels": (
        lambda: CompressedSensing(40, (1, 5, 6), generator=gen(4)),
        (B, 1, 5, 6),
    ),
    "blur_even_kernel": (lambda: BlurFFT(kernel(3, 4, 5), (2, 8, 10)), (B, 2, 8, 10)),
    "blur_odd_kernel": (lambda: BlurFFT(kernel(5, 5, 6), (1, 8, 8)), (B, 1, 8, 8)),
    "superresolution_x2": (lambda: SuperResolution(kernel(3, 3, 7), 2, (2, 8, 12)), (B, 2, 8, 12)),
    "superresolution_x3_even_kernel": (lambda: SuperResolution(kernel(4, 4, 8), 3, (1, 9, 9)), (B, 1, 9, 9)),
    "batch_blocks_cs_and_per_image_masks": (  # measurements padded from m = 20 to M = 64
        lambda: BatchBlocks(
            [
                CompressedSensing(20, (1, 8, 8), generator=gen(12)),
                Inpainting(image_shape=(1, 8, 8), missing=0.4, batch_size=2, generator=gen(13)),
            ],
            [1, 2],
        ),
        (B, 1, 8, 8),
    ),
    "batch_blocks_three_problems": (
        lambda: BatchBlocks(
            [Denoising(), CompressedSensing(30, (1, 8, 8), generator=gen(14)), BlurFFT(kernel(3, 3, 15), (1, 8, 8))],
            [1, 1, 1],
        ),
        (B, 1, 8, 8),
    ),
    "cg_fallback_dense": (
        lambda: DenseOperator(torch.randn(30, 48, generator=gen(9)) / math.sqrt(30), (3, 4, 4)),
        (B, 3, 4, 4),
    ),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: a thread pool only adds start-up and contention (minutes on busy cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=list(CASES))
def case(request):
    make, x_shape = CASES[request.param]
    return make(), x_shape


def dense_matrices(op: LinearOperator, x_shape) -> torch.Tensor:
    """``(B, n_out, d)``: the matrix of ``A`` for each image, by applying ``A`` to the identity basis.

    Basis vector ``j`` is put in every slot of the batch, so per-image operators give their own matrices.
    """
    d = math.prod(x_shape[1:])
    cols = []
    for j in range(d):
        e = torch.zeros(d, dtype=F64)
        e[j] = 1
        cols.append(op.A(e.reshape(x_shape[1:]).expand(x_shape).contiguous()).flatten(1))
    return torch.stack(cols, dim=-1)


def random_pair(op: LinearOperator, x_shape, seed: int = 0):
    g = gen(seed)
    x = torch.randn(x_shape, generator=g, dtype=F64)
    y = torch.randn(op.output_shape(x_shape), generator=g, dtype=F64)
    return x, y


def per_image_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.flatten(1) * b.flatten(1)).sum(1)


# ---- properties every operator has ----------------------------------------------------------------------
def test_adjoint_satisfies_inner_product_identity(case):
    op, x_shape = case
    x, y = random_pair(op, x_shape)
    torch.testing.assert_close(per_image_dot(op.A(x), y), per_image_dot(x, op.A_adjoint(y)), rtol=1e-10, atol=1e-10)


def test_output_shape_is_the_shape_of_A_x(case):
    op, x_shape = case
    x, _ = random_pair(op, x_shape)
    assert tuple(op.A(x).shape) == op.output_shape(x_shape)


GAMMAS = {
    "scalar": 0.7,
    "per_image_vector": torch.tensor([0.3, 2.0, 15.0]),
    "per_image_4d": torch.tensor([0.3, 2.0, 15.0]).reshape(B, 1, 1, 1),
    "per_image_with_repeats": torch.tensor([2.0, 0.5, 2.0]),
}


@pytest.mark.parametrize("gamma", GAMMAS.values(), ids=GAMMAS.keys())
def test_prox_l2_matches_dense_solve(case, gamma):
    op, x_shape = case
    z, y = random_pair(op, x_shape, seed=1)
    mats = dense_matrices(op, x_shape)
    g = (gamma if isinstance(gamma, torch.Tensor) else torch.full((B,), gamma, dtype=F64)).reshape(B, 1, 1).to(F64)
    eye = torch.eye(mats.shape[-1], dtype=F64)
    lhs = eye + g * mats.transpose(1, 2) @ mats
    rhs = z.flatten(1) + g[:, :, 0] * (mats.transpose(1, 2) @ y.flatten(1)[..., None])[..., 0]
    expected = torch.linalg.solve(lhs, rhs).reshape(x_shape)
    torch.testing.assert_close(op.prox_l2(z, y, gamma), expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("eps", [1e-3, 0.1])
def test_A_dagger_matches_regularised_lstsq(case, eps):
    op, x_shape = case
    _, y = random_pair(op, x_shape, seed=2)
    mats = dense_matrices(op, x_shape)
    d = mats.shape[-1]
    stacked = torch.cat([mats, math.sqrt(eps) * torch.eye(d, dtype=F64).expand(B, d, d)], dim=1)
    rhs = torch.cat([y.flatten(1), torch.zeros(B, d, dtype=F64)], dim=1)[..., None]
    expected = torch.linalg.lstsq(stacked, rhs).solution[..., 0].reshape(x_shape)
    out = op.A_dagger(y) if eps == 1e-3 else op.A_dagger(y, eps=eps)
    torch.testing.assert_close(out, expected, rtol=1e-7, atol=1e-7)


def test_rows_is_the_operator_of_a_subset_of_the_images(case):
    """``op.rows(idx)`` applied to images ``idx`` equals ``op`` applied to the batch, restricted to ``idx``."""
    op, x_shape = case
    x, y = random_pair(op, x_shape)
    z = torch.rand(x_shape, generator=gen(11), dtype=x.dtype)
    gamma = torch.tensor([0.5, 3.0, 20.0], dtype=x.dtype)[: x_shape[0]]
    for idx in (torch.tensor([2, 0]), torch.tensor([1])):
        sub = op.rows(idx)
        assert sub is not None
        torch.testing.assert_close(sub.A(x[idx]), op.A(x)[idx], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sub.A_adjoint(y[idx]), op.A_adjoint(y)[idx], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            sub.prox_l2(z[idx], y[idx], gamma[idx]), op.prox_l2(z, y, gamma)[idx], rtol=1e-5, atol=1e-5
        )
    if isinstance(op, Inpainting) and op.mask.shape[0] > 1:
        with pytest.raises(ValueError, match="batch size"):  # the subset's masks, not the batch's
            op.rows(torch.tensor([0, 1])).A(x)


def test_degrade_is_reproducible_with_a_seeded_generator(case):
    op, x_shape = case
    x = torch.rand(x_shape, generator=gen(0))
    y1, y2 = op.degrade(x, 10, generator=gen(5)), op.degrade(x, 10, generator=gen(5))
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert not torch.equal(y1, op.degrade(x, 10, generator=gen(6)))
    torch.testing.assert_close(op.degrade(x, 0, generator=gen(5)), op.A(x), rtol=0, atol=0)


def test_degrade_noise_has_std_sigma_over_255(case):
    op, x_shape = case
    x = torch.rand(x_shape, generator=gen(0))
    ax = op.A(x)
    g = gen(11)
    keep = op.measured(ax) if isinstance(op, BatchBlocks) else torch.ones_like(ax, dtype=torch.bool)
    samples = torch.cat([(op.degrade(x, 25, generator=g) - ax)[keep] for _ in range(300)]).double()
    n = samples.numel()
    assert abs(float(samples.mean())) < 5 * (25 / 255) / math.sqrt(n)
    assert float(samples.std()) == pytest.approx(25 / 255, rel=0.03)


# ---- operator-specific properties -------------------------------------------------------------------------
def test_batch_blocks_is_each_block_operator_on_its_images():
    """A, A^T, prox_l2 (per-image gamma), A_dagger and degrade of a BatchBlocks are those of each block's own
    operator on its images, with the measurements zero-padded to the longest block's m."""
    cs40, cs80 = (CompressedSensing(m, (1, 8, 8), generator=gen(m)) for m in (40, 80))
    masks = Inpainting(image_shape=(1, 8, 8), missing=0.5, batch_size=2, generator=gen(3))
    ops, sizes = [cs40, masks, cs80, Denoising()], [2, 2, 1, 2]
    op = BatchBlocks(ops, sizes)
    assert op.output_shape((7, 1, 8, 8)) == (7, 80) and op.d == 64
    x = torch.rand(7, 1, 8, 8, generator=gen(0), dtype=F64)
    z = torch.rand(7, 1, 8, 8, generator=gen(1), dtype=F64)
    gamma = torch.linspace(0.5, 20.0, 7, dtype=F64)
    blocks = [slice(0, 2), slice(2, 4), slice(4, 5), slice(5, 7)]
    ys = [
        o.degrade(x[b].float(), 10, generator=gen(20 + k)).double()
        for k, (o, b) in enumerate(zip(ops, blocks, strict=True))
    ]
    y = op.pack(ys)
    assert y.shape == (7, 80) and not bool(y[~op.measured()].any())
    ax, aty, prox, dag = op.A(x), op.A_adjoint(y), op.prox_l2(z, y, gamma), op.A_dagger(y)
    for k, (o, b) in enumerate(zip(ops, blocks, strict=True)):
        m = math.prod(o.output_shape((1, 1, 8, 8))[1:])
        torch.testing.assert_close(ax[b, :m], o.A(x[b]).flatten(1), rtol=0, atol=1e-12)
        assert not bool(ax[b, m:].any())
        torch.testing.assert_close(aty[b], o.A_adjoint(ys[k]), rtol=0, atol=1e-12)
        torch.testing.assert_close(prox[b], o.prox_l2(z[b], ys[k], gamma[b]), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dag[b], o.A_dagger(ys[k]), rtol=1e-10, atol=1e-10)
    noisy = op.degrade(x.float(), 25, generator=gen(5))
    assert not bool(noisy[~op.measured()].any())  # the padding carries no noise
    assert "CompressedSensing x2" in repr(op)


def test_batch_blocks_rejects_what_it_cannot_stack():
    cs = CompressedSensing(20, (1, 8, 8), generator=gen(0))
    with pytest.raises(ValueError, match="one block size per operator"):
        BatchBlocks([cs, Denoising()], [1])
    with pytest.raises(ValueError, match="one image shape"):
        BatchBlocks([cs, CompressedSensing(20, (1, 6, 6), generator=gen(0))], [1, 1])
    with pytest.raises(ValueError, match="give image_shape"):
        BatchBlocks([Denoising()], [2])
    with pytest.raises(ValueError, match="sizes"):
        BatchBlocks([cs], [0])
    with pytest.raises(TypeError, match="deepinv"):
        BatchBlocks([as_operator(dinv.physics.Denoising(), (1, 8, 8))], [1])
    with pytest.raises(ValueError, match="holds 3 images"):
        BatchBlocks([cs, Denoising()], [1, 2]).A(torch.rand(4, 1, 8, 8))
    op = BatchBlocks([cs, Denoising()], [1, 2])
    with pytest.raises(ValueError, match="ys\\[1\\] has shape"):
        op.pack([torch.rand(1, 20), torch.rand(1, 1, 8, 8)])
    with pytest.raises(ValueError, match="every block whole"):
        op.rows(torch.tensor([1, 2])).pack([torch.rand(0, 20), torch.rand(2, 1, 8, 8)])


def test_random_inpainting_mask_drops_whole_pixels_at_the_missing_rate():
    op = Inpainting(image_shape=(3, 28, 28), missing=0.8, batch_size=4, generator=gen(0))
    assert tuple(op.mask.shape) == (4, 3, 28, 28)
    assert bool((op.mask == op.mask[:, :1]).all()), "all channels share the pixel mask"
    for missing in 1 - op.mask[:, 0].flatten(1).mean(1):
        assert float(missing) == pytest.approx(0.8, abs=0.05)
    assert not torch.equal(op.mask[0], op.mask[1]), "one mask per image"
    same = Inpainting(image_shape=(3, 28, 28), missing=0.8, batch_size=4, generator=gen(0))
    assert torch.equal(op.mask, same.mask)
    assert bool((Inpainting(image_shape=(1, 4, 4), missing=0.0).mask == 1).all())


def test_block_inpainting_masks_exactly_the_fraction_in_whole_grid_aligned_blocks():
    """AIPO §4.4: random 4x4 blocks such that in total the masked portion is 25%."""
    op = Inpainting(image_shape=(3, 32, 32), missing=0.25, batch_size=5, generator=gen(0), block=4)
    m = op.mask
    assert tuple(m.shape) == (5, 3, 32, 32) and bool((m == m[:, :1]).all())
    assert torch.equal(1 - m[:, 0].flatten(1).mean(1), torch.full((5,), 0.25)), "exactly 16 of the 64 blocks"
    blocks = m[:, 0].unfold(1, 4, 4).unfold(2, 4, 4)  # (B, 8, 8, 4, 4): the grid's blocks
    assert bool((blocks == blocks[..., :1, :1]).all()), "every grid block is wholly observed or wholly missing"
    assert len({tuple(mi.flatten().tolist()) for mi in m[:, 0]}) == 5, "one mask per image"
    same = Inpainting(image_shape=(3, 32, 32), missing=0.25, batch_size=5, generator=gen(0), block=4)
    assert torch.equal(m, same.mask)
    pixels = Inpainting(image_shape=(3, 32, 32), missing=0.25, batch_size=5, generator=gen(0))
    assert torch.equal(Inpainting(image_shape=(3, 32, 32), missing=0.25, batch_size=5, generator=gen(0),
                                  block=None).mask, pixels.mask)  # fmt: skip
    one = Inpainting(image_shape=(1, 8, 8), missing=0.5, batch_size=2, generator=gen(1), block=1)
    assert torch.equal(1 - one.mask.flatten(1).mean(1), torch.full((2,), 0.5))


def test_block_inpainting_through_make_problem_and_its_errors():
    from jpmap_core.operators import make_problem

    x = torch.rand(2, 3, 32, 32, generator=gen(0))
    p = make_problem("inpainting", x, sigma=5.1, level=0.25, seed=0, block=4)
    assert torch.equal(1 - p.op.mask[:, 0].flatten(1).mean(1), torch.full((2,), 0.25))
    with pytest.raises(ValueError, match="must divide the image's height and width, got 32x32"):
        make_problem("inpainting", x, sigma=5.1, level=0.25, seed=0, block=5)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="block .* must be an integer >= 1"):
            Inpainting(image_shape=(3, 32, 32), missing=0.25, block=bad)
    with pytest.raises(ValueError, match="inpainting option; denoising takes none"):
        make_problem("denoising", x, sigma=5.1, seed=0, block=4)
    with pytest.raises(ValueError, match="give either mask or missing"):
        Inpainting(torch.ones(1, 3, 32, 32), block=4)


def test_shared_inpainting_mask_applies_to_every_image_of_any_batch():
    op = Inpainting(image_shape=(1, 6, 6), missing=0.5, generator=gen(0))
    x = torch.rand(5, 1, 6, 6, generator=gen(1))
    torch.testing.assert_close(op.A(x), op.mask * x)
    torch.testing.assert_close(Inpainting(op.mask.bool()).A(x), op.mask * x)


def test_cs_matrix_entries_have_mean_zero_and_variance_one_over_m():
    m = 300
    a = CompressedSensing(m, (1, 28, 28), generator=gen(0)).matrix
    assert tuple(a.shape) == (m, 784)
    n = a.numel()
    assert abs(float(a.mean())) < 5 * math.sqrt(1 / m / n)
    assert float(a.var()) == pytest.approx(1 / m, rel=0.02)


def test_cs_same_seed_gives_same_matrix_as_official_recipe_and_deepinv():
    m, shape = 40, (1, 8, 8)
    a = CompressedSensing(m, shape, generator=gen(5)).matrix
    assert torch.equal(a, CompressedSensing(m, shape, generator=gen(5)).matrix)
    assert not torch.equal(a, CompressedSensing(m, shape, generator=gen(6)).matrix)
    torch.testing.assert_close(a, torch.randn(m, 64, generator=gen(5)) / math.sqrt(m))
    torch.testing.assert_close(a, dinv.physics.CompressedSensing(m, shape, rng=gen(5))._A)


@pytest.mark.parametrize("m", [40, 140])
def test_cs_cholesky_and_woodbury_give_the_same_prox(m):
    chol = CompressedSensing(m, (1, 28, 28), generator=gen(0), method="cholesky")
    wood = CompressedSensing(m, (1, 28, 28), matrix=chol.matrix, method="woodbury")
    z = torch.rand(4, 1, 28, 28, generator=gen(1))
    y = chol.degrade(torch.rand(4, 1, 28, 28, generator=gen(2)), 10, generator=gen(3))
    for gamma in (1.5, torch.tensor([0.5, 2.0, 10.0, 2.0])):
        torch.testing.assert_close(chol.prox_l2(z, y, gamma), wood.prox_l2(z, y, gamma), rtol=1e-4, atol=1e-4)


def test_cs_auto_method_is_woodbury_with_fewer_measurements_than_pixels():
    assert CompressedSensing(140, (1, 28, 28)).resolved_method == "woodbury"
    assert CompressedSensing(40, (1, 5, 6)).resolved_method == "cholesky"


def test_cs_factorisation_is_cached_per_gamma_and_the_cache_is_bounded():
    op = CompressedSensing(20, (1, 8, 8), generator=gen(0), cache_size=4)
    z = torch.rand(2, 1, 8, 8, generator=gen(1))
    y = op.A(z)
    op.prox_l2(z, y, 2.0)
    (factor,) = op._factors.values()
    op.prox_l2(z, y, 2.0)
    assert len(op._factors) == 1 and next(iter(op._factors.values())) is factor
    for gamma in range(1, 10):
        op.prox_l2(z, y, float(gamma))
    assert len(op._factors) == 4


def test_prox_l2_with_gamma_one_over_beta_sigma2_is_the_jpmap_x_step_eq_2_7():
    op = CompressedSensing(30, (1, 6, 6), generator=gen(0))
    mu, y = random_pair(op, (2, 1, 6, 6))
    beta, sigma = 400.0, 10 / 255
    a = op.matrix.double()
    lhs = a.T @ a + sigma**2 * beta * torch.eye(36, dtype=F64)
    rhs = (y @ a + sigma**2 * beta * mu.flatten(1)).T
    expected = torch.linalg.solve(lhs, rhs).T.reshape(mu.shape)
    torch.testing.assert_close(op.prox_l2(mu, y, 1 / (beta * sigma**2)), expected)


def test_blur_A_places_the_unflipped_kernel_centred_on_a_delta():
    k = kernel(3, 5)
    delta = torch.zeros(1, 1, 9, 11)
    delta[0, 0, 4, 5] = 1
    out = BlurFFT(k, (1, 9, 11)).A(delta)[0, 0]
    torch.testing.assert_close(out[3:6, 3:8], k, rtol=1e-5, atol=1e-6)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5)


def test_superresolution_keeps_every_factor_th_pixel_of_the_blurred_image():
    k = kernel(3, 3)
    x = torch.rand(2, 3, 12, 12, generator=gen(0))
    blurred = BlurFFT(k, (3, 12, 12)).A(x)
    torch.testing.assert_close(SuperResolution(k, 3, (3, 12, 12)).A(x), blurred[..., ::3, ::3])


# ---- agreement with deepinv ---------------------------------------------------------------------------------
def deepinv_pairs():
    mask = Inpainting(image_shape=(3, 8, 8), missing=0.6, generator=gen(0)).mask
    k_odd, k_even = kernel(5, 5, 1), kernel(4, 6, 2)
    shape = (3, 16, 12)
    return {
        "inpainting": (Inpainting(mask), dinv.physics.Inpainting(img_size=(3, 8, 8), mask=mask.clone()), (B, 3, 8, 8)),
        "denoising": (Denoising(), dinv.physics.Denoising(), (B, 3, 8, 8)),
        "blur_odd_kernel": (BlurFFT(k_odd, shape), dinv.physics.BlurFFT(shape, filter=k_odd[None, None]), (B, *shape)),
        "blur_even_kernel": (
            BlurFFT(k_even, shape),
            dinv.physics.BlurFFT(shape, filter=k_even[None, None]),
            (B, *shape),
        ),
    }


DEEPINV = list(deepinv_pairs())


@pytest.mark.parametrize("name", DEEPINV)
def test_A_adjoint_and_prox_match_deepinv(name):
    ours, theirs, x_shape = deepinv_pairs()[name]
    g = gen(0)
    x = torch.rand(x_shape, generator=g)
    y = torch.randn(x_shape, generator=g)
    torch.testing.assert_close(ours.A(x), theirs.A(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.A_adjoint(y), theirs.A_adjoint(y), rtol=1e-5, atol=1e-5)
    # deepinv takes a per-image gamma as (B, 1, 1, 1) (a (B,) tensor would broadcast against the width)
    for gamma in (0.8, torch.tensor([0.5, 3.0, 20.0]).reshape(B, 1, 1, 1)):
        torch.testing.assert_close(ours.prox_l2(x, y, gamma), theirs.prox_l2(x, y, gamma), rtol=1e-5, atol=1e-5)


def test_superresolution_matches_deepinv_circular_downsampling():
    k, shape = kernel(5, 5, 3), (3, 12, 12)
    ours = SuperResolution(k, 2, shape)
    theirs = dinv.physics.Downsampling(img_size=shape, filter=k[None, None], factor=2, padding="circular")
    g = gen(0)
    x, z = torch.rand(B, *shape, generator=g), torch.rand(B, *shape, generator=g)
    y = torch.randn(B, 3, 6, 6, generator=g)
    torch.testing.assert_close(ours.A(x), theirs.A(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.A_adjoint(y), theirs.A_adjoint(y), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.prox_l2(z, y, 2.5), theirs.prox_l2(z, y, 2.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", DEEPINV)
def test_as_operator_wrapper_gives_the_same_results_as_the_native_operator(name):
    native, physics, x_shape = deepinv_pairs()[name]
    wrapped = as_operator(physics)
    g = gen(1)
    x, z = torch.rand(x_shape, generator=g), torch.rand(x_shape, generator=g)
    y = native.degrade(x, 10, generator=gen(2))
    torch.testing.assert_close(wrapped.degrade(x, 10, generator=gen(2)), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wrapped.A(x), native.A(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wrapped.A_adjoint(y), native.A_adjoint(y), rtol=1e-5, atol=1e-5)
    gamma = torch.tensor([0.5, 3.0, 20.0])
    torch.testing.assert_close(wrapped.prox_l2(z, y, gamma), native.prox_l2(z, y, gamma), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wrapped.A_dagger(y), native.A_dagger(y), rtol=1e-4, atol=1e-4)


def test_wrapped_deepinv_physics_cannot_be_restricted_to_rows():
    """A third-party physics may hold per-image data: solvers must apply it to the whole batch."""
    assert as_operator(dinv.physics.Denoising()).rows(torch.tensor([0])) is None


def test_as_operator_on_deepinv_compressed_sensing_solves_prox_by_conjugate_gradients():
    physics = dinv.physics.CompressedSensing(20, (1, 8, 8), rng=gen(3))
    wrapped = as_operator(physics)
    native = CompressedSensing(20, (1, 8, 8), generator=gen(3))
    assert wrapped.image_shape == (1, 8, 8)
    z = torch.rand(B, 1, 8, 8, generator=gen(0))
    y = native.degrade(torch.rand(B, 1, 8, 8, generator=gen(1)), 10, generator=gen(2))
    gamma = torch.tensor([0.5, 3.0, 20.0])
    torch.testing.assert_close(wrapped.prox_l2(z, y, gamma), native.prox_l2(z, y, gamma), rtol=1e-4, atol=1e-4)


def test_as_operator_returns_native_operators_unchanged():
    op = Denoising()
    assert as_operator(op) is op


# ---- bad input --------------------------------------------------------------------------------------------
def _z(*shape):
    return torch.rand(*shape, generator=gen(0))


def _nan_y():
    y = _z(2, 1, 4, 4)
    y[0, 0, 1, 1] = float("nan")
    return y


def _cs():
    return CompressedSensing(20, (1, 8, 8), generator=gen(0))


def _masks3():
    return Inpainting(image_shape=(1, 8, 8), missing=0.5, batch_size=3, generator=gen(0))


BAD = {
    "x_wrong_image_shape": (
        lambda: BlurFFT(kernel(3, 3), (1, 8, 8)).A(_z(1, 1, 9, 8)),
        ValueError,
        r"x has shape \(1, 1, 9, 8\) but BlurFFT was built for images of shape \(C, H, W\) = \(1, 8, 8\)",
    ),
    "x_not_4d": (lambda: Denoising().A(_z(8, 8)), ValueError, r"x must have shape \(B, C, H, W\)"),
    "x_not_tensor": (lambda: Denoising().A(np.zeros((1, 1, 4, 4))), TypeError, "x must be a torch.Tensor"),
    "y_wrong_shape": (
        lambda: Inpainting(torch.ones(1, 1, 8, 8)).A_adjoint(_z(2, 3, 8, 8)),
        ValueError,
        r"y has shape \(2, 3, 8, 8\) but Inpainting produces \(2, 1, 8, 8\) for images of shape \(2, 1, 8, 8\)",
    ),
    "y_wrong_number_of_measurements": (
        lambda: _cs().A_adjoint(_z(2, 21)),
        ValueError,
        r"y has shape \(2, 21\) but CompressedSensing produces \(2, 20\)",
    ),
    "y_batch_differs_from_z": (
        lambda: Denoising().prox_l2(_z(2, 1, 4, 4), _z(3, 1, 4, 4), 1.0),
        ValueError,
        r"y has shape \(3, 1, 4, 4\) but Denoising produces \(2, 1, 4, 4\)",
    ),
    "mask_batch_3_vs_x_batch_5": (
        lambda: _masks3().A(_z(5, 1, 8, 8)),
        ValueError,
        "mask has batch size 3 but x has batch size 5",
    ),
    "mask_batch_3_vs_z_batch_5_in_prox": (
        lambda: _masks3().prox_l2(_z(5, 1, 8, 8), _z(5, 1, 8, 8), 1.0),
        ValueError,
        "mask has batch size 3 but z has batch size 5",
    ),
    "mask_not_binary": (
        lambda: Inpainting(torch.full((1, 1, 4, 4), 0.5)),
        ValueError,
        "mask must contain only 0 and 1",
    ),
    "mask_not_4d": (lambda: Inpainting(torch.ones(1, 4, 4)), ValueError, r"mask must have shape \(B, C, H, W\)"),
    "mask_and_missing": (
        lambda: Inpainting(torch.ones(1, 1, 4, 4), missing=0.5),
        ValueError,
        "either mask or missing",
    ),
    "no_mask_no_missing": (lambda: Inpainting(image_shape=(1, 4, 4)), ValueError, "needs a mask"),
    "missing_is_one": (lambda: Inpainting(image_shape=(1, 4, 4), missing=1.0), ValueError, "missing"),
    "missing_negative": (lambda: Inpainting(image_shape=(1, 4, 4), missing=-0.1), ValueError, "missing"),
    "nan_in_y": (lambda: Denoising().prox_l2(_z(2, 1, 4, 4), _nan_y(), 1.0), ValueError, "y contains 1 NaN"),
    "nan_in_z": (lambda: Denoising().prox_l2(_nan_y(), _z(2, 1, 4, 4), 1.0), ValueError, "z contains 1 NaN"),
    "sigma_negative": (lambda: Denoising().degrade(_z(1, 1, 4, 4), -1), ValueError, "sigma"),
    "sigma_nan": (lambda: Denoising().degrade(_z(1, 1, 4, 4), float("nan")), ValueError, "sigma"),
    "sigma_not_a_number": (lambda: Denoising().degrade(_z(1, 1, 4, 4), "ten"), TypeError, "sigma"),
    "x_on_0_255_scale_in_degrade": (
        lambda: Denoising().degrade(255 * _z(1, 1, 4, 4), 10),
        ValueError,
        r"x must have values in \[0, 1\]",
    ),
    "gamma_zero": (lambda: Denoising().prox_l2(_z(2, 1, 4, 4), _z(2, 1, 4, 4), 0.0), ValueError, "gamma"),
    "gamma_negative_entry": (
        lambda: Denoising().prox_l2(_z(2, 1, 4, 4), _z(2, 1, 4, 4), torch.tensor([1.0, -1.0])),
        ValueError,
        "gamma",
    ),
    "gamma_wrong_batch": (
        lambda: Denoising().prox_l2(_z(2, 1, 4, 4), _z(2, 1, 4, 4), torch.ones(3)),
        ValueError,
        r"gamma must be a number or one value per image, of shape \(2,\)",
    ),
    "eps_zero": (lambda: Denoising().A_dagger(_z(2, 1, 4, 4), eps=0.0), ValueError, "eps"),
    "kernel_4d": (lambda: BlurFFT(torch.ones(1, 1, 3, 3) / 9, (1, 8, 8)), ValueError, "kernel must be a 2D"),
    "kernel_1d_superresolution": (
        lambda: SuperResolution(torch.ones(3) / 3, 2, (1, 8, 8)),
        ValueError,
        "kernel must be a 2D",
    ),
    "kernel_not_tensor": (lambda: BlurFFT([[1.0]], (1, 8, 8)), TypeError, "kernel"),
    "kernel_larger_than_image": (lambda: BlurFFT(kernel(9, 3), (1, 8, 8)), ValueError, "kernel of shape"),
    "factor_does_not_divide": (
        lambda: SuperResolution(kernel(3, 3), 3, (1, 8, 8)),
        ValueError,
        "factor=3 must divide",
    ),
    "factor_zero": (lambda: SuperResolution(kernel(3, 3), 0, (1, 8, 8)), ValueError, "factor"),
    "cs_matrix_wrong_shape": (
        lambda: CompressedSensing(20, (1, 8, 8), matrix=torch.randn(20, 63)),
        ValueError,
        r"matrix has shape \(20, 63\)",
    ),
    "cs_matrix_and_generator": (
        lambda: CompressedSensing(20, (1, 8, 8), matrix=torch.randn(20, 64), generator=gen(0)),
        ValueError,
        "either matrix or generator",
    ),
    "cs_m_zero": (lambda: CompressedSensing(0, (1, 8, 8)), ValueError, "m "),
    "cs_unknown_method": (lambda: CompressedSensing(20, (1, 8, 8), method="qr"), ValueError, "method"),
    "image_shape_not_chw": (lambda: CompressedSensing(20, (8, 8)), ValueError, "image_shape"),
    "as_operator_on_non_physics": (lambda: as_operator(object()), TypeError, "physics"),
}


@pytest.mark.parametrize("call, exc, match", BAD.values(), ids=BAD.keys())
def test_bad_input_raises_error_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---- the one problem builder ------------------------------------------------------------------------------------
def test_make_problem_same_seed_same_problem_and_draws_operator_then_noise():
    from jpmap_core.operators import make_problem

    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a = make_problem("inpainting", x, sigma=10, level=0.5, seed=4)
    b = make_problem("inpainting", x, sigma=10, level=0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.y, b.y) and torch.equal(a.op.mask, b.op.mask)
    assert not torch.equal(a.op.mask[0], a.op.mask[1]), "one mask per image"
    g = torch.Generator().manual_seed(4)  # by hand: the mask first, then the noise, from one generator
    op = Inpainting(image_shape=(1, 8, 8), missing=0.5, batch_size=3, generator=g)
    assert torch.equal(op.mask, a.op.mask) and torch.equal(op.degrade(x, 10, generator=g), a.y)
    c = make_problem("inpainting", x, sigma=10, level=0.5, seed=5)
    assert not torch.equal(a.y, c.y)


def test_make_problem_shared_generator_draws_problems_one_after_the_other():
    from jpmap_core.operators import make_problem

    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    first = make_problem("denoising", x, sigma=20, generator=g)
    second = make_problem("compressed_sensing", x, sigma=20, level=10, generator=g)
    alone = make_problem("compressed_sensing", x, sigma=20, level=10, seed=1)
    assert not torch.equal(second.op.matrix, alone.op.matrix), "the second problem continues the generator"
    assert first.y.shape == x.shape and second.y.shape == (2, 10)


@pytest.mark.parametrize(
    "name,level,shape,observed",
    [
        ("denoising", None, (2, 3, 8, 8), True),
        ("inpainting", 0.8, (2, 3, 8, 8), True),
        ("compressed_sensing", 20, (2, 20), False),
        ("blur", None, (2, 3, 8, 8), True),
        ("super_resolution", 2, (2, 3, 4, 4), False),
    ],
)
def test_make_problem_builds_every_problem(name, level, shape, observed):
    from jpmap_core.operators import PROBLEMS, make_problem

    assert name in PROBLEMS
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    kernel = torch.full((3, 3), 1 / 9) if name in ("blur", "super_resolution") else None
    p = make_problem(name, x, sigma=5, level=level, seed=0, kernel=kernel)
    assert p.y.shape == shape and p.name == name and p.sigma == 5.0
    assert (p.observation is not None) == observed
    noiseless = make_problem(name, x, sigma=0, level=level, seed=0, kernel=kernel)
    torch.testing.assert_close(noiseless.y, noiseless.op.A(x))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "compressed sensing", "level": 10}, "unknown problem"),
        ({"name": "inpainting", "level": 80}, "fraction of missing pixels"),
        ({"name": "inpainting", "level": None}, "needs a level"),
        ({"name": "compressed_sensing", "level": 0.5}, "number of measurements"),
        ({"name": "denoising", "level": 25}, "takes no level"),
        ({"name": "blur", "level": None}, "needs a 2D kernel"),
    ],
)
def test_make_problem_refuses_bad_settings(kwargs, match):
    from jpmap_core.operators import make_problem

    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match=match):
        make_problem(kwargs["name"], x, sigma=10, level=kwargs["level"], seed=0)


def test_make_problem_needs_exactly_one_source_of_randomness():
    from jpmap_core.operators import make_problem

    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="exactly one of seed"):
        make_problem("denoising", x, sigma=10)
    with pytest.raises(ValueError, match="exactly one of seed"):
        make_problem("denoising", x, sigma=10, seed=0, generator=torch.Generator())


# ---- masks that hide small objects (PnP-HVAE Table 3) ---------------------------------------------------------------
def test_blob_masks_hide_the_requested_fraction_within_one_blob():
    from jpmap_core.operators import BLOB_AXES, blob_masks

    h, w = 100, 150
    masks = blob_masks((3, h, w), 0.1, batch_size=4, generator=gen(0))
    assert masks.shape == (4, 3, h, w) and bool(((masks == 0) | (masks == 1)).all())
    assert torch.equal(masks[:, :1].expand_as(masks), masks)  # whole pixels
    hidden = 1 - masks[:, 0].flatten(1).mean(1)
    one_blob = math.pi * (BLOB_AXES[1] * min(h, w)) ** 2 / (h * w)
    assert bool((hidden >= 0.1).all()) and bool((hidden < 0.1 + one_blob).all())
    # blobs, not scattered pixels: most hidden pixels have hidden 4-neighbours on both sides horizontally
    m = masks[:, 0] == 0
    inner = m[:, :, 1:-1] & m[:, :, :-2] & m[:, :, 2:]
    assert float(inner.sum()) > 0.4 * float(m[:, :, 1:-1].sum())  # independent pixels: about 0.01


def test_blob_masks_are_seeded_and_differ_between_images():
    from jpmap_core.operators import blob_masks

    a = blob_masks((1, 40, 40), 0.1, batch_size=3, generator=gen(5))
    assert torch.equal(a, blob_masks((1, 40, 40), 0.1, batch_size=3, generator=gen(5)))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])
    assert not torch.equal(a, blob_masks((1, 40, 40), 0.1, batch_size=3, generator=gen(6)))
    assert bool((blob_masks((1, 8, 8), 0.0, generator=gen(0)) == 1).all())


def test_make_problem_draws_blob_masks_for_inpainting_and_refuses_them_elsewhere():
    from jpmap_core.operators import make_problem

    x = torch.rand(2, 3, 32, 48, generator=gen(0))
    p = make_problem("inpainting", x, sigma=3.0, level=0.1, seed=1, mask="blobs")
    q = make_problem("inpainting", x, sigma=3.0, level=0.1, seed=1, mask="blobs")
    assert torch.equal(p.op.mask, q.op.mask) and torch.equal(p.y, q.y) and p.op.mask.shape == (2, 3, 32, 48)
    assert bool((1 - p.op.mask[:, 0].flatten(1).mean(1) >= 0.1).all())
    with pytest.raises(ValueError, match="unknown mask 'stripes'"):
        make_problem("inpainting", x, sigma=3.0, level=0.1, seed=1, mask="stripes")
    with pytest.raises(ValueError, match="takes no mask pattern"):
        make_problem("denoising", x, sigma=3.0, seed=1, mask="blobs")
    with pytest.raises(ValueError, match="missing"):
        Inpainting(image_shape=(3, 8, 8), missing=1.5, pattern="blobs")
    with pytest.raises(ValueError, match="give either mask or missing"):
        Inpainting(torch.ones(1, 1, 4, 4), pattern="blobs")
