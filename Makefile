# The two commands of the README: `make train` (train on the embedded CITE-seq data) and `make test`.
# Each creates .venv and installs the pinned dependencies on first use.
PYTHON ?= python3
VENV := .venv
WORKDIR ?= runs/cite
TEST_WORKERS ?= 2  # pytest-xdist processes, one per core of a 2-core machine (tests/conftest.py: how tests are shared)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

.PHONY: install train test
install: $(VENV)/.installed

train: $(VENV)/.installed
	$(VENV)/bin/python -m clue_jax.train --config=configs/cite.py --workdir=$(WORKDIR)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope
