r"""Normalizing-flow priors for images: RealNVP (Dinh et al. 2017) and Glow (Kingma & Dhariwal 2018), the two
generative priors of AIPO (Liu et al., ICML 2023, §2.1 and §4.1).

A flow is a bijection ``G: z -> x`` with an exact density (AIPO §2.1, change of variables)

.. math::

    \log p_G(x) = \log p(z) + \log |\det J_{G^{-1}}(x)|, \qquad z = G^{-1}(x),\quad p(z) = N(0, I_n).

**Data, dequantization and preprocessing.** Images are ``(B, C, H, W)`` in [0, 1] (8-bit values ``k/255``).
Training uses uniform dequantization: ``x = (k + u) / 256`` with ``u ~ U[0, 1)^n`` (Dinh et al. §4.1,
Theis et al. 2016), so that ``p_G`` is a density on the continuous cube [0, 1]^n. Before the flow body, ``x`` goes
through a fixed invertible preprocessing ``s = T(x)`` whose log-Jacobian is part of ``log p_G``:

* ``logit_alpha = a`` (RealNVP's default, ``a = 0.05``): ``s = logit(a + (1 - 2a) x)``, with
  ``log |T'(x)| = log(1 - 2a) - log p - log(1 - p)`` per entry, ``p = a + (1 - 2a) x``; ``T`` is defined for
  ``x`` in ``(-a/(1-2a), (1-a)/(1-2a))``, a little wider than [0, 1];
* ``logit_alpha = None`` (Glow's): ``s = x - 1/2`` (log-Jacobian 0), defined everywhere.

``log_prob(x)`` is then ``log p_G(x)`` in nats per image, for the density on [0, 1]^n of the (continuous)
image, constants included (``-n/2 log 2 pi``). **Bits per dimension** of 8-bit data, the usual figure of merit:

.. math::

    \mathrm{bpd}(x) = \frac{-\log p_G(x) + n \log 256}{n \log 2},

i.e. the negative log-likelihood of the discrete image under the dequantized model (an upper bound on the
discrete code length when ``x`` is a uniformly dequantized sample, Theis et al. 2016 eq. 11).

**Architecture (multi-scale, Dinh et al. §3.6).** The body is a list of scales; each scale applies invertible layers
at its resolution, factors out half of the channels (they go straight to the latent) and hands the other half to
the next scale. Factored-out halves are concatenated back and *unsqueezed* to the resolution the scale started at,
so the latent ``z = G^{-1}(x)`` has the image's shape (DESIGN "a flow's latent has the image's shape"):
``latent_shape == image_shape``, one standard normal over all entries (both papers use such a base for the
factored-out variables; Glow's learned split priors are left out).

* :class:`RealNVP`: per scale ``steps`` affine couplings with alternating **checkerboard** masks, a squeeze, ``steps``
  couplings with alternating **channel** masks, a split; the last scale has ``steps + 1`` checkerboard couplings
  (the paper: 3, 3 and 4). The paper's batch normalisation is left out (it would make an image's density depend
  on its batch while training); the scale of a coupling is ``scale * tanh(.)`` (the paper's tanh-bounded scale).
* :class:`Glow`: per level a squeeze, ``steps`` (the paper's ``K``) flow steps **actnorm -> invertible 1x1
  convolution -> affine coupling** (channel split), then a split (none after the last level).

Coupling networks are small residual CNNs (``width`` channels, ``blocks`` residual blocks) whose last convolution is
zero-initialised, so a new flow is the identity up to its squeezes and 1x1 rotations: ``log p_G`` of a new flow is
the base density pushed through the preprocessing (tested). ActNorm starts as the identity; :meth:`Flow.data_init`
sets it from a batch (Glow's data-dependent initialisation), as the training code does on its first batch.

The :class:`~jpmap_core.models.Prior` interface: ``encode(x) = (G^{-1}(x), None)`` (exact inverse, no posterior
variance), ``decode(z) = G(z)``, ``neg_log_prior(z) = 1/2 ||z||^2`` (the base's ``n/2 log 2 pi`` dropped, as for
the other priors; :meth:`Flow.log_prob` keeps every constant).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_images, check_tensor4d

LOG_2PI = math.log(2 * math.pi)

__all__ = ["ActNorm", "AffineCoupling", "Flow", "Glow", "InvConv1x1", "RealNVP", "Squeeze", "bits_per_dim_of"]


def bits_per_dim_of(log_prob: Tensor, n: int) -> Tensor:
    """``(-log p(x) + n log 256) / (n log 2)``: nats per image of a density on [0, 1]^n -> bits per dimension of
    8-bit data."""
    return (-log_prob + n * math.log(256.0)) / (n * math.log(2.0))


def _sum_per_image(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


# ------------------------------------------------------------------------------------------------
# Layers: forward(x) -> (y, log|det dy/dx|) per image (data -> latent direction), inverse(y) -> x
# ------------------------------------------------------------------------------------------------
class Squeeze(nn.Module):
    """Space-to-depth: ``(C, H, W) -> (4C, H/2, W/2)``, each 2x2 block into channels (Dinh et al. §3.6); a
    permutation, log-determinant 0."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return squeeze(x), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return unsqueeze(y)


def squeeze(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(y: Tensor) -> Tensor:
    b, c4, h, w = y.shape
    c = c4 // 4
    y = y.reshape(b, c, 2, 2, h, w)
    return y.permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)


class ActNorm(nn.Module):
    """Per-channel affine ``y = (x + bias) * exp(log_scale)`` (Glow §3.1); log-determinant ``H W sum(log_scale)``.

    Starts as the identity; :meth:`Flow.data_init` sets ``bias = -mean`` and ``log_scale = -log std`` per channel
    from a batch (zero mean, unit variance after the layer).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.init_pending = False

    @torch.no_grad()
    def _init_from(self, x: Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.init_pending = False

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.init_pending:
            self._init_from(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        logdet = x.shape[2] * x.shape[3] * self.log_scale.sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution ``y = W x`` at every pixel (Glow §3.2), ``W`` initialised as a random rotation
    (drawn from torch's global generator); log-determinant ``H W log |det W|``."""

    def __init__(self, channels: int):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels))
        self.weight = nn.Parameter(q)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = self.weight.shape[0]
        y = F.conv2d(x, self.weight.view(c, c, 1, 1))
        logdet = x.shape[2] * x.shape[3] * torch.linalg.slogdet(self.weight)[1]
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        c = self.weight.shape[0]
        return F.conv2d(y, torch.linalg.inv(self.weight).view(c, c, 1, 1))


class _ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.conv2(F.relu(self.conv1(F.relu(h))))


class CouplingNet(nn.Module):
    """``(in_ch, H, W) -> (log-scale raw, shift)``, each ``(out_ch, H, W)``: conv3x3 -> ``blocks`` residual blocks
    -> ReLU -> conv3x3, the last convolution zero-initialised (the coupling starts as the identity, Glow §3.3)."""

    def __init__(self, in_ch: int, out_ch: int, width: int, blocks: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, width, 3, padding=1)
        self.blocks = nn.Sequential(*[_ResBlock(width) for _ in range(blocks)])
        self.conv_out = nn.Conv2d(width, 2 * out_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.conv_out(F.relu(self.blocks(F.relu(self.conv_in(x)))))
        raw, shift = h.chunk(2, dim=1)
        return raw, shift


def checkerboard(h: int, w: int, parity: int, like: Tensor) -> Tensor:
    """``(1, 1, H, W)`` mask, 1 where ``(i + j + parity)`` is even (the pixels that condition the others)."""
    i = torch.arange(h, device=like.device)[:, None]
    j = torch.arange(w, device=like.device)[None, :]
    return ((i + j + parity) % 2 == 0).to(like.dtype)[None, None]


class AffineCoupling(nn.Module):
    """Affine coupling (RealNVP §3.3-3.4, eq. 7-9): the entries selected by a mask ``b`` stay, the others become
    ``x * exp(s) + t`` with ``(s, t)`` computed from the kept ones; log-determinant ``sum (1 - b) s``.

    ``mask="checkerboard"``: spatial checkerboard (``parity`` 0 or 1 chooses which colour is kept);
    ``mask="channel"``: the first half of the channels is kept (``parity=1``: the second half).
    ``s = scale * tanh(raw)`` with a learned per-channel ``scale`` (RealNVP's bounded scale).
    """

    def __init__(self, channels: int, mask: str, parity: int, width: int, blocks: int):
        super().__init__()
        if mask not in ("checkerboard", "channel"):
            raise ValueError(f"mask must be 'checkerboard' or 'channel', got {mask!r}")
        if mask == "channel" and channels % 2:
            raise ValueError(f"a channel coupling needs an even number of channels, got {channels}")
        self.mask, self.parity = mask, int(parity) % 2
        n_in = channels if mask == "checkerboard" else channels // 2
        n_out = channels if mask == "checkerboard" else channels - channels // 2
        self.net = CouplingNet(n_in, n_out, width, blocks)
        self.scale = nn.Parameter(torch.ones(1, n_out, 1, 1))

    def _st(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        raw, t = self.net(cond)
        return self.scale * torch.tanh(raw), t

    def _halves(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = x.chunk(2, dim=1)
        return (a, b) if self.parity == 0 else (b, a)

    def _join(self, kept: Tensor, changed: Tensor) -> Tensor:
        return torch.cat([kept, changed] if self.parity == 0 else [changed, kept], dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.mask == "checkerboard":
            b = checkerboard(x.shape[2], x.shape[3], self.parity, x)
            s, t = self._st(x * b)
            s, t = s * (1 - b), t * (1 - b)
            return x * torch.exp(s) + t, _sum_per_image(s)
        kept, other = self._halves(x)
        s, t = self._st(kept)
        return self._join(kept, other * torch.exp(s) + t), _sum_per_image(s)

    def inverse(self, y: Tensor) -> Tensor:
        if self.mask == "checkerboard":
            b = checkerboard(y.shape[2], y.shape[3], self.parity, y)
            s, t = self._st(y * b)
            s, t = s * (1 - b), t * (1 - b)
            return (y - t) * torch.exp(-s)
        kept, other = self._halves(y)
        s, t = self._st(kept)
        return self._join(kept, (other - t) * torch.exp(-s))


# ------------------------------------------------------------------------------------------------
# The multi-scale flow prior
# ------------------------------------------------------------------------------------------------
class Flow(nn.Module):
    """Multi-scale flow prior (module docstring); subclasses build the layers of each scale (:meth:`_build_scale`).

    ``image_shape`` ``(C, H, W)``; ``levels`` scales; ``steps`` couplings (or Glow steps) per stage; ``width`` and
    ``blocks`` size the coupling networks; ``logit_alpha`` the preprocessing (``None``: ``x - 1/2``).
    """

    #: registry name of the architecture (used by manifests to rebuild the model)
    arch: str = ""
    #: squeezes per scale (RealNVP: every scale but the last; Glow: every level)
    squeezes_in_last_scale: int = 0

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        *,
        levels: int,
        steps: int,
        width: int,
        blocks: int,
        logit_alpha: float | None,
    ):
        super().__init__()
        if len(image_shape) != 3 or any(int(s) <= 0 for s in image_shape):
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape!r}")
        for name, v, lo in (("levels", levels, 1), ("steps", steps, 1), ("width", width, 1), ("blocks", blocks, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if logit_alpha is not None and not 0 < float(logit_alpha) < 0.5:
            raise ValueError(f"logit_alpha must be in (0, 1/2) (or None for x - 1/2), got {logit_alpha!r}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.levels, self.steps, self.width, self.blocks = levels, steps, width, blocks
        self.logit_alpha = None if logit_alpha is None else float(logit_alpha)
        c, h, w = self.image_shape
        n_squeeze = levels - 1 + self.squeezes_in_last_scale
        if h % 2**n_squeeze or w % 2**n_squeeze:
            raise ValueError(
                f"{type(self).__name__} with {levels} levels squeezes {n_squeeze} times: H and W must be divisible by "
                f"{2**n_squeeze}, got image_shape {self.image_shape}"
            )
        scales, n_sq = [], []
        for i in range(levels):
            layers, c = self._build_scale(i, c, last=i == levels - 1)
            scales.append(nn.ModuleList(layers))
            n_sq.append(sum(isinstance(m, Squeeze) for m in layers))
            if i < levels - 1:
                if c < 2:
                    raise ValueError(f"scale {i} has {c} channel(s): too few to factor half of them out")
                c = c - c // 2
        self.scales = nn.ModuleList(scales)
        self._n_squeeze = n_sq

    # ---- to implement ---------------------------------------------------------------------------
    def _build_scale(self, i: int, channels: int, *, last: bool) -> tuple[list[nn.Module], int]:
        """The layers of scale ``i`` for ``channels`` input channels, and the channel count after them."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable (stored in manifests)."""
        return {
            "arch": self.arch,
            "image_shape": list(self.image_shape),
            "levels": self.levels,
            "steps": self.steps,
            "width": self.width,
            "blocks": self.blocks,
            "logit_alpha": self.logit_alpha,
        }

    # ---- shapes ---------------------------------------------------------------------------------
    @property
    def d(self) -> int:
        """Image dimension ``n = C * H * W``."""
        c, h, w = self.image_shape
        return c * h * w

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The image's shape (a flow's latent is an image-shaped code)."""
        return self.image_shape

    # ---- preprocessing T ----------------------------------------------------------------------
    def _preprocess(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``s = T(x)`` and ``log |det T'(x)|`` per image."""
        a = self.logit_alpha
        if a is None:
            return x - 0.5, x.new_zeros(x.shape[0])
        p = a + (1 - 2 * a) * x
        log_p, log_1mp = torch.log(p), torch.log1p(-p)
        return log_p - log_1mp, _sum_per_image(math.log(1 - 2 * a) - log_p - log_1mp)

    def _postprocess(self, s: Tensor) -> Tensor:
        a = self.logit_alpha
        if a is None:
            return s + 0.5
        return (torch.sigmoid(s) - a) / (1 - 2 * a)

    def domain(self) -> tuple[float, float]:
        """The open interval of pixel values where ``T`` (hence ``log p_G``) is defined."""
        a = self.logit_alpha
        if a is None:
            return -math.inf, math.inf
        return -a / (1 - 2 * a), (1 - a) / (1 - 2 * a)

    # ---- the body ---------------------------------------------------------------------------------
    def _to_latent(self, h: Tensor, i: int = 0) -> tuple[Tensor, Tensor]:
        logdet = h.new_zeros(h.shape[0])
        for layer in self.scales[i]:
            h, ld = layer(h)
            logdet = logdet + ld
        if i < len(self.scales) - 1:
            k = h.shape[1] // 2
            out, keep = h[:, :k], h[:, k:]
            keep, ld = self._to_latent(keep, i + 1)
            h, logdet = torch.cat([out, keep], dim=1), logdet + ld
        for _ in range(self._n_squeeze[i]):
            h = unsqueeze(h)
        return h, logdet

    def _to_data(self, z: Tensor, i: int = 0) -> Tensor:
        h = z
        for _ in range(self._n_squeeze[i]):
            h = squeeze(h)
        if i < len(self.scales) - 1:
            k = h.shape[1] // 2
            h = torch.cat([h[:, :k], self._to_data(h[:, k:], i + 1)], dim=1)
        for layer in reversed(self.scales[i]):
            h = layer.inverse(h)
        return h

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``z = G^{-1}(x)`` and ``log |det J_{G^{-1}}(x)|`` per image (preprocessing included), unchecked."""
        s, ld_pre = self._preprocess(x)
        z, ld_body = self._to_latent(s)
        return z, ld_pre + ld_body

    # ---- the Prior interface ------------------------------------------------------------------
    def _check_x(self, x: Tensor, allow_out_of_range: bool) -> Tensor:
        check_images(x, "x", shape=self.image_shape, check_range=not allow_out_of_range)
        lo, hi = self.domain()
        xd = x.detach()
        if math.isfinite(lo) and x.numel() and (float(xd.min()) <= lo or float(xd.max()) >= hi):
            raise ValueError(
                f"x has values in [{float(xd.min()):.4g}, {float(xd.max()):.4g}], outside the domain ({lo:.4g}, "
                f"{hi:.4g}) of the flow's logit preprocessing (logit_alpha={self.logit_alpha})"
            )
        return x

    def encode(self, x: Tensor, *, allow_out_of_range: bool = False) -> tuple[Tensor, None]:
        """``(G^{-1}(x), None)``: the exact inverse (no posterior variance). ``x`` in [0, 1] unless
        ``allow_out_of_range`` (then within the preprocessing's :meth:`domain`)."""
        self._check_x(x, allow_out_of_range)
        return self._to_latent(self._preprocess(x)[0])[0], None

    def decode(self, z: Tensor, *, check: bool = True) -> Tensor:
        """The generator ``x = G(z)``, ``(B, C, H, W)``; with the logit preprocessing values lie in the
        :meth:`domain` (slightly wider than [0, 1]), with ``x - 1/2`` anywhere. ``check=False`` skips the checks."""
        if check:
            if not isinstance(z, Tensor) or z.dim() != 4 or tuple(z.shape[1:]) != self.image_shape:
                shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
                raise ValueError(f"z must have shape (B, *latent_shape) = (B, {', '.join(map(str, self.image_shape))})"
                                 f", got {shape}")  # fmt: skip
            if not bool(torch.isfinite(z).all()):
                raise ValueError("z contains NaN or infinite values")
        return self._postprocess(self._to_data(z))

    @staticmethod
    def neg_log_prior(z: Tensor) -> Tensor:
        """``-log p(z) = 1/2 ||z||^2`` per image for the base ``N(0, I_n)`` (its constant ``n/2 log 2 pi`` dropped,
        as for the other priors; :meth:`log_prob` keeps it)."""
        return 0.5 * z.flatten(1).pow(2).sum(1)

    # ---- densities --------------------------------------------------------------------------------
    def log_prob(self, x: Tensor, *, check: bool = True) -> Tensor:
        """``log p_G(x)`` in nats per image ``(B,)`` (AIPO §2.1), every constant included; differentiable in ``x``
        and in the weights. ``x`` must lie in the preprocessing's :meth:`domain` (``check=False`` skips that)."""
        if check:
            check_tensor4d(x, "x")
            self._check_x(x, allow_out_of_range=True)
        z, logdet = self.forward_and_log_det(x)
        return -0.5 * z.flatten(1).pow(2).sum(1) - 0.5 * self.d * LOG_2PI + logdet

    def bits_per_dim(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Bits per dimension ``(B,)`` of images ``x`` (module docstring). With ``generator``, ``x`` is first
        dequantized as 8-bit data, ``(round(255 x) + u) / 256`` with ``u ~ U[0, 1)``; without, ``log p_G`` is taken
        at ``x`` as given."""
        check_images(x, "x", shape=self.image_shape)
        if generator is not None:
            x = dequantize(x, generator)
        return bits_per_dim_of(self.log_prob(x), self.d)

    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """``n`` images ``G(z)``, ``z ~ N(0, temperature^2 I)``."""
        if isinstance(n, bool) or int(n) != n or n <= 0:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        p = next(self.parameters())
        z = torch.randn(int(n), *self.image_shape, generator=generator, device=p.device, dtype=p.dtype)
        return self.decode(z * temperature, check=False)

    @torch.no_grad()
    def data_init(self, x: Tensor) -> None:
        """Data-dependent initialisation of every :class:`ActNorm` from the batch ``x`` (Glow §3.1): each one is
        set, in order, so that its output has zero mean and unit variance per channel."""
        norms = [m for m in self.modules() if isinstance(m, ActNorm)]
        for m in norms:
            m.init_pending = True
        try:
            self.forward_and_log_det(check_images(x, "x", shape=self.image_shape))
        finally:
            for m in norms:
                m.init_pending = False


def dequantize(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform dequantization of 8-bit images ``x = k/255``: ``(k + u) / 256``, ``u ~ U[0, 1)`` from ``generator``."""
    k = torch.round(x * 255.0)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (k + u) / 256.0


class RealNVP(Flow):
    """RealNVP (Dinh et al. 2017, §3.6 multi-scale architecture; defaults sized for a CPU, see the module docstring).

    Per scale but the last: ``steps`` checkerboard couplings, squeeze, ``steps`` channel couplings, split; the last
    scale: ``steps + 1`` checkerboard couplings. Logit preprocessing with ``a = 0.05`` (the paper's §4.1).
    """

    arch = "realnvp"
    squeezes_in_last_scale = 0

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        *,
        levels: int = 3,
        steps: int = 3,
        width: int = 32,
        blocks: int = 1,
        logit_alpha: float | None = 0.05,
    ):
        super().__init__(image_shape, levels=levels, steps=steps, width=width, blocks=blocks, logit_alpha=logit_alpha)

    def _build_scale(self, i: int, channels: int, *, last: bool) -> tuple[list[nn.Module], int]:
        w, nb = self.width, self.blocks
        if last:
            return [AffineCoupling(channels, "checkerboard", k, w, nb) for k in range(self.steps + 1)], channels
        layers: list[nn.Module] = [AffineCoupling(channels, "checkerboard", k, w, nb) for k in range(self.steps)]
        layers.append(Squeeze())
        layers += [AffineCoupling(4 * channels, "channel", k, w, nb) for k in range(self.steps)]
        return layers, 4 * channels


class Glow(Flow):
    """Glow (Kingma & Dhariwal 2018, Fig. 2): ``levels`` levels of [squeeze, ``steps`` x (actnorm, invertible 1x1
    convolution, affine coupling), split]. Preprocessing ``x - 1/2`` (the paper's) unless ``logit_alpha``."""

    arch = "glow"
    squeezes_in_last_scale = 1

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        *,
        levels: int = 3,
        steps: int = 8,
        width: int = 32,
        blocks: int = 0,
        logit_alpha: float | None = None,
    ):
        super().__init__(image_shape, levels=levels, steps=steps, width=width, blocks=blocks, logit_alpha=logit_alpha)

    def _build_scale(self, i: int, channels: int, *, last: bool) -> tuple[list[nn.Module], int]:
        c = 4 * channels
        layers: list[nn.Module] = [Squeeze()]
        for _ in range(self.steps):
            layers += [ActNorm(c), InvConv1x1(c), AffineCoupling(c, "channel", 0, self.width, self.blocks)]
        return layers, c
