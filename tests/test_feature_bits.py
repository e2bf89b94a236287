"""Header feature bits set on real qemu-img images: what each one allows.

* incompatible bit 1 (corrupt): a read-only mount works, a writable one is refused;
* incompatible bit 0 (dirty): the image reads (and reads right);
* an unknown autoclear bit: a read-only mount works and leaves every byte alone;
* an unknown compatible bit: ignored.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from images import (
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    MiB,
    create,
    info,
    patch_header,
    qemu_io,
    read_header,
    sha256,
)
from mountutil import assert_refused, assert_same_as_qemu, convert_raw, mount_view

pytestmark = pytest.mark.mount


def image_with_data(tmp_path: Path, options: str | None = None) -> Path:
    img = create(tmp_path / "disk.img", 4 * MiB, options=options)
    qemu_io(
        img,
        "write -P 0x11 0 64k",
        "write -P 0x22 100k 40k",
        "write -P 0x33 2M 64k",
        "write -z 2M 4k",
        "write -P 0x44 4032k 64k",
    )
    return img


def set_bits(img: Path, field: str, bits: int) -> None:
    patch_header(img, **{field: read_header(img)[field] | bits})


def test_corrupt_bit_allows_read_only_mount(tmp_path):
    img = image_with_data(tmp_path)
    set_bits(img, "incompatible_features", INCOMPAT_CORRUPT)
    assert info(img)["format-specific"]["data"]["corrupt"] is True
    expected = convert_raw(img)
    before = sha256(img)
    mp = tmp_path / "view.raw"
    mp.touch()
    with mount_view(img, mp, "--read-only") as view:
        assert_same_as_qemu(view, img, expected=expected)
    assert sha256(img) == before


def test_corrupt_bit_refuses_writable_mount(tmp_path):
    img = image_with_data(tmp_path)
    set_bits(img, "incompatible_features", INCOMPAT_CORRUPT)
    mp = tmp_path / "view.raw"
    mp.touch()
    assert_refused(img, mp, match=r"corrupt")


def test_dirty_bit_image_reads(tmp_path, mount):
    img = image_with_data(tmp_path, options="lazy_refcounts=on")
    set_bits(img, "incompatible_features", INCOMPAT_DIRTY)
    assert info(img)["dirty-flag"] is True
    expected = convert_raw(img)
    view = mount(img)
    assert_same_as_qemu(view, img, expected=expected)


def test_dirty_bit_read_only_mount_leaves_image_untouched(tmp_path):
    img = image_with_data(tmp_path, options="lazy_refcounts=on")
    set_bits(img, "incompatible_features", INCOMPAT_DIRTY)
    before = sha256(img)
    mp = tmp_path / "view.raw"
    mp.touch()
    with mount_view(img, mp, "--read-only") as view:
        assert_same_as_qemu(view, img)
    assert sha256(img) == before


def test_unknown_autoclear_bit_read_only_mount_leaves_image_untouched(tmp_path):
    img = image_with_data(tmp_path)
    set_bits(img, "autoclear_features", 1 << 7)
    before = sha256(img)
    mp = tmp_path / "view.raw"
    mp.touch()
    with mount_view(img, mp, "--read-only") as view:
        assert_same_as_qemu(view, img)
    assert sha256(img) == before
    assert read_header(img)["autoclear_features"] & (1 << 7)


def test_unknown_compatible_bit_is_ignored(tmp_path, mount):
    img = image_with_data(tmp_path)
    set_bits(img, "compatible_features", 1 << 7)
    view = mount(img)
    assert_same_as_qemu(view, img)
