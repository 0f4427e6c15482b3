# `make demo` and `make test` work on a fresh machine with only Python 3.11: each creates
# .venv on first use and installs the pinned dependencies (torch CPU wheel first, since
# deepspeed's setup imports torch).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu

.PHONY: demo demo-l96 test test-fast lint bench bench-dapper venv clean data-tiny train-tiny

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The whole story on small embedded defaults (2 CPU cores, about 15 minutes), each step skipped
# when its output exists: SQG truth run -> shards (mpiexec, 2 ranks) -> tiny ViT trained by the
# deepspeed launcher (tp=2) -> one consolidated file -> its forecast skill -> EnSF+ViT, EnSF+SQG,
# LETKF+SQG and both free runs cycled on the test period -> figures and the RMSE table.
# The sizes are variables (tests/test_demo.py runs a toy version with them).
DEMO ?= runs/demo
DEMO_SPINUP_DAYS ?= 30
DEMO_DAYS ?= 160
DEMO_SPLIT ?= --start_train_day 30 --start_val_day 140 --start_test_day 150 --end_day 190
DEMO_TRAIN ?=
DEMO_SKILL_STARTS ?= 20
# the twin experiment on the test period (days 152-172 of the truth run, which training never saw)
DEMO_START_DAY ?= 152
DEMO_CYCLES ?= 40
DEMO_RUN := $(DEMO)/sqg64_run.nc
DEMO_SHARDS := $(DEMO)/shards
DEMO_VIT := $(DEMO)/vit
DEMO_DA_RUNS := sqg_vit_ensf sqg_ensf sqg_letkf sqg_free_vit sqg_free
DEMO_DA := cycles=$(DEMO_CYCLES) burn_in=0 restart_every=0 free_run=false overwrite=true truth.source=file \
	truth.path=$(DEMO_RUN) truth.start_day=$(DEMO_START_DAY)
MPIEXEC := $(BIN)/mpiexec --allow-run-as-root --oversubscribe -n 2
# one torch thread per process: the SQG model and the tiny ViT are faster so on 2 cores (issue #18)
$(DEMO)/%: export OMP_NUM_THREADS := 1

demo: $(DEMO)/figures/summary.md
	@echo; echo "== the demo ViT's forecast skill ($(DEMO)/skill)"; cat $(DEMO)/skill/surrogate_eval.md
	@echo; echo "== cycled data assimilation ($(DEMO)/figures: rmse_spread.png, maps, spectra)"
	@cat $(DEMO)/figures/summary.md

$(DEMO_RUN): | $(STAMP)
	$(BIN)/sqg-generate --preset 64 --correct-jacobian --spinup-days $(DEMO_SPINUP_DAYS) --days $(DEMO_DAYS) \
		--out $@

$(DEMO_SHARDS)/meta.json: $(DEMO_RUN)
	$(MPIEXEC) $(BIN)/python tools/nc2npy_mpi.py --input $< --out-dir $(DEMO_SHARDS) $(DEMO_SPLIT) --num_shards 4

$(DEMO_VIT)/checkpoints/latest: $(DEMO_SHARDS)/meta.json
	NUM_PROCS=2 bash launch/train_vit.sh configs/vit/sqg64_0.9m.yaml data.root=$(DEMO_SHARDS) \
		train.output_dir=$(DEMO_VIT) train.overwrite=true $(DEMO_TRAIN)

$(DEMO_VIT)/consolidated/megavit.json: $(DEMO_VIT)/checkpoints/latest
	$(BIN)/convert-checkpoint --input $(DEMO_VIT)/checkpoints --output $(DEMO_VIT)/consolidated

$(DEMO)/skill/surrogate_eval.md: $(DEMO_VIT)/consolidated/megavit.json
	$(BIN)/evaluate-surrogate --checkpoint $(DEMO_VIT)/consolidated --shards $(DEMO_SHARDS) \
		--starts $(DEMO_SKILL_STARTS) --steps 4 --seed 0 --output-dir $(DEMO)/skill

$(DEMO)/da/sqg_vit_ensf/summary.json $(DEMO)/da/sqg_free_vit/summary.json: \
	DEMO_MODEL := model.checkpoint=$(DEMO_VIT)/consolidated
$(DEMO)/da/%/summary.json: $(DEMO)/skill/surrogate_eval.md
	$(BIN)/da-cycle configs/da/$*.yaml $(DEMO_DA) $(DEMO_MODEL) output_dir=$(DEMO)/da/$*

$(DEMO)/figures/summary.md: $(foreach run,$(DEMO_DA_RUNS),$(DEMO)/da/$(run)/summary.json)
	$(BIN)/plot-results $(foreach run,$(DEMO_DA_RUNS),$(DEMO)/da/$(run)) --out $(DEMO)/figures \
		--labels "EnSF+ViT,EnSF+SQG,LETKF+SQG,free ViT,free SQG"

# the Lorenz-96 EnSF demo of before (a minute)
demo-l96: $(STAMP)
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

# bench/letkf_vs_dapper.py runs DAPPER 1.7.1 (not a project dependency) from its own venv
DAPPER_VENV := .venv-dapper
$(DAPPER_VENV)/.installed:
	test -x $(DAPPER_VENV)/bin/python || $(PYTHON) -m venv $(DAPPER_VENV)
	$(DAPPER_VENV)/bin/pip install --quiet dapper==1.7.1
	touch $@

bench-dapper: $(STAMP) $(DAPPER_VENV)/.installed
	$(BIN)/python bench/letkf_vs_dapper.py $(BENCH_ARGS)

# a 64x64 SQG truth run (30 days spin-up, 60 days of 3-hourly frames; about 15 s on 2 cores)
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
