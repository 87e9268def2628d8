# georeg — two commands matter: `make up` and `make test`. Each installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
GEOREG := $(VENV)/bin/georeg
# python3-venv: Debian's python3 cannot make a virtualenv without it. buildah: the
# build agent of `georeg build` (daemonless, chroot isolation); busybox-static: the
# base image its tests push into georeg (nothing is pulled from the internet).
# docker-compose: `docker-compose config` checks `georeg deploy compose` output (no daemon needed).
# mmdebstrap: the image's Debian root filesystem, without a daemon (make image).
# iproute2: `ip`, the bridge, veths and addresses of the multi-host test's namespace hosts
# (docs/multihost.md; unshare, nsenter and setpriv are util-linux, always installed);
# iptables: the rules in each namespace host by which it talks to the control address only.
# chromium: the browser the dashboard's tests drive through Playwright (its own browser
# download is never used; pip never fetches a browser, and
# PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD below only guards a manual `playwright install`).
SYSTEM_PACKAGES := python3-venv skopeo docker-registry buildah busybox-static docker-compose mmdebstrap iproute2 iptables chromium
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1
DATA_DIR ?= .georeg

PROTO_SRC := proto/georeg/replication/v1/replication.proto
# The contract lives under proto/georeg/…; generated modules land in replicator/wire/v1
# (the virtual import path makes their imports `replicator.wire.v1…`).
PROTOC = $(PY) -m grpc_tools.protoc -Ireplicator/wire=proto/georeg/replication

.PHONY: help install system-deps up node image image-test test soak chaos bench bench-lag bench-scale bench-webhooks bench-tiers bench-import bench-cache lint proto proto-check clean

help:
	@echo "make up       start the default multi-region cluster (installs first)"
	@echo "make node     start one standalone node on port 5000"
	@echo "make test     run the test suite (installs first)"
	@echo "make image    georeg's OCI image as a layout in build/image (PUSH=host/repo:tag pushes it, PUSH_FLAGS=… for skopeo)"
	@echo "make image-test  make image, then push, pull and run it (tests/test_image.py, marker image)"
	@echo "make soak     run the long soak tests and the Hypothesis tests in the soak profile"
	@echo "make chaos    run the shipped chaos scenarios at full length, then random nemeses"
	@echo "make bench    benchmark a node against the reference registry"
	@echo "make bench-lag  replication lag per region pair against the WAN model's floor"
	@echo "make bench-scale  many small images: push rate, listings, idle cost (SCALE_ARGS=--quick)"
	@echo "make bench-webhooks  push → webhook delivery vs the WAN floor, 500 webhooks, a hanging receiver (WEBHOOKS_ARGS=--quick)"
	@echo "make bench-tiers  each tier's request and bandwidth limits driven past, and what throttling costs (TIERS_ARGS=--quick)"
	@echo "make bench-import georeg import vs skopeo copy of the same images from the reference registry (IMPORT_ARGS=--quick)"
	@echo "make bench-cache  pulls through the pull-through cache vs direct and local pulls (CACHE_ARGS=--quick)"
	@echo "make lint     ruff"
	@echo "make install  virtualenv in $(VENV), editable install, system packages"

# The virtualenv is rebuilt from scratch whenever pyproject.toml's content
# changes (not its timestamp): the stamp file is named after a hash of it, so
# a dependency removed from the project is gone from the venv too.
DEPS_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
INSTALLED := $(VENV)/.installed-$(DEPS_HASH)

install: system-deps $(INSTALLED)

$(INSTALLED): | system-deps
	rm -rf $(VENV)
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

# The default cluster (or the spec in CONFIG=file.toml); Ctrl-C stops it, data stays in DATA_DIR.
up: install
	$(GEOREG) up --data-dir $(DATA_DIR) $(if $(CONFIG),--config $(CONFIG))

# One standalone node on port 5000.
node: install
	$(GEOREG) node --data-dir $(DATA_DIR)/node --listen 127.0.0.1:5000

# georeg's OCI image, built without a daemon (docs/image.md); PUSH=host/repo:tag
# copies it there with skopeo (PUSH_FLAGS='--dest-tls-verify=false' for a plain-HTTP node).
image: install
	$(PY) -m cluster.image --out build/image $(if $(PUSH),--push '$(PUSH)') $(if $(PUSH_FLAGS),--push-flags='$(PUSH_FLAGS)')

# The image's own test, out of `make test` (a cold cache runs mmdebstrap): the
# cached stages are made by `make image` first, then the test builds again and runs it;
# then the multi-host test on hosts whose root file system is the image (docs/multihost.md).
image-test: image
	$(PY) -m pytest -m image tests/test_image.py tests/test_multihost.py

# The 40 slowest tests are listed at the end: the suite's budget is 15 minutes, and
# a CI log that names where they go is what keeps it there.
# Two workers, a test file each at a time (module-scoped clusters stay whole):
# most of the suite waits on real processes, sockets and replication, so the
# second core is idle in a serial run. TEST_WORKERS=0 runs it serially. Tests
# marked `serial` (timing windows another worker's load can break) run after,
# alone.
TEST_WORKERS ?= 2
test: install proto-check
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=40 \
	  -m 'not soak and not image and not serial'
	$(PY) -m pytest --durations=5 -m 'serial and not soak and not image'

# Regenerate the gRPC code from proto/ (never edit replicator/wire/v1/*_pb2*.py by hand).
proto: $(INSTALLED)
	$(PROTOC) --python_out=. --grpc_python_out=. --pyi_out=. $(PROTO_SRC)

# Fails when the committed generated code differs from a fresh generation.
proto-check: $(INSTALLED)
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	$(PROTOC) --python_out=$$tmp --grpc_python_out=$$tmp --pyi_out=$$tmp $(PROTO_SRC) && \
	for f in replication_pb2.py replication_pb2_grpc.py replication_pb2.pyi; do \
	  if ! cmp -s $$tmp/replicator/wire/v1/$$f replicator/wire/v1/$$f; then \
	    echo "replicator/wire/v1/$$f is stale or edited by hand: run 'make proto' and commit"; exit 1; fi; \
	done; echo "generated gRPC code matches proto/"

# The soak-marked tests, and every Hypothesis test in the soak profile (tests/profiles.py):
# a fresh seed (printed; GEOREG_HYPOTHESIS_SEED=N replays it), ten times the examples;
# the per-test ceiling is raised to match.
soak: install
	$(PY) -m pytest --hypothesis-profile=soak --timeout=7200 -m 'soak or hypothesis'

# The shipped chaos scenarios at full length (make test runs them scaled down),
# then two random-nemesis runs of 120 s with fresh seeds, each printed first
# (`georeg chaos random --seed N` replays one; a failing run is shrunk).
chaos: install
	GEOREG_CHAOS_SCALE=1 $(PY) -m pytest -s tests/test_chaos.py
	@for run in 1 2; do $(GEOREG) chaos random --duration 120 || exit 1; done

bench: install
	$(GEOREG) bench node

bench-lag: install
	$(GEOREG) bench lag

bench-scale: install
	$(GEOREG) bench scale $(SCALE_ARGS)

bench-webhooks: install
	$(GEOREG) bench webhooks $(WEBHOOKS_ARGS)

bench-tiers: install
	$(GEOREG) bench tiers $(TIERS_ARGS)

bench-import: install
	$(GEOREG) bench import $(IMPORT_ARGS)

bench-cache: install
	$(GEOREG) bench cache $(CACHE_ARGS)

lint: install
	$(VENV)/bin/ruff check registry_node replicator cluster tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
