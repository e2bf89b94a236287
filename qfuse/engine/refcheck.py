"""Counting references, and rebuilding refcounts from them.

`count_references` walks every structure that holds a cluster, in the order
and by the rules of QEMU's `calculate_refcounts` (block/qcow2-refcount.c):
the header, the active L1 table with its L2 tables and their data and
compressed clusters, the snapshots' L1 tables, the snapshot table, the
refcount table, the encryption header, the bitmap directory, tables and
data, and last the refcount blocks.  It counts, per host cluster, how many
times the metadata references it: what the stored refcount must be.  On the
way it finds what QEMU's check finds (reserved bits, misaligned entries,
references past the end of the file, counts that overflow the refcount
width, ...), tells `report` in QEMU's words, and counts the corruptions.

The counts are one `array` of the refcount width (one item per host
cluster, no Python object per cluster): a 1 TiB image of 64 KiB clusters
needs 32 MiB of them.

Two rebuilds write fresh refcount structures from such counts:

* `rebuild_refcounts` (a writable open of a dirty image) writes them past
  the end of the file and switches the header to them; the old ones are
  not counted, so once the header points to the new ones they are free.
* `rebuild_refcount_structure` (`qfuse check --repair all`) places them as
  QEMU's does, first-fit in clusters no count claims (the old structures
  are counted, so untouched), so that the repaired image is laid out as
  `qemu-img check -r all` would lay it out; the old ones are leaked, and
  the check's leak repair that follows frees them.

Either way the new structures are complete and durable before the one
header write that switches to them, so a crash leaves the old ones in force.

Cold path, synchronous: runs at open or in `qfuse check`, never under FUSE.
"""

from __future__ import annotations

import enum
import errno
import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from qfuse.engine.hostfile import HostFile
from qfuse.engine.metadata import MAX_L1_BYTES, Metadata
from qfuse.errors import FormatError
from qfuse.format.entries import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
    SUBCLUSTER_ALLOC_MASK,
    CompressedLayout,
    decode_table,
    encode_table,
)
from qfuse.format.header import AUTOCLEAR_BITMAPS
from qfuse.format.refcount import RefcountCodec

BITMAP_ENTRY_FIXED = 24
BITMAP_TABLE_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
BITMAP_TABLE_RESERVED_MASK = 0xFF00_0000_0000_01FE
BITMAP_TABLE_ALL_ONES = 1
MAX_BITMAP_DIRECTORY = 64 * 1024 * 1024
MAX_BITMAP_TABLE_BYTES = 64 * 1024 * 1024
REFCOUNT_TABLE_FIELD = 48
MAX_FILE_OFFSET = (1 << 63) - 1  # header: refcount_table_offset, then refcount_table_clusters

Report = Callable[[str], None]


class Fix(enum.IntFlag):
    """What a check may repair (QEMU's BDRV_FIX_LEAKS, BDRV_FIX_ERRORS)."""

    NONE = 0
    LEAKS = 1
    ERRORS = 2
    ALL = LEAKS | ERRORS


class RepairWriter(Protocol):
    """Where the repairs a walk makes go (`qfuse.engine.check`)."""

    def write(self, host_offset: int, data: bytes, ignore: str | None) -> None:
        """Write `data`, unless it would hit metadata other than `ignore`
        (then raise `MetadataOverlap`)."""

    def grow(self, size: int) -> None:
        """Make the image file at least `size` bytes long."""


class MetadataOverlap(Exception):
    """A repair write would land on metadata; nothing was written."""


def _nothing(_: str) -> None:
    pass


def _hex(value: int) -> str:
    """C's ``%#x``: ``0`` for zero, else ``0x...``."""
    return f"{value:#x}" if value else "0"


@dataclass
class References:
    """Per host cluster, how many references the metadata makes to it.

    `counts` has one item per host cluster of the file (more if a reference
    reaches just past its end, as QEMU allows for a last cluster that is
    partly written), of the refcount width, saturated at `max_count`.
    """

    counts: array
    cluster_bits: int
    max_count: int
    file_size: int
    report: Report = _nothing
    corruptions: int = 0
    corruptions_fixed: int = 0
    # Refcount blocks that cannot be trusted: only a rebuild repairs them.
    rebuild: bool = False
    # QEMU's BlockFragInfo, of the active L1 table's clusters.
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    # (what, host offset) of references that lie past the end of the file.
    past_end: list[tuple[str, int]] = field(default_factory=list)
    # The clusters those references name (near the end of the file): a
    # rebuild must not put new refcount structures there.
    past_end_clusters: set[int] = field(default_factory=set)
    misaligned: list[tuple[str, int]] = field(default_factory=list)
    # Cluster -> what else is there, for a cluster that holds an L2 table or
    # other metadata and is also a data cluster or another structure.
    overlaps: dict[int, str] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def add(self, host_offset: int, length: int, what: str) -> None:
        """Count one reference to every cluster of a byte range (QEMU's
        qcow2_inc_refcounts_imrt)."""
        if length <= 0:
            return
        cs = self.cluster_size
        # The last cluster of the file may be partly written, so a reference
        # may reach past the end, but by less than a cluster.
        if host_offset + length - self.file_size >= cs:
            self.report(
                "ERROR: counting reference for region exceeding the end of the file by "
                f"one cluster or more: offset {host_offset:#x} size {length:#x}"
            )
            self.corruptions += 1
            self.past_end.append((what, host_offset))
            first = host_offset >> self.cluster_bits
            last = (host_offset + length - 1) >> self.cluster_bits
            near = 2 * (self.file_size >> self.cluster_bits) + 1024
            if first < near:
                self.past_end_clusters.update(range(first, min(last, near) + 1))
            return
        first = host_offset >> self.cluster_bits
        last = (host_offset + length - 1) >> self.cluster_bits
        counts = self.counts
        if last >= len(counts):
            counts.extend(array(counts.typecode, bytes(counts.itemsize * (last + 1 - len(counts)))))
        for cluster in range(first, last + 1):
            value = counts[cluster]
            if value >= self.max_count:
                self._overflow(cluster)
                continue
            counts[cluster] = value + 1

    def _overflow(self, cluster: int) -> None:
        self.report(f"ERROR: overflow cluster offset={cluster << self.cluster_bits:#x}")
        self.report(
            "Use qemu-img amend to increase the refcount entry width or qemu-img convert "
            "to create a clean copy if the image cannot be opened for writing"
        )
        self.corruptions += 1


def count_references(file: HostFile, meta: Metadata, *,
                     include_refcount_structures: bool = True,
                     count_stale_bitmaps: bool = True,
                     report: Report | None = None,
                     fix: Fix = Fix.NONE,
                     writer: RepairWriter | None = None,
                     progress: Callable[[int], None] | None = None) -> References:
    """Count every reference the image's metadata makes.

    ``count_stale_bitmaps=False`` follows QEMU, which ignores the bitmaps of
    an image whose autoclear bitmaps bit is clear (a program that does not
    keep bitmaps wrote to it; they are stale, and their clusters leaked).
    With `fix`, errors QEMU repairs while counting are repaired through
    `writer`: a preallocated zero cluster at a misaligned offset becomes a
    plain zero cluster, and the file grows over a refcount block past its
    end.  `progress` is told of every L2 table read.
    """
    walker = _Walker(file, meta, report or _nothing, fix, writer, progress)
    walker.run(include_refcount_structures, count_stale_bitmaps)
    return walker.refs


class _Walker:
    """One pass of QEMU's calculate_refcounts over an image."""

    def __init__(self, file: HostFile, meta: Metadata, report: Report, fix: Fix,
                 writer: RepairWriter | None,
                 progress: Callable[[int], None] | None) -> None:
        header = meta.header
        self.file = file
        self.meta = meta
        self.header = header
        self.cs = header.cluster_size
        self.cbits = header.cluster_bits
        self.report = report
        self.fix = fix if writer is not None else Fix.NONE
        self.writer = writer
        self.progress = progress
        codec = RefcountCodec(header.refcount_order)
        file_size = file.size()
        clusters = -(-file_size // self.cs)
        counts = array(codec.typecode)
        counts.frombytes(bytes(clusters * counts.itemsize))
        self.refs = References(counts, self.cbits, codec.max_value, file_size, report)
        self.data_file = header.has_data_file
        self.extended = header.extended_l2
        self.layout = CompressedLayout(self.cbits)
        # Host cluster -> the structure there (the first one noted), and how
        # many references those structures make: to name what collides.
        self.metadata: dict[int, str] = {}
        self.noted: dict[int, int] = {}
        # QEMU's next_contiguous_offset, per L2 table (fragmentation).
        self.next_contiguous = 0
        self.file_clusters = clusters
        self.plain = PlainTables(self.cbits)
        self.slow = self.plain.slow

    def read(self, host_offset: int, length: int) -> bytes:
        """Bytes at `host_offset`; zeros past the end of the file, as QEMU reads
        (and beyond what any file can hold: QEMU then fails, we go on)."""
        if host_offset + length > MAX_FILE_OFFSET:
            return bytes(length)
        return self.file.pread_sync(host_offset, length).ljust(length, b"\0")

    def note(self, host_offset: int, length: int, what: str) -> None:
        """Remember which structure lies where (for overlap messages)."""
        if length <= 0:
            return
        first = host_offset >> self.cbits
        for cluster in range(first, ((host_offset + length - 1) >> self.cbits) + 1):
            other = self.metadata.setdefault(cluster, what)
            self.noted[cluster] = self.noted.get(cluster, 0) + 1
            if other != what:
                self.refs.overlaps.setdefault(cluster, f"both the {other} and the {what}")

    def run(self, include_refcount_structures: bool, count_stale_bitmaps: bool) -> None:
        header = self.header
        refs = self.refs
        refs.add(0, self.cs, "header")
        self.note(0, self.cs, "header")
        self.l1(header.l1_table_offset, header.l1_size, "active L1 table", active=True)
        if self.data_file and header.nb_snapshots:
            self.report(f"ERROR {header.nb_snapshots} snapshots in image with data file")
            refs.corruptions += 1
        for snap in self.meta.snapshots:
            if snap.l1_table_offset % self.cs:
                self.report(
                    f"ERROR snapshot {snap.id} ({snap.name}) l1_offset="
                    f"{_hex(snap.l1_table_offset)}: L1 table is not cluster aligned; "
                    "snapshot table entry corrupted"
                )
                refs.corruptions += 1
                continue
            if snap.l1_size > MAX_L1_BYTES // 8:
                self.report(
                    f"ERROR snapshot {snap.id} ({snap.name}) l1_size={_hex(snap.l1_size)}: "
                    "L1 table is too large; snapshot table entry corrupted"
                )
                refs.corruptions += 1
                continue
            self.l1(snap.l1_table_offset, snap.l1_size, f"L1 table of snapshot {snap.id}",
                    active=False)
        if header.nb_snapshots:
            refs.add(header.snapshots_offset, self.meta.snapshot_table_size, "snapshot table")
            self.note(header.snapshots_offset, self.meta.snapshot_table_size, "snapshot table")
        reftable_bytes = header.refcount_table_clusters * self.cs
        if include_refcount_structures:
            refs.add(header.refcount_table_offset, reftable_bytes, "refcount table")
        self.note(header.refcount_table_offset, reftable_bytes, "refcount table")
        crypto = self.meta.extensions.crypto_header
        if crypto is not None and crypto.length:
            refs.add(crypto.offset, crypto.length, "encryption header")
            self.note(crypto.offset, crypto.length, "encryption header")
        self.bitmaps(count_stale_bitmaps)
        if include_refcount_structures:
            self.refcount_blocks()
        self.find_data_on_metadata()

    # -- L1 and L2 tables ------------------------------------------------------

    def l1(self, l1_offset: int, l1_size: int, what: str, *, active: bool) -> None:
        """QEMU's check_refcounts_l1."""
        if not l1_size:
            return
        refs = self.refs
        refs.add(l1_offset, l1_size * 8, what)
        self.note(l1_offset, l1_size * 8, "active L1 table" if active else "inactive L1 table")
        l1 = decode_table(self.read(l1_offset, l1_size * 8))
        for l1_index, l1_entry in enumerate(l1):
            if not l1_entry:
                continue
            if l1_entry & L1E_RESERVED_MASK:
                self.report(f"ERROR found L1 entry with reserved bits set: {l1_entry:x}")
                refs.corruptions += 1
            l2_offset = l1_entry & L1E_OFFSET_MASK
            refs.add(l2_offset, self.cs, "L2 table")
            self.note(l2_offset, self.cs, "L2 table")
            if l2_offset & (self.cs - 1):
                self.report(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                            "L1 entry corrupted")
                refs.corruptions += 1
                refs.misaligned.append((f"{what} entry {l1_index}", l2_offset))
            self.l2(l2_offset, active=active)

    def l2(self, l2_offset: int, *, active: bool) -> None:
        """QEMU's check_refcounts_l2: count one L2 table's clusters.

        Plain data clusters take a fast path; every other entry goes to
        `entry`, which follows QEMU's code case by case.
        """
        cs = self.cs
        raw = self.read(l2_offset, cs)
        table = decode_table(raw)
        if self.progress is not None:
            self.progress(1)
        self.next_contiguous = 0
        if self.extended or self.data_file:
            step = 2 if self.extended else 1
            for i in range(0, len(table), step):
                bitmap = table[i + 1] if self.extended else 0
                if table[i] or bitmap:
                    self.entry(table, i, bitmap, l2_offset, active)
            return
        if self.plain_table(raw, table, l2_offset, active):
            return
        refs = self.refs
        counts = refs.counts
        max_count = refs.max_count
        file_size = refs.file_size
        cbits = self.cbits
        metadata = self.metadata
        next_contiguous = 0
        allocated = fragmented = 0
        for i, entry in enumerate(table):
            if not entry:
                continue
            offset = entry & L2E_OFFSET_MASK
            if entry & self.slow or not offset or offset >= file_size or \
                    counts[offset >> cbits] >= max_count:
                self.next_contiguous = next_contiguous
                self.entry(table, i, 0, l2_offset, active)
                next_contiguous = self.next_contiguous
                continue
            cluster = offset >> cbits
            counts[cluster] += 1
            if active:
                allocated += 1
                if next_contiguous and offset != next_contiguous:
                    fragmented += 1
                next_contiguous = offset + cs
            if cluster in metadata:
                self.data_on(offset, cs, l2_offset, i)
        refs.allocated_clusters += allocated
        refs.fragmented_clusters += fragmented

    def plain_table(self, raw: bytes, table: array, l2_offset: int, active: bool) -> bool:
        """Count a table of nothing but plain data clusters inside the file;
        False (nothing counted) for any other table."""
        clusters = self.plain.clusters(raw)
        if clusters is None:
            return False
        if not clusters:
            return True
        if (clusters[-1] if isinstance(clusters, range) else max(clusters)) \
                >= self.file_clusters:
            return False
        refs = self.refs
        counts = refs.counts
        max_count = refs.max_count
        uniform = None
        if isinstance(clusters, range):
            run = counts[clusters.start:clusters.stop]
            if run.count(run[0]) == len(run) and run[0] < max_count:
                uniform = run[0]
        if uniform is not None:
            counts[clusters.start:clusters.stop] = array(counts.typecode, [uniform + 1]) \
                * len(clusters)
        else:
            for cluster in clusters:
                value = counts[cluster]
                if value >= max_count:
                    refs._overflow(cluster)
                else:
                    counts[cluster] = value + 1
        if active:
            refs.allocated_clusters += len(clusters)
            first = clusters[0]
            if not isinstance(clusters, range) and \
                    clusters != list(range(first, first + len(clusters))):
                refs.fragmented_clusters += sum(
                    1 for a, b in zip(clusters, clusters[1:], strict=False) if b != a + 1)
        metadata = self.metadata
        if isinstance(clusters, range) and len(metadata) < len(clusters):
            on_metadata = any(cluster in clusters for cluster in metadata)
        else:
            on_metadata = not metadata.keys().isdisjoint(clusters)
        if on_metadata:
            for index, entry in enumerate(table):
                offset = entry & L2E_OFFSET_MASK
                if offset and offset >> self.cbits in self.metadata:
                    self.data_on(offset, self.cs, l2_offset, index)
        return True

    def entry(self, table: array, i: int, bitmap: int, l2_offset: int, active: bool) -> None:
        """One L2 entry (`table[i]`, its subcluster bitmap), QEMU's way."""
        refs = self.refs
        report = self.report
        cs = self.cs
        layout = self.layout
        extended = self.extended
        data_file = self.data_file
        entry = table[i]
        index = i // 2 if extended else i
        if entry & OFLAG_COMPRESSED:
            if entry & OFLAG_COPIED:
                report(f"ERROR: coffset={entry & layout.offset_mask:#x}: copied flag must "
                       "never be set for compressed clusters")
                entry &= ~OFLAG_COPIED
                refs.corruptions += 1
            if data_file:
                report(f"ERROR compressed cluster {index} with data file, entry={entry:#x}")
                refs.corruptions += 1
                return
            if bitmap:
                report(f"ERROR compressed cluster {index} with non-zero subcluster "
                       f"allocation bitmap, entry={entry:#x}")
                refs.corruptions += 1
                return
            host, length = layout.decode(entry)
            refs.add(host, length, "compressed cluster")
            self.data_on(host, length, l2_offset, index)
            if active:
                refs.allocated_clusters += 1
                refs.compressed_clusters += 1
                # Compressed clusters are fragmented by nature (QEMU).
                refs.fragmented_clusters += 1
            return
        if entry & L2E_STD_RESERVED_MASK:
            report(f"ERROR found l2 entry with reserved bits set: {entry:x}")
            refs.corruptions += 1
        offset = entry & L2E_OFFSET_MASK
        if entry & OFLAG_ZERO and not extended:
            if not offset:
                return  # a plain zero cluster
        elif not offset and not (data_file and entry & OFLAG_COPIED):
            # Unallocated (offset 0 is a real one in an external data file,
            # told apart by COPIED).
            if bitmap & SUBCLUSTER_ALLOC_MASK:
                refs.corruptions += 1
                report("ERROR: Unallocated cluster has non-zero subcluster allocation map")
            return
        # A data cluster, or a preallocated zero cluster.
        if (bitmap >> 32) & bitmap:
            refs.corruptions += 1
            report(f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster "
                   "allocation bitmap")
        if offset & (cs - 1):
            refs.corruptions += 1
            if extended:
                holds_data = bool(bitmap & SUBCLUSTER_ALLOC_MASK)
            else:
                holds_data = not entry & OFLAG_ZERO
            where = f"L2 table 0x{l2_offset:x} entry {index}"
            if holds_data:
                report(f"ERROR offset={offset:x}: Data cluster is not properly aligned; "
                       "L2 entry corrupted.")
                refs.misaligned.append((where, offset))
            else:
                repairing = bool(self.fix & Fix.ERRORS)
                report(f"{'Repairing' if repairing else 'ERROR'} offset={offset:x}: "
                       "Preallocated cluster is not properly aligned; L2 entry corrupted.")
                if repairing and self.zero_entry(table, i, l2_offset, active):
                    return  # not a reference any more
                refs.misaligned.append((where, offset))
        if active:
            refs.allocated_clusters += 1
            if self.next_contiguous and offset != self.next_contiguous:
                refs.fragmented_clusters += 1
            self.next_contiguous = offset + cs
        if data_file:
            return
        refs.add(offset, cs, "data cluster")
        if (offset >> self.cbits) in self.metadata:
            self.data_on(offset, cs, l2_offset, index)

    def zero_entry(self, table: array, i: int, l2_offset: int, active: bool) -> bool:
        """QEMU's fix_l2_entry_by_zero: the entry becomes a plain zero cluster."""
        assert self.writer is not None
        if self.extended:
            bitmap = table[i + 1]
            bitmap |= (bitmap << 32) & 0xFFFF_FFFF_FFFF_FFFF
            table[i + 1] = bitmap & ~SUBCLUSTER_ALLOC_MASK
            table[i] = 0
            raw = encode_table(table[i:i + 2])
        else:
            table[i] = OFLAG_ZERO
            raw = encode_table(table[i:i + 1])
        entry_offset = l2_offset + i * 8
        try:
            self.writer.write(entry_offset, raw, "active L2 table" if active else None)
        except MetadataOverlap:
            self.report("ERROR: Overlap check failed")
            raise
        self.refs.corruptions -= 1
        self.refs.corruptions_fixed += 1
        return True

    def data_on(self, host_offset: int, length: int, l2_offset: int, index: int) -> None:
        """A data or compressed cluster: note it if it lies on metadata."""
        first = host_offset >> self.cbits
        for cluster in range(first, ((host_offset + length - 1) >> self.cbits) + 1):
            what = self.metadata.get(cluster)
            if what is not None and cluster not in self.refs.overlaps:
                self.refs.overlaps[cluster] = (
                    f"both the {what} and a data cluster (L2 table 0x{l2_offset:x} "
                    f"entry {index})")

    def find_data_on_metadata(self) -> None:
        """Name the metadata clusters that something else references too.

        `data_on` catches a data cluster on metadata seen before it; this
        catches the rest: a cluster counted more often than the structures
        noted there account for.
        """
        counts = self.refs.counts
        overlaps = self.refs.overlaps
        for cluster, noted in self.noted.items():
            if cluster < len(counts) and counts[cluster] > noted and cluster not in overlaps:
                overlaps[cluster] = f"both the {self.metadata[cluster]} and a data cluster"

    # -- bitmaps -----------------------------------------------------------------

    def bitmaps(self, count_stale: bool) -> None:
        """QEMU's qcow2_check_bitmaps_refcounts."""
        bitmaps = self.meta.extensions.bitmaps
        header = self.header
        if bitmaps is None or not bitmaps.nb_bitmaps:
            return
        if not count_stale and not (header.version >= 3
                                    and header.autoclear_features & AUTOCLEAR_BITMAPS):
            return
        refs = self.refs
        refs.add(bitmaps.bitmap_directory_offset, bitmaps.bitmap_directory_size,
                 "bitmap directory")
        self.note(bitmaps.bitmap_directory_offset, bitmaps.bitmap_directory_size,
                  "bitmap directory")
        if bitmaps.bitmap_directory_size > MAX_BITMAP_DIRECTORY:
            raise FormatError("bitmap directory exceeds 64 MiB")
        directory = self.read(bitmaps.bitmap_directory_offset, bitmaps.bitmap_directory_size)
        pos = 0
        for number in range(bitmaps.nb_bitmaps):
            if pos + BITMAP_ENTRY_FIXED > len(directory):
                raise FormatError(f"bitmap directory ends before bitmap {number}")
            table_offset, table_size, _flags, _type, _gran, name_size, extra_size = \
                struct.unpack_from(">QIIBBHI", directory, pos)
            if (not table_size or not table_offset or table_offset % self.cs
                    or table_size * 8 > MAX_BITMAP_TABLE_BYTES):
                raise FormatError(f"bitmap {number} has an invalid bitmap table")
            refs.add(table_offset, table_size * 8, "bitmap table")
            self.note(table_offset, table_size * 8, "bitmap table")
            table = decode_table(self.read(table_offset, table_size * 8))
            for entry in table:
                offset = entry & BITMAP_TABLE_OFFSET_MASK
                if entry & BITMAP_TABLE_RESERVED_MASK or (
                        offset and (entry & BITMAP_TABLE_ALL_ONES or offset % self.cs)):
                    refs.corruptions += 1
                    continue
                if offset:
                    refs.add(offset, self.cs, "bitmap data")
                    self.note(offset, self.cs, "bitmap data")
            pos += (BITMAP_ENTRY_FIXED + extra_size + name_size + 7) & ~7

    # -- refcount blocks ---------------------------------------------------------

    def refcount_blocks(self) -> None:
        """QEMU's check_refblocks: each block is referenced once, inside the file."""
        header = self.header
        refs = self.refs
        cs = self.cs
        raw = self.read(header.refcount_table_offset, header.refcount_table_clusters * cs)
        for index, entry in enumerate(decode_table(raw)):
            offset = entry & REFT_OFFSET_MASK
            cluster = offset >> self.cbits
            if entry & REFT_RESERVED_MASK:
                self.report(f"ERROR refcount table entry {index} has reserved bits set")
                refs.corruptions += 1
                refs.rebuild = True
                continue
            if offset & (cs - 1):
                self.report(f"ERROR refcount block {index} is not cluster aligned; "
                            "refcount table entry corrupted")
                refs.corruptions += 1
                refs.rebuild = True
                continue
            if cluster >= len(refs.counts):
                refs.corruptions += 1
                repairing = bool(self.fix & Fix.ERRORS)
                self.report(f"{'Repairing' if repairing else 'ERROR'} refcount block {index} "
                            "is outside image")
                if repairing:
                    assert self.writer is not None
                    try:
                        if offset > MAX_FILE_OFFSET - cs:
                            raise OSError(errno.EINVAL, "Invalid argument")
                        self.writer.grow(offset + cs)
                    except OSError as exc:
                        refs.rebuild = True
                        self.report(f"ERROR could not resize image: {exc.strerror or exc}")
                        continue
                    refs.file_size = self.file.size()
                    grown = -(-refs.file_size // cs)
                    if grown > len(refs.counts):
                        refs.counts.extend(array(refs.counts.typecode,
                                                 bytes(refs.counts.itemsize
                                                       * (grown - len(refs.counts)))))
                    refs.corruptions -= 1
                    refs.corruptions_fixed += 1
                    refs.add(offset, cs, "refcount block")
                    self.note(offset, cs, "refcount block")
                continue
            if offset:
                refs.add(offset, cs, "refcount block")
                self.note(offset, cs, "refcount block")
                if refs.counts[cluster] != 1:
                    self.report(f"ERROR refcount block {index} refcount={refs.counts[cluster]}")
                    refs.corruptions += 1
                    refs.rebuild = True


class PlainTables:
    """Recognise, with bytes operations, a standard L2 table that holds
    nothing but plain data clusters: the common case, worth a fast path."""

    def __init__(self, cluster_bits: int) -> None:
        self.cluster_bits = cluster_bits
        cs = 1 << cluster_bits
        # The bits that make an entry anything but an aligned data cluster
        # without reserved bits.
        self.slow = OFLAG_COMPRESSED | L2E_STD_RESERVED_MASK | OFLAG_ZERO | (
            (cs - 1) & L2E_OFFSET_MASK)
        # Those bits in bytes 1-7 of an entry: (byte, translate table that
        # keeps only them).  Byte 0 may hold COPIED and nothing else.
        self.low_byte_checks = [
            (k, bytes(b & mask for b in range(256)))
            for k in range(1, 8) if (mask := (self.slow >> ((7 - k) * 8)) & 0xFF)
        ]

    def clusters(self, raw: bytes) -> list[int] | range | None:
        """The host clusters of the table's entries, in order (zeros left
        out); None if the table holds anything but plain data clusters."""
        n = len(raw) // 8
        copied = raw[0::8]
        if copied.translate(None, b"\x00\x80"):
            return None
        for k, mask_table in self.low_byte_checks:
            if raw[k::8].translate(mask_table).count(0) != n:
                return None
        entries = bytearray(raw)
        entries[0::8] = bytes(n)
        offsets = decode_table(entries)
        cbits = self.cluster_bits
        first = offsets[0] >> cbits if n else 0
        if first and offsets == array("Q", range(first << cbits, (first + n) << cbits,
                                                 1 << cbits)):
            return range(first, first + n)  # the usual: a run of fresh clusters
        # COPIED without an offset is QEMU's "unallocated": not plain.  With
        # COPIED moved to the (zero) low byte, such an entry reads 0x80.
        entries[7::8] = copied
        pattern = bytes(7) + b"\x80"
        found = entries.find(pattern)
        while found >= 0:
            if found % 8 == 0:
                return None
            found = entries.find(pattern, found + 1)
        return [offset >> cbits for offset in offsets if offset]


# -- rebuilding ------------------------------------------------------------------


def rebuild_refcounts(file: HostFile, meta: Metadata, barrier: Callable[[], None]) -> None:
    """Write fresh refcount structures matching the references; switch to them.

    For a writable open of a dirty image.  The old table and blocks are not
    counted, so once the header points to the new ones they are free space.
    Bitmaps are counted even when stale: their clusters stay reserved.
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
    counts.extend(array(counts.typecode, [1]) * (total - first_new))
    table_offset_cluster = first_new + blocks
    reftable = array("Q", bytes(table_clusters * cs))
    for table_index in range(blocks):
        values = counts[table_index * entries:(table_index + 1) * entries]
        file.pwrite_sync((first_new + table_index) * cs, codec.encode_block(values, cs))
        reftable[table_index] = (first_new + table_index) * cs
    file.pwrite_sync(table_offset_cluster * cs, encode_table(reftable))
    barrier()
    file.pwrite_sync(REFCOUNT_TABLE_FIELD, struct.pack(">QI", table_offset_cluster * cs,
                                                       table_clusters))
    barrier()
    header.refcount_table_offset = table_offset_cluster * cs
    header.refcount_table_clusters = table_clusters


def rebuild_refcount_structure(meta: Metadata, counts: array,
                               write: Callable[[int, bytes], None],
                               write_header: Callable[[int, bytes], None],
                               barrier: Callable[[], None],
                               avoid: set[int] | frozenset[int] = frozenset()) -> None:
    """QEMU's rebuild_refcount_structure: new refcount blocks and table from
    `counts`, placed first-fit where no count claims a cluster.

    `counts` must count the old refcount structures too (so nothing is
    written over them); it is updated with the new structures' clusters.
    Nothing is placed on a cluster in `avoid` either (clusters that entries
    name past the end of the file: QEMU would put structures there).
    Every block is written (`write`), then the table, then after a barrier
    the header is switched in one write (`write_header`), then a barrier.
    """
    header = meta.header
    cs = header.cluster_size
    codec = RefcountCodec(header.refcount_order)
    per_block = codec.entries_per_block(cs)
    entries_per_table_cluster = cs // 8
    reftable: list[int] = []

    def write_blocks(first: int, end: int) -> bool:
        """Allocate and write the blocks of clusters [first, end); True if
        the table had to grow."""
        grown = False
        first_free = 0
        cluster = _next_nonzero(counts, first, end)
        while cluster < end:
            index = cluster // per_block
            start = index * per_block
            if index < len(reftable) and reftable[index]:
                block_offset = reftable[index]
            else:
                first_free = max(first_free, start)
                block_cluster = _allocate(counts, 1, first_free, avoid)
                first_free = block_cluster
                end = max(end, block_cluster + 1)
                if index >= len(reftable):
                    wanted = -(-(index + 1) // entries_per_table_cluster) \
                        * entries_per_table_cluster
                    reftable.extend([0] * (wanted - len(reftable)))
                    grown = True
                block_offset = block_cluster * cs
                reftable[index] = block_offset
            write(block_offset, codec.encode_block(counts[start:start + per_block], cs))
            cluster = _next_nonzero(counts, start + per_block, end)
        return grown

    write_blocks(0, len(counts))
    while True:
        table_clusters = -(-len(reftable) * 8 // cs)
        table_cluster = _allocate(counts, table_clusters, 0, avoid)
        if not write_blocks(table_cluster, table_cluster + table_clusters):
            break
    write(table_cluster * cs, encode_table(array("Q", reftable)).ljust(table_clusters * cs,
                                                                      b"\0"))
    barrier()
    write_header(REFCOUNT_TABLE_FIELD, struct.pack(">QI", table_cluster * cs, table_clusters))
    barrier()
    header.refcount_table_offset = table_cluster * cs
    header.refcount_table_clusters = table_clusters


_SCAN_CHUNK = 1 << 16  # counts scanned per bytes search


def _next_nonzero(counts: array, start: int, end: int) -> int:
    """The first index in [start, end) with a non-zero count, else `end`."""
    itemsize = counts.itemsize
    pos = start
    while pos < end:
        chunk = counts[pos:min(end, pos + _SCAN_CHUNK)].tobytes()
        skipped = len(chunk) - len(chunk.lstrip(b"\0"))
        if skipped < len(chunk):
            return pos + skipped // itemsize
        pos += _SCAN_CHUNK
    return end


def _next_zero(counts: array, start: int) -> int:
    """The first index >= `start` with a zero count, else len(counts)."""
    itemsize = counts.itemsize
    zero = bytes(itemsize)
    pos = start
    while pos < len(counts):
        chunk = counts[pos:pos + _SCAN_CHUNK].tobytes()
        found = chunk.find(zero)
        while found >= 0 and found % itemsize:
            found = chunk.find(zero, found + itemsize - found % itemsize)
        if found >= 0:
            return pos + found // itemsize
        pos += _SCAN_CHUNK
    return len(counts)


def _allocate(counts: array, count: int, start: int,
              avoid: set[int] | frozenset[int] = frozenset()) -> int:
    """QEMU's alloc_clusters_imrt: the first run of `count` free clusters at
    or after `start` (growing `counts` past the end if need be), none in
    `avoid`, marked used."""
    zeros = array(counts.typecode, bytes(counts.itemsize * count))
    cluster = _next_zero(counts, start)
    while True:
        if cluster < len(counts) and \
                counts[cluster:cluster + count] != zeros[:len(counts) - cluster]:
            cluster = _next_zero(counts, _next_nonzero(counts, cluster, len(counts)))
            continue
        # A run of `count`, or a free tail of the array (or past its end).
        clash = [c for c in avoid if cluster <= c < cluster + count]
        if not clash:
            break
        cluster = max(clash) + 1
        if cluster < len(counts):
            cluster = _next_zero(counts, cluster)
    if cluster + count > len(counts):
        counts.extend(array(counts.typecode, bytes(counts.itemsize
                                                    * (cluster + count - len(counts)))))
    for i in range(cluster, cluster + count):
        counts[i] = 1
    return cluster
