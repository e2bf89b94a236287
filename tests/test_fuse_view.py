"""The request handlers of `qfuse.fuse.view.View`, called directly (no mount).

A small in-memory image stands in for the engine, so the write path, short
writes at the end and error mapping can be checked before the engine writes.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
from pyfuse3 import FUSEError

from qfuse.errors import MetadataCorruption
from qfuse.fuse.debug import with_request_log
from qfuse.fuse.view import ImageFile, TextFile, View

SIZE = 1 << 20
CLUSTER = 65536


class MemoryImage:
    """Just enough of the engine's image for the view."""

    def __init__(self, path: str, read_only: bool = False) -> None:
        self.path = path
        self.virtual_size = SIZE
        self.cluster_size = CLUSTER
        self.read_only = read_only
        self.data = bytearray(SIZE)
        self.flushes = 0
        self.fail_read: Exception | None = None

    def allocated_bytes(self) -> int:
        return 3 * CLUSTER + 1

    async def read(self, guest_offset: int, length: int) -> bytes:
        if self.fail_read is not None:
            raise self.fail_read
        assert guest_offset + length <= SIZE, "the view must not read past the end"
        return bytes(self.data[guest_offset : guest_offset + length])

    async def write(self, guest_offset: int, data: bytes) -> int:
        assert guest_offset + len(data) <= SIZE, "the view must not write past the end"
        self.data[guest_offset : guest_offset + len(data)] = data
        return len(data)

    async def flush(self) -> None:
        self.flushes += 1


@pytest.fixture
def image_file(tmp_path: Path) -> str:
    path = tmp_path / "disk.qcow2"
    path.write_bytes(b"")
    os.chmod(path, 0o640)
    return str(path)


def file_view(image_file: str, read_only: bool = False) -> tuple[View, MemoryImage]:
    image = MemoryImage(image_file, read_only)
    node = ImageFile(pyfuse3.ROOT_INODE, b"", image, read_only, SIZE)
    return View(image_file, [node], directory=False), image


async def open_fh(view: View, flags: int = os.O_RDWR, inode: int = pyfuse3.ROOT_INODE) -> int:
    info = await view.open(inode, flags, None)  # type: ignore[arg-type]
    return info.fh


async def test_getattr_of_the_file_form(image_file: str) -> None:
    view, _ = file_view(image_file)
    attr = await view.getattr(pyfuse3.ROOT_INODE, None)  # type: ignore[arg-type]
    image_stat = os.stat(image_file)
    assert stat.S_ISREG(attr.st_mode)
    assert stat.S_IMODE(attr.st_mode) == 0o640
    assert attr.st_size == SIZE
    assert attr.st_blocks == (3 * CLUSTER + 1 + 511) // 512
    assert attr.st_blksize == CLUSTER
    assert (attr.st_uid, attr.st_gid) == (image_stat.st_uid, image_stat.st_gid)
    assert attr.st_mtime_ns == image_stat.st_mtime_ns


async def test_read_only_view_has_no_write_bits(image_file: str) -> None:
    os.chmod(image_file, 0o666)
    view, _ = file_view(image_file, read_only=True)
    attr = await view.getattr(pyfuse3.ROOT_INODE, None)  # type: ignore[arg-type]
    assert stat.S_IMODE(attr.st_mode) == 0o444


async def test_read_clips_at_the_end(image_file: str) -> None:
    view, image = file_view(image_file)
    image.data[-4:] = b"tail"
    fh = await open_fh(view, os.O_RDONLY)
    assert await view.read(fh, SIZE - 4, 4096) == b"tail"
    assert await view.read(fh, SIZE, 4096) == b""
    assert await view.read(fh, SIZE + 12345, 10) == b""


async def test_write_then_read(image_file: str) -> None:
    view, image = file_view(image_file)
    fh = await open_fh(view)
    assert await view.write(fh, 4096, b"hello") == 5
    assert await view.read(fh, 4096, 5) == b"hello"


async def test_write_past_the_end(image_file: str) -> None:
    view, image = file_view(image_file)
    fh = await open_fh(view)
    # Crossing the end: cut short, like a block device.
    assert await view.write(fh, SIZE - 2, b"abcd") == 2
    assert image.data[-2:] == b"ab"
    for offset in (SIZE, SIZE + 4096):
        with pytest.raises(FUSEError) as info:
            await view.write(fh, offset, b"x")
        assert info.value.errno == errno.ENOSPC


async def test_read_only_refuses_writes(image_file: str) -> None:
    view, _ = file_view(image_file, read_only=True)
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(FUSEError) as info:
            await open_fh(view, flags)
        assert info.value.errno == errno.EROFS
    fh = await open_fh(view, os.O_RDONLY)
    with pytest.raises(FUSEError) as info:
        await view.write(fh, 0, b"x")
    assert info.value.errno == errno.EROFS


async def test_o_trunc_is_refused(image_file: str) -> None:
    view, _ = file_view(image_file)
    with pytest.raises(FUSEError) as info:
        await open_fh(view, os.O_WRONLY | os.O_TRUNC)
    assert info.value.errno == errno.EPERM


def _fields(**updates: bool) -> SimpleNamespace:
    """A stand-in for pyfuse3.SetattrFields (read-only from Python)."""
    names = ("atime", "mtime", "ctime", "mode", "uid", "gid", "size")
    return SimpleNamespace(**{f"update_{n}": updates.get(n, False) for n in names})


async def test_setattr(image_file: str) -> None:
    view, _ = file_view(image_file)
    ino = pyfuse3.ROOT_INODE

    async def setattr(name: str, value: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        setattr_value = {"size": "st_size", "mode": "st_mode", "uid": "st_uid"}[name]
        attr.__setattr__(setattr_value, value)
        return await view.setattr(ino, attr, _fields(**{name: True}), None, None)  # type: ignore[arg-type]

    assert (await setattr("size", SIZE)).st_size == SIZE  # same size: a no-op
    for name, value in (("size", 0), ("size", 2 * SIZE), ("mode", stat.S_IFREG | 0o777),
                        ("uid", 4242)):  # fmt: skip
        with pytest.raises(FUSEError) as info:
            await setattr(name, value)
        assert info.value.errno == errno.EPERM
    current = await view.getattr(ino, None)  # type: ignore[arg-type]
    assert (await setattr("mode", current.st_mode)).st_mode == current.st_mode
    touched = await view.setattr(ino, pyfuse3.EntryAttributes(), _fields(atime=True, mtime=True),
                                 None, None)  # type: ignore[arg-type]  # fmt: skip
    assert touched.st_size == SIZE


async def test_flush_only_after_writes(image_file: str) -> None:
    view, image = file_view(image_file)
    reader = await open_fh(view, os.O_RDONLY)
    await view.read(reader, 0, 10)
    await view.flush(reader)
    assert image.flushes == 0
    writer = await open_fh(view)
    await view.write(writer, 0, b"x")
    await view.flush(writer)
    await view.flush(writer)
    assert image.flushes == 1
    await view.fsync(writer, False)
    assert image.flushes == 2
    await view.release(writer)
    await view.release(reader)


async def test_corruption_is_eio_and_logged_once(
    image_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    view, image = file_view(image_file)
    fh = await open_fh(view, os.O_RDONLY)
    image.fail_read = MetadataCorruption(image_file, "L2 table 0x50000 entry 3", "bad offset")
    for _ in range(3):
        with pytest.raises(FUSEError) as info:
            await view.read(fh, 0, 512)
        assert info.value.errno == errno.EIO
    messages = [r.getMessage() for r in caplog.records if "entry 3" in r.getMessage()]
    assert messages == [f"{image_file}: L2 table 0x50000 entry 3: bad offset"]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(errno.EROFS, "read-only"), errno.EROFS),
        (OSError(errno.EIO, "disk"), errno.EIO),
        (RuntimeError("a bug below"), errno.EIO),
    ],
)
async def test_other_errors_become_errnos(image_file: str, error: Exception, expected: int) -> None:
    view, image = file_view(image_file)
    fh = await open_fh(view, os.O_RDONLY)
    image.fail_read = error
    with pytest.raises(FUSEError) as info:
        await view.read(fh, 0, 512)
    assert info.value.errno == expected


async def test_directory_form(image_file: str) -> None:
    active = MemoryImage(image_file)
    snap = MemoryImage(image_file, read_only=True)
    snap.data[:4] = b"snap"
    nodes = [
        ImageFile(2, b"disk.raw", active, False, SIZE),
        ImageFile(3, b"disk@s1.raw", snap, True, SIZE),
        TextFile(4, b"disk.vmdk", b"descriptor"),
    ]
    view = View(image_file, nodes, directory=True)
    root = await view.getattr(pyfuse3.ROOT_INODE, None)  # type: ignore[arg-type]
    assert stat.S_ISDIR(root.st_mode)
    assert stat.S_IMODE(root.st_mode) == 0o550  # image 0640: r-x for owner and group
    entry = await view.lookup(pyfuse3.ROOT_INODE, b"disk@s1.raw", None)  # type: ignore[arg-type]
    assert entry.st_ino == 3
    assert stat.S_IMODE(entry.st_mode) == 0o440
    with pytest.raises(FUSEError) as info:
        await view.lookup(pyfuse3.ROOT_INODE, b"nope.raw", None)  # type: ignore[arg-type]
    assert info.value.errno == errno.ENOENT
    fh = await open_fh(view, os.O_RDONLY, inode=3)
    assert await view.read(fh, 0, 4) == b"snap"
    with pytest.raises(FUSEError) as info:
        await open_fh(view, os.O_RDWR, inode=3)
    assert info.value.errno == errno.EROFS
    text = await open_fh(view, os.O_RDONLY, inode=4)
    assert await view.read(text, 2, 100) == b"scriptor"
    with pytest.raises(FUSEError) as info:
        await open_fh(view, os.O_RDONLY, inode=pyfuse3.ROOT_INODE)
    assert info.value.errno == errno.EISDIR


async def test_statfs(image_file: str) -> None:
    view, _ = file_view(image_file)
    data = await view.statfs(None)  # type: ignore[arg-type]
    assert data.f_frsize == 512
    assert data.f_blocks == SIZE // 512
    assert data.f_bfree == SIZE // 512 - (3 * CLUSTER + 1 + 511) // 512


async def test_debug_view_logs_requests(image_file: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="qfuse.fuse.requests")
    image = MemoryImage(image_file)
    node = ImageFile(pyfuse3.ROOT_INODE, b"", image, False, SIZE)
    view = with_request_log(View)(image_file, [node], directory=False)
    fh = await open_fh(view, os.O_RDONLY)
    await view.read(fh, 0, 100)
    with pytest.raises(FUSEError):
        await view.write(fh, SIZE, b"x")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "read(1, 0, 100) -> <100 bytes>" in text
    assert "write(1, 1048576, b'x') -> ENOSPC" in text
