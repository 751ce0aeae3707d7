"""The JPMAP energies and their exact partial minimisers, per image (JPMAP §2.2).

Conventions: ``sigma`` is the noise std on the 0-255 scale (``sigma=10`` means ``10/255``), a number or one value per
image (a ``(B,)`` tensor, so that images degraded at several noise levels share one batch); ``beta`` is the
coupling weight (``1/gamma^2`` of the decoder by default, or an explicit value as in ``J_{1,beta}`` of eq. 1.5),
a float or a per-image tensor ``(B,)``. Energies are returned per image, shape ``(B,)``, **with the constants
that do not depend on (x, z) dropped** (``d/2 log(2 pi gamma^2)`` in ``H_theta``, ``l/2 log(2 pi)`` in ``K_phi``,
``-log p_X(x)`` in ``J2``, the noise normalisation in ``F``).

* ``F(x, y) = ||A x - y||^2 / (2 sigma^2)``                                          (eq. 1.1)
* ``J1(x, z) = F(x, y) + beta/2 ||x - mu_theta(z)||^2 + 1/2 ||z||^2``                 (eq. 2.5 with eq. 2.6)
* ``J2(x, z) = F(x, y) + 1/2 sum log Sigma_phi(x) + 1/2 ||Sigma_phi^{-1/2}(x)(z - mu_phi(x))||^2``   (eq. 2.10)
* ``argmin_x J1(x, z) = prox_l2(mu_theta(z), y, 1/(beta sigma^2))``                   (eq. 2.7)
* ``argmin_z J2(x, z) = mu_phi(x)``                                                   (eq. 2.11)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_positive
from .models import GaussianVAE

Sigma = float | Tensor


def check_sigma(sigma: object, batch: int | None = None) -> Sigma:
    """A noise std > 0 on the 0-255 scale: a number, or a ``(B,)`` floating tensor (one per image, all finite
    and > 0; ``batch``, when given, is the required ``B``). Returns the float or the tensor, detached."""
    if isinstance(sigma, Tensor):
        if sigma.dim() == 0:
            return check_positive(float(sigma), "sigma")
        if sigma.dim() != 1 or not torch.is_floating_point(sigma):
            raise ValueError(
                f"sigma must be a number or a floating (B,) tensor of per-image noise stds, got a {sigma.dtype} "
                f"tensor of shape {tuple(sigma.shape)}"
            )
        if batch is not None and sigma.shape[0] != batch:
            raise ValueError(f"sigma has {sigma.shape[0]} values but the batch has B = {batch} images")
        if not bool((torch.isfinite(sigma) & (sigma > 0)).all()):
            raise ValueError(f"sigma must be finite and > 0 for every image, got {sigma.tolist()}")
        return sigma.detach()
    return check_positive(sigma, "sigma")


def noise_std(sigma: Sigma, like: Tensor | None = None) -> Sigma:
    """``sigma`` on the 0-255 scale -> std on the [0, 1] scale; requires ``sigma > 0``.

    A per-image ``(B,)`` tensor gives a ``(B,)`` tensor (on the dtype and device of ``like``, when given, whose
    first dimension must then be ``B``: no silent broadcasting).
    """
    s = check_sigma(sigma, None if like is None else like.shape[0])
    if isinstance(s, Tensor):
        return (s.to(dtype=like.dtype, device=like.device) if like is not None else s) / 255.0
    return s / 255.0


def sigma_rows(sigma: Sigma, idx: Tensor) -> Sigma:
    """The noise stds of images ``idx`` (a number is shared by every image)."""
    return sigma[idx.to(sigma.device)] if isinstance(sigma, Tensor) else sigma


def sigma_info(sigma: Sigma) -> float | Tensor:
    """``sigma`` as solvers report it in ``info``: a float, or a CPU copy of the per-image tensor."""
    return sigma.detach().cpu().clone() if isinstance(sigma, Tensor) else float(sigma)


def as_beta(beta: float | Tensor | None, vae: GaussianVAE, batch: int, like: Tensor) -> Tensor:
    """Per-image ``beta`` as a ``(B,)`` tensor (``None``: ``1/gamma^2`` of the decoder)."""
    if beta is None:
        return torch.full((batch,), vae.beta, dtype=like.dtype, device=like.device)
    if isinstance(beta, Tensor):
        b = beta.to(dtype=like.dtype, device=like.device).reshape(-1)
        if b.numel() == 1:
            b = b.expand(batch)
        if b.shape != (batch,):
            raise ValueError(f"beta must be a float or a (B,) = ({batch},) tensor, got shape {tuple(beta.shape)}")
    else:
        b = torch.full((batch,), check_positive(beta, "beta"), dtype=like.dtype, device=like.device)
    if not bool(torch.isfinite(b).all()) or bool((b <= 0).any()):
        raise ValueError("beta must be finite and > 0 for every image")
    return b


def data_fidelity(x: Tensor, y: Tensor, op, sigma: Sigma) -> Tensor:
    """``F(x, y) = ||A x - y||^2 / (2 sigma^2)`` per image (``sigma``: a number or one per image)."""
    s = noise_std(sigma, x)
    return (op.A(x) - y).flatten(1).pow(2).sum(1) / (2 * s * s)


def coupling(x: Tensor, mu_x: Tensor) -> Tensor:
    """``||x - mu_theta(z)||^2`` per image (the quantity constrained by Alg. 2.4)."""
    return (x - mu_x).flatten(1).pow(2).sum(1)


def J1(
    x: Tensor,
    z: Tensor,
    y: Tensor,
    op,
    vae: GaussianVAE,
    sigma: Sigma,
    beta: float | Tensor | None = None,
    *,
    mu_x: Tensor | None = None,
) -> Tensor:
    """``J1(x, z)`` per image (eq. 2.5, constants dropped). Pass ``mu_x = mu_theta(z)`` to skip the decoder."""
    b = as_beta(beta, vae, x.shape[0], x)
    if mu_x is None:
        mu_x = vae.decode(z)
    return data_fidelity(x, y, op, sigma) + 0.5 * b * coupling(x, mu_x) + vae.neg_log_prior(z)


def J1_z(x: Tensor, z: Tensor, vae: GaussianVAE, beta: Tensor, mu_x: Tensor | None = None) -> Tensor:
    """The z-dependent part of ``J1``: ``beta/2 ||x - mu_theta(z)||^2 + 1/2 ||z||^2`` per image."""
    if mu_x is None:
        mu_x = vae.decode(z)
    return 0.5 * beta * coupling(x, mu_x) + vae.neg_log_prior(z)


def J2(x: Tensor, z: Tensor, y: Tensor, op, vae: GaussianVAE, sigma: Sigma) -> Tensor:
    """``J2(x, z)`` per image (eq. 2.10) up to ``-log p_X(x)`` and constants.

    ``K_phi(x, z) = -log q_phi(z|x) = 1/2 [l log 2pi + log det Sigma_phi(x) + ||Sigma_phi^{-1/2}(z - mu_phi)||^2]``
    with ``Sigma_phi = diag(exp(logvar))``.
    """
    mu, logvar = vae.encode(x, allow_out_of_range=True)
    k_phi = 0.5 * (logvar.sum(1) + ((z - mu).pow(2) * torch.exp(-logvar)).sum(1))
    return data_fidelity(x, y, op, sigma) + k_phi


def x_step(mu_x: Tensor, y: Tensor, op, sigma: Sigma, beta: Tensor) -> Tensor:
    """``argmin_x J1(x, z)`` in closed form (eq. 2.7): ``prox_l2(mu_theta(z), y, gamma = 1/(beta sigma^2))``."""
    s = noise_std(sigma, beta)
    return op.prox_l2(mu_x, y, 1.0 / (beta * s * s))


@torch.no_grad()
def z_step_J2(x: Tensor, vae: GaussianVAE) -> Tensor:
    """``argmin_z J2(x, z) = mu_phi(x)`` (eq. 2.11): one encoder pass."""
    return vae.encode(x, allow_out_of_range=True)[0]
