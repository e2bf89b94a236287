"""`qfuse check` against `qemu-img check` 7.2, the oracle.

Every image is made by qemu-img/qemu-io, then damaged on the exact field a
case is about (`struct.pack_into` through tests/images.py).  For each image
both commands run on their own copy; they must agree on the exit status,
on every line they print (stdout and stderr; JSON keys and values too), and
after a repair on the repaired file itself, byte for byte.  A repair must
also leave the guest data as it was (`qemu-img compare` with a copy made
before the damage) and, where qemu-img's repair gets there, a clean image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from images import (
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    MiB,
    create,
    l2_entries,
    l2_entry_offset,
    patch_header,
    qemu_img,
    qemu_io,
    read_header,
    read_u64,
    run,
    sha256,
    write_bytes,
    write_u64,
)

QFUSE = [sys.executable, "-m", "qfuse"]
SIZE = 16 * MiB

# -- images ------------------------------------------------------------------------

# Guest writes that leave data, partly written and compressed clusters.
WRITES = ("write -P 0x11 0 192k", "write -P 0x22 1M 64k", "write -P 0x33 5M 4k")


def _make(kind: str, d: Path) -> Path:
    """An image of one kind, with data, in directory `d`."""
    img = d / "img.qcow2"
    writes: tuple[str, ...] = WRITES
    options = {
        "v2": "compat=0.10",
        "v3": None,
        "c512": "cluster_size=512",
        "c2m": "cluster_size=2M",
        "rc1": "refcount_bits=1",
        "rc8": "refcount_bits=8",
        "rc64": "refcount_bits=64",
        "extl2": "extended_l2=on",
        "lazy": "lazy_refcounts=on",
        "prealloc": "preallocation=metadata",
        "datafile": "data_file=img.data",
        "zstd": "compression_type=zstd",
    }.get(kind)
    if kind == "backing":
        create(d / "base.qcow2", SIZE)
        qemu_io(d / "base.qcow2", "write -P 0x44 0 4M")
        create(Path("img.qcow2"), None, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
    else:
        create(Path(img.name), SIZE, options=options, cwd=d)
    if kind in ("compressed", "zstd"):
        writes += ("write -c -P 0x55 2M 64k", "write -c -P 0x66 2176k 64k",
                   "write -c -P 0x77 3M 64k")
    if kind == "zero":
        writes += ("write -z 1M 64k", "write -z 7M 128k")
    if kind == "extl2":
        writes += ("write -P 0x88 8M 8k", "write -z 8M 2k")
    qemu_io(img, *writes, cwd=d)
    if kind == "snapshots":
        qemu_img("snapshot", "-c", "one", img)
        qemu_io(img, "write -P 0x99 64k 64k", "write -P 0xaa 6M 64k")
        qemu_img("snapshot", "-c", "two", img)
        qemu_io(img, "write -P 0xbb 0 4k")
    if kind == "bitmaps":
        qemu_img("bitmap", "--add", img, "b1")
        qemu_img("bitmap", "--add", "-g", "128k", img, "b2")
        qemu_io(img, "write -P 0xcc 9M 64k")  # recorded in the bitmaps
    if kind == "lazy":
        # A crash with lazy refcounts: the dirty bit stays set, the
        # refcounts of the last writes were never written.
        res = run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xdd 10M 128k", "-c", "abort",
                   img], check=False)
        assert res.returncode != 0
        assert read_header(img)["incompatible_features"] & 1
    return img


CLEAN_KINDS = ["v2", "v3", "c512", "c2m", "rc1", "rc8", "rc64", "extl2", "prealloc",
               "datafile", "zstd", "compressed", "zero", "snapshots", "bitmaps", "backing"]


# -- what the oracle and qfuse say ---------------------------------------------------


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str


def _run(argv: list[str], cwd: Path) -> Outcome:
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LC_ALL": "C"}, stdin=subprocess.DEVNULL)
    return Outcome(res.returncode, res.stdout, res.stderr)


def qemu_check(img: Path, *args: str) -> Outcome:
    return _run(["qemu-img", "check", *args, img.name], img.parent)


def qfuse_check(img: Path, *args: str) -> Outcome:
    return _run([*QFUSE, "check", *args, img.name], img.parent)


QEMU_STALE_BITMAPS_HINT = (
    "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix."
)


def _same_stderr(ours: str, theirs: str) -> None:
    """Line for line, but qemu-img's own messages are worded its way (and its
    hint about stale bitmaps has no newline)."""
    theirs = theirs.replace(QEMU_STALE_BITMAPS_HINT, "")
    ours_lines = [line for line in ours.splitlines() if not line.startswith("qfuse: ")]
    theirs_lines = [line for line in theirs.splitlines()
                    if not line.startswith(("qemu-img: ", "qcow2: "))]
    # Our note under an ERROR line names what shares a cluster; qemu-img has none.
    ours_lines = [line for line in ours_lines if not line.startswith("    cluster ")]
    assert ours_lines == theirs_lines


def compare_with_qemu(img: Path, *args: str) -> tuple[Outcome, Outcome, Path, Path]:
    """Run both on copies of `img`; assert they agree; return outcomes and copies."""
    ours_img = img.with_name("ours-" + img.name)
    theirs_img = img.with_name("theirs-" + img.name)
    shutil.copyfile(img, ours_img)
    shutil.copyfile(img, theirs_img)
    theirs = qemu_check(theirs_img, *args)
    ours = qfuse_check(ours_img, *args)
    assert ours.status == theirs.status, (ours, theirs)
    if "json" in args and theirs.stdout:
        ours_json = json.loads(ours.stdout)
        theirs_json = json.loads(theirs.stdout)
        assert ours_json.pop("filename") == ours_img.name
        theirs_json.pop("filename")
        assert ours_json == theirs_json
        assert list(ours_json) == list(theirs_json)  # and in qemu-img's order
        # and laid out alike, byte for byte
        assert ours.stdout.replace(ours_img.name, "IMG") == \
            theirs.stdout.replace(theirs_img.name, "IMG")
    else:
        assert ours.stdout == theirs.stdout
    _same_stderr(ours.stderr, theirs.stderr)
    return ours, theirs, ours_img, theirs_img


# -- damage -----------------------------------------------------------------------


def _reftable_block(img: Path) -> tuple[int, int]:
    """(host offset of refcount block 0, refcount bits)."""
    h = read_header(img)
    order = h.get("refcount_order", 4) if h["version"] >= 3 else 4
    return read_u64(img, h["refcount_table_offset"]) & ~0x1FF, 1 << order


def get_refcount(img: Path, cluster: int) -> int:
    block, bits = _reftable_block(img)
    bit = cluster * bits
    with open(img, "rb") as f:
        f.seek(block + bit // 8)
        raw = f.read(max(1, bits // 8))
    if bits >= 8:
        return int.from_bytes(raw, "big")
    return (raw[0] >> (bit % 8)) & ((1 << bits) - 1)


def set_refcount(img: Path, cluster: int, value: int) -> None:
    """Refcount of `cluster` (covered by refcount block 0) := value."""
    block, bits = _reftable_block(img)
    bit = cluster * bits
    if bits >= 8:
        write_bytes(img, block + bit // 8, value.to_bytes(bits // 8, "big"))
        return
    with open(img, "r+b") as f:
        f.seek(block + bit // 8)
        byte = f.read(1)[0]
        mask = ((1 << bits) - 1) << (bit % 8)
        f.seek(block + bit // 8)
        f.write(bytes([(byte & ~mask) | (value << (bit % 8))]))


def _cluster_bits(img: Path) -> int:
    return read_header(img)["cluster_bits"]


def _data_entry(img: Path, *, want_copied: bool | None = True) -> tuple[int, int]:
    """(host offset of the L2 entry, the entry) of the first plain data cluster."""
    h = read_header(img)
    for guest, entry, _bitmap in l2_entries(img):
        if entry & QCOW_OFLAG_COMPRESSED or not entry & L2E_OFFSET_MASK:
            continue
        if want_copied is not None and bool(entry & QCOW_OFLAG_COPIED) != want_copied:
            continue
        if h["version"] >= 3 and h["incompatible_features"] & (1 << 4) == 0 and \
                entry & QCOW_OFLAG_ZERO:
            continue
        at = l2_entry_offset(img, guest)
        assert at is not None
        return at, entry
    raise AssertionError(f"{img}: no data cluster")


def leak_raise(img: Path) -> None:
    """The L1 table's refcount one too high: a leak, nothing else."""
    cluster = read_header(img)["l1_table_offset"] >> _cluster_bits(img)
    set_refcount(img, cluster, get_refcount(img, cluster) + 1)


def leak_free_cluster(img: Path) -> None:
    """A refcount of 1 for a cluster nothing references (appended to the file)."""
    cb = _cluster_bits(img)
    size = img.stat().st_size
    cluster = -(-size >> cb)
    os.truncate(img, (cluster + 1) << cb)
    set_refcount(img, cluster, 1)


def leak_drop_entry(img: Path) -> None:
    """An L2 entry dropped: its data cluster leaks."""
    at, _ = _data_entry(img)
    h = read_header(img)
    extended = h["version"] >= 3 and h["incompatible_features"] & (1 << 4)
    write_bytes(img, at, bytes(16 if extended else 8))  # entry (and subcluster bitmap)


def too_low_zero(img: Path) -> None:
    """A referenced data cluster with refcount 0: the structures need a rebuild."""
    _, entry = _data_entry(img)
    set_refcount(img, (entry & L2E_OFFSET_MASK) >> _cluster_bits(img), 0)


def too_low_shared(img: Path) -> None:
    """A cluster shared with a snapshot (refcount 2) down to 1."""
    _, entry = _data_entry(img, want_copied=False)
    cluster = (entry & L2E_OFFSET_MASK) >> _cluster_bits(img)
    assert get_refcount(img, cluster) == 2
    set_refcount(img, cluster, 1)


def reserved_l2(img: Path) -> None:
    at, entry = _data_entry(img)
    write_u64(img, at, entry | 0x2)


def reserved_l1(img: Path) -> None:
    l1 = read_header(img)["l1_table_offset"]
    write_u64(img, l1, read_u64(img, l1) | (1 << 56))


def reserved_reftable(img: Path) -> None:
    rt = read_header(img)["refcount_table_offset"]
    write_u64(img, rt, read_u64(img, rt) | 0x1)


def past_end(img: Path) -> None:
    """An L2 entry pointing far past the end of the file."""
    at, entry = _data_entry(img)
    write_u64(img, at, (entry & ~L2E_OFFSET_MASK) | (1 << 40))


def copied_cleared(img: Path) -> None:
    at, entry = _data_entry(img)
    write_u64(img, at, entry & ~QCOW_OFLAG_COPIED)


def copied_set_shared(img: Path) -> None:
    at, entry = _data_entry(img, want_copied=False)
    write_u64(img, at, entry | QCOW_OFLAG_COPIED)


def l1_copied_cleared(img: Path) -> None:
    l1 = read_header(img)["l1_table_offset"]
    write_u64(img, l1, read_u64(img, l1) & ~QCOW_OFLAG_COPIED)


def unaligned_prealloc_zero(img: Path) -> None:
    """A preallocated zero cluster at an offset that is not cluster-aligned."""
    at, entry = _data_entry(img)
    write_u64(img, at, (entry | QCOW_OFLAG_ZERO) + 0x200)


def unaligned_data(img: Path) -> None:
    at, entry = _data_entry(img)
    write_u64(img, at, entry + 0x200)


def l2_on_data(img: Path) -> None:
    """A data cluster that is also the L2 table that maps it."""
    at, entry = _data_entry(img)
    l2 = at & ~((1 << _cluster_bits(img)) - 1)
    write_u64(img, at, (entry & ~L2E_OFFSET_MASK) | l2)


def copied_on_compressed(img: Path) -> None:
    for guest, entry, _ in l2_entries(img):
        if entry & QCOW_OFLAG_COMPRESSED:
            at = l2_entry_offset(img, guest)
            assert at is not None
            write_u64(img, at, entry | QCOW_OFLAG_COPIED)
            return
    raise AssertionError("no compressed cluster")


def refblock_refcount(img: Path) -> None:
    """The refcount block's own refcount 2: a rebuild is needed."""
    block, _ = _reftable_block(img)
    set_refcount(img, block >> _cluster_bits(img), 2)


def refblock_outside(img: Path) -> None:
    """A second refcount table entry naming a block past the end of the file."""
    rt = read_header(img)["refcount_table_offset"]
    cb = _cluster_bits(img)
    write_u64(img, rt + 8, ((img.stat().st_size >> cb) + 4) << cb)


def overflow_rc1(img: Path) -> None:
    """Two L2 entries on one cluster of a 1-bit refcount image: the count overflows."""
    at, entry = _data_entry(img)
    write_u64(img, at + 8, entry & ~QCOW_OFLAG_COPIED)


def l1_unaligned(img: Path) -> None:
    l1 = read_header(img)["l1_table_offset"]
    write_u64(img, l1, read_u64(img, l1) + 0x200)


def stale_bitmaps(img: Path) -> None:
    """The autoclear bitmaps bit cleared, as by a program without bitmap
    support: QEMU ignores the bitmaps, whose clusters are leaked."""
    h = read_header(img)
    patch_header(img, autoclear_features=h["autoclear_features"] & ~1)


Damage = Callable[[Path], None]

# (image kind, damage, exit status of `qemu-img check`)
DAMAGES: list[tuple[str, Damage, int]] = [
    ("v3", leak_raise, 3),
    ("v3", leak_free_cluster, 3),
    ("v3", leak_drop_entry, 3),
    ("v2", leak_drop_entry, 3),
    ("c512", leak_drop_entry, 3),
    ("c2m", leak_drop_entry, 3),
    ("rc1", leak_free_cluster, 3),
    ("rc8", leak_drop_entry, 3),
    ("rc64", leak_raise, 3),
    ("extl2", leak_drop_entry, 3),
    ("compressed", leak_drop_entry, 3),
    ("snapshots", leak_drop_entry, 3),
    ("bitmaps", leak_raise, 3),
    ("bitmaps", stale_bitmaps, 3),
    ("backing", leak_drop_entry, 3),
    ("datafile", leak_raise, 3),
    ("v3", too_low_zero, 2),
    ("v2", too_low_zero, 2),
    ("c512", too_low_zero, 2),
    ("rc64", too_low_zero, 2),
    ("extl2", too_low_zero, 2),
    ("snapshots", too_low_shared, 2),
    ("snapshots", too_low_zero, 2),
    ("v3", reserved_l2, 2),
    ("extl2", reserved_l2, 2),
    ("v3", reserved_l1, 2),
    ("v3", reserved_reftable, 2),
    ("v3", past_end, 2),
    ("snapshots", past_end, 2),
    ("v3", copied_cleared, 2),
    ("v2", copied_cleared, 2),
    ("snapshots", copied_set_shared, 2),
    ("v3", l1_copied_cleared, 2),
    ("datafile", copied_cleared, 2),
    ("v3", unaligned_prealloc_zero, 2),
    ("v3", unaligned_data, 2),
    ("v3", l2_on_data, 2),
    ("compressed", copied_on_compressed, 2),
    ("v3", refblock_refcount, 3),
    ("v3", refblock_outside, 2),
    ("rc1", overflow_rc1, 2),
    ("v3", l1_unaligned, 2),
    ("lazy", lambda img: None, 2),
]


def _case_id(case: tuple[str, Damage, int]) -> str:
    kind, damage, _ = case
    return f"{kind}-{getattr(damage, '__name__', 'none').replace('<lambda>', 'dirty')}"


# Damage that leaves the guest data as it was: a repair must keep it so.
KEEPS_DATA = {leak_raise, leak_free_cluster, too_low_zero, too_low_shared, reserved_reftable,
              copied_cleared, copied_set_shared, l1_copied_cleared, refblock_refcount,
              refblock_outside, stale_bitmaps}


def _damaged(case: tuple[str, Damage, int], d: Path) -> tuple[Path, Path]:
    """(damaged image, pristine copy made before the damage)."""
    kind, damage, _ = case
    img = _make(kind, d)
    pristine = d / "pristine.qcow2"
    shutil.copyfile(img, pristine)
    damage(img)
    return img, pristine


def _same_guest_data(a: Path, b: Path) -> None:
    res = run(["qemu-img", "compare", a.name, b.name], cwd=a.parent, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def _dirty(img: Path) -> bool:
    h = read_header(img)
    return h["version"] >= 3 and bool(h["incompatible_features"] & 1)


# -- clean images ----------------------------------------------------------------------


@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize("kind", CLEAN_KINDS)
def test_clean_image_like_qemu(kind: str, output: str, tmp_path: Path) -> None:
    img = _make(kind, tmp_path)
    ours, _, _, _ = compare_with_qemu(img, *(["--output", "json"] if output == "json" else []))
    assert ours.status == 0
    assert ours.stderr == ""
    if output == "human":
        assert ours.stdout.startswith("No errors were found on the image.\n")
        assert "Image end offset: " in ours.stdout


@pytest.mark.parametrize("kind", CLEAN_KINDS)
def test_repair_of_clean_image_writes_nothing(kind: str, tmp_path: Path) -> None:
    img = _make(kind, tmp_path)
    before = sha256(img)
    ours = qfuse_check(img, "--repair", "all")
    assert ours.status == 0
    assert ours.stdout.startswith("No errors were found on the image.\n")
    assert sha256(img) == before


# -- damaged images ------------------------------------------------------------------


@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize("case", DAMAGES, ids=_case_id)
def test_damage_found_like_qemu(case: tuple[str, Damage, int], output: str,
                                tmp_path: Path) -> None:
    img, _ = _damaged(case, tmp_path)
    before = sha256(img)
    ours, _, ours_img, _ = compare_with_qemu(
        img, *(["--output", "json"] if output == "json" else []))
    assert ours.status == case[2]
    assert sha256(ours_img) == before  # a check without --repair writes nothing


@pytest.mark.parametrize("repair", ["leaks", "all"])
@pytest.mark.parametrize("case", [c for c in DAMAGES if c[1] is not reserved_reftable],
                         ids=_case_id)
def test_repair_like_qemu(case: tuple[str, Damage, int], repair: str, tmp_path: Path) -> None:
    """Same output as `qemu-img check -r`, same repaired file, data kept."""
    kind, damage, _ = case
    img, pristine = _damaged(case, tmp_path)
    ours, theirs, ours_img, theirs_img = compare_with_qemu(img, "-r", repair, "--output",
                                                           "json")
    if ours.status == 1:
        # Neither could repair (rebuild refused with "leaks", or nothing to
        # do about it).  QEMU then clears the dirty bit all the same on close
        # (qcow2_inactivate): qfuse leaves the image as it found it.
        assert ours_img.read_bytes() == img.read_bytes()
        return
    if kind != "bitmaps":  # QEMU also rewrites the bitmaps when it opens them writable
        assert ours_img.read_bytes() == theirs_img.read_bytes()
    after = qemu_check(ours_img)
    assert after.status == qemu_check(theirs_img).status
    assert after.status == (2 if json.loads(ours.stdout).get("corruptions") else 0)
    assert not _dirty(ours_img) or after.status
    if damage in KEEPS_DATA and after.status == 0:
        _same_guest_data(pristine, ours_img)


@pytest.mark.parametrize("repair", ["leaks", "all"])
@pytest.mark.parametrize("damage", [leak_raise, leak_free_cluster, leak_drop_entry],
                         ids=lambda d: d.__name__)
def test_leaks_repaired_clean(damage: Damage, repair: str, tmp_path: Path) -> None:
    """After --repair leaks or all, qemu-img check finds nothing; data kept."""
    img, pristine = _damaged(("v3", damage, 3), tmp_path)
    assert qfuse_check(img).status == 3
    ours = qfuse_check(img, "--repair", repair)
    assert ours.status == 0
    assert "leaked clusters\n    0 corruptions\n" in ours.stdout
    assert qemu_check(img).status == 0
    if damage is not leak_drop_entry:
        _same_guest_data(pristine, img)


def test_too_low_refcount_repaired_by_all_only(tmp_path: Path) -> None:
    img, pristine = _damaged(("v3", too_low_zero, 2), tmp_path)
    leaks = qfuse_check(img, "--repair", "leaks")
    assert leaks.status == 1
    assert "ERROR need to rebuild refcount structures" in leaks.stderr
    assert leaks.stderr.splitlines()[-1].startswith("qfuse: img.qcow2: check failed: ")
    assert qfuse_check(img, "--repair", "all").status == 0
    assert qemu_check(img).status == 0
    _same_guest_data(pristine, img)


def test_rebuild_over_skipped_refcount_block(tmp_path: Path) -> None:
    """A refcount table entry with reserved bits: QEMU's rebuild puts a new
    block on the one it skipped, its own overlap check stops the write, and
    the repair fails (exit 1, image marked corrupt).  qfuse keeps the new
    structures off it, and the repair succeeds."""
    img, pristine = _damaged(("v3", reserved_reftable, 2), tmp_path)
    theirs_img = tmp_path / "theirs.qcow2"
    shutil.copyfile(img, theirs_img)
    assert qemu_check(theirs_img, "-r", "all").status == 1
    ours = qfuse_check(img, "--repair", "all")
    assert ours.status == 0, ours
    assert "Rebuilding refcount structure" in ours.stderr
    assert qemu_check(img).status == 0
    _same_guest_data(pristine, img)


def test_rebuild_keeps_off_clusters_named_past_the_end(tmp_path: Path) -> None:
    """An entry names the cluster just past the end of the file, and the
    refcounts need a rebuild.  QEMU puts the new refcount table on that
    cluster (the guest then reads it as data) and stays corrupt; qfuse keeps
    the new structures off it, and once the file has grown over it, counts
    it: a clean image, the guest still reading zeros there."""
    img = _make("v3", tmp_path)
    at, entry = _data_entry(img)
    write_u64(img, at, (entry & ~L2E_OFFSET_MASK) | img.stat().st_size)
    set_refcount(img, read_header(img)["refcount_table_offset"] >> 16, 0)
    before = qemu_check(img)
    assert before.status == 2
    assert "exceeding the end of the file" in before.stderr
    ours = qfuse_check(img, "--repair", "all")
    assert ours.status == 0, ours
    assert qemu_check(img).status == 0
    res = run(["qemu-io", "-f", "qcow2", "-c", "read -P 0 0 64k", img])
    assert "read 65536/65536" in res.stdout


def test_dirty_image_repaired_and_marked_clean(tmp_path: Path) -> None:
    """A crash with lazy refcounts: the dirty bit goes only after the repair."""
    img = _make("lazy", tmp_path)
    assert _dirty(img)
    assert qfuse_check(img).status == 2
    assert _dirty(img)
    assert qfuse_check(img, "--repair", "all").status == 0
    assert not _dirty(img)
    assert qemu_check(img).status == 0


def test_overlap_named(tmp_path: Path) -> None:
    img, _ = _damaged(("v3", l2_on_data, 2), tmp_path)
    ours = qfuse_check(img)
    assert "    cluster " in ours.stderr
    assert "both the L2 table and a data cluster" in ours.stderr


# -- a repair that stops half-way ---------------------------------------------------------


@pytest.mark.parametrize("writes_before_failure", [0, 1, 2, 3])
def test_failed_repair_leaves_dirty_bit(writes_before_failure: int, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error part-way through a repair: the image stays dirty (so the
    next writable open recounts), no worse than before, and repairable."""
    from qfuse.engine import check as check_mod
    from qfuse.engine.hostfile import HostFile
    from qfuse.engine.refcheck import Fix

    img, pristine = _damaged(("v3", too_low_zero, 2), tmp_path)
    leak_raise(img)
    real_pwrite = HostFile.pwrite_sync
    writes = 0

    def failing_pwrite(self: HostFile, host_offset: int, data: bytes) -> None:
        nonlocal writes
        if host_offset >= 512:  # header writes (the dirty bit) go through
            if writes == writes_before_failure:
                raise OSError(5, "Input/output error")
            writes += 1
        real_pwrite(self, host_offset, data)

    monkeypatch.setattr(HostFile, "pwrite_sync", failing_pwrite)
    with pytest.raises(check_mod.CheckFailed):
        check_mod.check_image(str(img), fix=Fix.ALL, report=lambda line: None)
    monkeypatch.undo()
    assert _dirty(img)
    # QEMU can take it from there (as would a writable open).
    assert qemu_check(img, "-r", "all").status == 0
    _same_guest_data(pristine, img)


# -- not a (usable) qcow2 image ----------------------------------------------------------


def _not_qcow2(kind: str, d: Path) -> Path:
    path = d / f"{kind}.img"
    if kind == "text":
        path.write_text("hello, I am not a disk image\n")
    elif kind == "raw":
        qemu_img("create", "-q", "-f", "raw", path, "1M")
        qemu_io(path, "write -P 0x5a 0 64k", fmt="raw")
    elif kind == "truncated":
        create(path, SIZE)
        qemu_io(path, *WRITES)
        os.truncate(path, 4096)
    elif kind == "empty":
        path.touch()
    return path


@pytest.mark.parametrize("args", [[], ["--repair", "all"], ["--output", "json"]],
                         ids=["check", "repair", "json"])
@pytest.mark.parametrize("kind", ["missing", "text", "raw", "truncated", "empty"])
def test_not_a_qcow2_image(kind: str, args: list[str], tmp_path: Path) -> None:
    path = _not_qcow2(kind, tmp_path)
    before = path.read_bytes() if path.exists() else None
    mtime = path.stat().st_mtime_ns if path.exists() else None
    res = qfuse_check(path, *args)
    assert res.status == 1
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"qfuse: {path.name}: ")
    assert "Traceback" not in res.stderr
    if before is None:
        assert not path.exists()
    else:
        assert path.read_bytes() == before
        assert path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("args", [["--repair", "some"], ["--output", "xml"], ["--bogus"], []],
                         ids=["repair", "output", "unknown", "no-image"])
def test_bad_option_exits_1(args: list[str], tmp_path: Path) -> None:
    """qemu-img check exits 1 on a bad option: 2 would say "corruptions"."""
    img = _make("v3", tmp_path)
    res = _run([*QFUSE, "check", *args, *([img.name] if args else [])], tmp_path)
    assert res.status == 1
    assert len(res.stderr.splitlines()) == 1
    assert res.stderr.startswith("qfuse: ")


def test_image_in_use_by_qemu(tmp_path: Path) -> None:
    """QEMU holds the write lock: a repair is refused, like qemu-img's."""
    img = _make("v3", tmp_path)
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", img], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert holder.stdin is not None and holder.stdout is not None
        # qemu-io opened the image before it read its first command; the
        # lock is held once it answers one.
        holder.stdin.write("help quit\n")
        holder.stdin.flush()
        while "quit" not in holder.stdout.readline():
            pass
        res = qfuse_check(img, "--repair", "leaks")
        assert res.status == 1
        assert "in use" in res.stderr
        assert len(res.stderr.splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()


# -- output details ------------------------------------------------------------------------


def test_json_fields_of_a_repair(tmp_path: Path) -> None:
    img, _ = _damaged(("v3", leak_raise, 3), tmp_path)
    ours = json.loads(qfuse_check(img, "--repair", "leaks", "--output", "json").stdout)
    assert ours["leaks-fixed"] == 1
    assert "leaks" not in ours and "corruptions" not in ours
    assert ours["check-errors"] == 0
    assert ours["filename"] == "img.qcow2"
    assert ours["format"] == "qcow2"


def test_progress_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """A large image on a terminal gets a progress bar; findings still print."""
    import io

    from qfuse.cli import check as cli_check

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    img, _ = _damaged(("snapshots", leak_drop_entry, 3), tmp_path)
    terminal = Terminal()
    monkeypatch.setattr(cli_check, "LARGE_IMAGE_BYTES", 0)
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli_check.run_check(str(img), repair=None, output="human") == 3
    assert "Leaked cluster " in terminal.getvalue()
    assert "leaked clusters were found" in capsys.readouterr().out
