# Every user entry point of the harness. `make help` lists them.
# Any target that needs Python first creates or refreshes .venv from the
# pinned requirements, so a fresh checkout needs no other step.

SHELL := /bin/bash
.DEFAULT_GOAL := all

VENV ?= .venv
KCONFIG_CONFIG ?= .config
export KCONFIG_CONFIG
export srctree := $(CURDIR)
WHEELS ?= gpu-wheels

# `make ... PYTHON=/path/python3` runs every target on that interpreter (a GPU node's own CUDA
# torch, say) instead of building .venv: lib/core/pyenv.py checks that the harness's packages import
# and installs missing pure-Python ones from $(WHEELS)/ (`make gpu-wheels`) into a temporary
# folder put on PYTHONPATH. Without it, PYTHON is only what builds .venv.
ifeq ($(origin PYTHON),command line)
EXTERNAL := 1
PY := $(PYTHON)
STAMP := python-ready
HARNESS_SITE := $(shell cd '$(CURDIR)' && '$(PYTHON)' -m lib.core.pyenv site --wheels '$(WHEELS)' 2>/dev/null)
ifneq ($(HARNESS_SITE),)
export PYTHONPATH := $(HARNESS_SITE)$(if $(PYTHONPATH),:$(PYTHONPATH))
endif
kconfig_tool = $(PY) -m $(1)
else
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
kconfig_tool = $(VENV)/bin/$(1)
endif

# Command-line overrides, applied for this invocation only (never written to .config).
OVERRIDES := $(foreach v,MAX_ITERS EPOCHS SEEDS RESULTS_DIR,$(if $($(v)),--set $(v)=$($(v)))) \
	$(if $(TIME),--set 'TIME_BUDGET=$(TIME)')
RECORDED := $(strip make $(MAKECMDGOALS) $(if $(filter-out .config,$(KCONFIG_CONFIG)),KCONFIG_CONFIG=$(KCONFIG_CONFIG)) \
	$(foreach v,MAX_ITERS EPOCHS SEEDS RESULTS_DIR,$(if $($(v)),$(v)=$($(v)))) $(if $(TIME),TIME="$(TIME)") \
	$(if $(ONLY),ONLY="$(ONLY)"))
CLI := HARNESS_COMMAND='$(RECORDED)' \
	$(PY) -m lib.cli --config $(KCONFIG_CONFIG) $(OVERRIDES) $(if $(GPUS),--gpus '$(GPUS)') \
	$(if $(EXECUTOR),--executor '$(EXECUTOR)') $(if $(ONLY),--only '$(ONLY)')
DEFCONFIG_OUT ?= defconfig
# ruff comes with .venv; a site's interpreter may lack it (lint is then skipped, saying so)
LINT = $(if $(EXTERNAL),if '$(PY)' -c 'import ruff' 2>/dev/null; then '$(PY)' -m ruff check .; \
	else echo "ruff is not installed for $(PY): lint skipped"; fi,$(VENV)/bin/ruff check .)
RESULTS_TREE := $(or $(RESULTS_DIR),results)

.PHONY: help all run dry-run hwinfo continue report graphs compare publish export import eval eval-deps surgery sweep status rerun prepare-data test bench lint quickstart venv \
	list-defconfigs menuconfig olddefconfig savedefconfig listnewconfig allyesconfig \
	allnoconfig randconfig set clean mrproper python-ready gpu-wheels gpu-check slurm-up slurm-down

help: ## List the make targets
	@echo "Pruning experiment harness. Typical use: make defconfig-lenet5-quick && make"
	@echo
	@grep -hE '^[a-zA-Z%_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | \
		awk -F'\t' '{printf "  %-22s %s\n", $$1, $$2}'
	@echo
	@echo "Overrides for this invocation: MAX_ITERS=N EPOCHS=N TIME=30m (or TIME="1h 30m") SEEDS=N RESULTS_DIR=dir YES=1"
	@echo "ONLY='glob,glob' (run names): make, make dry-run and make continue take only those cells of the matrix."
	@echo "What-if plans: make dry-run GPUS=\"1x NVIDIA A10G:24\" plans for made-up GPUs (COUNTx NAME:TOTAL_GIB[:FREE_GIB])."
	@echo "KCONFIG_CONFIG=path reads/writes another config file instead of .config."
	@echo "PYTHON=/path/python3 runs every target on that interpreter (a GPU node's CUDA torch) instead of .venv;"
	@echo "  missing pure-Python packages install from gpu-wheels/ (make gpu-wheels) into a temporary folder."

python-ready: ## (with PYTHON=) check that interpreter's packages; install missing ones from gpu-wheels/
	@command -v '$(PYTHON)' >/dev/null 2>&1 || { echo "error: PYTHON=$(PYTHON) is not an interpreter here; name a python3 (e.g. PYTHON=\$$(which python3)), or drop PYTHON= to use .venv" >&2; exit 2; }
	@'$(PYTHON)' -m lib.core.pyenv ensure --wheels '$(WHEELS)' --site '$(HARNESS_SITE)' $(if $(filter test gpu-check,$(MAKECMDGOALS)),--tests)

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	@echo "Setting up $(VENV) (torch pinned to 2.13.0; about a minute on a fresh machine)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q -r requirements.txt
	@$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	@touch $@

venv: $(STAMP) ## Create or refresh the virtual environment

# lm-evaluation-harness is an extra: it pulls in scipy, scikit-learn and nltk, which nothing else needs.
# `make eval` installs it into .venv once; the constraints keep torch and transformers at their pins.
$(VENV)/.eval-installed: requirements-eval.txt $(VENV)/.installed
	@echo "Installing lm-evaluation-harness into $(VENV) (requirements-eval.txt; once)"
	@$(PY) -m pip install -q -r requirements-eval.txt -c requirements.txt || { echo "error: could not install \
	lm-evaluation-harness from requirements-eval.txt (is the package index reachable?); run \`make eval-deps\` \
	where it is" >&2; exit 2; }
	@touch $@

EVAL_STAMP := $(if $(EXTERNAL),python-ready,$(VENV)/.eval-installed)

eval-deps: $(EVAL_STAMP) ## Install lm-evaluation-harness into .venv for `make eval` (requirements-eval.txt; make eval does it on first use)

all: run ## Train the matrix described by .config (same as `make run`)

run: $(STAMP) ## Train every run of .config's matrix into a new results folder
	@$(CLI) run

dry-run: $(STAMP) ## Print the matrix and each run's hardware plan; train nothing (GPUS="1x NAME:GIB[:FREE]": made-up GPUs)
	@$(CLI) dry-run

hwinfo: $(STAMP) ## Print the detected devices and each run's hardware plan with its rationale
	@$(CLI) hwinfo

continue: $(STAMP) ## Finish the newest unfinished results folder, or RESULTS=dir (each run from its newest checkpoint)
	@$(CLI) continue $(if $(RESULTS),--results $(RESULTS))

report: $(STAMP) ## Rewrite summary.json, graphs/ and report.md of RESULTS=dir (default: newest)
	@$(CLI) report $(if $(RESULTS),--results $(RESULTS))

graphs: $(STAMP) ## Redraw graphs/*.png of RESULTS=dir (default: newest results folder)
	@$(CLI) graphs $(if $(RESULTS),--results $(RESULTS))

compare: $(STAMP) ## Rank methods per sparsity in RESULTS=dir; AGAINST=dir2 sets two folders side by side
	@$(CLI) compare $(if $(RESULTS),--results $(RESULTS)) $(if $(AGAINST),--against $(AGAINST))

publish: $(STAMP) ## Copy RESULTS=dir (default: newest) into key_results/<date>_<NAME>/ (NAME=... required)
	@$(CLI) publish --name '$(NAME)' $(if $(RESULTS),--results $(RESULTS))

export: $(STAMP) ## Export RUN=<run dir>'s best checkpoint as a new version RUN/export/vN/ (safetensors + a JSON model card); FORMAT=hf adds a transformers folder (GPT-2); SPARSE=compressed stores kept values + a bit mask; QUANT=int8 int8 Linear weights (torchao)
	@$(CLI) export --run '$(RUN)' $(if $(FORMAT),--format '$(FORMAT)') $(if $(SPARSE),--sparse '$(SPARSE)') $(if $(QUANT),--quant '$(QUANT)')

eval: $(EVAL_STAMP) ## lm-evaluation-harness on RUN=<run dir>'s transformers export: TASKS=<task names or YAML files> [LIMIT=n] (RUN/eval/)
	@$(CLI) eval --run '$(RUN)' --tasks '$(TASKS)' $(if $(LIMIT),--limit '$(LIMIT)')

import: $(STAMP) ## Start GPT-2 runs from a transformers folder: make import HF=<dir> checks it against .config, then sets CONFIG_GPT2_INIT_HF
	@$(CLI) import --hf '$(HF)' && $(PY) scripts/kconfig_tool.py set "GPT2_INIT_HF='$(abspath $(HF))'"

status: $(STAMP) ## Each run's state in the newest results folder (or RESULTS=dir): queued, running, ok, failed, diverged, preempted
	@$(CLI) status $(if $(RESULTS),--results '$(RESULTS)')

sweep: $(STAMP) ## One-shot sweep of RUN=<run dir>'s best checkpoint (or every ok run of RESULTS=dir) [SPARSITIES=30,50,70,90] [METRICS=] [PATTERNS=unstructured,2:4,structured] [CALIBRATION=] [TOLERANCE=] [QUANT=int8] [LAYERS=y]
	@$(CLI) sweep $(if $(RUN),--run '$(RUN)') $(if $(RESULTS),--results '$(RESULTS)') \
		$(if $(SPARSITIES),--sparsities '$(SPARSITIES)') $(if $(METRICS),--metrics '$(METRICS)') \
		$(if $(PATTERNS),--patterns '$(PATTERNS)') $(if $(CALIBRATION),--calibration '$(CALIBRATION)') \
		$(if $(TOLERANCE),--tolerance '$(TOLERANCE)') $(if $(QUANT),--quant '$(QUANT)') \
		$(if $(LAYERS),--layers '$(LAYERS)')

rerun: $(STAMP) ## Train RUN=<run folder> again from its spec.json into a new results folder and say if it came out identical (STRICT=1: exit 1 if not)
	@$(CLI) rerun --run '$(RUN)' $(if $(filter 1 y yes,$(STRICT)),--strict)

surgery: $(STAMP) ## Cut RUN=<run dir>'s checkpoint smaller [FRACTION=0.3] [STRUCTURE=heads|neurons|channels|units|blocks]
	@$(CLI) surgery --run '$(RUN)' $(if $(FRACTION),--fraction '$(FRACTION)') $(if $(STRUCTURE),--structure '$(STRUCTURE)')

prepare-data: $(STAMP) ## Prepare the datasets .config needs (GPT-2 pydoc/text offline; downloads need the network)
	@$(CLI) prepare-data

list-defconfigs: $(STAMP) ## List the named experiments in defconfigs/
	@$(PY) scripts/kconfig_tool.py list

defconfig-%: $(STAMP) ## Write .config from defconfigs/<name>
	@$(PY) scripts/kconfig_tool.py defconfig $*

menuconfig: $(STAMP) ## Edit .config in a terminal menu
	@$(call kconfig_tool,menuconfig) Kconfig

olddefconfig: $(STAMP) ## Update .config to the current Kconfig, new symbols at defaults
	@$(call kconfig_tool,olddefconfig) Kconfig

savedefconfig: $(STAMP) ## Write the minimal form of .config to ./defconfig (DEFCONFIG_OUT=path)
	@$(call kconfig_tool,savedefconfig) --kconfig Kconfig --out $(DEFCONFIG_OUT)
	@echo "wrote $(DEFCONFIG_OUT) (copy it to defconfigs/<name> to make it a named experiment)"

listnewconfig: $(STAMP) ## List symbols that .config does not set yet
	@$(call kconfig_tool,listnewconfig) Kconfig

allyesconfig: $(STAMP) ## .config with every bool on (the largest matrix)
	@$(call kconfig_tool,allyesconfig) Kconfig

allnoconfig: $(STAMP) ## .config with every bool off
	@$(call kconfig_tool,allnoconfig) Kconfig

set: $(STAMP) ## Change .config settings from a script: make set CONFIG="MAX_ITERS=200 SEEDS=3" (each checked like a .config line)
	@$(PY) scripts/kconfig_tool.py set '$(CONFIG)'

randconfig: $(STAMP) ## Random .config; KCONFIG_SEED=N repeats one
	@$(PY) scripts/kconfig_tool.py randconfig

# The suite's caches (the native masked-step kernel, matplotlib's font list) stay inside the clone, in
# .cache/test/: `make test` writes nothing outside the clone and the temporary folders.
test: export XDG_CACHE_HOME := $(CURDIR)/.cache/test
test: export XDG_CONFIG_HOME := $(CURDIR)/.cache/test/config
test: export MPLCONFIGDIR := $(CURDIR)/.cache/test/matplotlib
# Test files are spread over TEST_WORKERS processes (pytest-xdist, whole files each, so a module's trained fixture
# is built once); TEST_WORKERS=1, or an interpreter without xdist, runs them one after another. The check that
# no test left a process behind runs last, on its own, over every process the passes started.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
TEST_SPREAD = $(shell [ '$(TEST_WORKERS)' -gt 1 ] 2>/dev/null && '$(PY)' -c 'import xdist' 2>/dev/null \
	&& echo '-n $(TEST_WORKERS) --dist loadfile')
LAST_TEST := tests/repo/test_zz_left_behind.py
test: export PRUNING_HARNESS_TEST_SESSION := make-test-$(shell date +%s%N)
test: $(STAMP) $(EVAL_STAMP) ## ruff, then the test suite (CPU only, no network, a few minutes; installs the lm-eval extra first; TEST_WORKERS=N)
	@$(LINT)
	@$(PY) -m pytest -q $(TEST_SPREAD) --ignore=$(LAST_TEST) tests
	@echo "again with AdamWPrune's fused masked step forced on (the pass above runs it as each test built it):"
	@$(PY) -m pytest -q $(TEST_SPREAD) --fused-step=on tests/optim/test_adamwprune.py tests/pruning/test_pruning.py \
		tests/train/test_trainer.py
	@echo "make gpu-check DRY=1 (every GPU check part's set-up, on the CPU):"
	@mkdir -p '$(RESULTS_TREE)'
	@$(PY) scripts/gpu_check.py --dry --results '$(RESULTS_TREE)' > '$(RESULTS_TREE)/gpu_check_dry.log' 2>&1 || \
		{ cat '$(RESULTS_TREE)/gpu_check_dry.log'; exit 1; }
	@grep -E '^\| [0-9] \|' '$(RESULTS_TREE)/gpu_check_dry.log'; tail -n 1 '$(RESULTS_TREE)/gpu_check_dry.log'
	@$(PY) -m pytest -q $(LAST_TEST)

bench: $(STAMP) ## Pruning, trainer, checkpoint, activation-checkpointing, surgery and 2:4 benchmarks (ratios side by side; JSON in results/)
	@$(PY) scripts/bench_pruning.py
	@$(PY) scripts/bench_trainer.py
	@$(PY) scripts/bench_checkpoint.py
	@$(PY) scripts/bench_activation_ckpt.py
	@$(PY) scripts/bench_surgery.py
	@$(PY) scripts/bench_nm.py

gpu-check: $(STAMP) ## Prove every GPU-only path on this machine's CUDA GPU in 8 min (results/gpu_check_<stamp>/); DRY=1: set-up only, on the CPU; PARTS=box,train,...
	@$(PY) scripts/gpu_check.py $(if $(filter-out 0 n no,$(DRY)),--dry) $(if $(PARTS),--parts '$(PARTS)') \
		$(if $(RESULTS_DIR),--results '$(RESULTS_DIR)')

slurm-up: ## Start a one-node Slurm cluster here (root; installs slurm-wlm and munge if missing) for EXECUTOR=slurm and its tests
	@scripts/local_slurm.sh start

slurm-down: ## Stop the Slurm daemons that make slurm-up started (others are left alone)
	@scripts/local_slurm.sh stop

gpu-wheels: $(if $(EXTERNAL),,$(STAMP)) ## Fetch into gpu-wheels/ the pure-Python wheels a GPU node's python lacks (needs the network; copy it along) [GPU_PYTHON=3.12]
	@$(PY) -m lib.core.pyenv download --wheels '$(WHEELS)' --python-version '$(or $(GPU_PYTHON),3.12)'

lint: $(STAMP) ## ruff over the project
	@$(LINT)

quickstart: $(STAMP) ## Set up and run the LeNet-5 quickstart on real MNIST digits (CPU)
	@$(PY) scripts/kconfig_tool.py defconfig lenet5-quick
	@$(CLI) run

clean: ## Remove caches (keeps .config, results/, data/ and .venv)
	@find '$(CURDIR)' \( -path '$(CURDIR)/.venv' -o -path '$(abspath $(VENV))' \) -prune -o \
		-name __pycache__ -type d -exec rm -rf {} +
	@rm -rf .pytest_cache .ruff_cache
	@echo "removed caches"

mrproper: ## Also remove .config, results/ and .venv (asks first unless YES=1)
	@if [ "$(YES)" != "1" ]; then \
		if [ ! -t 0 ]; then echo "error: mrproper deletes $(RESULTS_TREE)/; run it as \`make mrproper YES=1\`" >&2; exit 2; fi; \
		read -r -p "Delete $(KCONFIG_CONFIG), $(RESULTS_TREE)/ and $(VENV)? [y/N] " ans; \
		[ "$$ans" = y ] || [ "$$ans" = Y ] || { echo "nothing deleted"; exit 1; }; \
	fi
	@$(MAKE) --no-print-directory clean VENV=$(VENV)
	@rm -rf $(KCONFIG_CONFIG) $(KCONFIG_CONFIG).old $(RESULTS_TREE) $(VENV)
	@echo "removed $(KCONFIG_CONFIG), $(RESULTS_TREE)/ and $(VENV)"
