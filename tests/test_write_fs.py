"""A real filesystem on the writable view: loop device, mkfs.ext4, files.

The view is attached to a loop device, an ext4 filesystem is made and
mounted on it and files are written; after everything is unmounted and
detached, `qemu-img check` must be clean.  The image is then mounted again
(read-only), looped, `fsck.ext4 -fn` must find nothing, and the files must
read back with their checksums.  Every step is undone in ``finally`` (the
filesystem unmounted, the loop device detached, qfuse unmounted), in that
order, whatever failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from images import create, qemu_io, run
from mountutil import detach_loop, is_mounted, mount_view
from workload import MiB, assert_check_clean

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="e2fsprogs is not installed"),
]

IMAGE_SIZE = 128 * MiB


@contextlib.contextmanager
def loop_attached(path: Path, *, read_only: bool = False, direct_io: bool = False) -> Iterator[str]:
    """`losetup -f --show [-r] [--direct-io=on] PATH`; always detached afterwards."""
    argv = ["losetup", "-f", "--show"]
    if read_only:
        argv.append("-r")
    if direct_io:
        argv.append("--direct-io=on")
    res = run([*argv, os.fspath(path)])
    dev = res.stdout.strip()
    assert dev.startswith("/dev/loop"), res.stdout + res.stderr
    try:
        yield dev
    finally:
        detach_loop(dev)


def loop_uses_direct_io(dev: str) -> bool:
    return Path(f"/sys/block/{os.path.basename(dev)}/loop/dio").read_text().strip() == "1"


@contextlib.contextmanager
def fs_mounted(dev: str, target: Path, *options: str) -> Iterator[Path]:
    """`mount DEV TARGET`; always unmounted afterwards (lazily if busy)."""
    target.mkdir(exist_ok=True)
    argv = ["mount", "-t", "ext4"]
    if options:
        argv += ["-o", ",".join(options)]
    run([*argv, dev, os.fspath(target)])
    try:
        yield target
    finally:
        for _ in range(20):
            if not is_mounted(target):
                break
            if run(["umount", os.fspath(target)], check=False).returncode == 0:
                break
            time.sleep(0.1)
        if is_mounted(target):
            run(["umount", "-l", os.fspath(target)], check=False)


def write_files(root: Path, seed: int) -> dict[str, str]:
    """A few MiB in files of assorted sizes; returns name -> sha256."""
    rng = random.Random(seed)
    sums = {}
    sizes = [3 * MiB, 1 * MiB + 4097, 512 * 1024, 65536, 4096, 1, 0] + [
        rng.randrange(1, 300_000) for _ in range(20)
    ]
    (root / "dir").mkdir()
    for i, size in enumerate(sizes):
        name = f"dir/f{i:03d}" if i % 2 else f"f{i:03d}"
        data = rng.randbytes(size)
        (root / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    # An overwrite in the middle of an existing file, and a removal.
    with open(root / "f000", "r+b") as f:
        f.seek(1_000_001)
        patch = rng.randbytes(200_000)
        f.write(patch)
        f.seek(0)
        sums["f000"] = hashlib.sha256(f.read()).hexdigest()
    os.unlink(root / "dir/f001")
    del sums["dir/f001"]
    os.sync()
    return sums


def read_sums(root: Path, names: list[str]) -> dict[str, str]:
    return {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in names}


def make_image(tmp_path: Path) -> Path:
    image = create(tmp_path / "fs.qcow2", IMAGE_SIZE)
    # Old data where the filesystem will go: mkfs must overwrite what it needs.
    qemu_io(image, "write -P 0xee 0 2M", "write -P 0xef 64M 1M")
    return image


def build_and_verify(tmp_path: Path, mode: str, *, direct_io: bool) -> None:
    image = make_image(tmp_path)
    view = tmp_path / "view.raw"
    view.touch()
    fs = tmp_path / "fs"

    with mount_view(image, view, "--cache", mode):
        with loop_attached(view, direct_io=direct_io) as dev:
            if direct_io:
                assert loop_uses_direct_io(dev), f"{dev} did not enable direct I/O"
            run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                 dev])  # fmt: skip
            with fs_mounted(dev, fs) as root:
                sums = write_files(root, seed=len(mode))
    assert_check_clean(image)

    with mount_view(image, view, "--read-only"):
        with loop_attached(view, read_only=True) as dev:
            res = run(["fsck.ext4", "-fn", dev], check=False)
            assert res.returncode == 0, f"fsck.ext4 -fn exited {res.returncode}:\n{res.stdout}"
            with fs_mounted(dev, fs, "ro", "noload") as root:
                got = read_sums(root, sorted(sums))
                bad = sorted(name for name in sums if got[name] != sums[name])
                assert not bad, f"{len(bad)} of {len(sums)} files read back wrong: {bad}"
    assert_check_clean(image)


@pytest.mark.parametrize("mode", ["writeback", "writethrough"])
def test_ext4_on_loop(tmp_path: Path, mode: str) -> None:
    build_and_verify(tmp_path, mode, direct_io=False)


def test_ext4_on_direct_io_loop_cache_none(tmp_path: Path) -> None:
    build_and_verify(tmp_path, "none", direct_io=True)
