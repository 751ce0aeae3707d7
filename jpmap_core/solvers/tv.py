r"""Total-variation restoration by accelerated proximal gradient, a classical baseline of PnP-HVAE's Tables 2-3
(Rudin, Osher & Fatemi 1992; FISTA and its monotone variant MFISTA, Beck & Teboulle, IEEE TIP 2009).

.. math::

    \hat x = \arg\min_x F(x) = \frac{\|Ax - y\|^2}{2\sigma^2} + \lambda \, \mathrm{TV}(x), \qquad
    \mathrm{TV}(x) = \|Dx\|_{1,2} = \sum_{c, i} \sqrt{(D_h x)_{c,i}^2 + (D_v x)_{c,i}^2}

(isotropic, per colour channel: deepinv's ``TVPrior.fn``). MFISTA: from ``x_0 = A^T y``, with step ``t = \sigma^2 / L``
(``L = \|A\|^2`` by power iteration),

.. math::

    u_k = \mathrm{prox}_{t \lambda \mathrm{TV}}\big(v_k - t \nabla f(v_k)\big), \quad
    x_k = \arg\min\{F(u_k), F(x_{k-1})\}, \quad
    v_{k+1} = x_k + \tfrac{\theta_k}{\theta_{k+1}}(u_k - x_k) + \tfrac{\theta_k - 1}{\theta_{k+1}}(x_k - x_{k-1}),

so ``F(x_k)`` never increases. The TV prox is deepinv's (``deepinv.models.TVDenoiser``, Condat's primal-dual
algorithm), a fresh one for every image (deepinv's denoiser keeps a warm start between calls).

**Regularisation weight.** ``lambda`` is the MAP weight of a prior ``p(\nabla x_{c,i}) \propto e^{-|\nabla x_{c,i}| /
b}`` on each pixel's gradient vector, whose maximum-likelihood scale is ``b = E|\nabla x| / 2``, i.e.
``lambda = 2 / E|\nabla x|`` with the mean gradient magnitude of the 48 BSD training images
(:data:`~jpmap_core.solvers._classical.BSD_TRAIN_GRADIENTS`, the images that trained ``bsd_patch_hvae``), scaled by
:data:`TV_LAMBDA_SCALE` ``= 1/4``: MAP with the fitted prior over-smooths, and 1/4 was the best of the factors
{1/16, 1/8, 1/4, 1/2, 1} on 48x48 crops of 4 *training* images (kernels 4 and 9, sigma 2.55, 7.65, 12.75; mean PSNR
27.38 dB against 26.34 dB for the unscaled rule; 1/8 and 1/16 were worse where tried).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._checks import check_positive
from ..energy import Sigma
from ._classical import BSD_TRAIN_GRADIENTS, OneImage, check_classical, run_per_image
from ._common import Restoration

#: factor on the maximum-likelihood weight ``2 / E|grad x|`` (module docstring)
TV_LAMBDA_SCALE = 0.25


def tv_value(x: Tensor) -> Tensor:
    """``TV(x) = ||Dx||_{1,2}`` per image (deepinv's ``TVPrior.fn``)."""
    from deepinv.optim import TVPrior

    return TVPrior().fn(x)


def operator_norm_sq(op: Any, like: Tensor, iters: int = 50) -> float:
    """``||A||^2``, the largest eigenvalue of ``A^T A``, by power iteration from a constant image (deterministic)."""
    v = torch.ones_like(like)
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        w = op.A_adjoint(op.A(v))
        lam = float((v * w).sum())
        n = float(w.norm())
        if n == 0:
            return 0.0
        v = w / n
    return lam


def tv(
    y: Tensor,
    op: Any,
    prior: None = None,
    *,
    sigma: Sigma,
    lam: float | None = None,
    max_iters: int = 100,
    tol: float = 1e-4,
    prox_iters: int = 200,
    prox_tol: float = 1e-6,
    x0: Tensor | None = None,
) -> Restoration:
    """TV restoration (module docstring) of ``y = A x + noise``, noise std ``sigma`` on the 0-255 scale.

    :param prior: ``None`` (the TV prior is set by ``lam``).
    :param lam: weight of ``TV(x)`` against ``||Ax - y||^2 / (2 sigma^2)`` (pixels in [0, 1]); default
        ``TV_LAMBDA_SCALE * 2 / mean_magnitude`` of the BSD training images' gradients (module docstring), about 7.9.
    :param max_iters, tol: at most ``max_iters`` MFISTA iterations; an image stops when ``||x_k - x_{k-1}|| <= tol
        ||x_k||``.
    :param prox_iters, prox_tol: iterations and tolerance of deepinv's TV prox.
    :param x0: first iterate (default ``A^T y``).

    ``history["objective"]`` holds ``F(x_k)`` (non-increasing), ``iterations`` the MFISTA iterations.
    """
    from deepinv.models import TVDenoiser

    y, aty, sigma = check_classical(y, op, prior, sigma, "tv")
    default = TV_LAMBDA_SCALE * 2.0 / BSD_TRAIN_GRADIENTS["mean_magnitude"]
    lam = float(default if lam is None else check_positive(lam, "lam"))
    if isinstance(max_iters, bool) or int(max_iters) != max_iters or max_iters < 1:
        raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}")
    if x0 is not None and tuple(x0.shape) != tuple(aty.shape):
        raise ValueError(f"x0 has shape {tuple(x0.shape)} but the images have shape {tuple(aty.shape)}")

    def solve_one(yb: Tensor, opb: Any, sb: float, b: int) -> OneImage:
        s2 = (sb / 255.0) ** 2
        start = opb.A_adjoint(yb) if x0 is None else x0[b : b + 1].to(yb)
        L = operator_norm_sq(opb, start)
        t = s2 / L if L > 0 else s2

        def F(x: Tensor) -> float:
            return float((opb.A(x) - yb).pow(2).sum() / (2 * s2) + lam * tv_value(x).sum())

        denoiser = TVDenoiser(n_it_max=prox_iters, crit=prox_tol)
        x_prev = x = start.clone()
        v, theta, fx = x.clone(), 1.0, F(x)
        history, converged, iterations = [fx], False, 0
        for k in range(1, int(max_iters) + 1):
            iterations = k
            grad = opb.A_adjoint(opb.A(v) - yb) / s2
            u = denoiser(v - t * grad, ths=t * lam)
            fu = F(u)
            x_prev, x = x, (u if fu <= fx else x)
            fx = min(fu, fx)
            theta_next = (1 + math.sqrt(1 + 4 * theta**2)) / 2
            v = x + (theta / theta_next) * (u - x) + ((theta - 1) / theta_next) * (x - x_prev)
            theta = theta_next
            history.append(fx)
            if float((x - x_prev).norm()) <= tol * float(x.norm()) and fu <= fx:
                converged = True
                break
        return OneImage(x, history, iterations, converged)

    info = {"method": "tv", "lam": lam, "max_iters": max_iters, "tol": tol, "prox": "deepinv TVDenoiser",
            "prox_iters": prox_iters}  # fmt: skip
    return run_per_image(y, op, sigma, solve_one, info)
