"""DVAE training (JPMAP §3.2, eqs. 3.1-3.2) and its command line: ``python -m jpmap_core.train``.

The encoder sees ``x + sigma_dvae/255 * eps``, the decoder must reconstruct the clean ``x``; the loss is the
negative denoising ELBO (eq. 3.2) per image with the learned decoder std ``gamma``. Paper recipe as defaults:
Adam, lr 1e-4, batch 128, 200 epochs.

Determinism and resume: every random draw (shuffling, DVAE noise, reparameterisation) comes from one
``torch.Generator`` seeded by ``seed``; its state, the model and the optimiser are checkpointed atomically
after every epoch, so ``--resume`` continues an interrupted run to the same weights as an uninterrupted one.
Checkpoints are loaded with ``torch.load(weights_only=True)`` (nothing is unpickled).

Hierarchical VAE (``--arch hvae``, PnP-HVAE §6.2 PatchVDVAE): :func:`train_hvae` trains on random patches of the
training images of :func:`~jpmap_core.data.bsd_split` (``--dataset bsd_patches``) with the ELBO and per-group
KLs, Adamax (the paper's optimizer, after Efficient-VDVAE) or AdamW, gradient clipping, skipping of updates whose
gradient norm exceeds a threshold (VDVAE), and an exponential moving average of the weights (the exported weights).
``--dataset celeba64`` trains the same model and loop on whole 64x64 CelebA training faces (optionally mirrored,
``--hflip``; the face prior ``celeba64_hvae`` of PnP-HVAE's Table 1), its test ELBO on validation faces.
It also runs under ``torchrun --nproc_per_node N -m jpmap_core.train ...`` (DistributedDataParallel; gloo on CPU,
nccl on GPU): every process draws the whole batch's random numbers from the shared seeded generator and crops
only its own rows, so N processes train the same weights as one (to float rounding of the gradient average).

Normalizing flows (``--arch realnvp|glow``, the priors of AIPO §4.1): :func:`train_flow` maximises the likelihood of
uniformly dequantized 8-bit images (loss: negative log-likelihood in bits per dimension), with the same seeded
generator, atomic checkpoints and exact resume; ``--dataset celeba32`` is the CelebA training faces at 32x32.

Compressive autoencoder (``--arch cae_hyperprior``, the prior of VBLE; Ballé et al. 2018): :func:`train_cae` trains
on the same random patches as the hierarchical VAE (``--dataset bsd_patches``) with the rate-distortion loss
``bpp + lmbda 255^2 MSE`` under additive uniform noise, Adam, the same warm-up, clipping, EMA, checkpoints and resume.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from ._checks import check_positive
from ._io import atomic_write, atomic_write_json
from .data import ImageSampler, ImageSet, PatchSampler, load_bsd_split, load_mnist
from .models import HVAE, CAEHyperprior, GaussianVAE, build_model


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored in checkpoints and manifests)."""

    name: str = "mnist_mlp_dvae15"
    dataset: str = "mnist"  # mnist | celeba64 | bsd_patches (hvae)
    model: dict[str, Any] = field(default_factory=lambda: {"arch": "mlp"})
    sigma_dvae: float = 15.0  # 0-255 scale
    epochs: int = 200
    lr: float = 1e-4
    batch_size: int = 128
    seed: int = 0
    n_train: int | None = None  # first n training images (None: all)
    n_test: int | None = None
    hflip: bool = False  # horizontal-flip augmentation (faces)
    data_root: str | None = None
    # hierarchical VAE on patches (train_hvae); None for the DVAE recipes
    patch_size: int | None = None
    steps_per_epoch: int | None = None
    optimizer: str | None = None  # adamax | adamw
    weight_decay: float | None = None
    warmup_steps: int | None = None
    grad_clip: float | None = None  # max gradient norm (per-dimension loss)
    skip_threshold: float | None = None  # skip the update when the gradient norm exceeds it (0: never)
    ema_rate: float | None = None
    # compressive autoencoder (train_cae): the rate-distortion weight of bpp + lmbda 255^2 MSE
    lmbda: float | None = None

    # fields that may change between an interrupted run and its resumption
    RESUMABLE_CHANGES = ("epochs", "data_root")


def load_dataset(cfg: TrainConfig) -> tuple[ImageSet, ImageSet]:
    if cfg.dataset == "mnist":
        train, test = load_mnist("train", cfg.data_root), load_mnist("test", cfg.data_root)
    elif cfg.dataset == "celeba64":
        from .data import load_celeba64

        train, test = load_celeba64("train", cfg.data_root), load_celeba64("test", cfg.data_root)
    elif cfg.dataset == "celeba32":
        from .data import load_celeba32

        train, test = load_celeba32("train", cfg.data_root), load_celeba32("test", cfg.data_root)
    else:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; expected 'mnist', 'celeba64' or 'celeba32'")
    return train.subset(cfg.n_train), test.subset(cfg.n_test)


def dvae_loss(
    vae: GaussianVAE, x: Tensor, sigma_dvae: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Mean negative denoising ELBO over the batch (eq. 3.2), and the per-image ELBO (detached)."""
    if sigma_dvae > 0:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_enc = x + (sigma_dvae / 255.0) * noise
    else:
        x_enc = x
    elbo = vae.elbo(x, x_enc, generator=generator)
    return -elbo.mean(), elbo.detach()


@torch.no_grad()
def evaluate_elbo(
    vae: GaussianVAE, images: Tensor, *, batch_size: int = 1000, seed: int = 12345, device: str = "cpu"
) -> float:
    """Mean test ELBO (nats per image, clean encoder input, one-sample estimate with a fixed seed)."""
    was_training = vae.training
    vae.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    total = 0.0
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(device)
        total += float(vae.elbo(x, generator=g).sum())
    vae.train(was_training)
    return total / images.shape[0]


# ------------------------------------------------------------------------------------------------
# Normalizing flows (AIPO §4.1): maximum likelihood in bits per dimension
# ------------------------------------------------------------------------------------------------
#: architectures trained by :func:`train_flow`
FLOW_ARCHS = ("realnvp", "glow")
#: max gradient norm of flow training (loss in bits per dimension); guards the first steps of a deep flow
FLOW_GRAD_CLIP = 50.0
#: ActNorm's data-dependent initialisation uses the first this-many training images, dequantized (seed + 1)
FLOW_INIT_IMAGES = 512


def is_flow(model: dict[str, Any]) -> bool:
    """Whether a model config is a normalizing flow (trained by :func:`train_flow`)."""
    return model.get("arch") in FLOW_ARCHS


def flow_loss(flow: Any, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Mean bits per dimension of the uniformly dequantized batch ``(k + u) / 256`` (the training loss, i.e. the
    negative log-likelihood), and the per-image bits per dimension (detached)."""
    from .models.flow import bits_per_dim_of, dequantize

    bpd = bits_per_dim_of(flow.log_prob(dequantize(x, generator), check=False), flow.d)
    return bpd.mean(), bpd.detach()


@torch.no_grad()
def evaluate_bpd(flow: Any, images: Tensor, *, batch_size: int = 500, seed: int = 12345, device: str = "cpu") -> float:
    """Mean test bits per dimension (dequantization noise from a generator seeded with ``seed``: the same for every
    run)."""
    was_training = flow.training
    flow.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    total = 0.0
    for i in range(0, images.shape[0], batch_size):
        total += float(flow_loss(flow, images[i : i + batch_size].to(device), g)[1].sum())
    flow.train(was_training)
    return total / images.shape[0]


def train_flow(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
    data: tuple[ImageSet, ImageSet] | None = None,
) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """Train (or resume) a RealNVP / Glow prior by maximum likelihood; returns the flow (eval mode) and the log.

    Adam (``cfg.lr``), gradient norm clipped to :data:`FLOW_GRAD_CLIP`, optional horizontal flips; ActNorm is
    initialised from the first :data:`FLOW_INIT_IMAGES` training images. ``cfg.sigma_dvae`` is not used. The run
    directory holds the same ``checkpoint.pt`` (every epoch, atomic), ``log.json`` and ``config.json`` as
    :func:`train`; the log has per epoch ``train_bpd``, ``test_bpd`` (:func:`evaluate_bpd`), ``seconds`` and
    ``images_per_second``.
    """
    from tqdm.auto import tqdm

    from .models.flow import dequantize

    if not is_flow(cfg.model):
        raise ValueError(f"train_flow trains the architectures {FLOW_ARCHS}, got {cfg.model.get('arch')!r}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_set, test_set = data if data is not None else load_dataset(cfg)
    x_train = train_set.images.to(device)
    x_test = test_set.images
    with torch.random.fork_rng(devices=[]):  # initial weights drawn from the run's seed, globals untouched
        torch.manual_seed(cfg.seed)
        flow = build_model(cfg.model).to(device)
    if tuple(x_train.shape[1:]) != tuple(flow.image_shape):
        raise ValueError(
            f"the training images have shape {tuple(x_train.shape[1:])} but the flow is built for {flow.image_shape}"
        )
    opt = torch.optim.Adam(flow.parameters(), lr=cfg.lr)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    log: list[dict[str, Any]] = []
    start_epoch = 0
    if resume and _checkpoint_path(run_dir).exists():
        ck = _load_checkpoint(run_dir)
        _check_same_recipe(run_dir, json.loads(ck["config"]), asdict(cfg))
        flow.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        log = json.loads(ck["log"])
        start_epoch = int(ck["epoch"])
    else:
        if resume:
            print(f"[train] no checkpoint in {run_dir}; starting from scratch", file=sys.stderr)
        init_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        flow.data_init(dequantize(x_train[:FLOW_INIT_IMAGES], init_gen))
    atomic_write_json(run_dir / "config.json", asdict(cfg))
    meta = {"data_source": train_set.source, "n_train": len(train_set), "n_test": len(test_set)}

    n = x_train.shape[0]
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        flow.train()
        perm = torch.randperm(n, generator=gen, device=device)
        tot_bpd = 0.0
        n_batches = math.ceil(n / cfg.batch_size)
        bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for b in bar:
            x = x_train[perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]]
            if cfg.hflip:
                flip = torch.rand(x.shape[0], generator=gen, device=device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss, bpd = flow_loss(flow, x, gen)
            if not bool(torch.isfinite(loss.detach())):
                raise FloatingPointError(f"training loss became {float(loss)} at epoch {epoch + 1}, batch {b}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), FLOW_GRAD_CLIP)
            opt.step()
            tot_bpd += float(bpd.sum())
            if b % 10 == 0:
                bar.set_postfix(bpd=f"{float(loss.detach()):.3f}")
        train_seconds = time.perf_counter() - t0
        entry = {
            "epoch": epoch + 1,
            "train_bpd": tot_bpd / n,
            "test_bpd": evaluate_bpd(flow, x_test, device=device),
            "seconds": train_seconds,
            "images_per_second": n / train_seconds,
        }
        log.append(entry)
        _save_checkpoint(
            run_dir,
            {
                "model": flow.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "epoch": epoch + 1,
                "log": json.dumps(log),
                "config": json.dumps(asdict(cfg)),
                "meta": json.dumps(meta),
            },
        )
        atomic_write_json(run_dir / "log.json", {"meta": meta, "epochs": log})
        if progress:
            print(
                f"[{cfg.name}] epoch {epoch + 1}/{cfg.epochs}  train {entry['train_bpd']:.4f} bits/dim  "
                f"test {entry['test_bpd']:.4f} bits/dim  {train_seconds:.1f}s",
                flush=True,
            )
    flow.eval()
    return flow, log


def flow_manifest_entry(cfg: TrainConfig, flow: Any, log: list[dict[str, Any]], meta: dict[str, Any]) -> dict:
    """Everything a manifest records about a trained flow (sha256 and file are added on export)."""
    return {
        "model": flow.config(),
        "recipe": {
            "criterion": "maximum likelihood: negative log-likelihood in bits per dimension (AIPO §4.1 priors)",
            "dequantization": "uniform: (k + u) / 256 for 8-bit values k, u ~ U[0, 1)",
            "optimizer": "Adam",
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "epochs": cfg.epochs,
            "seed": cfg.seed,
            "hflip": cfg.hflip,
            "grad_clip": FLOW_GRAD_CLIP,
            "actnorm_init": f"data-dependent, first {FLOW_INIT_IMAGES} training images",
        },
        "data": {"dataset": cfg.dataset, "split": "train", **meta},
        "epochs": len(log),
        "final_test_bpd": log[-1]["test_bpd"] if log else None,
        "final_train_bpd": log[-1]["train_bpd"] if log else None,
        "test_bpd_dequantization_seed": 12345,
        "training_seconds": float(sum(e["seconds"] for e in log)),
        "package_version": __version__,
        "torch_version": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} torch threads={torch.get_num_threads()}".strip(),
        "command": "python -m jpmap_core.train " + " ".join(_flow_cli_args(cfg)),
    }


def _flow_cli_args(cfg: TrainConfig) -> list[str]:
    m = cfg.model
    args = ["--name", cfg.name, "--dataset", cfg.dataset, "--arch", m["arch"]]
    for key in ("levels", "steps", "width", "blocks"):
        if key in m:
            args += [f"--{key}", str(m[key])]
    if "logit_alpha" in m:
        args += ["--logit-alpha", "none" if m["logit_alpha"] is None else f"{m['logit_alpha']:g}"]
    args += ["--epochs", str(cfg.epochs), "--lr", f"{cfg.lr:g}", "--batch-size", str(cfg.batch_size)]
    args += ["--seed", str(cfg.seed)]
    if cfg.n_train is not None:
        args += ["--n-train", str(cfg.n_train)]
    if cfg.hflip:
        args.append("--hflip")
    return args


def _checkpoint_path(run_dir: Path) -> Path:
    return run_dir / "checkpoint.pt"


def _save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_write(_checkpoint_path(run_dir), lambda tmp: torch.save(state, tmp))


def _save_step_run(
    run_dir: Path, cfg: TrainConfig, model: nn.Module, ema: nn.Module, opt: Any, gen: torch.Generator,
    epoch: int, step: int, skipped_total: int, log: list[dict[str, Any]], meta: dict[str, Any],
) -> None:  # fmt: skip
    """End of an epoch of the step-based loops (hierarchical VAE, compressive autoencoder): the checkpoint (weights,
    EMA, optimiser, generator, counters, log, recipe) and ``log.json``, each written atomically."""
    _save_checkpoint(
        run_dir,
        {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "generator": gen.get_state(),
            "epoch": epoch,
            "step": step,
            "skipped": skipped_total,
            "log": json.dumps(log),
            "config": json.dumps(asdict(cfg)),
            "meta": json.dumps(meta),
        },
    )
    atomic_write_json(run_dir / "log.json", {"meta": meta, "epochs": log})


def _load_checkpoint(run_dir: Path) -> dict[str, Any]:
    return torch.load(_checkpoint_path(run_dir), map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------
# Hierarchical VAE on natural-image patches (PnP-HVAE §6.2)
# ------------------------------------------------------------------------------------------------
#: defaults of the hierarchical VAE recipe (``bsd_patch_hvae``: about an hour on one CPU core)
HVAE_DEFAULTS: dict[str, Any] = {
    "patch_size": 32,
    "steps_per_epoch": 500,
    "optimizer": "adamax",
    "weight_decay": 0.0,
    "warmup_steps": 200,
    "grad_clip": 50.0,
    "skip_threshold": 200.0,
    "ema_rate": 0.999,
}
#: command-line defaults of ``--arch hvae`` that differ from the DVAE recipes
#: (``bsd_patch_hvae``: 30 x 500 steps of 32 patches 32x32 = 480k patches; 1 thread of the development machine trained
#: this model at 220 patches/s on a lightly loaded core, 55 on a crowded one: about 36 minutes of one core)
HVAE_CLI_DEFAULTS: dict[str, Any] = {
    "epochs": 30,
    "lr": 1e-3,
    "batch_size": 32,
    "model": {
        "widths": [24, 32, 48, 64],
        "groups": [0, 2, 2, 2],
        "latent_channels": [3, 4, 6, 8],
        "enc_blocks": [1, 1, 2, 2],
        "gamma_init": 0.03,
    },
}


#: command-line defaults of ``--arch hvae --dataset celeba64`` (the face prior ``celeba64_hvae`` of PnP-HVAE's Table 1,
#: trained on whole 64x64 faces): resolutions 64, 32, 16, 8, 4 with latent groups at 32 and coarser (L = 7); the
#: recipe and its measured cost are in benchmarks/results_hvae_training_cpu.json (bench_hvae_training.py): 319k
#: parameters, 30 x 500 steps of 16 faces, about 0.43 CPU s per step on one thread, i.e. about 2 h of one idle core
HVAE_FACE_CLI_DEFAULTS: dict[str, Any] = {
    "epochs": 30,
    "lr": 1e-3,
    "batch_size": 16,
    "model": {
        "widths": [24, 48, 64, 96, 96],
        "groups": [0, 1, 2, 2, 2],
        "latent_channels": [3, 4, 6, 8, 8],
        "enc_blocks": [1, 1, 1, 2, 2],
        "gamma_init": 0.03,
    },
}
#: datasets of ``--arch hvae``: random multi-scale patches of BSD, or whole CelebA 64x64 faces
HVAE_DATASETS = ("bsd_patches", "celeba64")
FACE_SIZE = 64

PATCH_SCALES = (1.0, 0.5, 0.25)  # HR, x2 and x4 downsampled (PnP-HVAE §6.2)
TEST_PATCH_SEED = 12345
N_TEST_PATCHES = 512


def hvae_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the hierarchical VAE recipe's defaults filled in (fields left ``None``; whole faces: the image
    size 64 as ``patch_size``)."""
    defaults = dict(HVAE_DEFAULTS, patch_size=FACE_SIZE) if cfg.dataset == "celeba64" else HVAE_DEFAULTS
    filled = {k: v for k, v in defaults.items() if getattr(cfg, k) is None}
    return replace(cfg, **filled)


def load_patch_data(
    cfg: TrainConfig, data: tuple[ImageSet, ImageSet] | None = None
) -> tuple[PatchSampler, Tensor, dict]:
    """Training patch sampler, fixed test patches and the data description of a manifest.

    ``data`` (``(train, test)`` image sets) defaults to CBSD68 split by :func:`~jpmap_core.data.bsd_split`.
    Test patches: ``n_test`` (default 512) patches of the test images at the same scales, without flips,
    from a generator seeded with 12345 (the same set for every run).
    """
    if cfg.dataset == "celeba64":
        return load_face_data(cfg, data)
    if cfg.dataset != "bsd_patches" and data is None:
        raise ValueError(
            f"patch priors train on dataset 'bsd_patches' (cae_hyperprior) or 'bsd_patches' / 'celeba64' (hvae), got "
            f"{cfg.dataset!r}"
        )
    train_set, test_set = data if data is not None else load_bsd_split(cfg.data_root)
    train_images = train_set.images if isinstance(train_set.images, list) else list(train_set.images[:, None])
    test_images = test_set.images if isinstance(test_set.images, list) else list(test_set.images[:, None])
    sampler = PatchSampler(train_images, cfg.patch_size, PATCH_SCALES, augment=True)
    n_test = cfg.n_test or N_TEST_PATCHES
    gen = torch.Generator().manual_seed(TEST_PATCH_SEED)
    test = PatchSampler(test_images, cfg.patch_size, PATCH_SCALES, augment=False).draw(n_test, gen)
    meta = {
        "data_source": train_set.source,
        "test_source": test_set.source,
        "split_rule": "bsd_split: test = the 10 CBSD10 images + the first 10 other CBSD68 images in natural name "
        "order; train = the other 48",
        "train_images": list(train_set.names or []),
        "test_images": list(test_set.names or []),
        "n_train": len(train_set),
        "n_test": len(test_set),
        "n_test_patches": n_test,
        "test_patch_seed": TEST_PATCH_SEED,
        "patch_size": cfg.patch_size,
        "scales": list(PATCH_SCALES),
        "augmentation": "random scale (uniform), image, position; flips and 90-degree rotations (8 symmetries)",
    }
    return sampler, test, meta


def load_face_data(
    cfg: TrainConfig, data: tuple[ImageSet, ImageSet] | None = None
) -> tuple[ImageSampler, Tensor, dict]:
    """Training sampler of whole faces, fixed held-out faces and the data description of a manifest
    (``--dataset celeba64``).

    ``data`` (``(train, held_out)`` image sets) defaults to the official CelebA partition of
    :func:`~jpmap_core.data.load_celeba64`: the training faces (partition 0; 4,560 in the offline npz) are drawn
    uniformly with replacement, mirrored with probability 1/2 when ``cfg.hflip``; the test ELBO of the log is that of
    the first ``n_test`` (default 512) **validation** faces (partition 1), so the test faces (partition 2) that the
    restoration notebooks use are never read.
    """
    from .data import load_celeba64

    if data is None:
        train_set, held_out = load_celeba64("train", cfg.data_root), load_celeba64("val", cfg.data_root)
    else:
        train_set, held_out = data
    for role, s in (("training", train_set), ("held-out", held_out)):
        if s.ragged or tuple(s.images.shape[-2:]) != (cfg.patch_size, cfg.patch_size):
            shape = "ragged" if s.ragged else tuple(s.images.shape[1:])
            raise ValueError(
                f"the {role} faces must be one (N, C, {cfg.patch_size}, {cfg.patch_size}) tensor (whole images of "
                f"the prior's size, patch_size={cfg.patch_size}), got {shape}"
            )
    n_test = min(cfg.n_test or N_TEST_PATCHES, len(held_out))
    names = list(train_set.names or [])
    meta = {
        "data_source": train_set.source,
        "test_source": held_out.source,
        "split_rule": "official CelebA partition: train = every partition-0 face; test ELBO on the first n_test "
        "validation (partition 1) faces; the test faces (partition 2) are never read",
        "train_images": f"{len(names)} faces {names[0]} .. {names[-1]} (sorted file names)" if names else None,
        "test_images": list((held_out.names or [])[:n_test]),
        "n_train": len(train_set),
        "n_test": n_test,
        "n_test_patches": n_test,
        "image_size": cfg.patch_size,
        "augmentation": "horizontal flip with probability 1/2" if cfg.hflip else "none",
    }
    return ImageSampler(train_set.images, hflip=cfg.hflip), held_out.images[:n_test].contiguous(), meta


@torch.no_grad()
def evaluate_hvae(
    model: HVAE, patches: Tensor, *, batch_size: int = 256, seed: int = TEST_PATCH_SEED, device: str = "cpu"
) -> dict[str, Any]:
    """Test ELBO of fixed patches: nats per patch, nats per dimension, and the mean KL of every group."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    n_lat = model.latent_shape[0] if tuple(patches.shape[1:]) == model.image_shape else None
    nll_sum, kl_sum = 0.0, torch.zeros(model.n_groups, dtype=torch.float64)
    for i in range(0, patches.shape[0], batch_size):
        x = patches[i : i + batch_size]
        n = n_lat or sum(c * h * w for c, h, w in model.group_shapes_at(*x.shape[-2:]))
        eps = torch.randn(x.shape[0], n, generator=g).to(device)
        nll, kl = model(x.to(device), None, eps)
        nll_sum += float(nll.sum())
        kl_sum += kl.sum(0).double().cpu()
    model.train(was_training)
    n, d = patches.shape[0], patches[0].numel()
    elbo = -(nll_sum + float(kl_sum.sum())) / n
    return {"elbo": elbo, "elbo_per_dim": elbo / d, "kl": (kl_sum / n).tolist()}


def _distributed() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":  # Ballé et al. 2018 (compressive autoencoders)
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamax":  # PnP-HVAE §6.2 (after Efficient-VDVAE)
        return torch.optim.Adamax(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":  # VDVAE
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.9))
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected 'adam', 'adamax' or 'adamw'")


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, rate: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.mul_(rate).add_(p.detach(), alpha=1.0 - rate)
    for be, b in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(b)


def train_hvae(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
    data: tuple[ImageSet, ImageSet] | None = None,
) -> tuple[HVAE, list[dict[str, Any]]]:
    """Train (or resume) a hierarchical VAE on random patches; returns the EMA model (eval mode) and the log.

    One step: a batch of ``batch_size`` patches (split over the processes of a DistributedDataParallel group),
    one reparameterised sample per group, loss = negative ELBO per dimension (nats/dim); the gradient norm is
    clipped to ``grad_clip`` and the update is skipped (and counted) when the norm exceeds ``skip_threshold``
    or is not finite; the learning rate warms up linearly over ``warmup_steps``; the EMA of the weights is
    updated after every applied step. An epoch is ``steps_per_epoch`` steps; after each, the EMA model's test
    ELBO is computed and ``run_dir/checkpoint.pt`` (weights, EMA, optimizer, generator, log) is written
    atomically by rank 0, so ``resume`` continues to the same weights as an uninterrupted run.
    """
    from tqdm.auto import tqdm

    cfg = hvae_config(cfg)
    rank, world = _distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the number of processes {world}")
    if cfg.optimizer not in ("adamax", "adamw"):
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected 'adamax' or 'adamw'")
    run_dir = Path(run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    sampler, test_patches, meta = load_patch_data(cfg, data)
    model_cfg = dict(cfg.model)
    model_cfg["image_shape"] = [3, cfg.patch_size, cfg.patch_size]
    with torch.random.fork_rng(devices=[]):  # initial weights drawn from the run's seed, globals untouched
        torch.manual_seed(cfg.seed)
        model = build_model(model_cfg).to(device)
    if not isinstance(model, HVAE):
        raise ValueError(f"train_hvae trains the 'hvae' architecture, got {model_cfg.get('arch')!r}")
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = _make_optimizer(cfg, model.parameters())
    gen = torch.Generator().manual_seed(cfg.seed)  # on the CPU: the same numbers whatever the device
    log: list[dict[str, Any]] = []
    start_epoch, step, skipped_total = 0, 0, 0
    if resume and _checkpoint_path(run_dir).exists():
        ck = _load_checkpoint(run_dir)
        _check_same_recipe(run_dir, json.loads(ck["config"]), asdict(cfg))
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        log = json.loads(ck["log"])
        start_epoch, step, skipped_total = int(ck["epoch"]), int(ck["step"]), int(ck["skipped"])
    elif resume and rank == 0:
        print(f"[train] no checkpoint in {run_dir}; starting from scratch", file=sys.stderr)
    if rank == 0:
        atomic_write_json(run_dir / "config.json", asdict(cfg))
    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[torch.device(device).index] if "cuda" in device else None)
    b = cfg.batch_size // world
    rows = slice(rank * b, (rank + 1) * b)
    n_latent, d = model.latent_shape[0], model.d
    grad_clip = cfg.grad_clip if cfg.grad_clip else math.inf
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        sums = torch.zeros(1 + model.n_groups, dtype=torch.float64)  # nll, kl per group (summed over images)
        skipped, norms = 0, []
        bar = tqdm(range(cfg.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress or rank)
        for _ in bar:
            x = sampler.draw(cfg.batch_size, gen, rows).to(device)
            x_enc = None
            if cfg.sigma_dvae > 0:
                noise = torch.randn(cfg.batch_size, *x.shape[1:], generator=gen)[rows].to(device)
                x_enc = x + (cfg.sigma_dvae / 255.0) * noise
            eps = torch.randn(cfg.batch_size, n_latent, generator=gen)[rows].to(device)
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            for group in opt.param_groups:
                group["lr"] = lr
            nll, kl = net(x, x_enc, eps)
            loss = (nll + kl.sum(1)).mean() / d
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
            if math.isfinite(norm) and not (cfg.skip_threshold and norm > cfg.skip_threshold):
                opt.step()
                _ema_update(ema, model, cfg.ema_rate)
            else:
                skipped += 1
            step += 1
            norms.append(norm)
            sums += torch.cat([nll.detach().sum()[None], kl.detach().sum(0)]).double().cpu()
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", gamma=f"{float(model.gamma.detach()):.4f}")
        if world > 1:
            import torch.distributed as dist

            sums = sums.to(device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        seconds = time.perf_counter() - t0
        skipped_total += skipped
        n_images = cfg.steps_per_epoch * cfg.batch_size
        train_kl = (sums[1:] / n_images).tolist()
        train_elbo = -float(sums.sum()) / n_images
        if rank == 0:
            test = evaluate_hvae(ema, test_patches, device=device)
            finite = [v for v in norms if math.isfinite(v)]
            entry = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": -train_elbo / d,  # nats per dimension, the optimised quantity
                "train_elbo": train_elbo,
                "train_elbo_per_dim": train_elbo / d,
                "train_kl": train_kl,
                "test_elbo": test["elbo"],
                "test_elbo_per_dim": test["elbo_per_dim"],
                "test_kl": test["kl"],
                "skipped": skipped,
                "skipped_total": skipped_total,
                "grad_norm_median": float(torch.tensor(finite).median()) if finite else math.nan,
                "grad_norm_max": max(norms),
                "gamma": float(model.gamma.detach()),
                "lr": lr,
                "seconds": seconds,
                "images_per_s": n_images / seconds,
            }
            log.append(entry)
            _save_step_run(run_dir, cfg, model, ema, opt, gen, epoch + 1, step, skipped_total, log, meta)
            kls = " ".join(f"{v:.1f}" for v in train_kl)
            print(
                f"[{cfg.name}] epoch {epoch + 1}/{cfg.epochs} step {step}  train ELBO {train_elbo / d:.4f}/dim  "
                f"test ELBO {test['elbo_per_dim']:.4f}/dim ({test['elbo']:.1f} nats)  KL [{kls}]  "
                f"skipped {skipped}  gamma {entry['gamma']:.5f}  {seconds:.0f}s  {entry['images_per_s']:.0f} img/s",
                flush=True,
            )
    ema.eval()
    return ema, log


def _check_same_recipe(run_dir: Path, saved: dict[str, Any], mine: dict[str, Any]) -> None:
    diff = {k for k in mine if saved.get(k) != mine[k] and k not in TrainConfig.RESUMABLE_CHANGES}
    if diff:
        raise ValueError(
            f"cannot resume {run_dir}: the checkpoint was trained with different "
            + ", ".join(f"{k}={saved.get(k)!r} (now {mine[k]!r})" for k in sorted(diff))
        )


# ------------------------------------------------------------------------------------------------
# Compressive autoencoder with a scale hyperprior (Ballé et al. 2018; the prior of VBLE)
# ------------------------------------------------------------------------------------------------
#: defaults of the compressive autoencoder recipe (fields of :class:`TrainConfig` left ``None``)
CAE_DEFAULTS: dict[str, Any] = {
    "patch_size": 64,
    "steps_per_epoch": 500,
    "optimizer": "adam",
    "weight_decay": 0.0,
    "warmup_steps": 200,
    "grad_clip": 1.0,  # CompressAI's clip_max_norm (loss per pixel)
    "skip_threshold": 0.0,
    "ema_rate": 0.999,
    "lmbda": 0.025,
}
#: command-line defaults of ``--arch cae_hyperprior`` (``bsd_cae_hyperprior``: 12 x 500 steps of 16 patches 64x64 =
#: 96k patches; 1 thread: 0.31 s per step on a lightly loaded core, 0.5-0.8 s on the crowded development machine, where
#: it took 67 minutes)
CAE_CLI_DEFAULTS: dict[str, Any] = {"epochs": 12, "lr": 1e-3, "batch_size": 16, "model": {"N": 64, "M": 96}}


def cae_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the compressive autoencoder recipe's defaults filled in (fields left ``None``)."""
    filled = {k: v for k, v in CAE_DEFAULTS.items() if getattr(cfg, k) is None}
    return replace(cfg, **filled)


@torch.no_grad()
def evaluate_cae(model: CAEHyperprior, patches: Tensor, *, batch_size: int = 64, device: str = "cpu") -> dict:
    """Rate and distortion of fixed test patches with **rounded** latents (eval mode): bits per pixel (the ideal code
    length ``-log2`` of the likelihoods, total and of ``y``), MSE and PSNR (dB, of the mean MSE), the loss."""
    was_training = model.training
    model.eval()
    bpp, bpp_y, mse = [], [], []
    for i in range(0, patches.shape[0], batch_size):
        out = model.rd_loss(patches[i : i + batch_size].to(device))
        bpp.append(out["bpp"].cpu())
        bpp_y.append(out["bpp_y"].cpu())
        mse.append(out["mse"].cpu())
    model.train(was_training)
    b, m = float(torch.cat(bpp).mean()), float(torch.cat(mse).mean())
    return {
        "bpp": b,
        "bpp_y": float(torch.cat(bpp_y).mean()),
        "mse": m,
        "psnr": 10 * math.log10(1.0 / m),
        "loss": b + model.lmbda * 255.0**2 * m,
    }


def train_cae(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
    data: tuple[ImageSet, ImageSet] | None = None,
) -> tuple[CAEHyperprior, list[dict[str, Any]]]:
    """Train (or resume) a compressive autoencoder with a scale hyperprior on random patches; returns the EMA model
    (eval mode) and the log.

    One step: ``batch_size`` patches (:func:`load_patch_data`, the hierarchical VAE's sampler and split), additive
    uniform noise on ``y`` and ``z`` from the run's generator (Ballé 2018 §2), loss ``bpp + lmbda 255^2 MSE``
    (:meth:`~jpmap_core.models.CAEHyperprior.rd_loss`), the gradient norm clipped to ``grad_clip``, a linear warm-up
    of the learning rate, Adam, an EMA of the weights (the exported weights). After each epoch of
    ``steps_per_epoch`` steps: the EMA model's test rate and PSNR with rounded latents (:func:`evaluate_cae`) and an
    atomic checkpoint, so that ``resume`` continues to the same weights as an uninterrupted run.
    """
    from tqdm.auto import tqdm

    cfg = cae_config(cfg)
    if cfg.optimizer not in ("adam", "adamax", "adamw"):
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected 'adam', 'adamax' or 'adamw'")
    check_positive(cfg.lmbda, "lmbda")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sampler, test_patches, meta = load_patch_data(cfg, data)
    model_cfg = dict(cfg.model, image_shape=[3, cfg.patch_size, cfg.patch_size], lmbda=cfg.lmbda)
    with torch.random.fork_rng(devices=[]):  # initial weights drawn from the run's seed, globals untouched
        torch.manual_seed(cfg.seed)
        model = build_model(model_cfg).to(device)
    if not isinstance(model, CAEHyperprior):
        raise ValueError(f"train_cae trains the 'cae_hyperprior' architecture, got {model_cfg.get('arch')!r}")
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = _make_optimizer(cfg, model.parameters())
    gen = torch.Generator().manual_seed(cfg.seed)  # on the CPU: the same numbers whatever the device
    log: list[dict[str, Any]] = []
    start_epoch, step, skipped_total = 0, 0, 0
    if resume and _checkpoint_path(run_dir).exists():
        ck = _load_checkpoint(run_dir)
        _check_same_recipe(run_dir, json.loads(ck["config"]), asdict(cfg))
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        log = json.loads(ck["log"])
        start_epoch, step, skipped_total = int(ck["epoch"]), int(ck["step"]), int(ck["skipped"])
    elif resume:
        print(f"[train] no checkpoint in {run_dir}; starting from scratch", file=sys.stderr)
    atomic_write_json(run_dir / "config.json", asdict(cfg))
    grad_clip = cfg.grad_clip if cfg.grad_clip else math.inf
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        sums = torch.zeros(3, dtype=torch.float64)  # loss, bpp, mse (summed over patches)
        skipped, norms = 0, []
        bar = tqdm(range(cfg.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress)
        for _ in bar:
            x = sampler.draw(cfg.batch_size, gen).to(device)
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            for group in opt.param_groups:
                group["lr"] = lr
            out = model.rd_loss(x, gen)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
            if math.isfinite(norm) and not (cfg.skip_threshold and norm > cfg.skip_threshold):
                opt.step()
                _ema_update(ema, model, cfg.ema_rate)
            else:
                skipped += 1
            step += 1
            norms.append(norm)
            n = x.shape[0]
            parts = (out["loss"].detach() * n, out["bpp"].detach().sum(), out["mse"].detach().sum())
            sums += torch.tensor([float(v) for v in parts], dtype=torch.float64)
            bar.set_postfix(loss=f"{float(out['loss'].detach()):.3f}", bpp=f"{float(out['bpp'].detach().mean()):.3f}")
        seconds = time.perf_counter() - t0
        skipped_total += skipped
        n_images = cfg.steps_per_epoch * cfg.batch_size
        test = evaluate_cae(ema, test_patches, device=device)
        finite = [v for v in norms if math.isfinite(v)]
        train_mse = float(sums[2]) / n_images
        entry = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": float(sums[0]) / n_images,  # bpp + lmbda 255^2 MSE, uniform noise
            "train_bpp": float(sums[1]) / n_images,
            "train_psnr": 10 * math.log10(1.0 / train_mse),
            "test_loss": test["loss"],
            "test_bpp": test["bpp"],
            "test_bpp_y": test["bpp_y"],
            "test_mse": test["mse"],
            "test_psnr": test["psnr"],
            "skipped": skipped,
            "skipped_total": skipped_total,
            "grad_norm_median": float(torch.tensor(finite).median()) if finite else math.nan,
            "grad_norm_max": max(norms),
            "lr": lr,
            "seconds": seconds,
            "images_per_s": n_images / seconds,
        }
        log.append(entry)
        _save_step_run(run_dir, cfg, model, ema, opt, gen, epoch + 1, step, skipped_total, log, meta)
        print(
            f"[{cfg.name}] epoch {epoch + 1}/{cfg.epochs} step {step}  train loss {entry['train_loss']:.4f} "
            f"({entry['train_bpp']:.3f} bpp, {entry['train_psnr']:.2f} dB)  test {test['bpp']:.3f} bpp "
            f"{test['psnr']:.2f} dB (rounded)  skipped {skipped}  {seconds:.0f}s  {entry['images_per_s']:.0f} img/s",
            flush=True,
        )
    ema.eval()
    return ema, log


def _cae_manifest_entry(cfg: TrainConfig, model: CAEHyperprior, log: list[dict[str, Any]], meta: dict) -> dict:
    last = log[-1] if log else {}
    return {
        "model": model.config(),
        "recipe": {
            "criterion": "rate-distortion loss bpp + lmbda 255^2 MSE (Ballé et al. 2018, eq. 2 with eqs. 9-10), "
            "additive uniform noise on y and z",
            "loss_units": "bits per pixel",
            "lmbda": cfg.lmbda,
            "optimizer": {"adam": "Adam", "adamax": "Adamax", "adamw": "AdamW, betas (0.9, 0.9)"}[cfg.optimizer],
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "warmup_steps": cfg.warmup_steps,
            "batch_size": cfg.batch_size,
            "steps_per_epoch": cfg.steps_per_epoch,
            "epochs": cfg.epochs,
            "grad_clip": cfg.grad_clip,
            "ema_rate": cfg.ema_rate,
            "exported_weights": "EMA",
            "seed": cfg.seed,
            "patch_size": cfg.patch_size,
        },
        "data": {"dataset": cfg.dataset, **meta},
        "epochs": len(log),
        "steps": last.get("step", 0),
        "final_test_bpp": last.get("test_bpp"),
        "final_test_psnr": last.get("test_psnr"),
        "final_test_mse": last.get("test_mse"),
        "test_evaluation": "EMA weights, rounded latents; bpp = -log2 of the likelihoods (ideal code length, no "
        "range coder); PSNR of the mean MSE over the test patches",
        "final_train_loss": last.get("train_loss"),
        "gamma": float(model.gamma),
        "gamma_kind": "fixed: sqrt(C / (2 lmbda 255^2 log 2)), the CAE read as a VAE",
        "beta": model.beta,
        "training_seconds": float(sum(e["seconds"] for e in log)),
        "package_version": __version__,
        "torch_version": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} torch threads={torch.get_num_threads()}".strip(),
        "command": "python -m jpmap_core.train " + " ".join(_cae_cli_args(cfg)),
    }


def _cae_cli_args(cfg: TrainConfig) -> list[str]:
    m = cfg.model
    args = ["--name", cfg.name, "--dataset", cfg.dataset, "--arch", CAEHyperprior.arch]
    args += ["--patch-size", str(cfg.patch_size), "--channels", f"{m.get('N', 64)},{m.get('M', 96)}"]
    args += ["--lmbda", f"{cfg.lmbda:g}", "--epochs", str(cfg.epochs), "--steps-per-epoch", str(cfg.steps_per_epoch)]
    args += ["--batch-size", str(cfg.batch_size), "--optimizer", cfg.optimizer, "--lr", f"{cfg.lr:g}"]
    args += ["--weight-decay", f"{cfg.weight_decay:g}", "--warmup-steps", str(cfg.warmup_steps)]
    args += ["--grad-clip", f"{cfg.grad_clip:g}", "--ema-rate", f"{cfg.ema_rate:g}", "--seed", str(cfg.seed)]
    if cfg.n_test is not None:
        args += ["--n-test", str(cfg.n_test)]
    return args


def _cae_cli_config(p: argparse.ArgumentParser, a: argparse.Namespace) -> TrainConfig:
    others = ("latent_dim", "fc_dim", "n_train", "gamma_init", "sigma_dvae", "widths", "groups", "latent_channels",
              "enc_blocks", "bottleneck", "skip_threshold")  # fmt: skip
    bad = [o for o in others if getattr(a, o) is not None]
    if bad or a.hflip or a.fixed_gamma:
        name = (bad or ["hflip" if a.hflip else "fixed_gamma"])[0].replace("_", "-")
        p.error(f"--{name} is not an option of --arch cae_hyperprior (see --channels, --lmbda)")
    d = CAE_CLI_DEFAULTS
    model: dict[str, Any] = {"arch": CAEHyperprior.arch, **d["model"]}
    if a.channels is not None:
        ch = _ints(a.channels)
        if len(ch) != 2:
            p.error(f"--channels takes N,M (two integers), got {a.channels!r}")
        model["N"], model["M"] = ch
    if a.lmbda is not None and not (math.isfinite(a.lmbda) and a.lmbda > 0):
        p.error(f"--lmbda must be a finite number > 0, got {a.lmbda!r}")
    patch = a.patch_size or CAE_DEFAULTS["patch_size"]
    if patch % 64:
        p.error(f"--patch-size must be a multiple of 64 (the CAE's total stride), got {patch}")
    model["image_shape"] = [3, patch, patch]
    cfg = TrainConfig(
        name=a.name, dataset=a.dataset, model=model, sigma_dvae=0.0,
        epochs=d["epochs"] if a.epochs is None else a.epochs, lr=d["lr"] if a.lr is None else a.lr,
        batch_size=d["batch_size"] if a.batch_size is None else a.batch_size, seed=a.seed, n_test=a.n_test,
        data_root=a.data_root, patch_size=patch, steps_per_epoch=a.steps_per_epoch, optimizer=a.optimizer,
        weight_decay=a.weight_decay, warmup_steps=a.warmup_steps, grad_clip=a.grad_clip, ema_rate=a.ema_rate,
        lmbda=a.lmbda,
    )  # fmt: skip
    cfg = cae_config(cfg)
    cfg.model["lmbda"] = cfg.lmbda
    return cfg


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
    data: tuple[ImageSet, ImageSet] | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Train (or resume) a DVAE; returns the model and the per-epoch log (``--arch hvae``: :func:`train_hvae`; a
    flow config: :func:`train_flow`).

    ``run_dir`` receives ``checkpoint.pt`` (every epoch, atomic), ``log.json`` (per-epoch train/test ELBO,
    gamma, seconds) and ``config.json``.
    """
    if cfg.model.get("arch") == "hvae":
        return train_hvae(cfg, run_dir, resume=resume, device=device, progress=progress, data=data)
    if cfg.model.get("arch") == CAEHyperprior.arch:
        return train_cae(cfg, run_dir, resume=resume, device=device, progress=progress, data=data)
    if is_flow(cfg.model):
        return train_flow(cfg, run_dir, resume=resume, device=device, progress=progress, data=data)
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_set, test_set = data if data is not None else load_dataset(cfg)
    x_train = train_set.images.to(device)
    x_test = test_set.images
    with torch.random.fork_rng(devices=[]):  # initial weights drawn from the run's seed, globals untouched
        torch.manual_seed(cfg.seed)
        vae = build_model(cfg.model).to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    log: list[dict[str, Any]] = []
    start_epoch = 0
    if resume and _checkpoint_path(run_dir).exists():
        ck = _load_checkpoint(run_dir)
        _check_same_recipe(run_dir, json.loads(ck["config"]), asdict(cfg))
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        log = json.loads(ck["log"])
        start_epoch = int(ck["epoch"])
    elif resume:
        print(f"[train] no checkpoint in {run_dir}; starting from scratch", file=sys.stderr)
    atomic_write_json(run_dir / "config.json", asdict(cfg))
    # data_source/size are recorded in the log for manifests
    meta = {"data_source": train_set.source, "n_train": len(train_set), "n_test": len(test_set)}

    n = x_train.shape[0]
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        vae.train()
        perm = torch.randperm(n, generator=gen, device=device)
        tot_loss, tot_elbo = 0.0, 0.0
        n_batches = math.ceil(n / cfg.batch_size)
        bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for b in bar:
            idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            x = x_train[idx]
            if cfg.hflip:
                flip = torch.rand(x.shape[0], generator=gen, device=device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss, elbo = dvae_loss(vae, x, cfg.sigma_dvae, gen)
            if not bool(torch.isfinite(loss.detach())):
                raise FloatingPointError(f"training loss became {float(loss)} at epoch {epoch + 1}, batch {b}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += float(loss.detach()) * x.shape[0]
            tot_elbo += float(elbo.sum())
            if b % 50 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.1f}", gamma=f"{float(vae.gamma.detach()):.4f}")
        train_seconds = time.perf_counter() - t0
        test_elbo = evaluate_elbo(vae, x_test, device=device)
        entry = {
            "epoch": epoch + 1,
            "train_loss": tot_loss / n,
            "train_elbo": tot_elbo / n,
            "test_elbo": test_elbo,
            "gamma": float(vae.gamma.detach()),
            "seconds": train_seconds,
        }
        log.append(entry)
        _save_checkpoint(
            run_dir,
            {
                "model": vae.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "epoch": epoch + 1,
                "log": json.dumps(log),
                "config": json.dumps(asdict(cfg)),
                "meta": json.dumps(meta),
            },
        )
        atomic_write_json(run_dir / "log.json", {"meta": meta, "epochs": log})
        if progress:
            print(
                f"[{cfg.name}] epoch {epoch + 1}/{cfg.epochs}  train ELBO {entry['train_elbo']:.2f}  "
                f"test ELBO {test_elbo:.2f}  gamma {entry['gamma']:.5f}  {train_seconds:.1f}s",
                flush=True,
            )
    vae.eval()
    return vae, log


def manifest_entry(cfg: TrainConfig, vae: nn.Module, log: list[dict[str, Any]], meta: dict[str, Any]) -> dict:
    """Everything a manifest records about a trained prior (sha256 and file are added on export)."""
    if isinstance(vae, HVAE):
        return _hvae_manifest_entry(hvae_config(cfg), vae, log, meta)
    if isinstance(vae, CAEHyperprior):
        return _cae_manifest_entry(cae_config(cfg), vae, log, meta)
    if is_flow(cfg.model):
        return flow_manifest_entry(cfg, vae, log, meta)
    return {
        "model": vae.config(),
        "recipe": {
            "criterion": "denoising ELBO (JPMAP eq. 3.2)",
            "sigma_dvae": cfg.sigma_dvae,
            "optimizer": "Adam",
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "epochs": cfg.epochs,
            "seed": cfg.seed,
            "hflip": cfg.hflip,
            "gamma_init": float(cfg.model.get("gamma_init", 1.0)),
        },
        "data": {"dataset": cfg.dataset, **meta},
        "epochs": len(log),
        "final_test_elbo": log[-1]["test_elbo"] if log else None,
        "final_train_elbo": log[-1]["train_elbo"] if log else None,
        "gamma": float(vae.gamma.detach()),
        "beta": vae.beta,
        "training_seconds": float(sum(e["seconds"] for e in log)),
        "package_version": __version__,
        "torch_version": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} torch threads={torch.get_num_threads()}".strip(),
        "command": "python -m jpmap_core.train " + " ".join(_cli_args(cfg)),
    }


def _hvae_manifest_entry(cfg: TrainConfig, vae: HVAE, log: list[dict[str, Any]], meta: dict[str, Any]) -> dict:
    last = log[-1] if log else {}
    return {
        "model": vae.config(),
        "recipe": {
            "criterion": "ELBO (PnP-HVAE eq. 4; eqs. 6-9 with analytic per-group Gaussian KLs), one sample per group"
            + (f", denoising encoder input sigma {cfg.sigma_dvae:g}/255" if cfg.sigma_dvae > 0 else ""),
            "loss_units": "nats per dimension",
            "sigma_dvae": cfg.sigma_dvae,
            "optimizer": {"adamax": "Adamax (PnP-HVAE §6.2)", "adamw": "AdamW (VDVAE), betas (0.9, 0.9)"}[
                cfg.optimizer
            ],
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "warmup_steps": cfg.warmup_steps,
            "batch_size": cfg.batch_size,
            "steps_per_epoch": cfg.steps_per_epoch,
            "epochs": cfg.epochs,
            "grad_clip": cfg.grad_clip,
            "skip_threshold": cfg.skip_threshold,
            "ema_rate": cfg.ema_rate,
            "exported_weights": "EMA",
            "seed": cfg.seed,
            "patch_size": cfg.patch_size,
            "hflip": cfg.hflip,
            "gamma_init": vae.gamma_init,
            "gamma_learned": vae.learn_gamma,
        },
        "data": {"dataset": cfg.dataset, **meta},
        "epochs": len(log),
        "steps": last.get("step", 0),
        "skipped_updates": last.get("skipped_total", 0),
        "final_test_elbo": last.get("test_elbo"),
        "final_test_elbo_per_dim": last.get("test_elbo_per_dim"),
        "final_test_kl": last.get("test_kl"),
        "final_train_elbo": last.get("train_elbo"),
        "gamma": float(vae.gamma.detach()),
        "gamma_kind": "learned" if vae.learn_gamma else "fixed",
        "beta": vae.beta,
        "training_seconds": float(sum(e["seconds"] for e in log)),
        "package_version": __version__,
        "torch_version": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} torch threads={torch.get_num_threads()}".strip(),
        "command": "python -m jpmap_core.train " + " ".join(_cli_args(cfg)),
    }


def _cli_args(cfg: TrainConfig) -> list[str]:
    if cfg.model.get("arch") == "hvae":
        return _hvae_cli_args(hvae_config(cfg))
    if cfg.model.get("arch") == CAEHyperprior.arch:
        return _cae_cli_args(cae_config(cfg))
    args = ["--name", cfg.name, "--dataset", cfg.dataset, "--arch", cfg.model.get("arch", "mlp")]
    if "latent_dim" in cfg.model:
        args += ["--latent-dim", str(cfg.model["latent_dim"])]
    if "widths" in cfg.model:
        args += ["--widths", ",".join(map(str, cfg.model["widths"]))]
    if "fc_dim" in cfg.model:
        args += ["--fc-dim", str(cfg.model["fc_dim"])]
    if "gamma_init" in cfg.model:
        args += ["--gamma-init", f"{cfg.model['gamma_init']:g}"]
    args += ["--sigma-dvae", f"{cfg.sigma_dvae:g}", "--epochs", str(cfg.epochs), "--lr", f"{cfg.lr:g}"]
    args += ["--batch-size", str(cfg.batch_size), "--seed", str(cfg.seed)]
    if cfg.hflip:
        args.append("--hflip")
    return args


def _hvae_cli_args(cfg: TrainConfig) -> list[str]:
    m = cfg.model
    args = ["--name", cfg.name, "--dataset", cfg.dataset, "--arch", "hvae", "--patch-size", str(cfg.patch_size)]
    for key in ("widths", "groups", "latent_channels", "enc_blocks"):
        if key in m:
            value = m[key]
            args += [
                f"--{key.replace('_', '-')}",
                ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value),
            ]
    if "bottleneck" in m:
        args += ["--bottleneck", f"{m['bottleneck']:g}"]
    if "gamma_init" in m:
        args += ["--gamma-init", f"{m['gamma_init']:g}"]
    if m.get("learn_gamma") is False:
        args.append("--fixed-gamma")
    args += ["--sigma-dvae", f"{cfg.sigma_dvae:g}", "--epochs", str(cfg.epochs)]
    args += ["--steps-per-epoch", str(cfg.steps_per_epoch), "--batch-size", str(cfg.batch_size)]
    args += ["--optimizer", cfg.optimizer, "--lr", f"{cfg.lr:g}", "--weight-decay", f"{cfg.weight_decay:g}"]
    args += ["--warmup-steps", str(cfg.warmup_steps), "--grad-clip", f"{cfg.grad_clip:g}"]
    args += ["--skip-threshold", f"{cfg.skip_threshold:g}", "--ema-rate", f"{cfg.ema_rate:g}", "--seed", str(cfg.seed)]
    if cfg.n_test is not None:
        args += ["--n-test", str(cfg.n_test)]
    if cfg.hflip:
        args.append("--hflip")
    return args


def _init_distributed(device: str) -> tuple[str, bool]:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE > 1``): nccl on GPUs, gloo on CPUs.
    Returns this process's device and whether a group was started."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, False
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device, True


def _ints(text: str | None) -> list[int] | None:
    return None if text is None else [int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jpmap_core.train", description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="prior name, e.g. mnist_mlp_dvae15")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "celeba64", "celeba32", "bsd_patches"])
    p.add_argument(
        "--arch", default=None, choices=["mlp", "conv", "hvae", "cae_hyperprior", *FLOW_ARCHS],
        help="default: mlp for mnist, conv for celeba64, realnvp for celeba32, hvae for bsd_patches",
    )  # fmt: skip
    p.add_argument("--latent-dim", type=int, default=None)
    p.add_argument("--widths", default=None, help="conv widths, e.g. 32,64,128,256; hvae: per resolution, finest first")
    p.add_argument("--fc-dim", type=int, default=None, help="conv: width of the fully connected layers")
    p.add_argument(
        "--gamma-init", type=float, default=None,
        help="initial decoder std gamma (default 1.0; hvae 0.1); learned as log(gamma), so a short run should start "
        "near it (hvae with --fixed-gamma: its fixed value)",
    )  # fmt: skip
    p.add_argument(
        "--sigma-dvae", type=float, default=None,
        help="DVAE noise std on the 0-255 scale (default 15; hvae: 0, the plain ELBO)",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, default=None, help=f"default 200 (hvae: {HVAE_CLI_DEFAULTS['epochs']})")
    p.add_argument("--lr", type=float, default=None, help=f"default 1e-4 (hvae: {HVAE_CLI_DEFAULTS['lr']:g})")
    p.add_argument(
        "--batch-size", type=int, default=None,
        help=f"default 128 (hvae: {HVAE_CLI_DEFAULTS['batch_size']}, the total over all processes)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None, help=f"hvae: number of test patches ({N_TEST_PATCHES})")
    p.add_argument("--hflip", action="store_true")
    p.add_argument("--data-root", default=None)
    h = p.add_argument_group("hierarchical VAE (--arch hvae, --dataset bsd_patches | celeba64)")
    h.add_argument("--patch-size", type=int, default=None, help=f"default {HVAE_DEFAULTS['patch_size']}")
    h.add_argument("--groups", default=None, help="latent groups per resolution, finest first, e.g. 0,2,2,2")
    h.add_argument("--latent-channels", default=None, help="latent channels per resolution, finest first")
    h.add_argument("--enc-blocks", default=None, help="encoder residual blocks per resolution, finest first")
    h.add_argument("--bottleneck", type=float, default=None, help="middle-width ratio of the blocks (0.25)")
    h.add_argument("--fixed-gamma", action="store_true", help="keep gamma fixed at --gamma-init (not learned)")
    h.add_argument("--steps-per-epoch", type=int, default=None, help=f"default {HVAE_DEFAULTS['steps_per_epoch']}")
    h.add_argument(
        "--optimizer", default=None, choices=["adam", "adamax", "adamw"],
        help="default adamax (the paper's; cae_hyperprior: adam)",
    )  # fmt: skip
    h.add_argument("--weight-decay", type=float, default=None)
    h.add_argument("--warmup-steps", type=int, default=None, help=f"default {HVAE_DEFAULTS['warmup_steps']}")
    h.add_argument("--grad-clip", type=float, default=None, help=f"default {HVAE_DEFAULTS['grad_clip']:g}")
    h.add_argument(
        "--skip-threshold", type=float, default=None,
        help=f"skip updates whose gradient norm exceeds it (default {HVAE_DEFAULTS['skip_threshold']:g}; 0: never)",
    )  # fmt: skip
    h.add_argument("--ema-rate", type=float, default=None, help=f"default {HVAE_DEFAULTS['ema_rate']:g}")
    c = p.add_argument_group("compressive autoencoder (--arch cae_hyperprior, --dataset bsd_patches; shares the "
                             "patch and schedule options of the hierarchical VAE)")  # fmt: skip
    c.add_argument("--channels", default=None, help=f"N,M (default {CAE_CLI_DEFAULTS['model']['N']},"
                   f"{CAE_CLI_DEFAULTS['model']['M']}): hidden/hyper-latent and latent channels")  # fmt: skip
    c.add_argument("--lmbda", type=float, default=None, help=f"rate-distortion weight of bpp + lmbda 255^2 MSE "
                   f"(default {CAE_DEFAULTS['lmbda']:g}, CompressAI's scale)")  # fmt: skip
    p.add_argument("--run-dir", default=None, help="checkpoints and logs (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from run-dir/checkpoint.pt")
    p.add_argument("--export", default=None, metavar="DIR", help="write safetensors + manifest entry into DIR")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    f = p.add_argument_group("normalizing flows (--arch realnvp|glow)")
    f.add_argument("--levels", type=int, default=None, help="scales (RealNVP) or levels (Glow)")
    f.add_argument("--steps", type=int, default=None, help="couplings per stage (RealNVP) or steps K per level (Glow)")
    f.add_argument("--width", type=int, default=None, help="channels of the coupling networks")
    f.add_argument("--blocks", type=int, default=None, help="residual blocks of the coupling networks")
    f.add_argument("--logit-alpha", default=None, help="logit preprocessing alpha, or 'none' for x - 1/2")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    arch = a.arch or {"mnist": "mlp", "celeba64": "conv", "celeba32": "realnvp", "bsd_patches": "hvae"}[a.dataset]
    cae = CAEHyperprior.arch
    if (
        (arch == "hvae" and a.dataset not in HVAE_DATASETS)
        or (arch == cae and a.dataset != "bsd_patches")
        or (a.dataset == "bsd_patches" and arch not in ("hvae", cae))
    ):
        p.error(
            f"--arch hvae trains on --dataset {' or '.join(HVAE_DATASETS)}, --arch {cae} on bsd_patches, and "
            f"bsd_patches is only for those two; got --arch {arch} --dataset {a.dataset}"
        )
    if arch != cae and (a.channels is not None or a.lmbda is not None):
        p.error("--channels and --lmbda are options of --arch cae_hyperprior")
    if arch == "hvae":
        cfg = _hvae_cli_config(p, a)
    elif arch == CAEHyperprior.arch:
        cfg = _cae_cli_config(p, a)
    else:
        hvae_only = [f for f in ("patch_size", "groups", "latent_channels", "enc_blocks", "bottleneck",
                                 "steps_per_epoch", "optimizer", "weight_decay", "warmup_steps", "grad_clip",
                                 "skip_threshold", "ema_rate") if getattr(a, f) is not None]  # fmt: skip
        if hvae_only or a.fixed_gamma:
            p.error(f"--{(hvae_only or ['fixed_gamma'])[0].replace('_', '-')} is an option of --arch hvae")
        model: dict[str, Any] = {"arch": arch}
        if arch in FLOW_ARCHS:
            model = _flow_model_args(p, a, arch)
        elif any(getattr(a, o) is not None for o in ("levels", "steps", "width", "blocks", "logit_alpha")):
            p.error(
                f"--levels, --steps, --width, --blocks, --logit-alpha are options of --arch realnvp|glow, not {arch}"
            )
        if a.latent_dim is not None:
            model["latent_dim"] = a.latent_dim
        if a.widths:
            model["widths"] = [int(v) for v in a.widths.split(",")]
        if a.fc_dim is not None:
            model["fc_dim"] = a.fc_dim
        if a.gamma_init is not None:
            model["gamma_init"] = a.gamma_init
        if a.dataset == "celeba64":
            model.setdefault("image_shape", [3, 64, 64])
        cfg = TrainConfig(
            name=a.name, dataset=a.dataset, model=model,
            sigma_dvae=15.0 if a.sigma_dvae is None else a.sigma_dvae,
            epochs=200 if a.epochs is None else a.epochs,
            lr=(1e-3 if arch in FLOW_ARCHS else 1e-4) if a.lr is None else a.lr,
            batch_size=128 if a.batch_size is None else a.batch_size, seed=a.seed, n_train=a.n_train,
            n_test=a.n_test, hflip=a.hflip, data_root=a.data_root,
        )  # fmt: skip
    device, distributed = _init_distributed(a.device)
    if distributed and arch != "hvae":
        p.error("distributed training (torchrun) is implemented for --arch hvae only")
    run_dir = Path(a.run_dir or Path("runs") / a.name)
    try:
        vae, log = train(cfg, run_dir, resume=a.resume, device=device, progress=not a.no_progress)
        if a.export and _distributed()[0] == 0:
            from .pretrained import export_pretrained

            meta = json.loads((run_dir / "log.json").read_text())["meta"]
            entry = export_pretrained(vae.cpu(), a.name, manifest_entry(cfg, vae, log, meta), a.export)
            if "final_test_elbo" in entry:
                score = f"test ELBO {entry['final_test_elbo']:.2f}"
            elif "final_test_bpp" in entry:
                score = f"test {entry['final_test_bpp']:.4f} bpp, {entry['final_test_psnr']:.2f} dB"
            else:
                score = f"test {entry['final_test_bpd']:.4f} bits/dim"
            print(f"[train] exported {a.name}: sha256 {entry['sha256']}  {score}")
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _hvae_cli_config(p: argparse.ArgumentParser, a: argparse.Namespace) -> TrainConfig:
    faces = a.dataset == "celeba64"
    if a.latent_dim is not None or a.fc_dim is not None or a.n_train is not None or (a.hflip and not faces):
        p.error("--latent-dim, --fc-dim, --n-train and --hflip are not options of --arch hvae "
                "(see --latent-channels, --groups, --widths; patches are always flipped and rotated; --hflip "
                "only for --dataset celeba64)")  # fmt: skip
    if faces and a.patch_size not in (None, FACE_SIZE):
        p.error(f"--dataset celeba64 trains on whole {FACE_SIZE}x{FACE_SIZE} faces: --patch-size must be {FACE_SIZE}")
    d = HVAE_FACE_CLI_DEFAULTS if faces else HVAE_CLI_DEFAULTS
    model: dict[str, Any] = {"arch": "hvae", **d["model"]}
    for key in ("widths", "groups", "latent_channels", "enc_blocks"):
        if getattr(a, key) is not None:
            model[key] = _ints(getattr(a, key))
    if a.bottleneck is not None:
        model["bottleneck"] = a.bottleneck
    if a.gamma_init is not None:
        model["gamma_init"] = a.gamma_init
    if a.fixed_gamma:
        model["learn_gamma"] = False
    patch = a.patch_size or (FACE_SIZE if faces else HVAE_DEFAULTS["patch_size"])
    model["image_shape"] = [3, patch, patch]
    cfg = TrainConfig(
        name=a.name, dataset=a.dataset, model=model, sigma_dvae=0.0 if a.sigma_dvae is None else a.sigma_dvae,
        epochs=d["epochs"] if a.epochs is None else a.epochs, lr=d["lr"] if a.lr is None else a.lr,
        batch_size=d["batch_size"] if a.batch_size is None else a.batch_size, seed=a.seed, n_test=a.n_test,
        hflip=a.hflip, data_root=a.data_root, patch_size=patch, steps_per_epoch=a.steps_per_epoch,
        optimizer=a.optimizer, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps, grad_clip=a.grad_clip,
        skip_threshold=a.skip_threshold, ema_rate=a.ema_rate,
    )  # fmt: skip
    return hvae_config(cfg)


def _flow_model_args(p: argparse.ArgumentParser, a: argparse.Namespace, arch: str) -> dict[str, Any]:
    """The model config of ``--arch realnvp|glow`` from the command line (unset options keep the class defaults)."""
    dvae_only = [o for o in ("latent_dim", "widths", "fc_dim", "gamma_init") if getattr(a, o) is not None]
    if dvae_only:
        p.error(f"--{dvae_only[0].replace('_', '-')} is not an option of --arch {arch}")
    shapes = {"mnist": [1, 28, 28], "celeba64": [3, 64, 64], "celeba32": [3, 32, 32]}
    model: dict[str, Any] = {"arch": arch, "image_shape": shapes[a.dataset]}
    for key in ("levels", "steps", "width", "blocks"):
        if getattr(a, key) is not None:
            model[key] = getattr(a, key)
    if a.logit_alpha is not None:
        model["logit_alpha"] = None if a.logit_alpha.lower() == "none" else float(a.logit_alpha)
    return model


if __name__ == "__main__":
    raise SystemExit(main())
