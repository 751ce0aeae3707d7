"""The alternation of JPMAP Algorithms 2.1-2.3, every image on its own schedule (shared by :func:`~.jpmap.jpmap`
and :func:`~.splitting.mapz_splitting`).

One iteration ``n`` of an image (JPMAP §2.4, Alg. 2.3 with ``n1 <= n2 <= n_max``):

1. **encoder guess** ``z1 = mu_phi(x_n)`` (while ``n < n1``, Alg. 2.3; always in Alg. 2.1 and 2.2): accepted if it
   lowers ``J1``;
2. **descent from z1**: Adam on ``J1(x_n, .)`` from ``z1`` (while ``n < n2``): accepted if it lowers ``J1``;
3. **descent from z_n**: Adam on ``J1(x_n, .)`` from the current ``z_n``: always accepted;
4. **x-step** (eq. 2.7) for the accepted ``z``, then the convergence test
   ``||x_{n+1}-x_n||/sqrt(d) + ||z_{n+1}-z_n||/sqrt(l) < tol``.

Alg. 2.2 evaluates all three candidates and keeps the best (the winner ``i*`` is recorded); Alg. 2.1 keeps the
encoder guess. A *run* ends when the tolerance is met or after ``n_max`` iterations; a continuation scheme (Alg.
2.4's multiplier, Alg. 1.1's beta schedule) then decides, image by image, whether a next run ``k + 1`` starts
(with ``n1 = n2 = 0``, i.e. descents from ``z_n`` only).

The z-descents of all images share one pool: a :class:`~._common.AdamPool` (``z_optimizer="adam"``, the paper's) or
an :class:`~._lm.LMPool` (``"lm"``: Levenberg-Marquardt on the same ``J1 / beta``, same stopping rule). Every step
of the pool advances every image that is descending, whatever its ``n`` or ``k``, so a batch costs about as many
steps as its slowest image's total. An image's computations never see another image's state, so its result and
history are those of solving it alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

from ..energy import J1, Sigma, coupling, sigma_rows, x_step
from ..models import GaussianVAE, latent_numel
from ._common import AdamPool, Clock, History
from ._lm import LMPool

ALGORITHMS = ("2.1", "2.2", "2.3")
#: the z-step's optimiser: the paper's Adam (lr 0.01) or Levenberg-Marquardt (:mod:`._lm`)
Z_OPTIMIZERS = ("adam", "lm")


class Step(IntEnum):
    """Where an image is within its current iteration ``n`` (the numbered steps of the module docstring)."""

    ENCODER_GUESS = 0  # step 1 comes next
    DESCENT_FROM_Z1 = 1  # step 2 is running in the Adam pool
    DESCENT_FROM_ZN = 2  # step 3 is running in the Adam pool
    DONE = 3  # the image has finished every run


@dataclass
class Iterate:
    """The current ``(x_n, z_n)`` of every image, ``G(z_n) = mu_theta(z_n)``, ``J1(x_n, z_n)`` and ``beta``."""

    x: Tensor  # (B, C, H, W)
    z: Tensor  # (B, l)
    Gz: Tensor  # mu_theta(z)
    J: Tensor  # J1(x, z) with the current beta, (B,)
    beta: Tensor  # (B,)


@dataclass
class Data:
    """What the alternation restores: ``y = A x + n`` with noise std ``sigma`` (0-255), under ``prior``."""

    y: Tensor
    op: object
    prior: GaussianVAE
    sigma: Sigma  # a number, or one per image (B,)


#: ``on_run_end(rows, k)``: images ``rows`` ended their run ``k`` (a ``(len(rows),)`` tensor); returns which of them
#: start a run ``k + 1`` (it may change their ``Iterate.beta`` first)
RunEnd = Callable[[Tensor, Tensor], Tensor]


def objective_rows(
    it: Iterate, data: Data, idx: Tensor, x: Tensor | None, z: Tensor, G: Tensor
) -> tuple[Tensor, Tensor]:
    """x-step (eq. 2.7, when ``x`` is ``None``) and ``J1`` for images ``idx`` with codes ``z``, ``G = mu_theta(z)``.

    Only rows ``idx`` are computed when the operator can be restricted to them (:meth:`LinearOperator.rows`):
    with per-image ``beta`` the x-step of, e.g., compressed sensing is one linear solve per distinct value, so
    the whole batch would cost far more than the few images that need it. Otherwise (a wrapped third-party
    operator) the whole batch is computed and rows ``idx`` are returned.
    """
    op = data.op.rows(idx) if hasattr(data.op, "rows") else None
    if op is not None:
        y, beta, sigma = data.y[idx], it.beta[idx], sigma_rows(data.sigma, idx)
        if x is None:
            x = x_step(G, y, op, sigma, beta)
        return x, J1(x, z, y, op, data.prior, sigma, beta, mu_x=G)
    G_all, z_all = it.Gz.clone(), it.z.clone()
    G_all[idx], z_all[idx] = G, z
    if x is None:
        x_all = x_step(G_all, data.y, data.op, data.sigma, it.beta)
    else:
        x_all = it.x.clone()
        x_all[idx] = x
    J = J1(x_all, z_all, data.y, data.op, data.prior, data.sigma, it.beta, mu_x=G_all)
    return x_all[idx], J[idx]


def candidate(it: Iterate, data: Data, z_c: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x-step (eq. 2.7) and J1 for candidate codes ``z_c`` of images ``idx``: returns ``(x, G(z), J1)`` rows."""
    with torch.no_grad():
        G = data.prior.decode(z_c)
        x, J = objective_rows(it, data, idx, None, z_c, G)
    return x, G, J


class Alternation:
    """Algorithms 2.1, 2.2 and 2.3 (module docstring) on a batch, each image on its own schedule.

    Per image: ``step`` (:class:`Step`), iteration ``n`` within the run, run index ``k``, the run's ``n1`` / ``n2``,
    total ``iterations``, whether the last run met the tolerance (``converged_run``). ``history`` receives one row
    per accepted iteration (keys ``objective`` (J1), ``istar``, ``beta``, ``coupling``, ``adam_steps`` (the z-steps'
    iterations: Adam steps, or LM iterations with ``z_optimizer="lm"``), ``delta``, ``J1_candidates``, ``outer``,
    ``seconds``). ``adam``: the z-steps' ``tol`` and ``max_iters`` (and Adam's ``lr``).
    """

    def __init__(
        self,
        it: Iterate,
        data: Data,
        *,
        algorithm: str,
        n1: int,
        n2: int,
        n_max: int,
        tol: float,
        adam: dict,
        J_prev: Tensor,
        on_run_end: RunEnd,
        history: History,
        clock: Clock,
        z_optimizer: str = "adam",
    ) -> None:
        B = it.x.shape[0]
        dev = it.x.device
        self.it, self.data, self.algorithm, self.tol = it, data, algorithm, float(tol)
        self.n_max, self.J_prev, self.on_run_end, self.history, self.clock = n_max, J_prev, on_run_end, history, clock
        self.step = torch.full((B,), int(Step.ENCODER_GUESS), dtype=torch.long, device=dev)
        self.n = torch.zeros(B, dtype=torch.long, device=dev)
        self.k = torch.zeros(B, dtype=torch.long, device=dev)
        self.n1 = torch.full((B,), n1, dtype=torch.long, device=dev)
        self.n2 = torch.full((B,), n2, dtype=torch.long, device=dev)
        self.iterations = torch.zeros(B, dtype=torch.long, device=dev)
        self.converged_run = torch.zeros(B, dtype=torch.bool, device=dev)
        self.steps_this_iteration = torch.zeros(B, dtype=torch.long, device=dev)
        self.candidate_J = torch.full((B, 3), math.nan, dtype=it.x.dtype, device=dev)
        self.z1 = torch.zeros_like(it.z)
        self.sqrt_d, self.sqrt_l = math.sqrt(it.x[0].numel()), math.sqrt(latent_numel(data.prior))
        if algorithm == "2.2":  # the three candidates of each image, to keep the best
            self.candidates = {
                "x": torch.zeros(B, 3, *it.x.shape[1:], dtype=it.x.dtype, device=dev),
                "G": torch.zeros(B, 3, *it.x.shape[1:], dtype=it.x.dtype, device=dev),
                "z": torch.zeros(B, 3, *it.z.shape[1:], dtype=it.z.dtype, device=dev),
            }
        prior = data.prior

        def z_objective(zr: Tensor, idx: Tensor) -> Tensor:  # J1 / beta in z: the official scaling, same minimisers
            return 0.5 * coupling(it.x[idx], prior.decode(zr, check=False)) + prior.neg_log_prior(zr) / it.beta[idx]

        def z_residual(zr: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # the same J1 / beta, for LM
            G, JG = prior.decode_jacobian(zr)
            return (G - it.x[idx]).flatten(1), JG.flatten(2), 1.0 / it.beta[idx]

        if z_optimizer == "adam":
            self.pool: AdamPool | LMPool = AdamPool(z_objective, it.z, **adam)
        elif z_optimizer == "lm":
            self.pool = LMPool(z_residual, it.z, scale=0.5, tol=adam["tol"], max_iters=adam["max_iters"])
        else:
            raise ValueError(f"unknown z_optimizer {z_optimizer!r}; expected one of {Z_OPTIMIZERS}")

    # ---- the loop ------------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Until every image is done: start the iterations that are due, advance every running descent one step."""
        while True:
            due = (self.step == Step.ENCODER_GUESS).nonzero().squeeze(1)
            if due.numel():
                self.encoder_guess(due)
            if self.pool.busy():
                finished = self.pool.step()
                if finished.numel():
                    self.descent_finished(finished)
            if not bool((self.step != Step.DONE).any()):
                return

    def start_descent(self, rows: Tensor, z_start: Tensor, step: Step) -> None:
        if rows.numel():
            self.pool.start(rows, z_start)
            self.step[rows] = int(step)

    # ---- step 1 -------------------------------------------------------------------------------------------------
    def encoder_guess(self, S: Tensor) -> None:
        """Step 1 of iteration ``n`` for images ``S``: the encoder guess, and the descents it calls for."""
        it, data = self.it, self.data
        over = self.n[S] >= self.n_max
        if bool(over.any()):  # n_max = 0: the run ends before any iteration
            self.converged_run[S[over]] = False
            self.end_run(S[over])
            S = S[~over]
            if S.numel() == 0:
                return
        n = self.n[S]
        self.steps_this_iteration[S] = 0
        self.candidate_J[S] = math.nan
        alg = self.algorithm
        need = (n < self.n1[S]) | (n < self.n2[S]) if alg == "2.3" else torch.ones_like(n, dtype=torch.bool)
        if bool(need.any()):
            with torch.no_grad():
                self.z1[S[need]] = data.prior.encode(it.x[S[need]], allow_out_of_range=True)[0].detach()
        if alg == "2.1":  # exact case: z = argmin J2 = mu_phi(x), always kept
            x1, G1, J1v = candidate(it, data, self.z1[S], S)
            self.candidate_J[S, 0] = J1v
            self.accept(S, 1, x1, self.z1[S], G1, J1v)
        elif alg == "2.2":  # diagnostic: all three candidates, keep the best
            x1, G1, J1v = candidate(it, data, self.z1[S], S)
            self.candidate_J[S, 0] = J1v
            self.keep_candidate(S, 0, x1, G1, self.z1[S])
            self.start_descent(S, self.z1[S], Step.DESCENT_FROM_Z1)
        else:  # Alg. 2.3: the encoder guess while n < n1, kept if it lowers J1
            rest = S
            E = S[n < self.n1[S]]
            if E.numel():
                x1, G1, J1v = candidate(it, data, self.z1[E], E)
                self.candidate_J[E, 0] = J1v
                ok = J1v < self.J_prev[E]
                if bool(ok.any()):
                    taken = torch.zeros_like(self.step, dtype=torch.bool)
                    taken[E[ok]] = True
                    rest = S[~taken[S]]
                    self.accept(E[ok], 1, x1[ok], self.z1[E[ok]], G1[ok], J1v[ok])
            from_z1 = self.n[rest] < self.n2[rest]
            self.start_descent(rest[from_z1], self.z1[rest[from_z1]], Step.DESCENT_FROM_Z1)
            self.start_descent(rest[~from_z1], it.z[rest[~from_z1]], Step.DESCENT_FROM_ZN)

    def keep_candidate(self, rows: Tensor, i: int, x: Tensor, G: Tensor, z: Tensor) -> None:
        c = self.candidates
        c["x"][rows, i], c["G"][rows, i], c["z"][rows, i] = x, G, z

    # ---- steps 2 and 3 ------------------------------------------------------------------------------------------
    def descent_finished(self, F: Tensor) -> None:
        """The descents of images ``F`` ended: evaluate their candidate, accept it or go on to step 3."""
        it, data = self.it, self.data
        self.steps_this_iteration[F] += self.pool.steps[F]
        zc = self.pool.best_z[F].clone()
        x, G, J = candidate(it, data, zc, F)
        d2 = self.step[F] == Step.DESCENT_FROM_Z1
        r2, r3 = F[d2], F[~d2]
        if r2.numel():
            self.candidate_J[r2, 1] = J[d2]
            if self.algorithm == "2.2":
                self.keep_candidate(r2, 1, x[d2], G[d2], zc[d2])
                self.start_descent(r2, it.z[r2], Step.DESCENT_FROM_ZN)
            else:
                ok = J[d2] < self.J_prev[r2]
                self.start_descent(r2[~ok], it.z[r2[~ok]], Step.DESCENT_FROM_ZN)
                if bool(ok.any()):
                    self.accept(r2[ok], 2, x[d2][ok], zc[d2][ok], G[d2][ok], J[d2][ok])
        if r3.numel():
            self.candidate_J[r3, 2] = J[~d2]
            if self.algorithm == "2.2":
                self.keep_candidate(r3, 2, x[~d2], G[~d2], zc[~d2])
                best = self.candidate_J[r3].argmin(1)
                pick = torch.arange(r3.numel(), device=r3.device)
                c = {k: v[r3, best] for k, v in self.candidates.items()}
                self.accept(r3, best + 1, c["x"], c["z"], c["G"], self.candidate_J[r3][pick, best])
            else:
                self.accept(r3, 3, x[~d2], zc[~d2], G[~d2], J[~d2])

    # ---- step 4 -------------------------------------------------------------------------------------------------
    def accept(self, R: Tensor, istar, x: Tensor, z: Tensor, G: Tensor, J: Tensor) -> None:
        """Images ``R`` accept ``(x, z)``: record the iteration, test convergence, start the next one."""
        it = self.it
        delta = (x - it.x[R]).flatten(1).norm(dim=1) / self.sqrt_d + (z - it.z[R]).flatten(1).norm(dim=1) / self.sqrt_l
        it.x[R], it.z[R], it.Gz[R], it.J[R] = x, z, G, J
        self.J_prev[R] = J
        self.iterations[R] += 1
        self.n[R] += 1
        if not isinstance(istar, Tensor):
            istar = torch.full((R.numel(),), istar, dtype=torch.long, device=R.device)
        self.history.record(
            R,
            objective=J,
            istar=istar,
            beta=it.beta[R],
            coupling=coupling(x, G),
            adam_steps=self.steps_this_iteration[R],
            delta=delta,
            J1_candidates=self.candidate_J[R],
            outer=self.k[R],
            seconds=torch.full((R.numel(),), self.clock(), dtype=torch.float64),
        )
        self.step[R] = int(Step.ENCODER_GUESS)
        done = delta < self.tol
        end = done | (self.n[R] >= self.n_max)
        if bool(end.any()):
            self.converged_run[R[end]] = done[end]
            self.end_run(R[end])

    def end_run(self, E: Tensor) -> None:
        """Images ``E`` ended run ``k``: the continuation decides who starts run ``k + 1`` (descents only)."""
        it = self.it
        cont = self.on_run_end(E, self.k[E])
        self.step[E[~cont]] = int(Step.DONE)
        C = E[cont]
        if C.numel():
            self.k[C] += 1
            self.n[C] = 0
            self.n1[C] = 0
            self.n2[C] = 0
            with torch.no_grad():  # J1 with the new beta: the reference of the next run's descent test
                _, J = objective_rows(it, self.data, C, it.x[C], it.z[C], it.Gz[C])
            it.J[C] = J
            self.J_prev[C] = J
            self.step[C] = int(Step.ENCODER_GUESS)
