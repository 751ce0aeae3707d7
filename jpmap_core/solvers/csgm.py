"""CSGM (Bora et al. 2017), JPMAP eq. 1.3: gradient descent on the latent code only, batched.

``z_hat = argmin_z ||A G(z) - y||^2 + lambda ||z||^2`` with ``lambda = sigma^2`` (sigma on the [0, 1] scale), the
weight the JPMAP paper uses for its comparison: this is ``2 sigma^2 [F(G(z), y) + 1/2 ||z||^2]``, i.e. the
MAP-z problem of eq. 1.3. Adam (lr 0.01), per-image stopping ``||grad||/l < tol`` (official code: 1e-5, at most
5000 steps), optional random restarts keeping the lowest energy per image. ``x = G(z_hat)`` (eq. 1.4).
``z_optimizer="lm"``: batched Levenberg-Marquardt (:mod:`._lm`) on the same energy, with the same stopping rule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..energy import Sigma, noise_std, sigma_info
from ..models import Prior
from ._common import Clock, Restoration, adam_minimize, check_problem, require_lm_prior
from ._lm import lm_minimize

Z_OPTIMIZERS = ("adam", "lm")


def csgm(
    y: Tensor,
    op,
    vae: Prior,
    *,
    sigma: Sigma,
    lam: float | Tensor | None = None,
    z0: Tensor | None = None,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    lr: float = 0.01,
    tol: float = 1e-5,
    max_iters: int = 5000,
    z_optimizer: str = "adam",
) -> Restoration:
    """CSGM restoration of ``y`` (noise std ``sigma`` on the 0-255 scale).

    ``sigma``: a number or a ``(B,)`` tensor of per-image noise stds; the default ``lam = sigma^2`` (the [0, 1]
    scale) is then per image too. ``lam``: a number >= 0 or a ``(B,)`` tensor of them.

    ``z0``: first start (default 0; ``vae.encode(x_true)[0]`` for the "initialised at the ground truth" runs
    of Fig. 1). ``restarts > 1`` adds starts ``z ~ N(0, I)`` drawn from ``generator``; each image keeps the
    restart with the lowest energy (``per_image["best_restart"]``). ``history["objective"]`` is the per-iteration
    energy ``||A G(z) - y||^2 + lambda ||z||^2`` ``(T, B)`` of the restart each image kept (NaN after it stopped),
    ``history["seconds"]`` the elapsed time ``(T,)`` of that restart, ``history["objective_final"]`` the final
    energy of every restart ``(restarts, B)``.

    ``z_optimizer``: ``"adam"`` (default: Adam, lr ``lr``) or ``"lm"``: batched Levenberg-Marquardt
    (:class:`~._lm.LMPool`) on the residual ``R(z) = A mu_theta(z) - y`` with the weight ``lambda`` on ``||z||^2``:
    per image and iteration the ``l x l`` system ``(J^T J + lambda I + S + mu I) delta = -(J^T R + lambda z)``,
    ``J = A d mu_theta / dz`` (needs a Gaussian VAE). Both stop at ``||grad||/l < tol`` or after ``max_iters``
    decoder evaluations (gradients, Jacobians); ``per_image["decoder_evals"]`` counts them (all restarts),
    ``history["adam_steps"]`` the iterations of each restart.
    """
    if z_optimizer not in Z_OPTIMIZERS:
        raise ValueError(f"unknown z_optimizer {z_optimizer!r}; expected one of {Z_OPTIMIZERS}")
    y, x0, sigma = check_problem(y, op, vae, sigma, None, "adjoint", None)
    if z_optimizer == "lm":
        require_lm_prior(vae, "CSGM with z_optimizer='lm'")
    B = x0.shape[0]
    if lam is None:
        s = noise_std(sigma, y)
        lam = s * s
    elif isinstance(lam, Tensor):
        if lam.shape != (B,) or not bool((torch.isfinite(lam) & (lam >= 0)).all()):
            raise ValueError(f"lam must be a number or a (B,) = ({B},) tensor of finite values >= 0, got {lam!r}")
        lam = lam.detach().to(dtype=y.dtype, device=y.device)
    else:
        lam = float(lam)
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 1:
        raise ValueError(f"max_iters must be an integer >= 1 (Adam steps per restart), got {max_iters!r}")
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
    ldim = tuple(vae.latent_shape)
    if z0 is None:
        z0 = torch.zeros(B, *ldim, dtype=x0.dtype, device=x0.device)
    elif tuple(z0.shape) != (B, *ldim) or not bool(torch.isfinite(z0).all()):
        raise ValueError(f"z0 must be a finite (B, *latent_shape) = {(B, *ldim)} tensor, got {tuple(z0.shape)}")
    clock = Clock()

    def decode(z: Tensor) -> Tensor:
        return vae.decode(z, check=False)

    best_z, best_E = None, None
    energies, all_steps, all_conv, traces, trace_times = [], [], [], [], []
    batched_steps = 0
    evals = None
    for r in range(restarts):
        start = z0 if r == 0 else torch.randn(B, *ldim, generator=generator, device=x0.device, dtype=x0.dtype)
        with torch.no_grad():
            G_cache = decode(start)

        def loss(zr: Tensor, idx: Tensor, G_cache: Tensor = G_cache) -> Tensor:
            G = G_cache.clone()
            Gi = decode(zr)
            G[idx] = Gi
            G_cache[idx] = Gi.detach()
            res = (op.A(G) - y).flatten(1)[idx]
            lam_i = lam[idx] if isinstance(lam, Tensor) else lam
            return res.pow(2).sum(1) + 2 * lam_i * vae.neg_log_prior(zr)  # lam ||z||^2 for p_Z = N(0, I)

        def residual(zr: Tensor, idx: Tensor, G_cache: Tensor = G_cache) -> tuple[Tensor, Tensor, Tensor]:
            return _residual(zr, idx, vae, op, y, lam, G_cache)

        if z_optimizer == "lm":
            # tau0 = 1: cautious first steps from a poor start (z = 0 or a random restart), see LMPool
            out = lm_minimize(residual, start, scale=1.0, tol=tol, max_iters=max_iters, tau0=1.0, record=True)
        else:
            out = adam_minimize(loss, start, lr=lr, tol=tol, max_iters=max_iters, record=True)
        evals = out.evals if evals is None else evals + out.evals
        batched_steps += out.batched_steps
        energies.append(out.loss)
        traces.append(out.trace)
        trace_times.append(out.trace_seconds)
        all_steps.append(out.steps)
        all_conv.append(out.converged)
        if best_z is None:
            best_z, best_E, best_r = out.z.clone(), out.loss.clone(), torch.zeros(B, dtype=torch.long)
            steps, conv = out.steps.clone(), out.converged.clone()
        else:
            better = out.loss < best_E
            best_z[better], best_E[better], best_r[better] = out.z[better], out.loss[better], r
            steps[better], conv[better] = out.steps[better], out.converged[better]
    with torch.no_grad():
        x = vae.decode(best_z)
    T = max(t.shape[0] for t in traces)
    padded = torch.stack([torch.cat([t, torch.full((T - t.shape[0], B), float("nan"))]) for t in traces])
    trace = padded[best_r, :, torch.arange(B)].T  # (T, B): each image's kept restart
    return Restoration(
        x=x,
        z=best_z,
        x_decoded=x,
        converged=conv,
        iterations=steps,
        history={
            "objective": trace,
            "seconds": trace_times[0] if restarts == 1 else torch.full((T,), float("nan")),
            "objective_final": torch.stack(energies).cpu(),
            "adam_steps": torch.stack(all_steps).cpu(),
            "converged": torch.stack(all_conv).cpu(),
        },
        info={
            "method": "csgm",
            "sigma": sigma_info(sigma),
            "lam": sigma_info(lam),
            "lr": lr,
            "tol": tol,
            "max_iters": max_iters,
            "restarts": restarts,
            "z_optimizer": z_optimizer,
            "batched_steps": batched_steps,
            "seconds": clock(),
        },
        per_image={"best_restart": best_r.cpu(), "decoder_evals": evals.cpu()},
    )


def _residual(zr: Tensor, idx: Tensor, vae, op, y: Tensor, lam, G_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CSGM as least squares for :class:`~._lm.LMPool`: ``R = A mu_theta(z) - y``, ``J = A d mu_theta/dz`` (``A``
    applied to each of the ``l`` tangent images) and the weight ``lambda`` of ``||z||^2``, for rows ``idx``.

    Only rows ``idx`` are computed when the operator can be restricted to them (:meth:`LinearOperator.rows`);
    otherwise ``A`` acts on the whole batch (the other rows from ``G_cache``; for the tangents, zeros: ``A`` is
    linear) and rows ``idx`` are kept.
    """
    G, JG = vae.decode_jacobian(zr)
    ldim = JG.shape[1]
    lam_i = lam[idx] if isinstance(lam, Tensor) else torch.full((zr.shape[0],), float(lam), dtype=zr.dtype)
    sub = op.rows(idx) if hasattr(op, "rows") else None
    if sub is not None:
        R = (sub.A(G) - y[idx]).flatten(1)
        J = torch.stack([sub.A(JG[:, k]).flatten(1) for k in range(ldim)], 1)
        return R, J, lam_i.to(zr)
    G_all = G_cache.clone()
    G_all[idx] = G
    G_cache[idx] = G
    R = (op.A(G_all) - y).flatten(1)[idx]
    cols = []
    for k in range(ldim):
        T = torch.zeros_like(G_cache)
        T[idx] = JG[:, k]
        cols.append(op.A(T).flatten(1)[idx])
    return R, torch.stack(cols, 1), lam_i.to(zr)
