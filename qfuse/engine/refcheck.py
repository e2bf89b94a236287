"""Counting references, and rebuilding refcounts from them.

`count_references` walks every structure that holds a cluster (the header,
active and snapshot L1/L2 tables, data and compressed clusters, the snapshot
table, bitmaps, and optionally the refcount structures themselves) and
counts, per host cluster, how many times it is referenced: what the stored
refcount must be.  `rebuild_refcounts` writes a new refcount table and
blocks holding those counts past the end of the file and switches the header
to them; until that one header write lands, the old ones stay in force, so
a crash during the rebuild leaves the image as it was (still dirty).

Cold path, synchronous: runs at open, before anything is mounted.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from qfuse.engine.hostfile import HostFile
from qfuse.engine.metadata import Metadata
from qfuse.errors import FormatError
from qfuse.format.entries import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    REFT_OFFSET_MASK,
    CompressedLayout,
    decode_table,
    encode_table,
)
from qfuse.format.refcount import RefcountCodec

BITMAP_ENTRY_FIXED = 24
BITMAP_TABLE_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


@dataclass
class References:
    """Per host cluster, how many references the metadata makes to it."""

    counts: array  # 'I', one per host cluster
    cluster_bits: int
    # (what, host offset) of references that lie past the end of the file.
    past_end: list[tuple[str, int]] = field(default_factory=list)
    misaligned: list[tuple[str, int]] = field(default_factory=list)

    def add(self, host_offset: int, length: int, what: str) -> None:
        if length <= 0:
            return
        first = host_offset >> self.cluster_bits
        last = (host_offset + length - 1) >> self.cluster_bits
        if last >= len(self.counts):
            self.past_end.append((what, host_offset))
            return
        counts = self.counts
        for cluster in range(first, last + 1):
            counts[cluster] += 1


def count_references(file: HostFile, meta: Metadata, *,
                     include_refcount_structures: bool = True) -> References:
    header = meta.header
    cs = header.cluster_size
    cbits = header.cluster_bits
    clusters = -(-max(file.size(), cs) // cs)
    refs = References(array("I", bytes(4 * clusters)), cbits)
    refs.add(0, cs, "header")
    external = header.has_data_file
    layout = CompressedLayout(cbits)
    extended = header.extended_l2
    step = 2 if extended else 1

    def count_l1(l1_offset: int, l1_size: int, what: str) -> None:
        refs.add(l1_offset, l1_size * 8, what)
        if not l1_size:
            return
        l1 = decode_table(file.pread_sync(l1_offset, l1_size * 8))
        for l1_index, l1_entry in enumerate(l1):
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            if l2_offset & (cs - 1):
                refs.misaligned.append((f"{what} entry {l1_index}", l2_offset))
                continue
            refs.add(l2_offset, cs, "L2 table")
            raw = file.pread_sync(l2_offset, cs)
            if len(raw) < cs:
                continue
            table = decode_table(raw)
            for i in range(0, len(table), step):
                entry = table[i]
                if entry & OFLAG_COMPRESSED:
                    host, length = layout.decode(entry)
                    start = host & ~511
                    refs.add(start, host + length - start, "compressed cluster")
                    continue
                host = entry & L2E_OFFSET_MASK
                if not host or external:
                    continue
                if host & (cs - 1):
                    refs.misaligned.append((f"L2 table 0x{l2_offset:x} entry {i // step}", host))
                    continue
                refs.add(host, cs, "data cluster")

    count_l1(header.l1_table_offset, header.l1_size, "active L1 table")
    if header.nb_snapshots:
        refs.add(header.snapshots_offset, meta.snapshot_table_size, "snapshot table")
    for snap in meta.snapshots:
        count_l1(snap.l1_table_offset, snap.l1_size, f"L1 table of snapshot {snap.id}")
    _count_bitmaps(file, meta, refs)
    if include_refcount_structures:
        refs.add(header.refcount_table_offset, header.refcount_table_clusters * cs,
                 "refcount table")
        raw = file.pread_sync(header.refcount_table_offset, header.refcount_table_clusters * cs)
        for entry in decode_table(raw[:len(raw) & ~7]):
            if entry & REFT_OFFSET_MASK:
                refs.add(entry & REFT_OFFSET_MASK, cs, "refcount block")
    return refs


def _count_bitmaps(file: HostFile, meta: Metadata, refs: References) -> None:
    bitmaps = meta.extensions.bitmaps
    if bitmaps is None:
        return
    cs = meta.header.cluster_size
    refs.add(bitmaps.bitmap_directory_offset, bitmaps.bitmap_directory_size, "bitmap directory")
    if bitmaps.bitmap_directory_size > 64 * 1024 * 1024:
        raise FormatError("bitmap directory exceeds 64 MiB")
    directory = file.pread_sync(bitmaps.bitmap_directory_offset, bitmaps.bitmap_directory_size)
    pos = 0
    for _ in range(bitmaps.nb_bitmaps):
        if pos + BITMAP_ENTRY_FIXED > len(directory):
            break
        table_offset, table_size, _flags, _type, _gran, name_size, extra_size = \
            struct.unpack_from(">QIIBBHI", directory, pos)
        refs.add(table_offset, table_size * 8, "bitmap table")
        if table_size and table_size * 8 <= 64 * 1024 * 1024:
            for entry in decode_table(file.pread_sync(table_offset, table_size * 8)):
                if entry & BITMAP_TABLE_OFFSET_MASK:
                    refs.add(entry & BITMAP_TABLE_OFFSET_MASK, cs, "bitmap data")
        pos += (BITMAP_ENTRY_FIXED + extra_size + name_size + 7) & ~7


def rebuild_refcounts(file: HostFile, meta: Metadata, barrier: Callable[[], None]) -> None:
    """Write fresh refcount structures matching the references; switch to them.

    The old table and blocks are not counted, so once the header points to
    the new ones they are free space.
    """
    header = meta.header
    cs = header.cluster_size
    refs = count_references(file, meta, include_refcount_structures=False)
    if refs.past_end or refs.misaligned:
        what, offset = (refs.past_end or refs.misaligned)[0]
        raise FormatError(f"refcounts cannot be rebuilt: {what} at 0x{offset:x} is invalid")
    codec = RefcountCodec(header.refcount_order)
    entries = codec.entries_per_block(cs)
    counts = refs.counts
    first_new = len(counts)  # new structures go past every referenced cluster
    # The blocks must also count themselves and the table: grow both to a
    # fixed point (monotone from below, so the least one).
    blocks, table_clusters = 1, 1
    while True:
        total = first_new + blocks + table_clusters
        want_blocks = -(-total // entries)
        want_table = -(-want_blocks * 8 // cs)
        if (want_blocks, table_clusters) == (blocks, want_table):
            break
        blocks, table_clusters = want_blocks, want_table
    counts.extend(array("I", [1]) * (total - first_new))
    table_offset_cluster = first_new + blocks
    reftable = array("Q", bytes(table_clusters * cs))
    block_image: dict[int, bytearray] = {}
    for table_index in range(blocks):
        block = bytearray(cs)
        for i, value in enumerate(counts[table_index * entries:(table_index + 1) * entries]):
            if value:
                codec.set(block, i, min(value, codec.max_value))
        block_image[first_new + table_index] = block
        reftable[table_index] = (first_new + table_index) * cs
    for cluster, block in block_image.items():
        file.pwrite_sync(cluster * cs, block)
    file.pwrite_sync(table_offset_cluster * cs, encode_table(reftable))
    barrier()
    file.pwrite_sync(48, struct.pack(">QI", table_offset_cluster * cs, table_clusters))
    barrier()
    header.refcount_table_offset = table_offset_cluster * cs
    header.refcount_table_clusters = table_clusters
