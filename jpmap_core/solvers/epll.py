r"""EPLL: Expected Patch Log-Likelihood with a Gaussian-mixture patch prior (Zoran & Weiss, ICCV 2011), a baseline of
PnP-HVAE's Tables 2 and 3, run with deepinv's implementation (``deepinv.optim.EPLL``).

.. math:: \hat x = \arg\min_x \frac{\|Ax - y\|^2}{2\sigma^2} - \sum_i \log p(P_i x)

over every overlapping ``p x p`` patch ``P_i x``, with ``p`` the mixture of a :class:`~jpmap_core.models.PatchGMM`
(``bsd_patch_gmm``: fitted on the training images of ``bsd_patch_hvae``). deepinv minimises it by Zoran & Weiss's
approximate half-quadratic splitting: for an increasing sequence ``beta`` (default ``[1, 4, 8, 16, 32] / sigma^2``, the
schedule of Parameswaran et al., "Accelerating GMM-based patch priors", 2018), each patch gets the Wiener estimate of
its most likely component (covariance regularised by ``1/beta``), patches are averaged, and the image step
``(A^T A + beta sigma^2 I) x = A^T y + beta sigma^2 \tilde x`` is solved by conjugate gradients. Our operators are
passed to deepinv as they are (they offer ``A`` and ``A_adjoint``). It runs in float64 (see :func:`epll`).

**Initialisation.** deepinv starts from ``A^T y``. Its first stage already weighs the prior by ``beta sigma^2 = 1``
against ``|H|^2 <= 1`` for a blur, so from ``A^T y`` the image is barely deconvolved (on two 64x64 BSD test crops,
motion kernel 9, sigma 7.65: 19.0 and 25.5 dB from ``A^T y``, 25.0 and 27.8 dB from the Wiener estimate, whose own
PSNR is 24.2 and 27.5 dB). The default ``init="wiener"`` starts from :func:`~jpmap_core.solvers.wiener`'s estimate;
``init="adjoint"`` is deepinv's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..energy import Sigma
from ..models.gmm import PatchGMM
from ._classical import OneImage, check_classical, run_per_image
from ._common import Restoration
from .wiener import wiener


def epll_objective(
    x: Tensor, y: Tensor, op: Any, prior: PatchGMM, sigma: float, *, mixture: Any = None, chunk: int = 20000
) -> Tensor:
    """``||Ax - y||^2 / (2 sigma^2) - sum_i log p(P_i x)`` per image (``sigma`` on the [0, 1] scale; every patch)."""
    data = (op.A(x) - y).flatten(1).pow(2).sum(1) / (2 * sigma**2)
    mix = prior.mixture() if mixture is None else mixture
    patches = F.unfold(x, prior.patch_size).transpose(1, 2)  # (B, n, C p p), channel-major as the mixture's patches
    nll = torch.stack([torch.cat([prior.neg_log_likelihood(c, mix) for c in p.split(chunk)]).sum() for p in patches])
    return data + nll.to(data)


def epll(
    y: Tensor,
    op: Any,
    prior: PatchGMM,
    *,
    sigma: Sigma,
    betas: Sequence[float] | None = None,
    x0: Tensor | None = None,
    init: str = "wiener",
    patch_batch: int = -1,
) -> Restoration:
    """EPLL restoration (module docstring) of ``y = A x + noise``, noise std ``sigma`` on the 0-255 scale.

    :param prior: a :class:`~jpmap_core.models.PatchGMM` (e.g. ``load_pretrained("bsd_patch_gmm")``); it is not
        modified (deepinv's EPLL sets a covariance regularisation on its mixture: a new one is built).
    :param betas: half-quadratic splitting weights on the [0, 1] scale; default deepinv's ``[1, 4, 8, 16, 32] /
        sigma^2``.
    :param x0: first iterate; default by ``init``: ``"wiener"`` the Wiener estimate (module docstring), ``"adjoint"``
        ``A^T y`` (deepinv's).
    :param patch_batch: patches processed at once (deepinv's ``batch_size``; -1: all; only memory changes).

    ``history["objective"]``: the EPLL objective at the estimate (one row); ``iterations``: the number of ``beta``
    stages. Computed in float64 whatever the input's dtype (deepinv inverts the regularised covariances explicitly,
    which float32 cannot do accurately for patch covariances), returned in ``y``'s dtype.
    """
    from deepinv.optim import EPLL

    y, aty, sigma = check_classical(y, op, prior, sigma, "epll", PatchGMM)
    if aty.shape[1] != prior.channels:
        raise ValueError(f"the images have {aty.shape[1]} channels but the patch mixture models {prior.channels}")
    if min(aty.shape[-2:]) < prior.patch_size:
        raise ValueError(
            f"images of size {tuple(aty.shape[-2:])} are smaller than the {prior.patch_size}-pixel patches"
        )
    if init not in ("wiener", "adjoint"):
        raise ValueError(f"unknown init {init!r}; expected 'wiener' or 'adjoint' (deepinv's A^T y)")
    if x0 is not None and tuple(x0.shape) != tuple(aty.shape):
        raise ValueError(f"x0 has shape {tuple(x0.shape)} but the images have shape {tuple(aty.shape)}")
    init_used = "x0" if x0 is not None else init
    if x0 is None and init == "wiener":
        x0 = wiener(y, op, sigma=sigma).x
    # float64: deepinv forms (Sigma_k + I / beta)^{-1} Sigma_k by an explicit inverse; with the eigenvalues of patch
    # covariances (from ~1e-5 to ~30) float32 loses most of the patch (relative errors near 1 were measured)
    gmm = prior.mixture(torch.float64)  # a new deepinv model: the prior itself is never modified
    model = EPLL(GMM=gmm, pretrained=None, patch_size=prior.patch_size, channels=prior.channels)

    def solve_one(yb: Tensor, opb: Any, sb: float, b: int) -> OneImage:
        s = sb / 255.0
        y64 = yb.double()
        start = None if x0 is None else x0[b : b + 1].double()
        bs = None if betas is None else [float(v) for v in betas]
        with torch.no_grad():
            x = model(y64, opb, sigma=s, x_init=start, betas=bs, batch_size=patch_batch)
            objective = float(epll_objective(x, y64, opb, prior, s, mixture=gmm))
        return OneImage(x.to(yb.dtype), [objective], 5 if betas is None else len(betas), True)

    default_betas = "deepinv default [1, 4, 8, 16, 32] / sigma^2"
    info = {"method": "epll", "init": init_used, "betas": default_betas if betas is None else list(betas),
            "prior": prior.config(), "implementation": "deepinv.optim.EPLL"}  # fmt: skip
    return run_per_image(y, op, sigma, solve_one, info)
