"""Joint posterior maximisation (JPMAP §2.3-2.5): Algorithms 2.1, 2.2, 2.3 and 2.4, batched.

Every image of the batch keeps its own state: its own winning candidate ``i*`` each iteration, its own Adam
z-steps (own moments, own stopping), its own convergence flag (an image that converged stops while the others
go on) and, in Alg. 2.4, its own ``beta``. Solving B images at once gives the same result as solving each alone.

Defaults follow the paper and the official code (mago876/JPMAP):
``n1 = 25, n2 = 150`` (§3.4), Adam lr 0.01 (§3.3) with the official stopping rule ``||grad||/l < 1e-4`` on
``J1 / beta`` and at most 3000 steps, outer tolerance ``||x_{n+1}-x_n||/sqrt(d) + ||z_{n+1}-z_n||/sqrt(l) < 1/255``
(1/255 is an RMSE of one grey level), ``x0 = A_dagger(y)`` (§3.4; ``init="adjoint"`` gives the official
``A^T y``), and for Alg. 2.4 ``beta0 = 0.1/gamma^2``, ``rho = 100/d``, ``eps = (alpha/255)^2 d``.
``z_optimizer="lm"`` replaces the Adam z-steps by batched Levenberg-Marquardt (:mod:`._lm`) on the same energy with
the same stopping rule (not in the paper; far fewer decoder passes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from ..energy import J1, Sigma, as_beta, coupling, sigma_info
from ..models import GaussianVAE
from ._common import Clock, History, Restoration, check_problem, require_gaussian_decoder, require_lm_prior
from .alternation import ALGORITHMS, Z_OPTIMIZERS, Alternation, Data, Iterate


class Multiplier:
    """Alg. 2.4's exponential multiplier on ``||G(z) - x||^2 <= eps`` (``eps = (alpha/255)^2 d``), per image.

    After each run ``k >= 1`` (run 0 is line 2, the plain Alg. 2.3): ``beta <- beta exp(rho C)`` with
    ``C = ||G(z) - x||^2 - eps`` (``rho C`` clipped to [-50, 50] so that ``beta`` stays finite); an image stops when
    ``C <= 0`` (``satisfied``) or after ``k_max`` outer iterations.
    """

    def __init__(self, alpha: Tensor, d: int, B: int, rho: float | None, k_max: int, like: Tensor) -> None:
        if alpha.numel() not in (1, B):
            raise ValueError(f"alpha must be a number or a (B,) = ({B},) tensor, got {alpha.numel()} values")
        self.alpha = alpha
        self.eps = ((alpha / 255.0) ** 2 * d).to(dtype=like.dtype, device=like.device).expand(B)
        self.rho = 100.0 / d if rho is None else float(rho)
        self.k_max = k_max
        self.satisfied = torch.zeros(B, dtype=torch.bool, device=like.device)
        self.outer_iterations = torch.zeros(B, dtype=torch.long, device=like.device)

    def update(self, it: Iterate, E: Tensor, k: Tensor, c: Tensor) -> Tensor:
        """Images ``E`` ended run ``k`` with coupling ``c``: update their beta; returns who runs again."""
        later = k >= 1  # line 2 (k = 0) runs Alg. 2.3 once; the multiplier updates follow each later run
        self.outer_iterations[E[later]] += 1
        C = c - self.eps[E]
        up = E[later]
        it.beta[up] = it.beta[up] * torch.exp((self.rho * C[later]).clamp(-50.0, 50.0))
        sat = later & (C <= 0)
        self.satisfied[E[sat]] = True
        return ~sat & (k < self.k_max)

    def info(self) -> dict:
        one = self.alpha.numel() == 1
        return {
            "alpha": float(self.alpha[0]) if one else self.alpha.clone(),
            "eps": float(self.eps[0]) if one else self.eps.cpu(),
            "rho": self.rho,
            "k_max": self.k_max,
        }


class Snapshots:
    """CPU copies of the iterate at chosen outer iterations ``k`` (Fig. 5): ``x``, ``x_decoded`` (G(z_k)), ``z``,
    ``beta`` (the beta that produced it), ``coupling`` and ``running``, per image."""

    def __init__(self, wanted: set[int], it: Iterate) -> None:
        self.wanted, self.B, self.device = wanted, it.x.shape[0], it.x.device
        self.kept: dict[int, dict[str, Tensor]] = {}
        self.filled: dict[int, Tensor] = {}

    def take(self, it: Iterate, rows: Tensor, k: Tensor, c: Tensor) -> None:
        for kk in k.unique().tolist():
            if kk not in self.wanted:
                continue
            sel = k == kk
            r = rows[sel]
            if kk not in self.kept:
                self.kept[kk] = {
                    "x": torch.zeros_like(it.x), "x_decoded": torch.zeros_like(it.x), "z": torch.zeros_like(it.z),
                    "beta": torch.zeros_like(it.beta), "coupling": torch.zeros_like(it.beta),
                    "running": torch.zeros(self.B, dtype=torch.bool, device=self.device),
                }  # fmt: skip
                self.filled[kk] = torch.zeros(self.B, dtype=torch.bool, device=self.device)
            s_ = self.kept[kk]
            s_["x"][r], s_["x_decoded"][r], s_["z"][r] = it.x[r], it.Gz[r], it.z[r]
            s_["beta"][r], s_["coupling"][r], s_["running"][r] = it.beta[r], c[sel], True
            self.filled[kk][r] = True

    def result(self, it: Iterate, beta_k: Tensor) -> dict[int, dict[str, Tensor]]:
        """Every kept ``k``; images that stopped before ``k`` get their final iterate."""
        with torch.no_grad():
            c_final = coupling(it.x, it.Gz)
        for kk, s_ in self.kept.items():
            rest = ~self.filled[kk]
            s_["x"][rest], s_["x_decoded"][rest], s_["z"][rest] = it.x[rest], it.Gz[rest], it.z[rest]
            s_["beta"][rest], s_["coupling"][rest] = beta_k[rest], c_final[rest]
        return {k: {n: v.detach().clone().cpu() for n, v in self.kept[k].items()} for k in sorted(self.kept)}


def _check_options(algorithm, n1, n2, n_max, k_max, adam_max_iters, alpha, snapshots, tol, adam_lr, adam_tol, z_opt):
    """Validated options: ``(alpha as a CPU float64 tensor or None, the set of snapshot iterations)``."""
    if z_opt not in Z_OPTIMIZERS:
        raise ValueError(f"unknown z_optimizer {z_opt!r}; expected one of {Z_OPTIMIZERS}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS} (Alg. 2.4: pass alpha)")
    for name, v in (("n1", n1), ("n2", n2), ("n_max", n_max), ("k_max", k_max), ("adam_max_iters", adam_max_iters)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    if not n1 <= n2 <= n_max:
        raise ValueError(f"Alg. 2.3 needs n1 <= n2 <= n_max, got n1={n1}, n2={n2}, n_max={n_max}")
    a = None
    if alpha is not None:
        bad = f"alpha must be a number > 0 or a (B,) tensor of them (grey levels of RMSE), got {alpha!r}"
        try:
            a = torch.as_tensor(alpha, dtype=torch.float64).detach().reshape(-1).cpu()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(bad) from None
        if a.numel() == 0 or not bool(torch.isfinite(a).all()) or bool((a <= 0).any()):
            raise ValueError(bad)
    wanted = set()
    for k in snapshots:
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"snapshots must be outer iterations k >= 0 (integers), got {k!r}")
        wanted.add(k)
    if alpha is None and any(k > 0 for k in wanted):
        raise ValueError("snapshots at outer iterations k > 0 need Alg. 2.4 (pass alpha); without it only k = 0 exists")
    if tol <= 0 or adam_lr <= 0 or adam_tol <= 0:
        raise ValueError(f"tol, adam_lr and adam_tol must be > 0, got {tol}, {adam_lr}, {adam_tol}")
    return a, wanted


def _initial_iterate(x, y, op, vae, sigma, beta, z0) -> tuple[Iterate, Tensor]:
    """``(x_0, z_0)`` with ``J1``, and the reference energy of the first acceptance test (``+inf`` without ``z0``:
    the first encoder guess is always accepted, as in the official code)."""
    B, ldim = x.shape[0], vae.latent_shape
    if z0 is None:
        z = torch.zeros(B, *ldim, dtype=x.dtype, device=x.device)
    else:
        if tuple(z0.shape) != (B, *ldim) or not bool(torch.isfinite(z0).all()):
            raise ValueError(f"z0 must be a finite (B, *latent_shape) = {(B, *ldim)} tensor, got {tuple(z0.shape)}")
        z = z0.detach().clone().to(x)
    with torch.no_grad():
        Gz = vae.decode(z)
        J = J1(x, z, y, op, vae, sigma, beta, mu_x=Gz)
    J_prev = torch.full((B,), math.inf, dtype=x.dtype, device=x.device) if z0 is None else J.clone()
    return Iterate(x.clone(), z, Gz, J, beta), J_prev


def jpmap(
    y: Tensor,
    op,
    vae: GaussianVAE,
    *,
    sigma: Sigma,
    algorithm: str = "2.3",
    n1: int = 25,
    n2: int = 150,
    n_max: int = 300,
    beta: float | Tensor | None = None,
    alpha: float | None = None,
    beta0: float | Tensor | None = None,
    rho: float | None = None,
    k_max: int = 350,
    x0: Tensor | None = None,
    z0: Tensor | None = None,
    init: str = "dagger",
    eps_dagger: float | None = None,
    tol: float = 1 / 255,
    adam_lr: float = 0.01,
    adam_tol: float = 1e-4,
    adam_max_iters: int = 3000,
    snapshots: Iterable[int] = (),
    z_optimizer: str = "adam",
) -> Restoration:
    """Restore ``y = A x + noise`` (noise std ``sigma`` on the 0-255 scale) with the VAE prior ``vae``.

    ``sigma``: a number, or a ``(B,)`` tensor with one noise std per image, so that images degraded at several
    noise levels share one batch (it enters the x-step, eq. 2.7, and ``J1``, not the z-step).

    ``algorithm``: ``"2.3"`` (default, the practical Alg. 2.3 with ``n1 <= n2 <= n_max``), ``"2.2"`` (the
    diagnostic: all three candidates ``z1 = mu_phi(x_n)``, ``z2 = gd from z1``, ``z3 = gd from z_n`` every
    iteration, the winner ``i*`` recorded in ``history["istar"]`` and their energies in
    ``history["J1_candidates"]``) or ``"2.1"`` (exact case: ``z = mu_phi(x)`` always kept).

    Fixed ``beta`` (``None``: ``1/gamma^2`` of the decoder, "JPMAP (beta = 1/gamma^2)") unless ``alpha`` is
    given (a number, or a ``(B,)`` tensor: one ``alpha`` per image, so that several alphas share one batch): then
    **Alg. 2.4** (exponential multiplier method on ``||G(z) - x||^2 <= eps``, ``eps = (alpha/255)^2 d``)
    starts at ``beta0`` (default ``0.1/gamma^2``), runs the chosen algorithm, then repeats Alg. 2.3 with
    ``n1 = n2 = 0`` from the previous (x, z), updating ``beta <- beta exp(rho C)``, ``C = ||G(z)-x||^2 - eps``,
    per image, until ``C <= 0`` (or ``k_max`` outer iterations, default 350 as the official ``--iters-jpmap``;
    ``rho`` default ``100/d``;
    ``rho C`` is clipped to [-50, 50] so that ``beta`` stays finite).

    Note on Alg. 2.4's stopping rule: with the official ``rho = 100/d`` the multiplier update approaches the
    boundary ``||G(z)-x||^2 = eps`` from above (``C`` shrinks geometrically but stays > 0), so ``C <= 0`` is often
    met only after many outer iterations or not within ``k_max``; such images return ``converged = False`` with
    the last iterate (the official code never tests the constraint and simply stops after its 350 outer
    iterations). A larger ``rho`` (e.g. ``1000/d``) overshoots and meets the constraint in a few dozen.

    ``snapshots``: outer iterations ``k`` of Alg. 2.4 (0 = the initial run of its line 2) at which to keep a CPU
    copy of the iterate, ``info["snapshots"][k] = {"x", "x_decoded" (G(z_k) = mu_theta(z_k)), "z", "beta" (the
    beta_k that produced it, before the update), "coupling" (||G(z_k) - x_k||^2), "running"}``, all per image
    (for Fig. 5). An image that already met the constraint keeps its final iterate; a ``k`` that no image
    reached is left out. Without ``alpha`` only ``k = 0`` (the result) exists.

    ``z0`` (default: none, i.e. ``J1(x_0, z_0) = +inf`` so the first encoder guess is always accepted, as in
    the official code) initialises ``z`` for ``z3``. ``history`` rows are alternation iterations; in Alg. 2.4,
    ``history["outer"]`` tells the outer index ``k`` (0 for the initial run).

    ``z_optimizer``: how every z-step ``gd_z J1(x_n, .)`` (Alg. 2.2-2.3, lines 13 and 21) descends ``J1 / beta`` =
    ``1/2 ||x_n - mu_theta(z)||^2 + 1/(2 beta) ||z||^2``: ``"adam"`` (default, the paper's: lr ``adam_lr``) or
    ``"lm"``, batched Levenberg-Marquardt (:class:`~._lm.LMPool`: per image, the ``l x l`` system
    ``(J^T J + I/beta + S + mu I) delta = -grad`` with ``J`` the decoder's Jacobian, Nielsen's damping, the gain
    ratio deciding acceptance). Both stop at ``||grad (J1/beta)||/l < adam_tol`` or after ``adam_max_iters``
    decoder evaluations (Adam: gradients; LM: Jacobians), and both only accept steps that lower the energy, so
    the properties Alg. 2.3 needs of ``gd_z`` hold for either. ``history["adam_steps"]`` then counts LM iterations;
    ``per_image["decoder_evals"]`` counts each image's decoder evaluations in its z-steps (either optimiser).
    """
    alpha_t, wanted = _check_options(
        algorithm, n1, n2, n_max, k_max, adam_max_iters, alpha, snapshots, tol, adam_lr, adam_tol, z_optimizer
    )
    require_gaussian_decoder(vae, "JPMAP")
    if z_optimizer == "lm":
        require_lm_prior(vae, "JPMAP with z_optimizer='lm'")
    y, x, sigma = check_problem(y, op, vae, sigma, x0, init, eps_dagger)
    B, d = x.shape[0], x[0].numel()
    clock = Clock()
    if alpha is None:
        b = as_beta(beta, vae, B, x)
    else:
        if beta is not None:
            raise ValueError("pass beta0 (the initial beta of Alg. 2.4), not beta, together with alpha")
        b = as_beta(beta0 if beta0 is not None else 0.1 * vae.beta, vae, B, x)
    it, J_prev = _initial_iterate(x, y, op, vae, sigma, b.clone(), z0)
    multiplier = None if alpha is None else Multiplier(alpha_t, d, B, rho, k_max, x)
    shots = Snapshots(wanted, it) if wanted else None
    beta_k = it.beta.clone()  # the beta that produced each image's current iterate

    def on_run_end(E: Tensor, k: Tensor) -> Tensor:
        """End of outer iteration ``k`` of images ``E``: snapshot, then Alg. 2.4's update and stopping test."""
        with torch.no_grad():
            c = coupling(it.x[E], it.Gz[E])
        beta_k[E] = it.beta[E]
        if shots is not None:
            shots.take(it, E, k, c)
        if multiplier is None:
            return torch.zeros_like(E, dtype=torch.bool)
        return multiplier.update(it, E, k, c)

    adam = {"lr": adam_lr, "tol": adam_tol, "max_iters": adam_max_iters}
    history = History(B)
    alt = Alternation(
        it, Data(y, op, vae, sigma), algorithm=algorithm, n1=n1, n2=n2, n_max=n_max, tol=tol, adam=adam,
        J_prev=J_prev, on_run_end=on_run_end, history=history, clock=clock, z_optimizer=z_optimizer,
    )  # fmt: skip
    alt.run()
    info = {
        "method": "jpmap",
        "algorithm": "2.4" if alpha is not None else algorithm,
        "inner_algorithm": algorithm,
        "sigma": sigma_info(sigma),
        "n1": n1,
        "n2": n2,
        "n_max": n_max,
        "tol": tol,
        "adam": adam,
        "z_optimizer": z_optimizer,
        "init": "given" if x0 is not None else init,
        "batched_steps": alt.pool.calls,  # z-optimiser steps of the batch, one after the other (see AdamPool.calls)
    }
    per_image = {"decoder_evals": alt.pool.evals_total.cpu()}
    if multiplier is not None:
        info.update(multiplier.info())
        per_image["outer_iterations"] = multiplier.outer_iterations.cpu()
    if shots is not None:
        info["snapshots"] = shots.result(it, beta_k)
    info["seconds"] = clock()
    return Restoration(
        x=it.x,
        z=it.z,
        x_decoded=it.Gz,
        converged=alt.converged_run if multiplier is None else multiplier.satisfied,
        iterations=alt.iterations,
        history=history.stack(),
        info=info,
        per_image=per_image,
    )
