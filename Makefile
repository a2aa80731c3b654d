# The README's commands. `make run` and `make test` set everything up on a fresh clone (Python 3.10+ only).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned, so pip does not resolve a plain `torch` to a multi-GB CUDA build on CPU
# machines. On a GPU machine: make setup TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>".
TORCH_SPEC ?= torch==2.13.0
PYTEST_WORKERS ?= 2
ARGS ?=

.PHONY: setup run test test-slow bench bench-smoke clean reproduce

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev,attacks]"
	touch $@

setup: $(VENV)/.installed

## Train and evaluate the default experiment (error-silenced BWN on digits). Extra Hydra overrides: ARGS="..."
run: setup
	$(BIN)/esq-train $(ARGS)

## The default test suite (slow tests excluded), on $(PYTEST_WORKERS) worker processes with 1 torch thread each.
test: setup
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q $(ARGS)

## Long tests (training to accuracy, full pipelines).
test-slow: setup
	$(BIN)/python -m pytest -m slow -q $(ARGS)

## The paper's pipeline on digits (about 19 minutes on 2 cores; docs/sweeps.md). ARGS="scale=cifar dry_run=true" etc.
reproduce: setup
	$(BIN)/esq-reproduce $(ARGS)

## Speed and memory benchmarks (docs/performance.md): full form, and the reduced form CI runs as a test.
bench: setup
	$(BIN)/python -m benchmarks.run $(ARGS)

bench-smoke: setup
	$(BIN)/python -m benchmarks.run --smoke $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache outputs multirun
