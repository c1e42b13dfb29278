# funnelrec — two commands on a fresh machine:
#   make demo   creates .venv, installs torch (CPU build by default) then funnelrec, runs `funnelrec demo`
#   make test   the test suite (what .ci/run calls); run as root on Debian/Ubuntu it first installs Debian's chromium
#               (apt-get, best effort, once: the stamp .venv/.chromium-checked) for the explorer page's browser test,
#               which is skipped, naming the missing browser, when that cannot be done. INSTALL_CHROMIUM=0 never tries.
#
# TORCH_SPEC / TORCH_INDEX choose the torch build, e.g. for CUDA 12.4:
#   make demo TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu124

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
CHROMIUM ?= /usr/bin/chromium
INSTALL_CHROMIUM ?= 1

BIN := $(VENV)/bin
STAMP := $(VENV)/.funnelrec-installed
CHROMIUM_STAMP := $(VENV)/.chromium-checked
APT_GET := DEBIAN_FRONTEND=noninteractive timeout 900 apt-get -qq -o Acquire::http::Timeout=20 -o Acquire::Retries=1
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

# Best effort and quiet: never fails the build (the browser test is skipped instead).
$(CHROMIUM_STAMP):
	@mkdir -p $(VENV)
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$(INSTALL_CHROMIUM)" = 1 ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the explorer page test (apt-get install chromium)"; \
	  { $(APT_GET) install -y --no-install-recommends chromium || \
	    { $(APT_GET) update && $(APT_GET) install -y --no-install-recommends chromium; }; } >/dev/null 2>&1 || true; \
	  [ -x "$(CHROMIUM)" ] || echo "could not install chromium: the explorer page test will be skipped"; \
	else \
	  echo "no $(CHROMIUM): the explorer page test will be skipped (apt-get install chromium, or make test as root)"; \
	fi
	@touch $@

demo: $(STAMP)
	$(BIN)/funnelrec demo

test: $(STAMP) $(CHROMIUM_STAMP)
	FUNNELREC_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest -q -n $(WORKERS) $(PYTEST_ARGS)

bench-simulator: $(STAMP)
	$(BIN)/funnelrec bench simulator

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
