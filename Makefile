# code2action: `make` (or `make help`) lists the targets.
#
# Variables given on the command line are handed to the Python scripts as
# arguments, e.g.
#     make data TASKS=PlaceOnTop EPISODES=10 env.image_size=64
# runs  .venv/bin/python scripts/generate_data.py TASKS=PlaceOnTop EPISODES=10 env.image_size=64
# (upper-case names are the scripts' shortcuts, lower-case dotted names are
# config overrides; the scripts reject unknown ones).  The Makefile's own
# variables below (PY, PYTHON, PYTEST_ARGS, TB_PORT, ...) are not passed on.

SHELL := /bin/bash
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PKGS := configs envs datamodules lightning_modules callbacks policies
PYTEST_ARGS ?=
TB_PORT ?= 6006

export XDG_RUNTIME_DIR ?= /tmp/xdg-runtime-$(shell id -u)
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED ?= 1

# Command-line variables, less the Makefile's own, for the Python scripts.
# GNU make keeps them in MAKEOVERRIDES in reverse order (and keeps only the
# last of repeated names), with spaces inside values escaped as "\ ":
# protect those, filter, and restore the command-line order.
MAKE_OWN_VARS := PY PYTHON VENV PYTEST_ARGS TB_PORT XDG_RUNTIME_DIR HF_HUB_OFFLINE PYTHONUNBUFFERED EXP OPTS
reverse = $(if $(1),$(call reverse,$(wordlist 2,$(words $(1)),$(1))) $(firstword $(1)))
ARGS = $(strip $(subst @@SP@@,\ ,$(call reverse,$(filter-out $(addsuffix =%,$(MAKE_OWN_VARS)),$(subst \ ,@@SP@@,$(MAKEOVERRIDES))))))

.PHONY: help install test test-all demo data check-data import-clevrskills export-llava train-vlm train-dp eval \
        relabel-dp experiment tensorboard bench clean distclean runtime-dir

help: ## list the targets (default)
	@echo "usage: make TARGET [NAME=value ...] [key.sub=value ...]"
	@echo
	@awk 'BEGIN { FS = ":.*## " } /^[a-zA-Z0-9_-]+:.*## / { printf "  %-19s %s\n", $$1, $$2 }' $(firstword $(MAKEFILE_LIST))
	@echo
	@echo "examples:"
	@echo "  make data TASKS=PlaceOnTop EPISODES=10 env.image_size=64"
	@echo "  make test PYTEST_ARGS='-k dataset -x'"

install: $(STAMP) ## create .venv, pip install -c constraints.txt -e .[dev], check the Vulkan driver

# Re-run when the dependencies change, or when a top-level package appears
# (setuptools' editable finder maps only the packages present at install time).
$(STAMP): setup.cfg pyproject.toml constraints.txt $(wildcard $(addsuffix /__init__.py,$(PKGS)))
	@test -x $(PY) || { echo "creating $(VENV) with $(PYTHON)"; \
	    $(PYTHON) -m venv $(VENV) || { echo "install: '$(PYTHON) -m venv' failed (Debian: apt-get install python3-venv)" >&2; exit 1; }; }
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	bash scripts/install_vulkan.sh
	@touch $@

runtime-dir:
	@mkdir -p -m 700 "$(XDG_RUNTIME_DIR)" && chmod 700 "$(XDG_RUNTIME_DIR)" 2>/dev/null || true

test: install runtime-dir ## run the tests, without the slow ones (PYTEST_ARGS=... for more pytest options)
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-all: install runtime-dir ## run all the tests, slow ones included
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install runtime-dir ## run scripts/demo.py (command-line variables are passed on)
	$(PY) scripts/demo.py $(ARGS)

data: install runtime-dir ## generate demonstrations: scripts/generate_data.py (TASKS= EPISODES= DATASET= SEED_START= WORKERS= OUT= [POLICY=vlm_oracle VLM=] key=value)
	$(PY) scripts/generate_data.py $(ARGS)

check-data: install runtime-dir ## verify a dataset's episode files: scripts/check_data.py (DATA= [TASKS=] [REPAIR=1] moves bad ones to quarantine/)
	$(PY) scripts/check_data.py $(ARGS)

import-clevrskills: install runtime-dir ## ClevrSkills trajectory folders to our schema: scripts/import_clevrskills.py (SRC= OUT= [LEVEL=fine|coarse] [WORKERS=])
	$(PY) scripts/import_clevrskills.py $(ARGS)

export-llava: install runtime-dir ## LLaVA conversation JSON + images of a dataset: scripts/export_llava.py (DATA= OUT= [LABELS=oracle|...])
	$(PY) scripts/export_llava.py $(ARGS)

train-vlm: install runtime-dir ## train the code VLM: scripts/train_vlm.py (DATASET= DATA= PRESET=cpu|paper RESUME= OUT= STEPS= key=value)
	$(PY) scripts/train_vlm.py $(ARGS)

train-dp: install runtime-dir ## train the diffusion policy: scripts/train_dp.py (DATASET= DATA= CONDITIONING= PRESET=cpu|paper RESUME= OUT= key=value)
	$(PY) scripts/train_dp.py $(ARGS)

eval: install runtime-dir ## evaluate a policy: scripts/evaluate.py (POLICY= DP= VLM= TASKS= EPISODES= WORKERS= ENVS_PER_WORKER= OUT= REGENERATE= N_ACTION_STEPS= PEAK_WINDOW= HOLD_TARGETS= key=value)
	$(PY) scripts/evaluate.py $(ARGS)

relabel-dp: install runtime-dir ## store VLM instructions as labels/vlm in the DP data: scripts/relabel_dp.py (DATASET= DATA= VLM= key=value)
	$(PY) scripts/relabel_dp.py $(ARGS)

EXPERIMENTS := table1 swap data_scaling ablate_chunking dataset_generation
experiment: install runtime-dir ## a paper experiment: experiments/<EXP>.py (EXP=table1|swap|data_scaling|ablate_chunking|dataset_generation OPTS='--dry-run --quick --preset paper name=value')
	@case " $(EXPERIMENTS) " in *" $(EXP) "*) ;; *) echo "error: EXP=$(EXP): one of $(EXPERIMENTS)" >&2; exit 2;; esac
	$(PY) experiments/$(EXP).py $(OPTS)

tensorboard: install ## TensorBoard on outputs/ (localhost, TB_PORT=6006)
	$(PY) -m tensorboard.main --logdir outputs --port $(TB_PORT)

bench: install runtime-dir ## run every benchmarks/*.py with --quick (fails on an error or a missing headline line)
	@set -o pipefail; shopt -s nullglob; files=(benchmarks/[!_]*.py); failed=(); \
	if [ $${#files[@]} -eq 0 ]; then echo "bench: no benchmarks/*.py"; exit 0; fi; \
	log=$$(mktemp); \
	for f in "$${files[@]}"; do \
	    echo "== $(PY) $$f --quick"; \
	    if ! $(PY) "$$f" --quick 2>&1 | tee "$$log"; then failed+=("$$f"); \
	    elif ! tail -n 1 "$$log" | grep -Eq '^[a-z0-9_]+=[-+0-9.eEinfa]+$$'; then \
	        echo "bench: $$f printed no headline name=value line" >&2; failed+=("$$f"); fi; \
	done; rm -f "$$log"; \
	if [ $${#failed[@]} -ne 0 ]; then echo "bench: failed: $${failed[*]}" >&2; exit 1; fi

clean: ## remove caches and build files (keeps data/, outputs/ and .venv)
	find . \( -path ./.venv -o -path ./.git -o -path ./data -o -path ./outputs \) -prune -o \
	    -type d \( -name __pycache__ -o -name .pytest_cache -o -name '*.egg-info' \) -print0 | xargs -0r rm -rf
	rm -rf build dist

distclean: clean ## clean, and remove .venv too
	rm -rf $(VENV)
