"""Host I/O: one image (or data, or backing) file and its cache mode.

Everything that touches a file descriptor lives here, so the engine above
speaks only of host offsets and bytes.  Reads use `os.pread` (never a shared
file position, because many FUSE handlers run at once).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import mmap
import os
import stat
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
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


_T = TypeVar("_T")

# Offsets and lengths of O_DIRECT I/O must be multiples of this; probed.
_ALIGNMENTS_TO_PROBE = (512, 4096)


def _never() -> bool:
    return False


# O_DIRECT I/O waits for the device.  In a worker thread other requests go on
# meanwhile, but the hop there and back costs two thread wake-ups: measured
# at 3-4x a 4 KiB read's own device time on this kind of VM (270-340 us
# against 75 us; docs/cache-modes.md).  So whoever serves the requests may
# say when nothing else is waiting for the event loop, and then the I/O
# runs on the loop itself.  Process-wide: one daemon serves one session.
_run_inline: Callable[[], bool] = _never


def run_direct_io_inline_when(nothing_waiting: Callable[[], bool] | None) -> None:
    """Run O_DIRECT I/O on the event loop while `nothing_waiting()` is true
    (None: always in a worker thread)."""
    global _run_inline
    _run_inline = nothing_waiting or _never


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
            self._edge_locks: dict[int, trio.Lock] = {}
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
        more than a cached 4 KiB `pread` (PERF-NOTES).  O_DIRECT reads wait
        for the device, so they go to a thread and other requests go on,
        unless no other request is waiting (`run_direct_io_inline_when`).
        """
        if self.alignment == 1:
            return _pread_full(self.fd, host_offset, length)
        if _run_inline():
            return self._pread_aligned(host_offset, length)
        return await _in_worker_thread(self._pread_aligned, host_offset, length)

    def pread_direct_now(self, host_offset: int, length: int) -> bytes | None:
        """An O_DIRECT read on the event loop if no other request waits
        (`run_direct_io_inline_when`); None when it should go to `pread`."""
        return self._pread_aligned(host_offset, length) if _run_inline() else None

    def _pread_aligned(self, host_offset: int, length: int) -> bytes:
        mask = self.alignment - 1
        start = host_offset & ~mask
        total = ((host_offset + length + mask) & ~mask) - start
        with _SCRATCH.buffer(total) as buf:
            done = 0
            view = memoryview(buf)
            while done < total:
                got = os.preadv(self.fd, [view[done:total]], start + done)
                if got == 0:
                    break
                done += got
                if done & mask:  # a short read that is not aligned: EOF
                    break
            view.release()
            skip = host_offset - start
            return buf[skip:min(done, skip + length)] if done > skip else b""

    # -- writing ------------------------------------------------------------

    def pwrite_sync(self, host_offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of `data` at `host_offset` (cold path, or under a lock)."""
        if self.alignment == 1:
            _pwrite_full(self.fd, host_offset, data)
        else:
            self._pwrite_aligned(host_offset, [data])

    async def pwritev(self, host_offset: int,
                      buffers: list[bytes | bytearray | memoryview]) -> None:
        """Write consecutive buffers at `host_offset`: one `pwritev` in the
        page-cache modes, so the pieces of a request are never joined (a
        copy of each megabyte costs as much as writing it)."""
        if self.alignment != 1:
            await self._pwritev_direct(host_offset, buffers)
            return
        self.pwritev_now(host_offset, buffers)

    def pwritev_now(self, host_offset: int,
                    buffers: list[bytes | bytearray | memoryview]) -> None:
        """`pwritev` on the event loop (alignment 1 only)."""
        assert self.alignment == 1
        for start in range(0, len(buffers), _IOV_BATCH):
            batch = buffers[start:start + _IOV_BATCH]
            length = sum(len(b) for b in batch)
            done = os.pwritev(self.fd, batch, host_offset)
            if done < length:  # short write: finish it the plain way
                _pwrite_full(self.fd, host_offset + done, memoryview(b"".join(batch))[done:])
            host_offset += length

    def write_now(self, host_offset: int,
                  buffers: list[bytes | bytearray | memoryview]) -> bool:
        """Write consecutive buffers on the event loop if that is the cheap
        way: always in the page-cache modes; with O_DIRECT when they cover
        whole alignment blocks (no edge block to read and lock) and no other
        request waits (`run_direct_io_inline_when`).  False: nothing was
        written, use `pwritev`."""
        if self.alignment == 1:
            self.pwritev_now(host_offset, buffers)
            return True
        mask = self.alignment - 1
        if host_offset & mask or sum(len(b) for b in buffers) & mask or not _run_inline():
            return False
        self._pwrite_aligned(host_offset, buffers)
        return True

    async def pwrite(self, host_offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write on behalf of a request; like `pread`, O_DIRECT goes to a
        thread unless no other request waits."""
        if self.alignment == 1:
            _pwrite_full(self.fd, host_offset, data)
            return
        await self._pwritev_direct(host_offset, [data])

    async def _pwritev_direct(self, host_offset: int,
                              buffers: list[bytes | bytearray | memoryview]) -> None:
        """An O_DIRECT write of consecutive buffers, copied once into an
        aligned buffer.

        A write that does not cover whole alignment blocks must read, patch
        and write the blocks at its edges; two such writes to one block
        would lose one another's bytes, so they take that block's lock.
        """
        mask = self.alignment - 1
        end = host_offset + sum(len(b) for b in buffers)
        edges = sorted({host_offset & ~mask, (end - 1) & ~mask}
                       if (host_offset | end) & mask else set())
        async with _BlockLocks(self._edge_locks, edges):
            if _run_inline():
                self._pwrite_aligned(host_offset, buffers)
            else:
                await _in_worker_thread(self._pwrite_aligned, host_offset, buffers)

    def _pwrite_aligned(self, host_offset: int,
                        buffers: list[bytes | bytearray | memoryview]) -> None:
        alignment = self.alignment
        mask = alignment - 1
        start = host_offset & ~mask
        data_end = host_offset + sum(len(b) for b in buffers)
        end = (data_end + mask) & ~mask
        total = end - start
        with _SCRATCH.buffer(total) as buf:
            if start != host_offset:
                head = self._pread_aligned(start, alignment)
                buf[:len(head)] = head
                buf[len(head):alignment] = bytes(alignment - len(head))  # past EOF
            tail_at = end - alignment
            if end != data_end and not (tail_at == start and start != host_offset):
                tail = self._pread_aligned(tail_at, alignment)
                at = tail_at - start
                buf[at:at + len(tail)] = tail
                buf[at + len(tail):total] = bytes(alignment - len(tail))  # past EOF
            at = host_offset - start
            for piece in buffers:
                buf[at:at + len(piece)] = piece
                at += len(piece)
            view = memoryview(buf)
            done = 0
            while done < total:
                done += os.pwritev(self.fd, [view[done:total]], start + done)
            view.release()
        # An unaligned write at the end of the file leaves it padded with
        # zeros to the alignment.  Not cut back: a `ftruncate` here could
        # race another thread's write past it.

    def datasync(self) -> None:
        os.fdatasync(self.fd)

    def punch_hole_sync(self, host_offset: int, length: int) -> bool:
        """Give a byte range back to the file system, keeping the file's size
        (fallocate PUNCH_HOLE): it then reads as zeros.  Best effort: False
        where the file system or device cannot (cold path: `qfuse check`)."""
        if _fallocate is None:
            return False
        return _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                          host_offset, length) == 0

    async def datasync_async(self) -> None:
        await _in_worker_thread(os.fdatasync, self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _load_fallocate() -> ctypes._CFuncPtr | None:
    """libc's fallocate64 (Python's os has no fallocate with a mode)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate64
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_fallocate = _load_fallocate()


_IOV_BATCH = 512  # well under IOV_MAX (1024)


def _pwrite_full(fd: int, offset: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class _BlockLocks:
    """Hold the trio locks of some alignment blocks, in ascending order.

    trio is imported where it is used in this module: the offline tools
    (check, info, create) open host files but never run an event loop, and
    importing trio is half of their start-up time.
    """

    def __init__(self, table: dict[int, trio.Lock], blocks: list[int]) -> None:
        self._table = table
        self._blocks = blocks
        self._held: list[int] = []

    async def __aenter__(self) -> None:
        for block in self._blocks:
            import trio

            lock = self._table.get(block)
            if lock is None:
                lock = self._table[block] = trio.Lock()
            await lock.acquire()
            self._held.append(block)

    async def __aexit__(self, *exc: object) -> None:
        for block in reversed(self._held):
            lock = self._table[block]
            lock.release()
            if not lock.statistics().tasks_waiting:
                del self._table[block]


async def _in_worker_thread(function: Callable[..., _T], *args: object) -> _T:
    """`function(*args)` in one of trio's cached worker threads.

    What `trio.to_thread.run_sync` does, without its capacity limiter and
    cancellation bookkeeping: host I/O cannot be abandoned anyway, and the
    number of requests in flight is bounded by the FUSE session's tasks.
    Measured on this kind of VM, one CPU: 38 us a hop against 57 us.
    trio is imported here, not at the top: see _BlockLocks.
    """
    import trio

    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: object) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(lambda: function(*args), deliver)
    return await trio.lowlevel.wait_task_rescheduled(
        lambda _: trio.lowlevel.Abort.FAILED)  # type: ignore[no-any-return]


class _ScratchBuffers:
    """Page-aligned buffers for O_DIRECT, kept for reuse.

    A new anonymous mapping faults in, zero-filled, one page at a time on
    first touch: for a 1 MiB write that cost more than the write itself
    (1 MiB O_DIRECT writes went from ~2 ms to ~0.8 ms with reuse).  Sizes
    are rounded up to a power of two, at least 64 KiB; up to `KEEP` of each
    size up to `MAX_KEPT` bytes are kept.  Worker threads share the pool:
    `list.pop`/`append` are atomic.
    """

    KEEP = 4
    MAX_KEPT = 4 << 20

    def __init__(self) -> None:
        self._free: dict[int, list[mmap.mmap]] = {}

    @contextlib.contextmanager
    def buffer(self, size: int) -> Iterator[mmap.mmap]:
        """A buffer of at least `size` bytes, contents undefined."""
        capacity = max(1 << 16, 1 << (size - 1).bit_length())
        pool = self._free.setdefault(capacity, []) if capacity <= self.MAX_KEPT else []
        try:
            buf = pool.pop()
        except IndexError:
            buf = mmap.mmap(-1, capacity)
        try:
            yield buf
        finally:
            if capacity <= self.MAX_KEPT and len(pool) < self.KEEP:
                pool.append(buf)
            else:
                buf.close()


_SCRATCH = _ScratchBuffers()


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
