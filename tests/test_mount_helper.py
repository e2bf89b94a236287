"""`mount -t fuse.qfuse`, fstab lines and `umount` through the real mount(8).

mount(8) runs /sbin/mount.fuse3, which runs ``/bin/sh -c 'qfuse IMAGE
MOUNTPOINT -o OPTS'`` with PATH removed from the environment (measured: the
shell then searches its built-in /usr/local/sbin:/usr/local/bin:/usr/sbin:
/usr/bin:/sbin:/bin).  A temporary directory on our PATH is therefore never
seen, so for the duration of these tests `installed_helpers` puts

* /usr/local/sbin/qfuse, a symlink to this checkout's console script (first
  on that default PATH, so it also shadows any /usr/local/bin/qfuse), and
* /sbin/umount.fuse.qfuse, scripts/umount.fuse.qfuse (umount(8) looks for
  helpers in /sbin only),

and removes both when the last test using them ends.  pytest-xdist workers
share them: a lock on /usr/local/sbin serialises installing and removing, and
one file per user under /run/qfuse-test-helpers counts the users (a crashed
run's entries are pruned by pid).  Files that exist already and are not this
checkout's are never replaced: the tests skip instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import filecmp
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from images import sha256
from mountutil import (
    PATTERN,
    TIMEOUT,
    Cleanup,
    is_mounted,
    pid_gone,
    qemu_img_check,
    qfuse_argv,
    wait_until,
)

pytestmark = pytest.mark.mount

REPO = Path(__file__).resolve().parent.parent
UMOUNT_SCRIPT = REPO / "scripts" / "umount.fuse.qfuse"
LINK = Path("/usr/local/sbin/qfuse")
UMOUNT_HELPER = Path("/sbin/umount.fuse.qfuse")
STATE = Path("/run/qfuse-test-helpers")
# mount(8) records userspace options (nofail, _netdev, x-*) of a mount here and
# umount(8) removes them; created by the first such mount(8).
UTAB = Path("/run/mount/utab")


# -- installing the helpers for the duration of the tests ----------------------------


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    fd = os.open(LINK.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _is_ours(path: Path, script: Path) -> bool:
    if path == LINK:
        return path.is_symlink() and os.readlink(path) == str(script)
    return path.is_file() and filecmp.cmp(path, UMOUNT_SCRIPT, shallow=False)


def _live_users() -> list[Path]:
    users = []
    for entry in (STATE / "users").glob("*"):
        pid = int(entry.name.split("-")[0])
        if pid_gone(pid):
            entry.unlink()  # left by a run that was killed
        else:
            users.append(entry)
    return users


def _release(token: Path | None) -> None:
    if token is not None:
        token.unlink(missing_ok=True)
    if not STATE.exists() or _live_users():
        return
    created = (STATE / "created").read_text().split() if (STATE / "created").exists() else []
    for name in created:
        if name == str(UTAB.parent):
            # Made by our mount(8) calls; keep it if anyone else used it since.
            with contextlib.suppress(OSError):
                if not UTAB.exists() or UTAB.stat().st_size == 0:
                    for leftover in UTAB.parent.iterdir():  # utab, utab.lock
                        leftover.unlink()
                    UTAB.parent.rmdir()
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
    shutil.rmtree(STATE)


def _acquire(script: Path) -> Path:
    first = not STATE.exists()
    STATE.mkdir(exist_ok=True)
    (STATE / "users").mkdir(exist_ok=True)
    try:
        managed = (STATE / "created").read_text().split() if (STATE / "created").exists() else []
        if first and not UTAB.parent.exists():
            managed.append(str(UTAB.parent))
        for path in (LINK, UMOUNT_HELPER):
            if os.path.lexists(path) and not _is_ours(path, script):
                pytest.skip(f"{path} exists and is not this checkout's; not replacing it")
        for path in (LINK, UMOUNT_HELPER):
            if os.path.lexists(path):
                continue
            if path == LINK:
                os.symlink(script, path)
            else:
                shutil.copyfile(UMOUNT_SCRIPT, path)
                os.chmod(path, 0o755)
            managed.append(str(path))
        (STATE / "created").write_text("\n".join(managed) + "\n")
        token = STATE / "users" / f"{os.getpid()}-{uuid.uuid4().hex}"
        token.touch()
        return token
    except BaseException:
        _release(None)
        raise


@contextlib.contextmanager
def installed_helpers() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("mount -t fuse.qfuse needs root")
    if not (shutil.which("mount") and os.path.exists("/sbin/mount.fuse3")):
        pytest.skip("needs mount(8) and /sbin/mount.fuse3 (Debian package fuse3)")
    script = Path(qfuse_argv()[0])
    if script.name != "qfuse":
        pytest.skip("needs the installed qfuse console script")
    if not LINK.parent.is_dir():
        pytest.skip(f"{LINK.parent} does not exist")
    with _locked():
        token = _acquire(script)
    try:
        found = subprocess.run(
            ["env", "-i", "/bin/sh", "-c", "command -v qfuse"], capture_output=True, text=True
        ).stdout.strip()
        assert found == str(LINK), f"/bin/sh's default PATH finds {found!r}, not {LINK}"
        yield
    finally:
        with _locked():
            _release(token)


# -- fixtures and helpers -------------------------------------------------------


@pytest.fixture
def helpers() -> Iterator[None]:
    with installed_helpers():
        yield


def _forget_utab_entries(directory: Path) -> None:
    """Drop utab lines for mounts under `directory` (left when teardown had to use
    fusermount3 instead of umount(8)), under libmount's own lock."""
    if not UTAB.exists():
        return
    fd = os.open(f"{UTAB}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        lines = UTAB.read_text().splitlines(keepends=True)
        prefix = f"TARGET={directory}/"
        keep = [line for line in lines if prefix not in line]
        if keep != lines:
            UTAB.write_text("".join(keep))
    finally:
        os.close(fd)


@pytest.fixture
def cleanup(tmp_path: Path) -> Iterator[Cleanup]:
    tracker = Cleanup()
    try:
        yield tracker
    finally:
        try:
            tracker.teardown()
        finally:
            _forget_utab_entries(tmp_path)


@pytest.fixture
def view(tmp_path: Path, cleanup: Cleanup) -> Path:
    path = tmp_path / "disk.raw"
    path.touch()
    cleanup.mountpoints.append(path)
    return path


def run(*argv: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [os.fspath(a) for a in argv], stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=TIMEOUT, env={**os.environ, "LC_ALL": "C"}, check=False,
    )  # fmt: skip


def mount_t(image: Path, view: Path, options: str) -> subprocess.CompletedProcess[str]:
    return run("mount", "-t", "fuse.qfuse", image, view, "-o", options)


def mountinfo(view: Path) -> tuple[str, str]:
    """(mount options, filesystem type) of the view in /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as f:
        fields = next(line.split() for line in f if line.split()[4] == str(view))
    return fields[5], fields[fields.index("-") + 1]


# -- mount -t fuse.qfuse -------------------------------------------------------


@pytest.mark.usefixtures("helpers")
def test_mount_t_read_only_then_umount_waits_for_the_image(
    cleanup: Cleanup, image: Path, view: Path
) -> None:
    before = sha256(image)
    result = mount_t(image, view, "ro,cache=none")
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""
    pid = cleanup.daemon_of(view)
    options, fstype = mountinfo(view)
    assert fstype == "fuse.qfuse"
    assert options.split(",")[0] == "ro"
    with open(view, "rb") as f:
        assert f.read(65536) == PATTERN
    result = run("umount", view)
    assert result.returncode == 0, result.stderr
    # /sbin/umount.fuse.qfuse: umount returns once the daemon closed the image.
    assert pid_gone(pid)
    assert not is_mounted(view)
    qemu_img_check(image)
    assert sha256(image) == before


@pytest.mark.usefixtures("helpers")
def test_writes_reach_the_image_by_the_time_umount_returns(
    cleanup: Cleanup, image: Path, view: Path
) -> None:
    assert mount_t(image, view, "cache=writeback").returncode == 0
    pid = cleanup.daemon_of(view)
    fd = os.open(view, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xcd" * 65536, 1 << 20)
    finally:
        os.close(fd)
    result = run("umount", view)
    assert result.returncode == 0, result.stderr
    assert pid_gone(pid)
    qemu_img_check(image)
    check = run("qemu-io", "-c", "read -P 0xcd 1M 64k", "-c", "read -P 0xab 0 64k", image)
    assert check.returncode == 0 and "Pattern verification failed" not in check.stdout, check


@pytest.mark.usefixtures("helpers")
def test_umount_without_the_helper_still_ends_the_daemon_cleanly(
    cleanup: Cleanup, image: Path, view: Path
) -> None:
    assert mount_t(image, view, "cache=writethrough").returncode == 0
    pid = cleanup.daemon_of(view)
    # -i: plain umount(2), no helper; the daemon then finishes on its own.
    result = run("umount", "-i", view)
    assert result.returncode == 0, result.stderr
    assert wait_until(lambda: pid_gone(pid), TIMEOUT)
    qemu_img_check(image)


@pytest.mark.usefixtures("helpers")
def test_lazy_umount_detaches_at_once(cleanup: Cleanup, image: Path, view: Path) -> None:
    assert mount_t(image, view, "ro").returncode == 0
    pid = cleanup.daemon_of(view)
    fd = os.open(view, os.O_RDONLY)
    try:
        result = run("umount", "-l", view)  # the helper passes -l on, does not wait
        assert result.returncode == 0, result.stderr
        assert not is_mounted(view)
        assert os.pread(fd, 4, 0) == PATTERN[:4]  # still served until closed
    finally:
        os.close(fd)
    assert wait_until(lambda: pid_gone(pid), TIMEOUT)
    qemu_img_check(image)


@pytest.mark.usefixtures("helpers")
def test_generic_mount_options_are_ignored(cleanup: Cleanup, image: Path, view: Path) -> None:
    options = "rw,noatime,nodev,nosuid,_netdev,x-systemd.automount,cache=none"
    result = mount_t(image, view, options)
    assert result.returncode == 0, result.stderr
    cleanup.daemon_of(view)
    mount_options, _ = mountinfo(view)
    assert {"rw", "nodev", "nosuid"} <= set(mount_options.split(","))
    with open(view, "r+b") as f:  # read-write, as asked
        assert f.read(65536) == PATTERN
    assert run("umount", view).returncode == 0
    qemu_img_check(image)


@pytest.mark.usefixtures("helpers")
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("ro,turbo", "qfuse: unknown mount option 'turbo'"),
        ("cache=fast", "qfuse: cache mode 'fast' is unknown (choose one of writeback, "
                       "writethrough, none, directsync, unsafe)"),
    ],
)  # fmt: skip
def test_bad_qfuse_option_is_one_clear_error(
    image: Path, view: Path, options: str, message: str
) -> None:
    before = sha256(image)
    result = mount_t(image, view, options)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [message]
    assert not is_mounted(view)
    assert sha256(image) == before


@pytest.mark.usefixtures("helpers")
def test_missing_image_is_one_line(tmp_path: Path, view: Path) -> None:
    missing = tmp_path / "missing.qcow2"
    result = mount_t(missing, view, "ro")
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qfuse: {missing}: "), lines
    assert not is_mounted(view)


# -- fstab ---------------------------------------------------------------------


@pytest.mark.usefixtures("helpers")
def test_fstab_line(cleanup: Cleanup, image: Path, view: Path, tmp_path: Path) -> None:
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# a line as in /etc/fstab\n"
        f"{image}  {view}  fuse.qfuse  "
        "ro,cache=none,nofail,x-systemd.requires=images.mount,x-systemd.automount  0  0\n"
    )
    result = run("mount", "-T", fstab, view)
    assert result.returncode == 0, result.stderr
    pid = cleanup.daemon_of(view)
    options, fstype = mountinfo(view)
    assert fstype == "fuse.qfuse"
    assert options.split(",")[0] == "ro"
    with open(view, "rb") as f:
        assert f.read(65536) == PATTERN
    assert run("umount", view).returncode == 0
    assert pid_gone(pid)
    qemu_img_check(image)


@pytest.mark.usefixtures("helpers")
def test_fstab_directory_mountpoint(cleanup: Cleanup, image: Path, tmp_path: Path) -> None:
    directory = tmp_path / "mnt"
    directory.mkdir()
    cleanup.mountpoints.append(directory)
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{image} {directory} fuse.qfuse defaults,cache=writethrough 0 0\n")
    result = run("mount", "-T", fstab, directory)
    assert result.returncode == 0, result.stderr
    pid = cleanup.daemon_of(directory)
    assert os.listdir(directory) == ["disk.raw"]
    # -c, as systemd's .mount units run it: for a directory, a plain `umount`
    # takes the type from statfs ("fuse", no subtype) and skips the helper.
    assert run("umount", "-c", directory).returncode == 0
    assert pid_gone(pid)
    qemu_img_check(image)


def test_umount_helper_script_parses() -> None:
    assert run("sh", "-n", UMOUNT_SCRIPT).returncode == 0
    assert os.access(UMOUNT_SCRIPT, os.X_OK)
