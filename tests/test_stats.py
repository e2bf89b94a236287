"""Live statistics: ``qfuse stats`` and the ``user.qfuse.stats`` attribute, on real mounts.

Every image is made by qemu-img/qemu-io; the I/O is plain os.pread/os.pwrite
on the view (each call is one FUSE request: the view is direct_io), so the
counters can be checked exactly.  Reading the attribute must not change it.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
from images import MiB, create, qemu_img, qemu_io
from mountutil import run_qfuse

pytestmark = pytest.mark.mount

XATTR = "user.qfuse.stats"
SIZE = 64 * MiB
CHUNK = 64 * 1024

TOP_KEYS = {
    "image", "snapshot", "virtual_size", "cluster_size", "allocated_bytes", "read_only",
    "cache_mode", "requests", "bytes_read", "bytes_written", "flushes", "l2_cache",
    "refcount_cache", "pending_frees",
}  # fmt: skip
REQUEST_KEYS = {"open", "read", "write", "flush", "fsync", "errors"}
CACHE_KEYS = {"capacity", "cached", "dirty", "hits", "misses", "evictions"}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """64 MiB with data in the first 4 MiB, nothing at 32 MiB."""
    path = create(tmp_path / "disk.qcow2", SIZE)
    qemu_io(path, "write -P 0x5a 0 4M")
    return path


def stats(view: Path) -> dict[str, Any]:
    return json.loads(os.getxattr(view, XATTR))


def cli_stats(path: Path, *args: str) -> Any:
    res = run_qfuse("stats", path, "--output", "json", *args)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    return json.loads(res.stdout)


def lookups(cache: dict[str, int]) -> int:
    return cache["hits"] + cache["misses"]


def test_keys_are_stable(mount: Any, image: Path) -> None:
    view = mount(image)
    s = stats(view)
    assert set(s) == TOP_KEYS
    assert set(s["requests"]) == REQUEST_KEYS
    assert set(s["l2_cache"]) == CACHE_KEYS
    assert set(s["refcount_cache"]) == CACHE_KEYS
    assert s["image"] == str(image)
    assert s["snapshot"] is None
    assert s["virtual_size"] == SIZE
    assert s["cluster_size"] == 65536
    assert s["read_only"] is False
    assert s["cache_mode"] == "writeback"
    assert s["allocated_bytes"] == 4 * MiB
    assert s["requests"] == dict.fromkeys(REQUEST_KEYS, 0)
    assert (s["bytes_read"], s["bytes_written"], s["flushes"]) == (0, 0, 0)


def test_attribute_is_listed_and_reading_it_changes_nothing(mount: Any, image: Path) -> None:
    view = mount(image)
    assert XATTR in os.listxattr(view)
    first = os.getxattr(view, XATTR)
    assert os.getxattr(view, XATTR) == first
    assert cli_stats(view) == json.loads(first)
    assert os.getxattr(view, XATTR) == first


def test_reads_are_counted(mount: Any, image: Path) -> None:
    view = mount(image)
    before = stats(view)
    fd = os.open(view, os.O_RDONLY)
    try:
        for i in range(4):
            assert os.pread(fd, CHUNK, i * CHUNK) == b"\x5a" * CHUNK
        os.pread(fd, CHUNK, SIZE)  # at the end: an empty read is a request too
    finally:
        os.close(fd)
    after = stats(view)
    assert after["requests"]["open"] == before["requests"]["open"] + 1
    assert after["requests"]["read"] == before["requests"]["read"] + 5
    assert after["requests"]["flush"] == before["requests"]["flush"] + 1  # the close
    assert after["requests"]["write"] == before["requests"]["write"]
    assert after["bytes_read"] == before["bytes_read"] + 4 * CHUNK
    assert after["bytes_written"] == before["bytes_written"]
    # Each read of mapped data looks its L2 table up once; the first one misses.
    assert lookups(after["l2_cache"]) >= lookups(before["l2_cache"]) + 4
    assert after["l2_cache"]["misses"] >= 1
    assert after["flushes"] == before["flushes"]  # a reader's close flushes nothing


def test_writes_and_fsync_are_counted(mount: Any, image: Path) -> None:
    view = mount(image)
    before = stats(view)
    fd = os.open(view, os.O_RDWR)
    try:
        for i in range(3):
            assert os.pwrite(fd, b"\xc3" * CHUNK, 32 * MiB + i * CHUNK) == CHUNK
        written = stats(view)
        # New clusters: their L2 table changed and waits for write-back.
        assert written["l2_cache"]["dirty"] >= 1
        assert lookups(written["refcount_cache"]) > lookups(before["refcount_cache"])
        os.fsync(fd)
        synced = stats(view)
    finally:
        os.close(fd)
    after = stats(view)
    assert written["requests"]["write"] == before["requests"]["write"] + 3
    assert written["bytes_written"] == before["bytes_written"] + 3 * CHUNK
    assert written["allocated_bytes"] >= before["allocated_bytes"] + 3 * CHUNK
    assert synced["requests"]["fsync"] == before["requests"]["fsync"] + 1
    assert synced["flushes"] == before["flushes"] + 1
    assert synced["l2_cache"]["dirty"] == 0
    assert synced["refcount_cache"]["dirty"] == 0
    assert synced["pending_frees"] == 0
    # The close after fsync: one FLUSH request, nothing left to make durable.
    assert after["requests"]["flush"] == before["requests"]["flush"] + 1
    assert after["flushes"] == synced["flushes"]
    assert after["requests"]["errors"] == 0


def test_close_after_a_write_flushes_the_image(mount: Any, image: Path) -> None:
    view = mount(image)
    before = stats(view)
    fd = os.open(view, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x11" * 4096, 0)
    finally:
        os.close(fd)
    after = stats(view)
    assert after["requests"]["write"] == before["requests"]["write"] + 1
    assert after["flushes"] == before["flushes"] + 1
    assert after["l2_cache"]["dirty"] == 0


def test_failed_requests_are_counted(mount: Any, image: Path) -> None:
    view = mount(image)
    before = stats(view)
    fd = os.open(view, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as err:
            os.pwrite(fd, b"x", SIZE)  # past the end of the disk
        assert err.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    after = stats(view)
    assert after["requests"]["write"] == before["requests"]["write"] + 1
    assert after["requests"]["errors"] == before["requests"]["errors"] + 1
    assert after["bytes_written"] == before["bytes_written"]


def test_read_only_view_and_cache_mode(mount: Any, image: Path) -> None:
    view = mount(image, "--read-only", "--cache", "writethrough")
    s = stats(view)
    assert s["read_only"] is True
    assert s["cache_mode"] == "writethrough"
    assert s["refcount_cache"] == dict.fromkeys(CACHE_KEYS, 0)
    with open(view, "rb") as f:
        f.read(CHUNK)
    assert stats(view)["bytes_read"] == CHUNK


def test_human_output(mount: Any, image: Path) -> None:
    view = mount(image)
    with open(view, "rb") as f:
        f.read(CHUNK)
    res = run_qfuse("stats", view)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    labels = [line.split("  ")[0] for line in lines]
    wanted = ["view", "image", "virtual size", "allocated", "cache mode", "requests",
              "bytes read", "bytes written", "flushes", "L2 cache", "refcount cache"]  # fmt: skip
    for label in wanted:
        assert label in labels, res.stdout
    # Aligned: the facts' values start in one column, then the caches' table
    # (its header line has no label) keeps its columns.
    facts = lines[: labels.index("")]
    assert len({len(line) - len(line.split("  ", 1)[1].lstrip()) for line in facts}) == 1
    header = lines[labels.index("")]
    for row in lines[labels.index("") + 1 :]:
        assert row.rstrip()[-1].isdigit() and len(row) == len(header), res.stdout
    assert "64 MiB (67108864 bytes)" in res.stdout
    assert "read 1," in res.stdout


def test_directory_form(mount: Any, image: Path, tmp_path: Path) -> None:
    qemu_img("snapshot", "-c", "before", image)
    qemu_io(image, "write -P 0x77 0 64k")
    directory = tmp_path / "mnt"
    directory.mkdir()
    mount(image, "--vmdk", mountpoint=directory)
    active, snap = directory / "disk.raw", directory / "disk@before.raw"
    assert XATTR in os.listxattr(active) and XATTR in os.listxattr(snap)
    assert os.listxattr(directory / "disk.vmdk") == []
    assert os.listxattr(directory) == []
    with open(snap, "rb") as f:
        assert f.read(CHUNK) == b"\x5a" * CHUNK
    s_active, s_snap = stats(active), stats(snap)
    assert s_snap["snapshot"] == "before" and s_snap["read_only"] is True
    assert s_active["snapshot"] is None and s_active["read_only"] is False
    assert s_snap["bytes_read"] == CHUNK
    assert s_active["bytes_read"] == 0  # counters are per file
    both = cli_stats(directory)
    assert both == {"disk.raw": s_active, "disk@before.raw": s_snap}
    assert cli_stats(snap) == s_snap  # one file of a directory mount
    res = run_qfuse("stats", directory)
    assert res.returncode == 0, res.stderr
    assert f"view            {active}" in res.stdout
    assert "snapshot        before" in res.stdout
    res = run_qfuse("stats", directory / "disk.vmdk")
    assert res.returncode != 0
    assert res.stderr.strip().endswith("disk.vmdk: not an image view (no statistics)")


@pytest.mark.parametrize("what", ["missing", "file", "directory", "image"])
def test_not_a_view_is_one_line(tmp_path: Path, what: str) -> None:
    path = {
        "missing": tmp_path / "nothing.raw",
        "file": tmp_path / "plain.raw",
        "directory": tmp_path,
        "image": tmp_path / "disk.qcow2",
    }[what]
    if what == "file":
        path.write_bytes(b"\0" * 4096)
    elif what == "image":
        create(path, SIZE)
    for output in ("human", "json"):
        res = run_qfuse("stats", path, "--output", output)
        assert res.returncode == 1
        assert res.stdout == ""
        lines = res.stderr.splitlines()
        assert len(lines) == 1, res.stderr
        assert str(path) in lines[0]
        reason = "No such file" if what == "missing" else "not a qfuse mount"
        assert reason in lines[0]
