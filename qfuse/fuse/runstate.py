"""Which daemon serves which mountpoint: a small state file per mount.

The daemon records its pid (and the pid's start time, so that a reused pid
is not mistaken for it) in ``/run/qfuse/<hash of the mountpoint>.json``
once the view is mounted, and removes it after it has closed the image.
`qfuse umount` reads it to wait for that process to end.  The hash keeps
file names short whatever the path; the file itself names the mountpoint.

Also here: reading /proc/self/mountinfo and /proc/PID/stat, the two facts
about the system that mount and umount decide on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile

log = logging.getLogger(__name__)

RUNTIME_DIR_ENV = "QFUSE_RUNTIME_DIR"


def runtime_dir() -> str:
    """Where state files live: /run/qfuse for root, else a per-user directory."""
    override = os.environ.get(RUNTIME_DIR_ENV)
    if override:
        return override
    if os.geteuid() == 0:
        return "/run/qfuse"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "qfuse") if xdg else f"/tmp/qfuse-{os.geteuid()}"


def canonical_mountpoint(path: str) -> str:
    """The absolute path with the directory's symlinks resolved, as mountinfo spells it.

    The last component is deliberately not touched: on a mounted view any
    stat of it is a FUSE request, which would hang if the daemon hangs.
    (A symlink as the last component is resolved by `qfuse mount` before
    mounting; the kernel mounts on its target.)
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path


def _state_path(mountpoint: str) -> str:
    digest = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:32]
    return os.path.join(runtime_dir(), f"{digest}.json")


@dataclasses.dataclass(frozen=True)
class DaemonRecord:
    pid: int
    start_time: int  # /proc/PID/stat field 22, in clock ticks since boot
    mountpoint: str
    image: str


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


def process_state(pid: int) -> str | None:
    """The one-letter state of /proc/PID/stat (R, S, D, Z, ...), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(b")") + 2 :].split()[0].decode()


def record_alive(record: DaemonRecord) -> bool:
    """True while the recorded daemon has not exited.

    A zombie counts as gone: it has closed every file, and PID 1 here may
    never reap it.  A different start time means the pid was reused.
    """
    if process_start_time(record.pid) != record.start_time:
        return False
    return process_state(record.pid) not in (None, "Z", "X")


def write_record(mountpoint: str, image: str) -> DaemonRecord | None:
    """Record this process as the daemon of `mountpoint`; None if we cannot.

    Not being able to write the state only costs `qfuse umount` its wait,
    so it is a warning, not a failure.
    """
    pid = os.getpid()
    start_time = process_start_time(pid)
    assert start_time is not None
    record = DaemonRecord(pid, start_time, mountpoint, image)
    path = _state_path(mountpoint)
    _prune_dead_records(os.path.dirname(path))
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(record), f)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("cannot record the daemon in %s (%s); 'qfuse umount' will not wait", path, err)
        return None
    return record


def _prune_dead_records(directory: str) -> None:
    """Drop the records of daemons that died without removing theirs (killed)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                record = DaemonRecord(**json.load(f))
        except (OSError, ValueError, TypeError):
            continue
        if not record_alive(record):
            try:
                os.unlink(path)
            except OSError:
                pass


def read_record(mountpoint: str) -> DaemonRecord | None:
    """The record for `mountpoint`, or None if there is none (or it is unreadable)."""
    try:
        with open(_state_path(mountpoint)) as f:
            record = DaemonRecord(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
    return record if record.mountpoint == mountpoint else None


def remove_record(record: DaemonRecord) -> None:
    """Remove the state file if it is still ours (a later mount may own it now)."""
    path = _state_path(record.mountpoint)
    if read_record(record.mountpoint) == record:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _unescape_mountinfo(field: bytes) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out = bytearray()
    i = 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == 0x5C and len(code) == 3 and code.isdigit():
            out.append(int(code, 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return os.fsdecode(bytes(out))


def mount_fstype(mountpoint: str) -> str | None:
    """The filesystem type mounted on exactly `mountpoint` (topmost), or None."""
    found: str | None = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            if _unescape_mountinfo(fields[4]) == mountpoint:
                found = fields[sep + 1].decode()
    return found
