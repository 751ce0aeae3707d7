r"""Wiener filter: the MAP (= MMSE) estimate under a stationary Gaussian image prior with a ``1/f^2`` spectrum, a
classical baseline of PnP-HVAE's Table 2 (Wiener 1949; Wiener-Hunt deconvolution, Hunt 1973; Orieux, Giovannelli &
Rodet, JOSA A 2010).

**Prior.** The finite differences ``D x`` (horizontal and vertical, circular, every colour channel) are i.i.d.
``N(0, s^2)``, i.e. the image spectrum is ``S_x(\omega) = s^2 / |D(\omega)|^2`` with
``|D(\omega)|^2 = 4 \sin^2(\omega_1 / 2) + 4 \sin^2(\omega_2 / 2)``, which falls as ``1/|\omega|^2`` like the spectra of
natural images (Field 1987). The default ``s^2`` is the mean squared finite difference of the 48 BSD training images
(:data:`~jpmap_core.solvers._classical.BSD_TRAIN_GRADIENTS`).

**Estimate.** For ``y = A x + n``, ``n ~ N(0, \sigma^2 I)``,

.. math::

    \hat x = \arg\min_x \frac{\|Ax - y\|^2}{2\sigma^2} + \frac{\|Dx\|^2}{2 s^2}
    \quad\Longrightarrow\quad
    \hat X(\omega) = \frac{\overline{H(\omega)}\, Y(\omega)}{|H(\omega)|^2 + \frac{\sigma^2}{s^2}|D(\omega)|^2}

for a circular convolution ``A`` (:class:`~jpmap_core.operators.BlurFFT`, :class:`~jpmap_core.operators.Denoising`):
the noise-to-signal ratio is ``S_n / S_x = (\sigma^2 / s^2) |D(\omega)|^2``. The transfer function ``H`` is read
off ``A`` applied to a unit impulse. Other operators (inpainting, super-resolution, compressed sensing) solve the same
normal equations ``(A^T A / \sigma^2 + D^T D / s^2) x = A^T y / \sigma^2`` by conjugate gradients.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._checks import check_positive
from ..energy import Sigma
from ..operators import BlurFFT, Denoising
from ._classical import BSD_TRAIN_GRADIENTS, OneImage, check_classical, run_per_image
from ._common import Restoration


def _grad_sq(x: Tensor) -> Tensor:
    """``||D x||^2`` per image, circular forward differences."""
    dh = torch.roll(x, -1, dims=-1) - x
    dv = torch.roll(x, -1, dims=-2) - x
    return (dh.pow(2) + dv.pow(2)).flatten(1).sum(1)


def _dtd(x: Tensor) -> Tensor:
    """``D^T D x`` (the negative circular 5-point Laplacian)."""
    return 4 * x - sum(torch.roll(x, s, dims=d) for s in (1, -1) for d in (-1, -2))


def wiener_objective(x: Tensor, y: Tensor, op: Any, sigma: float, s2: float) -> Tensor:
    """``||Ax - y||^2 / (2 sigma^2) + ||Dx||^2 / (2 s^2)`` per image (``sigma`` on the [0, 1] scale)."""
    r = (op.A(x) - y).flatten(1).pow(2).sum(1)
    return r / (2 * sigma**2) + _grad_sq(x) / (2 * s2)


def _fourier(y: Tensor, op: Any, sigma: float, s2: float) -> Tensor:
    c, h, w = y.shape[1:]
    impulse = torch.zeros(1, c, h, w, dtype=y.dtype, device=y.device)
    impulse[..., 0, 0] = 1
    H = torch.fft.fft2(op.A(impulse))
    wy = 2 * math.pi * torch.fft.fftfreq(h, dtype=y.dtype, device=y.device)[:, None]
    wx = 2 * math.pi * torch.fft.fftfreq(w, dtype=y.dtype, device=y.device)[None, :]
    d2 = 4 * torch.sin(wy / 2).pow(2) + 4 * torch.sin(wx / 2).pow(2)
    den = H.abs().pow(2) + (sigma**2 / s2) * d2
    den = torch.where(den > 0, den, torch.ones_like(den))  # a frequency neither observed nor penalised: 0
    return torch.fft.ifft2(H.conj() * torch.fft.fft2(y) / den).real


def _cg(y: Tensor, op: Any, sigma: float, s2: float, max_iter: int, tol: float) -> tuple[Tensor, int, bool]:
    def normal(v: Tensor) -> Tensor:
        return op.A_adjoint(op.A(v)) / sigma**2 + _dtd(v) / s2

    b = op.A_adjoint(y) / sigma**2
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = float(r.pow(2).sum())
    target = tol**2 * float(b.pow(2).sum())
    for k in range(max_iter):
        if rs <= target:
            return x, k, True
        q = normal(p)
        alpha = rs / float((p * q).sum())
        x = x + alpha * p
        r = r - alpha * q
        rs_new = float(r.pow(2).sum())
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, max_iter, rs <= target


def wiener(
    y: Tensor,
    op: Any,
    prior: None = None,
    *,
    sigma: Sigma,
    s2: float | None = None,
    cg_max_iter: int = 500,
    cg_tol: float = 1e-8,
) -> Restoration:
    """Wiener filter (module docstring) of ``y = A x + noise``, noise std ``sigma`` on the 0-255 scale.

    :param prior: ``None`` (the Gaussian prior is set by ``s2``).
    :param s2: variance of the image's finite differences (pixels in [0, 1]); default: that of the 48 BSD training
        images (:data:`~jpmap_core.solvers._classical.BSD_TRAIN_GRADIENTS`). ``s2 -> inf`` is the inverse filter.
    :param cg_max_iter, cg_tol: conjugate gradients for operators that are not circular convolutions.

    Returns a :class:`~jpmap_core.solvers.Restoration` (``z`` empty); ``history["objective"]`` is the MAP objective
    of the module docstring at the estimate (one row); ``iterations`` counts CG iterations (1 for the closed form).
    """
    y, _, sigma = check_classical(y, op, prior, sigma, "wiener")
    s2 = float(BSD_TRAIN_GRADIENTS["mean_square"] if s2 is None else check_positive(s2, "s2"))
    circulant = isinstance(op, BlurFFT | Denoising)

    def solve_one(yb: Tensor, opb: Any, sb: float, b: int) -> OneImage:
        s = sb / 255.0
        if circulant:
            x, it, ok = _fourier(yb, opb, s, s2), 1, True
        else:
            x, it, ok = _cg(yb, opb, s, s2, cg_max_iter, cg_tol)
        return OneImage(x, [float(wiener_objective(x, yb, opb, s, s2))], it, ok)

    info = {"method": "wiener", "s2": s2, "solver": "closed form (Fourier)" if circulant else "conjugate gradients"}
    return run_per_image(y, op, sigma, solve_one, info)
