"""`qfuse create` against `qemu-img create`, option by option.

Each case runs the same command through both tools and compares what
`qemu-img` itself says of the two images: `info` (every field but the file
name and its disk use), `check` (clean, and the same cluster counts) and
`map`.  Where QEMU's layout is the one qfuse reproduces (one refcount block,
no falloc/full), the files must be identical byte for byte, offsets and all.
Then the refusals: one line, a non-zero exit, and no file left behind.
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
from qfuse.engine import open_image
from qfuse.engine.locking import ImageLock


def qfuse(capsys: pytest.CaptureFixture[str], *args: str | os.PathLike[str]) -> tuple[int, str]:
    """Run `qfuse ARGS...` in-process; (exit status, stderr)."""
    status = main([os.fspath(a) for a in args])
    return status, capsys.readouterr().err


def qemu_json(*args: str | os.PathLike[str], cwd: Path | None = None) -> object:
    return json.loads(run(["qemu-img", *args], cwd=cwd, check=False).stdout)


def _info(image: Path) -> dict:
    info = qemu_json("info", "--output", "json", image)
    assert isinstance(info, dict)
    for key in ("filename", "actual-size", "full-backing-filename"):
        info.pop(key, None)
    return info


def _check(image: Path, exact: bool) -> dict:
    result = run(["qemu-img", "check", "--output", "json", image], check=False)
    assert result.returncode == 0, f"qemu-img check {image}: {result.stdout}{result.stderr}"
    check = json.loads(result.stdout)
    check.pop("filename")
    if not exact:  # another layout: the file ends and fragments elsewhere
        check.pop("image-end-offset")
        check.pop("fragmented-clusters", None)
    return check


def _map(image: Path, exact: bool) -> list[dict]:
    entries = qemu_json("map", "--output", "json", image)
    assert isinstance(entries, list)
    if exact:
        return entries
    # Another layout: where the file has holes (qemu-img's "zero") and so how
    # the runs split depend on it; what the guest sees does not.
    merged: list[dict] = []
    for entry in entries:
        entry.pop("offset", None)
        entry.pop("zero", None)
        last = merged[-1] if merged else None
        if last is not None and {k: v for k, v in last.items() if k not in ("start", "length")} \
                == {k: v for k, v in entry.items() if k not in ("start", "length")}:
            last["length"] += entry["length"]
        else:
            merged.append(entry)
    return merged


def assert_same_as_qemu(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                        size: str | None, *, exact: bool = True) -> Path:
    """`qfuse create ARGS mine SIZE` == `qemu-img create -f qcow2 ARGS theirs SIZE`."""
    theirs, mine = "theirs.qcow2", "mine.qcow2"
    tail = [size] if size is not None else []
    run(["qemu-img", "create", "-q", "-f", "qcow2", *args, theirs, *tail], cwd=tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        status, err = qfuse(capsys, "create", "-q", *args, mine, *tail)
    finally:
        os.chdir(cwd)
    assert (status, err) == (0, "")
    theirs_path, mine_path = tmp_path / theirs, tmp_path / mine
    assert _info(mine_path) == _info(theirs_path)
    assert _check(mine_path, exact) == _check(theirs_path, exact)
    assert _map(mine_path, exact) == _map(theirs_path, exact)
    if exact:
        assert mine_path.read_bytes() == theirs_path.read_bytes()
    image = open_image(os.fspath(mine_path))  # qfuse's own engine opens it too
    try:
        assert image.virtual_size == _info(theirs_path)["virtual-size"]
    finally:
        image.close()
    return mine_path


CASES: list[tuple[str, list[str], str, bool]] = [
    # (id, options, SIZE, same layout as QEMU)
    ("default", [], "64M", True),
    ("compat-0.10", ["-o", "compat=0.10"], "64M", True),
    ("compat-v2", ["-o", "compat=v2"], "1M", True),
    ("compat-v3", ["-o", "compat=v3"], "1M", True),
    ("compat-1.1-lazy", ["-o", "compat=1.1,lazy_refcounts=on"], "1M", True),
    ("lazy-bare-flag", ["-o", "lazy_refcounts"], "1M", True),
    ("lazy-off", ["-o", "lazy_refcounts=off"], "1M", True),
    ("cluster-512", ["-o", "cluster_size=512"], "8M", True),
    ("cluster-4k", ["-o", "cluster_size=4k"], "8M", True),
    ("cluster-8k", ["-o", "cluster_size=8192"], "8M", True),
    ("cluster-2M", ["-o", "cluster_size=2M"], "8M", True),
    ("cluster-hex", ["-o", "cluster_size=0x1000"], "1M", True),
    ("later-o-wins", ["-o", "cluster_size=64k", "-o", "cluster_size=4k"], "1M", True),
    *[(f"refcount-{bits}", ["-o", f"refcount_bits={bits}"], "4M", True)
      for bits in (1, 2, 4, 8, 16, 32, 64)],
    ("zstd", ["-o", "compression_type=zstd"], "1M", True),
    ("zlib", ["-o", "compression_type=zlib"], "1M", True),
    ("extended-l2", ["-o", "extended_l2=on"], "1M", True),
    ("extended-l2-16k", ["-o", "extended_l2=on,cluster_size=16k"], "32M", True),
    ("all-v3-features", ["-o", "extended_l2=on,compression_type=zstd,lazy_refcounts=on,"
                         "refcount_bits=8,cluster_size=32k"], "3M", True),
    ("prealloc-off", ["-o", "preallocation=off"], "1M", True),
    ("prealloc-metadata", ["-o", "preallocation=metadata"], "3M", True),
    ("prealloc-metadata-4k-l2s", ["-o", "preallocation=metadata,cluster_size=4k"], "5M", True),
    ("prealloc-metadata-tail", ["-o", "preallocation=metadata,cluster_size=4k"], "9k", True),
    ("prealloc-metadata-v2", ["-o", "preallocation=metadata,compat=0.10,cluster_size=4k"],
     "9k", True),
    ("prealloc-metadata-extl2", ["-o", "preallocation=metadata,extended_l2=on,"
                                 "cluster_size=16k"], "100k", True),
    ("prealloc-metadata-extl2-tail", ["-o", "preallocation=metadata,extended_l2=on"],
     "99.5k", True),
    ("prealloc-metadata-refcount1", ["-o", "preallocation=metadata,refcount_bits=1,"
                                     "cluster_size=4k"], "1M", True),
    ("prealloc-falloc", ["-o", "preallocation=falloc,cluster_size=4k"], "5M", False),
    ("prealloc-falloc-odd", ["-o", "preallocation=falloc"], "1000k", False),
    ("prealloc-full", ["-o", "preallocation=full"], "1M", False),
    ("prealloc-full-v2", ["-o", "preallocation=full,compat=0.10,cluster_size=4k"], "3M", False),
    ("prealloc-falloc-extl2", ["-o", "preallocation=falloc,extended_l2=on,cluster_size=16k"],
     "100k", False),
    ("many-refblocks", ["-o", "cluster_size=512,refcount_bits=64,preallocation=metadata"],
     "1M", False),
    ("size-0", [], "0", True),
    ("size-rounded-up", [], "1000", True),
    ("size-fraction", [], "1.5M", True),
    ("size-bytes-suffix", [], "512b", True),
    ("size-lower-k", [], "100k", True),
    ("size-hex", [], "0x100000", True),
    ("size-1T", [], "1T", True),
    ("size-large-l1", ["-o", "cluster_size=4k"], "64G", True),
]


@pytest.mark.parametrize(("args", "size", "exact"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_same_as_qemu_img(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          args: list[str], size: str, exact: bool) -> None:
    assert_same_as_qemu(tmp_path, capsys, args, size, exact=exact)


@pytest.fixture
def bases(tmp_path: Path) -> Path:
    """base.qcow2 (10M, some data) and base.raw (3M and a bit, so not whole sectors)."""
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "10M")
    qemu_io(tmp_path / "base.qcow2", "write -P 0x5a 1M 64k")
    with open(tmp_path / "base.raw", "wb") as f:
        f.truncate(3 * 1024 * 1024 + 100)
        f.write(b"raw data")
    return tmp_path


BACKING_CASES: list[tuple[str, list[str], str | None, bool]] = [
    ("qcow2", ["-b", "base.qcow2", "-F", "qcow2"], None, True),
    ("qcow2-size-given", ["-b", "base.qcow2", "-F", "qcow2"], "20M", True),
    ("qcow2-smaller", ["-b", "base.qcow2", "-F", "qcow2"], "1M", True),
    ("raw", ["-b", "base.raw", "-F", "raw"], None, True),
    ("qcow2-file-as-raw", ["-b", "base.qcow2", "-F", "raw"], None, True),
    ("o-options", ["-o", "backing_file=base.qcow2,backing_fmt=qcow2"], None, True),
    ("b-wins-over-o", ["-o", "backing_file=base.raw,backing_fmt=raw", "-b", "base.qcow2",
                       "-F", "qcow2"], None, True),
    ("v2", ["-b", "base.qcow2", "-F", "qcow2", "-o", "compat=0.10"], None, True),
    ("cluster-512", ["-b", "base.qcow2", "-F", "qcow2", "-o", "cluster_size=512"], None, True),
    ("extl2-prealloc-metadata", ["-b", "base.qcow2", "-F", "qcow2", "-o",
                                 "extended_l2=on,preallocation=metadata"], None, True),
    ("extl2-prealloc-falloc", ["-b", "base.raw", "-F", "raw", "-o",
                               "extended_l2=on,preallocation=falloc"], None, False),
]


@pytest.mark.parametrize(("args", "size", "exact"), [c[1:] for c in BACKING_CASES],
                         ids=[c[0] for c in BACKING_CASES])
def test_backing_same_as_qemu_img(bases: Path, capsys: pytest.CaptureFixture[str],
                                  args: list[str], size: str | None, exact: bool) -> None:
    mine = assert_same_as_qemu(bases, capsys, args, size, exact=exact)
    qemu_img("compare", bases / "theirs.qcow2", mine)  # the same guest data, backing and all


def test_backing_name_is_relative_to_the_image(bases: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (bases / "sub").mkdir()
    top = bases / "sub" / "top.qcow2"
    assert qfuse(capsys, "create", "-q", "-b", "../base.qcow2", "-F", "qcow2", top) == (0, "")
    info = _info(top)
    assert info["backing-filename"] == "../base.qcow2"
    assert info["virtual-size"] == 10 * 1024 * 1024
    qemu_img("compare", bases / "base.qcow2", top)


def test_prints_formatting_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.qcow2"
    assert main(["create", os.fspath(image), "1M"]) == 0
    out = capsys.readouterr().out
    assert out == (f"Formatting '{image}', fmt=qcow2 cluster_size=65536 extended_l2=off "
                   "compression_type=zlib size=1048576 lazy_refcounts=off refcount_bits=16\n")


def test_overwrites_an_existing_file_in_place(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.qcow2"
    image.write_bytes(os.urandom(300_000))
    inode = image.stat().st_ino
    assert qfuse(capsys, "create", "-q", image, "1M") == (0, "")
    assert image.stat().st_ino == inode
    assert _info(image)["virtual-size"] == 1024 * 1024
    _check(image, True)


def test_refuses_an_image_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")
    before = image.read_bytes()
    fd = os.open(image, os.O_RDWR)
    try:
        with ImageLock.acquire(fd, os.fspath(image), write=True):
            status, err = qfuse(capsys, "create", "-q", image, "2M")
    finally:
        os.close(fd)
    assert status == 1
    assert "in use" in err and err.count("\n") == 1
    assert image.read_bytes() == before


REFUSALS: list[tuple[str, list[str], str, int]] = [
    # (id, arguments after "create", part of the message, exit status)
    ("unknown-key", ["-o", "foo=bar", "x.qcow2", "1M"], "invalid parameter 'foo'", 2),
    ("unsupported-key", ["-o", "data_file=d", "x.qcow2", "1M"], "not supported", 2),
    ("cluster-not-power", ["-o", "cluster_size=1000", "x.qcow2", "1M"], "power of two", 2),
    ("cluster-too-small", ["-o", "cluster_size=256", "x.qcow2", "1M"], "power of two", 2),
    ("cluster-too-big", ["-o", "cluster_size=4M", "x.qcow2", "1M"], "power of two", 2),
    ("cluster-not-number", ["-o", "cluster_size=abc", "x.qcow2", "1M"], "number", 2),
    ("prealloc-unknown", ["-o", "preallocation=bogus", "x.qcow2", "1M"], "bogus", 2),
    ("compat-unknown", ["-o", "compat=0.9", "x.qcow2", "1M"], "compat '0.9'", 2),
    ("compat-empty", ["-o", "compat=", "x.qcow2", "1M"], "needs a value", 2),
    ("lazy-v2", ["-o", "compat=0.10,lazy_refcounts=on", "x.qcow2", "1M"], "compat=1.1", 2),
    ("lazy-not-bool", ["-o", "lazy_refcounts=maybe", "x.qcow2", "1M"], "'on' or 'off'", 2),
    ("refcount-3", ["-o", "refcount_bits=3", "x.qcow2", "1M"], "power of two", 2),
    ("refcount-128", ["-o", "refcount_bits=128", "x.qcow2", "1M"], "64 bits", 2),
    ("refcount-0", ["-o", "refcount_bits=0", "x.qcow2", "1M"], "power of two", 2),
    ("refcount-v2", ["-o", "compat=0.10,refcount_bits=8", "x.qcow2", "1M"], "compat=1.1", 2),
    ("extl2-small-cluster", ["-o", "extended_l2=on,cluster_size=8k", "x.qcow2", "1M"],
     "at least 16k", 2),
    ("extl2-v2", ["-o", "extended_l2=on,compat=0.10", "x.qcow2", "1M"], "compat=1.1", 2),
    ("compression-unknown", ["-o", "compression_type=lz4", "x.qcow2", "1M"], "lz4", 2),
    ("zstd-v2", ["-o", "compression_type=zstd,compat=0.10", "x.qcow2", "1M"], "compat=1.1", 2),
    ("backing-fmt-alone", ["-o", "backing_fmt=raw", "x.qcow2", "1M"], "needs a backing file", 2),
    ("size-twice", ["-o", "size=2M", "x.qcow2", "1M"], "only once", 2),
    ("no-size", ["x.qcow2"], "needs a SIZE", 2),
    ("size-fraction-of-byte", ["x.qcow2", "1.5"], "invalid image size", 2),
    ("size-bad-suffix", ["x.qcow2", "1Z"], "invalid image size", 2),
    ("size-MB", ["x.qcow2", "1MB"], "invalid image size", 2),
    ("size-too-large", ["x.qcow2", "1E"], "too large", 1),
    ("format-raw", ["-f", "raw", "x.qcow2", "1M"], "not supported", 2),
    ("backing-missing", ["-b", "nonexistent.qcow2", "-F", "qcow2", "x.qcow2", "1M"],
     "No such file", 1),
    ("backing-without-format", ["-b", "base.qcow2", "x.qcow2"], "-F", 2),
    ("backing-format-unsupported", ["-b", "base.qcow2", "-F", "vmdk", "x.qcow2"], "vmdk", 2),
    ("backing-not-qcow2", ["-b", "base.raw", "-F", "qcow2", "x.qcow2"], "not a qcow2", 1),
    ("backing-is-itself", ["-b", "x.qcow2", "-F", "qcow2", "x.qcow2", "1M"], "itself", 2),
    ("backing-with-prealloc", ["-b", "base.qcow2", "-F", "qcow2", "-o",
                               "preallocation=metadata", "x.qcow2"], "extended_l2", 2),
    ("backing-json", ["-b", "json:{}", "-F", "qcow2", "x.qcow2", "1M"], "json:", 2),
    ("directory-missing", ["nodir/x.qcow2", "1M"], "No such file", 1),
]


@pytest.mark.parametrize(("args", "message", "status"), [c[1:] for c in REFUSALS],
                         ids=[c[0] for c in REFUSALS])
def test_refusals(bases: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                  args: list[str], message: str, status: int) -> None:
    monkeypatch.chdir(bases)
    got, err = qfuse(capsys, "create", "-q", *args)
    assert got == status, err
    assert message in err
    assert err.startswith("qfuse: ") and err.count("\n") == 1
    assert not (bases / "x.qcow2").exists()


def test_options_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["create", "-o", "help"]) == 0
    out = capsys.readouterr().out
    for key in ("cluster_size", "preallocation", "compat", "lazy_refcounts", "refcount_bits",
                "extended_l2", "compression_type", "backing_file", "backing_fmt"):
        assert key in out


def test_error_is_one_line_from_the_real_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qfuse", "create", "-o", "cluster_size=3k",
         tmp_path / "x.qcow2", "1M"], capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "x.qcow2").exists()
