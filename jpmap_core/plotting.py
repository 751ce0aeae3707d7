"""One figure style for the whole companion; figures saved atomically as PNG and PDF.

``python -m jpmap_core.plotting prior-gallery mnist_mlp_dvae15`` writes the README's grid of samples and test
reconstructions ``mu_theta(mu_phi(x))`` of a shipped prior, with a ``metrics.json`` saying what produced it.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ._io import atomic_write, atomic_write_json

PALETTE = "colorblind"


def setup_style() -> None:
    """Seaborn 'paper' theme with a colour-blind safe palette (call once; idempotent)."""
    import matplotlib

    if os.environ.get("MPLBACKEND") is None and not os.environ.get("DISPLAY"):
        matplotlib.use("Agg")
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette=PALETTE, font_scale=1.1)


def savefig(fig, path: str | os.PathLike, *, formats: Sequence[str] = ("png", "pdf"), dpi: int = 150) -> list[Path]:
    """Save ``fig`` as ``path.<fmt>`` for each format, atomically. Returns the written paths."""
    base = Path(path)
    base = base.with_suffix("") if base.suffix in {".png", ".pdf"} else base
    out = []
    for fmt in formats:
        target = base.with_suffix(f".{fmt}")
        atomic_write(target, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight"))
        out.append(target)
    return out


def image_grid(rows: Sequence[Tensor], row_labels: Sequence[str] | None = None, *, scale: float = 1.0):
    """A grid figure: one row per ``(B, C, H, W)`` tensor (values clipped to [0, 1]), labelled on the left."""
    import matplotlib.pyplot as plt

    setup_style()
    n_rows, n_cols = len(rows), max(int(r.shape[0]) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(scale * n_cols, scale * n_rows), squeeze=False)
    for i, r in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            for s in ax.spines.values():
                s.set_visible(False)
            if j < r.shape[0]:
                img = r[j].detach().cpu().clamp(0, 1)
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(img.permute(1, 2, 0).numpy())
        if row_labels is not None:
            axes[i][0].set_ylabel(row_labels[i], rotation=0, ha="right", va="center")
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    return fig


def prior_gallery(name: str, out_dir: str | os.PathLike, *, n: int = 12, seed: int = 0) -> dict:
    """Samples ``mu_theta(z), z ~ N(0, I)`` and test reconstructions of prior ``name``; writes PNG/PDF + metrics."""
    import matplotlib.pyplot as plt

    from .data import load_mnist
    from .metrics import psnr
    from .pretrained import load_pretrained, manifest_entry

    t0 = time.perf_counter()
    vae = load_pretrained(name)
    entry = manifest_entry(name)
    data = load_mnist("test")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        samples = vae.sample(2 * n, generator=g)
        x = data.images[:n]
        rec = vae.reconstruct(x)
        rec_all = torch.cat([vae.reconstruct(data.images[i : i + 1000]) for i in range(0, len(data), 1000)])
    fig = image_grid([samples[:n], samples[n:], x, rec], ["samples", "", "test x", r"$\mu_\theta(\mu_\phi(x))$"])
    out_dir = Path(out_dir)
    paths = savefig(fig, out_dir / f"{name}_gallery")
    plt.close(fig)
    metrics = {
        "prior": name,
        "weights_sha256": entry["sha256"],
        "data_source": data.source,
        "n_images": len(data),
        "recon_psnr_mean": float(psnr(rec_all, data.images).mean()),
        "final_test_elbo": entry.get("final_test_elbo"),
        "seed": seed,
        "seconds": time.perf_counter() - t0,
        "figures": [p.name for p in paths],
    }
    atomic_write_json(out_dir / f"{name}_gallery_metrics.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jpmap_core.plotting")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("prior-gallery", help="samples and reconstructions of a shipped prior")
    g.add_argument("names", nargs="+")
    g.add_argument("--out", default="figures/priors")
    a = p.parse_args(argv)
    for name in a.names:
        m = prior_gallery(name, a.out)
        print(f"{name}: reconstruction PSNR {m['recon_psnr_mean']:.2f} dB on {m['n_images']} test images -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
