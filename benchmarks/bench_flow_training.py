"""Training throughput of the flow priors (AIPO §4.1) on 32x32 faces: images per second of one training step
(dequantization, log-likelihood, backward, gradient clipping, Adam) on one thread, and the epochs that fit a given
wall-clock budget on the 4,560 CelebA training faces.

    python benchmarks/bench_flow_training.py --threads 1 --json benchmarks/results_flow_training_cpu.json

It also prints the estimated duration of the recommended recipes (:data:`RECOMMENDED`), from the measured throughput
(training images plus the per-epoch test evaluation).

Each configuration is timed over ``--steps`` steps after ``--warmup`` untimed ones; the median step time gives the
throughput. Both the wall-clock time and the process CPU time of a step are recorded: on an idle core they agree; on
a loaded machine the wall-clock time grows with the load while the CPU time (with one thread) stays close to what an
idle core would take (cache sharing still slows it a little), so the estimates use the CPU time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jpmap_core.models import build_model  # noqa: E402
from jpmap_core.train import FLOW_GRAD_CLIP, flow_loss  # noqa: E402

#: candidate configurations (the model part of a manifest) timed by default
CONFIGS = {
    "realnvp_l3_s3_w32_b1": {"arch": "realnvp", "levels": 3, "steps": 3, "width": 32, "blocks": 1},
    "realnvp_l3_s3_w48_b1": {"arch": "realnvp", "levels": 3, "steps": 3, "width": 48, "blocks": 1},
    "realnvp_l3_s3_w64_b1": {"arch": "realnvp", "levels": 3, "steps": 3, "width": 64, "blocks": 1},
    "glow_l3_k8_w64_b0": {"arch": "glow", "levels": 3, "steps": 8, "width": 64, "blocks": 0},
    "glow_l3_k16_w64_b0": {"arch": "glow", "levels": 3, "steps": 16, "width": 64, "blocks": 0},
    "glow_l3_k8_w64_b1": {"arch": "glow", "levels": 3, "steps": 8, "width": 64, "blocks": 1},
}
#: the recommended recipes for the AIPO notebook's priors (about an hour each on one core): config name, epochs, and
#: the training command (batch 64: a small training set wants more updates per epoch; flips double the faces)
RECOMMENDED = {
    "celeba32_realnvp": (
        "realnvp_l3_s3_w48_b1", 40,
        "python -m jpmap_core.train --name celeba32_realnvp --dataset celeba32 --arch realnvp --levels 3 --steps 3 "
        "--width 48 --blocks 1 --epochs 40 --batch-size 64 --lr 1e-3 --hflip --threads 1",
    ),
    "celeba32_glow": (
        "glow_l3_k16_w64_b0", 60,
        "python -m jpmap_core.train --name celeba32_glow --dataset celeba32 --arch glow --levels 3 --steps 16 "
        "--width 64 --blocks 0 --epochs 60 --batch-size 64 --lr 1e-3 --hflip --threads 1",
    ),
}  # fmt: skip
N_TRAIN = 4560  # CelebA training faces (load_celeba32("train"))
N_TEST = 660  # evaluated after every epoch: a forward pass, about a third of a training step per image


def time_config(model_cfg: dict, *, batch_size: int, steps: int, warmup: int, seed: int = 0) -> dict:
    """Median seconds per training step of ``model_cfg`` on random 8-bit 32x32 images, and what follows from it."""
    torch.manual_seed(seed)
    flow = build_model({"image_shape": [3, 32, 32], **model_cfg}).train()
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    x = torch.round(torch.rand(batch_size, 3, 32, 32, generator=g) * 255) / 255
    flow.data_init(x)
    times, cpu = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss, _ = flow_loss(flow, x, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), FLOW_GRAD_CLIP)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    step, cpu_step = statistics.median(times), statistics.median(cpu)
    ips = batch_size / cpu_step
    return {
        "model": model_cfg,
        "parameters": sum(p.numel() for p in flow.parameters()),
        "batch_size": batch_size,
        "median_step_seconds": step,
        "median_step_cpu_seconds": cpu_step,
        "images_per_second_wall": batch_size / step,
        "images_per_second": ips,
        "epoch_seconds": N_TRAIN / ips,
        "epochs_per_hour": 3600 * ips / N_TRAIN,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated names among {', '.join(CONFIGS)}")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
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
        rows[name] = time_config(CONFIGS[name], batch_size=a.batch_size, steps=a.steps, warmup=a.warmup)
        r = rows[name]
        print(f"{name:24s} {r['parameters']:>9,d} params  {r['images_per_second']:7.1f} images/s (CPU time; wall "
              f"{r['images_per_second_wall']:.1f})  {r['epoch_seconds']:6.0f} s/epoch  {r['epochs_per_hour']:5.1f} "
              "epochs/hour", flush=True)  # fmt: skip
    estimates = {}
    for recipe, (config, epochs, command) in RECOMMENDED.items():
        if config in rows:
            per_epoch = (N_TRAIN + N_TEST / 3) / rows[config]["images_per_second"]
            estimates[recipe] = {"config": config, "epochs": epochs, "estimated_seconds": epochs * per_epoch,
                                 "command": command}  # fmt: skip
            print(f"{recipe}: {epochs} epochs of {config}, about {epochs * per_epoch / 60:.0f} min on one core")
    if a.json:
        machine = f"{platform.machine()}, torch {torch.__version__} ({a.threads} thread(s))"
        out = {"machine": machine, "n_train": N_TRAIN, "steps": a.steps, "warmup": a.warmup, "results": rows,
               "recommended": estimates}  # fmt: skip
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
