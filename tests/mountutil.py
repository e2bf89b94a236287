"""Mounting the real `qfuse` command in a subprocess, and the oracles to check the view.

`mount_view` runs `qfuse mount IMAGE MOUNTPOINT ARGS...` (no --foreground: the
command must return only once the view serves I/O), yields the view path and
always tears down: `qfuse umount`, else `fusermount3 -u` retried (it flakes
with "device busy"), else `fusermount3 -uz`; then it waits until
/proc/mounts no longer lists the mountpoint and the daemon is a zombie or
gone (PID 1 does not reap orphans here, so a PID never vanishes by itself).
Processes are only ever signalled by the PID this module found for *this*
mountpoint, never by name.

Tests that start the daemon themselves (``--foreground``, signals, the
systemd units) use `Cleanup`, which tears down what they started whatever
happened, and `NotifySocket`, which stands in for systemd's
``$NOTIFY_SOCKET``; conftest.py makes fixtures of both.  `Cleanup` finds a
background daemon through its state file (qfuse.fuse.runstate, the record
`qfuse umount` waits on) and signals only that PID.

The oracle for every byte is `qemu-img convert -O raw` (which follows
backing files and reads snapshots with ``-l snapshot.name=``), and
`qemu-img compare` run against the mounted view.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from images import qemu_img, qemu_io, run  # noqa: F401  (qemu_io re-exported)

from qfuse.fuse import runstate

MOUNT_TIMEOUT = 30.0
UMOUNT_TIMEOUT = 30.0
GONE_TIMEOUT = 10.0
# Any one wait on a daemon a test started itself (READY=1, exit, unmount).
TIMEOUT = 30.0


def qfuse_argv() -> list[str]:
    """The installed console script beside the running interpreter (.venv/bin/qfuse).

    ``QFUSE_TEST_COMMAND`` overrides it (a path), e.g. to check the tests
    themselves against a reference implementation.
    """
    override = os.environ.get("QFUSE_TEST_COMMAND")
    if override:
        return [override]
    script = Path(sys.executable).parent / "qfuse"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "qfuse"]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    elapsed: float
    maxrss_kib: int | None = None

    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_qfuse(
    *args: str | os.PathLike[str],
    timeout: float = MOUNT_TIMEOUT,
    preexec_fn: Callable[[], None] | None = None,
) -> Result:
    """Run `qfuse ARGS...`.

    Output goes to temporary files, not pipes: a daemon that forgets to
    detach its stdio must not make us wait for EOF on a pipe.  The child's
    own peak RSS is measured with wait4().
    """
    argv = qfuse_argv() + [os.fspath(a) for a in args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env={**os.environ, "LC_ALL": "C"},
            preexec_fn=preexec_fn,
        )
        deadline = start + timeout
        rusage = None
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                proc.kill()
                _, status, rusage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                elapsed = time.monotonic() - start
                out.seek(0)
                err.seek(0)
                raise AssertionError(
                    f"{' '.join(argv)} did not finish within {timeout}s\n"
                    f"stdout: {out.read().decode(errors='replace')}\n"
                    f"stderr: {err.read().decode(errors='replace')}"
                )
            time.sleep(0.005)
        elapsed = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return Result(
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            elapsed,
            rusage.ru_maxrss if rusage is not None else None,
        )


# --------------------------------------------------------------------------
# Mount state, daemon processes
# --------------------------------------------------------------------------


def _unescape_mount_field(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[tuple[str, str, str]]:
    """(source, mountpoint, fstype) for every line of /proc/mounts."""
    rows = []
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                rows.append((parts[0], _unescape_mount_field(parts[1]), parts[2]))
    return rows


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    target = os.path.realpath(mountpoint)
    return any(mp == target for _, mp, _ in mounts())


def mounts_under(directory: str | os.PathLike[str]) -> list[str]:
    prefix = os.path.realpath(directory).rstrip("/") + "/"
    return [mp for _, mp, _ in mounts() if mp.startswith(prefix)]


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return line.split()[1]
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def process_state(pid: int) -> str | None:
    """The State letter of /proc/PID/status ("R", "S", "D", "Z", ...), None if gone."""
    return _proc_state(pid)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _has_open(pid: int, path: str) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"{fd_dir}/{fd}") == path:
                return True
        except OSError:
            pass
    return False


def daemon_pids(mountpoint: str | os.PathLike[str], image: str | os.PathLike[str]) -> set[int]:
    """Live processes serving this mount: their argv names this (unique, per-test)
    mountpoint, or they hold this image open.  Never matched by program name."""
    mp = os.path.realpath(mountpoint)
    img = os.path.realpath(image)
    me = os.getpid()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == me or _proc_state(pid) in (None, "Z"):
            continue
        argv = _cmdline(pid)
        if (mp in argv and "umount" not in argv) or _has_open(pid, img):
            found.add(pid)
    return found


def _is_alive(pid: int, mountpoint: str, image: str) -> bool:
    """Alive and still ours (guards against PID reuse)."""
    if _proc_state(pid) in (None, "Z"):
        return False
    argv = _cmdline(pid)
    return os.path.realpath(mountpoint) in argv or _has_open(pid, os.path.realpath(image))


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def force_unmount(mountpoint: str | os.PathLike[str]) -> None:
    """`fusermount3 -u`, retried while "device busy", then `fusermount3 -uz`."""
    mp = os.fspath(mountpoint)
    for _ in range(10):
        if not is_mounted(mp):
            return
        run(["fusermount3", "-u", mp], check=False, timeout=30)
        if not is_mounted(mp):
            return
        time.sleep(0.2)
    run(["fusermount3", "-uz", mp], check=False, timeout=30)


def teardown(
    mountpoint: str | os.PathLike[str], image: str | os.PathLike[str], known_pids: set[int]
) -> list[str]:
    """Unmount and wait for the daemon to be gone.  Returns what went wrong
    (an empty list means a clean `qfuse umount`)."""
    problems: list[str] = []
    mp, img = os.fspath(mountpoint), os.fspath(image)
    pids = set(known_pids)
    if is_mounted(mp):
        pids |= daemon_pids(mp, img)
        try:
            res = run_qfuse("umount", mp, timeout=UMOUNT_TIMEOUT)
        except AssertionError as e:
            problems.append(f"qfuse umount: {e}")
        else:
            if res.returncode != 0:
                problems.append(f"qfuse umount exited {res.returncode}: {res.stderr.strip()}")
            elif is_mounted(mp):
                problems.append("qfuse umount exited 0 but the mountpoint is still mounted")
            else:
                # "returns only after the daemon has finished writing and closed the image"
                holders = [p for p in pids if _has_open(p, os.path.realpath(img))]
                if holders:
                    problems.append(
                        f"qfuse umount returned while pid {holders} still had {img} open"
                    )
    if is_mounted(mp):
        force_unmount(mp)
    if not wait_until(lambda: not is_mounted(mp), GONE_TIMEOUT):
        problems.append(f"{mp} still in /proc/mounts after unmounting")
    if not wait_until(lambda: not any(_is_alive(p, mp, img) for p in pids), GONE_TIMEOUT):
        alive = [p for p in pids if _is_alive(p, mp, img)]
        problems.append(f"daemon pid(s) {alive} still running {GONE_TIMEOUT}s after unmount")
        # Last resort, by the PIDs found for this very mountpoint only.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, sig)
            if wait_until(lambda: not any(_is_alive(p, mp, img) for p in alive), 5):
                break
    return problems


@contextlib.contextmanager
def mount_view(
    image: str | os.PathLike[str], mountpoint: str | os.PathLike[str], *args: str
) -> Iterator[Path]:
    """`qfuse mount IMAGE MOUNTPOINT ARGS...`, asserted successful; yields the view path.

    Always tears down, also when the mount or the body fails.  A clean test
    body followed by an unclean `qfuse umount` fails the test.
    """
    mp = Path(mountpoint)
    pids: set[int] = set()
    ok = False
    try:
        res = run_qfuse("mount", image, mp, *args, timeout=MOUNT_TIMEOUT)
        assert res.returncode == 0, (
            f"qfuse mount {image} {mp} {' '.join(args)} exited {res.returncode}: "
            f"{res.stderr.strip()}"
        )
        assert "Traceback" not in res.stderr, res.stderr
        assert is_mounted(mp), (
            f"qfuse mount exited 0 but {mp} is not in /proc/mounts (stderr: {res.stderr.strip()})"
        )
        pids = daemon_pids(mp, image)
        yield mp
        ok = True
    finally:
        problems = teardown(mp, image, pids)
    if ok and problems:
        raise AssertionError("; ".join(problems))


# --------------------------------------------------------------------------
# Daemons a test starts itself: signals, --foreground, $NOTIFY_SOCKET
# --------------------------------------------------------------------------

PATTERN_IMAGE_SIZE = 64 << 20
PATTERN = b"\xab" * 65536  # the first 64 KiB of pattern_image()'s raw view


def pattern_image(path: Path) -> Path:
    """A 64 MiB qcow2 image (qemu-img) whose first 64 KiB are PATTERN (qemu-io)."""
    qemu_img("create", "-q", "-f", "qcow2", path, str(PATTERN_IMAGE_SIZE))
    qemu_io(path, "write -P 0xab 0 64k")
    return path


def pid_gone(pid: int) -> bool:
    """Exited: no such process, or a zombie (PID 1 here may never reap it)."""
    return process_state(pid) in (None, "Z", "X")


def qemu_img_check(image: str | os.PathLike[str]) -> None:
    """`qemu-img check` finds the image clean (exit 0)."""
    result = subprocess.run(["qemu-img", "check", image], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


class Cleanup:
    """What a test started, to be torn down whatever happened.

    Mountpoints are unmounted (`fusermount3 -u` retried, then ``-uz``); then
    the PIDs recorded for them and the test's own children get SIGTERM, then
    SIGKILL.  Nothing is signalled by name.
    """

    def __init__(self) -> None:
        self.mountpoints: list[Path] = []
        self.pids: set[int] = set()
        self.procs: list[subprocess.Popen[bytes]] = []

    def daemon_of(self, mountpoint: Path) -> int:
        """The daemon's pid from its state file (remembered for teardown)."""
        record = runstate.read_record(runstate.canonical_mountpoint(str(mountpoint)))
        assert record is not None, f"no state file for {mountpoint}"
        self.pids.add(record.pid)
        return record.pid

    def teardown(self) -> None:
        for mountpoint in self.mountpoints:
            with contextlib.suppress(AssertionError):
                self.daemon_of(mountpoint)
            force_unmount(mountpoint)
        for pid in self.pids:
            self._end_pid(pid)
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    @staticmethod
    def _end_pid(pid: int) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if pid_gone(pid):
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            wait_until(lambda: pid_gone(pid), 5.0)


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET (abstract name)."""

    def __init__(self) -> None:
        self.name = f"qfuse-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(TIMEOUT)

    def env(self) -> dict[str, str]:
        return {**os.environ, "NOTIFY_SOCKET": "@" + self.name}

    def receive(self) -> bytes:
        return self.sock.recv(4096)

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------
# Loop devices
# --------------------------------------------------------------------------


def loop_devices_backed_by(directory: str | os.PathLike[str]) -> list[str]:
    """Loop devices whose backing file lies under ``directory`` (from sysfs)."""
    prefix = os.path.realpath(directory).rstrip("/") + "/"
    found = []
    sys_block = Path("/sys/block")
    for dev in sys_block.glob("loop*"):
        try:
            backing = (dev / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing.startswith(prefix):
            found.append(f"/dev/{dev.name}")
    return found


def detach_loop(dev: str) -> None:
    for _ in range(20):
        res = run(["losetup", "-d", dev], check=False)
        name = os.path.basename(dev)
        if not Path(f"/sys/block/{name}/loop/backing_file").exists():
            return
        if res.returncode != 0 and "No such device" in res.stderr:
            return
        time.sleep(0.1)
    raise AssertionError(f"could not detach {dev}")


@contextlib.contextmanager
def loop_device(path: str | os.PathLike[str]) -> Iterator[str]:
    """`losetup -r -f --show PATH`; always detached afterwards."""
    res = run(["losetup", "-r", "-f", "--show", os.fspath(path)])
    dev = res.stdout.strip()
    try:
        yield dev
    finally:
        detach_loop(dev)


# --------------------------------------------------------------------------
# Oracles
# --------------------------------------------------------------------------


def convert_raw(
    image: str | os.PathLike[str], *, snapshot: str | None = None, fmt: str = "qcow2"
) -> bytes:
    """The image's raw view according to `qemu-img convert -O raw` (follows backing files)."""
    image = Path(image)
    fd, out = tempfile.mkstemp(prefix=image.name + ".", suffix=".expected.raw", dir=image.parent)
    os.close(fd)
    try:
        argv = ["convert", "-U", "-f", fmt]
        if snapshot is not None:
            argv += ["-l", f"snapshot.name={snapshot}"]
        qemu_img(*argv, "-O", "raw", image, out)
        return Path(out).read_bytes()
    finally:
        os.unlink(out)


def read_view(view: str | os.PathLike[str]) -> bytes:
    with open(view, "rb") as f:
        return f.read()


def first_difference(actual: bytes, expected: bytes) -> int | None:
    """Offset of the first differing byte (a length difference counts), or None."""
    a, e = memoryview(actual), memoryview(expected)
    n = min(len(a), len(e))
    step = 64 * 1024
    for start in range(0, n, step):
        if a[start : start + step] != e[start : start + step]:
            for i in range(start, min(start + step, n)):
                if a[i] != e[i]:
                    return i
    return None if len(a) == len(e) else n


def assert_bytes_equal(actual: bytes, expected: bytes, what: str = "view") -> None:
    off = first_difference(actual, expected)
    if off is None:
        return
    raise AssertionError(
        f"{what}: {len(actual)} bytes vs {len(expected)} expected; first difference at "
        f"offset {off} (0x{off:x}): got {actual[off : off + 16].hex(' ')!r}, "
        f"expected {expected[off : off + 16].hex(' ')!r}"
    )


def assert_same_as_qemu(
    view: str | os.PathLike[str],
    image: str | os.PathLike[str],
    *,
    snapshot: str | None = None,
    expected: bytes | None = None,
) -> bytes:
    """The mounted view reads exactly what `qemu-img convert -O raw` produces, its
    st_size is that length, and `qemu-img compare` agrees.  Returns the bytes."""
    if expected is None:
        expected = convert_raw(image, snapshot=snapshot)
    st = os.stat(view)
    assert st.st_size == len(expected), (
        f"st_size of the view is {st.st_size}, qemu's raw view is {len(expected)} bytes"
    )
    actual = read_view(view)
    assert_bytes_equal(actual, expected)
    if snapshot is None:
        qemu_img("compare", "-U", "-q", "-f", "raw", "-F", "qcow2", view, image)
    else:
        # qemu-img compare has no snapshot option: compare against the converted snapshot.
        image = Path(image)
        fd, ref = tempfile.mkstemp(suffix=".snap.raw", dir=image.parent)
        try:
            os.write(fd, expected)
            os.close(fd)
            qemu_img("compare", "-U", "-q", "-f", "raw", "-F", "raw", view, ref)
        finally:
            os.unlink(ref)
    return actual


def allocated_bytes(*paths: str | os.PathLike[str]) -> int:
    """Host bytes allocated to the files (st_blocks * 512)."""
    return sum(os.stat(p).st_blocks * 512 for p in paths)


# --------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------


def assert_refused(
    image: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    *args: str,
    match: list[str] | str,
    names: list[str] | None = None,
    unchanged: list[str | os.PathLike[str]] | None = None,
    timeout: float = MOUNT_TIMEOUT,
) -> Result:
    """`qfuse mount IMAGE MOUNTPOINT ARGS...` must be refused the way INTERFACE.md says:
    non-zero exit, exactly one stderr line naming the file (any of ``names``,
    default the image's file name) and matching every regex in ``match``
    (case-insensitive), no traceback, the image (and ``unchanged`` files)
    byte-for-byte unchanged, nothing mounted.  Cleans up if it did mount."""
    import re

    from images import sha256

    patterns = [match] if isinstance(match, str) else list(match)
    files = [os.fspath(image), *(os.fspath(f) for f in (unchanged or []))]
    before = {f: sha256(f) for f in files}
    names = names or [Path(image).name]
    try:
        res = run_qfuse("mount", image, mountpoint, *args, timeout=timeout)
        assert res.returncode != 0, (
            f"qfuse mount of a bad image exited 0 (stderr: {res.stderr.strip()!r})"
        )
        assert "Traceback" not in res.stderr, res.stderr
        lines = res.stderr_lines()
        assert len(lines) == 1, f"want exactly one line on stderr, got {lines!r}"
        line = lines[0]
        assert any(n in line for n in names), f"stderr {line!r} does not name any of {names}"
        for pat in patterns:
            assert re.search(pat, line, re.IGNORECASE), f"stderr {line!r} does not match {pat!r}"
        assert not is_mounted(mountpoint), f"{mountpoint} is mounted after a refused mount"
        assert wait_until(lambda: not daemon_pids(mountpoint, image), 5), (
            f"a process still serves {mountpoint} or holds {image} after a refused mount"
        )
        for f in files:
            assert sha256(f) == before[f], f"{f} was modified by a refused mount"
        return res
    finally:
        leftover = daemon_pids(mountpoint, image)
        if is_mounted(mountpoint) or leftover:
            teardown(mountpoint, image, leftover)
