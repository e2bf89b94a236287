"""L1, L2 and refcount-table entries, and compressed-cluster descriptors.

These are decoded on the per-request path, so they are plain integers and
`array('Q')`, never construct (docs/interop/qcow2.txt, "Cluster mapping").
"""

from __future__ import annotations

import sys
from array import array

# L1 entry: bits 9-55 are the L2 table's host offset; bit 63 is COPIED.
L1E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L1E_RESERVED_MASK = 0x7F00_0000_0000_01FF
# L2 entry (standard cluster): bits 9-55 host offset, bit 0 zero flag.
L2E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2E_STD_RESERVED_MASK = 0x3F00_0000_0000_01FE
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
# Refcount table entry: bits 9-63.
REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
REFT_RESERVED_MASK = 0x1FF

SUBCLUSTERS_PER_CLUSTER = 32
# Extended L2 bitmap: bit x allocates subcluster x, bit 32+x zeroes it.
SUBCLUSTER_ALLOC_MASK = 0xFFFF_FFFF
COMPRESSED_SECTOR_SIZE = 512

_NATIVE_IS_BIG = sys.byteorder == "big"


def decode_table(buf: bytes | bytearray | memoryview) -> array:
    """Big-endian 64-bit entries → `array('Q')` of host-order integers."""
    table = array("Q")
    table.frombytes(buf)
    if not _NATIVE_IS_BIG:
        table.byteswap()
    return table


def encode_table(table: array) -> bytes:
    """The inverse of `decode_table`."""
    if _NATIVE_IS_BIG:
        return table.tobytes()
    copy = array("Q", table)
    copy.byteswap()
    return copy.tobytes()


def l2_entries_per_table(cluster_bits: int, extended_l2: bool) -> int:
    """Guest clusters one L2 table maps: 8-byte entries, 16 with extended L2."""
    return (1 << cluster_bits) // (16 if extended_l2 else 8)


class CompressedLayout:
    """The split of a compressed-cluster descriptor for one cluster size.

    Bits 0..x-1 hold the host byte offset, bits x..61 the number of
    additional 512-byte sectors, with x = 62 - (cluster_bits - 8).
    """

    __slots__ = ("cluster_bits", "size_shift", "offset_mask", "sectors_mask")

    def __init__(self, cluster_bits: int) -> None:
        self.cluster_bits = cluster_bits
        self.size_shift = 62 - (cluster_bits - 8)
        self.offset_mask = (1 << self.size_shift) - 1
        self.sectors_mask = (1 << (cluster_bits - 8)) - 1

    def decode(self, entry: int) -> tuple[int, int]:
        """(host offset, byte count to read) of a compressed L2 entry.

        The byte count runs from the offset to the end of the last sector
        the descriptor covers; the compressed stream may end before it.
        """
        host_offset = entry & self.offset_mask
        sectors = ((entry >> self.size_shift) & self.sectors_mask) + 1
        length = sectors * COMPRESSED_SECTOR_SIZE - (host_offset % COMPRESSED_SECTOR_SIZE)
        return host_offset, length

    def encode(self, host_offset: int, length: int) -> int:
        """A compressed L2 entry for `length` bytes at `host_offset` (no COPIED)."""
        first_sector = host_offset // COMPRESSED_SECTOR_SIZE
        last_sector = (host_offset + length - 1) // COMPRESSED_SECTOR_SIZE
        extra_sectors = last_sector - first_sector
        if extra_sectors > self.sectors_mask or host_offset > self.offset_mask:
            raise ValueError("compressed cluster does not fit a descriptor")
        return OFLAG_COMPRESSED | (extra_sectors << self.size_shift) | host_offset
