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
.PHONY: config-keys help venv postgres server browser serve-model chat export-model gpu-check gpu-wheels bench-lengths align compare frontier serve workers champion faults mutants test test-fast test-durations bench bench-rerun bench-peft methods bench-dist bench-real lint ui clean

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

# A test that fails fails the suite: there is no rerun. A flaky test is a defect, fixed at its cause.
test: venv browser postgres ## the whole suite: layering contracts, unit, stage, config, end-to-end flows, browser
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

gpu-check: venv ## on a CUDA machine: every branch on the GPU (checked by hooks), then 0.5B-model timings: artifacts/bench/gpu_check.json
	$(PY) -m bench.gpu_check $(ARGS)

# For a GPU machine that has torch, transformers and peft but not trl/datasets: wheels to carry in .gpu/
# (git-ignored), with GPT-2's tokenizer; there: pip install --no-deps --target /tmp/site .gpu/whl/*.whl
gpu-wheels: ## download trl, datasets and their missing pure-Python deps (py3.12) into .gpu/whl, copy GPT-2's tokenizer
	mkdir -p .gpu/whl && cp -r ../shared/tokenizers/gpt2 .gpu/gpt2
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .gpu/whl trl==$$($(PY) -c "import trl; print(trl.__version__)") \
		datasets==$$($(PY) -c "import datasets; print(datasets.__version__)") dill multiprocess \
		torchao==$$($(PY) -c "import importlib.metadata as m; print(m.version('torchao'))") \
		optimum-quanto==$$($(PY) -c "import importlib.metadata as m; print(m.version('optimum-quanto'))")

bench-rerun: venv ## the embedded default cold, then rerun with nothing changed (no server; a server up): artifacts/bench/cached_rerun.json
	$(PY) -m bench.cached_rerun $(ARGS)

bench-lengths: venv ## rows each stage cuts and drops on the shared datasets, by tokenizer and context: artifacts/bench/length_defaults.{json,md}
	$(PY) -m bench.length_defaults

bench-peft: venv ## every fine-tuning method and optimizer on a ~110M Llama, SFT and RM steps: artifacts/bench/peft_methods.{json,md}
	$(PY) -m bench.peft_methods $(ARGS)

methods: venv ## the embedded-default RLHF pipeline under each method (dora, pissa, loraplus, freeze, houlsby, qlora, galore, badam): artifacts/bench/methods.json
	$(PY) -m bench.methods $(ARGS)

mutants: venv ## break the cache key, the KL penalty and the data worker's error line in scratch copies; the tests must catch each: artifacts/bench/mutants.json
	$(PY) -m bench.mutants

faults: venv ## SIGKILL the small pipeline at 20 seeded points, rerun, check: artifacts/bench/faults.json
	$(PY) -m bench.faults $(ARGS)

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
