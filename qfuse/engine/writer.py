"""The write path of a qcow2 image: allocation, copy-on-write, write-back.

Ordering (QEMU's rule: an on-disk refcount may be too high, never too low):

1. a new cluster's refcount is raised in the (cached) refcount block;
2. guest data, with any copy-on-write head and tail, is written to it;
3. the L2 entry is changed in the cached L2 table;
4. at write-back: dirty refcount blocks, a barrier, dirty L2 tables, and,
   if new L2 tables were made, a barrier and the L1 entries pointing at
   them; then a barrier, and only then the refcount decrements of clusters
   the L2 tables no longer reference (`pending_frees`).

Steps 1-3 happen in memory in any order that has no `await` between them
(`_allocate_now` writes the data first); what reaches the file, and when,
is decided by write-back alone.  New cluster data is always written before
that barrier, so it is on disk before an L2 entry pointing at it; when its
refcount reached the file earlier (a write-back in between, while the data
write was under way), `_unsynced_data` still asks for the barrier.

A new L2 table is made in the cache (dirty) and its L1 entry changes in
memory; both reach the file at the next write-back, table first.  So a
crash at any instant leaves at most leaked clusters.
A *barrier* is `fdatasync` in `writeback` and `none`; in `writethrough` and
`directsync` every write is already durable (O_DSYNC); `unsafe` has none.

Concurrency (docs/concurrency.md): `RangeLocks` serialize writes that touch
one guest cluster; `metadata_lock` guards the refcounts, the L1 table, L2
entry changes, `pending_frees` and write-back, and is held only around
metadata work, never around a guest data write.
"""

from __future__ import annotations

import errno
import logging
import struct
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from qfuse.engine.hostfile import CacheMode
from qfuse.engine.overlap import MetadataMap
from qfuse.engine.rangelock import Held, RangeLocks
from qfuse.engine.refcounts import Refcounts
from qfuse.engine.runs import BACKING, ZERO
from qfuse.errors import MetadataCorruption
from qfuse.format.entries import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SUBCLUSTER_ALLOC_MASK,
    SUBCLUSTERS_PER_CLUSTER,
    decode_table,
    encode_table,
)
from qfuse.format.header import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
)

if TYPE_CHECKING:
    from qfuse.engine.qcow2 import Qcow2Image

log = logging.getLogger(__name__)

INCOMPATIBLE_FIELD = 72
AUTOCLEAR_FIELD = 88
ALL_SUBCLUSTERS = SUBCLUSTER_ALLOC_MASK


@dataclass
class _NewCluster:
    """One guest cluster of a write that needs a new host cluster."""

    index: int  # in its L2 table
    cluster_start: int  # guest offset of the cluster
    write_start: int  # guest range this request writes into it
    write_end: int
    data: memoryview


class Writer:
    """Everything that changes the image; one per writable `Qcow2Image`."""

    def __init__(self, image: Qcow2Image) -> None:
        self.image = image
        self.file = image.file
        self.cache = image.cache
        self.write_through = image.cache.write_through
        self.header = image.header
        self.cluster_bits = image.cluster_bits
        self.cluster_size = image.cluster_size
        self.external = image.data_file is not None
        self.metadata_lock = trio.Lock()
        self.ranges = RangeLocks()
        self.metadata = MetadataMap(image.cluster_bits)
        self.refcounts = Refcounts(
            self.file, cluster_bits=image.cluster_bits,
            refcount_order=self.header.refcount_order,
            reftable_offset=self.header.refcount_table_offset,
            reftable_clusters=self.header.refcount_table_clusters,
            cache_tables=max(4, image.l2_cache.capacity // 4),
            barrier=self.barrier, metadata=self.metadata, overlap=self._overlap)
        self._map_metadata()
        self.pending_frees: list[tuple[int, int]] = []
        self.lazy = bool(self.header.compatible_features & COMPAT_LAZY_REFCOUNTS) \
            and self.header.version >= 3
        self._prepared = False
        self._marked_dirty = False
        # New-cluster data written since the last barrier began: the next
        # write-back puts a barrier before the L2 tables that point at it.
        self._unsynced_data = False
        # L1 entries changed in memory (new L2 tables) but not yet written.
        self._dirty_l1: set[int] = set()
        self.failure: str | None = None
        self.flushes = 0
        self.bytes_written = 0
        self.write_requests = 0

    # -- where the metadata is --------------------------------------------------

    def _map_metadata(self) -> None:
        """Fill the overlap map from the header, tables and snapshots (cold path)."""
        image, header, meta = self.image, self.header, self.image.meta
        cs = self.cluster_size
        add = self.metadata.add
        add(0, cs, "header")
        add(header.l1_table_offset, header.l1_size * 8, "active L1 table")
        self._map_l2_tables(image.l1, "L2 table")
        add(header.refcount_table_offset, header.refcount_table_clusters * cs, "refcount table")
        for offset in self.refcounts.block_offsets():
            add(offset, cs, "refcount block")
        if header.nb_snapshots:
            add(header.snapshots_offset, meta.snapshot_table_size, "snapshot table")
        for snap in meta.snapshots:
            add(snap.l1_table_offset, snap.l1_size * 8, "snapshot L1 table")
            if snap.l1_size:
                l1 = decode_table(self.file.pread_sync(snap.l1_table_offset, snap.l1_size * 8))
                self._map_l2_tables(l1, "snapshot L2 table")
        if meta.extensions.bitmaps is not None:
            bitmaps = meta.extensions.bitmaps
            add(bitmaps.bitmap_directory_offset, bitmaps.bitmap_directory_size,
                "bitmap directory")

    def _map_l2_tables(self, l1: array, what: str) -> None:
        for entry in l1:
            offset = entry & L1E_OFFSET_MASK
            if offset:
                self.metadata.add(offset, self.cluster_size, what)

    # -- durability ----------------------------------------------------------------

    async def barrier(self) -> None:
        """Order earlier writes before later ones across a power loss."""
        if self.cache in (CacheMode.WRITEBACK, CacheMode.NONE):
            # Cleared before the sync starts: data written meanwhile sets it again.
            self._unsynced_data = False
            await self.file.datasync_async()

    async def _write_header_field(self, offset: int, value: int) -> None:
        await self.file.pwrite(offset, struct.pack(">Q", value))
        await self.barrier()

    async def _prepare(self) -> None:
        """Before the first write: header bits the spec wants changed first."""
        async with Held(self.metadata_lock):
            if self._prepared:
                return
            header = self.header
            if header.version >= 3:
                # Unknown autoclear bits, and the bitmaps bit (qfuse does not
                # keep persistent bitmaps up to date), must go before a write.
                keep = header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW
                if keep != header.autoclear_features:
                    await self._write_header_field(AUTOCLEAR_FIELD, keep)
                    header.autoclear_features = keep
            self._prepared = True

    async def _set_incompatible(self, bits: int, on: bool) -> None:
        header = self.header
        value = header.incompatible_features | bits if on else \
            header.incompatible_features & ~bits
        if value != header.incompatible_features and header.version >= 3:
            await self._write_header_field(INCOMPATIBLE_FIELD, value)
            header.incompatible_features = value

    # -- failure latch -----------------------------------------------------------

    async def _overlap(self, what: str, host_offset: int) -> None:
        """A write would hit metadata: mark corrupt, go read-only, fail with EIO."""
        await self.mark_corrupt(f"write at host offset 0x{host_offset:x} would overwrite {what}")
        raise OSError(errno.EIO, self.failure)

    async def mark_corrupt(self, reason: str) -> None:
        """Metadata is damaged: report it once, set the corrupt bit (so QEMU
        too refuses to write until it is repaired), and stop writing."""
        if self.failure is not None:
            return
        self.failure = reason
        log.error("%s: %s; image marked corrupt, mount is now read-only",
                  self.image.path, reason)
        self.image.read_only = True
        try:
            await self._set_incompatible(INCOMPAT_CORRUPT, True)
        except OSError as exc:
            log.error("%s: could not set the corrupt bit: %s", self.image.path, exc)

    async def _check_overlap(self, host_offset: int, length: int) -> None:
        if not self.external:
            hit = self.metadata.hit(host_offset, length)
            if hit is not None:
                await self._overlap(hit, host_offset)

    def _check_writable(self) -> None:
        if self.failure is not None:
            raise OSError(errno.EROFS, self.failure)

    # -- the write request ---------------------------------------------------------

    async def write(self, guest_offset: int, data: bytes) -> int:
        self._check_writable()
        if not self._prepared:
            await self._prepare()
        image = self.image
        if not self._write_now(guest_offset, data):
            mask = self.cluster_size - 1
            end = guest_offset + len(data)
            l2_shift = self.cluster_bits + image.l2_bits
            view = memoryview(data)
            async with self.ranges.locked(guest_offset & ~mask, (end + mask) & ~mask):
                pos = guest_offset
                while pos < end:
                    l1_index = pos >> l2_shift
                    span_end = min(end, (l1_index + 1) << l2_shift)
                    await self._write_span(l1_index, pos,
                                           view[pos - guest_offset:span_end - guest_offset])
                    pos = span_end
        self.write_requests += 1
        self.bytes_written += len(data)
        if self.write_through:
            if image.l2_cache.dirty_count or self.refcounts.blocks.dirty_count \
                    or self.pending_frees or self._dirty_l1:
                await self.write_back()
        elif image.l2_cache.needs_writeback() or self.refcounts.blocks.needs_writeback():
            await self.write_back()
        return len(data)

    def _write_now(self, guest_offset: int, data: bytes) -> bool:
        """The two common small writes, without one `await`.  Both lie inside
        one cluster whose L2 table is this image's own and cached, with no
        other write holding that cluster, and the host write can be done at
        once (`HostFile.write_now`: a page-cache image file, or O_DIRECT for
        whole alignment blocks while no other request waits; an alignment
        block never spans two clusters here, so no other write shares it):

        * an overwrite of a cluster this image owns (COPIED, not zero, not
          compressed, every subcluster allocated): one `pwrite` in place;
        * a write into a cluster with no host cluster that reads as zeros:
          `_allocate_now`.

        False when neither applies, and nothing was done."""
        image = self.image
        cluster_bits = self.cluster_bits
        end = guest_offset + len(data)
        if not data or (guest_offset ^ (end - 1)) >> cluster_bits or self.external \
                or self.file.alignment > self.cluster_size:
            return False
        l1_entry = image.l1[guest_offset >> (cluster_bits + image.l2_bits)]
        if not l1_entry & OFLAG_COPIED:
            return False
        l2_offset = l1_entry & L1E_OFFSET_MASK
        table = image.l2_cache.peek(l2_offset)
        if table is None:
            return False
        cs = self.cluster_size
        cluster_start = guest_offset & ~(cs - 1)
        if not self.ranges.is_free(cluster_start, cluster_start + cs):
            return False
        index = (guest_offset >> cluster_bits) & (image.l2_entries - 1)
        if image.extended_l2:
            if table[2 * index + 1] != ALL_SUBCLUSTERS:
                return False
            entry = table[2 * index]
        else:
            entry = table[index]
        host = entry & L2E_OFFSET_MASK
        if not host:
            return not image.extended_l2 and \
                self._allocate_now(table, l2_offset, index, entry, cluster_start,
                                   guest_offset, data)
        if entry & (OFLAG_COMPRESSED | OFLAG_ZERO) or not entry & OFLAG_COPIED \
                or host & (cs - 1):
            return False
        target = host + (guest_offset - cluster_start)
        if self.metadata.hit(target, len(data)) is not None:
            return False  # the general path reports it
        return self.file.write_now(target, [data])

    def _allocate_now(self, table: array, l2_offset: int, index: int, entry: int,
                      cluster_start: int, guest_offset: int, data: bytes) -> bool:
        """`_write_now` into a standard L2 entry with no host cluster: when
        the cluster reads as zeros (an unallocated entry in an image without
        a backing file, a zero cluster, or a write of the whole cluster),
        no write-back is under way (`metadata_lock` free), and the cached
        refcount block at the allocator's hint has a free cluster.

        The guest bytes go to that new host cluster, then its refcount and
        the L2 entry change in the cached tables: write-back orders them on
        disk as for any other write (module docstring).  Past the end of the
        file the rest of the cluster reads as zeros already and is not
        written.  False when any of that does not hold, and nothing was done.
        """
        size = len(data)
        cs = self.cluster_size
        if entry & ~OFLAG_ZERO or self.metadata_lock.locked() \
                or (not entry and self.image.backing is not None and size != cs):
            return False
        refcounts = self.refcounts
        cluster_index = refcounts.free_cluster_now()
        if cluster_index < 0:
            return False
        host = cluster_index << self.cluster_bits
        if self.metadata.hit(host, cs) is not None:
            return False  # the general path reports it
        at = guest_offset - cluster_start
        host_file = self.file
        if host < host_file.size():
            # A cluster freed earlier: its old bytes must not show through.
            written = host_file.write_now(host, [bytes(at), data, bytes(cs - at - size)])
        else:
            written = host_file.write_now(host + at, [data])
        if not written:
            return False
        self._unsynced_data = True
        refcounts.take_now(cluster_index)
        table[index] = host | OFLAG_COPIED
        image = self.image
        image.guest_data_bytes += cs
        image.l2_cache.mark_dirty(l2_offset)
        return True

    async def _write_span(self, l1_index: int, pos: int, data: memoryview) -> None:
        """Write guest bytes that all lie under one L2 table."""
        image = self.image
        mask = self.cluster_size - 1
        end = pos + len(data)
        l2_offset = await self._writable_l2(l1_index)
        async with image.l2_cache.pinned(l2_offset) as table:
            new_clusters: list[_NewCluster] = []
            in_place: list[int] = []  # [host, guest start, guest end] of one contiguous run
            cpos = pos
            while cpos < end:
                cluster_start = cpos & ~mask
                cend = min(cluster_start + self.cluster_size, end)
                index = (cpos >> self.cluster_bits) & (image.l2_entries - 1)
                piece = data[cpos - pos:cend - pos]
                host = self._in_place_host(table, l2_offset, index, cluster_start)
                if host is None:
                    if in_place:
                        await self._write_in_place(in_place, data, pos)
                        in_place = []
                    new_clusters.append(_NewCluster(index, cluster_start, cpos, cend, piece))
                elif self._needs_entry_update(table, index, cpos, cend):
                    if new_clusters:
                        await self._write_new_clusters(l2_offset, table, new_clusters)
                        new_clusters = []
                    if in_place:
                        await self._write_in_place(in_place, data, pos)
                        in_place = []
                    await self._write_into_cluster(l2_offset, table, index, host,
                                                   cluster_start, cpos, cend, piece)
                else:
                    if new_clusters:
                        await self._write_new_clusters(l2_offset, table, new_clusters)
                        new_clusters = []
                    target = host + (cpos - cluster_start)
                    if in_place and in_place[0] + (in_place[2] - in_place[1]) == target:
                        in_place[2] = cend
                    else:
                        if in_place:
                            await self._write_in_place(in_place, data, pos)
                        in_place = [target, cpos, cend]
                cpos = cend
            if in_place:
                await self._write_in_place(in_place, data, pos)
            if new_clusters:
                await self._write_new_clusters(l2_offset, table, new_clusters)

    # -- deciding ----------------------------------------------------------------

    def _in_place_host(self, table: array, l2_offset: int, index: int,
                       cluster_start: int) -> int | None:
        """Host cluster this guest cluster may be written in, or None if it
        needs a new one (unallocated, compressed, or shared with a snapshot)."""
        image = self.image
        entry = table[2 * index] if image.extended_l2 else table[index]
        if entry & OFLAG_COMPRESSED:
            return None
        host = entry & L2E_OFFSET_MASK
        if self.external:
            # Guest clusters sit at their own offset in the data file.
            return cluster_start
        if host and entry & OFLAG_COPIED:
            if host & (self.cluster_size - 1):
                raise image.corrupt_entry(l2_offset, index,
                                          f"host offset 0x{host:x} is not cluster-aligned")
            return host
        return None

    def _needs_entry_update(self, table: array, index: int, start: int, end: int) -> bool:
        """Does writing [start, end) into an in-place cluster change its entry?"""
        image = self.image
        if image.extended_l2:
            entry, bitmap = table[2 * index], table[2 * index + 1]
            touched = self._touched_subclusters(start, end)
            return (bitmap & touched) != touched or not entry & OFLAG_COPIED
        entry = table[index]
        return bool(entry & OFLAG_ZERO) or not entry & OFLAG_COPIED

    def _touched_subclusters(self, start: int, end: int) -> int:
        sc_bits = self.image.subcluster_bits
        mask = self.cluster_size - 1
        first = (start & mask) >> sc_bits
        last = ((end - 1) & mask) >> sc_bits
        return ((1 << (last + 1)) - 1) & ~((1 << first) - 1)

    # -- writing -----------------------------------------------------------------

    async def _write_in_place(self, run: list[int], data: memoryview, data_start: int) -> None:
        host, start, end = run
        await self._check_overlap(host, end - start)
        await self.image.data_host.pwrite(host, data[start - data_start:end - data_start])

    async def _guest_view(self, start: int, end: int) -> bytes:
        """Current guest bytes of [start, end) (copy-on-write source)."""
        if end <= start:
            return b""
        data = await self.image.read_guest(start, end - start)
        return data + bytes(end - start - len(data))

    async def _write_into_cluster(self, l2_offset: int, table: array, index: int, host: int,
                                  cluster_start: int, start: int, end: int,
                                  piece: memoryview) -> None:
        """Write into a cluster this image owns whose entry must change:
        an allocated zero cluster, unallocated subclusters, or a cluster of
        an external data file that was unallocated or zero."""
        image = self.image
        cluster_end = cluster_start + self.cluster_size
        if image.extended_l2:
            sc_size = 1 << image.subcluster_bits
            bitmap = table[2 * index + 1]
            touched = self._touched_subclusters(start, end)
            lo = start
            hi = end
            first_bit = touched & -touched
            last_bit = 1 << (touched.bit_length() - 1)
            if not bitmap & first_bit:
                lo = cluster_start + ((start - cluster_start) & ~(sc_size - 1))
            if not bitmap & last_bit:
                hi = min(cluster_start + ((end - cluster_start + sc_size - 1) & ~(sc_size - 1)),
                         cluster_end)
            content = await self._guest_view(lo, start) + bytes(piece) + \
                await self._guest_view(end, hi)
            new_entry = host | OFLAG_COPIED
            new_bitmap = (bitmap | touched) & ~(touched << SUBCLUSTERS_PER_CLUSTER)
        else:
            lo, hi = cluster_start, cluster_end
            content = await self._guest_view(cluster_start, start) + bytes(piece) + \
                await self._guest_view(end, cluster_end)
            new_entry = host | OFLAG_COPIED
            new_bitmap = None
        await self._check_overlap(host + (lo - cluster_start), len(content))
        await image.data_host.pwrite(host + (lo - cluster_start), content)
        if not self.external:
            self._unsynced_data = True
        async with Held(self.metadata_lock):
            if new_bitmap is None:
                old = table[index]
                table[index] = new_entry
                if old & OFLAG_ZERO or not old & L2E_OFFSET_MASK:
                    image.guest_data_bytes += self.cluster_size
            else:
                old_bitmap = table[2 * index + 1]
                table[2 * index] = new_entry
                table[2 * index + 1] = new_bitmap
                image.guest_data_bytes += ((new_bitmap & ALL_SUBCLUSTERS).bit_count()
                                           - (old_bitmap & ALL_SUBCLUSTERS).bit_count()) \
                    << image.subcluster_bits
            image.l2_cache.mark_dirty(l2_offset)

    async def _write_new_clusters(self, l2_offset: int, table: array,
                                  clusters: list[_NewCluster]) -> None:
        """Give each cluster a new host cluster (one contiguous allocation),
        write data and copy-on-write parts in one write, then relink."""
        image = self.image
        cs = self.cluster_size
        count = len(clusters)
        if self.external:
            # Fixed mapping: each is written at its own guest offset.
            for cluster in clusters:
                await self._write_into_cluster(l2_offset, table, cluster.index,
                                               cluster.cluster_start, cluster.cluster_start,
                                               cluster.write_start, cluster.write_end,
                                               cluster.data)
            return
        async with Held(self.metadata_lock):
            base = await self.refcounts.allocate(count)
        new_bitmaps: list[int | None] = []
        # (offset in the new clusters, bytes, known to be zeros) in order.
        segments: list[tuple[int, bytes | memoryview, bool]] = []
        for j, cluster in enumerate(clusters):
            if image.extended_l2:
                body, bitmap = await self._new_cluster_content(table, cluster)
                segments.append((j * cs, body, False))
                new_bitmaps.append(bitmap)
                continue
            new_bitmaps.append(None)
            at = j * cs
            head_end = at + cluster.write_start - cluster.cluster_start
            tail_start = at + cluster.write_end - cluster.cluster_start
            entry = table[cluster.index]
            if head_end > at:
                segments.append((at, *await self._cow_source(cluster.cluster_start,
                                                             cluster.write_start, entry)))
            segments.append((head_end, cluster.data, False))
            if tail_start < at + cs:
                segments.append((tail_start, *await self._cow_source(
                    cluster.write_end, cluster.cluster_start + cs, entry)))
        await self._check_overlap(base, count * cs)
        await self._write_fresh(base, segments)
        self._unsynced_data = True
        async with Held(self.metadata_lock):
            for j, cluster in enumerate(clusters):
                host = base + j * cs
                if image.extended_l2:
                    old = table[2 * cluster.index]
                    old_bitmap = table[2 * cluster.index + 1]
                    new_bitmap = new_bitmaps[j]
                    assert new_bitmap is not None
                    table[2 * cluster.index] = host | OFLAG_COPIED
                    table[2 * cluster.index + 1] = new_bitmap
                    added = (new_bitmap & ALL_SUBCLUSTERS).bit_count()
                    if not old & OFLAG_COMPRESSED and old & L2E_OFFSET_MASK:
                        added -= (old_bitmap & ALL_SUBCLUSTERS).bit_count()
                    image.guest_data_bytes += added << image.subcluster_bits
                else:
                    old = table[cluster.index]
                    table[cluster.index] = host | OFLAG_COPIED
                    if not (old & L2E_OFFSET_MASK and not old & (OFLAG_ZERO | OFLAG_COMPRESSED)):
                        image.guest_data_bytes += cs
                self._release_old(old)
            image.l2_cache.mark_dirty(l2_offset)

    async def _cow_source(self, start: int, end: int, entry: int) -> tuple[bytes, bool]:
        """Copy-on-write bytes of [start, end), and whether they are all zeros.

        `entry` is the standard L2 entry of the one cluster the range lies
        in.  When it alone says zeros (a zero cluster, or unallocated in an
        image without a backing file), or the mapping does (unallocated with
        no backing data there), nothing is read or compared.
        """
        image = self.image
        if (entry & OFLAG_ZERO and not entry & OFLAG_COMPRESSED) \
                or (not entry and image.backing is None):
            return bytes(end - start), True
        inside_end = min(end, image.virtual_size)  # past the disk's end: zeros
        if inside_end <= start or all(
            kind == ZERO or (kind == BACKING and image.backing is None)
            for kind, *_ in await image.map_range(start, inside_end - start)
        ):
            return bytes(end - start), True
        data = await self._guest_view(start, end)
        return data, data == bytes(len(data))

    async def _write_fresh(self, host_offset: int,
                           segments: list[tuple[int, bytes | memoryview, bool]]) -> None:
        """Write new clusters as one write.  Past the end of the file they
        read as zeros already, so zero copy-on-write parts are not written
        there.  The file is not extended over a zero tail: with O_DIRECT,
        writes run in threads, and a `ftruncate` racing another request's
        write past it could cut that write off; a file that ends inside its
        last cluster reads the same (zeros past the end)."""
        host = self.image.data_host
        if host_offset < host.size():
            await host.pwritev(host_offset, [data for _, data, _ in segments])
            return
        run_start, run = 0, []
        for offset, data, zeros in segments:
            if zeros:
                if run:
                    await host.pwritev(host_offset + run_start, run)
                    run = []
                continue
            if not run:
                run_start = offset
            run.append(data)
        if run:
            await host.pwritev(host_offset + run_start, run)

    def _release_old(self, old_entry: int) -> None:
        """Queue the decrement for what an overwritten L2 entry referenced."""
        image = self.image
        if old_entry & OFLAG_COMPRESSED:
            host, length = image.compressed.decode(old_entry)
            start = host & ~511
            self.pending_frees.append((start, (host + length) - start))
            image.guest_data_bytes -= length
        elif old_entry & L2E_OFFSET_MASK:
            self.pending_frees.append((old_entry & L2E_OFFSET_MASK, self.cluster_size))

    async def _new_cluster_content(self, table: array,
                                   cluster: _NewCluster) -> tuple[bytes, int | None]:
        """The bytes of a whole new host cluster, and its new subcluster bitmap."""
        image = self.image
        cs = self.cluster_size
        start, end = cluster.write_start, cluster.write_end
        cluster_start, cluster_end = cluster.cluster_start, cluster.cluster_start + cs
        if not image.extended_l2:
            body = await self._guest_view(cluster_start, start) + bytes(cluster.data) + \
                await self._guest_view(end, cluster_end)
            return body, None
        entry = table[2 * cluster.index]
        bitmap = table[2 * cluster.index + 1]
        touched = self._touched_subclusters(start, end)
        if entry & OFLAG_COMPRESSED:
            keep = ALL_SUBCLUSTERS  # a compressed cluster has no subclusters
            zero = 0
        else:
            keep = (bitmap & ALL_SUBCLUSTERS) if entry & L2E_OFFSET_MASK else 0
            zero = bitmap >> SUBCLUSTERS_PER_CLUSTER
        allocated = keep | touched
        body = bytearray(cs)
        sc_bits = image.subcluster_bits
        sc_size = 1 << sc_bits
        for sc in range(SUBCLUSTERS_PER_CLUSTER):
            if not allocated >> sc & 1:
                continue
            sc_start = cluster_start + (sc << sc_bits)
            sc_end = sc_start + sc_size
            if start <= sc_start and sc_end <= end:
                continue  # wholly overwritten below
            body[sc << sc_bits:(sc + 1) << sc_bits] = await self._guest_view(sc_start, sc_end)
        body[start - cluster_start:end - cluster_start] = cluster.data
        new_bitmap = allocated | ((zero & ~allocated) << SUBCLUSTERS_PER_CLUSTER)
        return bytes(body), new_bitmap

    # -- L2 tables -----------------------------------------------------------------

    async def _writable_l2(self, l1_index: int) -> int:
        """Host offset of an L2 table for `l1_index` that this image owns
        alone, allocating a new one or copying a shared one first."""
        image = self.image
        entry = image.l1[l1_index]
        if entry & OFLAG_COPIED and entry & L1E_OFFSET_MASK:
            return entry & L1E_OFFSET_MASK
        async with Held(self.metadata_lock):
            entry = image.l1[l1_index]
            old = entry & L1E_OFFSET_MASK
            if entry & OFLAG_COPIED and old:
                return old
            if old & (self.cluster_size - 1):
                raise MetadataCorruption(image.path, f"L1 table entry {l1_index}",
                                         f"L2 table offset 0x{old:x} is not cluster-aligned")
            if old:
                new_table = array("Q", await image.l2_cache.get(old))
            else:
                new_table = array("Q", bytes(self.cluster_size))
            new_offset = await self.refcounts.allocate(1)
            hit = self.metadata.hit(new_offset, self.cluster_size)
            if hit is not None:
                await self._overlap(hit, new_offset)
            # The table (dirty) and the L1 entry change in memory only;
            # write-back writes its refcount, the table, then the L1 entry.
            image.l1[l1_index] = new_offset | OFLAG_COPIED
            self._dirty_l1.add(l1_index)
            self.metadata.add(new_offset, self.cluster_size, "L2 table")
            image.l2_cache.add_new(new_offset, new_table)
            if old:
                self.pending_frees.append((old, self.cluster_size))
            return new_offset

    # -- write-back ----------------------------------------------------------------

    async def write_back(self) -> None:
        """Write dirty metadata back in dependency order."""
        async with Held(self.metadata_lock):
            await self._write_back_locked()

    async def _write_back_locked(self) -> None:
        image = self.image
        l2_dirty = image.l2_cache.dirty_count
        l1_dirty = bool(self._dirty_l1)
        if self.lazy and (l2_dirty or l1_dirty or self.pending_frees) and not self._marked_dirty:
            # Lazy refcounts: the dirty bit, durable, before any deferred update.
            await self._set_incompatible(INCOMPAT_DIRTY, True)
            self._marked_dirty = True
        wrote_refcounts = await self.refcounts.write_back()
        if (wrote_refcounts or self._unsynced_data) and (l2_dirty or self.pending_frees) \
                and not self.lazy:
            await self.barrier()
        # metadata_lock is held: no L2 or L1 entry changes until the end.
        await image.l2_cache.write_dirty(encode_table, self.file.pwrite)
        if l1_dirty:
            # A new L2 table reaches the file before the L1 entry pointing
            # at it (lazy refcounts or not).
            if l2_dirty:
                await self.barrier()
            await self._write_l1()
        if self.pending_frees:
            if (l2_dirty or l1_dirty) and not self.lazy:
                await self.barrier()
            frees, self.pending_frees = self.pending_frees, []
            for host, length in frees:
                for freed in await self.refcounts.change(host, length, -1):
                    # A freed L2 table (one copied away from a snapshot's
                    # that the snapshot no longer holds) is no metadata now.
                    image.l2_cache.forget(freed)
                    self.metadata.remove(freed, self.cluster_size)
            await self.refcounts.write_back()

    async def _write_l1(self) -> None:
        """Write the changed L1 entries: one write from the first to the
        last (the entries between are unchanged, so rewriting them is
        harmless).  Called with `metadata_lock` held."""
        dirty, self._dirty_l1 = self._dirty_l1, set()
        first, last = min(dirty), max(dirty)
        try:
            await self.file.pwrite(self.header.l1_table_offset + 8 * first,
                                   encode_table(self.image.l1[first:last + 1]))
        except BaseException:
            self._dirty_l1 |= dirty
            raise

    async def flush(self) -> None:
        """FUSE fsync/flush: metadata back, then the host files durable."""
        if self.cache is CacheMode.UNSAFE:
            return
        self.flushes += 1
        await self.write_back()
        await self.file.datasync_async()
        if self.image.data_file is not None:
            await self.image.data_file.datasync_async()

    async def shutdown(self) -> None:
        """Unmount: everything reaches the image, which is left clean."""
        async with Held(self.metadata_lock):
            await self._write_back_locked()
            if self._marked_dirty:
                await self.barrier()
                await self._set_incompatible(INCOMPAT_DIRTY, False)
                self._marked_dirty = False
        if self.cache is not CacheMode.UNSAFE:
            self.file.datasync()
            if self.image.data_file is not None:
                self.image.data_file.datasync()

    def statistics(self) -> dict[str, object]:
        return {
            "refcount_cache": self.refcounts.blocks.statistics(),
            "write_requests": self.write_requests,
            "bytes_written": self.bytes_written,
            "flushes": self.flushes,
            "pending_frees": len(self.pending_frees),
        }

