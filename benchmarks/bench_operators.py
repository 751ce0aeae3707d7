"""Compressed-sensing ``prox_l2``: cached Cholesky of ``I_d + gamma A^T A`` vs Woodbury with ``I_m + gamma A A^T``.

MNIST size (``d = 784``), a batch of ``B = 100`` images, ``m`` in {40, 140, 300} measurements. For each method
the table gives the median wall time (over ``--repeats`` runs, after a warm-up) of

* ``cached``: ``prox_l2`` with one gamma whose factorisation is cached (the JPMAP x-step at fixed beta),
  with images/s and the speed-up over a per-image loop of the same call;
* ``new gamma``: ``prox_l2`` with a gamma not seen before (factorisation + solve);
* ``per-image``: ``prox_l2`` with ``B`` distinct gammas (Alg. 2.4: every image its own beta), one
  factorisation per distinct value;

and the largest difference between the two methods' outputs. ``auto`` in
:class:`jpmap_core.operators.CompressedSensing` picks the winner (Woodbury when ``m < d``).

    python benchmarks/bench_operators.py [--repeats 15] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from jpmap_core.operators import CompressedSensing

METHODS = ("cholesky", "woodbury")


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 2) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(m: int, method: str, *, batch: int, repeats: int, device: torch.device) -> tuple[dict[str, float], Tensor]:
    g = torch.Generator().manual_seed(0)
    op = CompressedSensing(m, (1, 28, 28), generator=torch.Generator().manual_seed(m), method=method)
    x = torch.rand(batch, 1, 28, 28, generator=g).to(device)
    z = torch.rand(batch, 1, 28, 28, generator=g).to(device)
    y = op.degrade(x, 10, generator=g)
    gamma = 1.6
    counter = iter(range(10**9))
    per_image = torch.linspace(0.5, 5.0, batch, device=device)

    row = {
        "cached": median_seconds(lambda: op.prox_l2(z, y, gamma), repeats, device),
        "loop": median_seconds(
            lambda: [op.prox_l2(z[i : i + 1], y[i : i + 1], gamma) for i in range(batch)], max(3, repeats // 5), device
        ),
        "new_gamma": median_seconds(lambda: op.prox_l2(z, y, 1.0 + 1e-4 * next(counter)), repeats, device),
        "per_image": median_seconds(lambda: op.prox_l2(z, y, per_image), max(3, repeats // 5), device),
    }
    return row, op.prox_l2(z, y, per_image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--m", type=int, nargs="+", default=[40, 140, 300])
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, device {device}, "
        f"{torch.get_num_threads()} threads, d=784, B={args.batch}, median of {args.repeats}"
    )
    header = (
        f"{'m':>4} {'method':>9} {'cached ms':>10} {'images/s':>9} {'vs loop':>8} "
        f"{'new gamma ms':>13} {'per-image ms':>13} {'max |diff|':>11}"
    )
    print(header)
    print("-" * len(header))
    for m in args.m:
        outs = {}
        for method in METHODS:
            row, outs[method] = bench(m, method, batch=args.batch, repeats=args.repeats, device=device)
            diff = float((outs[method] - outs[METHODS[0]]).abs().max())
            print(
                f"{m:>4} {method:>9} {1e3 * row['cached']:>10.3f} {args.batch / row['cached']:>9.0f} "
                f"{row['loop'] / row['cached']:>7.1f}x {1e3 * row['new_gamma']:>13.3f} "
                f"{1e3 * row['per_image']:>13.1f} {diff:>11.2e}"
            )
        auto = CompressedSensing(m, (1, 28, 28)).resolved_method
        print(f"{m:>4} {'auto':>9} -> {auto}")


if __name__ == "__main__":
    main()
