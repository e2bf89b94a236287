"""SIGKILL the daemon in the middle of writes; the image must stay consistent
and keep whatever the cache mode promised to keep.

`qfuse mount --foreground` runs as our child (so its PID is known and it is
signalled only by that PID); a separate writer process (`workload.py` run as
a script) writes a seeded stream through the view and logs, unbuffered,
each write that returned (``W n``) and each fsync that returned (``F n``).
After a seed-dependent number of writes and a seed-dependent delay the
daemon gets SIGKILL.  Then the dead mount is lazily unmounted, the daemon
is seen to be a zombie and reaped, and:

* `qemu-img check` finds no corruption (leaked clusters are allowed);
* every write the mode made durable reads back, per `qemu-img convert`:
  under writethrough/directsync every write that returned, under
  writeback/none every write before the last fsync that returned, under
  unsafe none at all; bytes no write touched hold their old values, and
  bytes of the writes in between may hold old or new data;
* qfuse mounts the image again and reads exactly those bytes, and a clean
  umount leaves no corruption.

The same runs, fewer of them, on images where the crash lands in harder
metadata work: clusters shared with an internal snapshot (which must not
change), compressed clusters, extended L2 over a backing file, and
512-byte clusters where the refcount table has to grow.

A lazy-refcounts image is killed after its dirty bit is set; a writable
remount must repair it, so that after umount `qemu-img check` is clean,
without even a leak.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from images import create, info, qemu_img, qemu_io, run
from mountutil import (
    assert_bytes_equal,
    convert_raw,
    force_unmount,
    is_mounted,
    mount_view,
    process_state,
    qfuse_argv,
    read_view,
    wait_until,
)
from workload import (
    KiB,
    MiB,
    assert_check_clean,
    assert_check_no_corruption,
    assert_durable,
    crash_writes,
    read_log,
)

pytestmark = pytest.mark.mount

WORKLOAD = Path(__file__).with_name("workload.py")
SIZE = 32 * MiB
REGION = (1 * MiB, 9 * MiB)  # small, so that writes overwrite each other often
MAX_LEN = 256 * KiB
READY_TIMEOUT = 30.0
MODES = ("writeback", "writethrough", "none", "directsync", "unsafe")
SEEDS = range(10)


class NotifySocket:
    """Stands in for systemd's NOTIFY_SOCKET: READY=1 says the view serves I/O."""

    def __init__(self) -> None:
        self.name = f"qfuse-crash-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)

    def wait_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.05)
        while time.monotonic() < deadline:
            try:
                if b"READY=1" in self.sock.recv(4096).split(b"\n"):
                    return
            except TimeoutError:
                pass
            if proc.poll() is not None:
                raise AssertionError(f"qfuse mount -f exited {proc.returncode} before READY=1")
        raise AssertionError(f"no READY=1 from qfuse within {timeout}s")

    def close(self) -> None:
        self.sock.close()


def wait_zombie_then_reap(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """The killed daemon must die: its /proc state turns Z (or it is gone); then reap it."""
    assert wait_until(lambda: process_state(proc.pid) in (None, "Z"), timeout), (
        f"daemon {proc.pid} is still {process_state(proc.pid)} {timeout}s after SIGKILL"
    )
    proc.wait(timeout)


@contextlib.contextmanager
def foreground_mount(
    image: Path, view: Path, *args: str, stderr: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`qfuse mount IMAGE VIEW --foreground ARGS...` as our child, once ready.

    Afterwards, whatever happened: the mount is gone (`fusermount3 -u`, then
    lazily), the child has exited (or is killed by its own PID) and is reaped."""
    notify = NotifySocket()
    view.touch()
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [*qfuse_argv(), "mount", os.fspath(image), os.fspath(view), "--foreground", *args],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            env={**os.environ, "NOTIFY_SOCKET": "@" + notify.name},
        )  # fmt: skip
    try:
        notify.wait_ready(proc, READY_TIMEOUT)
        assert is_mounted(view)
        yield proc
    finally:
        notify.close()
        if is_mounted(view):
            force_unmount(view)
        try:
            proc.wait(10)  # an unmounted daemon exits by itself
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)


@contextlib.contextmanager
def writer(view: Path, log: Path, seed: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, os.fspath(WORKLOAD), os.fspath(view), os.fspath(log), str(seed),
         str(REGION[0]), str(REGION[1]), str(MAX_LEN)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)


def log_lines(log: Path) -> list[str]:
    try:
        return log.read_text().splitlines()
    except FileNotFoundError:
        return []


def wait_for_log(
    log: Path,
    proc: subprocess.Popen[bytes],
    predicate: Callable[[list[str]], bool],
    timeout: float = 30.0,
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate(log_lines(log)):
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(
                f"the writer stopped early (exit {proc.returncode}): {log_lines(log)[-3:]} {err}"
            )
        assert time.monotonic() < deadline, f"writer log: {log_lines(log)[-5:]}"
        time.sleep(0.002)


def make_image(tmp_path: Path, options: str | None = None) -> Path:
    image = create(tmp_path / "crash.qcow2", SIZE, options=options)
    # Old data to overwrite and to copy-on-write around; zero clusters too.
    qemu_io(image, "write -P 0x5a 0 2M", "write -z 3M 1M", "write -P 0x5b 5M 64k",
            "write -P 0x5c 8M 2M")  # fmt: skip
    return image


def durable_count(mode: str, acked: int, synced: int) -> int:
    if mode in ("writethrough", "directsync"):
        return acked
    if mode in ("writeback", "none"):
        return synced
    return 0  # unsafe: nothing is promised


def kill_during_writes(
    tmp_path: Path,
    image: Path,
    mode: str,
    seed: int,
    *,
    min_writes: int,
    delay: float,
    need_fsync: bool = False,
    before_kill: Callable[[], None] | None = None,
) -> tuple[bytes, int, int]:
    """Mount, write, SIGKILL the daemon; returns (original bytes, durable, attempted)."""
    original = convert_raw(image)
    view = tmp_path / "view.raw"
    log = tmp_path / f"writer-{seed}.log"
    with foreground_mount(image, view, "--cache", mode, stderr=tmp_path / "daemon.err") as daemon:
        with writer(view, log, seed) as w:

            def enough(lines: list[str]) -> bool:
                n = sum(1 for line in lines if line.startswith("W "))
                return n >= min_writes and (not need_fsync or any(
                    line.startswith("F ") and line != "F -1" for line in lines))  # fmt: skip

            wait_for_log(log, w, enough)
            if before_kill is not None:
                before_kill()
            time.sleep(delay)
            os.kill(daemon.pid, signal.SIGKILL)
            run(["fusermount3", "-uz", view])
            wait_zombie_then_reap(daemon)
            # The writer's request in flight fails once the daemon is gone.
            w.wait(30)
        assert not is_mounted(view)
    entries = read_log(log)
    assert entries.error is not None, f"the writer did not see the crash: {log_lines(log)[-3:]}"
    durable = durable_count(mode, entries.acked, entries.synced)
    return original, durable, entries.acked + 1


def remount_and_verify(tmp_path: Path, image: Path, expected: bytes) -> None:
    view = tmp_path / "again.raw"
    view.touch()
    with mount_view(image, view):
        assert_bytes_equal(read_view(view), expected, "view after the crash vs qemu-img")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", MODES)
def test_sigkill_keeps_durable_writes(tmp_path: Path, mode: str, seed: int) -> None:
    rng = random.Random(f"{mode}-{seed}")
    image = make_image(tmp_path)
    original, durable, attempted = kill_during_writes(
        tmp_path, image, mode, seed,
        min_writes=rng.choice((1, 3, 8, 15, 30)), delay=rng.uniform(0, 0.25),
    )  # fmt: skip
    assert_check_no_corruption(image)
    all_writes = crash_writes(seed, *REGION, attempted, MAX_LEN)
    after = convert_raw(image)
    assert_durable(after, original, all_writes, durable, attempted)
    remount_and_verify(tmp_path, image, after)
    assert_check_no_corruption(image)


def make_kind(tmp_path: Path, kind: str) -> Path:
    """Images where a crash lands in the middle of harder metadata work."""
    if kind == "snapshot":  # overwrites copy clusters shared with snapshot S
        image = make_image(tmp_path)
        qemu_img("snapshot", "-c", "S", image)
        return image
    if kind == "compressed":  # overwrites replace compressed clusters
        src = make_image(tmp_path)
        image = tmp_path / "compressed.qcow2"
        qemu_img("convert", "-c", "-O", "qcow2", src, image)
        src.unlink()
        return image
    if kind == "extended-l2":  # subcluster bitmaps over a backing file
        backing = create(tmp_path / "backing.qcow2", SIZE)
        qemu_io(backing, "write -P 0x44 0 12M")
        image = create(tmp_path / "crash.qcow2", None, backing=backing, backing_fmt="qcow2",
                       options="extended_l2=on")  # fmt: skip
        qemu_io(image, "write -P 0x45 2M 6k", "write -z 4M 2k")
        return image
    if kind == "cluster512":  # 7.5 MiB of 8 MiB covered: the refcount table grows
        image = create(tmp_path / "crash.qcow2", SIZE, options="cluster_size=512")
        qemu_io(image, "write -P 0x12 10M 7M")
        return image
    raise ValueError(kind)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", ["writeback", "writethrough"])
@pytest.mark.parametrize("kind", ["snapshot", "compressed", "extended-l2", "cluster512"])
def test_sigkill_on_image_kinds(tmp_path: Path, kind: str, mode: str, seed: int) -> None:
    rng = random.Random(f"{kind}-{mode}-{seed}")
    image = make_kind(tmp_path, kind)
    snapshot = convert_raw(image, snapshot="S") if kind == "snapshot" else None
    original, durable, attempted = kill_during_writes(
        tmp_path, image, mode, 100 + seed,
        min_writes=rng.choice((2, 10, 30)), delay=rng.uniform(0, 0.25),
    )  # fmt: skip
    assert_check_no_corruption(image)
    all_writes = crash_writes(100 + seed, *REGION, attempted, MAX_LEN)
    after = convert_raw(image)
    assert_durable(after, original, all_writes, durable, attempted)
    if snapshot is not None:
        assert_bytes_equal(convert_raw(image, snapshot="S"), snapshot, "snapshot S")
    remount_and_verify(tmp_path, image, after)
    assert_check_no_corruption(image)


@pytest.mark.parametrize("mode", ["writeback", "none"])
def test_lazy_refcounts_dirty_image_repaired_on_writable_mount(tmp_path: Path, mode: str) -> None:
    image = make_image(tmp_path, options="lazy_refcounts=on")
    seen_dirty = []

    def dirty_now() -> None:
        # The dirty bit must be on the disk before any deferred refcount update.
        seen_dirty.append(info(image).get("dirty-flag"))

    original, durable, attempted = kill_during_writes(
        tmp_path, image, mode, 4242, min_writes=20, delay=0.05, need_fsync=True,
        before_kill=dirty_now,
    )  # fmt: skip
    assert seen_dirty == [True], "the dirty bit was not set after an fsync"
    assert info(image).get("dirty-flag") is True
    all_writes = crash_writes(4242, *REGION, attempted, MAX_LEN)

    view = tmp_path / "repair.raw"
    view.touch()
    with mount_view(image, view, "--cache", mode):
        seen = read_view(view)
    assert_check_clean(image)
    assert info(image).get("dirty-flag") is False
    assert_durable(seen, original, all_writes, durable, attempted)
    assert_bytes_equal(convert_raw(image), seen, "qemu-img vs the view after repair")
