# Two commands for a fresh machine:  make demo  (whole workflow on the embedded cohort)  and  make test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= $(shell nproc 2>/dev/null || echo 2)
# Extra arguments for snakemake, e.g. make demo SNAKEMAKE_ARGS="--resources gpu=1"
SNAKEMAKE_ARGS ?=

.PHONY: demo test lint format report clean venv

venv: $(VENV)/.installed

# torch is installed first and pinned, so that nothing later lets pip choose a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: venv
	$(BIN)/snakemake --cores $(CORES) --rerun-incomplete $(SNAKEMAKE_ARGS)
	$(BIN)/snakemake --cores 1 --report results/report.html
	@echo "Done: open results/report.html (figures in results/figures/, tables in results/tables/)."

test: venv
	$(BIN)/ruff check --no-cache .
	$(BIN)/python -m pytest -x --timeout 1200 tests

lint:
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --check .
	$(BIN)/snakemake --lint

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf results logs .snakemake
