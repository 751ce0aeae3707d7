"""Priors: the :class:`Prior` interface every solver uses, a Gaussian VAE base and the MNIST (MLP) and CelebA (conv)
architectures of JPMAP §3.1."""

from __future__ import annotations

from typing import Any

from .conv import ConvVAE
from .mlp import MLPVAE
from .prior import Prior, check_prior, latent_numel
from .vae import GaussianVAE

ARCHITECTURES: dict[str, type[GaussianVAE]] = {"mlp": MLPVAE, "conv": ConvVAE}


def build_model(config: dict[str, Any]) -> GaussianVAE:
    """Rebuild a model from its :meth:`GaussianVAE.config` dictionary."""
    cfg = dict(config)
    arch = cfg.pop("arch", None)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} in model config; expected one of {sorted(ARCHITECTURES)}")
    for key in ("image_shape", "hidden", "widths"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    return ARCHITECTURES[arch](**cfg)


__all__ = [
    "ARCHITECTURES", "ConvVAE", "GaussianVAE", "MLPVAE", "Prior", "build_model", "check_prior", "latent_numel"
]  # fmt: skip
