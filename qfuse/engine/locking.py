"""QEMU's image locking: byte-range OFD locks that say who uses a file how.

QEMU (`block/file-posix.c`, since 2.10) marks every file it opens with
open-file-description (OFD) read locks on single bytes, one per block-layer
permission:

* byte ``100 + i`` is locked while the holder *has* permission ``i``;
* byte ``200 + i`` is locked while the holder does *not share* permission
  ``i`` with anybody else;

where ``i`` is 0 consistent read, 1 write, 2 write unchanged, 3 resize (the
bit numbers of ``BLK_PERM_*``).  The locks are all shared (``F_RDLCK``): they
never block each other, they are only there to be seen.  To open, QEMU first
takes its own bytes and then tests, with ``F_OFD_GETLK`` for an exclusive
lock, whether any *other* open file description holds

* ``200 + i`` for a permission ``i`` it wants ("Failed to get "write" lock"),
* ``100 + i`` for a permission ``i`` it will not share ("Failed to get shared
  "write" lock").

Taking before testing means two openers racing cannot both miss each other.
Libvirt uses byte 0; QEMU 6.1 and older also lock 104/204 (a removed
permission), which nobody tests any more.

`ImageLock` does the same, with the permissions that QEMU's qcow2 driver
takes on its files, so that a running QEMU and qfuse refuse each other's
conflicting opens in both directions.  Which permissions those are is the
table `qemu_permissions` (derived in its docstring from QEMU's `block.c`).

OFD locks belong to the open file description: they go away when its last
descriptor is closed, they are not inherited apart from `dup` and `fork`,
and two descriptors of the same file opened separately conflict with each
other even inside one process.  So qfuse must open each file of a chain
once, and take one `ImageLock` per file.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import logging
import os
import struct

from qfuse.errors import ImageError

log = logging.getLogger(__name__)


class Perm(enum.IntFlag):
    """QEMU's block-node permissions (``BLK_PERM_*`` in block-common.h)."""

    CONSISTENT_READ = 0x01
    WRITE = 0x02
    WRITE_UNCHANGED = 0x04
    RESIZE = 0x08


ALL_PERMS = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE

# QEMU's spelling of each permission in its error messages (bdrv_perm_names).
_PERM_NAMES = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}

# The first lock byte of the "holds" and "does not share" ranges
# (RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE in file-posix.c).
PERM_BASE = 100
SHARED_BASE = 200

# Linux fcntl commands; the fcntl module has them since Python 3.9.
F_OFD_GETLK: int = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)

# struct flock: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid, in native alignment, padded to a multiple of 8 (32 bytes on
# 64-bit Linux).
_FLOCK = struct.Struct("hhqqi")
_FLOCK_SIZE = (_FLOCK.size + 7) & ~7


def qemu_permissions(*, write: bool, data_file: bool = False) -> tuple[Perm, Perm]:
    """``(held, shared)``: what QEMU's qcow2 user takes on one of its files.

    QEMU's `blk_new_open` gives the qcow2 node CONSISTENT_READ, plus WRITE
    when opened read-write, and shares everything.  The qcow2 node passes
    that down to its children (`bdrv_default_perms` in block.c):

    * the image file (role METADATA, plus DATA when it holds the data):
      WRITE | RESIZE added when writable, CONSISTENT_READ always; WRITE and
      RESIZE never shared, "because of the metadata".  Read-only: holds
      {read}, shares {read, write unchanged}; read-write: holds {read, write,
      resize}, shares the same two.
    * the external data file (role DATA only): RESIZE not shared; WRITE
      implies RESIZE.  Read-only: holds {read}, shares all but resize;
      read-write: holds {read, write, resize}, shares all but resize.
    * a backing file (role COW of the overlay): CONSISTENT_READ, shared all,
      so the backing qcow2's own image file gets the read-only row above.

    `qemu-io -r`, `qemu-io` and a backing chain under either lock exactly
    these bytes (see tests/unit/test_locking.py, which compares).
    """
    held = Perm.CONSISTENT_READ
    if write:
        held |= Perm.WRITE | Perm.RESIZE
    if data_file:
        shared = ALL_PERMS & ~Perm.RESIZE
    else:
        shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
    return held, shared


def _bits(perms: Perm) -> list[tuple[int, Perm]]:
    """``(i, permission)`` for each permission in `perms`, lowest bit first."""
    return [(i, Perm(1 << i)) for i in range(len(_PERM_NAMES)) if Perm(1 << i) in perms]


def _fcntl_lock(fd: int, cmd: int, lock_type: int, byte: int) -> int:
    """One `fcntl` lock call on the single byte `byte`; the resulting l_type."""
    request = _FLOCK.pack(lock_type, os.SEEK_SET, byte, 1, 0).ljust(_FLOCK_SIZE, b"\0")
    answer = fcntl.fcntl(fd, cmd, request)
    return _FLOCK.unpack_from(answer)[0]


def _in_use(path: str, what: str) -> ImageError:
    return ImageError(path, f"is in use by another process (QEMU or qfuse): "
                      f"failed to get {what} lock")


class ImageLock:
    """QEMU-compatible lock bytes held on one open file.

    Take one with `acquire`; drop it with `release` before closing the
    descriptor (closing drops it too).  `held` and `unshared` say which
    permissions it announces.
    """

    def __init__(self, fd: int, path: str, held: Perm, unshared: Perm) -> None:
        self.fd = fd
        self.path = path
        self.held = held
        self.unshared = unshared
        self._bytes = [PERM_BASE + i for i, _ in _bits(held)]
        self._bytes += [SHARED_BASE + i for i, _ in _bits(unshared)]

    @classmethod
    def acquire(cls, fd: int, path: str, *, write: bool,
                data_file: bool = False) -> ImageLock:
        """Lock `fd` the way QEMU's qcow2 driver locks its file, or refuse.

        ``write=False`` for a read-only image and for every backing file,
        ``write=True`` for an image opened read-write; ``data_file=True`` for
        the external data file of a qcow2 image (`qemu_permissions`).  Raises
        `ImageError` naming `path` and the permission when another open file
        description (QEMU, qfuse, anyone) conflicts; then nothing is held.
        """
        held, shared = qemu_permissions(write=write, data_file=data_file)
        lock = cls(fd, path, held, ALL_PERMS & ~shared)
        try:
            lock._take()
        except _NoOfdLocks:
            log.warning("%s: OFD locks are not supported here; not locking the image",
                        path)
            return cls(fd, path, Perm(0), Perm(0))
        except BaseException:
            lock.release()
            raise
        lock._check()  # releases what it took before raising
        return lock

    def _take(self) -> None:
        """Lock our bytes, shared: they announce, they never block QEMU's."""
        for byte in self._bytes:
            try:
                _fcntl_lock(self.fd, F_OFD_SETLK, fcntl.F_RDLCK, byte)
            except OSError as exc:
                if exc.errno == errno.EINVAL and byte == self._bytes[0]:
                    raise _NoOfdLocks from None
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    # Someone holds an exclusive lock there: not QEMU's protocol,
                    # but certainly a user.
                    raise _in_use(self.path, f"byte {byte}") from None
                raise ImageError(self.path, f"cannot lock byte {byte}: "
                                 f"{exc.strerror or exc}") from None

    def _check(self) -> None:
        """QEMU's raw_check_lock_bytes: is anyone else in our way?"""
        tests = [(SHARED_BASE + i, f'"{_PERM_NAMES[p]}"') for i, p in _bits(self.held)]
        tests += [(PERM_BASE + i, f'shared "{_PERM_NAMES[p]}"')
                  for i, p in _bits(self.unshared)]
        for byte, what in tests:
            try:
                found = _fcntl_lock(self.fd, F_OFD_GETLK, fcntl.F_WRLCK, byte)
            except OSError as exc:
                self.release()
                raise ImageError(self.path, f"cannot test lock byte {byte}: "
                                 f"{exc.strerror or exc}") from None
            if found != fcntl.F_UNLCK:
                self.release()
                raise _in_use(self.path, what)

    def release(self) -> None:
        """Drop the lock bytes; the descriptor stays open.  Idempotent."""
        for byte in self._bytes:
            try:
                _fcntl_lock(self.fd, F_OFD_SETLK, fcntl.F_UNLCK, byte)
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    break  # already closed, and the locks with it
                log.warning("%s: cannot unlock byte %d: %s", self.path, byte,
                            exc.strerror or exc)
        self._bytes = []
        self.held = self.unshared = Perm(0)

    def __enter__(self) -> ImageLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return (f"<ImageLock {self.path!r} fd={self.fd} held={self.held!r} "
                f"unshared={self.unshared!r}>")


class _NoOfdLocks(Exception):
    """The kernel or file system has no OFD locks (QEMU then does not lock)."""
