"""The structures of a new image, as QEMU lays them out (no I/O).

`ImageSpec` is what `qemu-img create -o ...` decides: the version, cluster
size, refcount width, feature bits and backing file.  From it this module
builds the header cluster byte for byte as QEMU 7.2 writes it
(`qcow2_update_header`): the v2 (72-byte) or v3 (112-byte) header, then the
backing-format extension, the feature-name table (v3 with clusters above
4 KiB only: QEMU leaves it out of small clusters to keep room for the
backing file name), the end marker, and the backing file name right after it.

It also sizes refcount metadata (QEMU's fixed point,
`qcow2_refcount_metadata_size`) and encodes refcount blocks of any width.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from qfuse.errors import FormatError
from qfuse.format.entries import l2_entries_per_table
from qfuse.format.header import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZLIB,
    EXT_BACKING_FORMAT,
    EXT_FEATURE_TABLE,
    FEATURE_TYPE_AUTOCLEAR,
    FEATURE_TYPE_COMPATIBLE,
    FEATURE_TYPE_INCOMPATIBLE,
    INCOMPAT_COMPRESSION,
    INCOMPAT_EXTL2,
    FeatureNameStruct,
    Header,
    build_extensions,
    build_header,
)
from qfuse.format.refcount import RefcountCodec

DEFAULT_CLUSTER_BITS = 16
# QEMU's v3 header: 104 bytes, the compression type byte, 7 bytes padding.
V3_HEADER_LENGTH = 112
MAX_BACKING_NAME = 1023
MAX_L1_ENTRIES = 32 * 1024 * 1024 // 8  # QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # QCOW_MAX_REFTABLE_SIZE
FEATURE_TABLE_MIN_CLUSTER = 4096  # the table is written only above this

# The feature-name table QEMU writes (type, bit, name), in its order.
QEMU_FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (FEATURE_TYPE_INCOMPATIBLE, 0, "dirty bit"),
    (FEATURE_TYPE_INCOMPATIBLE, 1, "corrupt bit"),
    (FEATURE_TYPE_INCOMPATIBLE, 2, "external data file"),
    (FEATURE_TYPE_INCOMPATIBLE, 3, "compression type"),
    (FEATURE_TYPE_INCOMPATIBLE, 4, "extended L2 entries"),
    (FEATURE_TYPE_COMPATIBLE, 0, "lazy refcounts"),
    (FEATURE_TYPE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_TYPE_AUTOCLEAR, 1, "raw external data"),
)


@dataclass(frozen=True)
class ImageSpec:
    """Everything that fixes a new qcow2 image's format, checked by `check_spec`."""

    virtual_size: int
    cluster_bits: int = DEFAULT_CLUSTER_BITS
    version: int = 3
    refcount_order: int = 4
    lazy_refcounts: bool = False
    extended_l2: bool = False
    compression_type: int = COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        """Guest clusters one L2 table maps."""
        return l2_entries_per_table(self.cluster_bits, self.extended_l2)

    @property
    def l1_size(self) -> int:
        """L1 entries needed for the virtual size."""
        per_l1_entry = self.cluster_size * self.l2_entries
        return -(-self.virtual_size // per_l1_entry)

    @property
    def guest_clusters(self) -> int:
        return -(-self.virtual_size // self.cluster_size)


def check_spec(spec: ImageSpec) -> None:
    """Refuse what QEMU's qcow2 driver refuses to create (FormatError)."""
    if spec.virtual_size < 0 or spec.virtual_size % 512:
        raise FormatError("the image size must be a multiple of 512 bytes")
    if spec.l1_size > MAX_L1_ENTRIES:
        raise FormatError("the image size is too large for qcow2 (try a larger cluster size)")
    if spec.backing_file is not None:
        if len(spec.backing_file.encode()) > MAX_BACKING_NAME:
            raise FormatError(f"the backing file name exceeds {MAX_BACKING_NAME} bytes")
        header_cluster(spec, l1_offset=0, l1_size=0, reftable_offset=0, reftable_clusters=1)


def feature_table() -> bytes:
    """The feature-name table extension's data, as QEMU writes it."""
    return b"".join(
        FeatureNameStruct.build({"type": t, "bit": b, "name": name.encode().ljust(46, b"\0")})
        for t, b, name in QEMU_FEATURE_NAMES
    )


def header_cluster(spec: ImageSpec, *, l1_offset: int, l1_size: int, reftable_offset: int,
                   reftable_clusters: int) -> bytes:
    """The whole first cluster: header, extensions, backing file name, zeros."""
    incompatible = compatible = 0
    if spec.compression_type != COMPRESSION_ZLIB:
        incompatible |= INCOMPAT_COMPRESSION
    if spec.extended_l2:
        incompatible |= INCOMPAT_EXTL2
    if spec.lazy_refcounts:
        compatible |= COMPAT_LAZY_REFCOUNTS
    header = Header(
        version=spec.version, backing_file_offset=0, backing_file_size=0,
        cluster_bits=spec.cluster_bits, size=spec.virtual_size, crypt_method=0,
        l1_size=l1_size, l1_table_offset=l1_offset, refcount_table_offset=reftable_offset,
        refcount_table_clusters=reftable_clusters, nb_snapshots=0, snapshots_offset=0,
    )  # fmt: skip
    if spec.version >= 3:
        header.incompatible_features = incompatible
        header.compatible_features = compatible
        header.refcount_order = spec.refcount_order
        header.header_length = V3_HEADER_LENGTH
        header.extra_fields = bytes([spec.compression_type]).ljust(V3_HEADER_LENGTH - 104, b"\0")
    extensions: list[tuple[int, bytes]] = []
    if spec.backing_format is not None:
        extensions.append((EXT_BACKING_FORMAT, spec.backing_format.encode()))
    if spec.version >= 3 and spec.cluster_size > FEATURE_TABLE_MIN_CLUSTER:
        extensions.append((EXT_FEATURE_TABLE, feature_table()))
    body_length = len(build_header(header)) + len(build_extensions(extensions))
    name = spec.backing_file.encode() if spec.backing_file is not None else b""
    if name:
        header.backing_file_offset = body_length
        header.backing_file_size = len(name)
    out = build_header(header) + build_extensions(extensions) + name
    if len(out) > spec.cluster_size:
        raise FormatError("the backing file name does not fit in the header cluster "
                          "(use a shorter name or a larger cluster size)")
    return out.ljust(spec.cluster_size, b"\0")


def refcount_metadata_clusters(clusters: int, cluster_size: int,
                               refcount_order: int) -> tuple[int, int]:
    """(refcount blocks, refcount table clusters) to count `clusters` more.

    The blocks and the table count themselves too, so this is QEMU's fixed
    point; at least one of each.
    """
    per_block = cluster_size * 8 >> refcount_order
    per_table_cluster = cluster_size // 8
    blocks = table = 1
    while True:
        want_blocks = -(-(clusters + blocks + table) // per_block)
        want_table = -(-want_blocks // per_table_cluster)
        if (want_blocks, want_table) == (blocks, table):
            break
        blocks, table = max(want_blocks, 1), max(want_table, 1)
    if table * cluster_size > MAX_REFTABLE_BYTES:
        raise FormatError("the refcount table would exceed QEMU's 8 MiB limit "
                          "(use larger clusters or narrower refcounts)")
    return blocks, table


_TYPECODES = {8: "B", 16: "H", 32: "I", 64: "Q"}


def encode_refcount_block(counts: Sequence[int], codec: RefcountCodec,
                          cluster_size: int) -> bytes:
    """One refcount block holding `counts` (at most one block's worth)."""
    entries = codec.entries_per_block(cluster_size)
    if len(counts) > entries:
        raise ValueError("more refcounts than one block holds")
    if counts and max(counts) > codec.max_value:
        raise FormatError(f"a refcount exceeds {codec.max_value} ({codec.bits}-bit refcounts)")
    typecode = _TYPECODES.get(codec.bits)
    if typecode is not None and array(typecode).itemsize * 8 == codec.bits:
        values = array(typecode, counts)
        if sys.byteorder == "little":
            values.byteswap()
        return values.tobytes().ljust(cluster_size, b"\0")
    block = bytearray(cluster_size)
    for index, value in enumerate(counts):
        if value:
            codec.set(block, index, value)
    return bytes(block)

