"""Print the markdown table of a ``bench_solvers.py``, ``bench_faces.py`` or ``bench_merge.py`` JSON file (what
``RESULTS.md`` shows).

python benchmarks/make_results.py benchmarks/results_cpu.json
python benchmarks/make_results.py benchmarks/results_lm_cpu.json
python benchmarks/make_results.py benchmarks/results_faces_cpu.json
python benchmarks/make_results.py benchmarks/results_faces_lm_cpu.json
python benchmarks/make_results.py benchmarks/results_merge_cpu.json
"""

from __future__ import annotations

import json
import sys


def table(path: str) -> str:
    d = json.load(open(path))
    if "z_optimizers" in d:
        return optimizer_table(d)
    m = d["machine"]
    lines = [
        f"Machine: {m['processor']}, {m['cpu_count']} cores, device {m['device']}, torch {m['torch']} "
        f"({m['torch_threads']} threads), Python {m['python']}. Prior `{d['prior']}` (sha256 "
        f"`{d['weights_sha256'][:12]}...`), data: {d['data_source']}. Alg. 2.4 k_max = {d['alg24_k_max']}. "
        f"{d['loop_note']}."
    ]
    if "step_ms" in d:
        lines[0] += " One Adam step: " + ", ".join(f"{v:.2f} ms on {k} image(s)" for k, v in d["step_ms"].items()) + "."
    lines += [
        "",
        "| problem | method | batched s (median) | repeats | images/s | loop s (scaled) | speed-up vs loop "
        "| model ceiling | Adam steps/image mean (max) | peak RSS MB | PSNR dB | converged | max abs diff vs loop |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in d["rows"]:
        ceil = f"{r['model_ceiling']:.1f}x" if "model_ceiling" in r else "-"
        steps = f"{r['adam_steps_mean']:.0f} ({r['adam_steps_max']:.0f})" if "adam_steps_mean" in r else "-"
        lines.append(
            f"| {r['problem']} | {r['method']} | {r['seconds']:.1f} | {r['repeats']} | {r['images_per_second']:.2f} "
            f"| {r['loop_seconds_scaled']:.0f} | {r['speedup_vs_loop']:.1f}x | {ceil} | {steps} "
            f"| {r['peak_mem_mb']:.0f} | {r['psnr_mean']:.2f} | {r['converged_fraction']:.2f} "
            f"| {r['max_abs_diff_vs_loop']:.1e} |"
        )
    return "\n".join(lines)


def optimizer_table(d: dict) -> str:
    """The table of ``bench_solvers.py --z-optimizer adam,lm``: one row per (problem, method, z-optimiser)."""
    m = d["machine"]
    steps = "; ".join(
        f"{o}: {c['1']:.2f} ms on 1 image, {c[str(d['rows'][0]['n_images'])]:.2f} ms on {d['rows'][0]['n_images']}"
        for o, c in d["step_ms_by_z_optimizer"].items()
    )
    load = ", ".join(f"{v:.1f}" for v in d["load_average"])
    alg24 = f"Alg. 2.4 k_max = {d['alg24_k_max']}. " if any(r["method"] == "jpmap_alg24" for r in d["rows"]) else ""
    lines = [
        f"Machine: {m['processor']}, {m['cpu_count']} cores, device {m['device']}, torch {m['torch']} "
        f"({m['torch_threads']} threads), Python {m['python']}; load average at the end {load}. Prior `{d['prior']}` "
        f"(sha256 `{d['weights_sha256'][:12]}...`), data: {d['data_source']}. {alg24}"
        f"{d['loop_note']}. One step of the z-optimiser (CPU seconds): {steps}.",
        "",
        "| problem | method | z-optimizer | batched s: wall (CPU) | repeats | speed-up vs adam: wall (CPU) "
        "| decoder evals/image mean (max) | batched steps | loop s (scaled): wall (CPU) | speed-up vs loop: wall (CPU) "
        "| model ceiling | PSNR dB | PSNR - adam | objective vs adam: lower / higher (by 1e-3) | converged "
        "| max abs diff vs loop |",
        "| --- | --- | --- |" + " ---: |" * 13,
    ]
    for r in d["rows"]:
        vs_adam = "-"
        if "speedup_vs_adam" in r:
            vs_adam = f"{r['speedup_vs_adam']:.1f}x ({r['speedup_vs_adam_cpu']:.1f}x)"
        dpsnr = f"{r['psnr_diff_vs_adam']:+.2f}" if "psnr_diff_vs_adam" in r else "-"
        o = r.get("objective_vs_adam")
        vs_obj = "-" if o is None else f"{o['lower_by_1e-3']} / {o['higher_by_1e-3']}"
        ceil = f"{r['model_ceiling']:.1f}x" if "model_ceiling" in r else "-"
        lines.append(
            f"| {r['problem']} | {r['method']} | {r['z_optimizer']} | {r['seconds']:.1f} ({r['cpu_seconds']:.1f}) "
            f"| {r['repeats']} | {vs_adam} | {r['decoder_evals_per_image']:.0f} ({r['decoder_evals_max']:.0f}) "
            f"| {r['batched_steps']} | {r['loop_seconds_scaled']:.0f} ({r['loop_cpu_seconds_scaled']:.0f}) "
            f"| {r['speedup_vs_loop']:.1f}x ({r['speedup_vs_loop_cpu']:.1f}x) | {ceil} | {r['psnr_mean']:.2f} "
            f"| {dpsnr} | {vs_obj} | {r['converged_fraction']:.2f} | {r['max_abs_diff_vs_loop']:.1e} |"
        )
    return "\n".join(lines)


def faces_table(path: str) -> str:
    d = json.load(open(path))
    m, b = d["machine"], d["budget"]
    threads = m.get("torch_threads", m.get("threads"))  # results_faces_cpu.json calls it "threads"
    lines = [
        f"Machine: {m['processor'] or m['platform']}, {m['cpu_count']} cores, device {m['device']}, torch {m['torch']} "
        f"({threads} threads). Prior `{d['prior']}` (sha256 `{d['weights_sha256'][:12]}...`), data: "
        f"{d['data_source']}. Caps: n1 = {b['n1']}, n2 = {b['n2']}, n_max = {b['n_max']}, at most "
        f"{b['adam_max_iters']} Adam steps per z-step, CSGM at most {b['csgm_max_iters']} steps.",
        "",
        "| method | faces | batched s | s per face | loop s (scaled) | speed-up vs loop | peak RSS MB | PSNR dB "
        "| iterations (mean) | converged | max abs diff vs loop |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_optimizer = any("z_optimizer" in r for r in d["rows"])
    if by_optimizer:  # bench_faces.py --z-optimizer: which optimiser, its decoder evaluations, its gain over Adam
        load = ", ".join(f"{v:.1f}" for v in d.get("load_average", []))
        lines[0] += f" Load average at the end: {load}."
        lines[2] = lines[2].replace("| method |", "| method | z-optimizer |")
        lines[2] = lines[2].replace("| batched s | s per face |", "| batched s: wall (CPU) | s per face |")
        lines[2] = lines[2].replace(
            "| s per face |", "| s per face | speed-up vs adam: wall (CPU) | decoder evals/face mean (max) |"
        )
        lines[2] = lines[2].replace("| loop s (scaled) |", "| loop s (scaled): wall (CPU) |")
        lines[3] = "| --- | --- |" + lines[3][len("| --- |") :] + " ---: | ---: |"
    for r in d["rows"]:
        it = "-" if r.get("iterations_mean") is None else f"{r['iterations_mean']:.1f}"
        head = f"| {r['method']} | {r['n_images']} | {r['seconds']:.0f} | {r['seconds_per_image']:.2f} "
        loop = f"| {r['loop_seconds_scaled']:.0f} (on {r['loop_images']}) "
        if by_optimizer:
            vs = "-"
            if "speedup_vs_adam" in r:
                vs = f"{r['speedup_vs_adam']:.1f}x ({r['speedup_vs_adam_cpu']:.1f}x)"
            head = (
                f"| {r['method']} | {r['z_optimizer']} | {r['n_images']} | {r['seconds']:.0f} ({r['cpu_seconds']:.0f}) "
                f"| {r['seconds_per_image']:.2f} | {vs} | {r['decoder_evals_per_image']:.0f} "
                f"({r['decoder_evals_max']:.0f}) "
            )
            loop = f"| {r['loop_seconds_scaled']:.0f} ({r['loop_cpu_seconds_scaled']:.0f}, on {r['loop_images']}) "
        lines.append(
            head + loop + f"| {r['speedup_vs_loop']:.1f}x "
            f"| {r['peak_mem_mb']:.0f} | {r['psnr_mean']:.2f} | {it} | {r['converged_fraction']:.2f} "
            f"| {r['max_abs_diff_vs_loop']:.1e} |"
        )
    return "\n".join(lines)


def merge_table(path: str) -> str:
    d = json.load(open(path))
    m, b = d["machine"], d["budget"]
    steps = ", ".join(f"{v:.2f} ms on {k} rows" for k, v in d["step_ms"].items())
    lines = [
        f"Machine: {m['processor']}, {m['cpu_count']} cores, device {m['device']}, torch {m['torch']} "
        f"({m['torch_threads']} threads), one process. Prior `{d['prior']}` (sha256 `{d['weights_sha256'][:12]}...`), "
        f"data: {d['data_source']}; {d['n_images']} digits x 15 levels x 5 methods; caps n1 = {b['n1']}, "
        f"n2 = {b['n2']}, n_max = {b['n_max']}, {b['adam_max_iters']} Adam steps per z-step, "
        f"CSGM {b['csgm_max_iters']}, Alg. 2.4 k_max = {b['k_max']}. One Adam step of the prior: {steps}.",
        "",
        "| merge | solver calls | rows | largest call (rows) | batched Adam steps (all calls) | longest call (steps) "
        "| wall s | max abs diff vs first | mean PSNR dB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in d["rows"]:
        lines.append(
            f"| {r['merge']} | {r['calls']} | {r['rows']} | {r['largest_call_rows']} | {r['batched_steps_total']} "
            f"| {r['batched_steps_longest_call']} | {r['seconds']:.0f} | {r['max_abs_diff_vs_first_mode']:.1e} "
            f"| {r['psnr_mean']:.3f} |"
        )
    return "\n".join(lines)


def zstep_table(path: str) -> str:
    """The tables of ``lm_slow_images.py``: one z-step by each optimiser, and the spectra at the slowest images."""
    d = json.load(open(path))
    m, res = d["machine"], d["results"]
    load = ", ".join(f"{v:.1f}" for v in d["load_average"])
    lines = [
        f"Machine: {m['processor']}, {m['cpu_count']} cores, device {m['device']}, torch {m['torch']} "
        f"({m['torch_threads']} threads); load average at the end {load}. {d['n_images']} MNIST test digits with noise "
        f"sigma = {d['sigma']:g}, latent l = {d['latent_dim']}, one z-step from the encoder's code to "
        "||grad||/l < 1e-4.",
        "",
        "| optimiser | wall s | CPU s | decoder evals/image median (max) | batched steps | converged "
        "| energy vs adam: max (min) | images > adam + 1e-3 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in res.items():
        if name == "slow_images":
            continue
        vs = f"{r['energy_vs_adam_max']:+.1e} ({r['energy_vs_adam_min']:+.1e})" if "energy_vs_adam_max" in r else "-"
        above = str(r["images_above_adam_1e3"]) if "images_above_adam_1e3" in r else "-"
        lines.append(
            f"| {name} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['evals_median']:.0f} ({r['evals_max']:.0f}) "
            f"| {r['batched_steps']} | {r['converged_fraction']:.2f} | {vs} | {above} |"
        )
    lines += [
        "",
        "| image | decoder evals: Gauss-Newton LM, LM, Adam | min eig of the Hessian at mu_phi(x) (Gauss-Newton) "
        "| min eig at the minimiser (Gauss-Newton) | local Gauss-Newton rate |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in res["slow_images"]:
        lines.append(
            f"| {s['image']} | {s['evals_gauss_newton']}, {s['evals_lm']}, {s['evals_adam']} "
            f"| {s['hessian_min_eig_start']:+.2f} ({s['gauss_newton_min_eig_start']:+.2f}) "
            f"| {s['hessian_min_eig_end']:+.2f} ({s['gauss_newton_min_eig_end']:+.2f}) | {s['gauss_newton_rate']:.2f} |"
        )
    return "\n".join(lines)


def pnp_hvae_table(path: str) -> str:
    """The table of ``bench_pnp_hvae.py``: PnP-HVAE batched and in a loop, the Adam baseline, the prior's training."""
    d = json.load(open(path))
    m, pr, o, t = d["machine"], d["problem"], d["options"], d["training"]
    lines = [
        f"Machine: {m['processor']}, {m['cpu_count']} cores, device {m['device']}, torch {m['torch']} "
        f"({m['torch_threads']} threads). Prior `{d['prior']}` (sha256 {d['weights_sha256'][:8]}); {pr['n_images']} "
        f"BSD test crops of {pr['size']}x{pr['size']}, blur `{pr['kernel']}`, sigma {pr['sigma']:g}; tau {o['tau']:g}, "
        f"PnP-HVAE at most {o['max_iters']} iterations, Adam at most {o['adam_max_iters']}; "
        f"median of {o['repeats']} runs.",
        "",
        "| method | mode | seconds | iterations median (max) | image-iterations/s | PSNR (dB) | converged "
        "| speed-up vs loop | seconds vs PnP-HVAE |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in d["rows"]:
        name = r["method"] + (f" (lr {r['lr']:g})" if "lr" in r else "")
        its = f"{r['iterations_median']:.0f} ({r['iterations_max']})" if "iterations_median" in r else "-"
        psnr = f"{r['psnr_mean']:.2f}" if "psnr_mean" in r else "-"
        conv = f"{r['converged']}/{pr['n_images']}" if "converged" in r else "-"
        sp = f"{r['speedup_vs_loop']:.2f}x" if "speedup_vs_loop" in r else "-"
        vs = f"{r['seconds_vs_pnp_hvae']:.1f}x" if "seconds_vs_pnp_hvae" in r else "-"
        lines.append(
            f"| {name} | {r['mode']} | {r['seconds']:.2f} | {its} | {r['image_iterations_per_second']:.0f} | {psnr} "
            f"| {conv} | {sp} | {vs} |"
        )
    if t.get("patches_per_second"):
        lines += [
            "",
            f"Training of the prior: {t['patches_seen']:,} patches in {t['training_seconds']:.0f} s, "
            f"{t['patches_per_second']:.0f} patches/s on one thread ({t['machine']}).",
        ]
    return "\n".join(lines)


def render(path: str) -> str:
    """The table of any of the benchmarks' JSON files, chosen by what the file holds."""
    d = json.load(open(path))
    if d.get("benchmark") == "bench_pnp_hvae":
        return pnp_hvae_table(path)
    if d.get("benchmark") == "lm_zstep":
        return zstep_table(path)
    if d.get("benchmark") == "merge":
        return merge_table(path)
    return faces_table(path) if "prior" in d and "budget" in d else table(path)


if __name__ == "__main__":
    print(render(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results_cpu.json"))
