"""Shared fixtures: mounting the real `qfuse` command, daemons a test starts
itself, and a leftover check.

Everything a test makes lives under its own ``tmp_path``, so the tests run in
parallel under pytest-xdist.  After each test, nothing may stay mounted and
no loop device may stay attached under that directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mountutil import (
    Cleanup,
    NotifySocket,
    detach_loop,
    force_unmount,
    loop_devices_backed_by,
    mount_view,
    mounts_under,
    pattern_image,
)

MountFn = Callable[..., Path]


def _fuse_available() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[MountFn]:
    """``mount(image, *args, mountpoint=None) -> view path``.

    Runs `qfuse mount IMAGE MOUNTPOINT ARGS...` (asserting success); every
    view is unmounted when the test ends, whatever happened.  The default
    mountpoint is a fresh empty regular file under tmp_path.
    """
    reason = _fuse_available()
    if reason:
        pytest.skip(reason)
    counter = 0
    with contextlib.ExitStack() as stack:

        def _mount(
            image: os.PathLike[str] | str, *args: str, mountpoint: Path | None = None
        ) -> Path:
            nonlocal counter
            if mountpoint is None:
                mountpoint = tmp_path / f"view{counter}.raw"
                counter += 1
                mountpoint.touch()
            return stack.enter_context(mount_view(image, mountpoint, *args))

        yield _mount


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    """Tears down the mounts, daemons and children a test registers, whatever happened."""
    tracker = Cleanup()
    try:
        yield tracker
    finally:
        tracker.teardown()


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    """A stand-in for systemd's notification socket (``notify.env()`` names it)."""
    sock = NotifySocket()
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """tmp_path/disk.qcow2: 64 MiB, the first 64 KiB written with PATTERN."""
    return pattern_image(tmp_path / "disk.qcow2")


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path: Path) -> Iterator[None]:
    """Fail a test that leaves a mount or a loop device behind (and clean it up)."""
    yield
    leftovers = []
    for dev in loop_devices_backed_by(tmp_path):
        leftovers.append(f"loop device {dev}")
        with contextlib.suppress(AssertionError):
            detach_loop(dev)
    for mp in mounts_under(tmp_path):
        leftovers.append(f"mount {mp}")
        force_unmount(mp)
    if leftovers:
        pytest.fail("left behind: " + ", ".join(leftovers))
