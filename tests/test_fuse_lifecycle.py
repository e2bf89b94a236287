"""The daemon's lifecycle with real mounts: readiness, signals, unmounting, errors.

Each test runs the installed `qfuse` command on a qcow2 image made by
qemu-img/qemu-io under its own tmp_path (so the tests run in parallel), and
the `cleanup` fixture always tears down what the test started: unmount with
retries, then a lazy ``fusermount3 -uz``, then SIGTERM/SIGKILL to the PIDs
this test started or that the state file names for its own mountpoints.
Nothing is ever signalled by name.  That fixture, `notify` and `image` are
in conftest.py, their helpers in mountutil.py (test_systemd.py and
test_mount_helper.py use them too).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest
from images import sha256
from mountutil import (
    PATTERN,
    PATTERN_IMAGE_SIZE,
    TIMEOUT,
    Cleanup,
    NotifySocket,
    is_mounted,
    pid_gone,
    qemu_img_check,
    qfuse_argv,
    wait_until,
)

from qfuse.fuse import runstate

pytestmark = pytest.mark.mount

SIZE = PATTERN_IMAGE_SIZE  # of the `image` fixture (conftest.py)


def qfuse(*args: str | os.PathLike[str], env: dict[str, str] | None = None,
          timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run qfuse to completion with its stdout/stderr on pipes.

    The pipes are the point: run() returns only at end of file on both, so a
    background mount that kept the caller's stdio open would time out here.
    """
    return subprocess.run(
        [*qfuse_argv(), *map(os.fspath, args)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        env=env, check=False,
    )  # fmt: skip


def mount_bg(cleanup: Cleanup, image: Path, mountpoint: Path, *args: str) -> int:
    """`qfuse mount` in the background, asserting success; the daemon's pid."""
    cleanup.mountpoints.append(mountpoint)
    result = qfuse("mount", image, mountpoint, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""
    return cleanup.daemon_of(mountpoint)


def start_foreground(
    cleanup: Cleanup, notify: NotifySocket, image: Path, mountpoint: Path, *args: str,
    stderr: Path | None = None,
) -> subprocess.Popen[bytes]:  # fmt: skip
    """`qfuse mount -f` as our child; returns once it sent READY=1."""
    cleanup.mountpoints.append(mountpoint)
    err = open(stderr, "wb") if stderr else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [*qfuse_argv(), "mount", os.fspath(image), os.fspath(mountpoint), "-f", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=notify.env(),
    )  # fmt: skip
    cleanup.procs.append(proc)
    if stderr:
        err.close()  # type: ignore[union-attr]
    assert notify.receive() == b"READY=1"
    return proc


# -- readiness -----------------------------------------------------------------


def test_background_mount_returns_when_readable(
    cleanup: Cleanup, image: Path, tmp_path: Path
) -> None:
    view = tmp_path / "view.raw"
    assert not view.exists()  # created by the mount
    mount_bg(cleanup, image, view)
    # No waiting, no retry: the first access after exit 0 must work.
    with open(view, "rb") as f:
        assert f.read(65536) == PATTERN
        assert f.read(65536) == bytes(65536)
    st = os.stat(view)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == SIZE
    assert 0 < st.st_blocks * 512 < SIZE
    assert st.st_blksize == 65536
    with open("/proc/self/mountinfo") as f:
        line = next(x for x in f if f" {view} " in x)
    assert " - fuse.qfuse " in line
    assert f" {image} " in line  # the image path is the fsname


def test_foreground_notifies_ready_and_stopping(
    cleanup: Cleanup, notify: NotifySocket, image: Path, tmp_path: Path
) -> None:
    view = tmp_path / "view.raw"
    proc = start_foreground(cleanup, notify, image, view)
    with open(view, "rb") as f:
        assert f.read(65536) == PATTERN
    proc.send_signal(signal.SIGTERM)
    assert notify.receive() == b"STOPPING=1"
    assert proc.wait(TIMEOUT) == 0
    assert not is_mounted(view)
    qemu_img_check(image)


def test_debug_logs_requests_in_the_foreground(
    cleanup: Cleanup, notify: NotifySocket, image: Path, tmp_path: Path
) -> None:
    view = tmp_path / "view.raw"
    log = tmp_path / "stderr.log"
    proc = start_foreground(cleanup, notify, image, view, "--debug", stderr=log)
    with open(view, "rb") as f:
        f.read(4096)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 0
    text = log.read_text()
    assert "qfuse.fuse.requests" in text
    assert "read(" in text


# -- ending --------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_ends_cleanly(
    cleanup: Cleanup, image: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    view = tmp_path / "view.raw"
    pid = mount_bg(cleanup, image, view)
    before = sha256(image)
    os.kill(pid, signum)
    assert wait_until(lambda: pid_gone(pid), TIMEOUT)
    assert not is_mounted(view)
    assert runstate.read_record(runstate.canonical_mountpoint(str(view))) is None
    qemu_img_check(image)
    assert sha256(image) == before


def test_sigterm_with_the_view_open(cleanup: Cleanup, image: Path, tmp_path: Path) -> None:
    view = tmp_path / "view.raw"
    pid = mount_bg(cleanup, image, view)
    fd = os.open(view, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == PATTERN[:4096]
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: pid_gone(pid), TIMEOUT)
        # Detached from the namespace (no stale mount); the open file is dead.
        assert not is_mounted(view)
        with pytest.raises(OSError) as info:
            os.pread(fd, 4096, 0)
        assert info.value.errno == errno.ENOTCONN
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    qemu_img_check(image)


def test_fusermount_u_ends_cleanly(
    cleanup: Cleanup, notify: NotifySocket, image: Path, tmp_path: Path
) -> None:
    view = tmp_path / "view.raw"
    proc = start_foreground(cleanup, notify, image, view)
    subprocess.run(["fusermount3", "-u", view], check=True)
    assert proc.wait(TIMEOUT) == 0
    assert not is_mounted(view)
    qemu_img_check(image)


def test_umount_waits_for_the_daemon(cleanup: Cleanup, image: Path, tmp_path: Path) -> None:
    view = tmp_path / "view.raw"
    pid = mount_bg(cleanup, image, view)
    result = qfuse("umount", view)
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""
    # Returned only after the daemon closed the image and exited.
    assert pid_gone(pid)
    assert not is_mounted(view)
    qemu_img_check(image)


def test_umount_retries_while_busy_then_says_why(
    cleanup: Cleanup, image: Path, tmp_path: Path
) -> None:
    view = tmp_path / "view.raw"
    pid = mount_bg(cleanup, image, view)
    with open(view, "rb"):
        result = qfuse("umount", view)
        assert result.returncode == 1
        assert result.stderr.startswith(f"qfuse: {view}: cannot unmount: ")
        assert "busy" in result.stderr
        assert result.stderr.count("\n") == 1
        assert is_mounted(view)
    assert qfuse("umount", view).returncode == 0
    assert pid_gone(pid)


def test_umount_of_something_else(tmp_path: Path) -> None:
    result = qfuse("umount", tmp_path / "nothing.raw")
    assert result.returncode == 1
    assert result.stderr == f"qfuse: {tmp_path / 'nothing.raw'}: not mounted\n"


# -- the other forms -----------------------------------------------------------


def test_mount_fuse3_form_read_only(cleanup: Cleanup, image: Path, tmp_path: Path) -> None:
    view = tmp_path / "view.raw"
    view.touch()
    cleanup.mountpoints.append(view)
    result = qfuse(image, view, "-o", "rw,nofail,x-systemd.automount,ro,dev,suid")
    assert result.returncode == 0, result.stderr
    cleanup.daemon_of(view)
    assert stat.S_IMODE(os.stat(view).st_mode) & 0o222 == 0
    with pytest.raises(OSError) as info:
        open(view, "r+b")  # noqa: SIM115
    assert info.value.errno == errno.EROFS
    with open(view, "rb") as f:
        assert f.read(65536) == PATTERN
    assert qfuse("umount", view).returncode == 0


def test_mount_fuse3_helper(cleanup: Cleanup, image: Path, tmp_path: Path) -> None:
    # What `mount -t fuse.qfuse IMAGE MOUNTPOINT -o OPTS` and fstab run:
    # mount.fuse3 -> sh -c 'qfuse IMAGE MOUNTPOINT -o OPTS,dev,suid'.  (mount(8)
    # itself resets PATH to the system's, so it needs qfuse installed there.)
    helper = next((p for p in ("/sbin/mount.fuse3", "/usr/sbin/mount.fuse3") if os.path.exists(p)),
                  None)  # fmt: skip
    script = Path(qfuse_argv()[0])
    if helper is None or script.name != "qfuse":
        pytest.skip("needs mount.fuse3 and the qfuse console script")
    view = tmp_path / "view.raw"
    view.touch()
    cleanup.mountpoints.append(view)
    env = {**os.environ, "PATH": f"{script.parent}:{os.environ['PATH']}"}
    result = subprocess.run(
        [helper, image, view, "-t", "fuse.qfuse", "-o", "rw,noauto,ro,allow_other,cache=none"],
        capture_output=True, text=True, env=env, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cleanup.daemon_of(view)
    with open("/proc/self/mountinfo") as f:
        line = next(x for x in f if f" {view} " in x)
    assert " ro," in line
    assert "allow_other" in line
    with open(view, "rb") as f:
        assert f.read(65536) == PATTERN
    assert qfuse("umount", view).returncode == 0


def test_directory_form_with_snapshots(cleanup: Cleanup, image: Path, tmp_path: Path) -> None:
    subprocess.run(["qemu-img", "snapshot", "-c", "before", image], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0xcd 0 64k", image], check=True,
                   capture_output=True)  # fmt: skip
    directory = tmp_path / "mnt"
    directory.mkdir()
    mount_bg(cleanup, image, directory, "--vmdk")
    assert sorted(os.listdir(directory)) == [
        "disk.raw", "disk.vmdk", "disk@before.raw", "disk@before.vmdk",
    ]  # fmt: skip
    assert (directory / "disk.raw").read_bytes()[:4] == b"\xcd" * 4
    with open(directory / "disk@before.raw", "rb") as f:
        assert f.read(65536) == PATTERN
    assert os.stat(directory / "disk@before.raw").st_mode & 0o222 == 0
    with pytest.raises(OSError) as info:
        open(directory / "disk@before.raw", "r+b")  # noqa: SIM115
    assert info.value.errno == errno.EROFS
    assert 'FLAT "disk@before.raw" 0' in (directory / "disk@before.vmdk").read_text()
    assert qfuse("umount", directory).returncode == 0
    assert os.listdir(directory) == []


def test_snapshot_on_a_file_mountpoint_with_vmdk(
    cleanup: Cleanup, image: Path, tmp_path: Path
) -> None:
    subprocess.run(["qemu-img", "snapshot", "-c", "before", image], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0xcd 0 64k", image], check=True,
                   capture_output=True)  # fmt: skip
    view = tmp_path / "old.raw"
    mount_bg(cleanup, image, view, "--snapshot", "before", "--vmdk")
    with open(view, "rb") as f:
        assert f.read(65536) == PATTERN
    descriptor = tmp_path / "old.vmdk"
    assert 'RDONLY 131072 FLAT "old.raw" 0' in descriptor.read_text()
    assert qfuse("umount", view).returncode == 0
    assert not descriptor.exists()


def test_view_refuses_truncation_and_writes_past_the_end(
    cleanup: Cleanup, image: Path, tmp_path: Path
) -> None:
    view = tmp_path / "view.raw"
    mount_bg(cleanup, image, view)
    with pytest.raises(OSError) as info:
        os.truncate(view, 4096)
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError) as info:
        open(view, "wb")  # noqa: SIM115  (O_TRUNC)
    assert info.value.errno == errno.EPERM
    fd = os.open(view, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"x", SIZE)
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with open(view, "rb") as f:
        f.seek(SIZE - 10)
        assert f.read(100) == bytes(10)
        assert f.read(100) == b""


# -- errors --------------------------------------------------------------------


def test_bad_option_is_one_line_exit_2(image: Path, tmp_path: Path) -> None:
    view = tmp_path / "view.raw"
    result = qfuse("mount", image, view, "-o", "cache=none,turbo")
    assert result.returncode == 2
    assert result.stderr == "qfuse: unknown mount option 'turbo'\n"
    assert not view.exists()


def test_missing_image_is_one_line_and_nothing_mounted(tmp_path: Path) -> None:
    view = tmp_path / "view.raw"
    missing = tmp_path / "missing.qcow2"
    result = qfuse("mount", missing, view)
    assert result.returncode == 1
    assert result.stderr.startswith(f"qfuse: {missing}: ")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert not view.exists()
    assert not is_mounted(view)


@pytest.mark.parametrize("foreground", [False, True])
def test_bad_image_is_one_line_and_untouched(tmp_path: Path, foreground: bool) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + (3).to_bytes(4, "big") + bytes(504))  # cluster_bits 0
    before = sha256(bad)
    view = tmp_path / "view.raw"
    view.touch()
    result = qfuse("mount", bad, view, *(["-f"] if foreground else []))
    assert result.returncode == 1
    assert result.stderr.startswith(f"qfuse: {bad}: ")
    assert result.stderr.count("\n") == 1
    assert not is_mounted(view)
    assert sha256(bad) == before


def test_unknown_snapshot_is_one_line(image: Path, tmp_path: Path) -> None:
    view = tmp_path / "view.raw"
    result = qfuse("mount", image, view, "--snapshot", "nope")
    assert result.returncode == 1
    assert result.stderr.startswith(f"qfuse: {image}: ")
    assert result.stderr.count("\n") == 1
    assert not is_mounted(view)


def test_mountpoint_in_a_missing_directory(image: Path, tmp_path: Path) -> None:
    view = tmp_path / "no" / "such" / "view.raw"
    result = qfuse("mount", image, view)
    assert result.returncode == 1
    assert result.stderr == f"qfuse: {view}: its directory does not exist\n"


def test_second_mount_on_the_same_mountpoint_is_refused(
    cleanup: Cleanup, image: Path, tmp_path: Path
) -> None:
    view = tmp_path / "view.raw"
    mount_bg(cleanup, image, view)
    result = qfuse("mount", image, view)
    assert result.returncode == 1
    assert "already mounted" in result.stderr
    assert result.stderr.count("\n") == 1
