"""The rules of a writable view: its size is fixed, nothing past the end is
written, feature bits are handled as the qcow2 spec says, a rw mount that
writes nothing changes nothing, and a write that would overwrite metadata
is refused and latches the image corrupt.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from images import (
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    L1E_OFFSET_MASK,
    QCOW_OFLAG_COPIED,
    create,
    extensions,
    find_extension,
    info,
    l2_entry_offset,
    patch_header,
    qemu_img,
    qemu_io,
    read_header,
    read_u64,
    rewrite_extensions,
    run,
    sha256,
    write_u64,
)
from mountutil import assert_refused, convert_raw, mount_view
from workload import (
    assert_check_clean,
    assert_check_no_corruption,
    assert_identical,
    make_reference,
)

pytestmark = pytest.mark.mount

SIZE = 16 << 20
CLUSTER = 64 << 10

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_UNKNOWN = 1 << 5
EXT_UNKNOWN = 0x7A7A0001  # no such extension in the spec


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = create(tmp_path / "disk.qcow2", SIZE)
    qemu_io(path, "write -P 0x61 0 256k", "write -P 0x62 15M 1M")
    return path


def view_path(tmp_path: Path) -> Path:
    view = tmp_path / "view.raw"
    view.touch()
    return view


# -- the size is fixed ------------------------------------------------------------------


def _truncate_refused(image: Path, tmp_path: Path, size_arg: str) -> None:
    before = sha256(image)
    view = view_path(tmp_path)
    with mount_view(image, view):
        res = run(["truncate", "-s", size_arg, view], check=False)
        assert res.returncode != 0, f"truncate -s {size_arg} succeeded"
        assert "Operation not permitted" in res.stderr, res.stderr
        assert os.stat(view).st_size == SIZE
    assert sha256(image) == before, "a refused truncate changed the image"
    assert_check_clean(image)


def test_truncate_to_zero_is_refused(image: Path, tmp_path: Path) -> None:
    _truncate_refused(image, tmp_path, "0")


def test_truncate_grow_is_refused(image: Path, tmp_path: Path) -> None:
    _truncate_refused(image, tmp_path, "+1M")


def test_truncate_errno_is_eperm(image: Path, tmp_path: Path) -> None:
    with mount_view(image, view_path(tmp_path)) as view:
        with pytest.raises(OSError) as exc:
            os.truncate(view, SIZE // 2)
        assert exc.value.errno == errno.EPERM


def test_truncate_to_current_size_is_a_noop(image: Path, tmp_path: Path) -> None:
    before = sha256(image)
    with mount_view(image, view_path(tmp_path)) as view:
        run(["truncate", "-s", str(SIZE), view])
        os.truncate(view, SIZE)
        assert os.stat(view).st_size == SIZE
    assert sha256(image) == before
    assert_check_clean(image)


def test_open_with_o_trunc_is_refused(image: Path, tmp_path: Path) -> None:
    before = sha256(image)
    with mount_view(image, view_path(tmp_path)) as view:
        with pytest.raises(OSError) as exc:
            os.close(os.open(view, os.O_WRONLY | os.O_TRUNC))
        assert exc.value.errno == errno.EPERM
        assert os.stat(view).st_size == SIZE
    assert sha256(image) == before


# -- the end of the view ------------------------------------------------------------------


@pytest.mark.parametrize("offset", [SIZE, SIZE + 4096, SIZE + (1 << 30)])
def test_write_past_the_end_gets_enospc(image: Path, tmp_path: Path, offset: int) -> None:
    before = sha256(image)
    with mount_view(image, view_path(tmp_path)) as view:
        fd = os.open(view, os.O_RDWR)
        try:
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"\xff" * 4096, offset)
            assert exc.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert os.stat(view).st_size == SIZE
    assert sha256(image) == before
    assert info(image)["virtual-size"] == SIZE


def test_write_straddling_the_end_is_cut_short(image: Path, tmp_path: Path) -> None:
    """The kernel passes the write on; qfuse writes up to the end and returns
    the short count, as a block device does."""
    reference = make_reference(image, tmp_path / "ref.raw")
    data = os.urandom(8192)
    with mount_view(image, view_path(tmp_path)) as view:
        fd = os.open(view, os.O_RDWR)
        try:
            n = os.pwrite(fd, data, SIZE - 1000)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert n == 1000, f"pwrite straddling the end returned {n}"
        assert os.stat(view).st_size == SIZE
        with open(view, "rb") as f:
            f.seek(SIZE - 1000)
            assert f.read() == data[:1000]
    assert info(image)["virtual-size"] == SIZE
    with open(reference, "r+b") as f:
        f.seek(SIZE - 1000)
        f.write(data[:1000])
    assert os.path.getsize(reference) == SIZE
    assert_check_clean(image)
    assert_identical(reference, image)


# -- feature bits -----------------------------------------------------------------------------


def test_corrupt_image_refuses_writable_mount(image: Path, tmp_path: Path) -> None:
    patch_header(image, incompatible_features=read_header(image)["incompatible_features"]
                 | INCOMPAT_CORRUPT)  # fmt: skip
    assert_refused(image, tmp_path / "view.raw", match=["corrupt"])


def _write_one(view: Path, offset: int = 100_000, data: bytes = b"\x5e" * 70_000) -> None:
    fd = os.open(view, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.fixture
def unknown_autoclear_image(image: Path) -> tuple[Path, bytes]:
    """The image with autoclear bit 5 (unknown) set and an unknown header
    extension added after qemu-img's; returns (image, the extension's bytes)."""
    payload = b"qfuse-test-extension\x00\x01\x02\x03" + bytes(range(40))
    exts = [(e.type, e.data) for e in extensions(image)] + [(EXT_UNKNOWN, payload)]
    rewrite_extensions(image, exts)
    patch_header(image, autoclear_features=AUTOCLEAR_UNKNOWN)
    # qemu-img still reads it (unknown autoclear bits are harmless to readers).
    qemu_img("check", image)
    return image, payload


def test_unknown_autoclear_bit_cleared_by_a_write(
    unknown_autoclear_image: tuple[Path, bytes], tmp_path: Path
) -> None:
    image, _ = unknown_autoclear_image
    with mount_view(image, view_path(tmp_path)) as view:
        _write_one(view)
    assert read_header(image)["autoclear_features"] & AUTOCLEAR_UNKNOWN == 0
    assert_check_clean(image)


def test_unknown_header_extension_kept_by_a_write(
    unknown_autoclear_image: tuple[Path, bytes], tmp_path: Path
) -> None:
    image, payload = unknown_autoclear_image
    ext_before = find_extension(image, EXT_UNKNOWN)
    with open(image, "rb") as f:
        area_before = f.read(CLUSTER)[read_header(image)["header_length"] :]
    with mount_view(image, view_path(tmp_path)) as view:
        _write_one(view)
    ext_after = find_extension(image, EXT_UNKNOWN)
    assert ext_after == ext_before and ext_after.data == payload
    with open(image, "rb") as f:
        area_after = f.read(CLUSTER)[read_header(image)["header_length"] :]
    assert area_after == area_before, "the header extension area changed"


def test_bitmaps_autoclear_bit_cleared_by_a_write(image: Path, tmp_path: Path) -> None:
    qemu_img("bitmap", "--add", image, "b0")
    assert read_header(image)["autoclear_features"] & AUTOCLEAR_BITMAPS
    find_extension(image, EXT_BITMAPS)
    reference = make_reference(image, tmp_path / "ref.raw")
    with mount_view(image, view_path(tmp_path)) as view:
        _write_one(view)
    assert read_header(image)["autoclear_features"] & AUTOCLEAR_BITMAPS == 0
    # QEMU now ignores the bitmaps ("considered inconsistent"); their clusters
    # show as leaks to qemu-img check, which is QEMU's own behaviour for this.
    assert_check_no_corruption(image)
    with open(reference, "r+b") as f:
        f.seek(100_000)
        f.write(b"\x5e" * 70_000)
    assert_identical(reference, image)


# -- a mount that writes nothing ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["writeback", "none", "unsafe"])
def test_rw_mount_without_writes_leaves_image_identical(
    image: Path, tmp_path: Path, mode: str
) -> None:
    before = sha256(image)
    with mount_view(image, view_path(tmp_path), "--cache", mode) as view:
        # Read everything, open for writing, fsync, close: still no write.
        with open(view, "rb") as f:
            while f.read(1 << 20):
                pass
        fd = os.open(view, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    assert sha256(image) == before


# -- overlap protection -------------------------------------------------------------------


def metadata_cluster(image: Path, target: str) -> int:
    """Host offset of one cluster of metadata of the kind ``target``."""
    h = read_header(image)
    if target == "L1 table":
        return h["l1_table_offset"]
    if target == "L2 table":
        return read_u64(image, h["l1_table_offset"]) & L1E_OFFSET_MASK
    if target == "refcount table":
        return h["refcount_table_offset"]
    if target == "refcount block":
        return read_u64(image, h["refcount_table_offset"]) & REFT_OFFSET_MASK
    if target == "snapshot table":
        return h["snapshots_offset"]
    if target == "snapshot L1 table":
        return read_u64(image, h["snapshots_offset"])  # first entry: l1_table_offset
    raise ValueError(target)


def point_cluster_0_at(image: Path, target: str) -> tuple[int, bytes]:
    """Patch guest cluster 0's L2 entry (active table, COPIED) to point at a
    metadata cluster; returns (its host offset, its bytes)."""
    if target.startswith("snapshot"):
        qemu_img("snapshot", "-c", "S", image)
        # Rewrite cluster 0 so the active table owns it again (COPIED).
        qemu_io(image, "write -P 0x63 0 64k")
    host = metadata_cluster(image, target)
    assert host and host % CLUSTER == 0, (target, host)
    entry_at = l2_entry_offset(image, 0)
    assert entry_at is not None and read_u64(image, entry_at) & QCOW_OFLAG_COPIED
    write_u64(image, entry_at, host | QCOW_OFLAG_COPIED)
    return host, _cluster(image, host)


@pytest.fixture
def overlapping_image(image: Path) -> tuple[Path, int, bytes]:
    """Guest cluster 0 points at the active L1 table: (image, L1 offset, its bytes)."""
    host, data = point_cluster_0_at(image, "L1 table")
    return image, host, data


def _cluster(image: Path, host_offset: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(host_offset)
        return f.read(CLUSTER)


def _pwrite_errno(view: Path, offset: int, length: int = 4096) -> int | None:
    fd = os.open(view, os.O_RDWR)
    try:
        os.pwrite(fd, b"\xcc" * length, offset)
        return None
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


def test_overlapping_write_gets_eio_and_l1_untouched(
    overlapping_image: tuple[Path, int, bytes], tmp_path: Path
) -> None:
    image, l1, l1_bytes = overlapping_image
    with mount_view(image, view_path(tmp_path)) as view:
        assert _pwrite_errno(view, 0) == errno.EIO
        assert _cluster(image, l1) == l1_bytes
    assert _cluster(image, l1) == l1_bytes


@pytest.mark.parametrize(
    "target",
    ["L2 table", "refcount table", "refcount block", "snapshot table", "snapshot L1 table"],
)
def test_overlapping_write_into_other_metadata_gets_eio(
    image: Path, tmp_path: Path, target: str
) -> None:
    host, before = point_cluster_0_at(image, target)
    with mount_view(image, view_path(tmp_path)) as view:
        assert _pwrite_errno(view, 4096, 8192) == errno.EIO
    assert _cluster(image, host) == before, f"the {target} was overwritten"
    assert read_header(image)["incompatible_features"] & INCOMPAT_CORRUPT


def test_overlapping_write_marks_image_corrupt(
    overlapping_image: tuple[Path, int, bytes], tmp_path: Path
) -> None:
    image, _, _ = overlapping_image
    assert info(image)["format-specific"]["data"]["corrupt"] is False
    with mount_view(image, view_path(tmp_path)) as view:
        assert _pwrite_errno(view, 512) == errno.EIO
    assert read_header(image)["incompatible_features"] & INCOMPAT_CORRUPT
    assert info(image)["format-specific"]["data"]["corrupt"] is True


def test_after_overlap_further_writes_fail(
    overlapping_image: tuple[Path, int, bytes], tmp_path: Path
) -> None:
    image, l1, l1_bytes = overlapping_image
    with mount_view(image, view_path(tmp_path)) as view:
        assert _pwrite_errno(view, 0) == errno.EIO
        # Elsewhere, harmless writes: refused now (the mount went read-only).
        for offset in (4 << 20, 15 << 20, 8 << 20):
            assert _pwrite_errno(view, offset) in (errno.EROFS, errno.EIO)
        # Reads still work.
        with open(view, "rb") as f:
            f.seek(15 << 20)
            assert f.read(4096) == b"\x62" * 4096
    raw = convert_raw(image)
    assert raw[4 << 20 : (4 << 20) + 4096] == bytes(4096)
    assert raw[15 << 20 : (15 << 20) + 4096] == b"\x62" * 4096
    assert _cluster(image, l1) == l1_bytes


def test_qemu_agrees_patched_entry_overlaps(overlapping_image: tuple[Path, int, bytes]) -> None:
    """Sanity of the set-up: QEMU itself refuses this write for the same reason."""
    image, _, _ = overlapping_image
    res = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 4k", image],
                         capture_output=True, text=True)  # fmt: skip
    out = res.stdout + res.stderr
    assert "overlap" in out.lower() or "corrupt" in out.lower(), out
