# alignflow: `make align` runs the whole recipe, `make test` runs the test suite.
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
CLI := .venv/bin/alignflow
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_DISABLE_TELEMETRY := 1

.DEFAULT_GOAL := help
.PHONY: config-keys help venv postgres server browser serve-model chat export-model gpu-check gpu-wheels gpu-rehearsal bench-lengths bench-async align compare frontier serve workers champion faults mutants test test-fast test-durations bench bench-rerun bench-serve bench-peft methods bench-dist bench-real lint ui clean docs

help: ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

.venv/.installed: pyproject.toml
	test -x $(PY) || python3.11 -m venv .venv || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0            # CPU wheel from local disk; never an unpinned torch
	$(PIP) install -q setuptools wheel
	$(PIP) install -q --no-build-isolation deepspeed==0.19.8   # builds against the torch above
	$(PIP) install -q -e '.[dev]'
	touch $@

venv: .venv/.installed ## create .venv and install pinned dependencies

postgres: ## Debian's PostgreSQL server binaries (initdb, pg_ctl), for `make server` and its test
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

server: venv postgres ## PostgreSQL + Prefect + MLflow servers on 127.0.0.1 (state in .server/); Ctrl-C stops all three
	$(CLI) server $(ARGS)

browser: ## Debian's headless Chromium, for the report's browser test (Playwright drives it)
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

align: venv ## run the whole InstructGPT recipe on the embedded default (ARGS="stage.ppo.beta=0.05")
	$(CLI) align $(ARGS)

frontier: venv ## reward-vs-KL frontier: sweeps of PPO and DPO beta (2 joblib jobs), artifacts/frontier/<time>/
	$(CLI) frontier $(ARGS)

serve: venv ## Prefect deployment of the align flow: cron from conf/schedule/, new-data trigger (alignflow notify)
	$(CLI) serve $(ARGS)

champion: venv ## the registry's champion policy and its lineage
	$(CLI) champion $(ARGS)

workers: venv ## Prefect process work pool + 2 local workers; then `PREFECT_API_URL=... alignflow workers sweep a=1,2`
	$(CLI) workers serve --workers 2 $(ARGS)

serve-model: venv ## the champion behind an OpenAI-compatible API on 127.0.0.1:8000 (ARGS="--source PATH --port N")
	$(CLI) serve-model $(ARGS)

chat: venv ## a terminal chat with the champion, streaming (ARGS="--source PATH"); /reset, /exit
	$(CLI) chat $(ARGS)

export-model: venv ## the champion as a plain Hugging Face folder with its model card (ARGS="--out exported/")
	$(CLI) export $(if $(ARGS),$(ARGS),--out exported)

compare: venv ## every branch and estimator (ppo, grpo, rloo, ..., dpo, kto, simpo, orpo, rlaif, best_of_n, rlvr) from one SFT: one table, artifacts/compare/compare.json
	$(CLI) compare $(ARGS)

# Both tiers run on pytest-xdist, one worker per core (tests/conftest.py pins each to its core).
config-keys: venv ## regenerate docs/config-keys.md (every numeric config key's valid range) from the rules
	$(PY) -c 'from flows.config import keys_doc; print(keys_doc(), end="")' > docs/config-keys.md

docs: venv ## the documentation site (mkdocs Material) into artifacts/site/, --strict: a broken link fails
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict

# A test that fails fails the suite: there is no rerun. A flaky test is a defect, fixed at its cause.
test: venv browser postgres docs ## the whole suite: layering contracts, the docs build, unit, stage, config, end-to-end flows, browser
	.venv/bin/lint-imports
	$(PY) -m pytest tests -n auto --dist worksteal --durations=20

test-fast: venv ## unit, stage and config tests, no end-to-end flow
	$(PY) -m pytest tests -m "not slow" -n auto --dist worksteal

test-durations: venv browser postgres ## the whole suite, recording each test's seconds in tests/durations.json (make test starts the longest first)
	ALIGNFLOW_RECORD_DURATIONS=$(CURDIR)/tests/durations.json $(PY) -m pytest tests -n auto --dist worksteal -q

.bench-venvs/trl112/.installed:
	python3 -m venv .bench-venvs/trl112
	.bench-venvs/trl112/bin/pip install -q torch==2.13.0
	.bench-venvs/trl112/bin/pip install -q trl==1.12.0   # benchmark-only: the last trl with PPOTrainer
	touch $@

bench: venv .bench-venvs/trl112/.installed ## benchmarks, side by side in one run; JSON under artifacts/bench/
	$(PY) -m bench.cached_rerun
	$(PY) -m bench.parallel_jobs
	$(PY) -m bench.rm_batching
	$(PY) -m bench.ppo_variants
	$(PY) -m bench.dpo_variants
	$(PY) -m bench.ppo_memory
	$(PY) -m bench.ppo_vs_trl
	$(PY) -m bench.real_data
	$(PY) -m bench.peft_methods
	$(PY) -m bench.length_defaults

GPU_PYTHON ?= python3
gpu-check: ## on a CUDA machine, without .venv: every stage and algorithm on the GPU in bf16 (checked by hooks), then 0.5B-model timings: artifacts/bench/gpu_check.json
	GPU_PYTHON=$(GPU_PYTHON) bash bench/gpu-check.sh $(ARGS)

# What travels to the GPU machine (git-ignored .gpu/, at most 64 MiB with the repository): the packages
# its image lacks (bench/gpu_image.py: CARRIED), installed for Python 3.12 and packed as one xz archive,
# and GPT-2's tokenizer. There: `bash bench/gpu-check.sh` (what `make gpu-check` runs).
GPU_WHEEL_FLAGS := --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64 --platform manylinux1_x86_64
gpu-wheels: .gpu/site.tar.xz ## pack the packages the GPU image lacks (py3.12) into .gpu/site.tar.xz; copy GPT-2's tokenizer
.gpu/site.tar.xz: bench/gpu_image.py pyproject.toml | .venv/.installed
	rm -rf .gpu/build && mkdir -p .gpu/build && rm -rf .gpu/gpt2 && cp -r ../shared/tokenizers/gpt2 .gpu/gpt2
	$(PIP) install -q --target .gpu/build/site-packages $(GPU_WHEEL_FLAGS) $$($(PY) -m bench.gpu_image carried)
	cd .gpu/build/site-packages && rm -rf bin __pycache__ */tests pyarrow/include pyarrow/src && find . -name __pycache__ -prune -exec rm -rf {} +
	tar -cJf .gpu/build/site.tar.xz -C .gpu/build site-packages && mv .gpu/build/site.tar.xz .gpu/site.tar.xz && rm -rf .gpu/build
	$(PY) -m bench.gpu_image size

# The GPU image rebuilt here (Python 3.12 from pyenv, the image's pins; torch 2.11's CUDA build runs on
# the CPU): a few GB downloaded once into GPU_IMAGE_CACHE, never in CI.
GPU_IMAGE_CACHE ?= $(HOME)/.cache/alignflow/gpu-image-wheels
PY312 ?= $(shell pyenv root 2>/dev/null)/versions/$(shell pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -1)/bin/python
.gpu/rehearsal/.installed: bench/gpu_image.py
	rm -rf .gpu/rehearsal && $(PY312) -m venv .gpu/rehearsal
	.gpu/rehearsal/bin/pip download -q -d $(GPU_IMAGE_CACHE) $$($(PY) -m bench.gpu_image image)
	.gpu/rehearsal/bin/pip install -q --no-index --find-links $(GPU_IMAGE_CACHE) $$($(PY) -m bench.gpu_image image)
	touch $@

gpu-rehearsal: .gpu/rehearsal/.installed gpu-wheels ## the GPU machine's software on this CPU: the GPU check's exact command, --device cpu; log in artifacts/bench/gpu_rehearsal.log
	mkdir -p artifacts/bench
	set -o pipefail; GPU_PYTHON=.gpu/rehearsal/bin/python bash bench/gpu-check.sh --device cpu --small \
		--out artifacts/bench/gpu_rehearsal.json $(ARGS) 2>&1 | tee artifacts/bench/gpu_rehearsal.log

bench-rerun: venv ## the embedded default cold, then rerun with nothing changed (no server; a server up): artifacts/bench/cached_rerun.json
	$(PY) -m bench.cached_rerun $(ARGS)

bench-async: venv ## PPO with asynchronous rollouts (k = 1, 2) against the synchronous loop: updates/s, gold gain: artifacts/bench/async_rollouts.json
	$(PY) -m bench.async_vs_sync $(ARGS)

bench-lengths: venv ## rows each stage cuts and drops on the shared datasets, by tokenizer and context: artifacts/bench/length_defaults.{json,md}
	$(PY) -m bench.length_defaults

bench-serve: venv ## serve-model under 1, 4, 16 and 64 concurrent clients against one generate per request in turn: artifacts/bench/serve_load.json
	$(PY) -m bench.serve_load $(ARGS)

bench-peft: venv ## every fine-tuning method and optimizer on a ~110M Llama, SFT and RM steps: artifacts/bench/peft_methods.{json,md}
	$(PY) -m bench.peft_methods $(ARGS)

methods: venv ## the embedded-default RLHF pipeline under each method (dora, pissa, loraplus, freeze, houlsby, qlora, galore, badam): artifacts/bench/methods.json
	$(PY) -m bench.methods $(ARGS)

mutants: venv ## break the cache key, the KL penalty and the data worker's error line in scratch copies; the tests must catch each: artifacts/bench/mutants.json
	$(PY) -m bench.mutants

faults: venv ## SIGKILL the small pipeline at 20 seeded points, rerun, check: artifacts/bench/faults.json
	$(PY) -m bench.fault_harness $(ARGS)

bench-dist: venv ## SFT, RM and PPO on 2 CPU processes (ddp, zero2, zero3) vs 1; ZeRO memory on a ~110M Llama: artifacts/bench/dist.json
	$(PY) -m bench.dist $(ARGS)

bench-real: venv ## the whole RLHF pipeline on the 2,312 HH-RLHF pairs, timed per stage: artifacts/bench/real_data.json
	$(PY) -m bench.real_data

lint: venv ## ruff and the layering contracts (import-linter)
	.venv/bin/ruff check stages flows tests bench
	.venv/bin/lint-imports

ui: venv ## serve the MLflow UI on 127.0.0.1:5000
	$(CLI) ui $(ARGS)

clean: ## remove artifacts and orchestration state (keeps .venv)
	rm -rf artifacts/*/ artifacts/mlflow.db artifacts/summary.json .prefect
