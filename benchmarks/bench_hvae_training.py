"""Training cost of the face prior ``celeba64_hvae`` (a PatchVDVAE-style hierarchical VAE on whole 64x64 CelebA
faces, PnP-HVAE §6.1-6.2): seconds per training step of :func:`jpmap_core.train.train_hvae` on one thread, and the
steps that fit a budget.

    python benchmarks/bench_hvae_training.py --threads 1 --json benchmarks/results_hvae_training_cpu.json

A step is the loop of ``train_hvae``: draw a batch of faces (flips), one reparameterised sample per group, the ELBO
(eq. 4) per dimension, backward, gradient-norm clipping, Adamax and the EMA update. Each configuration is timed over
``--steps`` steps after ``--warmup`` untimed ones on random 64x64 images (the cost does not depend on the pixels).
Both the wall-clock and the process CPU time of a step are recorded: on a loaded machine the wall-clock time grows
with the load while the CPU time of one thread stays close to what an idle core takes (cache sharing still slows it
a little), so the estimates use the CPU time. The recommended recipe (:data:`RECOMMENDED`) is sized from it to about
two hours of one core, the per-epoch validation ELBO (a forward pass of ``n_test`` faces, counted as a third of a
training step per face) included.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jpmap_core.data import ImageSampler  # noqa: E402
from jpmap_core.models import build_model  # noqa: E402
from jpmap_core.train import HVAE_FACE_CLI_DEFAULTS, N_TEST_PATCHES, _ema_update  # noqa: E402

#: candidate architectures for 64x64 faces (finest resolution first: 64, 32, 16, 8, 4)
CONFIGS = {
    "w24-96_L7": HVAE_FACE_CLI_DEFAULTS["model"],
    "w16-64_L7": {"widths": [16, 32, 48, 64, 64], "groups": [0, 1, 2, 2, 2], "latent_channels": [3, 4, 6, 8, 8],
                  "enc_blocks": [1, 1, 1, 2, 2], "gamma_init": 0.03},
    "w16-64_L5": {"widths": [16, 32, 48, 64, 64], "groups": [0, 0, 1, 2, 2], "latent_channels": [3, 4, 6, 8, 8],
                  "enc_blocks": [1, 1, 1, 2, 2], "gamma_init": 0.03},
}  # fmt: skip
#: the recommended recipe: config name, batch size, total steps (epochs x steps per epoch), command
RECOMMENDED = {
    "celeba64_hvae": {
        "config": "w24-96_L7",
        "batch_size": HVAE_FACE_CLI_DEFAULTS["batch_size"],
        "epochs": HVAE_FACE_CLI_DEFAULTS["epochs"],
        "steps_per_epoch": 500,
        "command": "python -m jpmap_core.train --name celeba64_hvae --arch hvae --dataset celeba64 --hflip "
        "--widths 24,48,64,96,96 --groups 0,1,2,2,2 --latent-channels 3,4,6,8,8 --enc-blocks 1,1,1,2,2 "
        "--epochs 30 --steps-per-epoch 500 --batch-size 16 --lr 1e-3 --threads 1 --export data/pretrained",
    }
}
BUDGET_SECONDS = 2 * 3600


def time_config(model_cfg: dict, *, batch_size: int, steps: int, warmup: int, seed: int = 0) -> dict:
    """Median seconds (wall and CPU) of one training step of ``model_cfg`` on 64x64 faces."""
    torch.manual_seed(seed)
    model = build_model({"arch": "hvae", "image_shape": [3, 64, 64], **model_cfg}).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adamax(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    sampler = ImageSampler(torch.rand(64, 3, 64, 64, generator=g), hflip=True)
    n_latent, d = model.latent_shape[0], model.d
    times, cpu = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        x = sampler.draw(batch_size, g)
        eps = torch.randn(batch_size, n_latent, generator=g)
        nll, kl = model(x, None, eps)
        loss = (nll + kl.sum(1)).mean() / d
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
        opt.step()
        _ema_update(ema, model, 0.999)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    step, cpu_step = statistics.median(times), statistics.median(cpu)
    return {
        "model": model_cfg,
        "parameters": sum(p.numel() for p in model.parameters()),
        "latent_groups": model.n_groups,
        "latent_dimension": model.latent_shape[0],
        "batch_size": batch_size,
        "median_step_seconds": step,
        "median_step_cpu_seconds": cpu_step,
        "images_per_second_wall": batch_size / step,
        "images_per_second": batch_size / cpu_step,
        "steps_in_budget": int(BUDGET_SECONDS / cpu_step),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated names among {', '.join(CONFIGS)}")
    p.add_argument("--batch-size", type=int, default=HVAE_FACE_CLI_DEFAULTS["batch_size"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    a = p.parse_args(argv)
    names = [n for n in a.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        p.error(f"unknown configs {unknown}; expected names among {', '.join(CONFIGS)}")
    if a.batch_size < 1 or a.steps < 1 or a.warmup < 0 or a.threads < 1:
        p.error("--batch-size, --steps and --threads must be >= 1, --warmup >= 0")
    torch.set_num_threads(a.threads)
    rows = {}
    for name in names:
        rows[name] = r = time_config(CONFIGS[name], batch_size=a.batch_size, steps=a.steps, warmup=a.warmup)
        print(f"{name:12s} {r['parameters']:>9,d} params  L={r['latent_groups']}  {r['median_step_cpu_seconds']:.2f} "
              f"CPU s/step (wall {r['median_step_seconds']:.2f})  {r['images_per_second']:.1f} faces/s  "
              f"{r['steps_in_budget']} steps in {BUDGET_SECONDS / 3600:g} h", flush=True)  # fmt: skip
    estimates = {}
    for recipe, rec in RECOMMENDED.items():
        r = rows.get(rec["config"])
        if r is None or r["batch_size"] != rec["batch_size"]:
            continue
        steps = rec["epochs"] * rec["steps_per_epoch"]
        evaluation = rec["epochs"] * N_TEST_PATCHES / 3 / r["images_per_second"]
        total = steps * r["median_step_cpu_seconds"] + evaluation
        estimates[recipe] = dict(
            rec, parameters=r["parameters"], latent_groups=r["latent_groups"], steps=steps,
            cpu_seconds_per_step=r["median_step_cpu_seconds"], estimated_seconds=total,
        )  # fmt: skip
        print(f"{recipe}: {steps} steps of {rec['config']}, about {total / 60:.0f} min of one idle core")
    if a.json:
        machine = f"{platform.machine()}, torch {torch.__version__} ({a.threads} thread(s))"
        out = {"machine": machine, "steps": a.steps, "warmup": a.warmup, "budget_seconds": BUDGET_SECONDS,
               "results": rows, "recommended": estimates}  # fmt: skip
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
