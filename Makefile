# `make demo` and `make test` work on a fresh machine with only Python 3.11: each creates
# .venv on first use and installs the pinned dependencies (torch CPU wheel first, since
# deepspeed's setup imports torch).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu

.PHONY: demo test test-fast lint bench venv clean data-tiny train-tiny

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/da-cycle configs/da/l96_ensf.yaml output_dir=runs/demo_l96_ensf

# the whole suite, after the linter (CI runs this through .ci/run)
test: lint
	$(BIN)/python -m pytest -q tests

# the edit-test loop: everything except the multi-process and slow tests (about a minute)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not multiprocess and not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/ensf_bench.py
	$(BIN)/python bench/letkf_bench.py
	$(BIN)/python bench/da_compare.py

# a 64x64 SQG truth run (30 days spin-up, 60 days of 3-hourly frames; about 5 minutes on 2 cores)
# converted into the train/val/test shards the tiny ViT config reads
TINY_DATA := data/sqg64_tiny
data-tiny: $(TINY_DATA)/meta.json

$(TINY_DATA)/meta.json: $(STAMP)
	$(BIN)/python tools/sqg_generate.py --preset 64 --spinup-days 30 --days 60 --out data/sqg64_tiny_run.nc
	$(BIN)/python tools/nc2npy_mpi.py --input data/sqg64_tiny_run.nc --out-dir $(TINY_DATA) \
		--start_train_day 30 --start_val_day 75 --start_test_day 82.5 --end_day 90 --num_shards 4

train-tiny: data-tiny
	bash launch/train_vit.sh tiny

clean:
	rm -rf $(VENV) runs .pytest_cache
