"""``--vmdk``: the flat VMDK descriptor beside a mounted view, checked by qemu-img.

The oracle is QEMU's own VMDK driver: ``qemu-img info`` must read the
descriptor as a vmdk whose one FLAT extent is the view, with the image's
virtual size, and ``qemu-img compare DESCRIPTOR IMAGE`` (through the view,
against QEMU's qcow2 driver reading the image) must find them identical
while mounted.  ``-U``: the daemon holds the image's write lock.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from images import MiB, create, qemu_img, qemu_io
from mountutil import assert_refused, convert_raw, run

pytestmark = pytest.mark.mount

SIZE = 96 * MiB


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = create(tmp_path / "disk.qcow2", SIZE)
    qemu_io(path, "write -P 0x5a 0 1M", "write -P 0xa5 70M 192k")
    return path


def vmdk_info(descriptor: Path) -> dict[str, Any]:
    return json.loads(qemu_img("info", "-U", "--output", "json", descriptor))


def assert_describes(descriptor: Path, view: Path | None, virtual_size: int) -> None:
    info = vmdk_info(descriptor)
    assert info["format"] == "vmdk"
    assert info["virtual-size"] == virtual_size
    data = info["format-specific"]["data"]
    assert data["create-type"] == "monolithicFlat"
    [extent] = data["extents"]
    assert extent["format"] == "FLAT"
    assert extent["virtual-size"] == virtual_size
    if view is not None:
        assert os.path.realpath(descriptor.parent / extent["filename"]) == os.path.realpath(view)


def as_qemu_reads_it(descriptor: Path, out: Path) -> Path:
    """A copy of a read-only view's descriptor that QEMU can open.

    QEMU's VMDK driver (7.2; block/vmdk.c, vmdk_parse_extents) skips every
    extent whose access is not RW, and then trips an assertion: it cannot
    open an ``RDONLY`` extent at all, although VMware and VirtualBox do.  So
    the copy says RW, and names the view by its absolute path (the copy
    lives elsewhere); everything else is the descriptor as written.
    """
    text = descriptor.read_bytes()
    assert b"\nRDONLY " in text
    head, extent = text.split(b"\nRDONLY ", 1)
    line, rest = extent.split(b"\n", 1)
    sectors, kind, name, offset = line.split(b" ")
    absolute = os.fsencode(descriptor.parent) + b"/" + name.strip(b'"')
    out.write_bytes(b'%s\nRW %s %s "%s" %s\n%s' % (head, sectors, kind, absolute, offset, rest))
    return out


def compare(a: Path, b: Path, *args: str) -> str:
    res = run(["qemu-img", "compare", "-U", *args, a, b], check=False)
    assert res.returncode == 0, f"qemu-img compare {a} {b}: {res.stdout}{res.stderr}"
    return res.stdout


def test_file_form_descriptor_is_the_view(mount: Any, image: Path, tmp_path: Path) -> None:
    view = mount(image, "--vmdk", mountpoint=tmp_path / "disk.raw")
    descriptor = tmp_path / "disk.vmdk"
    assert_describes(descriptor, view, SIZE)
    assert "Images are identical" in compare(descriptor, image, "-f", "vmdk", "-F", "qcow2")


def test_writes_through_the_view_show_in_the_descriptor(
    mount: Any, image: Path, tmp_path: Path
) -> None:
    view = mount(image, "--vmdk", mountpoint=tmp_path / "disk.raw")
    fd = os.open(view, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x3c" * 200_000, 40 * MiB + 512)
        os.fsync(fd)  # metadata reaches the image, for qemu-img's -U read of it
    finally:
        os.close(fd)
    descriptor = tmp_path / "disk.vmdk"
    compare(descriptor, image)
    with open(descriptor.parent / "disk.raw", "rb") as f:
        f.seek(40 * MiB + 512)
        assert f.read(200_000) == b"\x3c" * 200_000


def test_snapshot_descriptor_is_read_only(mount: Any, image: Path, tmp_path: Path) -> None:
    qemu_img("snapshot", "-c", "before", image)
    qemu_io(image, "write -P 0x77 0 64k")
    view = mount(image, "--snapshot", "before", "--vmdk", mountpoint=tmp_path / "old.raw")
    descriptor = tmp_path / "old.vmdk"
    assert 'RDONLY 196608 FLAT "old.raw" 0' in descriptor.read_text()
    readable = as_qemu_reads_it(descriptor, tmp_path / "rw-copy.vmdk")
    assert_describes(readable, view, SIZE)
    expected = tmp_path / "before.raw"
    expected.write_bytes(convert_raw(image, snapshot="before"))
    compare(readable, expected, "-f", "vmdk", "-F", "raw")


def test_directory_form_descriptors(mount: Any, image: Path, tmp_path: Path) -> None:
    qemu_img("snapshot", "-c", "before", image)
    qemu_io(image, "write -P 0x77 0 64k")
    directory = tmp_path / "mnt"
    directory.mkdir()
    mount(image, "--vmdk", mountpoint=directory)
    assert_describes(directory / "disk.vmdk", directory / "disk.raw", SIZE)
    compare(directory / "disk.vmdk", image, "-f", "vmdk", "-F", "qcow2")
    assert 'RDONLY 196608 FLAT "disk@before.raw" 0' in (directory / "disk@before.vmdk").read_text()
    readable = as_qemu_reads_it(directory / "disk@before.vmdk", tmp_path / "rw-copy.vmdk")
    assert_describes(readable, directory / "disk@before.raw", SIZE)
    expected = tmp_path / "before.raw"
    expected.write_bytes(convert_raw(image, snapshot="before"))
    compare(readable, expected, "-f", "vmdk", "-F", "raw")


@pytest.mark.parametrize("name", ["my disk.raw", "café.raw", "disk"])
def test_awkward_view_names(mount: Any, image: Path, tmp_path: Path, name: str) -> None:
    """Spaces, non-ASCII, no extension: the descriptor names the view as it is."""
    view = mount(image, "--vmdk", mountpoint=tmp_path / name)
    descriptor = tmp_path / f"{name.removesuffix('.raw')}.vmdk"
    assert_describes(descriptor, view, SIZE)
    compare(descriptor, image)


def test_name_that_is_not_utf8(tmp_path: Path) -> None:
    """A file name's own bytes go into the descriptor (no mount here: a
    mountpoint that is not UTF-8 would upset every reader of /proc/mounts)."""
    from qfuse.fuse import vmdk

    name = os.fsdecode(b"caf\xe9 \xff.raw")
    extent = tmp_path / name
    extent.write_bytes(b"\x42" * MiB)
    descriptor = tmp_path / "d.vmdk"
    descriptor.write_bytes(vmdk.descriptor(name, MiB, read_only=False))
    assert b'RW 2048 FLAT "caf\xe9 \xff.raw" 0' in descriptor.read_bytes()
    # qemu-img's JSON shows the name's undecodable bytes as U+FFFD: the
    # compare, which opens the extent by that name, is the proof here.
    assert_describes(descriptor, None, MiB)
    compare(descriptor, extent, "-f", "vmdk", "-F", "raw")


def test_descriptor_removed_at_unmount(image: Path, tmp_path: Path) -> None:
    from mountutil import mount_view

    descriptor = tmp_path / "disk.vmdk"
    with mount_view(image, tmp_path / "disk.raw", "--vmdk"):
        assert descriptor.exists()
    assert not descriptor.exists()
    qemu_img("check", image)


def test_unnameable_view_is_refused(image: Path, tmp_path: Path) -> None:
    """A double quote cannot appear in a descriptor's extent name (QEMU,
    VMware and VirtualBox have no escape): one line, nothing mounted."""
    mountpoint = tmp_path / 'we"ird.raw'
    assert_refused(image, mountpoint, "--vmdk", match="VMDK", names=['we"ird.raw'])
    assert not mountpoint.exists()
    assert not (tmp_path / 'we"ird.vmdk').exists()
