"""QEMU's image locking, both ways, against a writable (and a read-only) mount.

qfuse takes the same OFD lock bytes as QEMU's qcow2 driver, so QEMU's own
tools are the judges: what they print is what is asserted.  Measured with
QEMU 7.2, a read-write qfuse mount makes

* `qemu-io IMG` (read-write) fail: ``Failed to get "write" lock``;
* `qemu-io -r IMG` fail too: ``Failed to get shared "write" lock`` (QEMU's
  qcow2 driver never shares WRITE on its image file, "because of the
  metadata", so even a reader needs nobody writing);
* `qemu-img info -U` work (it takes no lock at all).

A qemu-io that holds the image keeps running in these tests, reading its
commands from a pipe the test owns; it is ended by "quit", else by its PID.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from pathlib import Path

import pytest
from images import create, info, qemu_io, qemu_io_holding, run, sha256
from mountutil import daemon_pids, force_unmount, is_mounted, read_view, run_qfuse, teardown

pytestmark = pytest.mark.mount

WRITE_LOCK = 'Failed to get "write" lock'
SHARED_WRITE_LOCK = 'Failed to get shared "write" lock'


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = create(tmp_path / "disk.qcow2", "16M")
    qemu_io(path, "write -P 0x61 0 64k")
    return path


def qemu_io_read(image: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`qemu-io [FLAGS] -f qcow2 -c 'read 0 512' IMAGE`, not checked."""
    return run(["qemu-io", *flags, "-f", "qcow2", "-c", "read 0 512", image], check=False)


def assert_lock_failure(res: subprocess.CompletedProcess[str], message: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode != 0, f"qemu-io succeeded: {out}"
    assert message in out, f"expected {message!r} from qemu-io, got: {out}"


# -- a read-write mount ---------------------------------------------------------


def test_rw_mount_refuses_qemu_io_read_write(image: Path, mount) -> None:  # type: ignore[no-untyped-def]
    mount(image)
    assert_lock_failure(qemu_io_read(image), WRITE_LOCK)


def test_rw_mount_refuses_qemu_io_read_only(image: Path, mount) -> None:  # type: ignore[no-untyped-def]
    mount(image)
    assert_lock_failure(qemu_io_read(image, "-r"), SHARED_WRITE_LOCK)


def test_rw_mount_allows_qemu_img_info_force_share(image: Path, mount) -> None:  # type: ignore[no-untyped-def]
    mount(image)
    assert info(image)["virtual-size"] == 16 << 20


def test_rw_mount_locks_backing_file_read_only(tmp_path: Path, mount) -> None:  # type: ignore[no-untyped-def]
    backing = create(tmp_path / "base.qcow2", "16M")
    qemu_io(backing, "write -P 0x62 0 64k")
    overlay = create(tmp_path / "overlay.qcow2", None, backing=backing, backing_fmt="qcow2")
    mount(overlay)
    assert_lock_failure(qemu_io_read(backing), WRITE_LOCK)
    # Reading the backing file stays possible, as under QEMU itself.
    res = qemu_io_read(backing, "-r")
    assert res.returncode == 0, res.stdout + res.stderr


# -- a read-only mount -----------------------------------------------------------


def test_ro_mount_allows_qemu_io_read_only(image: Path, mount) -> None:  # type: ignore[no-untyped-def]
    mount(image, "--read-only")
    res = qemu_io_read(image, "-r")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "read 512/512 bytes" in res.stdout


def test_ro_mount_refuses_qemu_io_read_write(image: Path, mount) -> None:  # type: ignore[no-untyped-def]
    mount(image, "--read-only")
    assert_lock_failure(qemu_io_read(image), WRITE_LOCK)


# -- QEMU first ----------------------------------------------------------------------
#
# mountutil's `assert_refused`/`mount_view` treat every process holding the
# image as a daemon to wait for (and, at worst, kill), so with a qemu-io
# holding it these tests check the refusal themselves, and end any mount
# only after qemu-io has quit.


def assert_mount_refused_by_holder(
    image: Path, view: Path, holder: subprocess.Popen[bytes], *args: str
) -> str:
    before = sha256(image)
    try:
        res = run_qfuse("mount", image, view, *args)
        assert res.returncode != 0, f"qfuse mount succeeded beside qemu-io: {res.stderr!r}"
        assert "Traceback" not in res.stderr, res.stderr
        lines = res.stderr_lines()
        assert len(lines) == 1, f"want exactly one line on stderr, got {lines!r}"
        assert image.name in lines[0], f"{lines[0]!r} does not name {image.name}"
        assert re.search(r"lock|in use", lines[0], re.IGNORECASE), lines[0]
        assert not is_mounted(view), f"{view} is mounted after a refused mount"
        others = daemon_pids(view, image) - {holder.pid}
        assert not others, f"processes {others} serve {view} or hold {image} after a refusal"
        assert sha256(image) == before, "a refused mount changed the image"
        return lines[0]
    finally:
        if is_mounted(view):
            force_unmount(view)


def test_qemu_io_read_write_holder_refuses_mount(image: Path, tmp_path: Path) -> None:
    with qemu_io_holding(image) as holder:
        line = assert_mount_refused_by_holder(image, tmp_path / "view.raw", holder)
    assert '"write"' in line, line


def test_qemu_io_read_write_holder_refuses_read_only_mount(image: Path, tmp_path: Path) -> None:
    with qemu_io_holding(image) as holder:
        assert_mount_refused_by_holder(image, tmp_path / "view.raw", holder, "--read-only")


def test_qemu_io_read_only_holder_refuses_rw_mount(image: Path, tmp_path: Path) -> None:
    with qemu_io_holding(image, "-r") as holder:
        assert_mount_refused_by_holder(image, tmp_path / "view.raw", holder)


def test_qemu_io_read_only_holder_allows_ro_mount(image: Path, tmp_path: Path) -> None:
    view = tmp_path / "view.raw"
    view.touch()
    problems: list[str] = []
    with contextlib.ExitStack() as stack:
        # Registered first, so it runs last: after qemu-io has quit.
        stack.callback(lambda: problems.extend(teardown(view, image, set())))
        with qemu_io_holding(image, "-r"):
            res = run_qfuse("mount", image, view, "--read-only")
            assert res.returncode == 0, res.stderr
            assert read_view(view)[:65536] == b"\x61" * 65536
    assert not problems, problems
