"""One JPMAP z-step, Adam against Levenberg-Marquardt, and why some images are slow (benchmarks/RESULTS.md).

    python benchmarks/lm_slow_images.py --n-images 100 --threads 1 --json benchmarks/results_lm_zstep_cpu.json
    python benchmarks/make_results.py benchmarks/results_lm_zstep_cpu.json

The z-step ``argmin_z J1(x, z) / beta = 1/2 ||x - mu_theta(z)||^2 + 1/(2 beta) ||z||^2`` (eq. 2.5 in z) for the
first N MNIST test digits with Gaussian noise (``--sigma``, 0-255), from the encoder's code ``mu_phi(x)``, stopping at
``||grad||/l < 1e-4`` (the official rule): Adam (lr 0.01), Levenberg-Marquardt on the Gauss-Newton matrix alone, and
with the structured secant term (the solvers' ``z_optimizer="lm"``). For each: wall time, decoder evaluations per
image (median, max), and the energy relative to Adam's.

Then the slowest images of plain Gauss-Newton LM, in float64: the smallest eigenvalue of the true Hessian of the
z-step (``torch.func.hessian``) at the encoder's code and at the minimiser, that of the Gauss-Newton matrix
``J^T J + I / beta`` there, and the local rate of Gauss-Newton ``max |1 - eig((J^T J + I/beta)^-1 H)|`` (the factor by
which it shrinks the error per iteration near the minimiser: 0 is Newton, close to 1 is slow).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_solvers import machine_info  # noqa: E402

from jpmap_core._io import atomic_write_json  # noqa: E402
from jpmap_core.data import load_mnist  # noqa: E402
from jpmap_core.energy import coupling  # noqa: E402
from jpmap_core.pretrained import load_pretrained  # noqa: E402
from jpmap_core.solvers import adam_minimize  # noqa: E402
from jpmap_core.solvers._lm import lm_minimize  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-images", type=int, default=100)
    p.add_argument("--sigma", type=float, default=110.0, help="noise std of the digits, 0-255")
    p.add_argument("--slowest", type=int, default=5, help="how many of the slowest images to diagnose")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.n_images < 1 or a.slowest < 0 or a.sigma < 0:
        p.error("need n-images >= 1, slowest >= 0, sigma >= 0")
    if a.threads:
        torch.set_num_threads(a.threads)
    vae = load_pretrained("mnist_mlp_dvae15")
    x = load_mnist("test").images[: a.n_images]
    g = torch.Generator().manual_seed(a.seed)
    x = x + a.sigma / 255 * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        z0 = vae.encode(x, allow_out_of_range=True)[0]
    beta, ldim = vae.beta, vae.latent_dim
    X = x.flatten(1)

    def loss(z, idx):
        return 0.5 * coupling(x[idx], vae.decode(z, check=False)) + vae.neg_log_prior(z) / beta

    def residual(z, idx):
        G, J = vae.decode_jacobian(z)
        return G.flatten(1) - X[idx], J.flatten(2), torch.full((z.shape[0],), 1 / beta)

    runs = {
        "adam": lambda: adam_minimize(loss, z0, lr=0.01, tol=1e-4, max_iters=3000),
        "lm_gauss_newton": lambda: lm_minimize(residual, z0, scale=0.5, tol=1e-4, secant=False),
        "lm": lambda: lm_minimize(residual, z0, scale=0.5, tol=1e-4),
    }
    out, results = {}, {}
    for name, run in runs.items():
        t0, c0 = time.perf_counter(), time.process_time()
        r = run()
        sec, cpu = time.perf_counter() - t0, time.process_time() - c0
        results[name] = r
        with torch.no_grad():
            E = loss(r.z, torch.arange(len(x)))
        rel = (E - loss(results["adam"].z, torch.arange(len(x))).detach()) / E.abs() if name != "adam" else None
        ev = r.evals.double()
        out[name] = {
            "seconds": sec,
            "cpu_seconds": cpu,
            "evals_median": float(ev.median()),
            "evals_max": float(ev.max()),
            "evals_mean": float(ev.mean()),
            "batched_steps": r.batched_steps,
            "converged_fraction": float(r.converged.double().mean()),
        }
        if rel is not None:
            out[name].update(
                energy_vs_adam_max=float(rel.max()),
                energy_vs_adam_min=float(rel.min()),
                images_above_adam_1e3=int((rel > 1e-3).sum()),
            )
        vs = "" if rel is None else f", energy vs adam max {rel.max():+.1e} min {rel.min():+.1e}"
        print(
            f"{name:<16} {sec:6.2f} s ({cpu:6.2f} CPU s), decoder evals per image median {ev.median():.0f} "
            f"max {ev.max():.0f}, batched steps {r.batched_steps}{vs}",
            flush=True,
        )
    out["slow_images"] = diagnose(vae, x, z0, results, a.slowest)
    for d in out["slow_images"]:
        print(
            f"image {d['image']:3d}: GN-LM {d['evals_gauss_newton']:3d} evals, LM {d['evals_lm']:3d}, Adam "
            f"{d['evals_adam']:4d}; min eig H at mu_phi(x) {d['hessian_min_eig_start']:+.2f} (GN "
            f"{d['gauss_newton_min_eig_start']:+.2f}), at the minimiser {d['hessian_min_eig_end']:+.2f} (GN "
            f"{d['gauss_newton_min_eig_end']:+.2f}); local Gauss-Newton rate {d['gauss_newton_rate']:.2f}"
        )
    if a.json:
        atomic_write_json(
            Path(a.json),
            {
                "benchmark": "lm_zstep",
                "machine": machine_info(torch.device("cpu")),
                "load_average": list(os.getloadavg()),
                "n_images": len(x),
                "sigma": a.sigma,
                "latent_dim": ldim,
                "results": out,
            },
        )
        print(f"wrote {a.json}")
    return 0


def diagnose(vae, x, z0, results, k: int) -> list[dict]:
    """The ``k`` images plain Gauss-Newton LM took longest on: Hessian and Gauss-Newton spectra, in float64."""
    from torch.func import hessian

    vae64 = copy.deepcopy(vae).double()
    beta = vae.beta
    slow = results["lm_gauss_newton"].evals.argsort(descending=True)[:k].tolist()
    rows = []
    for b in slow:
        xb = x[b].double()

        def f(z, xb=xb):
            return 0.5 * ((vae64.decode(z[None], check=False)[0] - xb).pow(2).sum() + z.pow(2).sum() / beta)

        def spectra(z):
            H = hessian(f)(z)
            _, J = vae64.decode_jacobian(z[None])
            J = J.flatten(2)[0]
            GN = J @ J.T + torch.eye(len(z), dtype=z.dtype) / beta
            return H, GN

        H0, GN0 = spectra(z0[b].double())
        H1, GN1 = spectra(results["lm"].z[b].double())
        rate = torch.linalg.eigvals(torch.linalg.solve(GN1, H1)).real
        rows.append(
            {
                "image": b,
                "evals_gauss_newton": int(results["lm_gauss_newton"].evals[b]),
                "evals_lm": int(results["lm"].evals[b]),
                "evals_adam": int(results["adam"].evals[b]),
                "hessian_min_eig_start": float(torch.linalg.eigvalsh(H0)[0]),
                "gauss_newton_min_eig_start": float(torch.linalg.eigvalsh(GN0)[0]),
                "hessian_min_eig_end": float(torch.linalg.eigvalsh(H1)[0]),
                "gauss_newton_min_eig_end": float(torch.linalg.eigvalsh(GN1)[0]),
                "gauss_newton_rate": float((1 - rate).abs().max()),
            }
        )
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
