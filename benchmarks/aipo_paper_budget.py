"""AIPO's Tables 1-3 at the paper's own budget on a few faces: the MAP-loss claim tested where notebook 13's default
profile cannot (its budget is cut to fit a laptop CPU).

    python benchmarks/aipo_paper_budget.py --n-images 4 --lambdas 0.5,2.0 \
        --work runs/aipo_paper_budget --json benchmarks/results_aipo_paper_budget_cpu.json

Every (prior, task) runs :func:`jpmap_core.experiments.aipo.run_flow_task` exactly as notebook 13's ``paper``
profile does (``n_mle = 500`` MLE steps, Table 4's ``K = 40``, ``alpha = 0.05``, ``r = 0.05``,
``delta_min0 = Lambda/20`` and its bounds, no cap on the rounds; the three baselines with AIPO's per-image gradient
evaluations as their budget), on the first ``--n-images`` CelebA test faces at 32x32 and the ``--lambdas`` given.
Only the number of faces and of ``Lambda`` values are smaller than the paper's (200 faces, five values), so that it
fits one CPU thread in about an hour and a half; ``make reproduce PROFILE=paper DEVICE=cuda ONLY=13`` runs the full
size on a GPU.

Each (prior, task) is written to ``--work`` as soon as it finishes, and a rerun skips the finished ones (a stopped run
resumes). The result file holds the rows (:func:`~jpmap_core.experiments.aipo.table_rows`), the paper's claims
counted on them (:func:`~jpmap_core.experiments.aipo.claims`), the settings, the weights' sha256, the data source,
the machine and the seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jpmap_core._io import atomic_write_json  # noqa: E402
from jpmap_core.data import load_celeba32  # noqa: E402
from jpmap_core.experiments import aipo as ex  # noqa: E402
from jpmap_core.pretrained import load_pretrained, weights_sha256  # noqa: E402

PRIORS = ("celeba32_realnvp", "celeba32_glow")
N_MLE = 500  # §4.1: 500 projected-gradient steps for the MLE start
K = 40  # Table 4


def run_one(prior: str, task: str, faces: torch.Tensor, lambdas: list[float], seed: int) -> dict:
    flow = load_pretrained(prior)
    t0 = time.perf_counter()
    run = ex.run_flow_task(flow, prior, ex.PAPER_TASKS[task], {"test": faces}, lambdas, seed=seed,
                           aipo_options={"n_mle": N_MLE, "K": K}, n_rounds=None)  # fmt: skip
    return {
        "prior": prior,
        "task": task,
        "rows": ex.table_rows([run]),
        "budgets_equal": ex.budgets_equal([run]),
        "mle_start": ex.mle_start_check(run),
        "seconds": time.perf_counter() - t0,
        "seconds_per_method": run.seconds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-images", type=int, default=4)
    p.add_argument("--lambdas", default="0.5,2.0")
    p.add_argument("--priors", default=",".join(PRIORS))
    p.add_argument("--tasks", default=",".join(ex.PAPER_TASKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, required=True, help="folder of the finished (prior, task) parts (resume)")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--finished-only", action="store_true", help="write the result from the finished parts only")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    lambdas = [float(v) for v in a.lambdas.split(",")]
    faces = load_celeba32("test", limit=a.n_images)
    a.work.mkdir(parents=True, exist_ok=True)
    parts = []
    for prior in a.priors.split(","):
        for task in a.tasks.split(","):
            part = a.work / f"{prior}_{task}_{a.n_images}_{a.lambdas}_{a.seed}.json"
            if not part.exists() and a.finished_only:
                continue
            if not part.exists():
                atomic_write_json(part, run_one(prior, task, faces.images, lambdas, a.seed))
            parts.append(json.loads(part.read_text()))
            last = parts[-1]
            print(f"{prior} {task}: {last['seconds']:.0f} s", flush=True)
    rows = [r for part in parts for r in part["rows"]]
    result = {
        "what": "AIPO's Tables 1-3 at the paper's budget (500 MLE steps, Table 4's schedule, no round cap) on the "
        "first n_images CelebA test faces at 32x32 (benchmarks/aipo_paper_budget.py)",
        "settings": {
            "parts": [f"{part['prior']}/{part['task']}" for part in parts],
            "n_images": a.n_images,
            "lambdas": lambdas,
            "n_mle": N_MLE,
            "K": K,
            "seed": a.seed,
            "tasks": {t: ex.PAPER_TASKS[t].label for t in a.tasks.split(",")},
        },
        "data_source": faces.source,
        "weights_sha256": {prior: weights_sha256(prior) for prior in a.priors.split(",")},
        "claims": ex.claims(rows, "test"),
        "budgets_equal": all(part["budgets_equal"] for part in parts),
        "mle_start": {f"{part['prior']}/{part['task']}": part["mle_start"] for part in parts},
        "rows": rows,
        "seconds": {f"{part['prior']}/{part['task']}": part["seconds"] for part in parts},
        "seconds_total": sum(part["seconds"] for part in parts),
        "machine": f"{platform.machine()} {platform.processor() or ''} torch threads={a.threads}".strip(),
        "torch_version": torch.__version__,
    }
    atomic_write_json(a.json, result)
    print(json.dumps(result["claims"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
