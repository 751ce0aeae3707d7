"""The CelebA 64x64 VAE of JPMAP §3.1: DCGAN-like convolutional encoder, symmetric decoder.

Batch norm and ELU throughout, isotropic learned ``gamma``, latent 32 by default (the paper's value; the
official code used 64). ``widths`` sets the four convolution widths (official: 64, 128, 256, 512); a narrower
network trains faster on a CPU. Three stride-2 stages take 64x64 to 8x8.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .vae import GaussianVAE


def _conv_block(cin: int, cout: int, k: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2), nn.BatchNorm2d(cout), nn.ELU()]


def _deconv_block(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [
        nn.ConvTranspose2d(cin, cout, k, stride=2, padding=k // 2, output_padding=1),
        nn.BatchNorm2d(cout),
        nn.ELU(),
    ]


class ConvVAE(GaussianVAE):
    arch = "conv"

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (3, 64, 64),
        latent_dim: int = 32,
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
        fc_dim: int = 1024,
        kernel_size: int = 5,
        gamma_init: float = 1.0,
    ):
        super().__init__(image_shape, latent_dim, gamma_init)
        c, h, w = self.image_shape
        if h % 8 or w % 8:
            raise ValueError(f"ConvVAE needs H and W divisible by 8, got image_shape {self.image_shape}")
        if len(widths) != 4:
            raise ValueError(f"widths must list 4 convolution widths, got {widths!r}")
        self.widths = tuple(int(v) for v in widths)
        self.fc_dim = int(fc_dim)
        self.kernel_size = int(kernel_size)
        k, w0, w1, w2, w3 = self.kernel_size, *self.widths
        self._bottleneck = (w3, h // 8, w // 8)
        flat = w3 * (h // 8) * (w // 8)
        self.encoder = nn.Sequential(
            *_conv_block(c, w0, k, 1),
            *_conv_block(w0, w1, k, 2),
            *_conv_block(w1, w2, k, 2),
            *_conv_block(w2, w3, k, 2),
            nn.Flatten(),
            nn.Linear(flat, self.fc_dim),
            nn.ELU(),
            nn.Linear(self.fc_dim, 2 * self.latent_dim),
        )
        self.decoder_fc = nn.Sequential(
            nn.Linear(self.latent_dim, self.fc_dim), nn.ELU(), nn.Linear(self.fc_dim, flat), nn.ELU()
        )
        self.decoder_conv = nn.Sequential(
            *_deconv_block(w3, w2, k),
            *_deconv_block(w2, w1, k),
            *_deconv_block(w1, w0, k),
            nn.Conv2d(w0, c, k, stride=1, padding=k // 2),
            nn.Sigmoid(),
        )

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x)
        return h[:, : self.latent_dim], h[:, self.latent_dim :]

    def _decode(self, z: Tensor) -> Tensor:
        return self.decoder_conv(self.decoder_fc(z).view(z.shape[0], *self._bottleneck))

    def config(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "image_shape": list(self.image_shape),
            "latent_dim": self.latent_dim,
            "widths": list(self.widths),
            "fc_dim": self.fc_dim,
            "kernel_size": self.kernel_size,
        }
