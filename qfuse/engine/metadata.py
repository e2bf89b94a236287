"""Reading and checking an image's metadata at open.

Every limit QEMU enforces is checked here, before anything is allocated from
a size the header claims, and every table must lie inside the file: a
truncated download must be refused, not read as an empty disk.  Errors are
`FormatError`s (the caller adds the path).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from qfuse.engine.hostfile import HostFile
from qfuse.errors import FormatError
from qfuse.format import snapshots as snapfmt
from qfuse.format.entries import decode_table, l2_entries_per_table
from qfuse.format.header import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPRESSION_NAMES,
    COMPRESSION_ZLIB,
    CRYPT_NONE,
    FEATURE_TYPE_INCOMPATIBLE,
    INCOMPAT_COMPRESSION,
    INCOMPAT_KNOWN,
    MAX_CLUSTER_BITS,
    MAX_REFCOUNT_ORDER,
    MIN_CLUSTER_BITS,
    V2_HEADER_LENGTH,
    Extensions,
    Header,
    parse_extensions,
    parse_header,
    peek_cluster_bits,
)

MAX_L1_BYTES = 32 * 1024 * 1024  # QEMU's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # QEMU's QCOW_MAX_REFTABLE_SIZE
MAX_BACKING_NAME = 1023
# Subclusters are at least 512 bytes, so extended L2 needs 16 KiB clusters.
MIN_EXTL2_CLUSTER_BITS = 14


@dataclass
class Metadata:
    """What open learns from the header cluster and the tables it names."""

    header: Header
    extensions: Extensions
    file_size: int
    backing_name: str | None = None
    snapshots: list[snapfmt.Snapshot] = field(default_factory=list)
    snapshot_table_size: int = 0

    def incompatible_feature_name(self, bit: int) -> str:
        name = self.extensions.feature_name(FEATURE_TYPE_INCOMPATIBLE, bit)
        return f"'{name}'" if name else f"bit {bit}"


def read_metadata(file: HostFile) -> Metadata:
    """Header, extensions, backing name and snapshot table, all checked."""
    file_size = file.size()
    cluster_bits = peek_cluster_bits(file.pread_sync(0, V2_HEADER_LENGTH))
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError(
            f"cluster_bits {cluster_bits} is outside "
            f"{MIN_CLUSTER_BITS}-{MAX_CLUSTER_BITS} (512 B to 2 MiB clusters)"
        )
    cluster_size = 1 << cluster_bits
    # Past the end of a short file the header cluster reads as zeros, as in QEMU.
    header_cluster = file.pread_sync(0, cluster_size).ljust(cluster_size, b"\0")
    header = parse_header(header_cluster)
    meta = Metadata(header, Extensions(), file_size)
    _check_features(meta)
    _check_header_fields(header)

    ext_start = header.header_length if header.version >= 3 else V2_HEADER_LENGTH
    ext_end = cluster_size
    if header.backing_file_offset:
        if header.backing_file_offset > cluster_size:
            raise FormatError("backing file name lies outside the header cluster")
        ext_end = header.backing_file_offset
    meta.extensions = parse_extensions(header_cluster, ext_start, max(ext_start, ext_end))
    # The feature table is known only now: name an unknown feature if we can.
    unknown = header.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        bit = (unknown & -unknown).bit_length() - 1
        raise FormatError(
            f"unsupported incompatible feature {meta.incompatible_feature_name(bit)}"
        )
    _read_backing_name(file, meta)
    _check_data_file(meta)
    _check_tables(meta)
    meta.snapshots = _read_snapshot_table(file, meta)
    return meta


def _check_features(meta: Metadata) -> None:
    header = meta.header
    if header.version >= 3 and header.header_length > header.cluster_size:
        raise FormatError(f"header_length {header.header_length} exceeds the cluster size")
    if header.crypt_method != CRYPT_NONE:
        kind = {1: "AES", 2: "LUKS"}.get(header.crypt_method, f"method {header.crypt_method}")
        raise FormatError(f"encrypted images ({kind}) are not supported")


def _check_header_fields(header: Header) -> None:
    if header.refcount_order > MAX_REFCOUNT_ORDER:
        raise FormatError(f"refcount_order {header.refcount_order} exceeds 6 (64-bit refcounts)")
    compression_bit = bool(header.incompatible_features & INCOMPAT_COMPRESSION)
    if compression_bit != (header.compression_type != COMPRESSION_ZLIB):
        raise FormatError(
            f"compression type {header.compression_type} does not match the "
            "compression-type feature bit"
        )
    if header.compression_type not in COMPRESSION_NAMES:
        raise FormatError(f"unknown compression type {header.compression_type}")
    if header.extended_l2 and header.cluster_bits < MIN_EXTL2_CLUSTER_BITS:
        raise FormatError("extended L2 entries need clusters of at least 16 KiB")


def _read_backing_name(file: HostFile, meta: Metadata) -> None:
    header = meta.header
    if not header.backing_file_offset:
        return
    if header.backing_file_size > MAX_BACKING_NAME:
        raise FormatError(
            f"backing file name of {header.backing_file_size} bytes exceeds {MAX_BACKING_NAME}"
        )
    if header.backing_file_offset + header.backing_file_size > meta.file_size:
        raise FormatError("backing file name lies past the end of the file")
    raw = file.pread_sync(header.backing_file_offset, header.backing_file_size)
    try:
        meta.backing_name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("backing file name is not valid UTF-8") from None
    if not meta.backing_name:
        meta.backing_name = None


def _check_data_file(meta: Metadata) -> None:
    header = meta.header
    if header.has_data_file:
        if not meta.extensions.data_file:
            raise FormatError("image needs an external data file but does not name it")
    elif header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW:
        raise FormatError("data-file-raw is set but the image has no external data file")


def _check_table(meta: Metadata, what: str, offset: int, size: int) -> None:
    """A table of `size` bytes at `offset`: cluster-aligned and inside the file."""
    if offset % meta.header.cluster_size:
        raise FormatError(f"{what} offset 0x{offset:x} is not cluster-aligned")
    if offset + size > meta.file_size:
        raise FormatError(
            f"{what} (0x{offset:x}, {size} bytes) lies past the end of the file "
            f"({meta.file_size} bytes): truncated image?"
        )


def l1_entries_needed(header: Header, virtual_size: int) -> int:
    per_l1_entry = header.cluster_size * l2_entries_per_table(
        header.cluster_bits, header.extended_l2
    )
    return -(-virtual_size // per_l1_entry)


def check_l1(meta: Metadata, what: str, offset: int, l1_size: int, virtual_size: int) -> None:
    """Limits of an L1 table (active or a snapshot's)."""
    if l1_size * 8 > MAX_L1_BYTES:
        raise FormatError(f"{what} of {l1_size} entries exceeds QEMU's 32 MiB limit")
    if l1_size < l1_entries_needed(meta.header, virtual_size):
        raise FormatError(f"{what} of {l1_size} entries is too small for the virtual size")
    if l1_size:
        _check_table(meta, what, offset, l1_size * 8)


def _check_tables(meta: Metadata) -> None:
    header = meta.header
    check_l1(meta, "L1 table", header.l1_table_offset, header.l1_size, header.size)
    reftable_bytes = header.refcount_table_clusters * header.cluster_size
    if reftable_bytes > MAX_REFTABLE_BYTES:
        raise FormatError(
            f"refcount table of {header.refcount_table_clusters} clusters exceeds 8 MiB"
        )
    if header.refcount_table_clusters == 0:
        raise FormatError("image has no refcount table")
    _check_table(meta, "refcount table", header.refcount_table_offset, reftable_bytes)
    if header.nb_snapshots > snapfmt.MAX_SNAPSHOTS:
        raise FormatError(
            f"{header.nb_snapshots} snapshots exceed the limit of {snapfmt.MAX_SNAPSHOTS}"
        )
    if header.nb_snapshots:
        _check_table(meta, "snapshot table", header.snapshots_offset, 0)


def _read_snapshot_table(file: HostFile, meta: Metadata) -> list[snapfmt.Snapshot]:
    header = meta.header
    result: list[snapfmt.Snapshot] = []
    pos = header.snapshots_offset
    table_end = header.snapshots_offset + snapfmt.MAX_SNAPSHOT_TABLE_SIZE
    for _ in range(header.nb_snapshots):
        fixed = file.pread_sync(pos, snapfmt.FIXED_ENTRY_SIZE)
        if len(fixed) < snapfmt.FIXED_ENTRY_SIZE:
            raise FormatError("snapshot table lies past the end of the file: truncated image?")
        size = snapfmt.entry_size(fixed)
        if pos + size > table_end:
            raise FormatError("snapshot table exceeds QEMU's 64 MiB limit")
        buf = file.pread_sync(pos, size)
        if len(buf) < size:
            raise FormatError("snapshot table lies past the end of the file: truncated image?")
        snap = snapfmt.parse_entry(buf)
        disk_size = snap.disk_size if snap.disk_size is not None else header.size
        check_l1(meta, f"L1 table of snapshot {snap.id!r}", snap.l1_table_offset,
                 snap.l1_size, disk_size)
        result.append(snap)
        pos += (size + 7) & ~7
    meta.snapshot_table_size = pos - header.snapshots_offset
    return result


def read_l1(file: HostFile, offset: int, l1_size: int) -> array:
    """Load a checked L1 table (at most 32 MiB, inside the file)."""
    if not l1_size:
        return array("Q")
    return decode_table(file.pread_sync(offset, l1_size * 8))
