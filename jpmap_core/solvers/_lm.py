r"""A batched second-order latent step: Levenberg-Marquardt on the z-problems of JPMAP and CSGM.

Both latent problems are regularised nonlinear least squares in a small latent (``l = 8`` for the MNIST MLP, 32 for the
CelebA conv prior):

* JPMAP's z-step, ``argmin_z J1(x, z)`` (eq. 2.5 in ``z``, divided by ``beta`` as the official code does):
  ``1/2 ||mu_theta(z) - x||^2 + 1/(2 beta) ||z||^2``;
* CSGM (eq. 1.3): ``||A mu_theta(z) - y||^2 + lambda ||z||^2``.

Both are ``loss(z) = c (||R(z)||^2 + w ||z||^2)`` with a residual ``R(z) = A mu_theta(z) - t`` (``A = I, t = x,
w = 1/beta, c = 1/2`` for JPMAP; ``t = y, w = lambda, c = 1`` for CSGM). With ``f = loss / (2c)``, its gradient
``g = J^T R + w z`` (``J = dR/dz``, from one forward-mode pass of the decoder over the ``l`` basis tangents:
:meth:`~jpmap_core.models.GaussianVAE.decode_jacobian`) and the model Hessian ``M = J^T J + w I + S``, each iteration
solves, per image, the ``l x l`` system

.. math:: (M + \mu I)\, \delta = -g

(``torch.linalg.eigh`` of the batch of ``M``) and tries ``z + delta``:

* **Gauss-Newton plus a structured secant term.** ``J^T J + w I`` is the Gauss-Newton matrix; ``S`` estimates the
  part it leaves out, ``sum_i R_i Hess R_i``, which is large where the residual is (noisy or incomplete data: the
  true Hessian is indefinite at many encoder codes, and at the minimiser its smallest eigenvalue is often half of
  Gauss-Newton's, which then converges only linearly). ``S`` starts at 0 and follows the update of Dennis, Gay and
  Welsch (NL2SOL, ACM TOMS 1981): after each trial ``s = delta``, ``y# = (J_new - J)^T R_new``, ``y = g_new - g``,
  ``S <- tau S`` with ``tau = min(1, |s^T y#| / |s^T S s|)``, then the rank-two update that makes ``S s = y#``.
* **Damping** (Nielsen 1999; Madsen, Nielsen & Tingleff, *Methods for non-linear least squares problems*, 2004):
  ``mu_0 = tau0 max diag(J^T J + w I)``; the gain ratio ``rho`` = actual / predicted decrease of ``f`` (predicted by
  the model ``-g^T delta - 1/2 delta^T M delta``); accept the step if ``rho > 0`` and set
  ``mu <- mu max(1/3, 1 - (2 rho - 1)^3)``, ``nu <- 2``; else keep ``z`` and set ``mu <- mu nu``, ``nu <- 2 nu``. No
  hand-tuned thresholds, and no stalling at a fixed small ``mu`` (the usual ``x10 / 10`` rule oscillates). Where
  ``M`` is indefinite the damping is raised to ``-lambda_min(M) + 1e-3 max diag(J^T J + w I)`` so that the system
  is positive definite: the step then follows the negative curvature as far as the damping allows.
* **The actual decrease without cancellation**: ``f(z) - f(z')`` is computed as
  ``1/2 sum (R - R')(R + R') + w/2 sum (z - z')(z + z')``; where this is below its own rounding error (a float32
  decoder near the minimiser, where ``f`` changes by less than its last digits), the trapezoid rule
  ``-1/2 (g + g')^T delta`` is used instead (exact for a quadratic, so accurate for the tiny steps concerned).
* **Stopping: Adam's rule** (the official JPMAP criterion), ``||grad loss||_2 / l < tol`` at the current iterate
  (``grad loss = 2c g``, exact: the Gauss-Newton gradient is the gradient), or after ``max_iters`` Jacobian
  evaluations, or when the step can no longer move ``z`` (``converged`` stays ``False``).

Every image has its own ``z``, ``mu``, ``nu``, ``S`` and stopping state, so its trajectory does not depend on the
other images of the batch (batched equals alone). One call of :meth:`LMPool.step` is one batched Jacobian pass: the
first evaluation of a newly started row and the trial point of every other running row.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._common import AdamResult, Clock

#: ``residual_fn(z_rows, idx) -> (R, J, w)``: the residuals ``R`` ``(b, m)`` of rows ``idx`` at ``z_rows`` ``(b, l)``,
#: their Jacobian ``J`` ``(b, l, m)`` (``J[i, k] = dR_i / dz_k``) and the weight ``w`` ``(b,)`` of ``||z||^2``
ResidualFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]

#: ``mu <- mu`` this after a rejection, once ``mu`` passed it the step cannot move ``z`` any more
_MU_MAX = 1e20


class LMPool:
    """Batched Levenberg-Marquardt over a pool of rows that start and stop independently (the module docstring),
    with the interface of :class:`~._common.AdamPool`, so the alternation of Alg. 2.1-2.3 and CSGM take either.

    ``loss = scale (||R||^2 + w ||z||^2)`` per row, ``R``, ``J = dR/dz`` and ``w`` from ``residual_fn`` (one batched
    Jacobian pass per :meth:`step`). A row stops when ``||grad loss||_2 / l < tol`` or after ``max_iters`` Jacobian
    evaluations. ``best_z`` / ``best_loss`` are each row's current iterate and loss (a step is accepted only if it
    lowers the loss, so they are its best), ``steps`` its LM iterations (trial points), ``evals`` its Jacobian
    evaluations since its start, ``evals_total`` since the pool was made. ``tau0``: the initial damping relative to
    the largest curvature, ``mu_0 = tau0 max diag(J^T J + w I)``; Madsen, Nielsen & Tingleff advise ``1e-6`` to
    ``1e-3`` from a good start (JPMAP's z-steps start from the encoder's code or the previous ``z_n``: ``1e-3``,
    the default) and up to 1 from a poor one (CSGM from ``z = 0`` or a random restart). ``secant``: add the
    structured secant term ``S`` (``False``: plain Levenberg-Marquardt on the Gauss-Newton matrix).
    """

    def __init__(
        self,
        residual_fn: ResidualFn,
        like: Tensor,
        *,
        scale: float = 0.5,
        tol: float = 1e-4,
        max_iters: int = 3000,
        tau0: float = 1e-3,
        secant: bool = True,
    ) -> None:
        if like.dim() != 2:
            raise ValueError(f"LMPool needs flat latents (B, l), got shape {tuple(like.shape)}")
        self.residual_fn, self.scale, self.tol, self.max_iters = residual_fn, float(scale), float(tol), int(max_iters)
        self.tau0, self.secant = float(tau0), bool(secant)
        bsz, ldim = like.shape
        dev, dt = like.device, like.dtype
        self.z = torch.zeros_like(like)
        self.f = torch.full((bsz,), math.inf, dtype=dt, device=dev)  # f = loss / (2 scale) at z
        self.g = torch.zeros_like(like)  # grad f at z
        self.JtJ = torch.zeros(bsz, ldim, ldim, dtype=dt, device=dev)
        self.S = torch.zeros(bsz, ldim, ldim, dtype=dt, device=dev)
        self.w = torch.zeros(bsz, dtype=dt, device=dev)
        self.mu = torch.zeros(bsz, dtype=dt, device=dev)
        self.nu = torch.full((bsz,), 2.0, dtype=dt, device=dev)
        self.R: Tensor | None = None  # (B, m) residuals at z, allocated at the first evaluation (m known then)
        self.J: Tensor | None = None  # (B, l, m)
        self.fresh = torch.zeros(bsz, dtype=torch.bool, device=dev)  # started, z not evaluated yet
        self.steps = torch.zeros(bsz, dtype=torch.long, device=dev)
        self.evals = torch.zeros(bsz, dtype=torch.long, device=dev)
        self.evals_total = torch.zeros(bsz, dtype=torch.long, device=dev)
        self.rejected = torch.zeros(bsz, dtype=torch.long, device=dev)
        self.converged = torch.zeros(bsz, dtype=torch.bool, device=dev)
        self.running = torch.zeros(bsz, dtype=torch.bool, device=dev)
        self._instant = torch.zeros(bsz, dtype=torch.bool, device=dev)
        self.last: tuple[Tensor, Tensor] | None = None  # (rows, losses at their iterate) after the last step
        self.last_final: tuple[Tensor, Tensor] | None = None  # never set (AdamPool's interface)
        self.calls = 0  # batched Jacobian passes so far

    # ---- AdamPool's interface -----------------------------------------------------------------------------------
    @property
    def best_z(self) -> Tensor:
        return self.z

    @property
    def best_loss(self) -> Tensor:
        return 2 * self.scale * self.f

    def start(self, rows: Tensor, z0: Tensor) -> None:
        """(Re)start the descents of ``rows`` from ``z0`` (fresh damping, secant term and counters)."""
        self.z[rows] = z0.detach()
        self.f[rows] = math.inf
        self.S[rows] = 0
        self.steps[rows] = 0
        self.evals[rows] = 0
        self.rejected[rows] = 0
        self.converged[rows] = False
        if self.max_iters > 0:
            self.fresh[rows] = True
            self.running[rows] = True
        else:
            self._instant[rows] = True

    def busy(self) -> bool:
        return bool(self.running.any()) or bool(self._instant.any())

    def step(self) -> Tensor:
        """One batched Jacobian pass: every fresh row is evaluated at its start, every other running row at its
        trial point ``z + delta``; returns the rows that finished."""
        finished = [self._instant.nonzero().squeeze(1)]
        self._instant.zero_()
        self.last = None
        idx = self.running.nonzero().squeeze(1)
        if idx.numel() == 0:
            return torch.cat(finished)
        fresh = self.fresh[idx]
        it, new = idx[~fresh], idx[fresh]
        trial = self._trial_steps(it) if it.numel() else None
        z_eval = self.z[new] if trial is None else torch.cat([self.z[new], self.z[it] + trial[0]])
        order = torch.cat([new, it])
        R, J, w = self.residual_fn(z_eval, order)
        R, J = R.detach().flatten(1), J.detach().flatten(2)
        self.calls += 1
        self.evals[order] += 1
        self.evals_total[order] += 1
        if self.R is None:
            self.R = R.new_zeros(self.z.shape[0], R.shape[1])
            self.J = R.new_zeros(self.z.shape[0], self.z.shape[1], R.shape[1])
        f, g, JtJ = self._derivatives(z_eval, R, J, w)
        n = new.numel()
        if n:
            self._set(new, z_eval[:n], f[:n], g[:n], JtJ[:n], R[:n], J[:n], w[:n])
            self.mu[new] = self.tau0 * (JtJ[:n].diagonal(dim1=1, dim2=2).amax(1) + w[:n])
            self.nu[new] = 2.0
            self.fresh[new] = False
        stuck = torch.zeros_like(self.running)
        if trial is not None:
            stuck[self._judge(it, *trial, z_eval[n:], f[n:], g[n:], JtJ[n:], R[n:], J[n:], w[n:])] = True
        finished.append(self._stop(order, stuck[order]))
        self.last = (order, self.best_loss[order])
        return torch.cat(finished)

    # ---- the pieces of one iteration ----------------------------------------------------------------------------
    def _derivatives(self, z: Tensor, R: Tensor, J: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``f = 1/2 (||R||^2 + w ||z||^2)``, ``g = J^T R + w z`` and ``J^T J`` of every evaluated row."""
        f = 0.5 * (R.pow(2).sum(1) + w * z.pow(2).sum(1))
        g = torch.einsum("bkm,bm->bk", J, R) + w[:, None] * z
        JtJ = torch.einsum("bkm,bjm->bkj", J, J)
        return f, g, JtJ

    def _set(self, rows, z, f, g, JtJ, R, J, w) -> None:
        self.z[rows], self.f[rows], self.g[rows], self.JtJ[rows] = z, f, g, JtJ
        self.R[rows], self.J[rows], self.w[rows] = R, J, w

    def _trial_steps(self, it: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per row of ``it``: the step ``delta`` solving ``(M + mu_eff I) delta = -g`` (``M = J^T J + w I + S``), the
        decrease of ``f`` that the model predicts, and the damping ``mu_eff`` used."""
        ldim = self.z.shape[1]
        eye = torch.eye(ldim, dtype=self.z.dtype, device=self.z.device)
        JtJ, w = self.JtJ[it], self.w[it]
        M = JtJ + w[:, None, None] * eye + self.S[it]
        lam, V = torch.linalg.eigh(M.double())
        floor = 1e-3 * (JtJ.diagonal(dim1=1, dim2=2).amax(1) + w)  # keeps M + mu_eff I positive definite
        mu_eff = torch.maximum(self.mu[it], -lam[:, 0].to(M.dtype) + floor)
        g = self.g[it]
        coef = (V.transpose(1, 2) @ g.double().unsqueeze(2)).squeeze(2) / (lam + mu_eff.double()[:, None])
        delta = -(V @ coef.unsqueeze(2)).squeeze(2).to(g.dtype)
        pred = -(g * delta).sum(1) - 0.5 * torch.einsum("bi,bij,bj->b", delta, M, delta)
        return delta, pred, mu_eff

    def _judge(self, it, delta, pred, mu_eff, z_new, f_new, g_new, JtJ_new, R_new, J_new, w) -> Tensor:
        """Accept or reject the trial points of rows ``it`` (gain ratio, Nielsen's damping update, secant term);
        returns the rows whose step can no longer move ``z`` (a step below rounding, or an overflowing damping)."""
        z, R = self.z[it], self.R[it]
        eps = torch.finfo(R.dtype).eps
        direct = 0.5 * ((R - R_new) * (R + R_new)).sum(1, dtype=torch.float64)
        direct += 0.5 * (w * ((z - z_new) * (z + z_new)).sum(1)).double()
        big = torch.maximum(R.abs().amax(1), R_new.abs().amax(1)).clamp_min(1.0)
        noise = 4 * eps * ((R + R_new).abs().sum(1) * big + w * (z + z_new).abs().sum(1) * (1 + z.abs().amax(1)))
        trapezoid = -0.5 * ((self.g[it] + g_new) * delta).sum(1)
        actual = torch.where(direct.abs() <= noise.double(), trapezoid.double(), direct)
        actual = torch.where(torch.isfinite(f_new), actual, torch.full_like(actual, -math.inf))
        rho = (actual / pred.double().clamp_min(torch.finfo(torch.float64).tiny)).to(pred.dtype)
        ok = rho > 0
        if self.secant:
            self._secant_update(it, delta, R_new, J_new, g_new, ok)
        acc, rej = it[ok], it[~ok]
        if acc.numel():
            self._set(acc, z_new[ok], f_new[ok], g_new[ok], JtJ_new[ok], R_new[ok], J_new[ok], w[ok])
            self.mu[acc] = self.mu[acc] * torch.clamp(1 - (2 * rho[ok] - 1) ** 3, min=1 / 3)
            self.nu[acc] = 2.0
        if rej.numel():
            self.mu[rej] = torch.maximum(self.mu[rej], mu_eff[~ok]) * self.nu[rej]
            self.nu[rej] = 2 * self.nu[rej]
            self.rejected[rej] += 1
        self.steps[it] += 1
        moved = delta.norm(dim=1) > eps * (z.norm(dim=1) + eps)
        return it[~moved | ~torch.isfinite(self.mu[it]) | (self.mu[it] > _MU_MAX)]

    def _secant_update(self, it, s, R_new, J_new, g_new, ok) -> None:
        """Dennis-Gay-Welsch update of ``S`` (module docstring) from every trial point, accepted or not (both say
        how the gradient of the residual term changes along ``s``)."""
        S = self.S[it]
        y = g_new - self.g[it]
        w = self.w[it][:, None]  # J_new^T R_new = g_new - w z_new, so y# needs one product with the old J only
        y_sharp = g_new - w * (self.z[it] + s) - torch.einsum("bkm,bm->bk", self.J[it], R_new)
        ys = (y * s).sum(1)
        sSs = torch.einsum("bi,bij,bj->b", s, S, s)
        size = ((y_sharp * s).sum(1).abs() / sSs.abs().clamp_min(torch.finfo(s.dtype).tiny)).clamp(max=1.0)
        S = torch.where(sSs.abs()[:, None, None] > 0, size[:, None, None] * S, S)
        e = y_sharp - torch.einsum("bij,bj->bi", S, s)
        usable = (ys > 1e-8 * y.norm(dim=1) * s.norm(dim=1)) & torch.isfinite(ys) & torch.isfinite(e).all(1)
        ys1 = torch.where(usable, ys, torch.ones_like(ys))[:, None, None]
        upd = (e[:, :, None] * y[:, None, :] + y[:, :, None] * e[:, None, :]) / ys1
        upd = upd - ((e * s).sum(1)[:, None, None] / ys1**2) * (y[:, :, None] * y[:, None, :])
        self.S[it] = torch.where(usable[:, None, None], S + upd, S)

    def _stop(self, rows: Tensor, stuck: Tensor) -> Tensor:
        """Adam's stopping rule at the current iterate of ``rows``, the cap on evaluations, or a step that cannot
        move ``z`` (``stuck``, not converged)."""
        grad_norm = 2 * self.scale * self.g[rows].norm(dim=1) / self.z.shape[1]
        done = grad_norm < self.tol
        self.converged[rows[done]] = True
        stop = rows[done | stuck | (self.evals[rows] >= self.max_iters)]
        self.running[stop] = False
        return stop


def lm_minimize(
    residual_fn: ResidualFn,
    z0: Tensor,
    *,
    scale: float = 1.0,
    tol: float = 1e-4,
    max_iters: int = 3000,
    tau0: float = 1e-3,
    secant: bool = True,
    record: bool = False,
) -> AdamResult:
    """:func:`~._common.adam_minimize` with :class:`LMPool`: every row started at once from ``z0``; returns the same
    :class:`~._common.AdamResult` (``steps``: LM iterations; ``trace``: the loss of each row's iterate after every
    batched Jacobian pass, NaN once it stopped; ``batched_steps``: the passes) and the pool's Jacobian evaluations
    per row as ``evals``."""
    clock = Clock()
    rows: list[Tensor] = []
    times: list[float] = []
    bsz = z0.shape[0]
    pool = LMPool(residual_fn, z0, scale=scale, tol=tol, max_iters=max_iters, tau0=tau0, secant=secant)
    pool.start(torch.arange(bsz, device=z0.device), z0.detach())
    pool._instant.zero_()
    while pool.running.any():
        pool.step()
        if record and pool.last is not None:
            row = torch.full((bsz,), math.nan, dtype=z0.dtype)
            row[pool.last[0].cpu()] = pool.last[1].cpu()
            rows.append(row)
            times.append(clock())
    trace = torch.stack(rows) if record and rows else None
    return AdamResult(
        pool.best_z.clone(), pool.best_loss.clone(), pool.steps.clone(), pool.converged.clone(), trace,
        torch.tensor(times) if record else None, pool.calls, pool.evals_total.clone(),
    )  # fmt: skip
