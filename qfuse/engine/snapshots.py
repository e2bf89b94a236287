"""Internal snapshots: list, create, apply (revert to) and delete, as QEMU does.

Refcounts count references per L1 table: a data cluster in an L2 table that
two L1 tables reach (the active one and a snapshot's) has refcount 2, and so
has the L2 table (QEMU's `qcow2_update_snapshot_refcount`, and what `qemu-img
check` counts).  COPIED (bit 63) in the active L1 and L2 tables says "refcount
exactly 1: write in place"; it must never be set on a shared cluster.

Ordering (QEMU's rule: an on-disk refcount may be too high, never too low),
with a *barrier* (`Writer.barrier`, fdatasync) between the steps:

create
    1. raise the refcounts of every L2 table and every cluster the active
       L1 reaches (compressed: every host cluster its bytes touch), and
       allocate the snapshot's L1 copy and the new snapshot table; write the
       refcount blocks; barrier;
    2. write the L1 copy, the active L2 tables and L1 without COPIED (shared
       now), and the new snapshot table; barrier;
    3. one header write of nb_snapshots and snapshots_offset; barrier;
    4. free the old snapshot table; write the refcount blocks; barrier.
apply
    1. raise the refcounts of what the snapshot's L1 reaches, allocate the
       new active L1; refcount blocks; barrier;
    2. write the new active L1 (the snapshot's, COPIED clear) and clear
       COPIED in its L2 tables; barrier;
    3. one header write of size, l1_size and l1_table_offset; barrier;
    4. lower the refcounts of what the old active L1 reached, and free it;
       refcount blocks; barrier;
    5. rebuild COPIED in the new active L1 and its L2 tables from the
       refcounts (spec: "must be reconstructed from the refcount table");
       barrier.
delete
    1. allocate the new snapshot table (without the entry); refcount
       blocks; barrier; write it; barrier;
    2. one header write of nb_snapshots and snapshots_offset; barrier;
    3. free the old table, lower the refcounts of what the snapshot's L1
       reached, free that L1; refcount blocks; barrier;
    4. set COPIED again in the active tables where a refcount dropped to 1;
       barrier.

So a crash at any instant leaves at most leaked clusters (and, inside a
step, COPIED flags `qemu-img check -r all` sets right, as with QEMU).  Before
step 1 every operation checks, reading only, that the refcounts it will
change are in range (none 0 that is in use, none that would overflow, as
with 1-bit refcounts, which cannot share a cluster): a refusal leaves the
file untouched.

Snapshot table entries of other snapshots are copied byte for byte, so
names that are not UTF-8 and extra data qfuse does not know survive.  A
snapshot is found QEMU's way: by ID first, then by name.

Concurrency: an operation holds the writer's `metadata_lock` throughout; it
is meant for an image opened for it alone (the CLI), which is closed after.
"""

from __future__ import annotations

import logging
import struct
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import trio

from qfuse.engine import metadata as meta_mod
from qfuse.engine.hostfile import HostFile
from qfuse.engine.info import snapshot_info
from qfuse.engine.locking import ImageLock
from qfuse.engine.qcow2 import Qcow2Image, SnapshotInfo
from qfuse.errors import FormatError, ImageError, MetadataCorruption, UsageError
from qfuse.format import snapshots as snapfmt
from qfuse.format.entries import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    encode_table,
)
from qfuse.format.snapshots import Snapshot, escape_name

log = logging.getLogger(__name__)

HEADER_SIZE_FIELDS = 24  # size u64, crypt_method u32, l1_size u32, l1_table_offset u64
HEADER_SNAPSHOT_FIELDS = 60  # nb_snapshots u32, snapshots_offset u64

T = TypeVar("T")


# -- the command-line entry points (synchronous) ------------------------------------


def list_snapshots(path: str) -> list[dict[str, Any]]:
    """The snapshots, as `qemu-img info --output json` lists them.

    Takes the read lock like `qemu-img snapshot -l`, so an image that QEMU or
    qfuse has open read-write is refused.
    """
    file = HostFile(path)
    try:
        ImageLock.acquire(file.fd, path, write=False)
        try:
            meta = meta_mod.read_metadata(file)
        except FormatError as exc:
            raise ImageError(path, str(exc)) from None
    finally:
        file.close()  # drops the lock with the descriptor
    return [snapshot_info(s) for s in meta.snapshots]


def create_snapshot(path: str, name: str) -> Snapshot:
    """Snapshot the active layer as `name`; the new entry."""
    return _run(path, lambda editor: editor.create(name))


def apply_snapshot(path: str, wanted: str) -> Snapshot:
    """Revert the active layer to snapshot `wanted` (ID or name)."""
    return _run(path, lambda editor: editor.apply(wanted))


def delete_snapshot(path: str, wanted: str) -> Snapshot:
    """Delete snapshot `wanted` (ID or name); the entry it had."""
    return _run(path, lambda editor: editor.delete(wanted))


def _run(path: str, operation: Callable[[SnapshotEditor], Awaitable[T]]) -> T:
    image = Qcow2Image(path, read_only=False)  # the write lock; no backing chain needed
    try:
        editor = SnapshotEditor(image)

        async def main() -> T:
            return await operation(editor)

        return trio.run(main)
    except MetadataCorruption as exc:
        raise ImageError(path, f"{exc.where}: {exc.reason}") from None
    except OSError as exc:
        raise ImageError(path, exc.strerror or str(exc)) from None
    finally:
        image.close()


# -- the operations --------------------------------------------------------------------


class SnapshotEditor:
    """Changes the snapshot table of one writable, open image."""

    def __init__(self, image: Qcow2Image) -> None:
        if image.writer is None or image.snapshot is not None:
            raise ValueError("a snapshot editor needs the writable active layer")
        if image.data_file is not None:
            raise ImageError(image.path, "internal snapshots are not supported with an "
                             "external data file (nor are they in QEMU)")
        self.image = image
        self.path = image.path
        self.writer = image.writer
        self.refcounts = image.writer.refcounts
        self.file = image.file
        self.header = image.header
        self.cluster_bits = image.cluster_bits
        self.cluster_size = image.cluster_size
        self.step = 2 if image.extended_l2 else 1  # L2 entry width in 64-bit words
        self.entries: list[tuple[Snapshot, bytes]] = self._read_entries()

    def _read_entries(self) -> list[tuple[Snapshot, bytes]]:
        """Each entry parsed, and its bytes without padding (already checked at open)."""
        header = self.header
        entries = []
        pos = header.snapshots_offset
        for _ in range(header.nb_snapshots):
            size = snapfmt.entry_size(self.file.pread_sync(pos, snapfmt.FIXED_ENTRY_SIZE))
            raw = self.file.pread_sync(pos, size)
            entries.append((snapfmt.parse_entry(raw), raw))
            pos += (size + 7) & ~7
        return entries

    # -- create ----------------------------------------------------------------------

    async def create(self, name: str) -> Snapshot:
        self._check_new_name(name)
        if len(self.entries) >= snapfmt.MAX_SNAPSHOTS:
            raise ImageError(self.path, f"the image has {snapfmt.MAX_SNAPSHOTS} snapshots, "
                             "the most qcow2 allows")
        header, image = self.header, self.image
        active = array("Q", image.l1)
        now = time.time_ns()
        snap = Snapshot(l1_table_offset=0, l1_size=header.l1_size, id=self._next_id(),
                        name=name, date_sec=now // 1_000_000_000,
                        date_nsec=now % 1_000_000_000 // 1000 * 1000,  # QEMU keeps µs
                        vm_clock_nsec=0, vm_state_size=0, disk_size=header.size,
                        extra_data=snapfmt.build_extra_data(disk_size=header.size))
        table_size = len(_join_entries([r for _, r in self.entries] + [_entry_bytes(snap)]))
        if table_size > snapfmt.MAX_SNAPSHOT_TABLE_SIZE:
            raise ImageError(self.path, "the snapshot table would exceed QEMU's limit of "
                             f"{snapfmt.MAX_SNAPSHOT_TABLE_SIZE >> 20} MiB")
        async with self.writer.metadata_lock:
            await self._check_change(active, "active L1 table", +1)
            # 1. Refcounts up, new clusters allocated, durable.
            await self._change_reachable(active, "active L1 table", +1)
            l1_bytes = header.l1_size * 8
            if l1_bytes:
                snap.l1_table_offset = await self._allocate(l1_bytes, "snapshot L1 table")
            entries = [*self.entries, (snap, _entry_bytes(snap))]
            table = _join_entries([r for _, r in entries])
            table_offset = await self._allocate(len(table), "snapshot table")
            await self._flush_refcounts()
            # 2. The snapshot's L1, the active tables without COPIED, the table.
            shared = array("Q", (e & ~OFLAG_COPIED for e in active))
            if l1_bytes:
                await self.file.pwrite(snap.l1_table_offset, encode_table(shared))
            await self._rebuild_copied(active, "active L1 table", from_refcounts=False)
            if shared != active:
                await self.file.pwrite(header.l1_table_offset, encode_table(shared))
            image.l1 = shared
            await self.file.pwrite(table_offset, table)
            await self.writer.barrier()
            # 3. The switch; 4. the old table is free.
            await self._switch_table(entries, table_offset, len(table))
        return snap

    def _check_new_name(self, name: str) -> None:
        if not name:
            raise UsageError(None, "a snapshot name must not be empty")
        try:
            encoded = name.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(None, f"snapshot name '{escape_name(name)}' is not valid "
                             "UTF-8") from None
        if len(encoded) > snapfmt.MAX_SNAPSHOT_NAME:
            raise UsageError(None, f"a snapshot name has at most {snapfmt.MAX_SNAPSHOT_NAME} "
                             f"bytes, this one {len(encoded)}")
        for snap, _ in self.entries:
            if snap.name == name:
                raise ImageError(self.path, f"a snapshot named '{escape_name(name)}' exists "
                                 f"already (ID {escape_name(snap.id)})")

    def _next_id(self) -> str:
        """QEMU's find_new_snapshot_id: one more than the largest numeric ID
        (an ID's leading digits, as strtoul reads them)."""
        largest = 0
        for snap, _ in self.entries:
            digits = ""
            for char in snap.id.lstrip():
                if not char.isascii() or not char.isdigit():
                    break
                digits += char
            largest = max(largest, int(digits or "0"))
        return str(largest + 1)

    # -- apply -----------------------------------------------------------------------

    async def apply(self, wanted: str) -> Snapshot:
        snap = self._find(wanted)
        header, image = self.header, self.image
        what = f"L1 table of snapshot {escape_name(snap.id)}"
        snap_l1 = meta_mod.read_l1(self.file, snap.l1_table_offset, snap.l1_size)
        old_l1 = array("Q", image.l1)
        old_offset, old_size = header.l1_table_offset, header.l1_size
        disk_size = snap.disk_size if snap.disk_size is not None else header.size
        async with self.writer.metadata_lock:
            await self._check_change(snap_l1, what, +1)
            await self._check_change(old_l1, "active L1 table", -1)
            # 1. Refcounts of what the snapshot reaches up; the new L1's clusters.
            await self._change_reachable(snap_l1, what, +1)
            l1_bytes = snap.l1_size * 8
            l1_offset = await self._allocate(l1_bytes, "active L1 table") if l1_bytes else 0
            await self._flush_refcounts()
            # 2. The new active L1, and its L2 tables without COPIED.
            new_l1 = array("Q", (e & ~OFLAG_COPIED for e in snap_l1))
            await self._rebuild_copied(snap_l1, what, from_refcounts=False)
            if l1_bytes:
                await self.file.pwrite(l1_offset, encode_table(new_l1))
            await self.writer.barrier()
            # 3. The switch: size, L1 size and offset in one write.
            await self.file.pwrite(HEADER_SIZE_FIELDS, struct.pack(
                ">QIIQ", disk_size, header.crypt_method, snap.l1_size, l1_offset))
            await self.writer.barrier()
            header.size, header.l1_size, header.l1_table_offset = \
                disk_size, snap.l1_size, l1_offset
            image.l1, image.l1_size, image.virtual_size = new_l1, snap.l1_size, disk_size
            if old_size:
                self.writer.metadata.remove(old_offset, old_size * 8)
            # 4. What the old active layer held.
            await self._change_reachable(old_l1, "old active L1 table", -1)
            if old_size:
                await self._change_range(old_offset, old_size * 8, -1)
            await self._flush_refcounts()
            # 5. COPIED from the refcounts.
            copied = await self._rebuild_copied(new_l1, "active L1 table", from_refcounts=True)
            if copied != new_l1:
                await self.file.pwrite(l1_offset, encode_table(copied))
                image.l1 = copied
            await self.writer.barrier()
        return snap

    # -- delete ----------------------------------------------------------------------

    async def delete(self, wanted: str) -> Snapshot:
        snap = self._find(wanted)
        header, image = self.header, self.image
        what = f"L1 table of snapshot {escape_name(snap.id)}"
        snap_l1 = meta_mod.read_l1(self.file, snap.l1_table_offset, snap.l1_size)
        async with self.writer.metadata_lock:
            await self._check_change(snap_l1, what, -1)
            if snap.l1_size:
                await self._check_counts(Counter(self._clusters(
                    snap.l1_table_offset, snap.l1_size * 8)), -1)
            # 1. The table without the entry, durable (with its refcounts).
            entries = [(s, raw) for s, raw in self.entries if s is not snap]
            table = _join_entries([r for _, r in entries])
            table_offset = await self._allocate(len(table), "snapshot table") if table else 0
            await self._flush_refcounts()
            if table:
                await self.file.pwrite(table_offset, table)
                await self.writer.barrier()
            # 2. The switch, 3. the old table and what only the snapshot held are free.
            await self._switch_table(entries, table_offset, len(table), flush=False)
            if snap.l1_size:
                self.writer.metadata.remove(snap.l1_table_offset, snap.l1_size * 8)
            await self._change_reachable(snap_l1, what, -1)
            if snap.l1_size:
                await self._change_range(snap.l1_table_offset, snap.l1_size * 8, -1)
            await self._flush_refcounts()
            # 4. COPIED where the active layer is now the only user.
            active = array("Q", image.l1)
            copied = await self._rebuild_copied(active, "active L1 table", from_refcounts=True)
            if copied != active:
                await self.file.pwrite(header.l1_table_offset, encode_table(copied))
                image.l1 = copied
            await self.writer.barrier()
        return snap

    def _find(self, wanted: str) -> Snapshot:
        """QEMU's rule: an ID matches first, then a name."""
        for snap, _ in self.entries:
            if snap.id == wanted:
                return snap
        for snap, _ in self.entries:
            if snap.name == wanted:
                return snap
        raise ImageError(self.path, f"no snapshot with ID or name '{escape_name(wanted)}'")

    # -- the snapshot table ----------------------------------------------------------

    async def _switch_table(self, entries: list[tuple[Snapshot, bytes]], table_offset: int,
                            table_size: int, *, flush: bool = True) -> None:
        """Point the header at a new snapshot table (written and durable
        already), then free the old one.  With `flush`, the freed refcounts
        are written back too."""
        header = self.header
        old_offset, old_size = header.snapshots_offset, self.image.meta.snapshot_table_size
        old_count = header.nb_snapshots
        await self.file.pwrite(HEADER_SNAPSHOT_FIELDS,
                               struct.pack(">IQ", len(entries), table_offset))
        await self.writer.barrier()
        header.nb_snapshots, header.snapshots_offset = len(entries), table_offset
        self.entries = entries
        meta = self.image.meta
        meta.snapshots = [snap for snap, _ in entries]
        meta.snapshot_table_size = table_size
        self.image.snapshots = [
            SnapshotInfo(s.id, s.name, s.disk_size if s.disk_size is not None else header.size,
                         s.date_sec, s.date_nsec, s.vm_clock_nsec, s.vm_state_size)
            for s in meta.snapshots
        ]
        if old_count and old_size:
            self.writer.metadata.remove(old_offset, old_size)
            await self._change_range(old_offset, old_size, -1)
            if flush:
                await self._flush_refcounts()

    # -- refcounts ---------------------------------------------------------------------

    def _clusters(self, host_offset: int, length: int) -> Iterator[int]:
        """Indices of the host clusters a host range touches."""
        return iter(range(host_offset >> self.cluster_bits,
                          ((host_offset + length - 1) >> self.cluster_bits) + 1))

    def _l2_tables(self, l1: array, what: str) -> list[int]:
        """Host offsets of the L2 tables an L1 table names, in L1 order."""
        result = []
        for l1_index, entry in enumerate(l1):
            l2_offset = entry & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            if l2_offset & (self.cluster_size - 1):
                raise MetadataCorruption(self.path, f"{what} entry {l1_index}",
                                         f"L2 table offset 0x{l2_offset:x} is not "
                                         "cluster-aligned")
            result.append(l2_offset)
        return result

    async def _read_l2(self, l2_offset: int) -> array:
        """A copy of an L2 table (through the image's cache, which stays valid)."""
        return array("Q", await self.image.l2_cache.get(l2_offset))

    def _references(self, l2_offset: int, table: array) -> Iterator[tuple[int, int]]:
        """(host offset, length) of each host range the table's entries hold:
        a cluster each, or the bytes of a compressed cluster."""
        cs = self.cluster_size
        layout = self.image.compressed
        for i in range(0, len(table), self.step):
            entry = table[i]
            if entry & OFLAG_COMPRESSED:
                yield layout.decode(entry)
                continue
            host = entry & L2E_OFFSET_MASK
            if host:
                if host & (cs - 1):
                    raise self.image.corrupt_entry(
                        l2_offset, i // self.step, f"host offset 0x{host:x} is not cluster-aligned")
                yield host, cs

    async def _check_change(self, l1: array, what: str, delta: int) -> None:
        """Refuse, changing nothing, if adding `delta` to everything `l1`
        reaches would take a refcount out of range."""
        for l2_offset in self._l2_tables(l1, what):
            counts: Counter[int] = Counter()
            counts[l2_offset >> self.cluster_bits] += 1
            for host, length in self._references(l2_offset, await self._read_l2(l2_offset)):
                counts.update(self._clusters(host, length))
            await self._check_counts(counts, delta)

    async def _check_counts(self, counts: Counter[int], delta: int) -> None:
        codec = self.refcounts.codec
        for cluster, times in counts.items():
            refcount = await self.refcounts.get(cluster)
            offset = cluster << self.cluster_bits
            if refcount < times:
                raise ImageError(self.path, f"cluster at host offset 0x{offset:x} is used "
                                 f"{times} time(s) but its refcount is {refcount}: the image "
                                 "is corrupt (see 'qemu-img check')")
            if refcount + delta * times > codec.max_value:
                raise ImageError(self.path, f"cluster at host offset 0x{offset:x} cannot be "
                                 f"shared once more: its refcount {refcount} is the largest "
                                 f"that refcount_bits={codec.bits} holds")

    async def _change_reachable(self, l1: array, what: str, delta: int) -> None:
        """Add `delta` to each L2 table `l1` names and each cluster those map."""
        for l2_offset in self._l2_tables(l1, what):
            table = await self._read_l2(l2_offset)
            for host, length in self._references(l2_offset, table):
                await self._change_range(host, length, delta)
            await self._change_range(l2_offset, self.cluster_size, delta)

    async def _make_room(self) -> None:
        """Write the dirty refcount blocks back before the cache fills with
        them: it evicts only clean blocks, so a block loaded into a cache of
        dirty ones would be dropped at once.  One change touches at most two
        blocks.  Safe in both directions: increments are written before
        anything relies on them, decrements after nothing does."""
        blocks = self.refcounts.blocks
        if blocks.dirty_count + 2 >= blocks.capacity:
            await self.refcounts.write_back()

    async def _change_range(self, host_offset: int, length: int, delta: int) -> None:
        await self._make_room()
        for freed in await self.refcounts.change(host_offset, length, delta):
            self.image.l2_cache.forget(freed)
            self.writer.metadata.remove(freed, self.cluster_size)

    async def _allocate(self, length: int, what: str) -> int:
        """New clusters for `length` bytes of metadata (refcount 1, in the cache)."""
        count = -(-length // self.cluster_size)
        await self._make_room()
        host_offset = await self.refcounts.allocate(count)
        hit = self.writer.metadata.hit(host_offset, length)
        if hit is not None:
            raise ImageError(self.path, f"the refcounts are wrong: a new {what} at host "
                             f"offset 0x{host_offset:x} would overwrite the {hit} "
                             "(repair with 'qemu-img check -r all')")
        self.writer.metadata.add(host_offset, length, what)
        return host_offset

    async def _flush_refcounts(self) -> None:
        """Dirty refcount blocks to the file, then a barrier."""
        await self.refcounts.write_back()
        await self.writer.barrier()

    async def _rebuild_copied(self, l1: array, what: str, *, from_refcounts: bool) -> array:
        """COPIED in the L2 tables `l1` names: set exactly where the cluster's
        refcount is 1 (`from_refcounts`), or cleared everywhere.  Changed
        tables are written (no barrier).  Returns `l1` with its own COPIED
        flags so computed, for the caller to write."""
        result = array("Q", l1)
        get = self.refcounts.get
        bits = self.cluster_bits
        for l1_index, entry in enumerate(l1):
            l2_offset = entry & L1E_OFFSET_MASK
            if not l2_offset:
                result[l1_index] = entry & ~OFLAG_COPIED
                continue
            if l2_offset & (self.cluster_size - 1):
                raise MetadataCorruption(self.path, f"{what} entry {l1_index}",
                                         f"L2 table offset 0x{l2_offset:x} is not "
                                         "cluster-aligned")
            table = await self._read_l2(l2_offset)
            changed = False
            for i in range(0, len(table), self.step):
                old = table[i]
                new = old & ~OFLAG_COPIED
                host = old & L2E_OFFSET_MASK
                if from_refcounts and host and not old & OFLAG_COMPRESSED \
                        and await get(host >> bits) == 1:
                    new |= OFLAG_COPIED
                if new != old:
                    table[i] = new
                    changed = True
            if changed:
                await self.file.pwrite(l2_offset, encode_table(table))
                self.image.l2_cache.forget(l2_offset)
            new_entry = entry & ~OFLAG_COPIED
            if from_refcounts and await get(l2_offset >> bits) == 1:
                new_entry |= OFLAG_COPIED
            result[l1_index] = new_entry
        return result


def _entry_bytes(snap: Snapshot) -> bytes:
    """An entry's bytes without its padding."""
    built = snapfmt.build_entry(snap)
    return built[:snapfmt.entry_size(built[:snapfmt.FIXED_ENTRY_SIZE])]


def _join_entries(raw_entries: list[bytes]) -> bytes:
    """A snapshot table: each entry padded to 8 bytes but the last (as QEMU)."""
    parts = []
    for i, raw in enumerate(raw_entries):
        parts.append(raw)
        if i + 1 < len(raw_entries):
            parts.append(b"\0" * (-len(raw) % 8))
    return b"".join(parts)
