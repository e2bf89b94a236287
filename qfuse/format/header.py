"""The qcow2 header and its extensions (docs/interop/qcow2.txt, "Header").

Parsed once at open and rebuilt when the header is rewritten, so construct
is used here, never on the per-request path.  Unknown trailing header fields
and unknown extensions are kept verbatim so that a rewrite preserves them.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field

from construct import Bytes, Const, Int8ub, Int32ub, Int64ub, StreamError, Struct
from construct import ConstError as ConstructConstError

from qfuse.errors import FormatError

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # QEMU's implementation limit: 2 MiB clusters
MAX_REFCOUNT_ORDER = 6

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
# Compatible feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear feature bits.
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

CRYPT_NONE = 0

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_DATA_FILE = 0x44415441

FEATURE_TYPE_INCOMPATIBLE = 0
FEATURE_TYPE_COMPATIBLE = 1
FEATURE_TYPE_AUTOCLEAR = 2

# Bytes 0-71: every version has these.
HeaderV2Struct = Struct(
    "magic" / Const(MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
)

# Bytes 72-103: version 3 and later.
HeaderV3FieldsStruct = Struct(
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
)

ExtensionHeaderStruct = Struct("type" / Int32ub, "length" / Int32ub)

FeatureNameStruct = Struct("type" / Int8ub, "bit" / Int8ub, "name" / Bytes(46))

BitmapsExtensionStruct = Struct(
    "nb_bitmaps" / Int32ub,
    "reserved" / Int32ub,
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
)

CryptoHeaderPointerStruct = Struct("offset" / Int64ub, "length" / Int64ub)



@dataclass
class Header:
    """The fixed header fields, with v2 defaults for the v3 ones.

    `extra_fields` holds the bytes from 104 (v3) up to header_length that this
    version of qfuse does not interpret beyond `compression_type` — kept so a
    header rewrite preserves fields a newer writer put there.
    """

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    extra_fields: bytes = b""

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def compression_type(self) -> int:
        """Byte 104 when present (header_length > 104), else zlib."""
        return self.extra_fields[0] if self.extra_fields else COMPRESSION_ZLIB

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)


def peek_cluster_bits(buf: bytes) -> int:
    """cluster_bits from the first 72 bytes, after checking magic and version.

    Open needs it to know how much to read as the header cluster.
    """
    if len(buf) < V2_HEADER_LENGTH:
        raise FormatError("file is too short to be a qcow2 image")
    if buf[:4] != MAGIC:
        raise FormatError("not a qcow2 image (bad magic)")
    (version,) = struct.unpack_from(">I", buf, 4)
    (cluster_bits,) = struct.unpack_from(">I", buf, 20)
    if version not in (2, 3):
        raise FormatError(f"unsupported qcow2 version {version}")
    return cluster_bits


def parse_header(buf: bytes) -> Header:
    """Decode the header from the start of the image (at least 104 bytes if v3).

    Checks only what is needed to decode; `check_header` checks the limits.
    """
    if len(buf) < V2_HEADER_LENGTH:
        raise FormatError("file is too short to be a qcow2 image")
    try:
        fixed = HeaderV2Struct.parse(buf[:V2_HEADER_LENGTH])
    except ConstructConstError:
        raise FormatError("not a qcow2 image (bad magic)") from None
    if fixed.version not in (2, 3):
        raise FormatError(f"unsupported qcow2 version {fixed.version}")
    values = {k: v for k, v in fixed.items() if not k.startswith("_") and k != "magic"}
    header = Header(**values)
    if fixed.version == 2:
        return header
    if len(buf) < V3_MIN_HEADER_LENGTH:
        raise FormatError("file is too short for a qcow2 v3 header")
    try:
        v3 = HeaderV3FieldsStruct.parse(buf[V2_HEADER_LENGTH:V3_MIN_HEADER_LENGTH])
    except StreamError:  # pragma: no cover - length checked above
        raise FormatError("truncated qcow2 v3 header") from None
    for name in ("incompatible_features", "compatible_features", "autoclear_features",
                 "refcount_order", "header_length"):
        setattr(header, name, v3[name])
    if header.header_length < V3_MIN_HEADER_LENGTH:
        raise FormatError(f"header_length {header.header_length} is below 104")
    if header.header_length % 8:
        raise FormatError(f"header_length {header.header_length} is not a multiple of 8")
    if len(buf) < header.header_length:
        raise FormatError(f"header_length {header.header_length} exceeds the header cluster")
    header.extra_fields = bytes(buf[V3_MIN_HEADER_LENGTH:header.header_length])
    return header


def build_header(header: Header) -> bytes:
    """Encode `header`; the inverse of `parse_header`."""
    fields = dataclasses.asdict(header)
    out = HeaderV2Struct.build(fields)
    if header.version >= 3:
        out += HeaderV3FieldsStruct.build(fields) + header.extra_fields
    return out


@dataclass
class FeatureName:
    type: int
    bit: int
    name: str


@dataclass
class BitmapsExtension:
    nb_bitmaps: int
    bitmap_directory_size: int
    bitmap_directory_offset: int


@dataclass
class CryptoHeaderPointer:
    offset: int
    length: int


@dataclass
class Extensions:
    """The header extensions, decoded where known, all kept in order.

    `raw` is every extension as (type, data) in file order, known or not, so a
    header rewrite can reproduce the ones it does not change.
    """

    raw: list[tuple[int, bytes]] = field(default_factory=list)
    backing_format: str | None = None
    feature_names: list[FeatureName] = field(default_factory=list)
    bitmaps: BitmapsExtension | None = None
    crypto_header: CryptoHeaderPointer | None = None
    data_file: str | None = None

    def feature_name(self, feature_type: int, bit: int) -> str | None:
        for entry in self.feature_names:
            if entry.type == feature_type and entry.bit == bit:
                return entry.name
        return None


def _decode_string(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{what} header extension is not valid UTF-8") from None


def parse_extensions(header_cluster: bytes, start: int, end: int) -> Extensions:
    """Decode the extensions in `header_cluster[start:end]`.

    `end` is where the extension area must stop: the backing file name's
    offset if there is one, else the end of the header cluster.  An extension
    that runs past it is refused (QEMU does the same).
    """
    exts = Extensions()
    seen: set[int] = set()
    pos = start
    while True:
        if pos + 8 > end:
            # QEMU accepts an area that ends without a terminator only when
            # it is exactly full; a partial extension header is damage.
            if pos == end:
                break
            raise FormatError("header extension area runs past the header cluster")
        ext_type, length = struct.unpack_from(">II", header_cluster, pos)
        pos += 8
        if ext_type == EXT_END:
            break
        if length > end - pos:
            raise FormatError(
                f"header extension 0x{ext_type:08x} of {length} bytes runs past the header cluster"
            )
        data = bytes(header_cluster[pos:pos + length])
        pos += (length + 7) & ~7
        if ext_type in seen and ext_type != 0:
            if ext_type in (EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_BITMAPS,
                            EXT_CRYPTO_HEADER, EXT_DATA_FILE):
                raise FormatError(f"header extension 0x{ext_type:08x} appears twice")
        seen.add(ext_type)
        exts.raw.append((ext_type, data))
        _decode_extension(exts, ext_type, data)
    return exts


def _decode_extension(exts: Extensions, ext_type: int, data: bytes) -> None:
    if ext_type == EXT_BACKING_FORMAT:
        exts.backing_format = _decode_string(data, "backing format")
    elif ext_type == EXT_DATA_FILE:
        exts.data_file = _decode_string(data, "external data file name")
    elif ext_type == EXT_FEATURE_TABLE:
        # Entries are 48 bytes; a trailing partial entry is ignored as QEMU does.
        for i in range(len(data) // FeatureNameStruct.sizeof()):
            entry = FeatureNameStruct.parse(data[i * 48:(i + 1) * 48])
            name = entry.name.split(b"\0", 1)[0].decode("utf-8", "replace")
            exts.feature_names.append(FeatureName(entry.type, entry.bit, name))
    elif ext_type == EXT_BITMAPS:
        if len(data) < BitmapsExtensionStruct.sizeof():
            raise FormatError("bitmaps header extension is too short")
        parsed = BitmapsExtensionStruct.parse(data)
        exts.bitmaps = BitmapsExtension(
            parsed.nb_bitmaps, parsed.bitmap_directory_size, parsed.bitmap_directory_offset
        )
    elif ext_type == EXT_CRYPTO_HEADER:
        if len(data) < CryptoHeaderPointerStruct.sizeof():
            raise FormatError("encryption header pointer extension is too short")
        parsed = CryptoHeaderPointerStruct.parse(data)
        exts.crypto_header = CryptoHeaderPointer(parsed.offset, parsed.length)


def build_extensions(exts: list[tuple[int, bytes]]) -> bytes:
    """Encode extensions (type, data) with padding and the end marker."""
    out = bytearray()
    for ext_type, data in exts:
        out += struct.pack(">II", ext_type, len(data)) + data
        out += b"\0" * (-len(data) % 8)
    out += struct.pack(">II", EXT_END, 0)
    return bytes(out)
