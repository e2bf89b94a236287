"""The internal snapshot table (docs/interop/qcow2.txt, "Snapshots").

Entries have variable length: a 40-byte fixed part, extra data, the ID and
the name, padded to 8 bytes.  Read on open only, so construct is fine here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from construct import Int16ub, Int32ub, Int64ub, Struct

from qfuse.errors import FormatError

MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_TABLE_SIZE = 64 * 1024 * 1024
MAX_SNAPSHOT_EXTRA_DATA = 1024
FIXED_ENTRY_SIZE = 40
# QEMU keeps names in a char[256]: longer ones it cuts when it lists them.
MAX_SNAPSHOT_NAME = 255

SnapshotFixedStruct = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
)


@dataclass
class Snapshot:
    """One snapshot table entry.  `disk_size` is None when the extra data
    does not record it (old v2 images): the image's size applies."""

    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    extra_data: bytes

    @property
    def id_str(self) -> str:
        return self.id


def entry_size(fixed: bytes) -> int:
    """Size of an entry without its padding, from its first 40 bytes.

    The next entry starts at the next multiple of 8; the last entry's padding
    may be missing at the end of the file (QEMU does not write it).
    """
    parsed = SnapshotFixedStruct.parse(fixed)
    if parsed.extra_data_size > MAX_SNAPSHOT_EXTRA_DATA:
        raise FormatError(
            f"snapshot extra data of {parsed.extra_data_size} bytes exceeds "
            f"{MAX_SNAPSHOT_EXTRA_DATA}"
        )
    return FIXED_ENTRY_SIZE + parsed.extra_data_size + parsed.id_str_size + parsed.name_size


def parse_entry(buf: bytes) -> Snapshot:
    """Decode one whole entry (`entry_size` bytes)."""
    fixed = SnapshotFixedStruct.parse(buf[:FIXED_ENTRY_SIZE])
    pos = FIXED_ENTRY_SIZE
    extra = bytes(buf[pos:pos + fixed.extra_data_size])
    pos += fixed.extra_data_size
    snap_id = bytes(buf[pos:pos + fixed.id_str_size]).decode("utf-8", "replace")
    pos += fixed.id_str_size
    name = bytes(buf[pos:pos + fixed.name_size]).decode("utf-8", "replace")
    vm_state_size = fixed.vm_state_size
    if len(extra) >= 8:
        vm_state_size = int.from_bytes(extra[0:8], "big")
    disk_size = int.from_bytes(extra[8:16], "big") if len(extra) >= 16 else None
    return Snapshot(
        l1_table_offset=fixed.l1_table_offset,
        l1_size=fixed.l1_size,
        id=snap_id,
        name=name,
        date_sec=fixed.date_sec,
        date_nsec=fixed.date_nsec,
        vm_clock_nsec=fixed.vm_clock_nsec,
        vm_state_size=vm_state_size,
        disk_size=disk_size,
        extra_data=extra,
    )


def build_entry(snap: Snapshot) -> bytes:
    """Encode one entry, padded to 8 bytes; the inverse of `parse_entry`."""
    id_bytes = snap.id.encode()
    name_bytes = snap.name.encode()
    fixed = SnapshotFixedStruct.build(
        dict(
            l1_table_offset=snap.l1_table_offset,
            l1_size=snap.l1_size,
            id_str_size=len(id_bytes),
            name_size=len(name_bytes),
            date_sec=snap.date_sec,
            date_nsec=snap.date_nsec,
            vm_clock_nsec=snap.vm_clock_nsec,
            vm_state_size=min(snap.vm_state_size, 0xFFFFFFFF) if len(snap.extra_data) < 8 else 0,
            extra_data_size=len(snap.extra_data),
        )
    )
    out = fixed + snap.extra_data + id_bytes + name_bytes
    return out + b"\0" * (-len(out) % 8)


def build_extra_data(disk_size: int, vm_state_size: int = 0, icount: int = 0) -> bytes:
    """The 24 bytes of extra data QEMU 7.2 writes for every snapshot it makes
    (v2 images too): 64-bit VM state size, disk size, icount.  `qemu-img
    snapshot -c` records icount 0 (listed as "0"); -1 would mean none."""
    return struct.pack(">QQQ", vm_state_size, disk_size, icount & 0xFFFF_FFFF_FFFF_FFFF)


def escape_name(name: str) -> str:
    """A snapshot name made safe to print on one line of a terminal.

    Every character that is not printable (C0 and C1 controls, DEL, line and
    paragraph separators, bidi and other format characters) becomes a
    Python-style escape: ``\\xNN`` below U+0100, else ``\\uNNNN`` or
    ``\\UNNNNNNNN``.  Everything else, backslashes included, stays as it is,
    so a name of printable characters reads exactly as `qemu-img snapshot -l`
    prints it.  The escape is for display only: commands take the real name
    (or the ID).
    """
    if name.isprintable():
        return name
    out = []
    for char in name:
        if char.isprintable():
            out.append(char)
        elif ord(char) < 0x100:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) < 0x10000:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return "".join(out)
