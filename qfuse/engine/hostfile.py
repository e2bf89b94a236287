"""Host I/O: one image (or data, or backing) file and its cache mode.

Everything that touches a file descriptor lives here, so the engine above
speaks only of host offsets and bytes.  Reads use `os.pread` (never a shared
file position, because many FUSE handlers run at once).
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
import stat

import trio

from qfuse.errors import ImageError


class CacheMode(enum.Enum):
    """QEMU's host cache modes (`-drive cache=...`)."""

    WRITEBACK = "writeback"
    WRITETHROUGH = "writethrough"
    NONE = "none"
    DIRECTSYNC = "directsync"
    UNSAFE = "unsafe"

    @property
    def direct(self) -> bool:
        """Bypass the host page cache (O_DIRECT)."""
        return self in (CacheMode.NONE, CacheMode.DIRECTSYNC)

    @property
    def write_through(self) -> bool:
        """A write returns only once durable (O_DSYNC)."""
        return self in (CacheMode.WRITETHROUGH, CacheMode.DIRECTSYNC)

    @property
    def honours_flush(self) -> bool:
        return self is not CacheMode.UNSAFE


# Offsets and lengths of O_DIRECT I/O must be multiples of this; probed.
_ALIGNMENTS_TO_PROBE = (512, 4096)


class HostFile:
    """An open host file: the image, its external data file, or a backing file."""

    def __init__(self, path: str, *, writable: bool = False,
                 cache: CacheMode = CacheMode.WRITEBACK) -> None:
        self.path = path
        self.cache = cache
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        if cache.direct:
            flags |= os.O_DIRECT
        if cache.write_through and writable:
            flags |= os.O_DSYNC
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.EINVAL and cache.direct:
                raise ImageError(path, f"cache={cache.value} needs O_DIRECT, which this "
                                 "file system does not support") from None
            raise ImageError(path, exc.strerror or str(exc)) from None
        try:
            st = os.fstat(self.fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ImageError(path, "not a regular file or block device")
            self.alignment = self._probe_alignment() if cache.direct else 1
        except BaseException:
            os.close(self.fd)
            raise

    def _probe_alignment(self) -> int:
        buf = mmap.mmap(-1, max(_ALIGNMENTS_TO_PROBE))
        try:
            for alignment in _ALIGNMENTS_TO_PROBE:
                try:
                    os.preadv(self.fd, [memoryview(buf)[:alignment]], 0)
                    return alignment
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise ImageError(self.path, exc.strerror or str(exc)) from None
        finally:
            buf.close()
        raise ImageError(self.path, "no usable O_DIRECT alignment")

    def size(self) -> int:
        """Current length of the file in bytes (block devices included)."""
        return os.lseek(self.fd, 0, os.SEEK_END)

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def pread_sync(self, host_offset: int, length: int) -> bytes:
        """Read up to `length` bytes; short only at the end of the file."""
        if self.alignment == 1:
            return _pread_full(self.fd, host_offset, length)
        return self._pread_aligned(host_offset, length)

    async def pread(self, host_offset: int, length: int) -> bytes:
        """Read on behalf of a request.

        Page-cache reads run on the event loop: a `trio.to_thread` hop costs
        more than a cached 4 KiB `pread` (PERF-NOTES).  O_DIRECT reads always
        wait for the device, so they go to a thread and other requests go on.
        """
        if self.alignment == 1:
            return _pread_full(self.fd, host_offset, length)
        return await trio.to_thread.run_sync(self._pread_aligned, host_offset, length)

    def _pread_aligned(self, host_offset: int, length: int) -> bytes:
        mask = self.alignment - 1
        start = host_offset & ~mask
        end = (host_offset + length + mask) & ~mask
        buf = mmap.mmap(-1, end - start)  # page-aligned, as O_DIRECT needs
        try:
            done = 0
            view = memoryview(buf)
            while done < end - start:
                got = os.preadv(self.fd, [view[done:]], start + done)
                if got == 0:
                    break
                done += got
                if done & mask:  # a short read that is not aligned: EOF
                    break
            view.release()
            skip = host_offset - start
            return buf[skip:min(done, skip + length)] if done > skip else b""
        finally:
            buf.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pread_full(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    # Short read before EOF (rare: signals, some file systems): go on.
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
