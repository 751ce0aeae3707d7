r"""VBLE and VBLE-xz (Biquard, Chabert, Genin, Latry, Oberlin): a Gaussian variational posterior in the latent space
(and, for VBLE-xz, in the image space) of an autoencoder prior, fitted by stochastic gradient variational Bayes.

References are the slides ``vble_vblexz_slides.txt`` (titles in brackets):

* **VBLE** ("[VBLE] Variational Bayes Latent Estimation", eqs. 3-4; "[Appendice] Final VBLE algorithm"): the
  family ``q(z) = N(zbar, diag(a^2))`` over the prior's latent, fitted by maximising

  .. math:: \mathrm{ELBO}(\bar z, a) = E_q[\log p(y | z)] + E_q[\log p(z)] - E_q[\log q(z)],
     \qquad p(y | z) = N(y; A D(z), \sigma^2 I).

* **VBLE-xz** ("[VBLExz] VBLE-xz algorithm", eq. 5; "[Appendice] VBLE-xz ELBO"): the joint family
  ``q(z) q_b(x | z)`` with ``q_b(x | z) = N(D(z), diag((b sigma_theta(z))^2))`` approximates ``p(x, z | y)`` of
  the model ``p(y | x) p(x | z) p(z)`` whose decoder ``p(x | z) = N(D(z), diag(sigma_theta(z)^2))`` carries the
  prior's representation error (JPMAP's joint model). Its ELBO

  .. math:: E_{q_b(x|z) q(z)}[\log p(y | x)] - KL[q(z) \| p(z)] - E_{q(z)} KL[q_b(x | z) \| p(x | z)]

  has ``KL[q_b(x|z) || p(x|z)] = sum_k (-log b_k + b_k^2 / 2 - 1/2)``, which does not depend on ``z`` nor on
  ``sigma_theta`` (both Gaussians share the mean ``D(z)`` and their stds differ by the factor ``b``). The slide's
  last line prints the two KL terms with the opposite sign under its ``argmin``; the expression above is the one
  its first line (the general ELBO) gives.

**Uniform posterior** (compressive autoencoder priors; slides "[Appendice] Use of a compressive autoencoder (CAE) -
Details" and "[Appendice] CAE expressed in the VAE framework", the official code's
``latent_inference_model="uniform"``): ``posterior="uniform"`` replaces the Gaussian family by
``q(z) = prod_k U([zbar_k - a_k/2, zbar_k + a_k/2])``, sampled by reparameterisation as ``z = zbar + a (u - 1/2)``,
``u ~ U[0, 1]^l``; its entropy is ``sum log a`` (no constant). The CAE was trained with this posterior at ``a = 1``
(additive uniform noise), and its prior ``p(z)`` is a density convolved with ``U(-1/2, 1/2)``, smooth on the scale
of ``a``. It is the default for priors that declare ``default_posterior = "uniform"``
(:class:`~jpmap_core.models.CAEHyperprior`), with ``a_0 = 1`` (the slide's algorithm initialises ``a`` at 1, and
``a = 1`` is the CAE's own encoder posterior); the Gaussian family stays the default elsewhere, and either may be
chosen for any prior.

**Estimator** (SGVB, "[Appendice] Final VBLE algorithm"): each Adam step draws ``n_samples`` reparameterised
``z_i = zbar + a * eps_i`` (and, for VBLE-xz, ``x_i = D(z_i) + b sigma_theta(z_i) xi_i``) and estimates
``E_q[||A x - y||^2]`` and ``E_q[-log p(z)]`` by their sample means; the entropy of ``q(z)`` is exact
(``sum log a + l/2 (1 + log 2 pi)``). Its gradient is that of the slide's fully Monte Carlo estimate
(``log q(z_i)`` evaluated at a reparameterised sample is ``-sum log a - ||eps_i||^2/2 + const``, whose gradient
in ``(zbar, a)`` is that of the exact entropy), only the reported value is less noisy. Adam runs on
``(zbar, log a)`` (and ``log b``), lr 0.1, at most 300 steps, ``a_0 = e^-3``: the official code's defaults
(MaudBqrd/VBLE, ``latent_inference_model="gaussian"``); ``zbar_0`` is the encoder mean of the initial image
(``A_dagger(y)`` as in JPMAP, or ``A^T y``, or a given ``x0`` / ``z0``). With the uniform family the draws are
``z_i = zbar + a * (u_i - 1/2)`` and the entropy ``sum log a`` is exact in the same way.

**The ELBO reported** (``history["objective"]``, ``per_image["elbo"]``) is the ELBO **per pixel** (divided by
``H W``, the official code's ``num_pixels``), in nats, the quantity the method **maximises** (higher is better;
the official code minimises its negative). It includes the likelihood's normalisation ``-m/2 log(2 pi sigma^2)``
(``m`` measurements), so that it is a lower bound of ``log p(y) / (H W)``. The prior's ``neg_log_prior`` drops its
normalisation; the ELBO adds back ``l/2 log 2 pi``, the one of ``p_Z = N(0, I)`` (the Gaussian VAEs'
``neg_log_prior = 1/2 ||z||^2``): for them the ELBO is exact, and its latent part is exactly
``KL(q(z) || p_Z)`` (``history["kl"]``, the official code's ``kl_z``); a prior that drops another constant shifts
the reported ELBO by that constant and nothing else. A prior whose ``neg_log_prior`` is a normalised density
(``neg_log_prior_is_normalised = True``: the CAE's rate in nats) gets nothing added back. The history values are
the one-step SGVB estimates (noisy); ``per_image["elbo"]`` is the estimate at the returned posterior over the
``n_posterior_samples`` draws.

**Stopping**, per image: after ``max_iters`` Adam steps, or when the ELBO estimate has not improved on its best
value by more than ``rtol`` (relative) for ``patience`` consecutive steps (``torch``'s ``ReduceLROnPlateau`` rule;
``converged`` is True for these). The official code always runs its ``max_iters`` (its patience counter is
recorded, never used to stop); ``patience = 50`` and ``rtol = 1e-4`` are this package's defaults (on the MNIST MLP
priors they stop after 100-200 steps, with the ELBO of 300 or 1000 steps to about 1e-3 nats per pixel). The
returned posterior is the last iterate (the official code's ``gd_final_value="last"``), not the best estimate
(the estimates are noisy).

**Randomness.** Every image draws from its own noise stream: a generator seeded with a hash of one base seed (0
without ``generator``; else drawn from ``generator``, so successive calls with one generator differ) and of the
image's measurements ``y_b``. An image's draws therefore depend on its data and the seed only, not on its position
in the batch nor on the other images: solved alone or in any batch, it gets the same numbers (the only per-image
Python loop is this noise draw; every network and operator call is batched).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import check_positive
from ..energy import Sigma, noise_std, sigma_info
from ..models import Prior, check_prior
from ..models.vae import LOG_2PI
from ._common import AdamPool, Clock, History, Restoration, check_problem

#: the official code's initial latent scale for a Gaussian q(z) (its ``az`` parameter starts at -3: a = e^-3)
A0 = math.exp(-3.0)

DecoderStd = Callable[[Tensor, Tensor], Tensor | float]


# ---- randomness: one noise stream per image ----------------------------------------------------------------
def image_seeds(keys: Tensor, generator: torch.Generator | None = None) -> list[int]:
    """One seed per row of ``keys`` ``(B, ...)``: a hash of a base seed and of the row's values.

    The base seed is 0 without ``generator``, else one draw from it. Equal rows get equal seeds whatever their
    position in the batch (the values are hashed as float64, so a float32 row and its float64 copy agree).
    """
    if generator is None:
        base = 0
    else:
        base = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    rows = keys.detach().to(device="cpu", dtype=torch.float64).reshape(keys.shape[0], -1).contiguous().numpy()
    key = base.to_bytes(8, "little")
    return [int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8, key=key).digest(), "little") >> 1 for r in rows]


class NoiseStreams:
    """Standard normal draws from one generator per image (see the module docstring, "Randomness")."""

    def __init__(self, seeds: list[int], device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def normal(self, idx: Tensor, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """``(len(idx), *shape)``: row ``j`` from the stream of image ``idx[j]``."""
        return torch.stack(
            [
                torch.randn(shape, generator=self.generators[i], dtype=like.dtype, device=like.device)
                for i in idx.tolist()
            ]
        )

    def latent(self, posterior: str, idx: Tensor, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """The standardised latent draws of ``posterior``: ``eps ~ N(0, I)`` (Gaussian) or ``u - 1/2`` with
        ``u ~ U[0, 1]`` (uniform), so that ``z = zbar + a * draw`` in both families."""
        if posterior == "gaussian":
            return self.normal(idx, shape, like)
        return torch.stack(
            [
                torch.rand(shape, generator=self.generators[i], dtype=like.dtype, device=like.device) - 0.5
                for i in idx.tolist()
            ]
        )


#: the variational families of the latent: name -> slide
POSTERIORS = {
    "gaussian": '"[VBLE] Variational Bayes Latent Estimation": q(z) = N(zbar, diag(a^2))',
    "uniform": '"[Appendice] CAE expressed in the VAE framework": q(z) = U(zbar - a/2, zbar + a/2)',
}
#: default initial latent scale of each family: the official code's e^-3 (Gaussian); 1, the CAE's training
#: posterior and the slide algorithm's a_0 (uniform)
A0_OF = {"gaussian": A0, "uniform": 1.0}


def posterior_of(prior: Any, posterior: str | None) -> str:
    """The latent family: ``posterior`` when given (``"gaussian"`` or ``"uniform"``), else the prior's
    ``default_posterior`` (``"uniform"`` for a compressive autoencoder), else ``"gaussian"``."""
    if posterior is None:
        posterior = getattr(prior, "default_posterior", "gaussian")
    if posterior not in POSTERIORS:
        raise ValueError(f"posterior must be 'gaussian' or 'uniform' (None: the prior's default), got {posterior!r}")
    return posterior


def latent_draws(posterior: str, shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standardised draws of ``posterior`` (see :meth:`NoiseStreams.latent`) from one generator."""
    if posterior == "gaussian":
        return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)
    return torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device) - 0.5


# ---- the model and the ELBO --------------------------------------------------------------------------------
def decoder_std_of(prior: Any, decoder_std: float | None = None) -> tuple[DecoderStd, float | str]:
    """VBLE-xz's ``sigma_theta(z)`` (on the [0, 1] image scale) and how it was chosen, for ``info``.

    In order: ``decoder_std`` when given (a number > 0); the prior's ``decoder_std(z)`` method when it has one (a
    decoder with a variance head: it returns the pixelwise std, a tensor broadcastable to ``(B, C, H, W)``, slide
    "[Appendice] Training of a VAE with decoder variance"); the prior's learned scalar ``gamma`` (the Gaussian VAEs'
    ``p(x|z) = N(mu_theta(z), gamma^2 I)``).
    """
    if decoder_std is not None:
        v = check_positive(decoder_std, "decoder_std")
        return (lambda z, dz: v), v
    if callable(getattr(prior, "decoder_std", None)):
        return (lambda z, dz: prior.decoder_std(z)), "prior.decoder_std(z)"
    gamma = getattr(prior, "gamma", None)
    if gamma is None:
        raise TypeError(
            f"VBLE-xz needs the decoder's std sigma_theta(z) of p(x|z) = N(D(z), sigma_theta(z)^2): "
            f"{type(prior).__name__} has neither a decoder_std(z) method nor a scalar gamma; pass decoder_std="
        )
    g = float(gamma.detach()) if isinstance(gamma, Tensor) else float(gamma)
    v = check_positive(g, "the prior's gamma")
    return (lambda z, dz: v), v


@dataclass
class Terms:
    """One SGVB estimate per image, per pixel (nats / (H W)): ``elbo = -(data + const + kl)``; ``x`` the samples."""

    elbo: Tensor  # (r,)
    data: Tensor  # (r,) E_q ||A x - y||^2 / (2 sigma^2) / (H W)
    kl: Tensor  # (r,) KL(q(z) || p_Z) (+ E_q KL(q_b(x|z) || p(x|z)) for VBLE-xz) / (H W)
    x: Tensor  # (r, n, C, H, W) the image samples D(z_i) (+ b sigma_theta(z_i) xi_i)
    decoded: Tensor  # (r, n, C, H, W) their means D(z_i)


class Model:
    """``p(y | x) = N(A x, sigma^2 I)`` with the prior, and how to evaluate the ELBO for some of the images."""

    def __init__(
        self, y: Tensor, op: Any, prior: Prior, sigma: Sigma, std_fn: DecoderStd | None, posterior: str = "gaussian"
    ) -> None:
        self.y, self.op, self.prior, self.std_fn, self.posterior = y, op, prior, std_fn, posterior
        self.B = y.shape[0]
        self.image_shape = tuple(int(s) for s in prior.image_shape)
        self.latent_shape = tuple(int(s) for s in prior.latent_shape)
        self.l = math.prod(self.latent_shape)
        self.npix = self.image_shape[-2] * self.image_shape[-1]
        # -log p(z) + prior_constant is the normalised negative log density (module docstring, "The ELBO reported")
        self.prior_constant = 0.0 if getattr(prior, "neg_log_prior_is_normalised", False) else 0.5 * self.l * LOG_2PI
        s = noise_std(sigma, y)
        self.s = s if isinstance(s, Tensor) else torch.full((self.B,), float(s), dtype=y.dtype, device=y.device)
        measured = getattr(op, "measured", None)  # BatchBlocks pads each block's y: count its own entries only
        if callable(measured):
            self.m = measured(y).sum(1).to(y.dtype)
        else:
            self.m = torch.full((self.B,), float(y[0].numel()), dtype=y.dtype, device=y.device)
        self._rows: tuple[Tensor, Any] | None = None

    def A_rows(self, x: Tensor, idx: Tensor, n: int) -> Tensor:
        """``A`` applied to ``n`` images ``x`` ``(len(idx) * n, C, H, W)`` of each image ``idx`` (grouped by image)."""
        rep = idx.repeat_interleave(n)
        if self._rows is None or not torch.equal(self._rows[0], rep):
            rows = getattr(self.op, "rows", None)
            self._rows = (rep, rows(rep) if callable(rows) else None)
        sub = self._rows[1]
        if sub is not None:
            return sub.A(x)
        # an operator that cannot be restricted to rows (a wrapped deepinv physics): the whole batch, n times
        xs = x.view(len(idx), n, *x.shape[1:])
        out = []
        for i in range(n):
            full = torch.zeros(self.B, *x.shape[1:], dtype=x.dtype, device=x.device)
            full = full.index_put((idx,), xs[:, i])
            out.append(self.op.A(full)[idx])
        return torch.stack(out, 1).reshape(len(idx) * n, *out[0].shape[1:])

    def terms(
        self, idx: Tensor, zbar: Tensor, log_a: Tensor, log_b: Tensor | None, eps: Tensor, xi: Tensor | None
    ) -> Terms:
        """The SGVB estimate of the ELBO of images ``idx`` for ``q(z) = N(zbar, diag(exp(log_a)^2))`` or
        ``U(zbar -+ exp(log_a)/2)`` (:attr:`posterior`; and, with ``log_b``, ``q_b(x|z) = N(D(z), diag((b
        sigma_theta(z))^2))``), from the standardised draws ``eps`` ``(r, n, *latent)`` (and ``xi`` ``(r, n, C, H,
        W)``). Differentiable in ``zbar``, ``log_a``, ``log_b``."""
        r, n = eps.shape[:2]
        z = (zbar.unsqueeze(1) + log_a.exp().unsqueeze(1) * eps).reshape(r * n, *self.latent_shape)
        x = decoded = self.prior.decode(z, check=False)
        kl_x = 0.0
        if log_b is not None:
            b = log_b.exp()
            std = self.std_fn(z, decoded)
            x = decoded + b.repeat_interleave(n, 0) * std * xi.reshape(r * n, *self.image_shape)
            # KL(N(D, b^2 s^2) || N(D, s^2)) per pixel = -log b + b^2/2 - 1/2 (slide "[Appendice] VBLE-xz ELBO")
            kl_x = (0.5 * b * b - log_b - 0.5).expand(r, *self.image_shape).flatten(1).sum(1)
        res = self.A_rows(x, idx, n) - self.y[idx].repeat_interleave(n, 0)
        s = self.s[idx]
        data = res.flatten(1).pow(2).sum(1).view(r, n).mean(1) / (2 * s * s)
        nlp = self.prior.neg_log_prior(z).view(r, n).mean(1)
        # H(q) = sum log a + l/2 (1 + log 2 pi) (Gaussian) or sum log a (uniform)
        entropy = log_a.flatten(1).sum(1)
        if self.posterior == "gaussian":
            entropy = entropy + 0.5 * self.l * (1.0 + LOG_2PI)
        kl = nlp + self.prior_constant - entropy + kl_x  # E_q[-log p(z)] - H(q)
        const = 0.5 * self.m[idx] * torch.log(2 * math.pi * s * s)
        samples, decoded = x.view(r, n, *self.image_shape), decoded.view(r, n, *self.image_shape)
        return Terms(-(data + const + kl) / self.npix, data / self.npix, kl / self.npix, samples, decoded)


def _as_rows(t: Tensor | float, B: int, shape: tuple[int, ...], like: Tensor, name: str) -> Tensor:
    """A number > 0, a ``(B,)`` tensor or a tensor broadcastable to ``(B, *shape)`` (with its batch dimension) ->
    ``(B, *shape)`` (gradients kept)."""
    if not isinstance(t, Tensor):
        t = torch.tensor(check_positive(t, name))
    t = t.to(dtype=like.dtype, device=like.device)
    bad = ValueError(f"{name} must be a number, a (B,) tensor or a ({B}, ...) tensor broadcastable to {(B, *shape)}")
    if t.dim() == 0:
        t = t.expand(B, *shape)
    elif t.dim() == 1:
        if t.shape[0] != B:
            raise bad
        t = t.view(B, *([1] * len(shape))).expand(B, *shape)
    elif t.dim() == 1 + len(shape) and t.shape[0] == B:
        try:
            t = t.expand(B, *shape)
        except RuntimeError:
            raise bad from None
    else:
        raise bad
    if not bool((torch.isfinite(t) & (t > 0)).all()):
        raise ValueError(f"{name} must be finite and > 0")
    return t


def elbo(
    y: Tensor,
    op: Any,
    prior: Prior,
    zbar: Tensor,
    a: Tensor | float,
    *,
    sigma: Sigma,
    b: Tensor | float | None = None,
    decoder_std: float | None = None,
    n_samples: int = 1,
    posterior: str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The SGVB estimate ``(B,)`` of the ELBO per pixel (the module docstring's definition) of the posterior
    ``q(z) = N(zbar, diag(a^2))`` or ``U(zbar -+ a/2)`` (``posterior``, default: the prior's, see
    :func:`posterior_of`) (VBLE) or, with ``b``, ``q(z) q_b(x|z)`` (VBLE-xz), from ``n_samples`` draws of
    ``generator``. ``a``: a number, ``(B,)`` or ``(B, *latent_shape)``; ``b``: a number, ``(B,)``, ``(B, 1, 1, 1)`` or
    ``(B, C, H, W)``. Unbiased; differentiable in ``zbar``, ``a`` and ``b`` when they require gradients.
    """
    check_prior(prior)
    y, _, sigma = check_problem(y, op, prior, sigma, None, "adjoint", None)
    B = y.shape[0]
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    std_fn = decoder_std_of(prior, decoder_std)[0] if b is not None else None
    kind = posterior_of(prior, posterior)
    model = Model(y, op, prior, sigma, std_fn, kind)
    lat, img = model.latent_shape, model.image_shape
    if not isinstance(zbar, Tensor) or tuple(zbar.shape) != (B, *lat):
        raise ValueError(f"zbar must be a (B, *latent_shape) = {(B, *lat)} tensor")
    if not bool(torch.isfinite(zbar).all()):
        raise ValueError("zbar contains NaN or infinite values")
    log_a = _as_rows(a, B, lat, y, "a").log()
    log_b = None if b is None else _as_rows(b, B, img, y, "b").log()
    eps = latent_draws(kind, (B, n_samples, *lat), y, generator)
    xi = None
    if b is not None:
        xi = torch.randn(B, n_samples, *img, generator=generator, dtype=y.dtype, device=y.device)
    return model.terms(torch.arange(B, device=y.device), zbar, log_a, log_b, eps, xi).elbo


# ---- options -------------------------------------------------------------------------------------------------
def _check_int(v: object, name: str, lo: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


@dataclass
class Options:
    """The options VBLE and VBLE-xz share (validated)."""

    n_samples: int
    lr: float
    max_iters: int
    patience: int
    rtol: float
    a0: float | None
    n_posterior_samples: int
    n_keep_samples: int
    sample_batch: int

    def __post_init__(self) -> None:
        _check_int(self.n_samples, "n_samples (SGVB draws per step)", 1)
        _check_int(self.max_iters, "max_iters", 1)
        _check_int(self.patience, "patience", 1)
        _check_int(self.n_posterior_samples, "n_posterior_samples (needs 2 for a std)", 2)
        _check_int(self.n_keep_samples, "n_keep_samples", 0)
        _check_int(self.sample_batch, "sample_batch", 1)
        if self.n_keep_samples > self.n_posterior_samples:
            raise ValueError(
                f"n_keep_samples ({self.n_keep_samples}) cannot exceed n_posterior_samples ({self.n_posterior_samples})"
            )
        self.lr = check_positive(self.lr, "lr")
        if self.a0 is not None:
            self.a0 = check_positive(self.a0, "a0")
        if not (isinstance(self.rtol, int | float) and math.isfinite(self.rtol) and self.rtol >= 0):
            raise ValueError(f"rtol must be a finite number >= 0, got {self.rtol!r}")

    def info(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class XNoise:
    """VBLE-xz's ``b``: a map per image (``"pixel"``, the slides' ``b_i``), one value per image (``"image"``), both
    optimised from ``b0``; or fixed (a number or ``(B,)`` tensor, not optimised)."""

    mode: str  # "pixel", "image" or "fixed"
    shape: tuple[int, ...]  # per image: (C, H, W) or (1, 1, 1)
    log_b0: Tensor  # (B, *shape)

    @property
    def optimised(self) -> bool:
        return self.mode != "fixed"

    @staticmethod
    def build(b: object, b0: float, B: int, image_shape: tuple[int, ...], like: Tensor) -> XNoise:
        if isinstance(b, str):
            if b not in ("pixel", "image"):
                raise ValueError(f"b must be 'pixel', 'image' or a fixed number > 0, got {b!r}")
            shape = tuple(image_shape) if b == "pixel" else (1, 1, 1)
            log_b0 = torch.full((B, *shape), math.log(check_positive(b0, "b0")), dtype=like.dtype, device=like.device)
            return XNoise(b, shape, log_b0)
        if b is None:
            raise ValueError("b must be 'pixel', 'image' or a fixed number > 0, got None")
        return XNoise("fixed", (1, 1, 1), _as_rows(b, B, (1, 1, 1), like, "b").detach().log())  # type: ignore[arg-type]


# ---- the fit -------------------------------------------------------------------------------------------------
class Packing:
    """``(zbar, log a[, log b])`` of each image as one row of the Adam pool."""

    def __init__(self, latent_shape: tuple[int, ...], xnoise: XNoise | None) -> None:
        self.latent_shape, self.xnoise = latent_shape, xnoise
        self.l = math.prod(latent_shape)
        self.nb = math.prod(xnoise.shape) if xnoise is not None and xnoise.optimised else 0

    def pack(self, zbar: Tensor, log_a: Tensor, log_b: Tensor | None) -> Tensor:
        parts = [zbar.flatten(1), log_a.flatten(1)]
        if self.nb:
            parts.append(log_b.flatten(1))
        return torch.cat(parts, 1)

    def unpack(self, p: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        r, L, lat = p.shape[0], self.l, self.latent_shape
        zbar, log_a = p[:, :L].reshape(r, *lat), p[:, L : 2 * L].reshape(r, *lat)
        if self.xnoise is None:
            return zbar, log_a, None
        if self.nb:
            return zbar, log_a, p[:, 2 * L :].reshape(r, *self.xnoise.shape)
        return zbar, log_a, self.xnoise.log_b0[idx]


class Plateau:
    """Per-image patience rule on a maximised, noisy objective: an image stops once its value has not exceeded its
    best by more than ``rtol * |best|`` for ``patience`` consecutive steps (``ReduceLROnPlateau``'s "rel" rule)."""

    def __init__(self, B: int, patience: int, rtol: float, like: Tensor) -> None:
        self.patience, self.rtol = patience, rtol
        self.best = torch.full((B,), -math.inf, dtype=like.dtype, device=like.device)
        self.stall = torch.zeros(B, dtype=torch.long, device=like.device)

    def update(self, idx: Tensor, value: Tensor) -> Tensor:
        """Record the values of images ``idx``; returns which of them ran out of patience."""
        best = self.best[idx]
        better = ~torch.isfinite(best) | (value > best + self.rtol * best.abs())
        self.best[idx] = torch.where(better, value, best)
        self.stall[idx] = torch.where(better, torch.zeros_like(self.stall[idx]), self.stall[idx] + 1)
        return self.stall[idx] >= self.patience


def _initial_latent(prior: Prior, x0: Tensor, z0: Tensor | None) -> Tensor:
    B, lat = x0.shape[0], tuple(prior.latent_shape)
    if z0 is None:
        with torch.no_grad():
            return prior.encode(x0, allow_out_of_range=True)[0].detach().reshape(B, *lat).to(x0)
    if not isinstance(z0, Tensor) or tuple(z0.shape) != (B, *lat) or not bool(torch.isfinite(z0).all()):
        shape = tuple(z0.shape) if isinstance(z0, Tensor) else type(z0).__name__
        raise ValueError(f"z0 must be a finite (B, *latent_shape) = {(B, *lat)} tensor, got {shape}")
    return z0.detach().clone().to(x0)


@dataclass
class Moments:
    """Running sums of the posterior samples, shifted by a reference image for a stable variance."""

    ref: Tensor
    n: int = 0
    s1: Tensor | None = None
    s2: Tensor | None = None

    def add(self, x: Tensor) -> None:  # x: (B, k, C, H, W)
        d = x - self.ref.unsqueeze(1)
        s1, s2 = d.sum(1), d.pow(2).sum(1)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += x.shape[1]

    def mean(self) -> Tensor:
        return self.ref + self.s1 / self.n

    def std(self) -> Tensor:
        var = (self.s2 - self.s1.pow(2) / self.n) / (self.n - 1)
        return var.clamp_min(0).sqrt()


def _chunks(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)]


def _fit(
    y,
    op,
    prior,
    sigma,
    *,
    method,
    opts: Options,
    posterior,
    xnoise_spec,
    decoder_std,
    x0,
    z0,
    init,
    eps_dagger,
    generator,
):
    start = "z0" if z0 is not None else "x0" if x0 is not None else init
    kind = posterior_of(prior, posterior)
    if opts.a0 is None:
        opts.a0 = A0_OF[kind]
    y, x0, sigma = check_problem(y, op, prior, sigma, x0, init, eps_dagger)
    clock = Clock()
    B = y.shape[0]
    xz = xnoise_spec is not None
    std_fn, std_info = decoder_std_of(prior, decoder_std) if xz else (None, None)
    model = Model(y, op, prior, sigma, std_fn, kind)
    lat, img = model.latent_shape, model.image_shape
    xnoise = XNoise.build(xnoise_spec[0], xnoise_spec[1], B, img, y) if xz else None
    zbar0 = _initial_latent(prior, x0, z0)
    log_a0 = torch.full_like(zbar0, math.log(opts.a0))
    packing = Packing(lat, xnoise)
    p0 = packing.pack(zbar0, log_a0, xnoise.log_b0 if xz else None)
    streams = NoiseStreams(image_seeds(y, generator), y.device)
    last: dict[str, Terms] = {}

    def neg_elbo(p: Tensor, idx: Tensor) -> Tensor:
        zbar, log_a, log_b = packing.unpack(p, idx)
        eps = streams.latent(kind, idx, (opts.n_samples, *lat), y)
        xi = streams.normal(idx, (opts.n_samples, *img), y) if xz else None
        last["terms"] = t = model.terms(idx, zbar, log_a, log_b, eps, xi)
        return -t.elbo

    # the stopping rules are this module's (Plateau, max_iters): the pool's gradient test is off (tol = 0) and its
    # own cap is never reached; its "best" iterate is not used (a noisy objective's best is an outlier)
    pool = AdamPool(neg_elbo, p0, lr=opts.lr, tol=0.0, max_iters=opts.max_iters + 1)
    all_rows = torch.arange(B, device=y.device)
    pool.start(all_rows, p0)
    plateau = Plateau(B, opts.patience, opts.rtol, y)
    converged = torch.zeros(B, dtype=torch.bool, device=y.device)
    history = History(B)
    while bool(pool.running.any()):
        pool.step()
        idx = pool.last[0]
        t = last["terms"]
        history.record(idx, objective=t.elbo, data_fidelity=t.data, kl=t.kl, seconds=torch.full_like(t.elbo, clock()))
        flat = plateau.update(idx, t.elbo.detach())
        converged[idx[flat]] = True
        pool.running[idx[flat | (pool.evals[idx] >= opts.max_iters)]] = False

    with torch.no_grad():
        zbar, log_a, log_b = packing.unpack(pool.z, all_rows)
        x_decoded = prior.decode(zbar, check=False)
        moments = Moments(x_decoded)  # of the image samples: the std
        # of D(z_i): the MMSE-x (VBLE-xz's x-noise has mean 0 given z: averaging it would only add Monte Carlo noise)
        means = Moments(x_decoded) if xz else moments
        kept, elbo_sum = [], torch.zeros(B, dtype=y.dtype, device=y.device)
        for k in _chunks(opts.n_posterior_samples, opts.sample_batch):
            eps = streams.latent(kind, all_rows, (k, *lat), y)
            xi = streams.normal(all_rows, (k, *img), y) if xz else None
            t = model.terms(all_rows, zbar, log_a, log_b, eps, xi)
            moments.add(t.x)
            if xz:
                means.add(t.decoded)
            elbo_sum += t.elbo * k
            have = sum(s.shape[1] for s in kept)
            if have < opts.n_keep_samples:
                kept.append(t.x[:, : opts.n_keep_samples - have])
    samples = torch.cat(kept, 1) if kept else x_decoded.new_zeros(B, 0, *img)
    per_image = {
        "z_scale": log_a.exp(),
        "std": moments.std(),
        "samples": samples,
        "elbo": elbo_sum / opts.n_posterior_samples,
    }
    info = {"method": method, "sigma": sigma_info(sigma), **opts.info(), "init": start, "posterior": kind}
    info["seeds"] = "per image: hash(base seed, y_b); base seed " + ("0" if generator is None else "from generator")
    if xz:
        per_image["b"] = log_b.exp().expand(B, *xnoise.shape).clone()
        info.update(b=xnoise.mode, decoder_std=std_info)
        if xnoise.optimised:
            info["b0"] = float(xnoise_spec[1])
    info["batched_steps"] = pool.calls
    info["seconds"] = clock()
    return Restoration(
        x=means.mean(),
        z=zbar,
        x_decoded=x_decoded,
        converged=converged,
        iterations=pool.steps.clone(),
        history=history.stack(),
        info=info,
        per_image=per_image,
    )


def vble(
    y: Tensor,
    op: Any,
    prior: Prior,
    *,
    sigma: Sigma,
    n_samples: int = 1,
    lr: float = 0.1,
    max_iters: int = 300,
    patience: int = 50,
    rtol: float = 1e-4,
    a0: float | None = None,
    posterior: str | None = None,
    x0: Tensor | None = None,
    z0: Tensor | None = None,
    init: str = "dagger",
    eps_dagger: float | None = None,
    n_posterior_samples: int = 100,
    n_keep_samples: int = 4,
    sample_batch: int = 25,
    generator: torch.Generator | None = None,
) -> Restoration:
    r"""VBLE: fit ``q(z) = N(zbar, diag(a^2))`` to the latent posterior ``p(z | y)`` (slide "[VBLE] Variational Bayes
    Latent Estimation", eqs. 3-4; algorithm of "[Appendice] Final VBLE algorithm"), then sample it.

    Maximises, per image, ``ELBO = E_q[log N(y; A D(z), sigma^2 I)] + E_q[log p(z)] + H(q)`` (module docstring: the
    estimator, the defaults, the stopping rule, the noise streams). ``prior``: any
    :class:`~jpmap_core.models.Prior` (its ``encode`` initialises ``zbar``, ``decode`` is ``D``, ``neg_log_prior`` is
    ``-log p(z)``); ``sigma`` on the 0-255 scale, a number or ``(B,)``.

    Options: ``n_samples`` SGVB draws per Adam step; ``lr``, ``max_iters``, ``patience``, ``rtol`` (stopping);
    ``posterior`` the latent family, ``"gaussian"`` or ``"uniform"`` (``q(z) = U(zbar -+ a/2)``, sampled as
    ``zbar + a (u - 1/2)``; slide "[Appendice] CAE expressed in the VAE framework"), by default the prior's
    ``default_posterior`` (uniform for :class:`~jpmap_core.models.CAEHyperprior`, Gaussian otherwise);
    ``a0`` the initial latent scale (default: ``e^-3`` for the Gaussian family, the official code's; 1 for the
    uniform one, the CAE's training posterior and the slide algorithm's ``a_0``); ``x0`` / ``init`` / ``eps_dagger``
    the image whose encoder mean is ``zbar_0`` (``init="dagger"``: ``A_dagger(y)``; ``"adjoint"``: ``A^T y``), or
    ``z0`` directly;
    ``n_posterior_samples`` draws of the fitted posterior for the MMSE estimate and the std, decoded
    ``sample_batch`` per image at a time, of which the first ``n_keep_samples`` are returned; ``generator``
    seeds the noise streams (None: base seed 0, so that equal inputs give equal outputs).

    Returns a :class:`Restoration` with ``x`` the MMSE-x estimate ``1/S sum_i D(z_i)``, ``z_i ~ q``; ``z`` = ``zbar``;
    ``x_decoded`` = ``D(zbar)`` (the slides' MMSE-z estimate); ``iterations`` the Adam steps; ``converged`` whether
    the patience rule stopped the image before ``max_iters``; ``history["objective"]`` the ELBO per pixel
    (maximised; one-step estimates), ``history["data_fidelity"]`` (``E_q ||A D(z) - y||^2 / (2 sigma^2)``) and
    ``history["kl"]`` (``KL(q || p_Z)``), both per pixel, ``history["seconds"]``; ``per_image["z_scale"]`` = ``a``
    (the std of the Gaussian family, the width of the uniform one), ``per_image["std"]`` the pixelwise posterior std
    ``(B, C, H, W)`` (unbiased, over the ``S`` draws),
    ``per_image["samples"]`` ``(B, n_keep_samples, C, H, W)``, ``per_image["elbo"]`` ``(B,)`` the ELBO per pixel
    over the ``S`` draws. :func:`posterior_samples` draws more.
    """
    opts = Options(n_samples, lr, max_iters, patience, rtol, a0, n_posterior_samples, n_keep_samples, sample_batch)
    return _fit(
        y, op, prior, sigma, method="vble", opts=opts, posterior=posterior, xnoise_spec=None, decoder_std=None,
        x0=x0, z0=z0, init=init, eps_dagger=eps_dagger, generator=generator,
    )  # fmt: skip


def vble_xz(
    y: Tensor,
    op: Any,
    prior: Prior,
    *,
    sigma: Sigma,
    b: str | float | Tensor = "pixel",
    b0: float = 1.0,
    decoder_std: float | None = None,
    n_samples: int = 1,
    lr: float = 0.1,
    max_iters: int = 300,
    patience: int = 50,
    rtol: float = 1e-4,
    a0: float | None = None,
    posterior: str | None = None,
    x0: Tensor | None = None,
    z0: Tensor | None = None,
    init: str = "dagger",
    eps_dagger: float | None = None,
    n_posterior_samples: int = 100,
    n_keep_samples: int = 4,
    sample_batch: int = 25,
    generator: torch.Generator | None = None,
) -> Restoration:
    r"""VBLE-xz: fit ``q(z) q_b(x | z)``, ``q_b(x|z) = N(D(z), diag((b sigma_theta(z))^2))``, to the joint posterior
    ``p(x, z | y)`` of ``p(y | x) p(x | z) p(z)`` (slide "[VBLExz] VBLE-xz algorithm", eq. 5), by maximising

    .. math:: E_{q_b q}[\log p(y | x)] - KL[q(z) \| p(z)] - \sum_k (-\log b_k + b_k^2/2 - 1/2)

    (slide "[Appendice] VBLE-xz ELBO"; the last sum is ``E_q KL[q_b(x|z) || p(x|z)]``), with Adam on
    ``(zbar, log a, log b)``. ``p(x|z) = N(D(z), diag(sigma_theta(z)^2))``: ``sigma_theta`` is ``decoder_std``
    when given, else the prior's ``decoder_std(z)`` method when it has one, else its learned scalar ``gamma``
    (every Gaussian VAE of the package; see :func:`decoder_std_of`).

    ``b``: ``"pixel"`` (default, the slides' ``b_i``: one factor per pixel and image, optimised from ``b0``),
    ``"image"`` (one factor per image, optimised) or a number / ``(B,)`` tensor (fixed, not optimised).
    Where ``sigma_theta`` does not depend on ``z`` the ELBO separates: ``(zbar, a)`` maximise VBLE's ELBO, and the
    optimal ``b_k = (1 + sigma_theta^2 (A^T A)_kk / sigma^2)^{-1/2}`` (1 where ``A`` does not see pixel ``k``).

    The other options and the outputs are :func:`vble`'s, with image samples ``x_i = D(z_i) + b sigma_theta(z_i)
    xi_i`` (the prior's representation error included) in ``per_image["std"]`` and ``per_image["samples"]``. The
    MMSE-x estimate ``x`` is ``1/S sum_i D(z_i)``: the mean of ``q_b(x | z_i)`` is ``D(z_i)``, so this has the
    expectation of the samples' mean with less Monte Carlo noise (``b sigma_theta / sqrt(S)`` less per pixel).
    ``history["kl"]`` includes the x-part; ``per_image["b"]`` is ``(B, C, H, W)`` or ``(B, 1, 1, 1)``.
    """
    opts = Options(n_samples, lr, max_iters, patience, rtol, a0, n_posterior_samples, n_keep_samples, sample_batch)
    return _fit(
        y, op, prior, sigma, method="vble_xz", opts=opts, posterior=posterior, xnoise_spec=(b, b0),
        decoder_std=decoder_std, x0=x0, z0=z0, init=init, eps_dagger=eps_dagger, generator=generator,
    )  # fmt: skip


@torch.no_grad()
def posterior_samples(
    prior: Prior,
    restoration: Restoration,
    n: int,
    *,
    generator: torch.Generator | None = None,
    sample_batch: int = 25,
) -> Tensor:
    """``n`` more image samples ``(B, n, C, H, W)`` of the posterior a :func:`vble` / :func:`vble_xz` run fitted
    (what the explorer draws on demand): ``x = D(zbar + a eps)`` (VBLE; ``eps`` standard normal, or ``u - 1/2`` for
    the uniform family the run used, ``info["posterior"]``), plus ``b sigma_theta(z) xi`` (VBLE-xz, with
    the decoder std of that run). Each image draws from its own stream, seeded with a hash of a base seed (0, or one
    draw of ``generator``) and of its ``(zbar, a)``: the samples of an image do not depend on the batch.
    """
    check_prior(prior)
    _check_int(n, "n", 1)
    _check_int(sample_batch, "sample_batch", 1)
    method = restoration.info.get("method")
    if method not in ("vble", "vble_xz") or "z_scale" not in restoration.per_image:
        raise ValueError(f"posterior_samples needs a vble or vble_xz Restoration, got method {method!r}")
    zbar, a = restoration.z, restoration.per_image["z_scale"]
    kind = posterior_of(prior, restoration.info.get("posterior", "gaussian"))
    B = zbar.shape[0]
    lat, img = tuple(prior.latent_shape), tuple(prior.image_shape)
    if tuple(zbar.shape) != (B, *lat):
        raise ValueError(f"the restoration's z has shape {tuple(zbar.shape)}, the prior's latent is {lat}")
    std_fn = None
    if method == "vble_xz":
        given = restoration.info.get("decoder_std")
        std_fn = decoder_std_of(prior, given if isinstance(given, float) else None)[0]
        b = restoration.per_image["b"]
    streams = NoiseStreams(image_seeds(torch.cat([zbar.flatten(1), a.flatten(1)], 1), generator), zbar.device)
    rows = torch.arange(B, device=zbar.device)
    out = []
    for k in _chunks(n, sample_batch):
        z = (zbar.unsqueeze(1) + a.unsqueeze(1) * streams.latent(kind, rows, (k, *lat), zbar)).reshape(B * k, *lat)
        x = prior.decode(z, check=False)
        if std_fn is not None:
            xi = streams.normal(rows, (k, *img), zbar).reshape(B * k, *img)
            x = x + b.repeat_interleave(k, 0) * std_fn(z, x) * xi
        out.append(x.view(B, k, *img))
    return torch.cat(out, 1)
