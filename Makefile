# lstm-serve: the commands the README and CI use.
#   make serve   install, then serve the shipped default checkpoint on 127.0.0.1:50051
#   make test    install (with dev tools), then every check and the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: install install-dev tools serve train proto lint check test bench bench-torchserve soak

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned (==2.13.0) in pyproject.toml: an open range may pull a multi-GB CUDA build.
install: $(BIN)/python
	$(BIN)/pip install -q -e clients/python -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q -e clients/python -e '.[dev]'

# promtool (Debian's prometheus package) for the metrics and deployment checks.
tools:
	scripts/install_tools.sh

serve: install
	$(BIN)/lstm-serve $(ARGS)

# Reproduce the default checkpoint (see docs/model.md for the exact run).
train: install
	$(BIN)/lstm-train --data data/tinyshakespeare.txt --out runs/default --max-steps 4250 --batch-size 32 \
	  --bptt 128 --dropout 0.3 --lr 2e-3 --min-lr 1e-4 --warmup-steps 150 --eval-interval 250 --threads 2 $(ARGS)

proto: install-dev
	PYTHON=$(BIN)/python scripts/gen_protos.sh

lint:
	$(BIN)/ruff check .
	$(BIN)/mypy model service bench

check:
	scripts/check_protos.sh
	scripts/validate_deploy.sh
	scripts/check_client_isolated.sh
	$(BIN)/ruff check .

test: install-dev tools
	$(MAKE) check
	$(BIN)/python -m pytest -q

# The benchmark sweep (served vs offline vs unbatched); writes docs/benchmarks.md. Quick: ARGS=--quick
bench: install
	$(BIN)/lstm-bench sweep $(ARGS)

# lstm-serve against TorchServe 0.12's sequence batching (on request; TorchServe needs Java 17).
# TorchServe gets an environment of its own, so the project's never holds it.
TORCHSERVE_VENV ?= $(HOME)/.cache/lstm-serve-bench/torchserve-venv
bench-torchserve: install-dev
	test -x $(TORCHSERVE_VENV)/bin/torchserve || { python3 -m venv $(TORCHSERVE_VENV) && \
	  $(TORCHSERVE_VENV)/bin/pip install -q torch==2.13.0 torchserve==0.12.0 torch-model-archiver==0.12.0 \
	  safetensors numpy pyyaml; }
	$(BIN)/lstm-bench torchserve --venv $(TORCHSERVE_VENV) $(ARGS)

# Long soak and other slow tests, on request only.
soak: install-dev
	$(BIN)/python -m pytest -q -m slow $(ARGS)
