# The project's entry points. `make demo` and `make test` work on a fresh machine:
# each creates the virtualenv, builds the guest tools and the VM toolchain as needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export VIRTIO_EMU_CACHE ?= $(HOME)/.cache/virtio-emu

.PHONY: all setup guest-tools toolchain lint typecheck unit test test-fast demo bench fuzz clean \
	backend-reports

all: setup

# Two distributions, one pip command: the project requires vguest, and naming ./guest-tools
# here is what makes pip take it from this tree rather than look for it on an index.
$(VENV)/.installed: pyproject.toml setup.py emulator/hotpath/hotpath.c emulator/hotpath/hotpath.h guest-tools/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(MAKE) -s -C guest-tools
	$(PY) -m pip install -q -e ./guest-tools -e '.[dev]'
	touch $@

setup: $(VENV)/.installed guest-tools

guest-tools: $(VENV)/.installed
	$(MAKE) -s -C guest-tools

toolchain: setup
	$(PY) -m vm.toolchain

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

test-fast: setup
	$(VENV)/bin/pytest -m "not vm and not qemu and not toolchain"

test: lint typecheck toolchain
	$(VENV)/bin/pytest

demo: toolchain
	$(PY) -m vm.demo

bench: toolchain
	$(PY) -m bench

# docs/backends/*.md and *.json: virtio-emu check-backend on every back-end we have.
backend-reports: toolchain
	$(PY) -m vm.backend_reports

fuzz: setup
	$(VENV)/bin/pytest tests/fuzz --hypothesis-profile=campaign --timeout=4000

clean:
	rm -rf $(VENV) build *.egg-info emulator/_hotpath* guest-tools/build guest-tools/*.egg-info
	$(MAKE) -s -C guest-tools clean
