# jpmap-companion: the two commands are `make reproduce` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROFILE ?= default
DEVICE  ?= cpu
ONLY    ?=
SET     ?=
PORT    ?= 8866

.PHONY: setup test lint bench explorer clean-venv

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
