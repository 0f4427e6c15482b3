# `make demo` and `make test` work on a fresh machine with only Python 3.11: each creates
# .venv on first use and installs the pinned dependencies (torch CPU wheel first, since
# deepspeed's setup imports torch).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/da-cycle configs/da/l96_ensf.yaml output_dir=runs/demo_l96_ensf

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/ensf_bench.py
	$(BIN)/python bench/letkf_bench.py
	$(BIN)/python bench/da_compare.py

clean:
	rm -rf $(VENV) runs .pytest_cache
