# georeg — two commands matter: `make up` and `make test`. Each installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
GEOREG := $(VENV)/bin/georeg
SYSTEM_PACKAGES := skopeo docker-registry
DATA_DIR ?= .georeg

.PHONY: help install system-deps up node test soak bench lint proto clean

help:
	@echo "make up       start georeg (installs first)"
	@echo "make test     run the test suite (installs first)"
	@echo "make soak     run the long soak tests"
	@echo "make bench    benchmark a node against the reference registry"
	@echo "make lint     ruff"
	@echo "make install  virtualenv in $(VENV), editable install, system packages"

install: $(VENV)/.installed system-deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,dev]'
	touch $@

# Real OCI clients and the reference registry come from Debian; install them when missing.
system-deps:
	@missing=""; \
	for pkg in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

up: install
	$(GEOREG) node --data-dir $(DATA_DIR)/node --listen 127.0.0.1:5000

test: install
	$(PY) -m pytest

soak: install
	$(PY) -m pytest -m soak

bench: install
	$(GEOREG) bench node

lint: install
	$(VENV)/bin/ruff check registry_node replicator cluster tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
