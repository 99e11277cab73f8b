# esacl_jax: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXP ?= split_digits
METHOD ?= esacl
BASELINE ?= derpp
WORKDIR ?= runs/$(EXP)_$(METHOD)
ARGS ?=
RUNS ?= runs

.PHONY: install run test lint docs dist bench bench-seeds bench-gpu bench-step bench-sdp ablation compare report report-runs clean

install: $(STAMP)

# Re-installs only when the package metadata changes, so repeated `make run` is instant.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[harness,test,cluster,docs]"
	touch $(STAMP)

# METHOD on EXP, then BASELINE (empty: none) with the same overrides, then both side by side.
# A workdir holding a finished run of another config is kept: the run writes to WORKDIR-2, ...
# (one line says so) and side_by_side --latest shows the directories the runs wrote.
run: install
	$(PY) -m experiments.main --config=experiments/configs/$(EXP).py:$(METHOD) --workdir=$(WORKDIR) $(ARGS)
ifneq ($(BASELINE),)
	mkdir -p $(RUNS)
	$(PY) -m experiments.main --config=experiments/configs/$(EXP).py:$(BASELINE) --workdir=$(RUNS)/$(EXP)_$(BASELINE) --config.progress=False $(ARGS) > $(RUNS)/$(EXP)_$(BASELINE).log
	$(PY) -m experiments.side_by_side --latest $(WORKDIR) $(RUNS)/$(EXP)_$(BASELINE)
endif

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The documentation site in build/docs/html (Sphinx, offline, warnings are errors), then every
# doctest of its pages and of the library's docstrings. -E reads every page afresh (an unchanged
# page would not repeat its warnings); the doctest builder reuses the pages the first one read.
docs: install
	$(PY) -m sphinx -E -W --keep-going -q -b html -d build/docs/doctrees docs build/docs/html
	$(PY) -m sphinx -W --keep-going -q -b doctest -d build/docs/doctrees docs build/docs/doctest

lint: install
	$(VENV)/bin/ruff check esacl_jax experiments tests

# The sdist and wheel an index would get, checked as it would check them (tests/test_packaging.py
# does the same in a temporary folder and installs the wheel in a fresh venv).
dist: install
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(VENV)/bin/twine check --strict dist/*

# The measurement scripts live in experiments/bench/ (its __init__ lists them all).
# Whole-run wall time and peak RSS per method.
bench: install
	$(PY) -m experiments.bench.runs $(ARGS)

# N seeds as one group (--config.seeds) against N separate cold and warm processes
# (docs/speed/seed_group.md; ARGS=--report_only rebuilds the table from its CSV).
bench-seeds: install
	$(PY) -m experiments.bench.seed_group $(ARGS)

# ResNet-18 and MLP throughput and peak device memory per method (for a GPU/TPU machine).
bench-gpu: install
	$(PY) -m experiments.bench.gpu $(ARGS)

# The library's EsaCL step against a DER++ step; sdp_transform against SGD and optax's SAM.
bench-step: install
	$(PY) -m experiments.bench.step $(ARGS)

bench-sdp: install
	$(PY) -m experiments.bench.sdp $(ARGS)

ablation: install
	$(PY) -m experiments.ablation $(ARGS)

compare: install
	$(PY) -m experiments.compare $(ARGS)

# Rebuilds, in place, every study under docs/ that has records: each folder holding report.json
# (the flags, and its records.jsonl relative to it), written by
# `python -m experiments.report --records=FILE --out=FOLDER [flags]`. Deterministic, byte for
# byte (tests/test_report_records.py checks the committed files against a rebuild).
report: install
	$(PY) -m experiments.report --rebuild=docs

# A report of a directory of runs (every results.json under RUNS) into RUNS/report.
report-runs: install
	$(PY) -m experiments.report --runs=$(RUNS) $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
