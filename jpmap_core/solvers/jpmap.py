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

from ..energy import J1, Sigma, as_beta, coupling, sigma_info, sigma_rows, x_step
from ..models import GaussianVAE
from ._common import AdamPool, Clock, History, Restoration, check_problem

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
    sigma: Sigma  # a number, or one per image (B,)
    algorithm: str
    tol: float
    adam: dict
    hist: History
    clock: Clock


def _J1_rows(st: _State, ctx: _Ctx, idx: Tensor, x: Tensor | None, z: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """x-step (eq. 2.7, when ``x`` is ``None``) and ``J1`` for images ``idx`` with codes ``z``, ``G = mu_theta(z)``.

    Only rows ``idx`` are computed when the operator can be restricted to them (:meth:`LinearOperator.rows`):
    with per-image ``beta`` the x-step of, e.g., compressed sensing is one linear solve per distinct value, so
    the whole batch would cost far more than the few images that need it. Otherwise (a wrapped third-party
    operator) the whole batch is computed and rows ``idx`` are returned.
    """
    op = ctx.op.rows(idx) if hasattr(ctx.op, "rows") else None
    if op is not None:
        y, beta, sigma = ctx.y[idx], st.beta[idx], sigma_rows(ctx.sigma, idx)
        if x is None:
            x = x_step(G, y, op, sigma, beta)
        return x, J1(x, z, y, op, ctx.vae, sigma, beta, mu_x=G)
    G_all, z_all = st.Gz.clone(), st.z.clone()
    G_all[idx], z_all[idx] = G, z
    if x is None:
        x_all = x_step(G_all, ctx.y, ctx.op, ctx.sigma, st.beta)
    else:
        x_all = st.x.clone()
        x_all[idx] = x
    J = J1(x_all, z_all, ctx.y, ctx.op, ctx.vae, ctx.sigma, st.beta, mu_x=G_all)
    return x_all[idx], J[idx]


def _evaluate(st: _State, ctx: _Ctx, z_c: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x-step (eq. 2.7) and J1 for candidate codes ``z_c`` of images ``idx``: returns ``(x, G(z), J1)`` rows."""
    with torch.no_grad():
        G = ctx.vae.decode(z_c)
        x, J = _J1_rows(st, ctx, idx, None, z_c, G)
    return x, G, J


START, DESC2, DESC3, DONE = 0, 1, 2, 3  # where each image is within its current iteration


class _Engine:
    """Algorithms 2.1, 2.2 and 2.3 with every image on its own schedule.

    Each image goes through its own iterations ``n`` (encoder guess ``z1``, descent from ``z1``, descent from
    ``z_n``, x-step, convergence test) and, for continuation schemes (Alg. 2.4, Alg. 1.1), its own outer runs
    ``k``. The z-descents of all images share one :class:`AdamPool`: every Adam step advances every image that is
    descending, whatever its ``n`` or ``k``, so a batch costs about as many steps as its slowest image's total,
    not the sum over iterations of the slowest image of each iteration (the lock-step schedule). An image's
    computations never see another image's state, so its result and history are those of solving it alone.

    ``on_run_end(rows)`` is called when images ``rows`` end a run (tolerance met or ``n_max`` iterations); it may
    change their ``st.beta`` and returns which of them start the next run ``k + 1`` (with ``n1 = n2 = 0``).
    """

    def __init__(self, st: _State, ctx: _Ctx, n1: int, n2: int, n_max: int, J_prev: Tensor, on_run_end) -> None:
        B = st.x.shape[0]
        dev = st.x.device
        self.st, self.ctx, self.n_max, self.J_prev, self.on_run_end = st, ctx, n_max, J_prev, on_run_end
        self.phase = torch.full((B,), START, dtype=torch.long, device=dev)
        self.n = torch.zeros(B, dtype=torch.long, device=dev)
        self.k = torch.zeros(B, dtype=torch.long, device=dev)
        self.n1 = torch.full((B,), n1, dtype=torch.long, device=dev)
        self.n2 = torch.full((B,), n2, dtype=torch.long, device=dev)
        self.iters = torch.zeros(B, dtype=torch.long, device=dev)
        self.conv_run = torch.zeros(B, dtype=torch.bool, device=dev)
        self.steps_it = torch.zeros(B, dtype=torch.long, device=dev)
        self.candJ = torch.full((B, 3), math.nan, dtype=st.x.dtype, device=dev)
        self.z1 = torch.zeros_like(st.z)
        self.sqrt_d, self.sqrt_l = math.sqrt(st.x[0].numel()), math.sqrt(st.z.shape[1])
        if ctx.algorithm == "2.2":  # the three candidates of each image, to keep the best
            self.cand = {
                "x": torch.zeros(B, 3, *st.x.shape[1:], dtype=st.x.dtype, device=dev),
                "G": torch.zeros(B, 3, *st.x.shape[1:], dtype=st.x.dtype, device=dev),
                "z": torch.zeros(B, 3, st.z.shape[1], dtype=st.z.dtype, device=dev),
            }
        decode = ctx.vae._decode  # inputs are produced here, already checked

        def loss(zr: Tensor, idx: Tensor) -> Tensor:  # J1 / beta: the official scaling, same minimisers
            return 0.5 * coupling(st.x[idx], decode(zr)) + 0.5 * zr.pow(2).sum(1) / st.beta[idx]

        self.pool = AdamPool(loss, st.z, **ctx.adam)

    def run(self) -> None:
        while True:
            S = (self.phase == START).nonzero().squeeze(1)
            if S.numel():
                self._begin(S)
            if self.pool.busy():
                F = self.pool.step()
                if F.numel():
                    self._descent_done(F)
            if not bool((self.phase != DONE).any()):
                return

    def _start_descent(self, rows: Tensor, z_start: Tensor, phase: int) -> None:
        if rows.numel():
            self.pool.start(rows, z_start)
            self.phase[rows] = phase

    def _begin(self, S: Tensor) -> None:
        """Line 1 of iteration ``n`` for images ``S``: the encoder guess, and the descents it calls for."""
        st, ctx = self.st, self.ctx
        over = self.n[S] >= self.n_max
        if bool(over.any()):  # n_max = 0: the run ends before any iteration
            self.conv_run[S[over]] = False
            self._end_run(S[over])
            S = S[~over]
            if S.numel() == 0:
                return
        n = self.n[S]
        self.steps_it[S] = 0
        self.candJ[S] = math.nan
        alg = ctx.algorithm
        need = (n < self.n1[S]) | (n < self.n2[S]) if alg == "2.3" else torch.ones_like(n, dtype=torch.bool)
        if bool(need.any()):
            with torch.no_grad():
                self.z1[S[need]] = ctx.vae.encode(st.x[S[need]], allow_out_of_range=True)[0].detach()
        if alg == "2.1":  # exact case: z = argmin J2 = mu_phi(x), always kept
            x1, G1, J1v = _evaluate(st, ctx, self.z1[S], S)
            self.candJ[S, 0] = J1v
            self._finalize(S, 1, x1, self.z1[S], G1, J1v)
        elif alg == "2.2":  # diagnostic: all three candidates, keep the best
            x1, G1, J1v = _evaluate(st, ctx, self.z1[S], S)
            self.candJ[S, 0] = J1v
            self._store(S, 0, x1, G1, self.z1[S])
            self._start_descent(S, self.z1[S], DESC2)
        else:  # Alg. 2.3: the encoder guess while n < n1, kept if it lowers J1
            rest = S
            E = S[n < self.n1[S]]
            if E.numel():
                x1, G1, J1v = _evaluate(st, ctx, self.z1[E], E)
                self.candJ[E, 0] = J1v
                ok = J1v < self.J_prev[E]
                if bool(ok.any()):
                    taken = torch.zeros_like(self.phase, dtype=torch.bool)
                    taken[E[ok]] = True
                    rest = S[~taken[S]]
                    self._finalize(E[ok], 1, x1[ok], self.z1[E[ok]], G1[ok], J1v[ok])
            from_z1 = self.n[rest] < self.n2[rest]
            self._start_descent(rest[from_z1], self.z1[rest[from_z1]], DESC2)
            self._start_descent(rest[~from_z1], st.z[rest[~from_z1]], DESC3)

    def _store(self, rows: Tensor, i: int, x: Tensor, G: Tensor, z: Tensor) -> None:
        self.cand["x"][rows, i], self.cand["G"][rows, i], self.cand["z"][rows, i] = x, G, z

    def _descent_done(self, F: Tensor) -> None:
        """Descents of images ``F`` ended: evaluate their candidate and accept it or go on."""
        st, ctx = self.st, self.ctx
        self.steps_it[F] += self.pool.steps[F]
        zc = self.pool.best_z[F].clone()
        x, G, J = _evaluate(st, ctx, zc, F)
        d2 = self.phase[F] == DESC2
        r2, r3 = F[d2], F[~d2]
        if r2.numel():
            self.candJ[r2, 1] = J[d2]
            if ctx.algorithm == "2.2":
                self._store(r2, 1, x[d2], G[d2], zc[d2])
                self._start_descent(r2, st.z[r2], DESC3)
            else:
                ok = J[d2] < self.J_prev[r2]
                self._start_descent(r2[~ok], st.z[r2[~ok]], DESC3)
                if bool(ok.any()):
                    self._finalize(r2[ok], 2, x[d2][ok], zc[d2][ok], G[d2][ok], J[d2][ok])
        if r3.numel():
            self.candJ[r3, 2] = J[~d2]
            if ctx.algorithm == "2.2":
                self._store(r3, 2, x[~d2], G[~d2], zc[~d2])
                best = self.candJ[r3].argmin(1)
                pick = torch.arange(r3.numel(), device=r3.device)
                c = {k: v[r3, best] for k, v in self.cand.items()}
                self._finalize(r3, best + 1, c["x"], c["z"], c["G"], self.candJ[r3][pick, best])
            else:
                self._finalize(r3, 3, x[~d2], zc[~d2], G[~d2], J[~d2])

    def _finalize(self, R: Tensor, istar, x: Tensor, z: Tensor, G: Tensor, J: Tensor) -> None:
        """Images ``R`` accept ``(x, z)``: record the iteration, test convergence, start the next one."""
        st, ctx = self.st, self.ctx
        delta = (x - st.x[R]).flatten(1).norm(dim=1) / self.sqrt_d + (z - st.z[R]).norm(dim=1) / self.sqrt_l
        st.x[R], st.z[R], st.Gz[R], st.J[R] = x, z, G, J
        self.J_prev[R] = J
        self.iters[R] += 1
        self.n[R] += 1
        if not isinstance(istar, Tensor):
            istar = torch.full((R.numel(),), istar, dtype=torch.long, device=R.device)
        ctx.hist.record(
            R,
            J1=J,
            istar=istar,
            beta=st.beta[R],
            coupling=coupling(x, G),
            adam_steps=self.steps_it[R],
            delta=delta,
            J1_candidates=self.candJ[R],
            outer=self.k[R],
            seconds=torch.full((R.numel(),), ctx.clock(), dtype=torch.float64),
        )
        self.phase[R] = START
        done = delta < ctx.tol
        end = done | (self.n[R] >= self.n_max)
        if bool(end.any()):
            self.conv_run[R[end]] = done[end]
            self._end_run(R[end])

    def _end_run(self, E: Tensor) -> None:
        st, ctx = self.st, self.ctx
        cont = self.on_run_end(E)
        self.phase[E[~cont]] = DONE
        C = E[cont]
        if C.numel():
            self.k[C] += 1
            self.n[C] = 0
            self.n1[C] = 0
            self.n2[C] = 0
            with torch.no_grad():  # J1 with the new beta: the reference of the next run's descent test
                _, J = _J1_rows(st, ctx, C, st.x[C], st.z[C], st.Gz[C])
            st.J[C] = J
            self.J_prev[C] = J
            self.phase[C] = START


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
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS} (Alg. 2.4: pass alpha)")
    for name, v in (("n1", n1), ("n2", n2), ("n_max", n_max), ("k_max", k_max), ("adam_max_iters", adam_max_iters)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    if not n1 <= n2 <= n_max:
        raise ValueError(f"Alg. 2.3 needs n1 <= n2 <= n_max, got n1={n1}, n2={n2}, n_max={n_max}")
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
    y, x, sigma = check_problem(y, op, vae, sigma, x0, init, eps_dagger)
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
        y, op, vae, sigma, algorithm, float(tol),
        {"lr": adam_lr, "tol": adam_tol, "max_iters": adam_max_iters}, History(B), clock,
    )  # fmt: skip
    kept: dict[int, dict[str, Tensor]] = {}
    filled: dict[int, Tensor] = {}
    eps = None
    if alpha is not None:  # eps = (alpha/255)^2 d per image: images with different alphas share one batch
        if a.numel() not in (1, B):
            raise ValueError(f"alpha must be a number or a (B,) = ({B},) tensor, got {a.numel()} values")
        eps = ((a / 255.0) ** 2 * d).to(dtype=x.dtype, device=x.device).expand(B)
    rho_ = (100.0 / d if rho is None else float(rho)) if alpha is not None else None
    satisfied = torch.zeros(B, dtype=torch.bool, device=x.device)
    outer_iters = torch.zeros(B, dtype=torch.long, device=x.device)
    beta_k = st.beta.clone()  # the beta that produced each image's current iterate

    def snapshot(rows: Tensor, c: Tensor) -> None:
        ks = eng.k[rows]
        for k in ks.unique().tolist():
            if k not in wanted:
                continue
            sel = ks == k
            r = rows[sel]
            if k not in kept:
                kept[k] = {
                    "x": torch.zeros_like(st.x), "x_decoded": torch.zeros_like(st.x), "z": torch.zeros_like(st.z),
                    "beta": torch.zeros_like(st.beta), "coupling": torch.zeros_like(st.beta),
                    "running": torch.zeros(B, dtype=torch.bool, device=x.device),
                }  # fmt: skip
                filled[k] = torch.zeros(B, dtype=torch.bool, device=x.device)
            s_ = kept[k]
            s_["x"][r], s_["x_decoded"][r], s_["z"][r] = st.x[r], st.Gz[r], st.z[r]
            s_["beta"][r], s_["coupling"][r], s_["running"][r] = st.beta[r], c[sel], True
            filled[k][r] = True

    def on_run_end(E: Tensor) -> Tensor:
        """End of outer iteration k of each image in E: snapshot; Alg. 2.4's multiplier update and stopping test."""
        k = eng.k[E]
        with torch.no_grad():
            c = coupling(st.x[E], st.Gz[E])
        beta_k[E] = st.beta[E]
        if wanted:
            snapshot(E, c)
        if alpha is None:
            return torch.zeros_like(E, dtype=torch.bool)
        later = k >= 1  # line 2 (k = 0) runs Alg. 2.3 once; the multiplier updates follow each later run
        outer_iters[E[later]] += 1
        C = c - eps[E]
        up = E[later]
        st.beta[up] = st.beta[up] * torch.exp((rho_ * C[later]).clamp(-50.0, 50.0))
        sat = later & (C <= 0)
        satisfied[E[sat]] = True
        return ~sat & (k < k_max)

    eng = _Engine(st, ctx, n1, n2, n_max, J_prev, on_run_end)
    eng.run()
    iters = eng.iters
    conv = eng.conv_run if alpha is None else satisfied
    info = {
        "method": "jpmap",
        "algorithm": "2.4" if alpha is not None else algorithm,
        "inner_algorithm": algorithm,
        "sigma": sigma_info(sigma),
        "n1": n1,
        "n2": n2,
        "n_max": n_max,
        "tol": tol,
        "adam": ctx.adam,
        "init": "given" if x0 is not None else init,
        "batched_steps": eng.pool.calls,  # Adam steps of the batch, one after the other (see AdamPool.calls)
    }
    if alpha is not None:
        one = a.numel() == 1
        info.update(
            alpha=float(a[0]) if one else a.clone(), eps=float(eps[0]) if one else eps.cpu(), rho=rho_, k_max=k_max,
            outer_iterations=outer_iters.cpu(),
        )  # fmt: skip
    if wanted:
        with torch.no_grad():
            c_final = coupling(st.x, st.Gz)
        for k, s_ in kept.items():  # images that stopped before k: their final iterate
            rest = ~filled[k]
            s_["x"][rest], s_["x_decoded"][rest], s_["z"][rest] = st.x[rest], st.Gz[rest], st.z[rest]
            s_["beta"][rest], s_["coupling"][rest] = beta_k[rest], c_final[rest]
        info["snapshots"] = {k: {n: v.detach().clone().cpu() for n, v in kept[k].items()} for k in sorted(kept)}
    info["seconds"] = clock()
    return Restoration(
        x=st.x, z=st.z, x_decoded=st.Gz, converged=conv, iterations=iters, history=ctx.hist.stack(), info=info
    )
