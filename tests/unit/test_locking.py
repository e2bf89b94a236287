"""QEMU's image locking against real QEMU processes, in both directions.

A QEMU user of an image is a `qemu-io` process kept open on a pipe (started
by `qemu_io_holding`, which waits until it has read from the image, and
always ends it).  A qfuse user is an `ImageLock` held in this process: OFD
locks of separately opened descriptors conflict even within one process, so
qfuse-vs-qfuse needs no second process either.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qfuse.engine.locking import ImageLock, Perm, qemu_permissions
from qfuse.errors import ImageError

QEMU_IO_TIMEOUT = 5.0


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=QEMU_IO_TIMEOUT)


def qemu_img(*args: str) -> None:
    result = run("qemu-img", *args)
    assert result.returncode == 0, result.stderr


def qemu_io_once(
    image: Path, *args: str, cmd: str = "read 0 512"
) -> subprocess.CompletedProcess[str]:
    """Open `image` in a fresh qemu-io, run one command, exit."""
    return run("qemu-io", *args, "-c", cmd, str(image))


@contextlib.contextmanager
def qemu_io_holding(image: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """A qemu-io process with `image` open (so locked) until the block ends.

    qemu-io reads commands from its stdin pipe; once it has answered one
    read, its locks are in place.  Closing stdin makes it quit.
    """
    proc = subprocess.Popen(["qemu-io", *args, str(image)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(b"read 0 512\n")
            proc.stdin.flush()
        out = b""
        deadline = time.monotonic() + QEMU_IO_TIMEOUT
        while b"read 512/512 bytes" not in out:
            ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
            chunk = os.read(proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                pytest.fail(f"qemu-io did not open {image}: {out.decode(errors='replace')}")
            out += chunk
        yield proc
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        try:
            proc.wait(timeout=QEMU_IO_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def locked_bytes(path: Path) -> set[int]:
    """Every byte of `path` that anyone holds a lock on, from /proc/locks."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found: set[int] = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields:  # a waiter, not a holder
                continue
            if key in fields:
                i = fields.index(key)
                found.update(range(int(fields[i + 1]), int(fields[i + 2]) + 1))
    return found


@pytest.fixture(autouse=True)
def _need_ofd_locks() -> None:
    if not os.path.exists("/proc/locks"):
        pytest.skip("/proc/locks is missing")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "1M")
    return path


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path]:
    """(overlay, backing file)."""
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
    return top, base


@pytest.fixture
def external(tmp_path: Path) -> tuple[Path, Path]:
    """(image, its external data file)."""
    path = tmp_path / "ext.qcow2"
    data = tmp_path / "ext.raw"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", str(path), "1M")
    return path, data


OpenFn = Callable[[Path], int]


@pytest.fixture
def open_fd() -> Iterator[OpenFn]:
    """``open_fd(path) -> fd`` (read-only, as qfuse opens); all closed at the end."""
    fds: list[int] = []

    def _open(path: Path) -> int:
        fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        return fds[-1]

    yield _open
    for fd in fds:
        os.close(fd)


def acquire(open_fd: OpenFn, path: Path, *, write: bool, data_file: bool = False) -> ImageLock:
    return ImageLock.acquire(open_fd(path), str(path), write=write, data_file=data_file)


# -- the same bytes as QEMU ---------------------------------------------------

CASES = {
    # id: (qemu-io options, image QEMU opens, file checked, ImageLock kwargs)
    "image-ro": (["-r"], "image", "image", {"write": False}),
    "image-rw": ([], "image", "image", {"write": True}),
    "backing-of-ro": (["-r"], "top", "base", {"write": False}),
    "backing-of-rw": ([], "top", "base", {"write": False}),
    "data-file-ro": (["-r"], "ext", "ext-data", {"write": False, "data_file": True}),
    "data-file-rw": ([], "ext", "ext-data", {"write": True, "data_file": True}),
    "image-with-data-file-rw": ([], "ext", "ext", {"write": True}),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_lock_bytes_are_qemus(case, image, chain, external, open_fd) -> None:
    qemu_args, opened, checked, kwargs = case
    files = {"image": image, "top": chain[0], "base": chain[1],
             "ext": external[0], "ext-data": external[1]}
    with qemu_io_holding(files[opened], *qemu_args):
        qemu_holds = locked_bytes(files[checked])
    assert qemu_holds  # the case is meaningful
    assert locked_bytes(files[checked]) == set()
    acquire(open_fd, files[checked], **kwargs)
    assert locked_bytes(files[checked]) == qemu_holds


def test_permission_table() -> None:
    read, write, resize = Perm.CONSISTENT_READ, Perm.WRITE, Perm.RESIZE
    shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
    assert qemu_permissions(write=False) == (read, shared)
    assert qemu_permissions(write=True) == (read | write | resize, shared)
    assert qemu_permissions(write=True, data_file=True)[1] == shared | write


# -- QEMU holds the image, qfuse opens it -------------------------------------


def test_qemu_writer_refuses_qfuse_writer(image, open_fd) -> None:
    with qemu_io_holding(image, "-f", "qcow2"), pytest.raises(ImageError) as exc:
        acquire(open_fd, image, write=True)
    assert exc.value.path == str(image)
    assert str(exc.value) == (f'{image}: is in use by another process (QEMU or qfuse): '
                              'failed to get "write" lock')


def test_qemu_writer_refuses_qfuse_reader(image, open_fd) -> None:
    with qemu_io_holding(image, "-f", "qcow2"), pytest.raises(ImageError) as exc:
        acquire(open_fd, image, write=False)
    assert exc.value.path == str(image)
    assert 'failed to get shared "write" lock' in str(exc.value)


def test_qemu_reader_allows_qfuse_reader(image, open_fd) -> None:
    with qemu_io_holding(image, "-r", "-f", "qcow2"):
        acquire(open_fd, image, write=False)


def test_qemu_reader_refuses_qfuse_writer(image, open_fd) -> None:
    with qemu_io_holding(image, "-r", "-f", "qcow2"), pytest.raises(ImageError) as exc:
        acquire(open_fd, image, write=True)
    assert 'failed to get "write" lock' in str(exc.value)


def test_qemu_writer_of_overlay_allows_qfuse_reader_of_backing(chain, open_fd) -> None:
    top, base = chain
    with qemu_io_holding(top, "-f", "qcow2"):
        acquire(open_fd, base, write=False)
        with pytest.raises(ImageError, match='failed to get "write" lock') as exc:
            acquire(open_fd, base, write=True)
    assert exc.value.path == str(base)


def test_qemu_writer_refuses_qfuse_on_its_data_file(external, open_fd) -> None:
    image, data = external
    with qemu_io_holding(image, "-f", "qcow2"):
        with pytest.raises(ImageError, match='shared "write"'):
            acquire(open_fd, image, write=False)
        with pytest.raises(ImageError, match='shared "resize"') as exc:
            acquire(open_fd, data, write=False, data_file=True)
    assert exc.value.path == str(data)


# -- qfuse holds the image, QEMU opens it -------------------------------------


def test_qfuse_writer_refuses_qemu_writer(image, open_fd) -> None:
    acquire(open_fd, image, write=True)
    result = qemu_io_once(image, "-f", "qcow2")
    assert result.returncode != 0
    assert 'Failed to get "write" lock' in result.stderr


def test_qfuse_writer_refuses_qemu_reader(image, open_fd) -> None:
    acquire(open_fd, image, write=True)
    result = qemu_io_once(image, "-r", "-f", "qcow2")
    assert result.returncode != 0
    assert 'Failed to get shared "write" lock' in result.stderr


def test_qfuse_reader_allows_qemu_reader(image, open_fd) -> None:
    acquire(open_fd, image, write=False)
    result = qemu_io_once(image, "-r", "-f", "qcow2")
    assert result.returncode == 0, result.stderr


def test_qfuse_reader_refuses_qemu_writer(image, open_fd) -> None:
    acquire(open_fd, image, write=False)
    result = qemu_io_once(image, "-f", "qcow2")
    assert result.returncode != 0
    assert 'Failed to get "write" lock' in result.stderr


@pytest.mark.parametrize("write", [False, True], ids=["ro", "rw"])
def test_qemu_img_info_force_share_always_works(image, open_fd, write) -> None:
    acquire(open_fd, image, write=write)
    result = run("qemu-img", "info", "-U", str(image))
    assert result.returncode == 0, result.stderr


def test_qfuse_reader_of_backing_allows_qemu_writer_of_overlay(chain, open_fd) -> None:
    top, base = chain
    acquire(open_fd, base, write=False)
    result = qemu_io_once(top, "-f", "qcow2", cmd="write 0 512")
    assert result.returncode == 0, result.stderr
    result = qemu_io_once(base, "-f", "qcow2")
    assert 'Failed to get "write" lock' in result.stderr


def test_qfuse_on_data_file_shares_write_like_qemu(external, open_fd) -> None:
    image, data = external
    acquire(open_fd, data, write=False, data_file=True)
    # QEMU lets a raw user write a data file that a qcow2 reader uses...
    result = qemu_io_once(data, "-f", "raw", cmd="write 0 512")
    assert result.returncode == 0, result.stderr
    # ...but not resize it.
    result = run("qemu-img", "resize", "-f", "raw", str(data), "2M")
    assert result.returncode != 0
    assert 'Failed to get "resize" lock' in result.stderr


def test_qfuse_writer_with_data_file_refuses_qemu_reader(external, open_fd) -> None:
    image, data = external
    acquire(open_fd, image, write=True)
    acquire(open_fd, data, write=True, data_file=True)
    result = qemu_io_once(image, "-r", "-f", "qcow2")
    assert 'Failed to get shared "write" lock' in result.stderr


def test_release_lets_qemu_in(image, open_fd) -> None:
    lock = acquire(open_fd, image, write=True)
    lock.release()
    assert locked_bytes(image) == set()
    result = qemu_io_once(image, "-f", "qcow2")
    assert result.returncode == 0, result.stderr
    lock.release()  # idempotent


def test_closing_the_descriptor_releases(image) -> None:
    fd = os.open(image, os.O_RDONLY)
    try:
        ImageLock.acquire(fd, str(image), write=True)
    finally:
        os.close(fd)
    assert locked_bytes(image) == set()


# -- qfuse against qfuse ------------------------------------------------------


def test_two_readers_coexist(image, open_fd) -> None:
    acquire(open_fd, image, write=False)
    acquire(open_fd, image, write=False)


@pytest.mark.parametrize(("first", "second"), [(True, True), (True, False), (False, True)],
                         ids=["rw-then-rw", "rw-then-ro", "ro-then-rw"])
def test_a_writer_conflicts_with_any_other_user(image, open_fd, first, second) -> None:
    acquire(open_fd, image, write=first)
    with pytest.raises(ImageError, match="is in use by another process"):
        acquire(open_fd, image, write=second)


def test_a_refused_acquire_holds_nothing(image, open_fd) -> None:
    with acquire(open_fd, image, write=True):
        with pytest.raises(ImageError):
            acquire(open_fd, image, write=False)
    # Had the refused reader kept its bytes, this writer would be refused.
    acquire(open_fd, image, write=True)
