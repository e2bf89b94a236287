"""Refcount block entries of any width, 1 to 64 bits (refcount_order 0-6).

A block is kept as its on-disk bytes (a bytearray), so writing it back is
one `pwrite` with no encoding.  Entries narrower than a byte are packed with
bit 0 as the least significant bit of each byte (docs/interop/qcow2.txt,
"Refcount block entry").
"""

from __future__ import annotations


class RefcountCodec:
    """Get and set entries of one refcount width."""

    __slots__ = ("order", "bits", "max_value", "entry_bytes", "entries_per_byte")

    def __init__(self, refcount_order: int) -> None:
        self.order = refcount_order
        self.bits = 1 << refcount_order
        self.max_value = (1 << self.bits) - 1
        self.entry_bytes = self.bits // 8  # 0 for sub-byte widths
        self.entries_per_byte = 8 // self.bits if self.bits < 8 else 0

    def entries_per_block(self, cluster_size: int) -> int:
        return cluster_size * 8 // self.bits

    def get(self, block: bytearray, index: int) -> int:
        if self.entry_bytes:
            start = index * self.entry_bytes
            return int.from_bytes(block[start:start + self.entry_bytes], "big")
        byte, slot = divmod(index, self.entries_per_byte)
        return (block[byte] >> (slot * self.bits)) & self.max_value

    def set(self, block: bytearray, index: int, value: int) -> None:
        if not 0 <= value <= self.max_value:
            raise OverflowError(f"refcount {value} does not fit {self.bits} bits")
        if self.entry_bytes:
            start = index * self.entry_bytes
            block[start:start + self.entry_bytes] = value.to_bytes(self.entry_bytes, "big")
            return
        byte, slot = divmod(index, self.entries_per_byte)
        shift = slot * self.bits
        block[byte] = (block[byte] & ~(self.max_value << shift) & 0xFF) | (value << shift)

    def find_zero_run(self, block: bytearray, start: int, count: int) -> int:
        """First index >= `start` where `count` entries (up to the block's
        end) are all zero; the run may be cut by the end of the block, in
        which case the returned index starts a zero tail.  -1 if none."""
        total = len(block) * 8 // self.bits
        if self.entry_bytes:
            width = self.entry_bytes
            want = min(count, total - start) if start < total else 0
            if want <= 0:
                return -1
            needle = bytes(width * want)
            pos = start * width
            while True:
                found = block.find(needle, pos)
                if found < 0:
                    # A shorter zero tail can still start a run that goes on
                    # into the next block.
                    return self._zero_tail(block, start, total)
                if found % width == 0:
                    return found // width
                pos = found + (width - found % width)
        run = 0
        for index in range(start, total):
            if self.get(block, index) == 0:
                run += 1
                if run == count:
                    return index - count + 1
            else:
                run = 0
        return total - run if run else -1

    def _zero_tail(self, block: bytearray, start: int, total: int) -> int:
        index = total
        while index > start and self.get(block, index - 1) == 0:
            index -= 1
        return index if index < total else -1
