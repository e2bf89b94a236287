"""The engine in-process: images made by qemu-img, read without FUSE."""

from __future__ import annotations

import errno
import random
import struct
import subprocess
from pathlib import Path

import pytest
import trio

from qfuse.engine import CacheMode, open_image
from qfuse.errors import ImageError, MetadataCorruption


def run(*args: str) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def qemu_io(image: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for cmd in cmds:
        args += ["-c", cmd]
    run(*args, str(image))


def reference(image: Path, *extra: str) -> bytes:
    out = image.with_suffix(".ref")
    run("qemu-img", "convert", *extra, "-O", "raw", str(image), str(out))
    return out.read_bytes()


async def assert_reads_like_qemu(image: Path, ref: bytes, **kwargs) -> None:
    img = open_image(str(image), **kwargs)
    try:
        assert img.virtual_size == len(ref)
        whole = b"".join([await img.read(o, 1 << 20) for o in range(0, len(ref), 1 << 20)])
        assert whole == ref
        rnd = random.Random(len(ref))
        for _ in range(300):
            offset = rnd.randrange(len(ref))
            length = rnd.randrange(1, 200_000)
            assert await img.read(offset, length) == ref[offset:offset + length]
        assert await img.read(len(ref), 10) == b""
    finally:
        img.close()


def make_chain(tmp_path: Path) -> Path:
    base = tmp_path / "base.raw"
    run("qemu-img", "create", "-q", "-f", "raw", str(base), "3M")
    qemu_io(base, "write -P 0x11 0 3M", fmt="raw")
    mid = tmp_path / "mid.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k",
        "-b", "base.raw", "-F", "raw", str(mid), "4M")
    qemu_io(mid, "write -P 0x22 1M 5000", "write -z 2M 8k")
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
        str(top), "6M")
    qemu_io(top, "write -P 0x33 1028k 70k", "write -P 0x44 5M 1k")
    return top


async def test_chain_ending_in_raw(tmp_path):
    top = make_chain(tmp_path)
    await assert_reads_like_qemu(top, reference(top))


@pytest.mark.parametrize("cache", list(CacheMode))
async def test_every_cache_mode_reads_the_same(tmp_path, cache):
    top = make_chain(tmp_path)
    await assert_reads_like_qemu(top, reference(top), cache=cache)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
async def test_compressed(tmp_path, compression):
    src = make_chain(tmp_path)
    image = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={compression}",
        str(src), str(image))
    await assert_reads_like_qemu(image, reference(image))


async def test_extended_l2_over_backing(tmp_path):
    base = tmp_path / "b.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "2M")
    qemu_io(base, "write -P 0x55 0 2M")
    image = tmp_path / "e.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k",
        "-b", "b.qcow2", "-F", "qcow2", str(image))
    qemu_io(image, "write -P 0x66 2k 2k", "write -z 6k 4k", "write -P 0x77 130k 1k",
            "write -z 512k 64k")
    await assert_reads_like_qemu(image, reference(image))


async def test_tiny_l2_cache(tmp_path):
    image = tmp_path / "small.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(image), "8M")
    qemu_io(image, *[f"write -P {i} {i * 257}k 3k" for i in range(1, 30)])
    await assert_reads_like_qemu(image, reference(image), l2_cache_size=4096)


async def test_snapshot_by_name_and_id(tmp_path):
    image = tmp_path / "s.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M")
    qemu_io(image, "write -P 1 0 64k")
    run("qemu-img", "snapshot", "-c", "first", str(image))
    qemu_io(image, "write -P 2 0 32k")
    run("qemu-img", "resize", "-q", str(image), "2M")
    # qemu-img convert -l keeps the current size; the snapshot's own is 1M.
    ref = reference(image, "-l", "snapshot.name=first")[:1 << 20]
    await assert_reads_like_qemu(image, ref, snapshot="first")
    await assert_reads_like_qemu(image, ref, snapshot="1")
    await assert_reads_like_qemu(image, reference(image))
    with pytest.raises(ImageError, match="no snapshot"):
        open_image(str(image), snapshot="nope")


async def test_concurrent_misses_share_one_read(tmp_path):
    image = tmp_path / "m.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M")
    qemu_io(image, "write -P 9 0 1M")
    img = open_image(str(image))
    try:
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(img.read, i * 65536, 4096)
        stats = img.l2_cache.statistics()
        assert stats["misses"] == 1
    finally:
        img.close()


def _l2_offset(image: Path) -> int:
    raw = image.read_bytes()
    l1_offset = struct.unpack_from(">Q", raw, 40)[0]
    return struct.unpack_from(">Q", raw, l1_offset)[0] & 0x00FF_FFFF_FFFF_FE00


async def test_bad_l2_entry_fails_only_its_cluster(tmp_path):
    image = tmp_path / "bad.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M")
    qemu_io(image, "write -P 7 0 128k")
    l2 = _l2_offset(image)
    with open(image, "r+b") as f:
        f.seek(l2 + 8)  # entry 1: guest cluster 64k-128k
        f.write(struct.pack(">Q", (1 << 63) | 0x50200))
    img = open_image(str(image))
    try:
        assert await img.read(0, 65536) == b"\7" * 65536
        with pytest.raises(MetadataCorruption, match="entry 1"):
            await img.read(65536, 512)
    finally:
        img.close()


async def test_garbage_compressed_cluster_fails_only_its_cluster(tmp_path):
    src = tmp_path / "src.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(src), "1M")
    qemu_io(src, "write -P 3 0 128k")
    image = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(image))
    l2 = _l2_offset(image)
    raw = image.read_bytes()
    entry = struct.unpack_from(">Q", raw, l2 + 8)[0]
    host = entry & ((1 << 54) - 1)
    with open(image, "r+b") as f:
        f.seek(host)
        f.write(b"\xff" * 64)
    img = open_image(str(image))
    try:
        assert await img.read(0, 65536) == b"\3" * 65536
        with pytest.raises(MetadataCorruption, match="compressed cluster"):
            await img.read(65536, 512)
    finally:
        img.close()


async def test_bad_entry_on_a_writable_image_marks_it_corrupt(tmp_path):
    image = tmp_path / "bad.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M")
    qemu_io(image, "write -P 7 0 128k")
    l2 = _l2_offset(image)
    with open(image, "r+b") as f:
        f.seek(l2 + 8)
        f.write(struct.pack(">Q", (1 << 63) | 0x50200))
    img = open_image(str(image), read_only=False)
    try:
        with pytest.raises(MetadataCorruption):
            await img.read(65536, 512)
        with pytest.raises(OSError) as failed:
            await img.write(0, b"x" * 512)
        assert failed.value.errno == errno.EROFS
    finally:
        img.close()
    incompatible = struct.unpack_from(">Q", image.read_bytes(), 72)[0]
    assert incompatible & 2  # the corrupt bit
