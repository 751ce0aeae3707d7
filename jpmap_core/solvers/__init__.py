"""Solvers for ``y = A x + noise`` with a generative prior; all batched, each image with its own state.

Every solver is registered in :data:`SOLVERS` under its method name and follows one contract::

    solver(y, op, prior, *, sigma, **options) -> Restoration

* ``y``: measurements ``(B, ...)`` of ``op`` (a :mod:`jpmap_core.operators` operator or a wrapped deepinv
  physics); ``prior``: a :class:`jpmap_core.models.Prior` (a Gaussian VAE, a hierarchical VAE with its latent groups
  packed into one ``(B, L)`` tensor, a flow with an image-shaped latent); ``sigma``: the noise std on the 0-255
  scale, a number or a ``(B,)`` tensor (one per image); ``options``: the method's own keywords, with the paper's
  (or the official code's) values as defaults.
* The returned :class:`Restoration` holds, batch-first: the estimate ``x``, the latent ``z`` (in the prior's
  layout; a variational posterior stores its mean there and its scale in ``per_image["z_scale"]``), the decoded
  latent ``x_decoded``, per-image ``converged`` and ``iterations``, per-image ``history`` with the objective under
  the key ``"objective"`` (the paper's own definition of it, see each solver), other per-image outputs in
  ``per_image``, and what was run in ``info``.
* Batched equals alone: an image's result does not depend on the other images of the batch.
* Bad input (shapes, NaN/inf, ``sigma <= 0``, a prior without the interface) raises ``ValueError`` / ``TypeError``
  saying what was expected.

Methods:

* ``"csgm"`` -- :func:`csgm`, Bora et al., JPMAP eq. 1.3
* ``"jpmap"`` -- :func:`jpmap`, JPMAP Algorithms 2.1, 2.2, 2.3 and (with ``alpha``) 2.4
* ``"mapz_splitting"`` -- :func:`mapz_splitting`, JPMAP Algorithm 1.1
* ``"vble"``, ``"vble_xz"`` -- :func:`vble`, :func:`vble_xz`, variational posteriors (VBLE slides); more samples with
  :func:`posterior_samples`
* ``"pnp_hvae"`` -- :func:`pnp_hvae`, PnP-HVAE Algorithm 2 (hierarchical VAE prior)
* ``"adam_j1"`` -- :func:`adam_j1`, PnP-HVAE's Adam baseline on its ``J1`` (eq. 15; §5.3)

The JPMAP-family solvers (``csgm``, ``jpmap``, ``mapz_splitting``) also accept a hierarchical VAE at the images' size
(``hvae.at_size(H, W)``): they use its untempered ``-log p(z)`` (``tau = 1``) where a Gaussian VAE has ``1/2 ||z||^2``.

* ``"aipo"`` -- :func:`aipo`, AIPO Algorithm 2 (amortized continuation in lambda from the MLE start, flow priors);
  ``"aipo_baseline"`` -- :func:`aipo_baseline`, its fixed-lambda baselines (MLE, random and zero starts, equal
  budget); ``"aipo_latent"`` -- :func:`aipo_latent`, Algorithm 2's schedule on CSGM's latent energy
  ``||A G(z) - y||^2 + lambda ||z||^2`` (our extension to the VAE priors)

Classical baselines of PnP-HVAE's Tables 2-3 (no latent: ``z`` is ``(B, 0)``, ``x_decoded`` is ``x``):

* ``"wiener"`` -- :func:`wiener`, Wiener filter with a ``1/f^2`` Gaussian prior (``prior=None``)
* ``"tv"`` -- :func:`tv`, total variation by MFISTA with deepinv's TV prox (``prior=None``)
* ``"epll"`` -- :func:`epll`, EPLL (Zoran & Weiss 2011) with deepinv, ``prior`` a
  :class:`~jpmap_core.models.PatchGMM` (``bsd_patch_gmm``)

:class:`AdamPool` / :func:`adam_minimize` (batched Adam with per-image moments and stopping) are the latent
descents the solvers share, exported for experiments that run their own descents.

:func:`solve` runs a method by name (what benchmarks, notebooks and the explorer use instead of chains of ``if``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ._common import AdamPool, Restoration, adam_minimize
from .aipo import aipo, aipo_baseline, aipo_latent, mle_start
from .csgm import csgm
from .epll import epll
from .jpmap import jpmap
from .pnp_hvae import adam_j1, pnp_hvae
from .splitting import mapz_splitting
from .tv import tv
from .vble import posterior_samples, vble, vble_xz
from .wiener import wiener

Solver = Callable[..., Restoration]

#: method name -> solver with the contract of the module docstring
SOLVERS: dict[str, Solver] = {"csgm": csgm, "jpmap": jpmap, "mapz_splitting": mapz_splitting}
SOLVERS.update(vble=vble, vble_xz=vble_xz)
SOLVERS.update(pnp_hvae=pnp_hvae, adam_j1=adam_j1)
SOLVERS.update(aipo=aipo, aipo_baseline=aipo_baseline, aipo_latent=aipo_latent)
SOLVERS.update(wiener=wiener, tv=tv, epll=epll)


def solve(method: str, y: Tensor, op: Any, prior: Any, *, sigma: Any, **options: Any) -> Restoration:
    """``SOLVERS[method](y, op, prior, sigma=sigma, **options)``; an unknown name lists the registered ones."""
    if method not in SOLVERS:
        raise ValueError(f"unknown method {method!r}; registered solvers: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[method](y, op, prior, sigma=sigma, **options)


__all__ = ["SOLVERS", "AdamPool", "Restoration", "Solver", "adam_minimize", "csgm", "jpmap", "mapz_splitting", "solve"]
__all__ += ["posterior_samples", "vble", "vble_xz"]
__all__ += ["adam_j1", "pnp_hvae"]
__all__ += ["aipo", "aipo_baseline", "aipo_latent", "mle_start"]
__all__ += ["epll", "tv", "wiener"]
