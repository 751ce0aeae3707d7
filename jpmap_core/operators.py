"""Linear degradation operators ``y = A x + n`` with a closed-form data prox (deepinv-compatible API).

Every operator works on batched tensors: images ``x`` are ``(B, C, H, W)``, measurements ``y`` have the
shape :meth:`LinearOperator.output_shape` gives (``(B, m)`` for compressed sensing, images otherwise).
Noise levels are on the 0-255 scale (``sigma=10`` means a standard deviation of ``10/255``).

The names follow ``deepinv.physics.LinearPhysics`` so that solvers accept either (see :func:`as_operator`):

* ``A(x)`` -- the noiseless forward map (unlike ``deepinv``, an operator is not callable: ``degrade`` adds
  the noise);
* ``A_adjoint(y)`` -- ``A^T y``;
* ``prox_l2(z, y, gamma)`` -- ``argmin_x gamma/2 ||Ax - y||^2 + 1/2 ||x - z||^2
  = (I + gamma A^T A)^{-1} (z + gamma A^T y)``, in closed form. The JPMAP x-step (eq. 2.7) is
  ``prox_l2(mu_theta(z), y, gamma=1 / (beta * sigma^2))``;
* ``A_dagger(y, eps)`` -- the regularised pseudo-inverse ``(A^T A + eps I)^{-1} A^T y`` used as ``x0``
  (JPMAP §3.4); it equals ``prox_l2(0, y, gamma=1/eps)``;
* ``degrade(x, sigma, generator)`` -- ``A x + sigma/255 * noise``.

``gamma`` may be a number or one value per image (a tensor of shape ``(B,)`` or ``(B, 1, 1, 1)``): the
solvers give each image its own ``beta``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._checks import check_choice, check_images, check_nonnegative, check_positive, check_tensor4d

Gamma = float | Tensor
Shape = tuple[int, ...]

__all__ = [
    "BLOB_AXES",
    "BatchBlocks",
    "BlurFFT",
    "CompressedSensing",
    "DeepinvOperator",
    "Denoising",
    "Inpainting",
    "LEVEL_MEANING",
    "LinearOperator",
    "MASK_PATTERNS",
    "PROBLEMS",
    "Problem",
    "SuperResolution",
    "as_operator",
    "blob_masks",
    "check_level",
    "make_problem",
]


def _check_image_shape(image_shape: object, name: str = "image_shape") -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in image_shape)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a tuple (C, H, W) of positive integers, got {image_shape!r}") from None
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"{name} must be (C, H, W) with positive sizes, got {image_shape!r}")
    return shape  # type: ignore[return-value]


def _check_finite(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not torch.is_floating_point(t):
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if t.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension, got a 0-dimensional tensor")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains {int((~torch.isfinite(t)).sum())} NaN or infinite values")
    return t


def _per_image(values: Tensor) -> Tensor:
    """``(B,)`` -> ``(B, 1, 1, 1)`` for broadcasting against images."""
    return values.reshape(-1, 1, 1, 1)


def _sq_norms(v: Tensor) -> Tensor:
    return v.flatten(1).pow(2).sum(1)


class LinearOperator(ABC):
    """Base class: a linear map ``A`` from images ``(B, C, H, W)`` to measurements.

    A subclass defines ``_A`` and ``_A_adjoint`` (unchecked; inputs already validated) and, where one exists,
    a closed-form ``_prox``. The base class checks inputs, adds noise (:meth:`degrade`) and provides
    :meth:`A_dagger`; its ``_prox`` is a **fallback** by batched conjugate gradients on
    ``(I + gamma A^T A) x = z + gamma A^T y`` (``cg_max_iter`` iterations at most, stopping at a relative
    residual ``cg_tol`` per image).

    ``image_shape`` is ``(C, H, W)``, or ``None`` for operators that accept any image size (denoising).
    """

    #: conjugate-gradient fallback settings (used only by operators without a closed-form prox)
    cg_max_iter: int = 1000
    cg_tol: float = 1e-6

    def __init__(self, image_shape: tuple[int, int, int] | None = None):
        self.image_shape = None if image_shape is None else _check_image_shape(image_shape)
        self._cache: dict[Any, Tensor] = {}
        self._shapes: dict[Shape, Shape] = {}

    # ---- to implement ---------------------------------------------------------------------------
    @abstractmethod
    def _A(self, x: Tensor) -> Tensor: ...

    @abstractmethod
    def _A_adjoint(self, y: Tensor) -> Tensor: ...

    def _prox(self, z: Tensor, y: Tensor, gamma: Tensor) -> Tensor:
        """Fallback: batched conjugate gradients (``gamma`` is ``(B, 1, 1, 1)``)."""

        def normal(v: Tensor) -> Tensor:
            return v + gamma * self._A_adjoint(self._A(v))

        b = z + gamma * self._A_adjoint(y)
        x = z.clone()
        r = b - normal(x)
        p = r.clone()
        rs = _sq_norms(r)
        target = (self.cg_tol**2) * _sq_norms(b)
        for _ in range(self.cg_max_iter):
            if bool((rs <= target).all()):
                break
            q = normal(p)
            pq = (p * q).flatten(1).sum(1)
            active = (rs > target) & (pq > 0)  # converged images stop moving
            alpha = torch.where(active, rs / pq.clamp_min(torch.finfo(pq.dtype).tiny), 0.0)
            x = x + _per_image(alpha) * p
            r = r - _per_image(alpha) * q
            rs_new = _sq_norms(r)
            beta = torch.where(active, rs_new / rs.clamp_min(torch.finfo(rs.dtype).tiny), 0.0)
            p = r + _per_image(beta) * p
            rs = rs_new
        return x

    def _check_batch(self, batch: int, name: str) -> None:
        """Hook: operators built for a given number of images reject other batch sizes."""
        return None

    def rows(self, idx: Tensor) -> LinearOperator | None:
        """The operator for images ``idx`` of a batch, or ``None`` when it cannot be restricted to rows.

        Solvers with per-image state use it to apply ``A`` and ``prox_l2`` to the images that need it only.
        An operator with no per-image data acts on every image alike and returns itself (the default for this
        module's operators); :class:`Inpainting` with one mask per image returns the operator of those masks;
        wrapped third-party operators return ``None`` (the caller then applies them to the whole batch).
        """
        return self

    # ---- shapes ---------------------------------------------------------------------------------
    @property
    def d(self) -> int | None:
        """Image dimension ``d = C * H * W`` (``None`` when the operator accepts any image size)."""
        return None if self.image_shape is None else math.prod(self.image_shape)

    def output_shape(self, x_shape: Shape) -> Shape:
        """Shape of ``A(x)`` for ``x`` of shape ``x_shape = (B, C, H, W)`` (generic: apply ``A`` to zeros once)."""
        x_shape = tuple(int(s) for s in x_shape)
        if x_shape not in self._shapes:
            self._shapes[x_shape] = tuple(self._A(torch.zeros(x_shape)).shape)
        return self._shapes[x_shape]

    def _cached(self, key: object, like: Tensor, build: Callable[[], Tensor]) -> Tensor:
        """A tensor derived from the operator's data, built once per (dtype, device)."""
        k = (key, like.dtype, like.device)
        if k not in self._cache:
            self._cache[k] = build()
        return self._cache[k]

    # ---- input checks ---------------------------------------------------------------------------
    def _check_x(self, x: object, name: str = "x") -> Tensor:
        x = check_tensor4d(x, name)
        if self.image_shape is not None and tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but {type(self).__name__} was built for images of shape "
                f"(C, H, W) = {self.image_shape}"
            )
        self._check_batch(x.shape[0], name)
        return x

    def _check_y(self, y: object, x_shape: Shape | None = None, name: str = "y") -> Tensor:
        y = _check_finite(y, name)
        if x_shape is None and self.image_shape is not None:
            x_shape = (y.shape[0], *self.image_shape)
        if x_shape is not None:
            expected = self.output_shape(x_shape)
            if tuple(y.shape) != tuple(expected):
                raise ValueError(
                    f"{name} has shape {tuple(y.shape)} but {type(self).__name__} produces {tuple(expected)} "
                    f"for images of shape {tuple(x_shape)}"
                )
        self._check_batch(y.shape[0], name)
        return y

    @staticmethod
    def _check_gamma(gamma: object, batch: int, like: Tensor, name: str = "gamma") -> Tensor:
        """A number or a per-image tensor ``(B,)`` / ``(B, 1, 1, 1)`` -> ``(B, 1, 1, 1)`` tensor, all > 0."""
        if isinstance(gamma, Tensor):
            if gamma.dim() == 0:
                gamma = gamma.reshape(1).expand(batch)
            elif tuple(gamma.shape) not in ((batch,), (batch, 1, 1, 1)):
                raise ValueError(
                    f"{name} must be a number or one value per image, of shape ({batch},) or ({batch}, 1, 1, 1); "
                    f"got shape {tuple(gamma.shape)}"
                )
            g = gamma.detach().to(dtype=like.dtype, device=like.device).reshape(batch)
            if not bool((torch.isfinite(g) & (g > 0)).all()):
                raise ValueError(f"{name} must be finite and > 0 for every image, got {g.tolist()}")
            return _per_image(g)
        value = check_positive(gamma, name)
        return torch.full((batch, 1, 1, 1), value, dtype=like.dtype, device=like.device)

    # ---- public, checked API ------------------------------------------------------------------
    def A(self, x: Tensor) -> Tensor:
        """Noiseless forward map ``A x``."""
        return self._A(self._check_x(x))

    def A_adjoint(self, y: Tensor) -> Tensor:
        """Adjoint ``A^T y``, an image batch ``(B, C, H, W)``."""
        return self._A_adjoint(self._check_y(y))

    def prox_l2(self, z: Tensor, y: Tensor, gamma: Gamma) -> Tensor:
        """``argmin_x gamma/2 ||A x - y||^2 + 1/2 ||x - z||^2 = (I + gamma A^T A)^{-1} (z + gamma A^T y)``.

        ``gamma``: a number > 0 or one value per image (``(B,)`` or ``(B, 1, 1, 1)``). The JPMAP x-step
        (eq. 2.7, ``(A^T A + sigma^2 beta I)^{-1} (A^T y + sigma^2 beta mu_theta(z))``) is
        ``prox_l2(mu_theta(z), y, gamma=1 / (beta * sigma^2))``.
        """
        z = self._check_x(z, "z")
        y = self._check_y(y, tuple(z.shape))
        return self._prox(z, y, self._check_gamma(gamma, z.shape[0], z))

    def A_dagger(self, y: Tensor, eps: float = 1e-3) -> Tensor:
        """Regularised pseudo-inverse ``(A^T A + eps I)^{-1} A^T y``, the ``x0`` of JPMAP §3.4.

        Computed as ``prox_l2(0, y, gamma=1/eps)`` (closed form where the operator has one).
        """
        y = self._check_y(y)
        eps = check_positive(eps, "eps")
        z = torch.zeros_like(self._A_adjoint(y))
        return self._prox(z, y, self._check_gamma(1.0 / eps, z.shape[0], z))

    def degrade(self, x: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
        """Noisy measurements ``y = A x + sigma/255 * n`` with ``n ~ N(0, I)`` drawn from ``generator``.

        ``x``: clean images in [0, 1]; ``sigma`` >= 0 on the 0-255 scale (0 gives noiseless measurements).
        """
        x = self._check_x(check_images(x, "x"))
        s = check_nonnegative(sigma, "sigma") / 255.0
        y = self._A(x)
        noise = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
        return y + s * noise

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_shape={self.image_shape})"


class Denoising(LinearOperator):
    """``A = I`` (JPMAP §3.4, denoising). Accepts any image size unless ``image_shape`` is given."""

    def __init__(self, image_shape: tuple[int, int, int] | None = None):
        super().__init__(image_shape)

    def output_shape(self, x_shape: Shape) -> Shape:
        return tuple(x_shape)

    def _A(self, x: Tensor) -> Tensor:
        return x

    def _A_adjoint(self, y: Tensor) -> Tensor:
        return y

    def _prox(self, z: Tensor, y: Tensor, gamma: Tensor) -> Tensor:
        return (z + gamma * y) / (1 + gamma)


def _block_observed(
    batch: int, h: int, w: int, block: object, missing: float, generator: torch.Generator | None
) -> Tensor:
    """``(batch, 1, h, w)`` bool, False on exactly ``round(missing * n)`` of the ``n`` blocks ``block x block`` of a
    regular grid in each image (a random permutation of the blocks per image, from ``generator``)."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block (side of the missing square blocks, in pixels) must be an integer >= 1, got {block!r}")
    if h % block or w % block:
        raise ValueError(
            f"block = {block} must divide the image's height and width, got {h}x{w} (the blocks tile a regular grid)"
        )
    gh, gw = h // block, w // block
    n_missing = round(missing * gh * gw)
    order = torch.rand(batch, gh * gw, generator=generator).argsort(dim=1)  # a uniform permutation per image
    observed = torch.ones(batch, gh * gw, dtype=torch.bool)
    observed.scatter_(1, order[:, :n_missing], False)
    grid = observed.view(batch, 1, gh, gw)
    return grid.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)


#: random patterns of missing pixels :class:`Inpainting` draws: independent pixels (JPMAP), or blobs (PnP-HVAE Table 3)
MASK_PATTERNS = ("pixels", "blobs")
#: semi-axis range of the elliptical blobs of :func:`blob_masks`, as fractions of the image's smaller side
BLOB_AXES = (0.02, 0.06)


def blob_masks(
    image_shape: tuple[int, int, int],
    coverage: float,
    batch_size: int = 1,
    generator: torch.Generator | None = None,
    *,
    axes: tuple[float, float] = BLOB_AXES,
) -> Tensor:
    """Masks ``(batch_size, C, H, W)`` (1 = observed) that hide random blobs, as masks that "occlude small objects"
    (PnP-HVAE §6.3, Table 3 and Fig. 6; the paper's masks are not public).

    Rule, for each image in turn: draw ellipses one after the other, each with a centre uniform over the image, two
    semi-axes uniform in ``axes`` times ``min(H, W)`` and an orientation uniform in ``[0, pi)``, and hide the pixels
    inside it, until at least ``coverage`` of the pixels are hidden. The hidden fraction is therefore in
    ``[coverage, coverage + pi a_max^2 / (H W))`` (one ellipse of overshoot at most); every draw comes from
    ``generator``, so a seed gives the same masks, and each image of the batch gets its own blobs. Whole pixels are
    hidden (the same mask in every channel).
    """
    c, h, w = _check_image_shape(image_shape)
    cov = float(coverage)
    if not 0 <= cov < 1:
        raise ValueError(f"coverage (fraction of hidden pixels) must be in [0, 1), got {coverage!r}")
    lo, hi = (float(a) for a in axes)
    if not 0 < lo <= hi:
        raise ValueError(f"axes must be (min, max) semi-axes with 0 < min <= max, got {axes!r}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    side = min(h, w)
    rows = torch.arange(h, dtype=torch.float64)[:, None]
    cols = torch.arange(w, dtype=torch.float64)[None, :]
    masks = []
    for _ in range(int(batch_size)):
        hidden = torch.zeros(h, w, dtype=torch.bool)
        while float(hidden.double().mean()) < cov:
            u = torch.rand(5, generator=generator, dtype=torch.float64)
            cy, cx = u[0] * h, u[1] * w
            a, b = (lo + (hi - lo) * u[2:4]) * side
            t = math.pi * float(u[4])
            dy, dx = rows - cy, cols - cx
            along = dx * math.cos(t) + dy * math.sin(t)
            across = -dx * math.sin(t) + dy * math.cos(t)
            hidden |= (along / a).pow(2) + (across / b).pow(2) <= 1
        masks.append((~hidden).float().expand(c, h, w))
    return torch.stack(masks).contiguous()


class Inpainting(LinearOperator):
    """``y = M x + n`` with a binary mask ``M`` (1 = observed), JPMAP §3.4 'missing pixels'.

    Either give ``mask`` of shape ``(1, C, H, W)`` (shared by every image) or ``(B, C, H, W)`` (one mask per
    image; then ``x`` must have batch size ``B``), with values exactly 0 or 1 (or a bool tensor); or give
    ``image_shape`` and ``missing`` in [0, 1) to draw ``batch_size`` random masks from ``generator``: each
    pixel is missing independently with probability ``missing`` (as in the official JPMAP code), and the
    whole pixel is dropped (the same mask in every channel). With ``block=b``, the image is tiled by the ``b x b``
    blocks of a regular grid (``b`` must divide ``H`` and ``W``) and exactly ``round(missing * n_blocks)`` of its
    ``n_blocks = (H/b)(W/b)`` blocks are missing in every image, chosen uniformly without replacement and
    independently per image: AIPO §4.4's "randomly mask several 4x4 pixel blocks such that in total the masked
    portion is 25%" is ``missing=0.25, block=4``.

    :meth:`degrade` adds noise to every entry of ``M x`` (as the official JPMAP code; ``deepinv`` adds it to
    the observed entries only): the noise on missing entries never reaches an estimate, since ``A^T y = M y``.

    ``pattern="blobs"`` draws masks that hide random elliptical blobs covering a fraction ``missing`` of each image
    instead (:func:`blob_masks`, the masks of PnP-HVAE's Table 3).
    """

    def __init__(
        self,
        mask: Tensor | None = None,
        *,
        image_shape: tuple[int, int, int] | None = None,
        missing: float | None = None,
        batch_size: int = 1,
        generator: torch.Generator | None = None,
        block: int | None = None,
        pattern: str = "pixels",
    ):
        check_choice(pattern, "pattern", MASK_PATTERNS)
        if mask is not None:
            if missing is not None or block is not None or pattern != "pixels":
                raise ValueError(
                    "give either mask or missing (the fraction of missing pixels of a random mask, drawn with pattern "
                    "and block)"
                )
            if isinstance(mask, Tensor) and mask.dtype == torch.bool:
                mask = mask.float()
            mask = check_tensor4d(mask, "mask")
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"mask must contain only 0 and 1 (1 = observed), got values {mask.unique()[:5]}")
            if image_shape is not None and tuple(mask.shape[1:]) != _check_image_shape(image_shape):
                raise ValueError(f"mask has shape {tuple(mask.shape)} but image_shape is {tuple(image_shape)}")
            super().__init__(tuple(mask.shape[1:]))
        else:
            if image_shape is None or missing is None:
                raise ValueError("Inpainting needs a mask, or image_shape and missing to draw a random one")
            super().__init__(image_shape)
            try:
                p = float(missing)
            except (TypeError, ValueError):
                raise TypeError(f"missing must be a number in [0, 1), got {missing!r}") from None
            if not 0 <= p < 1:
                raise ValueError(f"missing (fraction of missing pixels) must be in [0, 1), got {missing!r}")
            if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size <= 0:
                raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
            c, h, w = self.image_shape
            if pattern == "blobs":
                if block is not None:
                    raise ValueError("block (missing square blocks) is for pattern 'pixels'; 'blobs' takes none")
                mask = blob_masks(self.image_shape, p, int(batch_size), generator)
            else:
                if block is None:
                    observed = torch.rand(int(batch_size), 1, h, w, generator=generator) >= p
                else:
                    observed = _block_observed(int(batch_size), h, w, block, p, generator)
                mask = observed.float().expand(-1, c, -1, -1).contiguous()
        self.mask = mask

    def _check_batch(self, batch: int, name: str) -> None:
        n = self.mask.shape[0]
        if n != 1 and batch != n:
            raise ValueError(
                f"mask has batch size {n} but {name} has batch size {batch}; a mask of batch size 1 is shared "
                f"by all images, otherwise there must be one mask per image"
            )

    def rows(self, idx: Tensor) -> Inpainting:
        """Itself when the mask is shared, else the operator of masks ``idx`` (see :meth:`LinearOperator.rows`)."""
        if self.mask.shape[0] == 1:
            return self
        sub = Inpainting.__new__(Inpainting)  # the masks were checked when this operator was built
        LinearOperator.__init__(sub, self.image_shape)
        sub.mask = self.mask[idx.to(self.mask.device)]
        return sub

    def _m(self, like: Tensor) -> Tensor:
        return self._cached("mask", like, lambda: self.mask.to(dtype=like.dtype, device=like.device))

    def output_shape(self, x_shape: Shape) -> Shape:
        return tuple(x_shape)

    def _A(self, x: Tensor) -> Tensor:
        return self._m(x) * x

    def _A_adjoint(self, y: Tensor) -> Tensor:
        return self._m(y) * y

    def _prox(self, z: Tensor, y: Tensor, gamma: Tensor) -> Tensor:
        # M is diagonal: elementwise
        m = self._m(z)
        return (z + gamma * m * y) / (1 + gamma * m)

    def __repr__(self) -> str:
        missing = 1 - float(self.mask.mean())
        return f"Inpainting(image_shape={self.image_shape}, masks={self.mask.shape[0]}, missing={missing:.3f})"


class CompressedSensing(LinearOperator):
    """``y = A x + n`` with a dense ``A`` of shape ``(m, d)``, ``d = C * H * W``, and ``y`` of shape ``(B, m)``.

    ``A`` has i.i.d. ``N(0, 1/m)`` entries drawn as ``torch.randn(m, d, generator=generator) / sqrt(m)`` (the
    official JPMAP code's recipe; ``deepinv.physics.CompressedSensing`` with the same seeded ``rng`` draws
    the same matrix), unless ``matrix`` is given. Images are flattened in ``(C, H, W)`` order.

    ``prox_l2`` solves ``(I_d + gamma A^T A) x = z + gamma A^T y`` with a factorisation cached per value of
    ``gamma`` (the last ``cache_size`` values):

    * ``"cholesky"``: Cholesky of the ``d x d`` matrix ``I_d + gamma A^T A``;
    * ``"woodbury"``: Cholesky of the ``m x m`` matrix ``I_m + gamma A A^T`` and
      ``x = z + gamma A^T (I_m + gamma A A^T)^{-1} (y - A z)`` (Woodbury / push-through identity);
    * ``"auto"``: Woodbury when ``m < d`` (measured faster for MNIST, ``benchmarks/bench_operators.py``),
      else Cholesky.

    Per-image ``gamma`` values are grouped: one solve per distinct value.
    """

    def __init__(
        self,
        m: int,
        image_shape: tuple[int, int, int],
        *,
        generator: torch.Generator | None = None,
        matrix: Tensor | None = None,
        method: str = "auto",
        cache_size: int = 8,
    ):
        super().__init__(image_shape)
        if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
            raise ValueError(f"m (number of measurements) must be a positive integer, got {m!r}")
        self.m = m
        self.method = check_choice(method, "method", ("auto", "cholesky", "woodbury"))
        if int(cache_size) <= 0:
            raise ValueError(f"cache_size must be a positive integer, got {cache_size!r}")
        self.cache_size = int(cache_size)
        d = self.d
        if matrix is None:
            matrix = torch.randn(m, d, generator=generator) / math.sqrt(m)
        else:
            if generator is not None:
                raise ValueError("give either matrix or generator (to draw a random matrix), not both")
            matrix = _check_finite(matrix, "matrix")
            if tuple(matrix.shape) != (m, d):
                raise ValueError(
                    f"matrix has shape {tuple(matrix.shape)} but (m, d) = ({m}, {d}) was expected for m={m} "
                    f"and images of shape {self.image_shape}"
                )
        self.matrix = matrix
        self._factors: OrderedDict[tuple, Tensor] = OrderedDict()

    @property
    def resolved_method(self) -> str:
        """The method ``"auto"`` stands for with this ``m`` and ``d``."""
        if self.method != "auto":
            return self.method
        return "woodbury" if self.m < self.d else "cholesky"

    def output_shape(self, x_shape: Shape) -> Shape:
        return (x_shape[0], self.m)

    def _mat(self, like: Tensor) -> Tensor:
        return self._cached("matrix", like, lambda: self.matrix.to(dtype=like.dtype, device=like.device))

    def _A(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self._mat(x).T

    def _A_adjoint(self, y: Tensor) -> Tensor:
        return (y @ self._mat(y)).reshape(y.shape[0], *self.image_shape)

    def _factor(self, method: str, gamma: float, like: Tensor) -> Tensor:
        """Cholesky factor of ``I + gamma G`` (``G = A^T A`` or ``A A^T``), LRU-cached per gamma."""
        key = (method, gamma, like.dtype, like.device)
        if key in self._factors:
            self._factors.move_to_end(key)
            return self._factors[key]
        a = self._mat(like)
        if method == "cholesky":
            gram = self._cached("AtA", like, lambda: a.T @ a)
        else:
            gram = self._cached("AAt", like, lambda: a @ a.T)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        factor = torch.linalg.cholesky(eye + gamma * gram)
        self._factors[key] = factor
        if len(self._factors) > self.cache_size:
            self._factors.popitem(last=False)
        return factor

    def _solve(self, z: Tensor, y: Tensor, gamma: float, method: str) -> Tensor:
        """Flat ``z`` ``(n, d)``, ``y`` ``(n, m)``, one ``gamma`` -> flat ``x`` ``(n, d)``."""
        a = self._mat(z)
        factor = self._factor(method, gamma, z)
        if method == "cholesky":
            return torch.cholesky_solve((z + gamma * (y @ a)).T, factor).T
        return z + gamma * (torch.cholesky_solve((y - z @ a.T).T, factor).T @ a)

    def _prox(self, z: Tensor, y: Tensor, gamma: Tensor) -> Tensor:
        method = self.resolved_method
        zf = z.flatten(1)
        values, group = torch.unique(gamma.flatten(), return_inverse=True)
        if values.numel() == 1:
            x = self._solve(zf, y, float(values[0]), method)
        else:
            x = torch.empty_like(zf)
            for k, value in enumerate(values.tolist()):
                idx = (group == k).nonzero().squeeze(1)
                x[idx] = self._solve(zf[idx], y[idx], value, method)
        return x.reshape(z.shape)

    def __repr__(self) -> str:
        return f"CompressedSensing(m={self.m}, image_shape={self.image_shape}, method={self.method!r})"


class _CircularKernel(LinearOperator):
    """Shared by circular-convolution operators: a 2D kernel and its centred transfer function.

    The kernel is zero-padded to ``(H, W)`` and rolled so that its centre pixel ``(kh // 2, kw // 2)`` sits at
    the origin, as ``deepinv.physics.functional.filter_fft`` does; convolution (not correlation), applied
    to every channel, with periodic boundaries.
    """

    def __init__(self, kernel: Tensor, image_shape: tuple[int, int, int]):
        super().__init__(image_shape)
        if not isinstance(kernel, Tensor):
            raise TypeError(f"kernel must be a 2D torch.Tensor (kh, kw), got {type(kernel).__name__}")
        if kernel.dim() != 2:
            raise ValueError(
                f"kernel must be a 2D tensor (kh, kw), got shape {tuple(kernel.shape)}; "
                f"the same kernel is applied to every channel"
            )
        kernel = _check_finite(kernel, "kernel")
        _, h, w = self.image_shape
        if kernel.shape[0] > h or kernel.shape[1] > w:
            raise ValueError(f"kernel of shape {tuple(kernel.shape)} is larger than the images (H, W) = {(h, w)}")
        self.kernel = kernel

    def _otf(self, like: Tensor) -> Tensor:
        """Transfer function ``K = fft2(centred kernel)``, complex ``(H, W)``."""

        def build() -> Tensor:
            _, h, w = self.image_shape
            kh, kw = self.kernel.shape
            k = self.kernel.to(dtype=like.dtype, device=like.device)
            padded = torch.nn.functional.pad(k, (0, w - kw, 0, h - kh))
            return torch.fft.fft2(torch.roll(padded, shifts=(-(kh // 2), -(kw // 2)), dims=(0, 1)))

        return self._cached("otf", like, build)

    def _convolve(self, x: Tensor, adjoint: bool = False) -> Tensor:
        k = self._otf(x)
        return torch.fft.ifft2(torch.fft.fft2(x) * (k.conj() if adjoint else k)).real


class BlurFFT(_CircularKernel):
    """``y = k * x + n``: circular convolution with a 2D ``kernel`` (e.g. a Levin motion kernel) per channel.

    Matches ``deepinv.physics.BlurFFT`` (same centring). ``prox_l2`` is diagonal in Fourier:
    ``X = (Z + gamma conj(K) Y) / (1 + gamma |K|^2)``.
    """

    def output_shape(self, x_shape: Shape) -> Shape:
        return tuple(x_shape)

    def _A(self, x: Tensor) -> Tensor:
        return self._convolve(x)

    def _A_adjoint(self, y: Tensor) -> Tensor:
        return self._convolve(y, adjoint=True)

    def _prox(self, z: Tensor, y: Tensor, gamma: Tensor) -> Tensor:
        k = self._otf(z)
        num = torch.fft.fft2(z) + gamma * k.conj() * torch.fft.fft2(y)
        return torch.fft.ifft2(num / (1 + gamma * k.abs().pow(2))).real

    def __repr__(self) -> str:
        return f"BlurFFT(kernel={tuple(self.kernel.shape)}, image_shape={self.image_shape})"


class SuperResolution(_CircularKernel):
    """``y = S (k * x) + n``: circular blur, then keep every ``factor``-th pixel (rows and columns, from 0).

    ``y`` has shape ``(B, C, H/s, W/s)``. ``prox_l2`` is in closed form (Zhao et al. 2016, "Fast single image
    super-resolution using a new analytical solution for l2-l2 problems"): with ``B = S H``,
    ``x = z + gamma B^T (I + gamma B B^T)^{-1} (y - B z)``, and ``B B^T = S H H^T S^T`` is diagonal in the
    low-resolution Fourier domain, with entries the mean over the ``s x s`` aliased blocks of ``|K|^2``
    (decimation in space averages the ``s x s`` spectral blocks; zero-upsampling tiles the spectrum).
    Matches ``deepinv.physics.Downsampling(filter, factor, padding="circular")`` for odd-sized kernels.
    """

    def __init__(self, kernel: Tensor, factor: int, image_shape: tuple[int, int, int]):
        super().__init__(kernel, image_shape)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor <= 0:
            raise ValueError(f"factor must be a positive integer, got {factor!r}")
        _, h, w = self.image_shape
        if h % factor or w % factor:
            raise ValueError(f"factor={factor} must divide the image size (H, W) = {(h, w)}")
        self.factor = factor

    def output_shape(self, x_shape: Shape) -> Shape:
        b, c, h, w = x_shape
        return (b, c, h // self.factor, w // self.factor)

    def _block_mean(self, u: Tensor) -> Tensor:
        """Spectrum of a decimated signal: mean of the ``s x s`` aliased blocks, ``(..., H, W) -> (..., H/s, W/s)``."""
        s = self.factor
        h, w = u.shape[-2:]
        return u.reshape(*u.shape[:-2], s, h // s, s, w // s).mean(dim=(-4, -2))

    def _A(self, x: Tensor) -> Tensor:
        s = self.factor
        return self._convolve(x)[..., ::s, ::s]

    def _A_adjoint(self, y: Tensor) -> Tensor:
        s = self.factor
        up = y.new_zeros(*y.shape[:-2], y.shape[-2] * s, y.shape[-1] * s)
        up[..., ::s, ::s] = y
        return self._convolve(up, adjoint=True)

    def _prox(self, z: Tensor, y: Tensor, gamma: Tensor) -> Tensor:
        s = self.factor
        k = self._otf(z)
        d = self._cached("BBt", z, lambda: self._block_mean(k.abs().pow(2)))
        zf = torch.fft.fft2(z)
        residual = torch.fft.fft2(y) - self._block_mean(k * zf)  # spectrum of y - S H z
        w = (residual / (1 + gamma * d)).repeat(1, 1, s, s)  # S^T: tile the low-resolution spectrum
        return torch.fft.ifft2(zf + gamma * k.conj() * w).real

    def __repr__(self) -> str:
        return (
            f"SuperResolution(kernel={tuple(self.kernel.shape)}, factor={self.factor}, image_shape={self.image_shape})"
        )


class DeepinvOperator(LinearOperator):
    """A ``deepinv.physics.LinearPhysics`` seen through this module's API (build it with :func:`as_operator`).

    ``A``, ``A_adjoint`` are deepinv's; ``prox_l2`` is deepinv's when the physics class has its own
    (closed-form for ``DecomposablePhysics`` such as ``Inpainting``, ``Denoising``, ``BlurFFT``), else this
    module's conjugate-gradient fallback. ``A_dagger`` is ours (regularised, JPMAP §3.4), not deepinv's
    least-squares pseudo-inverse; ``degrade`` uses our ``sigma/255`` Gaussian noise and ignores the
    physics' own noise model.
    """

    def __init__(self, physics: Any, image_shape: tuple[int, int, int] | None = None):
        if image_shape is None:
            img_size = getattr(physics, "img_size", None)
            if img_size is not None and len(tuple(img_size)) == 3:
                image_shape = tuple(int(s) for s in img_size)
        super().__init__(image_shape)
        self.physics = physics
        try:
            from deepinv.physics import LinearPhysics
        except ImportError:  # pragma: no cover - deepinv is a test dependency
            self._own_prox = False
        else:
            self._own_prox = type(physics).prox_l2 is not LinearPhysics.prox_l2

    def _A(self, x: Tensor) -> Tensor:
        return self.physics.A(x)

    def _A_adjoint(self, y: Tensor) -> Tensor:
        return self.physics.A_adjoint(y)

    def rows(self, idx: Tensor) -> None:
        """``None``: a third-party physics may hold per-image data we cannot slice."""
        return None

    def _prox(self, z: Tensor, y: Tensor, gamma: Tensor) -> Tensor:
        if not self._own_prox:
            return super()._prox(z, y, gamma)
        g = gamma.flatten()
        same = bool((g == g[0]).all())
        return self.physics.prox_l2(z, y, float(g[0]) if same else gamma)

    def __repr__(self) -> str:
        return f"DeepinvOperator({type(self.physics).__name__}, image_shape={self.image_shape})"


class BatchBlocks(LinearOperator):
    """Several problems in one batch: ``ops[k]`` acts on the ``sizes[k]`` consecutive images of block ``k``.

    Images of every block have the same shape ``(C, H, W)``; measurements are flattened and zero-padded to the
    longest block's length ``M``, so ``y`` has shape ``(B, M)``: ``A x`` is zero in the padding and so is ``y``
    (:meth:`pack` builds it from each block's own measurements), so ``||A x - y||^2``, ``A^T y``, ``prox_l2`` and
    ``A_dagger`` of every image are those of its own operator. The operator is block diagonal over the batch,
    which lets the solvers (whose images keep their own state) restore, e.g., all compressed-sensing levels
    ``m`` of a benchmark, or all its problems, in one call (with one ``sigma`` per image).

    Block operators must be this module's (they may hold per-image data, such as :class:`Inpainting` with one
    mask per image of its block). :meth:`rows` gives the operator of any subset of the images.
    """

    def __init__(self, ops: list[LinearOperator], sizes: list[int], image_shape: tuple[int, int, int] | None = None):
        ops, sizes = list(ops), list(sizes)
        if not ops or len(ops) != len(sizes):
            raise ValueError(f"give one block size per operator, got {len(ops)} operators and {len(sizes)} sizes")
        for k, op in enumerate(ops):
            if not isinstance(op, LinearOperator) or isinstance(op, DeepinvOperator):
                raise TypeError(
                    f"ops[{k}] must be a jpmap_core operator (not a wrapped deepinv physics), got {type(op).__name__}"
                )
        for k, n in enumerate(sizes):
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"sizes[{k}] must be a positive integer (images in block {k}), got {n!r}")
        shapes = {op.image_shape for op in ops if op.image_shape is not None}
        if image_shape is not None:
            shapes.add(_check_image_shape(image_shape))
        if len(shapes) != 1:
            raise ValueError(
                "the blocks' operators must share one image shape (C, H, W)"
                + (f", got {sorted(shapes)}" if shapes else "; none has one, so give image_shape")
            )
        block = torch.repeat_interleave(torch.arange(len(ops)), torch.tensor(sizes))
        local = torch.cat([torch.arange(n) for n in sizes])
        self._init(ops, sizes, block, local, shapes.pop())

    def _init(self, ops, full_sizes, block: Tensor, local: Tensor, image_shape: tuple[int, int, int]) -> None:
        super().__init__(image_shape)
        self.ops, self.full_sizes, self.block, self.local = ops, full_sizes, block, local
        self._m = [math.prod(op.output_shape((1, *image_shape))[1:]) for op in ops]
        self.M = max(self._m)
        parts = []  # (k, positions in this batch, the block operator for those images)
        for k in block.unique().tolist():
            pos = (block == k).nonzero().squeeze(1)
            idx = local[pos]
            whole = idx.numel() == full_sizes[k] and bool(torch.equal(idx, torch.arange(idx.numel())))
            sub = ops[k] if whole else ops[k].rows(idx)
            if sub is None:
                raise TypeError(f"ops[{k}] ({type(ops[k]).__name__}) cannot be restricted to a subset of its images")
            parts.append((k, pos, sub))
        self._parts = parts

    @property
    def sizes(self) -> list[int]:
        """Images per block in this batch."""
        return [int((self.block == k).sum()) for k in range(len(self.ops))]

    def rows(self, idx: Tensor) -> BatchBlocks:
        sub = BatchBlocks.__new__(BatchBlocks)
        i = idx.cpu()
        sub._init(self.ops, self.full_sizes, self.block[i], self.local[i], self.image_shape)
        return sub

    def _check_batch(self, batch: int, name: str) -> None:
        n = self.block.numel()
        if batch != n:
            raise ValueError(
                f"BatchBlocks holds {n} images (blocks of sizes {self.sizes}) but {name} has batch size {batch}"
            )

    def output_shape(self, x_shape: Shape) -> Shape:
        return (x_shape[0], self.M)

    def _pos(self, k: int, pos: Tensor, like: Tensor) -> Tensor:
        return self._cached(("pos", k), like, lambda: pos.to(like.device))

    def _A(self, x: Tensor) -> Tensor:
        out = x.new_zeros(x.shape[0], self.M)
        for k, pos, op in self._parts:
            p = self._pos(k, pos, x)
            out[p, : self._m[k]] = op._A(x[p]).flatten(1)
        return out

    def _y_block(self, k: int, y: Tensor, p: Tensor) -> Tensor:
        return y[p, : self._m[k]].reshape(self.ops[k].output_shape((p.numel(), *self.image_shape)))

    def _A_adjoint(self, y: Tensor) -> Tensor:
        out = y.new_zeros(y.shape[0], *self.image_shape)
        for k, pos, op in self._parts:
            p = self._pos(k, pos, y)
            out[p] = op._A_adjoint(self._y_block(k, y, p))
        return out

    def _prox(self, z: Tensor, y: Tensor, gamma: Tensor) -> Tensor:
        out = torch.empty_like(z)
        for k, pos, op in self._parts:
            p = self._pos(k, pos, z)
            out[p] = op._prox(z[p], self._y_block(k, y, p), gamma[p])
        return out

    def measured(self, like: Tensor | None = None) -> Tensor:
        """``(B, M)`` bool: True where an entry of ``y`` is a measurement, False in the padding."""
        lengths = torch.tensor(self._m)[self.block]
        mask = torch.arange(self.M)[None, :] < lengths[:, None]
        return mask if like is None else mask.to(like.device)

    def degrade(self, x: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
        """``y = A x + sigma/255 * n`` on the measured entries; the padding stays 0."""
        y = super().degrade(x, sigma, generator)
        return y * self.measured(y)

    def pack(self, ys: list[Tensor]) -> Tensor:
        """``(B, M)`` measurements from each block's own ``y`` (block ``k``'s of shape ``ops[k].output_shape``),
        in block order, zero-padded: the ``y`` of this operator for measurements drawn block by block."""
        if len(ys) != len(self.ops):
            raise ValueError(f"give one measurement tensor per block ({len(self.ops)}), got {len(ys)}")
        sizes = self.full_sizes
        if self.block.numel() != sum(sizes) or not bool(
            torch.equal(self.local, torch.cat([torch.arange(n) for n in sizes]))
        ):
            raise ValueError(
                "pack needs the operator as built, with every block whole and in order (not a rows() subset)"
            )
        out = []
        for k, (yk, n) in enumerate(zip(ys, sizes, strict=True)):
            yk = _check_finite(yk, f"ys[{k}]")
            want = self.ops[k].output_shape((n, *self.image_shape))
            if tuple(yk.shape) != tuple(want):
                raise ValueError(f"ys[{k}] has shape {tuple(yk.shape)} but block {k} produces {tuple(want)}")
            out.append(torch.nn.functional.pad(yk.flatten(1), (0, self.M - self._m[k])))
        return torch.cat(out)

    def __repr__(self) -> str:
        blocks = ", ".join(f"{type(op).__name__} x{n}" for op, n in zip(self.ops, self.sizes, strict=True))
        return f"BatchBlocks([{blocks}], image_shape={self.image_shape}, M={self.M})"


def as_operator(physics: Any, image_shape: tuple[int, int, int] | None = None) -> LinearOperator:
    """Our operators unchanged; a ``deepinv`` linear physics wrapped in :class:`DeepinvOperator`.

    ``image_shape`` defaults to the physics' ``img_size`` when it is ``(C, H, W)``.
    """
    if isinstance(physics, LinearOperator):
        return physics
    if not (callable(getattr(physics, "A", None)) and callable(getattr(physics, "A_adjoint", None))):
        raise TypeError(
            f"physics must be a jpmap_core LinearOperator or a deepinv LinearPhysics (with A and A_adjoint), "
            f"got {type(physics).__name__}"
        )
    return DeepinvOperator(physics, image_shape)


# ---- one problem builder: problem name + level + sigma + seed -> operator and y ----------------------------------
#: the degradations every notebook, benchmark and widget builds through :func:`make_problem`
PROBLEMS = ("denoising", "inpainting", "compressed_sensing", "blur", "super_resolution")
#: what ``level`` means for each problem
LEVEL_MEANING = {
    "denoising": "none (the noise std sigma is the level)",
    "inpainting": "fraction of missing pixels, in [0, 1)",
    "compressed_sensing": "number of measurements m >= 1",
    "blur": "none (the kernel is the level)",
    "super_resolution": "decimation factor s >= 1",
}


@dataclass
class Problem:
    """A degraded batch ``y = A x + n``: the operator ``op``, the measurements ``y``, the noise std ``sigma`` (0-255
    scale), the problem's ``name`` and ``level`` (see :data:`LEVEL_MEANING`)."""

    name: str
    level: float | int | None
    sigma: float
    op: LinearOperator
    y: Tensor

    @property
    def observation(self) -> Tensor | None:
        """What a figure shows as the corrupted image: ``A^T y`` when measurements are images of the image's size
        (denoising: ``y``; inpainting: missing pixels black; blur: ``y``), ``None`` otherwise (compressed sensing,
        super-resolution)."""
        if self.name in ("compressed_sensing", "super_resolution"):
            return None
        return self.op.A_adjoint(self.y)


def check_level(name: str, level: object) -> float | int | None:
    """``level`` checked for problem ``name``: an int for measurement counts and factors, a float for fractions."""
    check_choice(name, "problem", PROBLEMS)
    if name in ("denoising", "blur"):
        if level is not None:
            raise ValueError(f"{name} takes no level (its level is {LEVEL_MEANING[name]}), got level={level!r}")
        return None
    try:
        v = float(level)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} needs a level: {LEVEL_MEANING[name]}; got {level!r}") from None
    if name == "inpainting":
        if not 0 <= v < 1:
            raise ValueError(f"the inpainting level is the {LEVEL_MEANING[name]}, got {level!r}")
        return v
    if not (math.isfinite(v) and v == int(v) and v >= 1):
        raise ValueError(f"the {name} level is the {LEVEL_MEANING[name]}, got {level!r}")
    return int(v)


def make_problem(
    name: str,
    x: Tensor,
    *,
    sigma: float,
    level: float | int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    kernel: Tensor | None = None,
    block: int | None = None,
    mask: str = "pixels",
) -> Problem:
    """Degrade the clean images ``x`` ``(B, C, H, W)``: build the operator of problem ``name`` and draw ``y``.

    ``sigma``: noise std >= 0 on the 0-255 scale; ``level``: see :data:`LEVEL_MEANING` (inpainting: missing fraction,
    one random mask per image as the official code, of independent pixels or, with ``mask="blobs"``, of random blobs
    (:func:`blob_masks`, PnP-HVAE Table 3); compressed sensing: ``m``, ``A`` with i.i.d. ``N(0, 1/m)``
    entries; super-resolution: the factor); ``kernel``: the 2D kernel of ``blur`` and ``super_resolution``;
    ``block``: inpainting only, missing square blocks of this side instead of missing pixels (:class:`Inpainting`;
    AIPO §4.4 uses ``level=0.25, block=4``).
    The random draws come from ``generator``, or from a new one seeded with ``seed`` (exactly one of them), in
    this order: the operator (mask or matrix), then the noise. A caller that passes one generator to several calls
    gets the draws one after the other, so a whole set of problems follows from one seed.
    """
    level = check_level(name, level)
    if (seed is None) == (generator is None):
        raise ValueError("pass exactly one of seed (an int) or generator (a torch.Generator) for the random draws")
    g = torch.Generator().manual_seed(int(seed)) if generator is None else generator
    check_images(x, "x")
    shape = tuple(int(s) for s in x.shape[1:])
    if name in ("blur", "super_resolution") and kernel is None:
        raise ValueError(f"{name} needs a 2D kernel (e.g. jpmap_core.data.load_kernels())")
    if name not in ("blur", "super_resolution") and kernel is not None:
        raise ValueError(f"{name} takes no kernel")
    check_choice(mask, "mask", MASK_PATTERNS)
    if name != "inpainting" and mask != "pixels":
        raise ValueError(f"{name} takes no mask pattern (mask={mask!r} is for inpainting)")
    if name != "inpainting" and block is not None:
        raise ValueError(f"block (the side of missing square blocks) is an inpainting option; {name} takes none")
    if name == "denoising":
        op: LinearOperator = Denoising(shape)
    elif name == "inpainting":
        op = Inpainting(
            image_shape=shape, missing=float(level), batch_size=x.shape[0], generator=g, block=block, pattern=mask
        )
    elif name == "compressed_sensing":
        op = CompressedSensing(int(level), shape, generator=g)
    elif name == "blur":
        op = BlurFFT(kernel, shape)
    else:
        op = SuperResolution(kernel, int(level), shape)
    return Problem(name, level, float(check_nonnegative(sigma, "sigma")), op, op.degrade(x, sigma, generator=g))
