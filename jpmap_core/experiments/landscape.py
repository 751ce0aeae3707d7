"""The z-landscape of ``J1(x, .)`` for a fixed image ``x`` (JPMAP §2.2, §3.3; Figures 3 and 4).

For a fixed ``x`` (no degradation, so the data term of ``J1`` is a constant) the z-problem of line 13 of
Algorithm 2.3 is ``min_z H_theta(x, z) + 1/2 ||z||^2`` with ``H_theta = -log p_theta(x|z)`` (eq. 2.6); the
encoder proposes ``mu_phi(x) = argmin_z K_phi(x, z)``, ``K_phi = -log q_phi(z|x)`` (eqs. 2.9-2.11).

* :func:`posterior_slice` -- ``H + 1/2||z||^2`` and ``K`` on a random 2D plane of z through ``mu_phi(x)``,
  scaled by ``Sigma_phi^{1/2}`` (Figure 3(a)); :func:`slice_summary` gives its numbers (where ``H`` is lowest,
  how much of the window is locally convex, the total variation gap between the two densities on the plane).
* :func:`exact_vs_encoder_optimum` -- ``argmin_z H + 1/2||z||^2`` by Adam from ``mu_phi(x)`` against
  ``mu_phi(x)`` itself, in latent and image space (Figure 3(b)-(d)).
* :func:`multistart_descent` -- Adam trajectories on ``J1(x0, .)`` from random ``z0 ~ N(0, I)`` and from
  ``mu_phi(x0)``: which starts reach the global minimum of the energy and how fast, and the distance of every
  iterate to the global optimum ``z*`` (:func:`global_optimum`) (Figure 4); :func:`multistart_summary` turns them
  into the numbers the notebook reports.

All functions are batched over images (and, for the multistart, over images x starts in one batch).
Energies follow :mod:`jpmap_core.energy`: ``J1_z = beta/2 ||x - mu_theta(z)||^2 + 1/2 ||z||^2`` with
``beta = 1/gamma^2`` and constants dropped; :func:`posterior_slice` keeps the constants of ``H`` and ``K``
(they are log-densities there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_positive
from ..energy import J1_z, as_beta
from ..models import GaussianVAE
from ..models.vae import LOG_2PI
from ..solvers import adam_minimize


def _check_x(vae: GaussianVAE, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != tuple(vae.image_shape):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a (B, {', '.join(map(str, vae.image_shape))}) image batch, got {shape}")
    return x.detach()


def _positive_int(v: int, name: str) -> int:
    if int(v) != v or int(v) <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def random_plane(
    n: int, latent_dim: int, *, generator: torch.Generator | None = None, dtype=torch.float32, device="cpu"
) -> Tensor:
    """``n`` random 2D subspaces of ``R^latent_dim``: ``(n, 2, latent_dim)``, two orthonormal rows each.

    Drawn as the Q factor of a Gaussian ``(latent_dim, 2)`` matrix (uniform on the Stiefel manifold up to signs).
    """
    if latent_dim < 2:
        raise ValueError(f"a 2D slice needs latent_dim >= 2, got {latent_dim}")
    g = torch.randn(n, latent_dim, 2, generator=generator, dtype=torch.float64).to(device)
    q, _ = torch.linalg.qr(g)
    return q.transpose(1, 2).to(dtype)


def neg_log_q(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """``K_phi(x, z) = -log N(z; mu, diag(exp(logvar)))`` summed over the last dim (constants included)."""
    return 0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


@torch.no_grad()
def posterior_slice(
    vae: GaussianVAE,
    x: Tensor,
    *,
    n_grid: int = 41,
    span: float = 2.0,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """``H(z) = -log p_theta(x|z) + 1/2||z||^2`` and ``K(z) = -log q_phi(z|x)`` on a random 2D slice (Fig. 3(a)).

    For each image ``b`` of ``x`` (``(B, C, H, W)``) two random orthonormal directions ``u1, u2`` of z-space are
    drawn from ``generator`` and the grid is ``z[b, i, j] = mu + Sigma^{1/2} (s[j] u1 + s[i] u2)`` with
    ``s = linspace(-span, span, n_grid)`` (``mu, Sigma`` of ``q_phi(z|x_b)``): ``+-span`` encoder standard
    deviations around ``mu_phi(x)``. Index ``[i, j]`` is (row = second direction, column = first), so
    ``plt.contour(s, s, H[b])`` draws it. All ``B * n_grid^2`` codes go through the decoder in one batch.

    Both energies keep their constants (``H`` is up to ``-log p_X(x)`` the negative log of the true posterior
    ``p_theta(z|x)``, eq. 2.9). Since the directions are orthonormal, ``K - min K = (s_i^2 + s_j^2) / 2``
    exactly: the encoder's contours are circles in these coordinates, and ``H``'s departure from circles is
    the gap between ``p_theta(z|x)`` and ``q_phi(z|x)``.

    Returns ``s (n,)``, ``directions (B, 2, l)``, ``mu``, ``logvar`` ``(B, l)``, ``z (B, n, n, l)``,
    ``H``, ``K`` ``(B, n, n)``.
    """
    x = _check_x(vae, x)
    n = _positive_int(n_grid, "n_grid")
    span = check_positive(span, "span")
    mu, logvar = vae.encode(x)
    bsz, ldim = mu.shape
    dirs = random_plane(bsz, ldim, generator=generator, dtype=mu.dtype, device=mu.device)
    s = torch.linspace(-span, span, n, dtype=mu.dtype, device=mu.device)
    # offsets in "standard deviation" units: (B, n, n, l) = s[j] u1 + s[i] u2
    off = s[None, None, :, None] * dirs[:, None, None, 0, :] + s[None, :, None, None] * dirs[:, None, None, 1, :]
    std = torch.exp(0.5 * logvar)
    z = mu[:, None, None, :] + std[:, None, None, :] * off
    zf = z.reshape(-1, ldim)
    xf = x.repeat_interleave(n * n, dim=0)
    h = vae.neg_log_likelihood(xf, vae.decode(zf)) + 0.5 * zf.pow(2).sum(1)
    k = neg_log_q(z, mu[:, None, None, :], logvar[:, None, None, :])
    return {"s": s, "directions": dirs, "mu": mu, "logvar": logvar, "z": z, "H": h.view(bsz, n, n), "K": k}


@torch.no_grad()
def slice_through_optimum(
    vae: GaussianVAE,
    x: Tensor,
    z_star: Tensor,
    *,
    n_grid: int = 61,
    margin: float = 2.0,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The energies of :func:`posterior_slice` on the plane through ``mu_phi(x)`` and ``z_star`` (e.g. the exact
    optimum) and one random direction orthogonal to the line joining them: a window that holds both centres.

    Coordinates are encoder standard deviations, as in :func:`posterior_slice`: with ``w = Sigma^{-1/2}(z_star -
    mu)`` and ``d = ||w||``, the first direction is ``u1 = w / d``, the second a random unit vector orthogonal to it
    (from ``generator``), and the grid is ``z[b, i, j] = mu + Sigma^{1/2}(s1[b, j] u1 + s2[b, i] u2)`` with
    ``s1 = linspace(-margin, d + margin)``, ``s2 = linspace(-(d/2 + margin), d/2 + margin)`` (a square window, so
    ``K``'s contours stay circles). ``mu_phi(x)`` sits at ``(0, 0)`` and ``z_star`` at ``(d, 0)``.

    Returns ``s1``, ``s2`` ``(B, n)``, ``distance`` ``d (B,)``, ``directions (B, 2, l)``, ``mu``, ``logvar``,
    ``H``, ``K`` ``(B, n, n)`` and ``H_argmin`` ``(B, 2)``: the grid point where ``H`` is lowest, in ``(s1, s2)``.
    """
    x = _check_x(vae, x)
    n = _positive_int(n_grid, "n_grid")
    margin = check_positive(margin, "margin")
    mu, logvar = vae.encode(x)
    bsz, ldim = mu.shape
    if ldim < 2:
        raise ValueError(f"a 2D slice needs latent_dim >= 2, got {ldim}")
    if not isinstance(z_star, Tensor) or tuple(z_star.shape) != (bsz, ldim):
        shape = tuple(z_star.shape) if isinstance(z_star, Tensor) else type(z_star).__name__
        raise ValueError(f"z_star must have shape ({bsz}, {ldim}) like the encoder means of x, got {shape}")
    std = torch.exp(0.5 * logvar)
    w = (z_star.to(mu) - mu) / std
    d = w.norm(dim=1)
    r = torch.randn(bsz, ldim, generator=generator, dtype=torch.float64).to(mu)
    u1 = torch.where(d[:, None] > 0, w / d.clamp_min(1e-12)[:, None], r / r.norm(dim=1, keepdim=True))
    r2 = torch.randn(bsz, ldim, generator=generator, dtype=torch.float64).to(mu)
    u2 = r2 - (r2 * u1).sum(1, keepdim=True) * u1
    u2 = u2 / u2.norm(dim=1, keepdim=True)
    t = torch.linspace(0, 1, n, dtype=mu.dtype, device=mu.device)
    s1 = -margin + t[None, :] * (d[:, None] + 2 * margin)
    half = d[:, None] / 2 + margin
    s2 = -half + t[None, :] * 2 * half
    off = s1[:, None, :, None] * u1[:, None, None, :] + s2[:, :, None, None] * u2[:, None, None, :]
    z = mu[:, None, None, :] + std[:, None, None, :] * off
    zf = z.reshape(-1, ldim)
    xf = x.repeat_interleave(n * n, dim=0)
    h = (vae.neg_log_likelihood(xf, vae.decode(zf)) + 0.5 * zf.pow(2).sum(1)).view(bsz, n, n)
    k = neg_log_q(z, mu[:, None, None, :], logvar[:, None, None, :])
    flat = h.flatten(1).argmin(1)
    rows = torch.arange(bsz, device=h.device)
    h_argmin = torch.stack([s1[rows, flat % n], s2[rows, flat // n]], dim=1)
    return {
        "s1": s1, "s2": s2, "distance": d, "directions": torch.stack([u1, u2], dim=1), "mu": mu, "logvar": logvar,
        "H": h, "K": k, "H_argmin": h_argmin,
    }  # fmt: skip


@torch.no_grad()
def slice_summary(res: dict[str, Tensor], z: Tensor | None = None) -> dict[str, Tensor]:
    """Numbers that describe a :func:`posterior_slice` result ``res`` (``B`` images, ``n x n`` grid), per image.

    * ``H_argmin (B, 2)``: slice coordinates ``(s_j, s_i)`` (encoder standard deviations, first direction first)
      of the grid point where ``H`` is lowest, and ``H_argmin_offset`` its distance to ``mu_phi(x)`` (the centre);
    * ``convex_fraction``: fraction of the interior grid points where the finite-difference Hessian of ``H`` in
      the slice coordinates is positive definite (``H_ss > 0`` and ``H_ss H_tt - H_st^2 > 0``): how much of the
      ``+-span`` window is locally convex in z (the "partial z-convexity" of Fig. 3(a));
    * ``tv_distance``: total variation distance between the two densities ``exp(-H)`` and ``exp(-K)`` restricted
      to the grid and normalised on it (0: same shape; 1: disjoint), i.e. the gap between ``p_theta(z|x)`` and
      ``q_phi(z|x)`` on this plane, whatever the unknown constant ``-log p_X(x)``;
    * with ``z (B, l)`` (e.g. the exact optimum), ``z_coords (B, 2)``: its orthogonal projection onto the plane,
      in the same coordinates ``u_k . Sigma^{-1/2}(z - mu)``, so it can be marked on the contour plot.
    """
    s = res["s"].double()
    h_grid = res["H"].double()
    k_grid = res["K"].double()
    bsz, n, _ = h_grid.shape
    flat = h_grid.flatten(1).argmin(1)
    coords = torch.stack([s[flat % n], s[flat // n]], dim=1)
    out = {"H_argmin": coords, "H_argmin_offset": coords.norm(dim=1)}
    if n >= 3:
        step = float(s[1] - s[0])
        c = h_grid[:, 1:-1, 1:-1]
        h_ss = (h_grid[:, 1:-1, 2:] - 2 * c + h_grid[:, 1:-1, :-2]) / step**2  # along columns (first direction)
        h_tt = (h_grid[:, 2:, 1:-1] - 2 * c + h_grid[:, :-2, 1:-1]) / step**2  # along rows (second direction)
        h_st = (h_grid[:, 2:, 2:] - h_grid[:, 2:, :-2] - h_grid[:, :-2, 2:] + h_grid[:, :-2, :-2]) / (4 * step**2)
        pd = (h_ss > 0) & (h_ss * h_tt - h_st**2 > 0)
        out["convex_fraction"] = pd.flatten(1).double().mean(1)
    else:
        out["convex_fraction"] = torch.full((bsz,), math.nan, dtype=torch.float64)
    log_p = -h_grid.flatten(1) - torch.logsumexp(-h_grid.flatten(1), dim=1, keepdim=True)
    log_q = -k_grid.flatten(1) - torch.logsumexp(-k_grid.flatten(1), dim=1, keepdim=True)
    out["tv_distance"] = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(1)
    if z is not None:
        w = (z.to(res["mu"]) - res["mu"]) * torch.exp(-0.5 * res["logvar"])
        out["z_coords"] = torch.einsum("bl,bkl->bk", w, res["directions"]).double()
    return out


def exact_vs_encoder_optimum(
    vae: GaussianVAE, x: Tensor, *, lr: float = 0.01, tol: float = 1e-4, max_iters: int = 5000
) -> dict[str, Tensor]:
    """The exact z-optimum against the encoder's, per image (Figure 3(b)-(d)).

    ``z_exact = argmin_z H_theta(x, z) + 1/2 ||z||^2`` (the MAP of the true posterior ``p_theta(z|x)``) by
    batched Adam (:func:`~jpmap_core.solvers.adam_minimize`, lr 0.01 as the paper, stopping when
    ``||grad_z J1||_2 / l < tol``; with ``beta = 1/gamma^2`` of order 100 the default ``1e-4`` leaves ``z_exact``
    within about ``1e-5`` of the minimiser) **started from** ``z_enc = mu_phi(x)`` (eq. 2.11) -- so it is the
    local minimiser that the encoder leads to (Figure 4 checks whether it is the global one). Returns ``z_enc``,
    ``logvar`` (of ``q_phi``), ``z_exact``, their decodings ``x_enc = mu_theta(z_enc)``,
    ``x_exact = mu_theta(z_exact)`` and ``diff = x_exact - x_enc`` (``(B, C, H, W)``), the Hessian
    ``hessian (B, l, l)`` of ``J1(x, .)`` at ``z_exact``, and per image ``(B,)``:

    * the energies ``J_enc``, ``J_exact`` (``J1_z``, constants dropped);
    * ``latent_gap = ||z_exact - z_enc||``; ``latent_gap_std = ||Sigma_phi^{-1/2}(z_exact - z_enc)||`` (in
      encoder standard deviations); ``latent_gap_laplace = ||hessian^{1/2}(z_exact - z_enc)||``, the same gap in
      standard deviations of the Laplace approximation ``N(z_exact, hessian^{-1})`` of the true posterior;
    * ``encoder_std_ratio = (det Sigma_phi / det hessian^{-1})^{1/(2l)}``: the encoder's spread over the true
      posterior's local spread (geometric mean over the axes; 1 = same volume);
    * ``image_gap_rmse`` (RMSE of ``x_exact - x_enc`` in grey levels, 0-255 scale), ``steps`` and
      ``converged`` of Adam.
    """
    x = _check_x(vae, x)
    mu, logvar = vae.encode(x)
    mu, logvar = mu.detach(), logvar.detach()
    beta = as_beta(None, vae, x.shape[0], x)

    def loss(z: Tensor, idx: Tensor) -> Tensor:
        return J1_z(x[idx], z, vae, beta[idx])

    res = adam_minimize(loss, mu, lr=lr, tol=tol, max_iters=max_iters)
    with torch.no_grad():
        x_enc = vae.decode(mu)
        x_exact = vae.decode(res.z)
        j_enc = J1_z(x, mu, vae, beta, mu_x=x_enc)
        j_exact = J1_z(x, res.z, vae, beta, mu_x=x_exact)
    diff = x_exact - x_enc
    hess = _hessian_rows(lambda z: J1_z(x, z, vae, beta), res.z)
    d = res.z - mu
    logdet = torch.linalg.slogdet(hess.double())[1].to(mu.dtype)
    return {
        "z_enc": mu,
        "logvar": logvar,
        "z_exact": res.z,
        "x_enc": x_enc,
        "x_exact": x_exact,
        "diff": diff,
        "J_enc": j_enc,
        "J_exact": j_exact,
        "latent_gap": (res.z - mu).norm(dim=1),
        "latent_gap_std": (d * torch.exp(-0.5 * logvar)).norm(dim=1),
        "latent_gap_laplace": torch.einsum("bi,bij,bj->b", d, hess, d).clamp_min(0).sqrt(),
        "encoder_std_ratio": torch.exp((logvar.sum(1) + logdet) / (2 * mu.shape[1])),
        "hessian": hess,
        "image_gap_rmse": 255.0 * diff.flatten(1).pow(2).mean(1).sqrt(),
        "steps": res.steps,
        "converged": res.converged,
    }


def _hessian_rows(f, z: Tensor) -> Tensor:
    """``(B, l, l)`` Hessians of ``f`` (``(B, l) -> (B,)``, rows independent) at ``z``: ``l`` double-backward passes."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(f(z).sum(), z, create_graph=True)
        rows = [torch.autograd.grad(g[:, i].sum(), z, retain_graph=True)[0] for i in range(z.shape[1])]
    return torch.stack(rows, dim=1).detach()


def multistart_descent(
    vae: GaussianVAE,
    x0: Tensor,
    *,
    n_starts: int,
    steps: int,
    lr: float = 0.01,
    generator: torch.Generator | None = None,
    record_every: int = 1,
    energy_tol: float = 1.0,
    stop_tol: float | None = None,
) -> dict[str, Tensor]:
    """Adam on ``J1(x0, .)`` from ``n_starts`` random ``z0 ~ N(0, I)`` and from ``mu_phi(x0)`` (Figure 4).

    With ``x = x0`` fixed and no degradation, ``J1(x0, z) = beta/2 ||x0 - mu_theta(z)||^2 + 1/2 ||z||^2`` up to
    a constant (``beta = 1/gamma^2``). For ``D`` images ``x0`` (``(D, C, H, W)``) all ``D * (n_starts + 1)``
    trajectories run in ONE batch: row ``0`` of each image is the encoder start ``mu_phi(x0)``, rows
    ``1..n_starts`` the random starts (drawn from ``generator``, one ``(D, n_starts, l)`` draw).

    The loop is ``torch.optim.Adam`` (lr ``lr``, default betas) over a ``(D*(S+1), l)`` parameter with the
    per-row energies summed: Adam is elementwise and the rows do not interact, so each row follows exactly the
    Adam trajectory it would follow alone. With ``stop_tol=None`` every row takes ``steps`` steps. With a
    ``stop_tol`` a row stops at the first iterate where ``||grad_z J1||_2 / l < stop_tol`` (the rule of
    :func:`~jpmap_core.solvers.adam_minimize`, here on ``J1`` itself, not on ``J1 / beta`` as in the
    solvers) and keeps that iterate for the remaining iterations (its energy and z are recorded as constant), so
    that finished rows cost nothing.

    Which starts reach the global minimum (:func:`global_optimum`, in the paper's words "195 reach the same
    global minimum, whereas 5 get stuck at a higher energy value", §3.3): ``J* = `` the lowest final energy over
    all starts of the image, and a start *reaches* it when its final energy is within ``energy_tol`` nats of
    ``J*``. Its *iterations to converge* are the first iteration from which ``J1(x0, z_k) - J* < energy_tol``
    for good (``inf`` if never). ``z*``, to which Fig. 4(b) measures distances, is the paper's "median over all
    initializations of the final iterates", taken over the random starts that reach ``J*``: with a majority of
    stuck starts the plain median (``z_star_median``) lies in a wrong basin or between basins, and
    ``energy_at_median`` tells whether it is a global minimiser here.

    Returns (``T = steps``, ``R`` recorded iterations, ``S1 = n_starts + 1``):
    ``energy (T+1, D, S1)`` (``J1_z``, constants dropped) at every iteration ``0..T``; ``iters (R,)`` the
    recorded iterations (``0, record_every, ..., T``; ``T`` always included); ``z (R, D, S1, l)``;
    ``distance (R, D, S1)`` to ``z_star (D, l)``; ``j_star (D,)``; ``z_star_median (D, l)``,
    ``energy_at_median (D,)`` and ``median_agrees (D,)`` (bool: ``energy_at_median - J* < energy_tol``); ``z0``,
    ``z_final`` ``(D, S1, l)``; ``energy_final``, ``steps_taken`` ``(D, S1)``; ``reached (D, S1)`` (bool);
    ``iters_to_converge (D, S1)`` (float, ``inf`` if never); ``energy_tol``, ``lr`` (0-dim tensors).
    """
    x0 = _check_x(vae, x0)
    s = _positive_int(n_starts, "n_starts")
    t_max = _positive_int(steps, "steps")
    every = _positive_int(record_every, "record_every")
    check_positive(lr, "lr")
    check_positive(energy_tol, "energy_tol")
    if stop_tol is not None:
        check_positive(stop_tol, "stop_tol")
    n_img = x0.shape[0]
    with torch.no_grad():
        mu, _ = vae.encode(x0)
    ldim = mu.shape[1]
    z_rand = torch.randn(n_img, s, ldim, generator=generator, dtype=mu.dtype).to(mu.device)
    z0 = torch.cat([mu[:, None, :], z_rand], dim=1)  # (D, S1, l)
    s1 = s + 1
    n_rows = n_img * s1
    xr = x0.repeat_interleave(s1, dim=0)  # row r = image r // S1, start r % S1 (as z0.reshape(-1, l))
    beta = as_beta(None, vae, n_rows, x0)

    z = torch.nn.Parameter(z0.reshape(-1, ldim).clone())
    opt = torch.optim.Adam([z], lr=lr)
    active = torch.ones(n_rows, dtype=torch.bool, device=z.device)
    steps_taken = torch.full((n_rows,), t_max, dtype=torch.long)
    rec_iters = sorted(set(range(0, t_max + 1, every)) | {t_max})
    rec_set = set(rec_iters)
    energy = torch.empty(t_max + 1, n_rows, dtype=mu.dtype)
    zs = []
    for k in range(t_max + 1):
        if k in rec_set:
            zs.append(z.detach().clone().cpu())
        if k > 0:
            energy[k] = energy[k - 1]  # stopped rows keep their energy
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        if k == t_max:  # energy of the last iterate; no step
            with torch.no_grad():
                energy[k, idx.cpu()] = J1_z(xr[idx], z[idx], vae, beta[idx]).cpu()
            break
        opt.zero_grad(set_to_none=False)
        with torch.enable_grad():
            e = J1_z(xr[idx], z[idx], vae, beta[idx])
            e.sum().backward()
        energy[k, idx.cpu()] = e.detach().cpu()
        if stop_tol is not None:
            done = z.grad[idx].norm(dim=1) / ldim < stop_tol
            if bool(done.any()):
                active[idx[done]] = False
                steps_taken[idx[done].cpu()] = k
        keep = z.detach().clone()
        opt.step()
        with torch.no_grad():  # rows that stopped (now or before) do not move
            z[~active] = keep[~active]

    z_rec = torch.stack(zs).view(len(rec_iters), n_img, s1, ldim)
    z_final = z_rec[-1]
    energy_final = energy[-1].view(n_img, s1)
    opt = global_optimum(z_final, energy_final, energy_tol)
    z_star, z_star_median, j_star = opt["z_star"], opt["z_star_median"], opt["j_star"]
    with torch.no_grad():
        energy_at_median = J1_z(x0, z_star_median.to(mu.device), vae, beta[:n_img]).cpu()
    distance = (z_rec - z_star[None, :, None, :]).norm(dim=-1)  # (R, D, S1)
    iters = torch.tensor(rec_iters, dtype=torch.long)
    energy = energy.view(t_max + 1, n_img, s1)
    excess = energy - j_star[None, :, None]
    return {
        "energy": energy,
        "iters": iters,
        "z": z_rec,
        "distance": distance,
        "z0": z0.cpu(),
        "z_star": z_star,
        "j_star": j_star,
        "z_star_median": z_star_median,
        "energy_at_median": energy_at_median,
        "median_agrees": energy_at_median - j_star < energy_tol,
        "z_final": z_final,
        "energy_final": energy_final,
        "steps_taken": steps_taken.view(n_img, s1),
        "reached": opt["reached"],
        "iters_to_converge": iterations_to_converge(excess, torch.arange(t_max + 1), energy_tol),
        "energy_tol": torch.tensor(float(energy_tol)),
        "lr": torch.tensor(float(lr)),
    }


def global_optimum(z_final: Tensor, energy_final: Tensor, energy_tol: float) -> dict[str, Tensor]:
    """The global minimum of each image from the final iterates ``(D, S1, l)`` and energies ``(D, S1)``.

    Column 0 is the encoder start, columns ``1..`` the random starts. ``j_star (D,)``: the lowest final energy
    (over all starts, the encoder's included); ``reached (D, S1)``: final energy ``< j_star + energy_tol``;
    ``z_star (D, l)``: the coordinate-wise median of the final iterates of the random starts that reach
    ``j_star`` (the lowest-energy final iterate when none does); ``z_star_median (D, l)``: the median of all
    random final iterates, the paper's definition (§3.3), the same point when most random starts reach ``j_star``.
    """
    j_star, best = energy_final.min(dim=1)
    reached = energy_final < j_star[:, None] + energy_tol
    z_star = z_final[torch.arange(z_final.shape[0]), best].clone()
    for b in range(z_final.shape[0]):
        if bool(reached[b, 1:].any()):
            z_star[b] = torch.quantile(z_final[b, 1:][reached[b, 1:]], 0.5, dim=0)
    z_star_median = torch.quantile(z_final[:, 1:, :], 0.5, dim=1)
    return {"j_star": j_star, "reached": reached, "z_star": z_star, "z_star_median": z_star_median}


def iterations_to_converge(values: Tensor, iters: Tensor, tol: float) -> Tensor:
    """First iteration of ``iters`` from which ``values`` (``(R, ...)``) stays ``< tol``; ``inf`` if never."""
    below = values < tol
    # stays below from index r on <=> all of below[r:] ; suffix-AND via flip + cumprod
    stays = torch.flip(torch.cumprod(torch.flip(below, [0]).to(torch.int8), 0), [0]).bool()
    any_ = stays.any(0)
    first = torch.argmax(stays.to(torch.int8), dim=0)
    out = iters.to(torch.float64)[first]
    return torch.where(any_, out, torch.full_like(out, math.inf))


def _median(v: Tensor) -> float:
    """Median of a float tensor where ``inf`` (never converged) counts as larger than everything."""
    s = torch.sort(v.reshape(-1).to(torch.float64)).values
    n = s.numel()
    lo, hi = s[(n - 1) // 2], s[n // 2]
    if math.isinf(float(lo)) or math.isinf(float(hi)):
        return float(hi) if math.isinf(float(lo)) else math.inf
    return float(0.5 * (lo + hi))


def multistart_summary(res: dict[str, Tensor]) -> dict:
    """The numbers of §3.3 from a :func:`multistart_descent` result (``D`` images, ``S`` random starts).

    * ``n_random_starts`` ``S``; ``n_reached_per_digit`` / ``frac_random_reaching_per_digit``: random starts
      that reach the global minimum (final energy within ``energy_tol`` of the lowest);
      ``frac_random_reaching_optimum``: pooled over images (paper: 195 / 200 = 0.975);
    * ``encoder_reaches_optimum_per_digit`` (bool) and ``encoder_iters_per_digit``: iterations for the encoder
      start's energy to stay within ``energy_tol`` of the global minimum; ``encoder_iters_to_converge``: their
      median over images;
    * ``median_random_iters_per_digit``: median over the random starts of one image; and
      ``median_random_iters_to_converge``: the median pooled over all random starts of all images (starts that
      never converge count as ``inf``, i.e. as slower than all others);
    * ``speedup_encoder_vs_random``: ``median_random_iters_to_converge / encoder_iters_to_converge``;
    * ``stuck_energy_gap_median``: for random starts that do not reach the global minimum, the median of
      ``J1(x0, z_T) - J*`` (how much higher the spurious stationary points are; ``nan`` if none);
    * ``encoder_start_energy_rank``: per image, the fraction of random starts whose initial energy
      ``J1(x0, z0)`` is lower than the encoder's (paper: the stuck starts have ``J1(x0, z0) >> J1(x0, z1)``),
      and its maximum over images ``encoder_start_energy_rank_max``;
    * ``stuck_start_above_encoder_frac``: among the random starts that do not reach ``J*``, the fraction whose
      initial energy is higher than the encoder start's (paper: all 5 of 5; ``nan`` if none is stuck) -- so
      Algorithm 2.3, which keeps the candidate of lowest energy, would never pick them;
    * ``n_reached_total`` (pooled over images) and ``encoder_reaches_count`` (images whose encoder start
      reaches ``J*``);
    * ``median_agrees_count``: images where the paper's definition of ``z*`` (median of all random final iterates)
      is a global minimiser, i.e. has an energy within ``energy_tol`` of ``J*`` (when ``res`` has
      ``median_agrees``).
    """
    reached = res["reached"]
    itc = res["iters_to_converge"]
    e0 = res["energy"][0]
    ef = res["energy_final"]
    n_img, s1 = reached.shape
    rnd = reached[:, 1:]
    best = torch.where(reached, ef, torch.full_like(ef, math.inf)).min(dim=1).values  # energy at z* per image
    gaps = (ef[:, 1:] - best[:, None])[~rnd]
    enc_iters = itc[:, 0]
    out = {
        "n_random_starts": s1 - 1,
        "n_digits": n_img,
        "energy_tol": float(res["energy_tol"]),
        "n_reached_per_digit": rnd.sum(1).tolist(),
        "frac_random_reaching_per_digit": rnd.double().mean(1).tolist(),
        "frac_random_reaching_optimum": float(rnd.double().mean()),
        "encoder_reaches_optimum_per_digit": reached[:, 0].tolist(),
        "encoder_iters_per_digit": enc_iters.tolist(),
        "encoder_iters_to_converge": _median(enc_iters),
        "median_random_iters_per_digit": [_median(itc[i, 1:]) for i in range(n_img)],
        "median_random_iters_to_converge": _median(itc[:, 1:]),
        "stuck_energy_gap_median": _median(gaps) if gaps.numel() else math.nan,
        "encoder_start_energy_rank": (e0[:, 1:] < e0[:, :1]).double().mean(1).tolist(),
        "n_reached_total": int(rnd.sum()),
        "encoder_reaches_count": int(reached[:, 0].sum()),
    }
    out["encoder_start_energy_rank_max"] = max(out["encoder_start_energy_rank"])
    if "median_agrees" in res:
        out["median_agrees_count"] = int(res["median_agrees"].sum())
    stuck_above = (e0[:, 1:] > e0[:, :1])[~rnd]
    out["stuck_start_above_encoder_frac"] = float(stuck_above.double().mean()) if stuck_above.numel() else math.nan
    e = out["encoder_iters_to_converge"]
    out["speedup_encoder_vs_random"] = out["median_random_iters_to_converge"] / e if e > 0 else math.inf
    return out
