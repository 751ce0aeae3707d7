"""Benchmark: the MNIST benchmark of notebook 06 with each way of merging its solver calls (``run_benchmark(merge=)``).

    python benchmarks/bench_merge.py --n-images 10 --k-max 20 --json benchmarks/results_merge_cpu.json
    python benchmarks/bench_merge.py --n-images 100 --k-max 350 --device cuda --json benchmarks/results_merge_cuda.json

Every problem and level of the paper (``mb.PAPER_LEVELS``: 15 levels) and every method (CSGM, Alg. 2.3, Alg. 2.4
for alpha 1, 5, 10, merged into one call), the official caps except ``k_max`` (``--k-max``), in one process. For each
merge mode it reports the solver calls, the rows they restore, the **batched Adam steps that run one after the other**
(``sum`` over calls of ``AdamPool.calls``: every step advances all running images of its call), the longest call's
steps, and the wall time (median of ``--repeats``). ``max_abs_diff`` compares every restoration with the first
mode's (the solvers keep a state per image, so merging must not change a result beyond float32 rounding).

It also times one batched Adam step of the prior (decoder forward + backward + update) at the batch sizes the calls
use (100 rows per level and method ... 4,500 for the Alg. 2.4 call of ``merge="all"`` at 100 images): on a CPU the
step's cost grows with the rows (compute-bound), so merging saves little; on a GPU it should grow little, and then
the time follows the batched steps. The wall times of the modes say which holds on the machine that ran it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_solvers import add_run_options, machine_info, step_cost  # noqa: E402

from jpmap_core._io import atomic_write_json  # noqa: E402
from jpmap_core.data import load_mnist  # noqa: E402
from jpmap_core.experiments import mnist_benchmark as mb  # noqa: E402
from jpmap_core.pretrained import load_pretrained, weights_sha256  # noqa: E402

PRIOR = "mnist_mlp_dvae15"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-images", type=int, default=10)
    p.add_argument("--k-max", type=int, default=350, help="Alg. 2.4 outer iterations at most (official: 350)")
    p.add_argument("--modes", default="inpainting,levels,all", help=f"comma-separated, among {mb.MERGE_MODES}")
    add_run_options(p, repeats=1)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not modes or any(m not in mb.MERGE_MODES for m in modes) or a.n_images < 1 or a.repeats < 1 or a.k_max < 0:
        p.error(f"modes must be among {mb.MERGE_MODES}; need n-images >= 1, repeats >= 1, k-max >= 0")
    dev = torch.device(a.device)
    vae = load_pretrained(PRIOR, device=dev)
    data = load_mnist("test")
    x = data.images[: a.n_images]
    budget = mb.Budget(k_max=a.k_max)
    n = x.shape[0]
    machine = machine_info(dev)
    print(f"# {n} MNIST test digits ({data.source}), 15 levels x 5 methods; {budget}; {machine}", flush=True)
    sizes = sorted({n, 5 * n, 15 * n, 3 * 5 * n, 3 * 15 * n})
    step_ms = {str(b): step_cost(vae, b, 50, dev) * 1e3 for b in sizes}
    print("one Adam step: " + ", ".join(f"{v:.2f} ms on {k} rows" for k, v in step_ms.items()), flush=True)
    rows, ref = [], None
    for mode in modes:
        walls = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            bench = mb.run_benchmark(x, vae, mb.PAPER_LEVELS, budget=budget, seed=a.seed, device=dev, merge=mode)
            walls.append(time.perf_counter() - t0)
        ref = ref or bench
        diff = max(float((bench.records[k].x - r.x).abs().max()) for k, r in ref.records.items())
        steps = [c["batched_steps"] for c in bench.calls]
        row = {
            "merge": mode,
            "calls": len(bench.calls),
            "rows": sum(c["images"] for c in bench.calls),
            "largest_call_rows": max(c["images"] for c in bench.calls),
            "batched_steps_total": sum(steps),
            "batched_steps_longest_call": max(steps),
            "seconds": statistics.median(walls),
            "repeats": a.repeats,
            "max_abs_diff_vs_first_mode": diff,
            "psnr_mean": float(torch.stack([r.psnr.mean() for r in bench.records.values()]).mean()),
        }
        rows.append(row)
        print(row, flush=True)
    out = {
        "benchmark": "merge",
        "machine": machine,
        "prior": PRIOR,
        "weights_sha256": weights_sha256(PRIOR),
        "data_source": data.source,
        "n_images": n,
        "budget": budget.__dict__,
        "step_ms": step_ms,
        "rows": rows,
    }
    if a.json:
        atomic_write_json(Path(a.json), out)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
