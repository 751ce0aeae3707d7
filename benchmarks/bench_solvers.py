"""Benchmark: restore N MNIST test images with CSGM, JPMAP Alg. 2.3 and Alg. 2.4, batched vs a per-image loop.

    python benchmarks/bench_solvers.py --n-images 100 --json benchmarks/results_cpu.json
    python benchmarks/bench_solvers.py --z-optimizer adam,lm --json benchmarks/results_lm_cpu.json

Problems (JPMAP Figs. 6-7): denoising sigma = 110; inpainting 80% missing, sigma = 10; compressed sensing
m = 140, sigma = 10. Methods: ``csgm`` (lambda = sigma^2), ``jpmap_alg23`` (n1 = 25, n2 = 150, n_max = 300,
beta = 1/gamma^2), ``jpmap_alg24`` (alpha = 1). Every timing is the median of ``--repeats`` runs. The per-image
loop runs the *same* solver on one image at a time for ``--loop-images K`` of the N images; its time is scaled
by N/K (stated in the output) and ``speedup_vs_loop = loop_seconds_scaled / batched_seconds``; the K images are
spread evenly over the N (indices ``i N / K``), since per-image work varies a lot. The loop's results are
compared with the batched ones on those K images (``max_abs_diff_vs_loop``). Peak memory is the process RSS
sampled every 5 ms during the batched run.

Why JPMAP's speed-up is bounded (reported per row): each image needs its own number ``T_i`` of Adam steps (the
sum over its iterations), and a batch needs at least ``max_i T_i`` steps. With ``c(b)`` the cost of one Adam
step on ``b`` images (measured at the start: ``step_ms_1`` and ``step_ms_N``), the loop costs ``sum T_i c(1)``
and the batch at least ``max T c(1) + sum T (c(N) - c(1)) / N``; their ratio is ``model_ceiling``.

``--z-optimizer adam,lm`` runs every method once per latent optimiser (``z_optimizer`` of the solvers: the paper's
Adam, or Levenberg-Marquardt). Each row then says which (``z_optimizer``), how many decoder evaluations each image
took in its z-steps (``decoder_evals_per_image``, mean and max: Adam's gradient passes, LM's Jacobian passes), the
batched steps, each image's final ``objective`` (JPMAP's ``J1``, CSGM's energy) and, when Adam ran too,
``speedup_vs_adam`` (Adam's batched seconds over these), ``psnr_diff_vs_adam`` and ``objective_vs_adam`` (on how
many images the objective is lower or higher than Adam's by more than 1e-3, relative). Every time is also measured
as CPU seconds of the process (``cpu_seconds``, ``speedup_vs_adam_cpu``, ``speedup_vs_loop_cpu``: the work done,
which a loaded machine changes far less than the wall time). For LM, ``step_ms_1`` / ``step_ms_N`` are one LM
iteration (a Jacobian pass over the ``l`` tangents, the ``l x l`` solves, the acceptance test) and ``T_i`` of the
ceiling is the image's decoder evaluations.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from jpmap_core._io import atomic_write_json
from jpmap_core.data import load_mnist
from jpmap_core.metrics import psnr
from jpmap_core.operators import make_problem as build_problem
from jpmap_core.pretrained import load_pretrained, weights_sha256
from jpmap_core.solvers import solve as run_solver

PROBLEMS = ("denoising", "inpainting", "compressed_sensing")
METHODS = ("csgm", "jpmap_alg23", "jpmap_alg24")
Z_OPTIMIZERS = ("adam", "lm")


class PeakRSS:
    """Samples the process resident set size in a background thread (Linux /proc)."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.every)

    def __enter__(self) -> PeakRSS:
        self.peak = self._rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


#: each benchmark problem: (level, sigma) of :func:`jpmap_core.operators.make_problem`
PROBLEM_SETTINGS = {"denoising": (None, 110.0), "inpainting": (0.8, 10.0), "compressed_sensing": (140, 10.0)}


def make_problem(name: str, x: torch.Tensor, seed: int):
    """(operator, y, sigma) for images x; the operator is per image (inpainting masks), built from ``seed``."""
    if name not in PROBLEM_SETTINGS:
        raise ValueError(f"unknown problem {name!r}; expected one of {PROBLEMS}")
    level, sigma = PROBLEM_SETTINGS[name]
    p = build_problem(name, x, sigma=sigma, level=level, seed=seed)
    return p.op, p.y, sigma


def add_run_options(p: argparse.ArgumentParser, repeats: int) -> None:
    """The options every benchmark here takes: ``--repeats`` (median of that many runs), ``--threads`` (torch
    threads), ``--device``, ``--seed`` (of the degradations) and ``--json`` (where to write the results)."""
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")


def machine_info(dev: torch.device) -> dict:
    """Where a benchmark ran: platform, cores, torch and its threads, the device (GPU name), Python."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "python": sys.version.split()[0],
    }


def step_cost(vae, b: int, repeats: int = 200, device: str | torch.device = "cpu", z_optimizer: str = "adam") -> float:
    """Seconds of one batched step of the z-optimiser on ``b`` images: Adam (decoder forward + backward + update)
    or LM (a Jacobian pass, the ``l x l`` solves and the acceptance test); the mean of ``repeats`` steps after 20
    warm-up steps: wall seconds, synchronised, on a GPU; CPU seconds of the process on a CPU (which a machine busy
    with other work changes far less)."""
    from jpmap_core.energy import coupling
    from jpmap_core.solvers import AdamPool
    from jpmap_core.solvers._lm import LMPool

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, *vae.image_shape, generator=g).to(dev)
    beta = torch.full((b,), float(vae.beta), device=dev)

    def loss(zr, idx):
        return 0.5 * coupling(x[idx], vae.decode(zr, check=False)) + vae.neg_log_prior(zr) / beta[idx]

    def residual(zr, idx):
        G, JG = vae.decode_jacobian(zr)
        return (G - x[idx]).flatten(1), JG.flatten(2), 1.0 / beta[idx]

    like = torch.zeros(b, vae.latent_dim, device=dev)
    if z_optimizer == "lm":
        pool = LMPool(residual, like, tol=0.0, max_iters=10**9)
    else:
        pool = AdamPool(loss, like, tol=0.0, max_iters=10**9)
    pool.start(torch.arange(b, device=dev), torch.randn(b, vae.latent_dim, generator=g).to(dev))

    def step() -> None:  # a row that stops (LM reaches its rounding floor) starts again: every step has b rows
        done = pool.step()
        if done.numel():
            pool.start(done, torch.randn(done.numel(), vae.latent_dim, generator=g).to(dev))

    for _ in range(20):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    clock = time.perf_counter if dev.type == "cuda" else time.process_time  # CPU: the work, whatever else runs
    t0 = clock()
    for _ in range(repeats):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return (clock() - t0) / repeats


def step_costs(
    vae, n: int, repeats: int = 200, device: str | torch.device = "cpu", z_optimizer: str = "adam"
) -> tuple[float, float]:
    """Seconds of one batched step of the z-optimiser (:func:`step_cost`) on 1 and on ``n`` images."""
    return step_cost(vae, 1, repeats, device, z_optimizer), step_cost(vae, n, repeats, device, z_optimizer)


#: each benchmarked method: a registry name (jpmap_core.solvers.SOLVERS) and its options (the paper's settings)
METHOD_CALLS = {
    "csgm": ("csgm", {}),
    "jpmap_alg23": ("jpmap", {"n1": 25, "n2": 150, "n_max": 300}),
    "jpmap_alg24": ("jpmap", {"alpha": 1.0, "n1": 25, "n2": 150, "n_max": 300}),
}


def solve(method: str, y, op, vae, sigma, k_max: int = 350, z_optimizer: str = "adam"):
    name, options = METHOD_CALLS[method]
    if method == "jpmap_alg24":
        options = dict(options, k_max=k_max)
    return run_solver(name, y, op, vae, sigma=sigma, z_optimizer=z_optimizer, **options)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-images", type=int, default=100)
    p.add_argument("--loop-images", type=int, default=5, help="time the per-image loop on K images, scale by N/K")
    add_run_options(p, repeats=3)
    p.add_argument("--repeats-alg24", type=int, default=None, help="repeats for Alg. 2.4 (default: --repeats)")
    p.add_argument("--k-max", type=int, default=350, help="Alg. 2.4 outer iterations (paper/official code: 350)")
    p.add_argument("--problems", default=",".join(PROBLEMS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--prior", default="mnist_mlp_dvae15")
    p.add_argument("--z-optimizer", default="adam", help=f"comma-separated, among {list(Z_OPTIMIZERS)}")
    a = p.parse_args(argv)
    bad = [q for q in a.problems.split(",") if q not in PROBLEMS]
    bad += [m for m in a.methods.split(",") if m not in METHODS]
    optimizers = a.z_optimizer.split(",")
    bad += [o for o in optimizers if o not in Z_OPTIMIZERS]
    if bad or a.n_images < 1 or a.loop_images < 1 or a.repeats < 1 or a.k_max < 0:
        p.error(
            f"problems must be among {list(PROBLEMS)}, methods among {list(METHODS)} and z-optimizers among "
            f"{list(Z_OPTIMIZERS)} (got {bad}); need n-images >= 1, loop-images >= 1, repeats >= 1, k-max >= 0"
        )
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    vae = load_pretrained(a.prior, device=dev)
    data = load_mnist("test")
    x = data.images[: a.n_images].to(dev)
    N, K = x.shape[0], min(a.loop_images, x.shape[0])
    machine = machine_info(dev)
    costs = {o: step_costs(vae, N, device=dev, z_optimizer=o) for o in optimizers}
    for o, (c1, cN) in costs.items():
        print(f"# one {o} step: {c1 * 1e3:.3f} ms on 1 image, {cN * 1e3:.3f} ms on {N} images", flush=True)
    loop_idx = [i * N // K for i in range(K)]
    rows = []
    print(f"# {N} images, loop timed on {K} and scaled by {N}/{K}; median of {a.repeats} runs; {machine}", flush=True)
    hdr = f"{'problem':<19} {'method':<12} {'z-opt':<5} {'sec':>8} {'img/s':>7} {'loop s':>8} {'speedup':>8} {'MB':>6}"
    print(hdr + f" {'PSNR':>6} {'evals/img':>9}", flush=True)
    for prob in a.problems.split(","):
        op, y, sigma = make_problem(prob, x, a.seed)
        for method in a.methods.split(","):
            adam_row = None
            for z_opt in optimizers:
                row = run_one(a, vae, x, op, y, sigma, prob, method, z_opt, loop_idx, costs[z_opt], dev)
                if z_opt == "adam":
                    adam_row = row
                elif adam_row is not None:
                    row["speedup_vs_adam"] = adam_row["seconds"] / row["seconds"]
                    row["speedup_vs_adam_cpu"] = adam_row["cpu_seconds"] / row["cpu_seconds"]
                    row["psnr_diff_vs_adam"] = row["psnr_mean"] - adam_row["psnr_mean"]
                    rel = (torch.tensor(row["objective"]) - torch.tensor(adam_row["objective"])) / torch.tensor(
                        adam_row["objective"]
                    ).abs()
                    row["objective_vs_adam"] = {
                        "lower_by_1e-3": int((rel < -1e-3).sum()),
                        "higher_by_1e-3": int((rel > 1e-3).sum()),
                        "median_relative": float(rel.median()),
                        "max_relative": float(rel.max()),
                        "min_relative": float(rel.min()),
                    }
                rows.append(row)
                print(
                    f"{prob:<19} {method:<12} {z_opt:<5} {row['seconds']:8.1f} {row['images_per_second']:7.2f} "
                    f"{row['loop_seconds_scaled']:8.1f} {row['speedup_vs_loop']:7.1f}x {row['peak_mem_mb']:6.0f} "
                    f"{row['psnr_mean']:6.2f} {row['decoder_evals_per_image']:9.0f}",
                    flush=True,
                )
    if a.json:
        out = {
            "machine": machine,
            "prior": a.prior,
            "weights_sha256": weights_sha256(a.prior),
            "data_source": data.source,
            "repeats": a.repeats,
            "alg24_k_max": a.k_max,
            "loop_note": f"per-image loop timed on {K} images (indices i*N/K) and scaled by N/K = {N}/{K}",
            "step_ms": {"1": costs[optimizers[0]][0] * 1e3, str(N): costs[optimizers[0]][1] * 1e3},
            "rows": rows,
        }
        if optimizers != ["adam"]:
            out["z_optimizers"] = optimizers
            out["step_ms_by_z_optimizer"] = {o: {"1": c[0] * 1e3, str(N): c[1] * 1e3} for o, c in costs.items()}
            out["load_average"] = list(os.getloadavg())
        atomic_write_json(Path(a.json), out)
        print(f"wrote {a.json}")
    return 0


def run_one(a, vae, x, op, y, sigma, prob, method, z_opt, loop_idx, cost, dev) -> dict:
    """Time one (problem, method, z-optimiser): batched (median of the repeats), then the per-image loop."""
    N, K = x.shape[0], len(loop_idx)
    c1, cN = cost
    times, cpu_times, peak, res = [], [], 0, None
    n_rep = a.repeats_alg24 if (method == "jpmap_alg24" and a.repeats_alg24) else a.repeats
    for _ in range(n_rep):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            res = solve(method, y, op, vae, sigma, a.k_max, z_opt)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        peak = max(peak, torch.cuda.max_memory_allocated() if dev.type == "cuda" else mem.peak)
    t_loop, c_loop, diffs = 0.0, 0.0, []
    for i in loop_idx:
        sl = slice(i, i + 1)
        op_i = op.rows(torch.tensor([i]))  # the operator of image i (its own mask, for inpainting)
        t0, c0 = time.perf_counter(), time.process_time()
        single = solve(method, y[sl], op_i, vae, sigma, a.k_max, z_opt)
        t_loop += time.perf_counter() - t0
        c_loop += time.process_time() - c0
        diffs.append(float((single.x - res.x[sl]).abs().max()))
    sec = statistics.median(times)
    loop_scaled = t_loop * N / K
    evals = res.per_image["decoder_evals"].double()
    obj = res.history["objective"]  # each image's objective at its last record: its final J1 or CSGM energy
    last = torch.stack([col[~torch.isnan(col)][-1] for col in obj.T])
    row = {
        "problem": prob,
        "method": method,
        "z_optimizer": z_opt,
        "decoder_evals_per_image": float(evals.mean()),
        "decoder_evals_max": float(evals.max()),
        "batched_steps": int(res.info["batched_steps"]),
        "n_images": N,
        "seconds": sec,
        "seconds_all_repeats": times,
        "repeats": n_rep,
        "images_per_second": N / sec,
        "peak_mem_mb": peak / 2**20,
        "psnr_mean": float(psnr(res.x.clamp(0, 1), x).mean()),
        "converged_fraction": float(res.converged.float().mean()),
        "loop_images": K,
        "loop_seconds_measured": t_loop,
        "loop_seconds_scaled": loop_scaled,
        "speedup_vs_loop": loop_scaled / sec,
        "max_abs_diff_vs_loop": max(diffs),
        "objective": last.tolist(),
        # CPU seconds of this process (time.process_time): the work, whatever else the machine runs
        "cpu_seconds": statistics.median(cpu_times),
        "cpu_seconds_all_repeats": cpu_times,
        "loop_cpu_seconds_scaled": c_loop * N / K,
        "speedup_vs_loop_cpu": c_loop * N / K / statistics.median(cpu_times),
    }
    if "adam_steps" in res.history:  # per-image work T_i and the speed-up it allows
        T = res.history["adam_steps"].clamp(min=0).sum(0).double() if z_opt == "adam" else evals
        ceiling = float(T.sum() * c1 / (T.max() * c1 + T.sum() * max(cN - c1, 0.0) / N))
        row.update(step_ms_1=c1 * 1e3, step_ms_N=cN * 1e3, model_ceiling=ceiling)
        if z_opt == "adam":
            row.update(adam_steps_mean=float(T.mean()), adam_steps_max=float(T.max()))
    return row


if __name__ == "__main__":
    raise SystemExit(main())
