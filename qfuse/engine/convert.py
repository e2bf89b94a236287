"""`qfuse convert`: copy a disk's guest data into a new raw or qcow2 file.

The source is a qcow2 image with its whole backing chain (read through the
engine, flattened) or a raw disk image.  The destination is written to a
temporary file in DEST's directory and renamed over DEST only once it is
complete and synced, so a failed or interrupted convert leaves DEST as it
was.

Zeros are never written.  A range the source's mapping says reads as zeros
(a ZERO cluster, or unallocated all the way down the chain, or a hole in a
raw file) is not even read; what is read is checked per block for zeros.

* raw destination: non-zero 4 KiB blocks are written, the rest stays a hole
  (``ftruncate`` sets the size).
* qcow2 destination: an `ImageBuilder` streams the non-zero clusters in
  guest order, each L2 table placed just before the first cluster it maps;
  refcounts and the header go in last.  With ``-c`` each cluster is
  compressed (in a pool of threads) unless that does not shrink it.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import tempfile
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import trio

from qfuse.engine.builder import ImageBuilder, pwrite_all
from qfuse.engine.chain import open_image
from qfuse.engine.compression import compress_cluster
from qfuse.engine.hostfile import HostFile
from qfuse.engine.locking import ImageLock
from qfuse.engine.qcow2 import BACKING, ZERO, Qcow2Image
from qfuse.engine.raw import RawImage
from qfuse.errors import FormatError, ImageError
from qfuse.format.entries import OFLAG_COPIED, SUBCLUSTER_ALLOC_MASK
from qfuse.format.header import MAGIC
from qfuse.format.layout import ImageSpec, check_spec

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024  # guest bytes handled per step (at least a cluster)
RAW_BLOCK = 4096  # zero detection granularity of a raw destination
SECTOR = 512
Progress = Callable[[int, int], None]  # (bytes just done, total bytes)
Runs = list[tuple[bool, int, int]]  # (may hold data, guest offset, length)

# Other image formats, by their magic: refused rather than copied as raw.
_FOREIGN_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"KDMV", "VMDK"),
    (0, b"# Disk DescriptorFile", "VMDK descriptor"),
    (0, b"QFI\xfb\x00\x00\x00\x01", "qcow (version 1)"),
    (0, b"QED\x00", "QED"),
    (0, b"vhdxfile", "VHDX"),
    (0, b"conectix", "VPC/VHD"),
    (0, b"LUKS\xba\xbe", "LUKS"),
    (0x40, b"\x7f\x10\xda\xbe", "VDI"),
)


@dataclasses.dataclass
class Target:
    """What to write: raw, or qcow2 as `spec` says (its size is the source's)."""

    format: str = "raw"
    spec: ImageSpec | None = None
    preallocation: str = "off"
    compress: bool = False


# -- sources ---------------------------------------------------------------


class Source(Protocol):
    virtual_size: int

    def paths(self) -> list[str]: ...

    async def status(self, guest_offset: int, length: int) -> Runs: ...

    async def read_into(self, guest_offset: int, view: memoryview) -> None: ...

    def close(self) -> None: ...


def _add(runs: Runs, data: bool, guest_offset: int, length: int) -> None:
    if length <= 0:
        return
    if runs and runs[-1][0] == data and runs[-1][1] + runs[-1][2] == guest_offset:
        runs[-1] = (data, runs[-1][1], runs[-1][2] + length)
    else:
        runs.append((data, guest_offset, length))


def _raw_status(fd: int, guest_offset: int, length: int, file_size: int, runs: Runs) -> None:
    """Data and holes of a raw file (SEEK_DATA/SEEK_HOLE), zeros past its end."""
    end = guest_offset + length
    pos = guest_offset
    in_file_end = min(end, file_size)
    while pos < in_file_end:
        try:
            data_at = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here on
                break
            _add(runs, True, pos, in_file_end - pos)  # no hole support: all data
            pos = in_file_end
            break
        data_at = min(data_at, in_file_end)
        _add(runs, False, pos, data_at - pos)
        if data_at >= in_file_end:
            pos = in_file_end
            break
        hole_at = min(os.lseek(fd, data_at, os.SEEK_HOLE), in_file_end)
        _add(runs, True, data_at, hole_at - data_at)
        pos = hole_at
    _add(runs, False, pos, end - pos)


async def _image_status(image: Qcow2Image | RawImage, guest_offset: int, length: int,
                        runs: Runs) -> None:
    """Which guest bytes of `image` (with its chain) may be non-zero."""
    if isinstance(image, RawImage):
        _raw_status(image.file.fd, guest_offset, length, image.virtual_size, runs)
        return
    for kind, offset, n, _where in await image._map(guest_offset, length):
        if kind == ZERO:
            _add(runs, False, offset, n)
        elif kind != BACKING:
            _add(runs, True, offset, n)
        elif image.backing is None:
            _add(runs, False, offset, n)
        else:
            backing = image.backing
            assert isinstance(backing, Qcow2Image | RawImage)
            inside = max(0, min(offset + n, backing.virtual_size) - offset)
            if inside:
                await _image_status(backing, offset, inside, runs)
            _add(runs, False, offset + inside, n - inside)


class Qcow2Source:
    """A qcow2 image and its backing chain, read-only."""

    def __init__(self, path: str) -> None:
        self.image = open_image(path, read_only=True)
        self.virtual_size = self.image.virtual_size

    def paths(self) -> list[str]:
        out = []
        image: object = self.image
        while image is not None:
            out.append(image.path)  # type: ignore[attr-defined]
            data_file = getattr(image, "data_file", None)
            if data_file is not None:
                out.append(data_file.path)
            image = getattr(image, "backing", None)
        return out

    async def status(self, guest_offset: int, length: int) -> Runs:
        runs: Runs = []
        await _image_status(self.image, guest_offset, length, runs)
        return runs

    async def read_into(self, guest_offset: int, view: memoryview) -> None:
        view[:] = await self.image.read(guest_offset, len(view))

    def close(self) -> None:
        self.image.close()


class RawSource:
    """A raw disk image; its size counts whole 512-byte sectors, as QEMU's does."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file = HostFile(path)
        try:
            self._lock = ImageLock.acquire(self.file.fd, path, write=False)
        except BaseException:
            self.file.close()
            raise
        self.file_size = self.file.size()
        self.virtual_size = -(-self.file_size // SECTOR) * SECTOR

    def paths(self) -> list[str]:
        return [self.path]

    async def status(self, guest_offset: int, length: int) -> Runs:
        runs: Runs = []
        _raw_status(self.file.fd, guest_offset, length, self.file_size, runs)
        return runs

    async def read_into(self, guest_offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(self.file.fd, [view[done:]], guest_offset + done)
            if not got:  # the end of the file, inside the last sector
                view[done:] = _ZEROS[:len(view) - done]
                break
            done += got

    def close(self) -> None:
        self._lock.release()
        self.file.close()


def open_source(path: str) -> Qcow2Source | RawSource:
    """The source by its content: qcow2 by magic, else a raw disk image.

    Other image formats are refused by their magic, and so is a file whose
    size is not a whole number of 512-byte sectors: no disk image has such
    a size, so it is not one (a text file, say), and copying it as raw
    would only hide the mistake.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(128)
            size = os.fstat(f.fileno()).st_size
            mode = os.fstat(f.fileno()).st_mode
    except OSError as exc:
        raise ImageError(path, exc.strerror or str(exc)) from None
    if head[:4] == MAGIC and head[4:8] != b"\x00\x00\x00\x01":
        return Qcow2Source(path)
    for offset, magic, name in _FOREIGN_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            raise ImageError(path, f"is a {name} image; qfuse converts qcow2 and raw images only")
    if stat.S_ISREG(mode) and size % SECTOR:
        raise ImageError(path, f"not a qcow2 image, nor a raw disk image: its size ({size} "
                         "bytes) is not a whole number of 512-byte sectors")
    return RawSource(path)


# -- destinations ----------------------------------------------------------


_ZEROS = memoryview(bytes(2 * 1024 * 1024))  # as much as one step
_zeros_of_size: dict[int, bytes] = {}


def _is_zero(data: bytearray, start: int, end: int) -> bool:
    """Whether data[start:end] is all zeros.

    Compares bytes with bytes (a memcmp): comparing memoryviews goes
    element by element, twenty times slower.
    """
    length = end - start
    zeros = _zeros_of_size.get(length)
    if zeros is None:
        zeros = bytes(length)
        if len(_zeros_of_size) < 64:
            _zeros_of_size[length] = zeros
    return data[start:end] == zeros


_ZERO_BLOCK = bytes(RAW_BLOCK)


def nonzero_spans(data: bytearray, start: int, end: int, phase: int) -> list[tuple[int, int]]:
    """The parts of data[start:end] to write: all but its all-zero blocks.

    Blocks are RAW_BLOCK bytes, aligned where ``index + phase`` is a
    multiple of RAW_BLOCK (so, in the file).  Zero blocks are found with
    `bytearray.find` of a zero block, which skips through data quickly,
    rather than by testing every block in Python.
    """
    spans: list[tuple[int, int]] = []

    def keep(a: int, b: int) -> None:
        if a < b:
            if spans and spans[-1][1] == a:
                spans[-1] = (spans[-1][0], b)
            else:
                spans.append((a, b))

    def align_up(i: int) -> int:
        return -(-(i + phase) // RAW_BLOCK) * RAW_BLOCK - phase

    head_end = min(end, align_up(start))
    if not _is_zero(data, start, head_end):
        keep(start, head_end)
    tail_start = max(head_end, align_up(end) - RAW_BLOCK if align_up(end) != end else end)
    pos = head_end  # everything before pos is decided
    search = head_end
    while pos < tail_start:
        hit = data.find(_ZERO_BLOCK, search, tail_start)
        block = align_up(hit) if hit >= 0 else tail_start
        if block + RAW_BLOCK > tail_start:
            keep(pos, tail_start)
            break
        candidate = data[block:block + RAW_BLOCK]
        if candidate != _ZERO_BLOCK:
            # That zero run ends inside the block: a zero run covering a
            # later block starts after the block's last non-zero byte.
            search = block + len(candidate.rstrip(b"\0"))
            continue
        zero_end = block + RAW_BLOCK
        while zero_end + RAW_BLOCK <= tail_start and \
                data[zero_end:zero_end + RAW_BLOCK] == _ZERO_BLOCK:
            zero_end += RAW_BLOCK
        keep(pos, block)
        pos = search = zero_end
    if not _is_zero(data, tail_start, end):
        keep(tail_start, end)
    return spans


class RawDest:
    """A sparse raw file: non-zero blocks only, then `ftruncate` to the size."""

    def __init__(self, fd: int, size: int, preallocation: str) -> None:
        self.fd = fd
        self.size = size
        self.cluster_size = RAW_BLOCK
        self.full = preallocation == "full"
        if preallocation == "falloc" and size:
            os.posix_fallocate(fd, 0, size)

    def write(self, guest_offset: int, data: bytearray | None, runs: Runs,
              length: int) -> None:
        if data is None:
            if self.full:
                pwrite_all(self.fd, guest_offset, _ZEROS[:length])
            return
        if self.full:
            pwrite_all(self.fd, guest_offset, data)
            return
        view = memoryview(data)
        for has_data, offset, n in runs:
            if has_data:
                start = offset - guest_offset
                for span_start, span_end in nonzero_spans(data, start, start + n,
                                                          guest_offset % RAW_BLOCK):
                    pwrite_all(self.fd, guest_offset + span_start, view[span_start:span_end])

    def finish(self) -> None:
        os.ftruncate(self.fd, self.size)


class Qcow2Dest:
    """A new qcow2 image streamed through an `ImageBuilder`."""

    def __init__(self, fd: int, spec: ImageSpec, preallocation: str, compress: bool,
                 workers: int) -> None:
        self.fd = fd
        self.spec = spec
        self.builder = ImageBuilder(fd, spec)
        self.cluster_size = spec.cluster_size
        self.preallocate = preallocation != "off"
        self.falloc = preallocation == "falloc"
        self.full = preallocation == "full"
        self.compress = compress
        self.step = 2 if spec.extended_l2 else 1
        self.l1_index = -1
        self.l2_offset = 0
        self.l2 = array("Q")
        self.workers = workers
        self.pool = ThreadPoolExecutor(max_workers=workers) if compress else None

    def _table_for(self, guest_cluster: int) -> array:
        l1_index = guest_cluster // self.spec.l2_entries
        if l1_index != self.l1_index:
            self._write_table()
            self.l1_index = l1_index
            self.l2_offset = self.builder.allocate_clusters(1)
            self.l2 = array("Q", bytes(self.cluster_size))
        return self.l2

    def _write_table(self) -> None:
        if self.l1_index >= 0:
            self.builder.write_l2(self.l1_index, self.l2_offset, self.l2)
            self.l1_index = -1

    def write(self, guest_offset: int, data: bytearray | None, runs: Runs,
              length: int) -> None:
        cs = self.cluster_size
        first = guest_offset // cs
        count = -(-length // cs)
        maybe = [False] * count
        for has_data, offset, n in runs:
            if has_data:
                for i in range((offset - guest_offset) // cs,
                               (offset + n - 1 - guest_offset) // cs + 1):
                    maybe[i] = True
        view = memoryview(data) if data is not None else _ZEROS
        clusters: list[tuple[int, memoryview | None]] = []
        for i in range(count):
            chunk: memoryview | None = None
            start, end = i * cs, min((i + 1) * cs, length)
            if maybe[i] and data is not None and not _is_zero(data, start, end):
                if end - start == cs:
                    chunk = view[start:end]
                else:  # the disk's last, partial cluster
                    chunk = memoryview(data[start:end] + bytes(cs - (end - start)))
            if chunk is not None or self.preallocate:
                clusters.append((first + i, chunk))
        if not clusters:
            return
        compressed: list[bytes | None] = [None] * len(clusters)
        if self.pool is not None:
            # One batch per worker: a future per small cluster costs more
            # than compressing it.
            per_batch = -(-len(clusters) // self.workers)
            batches = [clusters[i:i + per_batch] for i in range(0, len(clusters), per_batch)]
            compressed = [packed for batch in self.pool.map(self._compress, batches)
                          for packed in batch]
        for (guest_cluster, chunk), packed in zip(clusters, compressed, strict=True):
            self._store(guest_cluster, chunk, packed)
        self.builder.flush()  # the caller reuses `data`

    def _compress(self, batch: list[tuple[int, memoryview | None]]) -> list[bytes | None]:
        kind = self.spec.compression_type
        return [None if chunk is None else compress_cluster(kind, chunk) for _, chunk in batch]

    def _store(self, guest_cluster: int, chunk: memoryview | None, packed: bytes | None) -> None:
        table = self._table_for(guest_cluster)
        index = (guest_cluster % self.spec.l2_entries) * self.step
        builder = self.builder
        if packed is not None:
            host = builder.allocate_compressed(len(packed))
            builder.append(host, packed)
            table[index] = builder.compressed.encode(host, len(packed))
            return
        host = builder.allocate_clusters(1)
        if chunk is not None:
            builder.append(host, chunk)
        elif self.full:
            builder.append(host, _ZEROS[:self.cluster_size])  # a view: no copy
        table[index] = host | OFLAG_COPIED
        if self.step == 2 and chunk is not None:
            table[index + 1] = SUBCLUSTER_ALLOC_MASK

    def finish(self) -> None:
        self._write_table()
        self.builder.finish()
        if self.falloc:
            end = os.fstat(self.fd).st_size
            if end:
                os.posix_fallocate(self.fd, 0, end)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# -- the copy --------------------------------------------------------------


async def _copy(source: Source, dest: RawDest | Qcow2Dest, progress: Progress | None) -> None:
    """Chunk by chunk through one reused buffer (fresh buffers cost page faults)."""
    size = source.virtual_size
    chunk = max(CHUNK_BYTES, dest.cluster_size)
    buffer = bytearray(min(chunk, size))
    offset = 0
    while offset < size:
        length = min(chunk, size - offset)
        view = memoryview(buffer)[:length]
        runs = await source.status(offset, length)
        data: bytearray | None = None
        if any(has_data for has_data, _, _ in runs):
            for has_data, run_offset, n in runs:
                start = run_offset - offset
                if has_data:
                    await source.read_into(run_offset, view[start:start + n])
                else:
                    view[start:start + n] = _ZEROS[:n]
            data = buffer if length == len(buffer) else buffer[:length]
        dest.write(offset, data, runs, length)  # done with the buffer on return
        view.release()
        offset += length
        if progress is not None:
            progress(length, size)
    dest.finish()


def _check_dest(dest: str, source: Source) -> os.stat_result | None:
    """DEST may be replaced: not a source file, not a device, not in use."""
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ImageError(dest, exc.strerror or str(exc)) from None
    for path in source.paths():
        try:
            if os.path.samefile(path, dest):
                raise ImageError(dest, "is the source image (or in its backing chain)")
        except OSError:
            continue
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(dest, "exists and is not a regular file; qfuse convert writes "
                         "regular files only")
    return st


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def convert(source_path: str, dest: str, target: Target, *,
            progress: Progress | None = None, workers: int | None = None) -> None:
    """Convert `source_path` into `dest` (replaced only on success).

    A symbolic link as DEST is followed, as writing through it would: the
    file it names is replaced, the link stays.
    """
    if os.path.islink(dest):
        dest = os.path.realpath(dest)
    source = open_source(source_path)
    try:
        existing = _check_dest(dest, source)
        spec = None
        if target.format == "qcow2":
            assert target.spec is not None
            spec = dataclasses.replace(target.spec, virtual_size=source.virtual_size)
            try:
                check_spec(spec)
            except FormatError as exc:
                raise ImageError(dest, str(exc)) from None
        lock = None
        if existing is not None:
            with open(dest, "rb") as f:  # in use by a mount or QEMU? then hands off
                lock = ImageLock.acquire(f.fileno(), dest, write=True)
                lock.release()
        directory = os.path.dirname(os.path.abspath(dest))
        try:
            fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(dest)}.",
                                        suffix=".qfuse-tmp")
        except OSError as exc:
            raise ImageError(dest, exc.strerror or str(exc)) from None
        try:
            _write(fd, source, spec, target, progress, workers or os.cpu_count() or 1)
            os.fchmod(fd, existing.st_mode & 0o7777 if existing is not None
                      else 0o666 & ~_umask())
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.rename(temp, dest)
        except BaseException as exc:
            if fd >= 0:
                os.close(fd)
            os.unlink(temp)
            if isinstance(exc, OSError):
                raise ImageError(dest, exc.strerror or str(exc)) from None
            raise
        _sync_directory(directory)
    finally:
        source.close()


def _write(fd: int, source: Source, spec: ImageSpec | None, target: Target,
           progress: Progress | None, workers: int) -> None:
    dest: RawDest | Qcow2Dest
    if spec is not None:
        dest = Qcow2Dest(fd, spec, target.preallocation, target.compress, workers)
    else:
        dest = RawDest(fd, source.virtual_size, target.preallocation)
    try:
        trio.run(_copy, source, dest, progress)
    finally:
        if isinstance(dest, Qcow2Dest):
            dest.close()


def _sync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
