#!/usr/bin/env bash
# One prepared GPU session (`make gpu-session`), sized for about ten minutes of device time on one GPU:
#   1. the solver benchmark on cuda, Adam and LM latent steps   -> benchmarks/results_cuda.json        (<= 150 s)
#   2. the merge benchmark on cuda (10 images, 50 outer its)    -> benchmarks/results_merge_cuda.json  (<= 90 s)
#   3. `make test-gpu ONLY=06`: notebook 06 at the paper profile on cuda, checked against
#      tests/reference/paper/06_mnist_benchmark.json                                                   (<= 330 s)
# Each step has its own time limit (coreutils `timeout`), so a slow step cannot eat the others' time; a step that
# runs out is reported and the next one runs. The exit status is the number of steps that failed or ran out.
# Without a CUDA device it says so and exits 3 before running anything. After it: `python
# benchmarks/make_results.py` renders the JSON files into RESULTS.md, and runs/test-gpu/06_mnist_benchmark/ holds
# the executed notebook, its figures and metrics.json (copy them to figures/paper/ to publish them).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BENCH_S=${BENCH_S:-150}
MERGE_S=${MERGE_S:-90}
NOTEBOOK_S=${NOTEBOOK_S:-330}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-session: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')); nothing was run" >&2
    exit 3
fi
"$PY" -c 'import torch; print("gpu-session on", torch.cuda.get_device_name(0), "torch", torch.__version__)'

failed=0
step() {  # step <name> <seconds> <command...>
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@"
    local rc=$?
    echo "gpu-session: $name finished with status $rc after $((SECONDS - t0)) s (limit $limit s)"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

step "solver benchmark" "$BENCH_S" "$PY" benchmarks/bench_solvers.py --device cuda --n-images 100 --repeats 3 \
    --loop-images 5 --z-optimizer adam,lm --json benchmarks/results_cuda.json
step "merge benchmark" "$MERGE_S" "$PY" benchmarks/bench_merge.py --device cuda --n-images 10 --k-max 50 \
    --json benchmarks/results_merge_cuda.json
step "notebook 06, paper profile, checked" "$NOTEBOOK_S" "$PY" -m jpmap_core.reproduce --profile paper --device cuda \
    --only 06 --out runs/test-gpu --check-references tests/reference/paper --no-progress
exit "$failed"
