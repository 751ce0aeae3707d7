r"""A small compressive autoencoder with a scale hyperprior (Ballé, Minnen, Singh, Hwang, Johnston, *Variational
image compression with a scale hyperprior*, ICLR 2018): the prior of VBLE (slides ``vble_vblexz_slides.txt``,
"[VBLExz] Use of a variational compressive autoencoder (CAE)" and "[Appendice] CAE expressed in the VAE framework").

Model (Ballé 2018, §2-3, Fig. 4). ``y = g_a(x)`` (analysis: four 5x5 convolutions of stride 2 with GDN between them,
``M`` output channels at stride 16), ``z = h_a(|y|)`` (hyper-analysis: a 3x3 convolution and two 5x5 convolutions of
stride 2 with ReLUs, ``N`` channels at stride 64 of the image), ``sigma = h_s(z)`` (hyper-synthesis, the mirror of
``h_a`` ending in a ReLU), ``x_hat = g_s(y)`` (synthesis, the mirror of ``g_a`` with inverse GDN). With the additive
uniform noise relaxation ``y~ = y + u``, ``z~ = z + u'`` (``u, u' ~ U(-1/2, 1/2)``, eq. 4 and §2), the densities are

.. math::

    p(\tilde z) = \prod_i \big(p_{\psi^{(i)}} * \mathcal U(-\tfrac12, \tfrac12)\big)(\tilde z_i), \qquad
    p(\tilde y | \tilde z) = \prod_i \big(\mathcal N(0, \sigma_i^2) * \mathcal U(-\tfrac12, \tfrac12)\big)(\tilde y_i),

(eqs. 9-10), i.e. ``c(v + 1/2) - c(v - 1/2)`` for the cumulative ``c`` of each factor (:class:`EntropyBottleneck`:
the non-parametric density of appendix 6.1; :class:`GaussianConditional`: ``Phi``). Training minimises the
rate-distortion loss (eq. 2 with these densities)

.. math:: L = R + \lambda' D, \qquad R = -\log_2 p(\tilde y | \tilde z) - \log_2 p(\tilde z) \text{ (bits)},
    \qquad D = \|x - g_s(\tilde y)\|^2,

reported per pixel as CompressAI does: ``bpp + lmbda * 255^2 * MSE`` (so ``lmbda`` has CompressAI's scale,
0.0018-0.0483 for its quality levels; ``lambda' = lmbda 255^2 / C`` on the [0, 1] image scale).

**As a VAE (the decoder's noise model).** ``lambda' D + R`` in bits is, up to the factor ``log 2`` and constants, the
negative ELBO of the generative model ``p(x | y) = N(g_s(y), gamma^2 I)``, ``p(y, z) = p(y | z) p(z)`` with the
uniform posterior ``q(y, z | x) = U(y_bar +- 1/2) U(z_bar +- 1/2)`` (whose entropy is 0), for
``1 / (2 gamma^2) = lambda' log 2``: the slides' ``p(x|z) = N(D(z), 1 / (2 alpha log 2))``. :attr:`gamma` is this fixed
decoder std, ``sqrt(C / (2 lmbda 255^2 log 2))``; VBLE-xz reads it as ``sigma_theta`` (a scalar, not learned).

**As a** :class:`~jpmap_core.models.Prior`. The latent of one image packs ``y`` (main, ``(M, H/16, W/16)``) and
``z`` (hyper, ``(N, H/64, W/64)``) into one vector (:meth:`CAEHyperprior.pack`; as the HVAE packs its groups):
``decode`` is ``g_s(y)`` (``z`` only enters the prior), ``neg_log_prior`` the rate in nats
``-log p(y | z) - log p(z)`` of the continuous relaxation (eqs. 9-10 at the given real-valued latents: a proper
density, no constant dropped), ``encode`` the analysis means ``(g_a(x), h_a(|g_a(x)|))`` with no log-variance (the
posterior is uniform with width 1). The network is fully convolutional: :meth:`CAEHyperprior.at_size` gives the
prior for any size that is a multiple of :attr:`~CAEHyperprior.stride` (64), and
:meth:`CAEHyperprior.reconstruct` pads other sizes (reflect) and crops back, as the HVAE does. The decoder output
is not squashed (Ballé's synthesis is linear at the end): it may leave [0, 1] slightly.

Not included: the actual range coder and the entropy bottleneck's quantile auxiliary loss (both only matter for
writing bit streams); the rate reported by :meth:`CAEHyperprior.rate` at eval time is the ideal code length of the
rounded latents, ``-log2`` of their likelihoods.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_images, check_positive, check_tensor4d
from .hvae import pad_to_multiple

#: Ballé 2018 / CompressAI lower bound on the Gaussian conditional's scales
SCALE_BOUND = 0.11
#: lower bound on the likelihood of a unit-width bin (CompressAI's ``likelihood_bound``)
LIKELIHOOD_BOUND = 1e-9
LOG2 = math.log(2.0)


# ------------------------------------------------------------------------------------------------
# A lower bound with a useful gradient
# ------------------------------------------------------------------------------------------------
class _LowerBound(torch.autograd.Function):
    """``max(x, bound)`` whose gradient also flows below the bound when it pushes ``x`` up (Ballé's ``lower_bound``):
    a clamped parameter or likelihood can still leave the bound."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bound: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp_min(bound)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        pass_through = (x >= ctx.bound) | (grad < 0)
        return pass_through.to(grad.dtype) * grad, None


def lower_bound(x: Tensor, bound: float) -> Tensor:
    """``max(x, bound)`` with the gradient of :class:`_LowerBound`."""
    return _LowerBound.apply(x, float(bound))


# ------------------------------------------------------------------------------------------------
# GDN (Ballé, Laparra, Simoncelli, ICLR 2016 / 2017)
# ------------------------------------------------------------------------------------------------
class GDN(nn.Module):
    r"""Generalized divisive normalization over channels,

    .. math:: v_i = u_i \Big/ \sqrt{\beta_i + \sum_j \gamma_{ij} u_j^2}

    (``inverse=True``: :math:`u_i \sqrt{\beta_i + \sum_j \gamma_{ij} u_j^2}`, IGDN, its one-step fixed-point inverse
    used in the synthesis, Ballé 2017 §2). ``beta > 0`` and ``gamma >= 0`` are reparameterised
    (Ballé 2018 appendix 6.2 / 2017): the stored ``beta_`` and ``gamma_`` map to ``max(p, sqrt(min + r^2))^2 - r^2``
    with the pedestal ``r = 2^-18`` (``min`` = ``beta_min`` for beta, 0 for gamma), so both stay nonnegative and the
    gradients near zero stay well scaled. Initialised to ``beta = 1``, ``gamma = 0.1 I``.
    """

    PEDESTAL = 2.0**-36  # r^2

    def __init__(self, channels: int, *, inverse: bool = False, beta_min: float = 1e-6, gamma_init: float = 0.1):
        super().__init__()
        self.channels, self.inverse, self.beta_min = int(channels), bool(inverse), float(beta_min)
        ped = self.PEDESTAL
        self.beta_ = nn.Parameter(torch.sqrt(torch.ones(self.channels) + ped))
        self.gamma_ = nn.Parameter(torch.sqrt(gamma_init * torch.eye(self.channels) + ped))

    @property
    def beta(self) -> Tensor:
        """``beta`` ``(C,)``, > 0."""
        ped = self.PEDESTAL
        return lower_bound(self.beta_, math.sqrt(self.beta_min + ped)).pow(2) - ped

    @property
    def gamma(self) -> Tensor:
        """``gamma`` ``(C, C)``, >= 0 (row ``i``: the weights of ``u_j^2`` in the norm of channel ``i``)."""
        ped = self.PEDESTAL
        return lower_bound(self.gamma_, math.sqrt(ped)).pow(2) - ped

    def forward(self, u: Tensor) -> Tensor:
        norm = F.conv2d(u * u, self.gamma[:, :, None, None], self.beta).sqrt()
        return u * norm if self.inverse else u / norm


# ------------------------------------------------------------------------------------------------
# Entropy models (Ballé 2018, eqs. 9-10 and appendix 6.1)
# ------------------------------------------------------------------------------------------------
def add_uniform_noise(v: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``v + u``, ``u ~ U(-1/2, 1/2)`` elementwise from ``generator``: the training-time relaxation of rounding
    (Ballé 2018 §2, after Ballé 2017)."""
    u = torch.rand(v.shape, generator=generator, dtype=v.dtype, device=v.device) - 0.5
    return v + u


class EntropyBottleneck(nn.Module):
    r"""The fully factorized density of ``z`` (Ballé 2018 appendix 6.1): one univariate density per channel, shared
    over positions, defined by its cumulative ``c = f_K o ... o f_1`` with

    .. math:: f_k(x) = g_k(H^{(k)} x + b^{(k)}), \quad g_k(x) = x + a^{(k)} \odot \tanh(x) \ (k < K), \quad
        g_K = \mathrm{sigmoid},

    ``H^{(k)} = softplus(\hat H^{(k)})`` (positive), ``a^{(k)} = tanh(\hat a^{(k)})`` (in (-1, 1)), so each ``f_k``
    and therefore ``c`` is increasing, with limits 0 and 1 (eq. 13-16 of the appendix; ``filters`` = the widths
    ``(1, 3, 3, 3, 1)`` of the paper's ``K = 4``). The likelihood of ``v`` convolved with ``U(-1/2, 1/2)`` is
    ``c(v + 1/2) - c(v - 1/2)``, computed on the logits: with ``l = logit c(v - 1/2)``, ``u = logit c(v + 1/2)``
    and ``s = -sign(l + u)``, ``|sigmoid(s u) - sigmoid(s l)|`` (the difference of two numbers far from 1: no
    cancellation in the upper tail).
    """

    def __init__(self, channels: int, *, filters: Sequence[int] = (3, 3, 3), init_scale: float = 10.0):
        super().__init__()
        self.channels = int(channels)
        widths = (1, *[int(f) for f in filters], 1)
        scale = float(init_scale) ** (1.0 / (len(widths) - 1))
        self.matrices, self.biases, self.factors = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        for k in range(len(widths) - 1):
            init = math.log(math.expm1(1.0 / scale / widths[k + 1]))
            self.matrices.append(nn.Parameter(torch.full((self.channels, widths[k + 1], widths[k]), init)))
            self.biases.append(nn.Parameter(torch.rand(self.channels, widths[k + 1], 1) - 0.5))
            if k < len(widths) - 2:
                self.factors.append(nn.Parameter(torch.zeros(self.channels, widths[k + 1], 1)))

    def logits_cumulative(self, v: Tensor) -> Tensor:
        """``logit c(v)`` for ``v`` ``(B, channels, ...)``: the composition above without the final sigmoid."""
        b, c = v.shape[:2]
        if c != self.channels:
            raise ValueError(f"the entropy bottleneck models {self.channels} channels, got {c}")
        h = v.transpose(0, 1).reshape(c, 1, -1)  # (C, 1, n)
        n_layers = len(self.matrices)
        for k in range(n_layers):
            h = torch.matmul(F.softplus(self.matrices[k]), h) + self.biases[k]
            if k < n_layers - 1:
                h = h + torch.tanh(self.factors[k]) * torch.tanh(h)
        return h.reshape(c, b, *v.shape[2:]).transpose(0, 1)

    def cumulative(self, v: Tensor) -> Tensor:
        """``c(v)``, the cumulative distribution function of each channel's density, elementwise."""
        return torch.sigmoid(self.logits_cumulative(v))

    def likelihood(self, v: Tensor) -> Tensor:
        """``max(c(v + 1/2) - c(v - 1/2), 1e-9)`` elementwise (eq. 10: the density of ``v`` convolved with a unit
        box, which is also the probability of the integer bin of ``v`` when ``v`` is an integer)."""
        lower = self.logits_cumulative(v - 0.5)
        upper = self.logits_cumulative(v + 0.5)
        sign = -torch.sign(lower + upper).detach()
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        lik = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        return lower_bound(lik, LIKELIHOOD_BOUND)


class GaussianConditional(nn.Module):
    r"""The conditional density of ``y`` given the hyperprior's scales (Ballé 2018 eq. 9): each ``y_i`` is
    ``N(mu_i, sigma_i^2)`` convolved with ``U(-1/2, 1/2)``,

    .. math:: p(v) = \Phi\Big(\frac{v + 1/2 - \mu}{\sigma}\Big) - \Phi\Big(\frac{v - 1/2 - \mu}{\sigma}\Big),

    computed with ``|v - mu|`` (both terms in the lower tail: no cancellation), scales bounded below by ``0.11``
    and likelihoods by ``1e-9`` (CompressAI's bounds). ``mu = 0`` in the scale hyperprior.
    """

    def __init__(self, scale_bound: float = SCALE_BOUND, likelihood_bound: float = LIKELIHOOD_BOUND):
        super().__init__()
        self.scale_bound = check_positive(scale_bound, "scale_bound")
        self.likelihood_bound = check_positive(likelihood_bound, "likelihood_bound")

    @staticmethod
    def _phi(t: Tensor) -> Tensor:
        return 0.5 * torch.erfc(-t / math.sqrt(2.0))

    def likelihood(self, v: Tensor, scales: Tensor, means: Tensor | None = None) -> Tensor:
        """The bin likelihood above, elementwise (``scales`` and ``means`` broadcast with ``v``)."""
        values = (v if means is None else v - means).abs()
        s = lower_bound(scales, self.scale_bound)
        lik = self._phi((0.5 - values) / s) - self._phi((-0.5 - values) / s)
        return lower_bound(lik, self.likelihood_bound)


# ------------------------------------------------------------------------------------------------
# The Prior interface at one image size
# ------------------------------------------------------------------------------------------------
class _CAEAtSize:
    """The :class:`~jpmap_core.models.Prior` methods of a :class:`CAEHyperprior` for images ``image_shape``."""

    image_shape: tuple[int, int, int]
    #: VBLE's latent family for this prior (slides, "[Appendice] CAE expressed in the VAE framework")
    default_posterior = "uniform"
    #: ``neg_log_prior`` is the exact negative log density (the rate in nats), nothing dropped
    neg_log_prior_is_normalised = True

    @property
    def _net(self) -> CAEHyperprior:
        raise NotImplementedError

    @property
    def _hw(self) -> tuple[int, int]:
        return self.image_shape[1], self.image_shape[2]

    @property
    def y_shape(self) -> tuple[int, int, int]:
        """``(M, H/16, W/16)``: the main latent of one image."""
        return self._net.latent_shapes_at(*self._hw)[0]

    @property
    def z_shape(self) -> tuple[int, int, int]:
        """``(N, H/64, W/64)``: the hyper-latent of one image."""
        return self._net.latent_shapes_at(*self._hw)[1]

    @property
    def latent_shape(self) -> tuple[int]:
        """``(n_y + n_z,)``: ``y`` then ``z``, flattened and packed."""
        return (math.prod(self.y_shape) + math.prod(self.z_shape),)

    @property
    def gamma(self) -> Tensor:
        """The decoder std of the CAE as a VAE (module docstring): ``sqrt(C / (2 lmbda 255^2 log 2))``, fixed."""
        return self._net.gamma

    @property
    def beta(self) -> float:
        """``1 / gamma^2``."""
        return float(1.0 / self._net.gamma**2)

    @property
    def d(self) -> int:
        c, h, w = self.image_shape
        return c * h * w

    def pack(self, y: Tensor, z: Tensor) -> Tensor:
        """``y`` ``(B, M, h, w)`` and ``z`` ``(B, N, h', w')`` -> one ``(B, n_y + n_z)`` tensor."""
        if y.shape[0] != z.shape[0]:
            raise ValueError(f"y holds {y.shape[0]} latents but z {z.shape[0]}")
        return torch.cat([y.flatten(1), z.flatten(1)], 1)

    def unpack(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, n_y + n_z)`` -> ``(y, z)`` at this size."""
        self._check_latent(latent)
        ny = math.prod(self.y_shape)
        b = latent.shape[0]
        return latent[:, :ny].reshape(b, *self.y_shape), latent[:, ny:].reshape(b, *self.z_shape)

    def _check_latent(self, latent: object) -> Tensor:
        n = self.latent_shape[0]
        if not isinstance(latent, Tensor) or latent.dim() != 2 or latent.shape[1] != n:
            shape = tuple(latent.shape) if isinstance(latent, Tensor) else type(latent).__name__
            raise ValueError(
                f"the latent must have shape (B, {n}) (y {self.y_shape} and z {self.z_shape} packed, for images "
                f"{self.image_shape}), got {shape}"
            )
        if not bool(torch.isfinite(latent).all()):
            raise ValueError("the latent contains NaN or infinite values")
        return latent

    def _check_x(self, x: Tensor, allow_out_of_range: bool) -> Tensor:
        try:
            return check_images(x, "x", shape=self.image_shape, check_range=not allow_out_of_range)
        except ValueError as e:
            if "image shape" in str(e):
                raise ValueError(
                    f"{e}; this CAE prior is sized for {self.image_shape}: use cae.at_size(H, W) for other sizes "
                    f"(multiples of {self._net.stride}) or cae.reconstruct, which pads"
                ) from None
            raise

    # ---- Prior ----------------------------------------------------------------------------------
    def encode(self, x: Tensor, *, allow_out_of_range: bool = False) -> tuple[Tensor, None]:
        """``(pack(g_a(x), h_a(|g_a(x)|)), None)``: the centres of the uniform posterior (no variance)."""
        self._check_x(x, allow_out_of_range)
        y = self._net.g_a(x)
        return self.pack(y, self._net.h_a(y.abs())), None

    def decode(self, latent: Tensor, *, check: bool = True) -> Tensor:
        """``g_s(y)`` ``(B, *image_shape)`` (the hyper-latent ``z`` does not enter the image)."""
        if check:
            self._check_latent(latent)
        ny = math.prod(self.y_shape)
        y = latent[:, :ny].reshape(latent.shape[0], *self.y_shape)
        return self._net.g_s(y)

    def neg_log_prior(self, latent: Tensor) -> Tensor:
        """The rate in nats, ``-log p(y | z) - log p(z)`` per image ``(B,)`` (eqs. 9-10 of the relaxed latents at
        the given values; no constant dropped)."""
        y, z = self.unpack(latent)
        return self._net.rate_nats(y, z)


class CAEHyperprior(_CAEAtSize, nn.Module):
    """Compressive autoencoder with a scale hyperprior (Ballé 2018, Fig. 4, with fewer channels); a Prior at its
    nominal size.

    :param image_shape: nominal (training) size ``(C, P, P)``, ``P`` a multiple of 64; :meth:`at_size` gives the
        prior for other sizes.
    :param N: channels of the hidden layers and of the hyper-latent ``z`` (Ballé: 128 or 192).
    :param M: channels of the main latent ``y`` (Ballé: 192 or 320).
    :param lmbda: the rate-distortion weight of the loss ``bpp + lmbda 255^2 MSE`` (CompressAI's scale); sets the
        decoder std :attr:`gamma` of the CAE read as a VAE.
    """

    arch = "cae_hyperprior"
    #: downsampling of ``y`` (four stride-2 convolutions) and of ``z`` relative to ``y`` (two)
    STRIDE_Y, STRIDE_Z = 16, 4

    def __init__(self, image_shape: tuple[int, int, int] = (3, 64, 64), N: int = 64, M: int = 96, lmbda: float = 0.025):
        nn.Module.__init__(self)
        if len(image_shape) != 3 or any(int(s) <= 0 for s in image_shape):
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape!r}")
        if int(N) < 1 or int(M) < 1:
            raise ValueError(f"N and M must be positive channel counts, got N={N!r}, M={M!r}")
        self.lmbda = check_positive(lmbda, "lmbda")
        self.N, self.M = int(N), int(M)
        self.stride = self.STRIDE_Y * self.STRIDE_Z
        self.image_shape = tuple(int(s) for s in image_shape)
        self._check_size(*self.image_shape[1:])
        c, n, m = self.image_shape[0], self.N, self.M

        def conv(cin: int, cout: int, k: int = 5, s: int = 2) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, k, stride=s, padding=k // 2)

        def deconv(cin: int, cout: int, k: int = 5, s: int = 2) -> nn.ConvTranspose2d:
            return nn.ConvTranspose2d(cin, cout, k, stride=s, padding=k // 2, output_padding=s - 1)

        self.g_a = nn.Sequential(
            conv(c, n), GDN(n), conv(n, n), GDN(n), conv(n, n), GDN(n), conv(n, m)
        )  # fmt: skip
        self.g_s = nn.Sequential(
            deconv(m, n), GDN(n, inverse=True), deconv(n, n), GDN(n, inverse=True),
            deconv(n, n), GDN(n, inverse=True), deconv(n, c),
        )  # fmt: skip
        self.h_a = nn.Sequential(conv(m, n, 3, 1), nn.ReLU(), conv(n, n), nn.ReLU(), conv(n, n))
        self.h_s = nn.Sequential(deconv(n, n), nn.ReLU(), deconv(n, n), nn.ReLU(), conv(n, m, 3, 1), nn.ReLU())
        self.entropy_bottleneck = EntropyBottleneck(n)
        self.gaussian_conditional = GaussianConditional()
        self.register_buffer("log_gamma", torch.tensor(0.5 * math.log(c / (2 * self.lmbda * 255.0**2 * LOG2))))

    # ---- structure ------------------------------------------------------------------------------
    @property
    def _net(self) -> CAEHyperprior:
        return self

    @property
    def gamma(self) -> Tensor:
        return self.log_gamma.exp()

    @property
    def device(self) -> torch.device:
        return self.log_gamma.device

    def config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable (:func:`~jpmap_core.models.build_model` rebuilds the model)."""
        return {"arch": self.arch, "image_shape": list(self.image_shape), "N": self.N, "M": self.M, "lmbda": self.lmbda}

    def _check_size(self, h: int, w: int) -> None:
        if int(h) <= 0 or int(w) <= 0 or h % self.stride or w % self.stride:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the CAE's total stride {self.stride} (16 for y, x4 for the "
                "hyper-latent z); pad the image or use cae.reconstruct, which pads (reflect) and crops back"
            )

    def latent_shapes_at(self, h: int, w: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """``(M, h/16, w/16)`` and ``(N, h/64, w/64)`` for images ``h x w`` (multiples of 64)."""
        self._check_size(h, w)
        return (self.M, h // self.STRIDE_Y, w // self.STRIDE_Y), (self.N, h // self.stride, w // self.stride)

    def at_size(self, h: int, w: int) -> CAEAtSize:
        """The same prior (shared weights) for images ``(C, h, w)``; ``h``, ``w`` multiples of :attr:`stride`."""
        self._check_size(int(h), int(w))
        return CAEAtSize(self, int(h), int(w))

    # ---- densities ------------------------------------------------------------------------------
    def likelihoods(self, y: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(p(y | z), p(z))`` elementwise at the given (relaxed or rounded) latents (eqs. 9-10)."""
        return self.gaussian_conditional.likelihood(y, self.h_s(z)), self.entropy_bottleneck.likelihood(z)

    def rate_nats(self, y: Tensor, z: Tensor) -> Tensor:
        """``-log p(y | z) - log p(z)`` per image ``(B,)``, nats."""
        py, pz = self.likelihoods(y, z)
        return -(py.log().flatten(1).sum(1) + pz.log().flatten(1).sum(1))

    # ---- training -----------------------------------------------------------------------------------
    def _check_batch(self, x: Tensor, check_range: bool = True) -> Tensor:
        check_tensor4d(x, "x")
        if x.shape[1] != self.image_shape[0]:
            raise ValueError(f"x has {x.shape[1]} channels but the CAE models {self.image_shape[0]}-channel images")
        self._check_size(x.shape[-2], x.shape[-1])
        return check_images(x, "x", check_range=check_range)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_hat, rate_y, rate_z)``: the reconstruction ``g_s(y~)`` and the rates ``(B,)`` in bits of one pass
        (unchecked). Training mode: additive uniform noise from ``generator`` (eq. 4's relaxation); eval mode:
        rounding (the quantised latents a coder would write)."""
        y = self.g_a(x)
        z = self.h_a(y.abs())
        if self.training:
            y_t, z_t = add_uniform_noise(y, generator), add_uniform_noise(z, generator)
        else:
            y_t, z_t = torch.round(y), torch.round(z)
        py, pz = self.likelihoods(y_t, z_t)
        rate_y = -py.log2().flatten(1).sum(1)
        rate_z = -pz.log2().flatten(1).sum(1)
        return self.g_s(y_t), rate_y, rate_z

    def rd_loss(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The rate-distortion loss per pixel, ``bpp + lmbda 255^2 MSE`` (mean over the batch), and its parts
        (``bpp``, ``mse`` per image, ``x_hat``). ``x`` ``(B, C, H, W)`` in [0, 1], sizes multiples of 64."""
        self._check_batch(x)
        x_hat, rate_y, rate_z = self(x, generator)
        npix = x.shape[-2] * x.shape[-1]
        bpp = (rate_y + rate_z) / npix
        mse = (x - x_hat).pow(2).flatten(1).mean(1)
        loss = (bpp + self.lmbda * 255.0**2 * mse).mean()
        return {"loss": loss, "bpp": bpp, "bpp_y": rate_y / npix, "mse": mse, "x_hat": x_hat}

    # ---- any-size helpers ------------------------------------------------------------------------
    def reconstruct(self, x: Tensor, *, allow_out_of_range: bool = False) -> Tensor:
        """``g_s(round(g_a(x)))`` for images of **any** size (reflect-padded to multiples of :attr:`stride`, cropped
        back); the decoded image a coder would give."""
        check_tensor4d(x, "x")
        if x.shape[1] != self.image_shape[0]:
            raise ValueError(f"x has {x.shape[1]} channels but the CAE models {self.image_shape[0]}-channel images")
        check_images(x, "x", check_range=not allow_out_of_range)
        xp, crop = pad_to_multiple(x, self.stride)
        return self.g_s(torch.round(self.g_a(xp)))[..., crop[0], crop[1]]


class CAEAtSize(_CAEAtSize):
    """A :class:`CAEHyperprior` as a :class:`~jpmap_core.models.Prior` for images ``(C, H, W)``; shares the model's
    weights (a light view). Made by :meth:`CAEHyperprior.at_size`."""

    def __init__(self, model: CAEHyperprior, h: int, w: int):
        self.model = model
        self.image_shape = (model.image_shape[0], h, w)

    @property
    def _net(self) -> CAEHyperprior:
        return self.model

    @property
    def stride(self) -> int:
        return self.model.stride

    def at_size(self, h: int, w: int) -> CAEAtSize:
        return self.model.at_size(h, w)

    def reconstruct(self, x: Tensor, *, allow_out_of_range: bool = False) -> Tensor:
        """:meth:`CAEHyperprior.reconstruct` (any size)."""
        return self.model.reconstruct(x, allow_out_of_range=allow_out_of_range)

    def __repr__(self) -> str:
        return f"CAEAtSize(image_shape={self.image_shape}, model={type(self.model).__name__})"
