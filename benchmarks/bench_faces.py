"""Benchmark: restore N CelebA 64x64 test faces (inpainting 80%, sigma 10) with JPMAP Alg. 2.3, batched vs a loop.

    python benchmarks/bench_faces.py --n-images 100 --json benchmarks/results_faces_cpu.json
    python benchmarks/bench_faces.py --n-images 20 --z-optimizer adam,lm --json benchmarks/results_faces_lm_cpu.json

The problem and the prior of notebook 07 (JPMAP Fig. 8a): the shipped ``celeba64_conv_dvae15``, the first N faces of
the CelebA test partition, one random mask per face drawn as in the notebook (``mnist_benchmark.degrade``). Caps:
the notebook's ``default`` profile (``n1 = 25, n2 = 150`` capped at ``n_max = 40``, at most 300 Adam steps per
z-step, CSGM at most 3000 steps), or the official ones with ``--official-caps`` (``n_max = 300``, 3000, 5000; hours
on a CPU). Every timing is the median of ``--repeats`` runs. The per-image loop runs the same solver on one face
at a time for ``--loop-images K`` faces spread evenly over the N (indices ``i N / K``), scaled by N/K (stated in
the output): ``speedup_vs_loop = loop_seconds_scaled / batched_seconds``, and the loop's restorations are compared
with the batched ones (``max_abs_diff_vs_loop``). Peak memory is the process RSS sampled during the batched run.
``--z-optimizer adam,lm`` runs every method with each latent optimiser (the rows say which, with the decoder
evaluations per face and, for LM, the speed-up over Adam).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_solvers import PeakRSS, add_run_options, machine_info  # noqa: E402  (shared with the MNIST benchmark)

from jpmap_core._io import atomic_write_json  # noqa: E402
from jpmap_core.data import load_celeba64  # noqa: E402
from jpmap_core.experiments import mnist_benchmark as mb  # noqa: E402
from jpmap_core.metrics import psnr as psnr_of  # noqa: E402
from jpmap_core.operators import Inpainting  # noqa: E402
from jpmap_core.pretrained import load_pretrained, weights_sha256  # noqa: E402

METHODS = {"jpmap_alg23": "jpmap_fixed_beta", "csgm": "csgm"}
PRIOR = "celeba64_conv_dvae15"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-images", type=int, default=100)
    p.add_argument("--loop-images", type=int, default=4, help="time the per-image loop on K faces, scale by N/K")
    add_run_options(p, repeats=1)
    p.add_argument("--methods", default="jpmap_alg23", help=f"comma-separated, among {list(METHODS)}")
    p.add_argument("--official-caps", action="store_true", help="n_max 300, 3000 Adam steps, CSGM 5000")
    p.add_argument("--z-optimizer", default="adam", help="comma-separated, among ['adam', 'lm']")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    optimizers = [o.strip() for o in a.z_optimizer.split(",") if o.strip()]
    bad = [m for m in methods if m not in METHODS] + [o for o in optimizers if o not in ("adam", "lm")]
    if bad or not optimizers or a.n_images < 1 or not 1 <= a.loop_images <= a.n_images or a.repeats < 1:
        p.error(
            f"methods must be among {list(METHODS)} and z-optimizers among ['adam', 'lm'] (got {bad}); "
            "need 1 <= loop-images <= n-images, repeats >= 1"
        )
    dev = torch.device(a.device)
    if a.official_caps:
        budget = mb.Budget(n1=25, n2=150, n_max=300, adam_max_iters=3000, csgm_max_iters=5000)
    else:
        budget = mb.Budget(n1=25, n2=40, n_max=40, adam_max_iters=300, csgm_max_iters=3000)
    vae = load_pretrained(PRIOR, device=dev)
    test = load_celeba64("test")
    x = test.images[: a.n_images]
    deg = mb.degrade("inpainting", 0.8, x, a.seed)
    n, k = x.shape[0], a.loop_images
    loop_idx = [i * n // k for i in range(k)]
    print(f"{n} CelebA test faces ({test.source}); prior {PRIOR}; {budget}")
    print(f"device {dev}, torch threads {torch.get_num_threads()}; loop on faces {loop_idx}, scaled by {n}/{k}")

    def run(method: str, idx: list[int] | None, z_opt: str = "adam"):
        rows = slice(None) if idx is None else idx
        op = Inpainting(deg.op.mask[rows].to(dev))
        y = deg.y[rows].to(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        r = mb.solve(METHODS[method], y, op, vae, deg.sigma, dataclasses.replace(budget, z_optimizer=z_opt))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        cpu_seconds.append(time.process_time() - c0)  # CPU seconds of the process: the work, whatever else runs
        return time.perf_counter() - t0, r

    results = []
    cpu_seconds: list[float] = []
    for method, z_opt in [(m, o) for m in methods for o in optimizers]:
        batched, peaks = [], []
        cpu_seconds.clear()
        for _ in range(a.repeats):
            with PeakRSS() as mem:
                s, r = run(method, None, z_opt)
            batched.append(s)
            peaks.append(mem.peak)
        xb = r.x.detach().clamp(0, 1).cpu()
        cpu_batched = statistics.median(cpu_seconds)
        cpu_seconds.clear()
        loop_s, diffs = 0.0, []
        for i in loop_idx:
            s, ri = run(method, [i], z_opt)
            loop_s += s
            diffs.append(float((ri.x.detach().clamp(0, 1).cpu() - xb[i : i + 1]).abs().max()))
        sec = statistics.median(batched)
        scaled = loop_s * n / k
        psnr = mb.score(xb, x, with_lpips=False)["psnr"]
        row = {
            "problem": "inpainting_80_sigma10",
            "method": method,
            "n_images": n,
            "seconds": sec,
            "seconds_per_image": sec / n,
            "images_per_second": n / sec,
            "peak_mem_mb": max(peaks) / 2**20,
            "psnr_mean": float(psnr.mean()),
            "psnr_decoded_mean": float(psnr_of(r.x_decoded.detach().clamp(0, 1).cpu(), x).mean()),
            "loop_images": k,
            "loop_seconds_scaled": scaled,
            "speedup_vs_loop": scaled / sec,
            "max_abs_diff_vs_loop": max(diffs),
            "iterations_mean": float(r.iterations.double().mean()) if r.iterations is not None else None,
            "converged_fraction": float(r.converged.double().mean()),
        }
        if optimizers != ["adam"]:
            row.update(cpu_seconds=cpu_batched, loop_cpu_seconds_scaled=sum(cpu_seconds) * n / k)
            evals = r.per_image["decoder_evals"].double()
            row.update(
                z_optimizer=z_opt, decoder_evals_per_image=float(evals.mean()), decoder_evals_max=float(evals.max())
            )
            adam = [q for q in results if q["method"] == method and q.get("z_optimizer") == "adam"]
            if z_opt != "adam" and adam:
                row.update(
                    speedup_vs_adam=adam[0]["seconds"] / sec,
                    speedup_vs_adam_cpu=adam[0]["cpu_seconds"] / cpu_batched,
                    psnr_diff_vs_adam=row["psnr_mean"] - adam[0]["psnr_mean"],
                )
        results.append(row)
        print(
            f"{method:<12} {z_opt:<5} batched {sec:8.1f} s ({sec / n:.2f} s per face), loop x{n}/{k} {scaled:8.1f} s, "
            f"speed-up {scaled / sec:5.1f}x, peak RSS {row['peak_mem_mb']:.0f} MB, PSNR {row['psnr_mean']:.2f} dB, "
            f"max |batched - loop| {row['max_abs_diff_vs_loop']:.1e}",
            flush=True,
        )
    if a.json:
        atomic_write_json(
            Path(a.json),
            {
                "machine": machine_info(dev),
                "prior": PRIOR,
                "weights_sha256": weights_sha256(PRIOR),
                "data_source": test.source,
                "budget": budget.__dict__,
                "repeats": a.repeats,
                "seed": a.seed,
                "rows": results,
                **({"load_average": list(os.getloadavg())} if optimizers != ["adam"] else {}),
            },
        )
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
