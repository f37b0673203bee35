# `make run`: set up .venv and run the default 4-rank CPU dry run (FSSDP, tiny preset).
# `make test`: same set-up, then the test suite. Both are idempotent and quick once set up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparsetrain-installed
EXTRAS ?= ray,triton,nvml,viz,data,dev
PYTEST_ARGS ?= -q -p no:cacheprovider

.PHONY: setup run test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q torch==2.13.0
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $(STAMP)

run: setup
	$(VENV)/bin/sparsetrain train --config configs/tiny.yaml

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check sparsetrain kernels launcher benchmarks tests

bench: setup
	$(PY) benchmarks/moe_strategies.py

clean:
	rm -rf $(VENV) runs .pytest_cache
