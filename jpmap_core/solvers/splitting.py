"""Map-z splitting with continuation, Algorithm 1.1 of JPMAP (half-quadratic splitting, eq. 1.5-1.6).

For each ``beta_k`` of an increasing schedule: alternate the non-convex z-step ``argmin_z J_{1,beta}(x_n, z)`` (by
gradient descent: batched Adam from ``z_n``, no encoder) and the quadratic x-step (eq. 2.7), until the
iterates stop moving (``||dx||/sqrt(d) + ||dz||/sqrt(l) < tol``) or ``maxiter``; then warm-start the next beta.
As ``beta -> inf``, ``x_beta -> x_map-z`` (eq. 1.6). This is Alg. 2.3 with ``n1 = n2 = 0`` run along a beta
schedule -- the encoder is never used, which is exactly what JPMAP adds. ``z_optimizer="lm"`` descends each z-step
by Levenberg-Marquardt instead of Adam (as in :func:`~.jpmap.jpmap`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..energy import J1, Sigma, sigma_info
from ..models import GaussianVAE
from ._common import Clock, History, Restoration, check_problem, require_gaussian_decoder, require_lm_prior
from .alternation import Z_OPTIMIZERS, Alternation, Data, Iterate

#: the default schedule, in units of the decoder's ``1/gamma^2``: from Alg. 2.4's ``beta0 = 0.1/gamma^2`` up to
#: ``1/gamma^2`` (the fixed beta of JPMAP) in 5 geometric steps
DEFAULT_BETAS_GAMMA2 = tuple(10 ** (-1 + i / 4) for i in range(5))


def mapz_splitting(
    y: Tensor,
    op,
    vae: GaussianVAE,
    *,
    sigma: Sigma,
    betas: Sequence[float] | Tensor | None = None,
    maxiter: int = 300,
    x0: Tensor | None = None,
    z0: Tensor | None = None,
    init: str = "dagger",
    tol: float = 1 / 255,
    adam_lr: float = 0.01,
    adam_tol: float = 1e-4,
    adam_max_iters: int = 3000,
    z_optimizer: str = "adam",
) -> Restoration:
    """Alg. 1.1 over the schedule ``betas`` (positive, non-decreasing; default :data:`DEFAULT_BETAS_GAMMA2` times
    ``1/gamma^2``). ``z0`` defaults to 0.

    ``betas`` is one schedule for every image (a sequence), or one per image: a ``(K, B)`` tensor whose column ``b``
    is image ``b``'s schedule, ``NaN`` after its last beta (e.g. the ``beta_k`` path that Alg. 2.4 took on that
    image, to compare both on the same schedule).

    ``history["objective"]`` is ``J_{1,beta_k}`` after each alternation, ``history["outer"]`` the index ``k`` of
    ``beta_k``; ``converged`` says whether the last beta's inner loop met the tolerance.

    ``z_optimizer``: ``"adam"`` (default) or ``"lm"`` (batched Levenberg-Marquardt on the same ``J1 / beta``, same
    stopping rule ``||grad||/l < adam_tol``, at most ``adam_max_iters`` Jacobian evaluations per z-step; see
    :func:`~.jpmap.jpmap`). ``per_image["decoder_evals"]``: each image's decoder evaluations in its z-steps.
    """
    require_gaussian_decoder(vae, "map-z splitting")
    if z_optimizer not in Z_OPTIMIZERS:
        raise ValueError(f"unknown z_optimizer {z_optimizer!r}; expected one of {Z_OPTIMIZERS}")
    if z_optimizer == "lm":
        require_lm_prior(vae, "map-z splitting with z_optimizer='lm'")
    if betas is None:
        betas = [f * vae.beta for f in DEFAULT_BETAS_GAMMA2]
    if not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"maxiter must be an integer >= 1, got {maxiter!r}")
    y, x, sigma = check_problem(y, op, vae, sigma, x0, init, None)
    B, lshape = x.shape[0], tuple(vae.latent_shape)
    shared = not isinstance(betas, Tensor)
    schedule = _schedule(betas, B).to(dtype=x.dtype, device=x.device)  # (K, B), NaN after an image's last beta
    z = torch.zeros(B, *lshape, dtype=x.dtype, device=x.device) if z0 is None else z0.detach().clone().to(x)
    if tuple(z.shape) != (B, *lshape):
        raise ValueError(f"z0 must have shape (B, *latent_shape) = {(B, *lshape)}, got {tuple(z.shape)}")
    clock = Clock()
    b = schedule[0].clone()
    with torch.no_grad():
        Gz = vae.decode(z)
        J = J1(x, z, y, op, vae, sigma, b, mu_x=Gz)
    it = Iterate(x.clone(), z, Gz, J, b)

    def next_beta(E: Tensor, k: Tensor) -> Tensor:  # the next beta of each image's schedule
        nxt = k + 1
        cont = nxt < schedule.shape[0]
        nxt_beta = schedule[nxt.clamp(max=schedule.shape[0] - 1), E]
        cont = cont & ~torch.isnan(nxt_beta)
        if bool(cont.any()):
            it.beta[E[cont]] = nxt_beta[cont]
        return cont

    history = History(B)
    alt = Alternation(
        it, Data(y, op, vae, sigma), algorithm="2.3", n1=0, n2=0, n_max=maxiter, tol=tol,
        adam={"lr": adam_lr, "tol": adam_tol, "max_iters": adam_max_iters}, J_prev=it.J.clone(),
        on_run_end=next_beta, history=history, clock=clock, z_optimizer=z_optimizer,
    )  # fmt: skip
    alt.run()
    return Restoration(
        x=it.x,
        z=it.z,
        x_decoded=it.Gz,
        converged=alt.converged_run,
        iterations=alt.iterations,
        history=history.stack(),
        info={
            "method": "mapz_splitting",
            "betas": [float(v) for v in schedule[:, 0]] if shared else schedule.T.cpu(),
            "sigma": sigma_info(sigma),
            "maxiter": maxiter,
            "tol": tol,
            "z_optimizer": z_optimizer,
            "batched_steps": alt.pool.calls,
            "seconds": clock(),
        },  # fmt: skip
        per_image={"decoder_evals": alt.pool.evals_total.cpu()},
    )


def _schedule(betas: Sequence[float] | Tensor, B: int) -> Tensor:
    """``(K, B)`` float64 schedule from one shared list or a per-image ``(K, B)`` tensor (``NaN``-padded), checked:
    positive, finite, non-decreasing, no beta after a ``NaN``, at least one beta per image."""
    if isinstance(betas, Tensor):
        if betas.dim() != 2 or betas.shape[1] != B or betas.shape[0] < 1:
            raise ValueError(f"a per-image betas tensor must have shape (K, B) = (K, {B}), got {tuple(betas.shape)}")
        sched = betas.detach().double().cpu()
    else:
        try:
            values = [float(v) for v in betas]
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a non-empty list of positive numbers, got {betas!r}") from None
        if not values or any(not math.isfinite(v) for v in values):
            raise ValueError(f"betas must be a non-empty list of positive numbers, got {betas!r}")
        sched = torch.tensor(values, dtype=torch.float64)[:, None].expand(-1, B)
    nan = torch.isnan(sched)
    if bool(nan[0].any()):
        raise ValueError(f"every image needs a first beta; images {nan[0].nonzero().flatten().tolist()} have NaN")
    if bool((nan[:-1] & ~nan[1:]).any()):
        raise ValueError("a per-image schedule may only end with NaN: no beta after a NaN")
    v = sched[~nan]
    if bool((~torch.isfinite(v) | (v <= 0)).any()):
        raise ValueError(f"betas must be positive and finite, got {betas!r}")
    steps = sched[1:] - sched[:-1]
    if bool((steps[~torch.isnan(steps)] < 0).any()):
        raise ValueError(f"betas must be non-decreasing (continuation beta -> inf), got {betas!r}")
    return sched
