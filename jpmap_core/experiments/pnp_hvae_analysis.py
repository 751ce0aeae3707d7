r"""PnP-HVAE's convergence analysis on a patch HVAE (Prost et al., ICCV 2023, §5 and §6.3; notebooks 08 and 09).

**Figure 1 (§5.3, notebook 08).** Proposition 2 bounds the Lipschitz constant of one iteration
``T(x) = prox_{gamma^2 f}(HVAE(x, tau))`` of Algorithm 2 by ``sigma^2 / (gamma^2 lambda_min + sigma^2) L_tau``, where
``L_tau`` is that of the tempered reconstruction ``HVAE(x, tau) = mu_theta(E_tau(x))``; Corollary 1: ``L_tau < 1``
makes ``T`` a contraction and Algorithm 2 converges (Banach). The paper estimates ``L_tau`` from below with the ratios

.. math:: r = \frac{\|\mathrm{HVAE}(u, \tau) - \mathrm{HVAE}(v, \tau)\|}{\|u - v\|}

over pairs of noisy natural-image patches (:func:`sample_patch_pairs`, :func:`lipschitz_ratios`). Beyond the paper,
:func:`jacobian_norm` estimates the *local* Lipschitz constant ``||J(x)||_2`` at a point by power iteration on
``J^T J`` (a forward-mode ``jvp`` then a reverse-mode ``vjp`` per step); it is also a lower bound of ``L_tau``, and
usually a tighter one than a secant ratio. :func:`lipschitz_study` runs both on a grid of temperatures and noise
levels, :func:`lipschitz_rows` and :func:`lipschitz_claims` turn them into the notebook's table and verdicts.

**Figure 2 (§5.3, notebook 09).** :func:`convergence_runs` restores one deblurring problem with Algorithm 2
(:func:`~jpmap_core.solvers.pnp_hvae`) and with the Adam baseline on the same ``J1`` (eq. 15,
:func:`~jpmap_core.solvers.adam_j1`) for several learning rates, every run for the same number of iterations, with
``J1(x_k, z_k)`` and ``L_k = ||T(x_{k+1}) - T(x_k)|| / ||x_{k+1} - x_k||`` recorded; :func:`convergence_rows` and
:func:`convergence_claims` summarise them.

**Figure 7 (§6.3, notebook 09).** :func:`temperature_sweep` runs Algorithm 2 for each temperature on the same
problems and scores the restored images (PSNR, SSIM).

Images are ``(B, 3, H, W)`` in [0, 1]; noise levels are on the 0-255 scale. Every draw comes from a
``torch.Generator``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._checks import check_nonnegative, check_positive
from ..metrics import psnr, ssim
from ..models import HVAE, HVAEAtSize
from ..operators import Problem, make_problem
from ..solvers import Restoration
from ..solvers.pnp_hvae import adam_j1, hvae_step, pnp_hvae

Map = Callable[[Tensor], Tensor]

#: the keys of one row of :func:`lipschitz_rows` (notebook 08's ``metrics["lipschitz"]``)
LIPSCHITZ_KEYS = (
    "tau",
    "sigma",
    "n_pairs",
    "ratio_median",
    "ratio_q99",
    "ratio_max",
    "frac_below_1",
    "jacobian_norm_median",
)
#: the keys of one row of :func:`convergence_rows` (notebook 09's ``metrics["convergence"]``)
CONVERGENCE_KEYS = ("method", "lr", "iterations_to_tol", "j1_final", "psnr_final", "lk_max_late")
#: the keys of one row of :func:`temperature_sweep` (notebook 09's ``metrics["temperature"]``)
TEMPERATURE_KEYS = ("tau", "psnr_mean", "ssim_mean")


def _positive_int(v: object, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


def _per_image_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1)


# ------------------------------------------------------------------------------------------------
# Figure 1: Lipschitz ratios and local Lipschitz constants of HVAE(., tau)
# ------------------------------------------------------------------------------------------------
def reconstruction_map(prior: HVAE | HVAEAtSize, tau: float, *, clamp: bool = True) -> Map:
    """``x -> HVAE(x, tau) = mu_theta(E_tau(x))`` (Proposition 1), batched, for images of any size.

    ``clamp=True`` is the map inside Algorithm 2's ``T`` (:func:`~jpmap_core.solvers.pnp_hvae.hvae_step`: the encoder
    sees ``x`` clamped to [0, 1], as in the official code); ``clamp=False`` feeds noisy values outside [0, 1] to the
    encoder as they are. Differentiable (autograd and ``torch.func``).
    """
    return lambda x: hvae_step(x, prior, tau, clamp=clamp).x_decoded


def lipschitz_ratios(f: Map, u: Tensor, v: Tensor) -> Tensor:
    """``r_b = ||f(u_b) - f(v_b)|| / ||u_b - v_b||`` per pair ``b`` (PnP-HVAE Fig. 1): ``(B,)``, each a lower bound of
    the Lipschitz constant of ``f``. Pairs with ``u_b = v_b`` are refused."""
    if u.shape != v.shape:
        raise ValueError(f"u and v must have the same shape, got {tuple(u.shape)} and {tuple(v.shape)}")
    den = _per_image_norm(u - v)
    if bool((den == 0).any()):
        raise ValueError(f"pairs {(den == 0).nonzero().flatten().tolist()} have u == v: the ratio is undefined")
    with torch.no_grad():
        num = _per_image_norm(f(u) - f(v))
    return num / den


def jacobian_norm(
    f: Map, x: Tensor, *, n_iter: int = 20, generator: torch.Generator | None = None, v0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""Spectral norm ``||J_f(x_b)||_2`` of the Jacobian of ``f`` at every image ``x_b`` by power iteration on
    ``J^T J``, one vector per image (``f`` must act on the images of a batch independently, as the HVAE does).

    From ``v_0`` (given, else ``N(0, I)`` from ``generator``), normalised per image, each step computes ``J v``
    (forward mode, ``torch.func.jvp``) and ``J^T (J v)`` (reverse mode, one ``vjp`` at ``x`` reused by every step), and
    ``v <- J^T J v / ||J^T J v||``. The estimate after step ``k`` is ``||J v_{k-1}||``, a lower bound of
    ``||J||_2`` (``v`` has unit norm) that increases to it; the local Lipschitz constant of ``f`` at ``x`` is
    ``||J(x)||_2``, and the global one is at least that. Returns ``(estimate (B,), history (n_iter, B))``.
    """
    n_iter = _positive_int(n_iter, "n_iter")
    x = x.detach()
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype) if v0 is None else v0.detach()
    if v.shape != x.shape:
        raise ValueError(f"v0 must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
    v = v.to(device=x.device, dtype=x.dtype)
    v = v / _per_image_norm(v).view(-1, *[1] * (x.dim() - 1))
    _, vjp_fn = torch.func.vjp(f, x)
    history = []
    for _ in range(n_iter):
        with warnings.catch_warnings():  # torch's forward AD scripts its decompositions on first use (torch 2.14)
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
            _, jv = torch.func.jvp(f, (x,), (v,))
        history.append(_per_image_norm(jv).detach())
        (w,) = vjp_fn(jv)
        norm = _per_image_norm(w).view(-1, *[1] * (x.dim() - 1))
        v = torch.where(norm > 0, w / norm.clamp_min(torch.finfo(x.dtype).tiny), v).detach()
    hist = torch.stack(history)
    return hist[-1], hist


def sample_patch_pairs(
    images: Sequence[Tensor], n_pairs: int, patch_size: int, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, list[dict[str, int]]]:
    """``n_pairs`` pairs ``(u_b, v_b)`` of ``patch_size`` square patches, each patch of a pair from a *different*
    image of ``images`` (a list of ``(1, C, H, W)`` or ``(C, H, W)`` tensors) at a uniformly random position.

    Returns ``u, v`` ``(n_pairs, C, P, P)`` and, per pair, where they came from (``{"u_image", "u_top", "u_left",
    "v_image", ...}``, indices into ``images``). Needs at least two images, each at least ``P x P``.
    """
    n_pairs = _positive_int(n_pairs, "n_pairs")
    p = _positive_int(patch_size, "patch_size")
    items = [x[0] if x.dim() == 4 else x for x in images]
    if len(items) < 2:
        raise ValueError(f"pairs of patches from different images need at least 2 images, got {len(items)}")
    small = [i for i, x in enumerate(items) if x.shape[-2] < p or x.shape[-1] < p]
    if small:
        raise ValueError(f"images {small} are smaller than the {p}x{p} patches")
    n = len(items)
    first = torch.randint(n, (n_pairs,), generator=generator)
    second = (first + torch.randint(1, n, (n_pairs,), generator=generator)) % n  # always another image
    pos = torch.rand(n_pairs, 2, 2, generator=generator, dtype=torch.float64)
    u, v, where = [], [], []
    for b in range(n_pairs):
        row: dict[str, int] = {}
        for j, (name, idx) in enumerate((("u", first[b]), ("v", second[b]))):
            x = items[int(idx)]
            h, w = x.shape[-2:]
            top = min(int(pos[b, j, 0] * (h - p + 1)), h - p)
            left = min(int(pos[b, j, 1] * (w - p + 1)), w - p)
            (u if name == "u" else v).append(x[:, top : top + p, left : left + p])
            row.update({f"{name}_image": int(idx), f"{name}_top": top, f"{name}_left": left})
        where.append(row)
    return torch.stack(u).contiguous(), torch.stack(v).contiguous(), where


def add_noise(x: Tensor, sigma: float, *, generator: torch.Generator | None = None) -> Tensor:
    """``x + sigma/255 * n``, ``n ~ N(0, I)`` from ``generator`` (not clipped: the noisy points of Fig. 1)."""
    s = check_nonnegative(sigma, "sigma (0-255 scale)")
    if s == 0:
        return x.clone()
    return x + s / 255 * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def lipschitz_study(
    prior: HVAE | HVAEAtSize,
    u: Tensor,
    v: Tensor,
    *,
    taus: Sequence[float],
    sigmas: Sequence[float],
    n_jacobian: int,
    power_iters: int = 20,
    seed: int = 0,
    clamp: bool = True,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Fig. 1 and its extension: for every noise level ``sigma`` the clean pairs ``(u, v)`` get their own white noise
    (one draw per level, shared by the temperatures, so that temperatures are compared on the same points); for every
    ``tau`` the ratios :func:`lipschitz_ratios` of ``HVAE(., tau)`` over all pairs, and :func:`jacobian_norm` at the
    noisy ``u`` of the first ``n_jacobian`` pairs.

    Draws come from one generator seeded with ``seed``: the noise of each level in the order of ``sigmas`` (``u``
    then ``v``), then the power iterations' starting vectors. The network sees at most ``batch_size`` patches at a
    time (memory; every image is independent of the others in its batch, so the numbers do not depend on it).

    Returns ``{"ratios": {(tau, sigma): (B,)}, "jacobian": {(tau, sigma): (n_jacobian,)}, "jacobian_history":
    {(tau, sigma): (power_iters, n_jacobian)}, "taus", "sigmas", "n_pairs", "n_jacobian", "power_iters", "clamp"}``.
    """
    if not taus or not sigmas:
        raise ValueError("taus and sigmas must each list at least one value")
    n_jacobian = min(_positive_int(n_jacobian, "n_jacobian"), u.shape[0])
    bs = _positive_int(batch_size, "batch_size")
    g = torch.Generator().manual_seed(int(seed))
    noisy = {}
    for s in sigmas:
        noisy[float(s)] = (add_noise(u, s, generator=g), add_noise(v, s, generator=g))
    out: dict[str, Any] = {"ratios": {}, "jacobian": {}, "jacobian_history": {}}
    for t in taus:
        f = reconstruction_map(prior, float(t), clamp=clamp)
        for s in sigmas:
            un, vn = noisy[float(s)]
            key = (float(t), float(s))
            out["ratios"][key] = torch.cat(
                [lipschitz_ratios(f, un[i : i + bs], vn[i : i + bs]) for i in range(0, un.shape[0], bs)]
            )
            v0 = torch.randn(un[:n_jacobian].shape, generator=g, dtype=un.dtype)
            parts = [
                jacobian_norm(f, un[i : min(i + bs, n_jacobian)], n_iter=power_iters, v0=v0[i : i + bs])
                for i in range(0, n_jacobian, bs)
            ]
            out["jacobian"][key] = torch.cat([e for e, _ in parts])
            out["jacobian_history"][key] = torch.cat([h for _, h in parts], 1)
    out.update(
        taus=[float(t) for t in taus],
        sigmas=[float(s) for s in sigmas],
        n_pairs=int(u.shape[0]),
        n_jacobian=n_jacobian,
        power_iters=int(power_iters),
        clamp=bool(clamp),
    )
    return out


def lipschitz_rows(study: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per ``(tau, sigma)`` with exactly :data:`LIPSCHITZ_KEYS`: the ratios' median, 99th percentile, maximum
    and fraction below 1, and the median of the Jacobian norms (noise levels in the 0-255 scale)."""
    rows = []
    for s in study["sigmas"]:
        for t in study["taus"]:
            r = study["ratios"][(t, s)].double()
            jac = study["jacobian"][(t, s)].double()
            rows.append(
                {
                    "tau": t,
                    "sigma": s,
                    "n_pairs": int(r.numel()),
                    "ratio_median": float(r.median()),
                    "ratio_q99": float(torch.quantile(r, 0.99)),
                    "ratio_max": float(r.max()),
                    "frac_below_1": float((r < 1).double().mean()),
                    "jacobian_norm_median": float(jac.median()),
                }
            )
    return rows


def lipschitz_claims(study: dict[str, Any], *, near_one: float = 0.2, rare: float = 0.05) -> dict[str, Any]:
    """The paper's reading of Fig. 1 checked on ``study`` (computed, never assumed):

    * ``noisy_all_below_1``: for every ``sigma > 0`` and every ``tau``, every ratio is below 1 ("for noisy images
      the observed Lipschitz constant is always less than 1"); ``noisy_ratio_max`` is the largest such ratio;
    * ``lower_tau_contracts_more``: for every ``sigma > 0`` the median ratio increases strictly with ``tau``
      (``per_sigma`` gives it per level; ``..._paired`` the fraction of pairs whose own ratio increases with
      ``tau``, on the same points);
    * ``clean_near_1``: at ``sigma = 0`` the median ratio lies within ``near_one`` of 1 for every ``tau``, and
      ``clean_above_1_rare``: the fraction of clean ratios at or above 1 is at most ``rare`` (and ``clean_any_above_1``
      whether one is seen at all, "in some rare case");
    * the Jacobian extension: ``jacobian_above_ratio_fraction`` (over every noisy point, how often the local
      constant ``||J(u)||`` exceeds that pair's ratio), ``noisy_jacobian_below_1`` (every local constant at a noisy
      point is below 1) and ``noisy_jacobian_max``.
    """
    taus, sigmas = study["taus"], study["sigmas"]
    noisy = [s for s in sigmas if s > 0]
    clean = [s for s in sigmas if s == 0]
    out: dict[str, Any] = {"near_one": near_one, "rare": rare}
    if noisy:
        ratios = torch.cat([study["ratios"][(t, s)] for t in taus for s in noisy])
        out["noisy_ratio_max"] = float(ratios.max())
        out["noisy_all_below_1"] = bool((ratios < 1).all())
        per_sigma = {}
        for s in noisy:
            med = [float(study["ratios"][(t, s)].median()) for t in sorted(taus)]
            stacked = torch.stack([study["ratios"][(t, s)] for t in sorted(taus)])
            paired = float((stacked[1:] > stacked[:-1]).all(0).double().mean()) if len(taus) > 1 else math.nan
            per_sigma[f"{s:g}"] = {
                "medians_by_tau": med,
                "increasing": all(b > a for a, b in zip(med, med[1:], strict=False)),
                "paired_increasing_fraction": paired,
            }
        out["per_sigma"] = per_sigma
        out["lower_tau_contracts_more"] = all(v["increasing"] for v in per_sigma.values())
        jac = torch.cat([study["jacobian"][(t, s)] for t in taus for s in noisy])
        paired_r = torch.cat([study["ratios"][(t, s)][: study["n_jacobian"]] for t in taus for s in noisy])
        out["noisy_jacobian_max"] = float(jac.max())
        out["noisy_jacobian_below_1"] = bool((jac < 1).all())
        out["jacobian_above_ratio_fraction"] = float((jac > paired_r).double().mean())
    if clean:
        r0 = {t: study["ratios"][(t, 0.0)] for t in taus}
        all0 = torch.cat(list(r0.values()))
        out["clean_medians_by_tau"] = [float(r0[t].median()) for t in taus]
        out["clean_near_1"] = all(abs(m - 1) <= near_one for m in out["clean_medians_by_tau"])
        out["clean_frac_at_or_above_1"] = float((all0 >= 1).double().mean())
        out["clean_above_1_rare"] = out["clean_frac_at_or_above_1"] <= rare
        out["clean_any_above_1"] = bool((all0 >= 1).any())
        out["clean_ratio_max"] = float(all0.max())
    return out


def plot_lipschitz(study: dict[str, Any], *, bins: int = 30):
    """Fig. 1: one histogram panel per noise level (one colour per ``tau``, the dotted line at ``r = 1``) and, beside
    them, the local Lipschitz constants ``||J(u)||_2`` at the same noisy points (one dot per point)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from ..plotting import setup_style

    setup_style()
    taus, sigmas = study["taus"], study["sigmas"]
    colours = dict(zip(taus, sns.color_palette("colorblind", len(taus)), strict=True))
    fig, axes = plt.subplots(1, len(sigmas) + 1, figsize=(3.3 * (len(sigmas) + 1), 3.0), squeeze=False)
    axes = axes[0]
    all_r = torch.cat([r for r in study["ratios"].values()])
    lo, hi = float(all_r.min()) - 0.02, max(float(all_r.max()), 1.0) + 0.02
    edges = torch.linspace(lo, hi, bins + 1).numpy()
    letters = "abcdefghij"
    for i, s in enumerate(sigmas):
        ax = axes[i]
        for t in taus:
            r = study["ratios"][(t, s)].numpy()
            ax.hist(r, bins=edges, histtype="stepfilled", alpha=0.3, color=colours[t])
            ax.hist(r, bins=edges, histtype="step", lw=1.5, color=colours[t], label=f"$\\tau = {t:g}$")
        ax.axvline(1.0, color="k", ls=":", lw=1)
        ax.set_title(f"({letters[i]}) $\\sigma = {s:g}$")
        ax.set_xlabel("ratio $r$")
        ax.set_xlim(lo, hi)
        if i == 0:
            ax.set_ylabel("number of pairs")
            ax.legend(fontsize=8)
    ax = axes[-1]
    width = 0.8 / len(taus)
    for j, t in enumerate(taus):
        for i, s in enumerate(sigmas):
            jac = study["jacobian"][(t, s)].numpy()
            xs = i - 0.4 + width * (j + 0.5) + torch.linspace(-width / 4, width / 4, len(jac)).numpy()
            ax.scatter(xs, jac, s=10, color=colours[t], label=f"$\\tau = {t:g}$" if i == 0 else None)
            median = float(torch.median(study["ratios"][(t, s)]))
            ax.plot([i - 0.4 + width * j, i - 0.4 + width * (j + 1)], [median] * 2, color=colours[t], lw=1.5)
    ax.axhline(1.0, color="k", ls=":", lw=1)
    ax.set_xticks(range(len(sigmas)), [f"$\\sigma = {s:g}$" for s in sigmas])
    ax.set_ylabel("$\\|J(u)\\|_2$ (dots), median ratio (bars)")
    ax.set_title(f"({letters[len(sigmas)]}) local Lipschitz constants")
    fig.tight_layout()
    return fig


def plot_samples(samples: dict[float, Tensor], large: dict[float, Tensor] | None = None):
    """Fig. 4's idea: rows of prior samples ``mu_theta(z)``, ``z`` from the prior at temperature ``tau`` (one row per
    ``tau``), and beside each row one larger sample of the same fully convolutional model."""
    import matplotlib.pyplot as plt

    from ..plotting import setup_style

    setup_style()
    taus = list(samples)
    n = max(int(s.shape[0]) for s in samples.values())
    n_large = 0 if not large else max(int(s.shape[0]) for s in large.values())
    small_px = int(next(iter(samples.values())).shape[-1])
    large_px = 0 if not large else int(next(iter(large.values())).shape[-1])
    ratio = large_px / small_px if large else 0
    widths = [1.0] * n + ([ratio] * n_large if large else [])
    fig = plt.figure(figsize=(0.9 * sum(widths) + 0.6, 0.9 * ratio * len(taus) if large else 0.9 * len(taus)))
    grid = fig.add_gridspec(len(taus), len(widths), width_ratios=widths, wspace=0.05, hspace=0.05)
    for i, t in enumerate(taus):
        row = [samples[t][j] for j in range(samples[t].shape[0])]
        row += [large[t][j] for j in range(large[t].shape[0])] if large else []
        for j, img in enumerate(row):
            ax = fig.add_subplot(grid[i, j])
            ax.imshow(img.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if j == 0:
                ax.set_ylabel(f"$\\tau = {t:g}$", rotation=0, ha="right", va="center")
    return fig


# ------------------------------------------------------------------------------------------------
# Figure 2: Algorithm 2 against Adam on J1
# ------------------------------------------------------------------------------------------------
def same_size_groups(images: Sequence[Tensor], caller: str) -> list[list[int]]:
    """The indices of ``images`` (each ``(1, C, H, W)``) grouped by size, groups in order of first appearance: the
    batches of :func:`deblurring_problems` and :func:`~jpmap_core.experiments.natural.inpainting_problems`."""
    if not images:
        raise ValueError(f"{caller} needs at least one image")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(images):
        if x.dim() != 4 or x.shape[0] != 1:
            raise ValueError(f"image {i} must have shape (1, C, H, W), got {tuple(x.shape)}")
        groups.setdefault(tuple(x.shape[1:]), []).append(i)
    return list(groups.values())


def deblurring_problems(
    images: Sequence[Tensor], kernel: Tensor, sigma: float, *, seed: int
) -> tuple[list[Problem], list[Tensor], list[list[int]]]:
    """``y_i = k * x_i + n_i`` for every image ``x_i`` (``(1, C, H, W)`` each; circular blur with ``kernel``, noise
    std ``sigma`` on the 0-255 scale), image ``i``'s noise from a generator seeded with ``seed + i`` -- so image ``i``
    gets the same ``y_i`` whichever images come with it. Images of the same size are batched into one problem.

    Returns ``(problems, clean batches, image indices of each batch)``, batches in order of first appearance.
    """
    problems, batches, index = [], [], []
    for idx in same_size_groups(images, "deblurring_problems"):
        parts = [make_problem("blur", images[i], sigma=sigma, kernel=kernel, seed=int(seed) + i) for i in idx]
        y = torch.cat([p.y for p in parts])
        problems.append(Problem("blur", None, parts[0].sigma, parts[0].op, y))
        batches.append(torch.cat([images[i] for i in idx]))
        index.append(list(idx))
    return problems, batches, index


def blur_eigenvalues(kernel: Tensor, h: int, w: int) -> Tensor:
    """The eigenvalues of ``A^T A`` for the circular blur with ``kernel`` on ``h x w`` images: ``|K(omega)|^2`` over the
    ``h w`` frequencies (``K`` the DFT of the zero-padded kernel; the centring shift does not change its modulus)."""
    kh, kw = kernel.shape
    if kh > h or kw > w:
        raise ValueError(f"kernel {tuple(kernel.shape)} is larger than the images {(h, w)}")
    padded = torch.nn.functional.pad(kernel.double(), (0, w - kw, 0, h - kh))
    return torch.fft.fft2(padded).abs().pow(2).flatten()


def proposition2_factor(lambda_min: float, sigma: float, gamma: float) -> float:
    """``sigma^2 / (gamma^2 lambda_min + sigma^2)`` of Proposition 2 (eq. 20), ``sigma`` on the 0-255 scale and
    ``gamma`` (the decoder std) on the [0, 1] scale: ``T`` is (this factor) x ``L_tau``-Lipschitz."""
    s2 = (check_nonnegative(sigma, "sigma") / 255) ** 2
    return s2 / (check_positive(gamma, "gamma") ** 2 * check_nonnegative(lambda_min, "lambda_min") + s2)


def convergence_runs(
    y: Tensor,
    op: Any,
    prior: HVAE | HVAEAtSize,
    *,
    sigma: float,
    tau: float,
    n_iters: int,
    lrs: Sequence[float] = (0.01, 0.001),
    gamma: float | None = None,
) -> dict[str, Restoration]:
    """Fig. 2: Algorithm 2 (``"pnp_hvae"``) and the Adam baseline on the same ``J1`` (eq. 15) for each learning rate
    (``"adam_lr0.01"``, ...), every one from the same ``x_0 = y`` (the official initialisation) and for exactly
    ``n_iters`` iterations (the stopping rules are switched off: ``patience = n_iters``, ``atol = 0``), recording
    ``J1(x_k, z_k)`` and ``L_k`` (``record_lipschitz``)."""
    n_iters = _positive_int(n_iters, "n_iters")
    common = dict(sigma=sigma, tau=tau, max_iters=n_iters, patience=n_iters, atol=0.0, gamma=gamma,
                  record_lipschitz=True)  # fmt: skip
    runs = {"pnp_hvae": pnp_hvae(y, op, prior, **common)}
    for lr in lrs:
        runs[f"adam_lr{check_positive(lr, 'lr'):g}"] = adam_j1(y, op, prior, lr=float(lr), **common)
    return runs


def iterations_to_tol(objective: Tensor, tol: float = 1e-3) -> int | None:
    """The first iteration ``k`` (1-based) from which ``J1`` has settled: every later step changes it by at most
    ``tol`` relative, ``|J1_j - J1_{j-1}| <= tol |J1_j|`` for all ``j > k``; ``None`` when the last step still
    changes it by more (not settled within the run). ``objective``: the values ``J1_1, ..., J1_n`` of one run."""
    j = objective.detach().double().flatten()
    j = j[torch.isfinite(j)]
    if j.numel() == 0:
        return None
    if j.numel() == 1:
        return 1
    ok = (j[1:] - j[:-1]).abs() <= tol * j[1:].abs()
    if not bool(ok[-1]):
        return None
    bad = (~ok).nonzero()
    return 1 if bad.numel() == 0 else int(bad[-1]) + 2


#: ``L_k`` is left out where the step ``||x_{k+1} - x_k|| / sqrt(d)`` is below this (the solvers' ``atol``): the
#: iterates have settled to float32 rounding there, and the ratio of two rounding errors says nothing about ``T``
RESOLVED_STEP = 1e-6


def resolved_lipschitz(run: Restoration, column: int = 0, *, min_step: float = RESOLVED_STEP) -> Tensor:
    """``L_k`` of image ``column`` of a run recorded with ``record_lipschitz``, NaN where the step it divides,
    ``||x_{k+1} - x_k|| = L_k ||x_k - x_{k-1}||``, or the step it is divided by is below ``min_step sqrt(d)``
    (rounding)."""
    lk = run.history["lipschitz"][:, column].double()
    res = run.history["residual"][:, column].double()
    d = run.x[0].numel()
    floor = min_step * math.sqrt(d)
    ok = torch.isfinite(lk) & (res >= floor) & (lk * res >= floor)
    return torch.where(ok, lk, torch.full_like(lk, math.nan))


def _late(values: Tensor, late_fraction: float) -> Tensor:
    """The last ``late_fraction`` of the finite entries of ``values`` (in iteration order)."""
    finite = values[torch.isfinite(values)]
    return finite[int(math.floor((1 - late_fraction) * finite.numel())) :]


def _method_lr(name: str, run: Restoration) -> tuple[str, float | None]:
    if run.info.get("method") == "adam_j1":
        return "adam", float(run.info["lr"])
    return str(run.info.get("method", name)), None


def convergence_rows(
    runs: dict[str, Restoration], x_true: Tensor, *, tol: float = 1e-3, late_fraction: float = 0.5
) -> list[dict[str, Any]]:
    """One row per run of :func:`convergence_runs` (image 0 of the batch) with exactly :data:`CONVERGENCE_KEYS`:
    ``method`` ("pnp_hvae" or "adam"), ``lr`` (None for PnP-HVAE), ``iterations_to_tol`` (:func:`iterations_to_tol`
    of ``J1``), ``j1_final`` ``J1(x_n, z_n)``, ``psnr_final`` the PSNR of ``x_n`` clamped to [0, 1], and
    ``lk_max_late`` the largest ``L_k`` over the last ``late_fraction`` of the resolved iterations
    (:func:`resolved_lipschitz`: those where the iterates have not yet settled to rounding)."""
    rows = []
    for name, run in runs.items():
        method, lr = _method_lr(name, run)
        j1 = run.history["objective"][:, 0]
        late = _late(resolved_lipschitz(run), late_fraction)
        rows.append(
            {
                "method": method,
                "lr": lr,
                "iterations_to_tol": iterations_to_tol(j1, tol),
                "j1_final": float(j1[torch.isfinite(j1)][-1]),
                "psnr_final": float(psnr(run.x[:1].clamp(0, 1), x_true[:1])[0]),
                "lk_max_late": float(late.max()) if late.numel() else math.nan,
            }
        )
    return rows


def convergence_claims(
    rows: Sequence[dict[str, Any]], runs: dict[str, Restoration], *, late_fraction: float = 0.5
) -> dict[str, Any]:
    """The paper's reading of Fig. 2, computed on the rows of :func:`convergence_rows`:

    * ``pnp_fewer_iterations``: PnP-HVAE's ``J1`` settles in fewer iterations than every Adam run (a run that never
      settles counts as infinitely many);
    * ``adam_lower_j1`` (``adam_lower_j1_any``): every (some) Adam run ends at a lower ``J1`` than PnP-HVAE;
    * ``adam_worse_image``: every Adam run's ``x_n`` has a lower PSNR than PnP-HVAE's;
    * ``pnp_stable``: PnP-HVAE's late ``L_k`` stays below 1 (its iterates contract);
    * ``adam_lk_oscillates``: each Adam run's late ``L_k`` goes back and forth more than PnP-HVAE's:
      ``lk_oscillation_late`` is, per run, the total variation of the late resolved ``L_k`` in excess of its net
      change, per iteration, ``(sum_k |L_{k+1} - L_k| - |L_last - L_first|) / (n - 1)``: zero for a monotone sequence
      (a ratio that settles, or drifts, does not oscillate), positive when it reverses; and
      ``adam_oscillation_grows_with_lr``: it is larger for the larger learning rate (the paper: "even increased with
      larger learning rates"). ``lk_std_late`` gives the standard deviation of the late ``L_k`` too.
    """
    pnp = next(r for r in rows if r["method"] == "pnp_hvae")
    adam = [r for r in rows if r["method"] == "adam"]

    def its(r):
        return math.inf if r["iterations_to_tol"] is None else r["iterations_to_tol"]

    std_late, variation, lrs = {}, {}, {}
    for name, run in runs.items():
        late = _late(resolved_lipschitz(run), late_fraction).double()
        std_late[name] = float(late.std()) if late.numel() > 1 else math.nan
        excess = (late[1:] - late[:-1]).abs().sum() - (late[-1] - late[0]).abs() if late.numel() > 1 else math.nan
        variation[name] = float(excess) / (late.numel() - 1) if late.numel() > 1 else math.nan
        lrs[name] = _method_lr(name, run)[1]
    adam_var = sorted((lrs[k], v) for k, v in variation.items() if lrs[k] is not None)
    return {
        "pnp_fewer_iterations": all(its(pnp) < its(r) for r in adam),
        "adam_lower_j1": all(r["j1_final"] < pnp["j1_final"] for r in adam),
        "adam_lower_j1_any": any(r["j1_final"] < pnp["j1_final"] for r in adam),
        "adam_worse_image": all(r["psnr_final"] < pnp["psnr_final"] for r in adam),
        "pnp_stable": bool(pnp["lk_max_late"] < 1),
        "adam_lk_oscillates": bool(adam_var) and all(v > variation["pnp_hvae"] for _, v in adam_var),
        "adam_oscillation_grows_with_lr": len(adam_var) > 1
        and all(b[1] > a[1] for a, b in zip(adam_var, adam_var[1:], strict=False)),
        "lk_oscillation_late": variation,
        "lk_std_late": std_late,
        "psnr_gain_over_best_adam": pnp["psnr_final"] - max(r["psnr_final"] for r in adam),
    }


def _label(name: str, run: Restoration) -> str:
    method, lr = _method_lr(name, run)
    return "PnP-HVAE (Alg. 2)" if lr is None else f"Adam, lr = {lr:g}"


def plot_convergence(runs: dict[str, Restoration]):
    """Fig. 2: (a) ``J1(x_k, z_k)`` (eq. 15) against the iteration ``k``; (b) ``L_k`` against ``k`` (solid where the
    steps are resolved, :func:`resolved_lipschitz`; thin dotted where the iterates have settled to rounding; black
    dotted: 1)."""
    import matplotlib.pyplot as plt

    from ..plotting import setup_style

    setup_style()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    positive = all(bool((r.history["objective"][:, 0].nan_to_num(1.0) > 0).all()) for r in runs.values())
    for i, (name, run) in enumerate(runs.items()):
        j1 = run.history["objective"][:, 0].numpy()
        k = range(1, len(j1) + 1)
        a.plot(k, j1, color=f"C{i}", label=_label(name, run))
        b.plot(k, resolved_lipschitz(run).numpy(), color=f"C{i}", label=_label(name, run))
        b.plot(k, run.history["lipschitz"][:, 0].numpy(), color=f"C{i}", lw=0.8, ls=":", alpha=0.6)
    if positive:
        a.set_yscale("log")
    a.set_xlabel("iteration $k$")
    a.set_ylabel("$J_1(x_k, z_k)$ (eq. 15)")
    a.set_title("(a) objective")
    a.legend(fontsize=8)
    b.axhline(1.0, color="k", ls=":", lw=1)
    b.set_xlabel("iteration $k$")
    b.set_ylabel("$L_k$")
    b.set_title("(b) $L_k = \\|T(x_{k+1}) - T(x_k)\\| / \\|x_{k+1} - x_k\\|$")
    fig.tight_layout()
    return fig


def plot_restorations(x_true: Tensor, y: Tensor, images: dict[str, Tensor], *, title: str | None = None):
    """One image per panel: the ground truth, the observation and each restoration ``images[label]`` (its PSNR and
    SSIM against ``x_true`` above it; every image clamped to [0, 1])."""
    import matplotlib.pyplot as plt

    from ..plotting import setup_style

    setup_style()
    panels = {"ground truth $x^*$": x_true, "observation $y$": y, **images}
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.6), squeeze=False)
    for ax, (label, img) in zip(axes[0], panels.items(), strict=True):
        im = img[:1].detach().cpu().clamp(0, 1)
        ax.imshow(im[0].permute(1, 2, 0).numpy())
        extra = "" if label.startswith("ground") else (
            f"\n{float(psnr(im, x_true[:1].cpu())[0]):.2f} dB, SSIM {float(ssim(im, x_true[:1].cpu())[0]):.3f}"
        )  # fmt: skip
        ax.set_title(label + extra, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------
# Figure 7: the effect of the temperature
# ------------------------------------------------------------------------------------------------
def temperature_sweep(
    problems: Sequence[Any],
    x_true: Sequence[Tensor],
    prior: HVAE | HVAEAtSize,
    *,
    taus: Sequence[float],
    max_iters: int = 50,
    gamma: float | None = None,
) -> tuple[list[dict[str, Any]], dict[float, list[Tensor]], dict[float, list[int]]]:
    """Fig. 7: Algorithm 2 (its default stopping rule, at most ``max_iters`` iterations) at every temperature ``tau``
    on every problem (``problems[i]`` a :class:`~jpmap_core.operators.Problem` of the clean batch ``x_true[i]``: one
    batched call per problem and temperature, so images of different sizes go in different problems).

    Returns one row per ``tau`` with exactly :data:`TEMPERATURE_KEYS` (mean PSNR and SSIM of the restored ``x_n``,
    clamped to [0, 1], over every image), the restored images ``{tau: [x_n of problem i]}`` and the iterations each
    image ran ``{tau: [n of every image, problem by problem]}``.
    """
    if not taus:
        raise ValueError("taus must list at least one temperature")
    if len(problems) != len(x_true):
        raise ValueError(f"{len(problems)} problems but {len(x_true)} clean batches")
    rows, images, iterations = [], {}, {}
    for t in taus:
        outs, p_all, s_all, its = [], [], [], []
        for pb, x in zip(problems, x_true, strict=True):
            res = pnp_hvae(pb.y, pb.op, prior, sigma=pb.sigma, tau=float(t), max_iters=max_iters, gamma=gamma)
            xr = res.x.clamp(0, 1)
            outs.append(xr)
            its += [int(n) for n in res.iterations]
            p_all.append(psnr(xr, x))
            s_all.append(ssim(xr, x))
        images[float(t)], iterations[float(t)] = outs, its
        rows.append(
            {"tau": float(t), "psnr_mean": float(torch.cat(p_all).mean()), "ssim_mean": float(torch.cat(s_all).mean())}
        )
    return rows, images, iterations


def temperature_claims(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Fig. 7's reading: ``best_tau`` (highest mean PSNR; ``best_tau_ssim`` by SSIM) and ``intermediate_best``
    (``best_tau`` is neither the lowest nor the highest temperature tried), ``psnr_range`` (best minus worst)."""
    taus = [r["tau"] for r in rows]
    best = max(rows, key=lambda r: r["psnr_mean"])
    best_ssim = max(rows, key=lambda r: r["ssim_mean"])
    return {
        "best_tau": best["tau"],
        "best_psnr": best["psnr_mean"],
        "best_tau_ssim": best_ssim["tau"],
        "intermediate_best": min(taus) < best["tau"] < max(taus),
        "psnr_range": best["psnr_mean"] - min(r["psnr_mean"] for r in rows),
    }


def plot_temperature(rows: Sequence[dict[str, Any]], images: dict[float, list[Tensor]], x_true: Tensor, y: Tensor):
    """Fig. 7: (a) mean PSNR and SSIM against ``tau``; (b) the first image restored at every ``tau`` beside the
    ground truth and the observation."""
    import matplotlib.pyplot as plt

    from ..plotting import setup_style

    setup_style()
    taus = list(images)
    fig = plt.figure(figsize=(max(9.0, 1.6 * (len(taus) + 2)), 5.4))
    grid = fig.add_gridspec(2, len(taus) + 2, height_ratios=[1.2, 1.0])
    ax = fig.add_subplot(grid[0, :])
    ts = [r["tau"] for r in rows]
    ax.plot(ts, [r["psnr_mean"] for r in rows], "o-", label="PSNR")
    ax.set_xlabel("temperature $\\tau$")
    ax.set_ylabel("PSNR (dB)")
    ax2 = ax.twinx()
    ax2.plot(ts, [r["ssim_mean"] for r in rows], "s--", color="C1", label="SSIM")
    ax2.set_ylabel("SSIM")
    ax2.grid(False)
    ax.set_title("(a) restoration quality against the temperature (mean over the images)")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, ["PSNR", "SSIM"], fontsize=8, loc="lower center")
    panels = [("$x^*$", x_true[:1]), ("$y$", y[:1])] + [(f"$\\tau = {t:g}$", images[t][0][:1]) for t in taus]
    for j, (label, img) in enumerate(panels):
        a = fig.add_subplot(grid[1, j])
        im = img.detach().cpu().clamp(0, 1)
        a.imshow(im[0].permute(1, 2, 0).numpy())
        if j >= 2:
            label += f"\n{float(psnr(im, x_true[:1].cpu())[0]):.2f} dB"
        a.set_title(label, fontsize=8)
        a.set_xticks([])
        a.set_yticks([])
        a.grid(False)
    fig.text(0.01, 0.42, "(b)", fontsize=11)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------
# Verdicts in words (the notebooks print them; computed from the claims, never written in advance)
# ------------------------------------------------------------------------------------------------
def _verdict(ok: bool) -> str:
    return "**holds**" if ok else "**does not hold**"


def describe_lipschitz(claims: dict[str, Any]) -> str:
    """Markdown: the paper's three readings of Fig. 1 and the Jacobian extension, each with its computed verdict."""
    lines = []
    if "noisy_all_below_1" in claims:
        lines.append(
            f"* *For noisy images every ratio is below 1* (Fig. 1 caption): {_verdict(claims['noisy_all_below_1'])}; "
            f"the largest ratio over every noisy pair and temperature is {claims['noisy_ratio_max']:.3f}."
        )
        per = "; ".join(
            f"sigma = {s}: medians {', '.join(f'{m:.3f}' for m in v['medians_by_tau'])} "
            f"({100 * v['paired_increasing_fraction']:.0f}% of the pairs increase with tau)"
            for s, v in claims["per_sigma"].items()
        )
        lines.append(
            f"* *Reducing the temperature increases the strength of the contraction* (§5.3): "
            f"{_verdict(claims['lower_tau_contracts_more'])} (median ratio by increasing tau, {per})."
        )
    if "clean_near_1" in claims:
        meds = ", ".join(f"{m:.3f}" for m in claims["clean_medians_by_tau"])
        lines.append(
            f"* *On clean images the ratios are close to 1* (within {claims['near_one']:g} of 1 for every tau): "
            f"{_verdict(claims['clean_near_1'])} (medians {meds} by tau)."
        )
        lines.append(
            f"* *In some rare case, a ratio r >= 1 is observed for clean images*: "
            f"{100 * claims['clean_frac_at_or_above_1']:.1f}% of the clean ratios are >= 1 (largest "
            f"{claims['clean_ratio_max']:.3f}); "
            + ("so the reconstruction is not a contraction everywhere on clean images, as the paper saw; "
               if claims["clean_any_above_1"] else "none: on these pairs the reconstruction contracts clean images; ")
            + f"*rare* (at most {100 * claims['rare']:g}% of them): {_verdict(claims['clean_above_1_rare'])}."
        )  # fmt: skip
    if "noisy_jacobian_max" in claims:
        lines.append(
            f"* *Beyond the paper: local Lipschitz constants* $\\|J(u)\\|_2$ at the noisy points: the largest is "
            f"{claims['noisy_jacobian_max']:.3f}; *all below 1*: {_verdict(claims['noisy_jacobian_below_1'])}. It "
            f"exceeds the secant ratio of the same pair at {100 * claims['jacobian_above_ratio_fraction']:.0f}% of "
            "the points, so it is the tighter lower bound of $L_\\tau$ there."
        )
    return "\n".join(lines)


def describe_convergence(claims: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: the paper's readings of Fig. 2, each with its computed verdict."""
    pnp = next(r for r in rows if r["method"] == "pnp_hvae")
    adam = [r for r in rows if r["method"] == "adam"]

    def its(r):
        return "not within the run" if r["iterations_to_tol"] is None else f"{r['iterations_to_tol']} iterations"

    adam_its = "; ".join(f"Adam lr {r['lr']:g}: {its(r)}" for r in adam)
    adam_j1 = "; ".join(f"lr {r['lr']:g}: {r['j1_final']:.6g}" for r in adam)
    adam_psnr = "; ".join(f"lr {r['lr']:g}: {r['psnr_final']:.2f} dB" for r in adam)
    var = ", ".join(f"{k}: {v:.3g}" for k, v in claims["lk_oscillation_late"].items())
    if claims["adam_lower_j1"]:
        lower_j1 = "**holds** for every learning rate"
    elif claims["adam_lower_j1_any"]:
        lower_j1 = "**holds** for some learning rates only"
    else:
        lower_j1 = "**does not hold** for any learning rate"
    return "\n".join([
        f"* *PnP-HVAE requires a smaller number of iterations to converge*: {_verdict(claims['pnp_fewer_iterations'])} "
        f"(J1 settles to a relative change of at most 1e-3 per iteration after: PnP-HVAE {its(pnp)}; {adam_its}).",
        f"* *Adam is able to estimate a better minimum of J1*: {lower_j1} "
        f"(final J1: PnP-HVAE {pnp['j1_final']:.6g}; {adam_j1}).",
        f"* *... but a worse image* (§5.3, Table 1): {_verdict(claims['adam_worse_image'])} (PSNR of x_n: PnP-HVAE "
        f"{pnp['psnr_final']:.2f} dB; {adam_psnr}).",
        f"* *PnP-HVAE's iterates are stable*: late L_k below 1: {_verdict(claims['pnp_stable'])} (largest late L_k "
        f"{pnp['lk_max_late']:.3f}); *Adam's L_k oscillates*: {_verdict(claims['adam_lk_oscillates'])}, *more with "
        f"larger learning rates*: {_verdict(claims['adam_oscillation_grows_with_lr'])} (back-and-forth of the late "
        f"L_k, its total variation beyond its net change, per iteration: {var}).",
    ])  # fmt: skip


def describe_temperature(claims: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: Fig. 7's reading (an intermediate temperature is best; the paper's best is 0.7) and its verdict."""
    table = ", ".join(f"tau {r['tau']:g}: {r['psnr_mean']:.2f} dB" for r in rows)
    return (
        f"* *An intermediate temperature gives the best restoration* (the paper: tau = 0.7): "
        f"{_verdict(claims['intermediate_best'])}; the best mean PSNR is at tau = {claims['best_tau']:g} "
        f"({claims['best_psnr']:.2f} dB; by SSIM tau = {claims['best_tau_ssim']:g}), and the PSNR spans "
        f"{claims['psnr_range']:.2f} dB over the sweep ({table})."
    )


def convergence_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the rows of :func:`convergence_rows`."""
    lines = [
        "| method | lr | iterations until $J_1$ settles | final $J_1$ | PSNR of $x_n$ (dB) | largest late $L_k$ |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        its = "not within the run" if r["iterations_to_tol"] is None else r["iterations_to_tol"]
        lr = "-" if r["lr"] is None else f"{r['lr']:g}"
        lines.append(
            f"| {r['method']} | {lr} | {its} | {r['j1_final']:.6g} | {r['psnr_final']:.2f} | {r['lk_max_late']:.3f} |"
        )
    return "\n".join(lines)
