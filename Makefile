# qfuse — set-up, tests, demo and benchmark.
#
#   make demo    bootstrap, then mount a small image and walk through its raw view
#   make test    bootstrap, then run the test suite (pytest, 2 workers)
#   make bench   bootstrap (+ qemu-storage-daemon), then the read benchmark
#   make lint    ruff check
#   make install-helper / uninstall-helper   qfuse for mount(8), fstab and systemd (root)
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

# Debian packages for the daemon, the tests and the demo (qemu-system-x86: the
# guest that tests/test_guest_boot.py boots on a view; systemd: systemd-analyze
# and the fstab generator for tests/test_systemd.py, and the manager that
# tests/test_systemd_boot.py boots; systemd-container: systemd-nspawn, the
# container it boots in).
DEBS := fuse3 libfuse3-dev pkg-config qemu-utils fio e2fsprogs qemu-system-x86 systemd \
	systemd-container
# Extra for the benchmark: qemu-storage-daemon (the C peer).
BENCH_DEBS := qemu-system-common

# pytest workers (pytest-xdist); PYTEST_ARGS for anything else, e.g. PYTEST_ARGS='-k info -x'
PYTEST_JOBS ?= 2
PYTEST_ARGS ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1
ifdef CI
export PIP_PROGRESS_BAR := off
endif

.PHONY: help bootstrap debs bench-debs fuse-dev demo test bench lint clean distclean \
	install-helper uninstall-helper

help:
	@echo 'make demo       mount a small qcow2 image as its raw view and use it (dd, losetup, mount)'
	@echo 'make test       run the test suite'
	@echo 'make bench      benchmark qfuse against qemu-storage-daemon and a pyfuse3 floor'
	@echo 'make lint       ruff check'
	@echo 'make install-helper    link qfuse into $(HELPER_BINDIR) for mount -t fuse.qfuse, fstab, systemd'
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

# ---- mount helper ------------------------------------------------------------
#
# `mount -t fuse.qfuse` and fstab lines run /sbin/mount.fuse3, which runs
# `/bin/sh -c 'qfuse IMAGE MOUNTPOINT -o OPTS'`.  mount(8) removes PATH from the
# helper's environment, so that shell searches its built-in default,
# /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin: a venv's bin
# directory is never on it.  Hence a symlink to the venv's console script in
# /usr/local/bin (also the path systemd/qfuse@.service runs).  The umount
# helper makes `umount VIEW` wait until the daemon has closed the image; umount(8)
# looks for helpers in /sbin only.  See docs/operations.md.
HELPER_BINDIR ?= /usr/local/bin
UMOUNT_HELPER ?= /sbin/umount.fuse.qfuse

install-helper: bootstrap
	ln -sfn "$(abspath $(VENV))/bin/qfuse" "$(HELPER_BINDIR)/qfuse"
	install -m 0755 scripts/umount.fuse.qfuse "$(UMOUNT_HELPER)"
	@echo "[install-helper] $(HELPER_BINDIR)/qfuse -> $(abspath $(VENV))/bin/qfuse; $(UMOUNT_HELPER)"
	@found=$$(env -i /bin/sh -c 'command -v qfuse' || true); \
	if [ "$$found" != "$(HELPER_BINDIR)/qfuse" ]; then \
	    echo "[install-helper] warning: mount.fuse3 will run '$${found:-nothing}', not $(HELPER_BINDIR)/qfuse" \
	         "(not on /bin/sh's default PATH, or shadowed)"; fi

# Removes only what install-helper put there.
uninstall-helper:
	@if [ "$$(readlink "$(HELPER_BINDIR)/qfuse")" = "$(abspath $(VENV))/bin/qfuse" ]; then \
	    rm -f "$(HELPER_BINDIR)/qfuse" && echo "[uninstall-helper] removed $(HELPER_BINDIR)/qfuse"; fi
	@if cmp -s scripts/umount.fuse.qfuse "$(UMOUNT_HELPER)"; then \
	    rm -f "$(UMOUNT_HELPER)" && echo "[uninstall-helper] removed $(UMOUNT_HELPER)"; fi

lint: bootstrap
	$(VENV)/bin/ruff check qfuse tests bench
	@for f in scripts/*.sh .ci/run; do bash -n "$$f" || exit 1; done; echo '[lint] shell scripts parse'

clean:
	rm -rf bench/out build .pytest_cache .ruff_cache *.egg-info $(STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
