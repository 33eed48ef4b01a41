# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and install fluxtune into it first.
#
# torch is installed before the package and pinned: on a CPU-only machine `torch==2.13.0` is the CPU wheel
# (an unpinned torch would pull a multi-GB CUDA build). GPU machines: pick the CUDA build, e.g.
#   make demo TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"
# or install any torch into .venv yourself first: an importable torch is never replaced.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
SEARCH ?= searches/lora_rank.yaml
PYTEST_ARGS ?=
# two pytest-xdist workers: one runs a Ray sweep while the other tests (see tests/conftest.py for the grouping)
PYTEST_PARALLEL ?= -n 2 --dist loadgroup --no-loadscope-reorder
CHROMIUM ?= /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

BIN := $(VENV)/bin
STAMP := $(VENV)/.fluxtune-installed

.PHONY: demo test test-fast install ui clean-runs

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: $(STAMP)
	$(BIN)/fluxtune search $(SEARCH)

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# Everything but the end-to-end runs of the CLI (real sweeps with Ray and MLflow): a couple of minutes.
test-fast: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not e2e" $(PYTEST_ARGS)

# The MLflow UI browser test drives Debian's chromium through Playwright (no browser download): installed once.
$(CHROMIUM):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium

ui: $(STAMP)
	$(BIN)/fluxtune ui

clean-runs:
	rm -rf runs mlflow/mlflow.db mlflow/artifacts
