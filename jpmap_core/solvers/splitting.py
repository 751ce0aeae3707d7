"""Map-z splitting with continuation, Algorithm 1.1 of JPMAP (half-quadratic splitting, eq. 1.5-1.6).

For each ``beta_k`` of an increasing schedule: alternate the non-convex z-step ``argmin_z J_{1,beta}(x_n, z)`` (by
gradient descent: batched Adam from ``z_n``, no encoder) and the quadratic x-step (eq. 2.7), until the
iterates stop moving (``||dx||/sqrt(d) + ||dz||/sqrt(l) < tol``) or ``maxiter``; then warm-start the next beta.
As ``beta -> inf``, ``x_beta -> x_map-z`` (eq. 1.6). This is Alg. 2.3 with ``n1 = n2 = 0`` run along a beta
schedule -- the encoder is never used, which is exactly what JPMAP adds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..energy import J1, Sigma, as_beta, sigma_info
from ..models import GaussianVAE
from ._common import Clock, History, Restoration, check_problem
from .jpmap import _Ctx, _Engine, _State


def mapz_splitting(
    y: Tensor,
    op,
    vae: GaussianVAE,
    betas: Sequence[float],
    *,
    sigma: Sigma,
    maxiter: int = 300,
    x0: Tensor | None = None,
    z0: Tensor | None = None,
    init: str = "dagger",
    tol: float = 1 / 255,
    adam_lr: float = 0.01,
    adam_tol: float = 1e-4,
    adam_max_iters: int = 3000,
) -> Restoration:
    """Alg. 1.1 over the schedule ``betas`` (positive, non-decreasing). ``z0`` defaults to 0.

    ``history["outer"]`` gives the index ``k`` of ``beta_k`` for each alternation; ``converged`` says whether the
    last beta's inner loop met the tolerance.
    """
    betas = [float(b) for b in betas]
    if not betas or any(not math.isfinite(b) or b <= 0 for b in betas):
        raise ValueError(f"betas must be a non-empty list of positive numbers, got {betas!r}")
    if any(b2 < b1 for b1, b2 in zip(betas, betas[1:], strict=False)):
        raise ValueError(f"betas must be non-decreasing (continuation beta -> inf), got {betas!r}")
    if not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"maxiter must be an integer >= 1, got {maxiter!r}")
    y, x, sigma = check_problem(y, op, vae, sigma, x0, init, None)
    B, ldim = x.shape[0], vae.latent_dim
    z = torch.zeros(B, ldim, dtype=x.dtype, device=x.device) if z0 is None else z0.detach().clone().to(x)
    if z.shape != (B, ldim):
        raise ValueError(f"z0 must have shape (B, l) = ({B}, {ldim}), got {tuple(z.shape)}")
    clock = Clock()
    b = as_beta(betas[0], vae, B, x).clone()
    with torch.no_grad():
        Gz = vae.decode(z)
        J = J1(x, z, y, op, vae, sigma, b, mu_x=Gz)
    st = _State(x.clone(), z, Gz, J, b)
    ctx = _Ctx(
        y, op, vae, sigma, "2.3", float(tol),
        {"lr": adam_lr, "tol": adam_tol, "max_iters": adam_max_iters}, History(B), clock,
    )  # fmt: skip

    def on_run_end(E: Tensor) -> Tensor:  # next beta of the schedule, image by image
        nxt = eng.k[E] + 1
        cont = nxt < len(betas)
        if bool(cont.any()):
            st.beta[E[cont]] = schedule[nxt[cont]]
        return cont

    schedule = torch.tensor(betas, dtype=x.dtype, device=x.device)
    eng = _Engine(st, ctx, 0, 0, maxiter, st.J.clone(), on_run_end)
    eng.run()
    conv, iters = eng.conv_run, eng.iters
    return Restoration(
        x=st.x,
        z=st.z,
        x_decoded=st.Gz,
        converged=conv,
        iterations=iters,
        history=ctx.hist.stack(),
        info={
            "method": "mapz_splitting",
            "betas": betas,
            "sigma": sigma_info(sigma),
            "maxiter": maxiter,
            "tol": tol,
            "seconds": clock(),
        },  # fmt: skip
    )
