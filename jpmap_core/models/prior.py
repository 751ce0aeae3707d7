"""The one interface every prior offers the solvers (DESIGN.md, "Priors behind one Protocol").

A prior maps images ``x`` of shape ``(B, *image_shape)`` to latents ``z`` of shape ``(B, *latent_shape)`` and back.
Solvers only use what is listed here, so a Gaussian VAE, a hierarchical VAE and a normalizing flow are all priors
to them without special cases:

* **Gaussian VAE** (:class:`~jpmap_core.models.GaussianVAE`, JPMAP §2): ``latent_shape = (l,)``; ``encode`` returns
  the encoder's ``(mu_phi(x), logvar_phi(x))``; ``decode`` the decoder mean ``mu_theta(z)``; ``neg_log_prior(z) =
  1/2 ||z||^2`` (``p_Z = N(0, I)``, the constant ``l/2 log 2 pi`` dropped, as in ``J1``).
* **Hierarchical VAE** (PnP-HVAE): the latent groups ``z_1 .. z_L`` (several resolutions) are packed into one
  batch-first tensor ``(B, sum_l |z_l|)`` by ``pack`` and split back by ``unpack``, so that batching, the batched
  Adam pools, histories and the call cache work unchanged. ``neg_log_prior`` is ``-sum_l log p(z_l | z_<l)``.
* **Normalizing flow** (AIPO): ``latent_shape == image_shape`` (an image-shaped code); ``encode`` is the exact
  inverse and returns ``(f^-1(x), None)`` (no posterior variance); ``neg_log_prior`` the base density.

``decode(z, check=False)`` skips the input checks: solvers call it in their inner loops on latents they produced
themselves (the checked call is the public default).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Prior(Protocol):
    """What a solver may ask of a prior: shapes, ``encode``, ``decode`` and the latent's negative log density."""

    image_shape: tuple[int, ...]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one image's latent (without the batch dimension)."""
        ...

    def encode(self, x: Tensor, *, allow_out_of_range: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(mean, logvar)`` of the encoder for images ``x`` (``logvar`` is ``None`` for a deterministic code)."""
        ...

    def decode(self, z: Tensor, *, check: bool = True) -> Tensor:
        """The image ``(B, *image_shape)`` of latents ``z`` ``(B, *latent_shape)`` (a decoder mean, or a flow)."""
        ...

    def neg_log_prior(self, z: Tensor) -> Tensor:
        """``-log p(z)`` per image ``(B,)``, constants dropped (each prior says which)."""
        ...


def check_prior(prior: object) -> Prior:
    """``prior`` if it offers the :class:`Prior` interface, else a ``TypeError`` naming what is missing."""
    missing = [n for n in ("image_shape", "latent_shape", "encode", "decode", "neg_log_prior") if not hasattr(prior, n)]
    if missing:
        raise TypeError(
            f"{type(prior).__name__} is not a prior: it lacks {', '.join(missing)} (see jpmap_core.models.Prior: "
            "image_shape, latent_shape, encode, decode, neg_log_prior)"
        )
    return prior  # type: ignore[return-value]


def latent_numel(prior: Prior) -> int:
    """Number of latent entries of one image (``l``: the ``sqrt(l)`` of JPMAP's stopping rule)."""
    n = 1
    for s in prior.latent_shape:
        n *= int(s)
    return n
