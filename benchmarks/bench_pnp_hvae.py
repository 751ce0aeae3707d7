"""Benchmark: PnP-HVAE (Algorithm 2) on a batch of BSD crops, batched vs a per-image loop, and the Adam baseline.

    python benchmarks/bench_pnp_hvae.py --n-images 16 --json benchmarks/results_pnp_hvae_cpu.json

The problem of notebook 09 (PnP-HVAE Fig. 2): deblurring with kernel 9 of PnP-HVAE's set (``kernels/
pnphvae_kernels12/9.npy``, Levin's kernel 8; the kernel its official config uses for faces), noise sigma 7.65,
on ``--size`` x ``--size`` central crops of the held-out BSD images of :func:`jpmap_core.data.bsd_split` (the
first N, cycling through the 20 images with shifted crops when N > 20). The prior is the shipped
``bsd_patch_hvae``. Methods, all from the official initialisation ``x0 = y``:

* ``pnp_hvae`` (tau ``--tau``, at most ``--max-iters`` iterations, the official plateau rule), batched over the N
  crops, and the same solver on one crop at a time for ``--loop-images K`` crops spread over the N, scaled by N/K:
  ``speedup_vs_loop``, and image-iterations per second both ways;
* ``adam_j1`` with learning rates 0.01 and 0.001 (Fig. 2), batched, with the same stopping rule and a larger cap
  (``--adam-max-iters``, so that it can reach the tolerance): its seconds, iterations and PSNR against PnP-HVAE's.

Every timing is the median of ``--repeats`` runs. The JSON also records the prior's training throughput (images
per second over its whole training, from the manifest) and the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_solvers import PeakRSS, add_run_options, machine_info  # noqa: E402  (shared with the MNIST benchmark)

from jpmap_core._io import atomic_write_json  # noqa: E402
from jpmap_core.data import bsd_split, load_bsd, load_kernels  # noqa: E402
from jpmap_core.metrics import psnr as psnr_of  # noqa: E402
from jpmap_core.operators import make_problem  # noqa: E402
from jpmap_core.pretrained import load_pretrained, manifest_entry, weights_sha256  # noqa: E402
from jpmap_core.solvers import solve  # noqa: E402

PRIOR = "bsd_patch_hvae"
KERNEL = 9  # PnP-HVAE's kernel 9.npy (index 8 of load_kernels("pnphvae12"))
SIGMA = 7.65


def crops(n: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` central (then shifted) ``size`` x ``size`` crops of the held-out BSD images, and their names."""
    _, test_names = bsd_split()
    full = load_bsd(subset="CBSD68")  # ragged: one (1, C, H, W) tensor per image
    by_name = dict(zip(full.names, full.images, strict=True))
    images = [by_name[name][0] for name in test_names]
    out, names = [], []
    for k in range(n):
        img = images[k % len(images)]
        _, h, w = img.shape
        shift = (k // len(images)) * size // 2
        top = min(max(0, (h - size) // 2 + shift), h - size)
        left = min(max(0, (w - size) // 2 + shift), w - size)
        out.append(img[:, top : top + size, left : left + size])
        names.append(test_names[k % len(test_names)])
    return torch.stack(out), names


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-images", type=int, default=16)
    p.add_argument("--size", type=int, default=64, help="crop size (a multiple of the prior's stride, 8)")
    p.add_argument("--loop-images", type=int, default=4, help="time the per-image loop on K crops, scale by N/K")
    p.add_argument("--tau", type=float, default=0.8)
    p.add_argument("--max-iters", type=int, default=50)
    p.add_argument("--adam-max-iters", type=int, default=300, help="cap of the Adam baseline (to reach the tolerance)")
    add_run_options(p, repeats=3)
    a = p.parse_args(argv)
    if a.n_images < 1 or not 1 <= a.loop_images <= a.n_images or a.repeats < 1 or a.size < 8 or a.size % 8:
        p.error("need n-images >= 1, 1 <= loop-images <= n-images, repeats >= 1, size a positive multiple of 8")
    if not 0 < a.tau <= 1 or a.max_iters < 1 or a.adam_max_iters < 1:
        p.error("tau must be in (0, 1], max-iters and adam-max-iters >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    hvae = load_pretrained(PRIOR, device=dev)
    x, names = crops(a.n_images, a.size)
    x = x.to(dev)
    kernel = load_kernels("pnphvae12")[KERNEL - 1]
    problem = make_problem("blur", x, sigma=SIGMA, kernel=kernel, seed=a.seed)
    y, op = problem.y, problem.op
    prior = hvae.at_size(a.size, a.size)
    pnp = dict(tau=a.tau, max_iters=a.max_iters)

    with PeakRSS() as mem:
        t_batched, r = timed(lambda: solve("pnp_hvae", y, op, prior, sigma=SIGMA, **pnp), a.repeats)
    idx = [i * a.n_images // a.loop_images for i in range(a.loop_images)]

    def loop():
        return [solve("pnp_hvae", y[i : i + 1], op.rows(torch.tensor([i])), prior, sigma=SIGMA, **pnp) for i in idx]

    t_loop, singles = timed(loop, a.repeats)
    scale = a.n_images / a.loop_images
    iters = r.iterations.double()
    loop_iters = sum(int(s.iterations[0]) for s in singles)
    diff = max(float((s.x[0] - r.x[i]).abs().max()) for s, i in zip(singles, idx, strict=True))
    rows = [
        {
            "method": "pnp_hvae", "mode": "batched", "seconds": t_batched, "iterations_median": float(iters.median()),
            "iterations_max": int(iters.max()), "image_iterations_per_second": float(iters.sum()) / t_batched,
            "psnr_mean": float(psnr_of(r.x, x).mean()), "converged": int(r.converged.sum()),
            "peak_rss_mb": mem.peak / 2**20,
        },
        {
            "method": "pnp_hvae", "mode": f"loop over {a.loop_images} crops, scaled by {scale:g}",
            "seconds": t_loop * scale, "image_iterations_per_second": loop_iters / t_loop,
            "speedup_vs_loop": t_loop * scale / t_batched, "max_abs_diff_vs_batched": diff,
        },
    ]  # fmt: skip
    for lr in (0.01, 0.001):
        adam = dict(tau=a.tau, max_iters=a.adam_max_iters, lr=lr)
        t_adam, ra = timed(lambda adam=adam: solve("adam_j1", y, op, prior, sigma=SIGMA, **adam), a.repeats)
        it = ra.iterations.double()
        rows.append(
            {
                "method": "adam_j1", "lr": lr, "mode": "batched", "seconds": t_adam,
                "iterations_median": float(it.median()), "iterations_max": int(it.max()),
                "image_iterations_per_second": float(it.sum()) / t_adam, "psnr_mean": float(psnr_of(ra.x, x).mean()),
                "converged": int(ra.converged.sum()), "seconds_vs_pnp_hvae": t_adam / t_batched,
            }
        )  # fmt: skip
    entry = manifest_entry(PRIOR)
    recipe = entry.get("recipe", {})
    n_seen = entry.get("steps", 0) * recipe.get("batch_size", 0)
    out = {
        "benchmark": "bench_pnp_hvae",
        "problem": {
            "operator": "blur",
            "kernel": f"pnphvae_kernels12/{KERNEL}.npy",
            "sigma": SIGMA,
            "size": a.size,
            "n_images": a.n_images,
            "images": names,
        },  # fmt: skip
        "prior": PRIOR,
        "weights_sha256": weights_sha256(PRIOR),
        "options": {
            "tau": a.tau,
            "max_iters": a.max_iters,
            "adam_max_iters": a.adam_max_iters,
            "repeats": a.repeats,
            "seed": a.seed,
        },  # fmt: skip
        "rows": rows,
        "training": {
            "patches_seen": n_seen,
            "training_seconds": entry.get("training_seconds"),
            "patches_per_second": n_seen / entry["training_seconds"] if entry.get("training_seconds") else None,
            "machine": entry.get("machine"),
            "command": entry.get("command"),
        },
        "machine": machine_info(dev),
    }
    for row in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    if a.json:
        atomic_write_json(a.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
