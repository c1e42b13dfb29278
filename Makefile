# funnelrec — two commands on a fresh machine:
#   make demo   creates .venv, installs torch (CPU build by default) then funnelrec, runs `funnelrec demo`
#   make test   the test suite (what .ci/run calls)
#
# TORCH_SPEC / TORCH_INDEX choose the torch build, e.g. for CUDA 12.4:
#   make demo TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu124

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.funnelrec-installed
TORCH_INDEX_ARG := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
# Tests run on two processes when the machine has at least two cores.
WORKERS := $(shell $(PYTHON) -c "import os; print(min(2, os.cpu_count() or 1))")

.PHONY: demo test install bench-simulator clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX_ARG)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/funnelrec demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) $(PYTEST_ARGS)

bench-simulator: $(STAMP)
	$(BIN)/funnelrec bench simulator

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
