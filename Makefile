# Newcomer entry points. `make test` is the README's (and CI's) test command.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WEB_STAMP := web/dist/.built

.PHONY: setup web test test-unit lint format bench summary triton-repo triton run demo docs clean

setup: $(STAMP) $(WEB_STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .  # the `reenact` command
	touch $(STAMP)

# The demo page's browser libraries (onnxruntime-web, mediapipe tasks-vision) at
# web/package-lock.json's pins, plus mediapipe's face detector model from the venv, copied into
# web/dist (gitignored, served at /vendor). Without npm the page works but its pose mode
# does not: setup warns and goes on.
FACE_MODEL = $(shell $(PY) -c "import importlib.util as u, pathlib as p; \
	print(p.Path(u.find_spec('mediapipe').origin).parent \
	/ 'modules/face_detection/face_detection_short_range.tflite')")

web: $(STAMP)  ## the demo page's vendor files -> web/dist (npm ci; no CDN at run time)
	npm ci --prefix web --ignore-scripts --no-audit --no-fund
	node web/build.mjs --face-model "$(FACE_MODEL)"
	touch $(WEB_STAMP)

$(WEB_STAMP): web/package.json web/package-lock.json web/build.mjs $(STAMP)
	@if command -v npm >/dev/null && command -v node >/dev/null; then \
		$(MAKE) --no-print-directory web; \
	else \
		echo "warning: npm/node not found: the demo page's pose mode needs 'make web'" >&2; \
	fi

test: setup  ## the full suite except GPU tests (what CI runs)
	$(PY) -m pytest -m "not gpu"

test-unit: setup  ## the quick loop
	$(PY) -m pytest -m unit -x -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy model media training evaluation benchmarks scripts deploy service workers cli

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: setup  ## model throughput per preset -> benchmarks/results/model_speed.json
	$(PY) -m benchmarks.model_speed --out benchmarks/results/model_speed.json

summary: setup  ## parameter counts and FLOPs of the official preset
	$(PY) -m model.summary --preset official-256

CHECKPOINT ?= checkpoints/demo-tiny-64.safetensors
TRITON_REPO ?= artifacts/triton-repository

triton-repo: setup  ## Triton model repository (python flavour) for CHECKPOINT
	$(PY) -m deploy.triton.export $(CHECKPOINT) $(TRITON_REPO) --avatar-dir artifacts/served-avatars

triton: triton-repo  ## the embedded tritonserver on 127.0.0.1:8000 (HTTP) / 8001 (gRPC)
	$(PY) -m deploy.triton.serve --repository $(TRITON_REPO)

run: setup  ## the whole service on 127.0.0.1:8000 (Redis, SQLite, Triton, a worker, the API)
	$(PY) -m deploy.local

demo:  ## the curl flow against `make run` (LPD_API_KEY: the key it printed) -> reenacted.mp4
	scripts/demo.sh

docs: setup  ## regenerate docs/configuration.md from service.config.Settings
	$(PY) -m scripts.settings_reference > docs/configuration.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache web/node_modules web/dist
