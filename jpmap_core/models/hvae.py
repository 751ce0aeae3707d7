r"""A small fully convolutional hierarchical VAE: the PatchVDVAE prior of PnP-HVAE (Prost et al., ICCV 2023).

Model (PnP-HVAE §3.2, eqs. 6-9). The latent is split into ``L`` groups ``z = (z_0, ..., z_{L-1})`` from the
coarsest resolution to the finest, with diagonal Gaussian conditionals

.. math::

    p_\theta(z_l | z_{<l}) = \mathcal N(\mu_{\theta,l}, \mathrm{diag}\, e^{\log\sigma^2_{\theta,l}}), \quad
    q_\phi(z_l | x, z_{<l}) = \mathcal N(\mu_{\phi,l}, \mathrm{diag}\, e^{\log\sigma^2_{\phi,l}}), \quad
    p_\theta(x | z) = \mathcal N(\mu_\theta(z), \gamma^2 I).

Architecture (VDVAE, Child 2021, as used by PatchVDVAE, §6.2). A bottom-up encoder of bottleneck residual
blocks (1x1, 3x3, 3x3, 1x1 convolutions with GELU) at ``R`` resolutions, average-pooled by 2 between them; a
top-down decoder that, at each resolution from the coarsest to the finest, runs that resolution's latent groups.
A group computes its prior from the top-down state ``h`` (``p(z_l | z_<l)``), its posterior from ``h`` and the
encoder's activation at that resolution (``q(z_l | x, z_<l)``), draws or chooses ``z_l``, and updates
``h <- resnet(h + proj(z_l))``. The decoder mean is ``sigmoid(conv(h))``, in [0, 1] like the package's other
priors. As in PatchVDVAE the top group ``z_0`` is a spatial map at the coarsest resolution with prior
``N(0, I)`` (VDVAE has a learned constant input there), so the network has no size-specific parameter: a model
trained on ``P x P`` patches is a prior for any image whose height and width are multiples of its total stride
``2^(R-1)`` (:meth:`HVAE.at_size`), and :meth:`HVAE.reconstruct` pads other sizes (reflect) and crops back.

Latent packing. The groups of one image are flattened and concatenated into one batch-first vector
(:meth:`HVAE.pack` / :meth:`HVAE.unpack`), so a solver sees ``latent_shape = (N,)`` as for a flat VAE
(DESIGN.md, "Priors behind one Protocol").

Variances are stored as **log-variances** (the official PatchVDVAE predicts standard deviations through a
softplus, VDVAE log standard deviations).

Temperature (§3.3, eqs. 10, 15, 17, 18). ``tau`` is one number, one value per group, or a schedule ``l -> tau_l``
(:func:`linear_temperature` is the official configs' linear schedule), each in (0, 1];
``lambda_l = 1 / tau_l^2 - 1``. :meth:`HVAE.encode_tempered` is Algorithm 1.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_images, check_tensor4d
from .vae import LOG_2PI

Temperature = float | Sequence[float] | Tensor | Callable[[int], float]


# ------------------------------------------------------------------------------------------------
# Temperature
# ------------------------------------------------------------------------------------------------
def linear_temperature(tau_coarse: float, tau_fine: float, n_groups: int) -> list[float]:
    """Per-group temperatures varying linearly from ``tau_coarse`` (group 0) to ``tau_fine`` (group ``L-1``).

    PnP-HVAE's BSD deblurring config uses a linear schedule (``t_min: 0.8, t_max: 0.6``: 0.8 on the coarsest
    group, 0.6 on the finest). The official helper (``temperature_functions.linear``) uses the slope
    ``(t_max - t_min) / L``, so its last group stops one step short of ``t_max``; this one reaches ``tau_fine``.
    """
    n = int(n_groups)
    if n <= 0:
        raise ValueError(f"n_groups must be a positive integer, got {n_groups!r}")
    if n == 1:
        return [float(tau_coarse)]
    return [float(tau_coarse) + (float(tau_fine) - float(tau_coarse)) * i / (n - 1) for i in range(n)]


def check_temperature(tau: Temperature | None, n_groups: int) -> list[float]:
    """``tau`` as one float per group (``None`` means 1), each checked to lie in (0, 1].

    Accepts a number, a sequence or 1-d tensor of ``n_groups`` values, or a callable schedule ``l -> tau_l``.
    """
    if tau is None:
        return [1.0] * n_groups
    if callable(tau) and not isinstance(tau, Tensor):
        values = [tau(k) for k in range(n_groups)]
    elif isinstance(tau, Tensor):
        if tau.dim() == 0:
            values = [float(tau)] * n_groups
        elif tau.dim() == 1:
            values = [float(v) for v in tau]
        else:
            raise ValueError(
                f"tau must be a number or one value per latent group, got a tensor of shape {tuple(tau.shape)}"
            )
    elif isinstance(tau, numbers.Real):
        values = [float(tau)] * n_groups
    elif isinstance(tau, Sequence) and not isinstance(tau, str):
        values = list(tau)
    else:
        raise TypeError(f"tau must be a number, one value per latent group or a schedule l -> tau, got {tau!r}")
    if len(values) != n_groups:
        raise ValueError(f"tau lists {len(values)} temperatures but the model has {n_groups} latent groups")
    out = []
    for k, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"temperature of group {k} must be a number, got {v!r}") from None
        if not (0.0 < f <= 1.0):  # also rejects NaN
            raise ValueError(f"temperature of group {k} is {v!r}; every tau_l must lie in (0, 1] (PnP-HVAE eq. 10)")
        out.append(f)
    return out


def tempered_mean(q_mean: Tensor, q_logvar: Tensor, p_mean: Tensor, p_logvar: Tensor, lam: float) -> Tensor:
    r"""PnP-HVAE eq. (18) for one group: ``argmin_z -log q(z) - lam log p(z)`` for diagonal Gaussians ``q``, ``p``.

    .. math:: \hat z = (S_q + \lambda S_p)^{-1} (S_q m_q + \lambda S_p m_p), \quad S = \Sigma^{-1},

    the precision-weighted mean, computed as ``m_q + w (m_p - m_q)`` with
    ``w = lambda S_p / (S_q + lambda S_p) = sigmoid(log lambda + logvar_q - logvar_p)`` (no overflow of the
    precisions). ``lam = 0`` (``tau = 1``) gives the encoder mean ``m_q``.
    """
    if lam == 0:
        return q_mean
    w = torch.sigmoid(math.log(lam) + q_logvar - p_logvar)
    return q_mean + w * (p_mean - q_mean)


def gaussian_kl(q_mean: Tensor, q_logvar: Tensor, p_mean: Tensor, p_logvar: Tensor) -> Tensor:
    """``KL(N(q_mean, e^q_logvar) || N(p_mean, e^p_logvar))`` elementwise (diagonal Gaussians)."""
    return 0.5 * (p_logvar - q_logvar + (q_logvar.exp() + (q_mean - p_mean).pow(2)) * torch.exp(-p_logvar) - 1.0)


def gaussian_nll(z: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """``-log N(z; mean, e^logvar)`` elementwise without the constant ``log(2 pi) / 2``."""
    return 0.5 * ((z - mean).pow(2) * torch.exp(-logvar) + logvar)


@dataclass
class GroupGaussians:
    """One latent group's posterior ``q(z_l | x, z_<l)`` and prior ``p(z_l | z_<l)`` (``(B, c_l, h_l, w_l)``
    each; ``q_*`` is ``None`` when no image was given)."""

    z: Tensor
    p_mean: Tensor
    p_logvar: Tensor
    q_mean: Tensor | None = None
    q_logvar: Tensor | None = None


# ------------------------------------------------------------------------------------------------
# Building blocks (VDVAE)
# ------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    """VDVAE's bottleneck block: GELU then 1x1, 3x3, 3x3, 1x1 convolutions, optionally residual."""

    def __init__(self, cin: int, mid: int, cout: int, *, residual: bool, zero_last: bool = False, scale: float = 1.0):
        super().__init__()
        self.residual = residual
        self.c1 = nn.Conv2d(cin, mid, 1)
        self.c2 = nn.Conv2d(mid, mid, 3, padding=1)
        self.c3 = nn.Conv2d(mid, mid, 3, padding=1)
        self.c4 = nn.Conv2d(mid, cout, 1)
        with torch.no_grad():
            if zero_last:
                self.c4.weight.zero_()
                self.c4.bias.zero_()
            else:
                self.c4.weight.mul_(scale)

    def forward(self, x: Tensor) -> Tensor:
        out = self.c4(F.gelu(self.c3(F.gelu(self.c2(F.gelu(self.c1(F.gelu(x))))))))
        return x + out if self.residual else out


class _Group(nn.Module):
    """One stochastic top-down block: prior net, posterior net, latent projection and a residual block.

    The top group (``top=True``) has no prior net (``p(z_0) = N(0, I)``) and no state to update: its posterior
    sees only the encoder activation and the state starts as ``proj(z_0)``.
    """

    def __init__(self, width: int, zdim: int, mid: int, scale: float, *, top: bool):
        super().__init__()
        self.zdim, self.top = zdim, top
        self.posterior = _Block(width if top else 2 * width, mid, 2 * zdim, residual=False)
        self.prior = None if top else _Block(width, mid, 2 * zdim + width, residual=False, zero_last=True)
        self.z_proj = nn.Conv2d(zdim, width, 1)
        self.resnet = _Block(width, mid, width, residual=True, scale=scale)
        with torch.no_grad():
            self.z_proj.weight.mul_(scale)

    def prior_stats(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feats = self.prior(h)
        c = self.zdim
        return feats[:, :c], feats[:, c : 2 * c], h + feats[:, 2 * c :]

    def posterior_stats(self, h: Tensor | None, act: Tensor) -> tuple[Tensor, Tensor]:
        out = self.posterior(act if self.top else torch.cat([h, act], 1))
        return out[:, : self.zdim], out[:, self.zdim :]

    def absorb(self, h: Tensor | None, z: Tensor) -> Tensor:
        proj = self.z_proj(z)
        return self.resnet(proj if h is None else h + proj)


def _per_resolution(value: int | Sequence[int], n: int, name: str, minimum: int) -> tuple[int, ...]:
    vals = [value] * n if isinstance(value, int) else list(value)
    if len(vals) != n:
        raise ValueError(f"{name} must give one value per resolution ({n}, as widths), got {value!r}")
    if any(int(v) != v or int(v) < minimum for v in vals):
        raise ValueError(f"{name} must be integers >= {minimum}, got {value!r}")
    return tuple(int(v) for v in vals)


# ------------------------------------------------------------------------------------------------
# The Prior interface at one image size (shared by the model and its sized views)
# ------------------------------------------------------------------------------------------------
class _PriorAtSize:
    """The :class:`~jpmap_core.models.Prior` methods of an :class:`HVAE` for images of shape ``image_shape``."""

    image_shape: tuple[int, int, int]

    @property
    def _net(self) -> HVAE:
        raise NotImplementedError

    @property
    def _hw(self) -> tuple[int, int]:
        return self.image_shape[1], self.image_shape[2]

    # ---- shapes ---------------------------------------------------------------------------------
    @property
    def group_shapes(self) -> list[tuple[int, int, int]]:
        """``(c_l, h_l, w_l)`` of every latent group, coarsest first."""
        return self._net.group_shapes_at(*self._hw)

    @property
    def latent_shape(self) -> tuple[int]:
        """``(N,)`` with ``N = sum_l c_l h_l w_l``: the packed latent of one image."""
        return (sum(c * h * w for c, h, w in self.group_shapes),)

    @property
    def n_groups(self) -> int:
        return self._net.n_groups

    @property
    def gamma(self) -> Tensor:
        """Decoder standard deviation ``gamma`` (scalar tensor; learned or fixed, see ``HVAE(learn_gamma=...)``)."""
        return self._net.log_gamma.exp()

    @property
    def beta(self) -> float:
        """``beta = 1 / gamma^2``."""
        return float(torch.exp(-2 * self._net.log_gamma.detach()))

    def pack(self, groups: Sequence[Tensor]) -> Tensor:
        """Groups ``[(B, c_l, h_l, w_l)]`` (coarsest first) -> one ``(B, N)`` tensor."""
        return self._net.pack(groups)

    def unpack(self, z: Tensor) -> list[Tensor]:
        """``(B, N)`` -> the groups ``[(B, c_l, h_l, w_l)]`` at this size."""
        return self._net.unpack(z, self._hw)

    # ---- checks ---------------------------------------------------------------------------------
    def _check_x(self, x: Tensor, allow_out_of_range: bool) -> Tensor:
        try:
            return check_images(x, "x", shape=self.image_shape, check_range=not allow_out_of_range)
        except ValueError as e:
            if "image shape" in str(e):
                raise ValueError(
                    f"{e}; this HVAE prior is sized for {self.image_shape}: use hvae.at_size(H, W) for other sizes "
                    f"(multiples of {self._net.stride}) or hvae.reconstruct, which pads"
                ) from None
            raise

    def _check_z(self, z: Tensor) -> Tensor:
        n = self.latent_shape[0]
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != n:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(
                f"z must have shape (B, {n}) (packed latent groups for images {self.image_shape}), got {shape}"
            )
        if not bool(torch.isfinite(z).all()):
            raise ValueError("z contains NaN or infinite values")
        return z

    # ---- Prior ----------------------------------------------------------------------------------
    def encode(self, x: Tensor, *, allow_out_of_range: bool = False) -> tuple[Tensor, Tensor]:
        """Greedy posterior means and their log-variances, packed ``(B, N)`` each.

        Each group's mean is computed given the previous groups' means (Algorithm 1 with ``tau = 1``).
        """
        self._check_x(x, allow_out_of_range)
        _, groups = self._net._top_down(self._net._bottom_up(x), self._hw, x.shape[0], _posterior_mean)
        return self.pack([g.q_mean for g in groups]), self.pack([g.q_logvar for g in groups])

    def decode(self, z: Tensor, *, check: bool = True) -> Tensor:
        """The decoder mean ``mu_theta(z)``, ``(B, *image_shape)`` in [0, 1]."""
        if check:
            self._check_z(z)
        zs = self.unpack(z)
        mu, _ = self._net._top_down(None, self._hw, z.shape[0], _given(zs))
        return mu

    def neg_log_prior(self, z: Tensor, tau: Temperature | None = None) -> Tensor:
        r"""``-sum_l (1 / tau_l^2) log p(z_l | z_<l)`` per image ``(B,)``: the prior term of PnP-HVAE's ``J1`` (eq. 15).

        Only the constants ``d_l log(2 pi) / 2`` (and eq. 10's ``tau_l^{d_l/2}`` normaliser) are dropped; the
        log-variance terms ``sum log sigma^2_{theta,l}(z_<l) / 2`` depend on ``z`` through the earlier groups and
        stay. ``tau=None`` means 1 (the untempered prior).
        """
        taus = check_temperature(tau, self.n_groups)
        self._check_z(z)
        _, groups = self._net._top_down(None, self._hw, z.shape[0], _given(self.unpack(z)), output=False)
        return _tempered_neg_log_prior(groups, taus)

    def decode_with_prior(
        self, z: Tensor, tau: Temperature | None = None, *, check: bool = True
    ) -> tuple[Tensor, Tensor]:
        """``(mu_theta(z), neg_log_prior(z, tau))`` from one top-down pass."""
        taus = check_temperature(tau, self.n_groups)
        if check:
            self._check_z(z)
        mu, groups = self._net._top_down(None, self._hw, z.shape[0], _given(self.unpack(z)))
        return mu, _tempered_neg_log_prior(groups, taus)

    # ---- PnP-HVAE ---------------------------------------------------------------------------------
    def encode_tempered(self, x: Tensor, tau: Temperature = 1.0, *, allow_out_of_range: bool = False) -> Tensor:
        r"""Algorithm 1: ``E_tau(x)``, packed ``(B, N)``.

        Greedy, coarsest group first: given the already chosen ``z_<l``, ``z_l`` minimises
        ``-log q(z_l | x, z_<l) - lambda_l log p(z_l | z_<l)`` (the group's term of ``J2``, eq. 17), solved in
        closed form by eq. (18) (:func:`tempered_mean`) with ``lambda_l = 1 / tau_l^2 - 1``. ``tau = 1`` gives the
        encoder means (:meth:`encode`). Batched; differentiable when called with gradients enabled.
        """
        lams = [1.0 / t**2 - 1.0 for t in check_temperature(tau, self.n_groups)]
        self._check_x(x, allow_out_of_range)
        _, groups = self._net._top_down(self._net._bottom_up(x), self._hw, x.shape[0], _tempered(lams))
        return self.pack([g.z for g in groups])

    def tempered_autoencode(
        self, x: Tensor, tau: Temperature = 1.0, *, allow_out_of_range: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(E_tau(x), mu_theta(E_tau(x)), neg_log_prior(E_tau(x), tau))`` from one bottom-up and one top-down pass.

        The packed latent of Algorithm 1 (:meth:`encode_tempered`), the reconstruction ``HVAE(x, tau)`` of
        PnP-HVAE's Proposition 1 and the prior term of ``J1`` (eq. 15) at that latent: what
        :meth:`encode_tempered` then :meth:`decode_with_prior` give, the same numbers, at half the cost (the top-down
        pass that chooses ``z`` also decodes it). Batched; differentiable when called with gradients enabled.
        """
        taus = check_temperature(tau, self.n_groups)
        lams = [1.0 / t**2 - 1.0 for t in taus]
        self._check_x(x, allow_out_of_range)
        mu, groups = self._net._top_down(self._net._bottom_up(x), self._hw, x.shape[0], _tempered(lams))
        nlp = sum(
            gaussian_nll(g.z, g.p_mean, g.p_logvar).flatten(1).sum(1) / t**2 for g, t in zip(groups, taus, strict=True)
        )
        return self.pack([g.z for g in groups]), mu, nlp

    def conditionals(self, x: Tensor | None, z: Tensor, *, allow_out_of_range: bool = False) -> list[GroupGaussians]:
        """The Gaussians of eq. (8) along the latent path ``z`` (packed): per group ``q(z_l | x, z_<l)`` (when ``x``
        is given) and ``p(z_l | z_<l)``, coarsest first."""
        self._check_z(z)
        acts = None
        if x is not None:
            self._check_x(x, allow_out_of_range)
            if x.shape[0] != z.shape[0]:
                raise ValueError(f"x holds {x.shape[0]} images but z {z.shape[0]} latents")
            acts = self._net._bottom_up(x)
        _, groups = self._net._top_down(acts, self._hw, z.shape[0], _given(self.unpack(z)), output=False)
        return groups

    def sample(self, n: int, tau: Temperature = 1.0, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` decoder means ``mu_theta(z)`` for ``z`` drawn from the tempered prior: ``z_l = mu_{theta,l} +
        tau_l sigma_{theta,l} eps_l`` (standard deviations scaled by ``tau_l``, §3.3), ``eps`` from ``generator``."""
        if int(n) != n or int(n) <= 0:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        taus = check_temperature(tau, self.n_groups)
        net = self._net
        eps = torch.randn(int(n), self.latent_shape[0], generator=generator, device=net.device, dtype=net.dtype)
        mu, _ = net._top_down(None, self._hw, int(n), _prior_sample(self.unpack(eps), taus))
        return mu

    def neg_log_likelihood(self, x: Tensor, mu_x: Tensor) -> Tensor:
        """``-log p_theta(x | z) = ||x - mu||^2 / (2 gamma^2) + d (log gamma + log(2 pi) / 2)`` per image (eq. 9)."""
        return self._net.neg_log_likelihood(x, mu_x)


def _tempered_neg_log_prior(groups: list[GroupGaussians], taus: list[float]) -> Tensor:
    """``sum_l (1 / tau_l^2) (-log p(z_l | z_<l))`` per image, ``log(2 pi) / 2`` constants dropped (eq. 15)."""
    return sum(
        gaussian_nll(g.z, g.p_mean, g.p_logvar).flatten(1).sum(1) / t**2 for g, t in zip(groups, taus, strict=True)
    )


def _posterior_mean(k: int, g: GroupGaussians) -> Tensor:
    return g.q_mean


def _given(zs: list[Tensor]) -> Callable[[int, GroupGaussians], Tensor]:
    return lambda k, g: zs[k]


def _tempered(lams: list[float]) -> Callable[[int, GroupGaussians], Tensor]:
    return lambda k, g: tempered_mean(g.q_mean, g.q_logvar, g.p_mean, g.p_logvar, lams[k])


def _posterior_sample(eps: list[Tensor]) -> Callable[[int, GroupGaussians], Tensor]:
    return lambda k, g: g.q_mean + torch.exp(0.5 * g.q_logvar) * eps[k]


def _prior_sample(eps: list[Tensor], taus: list[float]) -> Callable[[int, GroupGaussians], Tensor]:
    return lambda k, g: g.p_mean + taus[k] * torch.exp(0.5 * g.p_logvar) * eps[k]


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------
class HVAE(_PriorAtSize, nn.Module):
    """Fully convolutional hierarchical VAE (PatchVDVAE-style, PnP-HVAE §6.2); a Prior at its nominal size.

    :param image_shape: nominal (training) size ``(C, P, P)``: the size the model is a
        :class:`~jpmap_core.models.Prior` for; :meth:`at_size` gives the same prior for other sizes.
    :param widths: channel width at each resolution, **finest first** (``widths[r]`` at stride ``2^r``); the
        number of resolutions ``R = len(widths)`` sets the total stride ``2^(R-1)``.
    :param groups: number of latent groups at each resolution, finest first (``>= 1`` at the coarsest, which
        holds ``z_0``; ``0`` elsewhere gives a deterministic residual block at that resolution).
    :param latent_channels: channels of each latent group, per resolution (finest first) or one int.
    :param enc_blocks: residual blocks of the bottom-up encoder at each resolution (finest first) or one int.
    :param bottleneck: width ratio of the blocks' middle layers (VDVAE's 0.25).
    :param gamma_init: decoder standard deviation ``gamma``: its initial value when ``learn_gamma``, else its
        fixed value (PnP-HVAE uses a fixed ``decoder_std``, e.g. 10/255, at restoration time).
    :param learn_gamma: learn ``log_gamma`` (a parameter, as :class:`~jpmap_core.models.GaussianVAE`) or keep it
        fixed (a buffer). Both are stored in the state dict under ``log_gamma``.

    The defaults are the shipped ``bsd_patch_hvae`` (32x32 patches, stride 8, ``L = 6`` groups: two at each of
    the strides 8, 4 and 2, none at full resolution; a CPU-sized PatchVDVAE, whose paper version has
    ``L = 18`` and 64x64 receptive field). A small learned ``gamma`` start keeps the latents in use early on (a
    start at 0.1 gave blurred reconstructions that kept ``gamma`` large).
    """

    arch = "hvae"

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        widths: Sequence[int] = (24, 32, 48, 64),
        groups: Sequence[int] = (0, 2, 2, 2),
        latent_channels: int | Sequence[int] = (3, 4, 6, 8),
        enc_blocks: int | Sequence[int] = (1, 1, 2, 2),
        bottleneck: float = 0.25,
        gamma_init: float = 0.03,
        learn_gamma: bool = True,
    ):
        nn.Module.__init__(self)
        if len(image_shape) != 3 or any(int(s) <= 0 for s in image_shape):
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape!r}")
        self.widths = _per_resolution(tuple(widths), len(widths), "widths", 1)
        n_res = len(self.widths)
        if n_res == 0:
            raise ValueError("widths must list at least one resolution")
        self.groups = _per_resolution(tuple(groups), n_res, "groups", 0)
        if self.groups[-1] < 1:
            raise ValueError(f"the coarsest resolution must hold at least the top group z_0: groups={groups!r}")
        self.latent_channels = _per_resolution(latent_channels, n_res, "latent_channels", 1)
        self.enc_blocks = _per_resolution(enc_blocks, n_res, "enc_blocks", 1)
        if not (0 < float(bottleneck) <= 4):
            raise ValueError(f"bottleneck must be a ratio in (0, 4], got {bottleneck!r}")
        self.bottleneck = float(bottleneck)
        if not (math.isfinite(float(gamma_init)) and float(gamma_init) > 0):
            raise ValueError(f"gamma_init must be a finite number > 0, got {gamma_init!r}")
        self.gamma_init, self.learn_gamma = float(gamma_init), bool(learn_gamma)
        self.stride = 2 ** (n_res - 1)
        self.image_shape = tuple(int(s) for s in image_shape)
        c, h, w = self.image_shape
        if h % self.stride or w % self.stride:
            raise ValueError(
                f"image_shape {self.image_shape}: H and W must be multiples of the total stride {self.stride}"
            )

        log_gamma = torch.tensor(math.log(self.gamma_init))
        if self.learn_gamma:
            self.log_gamma = nn.Parameter(log_gamma)
        else:
            self.register_buffer("log_gamma", log_gamma)

        def mid(r: int) -> int:
            return max(1, int(self.widths[r] * self.bottleneck))

        # bottom-up
        n_enc = sum(self.enc_blocks)
        self.in_conv = nn.Conv2d(c, self.widths[0], 3, padding=1)
        self.encoder = nn.ModuleList(
            nn.Sequential(*[
                _Block(self.widths[r], mid(r), self.widths[r], residual=True, scale=math.sqrt(1 / n_enc))
                for _ in range(self.enc_blocks[r])
            ])
            for r in range(n_res)
        )  # fmt: skip
        self.enc_down = nn.ModuleList(_width_change(self.widths[r], self.widths[r + 1]) for r in range(n_res - 1))
        # top-down: groups in order, coarsest first
        n_dec = sum(self.groups) + sum(g == 0 for g in self.groups)
        scale = math.sqrt(1 / n_dec)
        self._group_res: list[int] = [r for r in reversed(range(n_res)) for _ in range(self.groups[r])]
        self.decoder = nn.ModuleList(
            _Group(self.widths[r], self.latent_channels[r], mid(r), scale, top=(k == 0))
            for k, r in enumerate(self._group_res)
        )
        self.dec_up = nn.ModuleList(_width_change(self.widths[r + 1], self.widths[r]) for r in range(n_res - 1))
        self.dec_plain = nn.ModuleDict(
            {str(r): _Block(self.widths[r], mid(r), self.widths[r], residual=True, scale=scale)
             for r in range(n_res) if self.groups[r] == 0}
        )  # fmt: skip
        self.out_conv = nn.Conv2d(self.widths[0], c, 1)

    # ---- structure ------------------------------------------------------------------------------
    @property
    def _net(self) -> HVAE:
        return self

    @property
    def n_groups(self) -> int:
        """``L``, the number of latent groups."""
        return len(self._group_res)

    @property
    def group_strides(self) -> list[int]:
        """Downsampling factor of each latent group, coarsest first."""
        return [2**r for r in self._group_res]

    @property
    def device(self) -> torch.device:
        return self.log_gamma.device

    @property
    def dtype(self) -> torch.dtype:
        return self.log_gamma.dtype

    @property
    def d(self) -> int:
        """Image dimension ``C * P * P`` at the nominal size."""
        c, h, w = self.image_shape
        return c * h * w

    def group_shapes_at(self, h: int, w: int) -> list[tuple[int, int, int]]:
        """``(c_l, h_l, w_l)`` of every latent group for images ``h x w`` (multiples of :attr:`stride`)."""
        self._check_size(h, w)
        return [(self.latent_channels[r], h // 2**r, w // 2**r) for r in self._group_res]

    def _check_size(self, h: int, w: int) -> None:
        if int(h) <= 0 or int(w) <= 0 or h % self.stride or w % self.stride:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the HVAE's total stride {self.stride} "
                f"(2^{len(self.widths) - 1} for its resolutions); pad the image or use hvae.reconstruct, "
                "which pads (reflect) and crops back"
            )

    def at_size(self, h: int, w: int) -> HVAEAtSize:
        """The same prior (shared weights, no copy) for images ``(C, h, w)``: a :class:`~jpmap_core.models.Prior`.

        ``h`` and ``w`` must be multiples of :attr:`stride` (``ValueError`` otherwise)."""
        self._check_size(int(h), int(w))
        return HVAEAtSize(self, int(h), int(w))

    def pack(self, groups: Sequence[Tensor]) -> Tensor:
        """Latent groups ``[(B, c_l, h_l, w_l)]`` (coarsest first) -> one batch-first ``(B, N)`` tensor."""
        if len(groups) != self.n_groups:
            raise ValueError(f"pack expects {self.n_groups} latent groups, got {len(groups)}")
        return torch.cat([g.flatten(1) for g in groups], 1)

    def unpack(self, z: Tensor, hw: tuple[int, int] | None = None) -> list[Tensor]:
        """``(B, N)`` -> the groups ``[(B, c_l, h_l, w_l)]`` for images of size ``hw`` (default: nominal)."""
        shapes = self.group_shapes_at(*(hw or self.image_shape[1:]))
        n = sum(c * h * w for c, h, w in shapes)
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != n:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"z must have shape (B, {n}) for images of size {hw or self.image_shape[1:]}, got {shape}")
        sizes = [c * h * w for c, h, w in shapes]
        return [part.reshape(z.shape[0], *s) for part, s in zip(torch.split(z, sizes, 1), shapes, strict=True)]

    def config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable (stored in manifests; :func:`build_model` rebuilds the model)."""
        return {
            "arch": self.arch,
            "image_shape": list(self.image_shape),
            "widths": list(self.widths),
            "groups": list(self.groups),
            "latent_channels": list(self.latent_channels),
            "enc_blocks": list(self.enc_blocks),
            "bottleneck": self.bottleneck,
            "gamma_init": self.gamma_init,
            "learn_gamma": self.learn_gamma,
        }

    # ---- passes ---------------------------------------------------------------------------------
    def _bottom_up(self, x: Tensor) -> list[Tensor]:
        """Encoder activations at every resolution, finest first."""
        h = self.in_conv(x)
        acts = []
        for r, blocks in enumerate(self.encoder):
            h = blocks(h)
            acts.append(h)
            if r < len(self.enc_down):
                h = self.enc_down[r](F.avg_pool2d(h, 2))
        return acts

    def _top_down(
        self,
        acts: list[Tensor] | None,
        hw: tuple[int, int],
        batch: int,
        choose: Callable[[int, GroupGaussians], Tensor],
        *,
        output: bool = True,
    ) -> tuple[Tensor | None, list[GroupGaussians]]:
        """One top-down pass; ``choose(l, gaussians)`` picks ``z_l``. Returns the decoder mean and every group's
        Gaussians (posteriors only when ``acts`` is given)."""
        n_res = len(self.widths)
        h: Tensor | None = None
        groups: list[GroupGaussians] = []
        k = 0  # group index
        for r in reversed(range(n_res)):
            if r < n_res - 1:
                h = self.dec_up[r](F.interpolate(h, scale_factor=2, mode="nearest"))
            for _ in range(self.groups[r]):
                blk = self.decoder[k]
                if k == 0:
                    shape = (batch, self.latent_channels[r], hw[0] // 2**r, hw[1] // 2**r)
                    p_mean = torch.zeros(shape, device=self.device, dtype=self.dtype)
                    p_logvar = p_mean
                else:
                    p_mean, p_logvar, h = blk.prior_stats(h)
                g = GroupGaussians(z=p_mean, p_mean=p_mean, p_logvar=p_logvar)
                if acts is not None:
                    g.q_mean, g.q_logvar = blk.posterior_stats(h, acts[r])
                g.z = choose(k, g)
                groups.append(g)
                k += 1
                if not output and k == self.n_groups:
                    return None, groups
                h = blk.absorb(h, g.z)
            if self.groups[r] == 0:
                h = self.dec_plain[str(r)](h)
        return torch.sigmoid(self.out_conv(h)), groups

    # ---- any-size helpers ------------------------------------------------------------------------
    def _check_any_size(self, x: Tensor, name: str = "x", *, check_range: bool = True) -> Tensor:
        check_tensor4d(x, name)
        if x.shape[1] != self.image_shape[0]:
            raise ValueError(
                f"{name} has {x.shape[1]} channels but the HVAE models {self.image_shape[0]}-channel images"
            )
        return check_images(x, name, check_range=check_range)

    def reconstruct(self, x: Tensor, tau: Temperature = 1.0, *, allow_out_of_range: bool = False) -> Tensor:
        """``HVAE(x, tau) = mu_theta(E_tau(x))`` (Proposition 1; Algorithm 1 then the decoder) for images of **any**
        size: reflect-padded to multiples of :attr:`stride` (replicate when an image is smaller than its pad),
        cropped back. One pass: the decoder mean comes out of the same top-down pass as ``E_tau``."""
        lams = [1.0 / t**2 - 1.0 for t in check_temperature(tau, self.n_groups)]
        self._check_any_size(x, check_range=not allow_out_of_range)
        xp, crop = pad_to_multiple(x, self.stride)
        mu, _ = self._top_down(self._bottom_up(xp), tuple(xp.shape[-2:]), x.shape[0], _tempered(lams))
        return mu[..., crop[0], crop[1]]

    def sample(
        self,
        n: int,
        tau: Temperature = 1.0,
        *,
        generator: torch.Generator | None = None,
        size: tuple[int, int] | None = None,
    ) -> Tensor:
        """``n`` decoder means of the tempered prior at ``size`` ``(H, W)`` (default: nominal; see
        :meth:`HVAEAtSize.sample`)."""
        target = self if size is None else self.at_size(*size)
        return _PriorAtSize.sample(target, n, tau, generator=generator)

    # ---- training terms ---------------------------------------------------------------------------
    def neg_log_likelihood(self, x: Tensor, mu_x: Tensor) -> Tensor:
        """``-log p_theta(x | z)`` per image for ``p = N(mu_x, gamma^2 I)`` (eq. 9), ``d`` from ``x``'s size."""
        sq = (x - mu_x).flatten(1).pow(2).sum(1)
        d = x[0].numel()
        return 0.5 * sq * torch.exp(-2 * self.log_gamma) + d * (self.log_gamma + 0.5 * LOG_2PI)

    def forward(self, x: Tensor, x_enc: Tensor | None = None, eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(neg_log_likelihood (B,), per-group KL (B, L))`` of the one-sample ELBO (unchecked; see :meth:`elbo`).

        ``eps`` is the packed standard normal noise ``(B, N)`` of the reparameterisation (one sample per group);
        the trainer draws it so that a batch split over processes uses the same numbers as one process.
        """
        hw = (x.shape[-2], x.shape[-1])
        if eps is None:
            n = sum(c * h * w for c, h, w in self.group_shapes_at(*hw))
            eps = torch.randn(x.shape[0], n, device=x.device, dtype=x.dtype)
        acts = self._bottom_up(x if x_enc is None else x_enc)
        mu, groups = self._top_down(acts, hw, x.shape[0], _posterior_sample(self.unpack(eps, hw)))
        kl = torch.stack([gaussian_kl(g.q_mean, g.q_logvar, g.p_mean, g.p_logvar).flatten(1).sum(1) for g in groups], 1)
        return self.neg_log_likelihood(x, mu), kl

    def elbo_terms(
        self, x: Tensor, x_enc: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(-log p(x | z) (B,), KL(q(z_l | x, z_<l) || p(z_l | z_<l)) (B, L))``, nats, one reparameterised
        sample ``z ~ q(z | x)`` per group, analytic Gaussian KLs (eq. 4 with eqs. 6-8).

        ``x`` may have any size that is a multiple of :attr:`stride`. With ``x_enc`` (a noisy ``x``) the encoder
        sees ``x_enc`` and the decoder must explain ``x`` (the denoising criterion of JPMAP eq. 3.2).
        """
        self._check_any_size(x)
        self._check_size(x.shape[-2], x.shape[-1])
        if x_enc is not None:
            check_tensor4d(x_enc, "x_enc")
            if x_enc.shape != x.shape:
                raise ValueError(f"x_enc has shape {tuple(x_enc.shape)} but x has shape {tuple(x.shape)}")
        n = sum(c * h * w for c, h, w in self.group_shapes_at(x.shape[-2], x.shape[-1]))
        eps = torch.randn(x.shape[0], n, generator=generator, device=x.device, dtype=x.dtype)
        return self(x, x_enc, eps)

    def elbo(self, x: Tensor, x_enc: Tensor | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """Per-image ELBO in nats, ``log p(x | z) - sum_l KL_l`` (one-sample estimate; see :meth:`elbo_terms`)."""
        nll, kl = self.elbo_terms(x, x_enc, generator=generator)
        return -(nll + kl.sum(1))

    def kl_per_group(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``KL(q(z_l | x, z_<l) || p(z_l | z_<l))`` per image and group, ``(B, L)`` nats (for logging)."""
        return self.elbo_terms(x, generator=generator)[1]


class HVAEAtSize(_PriorAtSize):
    """An :class:`HVAE` as a :class:`~jpmap_core.models.Prior` for images ``(C, H, W)``; shares the model's weights
    (a light view: moving or training the model moves or trains it). Made by :meth:`HVAE.at_size`."""

    def __init__(self, model: HVAE, h: int, w: int):
        self.model = model
        self.image_shape = (model.image_shape[0], h, w)

    @property
    def _net(self) -> HVAE:
        return self.model

    @property
    def d(self) -> int:
        c, h, w = self.image_shape
        return c * h * w

    def at_size(self, h: int, w: int) -> HVAEAtSize:
        return self.model.at_size(h, w)

    def reconstruct(self, x: Tensor, tau: Temperature = 1.0, *, allow_out_of_range: bool = False) -> Tensor:
        """:meth:`HVAE.reconstruct` (any size)."""
        return self.model.reconstruct(x, tau, allow_out_of_range=allow_out_of_range)

    def __repr__(self) -> str:
        return f"HVAEAtSize(image_shape={self.image_shape}, model={type(self.model).__name__})"


def _width_change(cin: int, cout: int) -> nn.Module:
    return nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, tuple[slice, slice]]:
    """``x`` reflect-padded (split between both sides) so that H and W are multiples of ``multiple``, and the
    slices that crop the padded result back (replicate padding where an image is too small to reflect)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (slice(None), slice(None))
    top, left = ph // 2, pw // 2
    pads = (left, pw - left, top, ph - top)
    mode = "reflect" if max(pads[2:]) < h and max(pads[:2]) < w else "replicate"
    return F.pad(x, pads, mode=mode), (slice(top, top + h), slice(left, left + w))
