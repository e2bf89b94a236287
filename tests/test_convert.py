"""`qfuse convert` in every direction, checked by qemu-img.

Every output must be `qemu-img compare`-identical to its source and, when
qcow2, pass `qemu-img check` without leaks.  For qcow2 outputs the cluster
counts are compared with what `qemu-img convert` makes of the same source:
the same clusters allocated (zeros never are), the same ones compressed
(each that shrinks).  A raw output must leave holes where the disk is zero.
Bad inputs fail with one line and leave DEST as it was, with no temporary
file behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from images import qemu_img, qemu_io, run

from qfuse.cli.main import main
from qfuse.engine import convert as convert_mod
from qfuse.engine import open_image

KiB = 1024
MiB = 1024 * 1024


def qfuse(capsys: pytest.CaptureFixture[str], *args: str | os.PathLike[str]) -> tuple[int, str]:
    """Run `qfuse ARGS...` in-process; (exit status, stderr)."""
    status = main([os.fspath(a) for a in args])
    return status, capsys.readouterr().err


def check(image: Path) -> dict:
    """`qemu-img check` must be clean (exit 0: no corruption, no leak)."""
    result = run(["qemu-img", "check", "--output", "json", image], check=False)
    assert result.returncode == 0, f"qemu-img check {image}: {result.stdout}{result.stderr}"
    out = json.loads(result.stdout)
    assert "leaks" not in out and "corruptions" not in out
    return out


def counts(image: Path) -> tuple[int, int, int]:
    out = check(image)
    # qemu-img leaves the counts out when they are 0.
    return (out["total-clusters"], out.get("allocated-clusters", 0),
            out.get("compressed-clusters", 0))


def leftovers(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(".qfuse-tmp")]


# -- sources ----------------------------------------------------------------


def make_qcow2(path: Path, size: str = "5M", options: str = "cluster_size=64k") -> Path:
    """Every kind of cluster: data, compressible and not, zero-filled data,
    ZERO clusters, compressed clusters, unallocated; a partial last cluster."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", options, path, size)
    qemu_io(path,
            "write -P 0xab 0 200k",            # compressible data, an unaligned end
            "write -P 0 256k 128k",            # data clusters that hold zeros
            "write -z 512k 128k",              # ZERO clusters
            "write -c -P 0x11 1M 128k",        # compressed clusters
            "write -P 0x22 2M 4k",             # one sector-ish write in a cluster
            )  # fmt: skip
    # Incompressible data: random bytes through a raw file.
    noise = path.with_suffix(".noise")
    noise.write_bytes(os.urandom(192 * KiB))
    qemu_io(path, f"write -s {noise} 3M {192 * KiB}")
    size_bytes = int(json.loads(qemu_img("info", "--output", "json", path))["virtual-size"])
    qemu_io(path, f"write -P 0x33 {size_bytes - 512} 512")  # the very last sector
    return path


def make_raw(path: Path, size: int = 3 * MiB + 1536) -> Path:
    """A sparse raw disk: data, a zero-filled block, holes; not whole clusters."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(4096)
        f.write(b"\x5a" * 70_000)
        f.seek(MiB)
        f.write(bytes(64 * KiB))  # written zeros: not a hole, still zero
        f.seek(2 * MiB + 100)
        f.write(os.urandom(100_000))
        f.seek(size - 10)
        f.write(b"0123456789")
    return path


@pytest.fixture
def qcow2_source(tmp_path: Path) -> Path:
    return make_qcow2(tmp_path / "src.qcow2", "5M")


@pytest.fixture
def raw_source(tmp_path: Path) -> Path:
    return make_raw(tmp_path / "src.raw")


@pytest.fixture
def chain_source(tmp_path: Path) -> Path:
    """raw base ← qcow2 mid (4k clusters, larger) ← qcow2 top (smaller than mid)."""
    base = make_raw(tmp_path / "base.raw", 2 * MiB)
    mid = tmp_path / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.raw",
             "-F", "raw", mid, "6M")
    qemu_io(mid, "write -P 0x77 4k 8k", "write -z 1M 64k", "write -P 0x88 5M 100k")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, "7M")
    qemu_io(top, "write -P 0x99 0 2k", "write -z 5M 64k", "write -c -P 0x44 6M 128k")
    assert base.exists()
    return top


# -- qcow2 → raw --------------------------------------------------------------


def assert_sparse(raw: Path, max_data: int) -> None:
    st = raw.stat()
    assert st.st_blocks * 512 <= max_data, f"{raw} uses {st.st_blocks * 512} bytes"


def test_qcow2_to_raw(tmp_path: Path, qcow2_source: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "out.raw"
    assert qfuse(capsys, "convert", "-O", "raw", qcow2_source, dest) == (0, "")
    qemu_img("compare", qcow2_source, dest)
    assert dest.stat().st_size == 5 * MiB
    # Non-zero data: 200k + 4k + 128k + 192k + 512, in 4 KiB blocks (528 KiB, and
    # room for the file system's extent blocks); the zeros are holes.
    assert_sparse(dest, 528 * KiB + 64 * KiB)


def test_raw_is_the_default_output(tmp_path: Path, qcow2_source: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "out.img"
    assert qfuse(capsys, "convert", qcow2_source, dest) == (0, "")
    assert json.loads(qemu_img("info", "--output", "json", dest))["format"] == "raw"
    qemu_img("compare", qcow2_source, dest)


def test_chain_to_raw(tmp_path: Path, chain_source: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "out.raw"
    assert qfuse(capsys, "convert", chain_source, dest) == (0, "")
    qemu_img("compare", chain_source, dest)
    assert dest.stat().st_size == 7 * MiB
    assert_sparse(dest, 600 * KiB)


@pytest.mark.parametrize("preallocation", ["falloc", "full"])
def test_raw_preallocation(tmp_path: Path, qcow2_source: Path, preallocation: str,
                           capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "out.raw"
    assert qfuse(capsys, "convert", "-o", f"preallocation={preallocation}", qcow2_source,
                 dest) == (0, "")
    qemu_img("compare", qcow2_source, dest)
    assert dest.stat().st_blocks * 512 >= 5 * MiB


# -- → qcow2 -------------------------------------------------------------------


def qemu_convert(source: Path, dest: Path, *args: str) -> Path:
    qemu_img("convert", "-O", "qcow2", *args, source, dest)
    return dest


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize("kind", ["qcow2", "raw", "chain"])
def test_to_qcow2_like_qemu_img(tmp_path: Path, request: pytest.FixtureRequest, kind: str,
                                compression: str, compress: bool,
                                capsys: pytest.CaptureFixture[str]) -> None:
    source: Path = request.getfixturevalue(f"{kind}_source")
    options = ["-o", f"compression_type={compression}"]
    flags = ["-c"] if compress else []
    dest = tmp_path / "out.qcow2"
    assert qfuse(capsys, "convert", *flags, "-O", "qcow2", *options, source, dest) == (0, "")
    qemu_img("compare", source, dest)
    theirs = qemu_convert(source, tmp_path / "theirs.qcow2", *flags, *options)
    assert counts(dest) == counts(theirs)
    total, allocated, compressed = counts(dest)
    assert allocated > 0 and (compressed > 0) == compress
    info = json.loads(qemu_img("info", "--output", "json", dest))
    assert info["format-specific"]["data"]["compression-type"] == compression
    assert "backing-filename" not in info


QCOW2_OPTIONS = [
    "cluster_size=512",
    "cluster_size=4k",
    "cluster_size=2M",
    "compat=0.10",
    "compat=v2,cluster_size=16k",
    "lazy_refcounts=on",
    "refcount_bits=1",
    "refcount_bits=2",
    "refcount_bits=64,cluster_size=1k",
    "extended_l2=on",
    "extended_l2=on,cluster_size=16k,compression_type=zstd",
]


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
@pytest.mark.parametrize("options", QCOW2_OPTIONS)
def test_qcow2_options(tmp_path: Path, qcow2_source: Path, options: str, compress: bool,
                       capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["-c"] if compress else []
    dest = tmp_path / "out.qcow2"
    assert qfuse(capsys, "convert", *flags, "-O", "qcow2", "-o", options, qcow2_source,
                 dest) == (0, "")
    qemu_img("compare", qcow2_source, dest)
    theirs = qemu_convert(qcow2_source, tmp_path / "theirs.qcow2", *flags, "-o", options)
    if "cluster_size=512" in options or "cluster_size=1k" in options:
        # qemu-img finds zeros in 4 KiB steps (its -S default), qfuse per
        # cluster: with smaller clusters qfuse leaves more unallocated.
        mine_counts, their_counts = counts(dest), counts(theirs)
        assert mine_counts[0] == their_counts[0] and mine_counts[2] == their_counts[2]
        assert mine_counts[1] <= their_counts[1]
    else:
        assert counts(dest) == counts(theirs)
    mine_info = json.loads(qemu_img("info", "--output", "json", dest))
    their_info = json.loads(qemu_img("info", "--output", "json", theirs))
    for info in (mine_info, their_info):
        for key in ("filename", "actual-size"):
            info.pop(key)
    assert mine_info == their_info


@pytest.mark.parametrize("preallocation", ["metadata", "falloc", "full"])
def test_qcow2_preallocation(tmp_path: Path, qcow2_source: Path, preallocation: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "out.qcow2"
    assert qfuse(capsys, "convert", "-O", "qcow2", "-o", f"preallocation={preallocation}",
                 qcow2_source, dest) == (0, "")
    qemu_img("compare", qcow2_source, dest)
    total, allocated, _ = counts(dest)
    assert allocated == total  # every cluster, zeros too


def test_incompressible_clusters_stay_plain(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "noise.raw"
    source.write_bytes(os.urandom(256 * KiB) + b"\x01" * (256 * KiB))
    dest = tmp_path / "out.qcow2"
    assert qfuse(capsys, "convert", "-c", "-O", "qcow2", source, dest) == (0, "")
    qemu_img("compare", source, dest)
    total, allocated, compressed = counts(dest)
    assert (allocated, compressed) == (8, 4)


@pytest.mark.parametrize("size", [512, 1536, 64 * KiB + 512, 3 * MiB - 512, 2 * MiB])
@pytest.mark.parametrize("direction", ["raw-to-qcow2", "qcow2-to-raw", "qcow2-to-qcow2-c"])
def test_odd_sizes(tmp_path: Path, size: int, direction: str,
                   capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        f.seek(size - 512)
        f.write(b"\xee" * 512)
        f.seek(0)
        f.write(b"\xdd" * min(size, 1000))
    if direction == "raw-to-qcow2":
        source, args = raw, ["-O", "qcow2"]
    else:
        source = tmp_path / "src.qcow2"
        qemu_img("convert", "-O", "qcow2", "-o", "cluster_size=4k", raw, source)
        args = ["-O", "raw"] if direction == "qcow2-to-raw" else ["-c", "-O", "qcow2"]
    dest = tmp_path / "out"
    assert qfuse(capsys, "convert", *args, source, dest) == (0, "")
    qemu_img("compare", source, dest)
    info = json.loads(qemu_img("info", "--output", "json", dest))
    assert info["virtual-size"] == size
    if info["format"] == "qcow2":
        check(dest)
    else:
        assert dest.stat().st_size == size


def test_empty_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "empty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", source, "0")
    for fmt in ("raw", "qcow2"):
        dest = tmp_path / f"out.{fmt}"
        assert qfuse(capsys, "convert", "-O", fmt, source, dest) == (0, "")
        assert json.loads(qemu_img("info", "--output", "json", dest))["virtual-size"] == 0
    check(tmp_path / "out.qcow2")


def test_all_zero_disk_allocates_nothing(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "zeros.raw"
    source.write_bytes(bytes(2 * MiB))  # written zeros, no holes
    dest = tmp_path / "out.qcow2"
    assert qfuse(capsys, "convert", "-O", "qcow2", source, dest) == (0, "")
    assert counts(dest)[1] == 0
    raw = tmp_path / "out.raw"
    assert qfuse(capsys, "convert", source, raw) == (0, "")
    assert raw.stat().st_blocks == 0 and raw.stat().st_size == 2 * MiB


def test_engine_reads_what_it_wrote(tmp_path: Path, chain_source: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """qfuse's own read path over its compressed output equals qemu's raw view."""
    import trio

    dest = tmp_path / "out.qcow2"
    assert qfuse(capsys, "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,"
                 "cluster_size=4k", chain_source, dest) == (0, "")
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", chain_source, expected)
    image = open_image(os.fspath(dest))
    try:
        data = trio.run(image.read, 0, image.virtual_size)
    finally:
        image.close()
    assert data == expected.read_bytes()


def test_replaces_dest_keeping_its_mode(tmp_path: Path, qcow2_source: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "out.qcow2"
    dest.write_bytes(b"old contents" * 1000)
    dest.chmod(0o640)
    assert qfuse(capsys, "convert", "-O", "qcow2", qcow2_source, dest) == (0, "")
    qemu_img("compare", qcow2_source, dest)
    assert dest.stat().st_mode & 0o777 == 0o640
    assert leftovers(tmp_path) == []


def test_no_progress_bar_off_a_terminal(tmp_path: Path, qcow2_source: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["convert", os.fspath(qcow2_source), os.fspath(tmp_path / "out.raw")])
    out, err = capsys.readouterr()
    assert (status, out, err) == (0, "", "")


def test_progress_bar_when_asked(tmp_path: Path, qcow2_source: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["convert", "-p", os.fspath(qcow2_source), os.fspath(tmp_path / "out.raw")])
    assert status == 0
    assert "out.raw" in capsys.readouterr().err


# -- refusals ------------------------------------------------------------------


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "dest.img"
    path.write_bytes(b"precious")
    return path


REFUSALS: list[tuple[str, list[str], str, int]] = [
    # (id, arguments before SOURCE DEST ({src} is replaced), message part, exit status)
    ("missing-source", ["nonexistent.qcow2"], "No such file", 1),
    ("text-source", ["notes.txt"], "not a qcow2 image, nor a raw disk image", 1),
    ("text-source-to-qcow2", ["-O", "qcow2", "notes.txt"], "not a qcow2 image", 1),
    ("vmdk-source", ["disk.vmdk"], "VMDK", 1),
    ("unknown-key", ["-O", "qcow2", "-o", "foo=1", "{src}"], "invalid parameter 'foo'", 2),
    ("raw-key-for-raw", ["-O", "raw", "-o", "cluster_size=4k", "{src}"],
     "invalid parameter 'cluster_size'", 2),
    ("bad-value", ["-O", "qcow2", "-o", "cluster_size=3k", "{src}"], "power of two", 2),
    ("backing-file", ["-O", "qcow2", "-o", "backing_file=x", "{src}"], "cannot be used", 2),
    ("size", ["-O", "qcow2", "-o", "size=1G", "{src}"], "cannot be used", 2),
    ("compress-raw", ["-c", "{src}"], "qcow2", 2),
    ("compress-prealloc", ["-c", "-O", "qcow2", "-o", "preallocation=full", "{src}"],
     "preallocation", 2),
    ("unknown-format", ["-O", "vmdk", "{src}"], "invalid choice", 2),
    ("too-large-for-clusters", ["-O", "qcow2", "-o", "cluster_size=512", "huge.qcow2"],
     "too large", 1),
    ("corrupt-source", ["corrupt.qcow2"], "corrupt.qcow2", 1),
]


@pytest.mark.parametrize(("args", "message", "status"), [c[1:] for c in REFUSALS],
                         ids=[c[0] for c in REFUSALS])
def test_refusals(tmp_path: Path, qcow2_source: Path, dest: Path, args: list[str], message: str,
                  status: int, capsys: pytest.CaptureFixture[str],
                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "notes.txt").write_text("remember the milk\n")
    qemu_img("create", "-q", "-f", "vmdk", tmp_path / "disk.vmdk", "1M")
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "huge.qcow2", "1P")
    corrupt = tmp_path / "corrupt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", corrupt, "1M")
    with open(corrupt, "r+b") as f:
        f.seek(20)
        f.write((40).to_bytes(4, "big"))  # cluster_bits 40
    monkeypatch.chdir(tmp_path)
    args = [os.fspath(qcow2_source) if a == "{src}" else a for a in args]
    got, err = qfuse(capsys, "convert", *args, dest)
    assert got == status, err
    assert message in err
    assert err.startswith("qfuse: ") and err.count("\n") == 1
    assert dest.read_bytes() == b"precious"
    assert leftovers(tmp_path) == []


def test_dest_is_the_source(tmp_path: Path, chain_source: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    before = (tmp_path / "mid.qcow2").read_bytes()
    for target in (chain_source, tmp_path / "mid.qcow2", tmp_path / "base.raw"):
        status, err = qfuse(capsys, "convert", chain_source, target)
        assert status == 1 and "source image" in err
    assert (tmp_path / "mid.qcow2").read_bytes() == before


def test_dest_directory_refused(tmp_path: Path, qcow2_source: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d").mkdir()
    status, err = qfuse(capsys, "convert", qcow2_source, tmp_path / "d")
    assert status == 1 and "not a regular file" in err


def test_failure_midway_leaves_dest_untouched(tmp_path: Path, qcow2_source: Path, dest: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real_write = convert_mod.Qcow2Dest.write

    def failing_write(self: convert_mod.Qcow2Dest, *args: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(28, "No space left on device")
        real_write(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(convert_mod, "CHUNK_BYTES", 1 * MiB)
    monkeypatch.setattr(convert_mod.Qcow2Dest, "write", failing_write)
    status, err = qfuse(capsys, "convert", "-O", "qcow2", qcow2_source, dest)
    assert status == 1 and "No space left on device" in err and err.count("\n") == 1
    assert dest.read_bytes() == b"precious"
    assert leftovers(tmp_path) == []


def test_error_is_one_line_from_the_real_command(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a disk\n")
    result = subprocess.run(
        [sys.executable, "-m", "qfuse", "convert", "-O", "qcow2", notes, tmp_path / "out"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_nonzero_spans_match_block_by_block() -> None:
    """The find-based zero-block search against the obvious loop."""
    import random

    block = convert_mod.RAW_BLOCK

    def reference(data: bytearray, start: int, end: int, phase: int) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        pos = start
        while pos < end:
            block_end = min(end, ((pos + phase) // block + 1) * block - phase)
            if any(data[pos:block_end]):
                if spans and spans[-1][1] == pos:
                    spans[-1] = (spans[-1][0], block_end)
                else:
                    spans.append((pos, block_end))
            pos = block_end
        return spans

    rnd = random.Random(5)
    for _ in range(1500):
        n = rnd.randint(1, 40_000)
        data = bytearray(n)
        for _ in range(rnd.randint(0, 12)):
            a = rnd.randrange(n)
            b = min(n, a + rnd.choice([1, 100, 4095, 4096, 5000, 9000]))
            data[a:b] = rnd.randbytes(b - a) if rnd.random() < 0.5 else b"\x01" * (b - a)
        start = rnd.randrange(n)
        end = rnd.randint(start + 1, n)
        phase = rnd.randrange(block)
        assert convert_mod.nonzero_spans(data, start, end, phase) == \
            reference(data, start, end, phase)


def test_dest_symlink_is_followed(tmp_path: Path, qcow2_source: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    real = tmp_path / "real.qcow2"
    real.write_bytes(b"old")
    link = tmp_path / "link.qcow2"
    link.symlink_to("real.qcow2")
    assert qfuse(capsys, "convert", "-O", "qcow2", qcow2_source, link) == (0, "")
    assert link.is_symlink()
    qemu_img("compare", qcow2_source, real)
