# Two entry points for a fresh machine (see README Quickstart):
#   make demo   - set up .venv and run the end-to-end demo on embedded defaults
#   make test   - set up .venv and run the fast test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.alignkit-installed
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch first and pinned: an unpinned resolve pulls gigabytes of CUDA wheels.
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	# deepspeed ships as an sdist that must build against the torch above.
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed>=0.17"
	$(BIN)/pip install -q -e ".[dev,qlora]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m examples.sentiment.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_dpo.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
