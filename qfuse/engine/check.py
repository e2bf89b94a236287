"""`qfuse check`: compare every refcount with its references, and repair.

This is QEMU's qcow2 check (block/qcow2-refcount.c, qcow2_check_refcounts;
qemu-img.c, img_check) step for step, so that the verdict, the counts and
the messages agree with `qemu-img check` on the same image:

1. `refcheck.count_references` recounts every cluster's references;
2. `_compare` reads the stored refcounts one refcount block at a time and
   reports each cluster whose refcount is too low (a corruption: "ERROR"),
   too high (a leak: "Leaked"), or zero though referenced (the refcount
   structures must be rebuilt);
3. `_check_copied` checks OFLAG_COPIED in the active L1 and L2 tables:
   set exactly when the stored refcount is 1;
4. with a repair, qemu-img checks again from scratch and reports that
   second check, with the first one's counts of what was fixed.

Repairs (`Fix.LEAKS` lowers leaked refcounts; `Fix.ERRORS` also raises the
ones too low, fixes COPIED flags, and rebuilds refcount structures that
cannot be trusted) are ordered so that a crash at any point leaves the
image no worse than before: a refcount is only ever set to the number of
references counted; the COPIED flags change only after the refcounts they
follow are durable; a rebuild writes the new structures completely before
the one header write that switches to them.  On a version 3 image the dirty
bit is set, durably, before the first repair write: if the repair stops
half-way (an I/O error, a crash) it stays set, and the next writable open
(qfuse's or QEMU's) recounts the refcounts.  It is cleared, with the
corrupt bit, once the repair leaves neither corruptions nor check errors
(QEMU's rule); otherwise it goes back to what it was.  Clusters a leak
repair frees are punched out of the file, as QEMU discards them.

Where QEMU 7.2's repair goes wrong, qfuse does not follow it:

* a rebuild keeps its new structures off refcount blocks the count skipped
  (reserved bits in their table entry) and off clusters that entries name
  past the end of the file, and rebuilds again if the file grew over such
  a cluster (QEMU writes over them: its overlap check then stops the
  repair, or the guest reads refcounts);
* a repair that fails once it has written leaves the dirty bit set (QEMU
  clears it on close); one that fails before leaves the file untouched;
* a refcount block at a misaligned offset does not mark the image corrupt
  and stop the repair half-way (QEMU's "Marking image as corrupt").

The backing file and the external data file are not opened: the check is
about this file's metadata.

Memory: the counted references and the stored refcounts, each one array
item per host cluster (plus the refcount blocks a repair changes); no
Python object per cluster.
"""

from __future__ import annotations

import copy
import errno
import operator
import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from qfuse.engine.hostfile import HostFile
from qfuse.engine.locking import ImageLock
from qfuse.engine.metadata import Metadata, read_metadata
from qfuse.engine.refcheck import (
    Fix,
    MetadataOverlap,
    PlainTables,
    References,
    Report,
    count_references,
    rebuild_refcount_structure,
)
from qfuse.errors import FormatError, ImageError
from qfuse.format.entries import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    REFT_OFFSET_MASK,
    decode_table,
    encode_table,
)
from qfuse.format.header import (
    AUTOCLEAR_BITMAPS,
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    V2_HEADER_LENGTH,
    build_extensions,
)
from qfuse.format.refcount import RefcountCodec

INCOMPATIBLE_FEATURES_FIELD = 72
REBUILD_ATTEMPTS = 3
MAX_FILE_OFFSET = (1 << 63) - 1

Progress = Callable[[int, int], None]


@dataclass
class CheckResult:
    """QEMU's BdrvCheckResult (and ImageCheck's fields), one check's numbers."""

    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0


@dataclass
class CheckOutcome:
    """What `qemu-img check` prints: the result, and whether a repair fixed
    anything (then `result` is the second check's, with the fixed counts)."""

    result: CheckResult
    repaired: bool


class CheckFailed(ImageError):
    """The check could not complete (QEMU: "Check failed: ...")."""


def check_image(path: str, *, fix: Fix = Fix.NONE, report: Report,
                progress: Progress | None = None) -> CheckOutcome:
    """Check (and with `fix`, repair) the qcow2 image at `path`.

    Takes QEMU's write lock to repair, its read lock to check.  Raises
    `ImageError` when the image cannot be opened or is not a qcow2 image
    (nothing is written then), `CheckFailed` when the check cannot go on.
    """
    writable = bool(fix)
    file = HostFile(path, writable=writable)
    try:
        lock = ImageLock.acquire(file.fd, path, write=writable)
        try:
            try:
                meta = read_metadata(file)
            except FormatError as exc:
                raise ImageError(path, str(exc)) from None
            if _stale_bitmaps(meta):
                report(f"qfuse: {path}: warning: a program lacking bitmap support modified "
                       "this file, so all bitmaps are now considered inconsistent and their "
                       "clusters leaked")
            checker = _Checker(path, file, meta, report, progress)
            try:
                first = checker.run(fix)
                if not (first.corruptions_fixed or first.leaks_fixed):
                    return CheckOutcome(first, repaired=False)
                final = checker.run(Fix.NONE)
            except FormatError as exc:
                raise CheckFailed(path, f"check failed: {exc}") from None
            except MetadataOverlap as exc:
                raise CheckFailed(path, f"check failed: a repair would overwrite {exc}") from None
            except OSError as exc:
                raise CheckFailed(path, f"check failed: {exc.strerror or exc}") from None
            except (OverflowError, ValueError) as exc:
                # A value in the image no file offset or array can take.
                raise CheckFailed(path, f"check failed: {exc}") from None
            final.corruptions_fixed = first.corruptions_fixed
            final.leaks_fixed = first.leaks_fixed
            return CheckOutcome(final, repaired=True)
        finally:
            lock.release()
    finally:
        file.close()


def _stale_bitmaps(meta: Metadata) -> bool:
    """Bitmaps that QEMU ignores: the autoclear bitmaps bit is clear."""
    header = meta.header
    return meta.extensions.bitmaps is not None and not (
        header.version >= 3 and header.autoclear_features & AUTOCLEAR_BITMAPS)


class _Checker:
    def __init__(self, path: str, file: HostFile, meta: Metadata, report: Report,
                 progress: Progress | None) -> None:
        self.path = path
        self.file = file
        self.meta = meta
        self.header = meta.header
        self.cs = meta.header.cluster_size
        self.cbits = meta.header.cluster_bits
        self.report = report
        self.progress = progress
        self.codec = RefcountCodec(meta.header.refcount_order)
        self.io: _RepairIO | None = None

    # -- one check (QEMU's qcow2_co_check_locked) ----------------------------------

    def run(self, fix: Fix) -> CheckResult:
        if fix:
            self.io = _RepairIO(self.file, self.meta)
            self.io.drop_stale_bitmaps()
        try:
            res = self._check_refcounts(fix)
            if self.io is not None:
                self.io.finish(clean=not res.check_errors and not res.corruptions)
        finally:
            self.io = None
        return res

    def _steps(self) -> int:
        """Tables this check reads, for the progress bar."""
        if self.progress is None:
            return 0
        header = self.header
        tables = 0
        for offset, size in [(header.l1_table_offset, header.l1_size)] + [
                (s.l1_table_offset, s.l1_size) for s in self.meta.snapshots]:
            if size:
                l1 = decode_table(self._read(offset, size * 8))
                tables += len(l1) - l1.count(0)
        return tables + -(-self.file.size() // (self.cs * self.codec.entries_per_block(self.cs)))

    def _count(self, fix: Fix, res: CheckResult) -> References:
        """QEMU's calculate_refcounts, its findings added to `res`."""
        refs = count_references(self.file, self.meta, count_stale_bitmaps=False,
                                report=self.report, fix=fix, writer=self.io,
                                progress=self._advance)
        res.corruptions += refs.corruptions
        res.corruptions_fixed += refs.corruptions_fixed
        res.allocated_clusters += refs.allocated_clusters
        res.fragmented_clusters += refs.fragmented_clusters
        res.compressed_clusters += refs.compressed_clusters
        return refs

    def _advance(self, tables: int) -> None:
        if self.progress is not None:
            self._done += tables
            self.progress(self._done, self._total)

    def _check_refcounts(self, fix: Fix) -> CheckResult:
        """QEMU's qcow2_check_refcounts."""
        self._done = 0
        self._total = self._steps()
        header = self.header
        res = CheckResult(total_clusters=-(-header.size // self.cs))
        refs = self._count(fix, res)
        before_compare = copy.copy(res)
        stored = _StoredRefcounts(self.file, self.meta, self.codec)
        rebuild, highest = self._compare(res, Fix.NONE, refs, stored)
        rebuild |= refs.rebuild
        if rebuild and fix & Fix.ERRORS:
            old = copy.copy(res)
            for attempt in range(1, REBUILD_ATTEMPTS + 1):
                refs, stored, highest, fresh_leaks, broken = self._rebuild(res, fix, refs, stored)
                if not broken:
                    break
                # A rebuild can grow the file over a cluster an entry names
                # past its end: that reference is real now, and uncounted in
                # the new structures.  Another rebuild counts it.
                if attempt == REBUILD_ATTEMPTS:
                    self.report("ERROR rebuilt refcount structure is still broken")
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if rebuild:
                self.report("ERROR need to rebuild refcount structures")
                raise CheckFailed(self.path, "check failed: the refcount structures must be "
                                  "rebuilt: repair with --repair all")
            if res.leaks or res.corruptions:
                res = before_compare
                _, highest = self._compare(res, fix, refs, stored)
        self._check_copied(res, fix, stored)
        res.image_end_offset = (highest + 1) * self.cs
        return res

    def _rebuild(self, res: CheckResult, fix: Fix, refs: References,
                 stored: _StoredRefcounts
                 ) -> tuple[References, _StoredRefcounts, int, int, bool]:
        """New refcount structures from `refs`, then a recount (into `res`)
        and the leak repair that frees the old ones.  Returns the recount,
        the new stored refcounts, the highest cluster in use, the leaks left
        and whether the new structures are still broken."""
        assert self.io is not None
        io = self.io
        self.report("Rebuilding refcount structure")
        # A block the walk skipped (reserved bits, misaligned) is still in
        # the old table: keep the new structures off it until the switch.
        # (QEMU allocates over it, its overlap check refuses the write, and
        # its repair fails.)  It leaks, and the leak repair frees it.
        for entry in stored.table:
            cluster = (entry & REFT_OFFSET_MASK) >> self.cbits
            if cluster and cluster < len(refs.counts) and not refs.counts[cluster]:
                refs.counts[cluster] = 1
        rebuild_refcount_structure(self.meta, refs.counts,
                                   lambda offset, data: io.write(offset, data, None),
                                   io.write_header, io.barrier, refs.past_end_clusters)
        io.metadata_moved()
        res.corruptions = res.leaks = 0
        refs = self._count(Fix.NONE, res)
        stored = _StoredRefcounts(self.file, self.meta, self.codec)
        # The old structures are leaked now: free them.
        scratch = CheckResult()
        broken, highest = self._compare(scratch, fix & Fix.LEAKS, refs, stored)
        return refs, stored, highest, scratch.leaks, broken or refs.rebuild

    # -- stored against counted ------------------------------------------------------

    def _compare(self, res: CheckResult, fix: Fix, refs: References,
                 stored: _StoredRefcounts) -> tuple[bool, int]:
        """QEMU's compare_refcounts: (rebuild needed, highest cluster in use)."""
        counts = refs.counts
        report = self.report
        per_block = stored.per_block
        rebuild = False
        highest = 0
        freed: list[int] = []
        stored.keep = bool(fix)
        # The stored refcounts of clusters [0, len(counts)) in one array, for
        # the COPIED check (None if a block cannot be read).
        flat: array | None = array(counts.typecode)
        for index in range(-(-len(counts) // per_block)):
            start = index * per_block
            end = min(len(counts), start + per_block)
            counted = counts[start:end]
            try:
                block = stored.block(index)
            except _Unreadable as exc:
                if flat is not None:  # the first one (QEMU: once, then suppressed)
                    report(f"qfuse: {self.path}: image is corrupt: refcount block at "
                           f"{stored.offset(index):#x} {exc} (refcount table index: "
                           f"{index:#x})")
                for cluster in range(start, end):
                    report(f"Can't get refcount for cluster {cluster}: Input/output error")
                res.check_errors += end - start
                self._advance(1)
                flat = None
                continue
            self._advance(1)
            on_disk = block[:end - start] if block is not None else \
                array(counted.typecode, bytes(counted.itemsize * (end - start)))
            if flat is not None:
                flat.extend(on_disk)  # a copy: the fixes below update both
            if on_disk == counted:
                last = _last_nonzero(counted)
                if last >= 0:
                    highest = start + last
                continue
            for i in range(end - start):
                refcount, references = on_disk[i], counted[i]
                if refcount or references:
                    highest = start + i
                if refcount == references:
                    continue
                cluster = start + i
                fixing = None
                if refcount == 0:
                    rebuild = True
                elif refcount > references and fix & Fix.LEAKS:
                    fixing = "leak"
                elif refcount < references and fix & Fix.ERRORS:
                    fixing = "corruption"
                verdict = "Repairing" if fixing else "ERROR" if refcount < references else \
                    "Leaked"
                report(f"{verdict} cluster {cluster} refcount={refcount} "
                       f"reference={references}")
                if refcount < references and cluster in refs.overlaps:
                    report(f"    cluster {cluster} is {refs.overlaps[cluster]}")
                if fixing:
                    stored.set(cluster, references)
                    if flat is not None:
                        flat[cluster] = references
                if fixing == "leak":
                    res.leaks_fixed += 1
                    if not references:
                        freed.append(cluster)
                elif fixing == "corruption":
                    res.corruptions_fixed += 1
                elif refcount < references:
                    res.corruptions += 1
                else:
                    res.leaks += 1
        stored.flat = flat
        if fix and stored.dirty:
            assert self.io is not None
            stored.write_back(self.io)
            self.io.barrier()  # refcounts durable before the COPIED flags that follow them
            # Freed clusters go back to the file system, as QEMU discards them.
            self.io.discard(freed)
        return rebuild, highest

    # -- OFLAG_COPIED ------------------------------------------------------------------

    def _check_copied(self, res: CheckResult, fix: Fix, stored: _StoredRefcounts) -> None:
        """QEMU's check_oflag_copied, over the active L1 and L2 tables."""
        if fix & Fix.ERRORS:
            repair = True
        elif fix & Fix.LEAKS:
            # Only if the refcounts are now right (QEMU's rule).
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        header = self.header
        cs = self.cs
        cbits = self.cbits
        data_file = header.has_data_file
        extended = header.extended_l2
        step = 2 if extended else 1
        report = self.report
        verdict = "Repairing" if repair else "ERROR"
        flat = stored.flat if stored.flat is not None else array("B")
        in_flat = len(flat)
        plain = PlainTables(cbits)
        l1 = decode_table(self._read(header.l1_table_offset, header.l1_size * 8))
        for l1_index, l1_entry in enumerate(l1):
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            try:
                refcount = stored.get(l2_offset >> cbits)
            except _Unreadable:
                continue
            if (refcount == 1) != bool(l1_entry & OFLAG_COPIED):
                res.corruptions += 1
                report(f"{verdict} OFLAG_COPIED L2 cluster: l1_index={l1_index} "
                       f"l1_entry={l1_entry:x} refcount={refcount}")
                if repair:
                    assert self.io is not None
                    fixed = l1_entry | OFLAG_COPIED if refcount == 1 else \
                        l1_entry & ~OFLAG_COPIED
                    self._write(res, header.l1_table_offset + l1_index * 8,
                                struct.pack(">Q", fixed), "active L1 table", "L1 table")
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            raw = self._read(l2_offset, cs)
            table = decode_table(raw)
            if not extended and not data_file and _copied_right(plain, raw, flat):
                continue
            changed = 0
            for j, entry in enumerate(table[0::2] if extended else table):
                if not entry or entry & OFLAG_COMPRESSED:
                    continue
                data_offset = entry & L2E_OFFSET_MASK
                if not data_offset and not (data_file and entry & OFLAG_COPIED):
                    continue  # unallocated, or a plain zero cluster
                if data_file:
                    refcount = 1
                else:
                    cluster = data_offset >> cbits
                    if cluster < in_flat:
                        refcount = flat[cluster]
                    else:
                        try:
                            refcount = stored.get(cluster)
                        except _Unreadable:
                            continue
                if (refcount == 1) != bool(entry & OFLAG_COPIED):
                    res.corruptions += 1
                    report(f"{verdict} OFLAG_COPIED data cluster: l2_entry={entry:x} "
                           f"refcount={refcount}")
                    if repair:
                        table[j * step] = entry | OFLAG_COPIED if refcount == 1 else \
                            entry & ~OFLAG_COPIED
                        changed += 1
            if changed:
                self._write(res, l2_offset, encode_table(table), "active L2 table", "L2 table")
                res.corruptions -= changed
                res.corruptions_fixed += changed

    def _write(self, res: CheckResult, offset: int, data: bytes, ignore: str,
               what: str) -> None:
        assert self.io is not None
        try:
            self.io.write(offset, data, ignore)
        except MetadataOverlap as exc:
            self.report(f"ERROR: Could not write {what}; metadata overlap check failed: {exc}")
            res.check_errors += 1
            raise CheckFailed(self.path, f"check failed: the {what} at 0x{offset:x} "
                              f"overlaps {exc}") from None

    def _read(self, host_offset: int, length: int) -> bytes:
        return _read(self.file, host_offset, length)


def _copied_right(plain: PlainTables, raw: bytes, flat: array) -> bool:
    """True if a table of plain data clusters has COPIED on all of them and
    all have refcount 1, or on none and none has: nothing to report.  False
    means: look entry by entry."""
    clusters = plain.clusters(raw)
    if clusters is None:
        return False
    if not clusters:
        return True
    if isinstance(clusters, range):
        if clusters[-1] >= len(flat):
            return False
        refcounts: array | tuple[int, ...] = flat[clusters.start:clusters.stop]
    elif max(clusters) >= len(flat):
        return False
    elif len(clusters) > 1:
        refcounts = operator.itemgetter(*clusters)(flat)
    else:
        refcounts = (flat[clusters[0]],)
    copied = raw[0::8].count(0x80)
    ones = refcounts.count(1)
    if copied == len(clusters):
        return ones == len(clusters)
    return copied == 0 and ones == 0 and refcounts.count(0) == 0


def _read(file: HostFile, host_offset: int, length: int) -> bytes:
    """Bytes at `host_offset`, zeros past the end of the file (QEMU's reads)."""
    if host_offset + length > MAX_FILE_OFFSET:
        raise OSError(errno.EINVAL, "offset beyond what a file can hold")
    return file.pread_sync(host_offset, length).ljust(length, b"\0")


def _last_nonzero(values: array) -> int:
    used = len(values.tobytes().rstrip(b"\0"))
    return (used - 1) // values.itemsize if used else -1


class _Unreadable(Exception):
    """A refcount block at an offset that is not cluster-aligned, or that
    cannot be read."""


class _StoredRefcounts:
    """The refcounts as the image stores them, block by block."""

    def __init__(self, file: HostFile, meta: Metadata, codec: RefcountCodec) -> None:
        header = meta.header
        self.file = file
        self.codec = codec
        self.cs = header.cluster_size
        self.per_block = codec.entries_per_block(self.cs)
        raw = file.pread_sync(header.refcount_table_offset,
                              header.refcount_table_clusters * self.cs)
        self.table = decode_table(raw.ljust(header.refcount_table_clusters * self.cs, b"\0"))
        self._blocks: dict[int, array] = {}
        self.dirty: set[int] = set()
        # Keep the blocks read (a repair changes them); else `flat` has
        # their values, and memory is two arrays of the file's clusters.
        self.keep = False
        # Every stored refcount up to the end of the file, once compared.
        self.flat: array | None = None

    def offset(self, index: int) -> int:
        return self.table[index] & REFT_OFFSET_MASK if index < len(self.table) else 0

    def block(self, index: int) -> array | None:
        """Block `index`'s refcounts, one item per cluster; None if there is
        no block (all zero)."""
        values = self._blocks.get(index)
        if values is not None:
            return values
        offset = self.offset(index)
        if not offset:
            return None
        if offset & (self.cs - 1):
            raise _Unreadable("is unaligned")
        try:
            raw = _read(self.file, offset, self.cs)
        except OSError as exc:
            raise _Unreadable(f"cannot be read: {exc.strerror or exc}") from None
        values = self.codec.decode_block(raw)
        if self.keep:
            self._blocks[index] = values
        return values

    def get(self, cluster: int) -> int:
        if self.flat is not None and cluster < len(self.flat):
            return self.flat[cluster]
        index, slot = divmod(cluster, self.per_block)
        values = self.block(index)
        return values[slot] if values is not None else 0

    def set(self, cluster: int, value: int) -> None:
        """Only for clusters with a block (a leak or a non-zero refcount)."""
        index, slot = divmod(cluster, self.per_block)
        values = self.block(index)
        assert values is not None
        values[slot] = value
        self.dirty.add(index)

    def write_back(self, io: _RepairIO) -> None:
        for index in sorted(self.dirty):
            io.write(self.offset(index), self.codec.encode_block(self._blocks[index], self.cs),
                     "refcount block")
        self.dirty.clear()


class _RepairIO:
    """Every write of a repair: dirty bit first, overlap checks, barriers.

    The overlap check is QEMU's default ("cached"): a write may not land on
    the header, an L1 table, an active L2 table, the refcount table or a
    refcount block, the snapshot table or the bitmap directory, except the
    kind of structure it means to write.
    """

    def __init__(self, file: HostFile, meta: Metadata) -> None:
        self.file = file
        self.meta = meta
        self.header = meta.header
        self.started = False
        self.pending = False
        self.was_dirty = bool(meta.header.incompatible_features & INCOMPAT_DIRTY)
        self._kinds: dict[int, set[str]] | None = None

    def _metadata_kinds(self) -> dict[int, set[str]]:
        if self._kinds is not None:
            return self._kinds
        header = self.header
        cs = header.cluster_size
        kinds: dict[int, set[str]] = {}

        def add(offset: int, length: int, what: str) -> None:
            if length <= 0:
                return
            for cluster in range(offset // cs, (offset + length - 1) // cs + 1):
                kinds.setdefault(cluster, set()).add(what)

        def read(offset: int, length: int) -> array:
            return decode_table(self.file.pread_sync(offset, length).ljust(length, b"\0"))

        add(0, cs, "qcow2 header")
        add(header.l1_table_offset, header.l1_size * 8, "active L1 table")
        for entry in read(header.l1_table_offset, header.l1_size * 8):
            if entry & L1E_OFFSET_MASK:
                add(entry & L1E_OFFSET_MASK, cs, "active L2 table")
        reftable_bytes = header.refcount_table_clusters * cs
        add(header.refcount_table_offset, reftable_bytes, "refcount table")
        for entry in read(header.refcount_table_offset, reftable_bytes):
            if entry & REFT_OFFSET_MASK:
                add(entry & REFT_OFFSET_MASK, cs, "refcount block")
        if header.nb_snapshots:
            add(header.snapshots_offset, self.meta.snapshot_table_size, "snapshot table")
        for snap in self.meta.snapshots:
            add(snap.l1_table_offset, snap.l1_size * 8, "inactive L1 table")
        bitmaps = self.meta.extensions.bitmaps
        if bitmaps is not None and header.autoclear_features & AUTOCLEAR_BITMAPS:
            add(bitmaps.bitmap_directory_offset, bitmaps.bitmap_directory_size,
                "bitmap directory")
        self._kinds = kinds
        return kinds

    def metadata_moved(self) -> None:
        """The refcount structures moved: where metadata lies is found anew."""
        self._kinds = None

    def _begin(self) -> None:
        """Before the first repair write: the dirty bit, durable (v3)."""
        if self.started:
            return
        self.started = True
        if self.header.version >= 3 and not self.was_dirty:
            self._set_incompatible(self.header.incompatible_features | INCOMPAT_DIRTY)
            self.file.datasync()

    def _set_incompatible(self, value: int) -> None:
        self.file.pwrite_sync(INCOMPATIBLE_FEATURES_FIELD, struct.pack(">Q", value))
        self.header.incompatible_features = value

    def write(self, host_offset: int, data: bytes, ignore: str | None) -> None:
        """Write `data` unless it would land on metadata other than `ignore`."""
        kinds = self._metadata_kinds()
        cs = self.header.cluster_size
        for cluster in range(host_offset // cs, (host_offset + len(data) - 1) // cs + 1):
            hit = kinds.get(cluster, set()) - {ignore}
            if hit:
                raise MetadataOverlap(f"the {sorted(hit)[0]} at 0x{cluster * cs:x}")
        self._begin()
        self.file.pwrite_sync(host_offset, data)
        self.pending = True

    def write_header(self, host_offset: int, data: bytes) -> None:
        """A header field (the refcount table's place, after a rebuild)."""
        assert host_offset + len(data) <= V2_HEADER_LENGTH
        self._begin()
        self.file.pwrite_sync(host_offset, data)
        self.pending = True

    def grow(self, size: int) -> None:
        """QEMU truncates the file up; writing its last cluster does the same
        without an ftruncate."""
        if self.file.size() >= size:
            return
        self._begin()
        cs = self.header.cluster_size
        start = max(self.file.size(), size - cs)
        self.file.pwrite_sync(start, bytes(size - start))
        self.pending = True

    def discard(self, clusters: list[int]) -> None:
        """Punch out free clusters (ascending), one call per contiguous run."""
        cs = self.header.cluster_size
        start = 0
        for i, cluster in enumerate(clusters):
            if i + 1 < len(clusters) and clusters[i + 1] == cluster + 1:
                continue
            first = clusters[start]
            self.file.punch_hole_sync(first * cs, (cluster + 1 - first) * cs)
            start = i + 1

    def barrier(self) -> None:
        if self.pending:
            self.file.datasync()
            self.pending = False

    def drop_stale_bitmaps(self) -> None:
        """QEMU drops the bitmaps extension of an image whose autoclear
        bitmaps bit is clear when it opens it writable: those bitmaps are
        stale and their clusters free.  Done first, so no header points to
        clusters a leak repair frees."""
        header = self.header
        exts = self.meta.extensions
        if not _stale_bitmaps(self.meta):
            return
        start = header.header_length if header.version >= 3 else V2_HEADER_LENGTH
        old = build_extensions(exts.raw)
        kept = [(kind, data) for kind, data in exts.raw if kind != EXT_BITMAPS]
        new = build_extensions(kept)
        self._begin()
        self.file.pwrite_sync(start, new.ljust(len(old), b"\0"))
        self.file.datasync()
        exts.raw = kept
        exts.bitmaps = None

    def finish(self, *, clean: bool) -> None:
        """After the repair: clear dirty and corrupt if it left the image
        clean (QEMU's rule); else put back the dirty bit as it was."""
        self.barrier()
        header = self.header
        if header.version < 3:
            return
        value = header.incompatible_features
        if clean:
            value &= ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
        elif self.started and not self.was_dirty:
            value &= ~INCOMPAT_DIRTY
        if value != header.incompatible_features:
            self._set_incompatible(value)
            self.file.datasync()
