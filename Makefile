# Two entry points for a fresh machine: `make dashboard` and `make test`.
# Each creates the virtual environment on first use.
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch; installed before the rest so nothing pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test dashboard demo lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,browser]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

dashboard: $(STAMP)
	$(VENV)/bin/kdcore dashboard

demo: $(STAMP)
	$(VENV)/bin/kdcore demo

lint: $(STAMP)
	$(VENV)/bin/ruff check kdcore dashboard tests benchmarks sample_data

bench: $(STAMP)  # the two with speed targets; the others are listed in benchmarks/README.md
	$(PY) benchmarks/bench_bias.py
	$(PY) benchmarks/bench_loss.py

clean:
	rm -rf $(VENV) .kdcore .pytest_cache .hypothesis
