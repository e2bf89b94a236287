"""The read path, end to end: images made by qemu-img, mounted with `qfuse mount`,
read through the view and compared with `qemu-img convert -O raw`.

One behaviour per test.  Every region written gets its own pattern byte, so
data served from the wrong cluster, layer or snapshot shows up as a wrong
byte at a reported offset.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from images import (
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_ZERO,
    KiB,
    MiB,
    create,
    info,
    l2_entries,
    patch_header,
    qemu_img,
    qemu_io,
    random_bytes,
    read_header,
    run,
    sha256,
)
from mountutil import (
    allocated_bytes,
    assert_bytes_equal,
    assert_same_as_qemu,
    convert_raw,
    loop_device,
    mount_view,
    run_qfuse,
)

pytestmark = pytest.mark.mount


def patterned_image(path: Path, size: int = 4 * MiB, options: str | None = None) -> Path:
    """A small image with data, an unaligned region and a zeroed cluster."""
    img = create(path, size, options=options)
    qemu_io(
        img,
        "write -P 0x11 0 64k",
        "write -P 0x22 100k 40k",  # straddles the cluster edge at 128k, unaligned
        "write -P 0x33 1M 4k",
        "write -P 0x44 2M 64k",
        "write -z 2M 64k",  # data, then zeroed
        f"write -P 0x55 {size - 64 * KiB} 64k",  # the last cluster
    )
    return img


def assert_pread_matches(fd: int, expected: bytes, offset: int, length: int) -> None:
    got = os.pread(fd, length, offset)
    want = expected[offset : offset + length]
    assert_bytes_equal(got, want, f"pread(length={length}, offset={offset})")


# --------------------------------------------------------------------------
# Format versions, cluster sizes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_compat_version(tmp_path, mount, compat):
    img = patterned_image(tmp_path / "img.qcow2", options=f"compat={compat}")
    assert info(img)["format-specific"]["data"]["compat"] == compat
    view = mount(img)
    assert_same_as_qemu(view, img)


@pytest.mark.parametrize(
    "cluster_size", [512, 4 * KiB, 64 * KiB, 2 * MiB], ids=["512", "4k", "64k", "2M"]
)
def test_cluster_size(tmp_path, mount, cluster_size):
    cs = cluster_size
    size = max(4 * MiB, 8 * cs)
    l2_span = cs * (cs // 8)  # guest bytes mapped by one L2 table
    img = create(tmp_path / "img.qcow2", size, options=f"cluster_size={cs}")
    cmds = [
        f"write -P 0x11 0 {min(cs, 64 * KiB)}",
        f"write -P 0x22 {cs - 300} 600",  # across the first cluster edge, unaligned
        f"write -P 0x33 {3 * cs - 1024} 2048",  # across another edge
        f"write -P 0x66 {5 * cs} {min(cs, 64 * KiB)}",
        f"write -z {5 * cs} {cs}",  # zeroed cluster
        f"write -P 0x44 {size - 700} 700",  # the tail
    ]
    if l2_span < size:
        cmds.append(f"write -P 0x77 {l2_span - 512} 1024")  # across an L2 table edge
    qemu_io(img, *cmds)
    assert info(img)["cluster-size"] == cs
    view = mount(img)
    assert_same_as_qemu(view, img)


# --------------------------------------------------------------------------
# Compressed clusters
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ctype,cs,size",
    [
        ("zlib", 64 * KiB, 4 * MiB),
        ("zstd", 64 * KiB, 4 * MiB),
        ("zlib", 4 * KiB, 1 * MiB),
        ("zstd", 2 * MiB, 10 * MiB),
        ("zlib", 64 * KiB, 4 * MiB + 1536),  # partial last cluster, compressed
    ],
    ids=["zlib-64k", "zstd-64k", "zlib-4k", "zstd-2M", "zlib-odd-size"],
)
def test_compressed(tmp_path, mount, ctype, cs, size):
    assert size >= 5 * cs
    src = create(tmp_path / "src.raw", size, fmt="raw")
    qemu_io(
        src,
        "write -P 0x11 0 100k",
        f"write -P 0x22 {cs + 512} 3000",
        f"write -P 0x33 {3 * cs + 5} {min(cs, 64 * KiB)}",
        f"write -P 0x44 {size - 1000} 1000",
        fmt="raw",
    )
    # one incompressible cluster: qemu-img stores it uncompressed
    with open(src, "r+b") as f:
        f.seek(2 * cs)
        f.write(random_bytes(7, cs))
    img = tmp_path / "img.qcow2"
    qemu_img(
        "convert", "-c", "-f", "raw", "-O", "qcow2",
        "-o", f"compression_type={ctype},cluster_size={cs}", src, img,
    )  # fmt: skip
    entries = [e for _, e, _ in l2_entries(img)]
    assert any(e & QCOW_OFLAG_COMPRESSED for e in entries), "no compressed cluster made"
    assert any(e and not e & QCOW_OFLAG_COMPRESSED for e in entries), "no plain cluster made"
    assert info(img)["format-specific"]["data"]["compression-type"] == ctype
    view = mount(img)
    assert_same_as_qemu(view, img)


# --------------------------------------------------------------------------
# Extended L2 entries (subclusters)
# --------------------------------------------------------------------------

SUBCLUSTER_WRITES = (
    "write -P 0x41 0 2k",  # subcluster 0
    "write -P 0x42 6k 4k",  # subclusters 3-4
    "write -z 16k 2k",  # subcluster 8: zero
    "write -P 0x43 33k 1k",  # inside subcluster 16
    "write -P 0x44 126k 4k",  # last subcluster of cluster 1 and first of cluster 2
)


def assert_cluster0_has_all_subcluster_kinds(img: Path) -> None:
    bitmap = {g: b for g, _, b in l2_entries(img)}[0]
    allocated, zero = bitmap & 0xFFFFFFFF, bitmap >> 32
    assert allocated and zero, "want allocated and zero subclusters in cluster 0"
    assert allocated | zero != 0xFFFFFFFF, "want unallocated subclusters in cluster 0"


def test_extended_l2(tmp_path, mount):
    img = create(tmp_path / "img.qcow2", 1 * MiB, options="extended_l2=on,cluster_size=64k")
    qemu_io(img, *SUBCLUSTER_WRITES)
    assert_cluster0_has_all_subcluster_kinds(img)
    view = mount(img)
    assert_same_as_qemu(view, img)


def test_extended_l2_over_backing(tmp_path, mount):
    base = create(tmp_path / "base.qcow2", 1 * MiB)
    qemu_io(base, "write -P 0x11 0 1M")
    img = create(
        tmp_path / "img.qcow2", None, options="extended_l2=on,cluster_size=64k",
        backing=base, backing_fmt="qcow2",
    )  # fmt: skip
    qemu_io(img, *SUBCLUSTER_WRITES)
    assert_cluster0_has_all_subcluster_kinds(img)
    expected = convert_raw(img)
    assert expected[2 * KiB : 4 * KiB] == b"\x11" * 2 * KiB  # unallocated -> backing
    assert expected[16 * KiB : 18 * KiB] == bytes(2 * KiB)  # zero subcluster
    view = mount(img)
    assert_same_as_qemu(view, img, expected=expected)


# --------------------------------------------------------------------------
# Zero clusters over backing data
# --------------------------------------------------------------------------


def backed_by_pattern(tmp_path: Path, options: str | None = None) -> Path:
    base = create(tmp_path / "base.qcow2", 2 * MiB)
    qemu_io(base, "write -P 0x11 0 2M")
    return create(tmp_path / "top.qcow2", None, options=options, backing=base, backing_fmt="qcow2")


def test_zero_cluster_over_backing(tmp_path, mount):
    top = backed_by_pattern(tmp_path)
    qemu_io(top, "write -z 64k 128k", "write -P 0x22 512k 64k")
    zero_entries = [e for g, e, _ in l2_entries(top) if g in (64 * KiB, 128 * KiB)]
    assert zero_entries and all(e & QCOW_OFLAG_ZERO for e in zero_entries)
    expected = convert_raw(top)
    assert expected[64 * KiB : 192 * KiB] == bytes(128 * KiB)
    view = mount(top)
    assert_same_as_qemu(view, top, expected=expected)


def test_allocated_zero_cluster_over_backing(tmp_path, mount):
    top = backed_by_pattern(tmp_path)
    qemu_io(top, "write -P 0x22 0 128k", "write -z 0 64k")  # zero flag, host cluster kept
    entry = {g: e for g, e, _ in l2_entries(top)}[0]
    assert entry & QCOW_OFLAG_ZERO and entry & 0x00FFFFFFFFFFFE00, hex(entry)
    view = mount(top)
    assert_same_as_qemu(view, top)


def test_preallocated_metadata_over_backing(tmp_path, mount):
    # qemu allows preallocation with a backing file only with subclusters: the
    # clusters get host space but every subcluster still reads the backing file.
    top = backed_by_pattern(tmp_path, options="preallocation=metadata,extended_l2=on")
    qemu_io(top, "write -z 64k 64k", "write -z 200k 2k", "write -P 0x33 1M 6k")
    expected = convert_raw(top)
    assert expected[: 64 * KiB] == b"\x11" * 64 * KiB
    view = mount(top)
    assert_same_as_qemu(view, top, expected=expected)


def test_preallocated_metadata_zero_write(tmp_path, mount):
    img = create(tmp_path / "img.qcow2", 2 * MiB, options="preallocation=metadata")
    qemu_io(img, "write -P 0x33 0 1M", "write -z 128k 64k", "write -z 600k 10k")
    view = mount(img)
    assert_same_as_qemu(view, img)


# --------------------------------------------------------------------------
# Backing chains
# --------------------------------------------------------------------------


def test_chain_of_three_overlays_on_raw_base(tmp_path, mount):
    # Relative backing names: qfuse must resolve them against each image's
    # directory (the daemon does not run in tmp_path).
    base = create("base.raw", 4 * MiB, fmt="raw", cwd=tmp_path)
    qemu_io(base, "write -P 0xb0 0 3M", fmt="raw")  # last MiB of the base stays zero
    low = create("low.qcow2", None, backing="base.raw", backing_fmt="raw", cwd=tmp_path)
    qemu_io(low, "write -P 0xa1 64k 1M")
    mid = create("mid.qcow2", None, backing="low.qcow2", backing_fmt="qcow2", cwd=tmp_path)
    qemu_io(mid, "write -P 0xa2 512k 1M", "write -z 2M 64k", "write -P 0xa5 3900k 64k")
    top = create("top.qcow2", None, backing="mid.qcow2", backing_fmt="qcow2", cwd=tmp_path)
    qemu_io(top, "write -P 0xa3 1056k 100k", "write -P 0xa4 3146728 5000")
    expected = convert_raw(top)
    for off, byte in [
        (0, 0xB0),
        (64 * KiB, 0xA1),
        (600 * KiB, 0xA2),
        (1060 * KiB, 0xA3),
        (2 * MiB, 0),
        (3 * MiB + 1000, 0xA4),
        (3900 * KiB, 0xA5),
        (4 * MiB - 1, 0),
    ]:
        assert expected[off] == byte, (off, expected[off])  # the chain really has each level
    view = mount(top)
    assert_same_as_qemu(view, top, expected=expected)


def test_overlay_larger_than_backing(tmp_path, mount):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x5a" * 1_000_000)  # not even a whole number of sectors
    top = create("top.qcow2", 3 * MiB, backing="base.raw", backing_fmt="raw", cwd=tmp_path)
    qemu_io(top, "write -P 0x66 2M 64k")
    expected = convert_raw(top)
    assert expected[:1_000_000] == base.read_bytes()
    assert expected[1_000_000 : 2 * MiB] == bytes(2 * MiB - 1_000_000)
    view = mount(top)
    assert_same_as_qemu(view, top, expected=expected)


# --------------------------------------------------------------------------
# Internal snapshots
# --------------------------------------------------------------------------


@pytest.fixture
def snapshotted(tmp_path) -> Path:
    """s1 (id 1) and s2 (id 2), each with different data, and an active layer
    that differs from both."""
    img = create(tmp_path / "img.qcow2", 4 * MiB)
    qemu_io(img, "write -P 0x11 0 1M", "write -P 0x12 3M 64k")
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 0x22 512k 1M", "write -z 0 64k", "write -P 0x23 2097159 999")
    qemu_img("snapshot", "-c", "s2", img)
    qemu_io(img, "write -P 0x33 1M 1M", "write -z 3M 64k", "write -P 0x34 100k 4k")
    snaps = info(img)["snapshots"]
    assert [(s["id"], s["name"]) for s in snaps] == [("1", "s1"), ("2", "s2")]
    views = {convert_raw(img, snapshot=s) for s in ("s1", "s2")} | {convert_raw(img)}
    assert len(views) == 3
    return img


@pytest.mark.parametrize("by", ["name", "id"])
@pytest.mark.parametrize("snap", ["s1", "s2"])
def test_internal_snapshot(snapshotted, mount, snap, by):
    ident = snap if by == "name" else {"s1": "1", "s2": "2"}[snap]
    view = mount(snapshotted, "--snapshot", ident)
    assert_same_as_qemu(view, snapshotted, snapshot=snap)


def test_active_layer_after_snapshots(snapshotted, mount):
    view = mount(snapshotted)
    assert_same_as_qemu(view, snapshotted)


def test_snapshot_table_at_end_of_file(tmp_path, mount):
    # `qemu-img snapshot -c` leaves the snapshot table as the last, partial
    # cluster of the file: the file ends inside that cluster.
    img = create(tmp_path / "img.qcow2", 4 * MiB)
    qemu_io(img, "write -P 0x11 0 64k", "write -P 0x22 1M 64k")
    qemu_img("snapshot", "-c", "s1", img)
    h = read_header(img)
    assert h["snapshots_offset"] < os.path.getsize(img) < h["snapshots_offset"] + 64 * KiB
    view = mount(img, "--snapshot", "s1")
    assert_same_as_qemu(view, img, snapshot="s1")


def test_snapshot_view_rejects_writes(snapshotted, mount):
    view = mount(snapshotted, "--snapshot", "s1")
    with pytest.raises(OSError) as exc:
        fd = os.open(view, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 512, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    assert exc.value.errno == errno.EROFS, exc.value


# --------------------------------------------------------------------------
# External data files, preallocation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [False, True], ids=["data_file", "data_file_raw"])
def test_external_data_file(tmp_path, mount, raw):
    # An absolute name: qemu 7.2 opens a relative data file name against its
    # own cwd, so the oracle could not read a relative one.
    data = tmp_path / "img.data"
    opts = f"data_file={data}" + (",data_file_raw=on" if raw else "")
    img = create(tmp_path / "img.qcow2", 4 * MiB, options=opts)
    qemu_io(
        img,
        "write -P 0x11 0 64k",
        "write -P 0x22 1049088 70k",
        "write -P 0x33 2M 64k",
        "write -z 2M 32k",
    )
    assert info(img)["format-specific"]["data"]["data-file"] == str(data)
    view = mount(img)
    assert_same_as_qemu(view, img)


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_preallocation(tmp_path, mount, mode):
    img = create(tmp_path / "img.qcow2", 4 * MiB, options=f"preallocation={mode}")
    qemu_io(img, "write -P 0x11 64k 64k", "write -P 0x22 1048676 300", "write -z 2M 64k")
    view = mount(img)
    assert_same_as_qemu(view, img)


# --------------------------------------------------------------------------
# Sizes, EOF, odd reads
# --------------------------------------------------------------------------

# qemu-img rounds a qcow2 size up to whole sectors: 1000000 becomes 1000448,
# which still ends inside a cluster (and inside a 4 KiB page).
ODD_SIZES = [1_000_000, 5 * MiB + 512]


@pytest.mark.parametrize("size", ODD_SIZES)
def test_odd_virtual_size(tmp_path, mount, size):
    img = create(tmp_path / "img.qcow2", size)
    vsize = info(img)["virtual-size"]
    assert vsize % (64 * KiB) != 0
    qemu_io(img, "write -P 0x11 0 64k", f"write -P 0x22 {vsize - 5000} 5000")
    view = mount(img)
    assert_same_as_qemu(view, img)


@pytest.mark.parametrize("size", ODD_SIZES)
def test_reads_at_eof_are_short(tmp_path, mount, size):
    img = create(tmp_path / "img.qcow2", size)
    vsize = info(img)["virtual-size"]
    qemu_io(img, f"write -P 0x22 {vsize - 5000} 5000")
    expected = convert_raw(img)
    view = mount(img)
    fd = os.open(view, os.O_RDONLY)
    try:
        assert os.pread(fd, 8192, vsize - 100) == expected[-100:]
        assert os.pread(fd, 64 * KiB, vsize - 4096 - 1) == expected[-4097:]
        assert os.pread(fd, 4096, vsize) == b""
        assert os.pread(fd, 1, vsize + 12345) == b""
    finally:
        os.close(fd)
    with open(view, "rb") as f:
        f.seek(vsize - 1000)
        assert f.read() == expected[-1000:]


def test_unaligned_reads_across_cluster_edges(tmp_path, mount):
    rng = random.Random(0x9C0F)
    size, cs = 3 * MiB, 4 * KiB
    img = create(tmp_path / "img.qcow2", size, options=f"cluster_size={cs}")
    cmds = []
    for i in range(40):
        off = rng.randrange(size - 1)
        n = min(rng.randrange(1, 20_000), size - off)
        cmds.append(f"write -P {i + 1} {off} {n}")  # distinct pattern per region
        if i % 8 == 7:
            z = rng.randrange(size // cs - 2) * cs
            cmds.append(f"write -z {z} {cs}")
    qemu_io(img, *cmds)
    expected = convert_raw(img)
    view = mount(img)
    fd = os.open(view, os.O_RDONLY)
    try:
        for _ in range(400):
            if rng.random() < 0.5:  # just before a cluster edge
                edge = rng.randrange(1, size // cs) * cs
                off = edge - rng.randrange(1, 3 * cs)
            else:
                off = rng.randrange(size)
            assert_pread_matches(fd, expected, max(off, 0), rng.randrange(1, 150_000))
    finally:
        os.close(fd)


def test_concurrent_reads(tmp_path, mount):
    img = patterned_image(tmp_path / "img.qcow2", options="cluster_size=4k")
    qemu_io(img, *(f"write -P {0x80 + i} {i * 200_003} 7777" for i in range(20)))
    expected = convert_raw(img)
    view = mount(img)
    shared = os.open(view, os.O_RDONLY)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        own = os.open(view, os.O_RDONLY)
        try:
            for _ in range(40):
                fd = shared if rng.random() < 0.5 else own
                off = rng.randrange(len(expected))
                assert_pread_matches(fd, expected, off, rng.randrange(1, 300_000))
        finally:
            os.close(own)

    try:
        with ThreadPoolExecutor(8) as pool:
            for fut in [pool.submit(worker, seed) for seed in range(8)]:
                fut.result()
    finally:
        os.close(shared)


def test_dd_from_view(tmp_path, mount):
    img = patterned_image(tmp_path / "img.qcow2")
    expected = convert_raw(img)
    view = mount(img)
    out = tmp_path / "dd.raw"
    run(["dd", f"if={view}", f"of={out}", "bs=1M", "status=none"])
    assert_bytes_equal(out.read_bytes(), expected, "dd bs=1M")
    res = subprocess.run(
        ["dd", f"if={view}", "bs=3000", "skip=30", "count=400", "iflag=fullblock", "status=none"],
        capture_output=True,
        check=True,
    )
    assert_bytes_equal(res.stdout, expected[90_000 : 90_000 + 1_200_000], "dd bs=3000 skip=30")


def test_loop_device_reads_view(tmp_path, mount):
    img = patterned_image(tmp_path / "img.qcow2")
    expected = convert_raw(img)
    view = mount(img)
    with loop_device(view) as dev:
        with open(dev, "rb") as f:
            data = f.read()
    assert_bytes_equal(data, expected, "loop device over the view")


def test_tiny_l2_cache(tmp_path, mount):
    # 4 KiB clusters: one L2 table maps 2 MiB, so 16 MiB needs 8 tables; a
    # 4 KiB cache holds one at most and must still translate every read.
    size = 16 * MiB
    img = create(tmp_path / "img.qcow2", size, options="cluster_size=4k")
    qemu_io(img, *(f"write -P {0x10 + i} {i * MiB + 4096 * i + 100} 5000" for i in range(16)))
    expected = convert_raw(img)
    view = mount(img, "--l2-cache-size", "4K")
    fd = os.open(view, os.O_RDONLY)
    try:
        rng = random.Random(4)
        for i in rng.sample(range(16), 16):  # hop between L2 tables
            assert_pread_matches(fd, expected, i * MiB + 4096 * i, 8192)
    finally:
        os.close(fd)
    assert_same_as_qemu(view, img, expected=expected)


# --------------------------------------------------------------------------
# The view as a file
# --------------------------------------------------------------------------


def test_view_is_a_regular_file_of_virtual_size(tmp_path, mount):
    img = create(tmp_path / "img.qcow2", 6 * MiB + 512)
    view = mount(img)
    st = os.stat(view)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == 6 * MiB + 512
    ls = run(["ls", "-ln", view]).stdout.split()
    assert int(ls[4]) == 6 * MiB + 512, ls


def test_view_du_reflects_allocated_clusters(tmp_path, mount):
    size = 64 * MiB  # sparse: never read whole here
    img = create(tmp_path / "img.qcow2", size)
    qemu_io(img, "write -P 0x11 0 256k", "write -P 0x22 10M 64k", "write -P 0x33 40M 128k")
    written = 448 * KiB  # whole clusters
    view = mount(img)
    st = os.stat(view)
    du = int(run(["du", "-B1", view]).stdout.split()[0])
    assert du == st.st_blocks * 512
    assert written <= du < size, du
    assert du <= allocated_bytes(img) + 64 * KiB, (du, allocated_bytes(img))


def test_mountpoint_created_if_missing(tmp_path, mount):
    img = patterned_image(tmp_path / "img.qcow2")
    mp = tmp_path / "new.raw"
    assert not mp.exists()
    view = mount(img, mountpoint=mp)
    assert stat.S_ISREG(os.stat(view).st_mode)
    assert_same_as_qemu(view, img)


def test_read_only_mount_rejects_writes(tmp_path):
    img = patterned_image(tmp_path / "img.qcow2")
    before = sha256(img)
    mp = tmp_path / "view.raw"
    mp.touch()
    with mount_view(img, mp, "--read-only") as view:
        with pytest.raises(OSError) as exc:
            fd = os.open(view, os.O_WRONLY)
            try:
                os.pwrite(fd, b"x" * 4096, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        assert exc.value.errno == errno.EROFS, exc.value
        assert_same_as_qemu(view, img)
    assert sha256(img) == before


# --------------------------------------------------------------------------
# qfuse info
# --------------------------------------------------------------------------

INFO_TOP_KEYS = ["virtual-size", "cluster-size", "format", "backing-filename", "dirty-flag"]
INFO_DATA_KEYS = [
    "compat", "lazy-refcounts", "refcount-bits", "corrupt", "extended-l2", "compression-type",
]  # fmt: skip


def _info_image(tmp_path: Path, case: str) -> Path:
    img = tmp_path / "img.qcow2"
    if case == "backing":
        create("base.qcow2", 2 * MiB, cwd=tmp_path)
        return create("img.qcow2", None, backing="base.qcow2", backing_fmt="qcow2", cwd=tmp_path)
    options = {
        "default": None,
        "compat-0.10": "compat=0.10",
        "lazy-refcounts": "lazy_refcounts=on",
        "refcount-bits-8": "refcount_bits=8",
        "extended-l2": "extended_l2=on",
        "zstd": "compression_type=zstd",
        "cluster-4k": "cluster_size=4k",
        "dirty": "lazy_refcounts=on",
        "corrupt": None,
    }[case]
    create(img, 3 * MiB + 512, options=options)
    qemu_io(img, "write -P 0x11 0 64k")
    if case == "dirty":
        patch_header(
            img, incompatible_features=read_header(img)["incompatible_features"] | INCOMPAT_DIRTY
        )
    if case == "corrupt":
        patch_header(
            img, incompatible_features=read_header(img)["incompatible_features"] | INCOMPAT_CORRUPT
        )
    return img


@pytest.mark.parametrize(
    "case",
    ["default", "compat-0.10", "lazy-refcounts", "refcount-bits-8", "extended-l2", "zstd",
     "cluster-4k", "backing", "dirty", "corrupt"],
)  # fmt: skip
def test_info_json_matches_qemu(tmp_path, case):
    img = _info_image(tmp_path, case)
    want = info(img)
    res = run_qfuse("info", img, "--output", "json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    for key in INFO_TOP_KEYS:
        if key in want:
            assert got.get(key) == want[key], (key, got.get(key), want[key])
    want_data = want["format-specific"]["data"]
    got_data = got.get("format-specific", {}).get("data", {})
    for key in INFO_DATA_KEYS:
        if key in want_data:
            assert got_data.get(key) == want_data[key], (key, got_data.get(key), want_data[key])
