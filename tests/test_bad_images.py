"""Bad and hostile images: each is a good qemu-img image with one field patched.

A refused image must give a non-zero exit, exactly one stderr line that
names the file and says what is wrong, no traceback, the image file
byte-for-byte unchanged and nothing mounted (`assert_refused`).  A bad
table entry or a bad compressed cluster found while reading is not a
refusal: the mount works and only that cluster gives EIO.

Images are named ``disk.img`` so that words like "qcow2" in a message come
from the message, not from the file name.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from images import (
    EXT_BACKING_FORMAT,
    EXT_FEATURE_NAME_TABLE,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    KiB,
    MiB,
    add_feature_name,
    compressed_extent,
    create,
    find_extension,
    info,
    l2_entries,
    l2_entry_offset,
    patch_header,
    qemu_img,
    qemu_io,
    read_header,
    read_u64,
    run,
    write_bytes,
    write_u64,
)
from mountutil import assert_bytes_equal, assert_refused, convert_raw

pytestmark = pytest.mark.mount

CLUSTER = 64 * KiB


def good_image(tmp_path: Path, name: str = "disk.img", **kw) -> Path:
    img = create(tmp_path / name, 4 * MiB, **kw)
    qemu_io(img, "write -P 0x11 0 64k", "write -P 0x22 1M 64k")
    return img


@pytest.fixture
def refuse(tmp_path):
    """``refuse(image, *args, match=..., names=None, unchanged=None)`` on a fresh mountpoint."""
    mp = tmp_path / "view.raw"
    mp.touch()

    def _refuse(image: Path, *args: str, **kw):
        return assert_refused(image, mp, *args, **kw)

    return _refuse


# --------------------------------------------------------------------------
# Header fields
# --------------------------------------------------------------------------


def test_bad_magic(tmp_path, refuse):
    img = good_image(tmp_path)
    patch_header(img, magic=0x514649FA)
    refuse(img, match=r"magic|not a qcow2|qcow2 image|format")


@pytest.mark.parametrize("version", [1, 4])
def test_unsupported_version(tmp_path, refuse, version):
    img = good_image(tmp_path)
    patch_header(img, version=version)
    refuse(img, match=r"version")


@pytest.mark.parametrize("bits", [8, 22])
def test_cluster_bits_out_of_range(tmp_path, refuse, bits):
    img = good_image(tmp_path)
    patch_header(img, cluster_bits=bits)
    refuse(img, match=r"cluster")


@pytest.mark.parametrize(
    "length", [108, 96, CLUSTER + 8], ids=["not-multiple-of-8", "below-104", "above-cluster"]
)
def test_bad_header_length(tmp_path, refuse, length):
    img = good_image(tmp_path)
    patch_header(img, header_length=length)
    refuse(img, match=r"header")


def test_refcount_order_7(tmp_path, refuse):
    img = good_image(tmp_path)
    patch_header(img, refcount_order=7)
    refuse(img, match=r"refcount")


def test_l1_table_larger_than_32mib(tmp_path, refuse):
    img = good_image(tmp_path)
    patch_header(img, l1_size=32 * MiB // 8 + 1)
    refuse(img, match=r"L1")


def test_l1_table_too_small_for_virtual_size(tmp_path, refuse):
    img = good_image(tmp_path)
    assert read_header(img)["l1_size"] == 1  # one entry maps 512 MiB with 64 KiB clusters
    patch_header(img, size=2 * 1024 * MiB)
    refuse(img, match=r"L1")


def test_l1_table_past_end_of_file(tmp_path, refuse):
    img = good_image(tmp_path)
    patch_header(img, l1_table_offset=1024 * MiB)
    refuse(img, match=r"L1")


def test_truncated_file_cuts_l1_table(tmp_path, refuse):
    # A truncated download must not look like an empty disk.
    img = good_image(tmp_path)
    l1 = read_header(img)["l1_table_offset"]
    os.truncate(img, l1 + 4)
    refuse(img, match=r"L1|truncat|end of (the )?file|EOF|past|beyond|short")


def test_refcount_table_larger_than_8mib(tmp_path, refuse):
    img = good_image(tmp_path)
    patch_header(img, refcount_table_clusters=8 * MiB // CLUSTER + 1)
    refuse(img, match=r"refcount")


def test_refcount_table_past_end_of_file(tmp_path, refuse):
    img = good_image(tmp_path)
    patch_header(img, refcount_table_offset=1024 * MiB)
    refuse(img, match=r"refcount")


def test_too_many_snapshots(tmp_path, refuse):
    img = good_image(tmp_path)
    patch_header(img, nb_snapshots=65537, snapshots_offset=4 * CLUSTER)
    refuse(img, match=r"snapshot")


def test_snapshot_table_past_end_of_file(tmp_path, refuse):
    img = good_image(tmp_path)
    patch_header(img, nb_snapshots=1, snapshots_offset=1024 * MiB)
    refuse(img, match=r"snapshot")


def test_header_extension_past_header_cluster(tmp_path, refuse):
    img = good_image(tmp_path)
    ext = find_extension(img, EXT_FEATURE_NAME_TABLE)
    write_bytes(img, ext.offset + 4, CLUSTER.to_bytes(4, "big"))
    refuse(img, match=r"extension|header")


def test_unsupported_compression_type(tmp_path, refuse):
    img = good_image(tmp_path)
    patch_header(img, compression_type=7)
    refuse(img, match=r"compression")


# --------------------------------------------------------------------------
# Backing files
# --------------------------------------------------------------------------


def overlay(tmp_path: Path, base_fmt: str = "qcow2") -> tuple[Path, Path]:
    base_name = "base.raw" if base_fmt == "raw" else "base.img"
    base = create(base_name, 4 * MiB, fmt=base_fmt, cwd=tmp_path)
    img = create("disk.img", None, backing=base_name, backing_fmt=base_fmt, cwd=tmp_path)
    qemu_io(img, "write -P 0x33 0 64k")
    return base, img


def test_backing_file_name_too_long(tmp_path, refuse):
    _, img = overlay(tmp_path)
    h = read_header(img)
    write_bytes(img, h["backing_file_offset"], b"b" * 1024)
    patch_header(img, backing_file_size=1024)
    refuse(img, match=[r"backing", r"long|length|1023|1024|size"])


def _set_backing_name(img: Path, name: bytes) -> None:
    h = read_header(img)
    write_bytes(img, h["backing_file_offset"], name)
    patch_header(img, backing_file_size=len(name))


def test_backing_json_name_refused(tmp_path, refuse):
    base, img = overlay(tmp_path)
    _set_backing_name(
        img, b'json:{"driver":"qcow2","file":{"driver":"file","filename":"%s"}}' % bytes(base)
    )
    refuse(img, match=r"json")


def test_backing_nbd_url_refused(tmp_path, refuse):
    _, img = overlay(tmp_path)
    _set_backing_name(img, b"nbd://host/x")
    refuse(img, match=r"nbd")


def test_missing_backing_file(tmp_path, refuse):
    base, img = overlay(tmp_path)
    base.unlink()
    refuse(
        img,
        match=r"no such file|not found|missing|does not exist|cannot|can't|could not|unable",
        names=["disk.img", "base.img"],
    )


def test_backing_loop(tmp_path, refuse):
    a = create("a.img", 1 * MiB, cwd=tmp_path)
    b = create("b.img", None, backing="a.img", backing_fmt="qcow2", cwd=tmp_path)
    qemu_img("rebase", "-u", "-b", "b.img", "-F", "qcow2", a)
    refuse(
        b,
        match=r"loop|cycle|circular|recurs|itself|deep|depth|long|too many",
        names=["a.img", "b.img"],
        unchanged=[a],
    )


def test_backing_chain_deeper_than_16(tmp_path, refuse):
    names = [f"layer{i:02d}.img" for i in range(20)]
    create(names[0], 1 * MiB, cwd=tmp_path)
    for prev, name in zip(names, names[1:], strict=False):
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", prev, "-F", "qcow2", name, "1M",
                 cwd=tmp_path)  # fmt: skip
    refuse(
        tmp_path / names[-1],
        match=r"deep|depth|long|too many|levels|chain|16",
        names=names,
    )


def test_raw_backing_without_recorded_format(tmp_path, refuse):
    # Probing a raw file's format is unsafe (its guest data could look like a
    # qcow2 header): with no backing format recorded, refuse.
    base, img = overlay(tmp_path, base_fmt="raw")
    ext = find_extension(img, EXT_BACKING_FORMAT)
    write_bytes(img, ext.offset, (0x12345678).to_bytes(4, "big"))  # now an unknown extension
    assert "backing-filename-format" not in info(img)
    refuse(img, match=r"format", names=["disk.img", "base.raw"], unchanged=[base])


# --------------------------------------------------------------------------
# Feature bits, encryption
# --------------------------------------------------------------------------


def test_unknown_incompatible_bit(tmp_path, refuse):
    img = good_image(tmp_path)
    patch_header(img, incompatible_features=read_header(img)["incompatible_features"] | 1 << 10)
    refuse(img, match=[r"incompatible|unsupported|unknown|feature", r"\b10\b|\b(0x)?0*400\b"])


def test_unknown_incompatible_bit_named_in_feature_table(tmp_path, refuse):
    img = good_image(tmp_path)
    add_feature_name(img, 0, 10, "quantum entanglement")
    patch_header(img, incompatible_features=read_header(img)["incompatible_features"] | 1 << 10)
    refuse(img, match=r"quantum entanglement")


@pytest.mark.parametrize("method", [1, 2], ids=["aes", "luks"])
def test_crypt_method_patched_refused(tmp_path, refuse, method):
    img = good_image(tmp_path)
    patch_header(img, crypt_method=method)
    refuse(img, match=r"encrypt|AES|luks")


def test_luks_encrypted_image_refused(tmp_path, refuse):
    img = tmp_path / "disk.img"
    opts = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"
    argv = ["create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=x", "-o", opts, img, "1M"]
    attempts = 30
    for attempt in range(attempts):
        # qemu's PBKDF benchmark gives up ("Unable to get accurate CPU usage")
        # when its timed run shows no thread CPU time: on a busy machine,
        # with tick-based CPU accounting, several times in a row.
        res = run(["qemu-img", *argv], check=attempt == attempts - 1)
        if res.returncode == 0:
            break
        img.unlink(missing_ok=True)
    refuse(img, match=r"encrypt|luks")


# --------------------------------------------------------------------------
# Hostile sizes
# --------------------------------------------------------------------------


def test_huge_virtual_size_fails_fast(tmp_path, refuse):
    img = good_image(tmp_path)
    patch_header(img, size=1 << 62)
    res = refuse(img, match=r"size|large|big|L1|exceed|too")
    assert res.elapsed < 10, f"took {res.elapsed:.1f}s"
    assert res.maxrss_kib is None or res.maxrss_kib < 300 * 1024, f"peak RSS {res.maxrss_kib} KiB"


def test_huge_image_with_consistent_l1_and_tiny_file_fails_fast(tmp_path, refuse):
    # 1 PiB needs 2^21 L1 entries (16 MiB, inside the 32 MiB limit), but the
    # file is a few hundred KiB: the L1 table cannot be there.
    img = good_image(tmp_path)
    patch_header(img, size=1 << 50, l1_size=1 << 21)
    res = refuse(img, match=r"L1|end of (the )?file|EOF|past|beyond|truncat|short")
    assert res.elapsed < 10, f"took {res.elapsed:.1f}s"
    assert res.maxrss_kib is None or res.maxrss_kib < 300 * 1024, f"peak RSS {res.maxrss_kib} KiB"


def test_unknown_snapshot_refused(tmp_path, refuse):
    img = good_image(tmp_path)
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 0x44 2M 64k")  # the snapshot table is not the file's last cluster
    refuse(img, "--snapshot", "nosuchsnap", match=[r"snapshot", r"nosuchsnap"])


# --------------------------------------------------------------------------
# Bad entries found while reading: EIO for that cluster only
# --------------------------------------------------------------------------


def sixteen_clusters(path: Path, **kw) -> Path:
    img = create(path, 1 * MiB, **kw)
    qemu_io(img, *(f"write -P {0x10 + i} {i * CLUSTER} 64k" for i in range(16)))
    return img


def assert_only_cluster_fails(view: Path, expected: bytes, bad: int) -> None:
    fd = os.open(view, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as exc:
            os.pread(fd, CLUSTER, bad * CLUSTER)
        assert exc.value.errno == errno.EIO, exc.value
        res = run(
            ["dd", f"if={view}", "of=/dev/null", "bs=64k", f"skip={bad}", "count=1"], check=False
        )
        assert res.returncode != 0 and "Input/output error" in res.stderr, res.stderr
        # the rest still reads, after the failure
        for i in (bad - 1, bad + 1, 0, 15):
            got = os.pread(fd, CLUSTER, i * CLUSTER)
            assert_bytes_equal(got, expected[i * CLUSTER : (i + 1) * CLUSTER], f"cluster {i}")
    finally:
        os.close(fd)
    before, after = view.parent / "before.raw", view.parent / "after.raw"
    run(["dd", f"if={view}", f"of={before}", "bs=64k", f"count={bad}", "status=none"])
    assert_bytes_equal(before.read_bytes(), expected[: bad * CLUSTER], "dd before the bad cluster")
    run(["dd", f"if={view}", f"of={after}", "bs=64k", f"skip={bad + 1}", "status=none"])
    assert_bytes_equal(after.read_bytes(), expected[(bad + 1) * CLUSTER :], "dd after it")


def test_misaligned_l2_entry_gives_eio_for_that_cluster(tmp_path, mount):
    img = sixteen_clusters(tmp_path / "disk.img")
    expected = convert_raw(img)
    bad = 5
    pos = l2_entry_offset(img, bad * CLUSTER)
    entry = read_u64(img, pos)
    host = entry & L2E_OFFSET_MASK
    assert host and host % CLUSTER == 0
    write_u64(img, pos, (entry & ~L2E_OFFSET_MASK) | (host + 512))
    view = mount(img)
    assert_only_cluster_fails(view, expected, bad)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_garbage_compressed_cluster_gives_eio_for_that_cluster(tmp_path, mount, ctype):
    src = sixteen_clusters(tmp_path / "src.img")
    img = tmp_path / "disk.img"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", src, img)
    expected = convert_raw(img)
    bad = 5
    entry = {g: e for g, e, _ in l2_entries(img)}[bad * CLUSTER]
    assert entry & QCOW_OFLAG_COMPRESSED, hex(entry)
    host, _ = compressed_extent(entry, 16)
    write_bytes(img, host, b"\xff" * 8)
    view = mount(img)
    assert_only_cluster_fails(view, expected, bad)
