"""Print the markdown table of a ``bench_solvers.py``, ``bench_faces.py`` or ``bench_merge.py`` JSON file (what
``RESULTS.md`` shows).

python benchmarks/make_results.py benchmarks/results_cpu.json
python benchmarks/make_results.py benchmarks/results_faces_cpu.json
python benchmarks/make_results.py benchmarks/results_merge_cpu.json
"""

from __future__ import annotations

import json
import sys


def table(path: str) -> str:
    d = json.load(open(path))
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
    for r in d["rows"]:
        it = "-" if r.get("iterations_mean") is None else f"{r['iterations_mean']:.1f}"
        lines.append(
            f"| {r['method']} | {r['n_images']} | {r['seconds']:.0f} | {r['seconds_per_image']:.2f} "
            f"| {r['loop_seconds_scaled']:.0f} (on {r['loop_images']}) | {r['speedup_vs_loop']:.1f}x "
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


def render(path: str) -> str:
    """The table of any of the three benchmarks' JSON files, chosen by what the file holds."""
    d = json.load(open(path))
    if d.get("benchmark") == "merge":
        return merge_table(path)
    return faces_table(path) if "prior" in d and "budget" in d else table(path)


if __name__ == "__main__":
    print(render(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results_cpu.json"))
