r"""Continuation on beta (JPMAP §2.5, Algorithm 2.4, Figure 5) and the Algorithm 2.2 diagnostic (§2.4, §3.4).

**Fig. 5.** With a fixed coupling weight ``beta = 1/gamma^2`` JPMAP (Alg. 2.3) returns a joint MAP ``(x, z)`` whose
``x`` need not lie on the decoder's manifold ``{G(z) = mu_theta(z)}``. Algorithm 2.4 solves instead

.. math:: \arg\min_{x, z:\ \|G(z) - x\|^2 \le \varepsilon} F(x, y) + \tfrac12 \|z\|^2

with the exponential multiplier method (eq. 2.12): a run of Alg. 2.3 at fixed ``beta``, then
``beta <- beta exp(rho C)``, ``C = ||G(z_{k+1}) - x_{k+1}||^2 - eps``, until ``C <= 0``; ``eps = (alpha/255)^2 d``.
:func:`continuation` runs it keeping ``(x_k, G(z_k), beta_k)`` at every outer iteration ``k``; :func:`along_k`
turns those snapshots into ``(K+1, B)`` paths; :func:`summarize_run` gives the final gap, multiplier and PSNRs;
:func:`plot_continuation` (the paper's Fig. 5, one digit) and :func:`plot_beta_and_constraint` draw them.

**The Alg. 2.2 diagnostic.** Algorithm 2.2 computes all three candidate codes every iteration -- ``z1 = mu_phi(x_n)``
(eq. 2.11), descent on ``J1(x_n, .)`` from ``z1``, descent from ``z_n`` -- and keeps the one of lowest
``J1(x^i, z^i)``; Algorithm 2.3 with ``n1 = n2 = n_max`` accepts the first that lowers ``J1``. §3.4 reads from it
that the encoder guess helps during the first 10-20 iterations and descent from ``z_n`` is needed near convergence
(hence ``n1 = 25``, ``n2 = 150``). :func:`diagnostics` runs both at fixed ``beta = 1/gamma^2``;
:func:`istar_pattern` and :func:`alg22_summary` give the numbers of that reading, :func:`plot_diagnostic` the figure.

Everything is batched: one solver call per run, every digit with its own ``beta_k``, ``i*`` and stopping state;
paths and histories are ``(T, B)`` tensors padded with ``NaN`` (``-1`` for ``i*``) once a digit has stopped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..energy import J1
from ..metrics import psnr
from ..operators import LinearOperator
from ..solvers import Restoration, solve

#: Alg. 2.2's three candidate codes (JPMAP §2.4), by their index ``i`` in ``history["istar"]``
CANDIDATES = {1: r"$z^1 = \mu_\phi(x_n)$", 2: r"descent from $z^1$", 3: r"descent from $z_n$"}
#: one colour per candidate in the diagnostic figure
CANDIDATE_COLORS = {1: "C0", 2: "C1", 3: "C2"}


def constraint_level(alpha: float, d: int) -> float:
    """Alg. 2.4's tolerance ``eps = (alpha/255)^2 d`` (JPMAP §2.5, Fig. 5): an RMSE of ``alpha`` grey levels."""
    if not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number > 0 (grey levels of RMSE), got {alpha!r}")
    if d <= 0:
        raise ValueError(f"d must be the number of pixels (> 0), got {d!r}")
    return (alpha / 255) ** 2 * d


def continuation(
    y: Tensor,
    op: LinearOperator,
    vae: Any,
    *,
    sigma: float,
    alpha: float,
    rho_d: float,
    k_max: int,
    n1: int = 25,
    n2: int = 150,
    n_max: int = 300,
    adam_max_iters: int = 3000,
) -> Restoration:
    """Algorithm 2.4 (JPMAP §2.5) on the batch ``y`` with ``rho = rho_d / d``, keeping a snapshot
    ``(x_k, G(z_k), z_k, beta_k, ||G(z_k) - x_k||^2)`` at every outer iteration ``k = 0..k_max`` (Fig. 5).

    ``k = 0`` is line 2, Alg. 2.3 with ``(n1, n2, n_max)`` from ``beta0 = 0.1/gamma^2``; every later ``k`` reruns
    Alg. 2.3 from ``(x_{k-1}, z_{k-1})`` with ``n1 = n2 = 0`` and updates each digit's own ``beta``. The official
    code's rate is ``rho_d = 100`` (``rho = 100/d``); ``eps = (alpha/255)^2 d``. ``sigma`` on the 0-255 scale.
    """
    if not rho_d > 0:
        raise ValueError(f"rho_d must be > 0 (rho = rho_d / d), got {rho_d!r}")
    if not isinstance(k_max, int) or isinstance(k_max, bool) or k_max < 0:
        raise ValueError(f"k_max must be an integer >= 0 (outer iterations of Alg. 2.4), got {k_max!r}")
    d = math.prod(vae.image_shape)
    return solve(
        "jpmap", y, op, vae, sigma=sigma, alpha=alpha, rho=rho_d / d, k_max=k_max, n1=n1, n2=n2, n_max=n_max,
        adam_max_iters=adam_max_iters, snapshots=range(k_max + 1),
    )  # fmt: skip


def _snapshots(r: Restoration) -> dict[int, dict[str, Tensor]]:
    snaps = r.info.get("snapshots")
    if not snaps:
        raise ValueError("the result has no Alg. 2.4 snapshots: run continuation() (jpmap with alpha and snapshots)")
    return snaps


def along_k(r: Restoration, key: str) -> Tensor:
    """``(K+1, B)`` float64: snapshot ``key`` (``"beta"`` or ``"coupling"``) of each digit at each outer iteration
    ``k`` of Alg. 2.4, ``NaN`` once the digit had stopped (Fig. 5's paths of ``beta_k`` and ``||G(z_k) - x_k||^2``)."""
    snaps = _snapshots(r).values()
    first = next(iter(snaps))
    if key not in first or first[key].dim() != 1:
        raise ValueError(f"key must name a per-digit scalar of the snapshots ('beta', 'coupling'), got {key!r}")
    values = torch.stack([s[key] for s in snaps]).double()
    return torch.where(torch.stack([s["running"] for s in snaps]), values, torch.nan)


def last_value(path: Tensor) -> Tensor:
    """``(B,)``: each digit's value at its last outer iteration (the last non-``NaN`` entry of each column of a
    :func:`along_k` path)."""
    if path.dim() != 2:
        raise ValueError(f"path must be (K+1, B) as along_k returns, got shape {tuple(path.shape)}")
    out = []
    for b, col in enumerate(path.T):
        kept = col[~col.isnan()]
        if kept.numel() == 0:
            raise ValueError(f"digit {b} has no value along k (every entry is NaN)")
        out.append(kept[-1])
    return torch.stack(out)


def summarize_run(r: Restoration, x_true: Tensor, eps: float, beta_gamma: float) -> dict[str, Any]:
    """What Figs. 1-2 and the metrics report of one Alg. 2.4 run: per digit (``(B,)`` tensors) and over the batch.

    ``gap_over_eps_*``: ``||G(z) - x||^2 / eps`` at ``k = 0`` and for the returned iterate (the constraint holds
    when ``<= 1``); ``beta_final_over_beta_gamma``: the ``beta`` that produced the returned iterate, in units of
    ``1/gamma^2`` (``beta_gamma``); ``psnr_x``, ``psnr_Gz``: per-digit PSNR of ``x`` and ``G(z)``.
    """
    coupling_k = along_k(r, "coupling")
    gap_final = ((r.x - r.x_decoded).flatten(1).pow(2).sum(1) / eps).cpu()
    beta_final = last_value(along_k(r, "beta")) / beta_gamma
    outer = r.per_image["outer_iterations"]
    return {
        "constraint_satisfied": bool((gap_final <= 1).all()),
        "outer_iterations": outer,
        "n_iterations": int(outer.max()),
        "gap_over_eps_initial": coupling_k[0] / eps,
        "gap_over_eps_initial_min": float(coupling_k[0].min() / eps),
        "gap_over_eps_final": gap_final,
        "gap_over_eps_final_min": float(gap_final.min()),
        "beta_final_over_beta_gamma": beta_final,
        "beta_final_over_beta_gamma_min": float(beta_final.min()),
        "psnr_x": psnr(r.x, x_true).cpu(),
        "psnr_Gz": psnr(r.x_decoded, x_true).cpu(),
    }


def describe_run(r: Restoration, eps: float) -> str:
    """One line: rate, digits meeting the constraint, outer iterations, seconds, final ``||G(z) - x||^2 / eps``."""
    d = r.x[0].numel()
    final_gap = [round(v, 4) for v in (last_value(along_k(r, "coupling")) / eps).tolist()]
    return (
        f"rho = {r.info['rho'] * d:g}/d: constraint met by {int(r.converged.sum())}/{len(r)} digits after "
        f"{r.per_image['outer_iterations'].tolist()} outer iterations ({r.info['seconds']:.0f} s); final "
        f"||G(z)-x||^2 / eps = {final_gap}"
    )


def splitting_on_alg24_schedule(
    r: Restoration,
    y: Tensor,
    op: LinearOperator,
    vae: Any,
    *,
    sigma: float,
    n_max: int = 300,
    adam_max_iters: int = 3000,
) -> Restoration:
    """Map-z splitting (Alg. 1.1, JPMAP's predecessor: no encoder, z-steps by descent from ``z_n``, ``z0 = 0``) on the
    same problem as an Alg. 2.4 run ``r`` and on each digit's own schedule: the ``beta_k`` that Alg. 2.4 visited on
    that digit (``along_k(r, "beta")``), with the same caps (``n_max`` alternations per beta, ``adam_max_iters`` per
    z-step) and the same start ``x0 = A_dagger(y)``. What remains between the two is the encoder's guesses."""
    return solve(
        "mapz_splitting", y, op, vae, sigma=sigma, betas=along_k(r, "beta"), maxiter=n_max,
        adam_max_iters=adam_max_iters,
    )  # fmt: skip


def compare_with_splitting(
    r_jpmap: Restoration, r_split: Restoration, x_true: Tensor, y: Tensor, op: LinearOperator, vae: Any, *, sigma: float
) -> dict[str, Any]:
    """Per digit, Alg. 2.4 against map-z splitting on the same schedule: ``J1`` of each final iterate at the digit's
    final ``beta`` (the same for both), PSNR of ``x`` and of ``G(z)``, alternations and Adam steps in total; and
    over the batch the share of digits on which JPMAP ends lower in ``J1`` and the means."""
    beta = last_value(along_k(r_jpmap, "beta")).to(r_jpmap.x)
    out: dict[str, Any] = {"beta_final_over_beta_gamma": (beta / vae.beta).cpu()}
    for name, r in (("jpmap", r_jpmap), ("mapz", r_split)):
        with torch.no_grad():
            j = J1(r.x, r.z, y, op, vae, sigma, beta, mu_x=r.x_decoded)
        out[name] = {
            "j1_final": j.cpu(),
            "psnr_x": psnr(r.x, x_true).cpu(),
            "psnr_Gz": psnr(r.x_decoded, x_true).cpu(),
            "alternations": r.iterations.cpu(),
            "adam_steps": r.history["adam_steps"].clamp(min=0).sum(0).cpu(),
            "seconds": float(r.info["seconds"]),
        }
    jp, mz = out["jpmap"], out["mapz"]
    out["jpmap_lower_j1_share"] = float((jp["j1_final"] < mz["j1_final"]).double().mean())
    out["j1_gap_median"] = float((mz["j1_final"] - jp["j1_final"]).double().median())
    out["psnr_x_gain_mean"] = float((jp["psnr_x"] - mz["psnr_x"]).mean())
    out["psnr_Gz_gain_mean"] = float((jp["psnr_Gz"] - mz["psnr_Gz"]).mean())
    return out


def plot_splitting_comparison(cmp: Mapping[str, Any], r_jpmap: Restoration, r_split: Restoration, x_true: Tensor,
                              show: Sequence[int]):  # fmt: skip
    """(a) final ``J1`` per digit, map-z splitting against JPMAP (below the diagonal: JPMAP lower); (b) PSNR of
    ``G(z)`` per digit, same axes; (c) the digits ``show``: ``x*``, then ``x`` and ``G(z)`` of each method."""
    import matplotlib.pyplot as plt

    jp, mz = cmp["jpmap"], cmp["mapz"]
    n = len(show)
    fig = plt.figure(figsize=(11, max(3.4, 1.3 * n)), layout="constrained")
    sub = fig.subfigures(1, 2, width_ratios=[2, 1.3])
    ax = sub[0].subplots(1, 2)
    for a, key in ((ax[0], "j1_final"), (ax[1], "psnr_Gz")):
        u, v = mz[key].double(), jp[key].double()
        a.scatter(u.numpy(), v.numpy(), s=14, color="C1")
        lo, hi = float(torch.minimum(u.min(), v.min())), float(torch.maximum(u.max(), v.max()))
        pad = 0.05 * (hi - lo + 1e-9)
        a.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", ls=":", lw=1)
        a.set(xlabel="map-z splitting (Alg. 1.1)", ylabel="JPMAP (Alg. 2.4)")
    if float(torch.minimum(mz["j1_final"].min(), jp["j1_final"].min())) > 0:
        from matplotlib.ticker import NullFormatter

        ax[0].set(xscale="log", yscale="log")
        ax[0].xaxis.set_minor_formatter(NullFormatter())
        ax[0].yaxis.set_minor_formatter(NullFormatter())
    ax[0].set_title("(a) final $J_1$ at the final $\\beta$\n(below the diagonal: JPMAP lower)", loc="left", fontsize=9)
    ax[1].set_title("(b) PSNR of $G(z)$ (dB)\n(above the diagonal: JPMAP better)", loc="left", fontsize=9)
    grid = sub[1].subplots(n, 5, squeeze=False)
    cols = [("$x^*$", x_true), ("JPMAP $x$", r_jpmap.x), ("JPMAP $G(z)$", r_jpmap.x_decoded),
            ("map-z $x$", r_split.x), ("map-z $G(z)$", r_split.x_decoded)]  # fmt: skip
    for i, b in enumerate(show):
        for j, (title, imgs) in enumerate(cols):
            g = grid[i, j]
            g.imshow(imgs[b, 0].detach().cpu().clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            g.set(xticks=[], yticks=[])
            g.grid(False)
            if i == 0:
                g.set_title(title, fontsize=8)
        grid[i, 0].set_ylabel(f"digit {b}", fontsize=8)
    grid[0, 0].set_title("(c) $x^*$", fontsize=8)
    return fig


def column_title(j: int, k: int, stop: int, snap: Mapping[str, Tensor], b: int, eps: float, beta_gamma: float) -> str:
    """Title of column ``j`` of Fig. 5 for digit ``b``: panel letter, ``k`` ("final" at the digit's last outer
    iteration ``stop``), ``beta_k`` in units of ``1/gamma^2`` and ``||G(z_k) - x_k||^2`` in units of ``eps``
    ("met" when the constraint holds)."""
    gap = float(snap["coupling"][b]) / eps
    return (
        f"({chr(97 + j)}) k = {k}" + (" (final)" if k == stop else "")
        + f"\n$\\beta_k$ = {float(snap['beta'][b]) / beta_gamma:.2g}$/\\gamma^2$"
        + f"\n$\\|G - x\\|^2$ = {gap:.4g}$\\,\\varepsilon$" + (" (met)" if gap <= 1 else "")
    )  # fmt: skip


def plot_continuation(
    runs: Mapping[str, Restoration],
    b: int,
    show_k: Sequence[int],
    *,
    x_true: Tensor,
    y: Tensor,
    op: LinearOperator,
    eps: float,
    beta_gamma: float,
    scale: float = 1.4,
):
    """The paper's Fig. 5 for digit ``b``, one block of three rows per run (label -> Alg. 2.4 result with
    snapshots): ``x_k``, ``G(z_k)`` and ``5 |x_k - G(z_k)|`` at the outer iterations ``show_k`` (a digit that stopped
    before ``k`` shows its final iterate), titled by :func:`column_title`; last row: ``x*``, ``A^T y``, ``A^dagger y``.
    """
    from ..plotting import image_grid

    if not 0 <= b < x_true.shape[0]:
        raise ValueError(f"b must index a digit of the batch (0..{x_true.shape[0] - 1}), got {b!r}")
    rows, labels, titles = [], [], []
    for label, r in runs.items():
        snaps, stop = _snapshots(r), int(r.per_image["outer_iterations"][b])
        ks = [min(k, stop) for k in show_k]  # a digit that stopped before k shows its final iterate
        x_k, G_k = torch.stack([snaps[k]["x"][b] for k in ks]), torch.stack([snaps[k]["x_decoded"][b] for k in ks])
        rows += [x_k, G_k, (x_k - G_k).abs() * 5]
        labels += [f"$x_k$\n{label}", f"$G(z_k)$\n{label}", f"$5\\,|x_k - G(z_k)|$\n{label}"]
        titles += [[column_title(j, k, stop, snaps[k], b, eps, beta_gamma) for j, k in enumerate(ks)], [], []]
    rows.append(torch.stack([x_true[b], op.A_adjoint(y)[b], op.A_dagger(y)[b]]).cpu())
    labels.append("reference")
    titles.append(["$x^*$", r"$A^\top y$", r"$x_0 = A^\dagger y$"])
    fig = image_grid(rows, labels, scale=scale)
    n_cols = max(int(row.shape[0]) for row in rows)
    for i, row_titles in enumerate(titles):
        for j, t in enumerate(row_titles):
            fig.axes[i * n_cols + j].set_title(t, fontsize=7, pad=3)
    fig.subplots_adjust(hspace=0.75)
    return fig


def plot_beta_and_constraint(
    runs: Mapping[str, Restoration], eps: float, beta_gamma: float, linestyles: Sequence[str] = ("--", "-")
):
    """Two panels along the outer iterations ``k`` of Alg. 2.4, one line per digit, one line style per run:
    (a) ``beta_k`` in units of ``1/gamma^2``, (b) ``||G(z_k) - x_k||^2 / eps`` with the constraint level 1."""
    import matplotlib.pyplot as plt

    from ..plotting import setup_style

    if len(linestyles) != len(runs):
        raise ValueError(f"one line style per run: {len(runs)} runs, {len(linestyles)} styles {tuple(linestyles)}")
    setup_style()
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for r, ls in zip(runs.values(), linestyles, strict=True):
        beta_k, gap_k = along_k(r, "beta") / beta_gamma, along_k(r, "coupling") / eps
        k = torch.arange(beta_k.shape[0])
        for i in range(beta_k.shape[1]):  # one colour per digit
            ax_a.plot(k, beta_k[:, i], ls=ls, color=f"C{i % 10}", lw=1.2)
            ax_b.plot(k, gap_k[:, i], ls=ls, color=f"C{i % 10}", lw=1.2)
    ax_b.axhline(1.0, color="k", ls=":", lw=1.2)
    handles = [plt.Line2D([], [], color="0.3", ls=ls, label=label) for label, ls in zip(runs, linestyles, strict=True)]
    eps_line = plt.Line2D([], [], color="k", ls=":", label=r"$\varepsilon = (\alpha/255)^2 d$")
    for ax, extra in ((ax_a, []), (ax_b, [eps_line])):
        ax.set_yscale("log")
        ax.set_xlabel("outer iteration $k$ of Alg. 2.4")
        ax.legend(handles=handles + extra, fontsize=8)
    ax_a.set_ylabel(r"$\beta_k \cdot \gamma^2$")
    ax_a.set_title(r"(a) multiplier $\beta_k$", loc="left")
    ax_b.set_ylabel(r"$\|G(z_k) - x_k\|^2 / \varepsilon$")
    ax_b.set_title("(b) constraint", loc="left")
    fig.tight_layout()
    return fig


@dataclass
class Diagnostics:
    """The two runs of the Alg. 2.2 diagnostic at fixed ``beta = 1/gamma^2`` on the same digits, and what the figure
    reads from them (JPMAP §2.4, §3.4).

    * ``alg22``: Algorithm 2.2 (all three candidates every iteration, the lowest ``J1`` wins);
    * ``auto``: Algorithm 2.3 with ``n1 = n2 = n_max`` (the first candidate, in the order 1, 2, 3, that lowers
      ``J1`` is accepted: the auto-regulation of §3.4);
    * ``candidates`` ``(T, B, 3)`` float64: Alg. 2.2's ``J1(x^i, z^i)``; ``relative`` ``(T, B, 3)``: their change
      relative to the current energy, ``(J1(x^i, z^i) - J1(x_n, z_n)) / |J1(x_n, z_n)|`` (< 0: candidate ``i``
      lowers ``J1``; row 0 is ``NaN`` because ``J1(x_0, z_0) = +inf``), see :func:`candidate_energies`.
    """

    alg22: Restoration
    auto: Restoration
    candidates: Tensor
    relative: Tensor

    @property
    def istar22(self) -> Tensor:
        """``(T, B)``: Alg. 2.2's winner ``i* = argmin_i J1(x^i, z^i)``, ``-1`` once a digit stopped."""
        return self.alg22.history["istar"]

    @property
    def istar_auto(self) -> Tensor:
        """``(T, B)``: the candidate Alg. 2.3 with ``n1 = n2 = n_max`` accepted, ``-1`` once a digit stopped."""
        return self.auto.history["istar"]


def candidate_energies(r22: Restoration) -> tuple[Tensor, Tensor]:
    """``(candidates, relative)`` of an Alg. 2.2 run, both ``(T, B, 3)`` float64: the energies ``J1(x^i, z^i)`` of
    the three candidates at each iteration ``n`` and their change relative to the energy before it,
    ``J1(x_n, z_n)`` = the previous row's objective (``+inf`` at ``n = 0``, so row 0 is ``NaN``)."""
    if "J1_candidates" not in r22.history:
        raise ValueError("the result has no history['J1_candidates']: run jpmap with algorithm='2.2'")
    cand = r22.history["J1_candidates"].double()  # (T, B, 3), NaN once a digit stopped
    objective = r22.history["objective"]
    J_now = torch.cat([torch.full_like(objective[:1], torch.inf), objective[:-1]]).double()
    return cand, (cand - J_now[..., None]) / J_now[..., None].abs()


def diagnostics(
    y: Tensor,
    op: LinearOperator,
    vae: Any,
    *,
    sigma: float,
    alg22_n_max: int = 300,
    auto_n_max: int = 300,
    tol: float = 1 / 25500,
    adam_max_iters: int = 3000,
) -> Diagnostics:
    """Run the Alg. 2.2 diagnostic (§2.4, §3.4) at ``beta = 1/gamma^2``: Alg. 2.2 for at most ``alg22_n_max``
    iterations and Alg. 2.3 with ``n1 = n2 = n_max = auto_n_max``. Both stop when
    ``||x_{n+1} - x_n||/sqrt(d) + ||z_{n+1} - z_n||/sqrt(l) < tol`` (default the official code's final test,
    ``(1/255)/100``: "close to convergence" in the sense of §3.4)."""
    common = {"sigma": sigma, "tol": tol, "adam_max_iters": adam_max_iters}
    r22 = solve("jpmap", y, op, vae, algorithm="2.2", n1=0, n2=0, n_max=alg22_n_max, **common)
    auto = solve("jpmap", y, op, vae, algorithm="2.3", n1=auto_n_max, n2=auto_n_max, n_max=auto_n_max, **common)
    cand, rel = candidate_energies(r22)
    return Diagnostics(alg22=r22, auto=auto, candidates=cand, relative=rel)


def positive_mode(values: Tensor) -> int | None:
    """The most frequent candidate index among the entries ``> 0`` (``-1`` marks a stopped digit), or ``None``."""
    values = values[values > 0]
    return int(values.mode().values) if values.numel() else None


def istar_pattern(istar: Tensor, early: int) -> dict[str, Any]:
    """The auto-regulation of §3.4 read from ``istar`` ``(T, B)`` (Alg. 2.3 with ``n1 = n2 = n_max``; ``-1`` after a
    digit stopped):

    * ``istar_first``: the most frequent ``i*`` over ``n = 1..early`` (``n = 0`` is excluded: ``J1(x_0, z_0) = +inf``
      accepts ``z1`` by construction); the paper's "first 10 or 20 iterations" give ``1``;
    * ``istar_at_end`` ``(B,)`` and its mode ``istar_last``: ``i*`` at each digit's last iteration (paper: ``3``);
    * ``last_istar1`` / ``first_istar3``: per digit, the last ``n`` with ``i* = 1`` and the first with ``i* = 3``
      (``None`` if none), to compare with ``n1 = 25`` and ``n2 = 150``; ``*_max`` over the digits (``None`` if a
      digit has none).
    """
    if istar.dim() != 2:
        raise ValueError(f"istar must be (T, B) as history['istar'], got shape {tuple(istar.shape)}")
    if early < 1:
        raise ValueError(f"early must be >= 1 (iterations n = 1..early), got {early!r}")
    B = istar.shape[1]
    last_n = (istar > 0).sum(0) - 1  # each digit's last iteration
    istar_at_end = istar[last_n, torch.arange(B)]

    def first_last(b: int, i: int) -> tuple[int | None, int | None]:
        hits = (istar[:, b] == i).nonzero().squeeze(1)
        return (int(hits[0]), int(hits[-1])) if hits.numel() else (None, None)

    last_istar1 = [first_last(b, 1)[1] for b in range(B)]
    first_istar3 = [first_last(b, 3)[0] for b in range(B)]
    return {
        "istar_first": positive_mode(istar[1 : early + 1]),
        "istar_last": positive_mode(istar_at_end),
        "istar_at_end": istar_at_end,
        "last_istar1": last_istar1,
        "last_istar1_max": None if None in last_istar1 else max(last_istar1),
        "first_istar3": first_istar3,
        "first_istar3_max": None if None in first_istar3 else max(first_istar3),
    }


def alg22_summary(diag: Diagnostics, early: int) -> dict[str, Any]:
    """What the Alg. 2.2 run says (§2.4, §3.4):

    * ``z1_lowers_share_early`` / ``_late``: the share of iterations ``n = 1..early`` / of each digit's last
      ``early`` iterations in which the encoder candidate ``z1`` lowers ``J1`` below ``J1(x_n, z_n)``;
    * ``winner_counts``: how often each candidate ``i = 1, 2, 3`` won (all digits, all iterations);
    * ``gap_z2_z3_rel_median_late``: median of ``|J1(z2) - J1(z3)| / min_i J1(z^i)`` over the late iterations (the
      two descents reach the same minimiser to within Adam's tolerance when it is small).
    """
    if early < 1:
        raise ValueError(f"early must be >= 1 (iterations n = 1..early), got {early!r}")
    r22, cand, rel = diag.alg22, diag.candidates, diag.relative
    B = rel.shape[1]
    z1_lowers = rel[..., 0] < 0
    z1_share_early = float(z1_lowers[1 : early + 1][~rel[1 : early + 1, :, 0].isnan()].double().mean())
    late = torch.stack([torch.arange(rel.shape[0]) >= r22.iterations[b] - early for b in range(B)], 1)
    z1_share_late = float(z1_lowers[late & ~rel[..., 0].isnan()].double().mean())
    gap23 = ((cand[..., 1] - cand[..., 2]).abs() / cand.nan_to_num(torch.inf).min(-1).values)[late]
    return {
        "iterations": r22.iterations,
        "z1_lowers_share_early": z1_share_early,
        "z1_lowers_share_late": z1_share_late,
        "winner_counts": {i: int((diag.istar22 == i).sum()) for i in (1, 2, 3)},
        "gap_z2_z3_rel_median_late": float(gap23.nanmedian()),
    }


def plot_diagnostic(diag: Diagnostics, n1: int = 25, n2: int = 150):
    """Three panels along the iterations ``n`` (dotted: ``n1`` and ``n2`` of Alg. 2.3): (a) Alg. 2.2's relative
    energy change of each candidate, median over the digits (thin: each digit; symmetric log scale), (b) Alg. 2.2's
    winner ``i*`` per digit, (c) the candidate Alg. 2.3 with ``n1 = n2 = n_max`` accepts per digit (white: stopped).
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from ..plotting import setup_style

    setup_style()
    rel, istar22, istar = diag.relative, diag.istar22, diag.istar_auto
    n_images = rel.shape[1]
    colors, names = CANDIDATE_COLORS, CANDIDATES
    fig, (ax_a, ax_b, ax_c) = plt.subplots(3, 1, figsize=(10, 9), gridspec_kw={"height_ratios": [2, 1, 1]})
    n = torch.arange(rel.shape[0])
    for i in (1, 2, 3):
        for b in range(n_images):
            ax_a.plot(n, rel[:, b, i - 1], color=colors[i], lw=0.5, alpha=0.35)
        ax_a.plot(n, rel[:, :, i - 1].nanmedian(1).values, color=colors[i], lw=2, label=names[i])
    ax_a.axhline(0.0, color="0.3", lw=0.8)
    ax_a.set_yscale("symlog", linthresh=1e-6)
    ax_a.set_ylabel(r"$(J_1(x^i, z^i) - J_1(x_n, z_n)) / J_1(x_n, z_n)$")
    ax_a.set_title("(a) Alg. 2.2: energy of each candidate relative to the current iterate", loc="left")
    ax_a.legend(fontsize=8, loc="lower right")
    cmap = ListedColormap(["white", colors[1], colors[2], colors[3]])
    for ax, ist, title in (
        (ax_b, istar22, r"(b) Alg. 2.2: winner $i^* = \arg\min_i J_1(x^i, z^i)$"),
        (ax_c, istar, r"(c) Alg. 2.3 with $n_1 = n_2 = n_{max}$: accepted candidate $i^*$"),
    ):
        ax.imshow(ist.clamp(min=0).T, cmap=cmap, vmin=-0.5, vmax=3.5, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(n_images) if n_images <= 20 else [])
        ax.set_ylabel("digit")
        ax.grid(False)
        ax.set_title(title, loc="left")
    for ax in (ax_a, ax_b, ax_c):
        for n_lim in (n1, n2):
            ax.axvline(n_lim, color="0.3", ls=":", lw=1)
        ax.set_xlim(-0.5, max(rel.shape[0], istar.shape[0]) - 0.5)
    ax_c.set_xlabel("iteration $n$")
    handles = [
        plt.Line2D([], [], color=colors[i], marker="s", ls="none", label=rf"$i^* = {i}$: " + names[i])
        for i in (1, 2, 3)
    ]
    ax_c.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=3)
    fig.tight_layout()
    return fig
