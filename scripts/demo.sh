#!/usr/bin/env bash
# `make demo`: a qcow2 image seen as a plain raw file.
#
# Builds a small qcow2 image holding an ext4 filesystem (made without qfuse:
# mke2fs -d fills it from a directory, qemu-img converts it), mounts it
# read-only with qfuse, and uses the view like any raw disk file: ls/du, dd,
# a loop device, the filesystem inside. Then, through a writable view of a new
# empty image: mkfs, mount, write files, and read them back with qemu-img
# alone. Finally it takes everything down and checks the images. Everything
# lives in a temporary directory; on any failure or Ctrl-C the trap unmounts,
# detaches and removes it.
#
# Needs root (losetup, mount). Environment:
#   QFUSE=path            the qfuse command (default: .venv/bin/qfuse)
#   QFUSE_DEMO_WRITE=0    skip the write-path part (mkfs on a writable view)
#   QFUSE_DEMO_KEEP=1     keep the temporary directory (images) afterwards
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QFUSE=${QFUSE:-$REPO/.venv/bin/qfuse}
# Part 6 (mkfs on a writable view) runs unless QFUSE_DEMO_WRITE=0.
DEMO_WRITE=${QFUSE_DEMO_WRITE:-1}
SIZE=64M

if [ -t 1 ]; then BOLD=$'\e[1m' DIM=$'\e[2m' OFF=$'\e[0m'; else BOLD='' DIM='' OFF=''; fi
section() { printf '\n%s==== %s ====%s\n' "$BOLD" "$*" "$OFF"; }
say() { printf '%s# %s%s\n' "$DIM" "$*" "$OFF"; }
show() { printf '%s$ %s%s\n' "$BOLD" "$*" "$OFF"; }
run() { show "$*"; "$@"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    die "needs root (losetup and mount): run it as root, e.g. sudo make demo"
fi
[ -x "$QFUSE" ] || die "$QFUSE not found: run 'make demo' (it installs qfuse into .venv)"
for tool in qemu-img mkfs.ext4 losetup fusermount3 findmnt; do
    command -v "$tool" >/dev/null || die "$tool not found: run 'make demo' (it installs it)"
done

WORK=$(mktemp -d /tmp/qfuse-demo.XXXXXX)
VIEWS=()   # FUSE views we mounted
LOOPS=()   # loop devices we attached
MNTS=()    # filesystems we mounted

is_mounted() { awk -v p="$1" '$2 == p { found = 1 } END { exit !found }' /proc/self/mounts; }

unmount_view() {
    local view=$1 i
    "$QFUSE" umount "$view" 2>/dev/null && return 0
    for i in 1 2 3 4 5; do  # fusermount3 -u flakes with EBUSY: retry, then lazy
        is_mounted "$view" || return 0
        fusermount3 -u "$view" 2>/dev/null && return 0
        sleep 0.5
    done
    fusermount3 -uz "$view"
}

cleanup() {
    local rc=$? i
    set +e
    trap - EXIT INT TERM
    if [ "$rc" -ne 0 ]; then
        section "FAILED (exit $rc): cleaning up"
    fi
    for ((i = ${#MNTS[@]} - 1; i >= 0; i--)); do
        is_mounted "${MNTS[i]}" && { umount "${MNTS[i]}" || umount -l "${MNTS[i]}"; }
    done
    for ((i = ${#LOOPS[@]} - 1; i >= 0; i--)); do
        losetup "${LOOPS[i]}" >/dev/null 2>&1 && losetup -d "${LOOPS[i]}"
    done
    for ((i = ${#VIEWS[@]} - 1; i >= 0; i--)); do
        is_mounted "${VIEWS[i]}" && unmount_view "${VIEWS[i]}"
    done
    if grep -qF " $WORK/" /proc/self/mounts; then
        echo "demo: something under $WORK is still mounted; leaving the directory in place" >&2
    elif [ "${QFUSE_DEMO_KEEP:-0}" = 1 ]; then
        echo "demo: kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cd "$WORK"
IMG=$WORK/demo.qcow2
VIEW=$WORK/demo.raw
MNT=$WORK/mnt

# ---------------------------------------------------------------------------
section "1. A qcow2 image with an ext4 filesystem inside (built without qfuse)"
mkdir content
cat > content/README.txt <<EOF
Hello from inside a qcow2 image.

You are reading this through: ext4 <- loop device <- qfuse's raw view <- qcow2.
EOF
cp -r "$REPO/qfuse" content/qfuse-source
find content/qfuse-source -name __pycache__ -prune -exec rm -rf {} +
head -c 4M /dev/urandom > content/random.bin
(cd content && sha256sum README.txt random.bin > SHA256SUMS)
run truncate -s "$SIZE" fs.raw
run mkfs.ext4 -q -L qfuse-demo -d content fs.raw
run qemu-img convert -f raw -O qcow2 fs.raw "$IMG"
IMG_SUM=$(sha256sum "$IMG")
say "the same bytes as fs.raw, but only the used clusters are stored"
run "$QFUSE" info "$IMG"

# ---------------------------------------------------------------------------
section "2. Mount it: the mountpoint file becomes the image's raw view"
VIEWS+=("$VIEW")
run "$QFUSE" mount "$IMG" "$VIEW" --read-only
run findmnt --mountpoint "$VIEW"

# ---------------------------------------------------------------------------
section "3. ls shows the virtual size, du the space really used"
run ls -l "$IMG" "$VIEW"
run du -h "$IMG" "$VIEW"

# ---------------------------------------------------------------------------
section "4. Read it like a raw disk file"
say "the ext4 magic number (0xef53) at byte 1080:"
show "dd if=$VIEW bs=1 skip=1080 count=2 status=none | od -An -tx1"
dd if="$VIEW" bs=1 skip=1080 count=2 status=none | od -An -tx1
run dd if="$VIEW" of=/dev/null bs=1M
say "byte for byte the raw image it was converted from:"
run cmp "$VIEW" fs.raw
echo "identical"

# ---------------------------------------------------------------------------
section "5. Attach the view to a loop device and mount the filesystem inside"
show "losetup -r -f --show $VIEW"
LOOP=$(losetup -r -f --show "$VIEW")
LOOPS+=("$LOOP")
echo "$LOOP"
mkdir "$MNT"
MNTS+=("$MNT")
run mount -t ext4 -o ro "$LOOP" "$MNT"
run ls -l "$MNT"
run cat "$MNT/README.txt"
run df -h "$MNT"
say "checksums of the files, read back through all the layers:"
(cd "$MNT" && run sha256sum -c SHA256SUMS)

# ---------------------------------------------------------------------------
section "6. A writable view of a new, empty image: mkfs, mount, write files"
if [ "$DEMO_WRITE" = 1 ]; then
    RW_IMG=$WORK/rw.qcow2
    RW_VIEW=$WORK/rw.raw
    RW_MNT=$WORK/rw-mnt
    run qemu-img create -q -f qcow2 "$RW_IMG" "$SIZE"
    VIEWS+=("$RW_VIEW")
    run "$QFUSE" mount "$RW_IMG" "$RW_VIEW"
    show "losetup -f --show $RW_VIEW"
    RW_LOOP=$(losetup -f --show "$RW_VIEW")
    LOOPS+=("$RW_LOOP")
    echo "$RW_LOOP"
    run mkfs.ext4 -q -L qfuse-rw "$RW_LOOP"
    mkdir "$RW_MNT"
    MNTS+=("$RW_MNT")
    run mount -t ext4 "$RW_LOOP" "$RW_MNT"
    run cp content/random.bin "$RW_MNT/"
    printf 'written through qfuse\n' > "$RW_MNT/hello.txt"
    run ls -l "$RW_MNT"
    run umount "$RW_MNT"
    run losetup -d "$RW_LOOP"
    run "$QFUSE" umount "$RW_VIEW"
    run du -h "$RW_IMG"
    run qemu-img check "$RW_IMG"
    say "read back with qemu-img alone, without qfuse:"
    run qemu-img convert -O raw "$RW_IMG" rw-check.raw
    run debugfs -R 'cat /hello.txt' rw-check.raw
    debugfs -R 'dump /random.bin random.check' rw-check.raw 2>/dev/null
    run cmp content/random.bin random.check
    echo "identical"
else
    say "skipped (QFUSE_DEMO_WRITE=0)"
fi

# ---------------------------------------------------------------------------
section "7. Take it all down and check the image"
run umount "$MNT"
run losetup -d "$LOOP"
run "$QFUSE" umount "$VIEW"
is_mounted "$VIEW" && die "$VIEW is still mounted after qfuse umount"
run qemu-img check "$IMG"
say "the read-only mount left the image file byte for byte as it was:"
run sha256sum --quiet -c <<<"$IMG_SUM"
echo "unchanged"
run ls -l "$VIEW"
say "the mountpoint is an ordinary empty file again"

section "Done"
echo "qfuse demo finished: all unmounted, loop devices detached, image clean."
