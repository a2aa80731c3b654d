# The README's commands. `make run` and `make test` set everything up on a fresh clone (Python 3.10+ only).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned, so pip does not resolve a plain `torch` to a multi-GB CUDA build on CPU
# machines. On a GPU machine: make setup TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>".
TORCH_SPEC ?= torch==2.13.0
PYTEST_WORKERS ?= 2
ARGS ?=

# Extras `make setup` installs: tests, evaluation attacks, logger=tensorboard, ONNX export and onnxruntime.
EXTRAS ?= dev,attacks,tensorboard,onnx
# The versions the test suite passed with (pip freeze of a passing venv, torch excluded: TORCH_SPEC pins it).
# pyproject.toml keeps loose ranges for `pip install`; `make lock` refreshes this file.
CONSTRAINTS ?= constraints.txt
LOCK_VENV ?= .venv-lock

.PHONY: setup lint run test test-slow bench bench-smoke clean reproduce lock gpu-check

$(VENV)/.installed: pyproject.toml setup.py $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	# -qq: setuptools prints an information notice on every editable build; real errors still show.
	$(BIN)/python -m pip install -qq -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

## Train and evaluate the default experiment (error-silenced BWN on digits). Extra Hydra overrides: ARGS="..."
run: setup
	$(BIN)/esq-train $(ARGS)

## ruff (lint, format check; pyproject.toml [tool.ruff]) and the import contracts of docs/architecture.md
## (pyproject.toml [tool.importlinter]).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

## make lint, then the default test suite (slow tests excluded) on $(PYTEST_WORKERS) worker processes with 1 torch
## thread each.
test: setup lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q $(ARGS)

## Long tests (training to accuracy, full pipelines).
test-slow: setup
	$(BIN)/python -m pytest -m slow -q $(ARGS)

## The paper's pipeline on digits (15 min 17 s measured on 2 cores; docs/sweeps.md). ARGS="scale=cifar dry_run=true" etc.
reproduce: setup
	$(BIN)/esq-reproduce $(ARGS)

## Speed and memory benchmarks (docs/performance.md): full form, and the reduced form CI runs as a test.
bench: setup
	$(BIN)/python -m benchmarks.run $(ARGS)

bench-smoke: setup
	$(BIN)/python -m benchmarks.run --smoke $(ARGS)

## Refresh constraints.txt: a fresh venv with the newest versions the ranges allow, the test suite on it, and on
## success its pip freeze (minus torch, CUDA wheels and this package) becomes the lock file.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(LOCK_VENV)/bin/python -m pip install -qq -e ".[$(EXTRAS)]"
	$(LOCK_VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) -q
	echo "# pip constraints: the versions the test suite passed with (make lock; torch is pinned by TORCH_SPEC)" > $(CONSTRAINTS).tmp
	$(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|triton|nvidia-[a-z0-9-]*|esq-lightning)[=@ ]' >> $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

## The GPU check (benchmarks/gpu_check.sh): throughput, memory, bf16 agreement and a DDP step on this machine's GPU.
gpu-check: setup
	bash benchmarks/gpu_check.sh $(ARGS)

clean:
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache outputs multirun
