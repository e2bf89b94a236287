"""`qfuse umount MOUNTPOINT`: unmount, then wait until the image is closed.

Unmounting only detaches the view; the daemon still has to flush and close
the image after its FUSE loop ends.  So this (1) runs ``fusermount3 -u``,
retrying while the kernel says the mount is busy, then (2) waits for the
daemon recorded in the state file (runstate.py) to exit.  The daemon is not
our child, and PID 1 here may never reap it, so "exited" means: no such
process, a zombie, or a pid now used by a process started at another time.
Nothing is killed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time

from qfuse.errors import QfuseError
from qfuse.fuse import runstate

log = logging.getLogger(__name__)

# fusermount3 -u fails with EBUSY while a file on the view is open (a loop
# device, a shell cd'd into the directory form, ...); the holder often lets
# go within moments, so retry a few times before giving up.
BUSY_RETRY_DELAYS = (0.1, 0.2, 0.4, 0.8, 1.5)
# How long the daemon may take to flush and close the image.
CLOSE_TIMEOUT = 120.0
POLL_INTERVAL = 0.02


def umount(mountpoint: str, close_timeout: float = CLOSE_TIMEOUT) -> int:
    given = mountpoint
    mountpoint = runstate.canonical_mountpoint(given)
    record = runstate.read_record(mountpoint)
    fstype = runstate.mount_fstype(mountpoint)
    if fstype is None and record is None and os.path.islink(mountpoint):
        # A symlink to the mountpoint: the mount is on its target.
        mountpoint = os.path.realpath(given)
        record = runstate.read_record(mountpoint)
        fstype = runstate.mount_fstype(mountpoint)
    if fstype is None:
        if record is None or not runstate.record_alive(record):
            raise QfuseError(mountpoint, "not mounted")
        # Already unmounted (fusermount3 -u); the daemon is still closing.
    elif fstype != "fuse.qfuse":
        raise QfuseError(mountpoint, f"not a qfuse mount (it is {fstype})")
    else:
        _fusermount_unmount(mountpoint)
    if record is None:
        log.debug("%s: no daemon recorded; not waiting for it", mountpoint)
        return 0
    _wait_closed(record, close_timeout)
    # The daemon removes its record itself; this only clears one left by a
    # daemon that was killed.
    runstate.remove_record(record)
    return 0


def _fusermount_unmount(mountpoint: str) -> None:
    for delay in (*BUSY_RETRY_DELAYS, None):
        result = subprocess.run(
            ["fusermount3", "-u", "--", mountpoint],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == 0:
            return
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        if runstate.mount_fstype(mountpoint) != "fuse.qfuse":
            return  # someone else unmounted it meanwhile
        if "busy" not in message.lower() or delay is None:
            reason = message.split(": ")[-1] if message else "fusermount3 -u failed"
            if "busy" in reason.lower():
                reason += " (a file on the view is still open: close it or detach its loop device)"
            raise QfuseError(mountpoint, f"cannot unmount: {reason}")
        time.sleep(delay)


def _wait_closed(record: runstate.DaemonRecord, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while runstate.record_alive(record):
        if time.monotonic() > deadline:
            raise QfuseError(
                record.mountpoint,
                f"unmounted, but the daemon (pid {record.pid}) has not closed "
                f"{record.image} after {timeout:.0f} s",
            )
        time.sleep(POLL_INTERVAL)
