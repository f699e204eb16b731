# The two entry points of the README. Both build the virtualenv from the project's own files first, so a
# fresh clone needs nothing but python3 (>=3.11) and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): requirements/cpu.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements/cpu.txt
	touch $@

# Shard the bundled chr20 slice, pretrain a tiny model on CPU, log to a local MLflow store, export to HF format.
demo: $(STAMP)
	$(BIN)/crossdna demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) demo_out .pytest_cache
