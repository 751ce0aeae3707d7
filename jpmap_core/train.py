"""DVAE training (JPMAP §3.2, eqs. 3.1-3.2) and its command line: ``python -m jpmap_core.train``.

The encoder sees ``x + sigma_dvae/255 * eps``, the decoder must reconstruct the clean ``x``; the loss is the
negative denoising ELBO (eq. 3.2) per image with the learned decoder std ``gamma``. Paper recipe as defaults:
Adam, lr 1e-4, batch 128, 200 epochs.

Determinism and resume: every random draw (shuffling, DVAE noise, reparameterisation) comes from one
``torch.Generator`` seeded by ``seed``; its state, the model and the optimiser are checkpointed atomically
after every epoch, so ``--resume`` continues an interrupted run to the same weights as an uninterrupted one.
Checkpoints are loaded with ``torch.load(weights_only=True)`` (nothing is unpickled).

Normalizing flows (``--arch realnvp|glow``, the priors of AIPO §4.1): :func:`train_flow` maximises the likelihood of
uniformly dequantized 8-bit images (loss: negative log-likelihood in bits per dimension), with the same seeded
generator, atomic checkpoints and exact resume; ``--dataset celeba32`` is the CelebA training faces at 32x32.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__
from ._io import atomic_write, atomic_write_json
from .data import ImageSet, load_mnist
from .models import GaussianVAE, build_model


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored in checkpoints and manifests)."""

    name: str = "mnist_mlp_dvae15"
    dataset: str = "mnist"  # mnist | celeba64
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
        saved = json.loads(ck["config"])
        mine = asdict(cfg)
        diff = {k for k in mine if saved.get(k) != mine[k] and k not in TrainConfig.RESUMABLE_CHANGES}
        if diff:
            raise ValueError(
                f"cannot resume {run_dir}: the checkpoint was trained with different "
                + ", ".join(f"{k}={saved.get(k)!r} (now {mine[k]!r})" for k in sorted(diff))
            )
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


def _load_checkpoint(run_dir: Path) -> dict[str, Any]:
    return torch.load(_checkpoint_path(run_dir), map_location="cpu", weights_only=True)


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
    data: tuple[ImageSet, ImageSet] | None = None,
) -> tuple[GaussianVAE, list[dict[str, Any]]]:
    """Train (or resume) a DVAE; returns the model and the per-epoch log (a flow config: :func:`train_flow`).

    ``run_dir`` receives ``checkpoint.pt`` (every epoch, atomic), ``log.json`` (per-epoch train/test ELBO,
    gamma, seconds) and ``config.json``.
    """
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
        saved = json.loads(ck["config"])
        mine = asdict(cfg)
        diff = {k for k in mine if saved.get(k) != mine[k] and k not in TrainConfig.RESUMABLE_CHANGES}
        if diff:
            raise ValueError(
                f"cannot resume {run_dir}: the checkpoint was trained with different "
                + ", ".join(f"{k}={saved.get(k)!r} (now {mine[k]!r})" for k in sorted(diff))
            )
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


def manifest_entry(cfg: TrainConfig, vae: GaussianVAE, log: list[dict[str, Any]], meta: dict[str, Any]) -> dict:
    """Everything a manifest records about a trained prior (sha256 and file are added on export)."""
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


def _cli_args(cfg: TrainConfig) -> list[str]:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jpmap_core.train", description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="prior name, e.g. mnist_mlp_dvae15")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "celeba64", "celeba32"])
    p.add_argument(
        "--arch", default=None, choices=["mlp", "conv", *FLOW_ARCHS],
        help="default: mlp for mnist, conv for celeba64, realnvp for celeba32",
    )  # fmt: skip
    p.add_argument("--latent-dim", type=int, default=None)
    p.add_argument("--widths", default=None, help="conv widths, e.g. 32,64,128,256")
    p.add_argument("--fc-dim", type=int, default=None, help="conv: width of the fully connected layers")
    p.add_argument(
        "--gamma-init", type=float, default=None,
        help="initial decoder std gamma (default 1.0); learned as log(gamma), so a short run should start near it",
    )  # fmt: skip
    p.add_argument("--sigma-dvae", type=float, default=15.0, help="DVAE noise std on the 0-255 scale")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--lr", type=float, default=None, help="default 1e-4 (DVAE), 1e-3 (flows)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--hflip", action="store_true")
    p.add_argument("--data-root", default=None)
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
    arch = a.arch or {"mnist": "mlp", "celeba64": "conv", "celeba32": "realnvp"}[a.dataset]
    if a.lr is None:
        a.lr = 1e-3 if arch in FLOW_ARCHS else 1e-4
    model: dict[str, Any] = {"arch": arch}
    if arch in FLOW_ARCHS:
        model = _flow_model_args(p, a, arch)
    elif any(getattr(a, o) is not None for o in ("levels", "steps", "width", "blocks", "logit_alpha")):
        p.error(f"--levels, --steps, --width, --blocks, --logit-alpha are options of --arch realnvp|glow, not {arch}")
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
        name=a.name, dataset=a.dataset, model=model, sigma_dvae=a.sigma_dvae, epochs=a.epochs, lr=a.lr,
        batch_size=a.batch_size, seed=a.seed, n_train=a.n_train, n_test=a.n_test, hflip=a.hflip,
        data_root=a.data_root,
    )  # fmt: skip
    run_dir = Path(a.run_dir or Path("runs") / a.name)
    vae, log = train(cfg, run_dir, resume=a.resume, device=a.device, progress=not a.no_progress)
    if a.export:
        from .pretrained import export_pretrained

        meta = json.loads((run_dir / "log.json").read_text())["meta"]
        entry = export_pretrained(vae.cpu(), a.name, manifest_entry(cfg, vae, log, meta), a.export)
        score = (f"test ELBO {entry['final_test_elbo']:.2f}" if "final_test_elbo" in entry
                 else f"test {entry['final_test_bpd']:.4f} bits/dim")  # fmt: skip
        print(f"[train] exported {a.name}: sha256 {entry['sha256']}  {score}")
    return 0


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
