#!/usr/bin/env bash
# Install the Debian packages named on the command line that are not installed yet.
#
#   scripts/ensure-debs.sh fuse3 libfuse3-dev pkg-config ...
#
# A package counts as present only when dpkg reports "install ok installed"
# (a package removed but not purged is known to dpkg yet absent). When all are
# present this does nothing and needs no network. Otherwise it runs
# `apt-get update` once and installs exactly the missing ones, as root or
# through sudo. On a machine without apt-get it names what is missing and fails.
set -euo pipefail

log() { printf '[ensure-debs] %s\n' "$*" >&2; }

is_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

if [ "$#" -eq 0 ]; then
    log "usage: $0 PACKAGE..."
    exit 2
fi

if ! command -v dpkg-query >/dev/null 2>&1; then
    log "not a Debian system (no dpkg-query); make sure these are installed: $*"
    exit 0
fi

missing=()
for pkg in "$@"; do
    is_installed "$pkg" || missing+=("$pkg")
done

if [ "${#missing[@]}" -eq 0 ]; then
    log "all present: $*"
    exit 0
fi

log "missing: ${missing[*]}"

if ! command -v apt-get >/dev/null 2>&1; then
    log "apt-get not found: install these packages by hand: ${missing[*]}"
    exit 1
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        log "not root and no sudo: as root, run: apt-get install ${missing[*]}"
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
log "apt-get update"
"${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 update -q
log "apt-get install -y --no-install-recommends ${missing[*]}"
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}"

still=()
for pkg in "${missing[@]}"; do
    is_installed "$pkg" || still+=("$pkg")
done
if [ "${#still[@]}" -ne 0 ]; then
    log "still not installed after apt-get: ${still[*]}"
    exit 1
fi
log "installed: ${missing[*]}"
