# jpmap-companion: the two commands are `make reproduce` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROFILE ?= default
DEVICE  ?= cpu
ONLY    ?=
SET     ?=
PORT    ?= 8866

.PHONY: setup test lint bench explorer clean-venv test-gpu paper-references gpu-session

# Idempotent: the venv is rebuilt only when pyproject.toml changes (stamp file).
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,mnist-sample]"
	$(PY) -m ipykernel install --sys-prefix --name jpmap-companion --display-name "Python (jpmap-companion)" >/dev/null
	touch $@

.PHONY: reproduce
# Every notebook with papermill into figures/$(PROFILE)/ (ONLY=03,04 for some of them; SET="WORKERS=4 MERGE=none"
# overrides parameters of the notebooks that have them, recorded in summary.json).
reproduce: setup
	$(PY) -m jpmap_core.reproduce --profile $(PROFILE) --device $(DEVICE) $(if $(ONLY),--only $(ONLY)) $(foreach s,$(SET),--set $(s))

test: setup
	$(PY) -m pytest -q

# The paper profile on a GPU as a regression test: runs the notebooks (ONLY=05,06,07 for some) with DEVICE=cuda
# into runs/test-gpu/ and checks each one's metrics against tests/reference/paper/NN_topic.json (derived from the
# committed figures/paper/ runs by `make paper-references`). Without a CUDA device it says so and exits 3.
test-gpu: setup
	$(PY) -m jpmap_core.reproduce --profile paper --device cuda --out runs/test-gpu --check-references tests/reference/paper \
		$(if $(ONLY),--only $(ONLY)) $(foreach s,$(SET),--set $(s))

# tests/reference/paper/*.json from the committed figures/paper/*/metrics.json (after a new paper-size run).
paper-references: setup
	$(PY) -c "from jpmap_core.reproduce import write_paper_references as w; print(*w('figures/paper', 'tests/reference/paper'), sep='\n')"

# One prepared GPU session (benchmarks/gpu_session.sh): solver and merge benchmarks on cuda, then test-gpu.
gpu-session: setup
	bash benchmarks/gpu_session.sh

lint: setup
	$(VENV)/bin/ruff check jpmap_core tests benchmarks
	$(VENV)/bin/ruff format --check jpmap_core tests benchmarks

# The explorer (notebooks/explorer.ipynb) as a web page: Voila on 127.0.0.1:$(PORT), Ctrl-C stops it.
explorer: setup
	@echo "[explorer] open http://127.0.0.1:$(PORT)/ in a browser (Ctrl-C stops the server)"
	JPMAP_DATA_DIR="$${JPMAP_DATA_DIR:-$(CURDIR)/data}" $(PY) -m voila notebooks/explorer.ipynb --no-browser \
		--port=$(PORT) --Voila.ip=127.0.0.1

bench: setup
	$(PY) benchmarks/bench_solvers.py --n-images 100 --device $(DEVICE) --json benchmarks/results_$(DEVICE).json

clean-venv:
	rm -rf $(VENV)
