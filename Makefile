# qfuse — set-up, tests, demo and benchmark.
#
#   make demo    bootstrap, then mount a small image and walk through its raw view
#   make test    bootstrap, then run the test suite (pytest, 2 workers)
#   make bench   bootstrap (+ qemu-storage-daemon), then the read benchmark
#   make lint    ruff check
#   make clean   remove generated files (keeps .venv); `make distclean` removes it too
#
# Bootstrap, shared by all targets:
#   1. Debian packages: each is checked with dpkg-query; only when one is
#      missing does scripts/ensure-debs.sh run `apt-get update` once and
#      `apt-get install -y` the missing ones (root or sudo). pyfuse3 compiles
#      against libfuse3-dev through pkg-config, so this comes first.
#   2. .venv: created with `$(PYTHON) -m venv`, then `pip install -e '.[test]'`.
#      The stamp .venv/.qfuse-installed makes this happen again only when
#      pyproject.toml changes (or the venv is missing or broken).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.qfuse-installed

# Debian packages for the daemon, the tests and the demo.
DEBS := fuse3 libfuse3-dev pkg-config qemu-utils fio e2fsprogs
# Extra for the benchmark: qemu-storage-daemon (the C peer).
BENCH_DEBS := qemu-system-common

# pytest workers (pytest-xdist); PYTEST_ARGS for anything else, e.g. PYTEST_ARGS='-k info -x'
PYTEST_JOBS ?= 2
PYTEST_ARGS ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1
ifdef CI
export PIP_PROGRESS_BAR := off
endif

.PHONY: help bootstrap debs bench-debs fuse-dev demo test bench lint clean distclean

help:
	@echo 'make demo       mount a small qcow2 image as its raw view and use it (dd, losetup, mount)'
	@echo 'make test       run the test suite'
	@echo 'make bench      benchmark qfuse against qemu-storage-daemon and a pyfuse3 floor'
	@echo 'make lint       ruff check'
	@echo 'make clean      remove generated files (distclean: also .venv)'
	@echo 'All of them first install what is missing (Debian packages, .venv).'

# ---- bootstrap ---------------------------------------------------------------

debs:
	@bash scripts/ensure-debs.sh $(DEBS)

bench-debs:
	@bash scripts/ensure-debs.sh $(DEBS) $(BENCH_DEBS)

# /dev/fuse exists once the fuse module is loaded; most kernels have it built in.
fuse-dev:
	@if [ ! -e /dev/fuse ]; then \
	    echo '[bootstrap] /dev/fuse missing: trying modprobe fuse'; \
	    modprobe fuse || echo '[bootstrap] warning: no /dev/fuse; mounting will fail'; \
	fi

# Order-only on `debs`: the package check runs every time (it is cheap), but
# only a changed pyproject.toml makes pip run again.
$(STAMP): pyproject.toml | debs
	@if ! $(VENV_PY) -c 'import sys' >/dev/null 2>&1; then \
	    echo "[bootstrap] creating $(VENV) with $$(command -v $(PYTHON)) ($$($(PYTHON) --version 2>&1))"; \
	    rm -rf $(VENV); \
	    $(PYTHON) -m venv $(VENV) || { \
	        echo "[bootstrap] '$(PYTHON) -m venv' failed: a Python >= 3.11 with venv and ensurepip" \
	             "is needed (Debian's own python3: apt-get install python3-venv)"; exit 1; }; \
	fi
	@echo "[bootstrap] pip install -e '.[test]' into $(VENV)"
	$(VENV_PY) -m pip install -q -e '.[test]'
	@touch $@
	@echo "[bootstrap] ready: $(VENV)/bin/qfuse"

bootstrap: $(STAMP) fuse-dev

# ---- user-facing targets -----------------------------------------------------

demo: bootstrap
	bash scripts/demo.sh

# pytest exit 5 means "no tests collected": a failure here, never a silent pass.
test: bootstrap
	@xdist=(); \
	if [ "$(PYTEST_JOBS)" != 0 ] && $(VENV_PY) -c 'import xdist' >/dev/null 2>&1; then \
	    xdist=(-n "$(PYTEST_JOBS)"); \
	else \
	    echo '[test] pytest-xdist not used: running in one process'; \
	fi; \
	cmd=($(VENV_PY) -m pytest "$${xdist[@]}" -ra --durations=10 $(PYTEST_ARGS) tests/); \
	echo "[test] $${cmd[*]}"; \
	rc=0; "$${cmd[@]}" || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo '[test] FAILED: pytest collected no tests (exit 5)'; fi; \
	exit $$rc

bench: bench-debs bootstrap
	$(VENV_PY) bench/bench.py $(BENCH_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check qfuse tests bench
	@for f in scripts/*.sh .ci/run; do bash -n "$$f" || exit 1; done; echo '[lint] shell scripts parse'

clean:
	rm -rf bench/out build .pytest_cache .ruff_cache *.egg-info $(STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
