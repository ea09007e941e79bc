# alignfake: `make demo` runs the quickstart end to end on this CPU; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
EXTRAS ?= local,api,kubernetes,operator,dev

.PHONY: install demo test test-fast lint bench images clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -q "torch==2.13.0"
	$(PIP) -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/alignfake run manifests/examples/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check alignfake tests bench
	$(BIN)/hadolint --failure-threshold warning images/*/Dockerfile

bench: install
	$(BIN)/python bench/prefix.py --queries 50
	$(BIN)/python bench/store.py --size-mb 200

clean:
	rm -rf $(VENV) runs
