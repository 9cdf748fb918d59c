# Newcomer entry points. `make test` is the README's (and CI's) test command.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-unit lint format bench summary clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

test: setup  ## the full suite except GPU tests (what CI runs)
	$(PY) -m pytest -m "not gpu"

test-unit: setup  ## the quick loop
	$(PY) -m pytest -m unit -x -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy model media training benchmarks scripts

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: setup  ## model throughput per preset -> benchmarks/results/model_speed.json
	$(PY) -m benchmarks.model_speed --out benchmarks/results/model_speed.json

summary: setup  ## parameter counts and FLOPs of the official preset
	$(PY) -m model.summary --preset official-256

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
