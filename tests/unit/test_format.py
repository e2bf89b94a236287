"""The on-disk format layer alone: no I/O, no FUSE."""

from __future__ import annotations

import struct
import subprocess
from array import array

import pytest

from qfuse.errors import FormatError
from qfuse.format import header as hdr
from qfuse.format import snapshots as snapfmt
from qfuse.format.entries import (
    CompressedLayout,
    decode_table,
    encode_table,
    l2_entries_per_table,
)


def _qemu_image(tmp_path, *opts: str) -> bytes:
    path = tmp_path / "x.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), "16M"],
                   check=True)
    return path.read_bytes()


@pytest.mark.parametrize("opts", [
    (),
    ("-o", "compat=0.10"),
    ("-o", "compression_type=zstd"),
    ("-o", "extended_l2=on,cluster_size=64k"),
    ("-o", "cluster_size=512,refcount_bits=1"),
    ("-o", "cluster_size=2M,refcount_bits=64,lazy_refcounts=on"),
])
def test_header_round_trip(tmp_path, opts):
    image = _qemu_image(tmp_path, *opts)
    parsed = hdr.parse_header(image[:1 << hdr.peek_cluster_bits(image[:72])])
    built = hdr.build_header(parsed)
    length = parsed.header_length if parsed.version >= 3 else hdr.V2_HEADER_LENGTH
    assert built == image[:length]
    assert hdr.parse_header(built + bytes(8)) == parsed


def test_header_fields_from_qemu(tmp_path):
    image = _qemu_image(tmp_path, "-o", "compression_type=zstd,cluster_size=4k")
    parsed = hdr.parse_header(image[:4096])
    assert parsed.version == 3
    assert parsed.cluster_size == 4096
    assert parsed.size == 16 << 20
    assert parsed.compression_type == hdr.COMPRESSION_ZSTD
    assert parsed.incompatible_features & hdr.INCOMPAT_COMPRESSION
    assert parsed.refcount_bits == 16


def test_unknown_header_fields_are_kept():
    base = hdr.Header(version=3, backing_file_offset=0, backing_file_size=0, cluster_bits=16,
                      size=1 << 20, crypt_method=0, l1_size=1, l1_table_offset=0x30000,
                      refcount_table_offset=0x10000, refcount_table_clusters=1,
                      nb_snapshots=0, snapshots_offset=0, header_length=120,
                      extra_fields=bytes([0]) + bytes(range(1, 16)))
    assert hdr.parse_header(hdr.build_header(base)) == base


@pytest.mark.parametrize("patch, message", [
    ((0, b"QFI\xfa"), "bad magic"),
    ((4, struct.pack(">I", 4)), "version 4"),
    ((100, struct.pack(">I", 100)), "below 104"),
    ((100, struct.pack(">I", 108)), "multiple of 8"),
])
def test_header_errors(tmp_path, patch, message):
    image = bytearray(_qemu_image(tmp_path)[:65536])
    offset, data = patch
    image[offset:offset + len(data)] = data
    with pytest.raises(FormatError, match=message):
        hdr.peek_cluster_bits(bytes(image[:72]))
        hdr.parse_header(bytes(image))


def test_extensions_round_trip_and_decode():
    feature = struct.pack(">BB46s", 0, 10, b"future-feature")
    raw = [
        (hdr.EXT_BACKING_FORMAT, b"qcow2"),
        (hdr.EXT_FEATURE_TABLE, feature),
        (0x12345678, b"unknown payload"),
        (hdr.EXT_DATA_FILE, b"disk.data"),
    ]
    area = hdr.build_extensions(raw)
    exts = hdr.parse_extensions(area, 0, len(area))
    assert exts.raw == raw
    assert exts.backing_format == "qcow2"
    assert exts.data_file == "disk.data"
    assert exts.feature_name(hdr.FEATURE_TYPE_INCOMPATIBLE, 10) == "future-feature"


def test_extension_past_header_cluster_is_refused():
    area = struct.pack(">II", 0x12345678, 4000) + bytes(100)
    with pytest.raises(FormatError, match="runs past the header cluster"):
        hdr.parse_extensions(area, 0, len(area))


@pytest.mark.parametrize("cluster_bits", range(9, 22))
@pytest.mark.parametrize("extended", [False, True])
def test_l2_entries_per_cluster_size(cluster_bits, extended):
    per_table = l2_entries_per_table(cluster_bits, extended)
    assert per_table * (16 if extended else 8) == 1 << cluster_bits


def test_table_decode_is_big_endian():
    raw = struct.pack(">QQ", 0x8000_0000_0005_0000, 1)
    table = decode_table(raw)
    assert list(table) == [0x8000_0000_0005_0000, 1]
    assert encode_table(table) == raw
    assert isinstance(table, array)


@pytest.mark.parametrize("cluster_bits", range(9, 22))
def test_compressed_descriptor_arithmetic(cluster_bits):
    layout = CompressedLayout(cluster_bits)
    # x = 62 - (cluster_bits - 8): the offset field's width.
    assert layout.size_shift == 62 - (cluster_bits - 8)
    for host_offset, length in [(0x50000, 1), (0x50123, 700), (0x7_FFFF_FE00, 512),
                                (0x1234567, (1 << cluster_bits) - 600)]:
        if host_offset > layout.offset_mask:
            continue
        entry = layout.encode(host_offset, length)
        decoded_offset, readable = layout.decode(entry)
        assert decoded_offset == host_offset
        # The readable span ends at the end of the last sector used.
        assert readable >= length
        assert (host_offset + readable) % 512 == 0
        assert readable - length < 512


def test_compressed_descriptor_known_value():
    # 64 KiB clusters: offset in bits 0-53, additional sectors in bits 54-61.
    entry = (1 << 62) | (3 << 54) | 0x10200
    assert CompressedLayout(16).decode(entry) == (0x10200, 4 * 512)


def test_snapshot_entry_round_trip():
    snap = snapfmt.Snapshot(l1_table_offset=0x40000, l1_size=2, id="1", name="before upgrade",
                            date_sec=1700000000, date_nsec=5, vm_clock_nsec=7,
                            vm_state_size=0, disk_size=1 << 30,
                            extra_data=struct.pack(">QQ", 0, 1 << 30))
    raw = snapfmt.build_entry(snap)
    assert len(raw) % 8 == 0
    assert (snapfmt.entry_size(raw[:40]) + 7) & ~7 == len(raw)
    assert snapfmt.parse_entry(raw) == snap


def test_snapshot_extra_data_limit():
    fixed = struct.pack(">QIHHIIQII", 0, 0, 1, 1, 0, 0, 0, 0, 1025)
    with pytest.raises(FormatError, match="extra data"):
        snapfmt.entry_size(fixed)
