"""The write path against a reference: the same seeded workload through the
mounted view and into a raw copy made by `qemu-img convert -O raw`.

Every image is made here by qemu-img/qemu-io, with data already on it (plain,
random, zero clusters, compressed clusters, backing data, snapshots).  After
`qfuse umount`, `qemu-img check` must exit 0 (no corruption and no leaked
cluster) and `qemu-img compare` must find the image identical to the
reference; whatever the image shares (backing files, snapshots) must be
unchanged.  Every image kind runs under each of the five cache modes.

fio (several jobs, crc32c verification, then overlapping random read/write)
runs at the end of this file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from images import (
    QCOW_OFLAG_COMPRESSED,
    create,
    info,
    l2_entries,
    qemu_img,
    qemu_io,
    read_header,
    sha256,
)
from mountutil import assert_bytes_equal, mount_view, read_view
from workload import (
    KiB,
    MiB,
    apply_to_path,
    assert_check_clean,
    assert_identical,
    make_reference,
    make_workload,
    snapshot_raw,
)

pytestmark = pytest.mark.mount

SIZE = 64 * MiB
BASE_SIZE = 24 * MiB + 1536  # the raw file at the bottom of the chain
REGION = (0, 32 * MiB)  # where the workload writes
VOLUME = 3 * MiB

# Data the images hold before qfuse sees them: (qemu-io command, ...) over
# the workload's region, so the workload overwrites, extends and
# copies-on-write around it.
PREFILL = (
    "write -P 0x5a 0 1M",
    "write -s {random} 2M 1M",
    "write -z 4M 1M",
    "write -P 0xa5 6291968 70000",  # unaligned, over a cluster edge
    "write -s {random} 20M 512k",
    "write -P 0x77 31M 1M",
)


@dataclass
class Case:
    """An image to write to, and what must hold afterwards besides
    check + compare."""

    image: Path
    cluster_size: int = 64 * KiB
    subcluster_size: int | None = None
    region: tuple[int, int] = REGION
    volume: int = VOLUME
    # Called before mounting; returns a function called after the umount.
    invariants: list[Callable[[], Callable[[], None]]] = field(default_factory=list)


def _random_file(directory: Path, size: int = 1 * MiB) -> Path:
    path = directory / "random.bin"
    if not path.exists():
        path.write_bytes(os.urandom(size))
    return path


def prefill(image: Path, fmt: str = "qcow2", commands: tuple[str, ...] = PREFILL) -> None:
    rnd = _random_file(image.parent)
    qemu_io(image, *(c.format(random=rnd) for c in commands), fmt=fmt)


def unchanged_files(*paths: Path) -> Callable[[], Callable[[], None]]:
    """Invariant: these files are byte-for-byte what they were."""

    def before() -> Callable[[], None]:
        hashes = {p: sha256(p) for p in paths}

        def after() -> None:
            for p, h in hashes.items():
                assert sha256(p) == h, f"{p.name} changed (it is only read through the chain)"

        return after

    return before


def unchanged_snapshot(image: Path, name: str) -> Callable[[], Callable[[], None]]:
    """Invariant: internal snapshot ``name`` reads the same, per qemu-img."""

    def before() -> Callable[[], None]:
        old = snapshot_raw(image, name, image.parent / f"{name}.before.raw")

        def after() -> None:
            new = snapshot_raw(image, name, image.parent / f"{name}.after.raw")
            assert_bytes_equal(new, old, f"snapshot {name} of {image.name}")
            snaps = [s["name"] for s in info(image).get("snapshots", [])]
            assert snaps == [name], f"snapshots are now {snaps}"

        return after

    return before


def has_compressed_clusters(image: Path) -> bool:
    return any(entry & QCOW_OFLAG_COMPRESSED for _, entry, _ in l2_entries(image))


# --------------------------------------------------------------------------
# The image kinds
# --------------------------------------------------------------------------


def make_empty(d: Path) -> Case:
    return Case(create(d / "empty.qcow2", SIZE))


def make_chain(d: Path) -> Case:
    """top.qcow2 -> mid.qcow2 -> low.qcow2 -> base.raw, data in each.  The raw
    file is shorter than the rest (its end is not cluster-aligned), so some
    copy-on-write reads run past the end of the chain's last file."""
    base = d / "base.raw"
    with open(base, "wb") as f:
        f.truncate(BASE_SIZE)
    prefill(base, "raw", PREFILL[:-1])
    low = create(d / "low.qcow2", SIZE, backing=base, backing_fmt="raw")
    qemu_io(low, "write -P 0x21 512k 1M", "write -z 2560k 256k", "write -P 0x22 25M 2M")
    mid = create(d / "mid.qcow2", None, backing=low, backing_fmt="qcow2",
                 options="cluster_size=16k")  # fmt: skip
    qemu_io(mid, "write -P 0x31 1000000 300000", "write -P 0x32 28M 1M")
    top = create(d / "top.qcow2", None, backing=mid, backing_fmt="qcow2")
    qemu_io(top, "write -P 0x41 3M 100k", "write -P 0x42 16M 64k")
    return Case(top, invariants=[unchanged_files(base, low, mid)])


def make_odd_size(d: Path) -> Case:
    """A virtual size that is no multiple of the cluster size: the last
    cluster is partial, and the workload writes up to the very end."""
    size = 33 * MiB + 3 * 512
    image = create(d / "odd.qcow2", size)
    qemu_io(image, "write -P 0x71 32M 512k", f"write -P 0x72 {size - 4096} 4096")
    return Case(image, region=(31 * MiB, size))


def _compressed(d: Path, name: str, compression: str) -> Path:
    src = create(d / f"{name}.src.qcow2", SIZE)
    prefill(src)
    qemu_io(src, "write -P 0x66 8M 3M", "write -P 0x67 12M 100k")
    image = d / f"{name}.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={compression}", src, image)
    os.unlink(src)
    assert has_compressed_clusters(image)
    return image


def make_compressed_zlib(d: Path) -> Case:
    return Case(_compressed(d, "zlib", "zlib"))


def make_compressed_zstd(d: Path) -> Case:
    image = _compressed(d, "zstd", "zstd")
    assert info(image)["format-specific"]["data"]["compression-type"] == "zstd"
    return Case(image)


def make_snapshot(d: Path) -> Case:
    image = create(d / "snap.qcow2", SIZE)
    prefill(image)
    qemu_img("snapshot", "-c", "S", image)
    # After the snapshot: some clusters shared (refcount 2), some not.
    qemu_io(image, "write -P 0x91 0 128k", "write -P 0x92 10M 1M")
    return Case(image, invariants=[unchanged_snapshot(image, "S")])


def make_compressed_snapshot(d: Path) -> Case:
    image = _compressed(d, "csnap", "zlib")
    qemu_img("snapshot", "-c", "S", image)
    qemu_io(image, "write -P 0x93 8M 64k", "write -P 0x94 30M 256k")
    assert has_compressed_clusters(image)
    return Case(image, invariants=[unchanged_snapshot(image, "S")])


def make_extended_l2(d: Path) -> Case:
    backing = create(d / "xbase.qcow2", SIZE)
    prefill(backing)
    image = create(d / "xl2.qcow2", None, backing=backing, backing_fmt="qcow2",
                   options="extended_l2=on,cluster_size=64k")  # fmt: skip
    # Single subclusters (2 KiB) allocated or zeroed over backing data.
    qemu_io(image, "write -P 0xe1 2k 2k", "write -z 8k 4k", "write -P 0xe2 2M 6k",
            "write -P 0xe3 3M 64k", "write -z 20M 2k")  # fmt: skip
    return Case(image, subcluster_size=2 * KiB, invariants=[unchanged_files(backing)])


def make_cluster512(d: Path) -> Case:
    """512-byte clusters: one refcount table cluster covers 64 refcount
    blocks of 256 clusters, 8 MiB of host file; 7 MiB is there already and
    the workload adds more, spread over 12 MiB, so the table must grow."""
    image = create(d / "c512.qcow2", SIZE, options="cluster_size=512")
    qemu_io(image, "write -P 0x12 0 7M")
    before = read_header(image)
    assert before["refcount_table_clusters"] == 1, before

    def refcount_table_moved() -> Callable[[], None]:
        def after() -> None:
            now = read_header(image)
            assert (now["refcount_table_offset"], now["refcount_table_clusters"]) != (
                before["refcount_table_offset"],
                before["refcount_table_clusters"],
            ), f"the refcount table did not grow: {now}"
            assert now["refcount_table_clusters"] > before["refcount_table_clusters"]

        return after

    return Case(image, cluster_size=512, region=(16 * MiB, 28 * MiB), volume=3 * MiB,
                invariants=[refcount_table_moved])  # fmt: skip


def _with_options(name: str, options: str) -> Callable[[Path], Case]:
    def make(d: Path) -> Case:
        image = create(d / f"{name}.qcow2", SIZE, options=options)
        prefill(image)
        return Case(image)

    make.__name__ = f"make_{name}"
    return make


def make_lazy_refcounts(d: Path) -> Case:
    image = create(d / "lazy.qcow2", SIZE, options="lazy_refcounts=on")
    prefill(image)

    def not_dirty() -> Callable[[], None]:
        def after() -> None:
            data = info(image)
            assert data.get("dirty-flag") is False, json.dumps(data)

        return after

    return Case(image, invariants=[not_dirty])


def make_data_file(d: Path) -> Case:
    data = d / "ext.data"
    image = create(d / "ext.qcow2", SIZE, options=f"data_file={data}")
    prefill(image)
    return Case(image)


IMAGES: dict[str, Callable[[Path], Case]] = {
    "empty": make_empty,
    "chain": make_chain,
    "odd-size": make_odd_size,
    "zlib": make_compressed_zlib,
    "zstd": make_compressed_zstd,
    "snapshot": make_snapshot,
    "compressed-snapshot": make_compressed_snapshot,
    "extended-l2": make_extended_l2,
    "cluster512": make_cluster512,
    "refcount1": _with_options("refcount1", "refcount_bits=1"),
    "refcount64": _with_options("refcount64", "refcount_bits=64"),
    "compat010": _with_options("compat010", "compat=0.10"),
    "lazy-refcounts": make_lazy_refcounts,
    "data-file": make_data_file,
}

MODES = ("writeback", "writethrough", "none", "directsync", "unsafe")

# The full cross product: one case is about half a second.
CASES = [pytest.param(kind, mode, id=f"{kind}-{mode}") for mode in MODES for kind in IMAGES]


@pytest.mark.parametrize(("kind", "mode"), CASES)
def test_workload_matches_reference(tmp_path: Path, kind: str, mode: str) -> None:
    case = IMAGES[kind](tmp_path)
    seed = zlib.crc32(kind.encode())
    ops = make_workload(seed, *case.region, case.volume, cluster_size=case.cluster_size,
                        subcluster_size=case.subcluster_size)  # fmt: skip
    reference = make_reference(case.image, tmp_path / "reference.raw")
    checks = [before() for before in case.invariants]

    apply_to_path(reference, ops)
    view = tmp_path / "view.raw"
    view.touch()
    with mount_view(case.image, view, "--cache", mode):
        apply_to_path(view, ops)
        # Read-after-write through the view, before anything is closed.
        assert_bytes_equal(read_view(view), reference.read_bytes(), "view after the workload")
    # mount_view's teardown ran `qfuse umount` and failed the test if unclean.
    assert_check_clean(case.image)
    assert_identical(reference, case.image)
    for after in checks:
        after()


# --------------------------------------------------------------------------
# fio
# --------------------------------------------------------------------------

FIO_JOB_SIZE = 4 * MiB


def run_fio(view: Path, *args: str) -> None:
    argv = [
        "fio", "--output-format=terse", "--minimal", f"--filename={view}",
        "--ioengine=psync", "--group_reporting", "--verify_state_save=0",
        *args,  # a later --ioengine wins
    ]  # fmt: skip
    # fio may leave state files in its working directory: keep them in tmp_path.
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=view.parent)
    assert res.returncode == 0, f"{' '.join(argv)} exited {res.returncode}: {res.stderr}"
    assert "verify" not in res.stderr.lower() and "error" not in res.stderr.lower(), res.stderr


def _fio_image(tmp_path: Path) -> Path:
    image = create(tmp_path / "fio.qcow2", 128 * MiB)
    # Something to copy-on-write around, inside the jobs' ranges.
    qemu_io(image, "write -P 0x3c 0 3M", "write -P 0x3d 17M 5M")
    return image


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
@pytest.mark.parametrize("mode", ["writeback", "none"])
@pytest.mark.parametrize("bs", ["4k", "64k"])
def test_fio_verify_parallel_jobs(tmp_path: Path, mode: str, bs: str) -> None:
    """Four jobs, each on its own range, write and verify crc32c."""
    image = _fio_image(tmp_path)
    view = tmp_path / "view.raw"
    view.touch()
    direct = ["--direct=1"] if mode == "none" else []
    with mount_view(image, view, "--cache", mode):
        run_fio(
            view, "--name=verify", "--rw=randwrite", f"--bs={bs}", "--numjobs=4",
            f"--size={FIO_JOB_SIZE}", f"--offset_increment={FIO_JOB_SIZE + 1 * MiB}",
            "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", *direct,
        )  # fmt: skip
    assert_check_clean(image)


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
@pytest.mark.parametrize("mode", ["writeback", "none"])
def test_fio_verify_async_queue_depth(tmp_path: Path, mode: str) -> None:
    """Four jobs with 32 asynchronous requests each in flight (libaio, as a
    loop device or a VM issues them): many first writes into new clusters
    at once, each verified with crc32c."""
    image = _fio_image(tmp_path)
    view = tmp_path / "view.raw"
    view.touch()
    with mount_view(image, view, "--cache", mode):
        run_fio(
            view, "--name=qd32", "--ioengine=libaio", "--iodepth=32", "--direct=1",
            "--rw=randwrite", "--bs=4k", "--numjobs=4", f"--size={FIO_JOB_SIZE}",
            f"--offset_increment={FIO_JOB_SIZE + 1 * MiB}",
            "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
        )  # fmt: skip
    assert_check_clean(image)


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
@pytest.mark.parametrize("mode", ["writeback", "none"])
def test_fio_overlapping_randrw(tmp_path: Path, mode: str) -> None:
    """Four jobs reading and writing the same range at once (no verify:
    the last writer wins), then a consistent image and a view that reads
    what qemu-img reads."""
    image = _fio_image(tmp_path)
    view = tmp_path / "view.raw"
    view.touch()
    direct = ["--direct=1"] if mode == "none" else []
    with mount_view(image, view, "--cache", mode):
        run_fio(
            view, "--name=overlap", "--rw=randrw", "--bsrange=512-128k", "--numjobs=4",
            f"--size={8 * MiB}", "--offset=1M", "--fsync=16", *direct,
        )  # fmt: skip
        seen = read_view(view)
    assert_check_clean(image)
    reference = make_reference(image, tmp_path / "after.raw")
    assert_bytes_equal(seen, reference.read_bytes(), "view vs qemu-img after fio")
