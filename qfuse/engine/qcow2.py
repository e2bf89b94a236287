"""A qcow2 image: guest→host translation in runs, and reads.

Contract of `_map` (the translation function): for the guest range
[guest_offset, guest_offset+length), which must lie inside the virtual size,
return a list of runs ``[kind, guest_offset, length, where]`` that cover the
range in order, where adjacent runs of one kind are merged when they can be
served by one operation: DATA runs only when their host ranges are
contiguous; COMPRESSED runs never (``where`` is then the raw L2 entry).  For
DATA ``where`` is the host offset in the data file (the image itself unless
it has an external data file).  `_map` awaits only for L2 table loads, and
raises `MetadataCorruption` for an entry that breaks the spec.

Concurrency: every method runs on the trio event loop; nothing here holds a
lock, because reads change no shared state but caches (see docs/concurrency.md).
"""

from __future__ import annotations

import errno
import logging
import os
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from qfuse.engine import metadata as meta_mod
from qfuse.engine.compression import DecompressionError, decompress_cluster
from qfuse.engine.hostfile import CacheMode, HostFile
from qfuse.engine.locking import ImageLock
from qfuse.engine.refcheck import rebuild_refcounts
from qfuse.engine.runs import BACKING, COMPRESSED, DATA, ZERO
from qfuse.engine.tablecache import TableCache
from qfuse.engine.writer import Writer
from qfuse.errors import FormatError, ImageError, MetadataCorruption
from qfuse.format.entries import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SUBCLUSTER_ALLOC_MASK,
    SUBCLUSTERS_PER_CLUSTER,
    CompressedLayout,
    decode_table,
    l2_entries_per_table,
)
from qfuse.format.header import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
)

log = logging.getLogger(__name__)


DEFAULT_L2_CACHE_MAX = 32 * 1024 * 1024  # QEMU's default cap on Linux
MIN_L2_TABLES = 2
DECOMPRESSED_CACHE_BYTES = 8 * 1024 * 1024
INCOMPATIBLE_FEATURES_FIELD = 72


@dataclass(frozen=True)
class SnapshotInfo:
    id: str
    name: str
    virtual_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int


class Qcow2Image:
    """An open qcow2 image (the active layer, or one internal snapshot)."""

    format = "qcow2"

    def __init__(self, path: str, *, cache: CacheMode = CacheMode.WRITEBACK,
                 read_only: bool = True, snapshot: str | None = None,
                 l2_cache_size: int | None = None,
                 parent: Qcow2Image | None = None) -> None:
        self.path = path
        self.cache = cache
        self.backing: Qcow2Image | object | None = None
        self.writer: Writer | None = None
        self._locks: list[ImageLock] = []
        # A snapshot view of an open image shares its files (and so its
        # locks: a second descriptor would conflict with the first).
        self._parent = parent
        self.data_file: HostFile | None = None
        if parent is not None:
            self.file = parent.file
            self.backing = parent.backing
            self.data_file = parent.data_file
            writable = False
        else:
            writable = not read_only and snapshot is None
            self.file = HostFile(path, writable=writable, cache=cache)
        try:
            if parent is None:
                # QEMU takes its locks right after opening, before reading.
                self._locks.append(ImageLock.acquire(self.file.fd, path, write=writable))
            self._open(read_only, snapshot, l2_cache_size)
        except FormatError as exc:
            self.close()
            raise ImageError(path, str(exc)) from None
        except BaseException:
            self.close()
            raise

    def snapshot_view(self, snapshot: str, l2_cache_size: int | None = None) -> Qcow2Image:
        """A read-only view of one internal snapshot, sharing this image's files."""
        return Qcow2Image(self.path, cache=self.cache, read_only=True, snapshot=snapshot,
                          l2_cache_size=l2_cache_size, parent=self)

    def _open(self, read_only: bool, snapshot: str | None, l2_cache_size: int | None) -> None:
        meta = meta_mod.read_metadata(self.file)
        self.meta = meta
        header = meta.header
        self.header = header
        if header.incompatible_features & INCOMPAT_CORRUPT and not read_only:
            raise ImageError(self.path, "image is marked corrupt: mount it read-only "
                             "(--read-only) or repair it with 'qemu-img check -r all'")
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.extended_l2 = header.extended_l2
        self.l2_entries = l2_entries_per_table(header.cluster_bits, header.extended_l2)
        self.l2_bits = self.l2_entries.bit_length() - 1
        self.subcluster_bits = header.cluster_bits - (5 if header.extended_l2 else 0)
        self.compressed = CompressedLayout(header.cluster_bits)
        self.compression_type = header.compression_type
        self.backing_name = meta.backing_name
        self.backing_format = meta.extensions.backing_format
        self.snapshots = [
            SnapshotInfo(s.id, s.name, s.disk_size if s.disk_size is not None else header.size,
                         s.date_sec, s.date_nsec, s.vm_clock_nsec, s.vm_state_size)
            for s in meta.snapshots
        ]
        self.snapshot: SnapshotInfo | None = None
        if snapshot is None:
            self.read_only = read_only
            self.virtual_size = header.size
            l1_offset, l1_size = header.l1_table_offset, header.l1_size
        else:
            index = self._find_snapshot(snapshot)
            entry = meta.snapshots[index]
            self.snapshot = self.snapshots[index]
            self.read_only = True
            self.virtual_size = self.snapshot.virtual_size
            l1_offset, l1_size = entry.l1_table_offset, entry.l1_size
        self.l1 = meta_mod.read_l1(self.file, l1_offset, l1_size)
        self.l1_size = l1_size
        if header.has_data_file and self._parent is None:
            assert meta.extensions.data_file is not None
            data_path = resolve_relative(self.path, meta.extensions.data_file)
            data_writable = not self.read_only
            try:
                self.data_file = HostFile(data_path, writable=data_writable, cache=self.cache)
                self._locks.append(ImageLock.acquire(self.data_file.fd, data_path,
                                                     write=data_writable, data_file=True))
            except ImageError as exc:
                raise ImageError(self.path, f"external data file {exc}") from None
        self.data_host = self.data_file if self.data_file is not None else self.file
        table_bytes = self.cluster_size
        wanted = l2_cache_size if l2_cache_size is not None else DEFAULT_L2_CACHE_MAX
        bytes_per_table = self.cluster_size << self.l2_bits
        tables_for_whole_image = max(1, -(-self.virtual_size // bytes_per_table))
        tables = wanted // table_bytes
        if l2_cache_size is None:
            tables = min(tables, tables_for_whole_image)
        # Memory is bounded by what maps the whole image, whatever was asked.
        tables = max(MIN_L2_TABLES, min(tables, tables_for_whole_image))
        self.l2_cache = TableCache(tables, self._load_l2_table)
        self._decompressed: OrderedDict[int, bytes] = OrderedDict()
        self._decompressed_capacity = max(2, DECOMPRESSED_CACHE_BYTES // self.cluster_size)
        if not self.read_only and self.dirty:
            self._repair_dirty()
        self.guest_data_bytes = self._count_guest_data()
        self.bytes_read = 0
        self.read_requests = 0
        if not self.read_only:
            self.writer = Writer(self)

    def _repair_dirty(self) -> None:
        """A writable open of a dirty image: refcounts first (spec, bit 0)."""
        log.warning("%s: image is dirty (not closed cleanly with lazy refcounts); "
                    "rebuilding refcounts", self.path)

        def barrier() -> None:
            if self.cache.honours_flush and not self.cache.write_through:
                self.file.datasync()

        rebuild_refcounts(self.file, self.meta, barrier)
        header = self.header
        header.incompatible_features &= ~INCOMPAT_DIRTY
        self.file.pwrite_sync(INCOMPATIBLE_FEATURES_FIELD,
                              header.incompatible_features.to_bytes(8, "big"))
        barrier()

    def _find_snapshot(self, wanted: str) -> int:
        """QEMU's rule: an ID matches first, then a name."""
        for i, snap in enumerate(self.meta.snapshots):
            if snap.id == wanted:
                return i
        for i, snap in enumerate(self.meta.snapshots):
            if snap.name == wanted:
                return i
        raise ImageError(self.path, f"no snapshot with ID or name {wanted!r}")

    # -- facts for the FUSE front and `info` ---------------------------------

    @property
    def dirty(self) -> bool:
        return bool(self.header.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.header.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.header.compatible_features & COMPAT_LAZY_REFCOUNTS)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    @property
    def compression_name(self) -> str:
        return COMPRESSION_NAMES[self.compression_type]

    def allocated_bytes(self) -> int:
        """Guest data this image holds, as `du` should show it.

        The clusters that hold data here (a compressed one by its compressed
        size), but never more than the host files really use: a
        metadata-preallocated image maps clusters the file keeps as holes.
        """
        host_used = self.file.stat().st_blocks * 512
        if self.data_file is not None:
            host_used += self.data_file.stat().st_blocks * 512
        return min(self.guest_data_bytes, host_used)

    def statistics(self) -> dict[str, object]:
        stats: dict[str, object] = {
            "l2_cache": self.l2_cache.statistics(),
            "read_requests": self.read_requests,
            "bytes_read": self.bytes_read,
            "cache_mode": self.cache.value,
        }
        if self.writer is not None:
            stats.update(self.writer.statistics())
        return stats

    # -- tables ------------------------------------------------------------

    async def _load_l2_table(self, host_offset: int) -> array:
        data = await self.file.pread(host_offset, self.cluster_size)
        if len(data) < self.cluster_size:
            raise MetadataCorruption(self.path, f"L2 table at host offset 0x{host_offset:x}",
                                     "lies past the end of the file")
        return decode_table(data)

    def _l2_offset(self, l1_index: int) -> int:
        """Host offset of the L2 table for `l1_index`, 0 when unallocated."""
        if l1_index >= self.l1_size:
            return 0  # beyond the L1 table: unallocated, not an error
        l2_offset = self.l1[l1_index] & L1E_OFFSET_MASK
        if l2_offset & (self.cluster_size - 1):
            raise MetadataCorruption(self.path, f"L1 table entry {l1_index}",
                                     f"L2 table offset 0x{l2_offset:x} is not cluster-aligned")
        return l2_offset

    def _count_guest_data(self) -> int:
        """Bytes of guest data mapped by this image's L2 tables (cold path)."""
        total = 0
        cluster_size = self.cluster_size
        subcluster_size = 1 << self.subcluster_bits
        seen: set[int] = set()
        for l1_index in range(self.l1_size):
            try:
                l2_offset = self._l2_offset(l1_index)
            except MetadataCorruption:
                continue  # reported when read
            if not l2_offset or l2_offset in seen:
                continue
            seen.add(l2_offset)
            data = self.file.pread_sync(l2_offset, cluster_size)
            if len(data) < cluster_size:
                continue
            table = decode_table(data)
            step = 2 if self.extended_l2 else 1
            for i in range(0, len(table), step):
                entry = table[i]
                if not entry:
                    continue
                if entry & OFLAG_COMPRESSED:
                    total += self.compressed.decode(entry)[1]
                elif self.extended_l2:
                    total += (table[i + 1] & SUBCLUSTER_ALLOC_MASK).bit_count() * subcluster_size
                elif not entry & OFLAG_ZERO and (
                    entry & L2E_OFFSET_MASK or (self.data_file is not None and entry & OFLAG_COPIED)
                ):
                    total += cluster_size
        return total

    # -- translation ---------------------------------------------------------

    def corrupt_entry(self, l2_offset: int, index: int, reason: str) -> MetadataCorruption:
        return MetadataCorruption(
            self.path, f"L2 table at host offset 0x{l2_offset:x}, entry {index}", reason
        )

    async def map_range(self, guest_offset: int, length: int) -> list[list[int]]:
        """The runs of [guest_offset, guest_offset+length): see the module docstring."""
        return await self._map(guest_offset, length)

    async def _map(self, guest_offset: int, length: int) -> list[list[int]]:
        runs: list[list[int]] = []
        pos = guest_offset
        end = guest_offset + length
        l2_shift = self.cluster_bits + self.l2_bits
        while pos < end:
            l1_index = pos >> l2_shift
            span_end = min(end, (l1_index + 1) << l2_shift)
            l2_offset = self._l2_offset(l1_index)
            if not l2_offset:
                _append(runs, BACKING, pos, span_end - pos, 0)
            else:
                table = await self.l2_cache.get(l2_offset)
                if self.extended_l2:
                    self._map_extended(table, l2_offset, pos, span_end, runs)
                else:
                    self._map_standard(table, l2_offset, pos, span_end, runs)
            pos = span_end
        return runs

    def _map_standard(self, table: array, l2_offset: int, pos: int, end: int,
                      runs: list[list[int]]) -> None:
        cluster_mask = self.cluster_size - 1
        index = (pos >> self.cluster_bits) & (self.l2_entries - 1)
        external = self.data_file is not None
        while pos < end:
            entry = table[index]
            n = min((pos | cluster_mask) + 1, end) - pos
            if entry & OFLAG_COMPRESSED:
                if external:
                    raise self.corrupt_entry(l2_offset, index, "compressed cluster in an "
                                              "image with an external data file")
                runs.append([COMPRESSED, pos, n, entry])
            else:
                host = entry & L2E_OFFSET_MASK
                if host & cluster_mask:
                    raise self.corrupt_entry(l2_offset, index,
                                              f"host offset 0x{host:x} is not cluster-aligned")
                if entry & OFLAG_ZERO:
                    _append(runs, ZERO, pos, n, 0)
                elif host or (external and entry & OFLAG_COPIED):
                    _append(runs, DATA, pos, n, host + (pos & cluster_mask))
                else:
                    _append(runs, BACKING, pos, n, 0)
            pos += n
            index += 1

    def _map_extended(self, table: array, l2_offset: int, pos: int, end: int,
                      runs: list[list[int]]) -> None:
        cluster_mask = self.cluster_size - 1
        sc_bits = self.subcluster_bits
        index = (pos >> self.cluster_bits) & (self.l2_entries - 1)
        external = self.data_file is not None
        while pos < end:
            entry = table[2 * index]
            bitmap = table[2 * index + 1]
            cluster_end = min((pos | cluster_mask) + 1, end)
            if entry & OFLAG_COMPRESSED:
                if external:
                    raise self.corrupt_entry(l2_offset, index, "compressed cluster in an "
                                              "image with an external data file")
                runs.append([COMPRESSED, pos, cluster_end - pos, entry])
                pos = cluster_end
                index += 1
                continue
            host = entry & L2E_OFFSET_MASK
            alloc = bitmap & SUBCLUSTER_ALLOC_MASK
            zero = bitmap >> SUBCLUSTERS_PER_CLUSTER
            if alloc & zero:
                raise self.corrupt_entry(l2_offset, index,
                                          "a subcluster is both allocated and zero")
            if host & cluster_mask:
                raise self.corrupt_entry(l2_offset, index,
                                          f"host offset 0x{host:x} is not cluster-aligned")
            if alloc and not (host or (external and entry & OFLAG_COPIED)):
                raise self.corrupt_entry(l2_offset, index,
                                          "allocated subclusters without a host cluster")
            while pos < cluster_end:
                sc_end = min(((pos >> sc_bits) + 1) << sc_bits, cluster_end)
                bit = 1 << ((pos & cluster_mask) >> sc_bits)
                if alloc & bit:
                    _append(runs, DATA, pos, sc_end - pos, host + (pos & cluster_mask))
                elif zero & bit:
                    _append(runs, ZERO, pos, sc_end - pos, 0)
                else:
                    _append(runs, BACKING, pos, sc_end - pos, 0)
                pos = sc_end
            index += 1

    # -- reading ------------------------------------------------------------

    async def read(self, guest_offset: int, length: int) -> bytes:
        """Guest bytes at `guest_offset`; short only at the end of the disk."""
        if guest_offset >= self.virtual_size or length <= 0:
            return b""
        length = min(length, self.virtual_size - guest_offset)
        self.read_requests += 1
        self.bytes_read += length
        data = self._read_cached_cluster(guest_offset, length)
        if data is not None:
            return data
        try:
            return await self.read_guest(guest_offset, length)
        except MetadataCorruption as exc:
            if self.writer is not None:
                await self.writer.mark_corrupt(str(exc))
            raise

    def _read_cached_cluster(self, guest_offset: int, length: int) -> bytes | None:
        """The common small read, without one `await`: inside one cluster,
        its L2 table cached, plain data, a page-cache host file (or O_DIRECT
        with no other request waiting).  None when any of that does not
        hold; `read_guest` then does the general work.

        Every `await` of a coroutine costs on the per-request path, and a
        4 KiB random read is mostly per-request cost (PERF-NOTES).
        """
        cluster_bits = self.cluster_bits
        if (guest_offset ^ (guest_offset + length - 1)) >> cluster_bits:
            return None
        l1_index = guest_offset >> (cluster_bits + self.l2_bits)
        if l1_index >= self.l1_size:
            return None
        l2_offset = self.l1[l1_index] & L1E_OFFSET_MASK
        cluster_mask = self.cluster_size - 1
        if not l2_offset or l2_offset & cluster_mask:
            return None
        table = self.l2_cache.peek(l2_offset)
        if table is None:
            return None
        index = (guest_offset >> cluster_bits) & (self.l2_entries - 1)
        if self.extended_l2:
            if table[2 * index + 1] != SUBCLUSTER_ALLOC_MASK:  # all allocated, none zero
                return None
            entry = table[2 * index]
        else:
            entry = table[index]
        host = entry & L2E_OFFSET_MASK
        if entry & (OFLAG_COMPRESSED | OFLAG_ZERO) or not host or host & cluster_mask:
            return None
        data_host = self.data_host
        if data_host.alignment == 1:
            data = os.pread(data_host.fd, length, host + (guest_offset & cluster_mask))
        else:
            direct = data_host.pread_direct_now(host + (guest_offset & cluster_mask), length)
            if direct is None:
                return None
            data = direct
        return data if len(data) == length else None

    async def read_guest(self, guest_offset: int, length: int) -> bytes:
        """`read` for a range inside the disk, without counting it."""
        runs = await self._map(guest_offset, length)
        if len(runs) == 1:
            return await self._read_run(*runs[0])
        return b"".join([await self._read_run(*run) for run in runs])

    async def _read_run(self, kind: int, guest_offset: int, length: int, where: int) -> bytes:
        if kind == DATA:
            data = await self.data_host.pread(where, length)
        elif kind == ZERO:
            return bytes(length)
        elif kind == BACKING:
            if self.backing is None:
                return bytes(length)
            data = await self.backing.read(guest_offset, length)  # type: ignore[attr-defined]
        else:
            cluster = await self._compressed_cluster(where, guest_offset)
            start = guest_offset & (self.cluster_size - 1)
            return cluster[start:start + length]
        if len(data) < length:
            # Past the end of a host file (or a smaller backing file): zeros.
            data += bytes(length - len(data))
        return data

    async def _compressed_cluster(self, entry: int, guest_offset: int) -> bytes:
        cached = self._decompressed.get(entry)
        if cached is not None:
            self._decompressed.move_to_end(entry)
            return cached
        host_offset, length = self.compressed.decode(entry)
        raw = await self.file.pread(host_offset, length)
        try:
            cluster = decompress_cluster(self.compression_type, raw, self.cluster_size)
        except DecompressionError as exc:
            index = (guest_offset >> self.cluster_bits) & (self.l2_entries - 1)
            l1_index = guest_offset >> (self.cluster_bits + self.l2_bits)
            raise MetadataCorruption(
                self.path,
                f"compressed cluster (L1 entry {l1_index}, L2 entry {index}, "
                f"host offset 0x{host_offset:x})",
                str(exc),
            ) from None
        self._decompressed[entry] = cluster
        if len(self._decompressed) > self._decompressed_capacity:
            self._decompressed.popitem(last=False)
        return cluster

    # -- writing ------------------------------------------------------------

    async def write(self, guest_offset: int, data: bytes) -> int:
        """Write guest bytes; the caller keeps them inside the virtual size."""
        if self.writer is None or self.read_only:
            raise OSError(errno.EROFS, "the image is open read-only")
        try:
            return await self.writer.write(guest_offset, data)
        except MetadataCorruption as exc:
            await self.writer.mark_corrupt(str(exc))
            raise

    async def flush(self) -> None:
        """fsync of the view: durable as the cache mode promises."""
        if self.writer is not None:
            await self.writer.flush()

    async def shutdown(self) -> None:
        """Before close at unmount: all data and metadata reach the image."""
        if self.writer is not None:
            await self.writer.shutdown()

    def close(self) -> None:
        if self._parent is not None:
            return  # the files are the parent's
        if self.backing is not None:
            self.backing.close()  # type: ignore[attr-defined]
            self.backing = None
        if self.data_file is not None:
            self.data_file.close()
            self.data_file = None
        for lock in self._locks:
            lock.release()
        self._locks = []
        self.file.close()


def _append(runs: list[list[int]], kind: int, guest_offset: int, length: int, where: int) -> None:
    """Add a run, merging it into the last one when one operation can serve both."""
    if runs:
        last = runs[-1]
        if last[0] == kind and (kind != DATA or last[3] + last[2] == where):
            last[2] += length
            return
    runs.append([kind, guest_offset, length, where])


def resolve_relative(image_path: str, name: str) -> str:
    """A file name recorded in an image, relative to that image's directory."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), name)
