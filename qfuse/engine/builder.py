"""`ImageBuilder`: writes a brand-new qcow2 image front to back.

Used by `create` (preallocated metadata) and by `convert` (streaming data
in).  Nothing else has the file open, so there is no table cache, no
allocation search and no write ordering: host clusters are handed out in
increasing order from a bump pointer, every allocation counts one reference
in an in-memory refcount array, and `finish` writes the refcount blocks and
table, the L1 table and, last of all, the header.  Until then the file does
not even start with the qcow2 magic, so a crash leaves nothing that looks
like a valid image.

Where the refcount structures go:

* ``expected_clusters`` given (create: the caller knows every cluster it
  will allocate): right after the header, as QEMU does (table at cluster 1,
  blocks after it), then the L1 table.  Exactly QEMU's layout for images
  whose L1 table one refcount block covers.
* not given (convert): after everything else, sized once the data is in.

Compressed clusters are packed byte by byte as QEMU packs them; every host
cluster a compressed cluster touches (counted in whole 512-byte sectors, as
`qemu-img check` counts them) gets one reference.  When that would overflow
a narrow refcount, the compressed cluster starts in a fresh host cluster.
"""

from __future__ import annotations

import os
from array import array

from qfuse.errors import FormatError
from qfuse.format import layout
from qfuse.format.entries import (
    COMPRESSED_SECTOR_SIZE,
    OFLAG_COPIED,
    CompressedLayout,
    encode_table,
)
from qfuse.format.refcount import RefcountCodec

WRITE_BUFFER_BYTES = 8 * 1024 * 1024
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 1024


class ImageBuilder:
    """A new qcow2 image being written into `fd` (an empty, writable file)."""

    def __init__(self, fd: int, spec: layout.ImageSpec, *,
                 expected_clusters: int | None = None) -> None:
        layout.check_spec(spec)
        self.fd = fd
        self.spec = spec
        self.cluster_size = spec.cluster_size
        self.codec = RefcountCodec(spec.refcount_order)
        self.compressed = CompressedLayout(spec.cluster_bits)
        self.counts = array("Q")
        self._next_byte = 0  # host offset of the next free byte (compressed packing)
        self._pending: list[bytes | memoryview] = []  # adjacent writes not yet made
        self._pending_at = 0
        self._pending_bytes = 0
        self.l1 = array("Q", bytes(8 * spec.l1_size))
        self.allocate_clusters(1)  # the header
        self.front_refcounts: tuple[int, int, int] | None = None  # (table at, blocks at, n)
        if expected_clusters is not None:
            blocks, table = layout.refcount_metadata_clusters(
                expected_clusters, self.cluster_size, spec.refcount_order
            )
            table_at = self.allocate_clusters(table)
            blocks_at = self.allocate_clusters(blocks)
            self.front_refcounts = (table_at, blocks_at, blocks)
        l1_clusters = -(-8 * spec.l1_size // self.cluster_size)
        self.l1_offset = self.allocate_clusters(l1_clusters) if l1_clusters else 0

    # -- allocation ----------------------------------------------------------

    def allocate_clusters(self, count: int) -> int:
        """`count` fresh contiguous host clusters, one reference each.

        They start at the next cluster boundary: the rest of a cluster
        holding compressed data stays unused.  `counts` always covers
        exactly the clusters up to the bump pointer, so the new ones are
        appended to it.
        """
        start = -(-self._next_byte // self.cluster_size)
        assert start == len(self.counts)
        self._next_byte = (start + count) * self.cluster_size
        self.counts.extend(array("Q", [1]) * count)
        return start * self.cluster_size

    def allocate_compressed(self, length: int) -> int:
        """Host offset for `length` bytes of one compressed cluster, packed."""
        cs = self.cluster_size
        offset = self._next_byte
        first, last = self._touched(offset, length)
        if any(self.counts[i] >= self.codec.max_value
               for i in range(first, min(last + 1, len(self.counts)))):
            offset = -(-offset // cs) * cs  # start a fresh cluster
            first, last = self._touched(offset, length)
        self.counts.extend(array("Q", [0]) * (last + 1 - len(self.counts)))
        for index in range(first, last + 1):
            self.counts[index] += 1
        self._next_byte = offset + length
        return offset

    def _touched(self, offset: int, length: int) -> tuple[int, int]:
        """First and last host cluster of the sectors a descriptor covers."""
        sector = COMPRESSED_SECTOR_SIZE
        start = offset // sector * sector
        end = -(-(offset + length) // sector) * sector
        return start // self.cluster_size, (end - 1) // self.cluster_size

    # -- writing -------------------------------------------------------------

    def append(self, host_offset: int, data: bytes | memoryview) -> None:
        """Write `data` at `host_offset`, gathering runs of adjacent writes.

        `data` is kept, not copied, until `flush`: it must not change.
        """
        if self._pending and host_offset != self._pending_at + self._pending_bytes:
            self.flush()
        if not self._pending:
            self._pending_at = host_offset
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= WRITE_BUFFER_BYTES or len(self._pending) >= _IOV_MAX:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            pwritev_all(self.fd, self._pending_at, self._pending)
            self._pending = []
            self._pending_bytes = 0

    def write_l2(self, l1_index: int, l2_offset: int, table: array) -> None:
        """Write an L2 table (entries as host integers) and point L1 at it."""
        pwrite_all(self.fd, l2_offset, encode_table(table))
        self.l1[l1_index] = l2_offset | OFLAG_COPIED

    def finish(self, file_end: int | None = None) -> None:
        """Refcounts, the L1 table, then the header; the file is then an image."""
        self.flush()
        cs = self.cluster_size
        if self.front_refcounts is not None:
            table_at, blocks_at, blocks = self.front_refcounts
            if len(self.counts) > blocks * self.codec.entries_per_block(cs):
                raise AssertionError("front refcount blocks are too few for the image")
            table_clusters = (blocks_at - table_at) // cs
        else:
            blocks, table_clusters = layout.refcount_metadata_clusters(
                len(self.counts), cs, self.spec.refcount_order
            )
            blocks_at = self.allocate_clusters(blocks)
            table_at = self.allocate_clusters(table_clusters)
        self._write_refcounts(table_at, table_clusters, blocks_at, blocks)
        if self.l1_offset:
            pwrite_all(self.fd, self.l1_offset, encode_table(self.l1))
        end = max(self._next_byte if self.front_refcounts is None else 0,
                  file_end or 0, os.fstat(self.fd).st_size)
        if os.fstat(self.fd).st_size < end:
            os.ftruncate(self.fd, end)
        header = layout.header_cluster(
            self.spec, l1_offset=self.l1_offset, l1_size=self.spec.l1_size,
            reftable_offset=table_at, reftable_clusters=table_clusters,
        )
        pwrite_all(self.fd, 0, header)

    def _write_refcounts(self, table_at: int, table_clusters: int, blocks_at: int,
                         blocks: int) -> None:
        cs = self.cluster_size
        per_block = self.codec.entries_per_block(cs)
        if len(self.counts) > blocks * per_block:
            raise FormatError("refcount blocks do not cover the image")
        table = array("Q", bytes(table_clusters * cs))
        for index in range(blocks):
            counts = self.counts[index * per_block:(index + 1) * per_block]
            block = layout.encode_refcount_block(counts, self.codec, cs)
            pwrite_all(self.fd, blocks_at + index * cs, block)
            table[index] = blocks_at + index * cs
        pwrite_all(self.fd, table_at, encode_table(table))


def pwrite_all(fd: int, host_offset: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], host_offset + done)


def pwritev_all(fd: int, host_offset: int, buffers: list[bytes | memoryview]) -> None:
    """One gathered write of `buffers` at `host_offset` (resumed if short)."""
    views = [memoryview(b) for b in buffers]
    remaining = sum(len(v) for v in views)
    first = 0
    while remaining:
        done = os.pwritev(fd, views[first:], host_offset)
        host_offset += done
        remaining -= done
        while remaining and done >= len(views[first]):  # a short write: skip what went
            done -= len(views[first])
            first += 1
        if remaining and done:
            views[first] = views[first][done:]
