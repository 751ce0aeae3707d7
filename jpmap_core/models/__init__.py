"""Priors: the :class:`Prior` interface every solver uses, a Gaussian VAE base, the MNIST (MLP) and CelebA (conv)
architectures of JPMAP §3.1, the hierarchical VAE of PnP-HVAE (:class:`HVAE`, §6.2 PatchVDVAE) and the normalizing
flows of AIPO (:class:`RealNVP`, :class:`Glow`), the compressive autoencoder with a scale hyperprior of VBLE
(:class:`CAEHyperprior`) and EPLL's patch Gaussian mixture (:class:`PatchGMM`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .cae import CAEAtSize, CAEHyperprior
from .conv import ConvVAE
from .flow import Flow, Glow, RealNVP
from .gmm import PatchGMM
from .hvae import HVAE, HVAEAtSize, check_temperature, linear_temperature, tempered_mean
from .mlp import MLPVAE
from .prior import Prior, check_prior, latent_numel
from .vae import GaussianVAE

#: architecture name (``config()["arch"]``) -> prior module class
ARCHITECTURES: dict[str, type[nn.Module]] = {"mlp": MLPVAE, "conv": ConvVAE, "hvae": HVAE}
ARCHITECTURES.update(realnvp=RealNVP, glow=Glow, cae_hyperprior=CAEHyperprior)
ARCHITECTURES.update(gmm=PatchGMM)


def build_model(config: dict[str, Any]) -> nn.Module:
    """Rebuild a prior module (a :class:`GaussianVAE`, an :class:`HVAE`, a :class:`Flow` or a
    :class:`CAEHyperprior`) from its ``config()`` dictionary."""
    cfg = dict(config)
    arch = cfg.pop("arch", None)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} in model config; expected one of {sorted(ARCHITECTURES)}")
    for key in ("image_shape", "hidden", "widths"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    return ARCHITECTURES[arch](**cfg)


__all__ = [
    "ARCHITECTURES", "ConvVAE", "GaussianVAE", "HVAE", "HVAEAtSize", "MLPVAE", "Prior", "build_model",
    "check_prior", "check_temperature", "latent_numel", "linear_temperature", "tempered_mean",
]  # fmt: skip
__all__ += ["CAEAtSize", "CAEHyperprior", "Flow", "Glow", "RealNVP"]
__all__ += ["PatchGMM"]
