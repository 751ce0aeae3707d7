r"""PnP-HVAE (Prost, Houdard, Almansa, Papadakis, ICCV 2023): Algorithm 2 and the Adam baseline of §5.3, batched.

**Problem** (§4.1). For ``y = A x + n`` with ``n ~ N(0, sigma^2 I)`` (eq. 11) and a hierarchical VAE with the Gaussian
decoder ``p(x | z) = N(mu_theta(z), gamma^2 I)`` (eq. 9), PnP-HVAE maximises the tempered joint posterior (eqs. 12-14),
i.e. minimises (eq. 15, :func:`j1_pnp_hvae`)

.. math::

    J_1(x, z) = \frac{\|Ax - y\|^2}{2\sigma^2} + \frac{\|x - \mu_\theta(z)\|^2}{2\gamma^2}
                - \sum_{l=0}^{L-1} \frac{1}{\tau_l^2} \log p_\theta(z_l \mid z_{<l})

with the constants dropped (``d log(sqrt(2 pi) gamma)`` of the decoder, ``d_l log(2 pi) / 2`` of each latent group and
eq. 10's normaliser ``tau_l^{d_l / 2}``; the log-variances of the conditional priors, which depend on ``z_<l``, stay).
The printed eq. 15 starts its sum at ``l = 1``; eq. 14, which it comes from, at ``l = 0``, as here.

**Algorithm 2** (:func:`pnp_hvae`) alternates, from ``x_0``,

* the z-step ``z_{k+1} = E_tau(x_k)``: Algorithm 1 (eq. 18), the greedy minimiser of ``J2(x_k, .)`` (eq. 17), which
  replaces the decoder by the encoder (:func:`hvae_step`);
* the x-step ``x_{k+1} = (A^T A + sigma^2/gamma^2 I)^{-1} (A^T y + sigma^2/gamma^2 mu_theta(z_{k+1}))``, the exact
  minimiser of ``J1(., z_{k+1})`` (:func:`x_step`),

so that (Proposition 1, eq. 19) ``x_{k+1} = T(x_k) = prox_{gamma^2 f}(HVAE(x_k, tau))`` with ``HVAE(x, tau) =
mu_theta(E_tau(x))`` (:func:`T`): plug-and-play half-quadratic splitting with the tempered HVAE reconstruction as the
denoiser. By Proposition 2 (eq. 20) ``T`` is ``sigma^2 / (gamma^2 lambda_min(A^T A) + sigma^2) L_tau``-Lipschitz when
the reconstruction is ``L_tau``-Lipschitz; Proposition 3 (eq. 21) characterises its fixed points. Fig. 2 (right)
plots ``L_k = ||T(x_{k+1}) - T(x_k)|| / ||x_{k+1} - x_k||`` (``record_lipschitz=True``).

**The Adam baseline** (§5.3, Fig. 2 and Table 1; :func:`adam_j1`) minimises the same ``J1`` jointly over ``x`` and every
latent group by back-propagating through the decoder, with Adam (lr 0.01 or 0.001).

**Stopping** (both methods, every image on its own): the official code's plateau rule (``utils_scheduler.State_fn``
with ``track: residual``). With ``r_k = ||x_k - x_{k-1}||^2 / d`` (the code's ``rk``, the mean squared step), iteration
``k`` *improves* when ``r_k < (1 - tol) min_{j<k} r_j``; an image stops once ``patience + 1`` consecutive iterations
did not improve, or after ``max_iters`` iterations. Algorithm 2's own test, ``res > tol``, stops it too when
``||x_k - x_{k-1}|| / sqrt(d) < atol``; the paper gives no value and the official code has no such test, so the
default ``atol = 1e-6`` (a millionth of the intensity range per pixel) only stops images whose iterates have settled
to rounding, where the relative plateau test would be deciding on rounding noise (``atol = 0``: the official rule
alone). ``converged`` says that one of the two tests fired.

**Image sizes.** The HVAE is fully convolutional (PatchVDVAE, §6.2): images whose height and width are multiples of
its total stride use the prior at their own size (:meth:`~jpmap_core.models.HVAE.at_size`); other images are
reflect-padded for the HVAE (encoder and decoder) and ``mu_theta(z)`` is cropped back, while the x-step, the data
term and the coupling stay at the image's size. ``z`` then holds the packed latents of the *padded* image: unpack it
with ``hvae.at_size(*info["latent_size"])``.

**Defaults** (paper and official code, github.com/jprost76/PnP-HVAE, ``conf/``):
``tau = 0.8`` (§6.3 sets 0.95, 0.8, 0.6 for sigma = 2.55, 7.65, 12.75; ``bsd_deblurring.yaml`` recommends the same
values and runs the linear schedule ``linear_temperature(0.8, 0.6, L)``); ``max_iters = 50`` (§6.3 BSD deblurring, and
every official config but face inpainting's 100; §6.3 inpainting runs 200); ``tol = 1e-3`` (the deblurring and SR
configs) and ``patience = 10`` (the face deblurring and SR configs; the BSD config's 50 equals its ``maxiter``, so it
never stops early); ``gamma`` the prior's decoder std (the configs fix ``decoder_std`` 10/255 for BSD, 5/255 and
3/255 for faces: pass ``gamma=10/255``); the encoder's input clamped to [0, 1] (``clamp=True``, as the official
wrappers do). ``x_0`` (``init="official"``, the code's ``get_x0``): ``y`` itself when measurements are images of the
image's size (denoising, deblurring, inpainting: the noisy observation, missing pixels included), a bicubic upsampling
of ``y`` for super-resolution (:func:`bicubic_upsample`), and ``A_dagger(y)`` otherwise (no official counterpart).

**Where this differs from the official code** (on purpose): its first x-step starts from the decoding of one
untempered posterior *sample* ``z ~ q(z | x_0)`` (then it alternates as Algorithm 2); here Algorithm 2 runs from
``x_0`` (``z_1 = E_tau(x_0)``) and the Adam baseline starts from the encoder's means, so that a run is deterministic.
Its objective (logged, and the baseline's loss) evaluates each prior with the standard deviation *divided* by
``tau_l`` (``gaussian_ll(..., t=T)``), i.e. weighs the quadratic term by ``tau_l^2``; here both use eq. 15's
``1 / tau_l^2`` (the z-step's ``lambda_l = 1/tau_l^2 - 1`` is the same in both). The official result is
``HVAE(x_n, tau)``, one z-step after ``x_n``: :func:`pnp_hvae` returns it as ``per_image["reconstruction"]``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_positive, check_tensor4d
from ..energy import Sigma, check_sigma, coupling, data_fidelity, noise_std, sigma_info, sigma_rows
from ..models import HVAE, HVAEAtSize, check_prior, check_temperature
from ..models.hvae import Temperature, pad_to_multiple
from ._common import AdamPool, Clock, History, Restoration

INITS = ("official", "dagger", "adjoint")


# ------------------------------------------------------------------------------------------------
# The pieces of one iteration
# ------------------------------------------------------------------------------------------------
class HVAEStep(NamedTuple):
    """One pass of the HVAE on images ``x``: ``z = E_tau(x)`` (Algorithm 1, packed at the padded size),
    ``x_decoded = mu_theta(z) = HVAE(x, tau)`` (cropped to ``x``'s size) and ``neg_log_prior =
    -sum_l log p(z_l | z_<l) / tau_l^2`` per image (the prior term of eq. 15)."""

    z: Tensor
    x_decoded: Tensor
    neg_log_prior: Tensor


def as_hvae(prior: object, method: str) -> HVAE:
    """The :class:`~jpmap_core.models.HVAE` behind ``prior`` (the model or a sized view of it), else a ``TypeError``."""
    check_prior(prior)
    if isinstance(prior, HVAEAtSize):
        return prior.model
    if isinstance(prior, HVAE):
        return prior
    raise TypeError(
        f"{method} needs a hierarchical VAE prior (jpmap_core.models.HVAE or a view from hvae.at_size), got "
        f"{type(prior).__name__}; for a Gaussian VAE use 'jpmap' or 'csgm'"
    )


def latent_size(prior: HVAE | HVAEAtSize, h: int, w: int) -> tuple[int, int]:
    """``(H, W)`` rounded up to multiples of the HVAE's total stride: the size its latents ``z`` describe."""
    s = as_hvae(prior, "latent_size").stride
    return h + (-h) % s, w + (-w) % s


def hvae_step(x: Tensor, prior: HVAE | HVAEAtSize, tau: Temperature, *, clamp: bool = True) -> HVAEStep:
    """The z-step of Algorithm 2, ``z = E_tau(x)`` (Algorithm 1), with ``HVAE(x, tau) = mu_theta(z)`` (Proposition 1)
    and the tempered prior term of ``J1`` (eq. 15), for images ``x`` of any size (module docstring).

    ``clamp``: the encoder sees ``x`` clamped to [0, 1], as in the official code (an x-step on noisy data leaves
    [0, 1]); ``clamp=False`` encodes ``x`` as it is.
    """
    net = as_hvae(prior, "hvae_step")
    x_in = x.clamp(0.0, 1.0) if clamp else x
    xp, crop = pad_to_multiple(x_in, net.stride)
    z, mu, nlp = net.at_size(xp.shape[-2], xp.shape[-1]).tempered_autoencode(xp, tau, allow_out_of_range=not clamp)
    return HVAEStep(z, mu[..., crop[0], crop[1]], nlp)


def x_step(x_decoded: Tensor, y: Tensor, op: Any, *, sigma: Sigma, gamma: float) -> Tensor:
    r"""The x-step of Algorithm 2 (§4.3): the exact minimiser of ``J1(., z)`` (eq. 15), ``x_decoded = mu_theta(z)``,

    .. math:: x = (A^T A + \tfrac{\sigma^2}{\gamma^2} I)^{-1} (A^T y + \tfrac{\sigma^2}{\gamma^2} \mu_\theta(z))
              = \mathrm{prox}_{\gamma^2 f}(\mu_\theta(z)),

    i.e. ``op.prox_l2(mu_theta(z), y, gamma^2 / sigma^2)`` (``prox_l2(v, y, g) = argmin_x g/2 ||Ax - y||^2 + 1/2
    ||x - v||^2``; dividing the normal equations by ``sigma^2 / gamma^2`` gives ``g = gamma^2 / sigma^2``).
    ``sigma``: noise std on the 0-255 scale, a number or one per image; ``gamma``: decoder std on the [0, 1] scale.
    """
    s = noise_std(sigma, x_decoded)
    return op.prox_l2(x_decoded, y, gamma**2 / (s * s))


def T(
    x: Tensor,
    y: Tensor,
    op: Any,
    prior: HVAE | HVAEAtSize,
    *,
    sigma: Sigma,
    tau: Temperature,
    gamma: float | None = None,
    clamp: bool = True,
) -> Tensor:
    """One iteration of Algorithm 2 as Proposition 1 writes it (eq. 19): ``T(x) = prox_{gamma^2 f}(HVAE(x, tau))``.

    ``gamma`` defaults to the prior's decoder std; ``clamp`` as in :func:`hvae_step`.
    """
    g = decoder_gamma(prior, gamma)
    return x_step(hvae_step(x, prior, tau, clamp=clamp).x_decoded, y, op, sigma=sigma, gamma=g)


def j1_pnp_hvae(
    x: Tensor,
    z: Tensor,
    y: Tensor,
    op: Any,
    prior: HVAE | HVAEAtSize,
    *,
    sigma: Sigma,
    tau: Temperature,
    gamma: float | None = None,
) -> Tensor:
    """PnP-HVAE's ``J1(x, z)`` (eq. 15) per image ``(B,)``: ``||Ax - y||^2 / (2 sigma^2) + ||x - mu_theta(z)||^2 /
    (2 gamma^2) - sum_l log p(z_l | z_<l) / tau_l^2``, constants dropped (module docstring).

    ``z``: packed latents at :func:`latent_size` of ``x`` (the padded size when ``x``'s is not a multiple of the
    stride; ``mu_theta(z)`` is then cropped to ``x``'s size). ``gamma`` defaults to the prior's decoder std.
    """
    net = as_hvae(prior, "j1_pnp_hvae")
    mu, nlp = _decode_with_prior(net, z, x.shape[-2:], tau, check=True)
    return _j1(x, mu, nlp, y, op, sigma, decoder_gamma(prior, gamma))


def decoder_gamma(prior: HVAE | HVAEAtSize, gamma: float | None) -> float:
    """``gamma`` (checked > 0), or the prior's decoder std when ``None``."""
    if gamma is None:
        return float(as_hvae(prior, "decoder_gamma").gamma.detach())
    return check_positive(gamma, "gamma (the decoder std on the [0, 1] scale)")


def bicubic_upsample(y: Tensor, factor: int) -> Tensor:
    """``(B, C, h, w) -> (B, C, h s, w s)``: bicubic interpolation (Keys, ``a = -0.75``) in which pixel ``j`` of ``y``
    lands on pixel ``s j`` (the decimation grid of :class:`~jpmap_core.operators.SuperResolution`), border values
    replicated beyond the last sample.

    The official ``x0`` for super-resolution: ``cv2.resize(..., INTER_CUBIC)`` (half-pixel centres) followed by
    ``shift_pixel``, which moves the result by ``(s - 1) / 2`` pixels to the same grid; here one interpolation.
    """
    s = int(factor)
    b, _, h, w = y.shape

    def coords(n_lo: int) -> Tensor:  # low-resolution coordinate j / s of pixel j, normalised to [-1, 1]
        u = torch.arange(n_lo * s, dtype=y.dtype, device=y.device) / s
        return 2 * u / (n_lo - 1) - 1 if n_lo > 1 else torch.zeros_like(u)

    gy, gx = torch.meshgrid(coords(h), coords(w), indexing="ij")
    grid = torch.stack([gx, gy], -1).expand(b, -1, -1, -1)
    return F.grid_sample(y, grid, mode="bicubic", padding_mode="border", align_corners=True)


# ------------------------------------------------------------------------------------------------
# Internals shared by both solvers
# ------------------------------------------------------------------------------------------------
def _decode_with_prior(net: HVAE, z: Tensor, hw: Any, tau: Temperature, *, check: bool) -> tuple[Tensor, Tensor]:
    """``(mu_theta(z)`` cropped to ``hw``, ``neg_log_prior(z, tau))`` for latents ``z`` at the padded size of ``hw``."""
    h, w = int(hw[0]), int(hw[1])
    hp, wp = latent_size(net, h, w)
    mu, nlp = net.at_size(hp, wp).decode_with_prior(z, tau, check=check)
    top, left = ((hp - h) // 2), ((wp - w) // 2)  # pad_to_multiple splits the pad between both sides
    return mu[..., top : top + h, left : left + w], nlp


def _j1(x: Tensor, mu: Tensor, nlp: Tensor, y: Tensor, op: Any, sigma: Sigma, gamma: float) -> Tensor:
    return data_fidelity(x, y, op, sigma) + coupling(x, mu) / (2 * gamma**2) + nlp


def _op_rows(op: Any, idx: Tensor, batch: int) -> Any:
    """The operator of images ``idx`` (``op`` itself for the whole batch), or ``None`` when it cannot be restricted."""
    if idx.numel() == batch:
        return op
    rows = getattr(op, "rows", None)
    return rows(idx) if callable(rows) else None


def _embed(rows: Tensor, idx: Tensor, batch: int) -> Tensor:
    """``rows`` placed at ``idx`` of a zero batch (differentiable), for operators that act on whole batches only."""
    return rows.new_zeros(batch, *rows.shape[1:]).index_copy(0, idx, rows)


class _Problem:
    """A checked problem: ``y``, ``op``, per-image ``sigma``, the HVAE, ``tau`` per group, ``gamma``, ``x0``."""

    def __init__(self, y, op, prior, sigma, tau, gamma, x0, init, method: str) -> None:
        self.net = as_hvae(prior, method)
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if not torch.is_floating_point(y):
            raise TypeError(f"y must be a floating tensor, got dtype {y.dtype}")
        if y.dim() == 0:
            raise ValueError("y must have a batch dimension, got a 0-dimensional tensor")
        if not bool(torch.isfinite(y).all()):
            raise ValueError(f"y contains {int((~torch.isfinite(y)).sum())} NaN or infinite values")
        for name in ("A", "A_adjoint", "prox_l2"):
            if not callable(getattr(op, name, None)):
                raise TypeError(f"op must provide {name}() (a jpmap_core.operators operator); got {type(op).__name__}")
        if not isinstance(sigma, Tensor):
            check_sigma(sigma)
        self.taus = check_temperature(tau, self.net.n_groups)
        self.gamma = decoder_gamma(self.net, gamma)
        self.B = y.shape[0]
        self.sigma = check_sigma(sigma, self.B)
        if isinstance(self.sigma, Tensor):
            self.sigma = self.sigma.to(dtype=y.dtype, device=y.device)
        x_adj = op.A_adjoint(y)  # checks y against the operator ("y has shape ... but ... produces ...")
        check_tensor4d(x_adj, "A^T y")
        if x0 is None:
            x0 = initial_x(y, op, init, x_adj)
        check_tensor4d(x0, "x0")
        if tuple(x0.shape) != tuple(x_adj.shape):
            raise ValueError(
                f"x0 has shape {tuple(x0.shape)} but the operator's images have shape {tuple(x_adj.shape)}"
            )
        c = self.net.image_shape[0]
        if x0.shape[1] != c:
            raise ValueError(
                f"the images have {x0.shape[1]} channels (shape {tuple(x0.shape)}) but the HVAE models {c}"
            )
        self.y, self.op, self.x0 = y, op, x0.detach().clone()
        self.shape = tuple(x0.shape[1:])
        self.d = math.prod(self.shape)
        self.latent_size = latent_size(self.net, self.shape[1], self.shape[2])

    def rows(self, idx: Tensor) -> tuple[Any, Tensor, Sigma]:
        """``(op, y, sigma)`` of images ``idx``; ``op`` is ``None`` when the operator cannot be restricted."""
        return _op_rows(self.op, idx, self.B), self.y[idx], sigma_rows(self.sigma, idx)

    def x_step_rows(self, mu: Tensor, idx: Tensor) -> Tensor:
        op, y, sigma = self.rows(idx)
        if op is not None:
            return x_step(mu, y, op, sigma=sigma, gamma=self.gamma)
        return x_step(_embed(mu, idx, self.B), self.y, self.op, sigma=self.sigma, gamma=self.gamma)[idx]

    def j1_rows(self, x: Tensor, mu: Tensor, nlp: Tensor, idx: Tensor) -> Tensor:
        op, y, sigma = self.rows(idx)
        if op is not None:
            return _j1(x, mu, nlp, y, op, sigma, self.gamma)
        fid = data_fidelity(_embed(x, idx, self.B), self.y, self.op, self.sigma)[idx]
        return fid + coupling(x, mu) / (2 * self.gamma**2) + nlp

    def T_rows(self, x: Tensor, idx: Tensor, clamp: bool) -> tuple[Tensor, HVAEStep]:
        step = hvae_step(x, self.net, self.taus, clamp=clamp)
        return self.x_step_rows(step.x_decoded, idx), step

    def info(self, method: str) -> dict[str, Any]:
        return {
            "method": method,
            "sigma": sigma_info(self.sigma),
            "tau": list(self.taus),
            "gamma": self.gamma,
            "image_size": self.shape[1:],
            "latent_size": self.latent_size,
        }


def initial_x(y: Tensor, op: Any, init: str, x_adj: Tensor | None = None) -> Tensor:
    """``x_0`` of both solvers: ``"official"`` (module docstring: ``y``, or :func:`bicubic_upsample` of ``y`` for
    super-resolution, else ``A_dagger(y)``), ``"dagger"`` (``A_dagger(y)``, JPMAP §3.4) or ``"adjoint"`` (``A^T y``)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {', '.join(map(repr, INITS))}")
    if x_adj is None:
        x_adj = op.A_adjoint(y)
    if init == "adjoint":
        return x_adj
    if init == "official":
        if y.shape == x_adj.shape:
            return y
        if y.dim() == 4 and y.shape[:2] == x_adj.shape[:2]:
            (h, w), (H, W) = y.shape[-2:], x_adj.shape[-2:]
            if H % h == 0 and W % w == 0 and H // h == W // w:
                return bicubic_upsample(y, H // h)
    return op.A_dagger(y)


class Plateau:
    """The official stopping rule (``State_fn``, ``track: residual``), per image: iteration ``k`` improves when
    ``r_k < (1 - tol) min_{j<k} r_j``; an image stops after ``patience + 1`` iterations in a row without improving."""

    def __init__(self, batch: int, tol: float, patience: int, like: Tensor) -> None:
        self.tol, self.patience = tol, patience
        self.best = torch.full((batch,), math.inf, dtype=like.dtype, device=like.device)
        self.count = torch.zeros(batch, dtype=torch.long, device=like.device)

    def update(self, idx: Tensor, r: Tensor) -> Tensor:
        """Images ``idx`` made a step with mean squared residual ``r``; returns which of them stop (bool)."""
        improved = r < (1 - self.tol) * self.best[idx]
        self.best[idx] = torch.where(improved, r, self.best[idx])
        self.count[idx] = torch.where(improved, torch.zeros_like(self.count[idx]), self.count[idx] + 1)
        return self.count[idx] > self.patience


def _check_options(max_iters: int, tol: float, patience: int, atol: float) -> None:
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be an integer >= 1, got {max_iters!r}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise ValueError(f"patience must be an integer >= 0 (iterations without improvement), got {patience!r}")
    for name, v in (("tol", tol), ("atol", atol)):
        if not (isinstance(v, int | float) and math.isfinite(v) and 0 <= v < 1):
            raise ValueError(f"{name} must be a number in [0, 1), got {v!r}")


def _stops(rule: Plateau, idx: Tensor, step: Tensor, d: int, atol: float) -> Tensor:
    """Which of images ``idx`` stop after a step of norm ``step`` (the plateau rule, or ``||step||/sqrt(d) < atol``)."""
    stop = rule.update(idx, step.pow(2) / d)
    return stop | (step / math.sqrt(d) < atol) if atol > 0 else stop


def _lipschitz_from_residuals(res: Tensor, count: Tensor, last: Tensor) -> Tensor:
    """``L_k = ||x_{k+1} - x_k|| / ||x_k - x_{k-1}||`` per row ``(T, B)`` from the residuals of Algorithm 2
    (``T(x_k) = x_{k+1}``); the last row of image ``b`` uses ``last[b] = ||T(x_n) - x_n||``."""
    L = torch.full_like(res, math.nan)
    L[:-1] = res[1:] / res[:-1]
    cols = torch.arange(res.shape[1])
    n = count.to(torch.long).cpu() - 1
    L[n, cols] = last.cpu().to(res.dtype) / res[n, cols]
    return L


# ------------------------------------------------------------------------------------------------
# Algorithm 2
# ------------------------------------------------------------------------------------------------
def pnp_hvae(
    y: Tensor,
    op: Any,
    prior: HVAE | HVAEAtSize,
    *,
    sigma: Sigma,
    tau: Temperature = 0.8,
    max_iters: int = 50,
    tol: float = 1e-3,
    patience: int = 10,
    atol: float = 1e-6,
    gamma: float | None = None,
    x0: Tensor | None = None,
    init: str = "official",
    clamp: bool = True,
    record_lipschitz: bool = False,
) -> Restoration:
    """Restore ``y = A x + noise`` (noise std ``sigma`` on the 0-255 scale) with PnP-HVAE, Algorithm 2.

    :param y: measurements of ``op`` ``(B, ...)``.
    :param prior: an :class:`~jpmap_core.models.HVAE` (or a sized view; images of any size are restored, see the
        module docstring).
    :param sigma: a number or a ``(B,)`` tensor of per-image noise stds (0-255 scale).
    :param tau: temperature: one number, one per latent group, or a schedule ``l -> tau_l``, each in (0, 1]
        (``lambda_l = 1 / tau_l^2 - 1``, eq. 18). Default 0.8 (module docstring).
    :param max_iters: at most this many iterations per image (default 50: §6.3 deblurring).
    :param tol, patience, atol: the official plateau rule on the residual and Algorithm 2's test (module docstring).
    :param gamma: decoder std on the [0, 1] scale (default: the prior's); the x-step weighs ``sigma^2 / gamma^2``.
    :param x0, init: the first iterate, or how to make it: ``"official"`` (default), ``"dagger"``, ``"adjoint"``.
    :param clamp: clamp the encoder's input to [0, 1] (official code).
    :param record_lipschitz: also record ``L_k`` (Fig. 2 right) in ``history["lipschitz"]``.

    Returns a :class:`~jpmap_core.solvers.Restoration` with

    * ``x``: the last iterate ``x_n`` (Algorithm 2 returns it), image by image;
    * ``z``: ``z_n = E_tau(x_{n-1})``, the latent of the last x-step (packed, at ``info["latent_size"]``);
    * ``x_decoded``: ``mu_theta(z_n)``, the decoder mean ``x_n`` was computed from;
    * ``per_image["reconstruction"]``: ``HVAE(x_n, tau) = mu_theta(E_tau(x_n))``, one z-step further, which is what
      the official code saves as its result (``muk``); at a fixed point of ``T`` the two coincide (Proposition 3);
    * ``converged``: the plateau rule or the ``atol`` test stopped the image (else ``max_iters`` did); ``iterations``:
      ``n``;
    * ``history`` rows ``k = 1..n`` of each image: ``"objective"`` ``J1(x_k, z_k)`` (eq. 15, :func:`j1_pnp_hvae`),
      ``"residual"`` ``||x_k - x_{k-1}||``, ``"seconds"``, and with ``record_lipschitz`` ``"lipschitz"``
      ``L_k = ||T(x_k) - T(x_{k-1})|| / ||x_k - x_{k-1}||`` ``= ||x_{k+1} - x_k|| / ||x_k - x_{k-1}||`` (the last row
      evaluates ``T(x_n)`` once more).
    """
    _check_options(max_iters, tol, patience, atol)
    pb = _Problem(y, op, prior, sigma, tau, gamma, x0, init, "pnp_hvae")
    clock = Clock()
    B, dev = pb.B, pb.x0.device
    x = pb.x0.clone()
    z = torch.zeros(B, pb.net.at_size(*pb.latent_size).latent_shape[0], dtype=x.dtype, device=dev)
    mu = torch.zeros_like(x)
    iterations = torch.zeros(B, dtype=torch.long, device=dev)
    converged = torch.zeros(B, dtype=torch.bool, device=dev)
    running = torch.ones(B, dtype=torch.bool, device=dev)
    rule, history = Plateau(B, tol, patience, x), History(B)
    passes = 0
    with torch.no_grad():
        while bool(running.any()):
            idx = running.nonzero().squeeze(1)
            x_new, step = pb.T_rows(x[idx], idx, clamp)  # z-step (Alg. 1) then x-step: eq. (19)
            passes += 1
            residual = (x_new - x[idx]).flatten(1).norm(dim=1)
            x[idx], z[idx], mu[idx] = x_new, step.z, step.x_decoded
            iterations[idx] += 1
            J = pb.j1_rows(x_new, step.x_decoded, step.neg_log_prior, idx)
            seconds = torch.full((idx.numel(),), clock(), dtype=torch.float64)
            history.record(idx, objective=J, residual=residual, seconds=seconds)
            stop = _stops(rule, idx, residual, pb.d, atol)
            converged[idx[stop]] = True
            running[idx[stop | (iterations[idx] >= max_iters)]] = False
        everyone = torch.arange(B, device=dev)
        final = hvae_step(x, pb.net, pb.taus, clamp=clamp)  # HVAE(x_n, tau): the official output
        passes += 1
        stacked = history.stack()
        if record_lipschitz:
            Tx = pb.x_step_rows(final.x_decoded, everyone)
            stacked["lipschitz"] = _lipschitz_from_residuals(
                stacked["residual"], history.count, (Tx - x).flatten(1).norm(dim=1)
            )
    info = pb.info("pnp_hvae")
    info.update(
        max_iters=max_iters, tol=tol, patience=patience, atol=atol, init=init if x0 is None else "x0", clamp=clamp,
        batched_steps=passes, seconds=clock(),
    )  # fmt: skip
    return Restoration(
        x=x,
        z=z,
        x_decoded=mu,
        converged=converged,
        iterations=iterations,
        history=stacked,
        info=info,
        per_image={"reconstruction": final.x_decoded},
    )


# ------------------------------------------------------------------------------------------------
# The Adam baseline
# ------------------------------------------------------------------------------------------------
def adam_j1(
    y: Tensor,
    op: Any,
    prior: HVAE | HVAEAtSize,
    *,
    sigma: Sigma,
    tau: Temperature = 0.8,
    lr: float = 0.01,
    max_iters: int = 50,
    tol: float = 1e-3,
    patience: int = 10,
    atol: float = 1e-6,
    gamma: float | None = None,
    x0: Tensor | None = None,
    z0: Tensor | None = None,
    init: str = "official",
    clamp: bool = True,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    record_lipschitz: bool = False,
) -> Restoration:
    """The baseline of §5.3 (Fig. 2, Table 1 "Adam"): minimise ``J1`` (eq. 15) jointly over ``x`` and every latent
    group with Adam, back-propagating through the decoder; batched, each image with its own Adam moments and stop.

    As the official ``AdamBaseline``: one Adam over ``[x, z_0, ..., z_{L-1}]`` with learning rate ``lr`` (0.01 in
    ``conf/config.yaml``; Fig. 2 also runs 0.001), on ``J1 / d`` (the code's per-pixel mean, ``d = C H W``; Adam is
    invariant to the scale but for ``eps``), from ``x0`` (same ``init`` as :func:`pnp_hvae`) and ``z0`` the encoder's
    greedy posterior means at ``x0`` (``E_1(x0)``; the code draws one posterior sample instead), with the same
    stopping rule on ``||x_k - x_{k-1}||`` and the same ``max_iters`` (one config holds both). ``x`` is not
    constrained; the encoder is used only for ``z0``. Other parameters as :func:`pnp_hvae`.

    Returns ``x = x_n`` (the official result), ``z = z_n`` (packed at ``info["latent_size"]``), ``x_decoded =
    mu_theta(z_n)``; ``iterations`` counts Adam steps; ``history`` rows ``k = 1..n``: ``"objective"`` ``J1(x_k, z_k)``,
    ``"residual"`` ``||x_k - x_{k-1}||``, ``"seconds"`` and, with ``record_lipschitz``, ``"lipschitz"`` ``L_k =
    ||T(x_k) - T(x_{k-1})|| / ||x_k - x_{k-1}||`` with ``T`` the map of Algorithm 2 (one more HVAE pass per step);
    ``per_image["objective_initial"]`` is ``J1(x_0, z_0)``.
    """
    _check_options(max_iters, tol, patience, atol)
    check_positive(lr, "lr")
    pb = _Problem(y, op, prior, sigma, tau, gamma, x0, init, "adam_j1")
    clock = Clock()
    B, dev, d = pb.B, pb.x0.device, pb.d
    hp, wp = pb.latent_size
    n_lat = pb.net.at_size(hp, wp).latent_shape[0]
    if z0 is None:
        with torch.no_grad():
            z0 = hvae_step(pb.x0, pb.net, 1.0, clamp=clamp).z
    elif not isinstance(z0, Tensor) or tuple(z0.shape) != (B, n_lat) or not bool(torch.isfinite(z0).all()):
        shape = tuple(z0.shape) if isinstance(z0, Tensor) else type(z0).__name__
        raise ValueError(f"z0 must be a finite (B, N) = {(B, n_lat)} tensor (latents at {hp}x{wp}), got {shape}")
    v0 = torch.cat([pb.x0.flatten(1), z0.detach().to(pb.x0)], 1)  # one row per image: [x, z]

    def split(v: Tensor) -> tuple[Tensor, Tensor]:
        return v[:, :d].reshape(-1, *pb.shape), v[:, d:]

    def objective(v: Tensor, idx: Tensor) -> Tensor:  # J1 of images idx at v
        x, z = split(v)
        mu, nlp = _decode_with_prior(pb.net, z, pb.shape[1:], pb.taus, check=False)
        return pb.j1_rows(x, mu, nlp, idx)

    pool = AdamPool(lambda v, idx: objective(v, idx) / d, v0, lr=lr, tol=0.0, max_iters=max_iters, betas=betas, eps=eps)
    everyone = torch.arange(B, device=dev)
    pool.start(everyone, v0)
    converged = torch.zeros(B, dtype=torch.bool, device=dev)
    rule, history = Plateau(B, tol, patience, v0), History(B)
    J_initial = torch.full((B,), math.nan, dtype=v0.dtype, device=dev)
    # each iterate's J1 comes with the next Adam step's evaluation: the step's other records wait for it
    wait = {k: torch.full((B,), math.nan, dtype=v0.dtype, device=dev) for k in ("residual", "lipschitz")}
    wait_seconds = torch.full((B,), math.nan, dtype=torch.float64)
    Tx = None
    if record_lipschitz:
        with torch.no_grad():
            Tx = pb.T_rows(pb.x0, everyone, clamp)[0]

    def record(rows: Tensor, J: Tensor) -> None:
        values = {"objective": J, "residual": wait["residual"][rows], "seconds": wait_seconds[rows.cpu()]}
        if record_lipschitz:
            values["lipschitz"] = wait["lipschitz"][rows]
        history.record(rows, **values)

    while pool.busy():
        idx = pool.running.nonzero().squeeze(1)
        x_before = pool.z[idx, :d].clone()
        pool.step()  # J1 at the current iterate, then one Adam update of every running image
        ev, loss = pool.last
        first = pool.evals[ev] == 1  # evaluated at (x_0, z_0)
        J_initial[ev[first]] = loss[first] * d
        if bool((~first).any()):
            record(ev[~first], loss[~first] * d)
        step = (pool.z[idx, :d] - x_before).norm(dim=1)
        wait["residual"][idx] = step
        wait_seconds[idx.cpu()] = clock()
        if record_lipschitz:
            with torch.no_grad():
                Tx_new = pb.T_rows(split(pool.z[idx])[0], idx, clamp)[0]
            wait["lipschitz"][idx] = (Tx_new - Tx[idx]).flatten(1).norm(dim=1) / step
            Tx[idx] = Tx_new
        if pool.last_final is not None:  # out of steps: AdamPool evaluated their last iterate
            ic, lc = pool.last_final
            record(ic, lc * d)
        stop = _stops(rule, idx, step, d, atol)
        converged[idx[stop]] = True
        halt = idx[stop & pool.running[idx]]
        if halt.numel():
            with torch.no_grad():
                record(halt, objective(pool.z[halt], halt))
            pool.stop(halt)
    x, z = split(pool.z)
    with torch.no_grad():
        mu, _ = _decode_with_prior(pb.net, z, pb.shape[1:], pb.taus, check=False)
    info = pb.info("adam_j1")
    info.update(
        lr=lr, max_iters=max_iters, tol=tol, patience=patience, atol=atol, init=init if x0 is None else "x0",
        clamp=clamp, betas=betas, eps=eps, batched_steps=pool.calls, seconds=clock(),
    )  # fmt: skip
    return Restoration(
        x=x.clone(),
        z=z.clone(),
        x_decoded=mu,
        converged=converged,
        iterations=pool.steps.clone(),
        history=history.stack(),
        info=info,
        per_image={"objective_initial": J_initial},
    )


#: what :func:`pnp_hvae` and :func:`adam_j1` share, for readers who compose their own loop
__all__ = [
    "HVAEStep", "INITS", "Plateau", "T", "adam_j1", "as_hvae", "bicubic_upsample", "decoder_gamma", "hvae_step",
    "initial_x", "j1_pnp_hvae", "latent_size", "pnp_hvae", "x_step",
]  # fmt: skip
