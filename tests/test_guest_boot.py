"""A real guest on the view: boot Linux under QEMU (TCG) with its disk on a mounted view.

The guest is Debian's own kernel (``linux-image-amd64``) and a tiny
initramfs built here: busybox (from ``busybox-static``) and an /init that
loads the virtio-blk modules, prints the md5 of data the host put on the
disk, writes a known pattern twice (one write overwrites allocated clusters
and runs past them, one lands unaligned on unallocated ones), fsyncs and
powers off.  Afterwards the view is unmounted, ``qemu-img check`` must be
clean and ``qemu-img convert -O raw`` must show exactly what the guest
wrote.

Nothing is installed to boot the guest: the two .deb files are fetched with
``apt-get download`` and only the kernel, the virtio modules and busybox
are kept, in ``$QFUSE_TEST_CACHE`` or ``~/.cache/qfuse-tests/guest``, so a
rerun starts at once.  qemu-system-x86_64 comes from the Makefile's DEBS; if
it is missing (pytest run by hand), the test installs it with
scripts/ensure-debs.sh, and skips only when that cannot work.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from images import MiB, create, qemu_img, qemu_io, random_bytes
from mountutil import assert_bytes_equal, convert_raw, mount_view

pytestmark = pytest.mark.mount

REPO = Path(__file__).resolve().parent.parent
QEMU = "qemu-system-x86_64"
QEMU_DEB = "qemu-system-x86"
BOOT_TIMEOUT = 100.0  # TCG boots Debian's kernel in 5-15 s; a hang must not stall CI

SIZE = 64 * MiB
HOST_DATA = (1 * MiB, 1 * MiB)  # (guest offset, length) qemu-io fills with 0x5a
PATTERN = random_bytes(20240607, 1 * MiB)
# The guest writes PATTERN with dd, in 4 KiB blocks, at these block numbers:
OVERWRITE_BLOCK = 384  # 1.5 MiB: half on the host's data, half on new clusters
UNALIGNED_BLOCK = 2051  # 8 MiB + 12 KiB: partial clusters at both ends
# The modules that make /dev/vda, loaded after what they depend on.
WANTED_MODULES = ("virtio_pci", "virtio_blk")


# --------------------------------------------------------------------------
# The kit: kernel, modules, busybox (cached)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Kit:
    kernel: Path
    busybox: Path
    modules: list[Path]  # in load order


def cache_root() -> Path:
    override = os.environ.get("QFUSE_TEST_CACHE")
    base = Path(override) if override else Path.home() / ".cache" / "qfuse-tests"
    return base / "guest"


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """One pytest worker at a time prepares the kit or installs QEMU."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
        env={**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"},
        timeout=600, **kwargs,
    )  # fmt: skip


def ensure_qemu() -> str:
    found = shutil.which(QEMU)
    if found:
        return found
    with locked(cache_root()):
        if not shutil.which(QEMU):
            res = _run(["bash", str(REPO / "scripts" / "ensure-debs.sh"), QEMU_DEB])
            if res.returncode != 0 or not shutil.which(QEMU):
                pytest.skip(f"{QEMU} is missing and {QEMU_DEB} could not be installed: "
                            f"{(res.stderr or res.stdout).strip().splitlines()[-1:]}")  # fmt: skip
    return shutil.which(QEMU) or QEMU


def _apt(argv: list[str], cwd: Path | None = None) -> str:
    res = _run(argv, cwd=cwd)
    if res.returncode != 0 and os.geteuid() == 0:
        # No package lists yet (a fresh container): fetch them once, retry.
        _run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-q"])
        res = _run(argv, cwd=cwd)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")
    return res.stdout


def _download(package: str, where: Path) -> Path:
    _apt(["apt-get", "download", "-q", package], cwd=where)
    [deb] = where.glob(f"{package}_*.deb")
    return deb


def _members(deb: Path, wanted: re.Pattern[str]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files in `deb` whose path matches `wanted`."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile() and wanted.search(member.name):
                    f = tar.extractfile(member)
                    assert f is not None
                    yield member.name, f.read()
    finally:
        proc.stdout.close()
        proc.wait()


def _module_bytes(name: str, data: bytes) -> bytes:
    """A module as insmod needs it: Debian compresses them in newer releases."""
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def _depends(module: bytes) -> list[str]:
    """The ``depends=`` field of a module's .modinfo section."""
    found = re.search(rb"(?:^|\0)depends=([^\0]*)\0", module)
    return [d for d in found.group(1).decode().split(",") if d] if found else []


def _load_order(modules: dict[str, bytes]) -> list[str]:
    """WANTED_MODULES and what they need, dependencies first (built-ins skipped)."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order or name not in modules:
            return
        for dep in _depends(modules[name]):
            visit(dep.replace("-", "_"))
        order.append(name)

    for name in WANTED_MODULES:
        visit(name)
    return order


def prepare_kit() -> Kit:
    """The cached kit, made on first use: ~75 MB of downloads, ~10 MB kept."""
    root = cache_root()
    with locked(root):
        kit = _cached_kit(root)
        if kit is None:
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                _make_kit(root, Path(tmp))
            kit = _cached_kit(root)
            assert kit is not None
    return kit


def _cached_kit(root: Path) -> Kit | None:
    try:
        manifest = json.loads((root / "kit.json").read_text())
    except (OSError, ValueError):
        return None
    kit = Kit(
        root / manifest["kernel"],
        root / manifest["busybox"],
        [root / m for m in manifest["modules"]],
    )
    return kit if all(p.is_file() for p in (kit.kernel, kit.busybox, *kit.modules)) else None


def _make_kit(root: Path, tmp: Path) -> None:
    depends = _apt(["apt-cache", "depends", "linux-image-amd64"])
    image_packages = re.findall(r"Depends: (linux-image-\S+)", depends)
    assert image_packages, f"no kernel package behind linux-image-amd64:\n{depends}"
    kernel_deb = _download(image_packages[0], tmp)
    busybox_deb = _download("busybox-static", tmp)
    version = image_packages[0].removeprefix("linux-image-")
    kdir = root / version
    shutil.rmtree(kdir, ignore_errors=True)
    (kdir / "modules").mkdir(parents=True)
    modules: dict[str, bytes] = {}
    kernel = None
    pattern = re.compile(r"/boot/vmlinuz-|/kernel/drivers/(virtio|block)/[^/]+\.ko(\.xz|\.zst)?$")
    for name, data in _members(kernel_deb, pattern):
        if "/boot/vmlinuz-" in name:
            kernel = data
        else:
            base = os.path.basename(name).split(".ko")[0].replace("-", "_")
            modules[base] = _module_bytes(name, data)
    assert kernel is not None, f"no /boot/vmlinuz-* in {kernel_deb.name}"
    (kdir / "vmlinuz").write_bytes(kernel)
    order = _load_order(modules)
    for name in order:
        (kdir / "modules" / f"{name}.ko").write_bytes(modules[name])
    [(_, busybox)] = list(_members(busybox_deb, re.compile(r"^\.?/?(usr/)?bin/busybox$")))
    (root / "busybox").write_bytes(busybox)
    kit = {
        "kernel": f"{version}/vmlinuz",
        "busybox": "busybox",
        "modules": [f"{version}/modules/{name}.ko" for name in order],
        "from": [kernel_deb.name, busybox_deb.name],
    }
    tmp_manifest = root / "kit.json.tmp"
    tmp_manifest.write_text(json.dumps(kit, indent=2))
    os.replace(tmp_manifest, root / "kit.json")


# --------------------------------------------------------------------------
# The initramfs (cpio "newc", written here: no cpio binary needed)
# --------------------------------------------------------------------------


def _cpio_entry(
    ino: int, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
) -> bytes:
    encoded = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + encoded
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {modules}; do insmod /lib/modules/$m.ko || echo "QFUSE-FAIL insmod $m"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
if [ -b /dev/vda ]; then
    echo "QFUSE-SIZE $(cat /sys/block/vda/size)"
    sum=$(dd if=/dev/vda bs=65536 skip={read_skip} count={read_count} 2>/dev/null | md5sum)
    echo "QFUSE-READ $sum"
    dd if=/pattern of=/dev/vda bs=4096 seek={overwrite} conv=notrunc,fsync 2>/dev/null \\
        && dd if=/pattern of=/dev/vda bs=4096 seek={unaligned} conv=notrunc,fsync 2>/dev/null \\
        && sync && echo QFUSE-DONE
else
    echo "QFUSE-FAIL no /dev/vda"
fi
poweroff -f
"""


def build_initramfs(kit: Kit, out: Path) -> Path:
    init = INIT.format(
        modules=" ".join(m.stem for m in kit.modules),
        read_skip=HOST_DATA[0] // 65536,
        read_count=HOST_DATA[1] // 65536,
        overwrite=OVERWRITE_BLOCK,
        unaligned=UNALIGNED_BLOCK,
    )
    entries = [
        ("bin", stat.S_IFDIR | 0o755, b""),
        ("dev", stat.S_IFDIR | 0o755, b""),
        ("proc", stat.S_IFDIR | 0o755, b""),
        ("sys", stat.S_IFDIR | 0o755, b""),
        ("lib", stat.S_IFDIR | 0o755, b""),
        ("lib/modules", stat.S_IFDIR | 0o755, b""),
        ("init", stat.S_IFREG | 0o755, init.encode()),
        ("bin/busybox", stat.S_IFREG | 0o755, kit.busybox.read_bytes()),
        ("pattern", stat.S_IFREG | 0o644, PATTERN),
    ]
    entries += [
        (f"lib/modules/{m.name}", stat.S_IFREG | 0o644, m.read_bytes()) for m in kit.modules
    ]
    archive = b"".join(_cpio_entry(i + 1, *entry) for i, entry in enumerate(entries))
    # The console, so that /init has stdio before devtmpfs is mounted.
    archive += _cpio_entry(len(entries) + 1, "dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    archive += _cpio_entry(0, "TRAILER!!!", 0)
    out.write_bytes(gzip.compress(archive, compresslevel=1))
    return out


# --------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qemu() -> str:
    return ensure_qemu()


@pytest.fixture(scope="module")
def kit(qemu: str) -> Kit:
    return prepare_kit()


def boot(qemu: str, kit: Kit, initrd: Path, view: Path, cache: str) -> str:
    argv = [
        qemu, "-machine", "accel=tcg", "-m", "256", "-smp", "1",
        "-kernel", str(kit.kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 quiet",
        "-drive", f"file={view},format=raw,if=virtio,cache={cache}",
        "-nographic", "-no-reboot", "-net", "none",
    ]  # fmt: skip
    # On a timeout subprocess.run kills QEMU (our own child) before raising.
    res = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=BOOT_TIMEOUT)
    console = res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
    assert res.returncode == 0, f"{QEMU} exited {res.returncode}:\n{console[-3000:]}"
    return console


def expected_disk() -> bytes:
    disk = bytearray(SIZE)
    offset, length = HOST_DATA
    disk[offset : offset + length] = b"\x5a" * length
    for block in (OVERWRITE_BLOCK, UNALIGNED_BLOCK):
        disk[block * 4096 : block * 4096 + len(PATTERN)] = PATTERN
    return bytes(disk)


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_guest_writes_through_the_view(qemu: str, kit: Kit, tmp_path: Path, cache: str) -> None:
    """QEMU's cache=writeback (page cache) and cache=none (O_DIRECT on the view)."""
    image = create(tmp_path / "guest.qcow2", SIZE)
    qemu_io(image, f"write -P 0x5a {HOST_DATA[0]} {HOST_DATA[1]}")
    initrd = build_initramfs(kit, tmp_path / "initrd.gz")
    with mount_view(image, tmp_path / "guest.raw") as view:
        console = boot(qemu, kit, initrd, view, cache)
        stats = json.loads(os.getxattr(view, "user.qfuse.stats"))
        # The guest's last act was an fsync: nothing may wait for write-back,
        # and the image must already check clean while still mounted.
        assert stats["l2_cache"]["dirty"] == 0 and stats["refcount_cache"]["dirty"] == 0
        assert stats["pending_frees"] == 0
        qemu_img("check", "-U", image)
    assert "QFUSE-FAIL" not in console, console[-3000:]
    assert f"QFUSE-SIZE {SIZE // 512}" in console, console[-3000:]
    want = hashlib.md5(b"\x5a" * HOST_DATA[1]).hexdigest()
    assert f"QFUSE-READ {want}" in console, console[-3000:]
    assert "QFUSE-DONE" in console, console[-3000:]
    # The guest's writes and flushes went through this view.
    assert stats["bytes_written"] >= 2 * len(PATTERN)
    assert stats["requests"]["fsync"] >= 1 and stats["flushes"] >= 1
    assert stats["requests"]["errors"] == 0
    qemu_img("check", image)
    assert_bytes_equal(convert_raw(image), expected_disk(), what="image after the guest ran")
