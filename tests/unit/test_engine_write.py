"""The engine's write path in-process: allocation, its fast path, write-back order."""

from __future__ import annotations

import random
import struct
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing

from qfuse.engine import CacheMode, open_image
from qfuse.engine.rangelock import RangeLocks
from qfuse.engine.writer import Writer

KiB = 1024
CLUSTER = 64 * KiB


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def create(path: Path, size: str, *opts: str) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), size)


def assert_check_clean(image: Path) -> None:
    # exit 0: no corruption and no leaked clusters
    result = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def converted(image: Path) -> bytes:
    out = image.with_suffix(".raw")
    run("qemu-img", "convert", "-O", "raw", str(image), str(out))
    return out.read_bytes()


def l1_entry(image: Path, index: int) -> int:
    with open(image, "rb") as f:
        header = f.read(48)
        f.seek(struct.unpack_from(">Q", header, 40)[0] + 8 * index)
        return struct.unpack(">Q", f.read(8))[0]


def no_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(*args: object) -> None:
        raise AssertionError("took the general write path")

    monkeypatch.setattr(Writer, "_write_span", refuse)


@pytest.mark.parametrize("cache", list(CacheMode))
async def test_allocating_writes_read_back_and_leave_the_image_clean(tmp_path, cache):
    image = tmp_path / "a.qcow2"
    size = 64 * 1024 * KiB  # 1024 clusters
    create(image, str(size))
    model = bytearray(size)
    rnd = random.Random(7)
    img = open_image(str(image), cache=cache, read_only=False)
    try:
        for n in range(600):
            if n % 5 == 4:  # a partial or unaligned write now and then, some across clusters
                offset = rnd.randrange(size - 200 * KiB)
                length = rnd.randrange(1, 200 * KiB)
            else:  # 4 KiB at a random 4 KiB offset: mostly a new cluster
                offset = rnd.randrange(size // (4 * KiB)) * 4 * KiB
                length = 4 * KiB
            data = rnd.randbytes(length)
            assert await img.write(offset, data) == length
            model[offset:offset + length] = data
            if n == 300:
                await img.flush()
        for _ in range(50):
            offset = rnd.randrange(size - 70 * KiB)
            assert await img.read(offset, 70 * KiB) == model[offset:offset + 70 * KiB]
        await img.shutdown()
    finally:
        img.close()
    assert_check_clean(image)
    assert converted(image) == model


async def test_allocating_4k_write_takes_the_fast_path(tmp_path, monkeypatch):
    image = tmp_path / "f.qcow2"
    create(image, "16M")
    img = open_image(str(image), read_only=False)
    try:
        await img.write(0, b"\1" * 4096)  # the L2 table: the general path
        no_general_path(monkeypatch)
        for cluster in (5, 3, 100, 7):
            await img.write(cluster * CLUSTER + 8 * KiB, b"\2" * 4096)
        await img.write(3 * CLUSTER, b"\3" * 512)  # an overwrite
        await img.shutdown()
    finally:
        img.close()
    assert_check_clean(image)
    raw = converted(image)
    assert raw[3 * CLUSTER:4 * CLUSTER] == \
        b"\3" * 512 + bytes(8 * KiB - 512) + b"\2" * 4096 + bytes(52 * KiB)
    assert raw[100 * CLUSTER:101 * CLUSTER] == bytes(8 * KiB) + b"\2" * 4096 + bytes(52 * KiB)


async def test_allocation_hint_follows_the_allocations(tmp_path):
    """Each new cluster is found at the hint, not by scanning from the start."""
    image = tmp_path / "h.qcow2"
    create(image, "64M")
    img = open_image(str(image), read_only=False)
    try:
        await img.write(0, b"x")
        refcounts = img.writer.refcounts
        for cluster in range(1, 200):
            hint = refcounts.free_hint
            await img.write(cluster * CLUSTER, b"y" * 4096)
            assert refcounts.free_hint == hint + 1
        hint = refcounts.free_hint
        await img.write(300 * CLUSTER, bytes(range(256)) * 4096)  # 16 clusters at once
        assert refcounts.free_hint == hint + 16
        await img.shutdown()
    finally:
        img.close()
    assert_check_clean(image)


async def test_freed_cluster_inside_the_file_is_written_whole(tmp_path, monkeypatch):
    """A reused cluster still holds its old bytes: the part the write does
    not cover must become zeros, not show them."""
    image = tmp_path / "r.qcow2"
    create(image, "1M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 64k", "-c", "write -P 0xbb 64k 64k",
        str(image))
    run("qemu-io", "--image-opts", "-c", "discard 0 64k",
        f"driver=qcow2,file.filename={image},pass-discard-request=off")
    img = open_image(str(image), read_only=False)
    try:
        await img.read(0, 1)  # the L2 table cached, and the refcount block
        assert await img.writer.refcounts.get(5) == 0  # the discarded cluster
        no_general_path(monkeypatch)
        await img.write(2 * CLUSTER + 4 * KiB, b"\x11" * 4096)
        assert await img.read(2 * CLUSTER, CLUSTER) == \
            bytes(4 * KiB) + b"\x11" * 4096 + bytes(56 * KiB)
        await img.shutdown()
    finally:
        img.close()
    assert_check_clean(image)
    assert converted(image)[2 * CLUSTER:3 * CLUSTER] == \
        bytes(4 * KiB) + b"\x11" * 4096 + bytes(56 * KiB)


async def test_new_l2_table_reaches_the_file_at_write_back_in_order(tmp_path):
    """Refcount block, barrier, L2 table, barrier, L1 entry; nothing before."""
    image = tmp_path / "o.qcow2"
    create(image, "2G")
    img = open_image(str(image), cache=CacheMode.WRITEBACK, read_only=False)
    events: list[tuple[str, int]] = []
    try:
        await img.write(0, b"a")
        await img.flush()
        file = img.file
        pwrite, datasync = file.pwrite, file.datasync_async

        async def traced_pwrite(offset: int, data: bytes) -> None:
            events.append(("write", offset))
            await pwrite(offset, data)

        async def traced_datasync() -> None:
            events.append(("barrier", 0))
            await datasync()

        file.pwrite = traced_pwrite  # type: ignore[method-assign]
        file.datasync_async = traced_datasync  # type: ignore[method-assign]
        guest = 1 << 30  # a second L2 table (512 MiB each with 64 KiB clusters)
        await img.write(guest, b"b" * 4096)
        await img.write(guest + CLUSTER, b"c" * 4096)
        assert events == []
        assert l1_entry(image, 2) == 0
        new_table = img.l1[2] & 0x00FF_FFFF_FFFF_FE00
        raw = image.read_bytes()
        l1_offset, reftable = struct.unpack_from(">QQ", raw, 40)
        refblock = struct.unpack_from(">Q", raw, reftable)[0]  # the only one
        await img.flush()
        writes = [offset for kind, offset in events if kind == "write"]
        assert set(writes) == {refblock, new_table, l1_offset + 16}
        order = [(kind, offset) for kind, offset in events]
        i_ref = order.index(("write", refblock))
        i_l2 = order.index(("write", new_table))
        i_l1 = order.index(("write", l1_offset + 16))
        assert i_ref < i_l2 < i_l1
        assert ("barrier", 0) in order[i_ref:i_l2]
        assert ("barrier", 0) in order[i_l2:i_l1]
        assert l1_entry(image, 2) == img.l1[2]
        await img.shutdown()
    finally:
        img.close()
    assert_check_clean(image)
    raw = image.read_bytes()
    assert raw.count(b"b" * 4096) == 1 and raw.count(b"c" * 4096) == 1


async def test_range_locks_hold_overlapping_ranges_one_at_a_time():
    locks = RangeLocks()
    release = trio.Event()
    events: list[str] = []

    async def hold(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with locks.locked(0, 100):
            task_status.started()
            await release.wait()
            events.append("first out")

    async def enter(name: str, start: int, end: int) -> None:
        async with locks.locked(start, end):
            events.append(name)

    async with trio.open_nursery() as nursery:
        await nursery.start(hold)
        nursery.start_soon(enter, "overlap 1", 50, 150)
        nursery.start_soon(enter, "overlap 2", 0, 10)
        await trio.testing.wait_all_tasks_blocked()
        assert events == []
        assert not locks.is_free(99, 100) and locks.is_free(100, 200)
        nursery.start_soon(enter, "disjoint", 100, 200)  # only waiters overlap it
        await trio.testing.wait_all_tasks_blocked()
        assert events == ["disjoint"]
        release.set()
    assert events[:2] == ["disjoint", "first out"]
    assert sorted(events[2:]) == ["overlap 1", "overlap 2"]
    assert locks.is_free(0, 1 << 40)
