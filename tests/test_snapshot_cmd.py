"""`qfuse snapshot -l | -c | -a | -d` against QEMU's own view of the result.

Every image is made and written by qemu-img/qemu-io; after each qfuse
operation `qemu-img check` must be clean (exit 0: no corruption, no leak, no
COPIED flag out of step with its refcount), and `qemu-img snapshot -l` and
`qemu-img convert [-l snapshot.name=X] -O raw` must show what qfuse says and
the data as it was.  The table of image kinds covers compat 0.10 and 1.1,
4 KiB and 64 KiB clusters, extended L2, and data written plain, compressed
and as zero clusters, spread over several L2 tables.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
from images import (
    KiB,
    MiB,
    create,
    qemu_img,
    qemu_io,
    qemu_io_holding,
    read_header,
    run,
    sha256,
)
from mountutil import assert_same_as_qemu, convert_raw, run_qfuse

# name -> qemu-img create -o options
KINDS = {
    "v3-64k": "compat=1.1,cluster_size=64k",
    "v3-4k": "compat=1.1,cluster_size=4k",
    "v2-64k": "compat=0.10,cluster_size=64k",
    "v2-4k": "compat=0.10,cluster_size=4k",
    "extl2-64k": "compat=1.1,cluster_size=64k,extended_l2=on",
    "v3-4k-lazy": "compat=1.1,cluster_size=4k,lazy_refcounts=on",
}
SIZE = 8 * MiB  # four L2 tables with 4 KiB clusters


@pytest.fixture(params=sorted(KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def make_image(path: Path, kind: str, *, size: int = SIZE, options: str = "") -> Path:
    opts = KINDS[kind] + (f",{options}" if options else "")
    create(path, size, options=opts)
    fill(path, 0x10)
    return path


def fill(path: Path, seed: int) -> None:
    """Plain, compressed and zero clusters, partial clusters, in several L2 tables."""
    qemu_io(
        path,
        f"write -P {seed:#x} 0 128k",
        f"write -c -P {seed + 1:#x} 256k 64k",
        f"write -P {seed + 2:#x} 2100k 10k",  # partial, in the second 4k-cluster L2 table
        "write -z 4M 64k",
        f"write -P {seed + 3:#x} 6M 1M",
        f"write -c -P {seed + 4:#x} 7M 128k",
    )


def overwrite(path: Path, seed: int) -> None:
    """Changes that touch every kind of cluster `fill` made, and new ones."""
    qemu_io(
        path,
        f"write -P {seed:#x} 4k 8k",
        f"write -P {seed + 1:#x} 260k 4k",  # into the compressed cluster
        "write -z 6M 64k",
        f"write -P {seed + 2:#x} 4M 32k",  # into the zero cluster
        f"write -P {seed + 3:#x} 3M 256k",  # a fresh range
        "discard 7M 64k",
    )


def qfuse(*args: str | os.PathLike[str]) -> tuple[int, str, str]:
    res = run_qfuse(*args, timeout=60)
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, res.stdout, res.stderr


def qfuse_ok(*args: str | os.PathLike[str]) -> str:
    code, out, err = qfuse(*args)
    assert code == 0, f"qfuse {' '.join(map(str, args))} exited {code}: {err.strip()}"
    assert err == "", err
    return out


def assert_refused(image: Path, *args: str, match: str) -> str:
    """`qfuse snapshot ARGS... IMAGE` fails with one line naming the reason,
    and the file is unchanged."""
    before = sha256(image) if image.exists() else None
    code, out, err = qfuse("snapshot", *args, image)
    assert code != 0, f"qfuse snapshot {args} succeeded"
    assert out == ""
    assert err.startswith("qfuse: ") and err.count("\n") == 1, repr(err)
    assert match in err, f"expected {match!r} in {err!r}"
    if before is not None:
        assert sha256(image) == before, "a refused operation changed the image"
    return err


def assert_check_clean(image: Path) -> None:
    res = run(["qemu-img", "check", "--output", "json", image], check=False)
    report = json.loads(res.stdout) if res.stdout.strip() else {}
    assert res.returncode == 0, f"qemu-img check exited {res.returncode}: {res.stdout} {res.stderr}"
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report


def qemu_snapshots(image: Path) -> list[tuple[str, str]]:
    """(id, name) of each snapshot, as `qemu-img info` lists them."""
    info = json.loads(qemu_img("info", "--output", "json", image))
    return [(s["id"], s["name"]) for s in info.get("snapshots", [])]


def raw_entries(image: Path) -> list[dict[str, object]]:
    """The snapshot table, parsed here without qfuse (docs/interop/qcow2.txt)."""
    h = read_header(image)
    out = []
    with open(image, "rb") as f:
        pos = h["snapshots_offset"]
        for _ in range(h["nb_snapshots"]):
            f.seek(pos)
            fixed = f.read(40)
            l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmsize, extra_len = (
                struct.unpack(">QIHHIIQII", fixed)
            )
            extra = f.read(extra_len)
            ident = f.read(id_len)
            name = f.read(name_len)
            out.append({
                "l1_table_offset": l1_off, "l1_size": l1_size, "id": ident, "name": name,
                "date_sec": dsec, "date_nsec": dnsec, "vm_clock": clock,
                "vm_state_size": vmsize, "extra": extra,
            })  # fmt: skip
            pos += (40 + extra_len + id_len + name_len + 7) & ~7
    return out


# -- create --------------------------------------------------------------------------


def test_create_then_qemu_agrees(tmp_path: Path, kind: str) -> None:
    img = make_image(tmp_path / "a.qcow2", kind)
    before = convert_raw(img)
    qfuse_ok("snapshot", "-c", "first", img)
    assert_check_clean(img)
    assert qemu_snapshots(img) == [("1", "first")]
    assert convert_raw(img, snapshot="first") == before
    assert convert_raw(img) == before
    # The active layer is now copy-on-write: a write must leave the snapshot alone.
    overwrite(img, 0x60)
    assert_check_clean(img)
    assert convert_raw(img, snapshot="first") == before
    assert convert_raw(img) != before


def test_create_second_gets_next_id_and_keeps_first(tmp_path: Path, kind: str) -> None:
    img = make_image(tmp_path / "a.qcow2", kind)
    first = convert_raw(img)
    qfuse_ok("snapshot", "-c", "one", img)
    overwrite(img, 0x60)
    second = convert_raw(img)
    qfuse_ok("snapshot", "-c", "two", img)
    assert_check_clean(img)
    assert qemu_snapshots(img) == [("1", "one"), ("2", "two")]
    assert convert_raw(img, snapshot="one") == first
    assert convert_raw(img, snapshot="two") == second
    assert convert_raw(img) == second


def test_create_entry_is_like_qemus(tmp_path: Path) -> None:
    """Fixed part and extra data as QEMU 7.2 writes them (24 bytes: VM state
    size, disk size, icount 0); only ID, name, date and L1 place differ."""
    img = make_image(tmp_path / "a.qcow2", "v3-64k")
    qemu_img("snapshot", "-c", "byqemu", img)
    qfuse_ok("snapshot", "-c", "byqfuse", img)
    by_qemu, by_qfuse = raw_entries(img)
    for field in ("l1_size", "vm_clock", "vm_state_size", "extra"):
        assert by_qfuse[field] == by_qemu[field], field
    assert by_qfuse["extra"] == struct.pack(">QQQ", 0, SIZE, 0)
    assert by_qfuse["id"] == b"2" and by_qfuse["name"] == b"byqfuse"
    assert by_qfuse["date_nsec"] % 1000 == 0
    assert abs(by_qfuse["date_sec"] - time.time()) < 60  # type: ignore[operator]


def test_create_on_overlay_keeps_backing_reads(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x77 0 8M")
    top = create(tmp_path / "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2",
                 cwd=tmp_path)  # fmt: skip
    qemu_io(top, "write -P 0x12 1M 64k", "write -c -P 0x13 3M 64k")
    before = convert_raw(top)
    qfuse_ok("snapshot", "-c", "s", top)
    qemu_io(top, "write -P 0x99 0 4M")
    qfuse_ok("snapshot", "-a", "s", top)
    assert_check_clean(top)
    assert convert_raw(top) == before
    assert convert_raw(top, snapshot="s") == before


def test_create_empty_image(tmp_path: Path) -> None:
    img = create(tmp_path / "a.qcow2", SIZE)
    qfuse_ok("snapshot", "-c", "empty", img)
    assert_check_clean(img)
    qemu_io(img, "write -P 0x42 0 1M")
    qfuse_ok("snapshot", "-a", "empty", img)
    assert_check_clean(img)
    assert convert_raw(img) == bytes(SIZE)


def test_duplicate_name_refused(tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.qcow2", "v3-64k")
    qemu_img("snapshot", "-c", "taken", img)
    assert_refused(img, "-c", "taken", match="exists already")


@pytest.mark.parametrize("name", ["", "x" * 256])
def test_bad_names_refused(tmp_path: Path, name: str) -> None:
    img = make_image(tmp_path / "a.qcow2", "v3-64k")
    assert_refused(img, "-c", name, match="snapshot name")


# -- refcount_bits=1: nothing can be shared ---------------------------------------------


def test_refcount_bits_1_refuses_sharing(tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.qcow2", "v3-64k", options="refcount_bits=1")
    err = assert_refused(img, "-c", "s", match="refcount_bits=1")
    assert "a.qcow2" in err
    assert_check_clean(img)


def test_refcount_bits_1_empty_image_round_trip(tmp_path: Path) -> None:
    """With nothing allocated there is nothing to share: QEMU succeeds too."""
    img = create(tmp_path / "a.qcow2", SIZE, options="refcount_bits=1,cluster_size=4k")
    qfuse_ok("snapshot", "-c", "empty", img)
    assert_check_clean(img)
    qemu_io(img, "write -P 0x42 0 3M")
    qfuse_ok("snapshot", "-a", "empty", img)
    assert_check_clean(img)
    assert convert_raw(img) == bytes(SIZE)
    qfuse_ok("snapshot", "-d", "empty", img)
    assert_check_clean(img)
    assert qemu_snapshots(img) == []


def test_many_refcount_blocks(tmp_path: Path) -> None:
    """More dirty refcount blocks than the refcount cache holds: 64-bit
    refcounts of 4 KiB clusters put 512 clusters in a block, so the 16 MiB
    of preallocated data need eight blocks, and the cache holds four."""
    img = create(tmp_path / "a.qcow2", 16 * MiB,
                 options="cluster_size=4k,refcount_bits=64,preallocation=metadata")
    qemu_io(img, "write -P 0x31 0 16M")
    before = convert_raw(img)
    qfuse_ok("snapshot", "-c", "s", img)
    assert_check_clean(img)
    qemu_io(img, "write -P 0x32 0 16M")
    qfuse_ok("snapshot", "-a", "s", img)
    assert_check_clean(img)
    assert convert_raw(img) == before
    qfuse_ok("snapshot", "-d", "s", img)
    assert_check_clean(img)


# -- apply ---------------------------------------------------------------------------


def test_apply_qemu_made_snapshot(tmp_path: Path, kind: str) -> None:
    img = make_image(tmp_path / "a.qcow2", kind)
    before = convert_raw(img)
    qemu_img("snapshot", "-c", "s1", img)
    overwrite(img, 0x60)
    qfuse_ok("snapshot", "-a", "s1", img)
    assert_check_clean(img)
    assert convert_raw(img) == before
    assert convert_raw(img, snapshot="s1") == before
    assert qemu_snapshots(img) == [("1", "s1")]
    # The reverted layer is writable copy-on-write, and the snapshot stays.
    overwrite(img, 0x70)
    assert_check_clean(img)
    assert convert_raw(img, snapshot="s1") == before


def test_create_write_apply_restores(tmp_path: Path, kind: str) -> None:
    img = make_image(tmp_path / "a.qcow2", kind)
    before = convert_raw(img)
    qfuse_ok("snapshot", "-c", "s", img)
    overwrite(img, 0x60)
    changed = convert_raw(img)
    qfuse_ok("snapshot", "-a", "s", img)
    assert_check_clean(img)
    assert convert_raw(img) == before
    # Twice in a row changes nothing.
    qfuse_ok("snapshot", "-a", "s", img)
    assert_check_clean(img)
    assert convert_raw(img) == before
    assert changed != before


def test_apply_by_id(tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.qcow2", "v3-4k")
    before = convert_raw(img)
    qfuse_ok("snapshot", "-c", "named", img)
    overwrite(img, 0x60)
    qfuse_ok("snapshot", "-a", "1", img)
    assert convert_raw(img) == before
    assert_check_clean(img)


def test_apply_same_as_qemu_apply(tmp_path: Path, kind: str) -> None:
    """qfuse's revert and QEMU's of the same image read the same."""
    ours = make_image(tmp_path / "ours.qcow2", kind)
    qemu_img("snapshot", "-c", "s", ours)
    overwrite(ours, 0x60)
    theirs = tmp_path / "theirs.qcow2"
    theirs.write_bytes(ours.read_bytes())
    qfuse_ok("snapshot", "-a", "s", ours)
    qemu_img("snapshot", "-a", "s", theirs)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours, theirs)
    assert read_header(ours)["size"] == read_header(theirs)["size"]


def test_apply_restores_virtual_size(tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.qcow2", "v3-4k")
    before = convert_raw(img)
    qfuse_ok("snapshot", "-c", "small", img)
    qemu_img("resize", img, "64M")
    qemu_io(img, "write -P 0x55 60M 1M")
    qfuse_ok("snapshot", "-a", "small", img)
    assert_check_clean(img)
    assert read_header(img)["size"] == SIZE
    assert convert_raw(img) == before
    # And back up: a snapshot of the large disk applies its size.
    qemu_img("resize", img, "64M")
    qemu_io(img, "write -P 0x56 60M 1M")
    large = convert_raw(img)
    qfuse_ok("snapshot", "-c", "large", img)
    qfuse_ok("snapshot", "-a", "small", img)
    assert read_header(img)["size"] == SIZE
    qfuse_ok("snapshot", "-a", "large", img)
    assert_check_clean(img)
    assert read_header(img)["size"] == 64 * MiB
    assert convert_raw(img) == large


def test_apply_unknown_refused(tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.qcow2", "v3-64k")
    qemu_img("snapshot", "-c", "s1", img)
    assert_refused(img, "-a", "nope", match="no snapshot with ID or name 'nope'")


# -- delete --------------------------------------------------------------------------


def test_delete_qemu_made_keeps_the_other(tmp_path: Path, kind: str) -> None:
    img = make_image(tmp_path / "a.qcow2", kind)
    first = convert_raw(img)
    qemu_img("snapshot", "-c", "first", img)
    overwrite(img, 0x60)
    second = convert_raw(img)
    qemu_img("snapshot", "-c", "second", img)
    overwrite(img, 0x70)
    active = convert_raw(img)
    qfuse_ok("snapshot", "-d", "first", img)
    assert_check_clean(img)
    assert qemu_snapshots(img) == [("2", "second")]
    assert convert_raw(img, snapshot="second") == second
    assert convert_raw(img) == active
    qfuse_ok("snapshot", "-d", "second", img)
    assert_check_clean(img)
    assert qemu_snapshots(img) == []
    assert read_header(img)["snapshots_offset"] == 0
    assert convert_raw(img) == active
    assert first != second != active


def test_delete_qfuse_made_one_of_two(tmp_path: Path, kind: str) -> None:
    img = make_image(tmp_path / "a.qcow2", kind)
    qfuse_ok("snapshot", "-c", "first", img)
    overwrite(img, 0x60)
    second = convert_raw(img)
    qfuse_ok("snapshot", "-c", "second", img)
    qfuse_ok("snapshot", "-d", "first", img)
    assert_check_clean(img)
    assert qemu_snapshots(img) == [("2", "second")]
    assert convert_raw(img, snapshot="second") == second
    assert convert_raw(img) == second
    # The active layer owns its clusters again where the snapshot let go.
    qfuse_ok("snapshot", "-d", "second", img)
    assert_check_clean(img)
    qemu_io(img, "write -P 0x99 0 1M")
    assert_check_clean(img)


def test_delete_newest_then_create_reuses_next_id(tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.qcow2", "v3-4k")
    qfuse_ok("snapshot", "-c", "a", img)
    qfuse_ok("snapshot", "-c", "b", img)
    qfuse_ok("snapshot", "-d", "1", img)  # by ID
    qfuse_ok("snapshot", "-c", "c", img)
    assert qemu_snapshots(img) == [("2", "b"), ("3", "c")]
    assert_check_clean(img)


def test_delete_frees_what_only_it_held(tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.qcow2", "v3-64k")
    qfuse_ok("snapshot", "-c", "s", img)
    qemu_io(img, "write -P 0x99 0 8M")  # the active layer lets go of everything
    qfuse_ok("snapshot", "-d", "s", img)
    assert_check_clean(img)
    check = json.loads(qemu_img("check", "--output", "json", img))
    # Only the new data (8 MiB = 128 clusters) stays allocated.
    assert check["allocated-clusters"] == 128


def test_delete_keeps_other_entries_byte_for_byte(tmp_path: Path) -> None:
    """A name that is not UTF-8 and extra data qfuse does not know survive."""
    img = make_image(tmp_path / "a.qcow2", "v3-64k")
    qemu_img("snapshot", "-c", "odd\xe9", img)
    qemu_img("snapshot", "-c", "gone", img)
    entries = raw_entries(img)
    h = read_header(img)
    with open(img, "r+b") as f:  # make the first name invalid UTF-8: 'odd\xc3' + 0xff
        name_at = h["snapshots_offset"] + 40 + len(entries[0]["extra"]) + 1  # type: ignore[arg-type]
        f.seek(name_at + 4)
        f.write(b"\xff")
    keep = raw_entries(img)[0]
    qfuse_ok("snapshot", "-d", "gone", img)
    assert raw_entries(img) == [keep]
    assert_check_clean(img)


def test_delete_unknown_refused(tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.qcow2", "v3-64k")
    assert_refused(img, "-d", "nope", match="no snapshot")


# -- a snapshot qfuse made, mounted ---------------------------------------------------


@pytest.mark.mount
@pytest.mark.parametrize("kind", ["v3-64k", "v2-4k", "extl2-64k"])
def test_mount_snapshot_created_by_qfuse(tmp_path: Path, mount, kind: str) -> None:  # type: ignore[no-untyped-def]
    img = make_image(tmp_path / "a.qcow2", kind)
    before = convert_raw(img)
    qfuse_ok("snapshot", "-c", "mine", img)
    overwrite(img, 0x60)
    view = mount(img, "--snapshot", "mine")
    assert_same_as_qemu(view, img, snapshot="mine", expected=before)


# -- listing ---------------------------------------------------------------------------


def test_list_matches_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    img = make_image(tmp_path / "a.qcow2", "v3-64k")
    assert qfuse_ok("snapshot", "-l", img) == qemu_img("snapshot", "-l", img) == ""
    qemu_img("snapshot", "-c", "by qemu", img)
    qfuse_ok("snapshot", "-c", "a rather long snapshot name, longer than the column", img)
    qfuse_ok("snapshot", "-c", "x", img)
    qfuse_ok("snapshot", "-d", "x", img)
    qfuse_ok("snapshot", "-c", "été", img)
    ours = qfuse_ok("snapshot", "-l", img)
    theirs = qemu_img("snapshot", "-l", img)
    assert ours == theirs
    assert ours.splitlines()[1] == (
        "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT"
    )
    # IDs as QEMU numbers them: one more than the largest left ("x" had 3).
    assert [line.split()[0] for line in ours.splitlines()[2:]] == ["1", "2", "3"]


def test_list_escapes_control_characters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    img = make_image(tmp_path / "a.qcow2", "v3-64k")
    before = convert_raw(img)
    qfuse_ok("snapshot", "-c", "esc\x1b[31mred", img)
    qemu_img("snapshot", "-c", "tab\there", img)
    ours = qfuse_ok("snapshot", "-l", img)
    assert "\x1b" not in ours and "\t" not in ours
    lines = ours.splitlines()
    assert lines[2].split()[1] == "esc\\x1b[31mred"
    assert lines[3].split()[1] == "tab\\x09here"
    # Apart from the name, the columns are qemu-img's.
    theirs = qemu_img("snapshot", "-l", img).splitlines()
    assert lines[:2] == theirs[:2]
    tail = 8 + 20 + 13 + 11
    for mine, qemus in zip(lines[2:], theirs[2:], strict=True):
        assert (mine[:10], mine[-tail:]) == (qemus[:10], qemus[-tail:])
    # qemu names it, and the real name works for every command.
    assert qemu_snapshots(img)[0] == ("1", "esc\x1b[31mred")
    assert convert_raw(img, snapshot="esc\x1b[31mred") == before
    code, _, err = qfuse("snapshot", "-a", "nothing\x1b", img)
    assert code == 1 and "\x1b" not in err and "nothing\\x1b" in err
    qfuse_ok("snapshot", "-d", "esc\x1b[31mred", img)
    assert_check_clean(img)


def test_info_escapes_too(tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.qcow2", "v3-64k")
    qfuse_ok("snapshot", "-c", "bell\x07", img)
    out = qfuse_ok("info", img)
    assert "bell\\x07" in out and "\x07" not in out


# -- locks -----------------------------------------------------------------------------


@pytest.mark.parametrize("action", [("-c", "new"), ("-a", "s"), ("-d", "s"), ("-l",)])
def test_refused_while_qemu_holds_image(tmp_path: Path, action: tuple[str, ...]) -> None:
    img = make_image(tmp_path / "a.qcow2", "v3-64k")
    qemu_img("snapshot", "-c", "s", img)
    with qemu_io_holding(img):
        assert_refused(img, *action, match="lock")
    qfuse_ok("snapshot", *action, img)  # and fine once QEMU let go


def test_read_only_qemu_allows_list_only(tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.qcow2", "v3-64k")
    qemu_img("snapshot", "-c", "s", img)
    with qemu_io_holding(img, "-r"):
        assert "s" in qfuse_ok("snapshot", "-l", img)
        assert_refused(img, "-c", "new", match="lock")


@pytest.mark.mount
def test_refused_while_mounted_read_write(tmp_path: Path, mount) -> None:  # type: ignore[no-untyped-def]
    img = make_image(tmp_path / "a.qcow2", "v3-64k")
    qemu_img("snapshot", "-c", "s", img)
    mount(img)
    for action in (("-c", "new"), ("-a", "s"), ("-d", "s"), ("-l",)):
        code, out, err = qfuse("snapshot", *action, img)
        assert code == 1 and out == "" and err.count("\n") == 1 and "lock" in err, err


@pytest.mark.mount
def test_read_only_mount_refuses_changes_allows_list(tmp_path: Path, mount) -> None:  # type: ignore[no-untyped-def]
    """A read-only mount keeps QEMU's snapshot command and qfuse's changes
    out, and lets a listing in (as qemu-img does beside `qemu-io -r`)."""
    img = make_image(tmp_path / "a.qcow2", "v3-64k")
    qfuse_ok("snapshot", "-c", "s", img)
    mount(img, "--read-only")
    res = run(["qemu-img", "snapshot", "-c", "other", img], check=False)
    assert res.returncode != 0 and "lock" in res.stderr
    assert "s" in qfuse_ok("snapshot", "-l", img)  # reading beside a read-only mount is fine
    assert_refused(img, "-c", "new", match="lock")


# -- other errors ---------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    for action in (("-l",), ("-c", "s"), ("-a", "s"), ("-d", "s")):
        err = assert_refused(tmp_path / "nope.qcow2", *action, match="No such file")
        assert "nope.qcow2" in err
    assert not (tmp_path / "nope.qcow2").exists()


def test_not_a_qcow2_image(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(64 * KiB))
    for action in (("-l",), ("-c", "s"), ("-a", "s"), ("-d", "s")):
        assert_refused(raw, *action, match="disk.raw")


def test_external_data_file_refused(tmp_path: Path) -> None:
    img = create(Path("a.qcow2"), SIZE, options="data_file=a.data", cwd=tmp_path)
    assert (tmp_path / "a.data").exists()
    err = assert_refused(img, "-c", "s", match="external data file")
    assert "not supported" in err


def test_usage_errors(tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.qcow2", "v3-64k")
    before = sha256(img)
    for argv in (["snapshot", img], ["snapshot", "-l", "-c", "x", img], ["snapshot", "-c"]):
        code, out, err = qfuse(*argv)
        assert code == 2 and out == "" and err.count("\n") == 1, (argv, err)
    assert sha256(img) == before


# -- a crash after any write ---------------------------------------------------------
#
# The engine's writes are cut off after the n-th, for every n: what reached
# the file must be a valid image whose snapshots and active layer read as
# before or as after the operation, with at most leaked clusters and COPIED
# flags that `qemu-img check -r all` sets right (QEMU has the same window:
# no order of two writes moves a refcount and a flag at once).  After the
# repair, a write to the active layer must leave every snapshot intact: no
# refcount was ever too low.


class _Crash(Exception):
    pass


def _run_cut_off(monkeypatch: pytest.MonkeyPatch, limit: int | None, operation) -> int:  # type: ignore[no-untyped-def]
    """Run `operation()` with the engine's host writes stopped after `limit`;
    the number of writes it made."""
    from qfuse.engine.hostfile import HostFile

    real = HostFile.pwrite
    count = 0

    async def pwrite(self: HostFile, host_offset: int, data: bytes) -> None:
        nonlocal count
        if limit is not None and count >= limit:
            raise _Crash
        count += 1
        await real(self, host_offset, data)

    monkeypatch.setattr(HostFile, "pwrite", pwrite)
    try:
        operation()
    except _Crash:
        pass
    finally:
        monkeypatch.setattr(HostFile, "pwrite", real)
    return count


def _state(image: Path) -> tuple[dict[str, bytes], bytes]:
    names = [name for _, name in qemu_snapshots(image)]
    return {name: convert_raw(image, snapshot=name) for name in names}, convert_raw(image)


@pytest.mark.parametrize("kind", ["v3-4k", "extl2-64k"])
@pytest.mark.parametrize("operation", ["create", "apply", "delete"])
def test_crash_after_any_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               operation: str, kind: str) -> None:  # fmt: skip
    from qfuse.engine import snapshots as engine

    base = make_image(tmp_path / "base.qcow2", kind)
    qemu_img("snapshot", "-c", "old", base)
    overwrite(base, 0x60)
    qemu_img("snapshot", "-c", "mid", base)
    overwrite(base, 0x70)
    before_snaps, before_active = _state(base)
    run_op = {
        "create": lambda path: engine.create_snapshot(str(path), "new"),
        "apply": lambda path: engine.apply_snapshot(str(path), "old"),
        "delete": lambda path: engine.delete_snapshot(str(path), "old"),
    }[operation]
    done = tmp_path / "done.qcow2"
    done.write_bytes(base.read_bytes())
    writes = _run_cut_off(monkeypatch, None, lambda: run_op(done))
    assert_check_clean(done)
    after_snaps, after_active = _state(done)
    assert writes > 3
    for limit in range(writes):
        img = tmp_path / f"cut{limit}.qcow2"
        img.write_bytes(base.read_bytes())
        _run_cut_off(monkeypatch, limit, lambda img=img: run_op(img))
        where = f"after {limit} of {writes} writes"
        res = run(["qemu-img", "check", img], check=False)
        errors = [line for line in res.stdout.splitlines() + res.stderr.splitlines()
                  if line.startswith("ERROR") and not line.startswith("ERROR OFLAG_COPIED")]
        assert not errors, f"{where}: {errors[:5]}"
        snaps, active = _state(img)
        assert snaps in (before_snaps, after_snaps), f"{where}: snapshots {sorted(snaps)}"
        assert active in (before_active, after_active), f"{where}: active layer"
        run(["qemu-img", "check", "-r", "all", img], check=False)
        assert_check_clean(img)
        overwrite(img, 0x90)
        qemu_io(img, "write -P 0x91 0 8M")
        assert _state(img)[0] == snaps, f"{where}: a write to the active layer changed a snapshot"
        img.unlink()
