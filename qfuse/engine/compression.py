"""Compressing and decompressing one cluster, zlib (raw deflate) or zstd.

QEMU's rule: decompression must produce exactly one cluster; the input may
carry trailing bytes (the rest of the last 512-byte sector), which are
ignored.  Anything else is a bad cluster.

Compression is QEMU's too (block/qcow2-threads.c): zlib as a raw deflate
stream with a 4 KiB window (window bits -12, memory level 9, default
level), zstd as one frame at the default level; a cluster that does not
shrink below the cluster size is written uncompressed.
"""

from __future__ import annotations

import zlib

import zstandard

from qfuse.format.header import COMPRESSION_ZLIB, COMPRESSION_ZSTD


class DecompressionError(Exception):
    pass


def decompress_cluster(compression_type: int, data: bytes, cluster_size: int) -> bytes:
    if compression_type == COMPRESSION_ZLIB:
        return _inflate(data, cluster_size)
    if compression_type == COMPRESSION_ZSTD:
        return _unzstd(data, cluster_size)
    raise DecompressionError(f"unknown compression type {compression_type}")


def _inflate(data: bytes, cluster_size: int) -> bytes:
    # Negative window bits: a raw deflate stream, no zlib header.
    inflater = zlib.decompressobj(-15)
    try:
        out = inflater.decompress(data, cluster_size)
    except zlib.error as exc:
        raise DecompressionError(f"zlib: {exc}") from None
    if len(out) != cluster_size:
        raise DecompressionError(
            f"decompressed to {len(out)} bytes instead of one cluster ({cluster_size})"
        )
    return out


_ZSTD = zstandard.ZstdDecompressor()


def _unzstd(data: bytes, cluster_size: int) -> bytes:
    # One frame; the bytes after it are sector padding.  Reading one byte
    # more than a cluster bounds the memory a hostile frame can claim and
    # shows a frame that holds more than one cluster.
    try:
        with _ZSTD.stream_reader(data, read_across_frames=False) as reader:
            out = reader.read(cluster_size + 1)
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"zstd: {exc}") from None
    if len(out) != cluster_size:
        raise DecompressionError(
            f"decompressed to {len(out)} bytes instead of one cluster ({cluster_size})"
        )
    return out


def compress_cluster(compression_type: int, data: bytes | memoryview) -> bytes | None:
    """`data` (one whole cluster) compressed, or None when it does not shrink.

    Thread-safe and GIL-free in its heavy part, so callers may run many at once.
    """
    if compression_type == COMPRESSION_ZLIB:
        deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        out = deflater.compress(data) + deflater.flush()
    elif compression_type == COMPRESSION_ZSTD:
        out = zstandard.ZstdCompressor().compress(data)
    else:
        raise ValueError(f"unknown compression type {compression_type}")
    return out if len(out) < len(data) else None
