"""Refcounts: the refcount table, its blocks, and cluster allocation.

QEMU's rule, which every method here keeps: a refcount on disk may be too
high, never too low.  So a new refcount block reaches the file before the
table entry that points to it, a new refcount table before the header that
points to it, and callers write a cluster's raised refcount back before
anything that references the cluster (see `Writer.write_back`).

Concurrency: every method that awaits must be called with the image's
metadata lock held (`Writer.metadata_lock`): allocation reads and changes
many blocks across awaits.  `free_cluster_now` and `take_now` never await;
they may be called while that lock is free (nothing else is then half-way
through an allocation or a write-back).

The free hint is a lower bound: no cluster below it is free.  A
single-cluster allocation takes the first free cluster from the hint on and
moves the hint past it, so the next one usually finds its cluster at once
instead of scanning from the start of the file.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Awaitable, Callable

from qfuse.engine.hostfile import HostFile
from qfuse.engine.overlap import MetadataMap
from qfuse.engine.tablecache import TableCache
from qfuse.errors import MetadataCorruption
from qfuse.format.entries import REFT_OFFSET_MASK, decode_table, encode_table
from qfuse.format.refcount import RefcountCodec

REFTABLE_HEADER_FIELDS = 48  # refcount_table_offset (u64) + refcount_table_clusters (u32)


class Refcounts:
    """The refcount structures of one image file."""

    def __init__(self, file: HostFile, *, cluster_bits: int, refcount_order: int,
                 reftable_offset: int, reftable_clusters: int, cache_tables: int,
                 barrier: Callable[[], Awaitable[None]], metadata: MetadataMap,
                 overlap: Callable[[str, int], Awaitable[None]]) -> None:
        self.file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.codec = RefcountCodec(refcount_order)
        self.block_entries = self.codec.entries_per_block(self.cluster_size)
        self.reftable_offset = reftable_offset
        self.reftable_clusters = reftable_clusters
        raw = file.pread_sync(reftable_offset, reftable_clusters * self.cluster_size)
        self.reftable: array = decode_table(raw.ljust(reftable_clusters * self.cluster_size, b"\0"))
        self.blocks: TableCache[bytearray] = TableCache(cache_tables, self._load_block)
        self._barrier = barrier
        self._metadata = metadata  # the overlap check learns of new blocks here
        self._overlap = overlap  # reports a new structure landing on metadata
        self.free_hint = 0  # no cluster below this index is free

    # -- blocks ----------------------------------------------------------------

    async def _load_block(self, host_offset: int) -> bytearray:
        data = await self.file.pread(host_offset, self.cluster_size)
        if len(data) < self.cluster_size:
            raise MetadataCorruption(self.file.path, f"refcount block at 0x{host_offset:x}",
                                     "lies past the end of the file")
        return bytearray(data)

    def block_offset(self, table_index: int) -> int:
        if table_index >= len(self.reftable):
            return 0
        offset = self.reftable[table_index] & REFT_OFFSET_MASK
        if offset & (self.cluster_size - 1):
            raise MetadataCorruption(self.file.path, f"refcount table entry {table_index}",
                                     f"block offset 0x{offset:x} is not cluster-aligned")
        return offset

    def block_offsets(self) -> list[int]:
        return [self.reftable[i] & REFT_OFFSET_MASK for i in range(len(self.reftable))
                if self.reftable[i] & REFT_OFFSET_MASK]

    async def get(self, cluster_index: int) -> int:
        table_index, index = divmod(cluster_index, self.block_entries)
        offset = self.block_offset(table_index)
        if not offset:
            return 0
        return self.codec.get(await self.blocks.get(offset), index)

    async def _set_in_existing_block(self, cluster_index: int, value: int) -> bool:
        """Set a refcount whose block exists; False if it does not."""
        table_index, index = divmod(cluster_index, self.block_entries)
        offset = self.block_offset(table_index)
        if not offset:
            return False
        block = await self.blocks.get(offset)
        self.codec.set(block, index, value)
        self.blocks.mark_dirty(offset, block)
        if value == 0 and cluster_index < self.free_hint:
            self.free_hint = cluster_index
        return True

    # -- changing refcounts ------------------------------------------------------

    async def change(self, host_offset: int, length: int, delta: int) -> list[int]:
        """Add `delta` to the refcount of every cluster in the host range.

        Returns the host offsets of clusters that became free.  A refcount
        that would drop below 0 or overflow means the image is corrupt.
        """
        freed = []
        first = host_offset >> self.cluster_bits
        last = (host_offset + length - 1) >> self.cluster_bits
        for cluster_index in range(first, last + 1):
            old = await self.get(cluster_index)
            new = old + delta
            if not 0 <= new <= self.codec.max_value:
                raise MetadataCorruption(
                    self.file.path, f"refcount of cluster 0x{cluster_index << self.cluster_bits:x}",
                    f"{old} cannot change by {delta}")
            if not await self._set_in_existing_block(cluster_index, new):
                await self._ensure_block(cluster_index)
                await self._set_in_existing_block(cluster_index, new)
            if new == 0:
                freed.append(cluster_index << self.cluster_bits)
        return freed

    # -- allocation ----------------------------------------------------------------

    async def allocate(self, count: int) -> int:
        """Host offset of `count` contiguous new clusters, refcount 1 each."""
        while True:
            start = await self._find_free(count)
            created = False
            first_table = start // self.block_entries
            last_table = (start + count - 1) // self.block_entries
            for table_index in range(first_table, last_table + 1):
                if not self.block_offset(table_index):
                    await self._create_block(table_index)
                    created = True
            if created:
                continue  # the new block may sit where we meant to allocate
            for cluster_index in range(start, start + count):
                await self._set_in_existing_block(cluster_index, 1)
            if count == 1 or start == self.free_hint:
                # Every cluster from the hint up to `start` is in use.
                self.free_hint = start + count
            else:
                # A run was wanted: a shorter hole may lie before it.
                self.free_hint = await self._find_free(1)
            return start << self.cluster_bits

    def free_cluster_now(self) -> int:
        """Index of the first free cluster from the hint on, found without an
        `await`: only inside the hint's refcount block, and only when that
        block is cached.  -1 when that does not hold (`allocate` then does
        the general work); nothing is changed either way."""
        table_index, in_block = divmod(self.free_hint, self.block_entries)
        if table_index >= len(self.reftable):
            return -1
        offset = self.reftable[table_index] & REFT_OFFSET_MASK
        if not offset or offset & (self.cluster_size - 1):
            return -1
        block = self.blocks.peek(offset)
        if block is None:
            return -1
        if not self.codec.get(block, in_block):
            return self.free_hint  # the usual case: the hint is exact
        found = self.codec.find_zero_run(block, in_block, 1)
        return -1 if found < 0 else table_index * self.block_entries + found

    def take_now(self, cluster_index: int) -> None:
        """Give refcount 1 to the cluster `free_cluster_now` just returned.

        The caller must not have awaited since (the block is still cached
        and the cluster still free)."""
        table_index, index = divmod(cluster_index, self.block_entries)
        offset = self.reftable[table_index] & REFT_OFFSET_MASK
        block = self.blocks.peek(offset)
        assert block is not None
        self.codec.set(block, index, 1)
        self.blocks.mark_dirty(offset)
        # It was the first free cluster from the hint on.
        self.free_hint = cluster_index + 1

    async def _find_free(self, count: int) -> int:
        """First index of `count` clusters with refcount 0, from the hint on."""
        entries = self.block_entries
        run_start = run_len = 0
        index = self.free_hint
        while True:
            table_index, in_block = divmod(index, entries)
            offset = self.block_offset(table_index)
            if not offset:
                if not run_len:
                    run_start = index
                run_len += entries - in_block
                index += entries - in_block
                if run_len >= count:
                    return run_start
                continue
            block = await self.blocks.get(offset)
            if run_len:
                need = count - run_len
                zeros = 0
                while zeros < need and in_block + zeros < entries \
                        and self.codec.get(block, in_block + zeros) == 0:
                    zeros += 1
                if zeros >= need:
                    return run_start
                if in_block + zeros == entries:
                    run_len += zeros
                    index += zeros
                    continue
                run_len = 0
                index += zeros + 1
                continue
            found = self.codec.find_zero_run(block, in_block, count)
            if found < 0:
                index = (table_index + 1) * entries
                continue
            run_start = table_index * entries + found
            if entries - found >= count:
                return run_start
            run_len = entries - found
            index = (table_index + 1) * entries

    async def _ensure_block(self, cluster_index: int) -> None:
        table_index = cluster_index // self.block_entries
        while not self.block_offset(table_index):
            await self._create_block(table_index)

    async def _create_block(self, table_index: int) -> None:
        """Allocate and publish the refcount block for `table_index`."""
        if table_index >= len(self.reftable):
            await self._grow_table(table_index)
            if self.block_offset(table_index):
                return
        while True:
            where = await self._find_free(1)
            if where // self.block_entries == table_index:
                # The block covers its own cluster: it counts itself.
                block = bytearray(self.cluster_size)
                self.codec.set(block, where % self.block_entries, 1)
                break
            if self.block_offset(where // self.block_entries):
                block = bytearray(self.cluster_size)
                await self._set_in_existing_block(where, 1)
                await self.write_back()  # its refcount before anything points at it
                break
            # The free cluster lies where no block exists yet either: make
            # that block first (it will count itself), then look again.
            await self._create_block(where // self.block_entries)
        block_offset = where << self.cluster_bits
        await self._check_overlap(block_offset, self.cluster_size)
        await self.file.pwrite(block_offset, block)
        await self._barrier()
        self.reftable[table_index] = block_offset
        await self.file.pwrite(self.reftable_offset + table_index * 8,
                               struct.pack(">Q", block_offset))
        self.blocks.add_new(block_offset, block)
        self.blocks.mark_clean(block_offset)
        self._metadata.add(block_offset, self.cluster_size, "refcount block")
        # `where` was the first free cluster from the hint on.
        self.free_hint = max(self.free_hint, where + 1)

    async def _grow_table(self, needed_index: int) -> None:
        """Move the refcount table to a larger one covering `needed_index`.

        The new blocks and table go to the first clusters no block covers
        yet; those are free by definition.  Order: new blocks and table,
        barrier, header, barrier; only then is the old table released.
        """
        entries = self.block_entries
        first_new = len(self.reftable) * entries  # first uncovered cluster
        new_blocks = 1
        while True:
            wanted = max(needed_index + 1, len(self.reftable) * 3 // 2,
                         first_new // entries + new_blocks)
            table_clusters = -(-wanted * 8 // self.cluster_size)
            covered = new_blocks * entries
            if covered >= new_blocks + table_clusters:
                break
            new_blocks += 1
        total_entries = table_clusters * self.cluster_size // 8
        new_table = array("Q", self.reftable)
        new_table.extend(array("Q", bytes(8 * (total_entries - len(self.reftable)))))
        first_table_index = first_new // entries
        blocks = []
        for j in range(new_blocks):
            blocks.append(bytearray(self.cluster_size))
            new_table[first_table_index + j] = (first_new + j) << self.cluster_bits
        for k in range(new_blocks + table_clusters):
            j, index = divmod(k, entries)
            self.codec.set(blocks[j], index, 1)
        table_offset = (first_new + new_blocks) << self.cluster_bits
        await self._check_overlap(first_new << self.cluster_bits,
                                  (new_blocks + table_clusters) << self.cluster_bits)
        for j, block in enumerate(blocks):
            await self.file.pwrite((first_new + j) << self.cluster_bits, block)
        await self.file.pwrite(table_offset, encode_table(new_table))
        await self._barrier()
        await self.file.pwrite(REFTABLE_HEADER_FIELDS,
                               struct.pack(">QI", table_offset, table_clusters))
        await self._barrier()
        old_offset, old_clusters = self.reftable_offset, self.reftable_clusters
        self.reftable = new_table
        self.reftable_offset, self.reftable_clusters = table_offset, table_clusters
        for j, block in enumerate(blocks):
            offset = (first_new + j) << self.cluster_bits
            self.blocks.add_new(offset, block)
            self.blocks.mark_clean(offset)
            self._metadata.add(offset, self.cluster_size, "refcount block")
        self._metadata.add(table_offset, table_clusters * self.cluster_size, "refcount table")
        self._metadata.remove(old_offset, old_clusters * self.cluster_size)
        await self.change(old_offset, old_clusters * self.cluster_size, -1)

    async def _check_overlap(self, host_offset: int, length: int) -> None:
        hit = self._metadata.hit(host_offset, length)
        if hit is not None:
            await self._overlap(hit, host_offset)

    # -- write-back --------------------------------------------------------------

    async def write_back(self) -> bool:
        """Write every dirty block; True if there were any."""
        return bool(await self.blocks.write_dirty(bytes, self.file.pwrite))
