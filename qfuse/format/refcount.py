"""Refcount block entries of any width, 1 to 64 bits (refcount_order 0-6).

A block is kept as its on-disk bytes (a bytearray), so writing it back is
one `pwrite` with no encoding.  Entries narrower than a byte are packed with
bit 0 as the least significant bit of each byte (docs/interop/qcow2.txt,
"Refcount block entry").
"""

from __future__ import annotations

import sys
from array import array

_NATIVE_IS_BIG = sys.byteorder == "big"
# An array typecode holding one entry of each whole-byte width.
_TYPECODES = {8: "B", 16: "H", 32: "I", 64: "Q"}


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

    @property
    def typecode(self) -> str:
        """The `array` typecode of decoded entries: one item per entry, wide
        enough for `max_value` (``B`` for the sub-byte widths)."""
        return _TYPECODES.get(self.bits, "B")

    def decode_block(self, block: bytes | bytearray) -> array:
        """Every entry of `block`, one array item each (see `typecode`)."""
        if self.entry_bytes:
            values = array(self.typecode)
            values.frombytes(block[:len(block) - len(block) % self.entry_bytes])
            if self.entry_bytes > 1 and not _NATIVE_IS_BIG:
                values.byteswap()
            return values
        per_byte = self.entries_per_byte
        out = bytearray(len(block) * per_byte)
        raw = bytes(block)
        for slot, table in enumerate(self._tables()[0]):
            out[slot::per_byte] = raw.translate(table)
        return array("B", out)

    def _tables(self) -> tuple[list[bytes], list[bytes]]:
        """bytes.translate tables of the sub-byte widths, per slot in a byte:
        (byte -> that slot's entry, entry -> byte with it in that slot)."""
        shifts = [slot * self.bits for slot in range(self.entries_per_byte)]
        return (
            [bytes((b >> s) & self.max_value for b in range(256)) for s in shifts],
            [bytes((b << s) & 0xFF for b in range(256)) for s in shifts],
        )

    def encode_block(self, values: array, size: int) -> bytes:
        """The inverse of `decode_block`, zero-padded to `size` bytes.

        Every value must fit `bits` (not checked here)."""
        if self.entry_bytes:
            swap = self.entry_bytes > 1 and not _NATIVE_IS_BIG
            if swap or values.typecode != self.typecode:
                values = array(self.typecode, values)  # a copy: the caller's stays as it is
                if swap:
                    values.byteswap()
            return values.tobytes().ljust(size, b"\0")
        per_byte = self.entries_per_byte
        raw = bytes(values).ljust(size * per_byte, b"\0")
        packed = 0
        for slot, table in enumerate(self._tables()[1]):
            packed |= int.from_bytes(raw[slot::per_byte].translate(table), "little")
        return packed.to_bytes(size, "little")

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
