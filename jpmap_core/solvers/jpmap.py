"""Joint posterior maximisation (JPMAP §2.3-2.5): Algorithms 2.1, 2.2, 2.3 and 2.4, batched.

Every image of the batch keeps its own state: its own winning candidate ``i*`` each iteration, its own Adam
z-steps (own moments, own stopping), its own convergence flag (an image that converged stops while the others
go on) and, in Alg. 2.4, its own ``beta``. Solving B images at once gives the same result as solving each alone.

Defaults follow the paper and the official code (mago876/JPMAP):
``n1 = 25, n2 = 150`` (§3.4), Adam lr 0.01 (§3.3) with the official stopping rule ``||grad||/l < 1e-4`` on
``J1 / beta`` and at most 3000 steps, outer tolerance ``||x_{n+1}-x_n||/sqrt(d) + ||z_{n+1}-z_n||/sqrt(l) < 1/255``
(1/255 is an RMSE of one grey level), ``x0 = A_dagger(y)`` (§3.4; ``init="adjoint"`` gives the official
``A^T y``), and for Alg. 2.4 ``beta0 = 0.1/gamma^2``, ``rho = 100/d``, ``eps = (alpha/255)^2 d``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..energy import J1, as_beta, coupling, x_step
from ..models import GaussianVAE
from ._common import Clock, History, Restoration, adam_minimize, check_problem, masked

ALGORITHMS = ("2.1", "2.2", "2.3")


@dataclass
class _State:
    x: Tensor  # (B, C, H, W)
    z: Tensor  # (B, l)
    Gz: Tensor  # mu_theta(z)
    J: Tensor  # J1(x, z) with the current beta
    beta: Tensor  # (B,)


@dataclass
class _Ctx:
    y: Tensor
    op: object
    vae: GaussianVAE
    sigma: float
    algorithm: str
    tol: float
    adam: dict
    hist: History
    clock: Clock


class _Next:
    """The next iterate being assembled: rows are filled by the candidate each image accepts."""

    def __init__(self, st: _State, run: Tensor) -> None:
        self.x, self.z, self.Gz, self.J = st.x.clone(), st.z.clone(), st.Gz.clone(), st.J.clone()
        self.istar = torch.full((st.x.shape[0],), -1, dtype=torch.long, device=st.x.device)
        self.pending = run.clone()

    def accept(self, rows: Tensor, which: int, x: Tensor, z: Tensor, Gz: Tensor, J: Tensor) -> None:
        self.x[rows], self.z[rows], self.Gz[rows], self.J[rows] = x, z, Gz, J
        self.istar[rows] = which
        self.pending[rows] = False


def _evaluate(st: _State, ctx: _Ctx, z_c: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x-step (eq. 2.7) and J1 for candidate codes ``z_c`` of images ``idx``: returns ``(x, G(z), J1)`` rows.

    The operator is applied to the whole batch (it may hold per-image masks); rows outside ``idx`` are unused.
    """
    with torch.no_grad():
        G = st.Gz.clone()
        G[idx] = ctx.vae.decode(z_c)
        x = x_step(G, ctx.y, ctx.op, ctx.sigma, st.beta)
        z = st.z.clone()
        z[idx] = z_c
        J = J1(x, z, ctx.y, ctx.op, ctx.vae, ctx.sigma, st.beta, mu_x=G)
    return x[idx], G[idx], J[idx]


def _gd_z(st: _State, ctx: _Ctx, z_start: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """``gd_z J1(x_n, z)`` from ``z_start`` for images ``idx``: batched Adam on
    ``J1 / beta = 1/2 ||x - mu_theta(z)||^2 + 1/(2 beta) ||z||^2`` (the official scaling; same minimisers)."""
    x_rows, b_rows = st.x[idx], st.beta[idx]
    decode = ctx.vae._decode  # inputs are produced here, already checked

    def loss(zr: Tensor, sub: Tensor) -> Tensor:
        return 0.5 * coupling(x_rows[sub], decode(zr)) + 0.5 * zr.pow(2).sum(1) / b_rows[sub]

    res = adam_minimize(loss, z_start, **ctx.adam)
    return res.z, res.steps


def _alternate(st: _State, ctx: _Ctx, run: Tensor, n1: int, n2: int, n_max: int, J_prev: Tensor, outer: int):
    """One run of Alg. 2.1/2.2/2.3 on the images ``run`` (others untouched). Returns (converged, iterations)."""
    B = st.x.shape[0]
    dev = st.x.device
    run = run.clone()
    conv = torch.zeros(B, dtype=torch.bool, device=dev)
    iters = torch.zeros(B, dtype=torch.long, device=dev)
    sqrt_d, sqrt_l = math.sqrt(st.x[0].numel()), math.sqrt(st.z.shape[1])
    for n in range(n_max):
        idx = run.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        nxt = _Next(st, run)
        steps = torch.zeros(B, dtype=torch.long, device=dev)
        candJ = torch.full((B, 3), math.nan, dtype=st.x.dtype, device=dev)
        pending, istar, accept = nxt.pending, nxt.istar, nxt.accept

        if ctx.algorithm == "2.1":  # exact case: z = argmin J2 = mu_phi(x), always kept
            z1 = ctx.vae.encode(st.x[idx], allow_out_of_range=True)[0].detach()
            x1, G1, J1v = _evaluate(st, ctx, z1, idx)
            candJ[idx, 0] = J1v
            accept(idx, 1, x1, z1, G1, J1v)
        elif ctx.algorithm == "2.2":  # diagnostic: all three candidates, keep the best
            z1 = ctx.vae.encode(st.x[idx], allow_out_of_range=True)[0].detach()
            z2, s2 = _gd_z(st, ctx, z1, idx)
            z3, s3 = _gd_z(st, ctx, st.z[idx], idx)
            cands = [_evaluate(st, ctx, zc, idx) for zc in (z1, z2, z3)]
            Js = torch.stack([c[2] for c in cands], 1)
            candJ[idx] = Js
            best = Js.argmin(1)
            steps[idx] = s2 + s3
            zs = torch.stack([z1, z2, z3], 1)
            pick = torch.arange(idx.numel(), device=dev)
            xs = torch.stack([c[0] for c in cands], 1)[pick, best]
            Gs = torch.stack([c[1] for c in cands], 1)[pick, best]
            accept(idx, 0, xs, zs[pick, best], Gs, Js[pick, best])
            istar[idx] = best + 1
        else:  # Alg. 2.3
            z1_all = None
            if n < n1:
                z1_all = ctx.vae.encode(st.x[idx], allow_out_of_range=True)[0].detach()
                x1, G1, J1v = _evaluate(st, ctx, z1_all, idx)
                candJ[idx, 0] = J1v
                ok = J1v < J_prev[idx]
                if bool(ok.any()):
                    accept(idx[ok], 1, x1[ok], z1_all[ok], G1[ok], J1v[ok])
            if n < n2 and bool(pending.any()):
                ip = pending.nonzero().squeeze(1)
                if z1_all is not None:
                    z1 = z1_all[pending[idx]]
                else:
                    z1 = ctx.vae.encode(st.x[ip], allow_out_of_range=True)[0].detach()
                z2, s2 = _gd_z(st, ctx, z1, ip)
                steps[ip] += s2
                x2, G2, J2v = _evaluate(st, ctx, z2, ip)
                candJ[ip, 1] = J2v
                ok = J2v < J_prev[ip]
                if bool(ok.any()):
                    accept(ip[ok], 2, x2[ok], z2[ok], G2[ok], J2v[ok])
            if bool(pending.any()):
                ip = pending.nonzero().squeeze(1)
                z3, s3 = _gd_z(st, ctx, st.z[ip], ip)
                steps[ip] += s3
                x3, G3, J3v = _evaluate(st, ctx, z3, ip)
                candJ[ip, 2] = J3v
                accept(ip, 3, x3, z3, G3, J3v)

        delta = (nxt.x - st.x).flatten(1).norm(dim=1) / sqrt_d + (nxt.z - st.z).norm(dim=1) / sqrt_l
        st.x[idx], st.z[idx], st.Gz[idx], st.J[idx] = nxt.x[idx], nxt.z[idx], nxt.Gz[idx], nxt.J[idx]
        J_prev[idx] = nxt.J[idx]
        iters[idx] += 1
        ctx.hist.record(
            J1=masked(st.J, run),
            istar=masked(istar, run, -1),
            beta=masked(st.beta, run),
            coupling=masked(coupling(st.x, st.Gz), run),
            adam_steps=masked(steps, run, -1),
            delta=masked(delta, run),
            J1_candidates=torch.where(run[:, None], candJ, torch.full_like(candJ, math.nan)),
            outer=masked(torch.full((B,), outer, device=dev), run, -1),
            seconds=torch.full((B,), ctx.clock(), dtype=torch.float64),
        )
        done = run & (delta < ctx.tol)
        conv |= done
        run &= ~done
    return conv, iters


def jpmap(
    y: Tensor,
    op,
    vae: GaussianVAE,
    *,
    sigma: float,
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
) -> Restoration:
    """Restore ``y = A x + noise`` (noise std ``sigma`` on the 0-255 scale) with the VAE prior ``vae``.

    ``algorithm``: ``"2.3"`` (default, the practical Alg. 2.3 with ``n1 <= n2 <= n_max``), ``"2.2"`` (the
    diagnostic: all three candidates ``z1 = mu_phi(x_n)``, ``z2 = gd from z1``, ``z3 = gd from z_n`` every
    iteration, the winner ``i*`` recorded in ``history["istar"]`` and their energies in
    ``history["J1_candidates"]``) or ``"2.1"`` (exact case: ``z = mu_phi(x)`` always kept).

    Fixed ``beta`` (``None``: ``1/gamma^2`` of the decoder, "JPMAP (beta = 1/gamma^2)") unless ``alpha`` is
    given: then **Alg. 2.4** (exponential multiplier method on ``||G(z) - x||^2 <= eps``, ``eps = (alpha/255)^2 d``)
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
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS} (Alg. 2.4: pass alpha)")
    for name, v in (("n1", n1), ("n2", n2), ("n_max", n_max), ("k_max", k_max), ("adam_max_iters", adam_max_iters)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    if not n1 <= n2 <= n_max:
        raise ValueError(f"Alg. 2.3 needs n1 <= n2 <= n_max, got n1={n1}, n2={n2}, n_max={n_max}")
    if alpha is not None and (not math.isfinite(float(alpha)) or float(alpha) <= 0):
        raise ValueError(f"alpha must be a number > 0 (grey levels of RMSE), got {alpha!r}")
    wanted = set()
    for k in snapshots:
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"snapshots must be outer iterations k >= 0 (integers), got {k!r}")
        wanted.add(k)
    if alpha is None and any(k > 0 for k in wanted):
        raise ValueError("snapshots at outer iterations k > 0 need Alg. 2.4 (pass alpha); without it only k = 0 exists")
    if tol <= 0 or adam_lr <= 0 or adam_tol <= 0:
        raise ValueError(f"tol, adam_lr and adam_tol must be > 0, got {tol}, {adam_lr}, {adam_tol}")
    y, x = check_problem(y, op, vae, sigma, x0, init, eps_dagger)
    B = x.shape[0]
    d, ldim = x[0].numel(), vae.latent_dim
    clock = Clock()
    if alpha is None:
        b = as_beta(beta, vae, B, x)
    else:
        if beta is not None:
            raise ValueError("pass beta0 (the initial beta of Alg. 2.4), not beta, together with alpha")
        b = as_beta(beta0 if beta0 is not None else 0.1 * vae.beta, vae, B, x)
    b = b.clone()
    if z0 is None:
        z = torch.zeros(B, ldim, dtype=x.dtype, device=x.device)
        J_prev = torch.full((B,), math.inf, dtype=x.dtype, device=x.device)
    else:
        if z0.shape != (B, ldim) or not bool(torch.isfinite(z0).all()):
            raise ValueError(f"z0 must be a finite (B, l) = ({B}, {ldim}) tensor, got {tuple(z0.shape)}")
        z = z0.detach().clone().to(x)
        J_prev = None
    with torch.no_grad():
        Gz = vae.decode(z)
        J = J1(x, z, y, op, vae, sigma, b, mu_x=Gz)
    if J_prev is None:
        J_prev = J.clone()
    st = _State(x.clone(), z, Gz, J, b)
    ctx = _Ctx(
        y, op, vae, float(sigma), algorithm, float(tol),
        {"lr": adam_lr, "tol": adam_tol, "max_iters": adam_max_iters}, History(), clock,
    )  # fmt: skip
    kept: dict[int, dict[str, Tensor]] = {}

    def snapshot(k: int, beta_k: Tensor, running: Tensor) -> None:
        if k in wanted:
            with torch.no_grad():
                c = coupling(st.x, st.Gz)
            kept[k] = {
                name: v.detach().clone().cpu()
                for name, v in (("x", st.x), ("x_decoded", st.Gz), ("z", st.z), ("beta", beta_k), ("coupling", c),
                                ("running", running))
            }  # fmt: skip

    everyone = torch.ones(B, dtype=torch.bool, device=x.device)
    conv, iters = _alternate(st, ctx, everyone, n1, n2, n_max, J_prev, outer=0)
    snapshot(0, st.beta, everyone)
    info = {
        "method": "jpmap",
        "algorithm": "2.4" if alpha is not None else algorithm,
        "inner_algorithm": algorithm,
        "sigma": float(sigma),
        "n1": n1,
        "n2": n2,
        "n_max": n_max,
        "tol": tol,
        "adam": ctx.adam,
        "init": "given" if x0 is not None else init,
    }
    if alpha is not None:
        eps = (float(alpha) / 255.0) ** 2 * d
        rho_ = 100.0 / d if rho is None else float(rho)
        satisfied = torch.zeros(B, dtype=torch.bool, device=x.device)
        outer_iters = torch.zeros(B, dtype=torch.long, device=x.device)
        beta_k = st.beta.clone()  # the beta that produced each image's current iterate
        for k in range(1, k_max + 1):
            active = ~satisfied
            if not bool(active.any()):
                break
            with torch.no_grad():
                st.J = J1(st.x, st.z, y, op, vae, sigma, st.beta, mu_x=st.Gz)
            _, it_k = _alternate(st, ctx, active, 0, 0, n_max, st.J.clone(), outer=k)
            iters += it_k
            outer_iters[active] += 1
            beta_k[active] = st.beta[active]
            snapshot(k, beta_k, active)
            C = coupling(st.x, st.Gz) - eps
            st.beta[active] = st.beta[active] * torch.exp((rho_ * C[active]).clamp(-50.0, 50.0))
            satisfied |= active & (C <= 0)
        conv = satisfied
        info.update(alpha=float(alpha), eps=eps, rho=rho_, k_max=k_max, outer_iterations=outer_iters.cpu())
    if wanted:
        info["snapshots"] = dict(sorted(kept.items()))
    info["seconds"] = clock()
    return Restoration(
        x=st.x, z=st.z, x_decoded=st.Gz, converged=conv, iterations=iters, history=ctx.hist.stack(), info=info
    )
