r"""A Gaussian mixture on image patches: the prior of EPLL (Zoran & Weiss, "From learning models of natural image
patches to whole image restoration", ICCV 2011), a baseline of PnP-HVAE's Tables 2 and 3.

.. math:: p(P_i x) = \sum_{k=1}^K \pi_k \, \mathcal N(P_i x; \mu_k, \Sigma_k)

for every ``p x p`` patch ``P_i x`` (all colour channels, flattened as deepinv's ``patch_extractor`` does: channel,
row, column). The mixture itself, its EM fit and the EPLL restoration are deepinv's
(``deepinv.optim.utils.GaussianMixtureModel``, ``deepinv.optim.EPLL``); :class:`PatchGMM` holds one as an
``nn.Module`` with a :meth:`PatchGMM.config`, so that it ships as safetensors with a manifest entry and loads with
:func:`jpmap_core.pretrained.load_pretrained` like every other prior (architecture ``"gmm"``).

:func:`fit_patch_gmm` is the recipe of the shipped ``bsd_patch_gmm``: patches drawn (seeded) from the 48 CBSD68
training images of :func:`~jpmap_core.data.bsd_split` (the images that trained ``bsd_patch_hvae``), deepinv's EM.

    python -m jpmap_core.models.gmm --export data/pretrained     # refit and export bsd_patch_gmm
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from typing import Any

import torch
from torch import Tensor, nn

#: the shipped recipe (``bsd_patch_gmm``): EPLL's 6x6 patches; fewer components and patches than Zoran & Weiss's 200
#: components fitted on 2 million patches, so that EM runs in a few minutes on one CPU thread
GMM_RECIPE: dict[str, Any] = {
    "patch_size": 6,
    "n_components": 50,
    "n_patches": 30000,
    "em_iters": 20,
    "batch_size": 5000,
    "cov_regularization": 1e-5,
    "seed": 0,
    "n_test_patches": 10000,
    "test_seed": 12345,
}


class PatchGMM(nn.Module):
    """A Gaussian mixture on ``channels x patch_size x patch_size`` patches (deepinv's ``GaussianMixtureModel``).

    Not a :class:`~jpmap_core.models.Prior` (no latent): the ``prior`` argument of the EPLL solver
    (:func:`jpmap_core.solvers.epll`). Its state is the mixture's ``weights`` ``(K,)``, ``means`` ``(K, d)`` and
    ``covariances`` ``(K, d, d)``; :meth:`mixture` builds deepinv's model from them (inverses and log-determinants
    computed there, in the requested dtype).
    """

    arch = "gmm"

    def __init__(self, n_components: int = 50, patch_size: int = 6, channels: int = 3):
        super().__init__()
        for name, v in (("n_components", n_components), ("patch_size", patch_size), ("channels", channels)):
            if isinstance(v, bool) or int(v) != v or int(v) < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.n_components, self.patch_size, self.channels = int(n_components), int(patch_size), int(channels)
        k, d = self.n_components, self.dimension
        self.register_buffer("weights", torch.full((k,), 1.0 / k))
        self.register_buffer("means", torch.zeros(k, d))
        self.register_buffer("covariances", 0.1 * torch.eye(d).expand(k, d, d).clone())

    @property
    def dimension(self) -> int:
        """Patch dimension ``channels * patch_size^2``."""
        return self.channels * self.patch_size**2

    def config(self) -> dict[str, Any]:
        """Constructor arguments (stored in manifests; :func:`~jpmap_core.models.build_model` rebuilds it)."""
        return {"arch": self.arch, "n_components": self.n_components, "patch_size": self.patch_size,
                "channels": self.channels}  # fmt: skip

    def mixture(self, dtype: torch.dtype = torch.float64) -> Any:
        """deepinv's ``GaussianMixtureModel`` with these parameters, in ``dtype`` (float64 by default: the inverses of
        patch covariances, whose eigenvalues span ~1e-5 to ~30, are inaccurate in float32)."""
        from deepinv.optim.utils import GaussianMixtureModel

        g = GaussianMixtureModel(self.n_components, self.dimension, device=self.means.device).to(dtype)
        g.set_weights(self.weights.to(dtype))
        g.mu.data = self.means.to(dtype).clone()
        g.set_cov(self.covariances.to(dtype))
        return g

    def set_mixture(self, gmm: Any) -> None:
        """Take the parameters of a deepinv ``GaussianMixtureModel`` (after a fit)."""
        with torch.no_grad():
            self.weights.copy_(gmm.get_weights())
            self.means.copy_(gmm.mu)
            self.covariances.copy_(gmm.get_cov())

    def neg_log_likelihood(self, patches: Tensor, mixture: Any | None = None) -> Tensor:
        """``-log p(patch)`` in nats for patches ``(N, dimension)`` (``mixture``: a prebuilt :meth:`mixture`)."""
        if patches.dim() != 2 or patches.shape[1] != self.dimension:
            raise ValueError(f"patches must have shape (N, {self.dimension}), got {tuple(patches.shape)}")
        g = self.mixture() if mixture is None else mixture
        return g(patches.to(g.mu.dtype))


def draw_patches(images: list[Tensor], patch_size: int, n: int, generator: torch.Generator) -> Tensor:
    """``n`` random ``patch_size x patch_size`` patches ``(n, C * p * p)`` of the ``(1, C, H, W)`` images at their own
    scale, no flip or rotation (an image, then a position, uniformly), flattened as deepinv's ``patch_extractor``."""
    from ..data import PatchSampler

    sampler = PatchSampler(images, patch_size, scales=(1.0,), augment=False)
    return sampler.draw(n, generator).flatten(1)


def fit_patch_gmm(
    train_images: list[Tensor],
    *,
    patch_size: int = GMM_RECIPE["patch_size"],
    n_components: int = GMM_RECIPE["n_components"],
    n_patches: int = GMM_RECIPE["n_patches"],
    em_iters: int = GMM_RECIPE["em_iters"],
    batch_size: int = GMM_RECIPE["batch_size"],
    cov_regularization: float = GMM_RECIPE["cov_regularization"],
    seed: int = GMM_RECIPE["seed"],
) -> tuple[PatchGMM, dict[str, Any]]:
    """Fit a :class:`PatchGMM` with **zero-mean components** by deepinv's batched EM on ``n_patches`` random patches
    of ``train_images``.

    Zero-mean, because deepinv's EPLL estimates a patch ``P_i x`` of component ``k`` as ``(Sigma_k + I / beta)^{-1}
    Sigma_k P_i x``, the Wiener estimate of a *zero-mean* Gaussian (it never reads ``mu_k``): with the means of a plain
    fit, bright flat patches are shrunk towards black. Each iteration is one deepinv EM step (``fit`` with one
    iteration) followed by ``Sigma_k <- Sigma_k + mu_k mu_k^T``, ``mu_k <- 0``, i.e. the M-step of a mixture of
    zero-mean Gaussians (the responsibility-weighted second moments); the patch mean is then carried by the
    covariances, whose largest directions are the mean intensity of the patch. The patches come from a
    ``torch.Generator`` seeded with ``seed``; the first E-step starts from the first ``n_components`` patches as means
    (deepinv's ``data_init``, which breaks the symmetry between components); exactly ``em_iters`` iterations;
    ``cov_regularization`` is added to every covariance. Returns the mixture and a summary (recipe, seconds, mean
    log-likelihood of the training patches in nats per patch).
    """
    from torch.utils.data import DataLoader, TensorDataset

    if not train_images:
        raise ValueError("fit_patch_gmm needs at least one training image")
    channels = int(train_images[0].shape[1])
    g = torch.Generator().manual_seed(int(seed))
    patches = draw_patches(train_images, patch_size, n_patches, g)
    model = PatchGMM(n_components, patch_size, channels)
    gmm = model.mixture(torch.float32)
    loader = DataLoader(TensorDataset(patches), batch_size=int(batch_size), shuffle=False)
    t0 = time.perf_counter()
    with torch.no_grad():
        for it in range(int(em_iters)):
            gmm.fit(loader, max_iters=1, data_init=(it == 0), cov_regularization=cov_regularization)
            mu = gmm.mu.detach().clone()
            gmm.set_cov(gmm.get_cov() + mu[:, :, None] * mu[:, None, :])
            gmm.mu.data.zero_()
        seconds = time.perf_counter() - t0
        model.set_mixture(gmm)
        mix = model.mixture()
        ll = -float(torch.cat([model.neg_log_likelihood(b, mix) for b in patches.split(int(batch_size))]).mean())
    model.eval().requires_grad_(False)
    summary = {
        "recipe": {"patch_size": patch_size, "n_components": n_components, "n_patches": n_patches,
                   "em_iters": em_iters, "batch_size": batch_size, "cov_regularization": cov_regularization,
                   "seed": seed, "init": "first E-step from means = the first n_components patches (deepinv data_init)",
                   "algorithm": "zero-mean components: deepinv.optim.utils.GaussianMixtureModel.fit one EM step at a "
                   "time, then Sigma_k += mu_k mu_k^T, mu_k = 0 (deepinv's EPLL ignores mu_k)"},
        "fit_seconds": seconds,
        "final_train_log_likelihood": ll,
    }  # fmt: skip
    return model, summary


def mean_log_likelihood(model: PatchGMM, images: list[Tensor], n: int, seed: int) -> float:
    """Mean log-likelihood (nats per patch) of ``n`` random patches of ``images`` (generator seeded with ``seed``)."""
    patches = draw_patches(images, model.patch_size, n, torch.Generator().manual_seed(int(seed)))
    with torch.no_grad():
        mix = model.mixture()
        return -float(torch.cat([model.neg_log_likelihood(b, mix) for b in patches.split(5000)]).mean())


def main(argv: list[str] | None = None) -> int:
    """Fit ``bsd_patch_gmm`` on the 48 training images of ``bsd_split`` and (with ``--export``) ship it."""
    from .. import __version__
    from ..data import load_bsd_split

    p = argparse.ArgumentParser(prog="python -m jpmap_core.models.gmm", description=main.__doc__)
    p.add_argument("--name", default="bsd_patch_gmm")
    for key, value in GMM_RECIPE.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--export", default=None, metavar="DIR", help="write safetensors + manifest entry into DIR")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    train_set, test_set = load_bsd_split(a.data_root)
    model, summary = fit_patch_gmm(
        train_set.images, patch_size=a.patch_size, n_components=a.n_components, n_patches=a.n_patches,
        em_iters=a.em_iters, batch_size=a.batch_size, cov_regularization=a.cov_regularization, seed=a.seed,
    )  # fmt: skip
    test_ll = mean_log_likelihood(model, test_set.images, a.n_test_patches, a.test_seed)
    train_ll = summary["final_train_log_likelihood"]
    print(f"[{a.name}] EM {summary['fit_seconds']:.0f}s  log-likelihood train {train_ll:.2f}, test {test_ll:.2f}")
    if a.export:
        from ..pretrained import export_pretrained

        entry = {
            "model": model.config(),
            "recipe": dict(summary["recipe"], reference="EPLL, Zoran & Weiss ICCV 2011 (6x6 patches, 200 components "
                           "on 2M patches there)"),  # fmt: skip
            "data": {
                "dataset": "bsd_patches",
                "data_source": train_set.source,
                "split_rule": "bsd_split: the 48 CBSD68 training images of bsd_patch_hvae (test = CBSD10 + 10 more)",
                "train_images": list(train_set.names or []),
                "test_images": list(test_set.names or []),
                "scales": [1.0],
                "augmentation": "none",
            },
            "final_train_log_likelihood": summary["final_train_log_likelihood"],
            "final_test_log_likelihood": test_ll,
            "log_likelihood_units": "nats per 6x6x3 patch (pixels in [0, 1])",
            "test_patches": {"n": a.n_test_patches, "seed": a.test_seed},
            "training_seconds": summary["fit_seconds"],
            "package_version": __version__,
            "torch_version": torch.__version__,
            "machine": f"{platform.machine()} torch threads={torch.get_num_threads()}",
            "command": "python -m jpmap_core.models.gmm" + "".join(
                f" --{k.replace('_', '-')} {getattr(a, k)}" for k in GMM_RECIPE if getattr(a, k) != GMM_RECIPE[k]
            ),
        }  # fmt: skip
        entry = export_pretrained(model, a.name, entry, a.export)
        print(f"[{a.name}] exported: sha256 {entry['sha256']}")
    return 0 if math.isfinite(test_ll) else 1


if __name__ == "__main__":
    raise SystemExit(main())
