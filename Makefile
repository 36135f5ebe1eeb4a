# Two set-up commands: `make run` serves the node, `make test` runs the whole suite.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/node.toml
TORCH_VERSION ?= 2.13.0
# System packages the tests start as real peers.
TEST_DEBS := dcmtk orthanc dicom3tools chromium chromium-driver postgresql
TEST_TOOLS := storescu echoscu storescp dsrdump dciodvfy Orthanc chromium chromedriver

.PHONY: run test install install-dev system-deps lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/vaenode db upgrade --config $(CONFIG)
	$(BIN)/vaenode serve --config $(CONFIG)

system-deps:
	@missing=0; for t in $(TEST_TOOLS); do command -v $$t >/dev/null 2>&1 || missing=1; done; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing=1; \
	if [ $$missing = 1 ]; then \
		SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(TEST_DEBS); \
	fi

lint: install-dev
	$(BIN)/ruff check node tests bench migrations
	$(BIN)/mypy node

test: system-deps install-dev lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) var test-output
