# The two commands of the README:
#   make run    set up .venv, install vldd, run the workflow on config/config.yaml
#   make test   set up .venv, run the test suite
# CORES: CPU cores for snakemake. GPUS: GPU job slots (on a CPU-only machine these are
# just parallel job slots, so they default to CORES).

VENV  ?= .venv
PY    := $(VENV)/bin/python
CORES ?= 2
GPUS  ?= $(CORES)
SMK   := PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/snakemake

.PHONY: run test lint dryrun clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,slurm]"
	touch $@

run: $(VENV)/.installed
	$(SMK) --cores $(CORES) --resources gpu=$(GPUS)
	@cat results/tables/retrieval.md

test: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -ra tests

lint: $(VENV)/.installed
	$(SMK) --lint
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules

dryrun: $(VENV)/.installed
	$(SMK) -n --quiet rules

clean:
	rm -rf results/*/ results/tables .snakemake
