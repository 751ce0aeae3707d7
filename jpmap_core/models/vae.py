"""Gaussian VAE base class (JPMAP §2, eqs. 2.3, 2.6, 2.9).

* Encoder ``q_phi(z|x) = N(mu_phi(x), Sigma_phi(x))`` with diagonal ``Sigma_phi = diag(exp(logvar))``.
  :meth:`GaussianVAE.encode` returns ``(mu, logvar)``: the **log-variance**, not the log standard
  deviation that the official JPMAP code returns (``logvar = 2 * logsd``).
* Decoder ``p_theta(x|z) = N(mu_theta(z), gamma^2 I)`` with a learned scalar ``gamma`` stored as its log;
  ``mu_theta`` ends in a sigmoid so it lies in [0, 1]. ``beta = 1 / gamma^2`` is the coupling weight of
  ``J1`` (eq. 2.5 with eq. 2.6).
* Prior ``p_Z = N(0, I)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_images, check_tensor4d

LOG_2PI = math.log(2 * math.pi)


class GaussianVAE(nn.Module, ABC):
    """Base class: subclasses define ``_encode(x) -> (mu, logvar)`` and ``_decode(z) -> mu_x``."""

    #: registry name of the architecture (used by manifests to rebuild the model)
    arch: str = ""

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, gamma_init: float = 1.0):
        super().__init__()
        if len(image_shape) != 3 or any(int(s) <= 0 for s in image_shape):
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape!r}")
        if int(latent_dim) <= 0:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.latent_dim = int(latent_dim)
        self.log_gamma = nn.Parameter(torch.tensor(math.log(gamma_init)))

    # ---- to implement -------------------------------------------------------------------------
    @abstractmethod
    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

    @abstractmethod
    def _decode(self, z: Tensor) -> Tensor: ...

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable (stored in manifests)."""

    # ---- properties -----------------------------------------------------------------------------
    @property
    def d(self) -> int:
        """Image dimension ``d = C * H * W``."""
        c, h, w = self.image_shape
        return c * h * w

    @property
    def latent_shape(self) -> tuple[int]:
        """``(l,)``: one flat latent vector per image (the :class:`~jpmap_core.models.Prior` interface)."""
        return (self.latent_dim,)

    @property
    def gamma(self) -> Tensor:
        """Decoder standard deviation ``gamma`` (scalar tensor)."""
        return self.log_gamma.exp()

    @property
    def beta(self) -> float:
        """``beta = 1 / gamma^2`` (the JPMAP coupling weight, eq. 2.6 with ``Sigma_theta = gamma^2 I``)."""
        return float(torch.exp(-2 * self.log_gamma.detach()))

    # ---- public, checked API ------------------------------------------------------------------
    def encode(self, x: Tensor, *, allow_out_of_range: bool = False) -> tuple[Tensor, Tensor]:
        """``(mu_phi(x), logvar_phi(x))``, each ``(B, latent_dim)``.

        ``x`` must be ``(B, C, H, W)`` in [0, 1]. Solvers and DVAE training feed noisy images that leave
        [0, 1] (that is what the denoising criterion trains the encoder for, §3.2); they pass
        ``allow_out_of_range=True``.
        """
        check_images(x, "x", shape=self.image_shape, check_range=not allow_out_of_range)
        return self._encode(x)

    def decode(self, z: Tensor, *, check: bool = True) -> Tensor:
        """Decoder mean ``mu_theta(z)``, shape ``(B, C, H, W)``, values in [0, 1].

        ``check=False`` skips the shape and finiteness checks (solvers' inner loops, on latents they made).
        """
        if not check:
            return self._decode(z)
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != self.latent_dim:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"z must have shape (B, {self.latent_dim}), got {shape}")
        if not bool(torch.isfinite(z).all()):
            raise ValueError("z contains NaN or infinite values")
        return self._decode(z)

    #: rows x tangents per forward-mode pass of :meth:`decode_jacobian` (bounds its memory on large decoders)
    jacobian_chunk: int = 1024

    def decode_jacobian(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu_theta(z), J)``, ``J[b, k] = d mu_theta(z_b) / d z_k``: shapes ``(B, C, H, W)`` and ``(B, l, C, H, W)``.

        Forward mode: one ``torch.func.jvp`` of the decoder under ``vmap`` over the ``l`` basis tangents, i.e. about
        ``l`` decoder passes of work in one batched call (rows in chunks of ``jacobian_chunk / l``). No autograd
        graph is kept. Subclasses may compute it in closed form (:meth:`MLPVAE.decode_jacobian`).
        """
        from torch.func import jvp, vmap

        ldim = self.latent_dim
        rows = max(1, self.jacobian_chunk // ldim)
        basis = torch.eye(ldim, dtype=z.dtype, device=z.device)
        G, J = [], []
        with torch.no_grad():
            for zc in z.detach().split(rows):
                tangents = basis.unsqueeze(1).expand(ldim, zc.shape[0], ldim)
                g, j = vmap(lambda v, zc=zc: jvp(self._decode, (zc,), (v,)), out_dims=(None, 1))(tangents)
                G.append(g)
                J.append(j)
        return torch.cat(G), torch.cat(J)

    @staticmethod
    def neg_log_prior(z: Tensor) -> Tensor:
        """``-log p_Z(z) = 1/2 ||z||^2`` per image for ``p_Z = N(0, I)`` (the constant ``l/2 log 2 pi`` dropped, as
        in ``J1``, eq. 2.5)."""
        return 0.5 * z.pow(2).sum(1)

    def reconstruct(self, x: Tensor) -> Tensor:
        """``mu_theta(mu_phi(x))`` (the reconstructions of Fig. 8b)."""
        mu, _ = self.encode(x)
        return self._decode(mu)

    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """``n`` decoder means ``mu_theta(z)``, ``z ~ N(0, temperature^2 I)``."""
        if int(n) <= 0:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        dev = self.log_gamma.device
        z = torch.randn(int(n), self.latent_dim, generator=generator, device=dev) * temperature
        return self._decode(z)

    # ---- probabilistic terms ----------------------------------------------------------------------
    def neg_log_likelihood(self, x: Tensor, mu_x: Tensor) -> Tensor:
        """``H_theta(x, z) = -log p_theta(x|z)`` per image (eq. 2.6 with ``Sigma_theta = gamma^2 I``)."""
        sq = (x - mu_x).flatten(1).pow(2).sum(1)
        return 0.5 * sq * torch.exp(-2 * self.log_gamma) + self.d * (self.log_gamma + 0.5 * LOG_2PI)

    @staticmethod
    def kl_to_prior(mu: Tensor, logvar: Tensor) -> Tensor:
        """``KL(q_phi(z|x) || N(0, I))`` per image."""
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)

    def elbo(
        self,
        x: Tensor,
        x_enc: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        n_samples: int = 1,
    ) -> Tensor:
        """Per-image ELBO in nats (eq. 2.3), one-sample Monte Carlo by default.

        With ``x_enc`` (a noisy version of ``x``) this is the denoising ELBO of eq. 3.2: the encoder sees
        ``x_enc`` and the decoder must explain the clean ``x``. Differentiable (used as the training loss).
        """
        check_images(x, "x", shape=self.image_shape)
        if x_enc is None:
            x_enc = x
        else:
            check_tensor4d(x_enc, "x_enc")
            if x_enc.shape != x.shape:
                raise ValueError(f"x_enc has shape {tuple(x_enc.shape)} but x has shape {tuple(x.shape)}")
        mu, logvar = self._encode(x_enc)
        std = torch.exp(0.5 * logvar)
        rec = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for _ in range(int(n_samples)):
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            rec = rec - self.neg_log_likelihood(x, self._decode(mu + std * eps))
        return rec / int(n_samples) - self.kl_to_prior(mu, logvar)
